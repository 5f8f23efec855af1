//! Guest-physical memory held in a `Vec`: for tests, fuzzing and synthetic
//! page tables, where no VM or file should be needed.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{for_each_piece, normalize_ranges, MemoryError, Overlap, PhysRange, PhysicalMemory};

/// In-memory guest-physical memory, writable through `&self` (so it can sit
/// behind an `Arc<dyn PhysicalMemory>` like the real sources).
#[derive(Debug)]
pub struct VecMemory {
    data: RwLock<Vec<u8>>,
    ranges: Vec<PhysRange>,
}

impl VecMemory {
    /// `data` at guest-physical 0 (gpa == index).
    pub fn new(data: Vec<u8>) -> Self {
        let ranges = if data.is_empty() {
            Vec::new()
        } else {
            vec![PhysRange::single(data.len() as u64)]
        };
        VecMemory {
            data: RwLock::new(data),
            ranges,
        }
    }

    /// `len` zero bytes at guest-physical 0.
    pub fn zeroed(len: usize) -> Self {
        Self::new(vec![0; len])
    }

    /// `data` laid out in guest-physical space by `ranges` (file offsets index
    /// `data`), e.g. to imitate QEMU's split around the PCI hole.
    pub fn with_ranges(data: Vec<u8>, ranges: Vec<PhysRange>) -> Result<Self, MemoryError> {
        let ranges = normalize_ranges(ranges, data.len() as u64, Overlap::Reject, "<vec>")?;
        Ok(VecMemory {
            data: RwLock::new(data),
            ranges,
        })
    }

    /// Writes a little-endian u64 at `gpa` (test convenience).
    pub fn write_u64(&self, gpa: u64, value: u64) -> Result<(), MemoryError> {
        self.write_phys(gpa, &value.to_le_bytes())
    }

    /// A copy of the whole backing buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        self.read_lock().clone()
    }

    // A panic while holding the lock cannot leave the bytes inconsistent in a
    // way that matters (they are arbitrary guest bytes anyway), so poisoning
    // is ignored instead of propagated as a panic.
    fn read_lock(&self) -> RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl PhysicalMemory for VecMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let data = self.read_lock();
        for_each_piece(&self.ranges, gpa, buf.len(), |off, at, n| {
            // Ranges were checked against data.len() when built.
            let off = off as usize;
            buf[at..at + n].copy_from_slice(&data[off..off + n]);
        })
    }

    fn write_phys(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let mut data = self.write_lock();
        for_each_piece(&self.ranges, gpa, buf.len(), |off, at, n| {
            let off = off as usize;
            data[off..off + n].copy_from_slice(&buf[at..at + n]);
        })
    }

    fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }
}

/// Memory where every guest-physical address is backed: `gpa` reads byte
/// `gpa % len`, so any pointer leads somewhere. For fuzzing walks that must
/// terminate on their own bounds, not on unmapped memory.
pub struct WrappingMemory {
    data: Vec<u8>,
    ranges: Vec<PhysRange>,
}

impl WrappingMemory {
    /// `data` must not be empty; `claimed_len` is what [`PhysicalMemory::ranges`] reports.
    pub fn new(data: Vec<u8>, claimed_len: u64) -> Option<Self> {
        if data.is_empty() {
            return None;
        }
        Some(WrappingMemory {
            data,
            ranges: vec![PhysRange::single(claimed_len)],
        })
    }
}

impl PhysicalMemory for WrappingMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let n = self.data.len() as u64;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.data[(gpa.wrapping_add(i as u64) % n) as usize];
        }
        Ok(())
    }

    fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_and_holes() {
        let mem = VecMemory::with_ranges(
            vec![0; 0x2000],
            vec![
                PhysRange::single(0x1000),
                PhysRange {
                    gpa: 0x1_0000_0000,
                    len: 0x1000,
                    file_offset: 0x1000,
                },
            ],
        )
        .unwrap();
        mem.write_u64(0x1_0000_0008, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(mem.read_u64(0x1_0000_0008).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(mem.to_vec()[0x1008], 0x88);
        assert_eq!(
            mem.read_u64(0xffc),
            Err(MemoryError::Unmapped { gpa: 0x1000 })
        );
        assert!(VecMemory::new(Vec::new()).read_u64(0).is_err());
        let mut empty = [0u8; 0];
        assert!(VecMemory::zeroed(1).read_phys(5, &mut empty).is_ok());
    }
}
