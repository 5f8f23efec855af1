//! End-to-end: boot a lab guest with the hook plugin, run workloads whose
//! syscalls we know, and check what arrives through the event ring.
//!
//! Needs the lab images (`scripts/setup.sh`) and the plugin .so (built by
//! `cargo build --release`; this test builds it if it is missing).
//!
//! It compiles vmwatch's `trace_cmd.rs` in through `#[path]` so the CLI's
//! consumer is exercised too.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use events::{Filter, Item, Kind, Record, Ring, RingReader, NO_ENTRY};
use lab::{UpOptions, Vm};
use labtest::{plugin_path, sh, up_with_plugin};

#[allow(dead_code)]
#[path = "../../vmwatch/src/trace_cmd.rs"]
mod trace_cmd;

struct TestVm(Vm, PathBuf);

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = self.0.down();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn drain(r: &mut RingReader, into: &mut Vec<Record>) {
    loop {
        let before = into.len();
        into.extend(r.poll());
        if into.len() == before {
            return;
        }
    }
}

/// Runs `script` in the guest while draining the ring on this thread.
fn run_collect(vm: &Vm, r: &mut RingReader, script: &str) -> (String, Vec<Record>) {
    let mut recs = Vec::new();
    drain(r, &mut Vec::new()); // older events
    let out = std::thread::scope(|s| {
        let h = s.spawn(|| sh(vm, script));
        while !h.is_finished() {
            drain(r, &mut recs);
            std::thread::sleep(Duration::from_millis(5));
        }
        h.join().unwrap()
    });
    std::thread::sleep(Duration::from_millis(50));
    drain(r, &mut recs);
    (out, recs)
}

const N_GETPID: usize = 200;

/// Boots a VM the way `vmwatch lab up` does (plugin with ram=/vmlinux=, so
/// every event names its thread), with every syscall and fd traced.
fn boot_lab(tag: &str, flavour: lab::Flavour, pti: lab::vm::Pti) -> (TestVm, RingReader) {
    let name = format!("t-{tag}-{}", std::process::id());
    let mut opts = UpOptions::new(&name);
    opts.cpus = 2;
    opts.flavour = flavour;
    opts.pti = pti;
    let vm = up_with_plugin(&opts);
    let ring = vm
        .info()
        .ring
        .clone()
        .expect("lab VMs load the hook plugin");
    let vm = TestVm(vm, ring);
    let r = Ring::open(&vm.1).expect("ring");
    r.set_filter(&Filter::ALL);
    r.set_fds(&Filter::ALL);
    (vm, r)
}

fn comm(rec: &Record) -> Option<String> {
    rec.items().find_map(|it| match it {
        Item::Comm(c) => Some(String::from_utf8_lossy(c).into_owned()),
        _ => None,
    })
}

fn path_arg(rec: &Record, arg: u8) -> Option<String> {
    rec.items().find_map(|it| match it {
        Item::Str { arg: a, bytes, .. } if a == arg => {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
        _ => None,
    })
}

fn file_item(rec: &Record, arg: u8) -> Option<(u32, u64, String)> {
    rec.items().find_map(|it| match it {
        Item::File { arg: a, file } if a == arg => Some((
            file.dev,
            file.ino,
            String::from_utf8_lossy(file.path).into_owned(),
        )),
        _ => None,
    })
}

/// Entry/return pairs, per-thread identity, captured paths and file
/// identities, checked against what the guest itself reports.
fn plugin_events_match_the_guest(tag: &str, flavour: lab::Flavour, pti: lab::vm::Pti) {
    let (vm, mut r) = boot_lab(tag, flavour, pti);
    assert_eq!(r.vm_name(), vm.0.info().name);

    // 1. getpid N times, one open that works and one that fails, a close;
    // the guest prints its pid, the fd, and stat(/etc/hostname).
    let script = format!(
        "cat > /tmp/w.py <<'EOF'\n\
         import os\n\
         os.getppid()\n\
         pid = os.getpid()\n\
         for _ in range({}): os.getpid()\n\
         fd = os.open('/etc/hostname', os.O_RDONLY)\n\
         try:\n    os.open('/nonexistent-vmwatch', os.O_RDONLY)\n\
         except FileNotFoundError:\n    pass\n\
         os.close(fd)\n\
         st = os.stat('/etc/hostname')\n\
         print(pid, fd, st.st_ino, os.major(st.st_dev), os.minor(st.st_dev))\n\
         EOF\n\
         python3 /tmp/w.py",
        N_GETPID - 1
    );
    let (out, recs) = run_collect(&vm.0, &mut r, &script);
    let v: Vec<u64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    let (pid, fd, ino, major, minor) = (v[0] as u32, v[1] as i64, v[2], v[3] as u32, v[4] as u32);
    assert_eq!(r.dropped(), 0);

    // Every record names its thread, read from the guest kernel at the instruction.
    let unnamed = recs.iter().filter(|x| !x.has_task()).count();
    assert_eq!(unnamed, 0, "records without a thread");
    let by_seq: std::collections::HashMap<u64, &Record> = recs.iter().map(|x| (x.seq, x)).collect();
    let returns: std::collections::HashMap<u64, &Record> = recs
        .iter()
        .filter(|x| x.kind == Kind::Return && x.entry_seq != NO_ENTRY)
        .map(|x| (x.entry_seq, x))
        .collect();
    // Every return belongs to the same thread and syscall as its entry.
    for ret in recs.iter().filter(|x| x.kind == Kind::Return) {
        if let Some(e) = by_seq.get(&ret.entry_seq) {
            assert_eq!(
                (e.kind, e.nr, e.pid, e.task),
                (Kind::Entry, ret.nr, ret.pid, ret.task)
            );
            assert!(e.seq < ret.seq);
        }
    }
    let py: Vec<&Record> = recs.iter().filter(|x| x.tgid == pid).collect();
    // getpid: between the getppid marker and the first openat of /etc/hostname,
    // exactly N entries, each returning the pid the guest printed.
    let marker = py
        .iter()
        .find(|x| x.kind == Kind::Entry && x.nr == 110 && comm(x).as_deref() == Some("python3"))
        .expect("getppid marker")
        .seq;
    // (Before its execve the process was `sh`, which calls getppid too.)
    let comms: std::collections::BTreeSet<Option<String>> = py
        .iter()
        .filter(|x| x.kind == Kind::Entry && x.seq >= marker)
        .map(|x| comm(x))
        .collect();
    assert_eq!(
        comms,
        [Some("python3".to_string())].into(),
        "comm after exec"
    );
    let opens: Vec<&Record> = py
        .iter()
        .filter(|x| x.kind == Kind::Entry && x.nr == 257 && x.seq > marker)
        .copied()
        .collect();
    let paths: Vec<String> = opens.iter().filter_map(|x| path_arg(x, 1)).collect();
    let first = paths
        .iter()
        .position(|p| p == "/etc/hostname")
        .unwrap_or_else(|| panic!("openat(/etc/hostname) in {paths:?}"));
    assert_eq!(
        paths.get(first + 1).map(|s| s.as_str()),
        Some("/nonexistent-vmwatch")
    );
    let open_ok = opens[first];
    let open_bad = opens[first + 1];
    let getpids: Vec<&Record> = py
        .iter()
        .filter(|x| x.kind == Kind::Entry && x.nr == 39)
        .filter(|x| x.seq > marker && x.seq < open_ok.seq)
        .copied()
        .collect();
    assert_eq!(getpids.len(), N_GETPID, "getpid calls of pid {pid}");
    assert!(getpids
        .iter()
        .all(|g| returns[&g.seq].ret == i64::from(pid)));
    // openat returned the fd the guest got, naming the file stat() names.
    let ret_ok = returns[&open_ok.seq];
    assert_eq!(ret_ok.ret, fd);
    let (dev, file_ino, file_path) =
        file_item(ret_ok, events::payload::RESULT).expect("file of the result");
    assert_eq!((dev >> 20, dev & 0xfffff, file_ino), (major, minor, ino));
    assert_eq!(file_path, "/etc/hostname");
    assert_eq!(returns[&open_bad.seq].ret, -2);
    // close(fd) names the same file at its entry.
    let close = py
        .iter()
        .find(|x| {
            x.kind == Kind::Entry && x.nr == 3 && x.args[0] as i64 == fd && x.seq > open_bad.seq
        })
        .expect("close(fd)");
    assert_eq!(file_item(close, 0).map(|f| f.1), Some(ino));
    assert_eq!(returns[&close.seq].ret, 0);

    // The consumer renders them strace-like.
    let mut tracer = tracer::Tracer::new("vm", "uuid");
    let mut events = Vec::new();
    for x in &py {
        tracer.feed(x, Instant::now(), &mut events);
    }
    let lines: Vec<String> = events.iter().map(|e| e.text()).collect();
    let want = format!("{pid:<5} python3         getpid() = {pid}");
    assert!(lines.contains(&want), "{want} in {lines:?}");
    let want = format!(
        "{pid:<5} python3         openat(AT_FDCWD, \"/etc/hostname\", O_RDONLY|O_CLOEXEC) = {fd}</etc/hostname>"
    );
    assert!(lines.contains(&want), "{want} in {lines:?}");
    assert!(lines.iter().any(|l| l.ends_with(
        "openat(AT_FDCWD, \"/nonexistent-vmwatch\", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory)"
    )));

    // 2. Two processes blocking in read on pipes: other tasks run on the
    // vCPUs meanwhile, and each return still pairs with its own entry.
    let script = "cat > /tmp/r.py <<'EOF'\n\
         import os, sys\n\
         print(os.getpid(), len(os.read(0, 100)), flush=True)\n\
         EOF\n\
         (sleep 3; echo aaaa) | python3 /tmp/r.py &\n\
         (sleep 4; echo bbbbbbbbb) | python3 /tmp/r.py &\n\
         wait";
    let (out, recs) = run_collect(&vm.0, &mut r, script);
    let mut printed: Vec<(u32, i64)> = out
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace().map(|x| x.parse::<i64>().unwrap());
            (w.next().unwrap() as u32, w.next().unwrap())
        })
        .collect();
    printed.sort();
    let by_seq: std::collections::HashMap<u64, &Record> = recs.iter().map(|x| (x.seq, x)).collect();
    let mut found = Vec::new();
    for ret in recs.iter().filter(|x| x.kind == Kind::Return && x.nr == 0) {
        let Some(e) = by_seq.get(&ret.entry_seq) else {
            continue;
        };
        if e.args[0] == 0 && e.args[2] == 100 {
            assert_eq!((e.tgid, e.task), (ret.tgid, ret.task));
            assert_eq!(
                file_item(e, 0).map(|f| f.2.starts_with("pipe:[")),
                Some(true)
            );
            let between = recs
                .iter()
                .filter(|x| x.seq > e.seq && x.seq < ret.seq && x.tgid != e.tgid)
                .count();
            found.push(((e.tgid, ret.ret), between));
        }
    }
    found.sort();
    let pairs: Vec<(u32, i64)> = found.iter().map(|f| f.0).collect();
    assert_eq!(pairs, printed, "{found:?}");
    assert_eq!(printed.iter().map(|p| p.1).collect::<Vec<_>>().len(), 2);
    assert!(found.iter().all(|(_, between)| *between > 0), "{found:?}");

    // 3. What the kernel writes back: recvmsg's sender address, and the fd
    // fcntl(F_DUPFD_CLOEXEC) returns (os.dup) named as the file it duplicates.
    let script = "cat > /tmp/m.py <<'EOF'\n\
         import os, socket\n\
         r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); r.bind(('127.0.0.1', 0))\n\
         w = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); w.bind(('127.0.0.1', 0))\n\
         w.sendto(b'hello', r.getsockname())\n\
         data, anc, flags, src = r.recvmsg(100)\n\
         fd = os.open('/etc/hostname', os.O_RDONLY)\n\
         print(os.getpid(), src[1], os.dup(fd))\n\
         EOF\n\
         python3 /tmp/m.py";
    let (out, recs) = run_collect(&vm.0, &mut r, script);
    let v: Vec<i64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    let (pid, port, dup) = (v[0] as u32, v[1] as u16, v[2]);
    let mine: Vec<&Record> = recs.iter().filter(|x| x.tgid == pid).collect();
    let recvmsg_ret = mine
        .iter()
        .find(|x| x.kind == Kind::Return && x.nr == 47 && x.ret == 5)
        .expect("recvmsg return");
    let src = recvmsg_ret
        .items()
        .find_map(|it| match it {
            Item::SockAddr { arg: 1, bytes, .. } => Some(bytes.to_vec()),
            _ => None,
        })
        .expect("recvmsg's msg_name");
    assert_eq!(
        &src[..8],
        &[2, 0, (port >> 8) as u8, port as u8, 127, 0, 0, 1]
    );
    let dup_ret = mine
        .iter()
        .find(|x| x.kind == Kind::Return && x.nr == 72 && x.ret == dup)
        .expect("fcntl(F_DUPFD_CLOEXEC) return");
    assert_eq!(
        file_item(dup_ret, events::payload::RESULT).map(|f| f.2),
        Some("/etc/hostname".to_string())
    );

    // 4. The filter changes at run time through the ring's control area, and
    // `vmwatch trace --syscall getpid --json` sees only getpid, each call
    // named with the pid getpid itself returned.
    drop(r);
    let args = trace_cmd::TraceArgs {
        vm: vm.0.info().name.clone(),
        syscall: vec!["getpid".into()],
        json: true,
        pid: None,
        comm: Some("python3".into()),
        fds: false,
        ring: None,
        count: Some(5),
        duration: Some(120.0),
    };
    let mut buf = Vec::new();
    std::thread::scope(|s| {
        let h = s.spawn(|| trace_cmd::run_to(&args, &mut buf, &|| false));
        std::thread::sleep(Duration::from_millis(500));
        sh(
            &vm.0,
            "python3 -c 'import os\nfor _ in range(20): os.getpid()'",
        );
        h.join().unwrap().expect("trace");
    });
    let text = String::from_utf8(buf).unwrap();
    let calls: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(calls.len(), 5, "{text}");
    for c in &calls {
        assert_eq!(c["syscall"], "getpid");
        assert_eq!(c["state"], "call");
        assert_eq!(c["comm"], "python3");
        assert_eq!(c["uuid"], vm.0.info().uuid.as_str());
        assert!(c["ret"].as_i64().unwrap() > 0);
        assert_eq!(c["pid"].as_i64(), c["ret"].as_i64(), "{c}");
    }
    let r = Ring::open(&vm.1).unwrap();
    assert_eq!(r.filter(), Filter::parse("getpid").unwrap());
    assert_eq!(r.fds(), Filter::NONE);
}

#[test]
fn plugin_events_match_the_guest_6_1_pti_on() {
    plugin_events_match_the_guest("p61", lab::Flavour::Stable, lab::vm::Pti::On);
}

#[test]
fn plugin_events_match_the_guest_6_12_pti_off() {
    plugin_events_match_the_guest("p612", lab::Flavour::Backports, lab::vm::Pti::Off);
}

#[test]
fn bad_plugin_arguments_fail_the_start_with_one_line() {
    let name = format!("t-badarg-{}", std::process::id());
    let mut opts = UpOptions::new(&name);
    opts.plugins.push(format!(
        "file={},ring=/dev/shm/vmwatch-{name}.ring,filter=openat:bogus",
        plugin_path().display()
    ));
    opts.boot_timeout = Duration::from_secs(60);
    let err = match Vm::up(&opts) {
        Ok(vm) => {
            let _ = vm.down();
            panic!("QEMU started with a bad filter");
        }
        Err(e) => e.to_string(),
    };
    // The lab keeps a failed VM's state for diagnosis; this one is expected.
    if let Ok(vm) = Vm::open(&name) {
        let _ = vm.down();
    }
    assert!(
        err.contains("hook-plugin: unknown syscall `bogus` in filter"),
        "{err}"
    );
}
