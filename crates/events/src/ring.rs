//! The per-VM event ring: one file (normally under `/dev/shm`), mapped
//! shared by the QEMU plugin (producers: one per vCPU thread) and one consumer.
//!
//! Layout (little-endian, all offsets fixed by `FORMAT_VERSION`):
//!
//! ```text
//! 0      header (4096 bytes)
//!        0   magic "VMWRING\0"   8 format version (u32)   12 record size (u32)
//!        16  capacity (records, power of two)   24 header size   32 writer pid
//!        40  vm name (64 bytes, NUL-padded)
//!        128 write counter: next seq to reserve          (own cache line)
//!        192 read counter: next seq the consumer reads   (own cache line)
//!        256 dropped: records lost because the ring was full
//!        264 unpaired: entries the plugin could not remember for pairing
//!        272 records: records published
//!        280 quieted: calls not recorded because of the quiet table
//!        320 control: filter generation (u64), then the filter bitmap (8 x u64)
//!        392 control: the fd filter bitmap (8 x u64): syscalls whose fds are
//!            resolved to file identities
//!        456 control: the quiet filter bitmap (8 x u64): syscalls not recorded
//!            when the calling thread is in the quiet table
//!        520 control: log rate (u64): log doorbells per second the plugin
//!            accepts from one process (token bucket; 0 = no limit)
//!        528 control: log burst (u64): that bucket's size in doorbells
//!        536 log dropped (u64): doorbells the plugin refused (rate limit),
//!            all processes
//!        544 syscall entry (u64): the first kernel address run after a
//!            sampled user `syscall`; 552 its sample count
//!        560 syscall-entry MSR writes seen (u64); 568 per MSR (LSTAR,
//!            CSTAR, SYSENTER_EIP) the address of the last `wrmsr` to it;
//!            592 per vCPU slot (16) the three values last written;
//!            976 per MSR the word on top of the stack at the last `wrmsr`
//!        1024 control: the quiet table, 128 entries of (task u64, tgid u64):
//!            thread-group leaders whose quiet syscalls the consumer does not
//!            need (e.g. reads by a process the diffusion engine manages
//!            already); task 0 = empty; an entry sits at most
//!            `QUIET_PROBES` slots after `tgid % 128`
//! 4096   capacity x 128-byte slots
//! ```
//!
//! A record is one head slot (the fixed fields) followed by `n - 1` extension
//! slots carrying its payload, 120 bytes each; every slot starts with its
//! publication stamp (`position + 1`). Head slot words after the stamp: time,
//! `vcpu u16 | kind u8 | n u8 | payload length u16 | flags u16`, nr, six
//! arguments, result, cr3, rip, task, entry seq, `pid u32 | tgid u32`.
//!
//! Protocol (MPSC, lock-free, never blocks a producer):
//! - A producer reserves `n` slots at `seq` by CAS on the write counter, but
//!   only while `write + n - read <= capacity`; otherwise it adds one to
//!   `dropped` and returns.
//! - It fills the extension slots, then the head (relaxed atomic stores), and
//!   publishes the record by storing `seq + 1` into the head's stamp (release).
//! - The consumer reads the record at `read` when the head's stamp equals
//!   `read + 1` (acquire), copies it, and stores `read + n` into the read
//!   counter (release), which hands the slots back to producers.
//!
//! A producer that dies between reserving and publishing stalls the consumer at
//! that slot (the producers then count drops); the producers live in one QEMU
//! process, so that only happens when QEMU dies, and then the stream is over anyway.
//!
//! The filter bitmap is read by the plugin on every syscall (one relaxed load)
//! and written by the consumer ([`RingReader::set_filter`]); the generation counts changes.
//! The log limit is read by the plugin on every log doorbell and written by the
//! consumer ([`RingReader::set_log_limit`]); a refused doorbell writes no
//! record: the plugin counts it in `log dropped` and reports it in the
//! process's next accepted doorbell (see [`crate::Kind::Log`]).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::MmapRaw;

use crate::msrs::{EntryMsr, EntryMsrs, MSR_VCPU_SLOTS};
use crate::record::{Kind, Record};
use crate::syscalls::Filter;

/// First 8 bytes of every ring file.
pub const MAGIC: [u8; 8] = *b"VMWRING\0";
/// Bumped on any layout or protocol change.
pub const FORMAT_VERSION: u32 = 4;
/// Entries of the quiet table.
pub const QUIET_SLOTS: usize = 128;
/// Slots a quiet-table lookup or insertion probes from `tgid % QUIET_SLOTS`.
pub const QUIET_PROBES: usize = 8;
/// Bytes per record slot.
pub const RECORD_SIZE: usize = 128;
/// Bytes before the first slot.
pub const HEADER_SIZE: usize = 4096;
/// Largest accepted capacity (records): 2^24 x 128 B = 2 GiB.
pub const MAX_CAPACITY: u64 = 1 << 24;
/// Payload bytes per extension slot.
pub const SLOT_PAYLOAD: usize = RECORD_SIZE - 8;
/// Most slots one record takes.
pub const MAX_SLOTS: u64 = 1 + crate::payload::MAX_PAYLOAD.div_ceil(SLOT_PAYLOAD) as u64;

const WORDS: usize = RECORD_SIZE / 8;

#[repr(C)]
struct Header {
    magic: [u8; 8],
    version: u32,
    record_size: u32,
    capacity: u64,
    header_size: u64,
    writer_pid: u64,
    vm_name: [u8; 64],
    _pad0: [u8; 24],
    write: AtomicU64,
    _pad1: [u8; 56],
    read: AtomicU64,
    _pad2: [u8; 56],
    dropped: AtomicU64,
    unpaired: AtomicU64,
    records: AtomicU64,
    quieted: AtomicU64,
    _pad3: [u8; 32],
    filter_gen: AtomicU64,
    filter: [AtomicU64; 8],
    fds: [AtomicU64; 8],
    quiet: [AtomicU64; 8],
    log_rate: AtomicU64,
    log_burst: AtomicU64,
    log_dropped: AtomicU64,
    /// Where the guest's `syscall` instruction last went (the first kernel
    /// code executed after it: the LSTAR MSR's value), sampled by the plugin.
    syscall_entry: AtomicU64,
    /// Samples taken of `syscall_entry`.
    syscall_entry_samples: AtomicU64,
    /// Writes the plugin observed to the syscall-entry MSRs.
    msr_writes: AtomicU64,
    /// Per MSR ([`EntryMsr::slot`]): the address of the last `wrmsr` to it.
    msr_writer: [AtomicU64; 3],
    /// Per vCPU slot, per MSR: the value last written.
    msr_values: [[AtomicU64; 3]; MSR_VCPU_SLOTS],
    /// Per MSR: the word on top of the stack at that `wrmsr` (the caller's
    /// return address when the `wrmsr` is in a leaf accessor).
    msr_caller: [AtomicU64; 3],
    _pad4: [u8; 24],
    /// (task, tgid) pairs.
    quiet_table: [[AtomicU64; 2]; QUIET_SLOTS],
}

const _: () = {
    assert!(std::mem::offset_of!(Header, write) == 128);
    assert!(std::mem::offset_of!(Header, read) == 192);
    assert!(std::mem::offset_of!(Header, dropped) == 256);
    assert!(std::mem::offset_of!(Header, unpaired) == 264);
    assert!(std::mem::offset_of!(Header, records) == 272);
    assert!(std::mem::offset_of!(Header, filter_gen) == 320);
    assert!(std::mem::offset_of!(Header, fds) == 392);
    assert!(std::mem::offset_of!(Header, quiet) == 456);
    assert!(std::mem::offset_of!(Header, log_rate) == 520);
    assert!(std::mem::offset_of!(Header, log_burst) == 528);
    assert!(std::mem::offset_of!(Header, log_dropped) == 536);
    assert!(std::mem::offset_of!(Header, syscall_entry) == 544);
    assert!(std::mem::offset_of!(Header, msr_writes) == 560);
    assert!(std::mem::offset_of!(Header, msr_writer) == 568);
    assert!(std::mem::offset_of!(Header, msr_values) == 592);
    assert!(std::mem::offset_of!(Header, msr_caller) == 976);
    assert!(std::mem::offset_of!(Header, quiet_table) == 1024);
    assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);
};

/// One slot: word 0 is the publication stamp (`seq + 1`), the rest the record.
#[repr(C)]
struct Slot {
    words: [AtomicU64; WORDS],
}

const _: () = assert!(std::mem::size_of::<Slot>() == RECORD_SIZE);

/// Why a ring cannot be created or opened. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("ring {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a vmwatch event ring (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("ring {path} has format version {found}, this build reads version {expected}: rebuild the plugin and vmwatch together")]
    BadVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("ring {path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("ring {path} already has a reader (one consumer per ring)")]
    Busy { path: PathBuf },
    #[error("ring capacity {0} must be a power of two between 2 and {MAX_CAPACITY}")]
    Capacity(u64),
}

/// A mapped ring file; shared by [`RingWriter`] and [`RingReader`].
struct Mapping {
    map: MmapRaw,
    capacity: u64,
    _file: File,
}

// SAFETY: the mapping is only accessed through atomics (header counters, slot
// words) or fields that are immutable after creation, so sharing it between
// threads cannot race in the Rust sense.
unsafe impl Sync for Mapping {}
// SAFETY: as above; the raw pointer inside MmapRaw is valid from any thread.
unsafe impl Send for Mapping {}

impl Mapping {
    fn header(&self) -> &Header {
        // SAFETY: the map is at least HEADER_SIZE bytes (checked at create/open),
        // page aligned, and every Header field is an integer, byte array or atomic,
        // valid for any bit pattern. The reference lives no longer than `self.map`.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn slot(&self, seq: u64) -> &Slot {
        let index = (seq & (self.capacity - 1)) as usize;
        // SAFETY: the map is HEADER_SIZE + capacity * RECORD_SIZE bytes (checked),
        // index < capacity, the offset is 8-byte aligned, and a Slot is 16 atomics,
        // valid for any bit pattern.
        unsafe { &*(self.map.as_ptr().add(HEADER_SIZE + index * RECORD_SIZE) as *const Slot) }
    }
}

/// Where the guest's `syscall` instruction enters the kernel (the LSTAR
/// MSR, as the plugin last observed it) and how many samples were taken,
/// read from a ring's header without becoming its reader (vmwatchd may own
/// the ring). `None` before the first sample.
pub fn peek_syscall_entry(path: &Path) -> Result<Option<(u64, u64)>, RingError> {
    let head = peek_header(path)?;
    let samples = le_word(&head, 552);
    Ok((samples > 0).then(|| (le_word(&head, 544), samples)))
}

/// What the plugin saw written to the syscall-entry MSRs, read from a ring's
/// header without becoming its reader.
pub fn peek_entry_msrs(path: &Path) -> Result<EntryMsrs, RingError> {
    let head = peek_header(path)?;
    let mut m = EntryMsrs {
        writes: le_word(&head, 560),
        ..EntryMsrs::default()
    };
    for i in 0..3 {
        m.last_writer[i] = le_word(&head, 568 + 8 * i);
        m.last_caller[i] = le_word(&head, 976 + 8 * i);
    }
    m.values = (0..MSR_VCPU_SLOTS)
        .map(|cpu| std::array::from_fn(|i| le_word(&head, 592 + 24 * cpu + 8 * i)))
        .collect();
    Ok(m)
}

/// The first kilobyte of a ring file (the fixed header fields), checked for
/// magic and version.
fn peek_header(path: &Path) -> Result<[u8; 1024], RingError> {
    use std::io::Read;
    let mut head = [0u8; 1024];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(io(path))?;
    if head[..8] != MAGIC {
        return Err(RingError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != FORMAT_VERSION {
        return Err(RingError::BadVersion {
            path: path.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    Ok(head)
}

fn le_word(head: &[u8], at: usize) -> u64 {
    head.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RingError + '_ {
    move |source| RingError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The producer side, used by the plugin inside QEMU. Cheap to share between
/// vCPU threads (`&RingWriter` is `Sync`).
pub struct RingWriter {
    m: Mapping,
}

impl RingWriter {
    /// Creates (or replaces) the ring file at `path` with room for `capacity`
    /// slots, the VM's name, the initial filter and fd filter. The file
    /// appears at `path` only once fully initialised (written beside it, then renamed).
    pub fn create(
        path: &Path,
        capacity: u64,
        vm_name: &str,
        filter: &Filter,
        fds: &Filter,
    ) -> Result<RingWriter, RingError> {
        if !(2..=MAX_CAPACITY).contains(&capacity) || !capacity.is_power_of_two() {
            return Err(RingError::Capacity(capacity));
        }
        let len = HEADER_SIZE as u64 + capacity * RECORD_SIZE as u64;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io(path))?;
        file.set_len(len).map_err(io(path))?;
        let map = MmapRaw::map_raw(&file).map_err(io(path))?;
        let m = Mapping {
            map,
            capacity,
            _file: file,
        };
        {
            let p = m.map.as_mut_ptr();
            let mut name = [0u8; 64];
            let n = vm_name.len().min(63);
            name[..n].copy_from_slice(&vm_name.as_bytes()[..n]);
            // SAFETY: the file was just created by us and nobody else maps it yet
            // (it is not at its final path); the writes stay inside the header.
            unsafe {
                std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), p, 8);
                (p.add(8) as *mut u32).write(FORMAT_VERSION.to_le());
                (p.add(12) as *mut u32).write((RECORD_SIZE as u32).to_le());
                (p.add(16) as *mut u64).write(capacity.to_le());
                (p.add(24) as *mut u64).write((HEADER_SIZE as u64).to_le());
                (p.add(32) as *mut u64).write(u64::from(std::process::id()).to_le());
                std::ptr::copy_nonoverlapping(name.as_ptr(), p.add(40), 64);
            }
        }
        let w = RingWriter { m };
        let h = w.m.header();
        for (word, value) in h.filter.iter().zip(filter.words) {
            word.store(value, Ordering::Relaxed);
        }
        for (word, value) in h.fds.iter().zip(fds.words) {
            word.store(value, Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::Release);
        std::fs::rename(&tmp, path).map_err(io(path))?;
        Ok(w)
    }

    /// Whether syscall `nr` is in the current filter: one relaxed load.
    #[inline]
    pub fn wants(&self, nr: u64) -> bool {
        bit(&self.m.header().filter, nr)
    }

    /// Whether the fds of syscall `nr` should be resolved to file identities.
    #[inline]
    pub fn wants_fds(&self, nr: u64) -> bool {
        bit(&self.m.header().fds, nr)
    }

    /// Publishes one observation of where `syscall` enters the kernel.
    pub fn record_syscall_entry(&self, addr: u64) {
        let h = self.m.header();
        h.syscall_entry.store(addr, Ordering::Relaxed);
        h.syscall_entry_samples.fetch_add(1, Ordering::Release);
    }

    /// Publishes a `wrmsr` of `value` to `msr` by vCPU `vcpu`, at `writer`,
    /// with `caller` the word on top of the stack then.
    pub fn record_msr_write(&self, vcpu: u32, msr: EntryMsr, value: u64, writer: u64, caller: u64) {
        let h = self.m.header();
        let cpu = (vcpu as usize).min(MSR_VCPU_SLOTS - 1);
        h.msr_values[cpu][msr.slot()].store(value, Ordering::Relaxed);
        h.msr_writer[msr.slot()].store(writer, Ordering::Relaxed);
        h.msr_caller[msr.slot()].store(caller, Ordering::Relaxed);
        h.msr_writes.fetch_add(1, Ordering::Release);
    }

    /// One call left out because [`RingWriter::is_quiet`] said so.
    #[inline]
    pub fn count_quieted(&self) {
        self.m.header().quieted.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether syscall `nr` of the thread group leader `task` (thread group
    /// `tgid`) is not needed: `nr` is in the quiet filter and (task, tgid)
    /// in the quiet table. At most one load for syscalls outside the quiet
    /// filter, `QUIET_PROBES` pairs of loads otherwise.
    #[inline]
    pub fn is_quiet(&self, nr: u64, task: u64, tgid: u32) -> bool {
        let h = self.m.header();
        if task == 0 || !bit(&h.quiet, nr) {
            return false;
        }
        let start = tgid as usize % QUIET_SLOTS;
        (0..QUIET_PROBES).any(|i| {
            let e = &h.quiet_table[(start + i) % QUIET_SLOTS];
            // The consumer clears `task` first and sets it last, so a task
            // read here is never paired with a tgid of another entry's
            // thread: the current thread's own (task, tgid) cannot match a
            // half-written entry of another process.
            e[0].load(Ordering::Acquire) == task && e[1].load(Ordering::Acquire) == u64::from(tgid)
        })
    }

    /// Appends `rec` with its payload (its `seq` is ignored) and returns the
    /// seq it got, or `None` if the ring was full (counted in `dropped`).
    /// Never blocks.
    pub fn push(&self, rec: &Record) -> Option<u64> {
        self.push_parts(rec, &rec.payload)
    }

    /// [`RingWriter::push`] with the payload given separately (so a producer
    /// can keep it in a reusable buffer; `rec.payload` is ignored).
    pub fn push_parts(&self, rec: &Record, payload: &[u8]) -> Option<u64> {
        let h = self.m.header();
        let payload = &payload[..payload.len().min(crate::payload::MAX_PAYLOAD)];
        let n = 1 + payload.len().div_ceil(SLOT_PAYLOAD) as u64;
        let mut w = h.write.load(Ordering::Relaxed);
        loop {
            let r = h.read.load(Ordering::Acquire);
            if w.wrapping_sub(r).wrapping_add(n) > self.m.capacity {
                h.dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match h
                .write
                .compare_exchange_weak(w, w + n, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        for (i, chunk) in payload.chunks(SLOT_PAYLOAD).enumerate() {
            let pos = w + 1 + i as u64;
            let slot = self.m.slot(pos);
            let mut bytes = [0u8; SLOT_PAYLOAD];
            bytes[..chunk.len()].copy_from_slice(chunk);
            for (dst, src) in slot.words[1..].iter().zip(bytes.chunks_exact(8)) {
                let mut word = [0u8; 8];
                word.copy_from_slice(src);
                dst.store(u64::from_le_bytes(word), Ordering::Relaxed);
            }
            slot.words[0].store(pos + 1, Ordering::Relaxed);
        }
        let slot = self.m.slot(w);
        let words = encode(w, rec, n as u8, payload.len() as u16);
        for (dst, src) in slot.words[1..].iter().zip(&words[1..]) {
            dst.store(*src, Ordering::Relaxed);
        }
        slot.words[0].store(w + 1, Ordering::Release);
        h.records.fetch_add(1, Ordering::Relaxed);
        Some(w)
    }

    /// The log doorbell limit now: (doorbells per second per process, burst);
    /// rate 0 = no limit. Two relaxed loads.
    #[inline]
    pub fn log_limit(&self) -> (u64, u64) {
        let h = self.m.header();
        (
            h.log_rate.load(Ordering::Relaxed),
            h.log_burst.load(Ordering::Relaxed),
        )
    }

    /// One log doorbell refused because of the log limit.
    #[inline]
    pub fn count_log_dropped(&self) {
        self.m.header().log_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an entry the plugin could not keep for pairing (its table was full).
    pub fn count_unpaired(&self) {
        self.m.header().unpaired.fetch_add(1, Ordering::Relaxed);
    }

    /// Records published so far.
    pub fn written(&self) -> u64 {
        self.m.header().records.load(Ordering::Relaxed)
    }

    /// Records lost because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.m.header().dropped.load(Ordering::Relaxed)
    }
}

#[inline]
fn bit(words: &[AtomicU64; 8], nr: u64) -> bool {
    nr < 512 && words[(nr / 64) as usize].load(Ordering::Relaxed) & (1 << (nr % 64)) != 0
}

fn encode(seq: u64, r: &Record, slots: u8, payload_len: u16) -> [u64; WORDS] {
    [
        seq + 1,
        r.time_ns,
        u64::from(r.vcpu as u16)
            | (u64::from(r.kind.to_raw()) << 16)
            | (u64::from(slots) << 24)
            | (u64::from(payload_len) << 32)
            | (u64::from(r.flags) << 48),
        r.nr,
        r.args[0],
        r.args[1],
        r.args[2],
        r.args[3],
        r.args[4],
        r.args[5],
        r.ret as u64,
        r.cr3,
        r.rip,
        r.task,
        r.entry_seq,
        u64::from(r.pid) | (u64::from(r.tgid) << 32),
    ]
}

/// The head of a record: the record without payload, its slot count and payload length.
fn decode(seq: u64, w: &[u64; WORDS]) -> Option<(Record, u64, usize)> {
    let packed = w[2];
    let slots = (packed >> 24) & 0xff;
    let payload_len = ((packed >> 32) & 0xffff) as usize;
    if slots == 0 || slots > MAX_SLOTS || payload_len > (slots as usize - 1) * SLOT_PAYLOAD {
        return None;
    }
    Some((
        Record {
            seq,
            time_ns: w[1],
            vcpu: (packed & 0xffff) as u32,
            kind: Kind::from_raw((packed >> 16) as u8)?,
            nr: w[3],
            args: [w[4], w[5], w[6], w[7], w[8], w[9]],
            ret: w[10] as i64,
            cr3: w[11],
            rip: w[12],
            task: w[13],
            entry_seq: w[14],
            pid: w[15] as u32,
            tgid: (w[15] >> 32) as u32,
            flags: (packed >> 48) as u16,
            payload: Vec::new(),
        },
        slots,
        payload_len,
    ))
}

/// Opening a ring for reading.
pub struct Ring;

impl Ring {
    /// Maps the ring at `path` for its single consumer. Rejects files that are
    /// not rings, rings of another format version, malformed sizes, and a ring
    /// that already has a reader (advisory `flock`).
    pub fn open(path: &Path) -> Result<RingReader, RingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let malformed = |what: String| RingError::Malformed {
            path: path.to_path_buf(),
            what,
        };
        if len < HEADER_SIZE as u64 {
            let mut head = [0u8; 8];
            use std::io::Read;
            let n = (&file).read(&mut head).map_err(io(path))?;
            if n < 8 || head != MAGIC {
                return Err(RingError::BadMagic {
                    path: path.to_path_buf(),
                });
            }
            return Err(malformed(format!("{len} bytes, shorter than its header")));
        }
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                RingError::Busy {
                    path: path.to_path_buf(),
                }
            } else {
                RingError::Io {
                    path: path.to_path_buf(),
                    source: err,
                }
            });
        }
        let map = MmapRaw::map_raw(&file).map_err(io(path))?;
        let mut m = Mapping {
            map,
            capacity: 2,
            _file: file,
        };
        let capacity = {
            let h = m.header();
            if h.magic != MAGIC {
                return Err(RingError::BadMagic {
                    path: path.to_path_buf(),
                });
            }
            let version = u32::from_le(h.version);
            if version != FORMAT_VERSION {
                return Err(RingError::BadVersion {
                    path: path.to_path_buf(),
                    found: version,
                    expected: FORMAT_VERSION,
                });
            }
            let record_size = u32::from_le(h.record_size);
            if record_size as usize != RECORD_SIZE {
                return Err(malformed(format!(
                    "record size {record_size}, expected {RECORD_SIZE}"
                )));
            }
            let header_size = u64::from_le(h.header_size);
            if header_size != HEADER_SIZE as u64 {
                return Err(malformed(format!(
                    "header size {header_size}, expected {HEADER_SIZE}"
                )));
            }
            let capacity = u64::from_le(h.capacity);
            if !(2..=MAX_CAPACITY).contains(&capacity) || !capacity.is_power_of_two() {
                return Err(malformed(format!(
                    "capacity {capacity} is not a power of two in 2..={MAX_CAPACITY}"
                )));
            }
            let need = HEADER_SIZE as u64 + capacity * RECORD_SIZE as u64;
            if len < need || (m.map.len() as u64) < need {
                return Err(malformed(format!(
                    "{len} bytes, capacity {capacity} needs {need}"
                )));
            }
            capacity
        };
        m.capacity = capacity;
        Ok(RingReader { m, corrupt: 0 })
    }
}

/// The consumer side: the only reader of one ring.
pub struct RingReader {
    m: Mapping,
    corrupt: u64,
}

impl RingReader {
    /// Records published since the last poll, in seq order, at most one ring's
    /// worth. Each record is handed back to producers as soon as it is yielded.
    /// Slots that do not decode (unknown kind: not written by a compatible
    /// plugin) are skipped and counted in [`RingReader::corrupt`].
    pub fn poll(&mut self) -> Drain<'_> {
        Drain {
            left: self.m.capacity,
            reader: self,
        }
    }

    /// Records the producers lost because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.m.header().dropped.load(Ordering::Relaxed)
    }

    /// Entries the plugin recorded but could not remember for pairing.
    pub fn unpaired(&self) -> u64 {
        self.m.header().unpaired.load(Ordering::Relaxed)
    }

    /// Slots reserved by producers but not read yet.
    pub fn backlog(&self) -> u64 {
        let h = self.m.header();
        h.write
            .load(Ordering::Relaxed)
            .wrapping_sub(h.read.load(Ordering::Relaxed))
    }

    /// Capacity in slots (a record takes 1 + payload/120 slots).
    pub fn capacity(&self) -> u64 {
        self.m.capacity
    }

    /// The VM name the plugin was started with.
    pub fn vm_name(&self) -> String {
        let raw = &self.m.header().vm_name;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }

    /// PID of the process that created the ring (QEMU).
    pub fn writer_pid(&self) -> u64 {
        u64::from_le(self.m.header().writer_pid)
    }

    /// The filter the plugin applies now.
    pub fn filter(&self) -> Filter {
        let mut f = Filter::NONE;
        for (dst, src) in f.words.iter_mut().zip(&self.m.header().filter) {
            *dst = src.load(Ordering::Relaxed);
        }
        f
    }

    /// Replaces the plugin's filter at run time; returns the new generation.
    /// Syscalls already entered keep their pairing (their returns still come).
    pub fn set_filter(&self, filter: &Filter) -> u64 {
        let h = self.m.header();
        for (word, value) in h.filter.iter().zip(filter.words) {
            word.store(value, Ordering::Relaxed);
        }
        h.filter_gen.fetch_add(1, Ordering::Release) + 1
    }

    /// The syscalls whose fds the plugin resolves to file identities now.
    pub fn fds(&self) -> Filter {
        let mut f = Filter::NONE;
        for (dst, src) in f.words.iter_mut().zip(&self.m.header().fds) {
            *dst = src.load(Ordering::Relaxed);
        }
        f
    }

    /// Replaces the fd filter at run time; returns the new generation.
    pub fn set_fds(&self, fds: &Filter) -> u64 {
        let h = self.m.header();
        for (word, value) in h.fds.iter().zip(fds.words) {
            word.store(value, Ordering::Relaxed);
        }
        h.filter_gen.fetch_add(1, Ordering::Release) + 1
    }

    /// Replaces the quiet filter and table: records of `syscalls` made by a
    /// thread group leader listed in `members` as (task, tgid) are not
    /// written any more. Members that do not fit (more than `QUIET_PROBES`
    /// colliding on one slot, or more than `QUIET_SLOTS`) stay recorded;
    /// returns how many were placed.
    pub fn set_quiet(&self, syscalls: &Filter, members: &[(u64, u32)]) -> usize {
        let h = self.m.header();
        let mut table = [(0u64, 0u32); QUIET_SLOTS];
        let mut placed = 0;
        for &(task, tgid) in members {
            if task == 0 {
                continue;
            }
            let start = tgid as usize % QUIET_SLOTS;
            if let Some(i) = (0..QUIET_PROBES)
                .map(|i| (start + i) % QUIET_SLOTS)
                .find(|&i| table[i].0 == 0 || table[i] == (task, tgid))
            {
                if table[i].0 == 0 {
                    placed += 1;
                }
                table[i] = (task, tgid);
            }
        }
        // Filter first off for syscalls leaving it, last on for new ones.
        for (word, value) in h.quiet.iter().zip(syscalls.words) {
            word.fetch_and(value, Ordering::AcqRel);
        }
        for (e, &(task, tgid)) in h.quiet_table.iter().zip(table.iter()) {
            if e[0].load(Ordering::Relaxed) == task
                && e[1].load(Ordering::Relaxed) == u64::from(tgid)
            {
                continue;
            }
            e[0].store(0, Ordering::Release);
            e[1].store(u64::from(tgid), Ordering::Release);
            e[0].store(task, Ordering::Release);
        }
        for (word, value) in h.quiet.iter().zip(syscalls.words) {
            word.store(value, Ordering::Release);
        }
        placed
    }

    /// Limits the log doorbells the plugin accepts from each process (thread
    /// group) to `per_second` on average, in bursts of at most `burst` (a
    /// token bucket per process, full when the plugin first sees the
    /// process; a burst of 0 is taken as 1). `per_second` 0 lifts the limit.
    /// Takes effect at the next doorbell.
    pub fn set_log_limit(&self, per_second: u64, burst: u64) {
        let h = self.m.header();
        h.log_burst.store(burst, Ordering::Relaxed);
        h.log_rate.store(per_second, Ordering::Relaxed);
    }

    /// The log limit now: (doorbells per second per process, burst).
    pub fn log_limit(&self) -> (u64, u64) {
        let h = self.m.header();
        (
            h.log_rate.load(Ordering::Relaxed),
            h.log_burst.load(Ordering::Relaxed),
        )
    }

    /// Log doorbells the plugin refused because of the log limit (all processes).
    pub fn log_dropped(&self) -> u64 {
        self.m.header().log_dropped.load(Ordering::Relaxed)
    }

    /// The last observed kernel entry of the guest's `syscall` instruction
    /// (LSTAR) and how many samples were taken; `None` before the first.
    pub fn syscall_entry(&self) -> Option<(u64, u64)> {
        let h = self.m.header();
        let n = h.syscall_entry_samples.load(Ordering::Acquire);
        (n > 0).then(|| (h.syscall_entry.load(Ordering::Relaxed), n))
    }

    /// What the plugin saw written to the syscall-entry MSRs.
    pub fn entry_msrs(&self) -> EntryMsrs {
        let h = self.m.header();
        EntryMsrs {
            writes: h.msr_writes.load(Ordering::Acquire),
            last_writer: std::array::from_fn(|i| h.msr_writer[i].load(Ordering::Relaxed)),
            last_caller: std::array::from_fn(|i| h.msr_caller[i].load(Ordering::Relaxed)),
            values: h
                .msr_values
                .iter()
                .map(|v| std::array::from_fn(|i| v[i].load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Calls the plugin left out because of the quiet table.
    pub fn quieted(&self) -> u64 {
        self.m.header().quieted.load(Ordering::Relaxed)
    }

    /// The quiet filter and the members of the quiet table now.
    pub fn quiet(&self) -> (Filter, Vec<(u64, u32)>) {
        let h = self.m.header();
        let mut f = Filter::NONE;
        for (dst, src) in f.words.iter_mut().zip(&h.quiet) {
            *dst = src.load(Ordering::Relaxed);
        }
        let members = h
            .quiet_table
            .iter()
            .map(|e| {
                (
                    e[0].load(Ordering::Acquire),
                    e[1].load(Ordering::Acquire) as u32,
                )
            })
            .filter(|&(task, _)| task != 0)
            .collect();
        (f, members)
    }

    /// Records the producers published in all.
    pub fn records(&self) -> u64 {
        self.m.header().records.load(Ordering::Relaxed)
    }

    /// How many times the filter was changed through the control area.
    pub fn filter_generation(&self) -> u64 {
        self.m.header().filter_gen.load(Ordering::Acquire)
    }

    /// Records that did not decode.
    pub fn corrupt(&self) -> u64 {
        self.corrupt
    }
}

/// Iterator returned by [`RingReader::poll`].
pub struct Drain<'a> {
    reader: &'a mut RingReader,
    left: u64,
}

impl Iterator for Drain<'_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        while self.left > 0 {
            let m = &self.reader.m;
            let h = m.header();
            let seq = h.read.load(Ordering::Relaxed);
            let slot = m.slot(seq);
            if slot.words[0].load(Ordering::Acquire) != seq + 1 {
                return None;
            }
            let mut words = [0u64; WORDS];
            for (dst, src) in words.iter_mut().zip(&slot.words).skip(1) {
                *dst = src.load(Ordering::Relaxed);
            }
            let decoded = decode(seq, &words).filter(|(_, n, _)| *n <= m.capacity);
            let Some((mut rec, n, payload_len)) = decoded else {
                // Not written by a compatible producer: skip one slot.
                h.read.store(seq + 1, Ordering::Release);
                self.left -= 1;
                self.reader.corrupt += 1;
                continue;
            };
            let mut payload = Vec::with_capacity(payload_len);
            let mut whole = true;
            for i in 1..n {
                let ext = m.slot(seq + i);
                whole &= ext.words[0].load(Ordering::Relaxed) == seq + i + 1;
                for word in &ext.words[1..] {
                    payload.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
                }
            }
            payload.truncate(payload_len);
            h.read.store(seq + n, Ordering::Release);
            self.left = self.left.saturating_sub(n);
            if !whole {
                self.reader.corrupt += 1;
                continue;
            }
            rec.payload = payload;
            return Some(rec);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tmp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("events-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(tag)
    }

    fn entry(vcpu: u32, nr: u64, arg0: u64) -> Record {
        Record::entry(vcpu, nr, [arg0, 2, 3, 4, 5, 6], 0x1000, 0x401000)
    }

    #[test]
    fn syscall_entry_is_published_and_peeked_without_the_reader_lock() {
        let p = tmp("entry");
        let w = RingWriter::create(&p, 8, "vm-e", &Filter::NONE, &Filter::NONE).unwrap();
        let r = Ring::open(&p).unwrap();
        assert_eq!(r.syscall_entry(), None);
        assert_eq!(peek_syscall_entry(&p).unwrap(), None);
        w.record_syscall_entry(0xffff_ffff_8120_0000);
        w.record_syscall_entry(0xffff_ffff_c000_1000);
        assert_eq!(r.syscall_entry(), Some((0xffff_ffff_c000_1000, 2)));
        // The reader holds the lock; peeking still works.
        assert_eq!(
            peek_syscall_entry(&p).unwrap(),
            Some((0xffff_ffff_c000_1000, 2))
        );
        std::fs::write(tmp("not-a-ring"), [0u8; 4096]).unwrap();
        assert!(matches!(
            peek_syscall_entry(&tmp("not-a-ring")),
            Err(RingError::BadMagic { .. })
        ));
    }

    #[test]
    fn entry_msr_writes_are_kept_per_vcpu_and_peeked() {
        let p = tmp("msrs");
        let w = RingWriter::create(&p, 8, "vm-m", &Filter::NONE, &Filter::NONE).unwrap();
        let r = Ring::open(&p).unwrap();
        let none = peek_entry_msrs(&p).unwrap();
        assert_eq!((none.writes, none.observed().count()), (0, 0));
        assert_eq!(none.values.len(), MSR_VCPU_SLOTS);
        let (lstar0, lstar1) = (0xffff_ffff_8100_0000, 0xffff_ffff_c000_2000);
        let (accessor, module) = (0xffff_ffff_8105_0008, 0xffff_ffff_c000_1000);
        w.record_msr_write(0, EntryMsr::Lstar, lstar0, accessor, 1);
        w.record_msr_write(1, EntryMsr::Lstar, lstar1, accessor, module);
        w.record_msr_write(1, EntryMsr::SysenterEip, 0xffff_ffff_8100_1000, accessor, 2);
        // vCPUs past the last slot share it.
        w.record_msr_write(99, EntryMsr::Cstar, 7, 8, 9);
        let m = peek_entry_msrs(&p).unwrap();
        assert_eq!(m, r.entry_msrs());
        assert_eq!(m.writes, 4);
        assert_eq!(
            (
                m.last_writer(EntryMsr::Lstar),
                m.last_caller[EntryMsr::Lstar.slot()]
            ),
            (Some(accessor), module)
        );
        let seen: Vec<_> = m.observed().collect();
        assert_eq!(
            seen,
            [
                (0, EntryMsr::Lstar, lstar0),
                (1, EntryMsr::Lstar, lstar1),
                (1, EntryMsr::SysenterEip, 0xffff_ffff_8100_1000),
                (MSR_VCPU_SLOTS - 1, EntryMsr::Cstar, 7),
            ]
        );
    }

    #[test]
    fn round_trip_and_header() {
        let p = tmp("rt");
        let w = RingWriter::create(
            &p,
            8,
            "vm-a",
            &Filter::parse("openat").unwrap(),
            &Filter::parse("read").unwrap(),
        )
        .unwrap();
        assert!(w.wants(257) && !w.wants(0) && !w.wants(10_000));
        let mut r = Ring::open(&p).unwrap();
        assert_eq!(r.vm_name(), "vm-a");
        assert_eq!(r.capacity(), 8);
        assert_eq!(r.writer_pid(), u64::from(std::process::id()));
        assert_eq!(w.push(&entry(1, 257, 9)), Some(0));
        assert!(w.wants_fds(0) && !w.wants_fds(257));
        let mut ret = Record::ret(0, 257, -2, 0x1000, 0xffff_ffff_8100_0000, 0);
        (ret.pid, ret.tgid, ret.task, ret.flags) = (77, 76, 0xffff_8880_0000_1000, 1);
        assert_eq!(w.push(&ret), Some(1));
        let got: Vec<_> = r.poll().collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].seq, 0);
        assert_eq!(got[0].kind, Kind::Entry);
        assert_eq!(got[0].args, [9, 2, 3, 4, 5, 6]);
        assert_eq!(got[0].vcpu, 1);
        assert_eq!(got[1].kind, Kind::Return);
        assert_eq!(got[1].ret, -2);
        assert_eq!(got[1].entry_seq, 0);
        assert_eq!(
            (got[1].pid, got[1].tgid, got[1].task, got[1].flags),
            (77, 76, 0xffff_8880_0000_1000, 1)
        );
        assert_eq!(r.records(), 2);
        assert_eq!(r.poll().count(), 0);
        // Runtime filter change through the control area.
        assert_eq!(r.set_filter(&Filter::parse("read").unwrap()), 1);
        assert!(w.wants(0) && !w.wants(257));
        assert_eq!(r.filter(), Filter::parse("read").unwrap());
        assert_eq!(r.set_fds(&Filter::parse("write").unwrap()), 2);
        assert!(w.wants_fds(1) && !w.wants_fds(0));
        assert_eq!(r.fds(), Filter::parse("write").unwrap());
        // Only one reader.
        assert!(matches!(Ring::open(&p), Err(RingError::Busy { .. })));
    }

    #[test]
    fn quiet_table() {
        let p = tmp("quiet");
        let w = RingWriter::create(&p, 8, "vm", &Filter::ALL, &Filter::NONE).unwrap();
        let r = Ring::open(&p).unwrap();
        let read = Filter::parse("read,pread64").unwrap();
        const T: u64 = 0xffff_8880_0100_0000;
        // Nothing is quiet in a new ring.
        assert!(!w.is_quiet(0, T, 100));
        assert_eq!(r.set_quiet(&read, &[(T, 100), (T + 0x1000, 228)]), 2);
        assert!(w.is_quiet(0, T, 100) && w.is_quiet(17, T, 100));
        assert!(w.is_quiet(0, T + 0x1000, 228));
        w.count_quieted();
        assert_eq!(r.quieted(), 1);
        // Another syscall, another task with the same tgid (pid reused), a
        // thread (task of another thread), task 0: recorded.
        assert!(!w.is_quiet(1, T, 100));
        assert!(!w.is_quiet(0, T + 0x2000, 100));
        assert!(!w.is_quiet(0, T, 101));
        assert!(!w.is_quiet(0, 0, 100));
        // Colliding tgids share probes; past QUIET_PROBES they stay recorded.
        let many: Vec<(u64, u32)> = (0..20u32)
            .map(|i| (T + u64::from(i) * 0x1000, 5 + i * QUIET_SLOTS as u32))
            .collect();
        assert_eq!(r.set_quiet(&read, &many), QUIET_PROBES);
        for (i, &(task, tgid)) in many.iter().enumerate() {
            assert_eq!(w.is_quiet(0, task, tgid), i < QUIET_PROBES, "member {i}");
        }
        // Replaced, not added to: the earlier members are gone.
        assert!(!w.is_quiet(0, T + 0x1000, 228));
        let (f, m) = r.quiet();
        assert_eq!(f, read);
        assert_eq!(m.len(), QUIET_PROBES);
        // Cleared.
        assert_eq!(r.set_quiet(&Filter::NONE, &[]), 0);
        assert!(!w.is_quiet(0, T, 5));
        assert!(r.quiet().1.is_empty());
    }

    #[test]
    fn log_limit_control() {
        let p = tmp("loglimit");
        let w = RingWriter::create(&p, 8, "vm", &Filter::ALL, &Filter::NONE).unwrap();
        let r = Ring::open(&p).unwrap();
        // A new ring has no limit and no refusals.
        assert_eq!(
            (w.log_limit(), r.log_limit(), r.log_dropped()),
            ((0, 0), (0, 0), 0)
        );
        r.set_log_limit(50, 20);
        assert_eq!((w.log_limit(), r.log_limit()), ((50, 20), (50, 20)));
        w.count_log_dropped();
        w.count_log_dropped();
        assert_eq!(r.log_dropped(), 2);
        r.set_log_limit(0, 0);
        assert_eq!(w.log_limit(), (0, 0));
        assert_eq!(r.log_dropped(), 2, "lifting the limit keeps the count");
        // Only the log fields changed: the quiet table, the filters and the
        // counters next to them are untouched, and the fields sit at the
        // documented offsets of the file.
        assert_eq!(r.quiet().1.len(), 0);
        assert_eq!(r.filter(), Filter::ALL);
        assert_eq!((r.dropped(), r.records(), r.quieted()), (0, 0, 0));
        r.set_log_limit(0x0102_0304_0506_0708, 0x1112_1314_1516_1718);
        w.count_log_dropped();
        let bytes = std::fs::read(&p).unwrap();
        let word = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        assert_eq!(word(520), 0x0102_0304_0506_0708);
        assert_eq!(word(528), 0x1112_1314_1516_1718);
        assert_eq!(word(536), 3);
        assert!(bytes[544..1024].iter().all(|&b| b == 0));
    }

    #[test]
    fn overflow_counts_drops_and_never_blocks() {
        let p = tmp("ovf");
        let w = RingWriter::create(&p, 4, "vm", &Filter::ALL, &Filter::NONE).unwrap();
        let mut r = Ring::open(&p).unwrap();
        let pushed: Vec<_> = (0..10).map(|i| w.push(&entry(0, 39, i))).collect();
        assert_eq!(pushed.iter().filter(|s| s.is_some()).count(), 4);
        assert_eq!(r.dropped(), 6);
        let got: Vec<_> = r.poll().map(|x| x.args[0]).collect();
        assert_eq!(got, vec![0, 1, 2, 3]);
        // Space is back after the read.
        assert_eq!(w.push(&entry(0, 39, 42)), Some(4));
        assert_eq!(
            r.poll().map(|x| (x.seq, x.args[0])).collect::<Vec<_>>(),
            vec![(4, 42)]
        );
        assert_eq!(r.dropped(), 6);
    }

    #[test]
    fn concurrent_producers_lose_nothing_they_did_not_count() {
        let p = tmp("mp");
        let w = Arc::new(RingWriter::create(&p, 256, "vm", &Filter::ALL, &Filter::NONE).unwrap());
        let mut r = Ring::open(&p).unwrap();
        const THREADS: u32 = 4;
        const PER: u64 = 50_000;
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let w = Arc::clone(&w);
                std::thread::spawn(move || {
                    let mut ok = 0u64;
                    for i in 0..PER {
                        if w.push(&entry(t, 1, i)).is_some() {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let mut seen = vec![Vec::new(); THREADS as usize];
        let mut next_seq = 0;
        let mut done = false;
        while !done {
            done = handles.iter().all(|h| h.is_finished());
            for rec in r.poll() {
                assert_eq!(rec.seq, next_seq, "seqs are dense and in order");
                next_seq += 1;
                seen[rec.vcpu as usize].push(rec.args[0]);
            }
        }
        for rec in r.poll() {
            seen[rec.vcpu as usize].push(rec.args[0]);
            next_seq += 1;
        }
        let ok: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(ok, next_seq);
        assert_eq!(ok + r.dropped(), u64::from(THREADS) * PER);
        for s in &seen {
            assert!(s.windows(2).all(|p| p[0] < p[1]), "per-producer order kept");
        }
    }

    #[test]
    fn payloads_span_slots_and_wrap() {
        let p = tmp("payload");
        let w = RingWriter::create(&p, 16, "vm", &Filter::ALL, &Filter::NONE).unwrap();
        let mut r = Ring::open(&p).unwrap();
        let mut expect_seq = 0;
        for round in 0..20u64 {
            // 0..=600 bytes: 1 to 6 slots, so records wrap around the 16-slot ring.
            let len = (round * 97 % 601) as usize;
            let mut rec = entry(0, 257, round);
            rec.payload = (0..len).map(|i| (i as u64 * 7 + round) as u8).collect();
            let seq = w.push(&rec).unwrap();
            assert_eq!(seq, expect_seq);
            expect_seq += 1 + len.div_ceil(SLOT_PAYLOAD) as u64;
            let got: Vec<_> = r.poll().collect();
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].payload, rec.payload, "round {round}");
            assert_eq!(got[0].args[0], round);
        }
        // A record larger than the ring is dropped and counted, never written.
        let mut big = entry(0, 1, 0);
        big.payload = vec![1; 16 * SLOT_PAYLOAD];
        assert_eq!(w.push(&big), None);
        assert_eq!(r.dropped(), 1);
        assert_eq!(r.poll().count(), 0);
        assert_eq!(r.corrupt(), 0);
    }

    #[test]
    fn open_rejects_bad_files_with_one_line() {
        let p = tmp("bad");
        std::fs::write(&p, b"hello").unwrap();
        let e = Ring::open(&p).err().unwrap().to_string();
        assert!(e.contains("not a vmwatch event ring"), "{e}");
        assert!(!e.contains('\n'));

        let w = RingWriter::create(&p, 4, "vm", &Filter::ALL, &Filter::NONE).unwrap();
        drop(w);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[8] = 99;
        std::fs::write(&p, &bytes).unwrap();
        let e = Ring::open(&p).err().unwrap().to_string();
        assert_eq!(
            e,
            format!("ring {} has format version 99, this build reads version {FORMAT_VERSION}: rebuild the plugin and vmwatch together", p.display())
        );
        bytes[8] = FORMAT_VERSION as u8;
        bytes[16] = 3; // capacity 3
        std::fs::write(&p, &bytes).unwrap();
        assert!(Ring::open(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("capacity 3"));
        bytes[16] = 64; // larger than the file
        std::fs::write(&p, &bytes).unwrap();
        assert!(Ring::open(&p).err().unwrap().to_string().contains("needs"));
        let e = Ring::open(&tmp("missing")).err().unwrap().to_string();
        assert!(e.contains("No such file"), "{e}");
        assert!(RingWriter::create(&p, 3, "vm", &Filter::ALL, &Filter::NONE).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any interleaving of pushes and polls: every record comes out once, in
        /// order, unchanged, and pushed = read + dropped.
        #[test]
        fn pushes_and_polls_account_exactly(ops in proptest::collection::vec(0u8..4, 1..300), cap_log in 1u32..5) {
            let p = tmp(&format!("prop{cap_log}"));
            let w = RingWriter::create(&p, 1 << cap_log, "vm", &Filter::ALL, &Filter::NONE).unwrap();
            let mut r = Ring::open(&p).unwrap();
            let mut accepted = Vec::new();
            let mut read = Vec::new();
            let mut pushed = 0u64;
            for (i, op) in ops.iter().enumerate() {
                if *op == 0 {
                    read.extend(r.poll().map(|x| (x.seq, x.args[0])));
                } else {
                    pushed += 1;
                    if let Some(seq) = w.push(&entry(0, 1, i as u64)) {
                        accepted.push((seq, i as u64));
                    }
                }
            }
            read.extend(r.poll().map(|x| (x.seq, x.args[0])));
            proptest::prop_assert_eq!(&read, &accepted);
            proptest::prop_assert_eq!(pushed, read.len() as u64 + r.dropped());
        }
    }
}
