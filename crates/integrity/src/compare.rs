//! Byte comparison of an image range with the running kernel's copy,
//! explaining away what KASLR and the kernel's own patching change.

use crate::patchsites::Intervals;

/// A run of bytes that differ and that nothing explains, link-time `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
}

/// Differences closer than this are reported as one region (one hook
/// usually rewrites a few nearby bytes: a jmp and its operand).
const MERGE_GAP: u64 = 8;
/// Bound on regions reported for one range (a guest rewriting all of its
/// text should not make us allocate without limit).
pub const MAX_REGIONS: usize = 4096;

/// Whether the bytes at `p` differ only by the KASLR slide applied to an
/// absolute address: a 64-bit pointer, or a sign-extended 32-bit immediate
/// (also the kernel's inverse 32-bit relocations, which subtract it).
fn relocated(img: &[u8], run: &[u8], p: usize, slide: u64) -> bool {
    let word = |b: &[u8], q: usize, n: usize| -> Option<u64> {
        let s = b.get(q..q + n)?;
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(s);
        Some(u64::from_le_bytes(a))
    };
    for q in p.saturating_sub(7)..=p {
        if let (Some(i), Some(r)) = (word(img, q, 8), word(run, q, 8)) {
            if r.wrapping_sub(i) == slide {
                return true;
            }
        }
    }
    let s32 = slide as u32;
    for q in p.saturating_sub(3)..=p {
        if let (Some(i), Some(r)) = (word(img, q, 4), word(run, q, 4)) {
            let d = (r as u32).wrapping_sub(i as u32);
            if d == s32 || d == s32.wrapping_neg() {
                return true;
            }
        }
    }
    false
}

/// The unexplained differences between `img` (image bytes at link-time
/// `start`) and `run` (the guest's bytes at `start + slide`), skipping
/// `patchable` bytes and anything in `skip` (link-time ranges).
pub fn unexplained(
    img: &[u8],
    run: &[u8],
    start: u64,
    slide: u64,
    patchable: Option<&Intervals>,
    skip: &[(u64, u64)],
) -> Vec<Region> {
    let mut out: Vec<Region> = Vec::new();
    let n = img.len().min(run.len());
    let mut block = 0;
    while block < n {
        let end = (block + 4096).min(n);
        if img[block..end] == run[block..end] {
            block = end;
            continue;
        }
        for p in block..end {
            if img[p] == run[p] {
                continue;
            }
            let link = start + p as u64;
            if patchable.is_some_and(|m| m.contains(link))
                || skip.iter().any(|r| (r.0..r.1).contains(&link))
                || relocated(img, run, p, slide)
            {
                continue;
            }
            match out.last_mut() {
                Some(r) if link <= r.end + MERGE_GAP => r.end = link + 1,
                _ => {
                    if out.len() >= MAX_REGIONS {
                        return out;
                    }
                    out.push(Region {
                        start: link,
                        end: link + 1,
                    })
                }
            }
        }
        block = end;
    }
    out
}

/// A control transfer at `bytes[0]`, in the forms inline hooks use:
/// `jmp/call rel32`, `movabs rax, imm64; jmp rax`, `push imm32; ret`,
/// `jmp [rip+0]; imm64`. `at` is the run-time address of `bytes[0]`.
/// Returns the instruction's length and its destination.
pub fn decode_transfer(bytes: &[u8], at: u64) -> Option<(usize, u64)> {
    let rd32 = |o: usize| -> Option<i64> {
        Some(i64::from(i32::from_le_bytes(
            bytes.get(o..o + 4)?.try_into().ok()?,
        )))
    };
    let rd64 = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?))
    };
    match bytes {
        [0xe8 | 0xe9, ..] => Some((5, (at + 5).wrapping_add(rd32(1)? as u64))),
        [0x48, 0xb8, ..] if bytes.get(10..12) == Some(&[0xff, 0xe0]) => Some((12, rd64(2)?)),
        [0x68, ..] if bytes.get(5) == Some(&0xc3) => Some((6, rd32(1)? as u64)),
        [0xff, 0x25, 0, 0, 0, 0, ..] => Some((14, rd64(6)?)),
        _ => None,
    }
}

/// The transfer whose bytes cover link-time `pos`, trying starts up to 9
/// bytes before it (`bytes` begins at link-time `from`, run-time `from + slide`).
pub fn transfer_covering(bytes: &[u8], from: u64, pos: u64, slide: u64) -> Option<(u64, u64)> {
    let back = pos.checked_sub(from)?;
    for k in back.saturating_sub(9)..=back {
        let b = bytes.get(k as usize..)?;
        if let Some((len, dest)) = decode_transfer(b, from + k + slide) {
            if k + len as u64 > back {
                return Some((from + k, dest));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLIDE: u64 = 0x1e00_0000;

    #[test]
    fn slid_pointers_and_immediates_are_explained() {
        let mut img = vec![0x90u8; 64];
        img[8..16].copy_from_slice(&0xffff_ffff_8123_4560u64.to_le_bytes());
        img[20..24].copy_from_slice(&0x8200_0000u32.to_le_bytes());
        let mut run = img.clone();
        run[8..16].copy_from_slice(&(0xffff_ffff_8123_4560u64 + SLIDE).to_le_bytes());
        run[20..24].copy_from_slice(&(0x8200_0000u32 + SLIDE as u32).to_le_bytes());
        assert!(unexplained(&img, &run, 0x1000, SLIDE, None, &[]).is_empty());
    }

    #[test]
    fn a_jmp_patch_is_one_region_with_its_target() {
        let img = vec![0x90u8; 64];
        let mut run = img.clone();
        run[4] = 0xe9;
        run[5..9].copy_from_slice(&0x100i32.to_le_bytes());
        let r = unexplained(&img, &run, 0x1000, SLIDE, None, &[]);
        assert_eq!(
            r,
            vec![Region {
                start: 0x1004,
                end: 0x1009
            }]
        );
        let (at, dest) = transfer_covering(&run, 0x1000, 0x1006, SLIDE).unwrap();
        assert_eq!((at, dest), (0x1004, 0x1004 + SLIDE + 5 + 0x100));
    }

    #[test]
    fn patchable_and_skipped_bytes_are_not_reported() {
        let img = vec![0u8; 32];
        let mut run = img.clone();
        run[2] = 1;
        run[20] = 1;
        let m = Intervals::from_ranges(vec![(0x1002, 0x1003)]);
        assert!(unexplained(&img, &run, 0x1000, SLIDE, Some(&m), &[(0x1014, 0x1015)]).is_empty());
    }

    proptest::proptest! {
        /// Guest bytes of any shape: bounded output, no panic.
        #[test]
        fn arbitrary_guest_bytes_never_panic(
            img in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            run in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            slide in proptest::prelude::any::<u64>(),
            pos in 0u64..700,
        ) {
            let regions = unexplained(&img, &run, 0x1000, slide, None, &[]);
            proptest::prop_assert!(regions.len() <= MAX_REGIONS);
            for r in &regions {
                proptest::prop_assert!(r.start < r.end && r.end <= 0x1000 + img.len().min(run.len()) as u64);
            }
            let _ = transfer_covering(&run, 0x1000, 0x1000 + pos, slide);
            let _ = decode_transfer(&run, slide);
        }
    }

    #[test]
    fn movabs_jmp_and_push_ret_decode() {
        let mut b = vec![0x48, 0xb8];
        b.extend_from_slice(&0xffff_ffff_c012_3456u64.to_le_bytes());
        b.extend_from_slice(&[0xff, 0xe0]);
        assert_eq!(decode_transfer(&b, 0), Some((12, 0xffff_ffff_c012_3456)));
        let p = [0x68, 0x56, 0x34, 0x12, 0xc0, 0xc3];
        assert_eq!(decode_transfer(&p, 0), Some((6, 0xffff_ffff_c012_3456)));
    }
}
