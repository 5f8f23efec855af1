//! The recorder in a running guest: the module, its buffer and its key
//! found from guest memory alone, and keys written into the guest's RAM
//! file.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmi::btf::Btf;
use vmi::linux::LinuxGuest;
use vmi::memory::{PhysRange, PhysicalMemory};
use vmi::paging::AddressSpace;

use super::{
    read_header, Access, KmodError, Target, BUFFER_SYMBOL, HEADER_SIZE, KEY_SYMBOL, MAX_CAPACITY,
    MODULE_NAME, RECORD_SIZE,
};
use crate::symbolize::{ModLayout, Symbolizer};

/// A live guest, located, with its names.
pub struct Attached {
    pub guest: LinuxGuest,
    /// The image's BTF (struct layouts for the module's symbol table).
    pub btf: Option<Btf>,
    /// Kernel and module names (read when attached: attach after insmod).
    pub names: Symbolizer,
    /// Problems met reading the module list or module symbols.
    pub warnings: Vec<String>,
}

/// Locates the kernel (`vmlinux`, the ELF the guest booted) in `mem` and
/// reads its module list. Never pauses the guest.
pub fn attach(mem: Arc<dyn PhysicalMemory>, vmlinux: &Path) -> Result<Attached, KmodError> {
    let a = crate::host::attach_guest(mem, vmlinux)?;
    Ok(Attached {
        guest: a.guest,
        btf: a.btf,
        names: a.names,
        warnings: a.warnings,
    })
}

/// Guest reads through the kernel page tables, no key writes.
struct ReadOnly<'a>(&'a AddressSpace);

impl Access for ReadOnly<'_> {
    fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), KmodError> {
        self.0
            .read(va, buf)
            .map_err(|source| KmodError::Read { va, source })
    }

    fn store_key(&self, key: u64) -> Result<(), KmodError> {
        let _ = key;
        Err(KmodError::Key {
            va: 0,
            reason: "read-only access".into(),
        })
    }
}

/// Finds the loaded `xftrace` module and, in its own symbol table,
/// `xft_buf` and `xft_key`; checks the buffer header (magic, version, its
/// copy of `&xft_key`) and fixes the capacity the host will read.
pub fn locate(guest: &LinuxGuest, btf: Option<&Btf>) -> Result<Target, KmodError> {
    let btf = btf.ok_or_else(|| KmodError::Symbols("the kernel image has no BTF".into()))?;
    // Fails early, with the BTF error, on a kernel whose struct module we cannot read.
    ModLayout::from_btf(btf).map_err(|e| KmodError::Symbols(e.to_string()))?;
    let list = guest.modules();
    let m = list
        .items
        .iter()
        .find(|m| m.name == MODULE_NAME)
        .ok_or(KmodError::NotLoaded)?;
    if m.state != "Live" {
        return Err(KmodError::Symbols(format!(
            "the module is {} (still loading or unloading)",
            m.state
        )));
    }
    let k = guest.kernel_space();
    let rd = ReadOnly(k);
    let (mut key, mut buf) = (None, None);
    let symbols = guest
        .module_symbols(m.module)
        .map_err(|e| KmodError::Symbols(format!("the module's symbol table: {e}")))?;
    for sym in symbols {
        if sym.function {
            continue;
        }
        if sym.name == KEY_SYMBOL {
            key = Some((sym.addr, sym.size));
        } else if sym.name == BUFFER_SYMBOL {
            buf = Some((sym.addr, sym.size));
        }
    }
    let (key_va, key_size) = key.ok_or(KmodError::Symbol(KEY_SYMBOL))?;
    let (buffer_va, buffer_size) = buf.ok_or(KmodError::Symbol(BUFFER_SYMBOL))?;
    if key_size != 8 || !key_va.is_multiple_of(8) {
        return Err(KmodError::Key {
            va: key_va,
            reason: format!("{key_size} bytes, not an aligned u64"),
        });
    }
    if buffer_size < HEADER_SIZE + RECORD_SIZE {
        return Err(KmodError::Header(format!(
            "the buffer symbol is {buffer_size} bytes"
        )));
    }
    let mut target = Target {
        module: m.module,
        key_va,
        buffer_va,
        buffer_size,
        capacity: 0,
    };
    let h = read_header(&rd, &target)?;
    target.capacity = h
        .capacity
        .min((buffer_size - HEADER_SIZE) / RECORD_SIZE)
        .min(MAX_CAPACITY);
    Ok(target)
}

/// One u64 of guest RAM, mapped from the RAM file, stored atomically.
pub struct MappedKey {
    map: memmap2::MmapRaw,
    at: usize,
    gpa: u64,
}

impl MappedKey {
    /// Maps the RAM file (`ranges` place guest-physical memory in it) for
    /// the 8 bytes at `gpa`.
    pub fn open(ram: &Path, ranges: &[PhysRange], gpa: u64) -> Result<Self, KmodError> {
        let bad = |reason: String| KmodError::RamFile {
            path: ram.display().to_string(),
            reason,
        };
        if !gpa.is_multiple_of(8) {
            return Err(bad(format!(
                "guest-physical {gpa:#x} is not 8-byte aligned"
            )));
        }
        let off = ranges
            .iter()
            .find_map(|r| r.file_offset_of(gpa, 8))
            .ok_or_else(|| bad(format!("guest-physical {gpa:#x} is not in it")))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(ram)
            .map_err(|e| bad(e.to_string()))?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        if off.checked_add(8).is_none_or(|end| end > len) {
            return Err(bad(format!(
                "offset {off:#x} is past its end ({len} bytes)"
            )));
        }
        let map = memmap2::MmapOptions::new()
            .map_raw(&file)
            .map_err(|e| bad(format!("mmap: {e}")))?;
        let at = usize::try_from(off).map_err(|e| bad(e.to_string()))?;
        if at.checked_add(8).is_none_or(|end| end > map.len()) {
            return Err(bad(format!("offset {off:#x} is past the mapping")));
        }
        Ok(MappedKey { map, at, gpa })
    }

    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// One 8-byte store: the guest reads the old or the new key, never a mix.
    pub fn store(&self, key: u64) {
        // SAFETY: `at + 8 <= map.len()` (checked in `open`) and the file
        // offset, hence the pointer (the mapping is page aligned), is
        // 8-byte aligned, so the pointer is valid and aligned for a u64
        // for as long as `self.map` lives. The bytes are shared with the
        // guest, which reads them concurrently; we only ever access them
        // through this atomic, and no Rust reference to the mapping exists.
        unsafe {
            let p = self.map.as_mut_ptr().add(self.at).cast::<u64>();
            AtomicU64::from_ptr(p).store(key, Ordering::SeqCst);
        }
    }
}

/// [`Access`] to a running guest: reads through the kernel page tables
/// (walked afresh each time), the key through its RAM file page.
pub struct LiveAccess {
    space: AddressSpace,
    key_va: u64,
    key: MappedKey,
}

impl LiveAccess {
    /// Translates `xft_key` in the kernel page tables and maps it from the
    /// RAM file `ram` (laid out by `ranges`).
    pub fn open(
        guest: &LinuxGuest,
        target: &Target,
        ram: &Path,
        ranges: &[PhysRange],
    ) -> Result<Self, KmodError> {
        let k = guest.kernel_space();
        let space = AddressSpace::without_cache(Arc::clone(k.memory()), k.root(), k.mode());
        let t = space
            .translate(target.key_va)
            .map_err(|source| KmodError::Read {
                va: target.key_va,
                source,
            })?;
        if !t.writable {
            return Err(KmodError::Key {
                va: target.key_va,
                reason: "mapped read-only in the guest: not module data".into(),
            });
        }
        let key = MappedKey::open(ram, ranges, t.pa)?;
        Ok(LiveAccess {
            space,
            key_va: target.key_va,
            key,
        })
    }
}

impl Access for LiveAccess {
    fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), KmodError> {
        self.space
            .read(va, buf)
            .map_err(|source| KmodError::Read { va, source })
    }

    fn store_key(&self, key: u64) -> Result<(), KmodError> {
        // The page must still be where it was mapped: after an rmmod it
        // may belong to anything.
        let t = self
            .space
            .translate(self.key_va)
            .map_err(|source| KmodError::Read {
                va: self.key_va,
                source,
            })?;
        if t.pa != self.key.gpa() {
            return Err(KmodError::Key {
                va: self.key_va,
                reason: format!(
                    "now at guest-physical {:#x}, was {:#x} (module reloaded?)",
                    t.pa,
                    self.key.gpa()
                ),
            });
        }
        self.key.store(key);
        Ok(())
    }
}
