//! Where the kernel legitimately rewrites its own text at run time, read from
//! the image's patch-site tables: alternatives, paravirt sites, retpoline and
//! return-thunk sites, call-depth sites, ENDBR sealing, SMP lock prefixes,
//! jump labels, static calls and their trampolines, ftrace's mcount sites and
//! ftrace's own call sites. A difference from the image anywhere else in core
//! text is a patch nobody in the kernel made.

use vmi::btf::Btf;
use vmi::image::KernelImage;
use vmi::symbols::KernelSymbols;

use crate::baseline::{read_i32, read_u64};

/// A set of byte ranges `[start, end)`, merged and sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Intervals {
    ranges: Vec<(u64, u64)>,
}

impl Intervals {
    /// Builds the set from unsorted, possibly overlapping ranges.
    pub fn from_ranges(mut v: Vec<(u64, u64)>) -> Self {
        v.retain(|r| r.0 < r.1);
        v.sort_unstable();
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match ranges.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => ranges.push((s, e)),
            }
        }
        Intervals { ranges }
    }

    /// Whether `addr` is inside one of the ranges.
    pub fn contains(&self, addr: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.1 <= addr);
        self.ranges.get(i).is_some_and(|r| r.0 <= addr)
    }

    /// The range holding `addr`.
    pub fn range_of(&self, addr: u64) -> Option<(u64, u64)> {
        let i = self.ranges.partition_point(|r| r.1 <= addr);
        self.ranges.get(i).copied().filter(|r| r.0 <= addr)
    }

    /// Total bytes covered.
    pub fn len_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1 - r.0).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// Patch sites found in an image.
pub struct Sites {
    /// Every byte the kernel may rewrite.
    pub patchable: Intervals,
    /// ftrace's call sites: only nop5, the image's call, or a call into ftrace.
    pub mcount: Intervals,
    /// Jump-label sites and their jump targets (link-time), sorted by site.
    pub jumps: Vec<(u64, u64)>,
    /// Sites whose patched form may start with a call or jump (alternatives,
    /// paravirt, retpoline, return, call and static-call sites, static-call
    /// trampolines), sorted: their branch must stay in core text.
    pub branch_sites: Vec<BranchSite>,
}

/// A patch site whose run-time bytes may begin with a call or jump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BranchSite {
    pub addr: u64,
    pub len: u8,
    /// A static call: may legitimately call into a (listed) module.
    pub static_call: bool,
}

/// Longest site a table can describe (alternatives' lengths are a u8).
const MAX_SITE: u64 = 255;
/// Bound on entries read from one table (the largest, .call_sites, has ~240k).
const MAX_ENTRIES: usize = 1 << 20;

/// Collects the patch sites of core text `[text.0, text.1)`.
pub fn collect(image: &KernelImage, syms: &KernelSymbols, btf: &Btf, text: (u64, u64)) -> Sites {
    let mut v: Vec<(u64, u64)> = Vec::new();
    let mut branch: Vec<BranchSite> = Vec::new();
    let in_text = |a: u64| (text.0..text.1).contains(&a);
    let branch_site = |b: &mut Vec<BranchSite>, addr: u64, len: u64, static_call: bool| {
        if in_text(addr) && len > 0 {
            b.push(BranchSite {
                addr,
                len: len.min(MAX_SITE) as u8,
                static_call,
            });
        }
    };
    let push = |v: &mut Vec<(u64, u64)>, site: u64, len: u64| {
        if in_text(site) {
            v.push((site, site + len.min(MAX_SITE)));
        }
    };

    // Tables of s32 offsets relative to each entry: (section, bytes patched).
    // Run-time constants (6.12+: `runtime_ptr_*` imm64, `runtime_shift_*` imm8).
    let runtime_consts: Vec<(String, u64)> = image
        .section_names()
        .filter_map(|n| {
            if n.starts_with("runtime_ptr_") {
                Some((n.to_string(), 8))
            } else if n.starts_with("runtime_shift_") {
                Some((n.to_string(), 1))
            } else {
                None
            }
        })
        .collect();
    let fixed = [
        (".retpoline_sites", 6),
        (".return_sites", 5),
        (".call_sites", 5),
        (".ibt_endbr_seal", 4),
        (".smp_locks", 1),
    ];
    let tables = fixed
        .iter()
        .map(|&(n, l)| (n, l))
        .chain(runtime_consts.iter().map(|(n, l)| (n.as_str(), *l)));
    for (section, len) in tables {
        // Run-time constants, lock prefixes and sealed ENDBRs never become
        // branches (their sites are immediates or prefixes).
        let branches = matches!(
            section,
            ".retpoline_sites" | ".return_sites" | ".call_sites"
        );
        if let Some(s) = image.section(section) {
            for (i, _) in s.data.chunks_exact(4).enumerate().take(MAX_ENTRIES) {
                let at = s.addr + (i as u64) * 4;
                let site = at.wrapping_add(read_i32(s.data, i * 4) as u64);
                push(&mut v, site, len);
                if branches {
                    branch_site(&mut branch, site, len, false);
                }
            }
        }
    }

    // struct alt_instr { s32 instr_offset; s32 repl_offset; ...; u8 instrlen; ... }
    if let (Some(s), Ok(size), Ok(len_off)) = (
        image.section(".altinstructions"),
        btf.struct_size("alt_instr"),
        btf.offset_of("alt_instr", "instrlen"),
    ) {
        if size > 0 {
            for (i, e) in s
                .data
                .chunks_exact(size as usize)
                .enumerate()
                .take(MAX_ENTRIES)
            {
                let at = s.addr + i as u64 * size;
                let len = u64::from(e.get(len_off as usize).copied().unwrap_or(0));
                let site = at.wrapping_add(read_i32(e, 0) as u64);
                push(&mut v, site, len);
                branch_site(&mut branch, site, len, false);
            }
        }
    }

    // struct paravirt_patch_site { u8 *instr; u8 type; u8 len; } (kernels < 6.8)
    if let (Some(s), Ok(size), Ok(len_off)) = (
        image.section(".parainstructions"),
        btf.struct_size("paravirt_patch_site"),
        btf.offset_of("paravirt_patch_site", "len"),
    ) {
        if size > 0 {
            for e in s.data.chunks_exact(size as usize).take(MAX_ENTRIES) {
                let len = u64::from(e.get(len_off as usize).copied().unwrap_or(0));
                push(&mut v, read_u64(e, 0), len);
                branch_site(&mut branch, read_u64(e, 0), len, false);
            }
        }
    }

    // struct jump_entry { s32 code; s32 target; long key; }: a 2- or 5-byte
    // jmp/nop; not patchable bytes: the text check accepts there only a nop
    // or a jump to the entry's own target.
    let mut jumps: Vec<(u64, u64)> = Vec::new();
    for_table(
        image,
        syms,
        "__start___jump_table",
        "__stop___jump_table",
        16,
        |at, e| {
            let site = at.wrapping_add(read_i32(e, 0) as u64);
            let target = (at + 4).wrapping_add(read_i32(e, 4) as u64);
            if in_text(site) {
                jumps.push((site, target));
            }
        },
    );
    // struct static_call_site { s32 addr; s32 key; }: a 5-byte call/jmp/nop.
    for_table(
        image,
        syms,
        "__start_static_call_sites",
        "__stop_static_call_sites",
        8,
        |at, e| {
            let site = at.wrapping_add(read_i32(e, 0) as u64);
            push(&mut v, site, 5);
            branch_site(&mut branch, site, 5, true);
        },
    );
    // Static-call trampolines (`__SCT__name`): a jmp or ret rewritten in place.
    for s in syms.iter().filter(|s| s.name.starts_with("__SCT__")) {
        push(&mut v, s.addr, 8);
        branch_site(&mut branch, s.addr, 8, true);
    }

    // ftrace's mcount sites (nop5 <-> call ftrace) are not patchable bytes:
    // the text check accepts only a call to ftrace there (khook-style hooks
    // write their jmp over exactly this nop). The calls inside ftrace's own
    // trampolines that point at the current tracer are patchable.
    let mut mcount = Vec::new();
    for_table(
        image,
        syms,
        "__start_mcount_loc",
        "__stop_mcount_loc",
        8,
        |_, e| {
            let site = read_u64(e, 0);
            if in_text(site) {
                mcount.push((site, site + 5));
            }
        },
    );
    for name in ["ftrace_call", "ftrace_regs_call", "ftrace_graph_call"] {
        if let Some(a) = syms.address_of(name) {
            push(&mut v, a, 5);
        }
    }
    // objtool also lists the fentry call in .call_sites (6.2+): an ftrace site
    // stays an ftrace site, checked as such.
    let mcount = Intervals::from_ranges(mcount);
    v.retain(|r| !mcount.contains(r.0));
    branch.retain(|b| !mcount.contains(b.addr));
    branch.sort_unstable();
    // One entry per address; a static call wins (it is the more permissive).
    branch.dedup_by(|later, kept| {
        let same = later.addr == kept.addr;
        if same {
            kept.static_call |= later.static_call;
            kept.len = kept.len.max(later.len);
        }
        same
    });
    jumps.sort_unstable();
    jumps.dedup_by_key(|j| j.0);
    // A jump-label site inside an alternative is the alternative's business.
    let patchable = Intervals::from_ranges(v);
    jumps.retain(|j| !patchable.contains(j.0));
    Sites {
        patchable,
        jumps,
        mcount,
        branch_sites: branch,
    }
}

/// Calls `f(entry address, entry bytes)` for each `size`-byte entry between two symbols.
fn for_table(
    image: &KernelImage,
    syms: &KernelSymbols,
    start: &str,
    stop: &str,
    size: usize,
    mut f: impl FnMut(u64, &[u8]),
) {
    let (Some(a), Some(b)) = (syms.address_of(start), syms.address_of(stop)) else {
        return;
    };
    let len = b.saturating_sub(a).min((MAX_ENTRIES * size) as u64) as usize;
    let Some(bytes) = image.read_vaddr(a, len) else {
        return;
    };
    for (i, e) in bytes.chunks_exact(size).enumerate() {
        f(a + (i * size) as u64, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn intervals_merge_and_answer() {
        let s = Intervals::from_ranges(vec![(10, 15), (12, 20), (30, 31), (5, 5)]);
        assert!(!s.contains(9));
        assert!(s.contains(10) && s.contains(19));
        assert!(!s.contains(20));
        assert!(s.contains(30) && !s.contains(31));
        assert_eq!(s.range_of(14), Some((10, 20)));
        assert_eq!(s.len_bytes(), 11);
    }

    proptest! {
        #[test]
        fn intervals_agree_with_a_naive_set(ranges in proptest::collection::vec((0u64..200, 0u64..20), 0..20), probe in 0u64..230) {
            let v: Vec<(u64, u64)> = ranges.iter().map(|&(s, l)| (s, s + l)).collect();
            let naive = v.iter().any(|&(s, e)| s <= probe && probe < e);
            prop_assert_eq!(Intervals::from_ranges(v).contains(probe), naive);
        }
    }
}
