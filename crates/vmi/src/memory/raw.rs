//! A raw physical-memory image: guest-physical address == file offset.
//!
//! What QMP `pmemsave` writes, or a copy of a shared RAM file of a guest with
//! all RAM below the PCI hole. Mapped read-only: an image is evidence, not a
//! way to change a guest.

use std::path::Path;

use super::{MappedFileMemory, MemoryError, PhysRange, PhysicalMemory};

/// A raw memory image file, read-only, with the identity layout.
#[derive(Debug)]
pub struct RawMemory {
    inner: MappedFileMemory,
}

impl RawMemory {
    /// Maps the whole of `path` read-only; byte `i` of the file is gpa `i`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, MemoryError> {
        Ok(RawMemory {
            inner: MappedFileMemory::open_identity(path, false)?,
        })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        self.inner.path()
    }
}

impl PhysicalMemory for RawMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.inner.read_phys(gpa, buf)
    }

    fn ranges(&self) -> &[PhysRange] {
        self.inner.ranges()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_layout_and_read_only() {
        let dir = crate::memory::TestDir::new("raw");
        let path = dir.join("img");
        std::fs::write(&path, (0..=255u8).collect::<Vec<_>>()).unwrap();
        let mem = RawMemory::open(&path).unwrap();
        assert_eq!(mem.ranges(), &[PhysRange::single(256)]);
        let mut b = [0u8; 3];
        mem.read_phys(0x10, &mut b).unwrap();
        assert_eq!(b, [0x10, 0x11, 0x12]);
        assert_eq!(
            mem.read_phys(254, &mut b),
            Err(MemoryError::Unmapped { gpa: 256 })
        );
        assert_eq!(mem.write_phys(0, &b), Err(MemoryError::ReadOnly));
        std::fs::write(dir.join("empty"), b"").unwrap();
        assert!(RawMemory::open(dir.join("empty")).is_err());
    }
}
