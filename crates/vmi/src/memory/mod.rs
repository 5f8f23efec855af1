//! Guest-physical memory behind one trait.
//!
//! Sources: the live shared-RAM file of a running VM ([`MappedFileMemory`]),
//! QEMU `dump-guest-memory` ELF files ([`ElfDumpMemory`]) and raw images
//! ([`RawMemory`]). QEMU does not lay RAM out linearly: RAM above the PCI hole
//! sits at guest-physical 4 GiB but follows the low RAM in the backing file, so
//! every source maps guest-physical addresses through a list of [`PhysRange`]s.
//! [`VecMemory`] holds bytes in a `Vec`, for tests and fuzzing.
//!
//! None of the sources pauses the guest. The live source sees the guest's
//! writes as they happen, so a multi-byte read may be torn; callers that need
//! consistency read twice or work from a dump.

use thiserror::Error;

mod elf_dump;
mod mapped;
mod raw;
mod vec;

pub use elf_dump::{DumpCpuState, DumpSegment, ElfDumpMemory};
pub use mapped::MappedFileMemory;
pub use raw::RawMemory;
pub use vec::{VecMemory, WrappingMemory};

/// Errors from reading or writing guest-physical memory.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MemoryError {
    /// No RAM backs this guest-physical address (a hole, MMIO, or past the end).
    #[error("guest-physical address {gpa:#x} is not backed by RAM")]
    Unmapped { gpa: u64 },
    /// The source cannot be written (dump files are read-only).
    #[error("this memory source is read-only")]
    ReadOnly,
    /// Opening or mapping the backing file failed.
    #[error("{path}: {reason}")]
    Open { path: String, reason: String },
    /// The file is not in the format this source expects.
    #[error("{path}: not a {expected}: {reason}")]
    Format {
        path: String,
        expected: &'static str,
        reason: String,
    },
}

/// One contiguous run of guest-physical RAM and where it lives in the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PhysRange {
    /// First guest-physical address of the run.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of `gpa` in the backing file.
    pub file_offset: u64,
}

impl PhysRange {
    /// One run covering `[0, len)` at file offset 0: the identity layout of a raw
    /// image, or of a QEMU guest whose RAM all sits below the PCI hole.
    pub fn single(len: u64) -> Self {
        PhysRange {
            gpa: 0,
            len,
            file_offset: 0,
        }
    }

    /// The layout QEMU's `pc`/`q35` machines give a RAM backend of `ram_size`
    /// bytes when `below_4g` of it sits below the PCI hole: low RAM at gpa 0 ==
    /// file offset 0, the rest at gpa 4 GiB right after it in the file.
    ///
    /// `below_4g` is machine- and option-dependent (`pc` splits at 3.5 GiB,
    /// `q35` at 2 GiB, `max-ram-below-4g` overrides both), so the caller reads
    /// it from QEMU (e.g. HMP `info mtree`) rather than guessing here.
    pub fn qemu_x86(ram_size: u64, below_4g: u64) -> Vec<PhysRange> {
        let low = below_4g.min(ram_size);
        let mut out = Vec::with_capacity(2);
        if low > 0 {
            out.push(PhysRange::single(low));
        }
        if ram_size > low {
            out.push(PhysRange {
                gpa: 1 << 32,
                len: ram_size - low,
                file_offset: low,
            });
        }
        out
    }

    /// One past the last guest-physical address of the run (saturating).
    pub fn gpa_end(&self) -> u64 {
        self.gpa.saturating_add(self.len)
    }

    /// The file offset of `gpa` if this range holds the whole `[gpa, gpa+len)`.
    pub fn file_offset_of(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        let range_end = self.gpa.checked_add(self.len)?;
        if gpa >= self.gpa && end <= range_end {
            Some(self.file_offset + (gpa - self.gpa))
        } else {
            None
        }
    }
}

/// Guest-physical memory. Implementations never pause the guest and never
/// hand out references into guest memory: the guest may change any byte at
/// any time, so callers get copies.
pub trait PhysicalMemory: Send + Sync {
    /// Copies `buf.len()` bytes starting at `gpa`. Fails if any byte is unbacked.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Writes `buf` at `gpa`. Read-only sources return [`MemoryError::ReadOnly`].
    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let _ = (gpa, buf);
        Err(MemoryError::ReadOnly)
    }

    /// The RAM runs this source holds, sorted by `gpa`.
    fn ranges(&self) -> &[PhysRange];

    /// Reads a little-endian u64 at `gpa`.
    fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// How [`normalize_ranges`] treats ranges whose guest-physical spans overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overlap {
    /// Overlaps are a caller bug: reject them.
    Reject,
    /// Keep the first range (lowest gpa, then file order) and trim later ones.
    /// Dump files may describe one physical page more than once.
    TrimLater,
}

/// Sorts `ranges` by gpa, drops empty ones, checks that each lies inside a
/// backing store of `backing_len` bytes, handles overlaps per `overlap` and
/// merges neighbours that are contiguous in both gpa and file offset.
///
/// `path` only labels the error.
pub(crate) fn normalize_ranges(
    mut ranges: Vec<PhysRange>,
    backing_len: u64,
    overlap: Overlap,
    path: &str,
) -> Result<Vec<PhysRange>, MemoryError> {
    let bad = |reason: String| MemoryError::Open {
        path: path.to_string(),
        reason,
    };
    ranges.retain(|r| r.len > 0);
    for r in &ranges {
        if r.gpa.checked_add(r.len).is_none() {
            return Err(bad(format!(
                "range gpa {:#x} len {:#x} overflows the address space",
                r.gpa, r.len
            )));
        }
        match r.file_offset.checked_add(r.len) {
            Some(end) if end <= backing_len => {}
            _ => {
                return Err(bad(format!(
                    "range gpa {:#x} len {:#x} at file offset {:#x} runs past the end of the \
                     backing file ({:#x} bytes)",
                    r.gpa, r.len, r.file_offset, backing_len
                )))
            }
        }
    }
    // Stable sort: equal gpas keep their input (file) order.
    ranges.sort_by_key(|r| r.gpa);
    let mut out: Vec<PhysRange> = Vec::with_capacity(ranges.len());
    for mut r in ranges {
        if let Some(last) = out.last_mut() {
            let last_end = last.gpa + last.len;
            if r.gpa < last_end {
                match overlap {
                    Overlap::Reject => {
                        return Err(bad(format!(
                            "ranges overlap: gpa {:#x}..{:#x} and {:#x}..{:#x}",
                            last.gpa,
                            last_end,
                            r.gpa,
                            r.gpa + r.len
                        )))
                    }
                    Overlap::TrimLater => {
                        let cut = last_end - r.gpa;
                        if cut >= r.len {
                            continue;
                        }
                        r.gpa += cut;
                        r.file_offset += cut;
                        r.len -= cut;
                    }
                }
            }
            if r.gpa == last_end && r.file_offset == last.file_offset + last.len {
                last.len += r.len;
                continue;
            }
        }
        out.push(r);
    }
    Ok(out)
}

/// Maps `[gpa, gpa + len)` onto the backing store through sorted,
/// non-overlapping `ranges` and calls `f(file_offset, offset_in_buffer, n)` for
/// each piece, in order.
///
/// Nothing is called unless every byte is backed, so a failed write changes
/// nothing. A read may cross from one range into the next only where the next
/// one starts exactly where the previous one ends in guest-physical space;
/// anything else (a hole, the PCI hole, past the end) is
/// [`MemoryError::Unmapped`] naming the first unbacked address.
pub(crate) fn for_each_piece(
    ranges: &[PhysRange],
    gpa: u64,
    len: usize,
    mut f: impl FnMut(u64, usize, usize),
) -> Result<(), MemoryError> {
    // Pass 1 checks, pass 2 acts; both walk the same (bounded) ranges.
    for act in [false, true] {
        let mut done = 0usize;
        let mut idx = ranges.partition_point(|r| r.gpa <= gpa).checked_sub(1);
        while done < len {
            let cur = gpa
                .checked_add(done as u64)
                .ok_or(MemoryError::Unmapped { gpa: u64::MAX })?;
            let r = match idx.and_then(|i| ranges.get(i)) {
                Some(r) if r.gpa <= cur && cur - r.gpa < r.len => r,
                _ => return Err(MemoryError::Unmapped { gpa: cur }),
            };
            let avail = r.len - (cur - r.gpa);
            let n = usize::try_from(avail).unwrap_or(usize::MAX).min(len - done);
            if act {
                f(r.file_offset + (cur - r.gpa), done, n);
            }
            done += n;
            idx = idx.map(|i| i + 1);
        }
    }
    Ok(())
}

/// A scratch directory for tests, removed when dropped.
#[cfg(test)]
pub(crate) struct TestDir(std::path::PathBuf);

#[cfg(test)]
impl TestDir {
    pub(crate) fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmi-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }

    /// `name` inside the directory.
    pub(crate) fn join(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

#[cfg(test)]
impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
