//! Paper 003's own xftrace design, for hosts without a TCG plugin (KVM):
//! a recorder module in the guest, XOR-keyed records, a host Key Controller
//! and Log Maker. Tested under TCG; nothing here depends on it.
//!
//! # Design
//!
//! - **Recorder** (`guest/kmods/xftrace/xftrace.c`, loaded by the user with
//!   `insmod xftrace.ko nrs=257,...`): the guest kernel's function-graph
//!   tracer calls the module at every kernel function entry and return;
//!   between the entry and the return of a selected syscall's handler
//!   (`sys_call_table[nr]`, i.e. `__x64_sys_<name>`) the module writes one
//!   64-byte record per call and per return of that task (cpu, kind,
//!   depth, function, task, pid, time) into a static buffer `xft_buf`, each
//!   word XORed with the 64-bit key in the module variable `xft_key`, read
//!   as the record is written. The last word is a check word: the
//!   record's own index and a non-linear digest of its other words, under
//!   the same key. While `xft_key` is 0 nothing new is
//!   traced. Layout: see [`Header`] and [`encode`].
//! - **Finding it** ([`guest::locate`]): the module on the guest's module
//!   list, its own symbol table (`struct module` -> `kallsyms`) for
//!   `xft_buf` and `xft_key`, the buffer header's magic and its copy of
//!   `&xft_key`. Nothing the guest prints is used.
//! - **Key Controller** ([`KeyController`]): every interval writes a fresh
//!   random key into `xft_key` straight into the guest's RAM file (one
//!   aligned 8-byte atomic store; the guest never pauses), then reads the
//!   buffer's write index, and keeps Klog: (host time, write index, key).
//!   The first key arms the recorder; [`KeyController::stop`] writes 0.
//! - **Log Maker** ([`read_buffer`], [`decode`], [`to_trace`],
//!   [`write_graph`]): reads the buffer from guest memory (bounded by the
//!   capacity found at [`guest::locate`], never by the guest's indices
//!   alone), decodes every record with the key of its Klog interval,
//!   verified by the check word, and writes the same function_graph
//!   `trace_graph.txt` as the TCG backend (names from kallsyms and the
//!   module list; calls to addresses outside known text flagged).
//!
//! # The race, and how it is bounded
//!
//! The module reserves a record's index (atomic increment of the write
//! index) and then reads the key; the host writes key `K_j` and then reads
//! the write index `W_j`. A record at index `i >= W_j` was reserved after
//! the host read `W_j`, so after `K_j` was written: its key is `K_j` or a
//! later one (later when the vCPU stalled between reserving and reading the
//! key across further key changes). A record at `i < W_j` was reserved
//! before; its key is the previous one or, if it read the key after the
//! change, `K_j`. So the key of record `i` is the key of its Klog interval
//! or one of the next few; the module falls back to the key it read before
//! reserving only when the host disarmed in between, one key earlier.
//! [`decode`] tries the interval's key, then [`FORWARD_KEYS`] later ones,
//! then [`BACKWARD_KEYS`] earlier ones, and accepts a key only when the check
//! word decodes to the record's own index and the digest of the words it
//! decoded: a wrong key passes with probability 2^-64, so the race costs at
//! most a few extra decodings, never a wrong one. A record verified only by
//! a key outside that window is counted as `far` (a vCPU stalled for
//! several intervals, or a record rewritten later with an old key).
//!
//! # What a rootkit in the guest can still do
//!
//! The recorder runs in the guest kernel, so a rootkit with kernel
//! privileges can:
//! - read `xft_key` (it is in guest memory) and forge or alter records
//!   that verify, until the next key change. XOR is not encryption and the
//!   digest is not a MAC: record words are partly predictable (kind,
//!   depth, zero words), so any record gives away the key it was written
//!   with, and one that knows this format can decode old records, rewrite
//!   them and re-encode them consistently, scrubbing its own calls from the
//!   history. The keying stops tampering by code that does not know the
//!   format (a blind change of any bit fails the check);
//! - unload or patch the module, unregister the tracer, or skip its own
//!   calls in the recorder;
//! - reset the write index to overwrite records, or zero them.
//!
//! What the host notices ([`DecodeStats`], [`Klog::backwards`]): the write
//! index going backwards between key changes; records no logged key
//! verifies (`bad`: forged with a wrong key, any bit changed blindly, or
//! moved to another slot, since the check binds the index); records zeroed
//! inside the written range (`blank`); records only a key outside the race
//! window verifies (`far`: re-encoded later with an old key); fields out of
//! range (`invalid`); a header whose magic or `&xft_key` changed, or whose
//! traced handlers are not the kernel's `__x64_sys_*`
//! ([`check_handlers`]); a module that is gone (the key's page moved:
//! [`guest::LiveAccess`] refuses to write); and, in the graph, calls to
//! addresses that are no kernel or module symbol (a hijacked pointer, the
//! paper's sign). A rootkit that knows the scheme and rewrites
//! consistently is not detected by the keying; a keyed MAC and a keystream
//! per word (e.g. SipHash of key and position) would confine it to the
//! current key interval.

pub mod guest;

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::fgraph::{Preamble, Written};
use crate::graph::{build, Trace};
use crate::record::{Kind, Record, MAX_DEPTH, MAX_SYSCALLS};
use crate::symbolize::{Place, Resolve};

/// The guest module's name on the module list.
pub const MODULE_NAME: &str = "xftrace";
/// The key variable's symbol in the module.
pub const KEY_SYMBOL: &str = "xft_key";
/// The buffer's symbol in the module.
pub const BUFFER_SYMBOL: &str = "xft_buf";
/// `"XFTRACE1"`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"XFTRACE1");
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: u64 = 256;
pub const RECORD_SIZE: u64 = 64;
/// The check word is `(CHECK_TAG << 32 | index as u32) ^ digest(words 0..7)`,
/// XORed with the key.
pub const CHECK_TAG: u64 = 0x5846_5443;
/// Most syscalls the module traces at once (`nrs=`).
pub const MAX_NRS: usize = 8;
/// Most records the host reads, whatever the guest claims.
pub const MAX_CAPACITY: u64 = 1 << 20;
/// Later keys tried for a record after its Klog interval's key.
pub const FORWARD_KEYS: usize = 4;
/// Earlier keys tried (the disarm fallback in the module).
pub const BACKWARD_KEYS: usize = 1;
/// Default key change interval (the paper's Key Controller period).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
/// Wait after disarming before reading the buffer: records being written
/// then finish (a record is a few stores; this covers a descheduled vCPU).
pub const SETTLE: Duration = Duration::from_millis(200);

/// Header offsets (see the module source).
const OFF_WRITE_INDEX: u64 = 24;

/// Why the kmod backend cannot go on. One line each.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error("module `{MODULE_NAME}` is not on the guest's module list (copy xftrace.ko into the guest and insmod it first)")]
    NotLoaded,
    #[error("module `{MODULE_NAME}`: its symbol table cannot be read: {0}")]
    Symbols(String),
    #[error("module `{MODULE_NAME}` has no symbol `{0}` (not our module, or another version)")]
    Symbol(&'static str),
    #[error("xftrace buffer header: {0}")]
    Header(String),
    #[error("guest memory at {va:#x}: {source}")]
    Read {
        va: u64,
        source: vmi::paging::PagingError,
    },
    #[error("key variable at {va:#x}: {reason}")]
    Key { va: u64, reason: String },
    #[error("guest RAM file {path}: {reason}")]
    RamFile { path: String, reason: String },
    #[error("no random key: {0}")]
    Random(String),
}

/// The buffer header, as the guest wrote it (untrusted: every field is
/// bounded before use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub record_size: u32,
    pub capacity: u64,
    /// Reservations so far; may pass `capacity` (the excess were lost).
    pub write_index: u64,
    /// Records completely written.
    pub written: u64,
    /// Records dropped: buffer full.
    pub lost: u64,
    /// Syscalls not traced: no free per-task slot.
    pub busy: u64,
    /// Calls deeper than the module's depth limit, not recorded.
    pub deep: u64,
    /// The module's own `&xft_key`.
    pub key_addr: u64,
    /// (syscall number, handler address) per traced syscall.
    pub syscalls: Vec<(u16, u64)>,
    /// Records not written because the key was 0 (disarmed).
    pub disarmed: u64,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

impl Header {
    /// Parses the first [`HEADER_SIZE`] bytes of the buffer.
    pub fn parse(b: &[u8]) -> Result<Header, KmodError> {
        if b.len() < HEADER_SIZE as usize {
            return Err(KmodError::Header(format!("{} bytes", b.len())));
        }
        let magic = le64(b, 0);
        if magic != MAGIC {
            return Err(KmodError::Header(format!(
                "magic {magic:#018x}, not \"XFTRACE1\" (module not initialised, or overwritten)"
            )));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or([0; 4]));
        let record_size = u32::from_le_bytes(b[12..16].try_into().unwrap_or([0; 4]));
        if version != VERSION || u64::from(record_size) != RECORD_SIZE {
            return Err(KmodError::Header(format!(
                "version {version}, record size {record_size} (this vmwatch reads version {VERSION}, {RECORD_SIZE}-byte records)"
            )));
        }
        let count = (le64(b, 72) as usize).min(MAX_NRS);
        let syscalls = (0..count)
            .map(|i| {
                let nr = u16::from_le_bytes(b[80 + 2 * i..82 + 2 * i].try_into().unwrap_or([0; 2]));
                (nr, le64(b, 96 + 8 * i))
            })
            .collect();
        Ok(Header {
            version,
            record_size,
            capacity: le64(b, 16),
            write_index: le64(b, 24),
            written: le64(b, 32),
            lost: le64(b, 40),
            busy: le64(b, 48),
            deep: le64(b, 56),
            key_addr: le64(b, 64),
            syscalls,
            disarmed: le64(b, 160),
        })
    }
}

/// Where the recorder lives in the guest (kernel virtual addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The `struct module`.
    pub module: u64,
    pub key_va: u64,
    pub buffer_va: u64,
    /// The buffer symbol's size.
    pub buffer_size: u64,
    /// Records the host reads at most: the header's capacity bounded by the
    /// symbol's size and [`MAX_CAPACITY`], fixed when found.
    pub capacity: u64,
}

/// Reading guest memory and writing the key; [`guest::LiveAccess`] does it
/// on a running VM, tests on a buffer.
pub trait Access: Send + Sync {
    fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), KmodError>;
    /// Writes `key` into `xft_key` with one atomic 8-byte store.
    fn store_key(&self, key: u64) -> Result<(), KmodError>;
}

/// Reads and checks the buffer header.
pub fn read_header(a: &dyn Access, t: &Target) -> Result<Header, KmodError> {
    let mut b = [0u8; HEADER_SIZE as usize];
    a.read(t.buffer_va, &mut b)?;
    let h = Header::parse(&b)?;
    if h.key_addr != t.key_va {
        return Err(KmodError::Header(format!(
            "the header names {:#x} as the key, the module's symbol is {:#x}",
            h.key_addr, t.key_va
        )));
    }
    Ok(h)
}

/// A fresh random non-zero key (the kernel's `getrandom`).
pub fn random_key() -> Result<u64, KmodError> {
    loop {
        let mut b = [0u8; 8];
        // SAFETY: `b` is a valid, writable 8-byte buffer for the whole call;
        // getrandom writes at most `b.len()` bytes into it.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(KmodError::Random(e.to_string()));
        }
        if n as usize == b.len() {
            let k = u64::from_le_bytes(b);
            if k != 0 {
                return Ok(k);
            }
        }
    }
}

/// One key change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KlogEntry {
    /// Host time since the controller started.
    pub at: Duration,
    /// The buffer's write index read right after the key was written.
    pub write_index: u64,
    /// The key written (0: disarmed).
    pub key: u64,
}

/// The key history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Klog {
    pub entries: Vec<KlogEntry>,
    /// (before, after) whenever the write index went backwards between two
    /// key changes: someone reset it (the module never does).
    pub backwards: Vec<(u64, u64)>,
}

impl Klog {
    pub fn push(&mut self, e: KlogEntry) {
        if let Some(last) = self.entries.last() {
            if e.write_index < last.write_index {
                self.backwards.push((last.write_index, e.write_index));
            }
        }
        self.entries.push(e);
    }

    /// Non-zero keys written.
    pub fn keys(&self) -> usize {
        self.entries.iter().filter(|e| e.key != 0).count()
    }

    /// The Klog entries to try for record `index`, most likely first.
    fn candidates(&self, index: u64) -> impl Iterator<Item = usize> + '_ {
        let n = self.entries.len();
        let base = self
            .entries
            .partition_point(|e| e.write_index <= index)
            .saturating_sub(1);
        let forward = (base..n).take(FORWARD_KEYS + 1);
        let backward = (base.saturating_sub(BACKWARD_KEYS)..base).rev();
        forward
            .chain(backward)
            .filter(move |&j| self.entries[j].key != 0)
    }
}

/// The host's Key Controller: fresh keys into the guest at intervals.
pub struct KeyController<'a> {
    access: &'a dyn Access,
    target: Target,
    klog: Klog,
    start: Instant,
}

impl<'a> KeyController<'a> {
    /// Checks the buffer header and writes the first key (arming the
    /// recorder).
    pub fn start(access: &'a dyn Access, target: Target) -> Result<Self, KmodError> {
        let mut c = KeyController {
            access,
            target,
            klog: Klog::default(),
            start: Instant::now(),
        };
        c.rotate()?;
        Ok(c)
    }

    fn write_index(&self) -> Result<u64, KmodError> {
        let mut b = [0u8; 8];
        self.access
            .read(self.target.buffer_va + OFF_WRITE_INDEX, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn change(&mut self, key: u64) -> Result<KlogEntry, KmodError> {
        // The header must still be ours before we write into the guest:
        // after an rmmod the key's page may hold anything.
        read_header(self.access, &self.target)?;
        self.access.store_key(key)?;
        let e = KlogEntry {
            at: self.start.elapsed(),
            write_index: self.write_index()?,
            key,
        };
        self.klog.push(e);
        Ok(e)
    }

    /// Writes a fresh key, then logs it with the write index.
    pub fn rotate(&mut self) -> Result<KlogEntry, KmodError> {
        let key = random_key()?;
        self.change(key)
    }

    /// Rotates every `interval` for `total` (or until `stop`). Returns the
    /// number of key changes.
    pub fn run(
        &mut self,
        total: Duration,
        interval: Duration,
        stop: &AtomicBool,
    ) -> Result<usize, KmodError> {
        let end = Instant::now() + total;
        let mut n = 0;
        loop {
            let now = Instant::now();
            if now >= end || stop.load(Ordering::Relaxed) {
                return Ok(n);
            }
            std::thread::sleep(interval.min(end - now));
            if stop.load(Ordering::Relaxed) {
                return Ok(n);
            }
            self.rotate()?;
            n += 1;
        }
    }

    pub fn klog(&self) -> &Klog {
        &self.klog
    }

    /// Disarms the recorder (key 0) and returns the history. Records
    /// in flight finish with the key they read.
    pub fn stop(mut self) -> Result<Klog, KmodError> {
        self.change(0)?;
        Ok(self.klog)
    }
}

/// What the module writes for a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    /// The syscall's handler entered (depth 0).
    SysEnter,
    Call,
    Ret,
    /// The handler returned (depth 0).
    SysExit,
}

impl RawKind {
    pub fn to_raw(self) -> u8 {
        match self {
            RawKind::SysEnter => 1,
            RawKind::Call => 2,
            RawKind::Ret => 3,
            RawKind::SysExit => 4,
        }
    }

    pub fn from_raw(v: u8) -> Option<Self> {
        Some(match v {
            1 => RawKind::SysEnter,
            2 => RawKind::Call,
            3 => RawKind::Ret,
            4 => RawKind::SysExit,
            _ => return None,
        })
    }
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KRecord {
    /// Its slot in the buffer.
    pub index: u64,
    /// The Klog entry whose key decoded it.
    pub key_entry: usize,
    pub time_ns: u64,
    pub cpu: u16,
    pub kind: RawKind,
    /// Below the handler: the handler is 0, what it calls 1, ...
    pub depth: u16,
    pub nr: u16,
    pub func: u64,
    pub task: u64,
    pub pid: u32,
    pub tgid: u32,
    /// Entry records only.
    pub comm: [u8; 16],
}

/// The module's fold of a record's first seven words (in the clear):
/// non-linear, so a word changed without the key does not keep it.
pub fn digest(w: &[u64]) -> u64 {
    let mut h = 0u64;
    for &x in w.iter().take(7) {
        h ^= x;
        h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 32;
    }
    h
}

/// The check word (in the clear) of record `index` with words `w`.
fn check_word(index: u64, w: &[u64]) -> u64 {
    ((CHECK_TAG << 32) | (index & 0xffff_ffff)) ^ digest(w)
}

/// The eight words the module writes for `r` at `index` under `key`.
pub fn encode(r: &KRecord, index: u64, key: u64) -> [u64; 8] {
    let mut w = [
        r.time_ns,
        u64::from(r.cpu)
            | (u64::from(r.kind.to_raw()) << 16)
            | (u64::from(r.depth) << 32)
            | (u64::from(r.nr) << 48),
        r.func,
        r.task,
        u64::from(r.pid) | (u64::from(r.tgid) << 32),
        le64(&r.comm, 0),
        le64(&r.comm, 8),
        0,
    ];
    w[7] = check_word(index, &w);
    w.map(|x| x ^ key)
}

/// The record in decoded words; `None` when a field is out of range.
fn fields(index: u64, key_entry: usize, w: &[u64; 8]) -> Option<KRecord> {
    let kind = RawKind::from_raw((w[1] >> 16) as u8)?;
    let flags = (w[1] >> 24) as u8;
    let depth = (w[1] >> 32) as u16;
    let nr = (w[1] >> 48) as u16;
    let top = matches!(kind, RawKind::SysEnter | RawKind::SysExit);
    if flags != 0 || depth >= MAX_DEPTH || nr >= MAX_SYSCALLS || top != (depth == 0) {
        return None;
    }
    let mut comm = [0u8; 16];
    comm[..8].copy_from_slice(&w[5].to_le_bytes());
    comm[8..].copy_from_slice(&w[6].to_le_bytes());
    Some(KRecord {
        index,
        key_entry,
        time_ns: w[0],
        cpu: w[1] as u16,
        kind,
        depth,
        nr,
        func: w[2],
        task: w[3],
        pid: w[4] as u32,
        tgid: (w[4] >> 32) as u32,
        comm,
    })
}

/// The buffer as read from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBuffer {
    pub header: Header,
    /// Eight words per record, records `0..len/8`.
    pub words: Vec<u64>,
}

impl RawBuffer {
    pub fn records(&self) -> usize {
        self.words.len() / 8
    }
}

/// Bytes read from the guest per request.
const READ_CHUNK: usize = 1 << 20;

/// Reads the header and the records written so far (at most the capacity
/// fixed in `t`).
pub fn read_buffer(a: &dyn Access, t: &Target) -> Result<RawBuffer, KmodError> {
    let header = read_header(a, t)?;
    let n = header.write_index.min(t.capacity).min(MAX_CAPACITY);
    let len = (n * RECORD_SIZE) as usize;
    let mut bytes = vec![0u8; len];
    let mut done = 0usize;
    while done < len {
        let k = READ_CHUNK.min(len - done);
        a.read(
            t.buffer_va + HEADER_SIZE + done as u64,
            &mut bytes[done..done + k],
        )?;
        done += k;
    }
    let words = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    Ok(RawBuffer { header, words })
}

/// What decoding found, besides the records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodeStats {
    /// Record slots read.
    pub slots: u64,
    pub decoded: u64,
    /// Check word 0: never completed (in flight when read) or wiped.
    pub blank: u64,
    /// Before the first logged key and no logged key verifies them: an
    /// earlier session's.
    pub earlier: u64,
    /// No logged key verifies the check word: forged, altered or moved.
    pub bad: u64,
    /// Verified, but the fields are out of range.
    pub invalid: u64,
    /// Verified only by a key outside the race window.
    pub far: u64,
    /// Distinct keys that decoded records.
    pub keys_used: usize,
}

impl DecodeStats {
    /// Signs of tampering (or of a guest that is not our module).
    pub fn suspicious(&self) -> bool {
        self.bad > 0 || self.invalid > 0 || self.far > 0 || self.blank > 0
    }
}

/// The decoded records (buffer order) and the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoded {
    pub records: Vec<KRecord>,
    pub stats: DecodeStats,
}

/// Decodes `raw` with the keys of `klog`.
pub fn decode(raw: &RawBuffer, klog: &Klog) -> Decoded {
    let mut out = Decoded::default();
    let mut used = BTreeSet::new();
    let first = klog.entries.first().map_or(u64::MAX, |e| e.write_index);
    for (i, chunk) in raw.words.chunks_exact(8).enumerate() {
        let index = i as u64;
        out.stats.slots += 1;
        let w: [u64; 8] = chunk.try_into().unwrap_or([0; 8]);
        if w[7] == 0 {
            out.stats.blank += 1;
            continue;
        }
        let verifies = |j: &usize| {
            let key = klog.entries[*j].key;
            let clear = w.map(|x| x ^ key);
            clear[7] == check_word(index, &clear)
        };
        let (j, far) = match klog.candidates(index).find(verifies) {
            Some(j) => (j, false),
            None => match (0..klog.entries.len())
                .filter(|&j| klog.entries[j].key != 0)
                .find(verifies)
            {
                Some(j) => (j, true),
                None => {
                    if index < first {
                        out.stats.earlier += 1;
                    } else {
                        out.stats.bad += 1;
                    }
                    continue;
                }
            },
        };
        let key = klog.entries[j].key;
        match fields(index, j, &w.map(|x| x ^ key)) {
            Some(r) => {
                if far {
                    out.stats.far += 1;
                }
                used.insert(j);
                out.records.push(r);
            }
            None => out.stats.invalid += 1,
        }
    }
    out.stats.decoded = out.records.len() as u64;
    out.stats.keys_used = used.len();
    out
}

fn record(r: &KRecord, kind: Kind, depth: u16, target: u64) -> Record {
    Record {
        time_ns: r.time_ns,
        vcpu: r.cpu,
        kind,
        flags: 0,
        depth,
        nr: r.nr,
        pc: 0,
        target,
        sp: 0,
        task: r.task,
        pid: r.pid,
        tgid: r.tgid,
    }
}

/// The records in the TCG backend's terms: a handler entry becomes a
/// syscall entry plus the call of the handler, its return the handler's
/// ret plus the end of the syscall (result unknown).
pub fn to_records(recs: &[KRecord]) -> Vec<Record> {
    let mut out = Vec::with_capacity(recs.len() + recs.len() / 8);
    for r in recs {
        match r.kind {
            RawKind::SysEnter => {
                let mut e = Record::entry(r.cpu, r.nr, 0, r.task, r.pid, r.tgid, &r.comm);
                e.time_ns = r.time_ns;
                out.push(e);
                out.push(record(r, Kind::Call, 0, r.func));
            }
            RawKind::Call => out.push(record(r, Kind::Call, r.depth, r.func)),
            RawKind::Ret => out.push(record(r, Kind::Ret, r.depth, 0)),
            RawKind::SysExit => {
                out.push(record(r, Kind::Ret, 0, 0));
                out.push(record(r, Kind::Exit, 0, 0));
            }
        }
    }
    out
}

/// The call trees of the decoded records. The module sees no syscall
/// result: every flow's result is unknown.
pub fn to_trace(recs: &[KRecord]) -> Trace {
    let mut t = build(&to_records(recs));
    for f in &mut t.flows {
        f.result = None;
    }
    t
}

const TCG_LINE: &str =
    "# xftrace: kernel call flows recorded by vmwatch's TCG plugin, outside the guest\n";
const KMOD_LINE: &str = "# xftrace: kernel call flows recorded in the guest by the xftrace module (function-graph tracer), XOR-keyed, read from guest RAM by the host\n";

/// Writes `trace` as `trace_graph.txt` (the TCG backend's writer; its
/// recorder line names the module instead).
pub fn write_graph(
    trace: &Trace,
    names: &dyn Resolve,
    preamble: &Preamble,
    out: &mut dyn Write,
) -> io::Result<Written> {
    let mut text = Vec::new();
    let written = crate::fgraph::write(trace, names, preamble, &mut text)?;
    let text = String::from_utf8_lossy(&text).replacen(TCG_LINE, KMOD_LINE, 1);
    out.write_all(text.as_bytes())?;
    Ok(written)
}

/// Problems with the handlers the module traces: each must be kernel text
/// named `__x64_sys_*` (the module took them from `sys_call_table` at
/// load; a hooked table gives it something else).
pub fn check_handlers(h: &Header, names: &dyn Resolve) -> Vec<String> {
    let mut out = Vec::new();
    for &(nr, addr) in &h.syscalls {
        let place = names.resolve(addr);
        let ok =
            matches!(&place, Place::Kernel { name, offset: 0 } if name.starts_with("__x64_sys_"));
        if !ok {
            out.push(format!(
                "syscall {nr}: the module traces {} ({addr:#x}), not a kernel __x64_sys_* handler",
                place.label(addr)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const BUF: u64 = 0xffff_ffff_c010_0000;
    const KEY: u64 = 0xffff_ffff_c000_0000;

    /// A guest in a vector: the module's buffer and key, written by a
    /// simulated recorder exactly as xft_put does.
    struct Sim {
        buf: Mutex<Vec<u8>>,
        key: Mutex<u64>,
        capacity: u64,
    }

    impl Sim {
        fn new(capacity: u64) -> Self {
            let mut b = vec![0u8; (HEADER_SIZE + capacity * RECORD_SIZE) as usize];
            b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            b[8..12].copy_from_slice(&VERSION.to_le_bytes());
            b[12..16].copy_from_slice(&(RECORD_SIZE as u32).to_le_bytes());
            b[16..24].copy_from_slice(&capacity.to_le_bytes());
            b[64..72].copy_from_slice(&KEY.to_le_bytes());
            b[72..80].copy_from_slice(&1u64.to_le_bytes());
            b[80..82].copy_from_slice(&257u16.to_le_bytes());
            b[96..104].copy_from_slice(&0xffff_ffff_8100_2000u64.to_le_bytes());
            Sim {
                buf: Mutex::new(b),
                key: Mutex::new(0),
                capacity,
            }
        }

        fn target(&self) -> Target {
            Target {
                module: 0,
                key_va: KEY,
                buffer_va: BUF,
                buffer_size: HEADER_SIZE + self.capacity * RECORD_SIZE,
                capacity: self.capacity,
            }
        }

        fn word(&self, at: usize) -> u64 {
            le64(&self.buf.lock().unwrap(), at)
        }

        fn set_word(&self, at: usize, v: u64) {
            self.buf.lock().unwrap()[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }

        /// Reserves a slot (returns it), as the module does before reading the key.
        fn reserve(&self) -> u64 {
            let i = self.word(24);
            self.set_word(24, i + 1);
            i
        }

        /// Writes record `r` into slot `i` with the key current now.
        fn fill(&self, i: u64, r: &KRecord) {
            let key = *self.key.lock().unwrap();
            self.fill_with(i, r, key);
        }

        fn fill_with(&self, i: u64, r: &KRecord, key: u64) {
            let w = encode(r, i, key);
            for (k, x) in w.iter().enumerate() {
                self.set_word((HEADER_SIZE + i * RECORD_SIZE) as usize + 8 * k, *x);
            }
        }

        fn put(&self, r: &KRecord) {
            let i = self.reserve();
            self.fill(i, r);
        }
    }

    impl Access for Sim {
        fn read(&self, va: u64, buf: &mut [u8]) -> Result<(), KmodError> {
            let b = self.buf.lock().unwrap();
            let at = (va - BUF) as usize;
            buf.copy_from_slice(&b[at..at + buf.len()]);
            Ok(())
        }

        fn store_key(&self, key: u64) -> Result<(), KmodError> {
            *self.key.lock().unwrap() = key;
            Ok(())
        }
    }

    fn rec(kind: RawKind, depth: u16, func: u64) -> KRecord {
        KRecord {
            index: 0,
            key_entry: 0,
            time_ns: 1000 + u64::from(depth),
            cpu: 1,
            kind,
            depth,
            nr: 257,
            func,
            task: 0xffff_8880_0100_0000,
            pid: 42,
            tgid: 42,
            comm: *b"cat\0\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    /// An openat flow: handler > do_sys_openat2 > getname.
    fn flow(sim: &Sim) {
        sim.put(&rec(RawKind::SysEnter, 0, 0x2000));
        sim.put(&rec(RawKind::Call, 1, 0x3000));
        sim.put(&rec(RawKind::Call, 2, 0x4000));
        sim.put(&rec(RawKind::Ret, 2, 0x4000));
        sim.put(&rec(RawKind::Ret, 1, 0x3000));
        sim.put(&rec(RawKind::SysExit, 0, 0x2000));
    }

    #[test]
    fn header_parse_checks_magic_version_and_bounds_counts() {
        let sim = Sim::new(16);
        let h = read_header(&sim, &sim.target()).unwrap();
        assert_eq!(h.syscalls, vec![(257, 0xffff_ffff_8100_2000)]);
        assert_eq!(h.capacity, 16);
        sim.set_word(72, u64::MAX);
        assert_eq!(
            read_header(&sim, &sim.target()).unwrap().syscalls.len(),
            MAX_NRS
        );
        sim.set_word(0, 0);
        assert!(matches!(
            read_header(&sim, &sim.target()),
            Err(KmodError::Header(_))
        ));
        let sim = Sim::new(16);
        sim.set_word(64, 1);
        assert!(
            read_header(&sim, &sim.target()).is_err(),
            "key address mismatch"
        );
    }

    #[test]
    fn keys_rotate_and_decode_each_record_with_its_key() {
        let sim = Sim::new(64);
        let mut c = KeyController::start(&sim, sim.target()).unwrap();
        flow(&sim);
        c.rotate().unwrap();
        flow(&sim);
        let klog = c.stop().unwrap();
        // Disarmed: the module writes nothing (the simulation obeys too).
        assert_eq!(*sim.key.lock().unwrap(), 0);
        assert_eq!(klog.entries.len(), 3);
        assert_eq!(klog.keys(), 2);
        assert_eq!(
            klog.entries
                .iter()
                .map(|e| e.write_index)
                .collect::<Vec<_>>(),
            vec![0, 6, 12]
        );
        let raw = read_buffer(&sim, &sim.target()).unwrap();
        assert_eq!(raw.records(), 12);
        // XOR hides the addresses.
        assert!(!raw.words.contains(&0x3000));
        let d = decode(&raw, &klog);
        assert_eq!(d.stats.decoded, 12);
        assert!(!d.stats.suspicious(), "{:?}", d.stats);
        assert_eq!(d.stats.keys_used, 2);
        assert_eq!(d.records[0].key_entry, 0);
        assert_eq!(d.records[6].key_entry, 1);
        assert_eq!(d.records[1].func, 0x3000);
        let t = to_trace(&d.records);
        assert_eq!(t.flows.len(), 2);
        let f = &t.flows[0];
        assert_eq!(
            (f.nr, f.comm.as_str(), f.complete(), f.result),
            (257, "cat", true, None)
        );
        assert_eq!(f.calls[0].target, 0x2000);
        assert_eq!(f.calls[0].children[0].target, 0x3000);
        assert_eq!(f.calls[0].children[0].children[0].target, 0x4000);
        assert_eq!(f.calls[0].children[0].children[0].duration_ns, Some(0));
    }

    #[test]
    fn the_race_at_a_key_change_is_resolved_by_the_check_word() {
        let sim = Sim::new(64);
        let mut c = KeyController::start(&sim, sim.target()).unwrap();
        // A record reserved before the change, keyed after it (index below
        // the logged write index, new key).
        let early = sim.reserve();
        c.rotate().unwrap();
        sim.fill(early, &rec(RawKind::SysEnter, 0, 0x2000));
        // A vCPU that stalled over two more changes between reserving and
        // reading the key.
        let stalled = sim.reserve();
        c.rotate().unwrap();
        c.rotate().unwrap();
        sim.fill(stalled, &rec(RawKind::Call, 1, 0x3000));
        sim.put(&rec(RawKind::SysExit, 0, 0x2000));
        // The disarm fallback: reserved under the last key, the key read
        // after the host wrote 0, so the module used the key it read first.
        let last = *sim.key.lock().unwrap();
        let i = sim.reserve();
        let klog = c.stop().unwrap();
        sim.fill_with(i, &rec(RawKind::Call, 1, 0x5000), last);
        let raw = read_buffer(&sim, &sim.target()).unwrap();
        let d = decode(&raw, &klog);
        assert_eq!(d.stats.decoded, 4, "{:?}", d.stats);
        assert!(!d.stats.suspicious(), "{:?}", d.stats);
        assert_eq!(
            d.records.iter().map(|r| r.key_entry).collect::<Vec<_>>(),
            vec![1, 3, 3, 3]
        );
    }

    #[test]
    fn tampering_shows_in_the_counters() {
        let sim = Sim::new(64);
        let mut c = KeyController::start(&sim, sim.target()).unwrap();
        flow(&sim);
        let old = *sim.key.lock().unwrap();
        for _ in 0..(FORWARD_KEYS + 2) {
            c.rotate().unwrap();
        }
        flow(&sim);
        let rec_at = |i: u64| (HEADER_SIZE + i * RECORD_SIZE) as usize;
        // A bit flipped in a record's check word (or a record moved to
        // another slot): no key verifies it.
        sim.set_word(rec_at(1) + 56, sim.word(rec_at(1) + 56) ^ 1);
        // A function address changed without the key.
        sim.set_word(rec_at(4) + 16, sim.word(rec_at(4) + 16) ^ 0x40);
        // A record wiped.
        for k in 0..8 {
            sim.set_word(rec_at(2) + 8 * k, 0);
        }
        // A forged plaintext record (key 0).
        sim.fill_with(3, &rec(RawKind::Call, 1, 0xdead), 0);
        // A record rewritten with an old key the rootkit recovered: it
        // verifies, but only outside the window.
        sim.fill_with(8, &rec(RawKind::Call, 1, 0xbad), old);
        // Fields out of range under the right key.
        let w = rec(RawKind::Call, 0, 0x1);
        let key = *sim.key.lock().unwrap();
        sim.fill_with(9, &w, key);
        let klog = c.stop().unwrap();
        let d = decode(&read_buffer(&sim, &sim.target()).unwrap(), &klog);
        assert_eq!(
            (d.stats.bad, d.stats.blank, d.stats.far, d.stats.invalid),
            (3, 1, 1, 1),
            "{:?}",
            d.stats
        );
        assert!(d.stats.suspicious());
        assert_eq!(d.stats.decoded, 7);
        // The write index reset by a rootkit shows in Klog.
        let mut c = KeyController::start(&sim, sim.target()).unwrap();
        sim.set_word(24, 2);
        c.rotate().unwrap();
        assert_eq!(c.stop().unwrap().backwards, vec![(12, 2)]);
    }

    #[test]
    fn records_before_the_first_key_are_an_earlier_session() {
        let sim = Sim::new(64);
        *sim.key.lock().unwrap() = 0x1234;
        flow(&sim);
        let c = KeyController::start(&sim, sim.target()).unwrap();
        flow(&sim);
        let klog = c.stop().unwrap();
        let d = decode(&read_buffer(&sim, &sim.target()).unwrap(), &klog);
        assert_eq!((d.stats.earlier, d.stats.decoded, d.stats.bad), (6, 6, 0));
        assert!(!d.stats.suspicious());
    }

    #[test]
    fn reads_are_bounded_by_the_capacity_found_at_locate() {
        let sim = Sim::new(8);
        let c = KeyController::start(&sim, sim.target()).unwrap();
        flow(&sim);
        // The guest claims a huge write index and capacity.
        sim.set_word(24, u64::MAX);
        sim.set_word(16, u64::MAX);
        let raw = read_buffer(&sim, &sim.target()).unwrap();
        assert_eq!(raw.records(), 8);
        let klog = c.stop().unwrap();
        assert_eq!(decode(&raw, &klog).stats.decoded, 6);
    }

    #[test]
    fn handlers_outside_kernel_text_are_reported() {
        struct Names;
        impl Resolve for Names {
            fn resolve(&self, addr: u64) -> Place {
                match addr {
                    0x2000 => Place::Kernel {
                        name: "__x64_sys_openat".into(),
                        offset: 0,
                    },
                    _ => Place::Outside,
                }
            }
        }
        let mut h = Header::parse(&Sim::new(1).buf.lock().unwrap()).unwrap();
        h.syscalls = vec![(257, 0x2000)];
        assert!(check_handlers(&h, &Names).is_empty());
        h.syscalls.push((0, 0xffff_ffff_c0b3_7000));
        let w = check_handlers(&h, &Names);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("0xffffffffc0b37000"), "{w:?}");
    }

    #[test]
    fn graph_text_names_the_module_recorder() {
        let sim = Sim::new(16);
        let c = KeyController::start(&sim, sim.target()).unwrap();
        flow(&sim);
        let klog = c.stop().unwrap();
        let d = decode(&read_buffer(&sim, &sim.target()).unwrap(), &klog);
        let mut out = Vec::new();
        struct N;
        impl Resolve for N {
            fn resolve(&self, addr: u64) -> Place {
                Place::Kernel {
                    name: format!("f{addr:x}"),
                    offset: 0,
                }
            }
        }
        let w = write_graph(&to_trace(&d.records), &N, &Preamble::default(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(KMOD_LINE), "{text}");
        assert!(!text.contains("TCG plugin"));
        assert!(text.contains("|  f2000() {"), "{text}");
        assert!(text.contains("result=?"));
        assert_eq!((w.flows, w.complete, w.calls), (1, 1, 3));
    }
}
