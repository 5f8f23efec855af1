//! End-to-end: a static C program (`guest/scripted/syscalls.c`) makes a known
//! sequence of raw system calls in a lab guest (fork, clone of a process, of a
//! thread and vfork-style with an execve, wait4, exit_group, exit, a child
//! killed in a blocking read, kill, dup2,
//! pipe2, TCP and UDP sockets over loopback, openat/read/write/pread64/close,
//! copy_file_range, sendfile, renameat2, unlink, mmap/munmap of a file) and
//! prints, for each call, what it saw. The test checks that the records the
//! hook plugin wrote say exactly the same: per thread, the same calls in the
//! same order, with the same pid/tid, key arguments (captured paths, argv,
//! fds with the files they name, socket addresses, pipe fds, counts, flags)
//! and results; no scripted call missing and none extra.
//!
//! Needs the lab images (`scripts/setup.sh`), `gcc` and static glibc
//! (`libc6-dev`) on the host; the program is built into
//! `target/<profile>/guest-bin/`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use common::{Calls, File};
use events::payload::RESULT;
use events::{Item, Record};

/// The program's name in the guest (and so its processes' comm).
const PROG: &str = "/tmp/syscalls";
const COMM: &str = "syscalls";

/// One ground-truth line: `<tgid> <tid> <call>`.
#[derive(Debug)]
struct Truth {
    tgid: u32,
    tid: u32,
    call: String,
}

fn parse_truth(out: &str) -> Vec<Truth> {
    out.lines()
        .map(|l| {
            assert!(!l.starts_with("FAIL"), "the program failed: {l}\n{out}");
            let mut w = l.splitn(3, ' ');
            let mut num = || -> u32 {
                w.next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("bad line `{l}`"))
            };
            let (tgid, tid) = (num(), num());
            Truth {
                tgid,
                tid,
                call: w
                    .next()
                    .unwrap_or_else(|| panic!("bad line `{l}`"))
                    .to_string(),
            }
        })
        .collect()
}

fn dev_ino(f: &File) -> String {
    format!("<{}>#{}:{}:{}", f.path, f.dev >> 20, f.dev & 0xfffff, f.ino)
}

/// `3</tmp/x>#0:2:1234`, as the program prints an fd: the fd (argument `arg`
/// of `rec`, or its result) and the file the plugin resolved for it.
fn fd_of(rec: &Record, arg: u8, fd: i64) -> String {
    match common::file_item(rec, arg) {
        Some(f) => format!("{fd}{}", dev_ino(&f)),
        None => format!("{fd}<no file captured>"),
    }
}

fn sockaddr_of(rec: Option<&Record>, arg: u8) -> String {
    let Some(rec) = rec else {
        return "?".into();
    };
    rec.items()
        .find_map(|it| match it {
            Item::SockAddr { arg: a, bytes, .. } if a == arg => Some(
                if bytes.len() >= 8 && u16::from_le_bytes([bytes[0], bytes[1]]) == 2 {
                    format!(
                        "{}.{}.{}.{}:{}",
                        bytes[4],
                        bytes[5],
                        bytes[6],
                        bytes[7],
                        u16::from_be_bytes([bytes[2], bytes[3]])
                    )
                } else {
                    format!("<sockaddr {bytes:?}>")
                },
            ),
            Item::Unreadable { arg: a } if a == arg => Some("<unreadable>".into()),
            _ => None,
        })
        .unwrap_or_else(|| "<no sockaddr captured>".into())
}

fn path_of(rec: &Record, arg: u8) -> String {
    common::path_arg(rec, arg).unwrap_or_else(|| "<no path captured>".into())
}

/// A call as the program prints it, rebuilt from the plugin's records.
fn render(e: &Record, x: Option<&Record>) -> String {
    let a = e.args;
    let fd = |i: usize| fd_of(e, i as u8, a[i] as i32 as i64);
    let ret = || x.map_or("?".to_string(), |x| x.ret.to_string());
    // An fd result with the file it names (or the error).
    let fd_ret = || match x {
        None => "?".to_string(),
        Some(x) if x.ret >= 0 => fd_of(x, RESULT, x.ret),
        Some(x) => x.ret.to_string(),
    };
    let name = e.name();
    let args = match name {
        "getppid" | "getpid" | "gettid" | "fork" => String::new(),
        "clone" => format!("flags={:#x}", a[0]),
        "execve" => {
            let argv = e
                .items()
                .find_map(|it| match it {
                    Item::Argv { arg: 1, bytes, .. } => Some(
                        bytes
                            .split(|&b| b == 0)
                            .filter(|s| !s.is_empty())
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                    _ => None,
                })
                .unwrap_or_else(|| "<no argv captured>".into());
            format!("path={} argv={argv}", path_of(e, 0))
        }
        "wait4" => format!("pid={}", a[0] as i32),
        "kill" => format!("pid={} sig={}", a[0] as i32, a[1] as i32),
        "exit" | "exit_group" => {
            let after = match x {
                None => "?".to_string(),
                Some(x) => format!("<returned {}>", x.ret),
            };
            return format!("{name} code={} = {after}", a[0] as i32);
        }
        "openat" => {
            return format!(
                "openat path={} flags={:#x} = {}",
                path_of(e, 1),
                a[2],
                fd_ret()
            )
        }
        "read" | "write" => format!("fd={} count={}", fd(0), a[2]),
        "pread64" => format!("fd={} count={} off={}", fd(0), a[2], a[3]),
        "close" => format!("fd={}", fd(0)),
        "copy_file_range" => format!("in={} out={} len={}", fd(0), fd(2), a[4]),
        "sendfile" => format!("out={} in={} count={}", fd(0), fd(1), a[3]),
        "renameat2" => format!(
            "old={} new={} flags={:#x}",
            path_of(e, 1),
            path_of(e, 3),
            a[4]
        ),
        "unlink" => format!("path={}", path_of(e, 0)),
        "pipe2" => {
            let fds = x
                .and_then(|x| {
                    x.items().find_map(|it| match it {
                        Item::FdPair { arg: 0, fds } => Some(format!("{},{}", fds[0], fds[1])),
                        _ => None,
                    })
                })
                .unwrap_or_else(|| "<no fd pair captured>".into());
            return format!("pipe2 flags={:#x} = {} fds={fds}", a[1], ret());
        }
        "dup2" => return format!("dup2 old={} new={} = {}", fd(0), a[1] as i32, fd_ret()),
        "mmap" => {
            let r = x.map_or("?".to_string(), |x| format!("{:#x}", x.ret));
            return format!(
                "mmap len={} prot={:#x} flags={:#x} fd={} off={} = {r}",
                a[1],
                a[2],
                a[3],
                fd(4),
                a[5]
            );
        }
        "munmap" => format!("addr={:#x} len={}", a[0], a[1]),
        "socket" => {
            return format!("socket domain={} type={:#x} = {}", a[0], a[1], fd_ret());
        }
        "bind" | "connect" => format!("fd={} addr={}", fd(0), sockaddr_of(Some(e), 1)),
        "listen" => format!("fd={} backlog={}", fd(0), a[1] as i32),
        "accept" => {
            return format!(
                "accept fd={} = {} peer={}",
                fd(0),
                fd_ret(),
                sockaddr_of(x, 1)
            )
        }
        "sendto" if a[4] != 0 => {
            format!("fd={} len={} to={}", fd(0), a[2], sockaddr_of(Some(e), 4))
        }
        "sendto" => format!("fd={} len={}", fd(0), a[2]),
        "recvfrom" if a[4] != 0 => {
            return format!(
                "recvfrom fd={} len={} = {} from={}",
                fd(0),
                a[2],
                ret(),
                sockaddr_of(x, 4)
            )
        }
        "recvfrom" => format!("fd={} len={}", fd(0), a[2]),
        other => format!("<unexpected {other}>"),
    };
    if args.is_empty() {
        format!("{name} = {}", ret())
    } else {
        format!("{name} {args} = {}", ret())
    }
}

/// `got` and `want` side by side, marking the lines that differ.
fn diff(got: &[String], want: &[&str]) -> String {
    let n = got.len().max(want.len());
    (0..n)
        .map(|i| {
            let g = got.get(i).map_or("", |s| s.as_str());
            let w = want.get(i).copied().unwrap_or("");
            if g == w {
                format!("    {g}")
            } else {
                format!("  - vmwatch: {g}\n  + program: {w}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn scripted_syscalls_are_reported_exactly() {
    let src = common::workspace().join("guest/scripted/syscalls.c");
    let bin = common::build_static_c(&src, "syscalls");
    let bytes = std::fs::read(&bin).unwrap();
    let t0 = Instant::now();
    let (vm, mut r) = common::boot_lab("scr", lab::Flavour::Stable);
    let booted = t0.elapsed();
    common::copy_in(&vm.vm, PROG, &bytes);
    let copied = t0.elapsed();

    let dropped = r.dropped(); // the copy ran with nobody draining the ring
    let (out, recs) = common::collect_during(&mut r, || vm.vm.exec(&[PROG]).expect("agent exec"));
    let stdout = out.stdout_str();
    assert!(
        out.success(),
        "{PROG} failed ({:?}):\n{stdout}\n{}",
        out.status,
        out.stderr_str()
    );
    eprintln!(
        "boot {booted:?}, copy {:?}, run+collect {:?}, {} records",
        copied - booted,
        t0.elapsed() - copied,
        recs.len()
    );
    assert_eq!(r.dropped(), dropped, "records dropped (ring full)");
    assert!(
        recs.iter().all(|x| x.has_task()),
        "records without a thread"
    );

    let truth = parse_truth(&stdout);
    let mut want: BTreeMap<u32, Vec<&Truth>> = BTreeMap::new();
    for t in &truth {
        want.entry(t.tid).or_default().push(t);
    }
    // Main process, killed fork child, fork child, clone child, thread,
    // vfork+execve child.
    let tgids: BTreeSet<u32> = truth.iter().map(|t| t.tgid).collect();
    assert_eq!((tgids.len(), want.len()), (5, 6), "{stdout}");
    // The syscalls the script makes: in the windows below every call with
    // one of these names must be in the script, and none other.
    let scripted: BTreeSet<&str> = truth
        .iter()
        .map(|t| t.call.split(' ').next().unwrap())
        .collect();

    // Everything that differs, reported together at the end.
    let mut problems: Vec<String> = Vec::new();
    let calls = Calls::new(&recs);
    for (tid, lines) in &want {
        let mine: Vec<_> = calls.calls.iter().filter(|c| c.0.pid == *tid).collect();
        let first = lines[0].call.split(' ').next().unwrap();
        // The window starts at the thread's first scripted call; for a
        // process that starts with the marker (`getppid`), the first one
        // made by this program (before its execve the agent's child has
        // another comm).
        let Some(start) = mine.iter().position(|c| {
            c.0.name() == first
                && (first != "getppid" || common::comm(c.0).as_deref() == Some(COMM))
        }) else {
            problems.push(format!("tid {tid}: no `{first}` call recorded"));
            continue;
        };
        let mut got = Vec::new();
        let mut starting = false; // between a successful execve and the marker
        for (e, x) in &mine[start..] {
            let name = e.name();
            if e.tgid != lines[0].tgid {
                problems.push(format!(
                    "tid {tid}: {name} recorded with tgid {}, the program says {}",
                    e.tgid, lines[0].tgid
                ));
            }
            // After the window's start every call is the program's (the
            // agent's child exec'ing it comes before).
            if common::comm(e).as_deref() != Some(COMM) {
                problems.push(format!(
                    "tid {tid}: {name} recorded with comm {:?}",
                    common::comm(e)
                ));
            }
            if starting && name != "getppid" {
                continue; // the new image's libc startup
            }
            starting = false;
            if name == "execve" && x.is_some_and(|x| x.ret == 0) {
                starting = true;
            }
            if scripted.contains(name) {
                got.push(render(e, *x));
            }
        }
        let want: Vec<&str> = lines.iter().map(|t| t.call.as_str()).collect();
        if got != want {
            problems.push(format!(
                "tid {tid} (process {}): the calls vmwatch recorded differ from the program's:\n{}",
                lines[0].tgid,
                diff(&got, &want)
            ));
        }
    }
    // No other thread of this program made a syscall.
    let ours: BTreeSet<u32> = recs
        .iter()
        .filter(|x| common::comm(x).as_deref() == Some(COMM))
        .map(|x| x.pid)
        .collect();
    let known: BTreeSet<u32> = want.keys().copied().collect();
    if !ours.is_subset(&known) {
        problems.push(format!(
            "threads named {COMM}: {ours:?}, the program's: {known:?}"
        ));
    }
    // Every return of the program's threads pairs with an entry of the same
    // thread. (A fork or clone child's first return to user mode is not a
    // call of its own: nothing may be reported for it.)
    let by_seq: HashMap<u64, &Record> = recs.iter().map(|x| (x.seq, x)).collect();
    for x in recs
        .iter()
        .filter(|x| x.kind == events::Kind::Return)
        .filter(|x| {
            known.contains(&x.pid)
                || by_seq
                    .get(&x.entry_seq)
                    .is_some_and(|e| known.contains(&e.pid))
        })
    {
        match by_seq.get(&x.entry_seq) {
            None if x.entry_seq == events::NO_ENTRY => problems.push(format!(
                "tid {}: a return ({} = {}) without an entry",
                x.pid,
                x.name(),
                x.ret
            )),
            None => {}
            Some(e) if (e.pid, e.tgid) != (x.pid, x.tgid) => problems.push(format!(
                "tid {} (task {:#x}): given the return of tid {}'s {} (entry seq {}, task {:#x}), \
                 = {} at return seq {}",
                x.pid,
                x.task,
                e.pid,
                e.name(),
                e.seq,
                e.task,
                x.ret,
                x.seq
            )),
            Some(_) => {}
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The consumer renders the same calls strace-like, with the program's
    // pids, paths, argv and addresses.
    let main = truth[0].tgid;
    let mut tracer = tracer::Tracer::new("vm", "uuid");
    let mut events = Vec::new();
    for x in recs.iter().filter(|x| tgids.contains(&x.tgid)) {
        tracer.feed(x, Instant::now(), &mut events);
    }
    // The killed child's read never returned: shown as unfinished.
    tracer.tick(Instant::now() + tracer::UNFINISHED_AFTER, &mut events);
    let by_seq: HashMap<u64, &tracer::TraceEvent> = events.iter().map(|e| (e.seq, e)).collect();
    for (e, x) in calls.calls.iter().filter(|c| tgids.contains(&c.0.tgid)) {
        let ev = by_seq
            .get(&e.seq)
            .unwrap_or_else(|| panic!("no trace event for {} seq {}", e.name(), e.seq));
        assert_eq!(
            (ev.pid, ev.tid, ev.syscall.as_str(), ev.ret),
            (Some(e.tgid), Some(e.pid), e.name(), x.map(|x| x.ret))
        );
    }
    let lines: Vec<String> = events.iter().map(|e| e.text()).collect();
    let find = |call: &str| {
        truth
            .iter()
            .find(|t| t.call.starts_with(call))
            .unwrap_or_else(|| panic!("`{call}` in {stdout}"))
    };
    let exec = find("execve ");
    let vfork_child = exec.tgid;
    let conn = find("connect ");
    let port = conn
        .call
        .rsplit(':')
        .next()
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let sock = conn.call["connect fd=".len()..].split('#').next().unwrap();
    let expect = [
        format!("{main:<5} {COMM:<15} renameat2(AT_FDCWD, \"/tmp/sc-b\", AT_FDCWD, \"/tmp/sc-c\", 0x1) = 0"),
        format!("{main:<5} {COMM:<15} unlink(\"/tmp/sc-c\") = -1 ENOENT (No such file or directory)"),
        format!("{main:<5} {COMM:<15} connect({sock}, {{AF_INET, 127.0.0.1:{port}}}, 16) = 0"),
        format!("{vfork_child:<5} {COMM:<15} execve(\"{PROG}\", [\"{PROG}\", \"phase2\"], "),
    ];
    for want in &expect {
        assert!(
            lines.iter().any(|l| l.starts_with(want.as_str())),
            "`{want}` in:\n{}",
            lines.join("\n")
        );
    }
}
