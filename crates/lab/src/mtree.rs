//! Where guest RAM lives in the memory-backend file, from QEMU's own view.
//!
//! QEMU does not map the backend file linearly: on `pc`/`q35` RAM above
//! 3 GiB (or 2 GiB) moves past the PCI hole to 4 GiB, while staying
//! contiguous in the file. `info mtree -f` prints the flattened address
//! space; every range whose memory region is the backend (`mem`) is a run of
//! guest RAM, and its `@offset` is the offset in the backend, i.e. in the file:
//!
//! ```text
//! FlatView #0
//!  AS "memory", root: system
//!  Root memory region: system
//!   0000000000000000-00000000bfffffff (prio 0, ram): mem
//!   0000000100000000-000000013fffffff (prio 0, ram): mem @00000000c0000000
//! ```

use vmi::memory::PhysRange;

/// Parses `info mtree -f` output into the RAM runs of the backend whose
/// memory region is called `backend`, sorted by guest-physical address, with
/// adjacent runs merged. Only the flat view of the system address space
/// (`AS "memory"`) is used; if no view is labelled so, all views are.
pub fn parse_ram_ranges(text: &str, backend: &str) -> Vec<PhysRange> {
    let mut views: Vec<(bool, Vec<PhysRange>)> = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("FlatView #") {
            views.push((false, Vec::new()));
            continue;
        }
        let Some((is_system, ranges)) = views.last_mut() else {
            continue;
        };
        if t.starts_with("AS \"memory\"") {
            *is_system = true;
        } else if let Some(r) = parse_line(t, backend) {
            ranges.push(r);
        }
    }
    let any_system = views.iter().any(|(s, _)| *s);
    let mut all: Vec<PhysRange> = views
        .into_iter()
        .filter(|(s, _)| *s || !any_system)
        .flat_map(|(_, r)| r)
        .collect();
    all.sort_by_key(|r| (r.gpa, r.file_offset));
    all.dedup();
    let mut merged: Vec<PhysRange> = Vec::with_capacity(all.len());
    for r in all {
        if let Some(last) = merged.last_mut() {
            if last.gpa + last.len == r.gpa && last.file_offset + last.len == r.file_offset {
                last.len += r.len;
                continue;
            }
        }
        merged.push(r);
    }
    merged
}

/// `0000000100000000-000000013fffffff (prio 0, ram): mem @00000000c0000000`
fn parse_line(line: &str, backend: &str) -> Option<PhysRange> {
    let (left, right) = line.split_once("): ")?;
    let (span, attrs) = left.split_once(" (")?;
    let kind = attrs.rsplit(", ").next()?;
    if kind != "ram" {
        return None;
    }
    let mut words = right.split_whitespace();
    if words.next()? != backend {
        return None;
    }
    let offset = words
        .find_map(|w| w.strip_prefix('@'))
        .map(|h| u64::from_str_radix(h, 16))
        .transpose()
        .ok()?
        .unwrap_or(0);
    let (start, end) = span.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let len = end.checked_sub(start)?.checked_add(1)?;
    Some(PhysRange {
        gpa: start,
        len,
        file_offset: offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn pc_4g_splits_around_the_pci_hole() {
        let text = include_str!("../testdata/mtree-pc-4G.txt");
        let r = parse_ram_ranges(text, "mem");
        assert_eq!(
            r,
            vec![
                PhysRange {
                    gpa: 0,
                    len: 3 * GIB,
                    file_offset: 0
                },
                PhysRange {
                    gpa: 4 * GIB,
                    len: GIB,
                    file_offset: 3 * GIB
                },
            ]
        );
    }

    #[test]
    fn booted_pc_512m_with_rom_holes() {
        let text = include_str!("../testdata/mtree-pc-512M-booted.txt");
        let r = parse_ram_ranges(text, "mem");
        let total: u64 = r.iter().map(|r| r.len).sum();
        assert!(total <= 512 << 20 && total > 500 << 20, "{r:?}");
        for w in r.windows(2) {
            assert!(w[0].gpa + w[0].len <= w[1].gpa);
        }
        // Every run maps 1:1 below 4 GiB.
        assert!(r.iter().all(|r| r.gpa == r.file_offset));
    }

    #[test]
    fn q35_2g() {
        let text = include_str!("../testdata/mtree-q35-3G.txt");
        let r = parse_ram_ranges(text, "mem");
        let last = r.last().unwrap();
        assert_eq!(last.gpa, 4 * GIB);
        assert_eq!(last.file_offset + last.len, 3 * GIB);
    }

    #[test]
    fn ignores_other_regions_and_garbage() {
        let text = "FlatView #0\n AS \"memory\", root: system\n\
            00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios\n\
            0000000000000000-000000000009ffff (prio 0, ram): memx\n\
            zzzz-0 (prio 0, ram): mem\n\
            0000000000000000-000000000009ffff (prio 0, ram): mem\n";
        assert_eq!(
            parse_ram_ranges(text, "mem"),
            vec![PhysRange {
                gpa: 0,
                len: 0xa0000,
                file_offset: 0
            }]
        );
    }
}
