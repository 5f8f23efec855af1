//! The live shared-RAM file of a running QEMU VM, mapped into our process.
//!
//! QEMU started with `-object memory-backend-file,share=on,mem-path=FILE`
//! (or a memfd reached through `/proc/PID/fd/N`) keeps guest RAM in a file
//! that any process may map `MAP_SHARED`. Reading it does not pause the guest,
//! and the guest keeps writing while we read: see [`MappedRegion`] for what
//! that means for Rust.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use memmap2::{MmapOptions, MmapRaw};

use super::{for_each_piece, normalize_ranges, MemoryError, Overlap, PhysRange, PhysicalMemory};

/// A `MAP_SHARED` mapping of a whole file, accessed only through bounds-checked
/// copies.
///
/// The bytes can change at any moment (the guest's vCPUs write them through
/// QEMU's own mapping), so no `&[u8]` into the mapping is ever created: a Rust
/// reference promises the bytes do not change while it lives, which would be
/// a lie. Instead every access copies with `ptr::copy_nonoverlapping` between
/// the mapping and a caller-owned buffer, and callers treat the copy as
/// untrusted data that may be torn (half old, half new) if the guest wrote
/// concurrently.
///
/// If another host process truncates the file under us, touching the lost
/// pages raises SIGBUS like any other mmap user would see; QEMU never does
/// that to its own RAM backend, so this is accepted rather than guarded.
pub(crate) struct MappedRegion {
    map: MmapRaw,
    writable: bool,
}

impl MappedRegion {
    /// Maps all of `path`, read-write (`writable`) or read-only.
    pub(crate) fn open(path: &Path, writable: bool) -> Result<Self, MemoryError> {
        let err = |what: &str, e: std::io::Error| MemoryError::Open {
            path: path.display().to_string(),
            reason: format!("{what}: {e}"),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| err("open", e))?;
        let meta = file.metadata().map_err(|e| err("stat", e))?;
        if !meta.is_file() {
            return Err(MemoryError::Open {
                path: path.display().to_string(),
                reason: "not a regular file".into(),
            });
        }
        if meta.len() == 0 {
            return Err(MemoryError::Open {
                path: path.display().to_string(),
                reason: "file is empty".into(),
            });
        }
        let opts = MmapOptions::new();
        let map = if writable {
            opts.map_raw(&file)
        } else {
            opts.map_raw_read_only(&file)
        }
        .map_err(|e| err("mmap", e))?;
        Ok(MappedRegion { map, writable })
    }

    /// Size of the mapping in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether [`Self::copy_in`] may be used.
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    /// Copies `buf.len()` bytes from file offset `off` into `buf`.
    /// Returns `false` (copying nothing) if the span is not inside the mapping.
    pub(crate) fn copy_out(&self, off: u64, buf: &mut [u8]) -> bool {
        let Some(start) = self.checked_span(off, buf.len()) else {
            return false;
        };
        // SAFETY: `checked_span` proved `start + buf.len() <= self.map.len()`,
        // so the source lies inside the live mapping owned by `self` (it stays
        // mapped until `self` is dropped, and `&self` outlives this call).
        // `buf` is a distinct Rust allocation: we never hand out pointers into
        // the mapping, so the two cannot overlap. Other processes may write
        // the source bytes concurrently; we copy them as plain `u8`s (every
        // bit pattern valid), never form a reference to them, and callers
        // treat the result as untrusted and possibly torn.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(start),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        true
    }

    /// Copies `buf` to file offset `off`. Returns `false` (writing nothing) if
    /// the mapping is read-only or the span is not inside it.
    pub(crate) fn copy_in(&self, off: u64, buf: &[u8]) -> bool {
        if !self.writable {
            return false;
        }
        let Some(start) = self.checked_span(off, buf.len()) else {
            return false;
        };
        // SAFETY: as in `copy_out`, the destination span is inside the live
        // mapping and cannot overlap the caller's `buf`. The mapping was made
        // with PROT_WRITE (`writable` is only true for `map_raw`), so the
        // store does not fault. Concurrent guest writes to the same bytes
        // race at the byte level only: the guest sees some mix of old and
        // new bytes, exactly as with a DMA-capable device; no Rust reference
        // to the mapping exists that the race could invalidate.
        unsafe {
            std::ptr::copy_nonoverlapping(
                buf.as_ptr(),
                self.map.as_mut_ptr().add(start),
                buf.len(),
            );
        }
        true
    }

    fn checked_span(&self, off: u64, len: usize) -> Option<usize> {
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.map.len()).then_some(start)
    }
}

/// Guest RAM of a running VM, read (and optionally written) through the
/// shared RAM file QEMU backs it with, without pausing the guest.
///
/// The file is not laid out like guest-physical space: on `pc`/`q35` the RAM
/// above 4 GiB follows the low RAM in the file. The caller passes the
/// [`PhysRange`]s (from QEMU's view of its RAM, see [`PhysRange::qemu_x86`]);
/// reads into a hole between them fail with [`MemoryError::Unmapped`].
pub struct MappedFileMemory {
    path: PathBuf,
    region: MappedRegion,
    ranges: Vec<PhysRange>,
}

impl MappedFileMemory {
    /// Maps `path` `MAP_SHARED` (read-write if `writable`) and serves the
    /// guest-physical `ranges` from it.
    ///
    /// Fails if a range runs past the end of the file or two ranges overlap.
    /// Ranges adjacent in both gpa and file offset are merged.
    pub fn open(
        path: impl AsRef<Path>,
        ranges: Vec<PhysRange>,
        writable: bool,
    ) -> Result<Self, MemoryError> {
        let path = path.as_ref();
        let region = MappedRegion::open(path, writable)?;
        let ranges = normalize_ranges(
            ranges,
            region.len(),
            Overlap::Reject,
            &path.display().to_string(),
        )?;
        Ok(MappedFileMemory {
            path: path.to_path_buf(),
            region,
            ranges,
        })
    }

    /// Maps `path` with the identity layout (gpa == file offset over the whole
    /// file): right for guests whose RAM all sits below the PCI hole.
    pub fn open_identity(path: impl AsRef<Path>, writable: bool) -> Result<Self, MemoryError> {
        let path = path.as_ref();
        let len = std::fs::metadata(path)
            .map_err(|e| MemoryError::Open {
                path: path.display().to_string(),
                reason: format!("stat: {e}"),
            })?
            .len();
        Self::open(path, vec![PhysRange::single(len)], writable)
    }

    /// The file this memory is mapped from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether [`PhysicalMemory::write_phys`] can succeed.
    pub fn is_writable(&self) -> bool {
        self.region.writable()
    }

    /// Size of the backing file in bytes, as mapped.
    pub fn file_len(&self) -> u64 {
        self.region.len()
    }
}

impl std::fmt::Debug for MappedFileMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFileMemory")
            .field("path", &self.path)
            .field("writable", &self.region.writable())
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl PhysicalMemory for MappedFileMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut ok = true;
        for_each_piece(&self.ranges, gpa, buf.len(), |off, at, n| {
            ok &= self.region.copy_out(off, &mut buf[at..at + n]);
        })?;
        // Ranges were checked against the file size at open, so this only
        // fires if that invariant is broken; report it rather than panic.
        ok.then_some(()).ok_or(MemoryError::Unmapped { gpa })
    }

    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        if !self.region.writable() {
            return Err(MemoryError::ReadOnly);
        }
        let mut ok = true;
        for_each_piece(&self.ranges, gpa, buf.len(), |off, at, n| {
            ok &= self.region.copy_in(off, &buf[at..at + n]);
        })?;
        ok.then_some(()).ok_or(MemoryError::Unmapped { gpa })
    }

    fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::TestDir;
    use std::io::Write;

    /// A temp file of `len` bytes where byte i == (i / 4096) as u8 ^ (i as u8).
    fn temp_file(dir: &TestDir, name: &str, len: usize) -> PathBuf {
        let path = dir.join(name);
        let data: Vec<u8> = (0..len).map(|i| ((i / 4096) as u8) ^ (i as u8)).collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        path
    }

    fn byte_at(off: u64) -> u8 {
        ((off / 4096) as u8) ^ (off as u8)
    }

    /// Low RAM 0..0x3000 at file 0, "high" RAM at gpa 0x10000 from file 0x3000:
    /// a hole 0x3000..0x10000 like QEMU's PCI hole, in miniature.
    fn two_ranges() -> Vec<PhysRange> {
        vec![
            PhysRange {
                gpa: 0x10000,
                len: 0x2000,
                file_offset: 0x3000,
            },
            PhysRange::single(0x3000),
        ]
    }

    #[test]
    fn reads_through_two_ranges_with_a_hole() {
        let dir = TestDir::new("mapped");
        let path = temp_file(&dir, "two", 0x5000);
        let mem = MappedFileMemory::open(&path, two_ranges(), false).unwrap();
        assert_eq!(mem.ranges().len(), 2);
        assert_eq!(mem.ranges()[0].gpa, 0, "sorted by gpa");

        let mut b = [0u8; 16];
        mem.read_phys(0x2ff0, &mut b).unwrap();
        assert!(b
            .iter()
            .enumerate()
            .all(|(i, &x)| x == byte_at(0x2ff0 + i as u64)));
        mem.read_phys(0x10010, &mut b).unwrap();
        assert!(b
            .iter()
            .enumerate()
            .all(|(i, &x)| x == byte_at(0x3010 + i as u64)));

        // Into the hole, across the end of low RAM, past the end of high RAM.
        assert_eq!(
            mem.read_phys(0x4000, &mut b),
            Err(MemoryError::Unmapped { gpa: 0x4000 })
        );
        assert_eq!(
            mem.read_phys(0x2ff8, &mut b),
            Err(MemoryError::Unmapped { gpa: 0x3000 })
        );
        assert_eq!(
            mem.read_phys(0x11ff8, &mut b),
            Err(MemoryError::Unmapped { gpa: 0x12000 })
        );
        assert_eq!(
            mem.read_phys(u64::MAX - 3, &mut b),
            Err(MemoryError::Unmapped { gpa: u64::MAX - 3 })
        );
        assert_eq!(mem.write_phys(0, &b), Err(MemoryError::ReadOnly));
    }

    #[test]
    fn writes_are_visible_through_the_file_and_all_or_nothing() {
        let dir = TestDir::new("mapped");
        let path = temp_file(&dir, "rw", 0x5000);
        let mem = MappedFileMemory::open(&path, two_ranges(), true).unwrap();
        mem.write_phys(0x10100, b"hello").unwrap();
        let other = MappedFileMemory::open_identity(&path, false).unwrap();
        let mut b = [0u8; 5];
        other.read_phys(0x3100, &mut b).unwrap();
        assert_eq!(&b, b"hello");

        // A write that would run into the hole changes nothing.
        let before = {
            let mut v = [0u8; 8];
            mem.read_phys(0x2ffc, &mut v[..4]).unwrap();
            v
        };
        assert!(mem.write_phys(0x2ffc, &[0xaa; 8]).is_err());
        let mut after = [0u8; 8];
        mem.read_phys(0x2ffc, &mut after[..4]).unwrap();
        assert_eq!(before, after);
    }

    #[test]
    fn adjacent_ranges_merge_and_bad_ranges_are_rejected() {
        let dir = TestDir::new("mapped");
        let path = temp_file(&dir, "bad", 0x4000);
        let adjacent = vec![
            PhysRange::single(0x1000),
            PhysRange {
                gpa: 0x1000,
                len: 0x1000,
                file_offset: 0x1000,
            },
        ];
        let mem = MappedFileMemory::open(&path, adjacent, false).unwrap();
        assert_eq!(mem.ranges(), &[PhysRange::single(0x2000)]);

        let past_end = vec![PhysRange::single(0x4001)];
        assert!(matches!(
            MappedFileMemory::open(&path, past_end, false),
            Err(MemoryError::Open { .. })
        ));
        let overlap = vec![
            PhysRange::single(0x2000),
            PhysRange {
                gpa: 0x1000,
                len: 0x1000,
                file_offset: 0x3000,
            },
        ];
        assert!(MappedFileMemory::open(&path, overlap, false).is_err());
        assert!(MappedFileMemory::open(path.with_extension("missing"), vec![], false).is_err());
    }

    #[test]
    fn gpa_adjacent_ranges_from_different_file_places_read_across() {
        let dir = TestDir::new("mapped");
        let path = temp_file(&dir, "split", 0x4000);
        // gpa 0..0x1000 from file 0x3000, gpa 0x1000..0x2000 from file 0.
        let ranges = vec![
            PhysRange {
                gpa: 0,
                len: 0x1000,
                file_offset: 0x3000,
            },
            PhysRange {
                gpa: 0x1000,
                len: 0x1000,
                file_offset: 0,
            },
        ];
        let mem = MappedFileMemory::open(&path, ranges, false).unwrap();
        let mut b = [0u8; 4];
        mem.read_phys(0xffe, &mut b).unwrap();
        assert_eq!(
            b,
            [byte_at(0x3ffe), byte_at(0x3fff), byte_at(0), byte_at(1)]
        );
    }

    #[test]
    fn qemu_x86_layout() {
        let r = PhysRange::qemu_x86(6 << 30, 0xc000_0000);
        assert_eq!(
            r,
            vec![
                PhysRange::single(0xc000_0000),
                PhysRange {
                    gpa: 1 << 32,
                    len: (6 << 30) - 0xc000_0000,
                    file_offset: 0xc000_0000
                }
            ]
        );
        assert_eq!(
            PhysRange::qemu_x86(512 << 20, 0xe000_0000),
            vec![PhysRange::single(512 << 20)]
        );
    }
}
