//! The tracer engine: turns one VM's stream of syscall [`Record`]s into
//! [`TraceEvent`]s, one per call, strace-like:
//! `1234 cp openat(AT_FDCWD, "/root/secret.txt", O_RDONLY) = 3</root/secret.txt>`.
//!
//! A call is emitted when it returns; a call still blocked after
//! [`UNFINISHED_AFTER`] is emitted as `unfinished`, and its return later as
//! `resumed`. The thread comes from the record (the plugin reads it from the
//! guest kernel at the instruction); for records without one (a plugin
//! started without `vmlinux=`), [`GuestResolver`] names the process by its
//! page-table root when the record is consumed.

mod resolver;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use events::payload::{Item, RESULT};
use events::{format, Kind, Record, NO_ENTRY};
use serde::{Deserialize, Serialize};

pub use resolver::GuestResolver;

/// Show an entry as unfinished when its return has not come after this long.
pub const UNFINISHED_AFTER: Duration = Duration::from_millis(200);
/// Entries kept waiting for their return; beyond, the oldest are emitted unfinished.
const MAX_PENDING: usize = 4096;

/// What a [`TraceEvent`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// A complete call (entry and return).
    Call,
    /// An entry whose return has not come yet.
    Unfinished,
    /// The return of a call reported as unfinished before.
    Resumed,
    /// A return whose entry was not seen (the consumer attached mid-call).
    UnpairedReturn,
    /// `exit`/`exit_group`: no return.
    NoReturn,
    /// Events lost because the ring was full (`count`).
    Dropped,
    /// Events a slow subscriber skipped (`count`): the daemon's stream to it
    /// fell behind; the ring lost nothing.
    Lagged,
    /// The VM's QEMU exited: the stream ends.
    VmStopped,
}

/// A file an fd named at the call (as the plugin resolved it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdFile {
    /// Argument index, or `null` for the result.
    pub arg: Option<u8>,
    pub fd: i64,
    pub dev: u32,
    pub ino: u64,
    pub kind: String,
    pub path: String,
}

/// One traced call (or a stream notice: dropped events, VM stopped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceEvent {
    pub vm: String,
    pub uuid: String,
    pub state: State,
    /// Ring position of the entry (of the return for unpaired returns).
    pub seq: u64,
    /// Host CLOCK_MONOTONIC ns at the entry instruction.
    pub time_ns: u64,
    pub vcpu: u32,
    /// Process id (tgid) as the guest's user space sees it.
    pub pid: Option<u32>,
    /// Thread id.
    pub tid: Option<u32>,
    pub comm: Option<String>,
    pub syscall: String,
    pub nr: u64,
    /// Raw argument registers.
    pub args: [u64; 6],
    /// The call rendered strace-like, with captured strings.
    pub call: String,
    pub ret: Option<i64>,
    /// The result rendered (`3`, `-1 ENOENT (...)`, `3</root/x>`).
    pub result: Option<String>,
    pub duration_ns: Option<u64>,
    /// Path arguments as captured at the call: (argument index, path).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<(u8, String)>,
    /// Files behind fd arguments and results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FdFile>,
    /// For `dropped`: how many events were lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Kernel task_struct address of the thread (hex), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
}

impl TraceEvent {
    /// A notice with no call (dropped events, VM stopped).
    pub fn notice(vm: &str, uuid: &str, state: State, count: Option<u64>) -> TraceEvent {
        TraceEvent {
            vm: vm.to_string(),
            uuid: uuid.to_string(),
            state,
            seq: 0,
            time_ns: events::now_ns(),
            vcpu: 0,
            pid: None,
            tid: None,
            comm: None,
            syscall: String::new(),
            nr: 0,
            args: [0; 6],
            call: String::new(),
            ret: None,
            result: None,
            duration_ns: None,
            paths: Vec::new(),
            files: Vec::new(),
            count,
            task: None,
        }
    }

    /// Whether this is a call line (counts toward `--count`).
    pub fn is_call(&self) -> bool {
        matches!(
            self.state,
            State::Call | State::Resumed | State::UnpairedReturn | State::NoReturn
        )
    }

    /// The strace-like line.
    pub fn text(&self) -> String {
        let head = match (self.pid, &self.comm) {
            (Some(pid), Some(comm)) => format!("{pid:<5} {comm:<15}"),
            (Some(pid), None) => format!("{pid:<5} {:<15}", "?"),
            _ => format!("{:<5} {:<15}", "?", "?"),
        };
        let result = self.result.as_deref().unwrap_or("?");
        match self.state {
            State::Call => format!("{head} {} = {result}", self.call),
            State::NoReturn => format!("{head} {} = ?", self.call),
            State::Unfinished => format!("{head} {} <unfinished ...>", self.call),
            State::Resumed => format!("{head} <... {} resumed> = {result}", self.syscall),
            State::UnpairedReturn => format!(
                "{head} <... {} resumed> = {result} (entry not seen)",
                self.syscall
            ),
            State::Dropped => format!(
                "--- {} events dropped (ring full) ---",
                self.count.unwrap_or(0)
            ),
            State::Lagged => format!(
                "--- {} events skipped (this client read too slowly) ---",
                self.count.unwrap_or(0)
            ),
            State::VmStopped => format!("--- VM `{}` stopped ---", self.vm),
        }
    }
}

/// Which calls a subscriber wants (syscall names are filtered in the plugin).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

impl Selection {
    pub fn matches(&self, ev: &TraceEvent) -> bool {
        if matches!(ev.state, State::Dropped | State::Lagged | State::VmStopped) {
            return true;
        }
        self.pid
            .is_none_or(|p| ev.pid == Some(p) || ev.tid == Some(p))
            && self
                .comm
                .as_ref()
                .is_none_or(|c| ev.comm.as_deref() == Some(c.as_str()))
    }
}

/// The engine for one VM.
pub struct Tracer {
    vm: String,
    uuid: String,
    /// Entries waiting for their return, by entry seq: (entry, first seen, shown as unfinished).
    pending: BTreeMap<u64, (Record, Instant, bool)>,
    /// Names processes from guest RAM for records that carry no thread.
    pub resolver: Option<GuestResolver>,
}

impl Tracer {
    pub fn new(vm: &str, uuid: &str) -> Tracer {
        Tracer {
            vm: vm.to_string(),
            uuid: uuid.to_string(),
            pending: BTreeMap::new(),
            resolver: None,
        }
    }

    /// Events for one record.
    pub fn feed(&mut self, rec: &Record, now: Instant, out: &mut Vec<TraceEvent>) {
        match rec.kind {
            Kind::Entry => {
                if matches!(rec.name(), "exit" | "exit_group") {
                    out.push(self.event(rec, None, State::NoReturn));
                    return;
                }
                // Bounded: a task that never returns (killed) stays until the
                // map is large, then the oldest go out as unfinished.
                self.pending.insert(rec.seq, (rec.clone(), now, false));
                while self.pending.len() > MAX_PENDING {
                    if let Some((_, (e, _, shown))) = self.pending.pop_first() {
                        if !shown {
                            out.push(self.event(&e, None, State::Unfinished));
                        }
                    }
                }
            }
            Kind::Return => match self.pending.remove(&rec.entry_seq) {
                Some((entry, _, false)) => out.push(self.event(&entry, Some(rec), State::Call)),
                Some((entry, _, true)) => out.push(self.event(&entry, Some(rec), State::Resumed)),
                None => out.push(self.event(rec, Some(rec), State::UnpairedReturn)),
            },
            // Log doorbells are the log vault's, not syscalls.
            Kind::Log => {}
        }
    }

    /// Drops every entry waiting for its return (nobody listens any more).
    pub fn forget_pending(&mut self) {
        self.pending.clear();
    }

    /// Unfinished events for entries blocked longer than [`UNFINISHED_AFTER`].
    pub fn tick(&mut self, now: Instant, out: &mut Vec<TraceEvent>) {
        let mut late = Vec::new();
        for (entry, seen, shown) in self.pending.values_mut() {
            if !*shown && now.duration_since(*seen) >= UNFINISHED_AFTER {
                *shown = true;
                late.push(entry.clone());
            }
        }
        for e in late {
            out.push(self.event(&e, None, State::Unfinished));
        }
    }

    /// A `dropped` notice.
    pub fn dropped(&self, n: u64) -> TraceEvent {
        TraceEvent::notice(&self.vm, &self.uuid, State::Dropped, Some(n))
    }

    /// A `vm_stopped` notice.
    pub fn stopped(&self) -> TraceEvent {
        TraceEvent::notice(&self.vm, &self.uuid, State::VmStopped, None)
    }

    fn event(&self, entry: &Record, ret: Option<&Record>, state: State) -> TraceEvent {
        let comm = entry.items().find_map(|it| match it {
            Item::Comm(c) => Some(String::from_utf8_lossy(c).into_owned()),
            _ => None,
        });
        let (pid, tid, comm) = if entry.has_task() {
            (Some(entry.tgid), Some(entry.pid), comm)
        } else if let Some((pid, comm)) = self.resolver.as_ref().and_then(|r| r.process(entry.cr3))
        {
            (Some(pid as u32), None, Some(comm))
        } else {
            (None, None, None)
        };
        let call = if entry.kind == Kind::Entry {
            format::call(entry, ret)
        } else {
            format!("{}(...)", entry.name())
        };
        let mut paths = Vec::new();
        let mut files = Vec::new();
        for (rec, it) in std::iter::once(entry)
            .chain(ret)
            .flat_map(|r| r.items().map(move |it| (r, it)))
        {
            match it {
                Item::Str { arg, bytes, .. } if rec.kind == Kind::Entry => {
                    paths.push((arg, String::from_utf8_lossy(bytes).into_owned()))
                }
                Item::File { arg, file } => files.push(FdFile {
                    arg: (arg != RESULT).then_some(arg),
                    fd: if arg == RESULT {
                        rec.ret
                    } else {
                        rec.args.get(arg as usize).map_or(-1, |&v| v as i32 as i64)
                    },
                    dev: file.dev,
                    ino: file.ino,
                    kind: file.kind.as_str().to_string(),
                    path: String::from_utf8_lossy(file.path).into_owned(),
                }),
                _ => {}
            }
        }
        TraceEvent {
            vm: self.vm.clone(),
            uuid: self.uuid.clone(),
            state,
            seq: entry.seq,
            time_ns: entry.time_ns,
            vcpu: entry.vcpu,
            pid,
            tid,
            comm,
            syscall: entry.name().to_string(),
            nr: entry.nr,
            args: if entry.kind == Kind::Entry {
                entry.args
            } else {
                ret.map_or([0; 6], |r| r.args)
            },
            call,
            ret: ret.map(|r| r.ret),
            result: ret.map(format::result_of),
            duration_ns: ret
                .filter(|r| r.entry_seq != NO_ENTRY && entry.kind == Kind::Entry)
                .map(|r| r.time_ns.saturating_sub(entry.time_ns)),
            paths,
            files,
            count: None,
            task: (entry.task != 0).then(|| format!("{:#x}", entry.task)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use events::payload::{FileKind, PayloadBuf};

    fn entry(seq: u64, nr: u64, pid: u32, comm: &[u8]) -> Record {
        let mut r = Record::entry(
            0,
            nr,
            [(-100i64) as u64, 0x1000, 0, 0, 0, 0],
            0x5000,
            0x400000,
        );
        r.seq = seq;
        (r.pid, r.tgid, r.task, r.flags) = (pid + 1, pid, 0xffff_8880_1234_0000, events::FLAG_TASK);
        let mut p = Box::<PayloadBuf>::default();
        p.comm(comm);
        p.string(1, |b| {
            b[..16].copy_from_slice(b"/root/secret.txt");
            (16, false)
        });
        r.payload = p.as_bytes().to_vec();
        r
    }

    fn ret(seq: u64, entry: &Record, value: i64) -> Record {
        let mut r = Record::ret(0, entry.nr, value, 0x5000, 0xffff_ffff_8100_0000, entry.seq);
        r.seq = seq;
        r.args = entry.args;
        let mut p = Box::<PayloadBuf>::default();
        p.file(
            RESULT,
            0x80_0001,
            99,
            FileKind::Regular,
            b"/root/secret.txt",
        );
        r.payload = p.as_bytes().to_vec();
        r
    }

    #[test]
    fn calls_blocked_calls_and_notices() {
        let mut t = Tracer::new("web1", "u-1");
        let now = Instant::now();
        let mut out = Vec::new();
        let e = entry(0, 257, 774, b"cp");
        t.feed(&e, now, &mut out);
        assert!(out.is_empty());
        t.feed(&ret(3, &e, 3), now, &mut out);
        assert_eq!(out.len(), 1);
        let ev = &out[0];
        assert_eq!(
            ev.text(),
            "774   cp              openat(AT_FDCWD, \"/root/secret.txt\", O_RDONLY) = 3</root/secret.txt>"
        );
        assert_eq!(
            (ev.pid, ev.tid, ev.state),
            (Some(774), Some(775), State::Call)
        );
        assert_eq!(ev.paths, vec![(1, "/root/secret.txt".to_string())]);
        assert_eq!(ev.files[0].fd, 3);
        assert_eq!((ev.files[0].dev, ev.files[0].ino), (0x80_0001, 99));
        // JSON round trip.
        let back: TraceEvent = serde_json::from_str(&serde_json::to_string(ev).unwrap()).unwrap();
        assert_eq!(&back, ev);

        // A blocked call: unfinished after UNFINISHED_AFTER, then resumed.
        out.clear();
        let e = entry(10, 0, 800, b"cat");
        t.feed(&e, now, &mut out);
        t.tick(now + UNFINISHED_AFTER / 2, &mut out);
        assert!(out.is_empty());
        t.tick(now + UNFINISHED_AFTER, &mut out);
        assert_eq!(out[0].state, State::Unfinished);
        t.feed(&ret(12, &e, 5), now, &mut out);
        assert_eq!(out[1].state, State::Resumed);
        assert!(out[1].text().contains("<... read resumed> = 5"));
        assert!(Selection {
            pid: Some(800),
            comm: None
        }
        .matches(&out[1]));
        assert!(!Selection {
            pid: None,
            comm: Some("cp".into())
        }
        .matches(&out[1]));
        assert_eq!(t.dropped(7).text(), "--- 7 events dropped (ring full) ---");
    }
}
