//! QEMU `dump-guest-memory` ELF core files.
//!
//! Made by QMP `dump-guest-memory` (or `virsh dump --memory-only`) in QEMU's
//! default ELF format. The layout (QEMU `dump/dump.c`,
//! `target/i386/arch_dump.c`):
//! - `PT_LOAD` segments: `p_paddr` is the guest-physical address of
//!   `p_filesz` bytes at `p_offset`.
//! - one `PT_NOTE` segment: per vCPU a `CORE`/`NT_PRSTATUS` note, then per
//!   vCPU a `QEMU` note whose descriptor is a `QEMUCPUState` (general
//!   registers, segments, descriptor tables, control registers), and, when
//!   the guest registered one through the vmcoreinfo device, a `VMCOREINFO`
//!   note.
//!
//! QEMU writes `ELFCLASS64`/`EM_X86_64` when the first vCPU is in long mode
//! and `ELFCLASS32`/`EM_386` otherwise (ELF64 again if RAM reaches past
//! 4 GiB); all are accepted.
//!
//! The file is guest-derived data: every count and size is checked against
//! the file and capped, and nothing here panics or allocates without bound on
//! a corrupted dump.

use std::path::{Path, PathBuf};

use super::mapped::MappedRegion;
use super::{for_each_piece, normalize_ranges, MemoryError, Overlap, PhysRange, PhysicalMemory};
use crate::paging::{root_from_cr3, PagingMode};

const EXPECTED: &str = "QEMU memory dump (ELF core)";
const HOW_TO: &str = "create one with `virsh dump --memory-only` or QMP dump-guest-memory";

/// At most this many program headers. QEMU writes one `PT_LOAD` per
/// contiguous guest-physical block (or per virtual mapping with
/// `paging: true`), far below this.
const MAX_SEGMENTS: usize = 1 << 16;
/// At most this many bytes of notes in total (QEMU: ~800 bytes per vCPU).
const MAX_NOTE_BYTES: u64 = 16 << 20;
/// At most this many vCPUs described (QEMU's x86 limit is 4096 today).
const MAX_CPUS: usize = 8192;
/// Longest VMCOREINFO kept (Linux limits it to one page).
const MAX_VMCOREINFO: usize = 64 << 10;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const ET_CORE: u16 = 4;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const PN_XNUM: u16 = 0xffff;

/// Size of QEMU's `QEMUCPUState` up to and including `cr[5]` (version 1).
const CPUSTATE_BASE_SIZE: usize = 432;
/// ... and with the optional `kernel_gs_base` appended later.
const CPUSTATE_WITH_KGSBASE: usize = 440;

/// One segment register or descriptor-table register as QEMU records it
/// (`QEMUCPUSegment`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DumpSegment {
    /// Selector (0 for GDTR/IDTR).
    pub selector: u32,
    /// Limit (for GDTR/IDTR: size in bytes minus one).
    pub limit: u32,
    /// QEMU's descriptor flags (bit 21 is the L bit of a code segment).
    pub flags: u32,
    /// Base address.
    pub base: u64,
}

/// One vCPU's registers at the time of the dump, from QEMU's `QEMU` note.
///
/// These come from QEMU, not from the guest, so they are trustworthy in a way
/// guest memory is not: `cr3` and `idt.base` are what the CPU was using.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DumpCpuState {
    /// Position of this vCPU's note in the dump (vCPU index order in QEMU).
    pub index: usize,
    /// `QEMUCPUState.version` (1 in every QEMU so far).
    pub version: u32,
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cs: DumpSegment,
    pub ds: DumpSegment,
    pub es: DumpSegment,
    pub fs: DumpSegment,
    pub gs: DumpSegment,
    pub ss: DumpSegment,
    pub ldt: DumpSegment,
    pub tr: DumpSegment,
    pub gdt: DumpSegment,
    pub idt: DumpSegment,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    /// `MSR_KERNEL_GS_BASE`, present when QEMU's note is new enough to have it.
    pub kernel_gs_base: Option<u64>,
    /// `MSR_EFER`. QEMU's note does not record it (through QEMU 10.0), so this
    /// is `None` for QEMU dumps; kept so a richer source can fill it.
    pub efer: Option<u64>,
    /// Whether the dump says the CPU was in long mode. QEMU writes
    /// `e_machine = EM_X86_64` exactly when the first vCPU had `EFER.LMA`
    /// set, which stands in for the missing EFER.
    pub long_mode: bool,
}

impl DumpCpuState {
    /// Base of the IDT the CPU was using.
    pub fn idt_base(&self) -> u64 {
        self.idt.base
    }

    /// IDT limit (bytes minus one).
    pub fn idt_limit(&self) -> u32 {
        self.idt.limit
    }

    /// The GS base in effect (the per-CPU area while in the kernel; in user
    /// mode the kernel's value is in [`Self::kernel_gs_base`]).
    pub fn gs_base(&self) -> u64 {
        self.gs.base
    }

    /// The page-table root in CR3 (PCID and flag bits masked).
    pub fn page_table_root(&self) -> u64 {
        root_from_cr3(self.cr3)
    }

    /// The x86-64 paging mode, or `None` if paging was off or the CPU was not
    /// in long mode (32-bit paging is not supported by [`crate::paging`]).
    pub fn paging_mode(&self) -> Option<PagingMode> {
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        let lma = match self.efer {
            Some(efer) => efer & (1 << 10) != 0,
            None => self.long_mode,
        };
        (lma && self.cr0 & CR0_PG != 0 && self.cr4 & CR4_PAE != 0)
            .then(|| PagingMode::from_cr4(self.cr4))
    }
}

/// Where the dump's bytes are: a read-only mapping, or a buffer (tests, fuzzing).
enum Backing {
    Mapped(MappedRegion),
    Bytes(Box<[u8]>),
}

impl Backing {
    fn len(&self) -> u64 {
        match self {
            Backing::Mapped(m) => m.len(),
            Backing::Bytes(b) => b.len() as u64,
        }
    }

    fn copy_out(&self, off: u64, buf: &mut [u8]) -> bool {
        match self {
            Backing::Mapped(m) => m.copy_out(off, buf),
            Backing::Bytes(b) => {
                let Some(src) = usize::try_from(off)
                    .ok()
                    .and_then(|s| Some(s..s.checked_add(buf.len())?))
                    .and_then(|r| b.get(r))
                else {
                    return false;
                };
                buf.copy_from_slice(src);
                true
            }
        }
    }

    /// Copies `len` bytes at `off` into a new buffer, or `None` if out of range.
    /// Callers cap `len` first.
    fn bytes_at(&self, off: u64, len: usize) -> Option<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.copy_out(off, &mut v).then_some(v)
    }
}

/// Guest memory from a QEMU `dump-guest-memory` ELF file (read-only).
///
/// The file is mapped read-only and read through copies (QEMU may still be
/// writing it if the dump was started with `detach`).
pub struct ElfDumpMemory {
    path: PathBuf,
    backing: Backing,
    ranges: Vec<PhysRange>,
    cpus: Vec<DumpCpuState>,
    vmcoreinfo: Option<String>,
}

impl std::fmt::Debug for ElfDumpMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElfDumpMemory")
            .field("path", &self.path)
            .field("ranges", &self.ranges.len())
            .field("cpus", &self.cpus.len())
            .field("vmcoreinfo", &self.vmcoreinfo.is_some())
            .finish()
    }
}

impl ElfDumpMemory {
    /// Maps `path` read-only and parses its headers and notes.
    ///
    /// Fails with [`MemoryError::Format`] (with a hint on how to make a dump)
    /// if it is not an x86 ELF core file with at least one `PT_LOAD`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, MemoryError> {
        let path = path.as_ref();
        // An empty file cannot be mapped; say what it is not rather than
        // failing in mmap.
        if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            return Err(MemoryError::Format {
                path: path.display().to_string(),
                expected: EXPECTED,
                reason: format!("the file is empty; {HOW_TO}"),
            });
        }
        let region = MappedRegion::open(path, false)?;
        Self::parse(path.to_path_buf(), Backing::Mapped(region))
    }

    /// Parses a dump held in memory (for tests and fuzzing; real dumps are
    /// large, use [`Self::open`]).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, MemoryError> {
        Self::parse(PathBuf::from("<memory>"), Backing::Bytes(bytes.into()))
    }

    /// The dump file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Registers of each vCPU from QEMU's notes, in vCPU order. Empty for ELF
    /// cores without QEMU notes (e.g. a guest kernel's own vmcore).
    pub fn cpu_states(&self) -> &[DumpCpuState] {
        &self.cpus
    }

    /// The guest kernel's VMCOREINFO text, if the guest had registered it
    /// (needs `-device vmcoreinfo`). Guest-supplied: informational only,
    /// never a basis for trust decisions.
    pub fn vmcoreinfo(&self) -> Option<&str> {
        self.vmcoreinfo.as_deref()
    }

    fn parse(path: PathBuf, backing: Backing) -> Result<Self, MemoryError> {
        let label = path.display().to_string();
        let fmt_err = |reason: String| MemoryError::Format {
            path: label.clone(),
            expected: EXPECTED,
            reason,
        };
        let file_len = backing.len();

        let mut ident = [0u8; 16];
        if !backing.copy_out(0, &mut ident) {
            return Err(fmt_err(format!(
                "file too short for an ELF header; {HOW_TO}"
            )));
        }
        if &ident[..4] != b"\x7fELF" {
            let what = if ident.starts_with(b"KDUMP   ") {
                "this is QEMU's kdump-compressed format, not ELF; dump again with the default format"
                    .to_string()
            } else if ident.starts_with(b"QEVM") || ident.starts_with(b"LibvirtQemudSave") {
                format!("this is a saved VM state, not a memory dump; {HOW_TO}")
            } else {
                format!("bad magic; {HOW_TO}")
            };
            return Err(fmt_err(what));
        }
        let class64 = match ident[4] {
            1 => false,
            2 => true,
            c => return Err(fmt_err(format!("unknown ELF class {c}"))),
        };
        if ident[5] != 1 {
            return Err(fmt_err("not little-endian, so not an x86 dump".into()));
        }
        let hdr_len = if class64 { 64 } else { 52 };
        let hdr = backing
            .bytes_at(0, hdr_len)
            .ok_or_else(|| fmt_err("file too short for an ELF header".into()))?;
        let e_type = le16(&hdr, 16);
        let e_machine = le16(&hdr, 18);
        if e_type != ET_CORE {
            return Err(fmt_err(format!(
                "ELF type {e_type} is not a core file (4); {HOW_TO}"
            )));
        }
        if e_machine != EM_X86_64 && e_machine != EM_386 {
            return Err(fmt_err(format!("ELF machine {e_machine} is not x86")));
        }
        let (phoff, shoff, phentsize, phnum, shentsize, shnum) = if class64 {
            (
                le64(&hdr, 32),
                le64(&hdr, 40),
                le16(&hdr, 54),
                le16(&hdr, 56),
                le16(&hdr, 58),
                le16(&hdr, 60),
            )
        } else {
            (
                u64::from(le32(&hdr, 28)),
                u64::from(le32(&hdr, 32)),
                le16(&hdr, 42),
                le16(&hdr, 44),
                le16(&hdr, 46),
                le16(&hdr, 48),
            )
        };
        let want_phent = if class64 { 56 } else { 32 };
        if usize::from(phentsize) != want_phent {
            return Err(fmt_err(format!(
                "program header size {phentsize}, expected {want_phent}"
            )));
        }
        // More than 0xfffe headers: the real count is in section 0's sh_info.
        let phnum = if phnum == PN_XNUM {
            let (want_shent, info_at) = if class64 { (64, 44) } else { (40, 28) };
            if shnum == 0 || usize::from(shentsize) != want_shent {
                return Err(fmt_err("PN_XNUM without a section header 0".into()));
            }
            let sh0 = backing
                .bytes_at(shoff, want_shent)
                .ok_or_else(|| fmt_err("section header 0 is outside the file".into()))?;
            le32(&sh0, info_at) as usize
        } else {
            usize::from(phnum)
        };
        if phnum == 0 {
            return Err(fmt_err(format!("no program headers; {HOW_TO}")));
        }
        if phnum > MAX_SEGMENTS {
            return Err(fmt_err(format!(
                "{phnum} program headers (more than the {MAX_SEGMENTS} accepted)"
            )));
        }
        let phdrs = backing
            .bytes_at(phoff, phnum * want_phent)
            .ok_or_else(|| fmt_err("program headers run past the end of the file".into()))?;

        let mut ranges = Vec::new();
        let mut notes: Vec<(u64, u64)> = Vec::new();
        let mut note_bytes = 0u64;
        for (i, ph) in phdrs.chunks_exact(want_phent).enumerate() {
            let (p_type, offset, paddr, filesz) = if class64 {
                (le32(ph, 0), le64(ph, 8), le64(ph, 24), le64(ph, 32))
            } else {
                (
                    le32(ph, 0),
                    u64::from(le32(ph, 4)),
                    u64::from(le32(ph, 12)),
                    u64::from(le32(ph, 16)),
                )
            };
            let in_file = offset
                .checked_add(filesz)
                .is_some_and(|end| end <= file_len);
            match p_type {
                PT_LOAD if filesz > 0 => {
                    if !in_file {
                        return Err(fmt_err(format!(
                            "segment {i} (gpa {paddr:#x}, {filesz:#x} bytes at offset {offset:#x}) \
                             runs past the end of the {file_len:#x}-byte file (truncated dump?)"
                        )));
                    }
                    if paddr.checked_add(filesz).is_none() {
                        return Err(fmt_err(format!(
                            "segment {i} wraps the physical address space"
                        )));
                    }
                    ranges.push(PhysRange {
                        gpa: paddr,
                        len: filesz,
                        file_offset: offset,
                    });
                }
                PT_NOTE if filesz > 0 => {
                    note_bytes = note_bytes.saturating_add(filesz);
                    if !in_file || note_bytes > MAX_NOTE_BYTES {
                        tracing::warn!(
                            path = %label,
                            segment = i,
                            "ELF dump: note segment out of file or too large; ignored"
                        );
                        continue;
                    }
                    notes.push((offset, filesz));
                }
                _ => {}
            }
        }
        if ranges.is_empty() {
            return Err(fmt_err(format!("no PT_LOAD segments; {HOW_TO}")));
        }
        let ranges = normalize_ranges(ranges, file_len, Overlap::TrimLater, &label)?;

        let mut cpus = Vec::new();
        let mut vmcoreinfo = None;
        let long_mode = e_machine == EM_X86_64;
        for (offset, size) in notes {
            // Bounded by MAX_NOTE_BYTES above.
            let Some(data) = backing.bytes_at(offset, size as usize) else {
                continue;
            };
            for note in NoteIter::new(&data, &label) {
                match (note.name, note.ntype) {
                    (b"QEMU", 0) => {
                        if cpus.len() >= MAX_CPUS {
                            continue;
                        }
                        if let Some(cpu) = parse_cpu_state(note.desc, cpus.len(), long_mode) {
                            cpus.push(cpu);
                        } else {
                            tracing::warn!(path = %label, "ELF dump: malformed QEMU CPU note ignored");
                        }
                    }
                    (b"VMCOREINFO", 0) if vmcoreinfo.is_none() => {
                        let d = &note.desc[..note.desc.len().min(MAX_VMCOREINFO)];
                        let end = d.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                        vmcoreinfo = Some(String::from_utf8_lossy(&d[..end]).into_owned());
                    }
                    _ => {}
                }
            }
        }

        Ok(ElfDumpMemory {
            path,
            backing,
            ranges,
            cpus,
            vmcoreinfo,
        })
    }
}

impl PhysicalMemory for ElfDumpMemory {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut ok = true;
        for_each_piece(&self.ranges, gpa, buf.len(), |off, at, n| {
            ok &= self.backing.copy_out(off, &mut buf[at..at + n]);
        })?;
        // Segments were checked against the file size at parse time.
        ok.then_some(()).ok_or(MemoryError::Unmapped { gpa })
    }

    fn ranges(&self) -> &[PhysRange] {
        &self.ranges
    }
}

struct Note<'a> {
    name: &'a [u8],
    ntype: u32,
    desc: &'a [u8],
}

/// Walks ELF notes (4-byte aligned, as QEMU and Linux write them). Stops at
/// the first malformed note instead of failing: the memory is still usable.
struct NoteIter<'a> {
    data: &'a [u8],
    pos: usize,
    label: &'a str,
}

impl<'a> NoteIter<'a> {
    fn new(data: &'a [u8], label: &'a str) -> Self {
        NoteIter {
            data,
            pos: 0,
            label,
        }
    }
}

impl<'a> Iterator for NoteIter<'a> {
    type Item = Note<'a>;

    fn next(&mut self) -> Option<Note<'a>> {
        let rest = self.data.get(self.pos..)?;
        if rest.len() < 12 {
            return None;
        }
        let namesz = le32(rest, 0) as usize;
        let descsz = le32(rest, 4) as usize;
        let ntype = le32(rest, 8);
        let name_end = 12usize.checked_add(namesz);
        let desc_start = name_end.and_then(align4);
        let desc_end = desc_start.and_then(|s| s.checked_add(descsz));
        let next = desc_end.and_then(align4);
        let (Some(name_end), Some(desc_start), Some(desc_end), Some(next)) =
            (name_end, desc_start, desc_end, next)
        else {
            return None;
        };
        if desc_end > rest.len() {
            tracing::warn!(path = %self.label, offset = self.pos, "ELF dump: truncated note; later notes ignored");
            self.pos = self.data.len();
            return None;
        }
        let name = &rest[12..name_end];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        let desc = &rest[desc_start..desc_end];
        // `next` may pass the end by the padding of the last note: fine.
        self.pos = self.pos.saturating_add(next);
        Some(Note { name, ntype, desc })
    }
}

fn align4(x: usize) -> Option<usize> {
    Some(x.checked_add(3)? & !3)
}

fn parse_cpu_state(d: &[u8], index: usize, long_mode: bool) -> Option<DumpCpuState> {
    if d.len() < CPUSTATE_BASE_SIZE {
        return None;
    }
    let version = le32(d, 0);
    let size = le32(d, 4) as usize;
    if version != 1 || size < CPUSTATE_BASE_SIZE {
        return None;
    }
    let q = |i: usize| le64(d, 8 + 8 * i);
    let seg = |i: usize| {
        let o = 152 + 24 * i;
        DumpSegment {
            selector: le32(d, o),
            limit: le32(d, o + 4),
            flags: le32(d, o + 8),
            base: le64(d, o + 16),
        }
    };
    let cr = |i: usize| le64(d, 392 + 8 * i);
    let kernel_gs_base = (size >= CPUSTATE_WITH_KGSBASE && d.len() >= CPUSTATE_WITH_KGSBASE)
        .then(|| le64(d, CPUSTATE_BASE_SIZE));
    Some(DumpCpuState {
        index,
        version,
        rax: q(0),
        rbx: q(1),
        rcx: q(2),
        rdx: q(3),
        rsi: q(4),
        rdi: q(5),
        rsp: q(6),
        rbp: q(7),
        r8: q(8),
        r9: q(9),
        r10: q(10),
        r11: q(11),
        r12: q(12),
        r13: q(13),
        r14: q(14),
        r15: q(15),
        rip: q(16),
        rflags: q(17),
        cs: seg(0),
        ds: seg(1),
        es: seg(2),
        fs: seg(3),
        gs: seg(4),
        ss: seg(5),
        ldt: seg(6),
        tr: seg(7),
        gdt: seg(8),
        idt: seg(9),
        cr0: cr(0),
        cr2: cr(2),
        cr3: cr(3),
        cr4: cr(4),
        kernel_gs_base,
        efer: None,
        long_mode,
    })
}

// Callers index within buffers whose length they checked; `get` keeps a
// mistake from becoming a panic (it reads as zero instead).
fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn note(name: &str, ntype: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        v.extend_from_slice(&ntype.to_le_bytes());
        v.extend_from_slice(name.as_bytes());
        v.push(0);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v.extend_from_slice(desc);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn cpu_state(cr3: u64, rip: u64, with_kgs: bool) -> Vec<u8> {
        let size = if with_kgs { 440 } else { 432 };
        let mut d = vec![0u8; size];
        d[0..4].copy_from_slice(&1u32.to_le_bytes());
        d[4..8].copy_from_slice(&(size as u32).to_le_bytes());
        d[8 + 6 * 8..][..8].copy_from_slice(&0xffff_c900_0000_1000u64.to_le_bytes()); // rsp
        d[136..144].copy_from_slice(&rip.to_le_bytes());
        let gs = 152 + 24 * 4;
        d[gs + 16..gs + 24].copy_from_slice(&0xffff_8880_1f00_0000u64.to_le_bytes());
        let idt = 152 + 24 * 9;
        d[idt + 4..idt + 8].copy_from_slice(&0xfffu32.to_le_bytes());
        d[idt + 16..idt + 24].copy_from_slice(&0xffff_fe00_0000_0000u64.to_le_bytes());
        d[392..400].copy_from_slice(&0x8005_0033u64.to_le_bytes()); // cr0 with PG
        d[416..424].copy_from_slice(&cr3.to_le_bytes());
        d[424..432].copy_from_slice(&0x0035_06f0u64.to_le_bytes()); // cr4 with PAE
        if with_kgs {
            d[432..440].copy_from_slice(&0x1234u64.to_le_bytes());
        }
        d
    }

    /// A dump like QEMU's: ELF64 header, PT_NOTE then PT_LOADs, notes, data.
    /// `loads` are (gpa, bytes).
    pub(crate) fn synthetic_dump(loads: &[(u64, Vec<u8>)], cr3s: &[u64]) -> Vec<u8> {
        let mut notes = Vec::new();
        for _ in cr3s {
            notes.extend(note("CORE", 1, &[0u8; 336]));
        }
        for (i, &cr3) in cr3s.iter().enumerate() {
            notes.extend(note(
                "QEMU",
                0,
                &cpu_state(cr3, 0xffff_ffff_8100_0000 + i as u64, i == 0),
            ));
        }
        notes.extend(note(
            "VMCOREINFO",
            0,
            b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\n\0",
        ));

        let phnum = 1 + loads.len();
        let notes_off = 64 + 56 * phnum;
        let mut data_off = notes_off + notes.len();
        let mut out = vec![0u8; 64];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2;
        out[5] = 1;
        out[6] = 1;
        out[16..18].copy_from_slice(&ET_CORE.to_le_bytes());
        out[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[32..40].copy_from_slice(&64u64.to_le_bytes());
        out[52..54].copy_from_slice(&64u16.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        let ph = |t: u32, off: usize, paddr: u64, sz: usize| {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&t.to_le_bytes());
            p[8..16].copy_from_slice(&(off as u64).to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[32..40].copy_from_slice(&(sz as u64).to_le_bytes());
            p[40..48].copy_from_slice(&(sz as u64).to_le_bytes());
            p
        };
        out.extend(ph(PT_NOTE, notes_off, 0, notes.len()));
        for (gpa, bytes) in loads {
            out.extend(ph(PT_LOAD, data_off, *gpa, bytes.len()));
            data_off += bytes.len();
        }
        out.extend(&notes);
        for (_, bytes) in loads {
            out.extend(bytes);
        }
        out
    }

    fn sample() -> Vec<u8> {
        synthetic_dump(
            &[
                (0, (0..0x2000u32).map(|i| i as u8).collect()),
                (0x1_0000_0000, vec![0xab; 0x1000]),
            ],
            &[0x1000_a000, 0x2000_b001],
        )
    }

    #[test]
    fn parses_segments_cpus_and_vmcoreinfo() {
        let dump = ElfDumpMemory::from_bytes(sample()).unwrap();
        assert_eq!(dump.ranges().len(), 2);
        let mut b = [0u8; 4];
        dump.read_phys(0x1ffe, &mut b[..2]).unwrap();
        assert_eq!(&b[..2], &[0xfe, 0xff]);
        dump.read_phys(0x1_0000_0ffc, &mut b).unwrap();
        assert_eq!(b, [0xab; 4]);
        assert_eq!(
            dump.read_phys(0x1ffe, &mut b),
            Err(MemoryError::Unmapped { gpa: 0x2000 })
        );
        assert_eq!(dump.write_phys(0, &b), Err(MemoryError::ReadOnly));

        let cpus = dump.cpu_states();
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[0].cr3, 0x1000_a000);
        assert_eq!(cpus[1].page_table_root(), 0x2000_b000);
        assert_eq!(cpus[1].rip, 0xffff_ffff_8100_0001);
        assert_eq!(cpus[0].rsp, 0xffff_c900_0000_1000);
        assert_eq!(cpus[0].idt_base(), 0xffff_fe00_0000_0000);
        assert_eq!(cpus[0].idt_limit(), 0xfff);
        assert_eq!(cpus[0].gs_base(), 0xffff_8880_1f00_0000);
        assert_eq!(cpus[0].kernel_gs_base, Some(0x1234));
        assert_eq!(cpus[1].kernel_gs_base, None);
        assert_eq!(cpus[0].efer, None);
        assert_eq!(cpus[0].paging_mode(), Some(PagingMode::FourLevel));
        assert_eq!(
            dump.vmcoreinfo(),
            Some("OSRELEASE=6.1.0-test\nPAGESIZE=4096\n")
        );
    }

    #[test]
    fn rejects_non_dumps_with_a_hint() {
        let err = ElfDumpMemory::from_bytes(b"hello world, not an ELF file".to_vec()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("not a QEMU memory dump (ELF core): bad magic"),
            "{msg}"
        );
        assert!(msg.contains("dump-guest-memory"), "{msg}");
        assert!(ElfDumpMemory::from_bytes(Vec::new()).is_err());
        let mut kdump = b"KDUMP   ".to_vec();
        kdump.resize(64, 0);
        assert!(ElfDumpMemory::from_bytes(kdump)
            .unwrap_err()
            .to_string()
            .contains("kdump-compressed"));

        // An ELF executable is not a core file.
        let mut exe = sample();
        exe[16] = 2;
        assert!(ElfDumpMemory::from_bytes(exe)
            .unwrap_err()
            .to_string()
            .contains("not a core file"));

        // Truncated: the last segment runs past the end.
        let mut short = sample();
        short.truncate(short.len() - 1);
        assert!(ElfDumpMemory::from_bytes(short)
            .unwrap_err()
            .to_string()
            .contains("truncated dump"));
    }

    #[test]
    fn pn_xnum_reads_the_count_from_section_zero() {
        let mut bytes = sample();
        let phnum = u16::from_le_bytes([bytes[56], bytes[57]]);
        let shoff = bytes.len() as u64;
        let mut sh0 = vec![0u8; 64];
        sh0[44..48].copy_from_slice(&u32::from(phnum).to_le_bytes());
        bytes.extend(sh0);
        bytes[40..48].copy_from_slice(&shoff.to_le_bytes());
        bytes[56..58].copy_from_slice(&PN_XNUM.to_le_bytes());
        bytes[58..60].copy_from_slice(&64u16.to_le_bytes());
        bytes[60..62].copy_from_slice(&1u16.to_le_bytes());
        let dump = ElfDumpMemory::from_bytes(bytes.clone()).unwrap();
        assert_eq!(dump.ranges().len(), 2);
        assert_eq!(dump.cpu_states().len(), 2);
        // A bogus huge count is refused, not allocated.
        let n = bytes.len();
        bytes[n - 20..n - 16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ElfDumpMemory::from_bytes(bytes)
            .unwrap_err()
            .to_string()
            .contains("program headers"));
    }

    #[test]
    fn elf32_cores_parse() {
        // Header (52) + one PT_LOAD (32) + 16 bytes of RAM at gpa 0x1000.
        let mut b = vec![0u8; 52];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 1;
        b[5] = 1;
        b[16..18].copy_from_slice(&ET_CORE.to_le_bytes());
        b[18..20].copy_from_slice(&EM_386.to_le_bytes());
        b[28..32].copy_from_slice(&52u32.to_le_bytes());
        b[42..44].copy_from_slice(&32u16.to_le_bytes());
        b[44..46].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = vec![0u8; 32];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&84u32.to_le_bytes());
        ph[12..16].copy_from_slice(&0x1000u32.to_le_bytes());
        ph[16..20].copy_from_slice(&16u32.to_le_bytes());
        b.extend(ph);
        b.extend(0u8..16);
        let dump = ElfDumpMemory::from_bytes(b).unwrap();
        assert_eq!(dump.read_u64(0x1008).unwrap(), 0x0f0e_0d0c_0b0a_0908);
        assert!(dump.cpu_states().is_empty());
        assert_eq!(dump.vmcoreinfo(), None);
    }

    #[test]
    fn open_maps_a_file() {
        let dir = crate::memory::TestDir::new("elf");
        let path = dir.join("dump.elf");
        std::fs::write(&path, sample()).unwrap();
        let dump = ElfDumpMemory::open(&path).unwrap();
        assert_eq!(dump.read_u64(0x1_0000_0000).unwrap(), 0xabab_abab_abab_abab);
        assert_eq!(dump.path(), path);
        std::fs::write(dir.join("junk"), b"junk").unwrap();
        assert!(matches!(
            ElfDumpMemory::open(dir.join("junk")),
            Err(MemoryError::Format { .. })
        ));
        std::fs::write(dir.join("empty"), b"").unwrap();
        assert!(matches!(
            ElfDumpMemory::open(dir.join("empty")),
            Err(MemoryError::Format { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Corrupting any bytes of a valid dump never panics, and whatever
        /// parses still only serves reads inside the file.
        #[test]
        fn corrupted_dumps_never_panic(
            edits in proptest::collection::vec((0usize..0x900, any::<u8>()), 1..16),
            cut in proptest::option::of(0usize..0x3600),
        ) {
            let mut bytes = sample();
            for (at, v) in edits {
                if let Some(b) = bytes.get_mut(at) {
                    *b = v;
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut);
            }
            if let Ok(dump) = ElfDumpMemory::from_bytes(bytes) {
                let mut b = [0u8; 64];
                for r in dump.ranges().to_vec() {
                    let _ = dump.read_phys(r.gpa, &mut b);
                    let _ = dump.read_phys(r.gpa_end().saturating_sub(8), &mut b);
                }
                prop_assert!(dump.cpu_states().len() <= MAX_CPUS);
            }
        }
    }
}
