//! A guest as the hook plugin records it: entry and return records with
//! the items `events::capture` prescribes (comm at entry, paths at entry,
//! fd identities at entry, result identities / returned addresses / fd
//! pairs at return; returns repeat the entry's arguments, carry no comm).
#![allow(dead_code)]

use diffusion::{DeltaEvent, DiffusionEngine, ManualClock, VmRef};
use events::payload::{FileKind, PayloadBuf, RESULT};
use events::{Record, FLAG_TASK, NO_ENTRY};

/// 2026-11-21T10:00:00.000Z
pub const WALL_AT_ZERO: i64 = 1_795_255_200_000_000_000;
pub const AT_FDCWD: u64 = (-100i64) as u64;
pub const O_RDONLY: u64 = 0;
pub const O_WRONLY_CREAT_TRUNC: u64 = 0o1101;
pub const ROOT_DEV: u32 = 0x0080_0001;
pub const PIPE_DEV: u32 = 0x0000_000d;
pub const SOCK_DEV: u32 = 0x0000_0008;

/// The object behind an fd.
#[derive(Debug, Clone)]
pub struct F {
    pub dev: u32,
    pub ino: u64,
    pub kind: FileKind,
    pub path: String,
}

impl F {
    pub fn reg(ino: u64, path: &str) -> F {
        F {
            dev: ROOT_DEV,
            ino,
            kind: FileKind::Regular,
            path: path.into(),
        }
    }
    pub fn pipe(ino: u64) -> F {
        F {
            dev: PIPE_DEV,
            ino,
            kind: FileKind::Pipe,
            path: format!("pipe:[{ino}]"),
        }
    }
    pub fn sock(ino: u64) -> F {
        F {
            dev: SOCK_DEV,
            ino,
            kind: FileKind::Socket,
            path: format!("socket:[{ino}]"),
        }
    }
    pub fn chr(ino: u64, path: &str) -> F {
        F {
            dev: 5,
            ino,
            kind: FileKind::CharDevice,
            path: path.into(),
        }
    }
    pub fn dir(ino: u64, path: &str) -> F {
        F {
            dev: ROOT_DEV,
            ino,
            kind: FileKind::Directory,
            path: path.into(),
        }
    }
}

/// A guest process (its leader thread unless `tid` says otherwise).
#[derive(Debug, Clone)]
pub struct P {
    pub tgid: u32,
    pub tid: u32,
    pub comm: String,
}

pub fn p(tgid: u32, comm: &str) -> P {
    P {
        tgid,
        tid: tgid,
        comm: comm.into(),
    }
}

/// `struct sockaddr_in`.
pub fn sin(ip: [u8; 4], port: u16) -> Vec<u8> {
    let mut b = vec![2, 0];
    b.extend_from_slice(&port.to_be_bytes());
    b.extend_from_slice(&ip);
    b.extend_from_slice(&[0; 8]);
    b
}

/// `struct sockaddr_un` (unnamed when `path` is empty).
pub fn sun(path: &str) -> Vec<u8> {
    let mut b = vec![1, 0];
    b.extend_from_slice(path.as_bytes());
    if !path.is_empty() {
        b.push(0);
    }
    b
}

/// One item to put in a record.
#[derive(Debug, Clone)]
pub enum It {
    Str(u8, String),
    Argv(u8, Vec<String>),
    Addr(u8, Vec<u8>),
    Pair(u8, [i32; 2]),
    File(u8, F),
}

fn payload(comm: Option<&str>, items: &[It]) -> Vec<u8> {
    let mut b = Box::<PayloadBuf>::default();
    if let Some(c) = comm {
        b.comm(c.as_bytes());
    }
    for it in items {
        match it {
            It::Str(a, s) => b.string(*a, |buf| {
                let n = s.len().min(buf.len());
                buf[..n].copy_from_slice(&s.as_bytes()[..n]);
                (n, n < s.len())
            }),
            It::Argv(a, v) => {
                let mut bytes = Vec::new();
                for s in v {
                    bytes.extend_from_slice(s.as_bytes());
                    bytes.push(0);
                }
                b.argv(*a, 2048, |buf| {
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    (n, n < bytes.len())
                });
            }
            It::Addr(a, bytes) => b.sockaddr(*a, bytes, false),
            It::Pair(a, fds) => b.fd_pair(*a, *fds),
            It::File(a, f) => b.file(*a, f.dev, f.ino, f.kind, f.path.as_bytes()),
        }
    }
    b.as_bytes().to_vec()
}

/// Builds the record stream of one VM.
pub struct Sim {
    pub seq: u64,
    pub time_ns: u64,
    pub records: Vec<Record>,
}

impl Sim {
    /// Records start at monotonic `start_ns`, 1 ms apart.
    pub fn new(start_ns: u64) -> Sim {
        Sim {
            seq: 0,
            time_ns: start_ns,
            records: Vec::new(),
        }
    }

    fn stamp(&mut self) -> (u64, u64) {
        self.seq += 2; // a record may span slots: positions have gaps
        self.time_ns += 1_000_000;
        (self.seq, self.time_ns)
    }

    /// Moves time on.
    pub fn sleep_ms(&mut self, ms: u64) {
        self.time_ns += ms * 1_000_000;
    }

    /// An entry record (kept in the stream); returned for a later `exit`.
    pub fn enter(&mut self, p: &P, name: &str, args: [u64; 6], items: &[It]) -> Record {
        let nr = events::syscalls::number(name).unwrap_or_else(|| panic!("{name}"));
        let (seq, time) = self.stamp();
        let mut r = Record::entry(0, nr, args, 0x1234_5000, 0x40_1000);
        r.seq = seq;
        r.time_ns = time;
        r.pid = p.tid;
        r.tgid = p.tgid;
        r.task = 0xffff_8880_0000_0000 + u64::from(p.tid) * 0x1000;
        r.flags = FLAG_TASK;
        r.payload = payload(Some(&p.comm), items);
        self.records.push(r.clone());
        r
    }

    /// The return of `entry`.
    pub fn exit(&mut self, entry: &Record, ret: i64, items: &[It]) -> Record {
        let (seq, time) = self.stamp();
        let mut r = Record::ret(0, entry.nr, ret, 0, 0xffff_ffff_8100_0000, entry.seq);
        r.seq = seq;
        r.time_ns = time;
        r.args = entry.args;
        r.pid = entry.pid;
        r.tgid = entry.tgid;
        r.task = entry.task;
        r.flags = FLAG_TASK;
        r.payload = payload(None, items);
        self.records.push(r.clone());
        r
    }

    pub fn call(&mut self, p: &P, name: &str, args: [u64; 6], ret: i64, entry: &[It], exit: &[It]) {
        let e = self.enter(p, name, args, entry);
        self.exit(&e, ret, exit);
    }

    // ---- the calls the scenarios use, with the plugin's captures ----

    pub fn openat(&mut self, p: &P, path: &str, flags: u64, fd: i64, f: Option<&F>) {
        let exit: Vec<It> = f.map(|f| It::File(RESULT, f.clone())).into_iter().collect();
        self.call(
            p,
            "openat",
            [AT_FDCWD, 0x7ffc_0000, flags, 0o644, 0, 0],
            fd,
            &[It::Str(1, path.into())],
            &exit,
        );
    }

    pub fn read(&mut self, p: &P, fd: u64, f: &F, n: i64) {
        self.call(
            p,
            "read",
            [fd, 0x7f00_0000, 65536, 0, 0, 0],
            n,
            &[It::File(0, f.clone())],
            &[],
        );
    }

    pub fn write(&mut self, p: &P, fd: u64, f: &F, n: i64) {
        self.call(
            p,
            "write",
            [fd, 0x7f00_0000, n.max(1) as u64, 0, 0, 0],
            n,
            &[It::File(0, f.clone())],
            &[],
        );
    }

    pub fn close(&mut self, p: &P, fd: u64, f: &F) {
        self.call(
            p,
            "close",
            [fd, 0, 0, 0, 0, 0],
            0,
            &[It::File(0, f.clone())],
            &[],
        );
    }

    pub fn fork(&mut self, parent: &P, child: u32) {
        self.call(parent, "fork", [0; 6], i64::from(child), &[], &[]);
    }

    /// glibc's fork: clone(SIGCHLD | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID).
    pub fn clone_process(&mut self, parent: &P, child: u32) {
        self.call(
            parent,
            "clone",
            [0x0120_0011, 0, 0, 0x7f00_1000, 0, 0],
            i64::from(child),
            &[],
            &[],
        );
    }

    /// execve: the path and argv at entry; success returns 0 to the same task.
    pub fn execve(&mut self, p: &mut P, path: &str, argv: &[&str]) {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        self.call(
            p,
            "execve",
            [0x5000, 0x5100, 0x5200, 0, 0, 0],
            0,
            &[It::Str(0, path.into()), It::Argv(1, argv)],
            &[],
        );
        p.comm = path
            .rsplit('/')
            .next()
            .unwrap_or(path)
            .chars()
            .take(15)
            .collect();
    }

    pub fn exit_group(&mut self, p: &P) {
        self.enter(p, "exit_group", [0; 6], &[]);
    }

    pub fn pipe2(&mut self, p: &P, fds: [i32; 2]) {
        self.call(
            p,
            "pipe2",
            [0x7ffc_0100, 0, 0, 0, 0, 0],
            0,
            &[],
            &[It::Pair(0, fds)],
        );
    }

    pub fn chdir(&mut self, p: &P, path: &str) {
        self.call(
            p,
            "chdir",
            [0x5000, 0, 0, 0, 0, 0],
            0,
            &[It::Str(0, path.into())],
            &[],
        );
    }

    pub fn renameat2(&mut self, p: &P, old: &str, new: &str, flags: u64) {
        self.call(
            p,
            "renameat2",
            [AT_FDCWD, 0x5000, AT_FDCWD, 0x5100, flags, 0],
            0,
            &[It::Str(1, old.into()), It::Str(3, new.into())],
            &[],
        );
    }

    pub fn unlinkat(&mut self, p: &P, path: &str) {
        self.call(
            p,
            "unlinkat",
            [AT_FDCWD, 0x5000, 0, 0, 0, 0],
            0,
            &[It::Str(1, path.into())],
            &[],
        );
    }

    pub fn copy_file_range(
        &mut self,
        p: &P,
        (in_fd, input): (u64, &F),
        (out_fd, output): (u64, &F),
        n: i64,
    ) {
        self.call(
            p,
            "copy_file_range",
            [in_fd, 0, out_fd, 0, 0x7fff_f000, 0],
            n,
            &[It::File(0, input.clone()), It::File(2, output.clone())],
            &[],
        );
    }

    pub fn sendfile(
        &mut self,
        p: &P,
        (out_fd, output): (u64, &F),
        (in_fd, input): (u64, &F),
        n: i64,
    ) {
        self.call(
            p,
            "sendfile",
            [out_fd, in_fd, 0, 0x100_0000, 0, 0],
            n,
            &[It::File(0, output.clone()), It::File(1, input.clone())],
            &[],
        );
    }

    pub fn socket(&mut self, p: &P, domain: u64, ty: u64, fd: i64, s: &F) {
        self.call(
            p,
            "socket",
            [domain, ty, 0, 0, 0, 0],
            fd,
            &[],
            &[It::File(RESULT, s.clone())],
        );
    }

    pub fn connect(&mut self, p: &P, fd: u64, s: &F, addr: Vec<u8>, ret: i64) {
        let len = addr.len() as u64;
        self.call(
            p,
            "connect",
            [fd, 0x7ffc_0200, len, 0, 0, 0],
            ret,
            &[It::File(0, s.clone()), It::Addr(1, addr)],
            &[],
        );
    }

    pub fn bind(&mut self, p: &P, fd: u64, s: &F, addr: Vec<u8>) {
        let len = addr.len() as u64;
        self.call(
            p,
            "bind",
            [fd, 0x7ffc_0200, len, 0, 0, 0],
            0,
            &[It::File(0, s.clone()), It::Addr(1, addr)],
            &[],
        );
    }

    pub fn listen(&mut self, p: &P, fd: u64, s: &F) {
        self.call(
            p,
            "listen",
            [fd, 128, 0, 0, 0, 0],
            0,
            &[It::File(0, s.clone())],
            &[],
        );
    }

    /// accept4 blocks: the entry comes first, the return later (`finish`).
    pub fn accept4_enter(&mut self, p: &P, lfd: u64, listener: &F) -> Record {
        self.enter(
            p,
            "accept4",
            [lfd, 0x7ffc_0300, 0x7ffc_0380, 0x80000, 0, 0],
            &[It::File(0, listener.clone())],
        )
    }

    pub fn accept4_exit(&mut self, e: &Record, fd: i64, s: &F, peer: Vec<u8>) {
        self.exit(e, fd, &[It::Addr(1, peer), It::File(RESULT, s.clone())]);
    }

    pub fn sendto(&mut self, p: &P, fd: u64, s: &F, n: i64, addr: Option<Vec<u8>>) {
        let mut entry = vec![It::File(0, s.clone())];
        let (ptr, len) = match &addr {
            Some(a) => (0x7ffc_0400, a.len() as u64),
            None => (0, 0),
        };
        if let Some(a) = addr {
            entry.push(It::Addr(4, a));
        }
        self.call(
            p,
            "sendto",
            [fd, 0x7f00_0000, n as u64, 0, ptr, len],
            n,
            &entry,
            &[],
        );
    }

    pub fn recvfrom(&mut self, p: &P, fd: u64, s: &F, n: i64, from: Option<Vec<u8>>) {
        let exit: Vec<It> = from.map(|a| It::Addr(4, a)).into_iter().collect();
        self.call(
            p,
            "recvfrom",
            [fd, 0x7f00_0000, 65536, 0, 0x7ffc_0500, 0x7ffc_0580],
            n,
            &[It::File(0, s.clone())],
            &exit,
        );
    }

    pub fn mmap(&mut self, p: &P, fd: u64, f: &F, prot: u64, flags: u64) {
        self.call(
            p,
            "mmap",
            [0, 4096, prot, flags, fd, 0],
            0x7f55_0000_0000,
            &[It::File(4, f.clone())],
            &[],
        );
    }
}

/// A fresh engine on `dir` with a manual clock at [`WALL_AT_ZERO`].
pub fn engine(dir: &std::path::Path) -> (DiffusionEngine, ManualClock) {
    engine_with(dir, diffusion::Config::default())
}

pub fn engine_with(
    dir: &std::path::Path,
    config: diffusion::Config,
) -> (DiffusionEngine, ManualClock) {
    let clock = ManualClock::new(WALL_AT_ZERO);
    let e =
        DiffusionEngine::open_with_clock(dir, config, Box::new(clock.clone())).expect("open store");
    (e, clock)
}

/// Feeds every record; returns all delta events.
pub fn feed(e: &mut DiffusionEngine, vm: &VmRef, records: &[Record]) -> Vec<DeltaEvent> {
    let mut out = Vec::new();
    for r in records {
        out.extend(e.on_record(vm, r));
    }
    out
}

pub fn texts(evs: &[DeltaEvent]) -> Vec<String> {
    evs.iter().map(|e| e.change.to_string()).collect()
}

/// Keeps the unused-import lint quiet in test crates that do not pair by hand.
pub const UNPAIRED: u64 = NO_ENTRY;
