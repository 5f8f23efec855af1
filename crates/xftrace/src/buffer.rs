//! The xftrace file: one per VM (`STATE_DIR/xftrace.buf`), created by the
//! hook plugin inside QEMU and mapped shared by it and by the host tool. It
//! is both the control area (which syscalls to trace, on/off) and the record
//! buffer. Nothing of it lives in guest memory: the guest cannot see, stop
//! or forge it.
//!
//! Layout (little-endian, fixed by `FORMAT_VERSION`):
//!
//! ```text
//! 0      header (4096 bytes)
//!        0   magic "VMWXFTR\0"   8 format version (u32)   12 record size (u32)
//!        16  capacity (records)   24 header size   32 writer pid
//!        -- control, written by the host --
//!        64  generation: bumped (release) after every change below
//!        72  enabled (0/1)
//!        80  session: bumped by every `on`; stamps the records of that session
//!        96  syscall bitmap (8 x u64, bit nr = trace syscall nr)
//!        -- state, written by the plugin --
//!        192 applied generation: the last generation the plugin acted on
//!        200 applied session
//!        208 plugin state (0 off, 1 recording, 2 refused: kernel not known)
//!        216 KASLR virtual slide the plugin used (0 until known)
//!        256 write index: next record to reserve (own cache line)
//!        320 lost: records not written because the buffer was full
//!        328 deep: calls not recorded, deeper than MAX_DEPTH
//!        336 evicted: traced syscalls dropped because more than the
//!            plugin's task table were in flight
//!        344 unread: indirect call targets that could not be read
//!        352 entries: selected syscalls entered, 360 exits seen
//! 4096   capacity x 64-byte records
//! ```
//!
//! Protocol:
//! - The host changes the control fields, then bumps the generation
//!   ([`Controller::turn_on`], [`Controller::turn_off`]).
//! - The plugin notices the new generation at the guest's next syscall,
//!   makes QEMU retranslate (call/ret instrumentation exists only while on),
//!   and with every vCPU stopped reads the control fields and publishes the
//!   applied generation ([`Writer::apply`]). A new session restarts the
//!   write index at 0 and clears the counters.
//! - A producer reserves a record with one `fetch_add` on the write index
//!   (past the capacity: counted in `lost`, never blocks, never wraps),
//!   fills words 1..8 and publishes with the stamp in word 0 (release):
//!   `session << 32 | (index + 1)`. The reader takes only records whose
//!   stamp matches their index and the session it reads, so records of an
//!   older session, or half-written ones, are never mistaken for data.
//!
//! The host never trusts the file: sizes are checked against the file
//! length at open, the read is bounded by the capacity, and every record is
//! decoded with checks ([`crate::record::Record::decode`]).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapRaw;

use crate::record::{Record, RecordError, MAX_SYSCALLS};

/// First 8 bytes of every xftrace file.
pub const MAGIC: [u8; 8] = *b"VMWXFTR\0";
/// Bumped on any layout or protocol change.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first record.
pub const HEADER_SIZE: usize = 4096;
/// Bytes per record.
pub const RECORD_SIZE: usize = 64;
/// Smallest and largest accepted capacities (records).
pub const MIN_RECORDS: u64 = 16;
pub const MAX_RECORDS: u64 = 1 << 24;
/// Capacity when the plugin is not told otherwise: 64 MiB, about a million
/// calls (a `cat` of a small file is a few thousand).
pub const DEFAULT_RECORDS: u64 = 1 << 20;
/// The file's name in the VM's state directory.
pub const FILE_NAME: &str = "xftrace.buf";

const WORDS: usize = RECORD_SIZE / 8;

/// What the plugin did with the last control change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginState {
    Off,
    Recording,
    /// Asked to record but it cannot: it does not know the guest kernel
    /// (no `vmlinux=`, or the kernel was not found in RAM yet).
    Refused,
}

impl PluginState {
    fn to_raw(self) -> u64 {
        match self {
            PluginState::Off => 0,
            PluginState::Recording => 1,
            PluginState::Refused => 2,
        }
    }

    fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            0 => PluginState::Off,
            1 => PluginState::Recording,
            2 => PluginState::Refused,
            _ => return None,
        })
    }
}

#[repr(C)]
struct Header {
    magic: [u8; 8],
    version: u32,
    record_size: u32,
    capacity: u64,
    header_size: u64,
    writer_pid: u64,
    _pad0: [u8; 24],
    generation: AtomicU64,
    enabled: AtomicU64,
    session: AtomicU64,
    _pad1: u64,
    syscalls: [AtomicU64; 8],
    _pad2: [u8; 32],
    applied_generation: AtomicU64,
    applied_session: AtomicU64,
    state: AtomicU64,
    slide: AtomicU64,
    _pad3: [u8; 32],
    write: AtomicU64,
    _pad4: [u8; 56],
    lost: AtomicU64,
    deep: AtomicU64,
    evicted: AtomicU64,
    unread: AtomicU64,
    entries: AtomicU64,
    exits: AtomicU64,
}

const _: () = {
    assert!(std::mem::offset_of!(Header, generation) == 64);
    assert!(std::mem::offset_of!(Header, enabled) == 72);
    assert!(std::mem::offset_of!(Header, session) == 80);
    assert!(std::mem::offset_of!(Header, syscalls) == 96);
    assert!(std::mem::offset_of!(Header, applied_generation) == 192);
    assert!(std::mem::offset_of!(Header, state) == 208);
    assert!(std::mem::offset_of!(Header, slide) == 216);
    assert!(std::mem::offset_of!(Header, write) == 256);
    assert!(std::mem::offset_of!(Header, lost) == 320);
    assert!(std::mem::offset_of!(Header, exits) == 360);
    assert!(std::mem::size_of::<Header>() <= HEADER_SIZE);
};

/// One record slot.
#[repr(C)]
struct Slot {
    words: [AtomicU64; WORDS],
}

const _: () = assert!(std::mem::size_of::<Slot>() == RECORD_SIZE);

/// Why the xftrace file cannot be created or opened. One line each.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("xftrace file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an xftrace file (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("xftrace file {path} has format version {found}, this build reads version {expected}: rebuild the plugin and vmwatch together")]
    BadVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("xftrace file {path} is malformed: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("xftrace capacity {0} must be between {MIN_RECORDS} and {MAX_RECORDS} records")]
    Capacity(u64),
}

/// The mapped file, shared by [`Writer`] and [`Controller`].
struct Mapping {
    map: MmapRaw,
    capacity: u64,
    _file: File,
}

// SAFETY: the mapping is only accessed through atomics (control, counters,
// record words) or through fields immutable after creation, so sharing it
// between threads cannot race in the Rust sense.
unsafe impl Sync for Mapping {}
// SAFETY: as above; the raw pointer inside MmapRaw is valid from any thread.
unsafe impl Send for Mapping {}

impl Mapping {
    fn header(&self) -> &Header {
        // SAFETY: the map is at least HEADER_SIZE bytes (checked at
        // create/open), page aligned, and every Header field is an integer,
        // byte array or atomic, valid for any bit pattern. The reference
        // lives no longer than `self.map`.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn slot(&self, index: u64) -> Option<&Slot> {
        if index >= self.capacity {
            return None;
        }
        // SAFETY: the map is HEADER_SIZE + capacity * RECORD_SIZE bytes
        // (checked), index < capacity, the offset is 8-byte aligned, and a
        // Slot is 8 atomics, valid for any bit pattern.
        Some(unsafe {
            &*(self
                .map
                .as_ptr()
                .add(HEADER_SIZE + index as usize * RECORD_SIZE) as *const Slot)
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BufferError + '_ {
    move |source| BufferError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn stamp(session: u64, index: u64) -> u64 {
    (session << 32) | ((index + 1) & 0xffff_ffff)
}

/// The control fields as the host last set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlState {
    pub generation: u64,
    pub enabled: bool,
    pub session: u64,
    pub syscalls: [u64; 8],
}

impl ControlState {
    /// Whether syscall `nr` is selected.
    pub fn traces(&self, nr: u64) -> bool {
        nr < u64::from(MAX_SYSCALLS) && self.syscalls[(nr / 64) as usize] & (1 << (nr % 64)) != 0
    }
}

/// The plugin's side. Cheap to share between vCPU threads.
pub struct Writer {
    m: Mapping,
}

impl Writer {
    /// Creates (or replaces) the file at `path` with room for `capacity`
    /// records, tracing off. It appears at `path` only once initialised.
    pub fn create(path: &Path, capacity: u64) -> Result<Writer, BufferError> {
        if !(MIN_RECORDS..=MAX_RECORDS).contains(&capacity) {
            return Err(BufferError::Capacity(capacity));
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
        let p = map.as_mut_ptr();
        // SAFETY: the file was just created by us at a private name, nobody
        // else maps it yet; the writes stay inside the header.
        unsafe {
            std::ptr::copy_nonoverlapping(MAGIC.as_ptr(), p, 8);
            (p.add(8) as *mut u32).write(FORMAT_VERSION.to_le());
            (p.add(12) as *mut u32).write((RECORD_SIZE as u32).to_le());
            (p.add(16) as *mut u64).write(capacity.to_le());
            (p.add(24) as *mut u64).write((HEADER_SIZE as u64).to_le());
            (p.add(32) as *mut u64).write(u64::from(std::process::id()).to_le());
        }
        std::sync::atomic::fence(Ordering::Release);
        std::fs::rename(&tmp, path).map_err(io(path))?;
        Ok(Writer {
            m: Mapping {
                map,
                capacity,
                _file: file,
            },
        })
    }

    /// The control generation now: one load, on every guest syscall.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.m.header().generation.load(Ordering::Acquire)
    }

    /// The control fields (generation read first, acquire).
    pub fn control(&self) -> ControlState {
        let h = self.m.header();
        let generation = h.generation.load(Ordering::Acquire);
        let mut syscalls = [0u64; 8];
        for (dst, src) in syscalls.iter_mut().zip(&h.syscalls) {
            *dst = src.load(Ordering::Relaxed);
        }
        ControlState {
            generation,
            enabled: h.enabled.load(Ordering::Relaxed) != 0,
            session: h.session.load(Ordering::Relaxed),
            syscalls,
        }
    }

    /// Publishes what the plugin made of `c`. A session other than the one
    /// applied before restarts the write index and the counters.
    ///
    /// Must not run concurrently with [`Writer::push`]: the plugin calls it
    /// with every vCPU stopped (QEMU's exclusive context).
    pub fn apply(&self, c: &ControlState, state: PluginState, slide: u64) {
        let h = self.m.header();
        if h.applied_session.load(Ordering::Relaxed) != c.session {
            for counter in [
                &h.write, &h.lost, &h.deep, &h.evicted, &h.unread, &h.entries, &h.exits,
            ] {
                counter.store(0, Ordering::Relaxed);
            }
            h.applied_session.store(c.session, Ordering::Relaxed);
        }
        h.state.store(state.to_raw(), Ordering::Relaxed);
        h.slide.store(slide, Ordering::Relaxed);
        h.applied_generation.store(c.generation, Ordering::Release);
    }

    /// Writes `rec` as the next record; false (counted in `lost`) when the
    /// buffer is full. Never blocks.
    #[inline]
    pub fn push(&self, rec: &Record) -> bool {
        let h = self.m.header();
        let index = h.write.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = self.m.slot(index) else {
            h.lost.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let session = h.applied_session.load(Ordering::Relaxed);
        for (dst, src) in slot.words[1..].iter().zip(rec.encode()) {
            dst.store(src, Ordering::Relaxed);
        }
        slot.words[0].store(stamp(session, index), Ordering::Release);
        true
    }

    /// Whether the buffer has no room left (the plugin stops recording
    /// calls early then; the loss is counted).
    #[inline]
    pub fn is_full(&self) -> bool {
        self.m.header().write.load(Ordering::Relaxed) >= self.m.capacity
    }

    pub fn count_lost(&self) {
        self.m.header().lost.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_deep(&self) {
        self.m.header().deep.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_evicted(&self) {
        self.m.header().evicted.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_unread(&self) {
        self.m.header().unread.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_entry(&self) {
        self.m.header().entries.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_exit(&self) {
        self.m.header().exits.fetch_add(1, Ordering::Relaxed);
    }
}

/// A change the host made: wait for the plugin to apply `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub generation: u64,
    pub session: u64,
}

/// Everything the header says, for `vmwatch xftrace status` and summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub control: ControlState,
    pub applied_generation: u64,
    pub applied_session: u64,
    /// `None` when the plugin wrote a value this build does not know.
    pub state: Option<PluginState>,
    pub slide: u64,
    pub capacity: u64,
    /// Records reserved (may exceed the capacity: the rest were lost).
    pub written: u64,
    pub lost: u64,
    pub deep: u64,
    pub evicted: u64,
    pub unread: u64,
    pub entries: u64,
    pub exits: u64,
    pub writer_pid: u64,
}

impl Status {
    /// The syscall numbers selected.
    pub fn syscalls(&self) -> Vec<u64> {
        (0..u64::from(MAX_SYSCALLS))
            .filter(|&nr| self.control.traces(nr))
            .collect()
    }
}

/// The records of one session, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub session: u64,
    pub records: Vec<Record>,
    /// Slots in range that were not published for this session (being
    /// written, or left from an older session) or did not decode.
    pub skipped: u64,
    /// The first decoding error met, for diagnostics.
    pub first_error: Option<RecordError>,
}

/// The host's side: turns tracing on and off and reads the records.
pub struct Controller {
    m: Mapping,
    path: PathBuf,
}

impl Controller {
    /// Maps the file at `path`, checking magic, version and sizes.
    pub fn open(path: &Path) -> Result<Controller, BufferError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        let malformed = |what: String| BufferError::Malformed {
            path: path.to_path_buf(),
            what,
        };
        if len < HEADER_SIZE as u64 {
            let mut head = [0u8; 8];
            let n = std::io::Read::read(&mut (&file), &mut head).map_err(io(path))?;
            if n < 8 || head != MAGIC {
                return Err(BufferError::BadMagic {
                    path: path.to_path_buf(),
                });
            }
            return Err(malformed(format!("{len} bytes, shorter than its header")));
        }
        let map = MmapRaw::map_raw(&file).map_err(io(path))?;
        let mut m = Mapping {
            map,
            capacity: 0,
            _file: file,
        };
        let h = m.header();
        if h.magic != MAGIC {
            return Err(BufferError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        let version = u32::from_le(h.version);
        if version != FORMAT_VERSION {
            return Err(BufferError::BadVersion {
                path: path.to_path_buf(),
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        if u32::from_le(h.record_size) as usize != RECORD_SIZE
            || u64::from_le(h.header_size) != HEADER_SIZE as u64
        {
            return Err(malformed(format!(
                "record size {} / header size {}, expected {RECORD_SIZE} / {HEADER_SIZE}",
                u32::from_le(h.record_size),
                u64::from_le(h.header_size)
            )));
        }
        let capacity = u64::from_le(h.capacity);
        if !(MIN_RECORDS..=MAX_RECORDS).contains(&capacity) {
            return Err(malformed(format!(
                "capacity {capacity} outside {MIN_RECORDS}..={MAX_RECORDS}"
            )));
        }
        let need = HEADER_SIZE as u64 + capacity * RECORD_SIZE as u64;
        if len < need || (m.map.len() as u64) < need {
            return Err(malformed(format!(
                "{len} bytes, capacity {capacity} needs {need}"
            )));
        }
        m.capacity = capacity;
        Ok(Controller {
            m,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a new session tracing the syscalls in `syscalls` (bit nr).
    pub fn turn_on(&self, syscalls: &[u64; 8]) -> Change {
        let h = self.m.header();
        let session = (h.session.fetch_add(1, Ordering::Relaxed) + 1) & 0xffff_ffff;
        h.session.store(session, Ordering::Relaxed);
        for (dst, &src) in h.syscalls.iter().zip(syscalls) {
            dst.store(src, Ordering::Relaxed);
        }
        h.enabled.store(1, Ordering::Relaxed);
        let generation = h.generation.fetch_add(1, Ordering::Release) + 1;
        Change {
            generation,
            session,
        }
    }

    /// Stops tracing; the records of the session stay readable.
    pub fn turn_off(&self) -> Change {
        let h = self.m.header();
        h.enabled.store(0, Ordering::Relaxed);
        let generation = h.generation.fetch_add(1, Ordering::Release) + 1;
        Change {
            generation,
            session: h.session.load(Ordering::Relaxed),
        }
    }

    /// Whether the plugin has acted on `generation` (or a later one).
    pub fn applied(&self, generation: u64) -> bool {
        self.m
            .header()
            .applied_generation
            .load(Ordering::Acquire)
            .wrapping_sub(generation)
            < u64::MAX / 2
    }

    /// Waits until the plugin applied `change` or `timeout` passed. The
    /// plugin applies a change at the guest's next syscall, so an idle guest
    /// may take long.
    pub fn wait_applied(&self, change: Change, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.applied(change.generation) {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn status(&self) -> Status {
        let h = self.m.header();
        let mut syscalls = [0u64; 8];
        for (dst, src) in syscalls.iter_mut().zip(&h.syscalls) {
            *dst = src.load(Ordering::Relaxed);
        }
        let l = |a: &AtomicU64| a.load(Ordering::Acquire);
        Status {
            control: ControlState {
                generation: l(&h.generation),
                enabled: l(&h.enabled) != 0,
                session: l(&h.session),
                syscalls,
            },
            applied_generation: l(&h.applied_generation),
            applied_session: l(&h.applied_session),
            state: PluginState::from_raw(l(&h.state)),
            slide: l(&h.slide),
            capacity: self.m.capacity,
            written: l(&h.write),
            lost: l(&h.lost),
            deep: l(&h.deep),
            evicted: l(&h.evicted),
            unread: l(&h.unread),
            entries: l(&h.entries),
            exits: l(&h.exits),
            writer_pid: u64::from_le(h.writer_pid),
        }
    }

    /// The records of the session the plugin applied last, in the order
    /// they were reserved. At most the capacity; slots of other sessions or
    /// not yet published are skipped and counted.
    pub fn snapshot(&self) -> Snapshot {
        let h = self.m.header();
        let session = h.applied_session.load(Ordering::Acquire);
        let end = h.write.load(Ordering::Acquire).min(self.m.capacity);
        let mut snap = Snapshot {
            session,
            records: Vec::with_capacity(end as usize),
            ..Snapshot::default()
        };
        for index in 0..end {
            let Some(slot) = self.m.slot(index) else {
                break;
            };
            if slot.words[0].load(Ordering::Acquire) != stamp(session, index) {
                snap.skipped += 1;
                continue;
            }
            let mut w = [0u64; 7];
            for (dst, src) in w.iter_mut().zip(&slot.words[1..]) {
                *dst = src.load(Ordering::Relaxed);
            }
            match Record::decode(&w) {
                Ok(r) => snap.records.push(r),
                Err(e) => {
                    snap.skipped += 1;
                    snap.first_error.get_or_insert(e);
                }
            }
        }
        snap
    }
}

/// Decodes records from raw slot bytes (as the file holds them) for
/// `session`: the parser the fuzz test drives. Bounded by `bytes.len()`.
pub fn parse_slots(bytes: &[u8], session: u64) -> Snapshot {
    let mut snap = Snapshot {
        session,
        ..Snapshot::default()
    };
    for (index, chunk) in bytes.chunks_exact(RECORD_SIZE).enumerate() {
        let word =
            |i: usize| u64::from_le_bytes(chunk[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        if word(0) != stamp(session, index as u64) {
            snap.skipped += 1;
            continue;
        }
        let w: [u64; 7] = std::array::from_fn(|i| word(i + 1));
        match Record::decode(&w) {
            Ok(r) => snap.records.push(r),
            Err(e) => {
                snap.skipped += 1;
                snap.first_error.get_or_insert(e);
            }
        }
    }
    snap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Kind;

    fn tmp(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xftrace-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(tag)
    }

    fn call(depth: u16, target: u64) -> Record {
        Record {
            time_ns: 10,
            vcpu: 0,
            kind: Kind::Call,
            flags: 0,
            depth,
            nr: 257,
            pc: 1,
            target,
            sp: 2,
            task: 3,
            pid: 4,
            tgid: 4,
        }
    }

    #[test]
    fn control_sessions_and_records() {
        let p = tmp("ctl");
        let w = Writer::create(&p, 16).unwrap();
        let c = Controller::open(&p).unwrap();
        assert!(!w.control().enabled);
        let mut bits = [0u64; 8];
        bits[257 / 64] |= 1 << (257 % 64);
        let on = c.turn_on(&bits);
        assert_eq!(on.session, 1);
        assert!(!c.applied(on.generation));
        let ctl = w.control();
        assert!(ctl.enabled && ctl.traces(257) && !ctl.traces(0) && !ctl.traces(9999));
        assert_eq!(ctl.generation, w.generation());
        w.apply(&ctl, PluginState::Recording, 0x1000);
        assert!(c.wait_applied(on, Duration::from_millis(1)));
        for i in 0..20 {
            let pushed = w.push(&call(0, i));
            assert_eq!(pushed, i < 16, "record {i}");
        }
        let st = c.status();
        assert_eq!((st.written, st.lost, st.slide), (20, 4, 0x1000));
        assert_eq!(st.state, Some(PluginState::Recording));
        assert_eq!(st.syscalls(), vec![257]);
        let snap = c.snapshot();
        assert_eq!(snap.records.len(), 16);
        assert_eq!(snap.records[3].target, 3);
        // Off keeps the records; a new session starts over and hides the
        // old session's slots.
        let off = c.turn_off();
        w.apply(&w.control(), PluginState::Off, 0x1000);
        assert!(c.applied(off.generation));
        assert_eq!(c.snapshot().records.len(), 16);
        let on2 = c.turn_on(&bits);
        w.apply(&w.control(), PluginState::Recording, 0x1000);
        assert_eq!(on2.session, 2);
        assert_eq!(c.snapshot().records.len(), 0);
        assert_eq!(c.status().lost, 0);
        assert!(w.push(&call(1, 99)));
        let snap = c.snapshot();
        assert_eq!(snap.records.len(), 1);
        assert_eq!(snap.records[0].target, 99);
    }

    #[test]
    fn open_rejects_bad_files_with_one_line() {
        let p = tmp("bad");
        std::fs::write(&p, b"hello").unwrap();
        let e = Controller::open(&p).err().unwrap().to_string();
        assert!(e.contains("not an xftrace file"), "{e}");
        drop(Writer::create(&p, 16).unwrap());
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[8] = 9;
        std::fs::write(&p, &bytes).unwrap();
        let e = Controller::open(&p).err().unwrap().to_string();
        assert!(e.contains("format version 9") && !e.contains('\n'), "{e}");
        bytes[8] = FORMAT_VERSION as u8;
        bytes[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let e = Controller::open(&p).err().unwrap().to_string();
        assert!(e.contains("needs"), "{e}");
        assert!(Writer::create(&p, 3).is_err());
        assert!(Controller::open(&tmp("missing")).is_err());
    }
}
