//! Guest-physical memory behind one trait.
//!
//! Sources: the live shared-RAM file of a running VM ([`MappedFileMemory`]),
//! QEMU `dump-guest-memory` ELF files ([`ElfDumpMemory`]) and raw images
//! ([`RawMemory`]). QEMU does not lay RAM out linearly: RAM above the PCI hole
//! sits at guest-physical 4 GiB but follows the low RAM in the backing file, so
//! every source maps guest-physical addresses through a list of [`PhysRange`]s.

use thiserror::Error;

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
