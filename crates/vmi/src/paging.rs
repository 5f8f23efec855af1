//! x86-64 address translation, done by walking the guest's page tables in
//! guest-physical memory.
//!
//! The walk follows the Intel SDM (vol. 3A, 4.5): 4-level paging (48-bit
//! virtual addresses) or 5-level paging (`CR4.LA57`, 57-bit), 1 GiB pages at
//! the PDPT, 2 MiB pages at the PD. Page-table entries are guest memory, so
//! they are untrusted: the walk is at most five reads long, takes physical
//! addresses from bits 51:12 only (bits 62:52 hold software and
//! protection-key bits), and reports entries the CPU would fault on as errors
//! rather than inventing an address.
//!
//! Not modelled: MAXPHYADDR (reserved high address bits are not checked, as
//! we cannot know the guest CPU's width), `EFER.NXE` (bit 63 is reported as
//! `nx` whether or not the guest enabled it), SMEP/SMAP/PKRU (access checks
//! are the caller's business: VMI reads whatever is mapped).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;

use crate::memory::{MemoryError, PhysicalMemory};

/// Bits 51:12 of a page-table entry or CR3: the physical frame address.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const NX: u64 = 1 << 63;
/// Reserved (must-be-zero) bits between the PAT bit and the frame address of
/// a 1 GiB PDPTE (bits 29:13) and a 2 MiB PDE (bits 20:13).
const RSVD_1G: u64 = 0x3fff_e000;
const RSVD_2M: u64 = 0x001f_e000;

/// Number of page-table levels in use (`CR4.LA57` selects five).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum PagingMode {
    /// 4-level paging: 48-bit virtual addresses, root is the PML4.
    FourLevel,
    /// 5-level paging: 57-bit virtual addresses, root is the PML5.
    FiveLevel,
}

impl PagingMode {
    /// The mode a CPU with this CR4 uses in long mode (LA57 is bit 12).
    pub fn from_cr4(cr4: u64) -> Self {
        if cr4 & (1 << 12) != 0 {
            PagingMode::FiveLevel
        } else {
            PagingMode::FourLevel
        }
    }

    /// Width of a virtual address: 48 or 57 bits.
    pub fn va_bits(self) -> u32 {
        match self {
            PagingMode::FourLevel => 48,
            PagingMode::FiveLevel => 57,
        }
    }

    /// The levels walked, root first.
    pub fn levels(self) -> &'static [Level] {
        match self {
            PagingMode::FourLevel => &[Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt],
            PagingMode::FiveLevel => &[Level::Pml5, Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt],
        }
    }

    /// Whether `va` is canonical: bits above the top implemented bit all
    /// equal that bit. The CPU faults on anything else, so we refuse it.
    pub fn is_canonical(self, va: u64) -> bool {
        let shift = 64 - self.va_bits();
        (((va << shift) as i64) >> shift) as u64 == va
    }
}

/// A page-table level, named as in the Intel SDM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Level {
    Pml5,
    Pml4,
    Pdpt,
    Pd,
    Pt,
}

impl Level {
    /// Position of this level's 9-bit index in a virtual address.
    pub fn shift(self) -> u32 {
        match self {
            Level::Pml5 => 48,
            Level::Pml4 => 39,
            Level::Pdpt => 30,
            Level::Pd => 21,
            Level::Pt => 12,
        }
    }

    /// The entry index of `va` in a table of this level.
    pub fn index(self, va: u64) -> u64 {
        (va >> self.shift()) & 0x1ff
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pml5 => "PML5",
            Level::Pml4 => "PML4",
            Level::Pdpt => "PDPT",
            Level::Pd => "PD",
            Level::Pt => "PT",
        })
    }
}

/// Size of the page a translation landed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }
}

/// Where a virtual address lives and what the page tables allow there.
///
/// The permission bits are the effective ones over all levels (writable and
/// user only if every level says so; no-execute if any level says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Translation {
    /// Guest-physical address of the byte at the translated virtual address.
    pub pa: u64,
    /// Size of the page that maps it.
    pub size: PageSize,
    pub writable: bool,
    pub user: bool,
    pub nx: bool,
}

impl Translation {
    /// Guest-physical address of the start of the page.
    pub fn page_base(&self) -> u64 {
        self.pa & !(self.size.bytes() - 1)
    }

    /// Bytes from `pa` to the end of the page (at least 1).
    pub fn bytes_to_page_end(&self) -> u64 {
        self.size.bytes() - (self.pa & (self.size.bytes() - 1))
    }
}

/// Why a virtual address could not be translated or accessed.
///
/// Every variant names the virtual address; walk errors name the level, so
/// "not present at PDPT" tells a 1 GiB region is unmapped while "at PT" tells
/// just one page is.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PagingError {
    /// The entry at `level` has its present bit clear.
    #[error("{va:#x}: not present at {level} (entry {entry:#x})")]
    NotPresent { va: u64, level: Level, entry: u64 },
    /// `va` is not canonical for the paging mode (the CPU would #GP).
    #[error("{va:#x}: not a canonical address")]
    NonCanonical { va: u64 },
    /// The entry at `level` sets bits the CPU treats as reserved (a PS bit in
    /// a PML5/PML4 entry, or bits 29:13 / 20:13 of a 1 GiB / 2 MiB page entry):
    /// the CPU would fault, so there is no translation to give.
    #[error("{va:#x}: reserved bits set at {level} (entry {entry:#x})")]
    ReservedBits { va: u64, level: Level, entry: u64 },
    /// The table of `level` could not be read from guest-physical memory
    /// (e.g. an entry points past the end of RAM).
    #[error("{va:#x}: cannot read the {level} table")]
    Memory {
        va: u64,
        level: Level,
        source: MemoryError,
    },
    /// The translation succeeded but the data at `pa` could not be accessed.
    #[error("{va:#x}: cannot access guest-physical {pa:#x}")]
    Data {
        va: u64,
        pa: u64,
        source: MemoryError,
    },
    /// An access of `len` bytes at `va` would wrap past the top of the
    /// 64-bit address space.
    #[error("{va:#x}: access of {len} bytes wraps around the address space")]
    WrapAround { va: u64, len: usize },
}

/// The page-table root in a CR3 value: bits 51:12, dropping the PCID (11:0),
/// LAM (62:61) and no-flush (63) bits.
pub fn root_from_cr3(cr3: u64) -> u64 {
    cr3 & ADDR_MASK
}

/// Translates `va` by walking the tables rooted at `root` (a CR3 value is
/// accepted too: its flag bits are masked). Reads at most one entry per level.
pub fn translate(
    mem: &dyn PhysicalMemory,
    root: u64,
    mode: PagingMode,
    va: u64,
) -> Result<Translation, PagingError> {
    if !mode.is_canonical(va) {
        return Err(PagingError::NonCanonical { va });
    }
    let mut table = root & ADDR_MASK;
    let mut writable = true;
    let mut user = true;
    let mut nx = false;
    for &level in mode.levels() {
        let entry_pa = table + level.index(va) * 8;
        let entry = mem
            .read_u64(entry_pa)
            .map_err(|source| PagingError::Memory { va, level, source })?;
        if entry & PRESENT == 0 {
            return Err(PagingError::NotPresent { va, level, entry });
        }
        writable &= entry & WRITABLE != 0;
        user &= entry & USER != 0;
        nx |= entry & NX != 0;
        let size = match level {
            Level::Pt => Some(PageSize::Size4K),
            _ if entry & PAGE_SIZE_BIT == 0 => None,
            Level::Pdpt if entry & RSVD_1G == 0 => Some(PageSize::Size1G),
            Level::Pd if entry & RSVD_2M == 0 => Some(PageSize::Size2M),
            // PS in a PML5/PML4 entry, or a large page with reserved bits.
            _ => return Err(PagingError::ReservedBits { va, level, entry }),
        };
        if let Some(size) = size {
            let off_mask = size.bytes() - 1;
            return Ok(Translation {
                pa: (entry & ADDR_MASK & !off_mask) | (va & off_mask),
                size,
                writable,
                user,
                nx,
            });
        }
        table = entry & ADDR_MASK;
    }
    unreachable!("the last level is always Pt")
}

/// One present leaf of a page-table walk: `len` bytes at `va` map to `pa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRange {
    pub va: u64,
    pub pa: u64,
    pub len: u64,
}

/// The present leaves mapping `[start, end)` in the tables at `root`, in
/// address order, at most `max_leaves` of them (the guest owns the tables: a
/// bound keeps a forged hierarchy from making us walk forever). Unreadable or
/// malformed entries are skipped, not fatal: the caller wants what is mapped.
pub fn mapped_ranges(
    mem: &dyn PhysicalMemory,
    root: u64,
    mode: PagingMode,
    start: u64,
    end: u64,
    max_leaves: usize,
) -> Vec<MappedRange> {
    let mut out = Vec::new();
    let levels = mode.levels();
    let canon = Canon(64 - mode.va_bits());
    walk_level(
        mem,
        root & ADDR_MASK,
        levels,
        canon,
        0,
        start,
        end,
        max_leaves,
        &mut out,
    );
    out
}

/// Sign extension from the top implemented virtual-address bit.
#[derive(Clone, Copy)]
struct Canon(u32);

impl Canon {
    fn apply(self, raw: u64) -> u64 {
        (((raw << self.0) as i64) >> self.0) as u64
    }
}

#[allow(clippy::too_many_arguments)]
fn walk_level(
    mem: &dyn PhysicalMemory,
    table: u64,
    levels: &[Level],
    canon: Canon,
    base: u64,
    start: u64,
    end: u64,
    max_leaves: usize,
    out: &mut Vec<MappedRange>,
) {
    let Some((&level, rest)) = levels.split_first() else {
        return;
    };
    let span = 1u64 << level.shift();
    // The index range of this table that overlaps [start, end).
    // A subtree is entered only when it overlaps [start, end), so a start
    // above its base lies inside it (the root's base is 0: always).
    let first = if start > base { level.index(start) } else { 0 };
    for i in first..512 {
        if out.len() >= max_leaves {
            return;
        }
        let va = canon.apply(base.wrapping_add(i * span));
        if va >= end {
            return;
        }
        if va.wrapping_add(span - 1) < start {
            continue;
        }
        let Ok(entry) = mem.read_u64(table + i * 8) else {
            continue;
        };
        if entry & PRESENT == 0 {
            continue;
        }
        let leaf = match level {
            Level::Pt => true,
            Level::Pdpt if entry & PAGE_SIZE_BIT != 0 => entry & RSVD_1G == 0,
            Level::Pd if entry & PAGE_SIZE_BIT != 0 => entry & RSVD_2M == 0,
            _ if entry & PAGE_SIZE_BIT != 0 => continue,
            _ => false,
        };
        if leaf {
            out.push(MappedRange {
                va,
                pa: entry & ADDR_MASK & !(span - 1),
                len: span,
            });
        } else if entry & PAGE_SIZE_BIT == 0 {
            walk_level(
                mem,
                entry & ADDR_MASK,
                rest,
                canon,
                va,
                start,
                end,
                max_leaves,
                out,
            );
        }
    }
}

/// Slots in the translation cache. Small on purpose: it serves the locality
/// of one introspection pass (a task list walk touches few pages repeatedly),
/// not long-term reuse, and a stale entry is bounded in what it can confuse.
const CACHE_SLOTS: usize = 256;

/// One direct-mapped slot, lock-free: `tag` is `vpn + 1` (0: empty), `value`
/// the translation of the page's first byte, packed (4 KiB-aligned pa | size
/// << 1 | writable << 3 | user << 4 | nx << 5 | 1). A reader takes the value
/// only if the tag reads the same before and after it; a writer clears the
/// tag, stores the value (release), then sets the tag. Uncontended mutexes
/// cost two atomic read-modify-writes per lookup, which showed up as the
/// largest cost of the syscall hook's guest reads.
#[derive(Default)]
struct Slot {
    tag: AtomicU64,
    value: AtomicU64,
}

type Cache = Box<[Slot]>;

fn pack(t: &Translation) -> u64 {
    let size = match t.size {
        PageSize::Size4K => 0,
        PageSize::Size2M => 1,
        PageSize::Size1G => 2,
    };
    (t.pa & !0xfff)
        | (size << 1)
        | (u64::from(t.writable) << 3)
        | (u64::from(t.user) << 4)
        | (u64::from(t.nx) << 5)
        | 1
}

fn unpack(v: u64, page_off: u64) -> Translation {
    Translation {
        pa: (v & !0xfff) | page_off,
        size: match (v >> 1) & 3 {
            0 => PageSize::Size4K,
            1 => PageSize::Size2M,
            _ => PageSize::Size1G,
        },
        writable: v & (1 << 3) != 0,
        user: v & (1 << 4) != 0,
        nx: v & (1 << 5) != 0,
    }
}

/// A guest virtual address space: memory, a page-table root and a mode, with
/// a small translation cache.
///
/// The cache is direct-mapped on the 4 KiB virtual page number and holds only
/// successful translations. A live guest changes its page tables whenever it
/// likes, and nothing tells us, so cached translations can go stale: call
/// [`AddressSpace::flush_cache`] between independent passes (each periodic
/// scan, each snapshot), or use [`AddressSpace::without_cache`] when every
/// answer must reflect the tables at that instant.
///
/// `Send + Sync`: the cache slots are atomics (see [`Slot`]).
pub struct AddressSpace {
    mem: Arc<dyn PhysicalMemory>,
    root: u64,
    mode: PagingMode,
    cache: Option<Cache>,
}

impl fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AddressSpace")
            .field("root", &format_args!("{:#x}", self.root))
            .field("mode", &self.mode)
            .field("cached", &self.cache.is_some())
            .finish()
    }
}

impl AddressSpace {
    /// An address space rooted at `root` (CR3 flag bits are masked), with the
    /// translation cache on.
    pub fn new(mem: Arc<dyn PhysicalMemory>, root: u64, mode: PagingMode) -> Self {
        AddressSpace {
            mem,
            root: root_from_cr3(root),
            mode,
            cache: Some((0..CACHE_SLOTS).map(|_| Slot::default()).collect()),
        }
    }

    /// As [`Self::new`] but every translation walks the tables.
    pub fn without_cache(mem: Arc<dyn PhysicalMemory>, root: u64, mode: PagingMode) -> Self {
        AddressSpace {
            mem,
            root: root_from_cr3(root),
            mode,
            cache: None,
        }
    }

    /// Another address space over the same memory and mode (e.g. a process's
    /// `mm->pgd`), caching like this one, with its own empty cache.
    pub fn with_root(&self, root: u64) -> Self {
        if self.cache.is_some() {
            Self::new(self.mem.clone(), root, self.mode)
        } else {
            Self::without_cache(self.mem.clone(), root, self.mode)
        }
    }

    /// The guest-physical memory underneath.
    pub fn memory(&self) -> &Arc<dyn PhysicalMemory> {
        &self.mem
    }

    /// The page-table root (CR3 with flag bits masked).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The paging mode.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// Forgets all cached translations.
    pub fn flush_cache(&self) {
        if let Some(cache) = &self.cache {
            for slot in cache.iter() {
                slot.tag.store(0, Ordering::Release);
            }
        }
    }

    /// Translates `va`, from the cache when possible.
    pub fn translate(&self, va: u64) -> Result<Translation, PagingError> {
        let Some(cache) = &self.cache else {
            return translate(&*self.mem, self.root, self.mode, va);
        };
        let vpn = va >> 12;
        let slot = &cache[(vpn as usize) % CACHE_SLOTS];
        let page_off = va & 0xfff;
        let tag = vpn.wrapping_add(1);
        if slot.tag.load(Ordering::Acquire) == tag {
            let v = slot.value.load(Ordering::Acquire);
            if v & 1 != 0 && slot.tag.load(Ordering::Acquire) == tag {
                return Ok(unpack(v, page_off));
            }
        }
        let t = translate(&*self.mem, self.root, self.mode, va)?;
        if tag != 0 {
            slot.tag.store(0, Ordering::Relaxed);
            slot.value.store(pack(&t), Ordering::Release);
            slot.tag.store(tag, Ordering::Release);
        }
        Ok(t)
    }

    /// Reads `buf.len()` bytes at `va`, crossing page boundaries as needed.
    /// Fails (with the first failing address) unless every byte is mapped;
    /// `buf` may then hold part of the data.
    pub fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
        check_wrap(va, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let cur = va + done as u64;
            let t = self.translate(cur)?;
            let n = chunk_len(&t, buf.len() - done);
            self.mem
                .read_phys(t.pa, &mut buf[done..done + n])
                .map_err(|source| PagingError::Data {
                    va: cur,
                    pa: t.pa,
                    source,
                })?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `va`, crossing page boundaries as needed.
    ///
    /// All pages are translated before anything is written, so an unmapped
    /// page makes the write fail without changing memory (barring the guest
    /// changing its tables meanwhile). The guest's protection bits are not
    /// consulted: the host may patch what the guest mapped read-only (e.g.
    /// to restore a hooked table), and the memory source decides whether
    /// writing is allowed at all.
    pub fn write(&self, va: u64, buf: &[u8]) -> Result<(), PagingError> {
        check_wrap(va, buf.len())?;
        let mut pieces = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let cur = va + done as u64;
            let t = self.translate(cur)?;
            let n = chunk_len(&t, buf.len() - done);
            pieces.push((cur, t.pa, done, n));
            done += n;
        }
        for (cur, pa, at, n) in pieces {
            self.mem
                .write_phys(pa, &buf[at..at + n])
                .map_err(|source| PagingError::Data {
                    va: cur,
                    pa,
                    source,
                })?;
        }
        Ok(())
    }

    /// Reads a byte at `va`.
    pub fn read_u8(&self, va: u64) -> Result<u8, PagingError> {
        Ok(u8::from_le_bytes(self.read_array(va)?))
    }

    /// Reads a little-endian u16 at `va`.
    pub fn read_u16(&self, va: u64) -> Result<u16, PagingError> {
        Ok(u16::from_le_bytes(self.read_array(va)?))
    }

    /// Reads a little-endian u32 at `va`.
    pub fn read_u32(&self, va: u64) -> Result<u32, PagingError> {
        Ok(u32::from_le_bytes(self.read_array(va)?))
    }

    /// Reads a little-endian u64 at `va`.
    pub fn read_u64(&self, va: u64) -> Result<u64, PagingError> {
        Ok(u64::from_le_bytes(self.read_array(va)?))
    }

    /// Reads `N` bytes at `va`.
    pub fn read_array<const N: usize>(&self, va: u64) -> Result<[u8; N], PagingError> {
        let mut b = [0u8; N];
        self.read(va, &mut b)?;
        Ok(b)
    }

    /// Reads a NUL-terminated string at `va`: the bytes before the first NUL,
    /// or `max_len` bytes if there is none within them.
    ///
    /// Reads in small pieces that never cross a page, so a short string at
    /// the end of a mapped page followed by an unmapped one still reads; a
    /// later page is touched only if the string has not ended by then.
    pub fn read_cstring(&self, va: u64, max_len: usize) -> Result<Vec<u8>, PagingError> {
        const PIECE: u64 = 256;
        let mut out = Vec::new();
        let mut piece = [0u8; PIECE as usize];
        while out.len() < max_len {
            let cur = va
                .checked_add(out.len() as u64)
                .ok_or(PagingError::WrapAround { va, len: max_len })?;
            let t = self.translate(cur)?;
            let to_page_end = 0x1000 - (cur & 0xfff);
            let want = PIECE.min(to_page_end).min((max_len - out.len()) as u64) as usize;
            let piece = &mut piece[..want];
            self.mem
                .read_phys(t.pa, piece)
                .map_err(|source| PagingError::Data {
                    va: cur,
                    pa: t.pa,
                    source,
                })?;
            if let Some(nul) = piece.iter().position(|&b| b == 0) {
                out.extend_from_slice(&piece[..nul]);
                return Ok(out);
            }
            out.extend_from_slice(piece);
        }
        Ok(out)
    }
}

fn check_wrap(va: u64, len: usize) -> Result<(), PagingError> {
    if len > 0 && va.checked_add(len as u64 - 1).is_none() {
        return Err(PagingError::WrapAround { va, len });
    }
    Ok(())
}

/// How many of `remaining` bytes can be accessed at `t.pa` without leaving
/// the page (pages are physically contiguous, whatever their size).
fn chunk_len(t: &Translation, remaining: usize) -> usize {
    usize::try_from(t.bytes_to_page_end())
        .unwrap_or(usize::MAX)
        .min(remaining)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{PhysRange, VecMemory};
    use proptest::prelude::*;

    const P: u64 = PRESENT | WRITABLE;

    /// Builds page tables in a VecMemory: tables are allocated from 0x1000
    /// upwards; data pages are whatever physical addresses the test names.
    struct Builder {
        mem: VecMemory,
        next: u64,
        root: u64,
        mode: PagingMode,
    }

    impl Builder {
        fn new(mode: PagingMode, mem_size: usize) -> Self {
            let mut b = Builder {
                mem: VecMemory::zeroed(mem_size),
                next: 0x1000,
                root: 0,
                mode,
            };
            b.root = b.alloc();
            b
        }

        fn alloc(&mut self) -> u64 {
            let t = self.next;
            self.next += 0x1000;
            t
        }

        fn entry_addr(&self, table: u64, level: Level, va: u64) -> u64 {
            table + level.index(va) * 8
        }

        /// Maps `va` to `pa` with a page of `size`; `flags` go on every level.
        fn map(&mut self, va: u64, pa: u64, size: PageSize, flags: u64) {
            let leaf = match size {
                PageSize::Size4K => Level::Pt,
                PageSize::Size2M => Level::Pd,
                PageSize::Size1G => Level::Pdpt,
            };
            let mut table = self.root;
            for &level in self.mode.levels() {
                let ea = self.entry_addr(table, level, va);
                if level == leaf {
                    let ps = if leaf == Level::Pt { 0 } else { PAGE_SIZE_BIT };
                    self.mem.write_u64(ea, pa | flags | ps).unwrap();
                    return;
                }
                let e = self.mem.read_u64(ea).unwrap();
                table = if e & PRESENT != 0 {
                    e & ADDR_MASK
                } else {
                    let t = self.alloc();
                    self.mem.write_u64(ea, t | flags).unwrap();
                    t
                };
            }
        }

        /// Address of the entry for `va` at `level` (tables must exist above it).
        fn entry_of(&self, va: u64, level: Level) -> u64 {
            let mut table = self.root;
            for &l in self.mode.levels() {
                let ea = self.entry_addr(table, l, va);
                if l == level {
                    return ea;
                }
                table = self.mem.read_u64(ea).unwrap() & ADDR_MASK;
            }
            unreachable!()
        }

        fn space(self, cached: bool) -> AddressSpace {
            let mem: Arc<dyn PhysicalMemory> = Arc::new(self.mem);
            if cached {
                AddressSpace::new(mem, self.root, self.mode)
            } else {
                AddressSpace::without_cache(mem, self.root, self.mode)
            }
        }
    }

    const KVA: u64 = 0xffff_8880_0000_1000;

    #[test]
    fn mapped_ranges_lists_present_leaves_in_a_window() {
        for mode in [PagingMode::FourLevel, PagingMode::FiveLevel] {
            let mut b = Builder::new(mode, 0x40_0000);
            let base = 0xffff_ffff_c000_0000u64;
            b.map(base + 0x3000, 0x10_0000, PageSize::Size4K, P);
            b.map(base + 0x20_0000, 0x20_0000, PageSize::Size2M, P);
            b.map(base - 0x1000, 0x30_0000, PageSize::Size4K, P); // below the window
            b.map(0x40_0000, 0x31_0000, PageSize::Size4K, P); // user half
            let got = mapped_ranges(&b.mem, b.root, mode, base, 0xffff_ffff_ff00_0000, 100);
            assert_eq!(
                got,
                vec![
                    MappedRange {
                        va: base + 0x3000,
                        pa: 0x10_0000,
                        len: 0x1000
                    },
                    MappedRange {
                        va: base + 0x20_0000,
                        pa: 0x20_0000,
                        len: 0x20_0000
                    },
                ],
                "{mode:?}"
            );
            assert_eq!(
                mapped_ranges(&b.mem, b.root, mode, base, u64::MAX, 1).len(),
                1
            );
        }
    }

    #[test]
    fn four_kib_page() {
        let mut b = Builder::new(PagingMode::FourLevel, 0x40_0000);
        b.map(KVA, 0x20_0000, PageSize::Size4K, P);
        b.mem.write_phys(0x20_0123, b"hi").unwrap();
        let t = translate(&b.mem, b.root, b.mode, KVA + 0x123).unwrap();
        assert_eq!(
            t,
            Translation {
                pa: 0x20_0123,
                size: PageSize::Size4K,
                writable: true,
                user: false,
                nx: false
            }
        );
        assert_eq!(t.page_base(), 0x20_0000);
        let s = b.space(true);
        assert_eq!(s.read_array::<2>(KVA + 0x123).unwrap(), *b"hi");
        assert_eq!(s.read_u16(KVA + 0x123).unwrap(), u16::from_le_bytes(*b"hi"));
    }

    #[test]
    fn large_pages() {
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        // 2 MiB page at pa 0x4020_0000, with PAT bit 12 and a protection key
        // (bits 62:59) and software bits (52..58) set, which must be masked.
        let va2m = 0xffff_ffff_8120_0000;
        b.map(
            va2m,
            0x4020_0000 | (1 << 12) | (0xf << 59) | (1 << 55),
            PageSize::Size2M,
            P | NX,
        );
        let t = translate(&b.mem, b.root, b.mode, va2m + 0x1_2345).unwrap();
        assert_eq!(t.pa, 0x4021_2345);
        assert_eq!(t.size, PageSize::Size2M);
        assert!(t.nx && t.writable && !t.user);

        let va1g = 0x0000_7f00_4000_0000;
        b.map(va1g, 0x1_c000_0000, PageSize::Size1G, PRESENT | USER);
        let t = translate(&b.mem, b.root, b.mode, va1g + 0x3456_789a).unwrap();
        assert_eq!(t.pa, 0x1_f456_789a);
        assert_eq!(t.size, PageSize::Size1G);
        assert!(!t.writable && !t.nx);
        assert!(t.user);
        assert_eq!(t.bytes_to_page_end(), 0x4000_0000 - 0x3456_789a);
    }

    #[test]
    fn effective_permissions_combine_levels() {
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        b.map(
            0x40_0000,
            0x8000,
            PageSize::Size4K,
            PRESENT | USER | WRITABLE,
        );
        let t = translate(&b.mem, b.root, b.mode, 0x40_0000).unwrap();
        assert!(t.user && t.writable && !t.nx);
        // Clear R/W at the PD level only; set NX at the PML4 only.
        let pd = b.entry_of(0x40_0000, Level::Pd);
        let e = b.mem.read_u64(pd).unwrap();
        b.mem.write_u64(pd, e & !WRITABLE).unwrap();
        let pml4 = b.entry_of(0x40_0000, Level::Pml4);
        let e = b.mem.read_u64(pml4).unwrap();
        b.mem.write_u64(pml4, e | NX).unwrap();
        let t = translate(&b.mem, b.root, b.mode, 0x40_0000).unwrap();
        assert!(t.user && !t.writable && t.nx);
    }

    #[test]
    fn five_level() {
        let mut b = Builder::new(PagingMode::FiveLevel, 0x10_0000);
        let va = 0xff11_2233_4455_6000; // canonical for 57 bits, not for 48
        b.map(va, 0x9000, PageSize::Size4K, P);
        assert_eq!(
            translate(&b.mem, b.root, b.mode, va + 7).unwrap().pa,
            0x9007
        );
        assert_eq!(
            translate(&b.mem, b.root, PagingMode::FourLevel, va),
            Err(PagingError::NonCanonical { va })
        );
        let va2 = 0x00f0_0000_0020_0000;
        b.map(va2, 0x20_0000, PageSize::Size2M, P);
        let t = translate(&b.mem, b.root, b.mode, va2 + 5).unwrap();
        assert_eq!((t.pa, t.size), (0x20_0005, PageSize::Size2M));
        // Unmapped 5-level address: missing at the PML5.
        let err = translate(&b.mem, b.root, b.mode, 0x00ff_0000_0000_0000).unwrap_err();
        assert!(
            matches!(
                err,
                PagingError::NotPresent {
                    level: Level::Pml5,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(PagingMode::from_cr4(1 << 12), PagingMode::FiveLevel);
    }

    #[test]
    fn not_present_names_every_level() {
        for mode in [PagingMode::FourLevel, PagingMode::FiveLevel] {
            for (i, &level) in mode.levels().iter().enumerate() {
                let mut b = Builder::new(mode, 0x10_0000);
                b.map(KVA, 0x8000, PageSize::Size4K, P);
                let ea = b.entry_of(KVA, level);
                // Keep the frame bits, clear the present bit.
                let e = b.mem.read_u64(ea).unwrap();
                b.mem.write_u64(ea, e & !PRESENT).unwrap();
                let err = translate(&b.mem, b.root, mode, KVA).unwrap_err();
                assert_eq!(
                    err,
                    PagingError::NotPresent {
                        va: KVA,
                        level,
                        entry: e & !PRESENT
                    },
                    "{mode:?} level {i}"
                );
                assert!(err.to_string().contains(&format!("not present at {level}")));
            }
        }
        let b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        let err = translate(&b.mem, b.root, b.mode, 0xffff_8880_0000_1000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0xffff888000001000: not present at PML4 (entry 0x0)"
        );
        // The brief's example: present down to the PDPT, whose entry is 0.
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        b.map(0xffff_8880_4000_0000, 0x8000, PageSize::Size4K, P);
        let err = translate(&b.mem, b.root, b.mode, 0xffff_8880_0000_1000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "0xffff888000001000: not present at PDPT (entry 0x0)"
        );
    }

    #[test]
    fn reserved_bits_are_errors_not_garbage() {
        // PS set in a PML4 entry.
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        b.map(KVA, 0x8000, PageSize::Size4K, P);
        let ea = b.entry_of(KVA, Level::Pml4);
        let e = b.mem.read_u64(ea).unwrap() | PAGE_SIZE_BIT;
        b.mem.write_u64(ea, e).unwrap();
        assert_eq!(
            translate(&b.mem, b.root, b.mode, KVA),
            Err(PagingError::ReservedBits {
                va: KVA,
                level: Level::Pml4,
                entry: e
            })
        );
        // ... and in a PML5 entry.
        let mut b = Builder::new(PagingMode::FiveLevel, 0x10_0000);
        b.map(KVA, 0x8000, PageSize::Size4K, P);
        let ea = b.entry_of(KVA, Level::Pml5);
        let e = b.mem.read_u64(ea).unwrap() | PAGE_SIZE_BIT;
        b.mem.write_u64(ea, e).unwrap();
        assert!(matches!(
            translate(&b.mem, b.root, b.mode, KVA),
            Err(PagingError::ReservedBits {
                level: Level::Pml5,
                ..
            })
        ));
        // A 2 MiB entry with bit 13 set, a 1 GiB entry with bit 20 set.
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        b.map(0x20_0000, 0x40_0000 | (1 << 13), PageSize::Size2M, P);
        b.map(0x4000_0000, 0x4000_0000 | (1 << 20), PageSize::Size1G, P);
        assert!(matches!(
            translate(&b.mem, b.root, b.mode, 0x20_0000),
            Err(PagingError::ReservedBits {
                level: Level::Pd,
                ..
            })
        ));
        assert!(matches!(
            translate(&b.mem, b.root, b.mode, 0x4000_0000),
            Err(PagingError::ReservedBits {
                level: Level::Pdpt,
                ..
            })
        ));
    }

    #[test]
    fn non_canonical_and_wrapping() {
        let b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        let s = b.space(true);
        for va in [
            0x0000_8000_0000_0000,
            0xffff_7fff_ffff_ffff,
            0x1234_0000_0000_0000,
        ] {
            assert_eq!(s.translate(va), Err(PagingError::NonCanonical { va }));
        }
        let mut buf = [0u8; 16];
        assert_eq!(
            s.read(u64::MAX - 7, &mut buf),
            Err(PagingError::WrapAround {
                va: u64::MAX - 7,
                len: 16
            })
        );
        // Empty reads touch nothing.
        assert_eq!(s.read(0x1234_0000_0000_0000, &mut []), Ok(()));
    }

    #[test]
    fn table_outside_memory_is_a_memory_error() {
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        b.map(KVA, 0x8000, PageSize::Size4K, P);
        let ea = b.entry_of(KVA, Level::Pd);
        b.mem.write_u64(ea, 0x7_0000_0000 | P).unwrap();
        let err = translate(&b.mem, b.root, b.mode, KVA).unwrap_err();
        assert_eq!(
            err,
            PagingError::Memory {
                va: KVA,
                level: Level::Pt,
                source: MemoryError::Unmapped {
                    gpa: 0x7_0000_0000 + Level::Pt.index(KVA) * 8
                }
            }
        );
        assert_eq!(
            err.to_string(),
            format!("{KVA:#x}: cannot read the PT table")
        );
    }

    #[test]
    fn reads_cross_pages_and_stop_at_unmapped_ones() {
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        // Two virtually contiguous pages in physically distant frames; the
        // third page is unmapped.
        b.map(KVA, 0x8_0000, PageSize::Size4K, P);
        b.map(KVA + 0x1000, 0x2_0000, PageSize::Size4K, P);
        b.mem.write_phys(0x8_0ffc, b"abcd").unwrap();
        b.mem.write_phys(0x2_0000, b"efgh").unwrap();
        b.mem.write_phys(0x2_0ffd, b"xyz").unwrap();
        let s = b.space(true);
        let mut buf = [0u8; 8];
        s.read(KVA + 0xffc, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdefgh");
        assert_eq!(
            s.read_u64(KVA + 0xffc).unwrap(),
            u64::from_le_bytes(*b"abcdefgh")
        );

        let err = s.read(KVA + 0x1ffd, &mut buf).unwrap_err();
        assert!(
            matches!(err, PagingError::NotPresent { va, level: Level::Pt, .. } if va == KVA + 0x2000),
            "{err}"
        );

        // Writes across pages; a write running into the unmapped page
        // changes nothing.
        s.write(KVA + 0xffe, b"WXYZ").unwrap();
        assert_eq!(&s.read_array::<4>(KVA + 0xffe).unwrap(), b"WXYZ");
        assert!(s.write(KVA + 0x1ffe, b"1234").is_err());
        assert_eq!(&s.read_array::<2>(KVA + 0x1ffe).unwrap(), b"yz");

        // A C string ending before the unmapped page reads fine even with a
        // large max_len; one running into it fails; max_len truncates.
        b_write_str(&s, KVA + 0x1ff0, b"end\0");
        assert_eq!(s.read_cstring(KVA + 0x1ff0, 4096).unwrap(), b"end");
        s.write(KVA + 0x1ff0, &[b'a'; 16]).unwrap();
        assert!(matches!(
            s.read_cstring(KVA + 0x1ff0, 4096),
            Err(PagingError::NotPresent {
                level: Level::Pt,
                ..
            })
        ));
        assert_eq!(s.read_cstring(KVA + 0x1ff0, 16).unwrap(), vec![b'a'; 16]);
        assert_eq!(s.read_cstring(KVA + 0x1ff0, 5).unwrap(), vec![b'a'; 5]);
        assert_eq!(s.read_cstring(KVA + 0x1ff0, 0).unwrap(), b"");
        // A string crossing from the first page into the second.
        s.write(KVA + 0xffd, b"cross\0").unwrap();
        assert_eq!(s.read_cstring(KVA + 0xffd, 100).unwrap(), b"cross");
    }

    fn b_write_str(s: &AddressSpace, va: u64, bytes: &[u8]) {
        s.write(va, bytes).unwrap();
    }

    #[test]
    fn data_in_a_hole_is_a_data_error() {
        // RAM 0..1 MiB only; a page maps to 3 GiB (e.g. MMIO).
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        b.map(KVA, 0xc000_0000, PageSize::Size4K, P);
        let s = b.space(false);
        assert_eq!(s.translate(KVA).unwrap().pa, 0xc000_0000);
        assert_eq!(
            s.read_u8(KVA + 1),
            Err(PagingError::Data {
                va: KVA + 1,
                pa: 0xc000_0001,
                source: MemoryError::Unmapped { gpa: 0xc000_0001 }
            })
        );
    }

    #[test]
    fn cr3_flags_are_masked() {
        assert_eq!(root_from_cr3(0x8000_0000_1234_5fff), 0x1234_5000);
        assert_eq!(root_from_cr3(0x6000_0000_1234_5001), 0x1234_5000);
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        b.map(KVA, 0x8000, PageSize::Size4K, P);
        let cr3 = b.root | 0x8000_0000_0000_0005;
        let (mem, mode) = (b.mem, b.mode);
        assert_eq!(translate(&mem, cr3, mode, KVA).unwrap().pa, 0x8000);
        let s = AddressSpace::new(Arc::new(mem), cr3, mode);
        assert_eq!(s.root(), 0x1000);
        assert_eq!(s.mode(), PagingMode::FourLevel);
        assert_eq!(s.translate(KVA).unwrap().pa, 0x8000);
        assert_eq!(s.with_root(cr3).translate(KVA).unwrap().pa, 0x8000);
    }

    #[test]
    fn cache_serves_hits_and_flush_forgets() {
        let mut b = Builder::new(PagingMode::FourLevel, 0x10_0000);
        b.map(KVA, 0x8000, PageSize::Size4K, P);
        let pt = b.entry_of(KVA, Level::Pt);
        let s = b.space(true);
        assert_eq!(s.translate(KVA + 8).unwrap().pa, 0x8008);
        // Remap behind the cache's back: the cache still answers the old
        // frame (that is what flush_cache is for), a flush sees the new one.
        let mem = s.memory().clone();
        mem.write_phys(pt, &(0x9000 | P).to_le_bytes()).unwrap();
        assert_eq!(s.translate(KVA + 0x10).unwrap().pa, 0x8010);
        s.flush_cache();
        assert_eq!(s.translate(KVA + 0x10).unwrap().pa, 0x9010);
        // Failures are not cached.
        mem.write_phys(pt, &0u64.to_le_bytes()).unwrap();
        s.flush_cache();
        assert!(s.translate(KVA).is_err());
        mem.write_phys(pt, &(0xa000 | P).to_le_bytes()).unwrap();
        assert_eq!(s.translate(KVA).unwrap().pa, 0xa000);
    }

    #[test]
    fn works_over_split_physical_ranges() {
        // Page tables in low RAM, data in "high RAM" at 4 GiB, as on QEMU pc.
        let mem = VecMemory::with_ranges(
            vec![0; 0x20000],
            vec![
                PhysRange::single(0x10000),
                PhysRange {
                    gpa: 1 << 32,
                    len: 0x10000,
                    file_offset: 0x10000,
                },
            ],
        )
        .unwrap();
        let mut b = Builder {
            mem,
            next: 0x1000,
            root: 0,
            mode: PagingMode::FourLevel,
        };
        b.root = b.alloc();
        b.map(KVA, 1 << 32, PageSize::Size4K, P);
        b.mem.write_phys((1 << 32) + 5, b"high").unwrap();
        let s = b.space(true);
        assert_eq!(s.read_cstring(KVA + 5, 64).unwrap(), b"high");
    }

    #[test]
    fn address_space_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<AddressSpace>();
    }

    fn arb_size() -> impl Strategy<Value = PageSize> {
        prop_oneof![
            Just(PageSize::Size4K),
            Just(PageSize::Size2M),
            Just(PageSize::Size1G)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random mappings of random sizes: the cached address space answers
        /// exactly like the uncached walk, for mapped and unmapped addresses,
        /// including repeated and colliding lookups.
        #[test]
        fn cache_matches_uncached_walk(
            five in any::<bool>(),
            maps in proptest::collection::vec((0u64..64, 0u64..512, arb_size(), any::<bool>()), 1..12),
            probes in proptest::collection::vec((0usize..12, 0u64..(1 << 30)), 1..200),
        ) {
            let mode = if five { PagingMode::FiveLevel } else { PagingMode::FourLevel };
            let mut b = Builder::new(mode, 0x10_0000);
            let mut vas = Vec::new();
            for &(slot, frame, size, user) in &maps {
                // Spread across the lower and upper halves; align per size.
                let base = if slot % 2 == 0 { 0x0000_1000_0000_0000 } else { 0xffff_8000_0000_0000 };
                let va = (base + (slot << 33)) & !(size.bytes() - 1);
                let pa = (frame << 30) & !(size.bytes() - 1);
                // Skip placements whose upper tables an earlier larger page owns.
                if translate(&b.mem, b.root, mode, va).is_ok() {
                    continue;
                }
                b.map(va, pa, size, if user { P | USER } else { P });
                vas.push(va);
            }
            let mem: Arc<dyn PhysicalMemory> = Arc::new(b.mem);
            let cached = AddressSpace::new(mem.clone(), b.root, mode);
            let plain = AddressSpace::without_cache(mem, b.root, mode);
            for &(i, off) in &probes {
                let va = match vas.get(i % vas.len().max(1)) {
                    Some(&va) => va.wrapping_add(off),
                    None => off,
                };
                prop_assert_eq!(cached.translate(va), plain.translate(va));
                prop_assert_eq!(cached.translate(va), plain.translate(va));
                // Collide in the direct-mapped cache (same slot, other page).
                let other = va ^ ((CACHE_SLOTS as u64) << 12);
                prop_assert_eq!(cached.translate(other), plain.translate(other));
            }
        }
    }
}
