//! End-to-end: lab VMs with QEMU's gdbstub, the breakpoint backend writing
//! its events into a ring, checked against what the guest itself prints,
//! and against the TCG plugin watching the very same execution.
//!
//! Needs the lab images (`scripts/setup.sh`); the plugin .so for the second
//! test (`cargo build --release`; built here if missing). Under TCG every
//! syscall costs the guest ~15 ms while hooked (each gdbstub stop flushes
//! QEMU's translation cache), so the workloads are small.

#[path = "../../lab/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{boot, unique_name, VmGuard};
use events::payload::Item;
use events::{Filter, Kind, Record, Ring, RingReader, RingWriter, NO_ENTRY};
use gdb_hook::{GdbHook, Options, Stats};
use lab::{UpOptions, Vm};
use labtest::{plugin_path, profile_dir, sh};

fn boot_gdb(tag: &str, plugin: bool) -> VmGuard {
    let mut opts = UpOptions::new(&unique_name(tag));
    opts.cpus = 2;
    opts.gdbstub = true;
    opts.hook = plugin;
    if plugin {
        // Built if missing; lab finds it next to the test binary.
        plugin_path();
    }
    boot(&opts)
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

/// Attaches the backend to `vm`, runs `script` in the guest while it is
/// hooked, detaches. Returns the guest's stdout, the backend's records,
/// its counters, and what `also` (another ring, e.g. the plugin's) got
/// meanwhile.
fn hooked(
    vm: &Vm,
    ring_path: &Path,
    filter: &Filter,
    fds: &Filter,
    options: &Options,
    script: &str,
    mut also: Option<&mut RingReader>,
) -> (String, Vec<Record>, Stats, Vec<Record>) {
    struct RemoveOnDrop<'a>(&'a Path);
    impl Drop for RemoveOnDrop<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _cleanup = RemoveOnDrop(ring_path);
    let ring = RingWriter::create(ring_path, 1 << 17, vm.name(), filter, fds).expect("ring");
    let mut reader = Ring::open(ring_path).expect("open ring");
    let mut hook = GdbHook::attach(vm, options).expect("attach");
    let info = hook.info().clone();
    assert!(info.vcpus == 2, "{info:?}");
    assert!(info.paused < Duration::from_secs(1), "{info:?}");
    if let Some(r) = &mut also {
        drain(r, &mut Vec::new());
    }
    let stop = AtomicBool::new(false);
    let mut recs = Vec::new();
    let mut other = Vec::new();
    let (out, stats) = std::thread::scope(|s| {
        let h = s.spawn(|| hook.run(&ring, &|| stop.load(Ordering::Relaxed)));
        let w = s.spawn(|| sh(vm, script));
        while !w.is_finished() {
            drain(&mut reader, &mut recs);
            if let Some(r) = &mut also {
                drain(r, &mut other);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Stop the hook whatever the workload did, then report.
        let out = w.join();
        stop.store(true, Ordering::Relaxed);
        let stats = h.join().unwrap().expect("hook run");
        let out = out.unwrap_or_else(|e| std::panic::resume_unwind(e));
        (out, stats)
    });
    drain(&mut reader, &mut recs);
    if let Some(r) = &mut also {
        std::thread::sleep(Duration::from_millis(100));
        drain(r, &mut other);
    }
    assert_eq!(reader.dropped(), 0);
    assert_eq!(stats.dropped, 0);
    eprintln!("{}", stats.summary());
    (out, recs, stats, other)
}

/// Entries of thread group `tgid` with their returns.
fn calls(recs: &[Record], tgid: u32) -> Vec<(&Record, Option<&Record>)> {
    let returns: HashMap<u64, &Record> = recs
        .iter()
        .filter(|r| r.kind == Kind::Return && r.entry_seq != NO_ENTRY)
        .map(|r| (r.entry_seq, r))
        .collect();
    recs.iter()
        .filter(|r| r.kind == Kind::Entry && r.tgid == tgid)
        .map(|e| (e, returns.get(&e.seq).copied()))
        .collect()
}

fn path_of(rec: &Record, arg: u8) -> Option<String> {
    rec.items().find_map(|it| match it {
        Item::Str { arg: a, bytes, .. } if a == arg => {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
        _ => None,
    })
}

const N_GETPID: usize = 40;

/// A python process that makes known calls between two markers
/// (`lseek(-1, 1111, 0)` and `lseek(-1, 2222, 0)`, which fail with EBADF
/// and nothing else makes) and prints the values they must return: its
/// pid, the fd, its ppid.
const WORKLOAD: &str = r#"cat > /tmp/w.py <<'EOF'
import os
def mark(n):
    try:
        os.lseek(-1, n, 0)
    except OSError:
        pass
mark(1111)
pid = os.getpid()
for _ in range(N - 1):
    os.getpid()
fd = os.open('/etc/hostname', os.O_RDONLY)
try:
    os.open('/nonexistent-vmwatch', os.O_RDONLY)
except FileNotFoundError:
    pass
os.close(fd)
ppid = os.getppid()
mark(2222)
print(pid, fd, ppid)
EOF
python3 /tmp/w.py"#;

fn workload(n: usize) -> String {
    WORKLOAD.replace("range(N - 1)", &format!("range({})", n - 1))
}

/// Checks the python process's calls between its two `getppid` markers
/// against the values it printed: pid, fd, ppid.
fn check_against_guest(out: &str, recs: &[Record], n: usize) {
    let v: Vec<i64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
    let (pid, fd, ppid) = (v[0], v[1], v[2]);
    let calls = calls(recs, pid as u32);
    let marker = |n: u64| {
        calls
            .iter()
            .position(|(e, _)| {
                e.name() == "lseek" && e.args[0] as i32 == -1 && e.args[1..3] == [n, 0]
            })
            .unwrap_or_else(|| panic!("marker lseek(-1, {n}, 0) of the python process"))
    };
    let (first, last) = (marker(1111), marker(2222));
    let window = &calls[first..=last];
    let got: Vec<(u32, &str, Option<i64>)> = window
        .iter()
        .map(|(e, r)| (e.pid, e.name(), r.map(|r| r.ret)))
        .collect();
    let p = pid as u32;
    let ebadf = Some(-9);
    let mut want = vec![(p, "lseek", ebadf)];
    want.extend(vec![(p, "getpid", Some(pid)); n]);
    want.extend([
        (p, "openat", Some(fd)),
        (p, "openat", Some(-2)),
        (p, "close", Some(0)),
        (p, "getppid", Some(ppid)),
        (p, "lseek", ebadf),
    ]);
    assert_eq!(got, want);
    for (e, r) in window {
        let r = r.unwrap();
        assert!(e.has_task() && r.has_task());
        assert_eq!((e.tgid, r.pid, r.tgid, r.task), (p, p, p, e.task));
        assert!(e.seq < r.seq);
        assert_eq!((r.nr, r.args), (e.nr, e.args));
        assert!(
            e.items().any(|it| it == Item::Comm(&b"python3"[..])),
            "{e:?}"
        );
    }
    let opens: Vec<&(&Record, Option<&Record>)> = window
        .iter()
        .filter(|(e, _)| e.name() == "openat")
        .collect();
    assert_eq!(opens[0].0.args[0] as i32, -100);
    assert_eq!(opens[0].0.args[2] & 3, 0);
    assert_eq!(path_of(opens[0].0, 1).as_deref(), Some("/etc/hostname"));
    assert_eq!(
        path_of(opens[1].0, 1).as_deref(),
        Some("/nonexistent-vmwatch")
    );
    let close = window.iter().find(|(e, _)| e.name() == "close").unwrap();
    assert_eq!(close.0.args[0] as i64, fd);
    // Consumers render it from the ring as they do the plugin's records.
    assert_eq!(
        events::format::call(opens[0].0, opens[0].1),
        "openat(AT_FDCWD, \"/etc/hostname\", O_RDONLY|O_CLOEXEC)"
    );
}

fn gdb_ring(vm: &Vm) -> PathBuf {
    PathBuf::from(format!("/dev/shm/vmwatch-{}-gdb.ring", vm.name()))
}

#[test]
fn breakpoints_report_the_guests_own_syscalls() {
    let vm = boot_gdb("gdb", false);
    let filter = Filter::parse("getpid,getppid,openat,close,lseek").unwrap();
    // The consumers' place: `vmwatch trace --vm NAME` would read it.
    let path = lab::vm::hook_ring_path(vm.name());

    // 1. Default: past the breakpoints without single-steps where the
    // kernel allows (6.1: both sites), return breakpoint armed on demand.
    let (out, recs, stats, _) = hooked(
        &vm,
        &path,
        &filter,
        &Filter::NONE,
        &Options::default(),
        &workload(N_GETPID),
        None,
    );
    check_against_guest(&out, &recs, N_GETPID);
    assert_eq!(stats.steps, 0, "6.1 needs no single-steps");
    // Returns are stopped at only for recorded entries (plus a few that
    // raced with arming), far fewer than all syscalls.
    assert!(stats.return_hits < stats.entry_hits, "{stats:?}");
    assert!(stats.records as usize >= recs.len());

    // 2. The portable path (KVM's): single-step with the breakpoint removed.
    let options = Options {
        always_step: true,
        remove_to_step: Some(true),
        ..Options::default()
    };
    let (out, recs, stats, _) = hooked(
        &vm,
        &path,
        &filter,
        &Filter::NONE,
        &options,
        &workload(5),
        None,
    );
    check_against_guest(&out, &recs, 5);
    assert_eq!(stats.steps, stats.entry_hits + stats.return_hits);

    // 3. Detached, the guest runs as before: no breakpoint left behind.
    let t = std::time::Instant::now();
    sh(
        &vm,
        "python3 -c 'import os\nfor _ in range(20000): os.getpid()'",
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "guest still slow after detach: {:?}",
        t.elapsed()
    );

    // 4. The command line (`vmwatch hook gdb`, built as the `hook_cli`
    // example from vmwatch's hook_cmd.rs): ring where consumers look,
    // a second backend refused, Ctrl-C detaches and prints the summary.
    cli_hooks_until_interrupted(&vm);
}

/// The same on bookworm-backports' 6.12 kernel, whose entry code differs
/// (IBT `endbr64` first, `x64_sys_call` dispatch, another return path
/// after `do_syscall_64`).
#[test]
fn breakpoints_on_the_6_12_kernel() {
    let mut opts = UpOptions::new(&unique_name("gdb612"));
    opts.flavour = lab::Flavour::Backports;
    opts.cpus = 2;
    opts.gdbstub = true;
    opts.hook = false;
    let vm = boot(&opts);
    let filter = Filter::parse("getpid,getppid,openat,close,lseek,execve").unwrap();
    let (out, recs, stats, _) = hooked(
        &vm,
        &gdb_ring(&vm),
        &filter,
        &Filter::NONE,
        &Options::default(),
        &workload(10),
        None,
    );
    check_against_guest(&out, &recs, 10);
    // The return site there is `test %al,%al; je <iret path>`, emulated:
    // execve returns through the iret path (al = 0), the rest through sysret.
    assert_eq!(stats.steps, 0, "6.12 needs no single-steps either");
    let pid: u32 = out.split_whitespace().next().unwrap().parse().unwrap();
    let exec = calls(&recs, pid)
        .into_iter()
        .filter(|(e, _)| e.name() == "execve")
        .map(|(e, r)| (path_of(e, 0), r.map(|r| r.ret)))
        .next_back();
    assert_eq!(
        exec,
        Some((Some("/usr/bin/python3".to_string()), Some(0))),
        "python's execve and its return"
    );
}

/// target/<profile>/examples/hook_cli, built if needed.
fn hook_cli() -> PathBuf {
    let dir = profile_dir();
    let release = dir.file_name().is_some_and(|n| n == "release");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q", "-p", "gdb-hook", "--example", "hook_cli"]);
    if release {
        cmd.arg("--release");
    }
    assert!(
        cmd.status().unwrap().success(),
        "cargo build --example hook_cli"
    );
    dir.join("examples").join("hook_cli")
}

fn cli_hooks_until_interrupted(vm: &Vm) {
    let cli = hook_cli();
    let ring = lab::vm::hook_ring_path(vm.name());
    let child = Command::new(&cli)
        .args(["gdb", "--vm", vm.name(), "--syscall", "getpid"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // On a failed assertion: no stray backend, no stray ring.
    struct Kill(std::process::Child, PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_file(&self.1);
        }
    }
    let mut child = Kill(child, ring.clone());
    // The backend creates its ring first, then attaches: it says when the
    // breakpoints are in.
    let (armed_tx, armed_rx) = std::sync::mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("Ctrl-C to stop") {
                let _ = armed_tx.send(());
            }
        }
    });
    // Attached once the ring exists with the backend as its writer.
    let t = std::time::Instant::now();
    let mut reader = loop {
        if let Ok(r) = Ring::open(&ring) {
            if r.writer_pid() == u64::from(child.0.id()) {
                break r;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no ring from hook_cli"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // A second backend on the same VM is refused with one line.
    let second = Command::new(&cli)
        .args(["gdb", "--vm", vm.name()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(
        err.contains("is live, written by pid") && err.trim().lines().count() == 1,
        "{err}"
    );
    armed_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("hook_cli attached");
    // Events arrive where `vmwatch trace --vm NAME` reads them.
    let out = sh(
        vm,
        "python3 -c 'import os\nprint(os.getpid())\nfor _ in range(4): os.getpid()'",
    );
    let pid: u32 = out.trim().parse().unwrap();
    // On a loaded host the last records may still be on their way.
    let mut recs = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let rets: Vec<i64> = loop {
        drain(&mut reader, &mut recs);
        let rets: Vec<i64> = calls(&recs, pid)
            .iter()
            .filter(|(e, r)| e.name() == "getpid" && r.is_some())
            .map(|(_, r)| r.expect("paired").ret)
            .collect();
        if rets.len() >= 5 || std::time::Instant::now() > until {
            break rets;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Ours, and any the interpreter makes itself while starting.
    assert!(rets.len() >= 5, "{rets:?}");
    assert!(rets.iter().all(|&r| r == i64::from(pid)), "{rets:?}");
    // Ctrl-C: it detaches, says what it did, removes its ring.
    // SAFETY: kill(2) on the pid of a child we spawned and still own.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGINT) }, 0);
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = child.0.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "hook_cli did not stop on SIGINT"
    );
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert!(
        stdout.starts_with(&format!("vmwatch: VM `{}`: ", vm.name())) && stdout.contains("records"),
        "{stdout}"
    );
    assert!(!ring.exists());
    sh(vm, "true");
}

/// The TCG plugin and the breakpoint backend watch the same execution in one
/// VM (plugin loaded and gdbstub open): every record of the python process
/// must be the same in both rings (number, arguments, result, thread,
/// captured strings and files), apart from what the backends are allowed to
/// differ in (the ring position and time, the return instruction's address).
#[test]
fn plugin_and_breakpoints_record_the_same_events() {
    let vm = boot_gdb("both", true);
    let plugin_ring = vm.info().ring.clone().expect("plugin ring");
    let mut plugin = Ring::open(&plugin_ring).expect("plugin ring");
    let filter = Filter::ALL;
    let fds = Filter::parse("openat,close,read,fstat,lseek,ioctl,dup,fcntl").unwrap();
    plugin.set_filter(&filter);
    plugin.set_fds(&fds);
    let (out, recs, _, theirs) = hooked(
        &vm,
        &gdb_ring(&vm),
        &filter,
        &fds,
        &Options::default(),
        &workload(5),
        Some(&mut plugin),
    );
    assert_eq!(plugin.dropped(), 0);
    let pid: u32 = out.split_whitespace().next().unwrap().parse().unwrap();
    let ours = normalize(&recs, pid);
    let theirs = normalize(&theirs, pid);
    // The whole life of the process: execve, loader, interpreter start-up,
    // the workload, exit_group.
    assert!(ours.len() > 200, "{}", ours.len());
    let execve = ours
        .iter()
        .position(|l| l.starts_with("E execve "))
        .expect("execve");
    assert!(
        ours.iter()
            .any(|l| l.starts_with(&format!("R execve = 0 of #Some({execve})"))),
        "execve's return (through iretq) is paired"
    );
    if ours != theirs {
        let dump = std::env::temp_dir().join(format!("gdb-vs-plugin-{}", std::process::id()));
        let _ = std::fs::write(dump.with_extension("gdb.txt"), ours.join("\n"));
        let _ = std::fs::write(dump.with_extension("plugin.txt"), theirs.join("\n"));
        let diffs: Vec<String> = ours
            .iter()
            .zip(&theirs)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(6)
            .map(|(i, (a, b))| format!("#{i}\n gdb:    {a}\n plugin: {b}"))
            .collect();
        panic!(
            "backends differ (gdb {} records, plugin {}; all in {}.*.txt):\n{}",
            ours.len(),
            theirs.len(),
            dump.display(),
            diffs.join("\n")
        );
    }
}

/// Records of thread group `tgid` as comparable lines: returns name their
/// entry by position in this list instead of by ring seq.
fn normalize(recs: &[Record], tgid: u32) -> Vec<String> {
    let mine: Vec<&Record> = recs.iter().filter(|r| r.tgid == tgid).collect();
    let index: HashMap<u64, usize> = mine
        .iter()
        .enumerate()
        .filter(|(_, r)| r.kind == Kind::Entry)
        .map(|(i, r)| (r.seq, i))
        .collect();
    mine.iter()
        .map(|r| match r.kind {
            Kind::Entry => format!(
                "E {} args {:x?} vcpu {} pid {} task {:#x} flags {} rip {:#x} cr3 {:#x} items {:?}",
                r.name(),
                r.args,
                r.vcpu,
                r.pid,
                r.task,
                r.flags,
                r.rip,
                r.cr3 & !0x1fff,
                r.items().collect::<Vec<_>>()
            ),
            // No CR3: the plugin does not read it at a return it pairs by
            // thread (0); this backend has it for free.
            Kind::Return => format!(
                "R {} = {} of #{:?} args {:x?} vcpu {} pid {} task {:#x} flags {} items {:?}",
                r.name(),
                r.ret,
                index.get(&r.entry_seq),
                r.args,
                r.vcpu,
                r.pid,
                r.task,
                r.flags,
                r.items().collect::<Vec<_>>()
            ),
            // Log doorbells are the plugin's alone (cpuid is no breakpoint).
            Kind::Log => format!("L {} bytes", r.payload.len()),
        })
        .collect()
}
