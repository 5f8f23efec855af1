//! End-to-end: boot a lab guest with the hook plugin, run workloads whose
//! syscalls we know, and check what arrives through the event ring.
//!
//! Needs the lab images (`scripts/setup.sh`) and the plugin .so (built by
//! `cargo build --release`; this test builds it if it is missing).
//!
//! It lives in hook-plugin (not in crates/vmwatch/tests) because vmwatch does
//! not depend on `events` yet; it compiles vmwatch's `trace_cmd.rs` in through
//! `#[path]` so the consumer is exercised too.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use events::{Filter, Kind, Record, Ring, RingReader, NO_ENTRY};
use lab::{UpOptions, Vm};

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

fn plugin_path() -> PathBuf {
    // target/release/deps/trace-HASH -> target/release/libhook_plugin.so
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let so = dir.join("libhook_plugin.so");
    if !so.exists() {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "hook-plugin"]);
        if release {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "cargo build -p hook-plugin"
        );
    }
    so
}

fn boot(tag: &str, plugin_args: Option<&str>, cpus: u32) -> TestVm {
    let name = format!("t-{tag}-{}", std::process::id());
    let ring = trace_cmd::default_ring_path(&name);
    let mut opts = UpOptions::new(&name);
    opts.cpus = cpus;
    // This test loads the plugin itself (or, for the baseline, not at all).
    opts.hook = false;
    if let Some(extra) = plugin_args {
        opts.plugins.push(format!(
            "file={},ring={},vm={name}{extra}",
            plugin_path().display(),
            ring.display()
        ));
    }
    match Vm::up(&opts) {
        Ok(vm) => TestVm(vm, ring),
        Err(e) => panic!("cannot boot lab VM `{name}` ({e}); run scripts/setup.sh first"),
    }
}

fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec_sh(script).expect("agent exec");
    assert!(
        out.success(),
        "guest command failed: {script}\n{}\n{}",
        out.stdout_str(),
        out.stderr_str()
    );
    out.stdout_str()
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

#[test]
fn plugin_reports_known_syscalls_paired_per_task() {
    let vm = boot("trace", Some(",filter=all"), 2);
    let mut r = Ring::open(&vm.1).expect("ring");
    assert_eq!(r.vm_name(), vm.0.info().name);

    // 1. getpid N times, one open that works and one that fails, a close.
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
         print(pid, fd)\n\
         EOF\n\
         python3 /tmp/w.py",
        N_GETPID - 1
    );
    let (out, recs) = run_collect(&vm.0, &mut r, &script);
    let mut it = out.split_whitespace().map(|s| s.parse::<i64>().unwrap());
    let (pid, fd) = (it.next().unwrap(), it.next().unwrap());
    assert_eq!(r.dropped(), 0);

    let by_seq: std::collections::HashMap<u64, &Record> = recs.iter().map(|x| (x.seq, x)).collect();
    let returns: std::collections::HashMap<u64, &Record> = recs
        .iter()
        .filter(|x| x.kind == Kind::Return)
        .map(|x| (x.entry_seq, x))
        .collect();
    // Every return points at an entry of the same syscall and task.
    for ret in recs.iter().filter(|x| x.kind == Kind::Return) {
        assert_ne!(ret.entry_seq, NO_ENTRY);
        if let Some(e) = by_seq.get(&ret.entry_seq) {
            assert_eq!(
                (e.kind, e.nr, e.cr3 & !0x1fff),
                (Kind::Entry, ret.nr, ret.cr3 & !0x1fff)
            );
            assert!(e.seq < ret.seq);
        }
    }
    // getpid: between the getppid marker and the first openat, exactly N
    // entries from the python process, each with a return = pid.
    let marker = recs
        .iter()
        .filter(|x| x.kind == Kind::Entry && x.nr == 110)
        .find(|x| {
            recs.iter().any(|g| {
                g.kind == Kind::Entry
                    && g.nr == 39
                    && g.cr3 == x.cr3
                    && g.seq > x.seq
                    && returns.get(&g.seq).is_some_and(|r| r.ret == pid)
            })
        })
        .expect("getppid marker of the python process");
    let py_cr3 = marker.cr3;
    let first_open = recs
        .iter()
        .find(|x| x.kind == Kind::Entry && x.nr == 257 && x.cr3 == py_cr3 && x.seq > marker.seq)
        .expect("openat after the loop")
        .seq;
    let getpids: Vec<&Record> = recs
        .iter()
        .filter(|x| x.kind == Kind::Entry && x.nr == 39 && x.cr3 == py_cr3)
        .filter(|x| x.seq > marker.seq && x.seq < first_open)
        .collect();
    assert_eq!(getpids.len(), N_GETPID, "getpid calls of pid {pid}");
    assert!(getpids.iter().all(|g| returns[&g.seq].ret == pid));
    let unpaired_getpid = recs
        .iter()
        .filter(|x| x.kind == Kind::Entry && x.nr == 39 && x.cr3 == py_cr3)
        .filter(|x| !returns.contains_key(&x.seq))
        .count();
    assert_eq!(unpaired_getpid, 0);
    // openat(AT_FDCWD, path, O_RDONLY|O_CLOEXEC) = fd, then one = -ENOENT, then close(fd) = 0.
    let py: Vec<&Record> = recs.iter().filter(|x| x.cr3 == py_cr3).collect();
    let last_getpid = getpids.last().unwrap().seq;
    let opens: Vec<(&Record, i64)> = py
        .iter()
        .filter(|x| x.kind == Kind::Entry && x.nr == 257 && x.seq > last_getpid)
        .map(|x| (*x, returns[&x.seq].ret))
        .collect();
    assert_eq!(opens.len(), 2, "{opens:?}");
    assert_eq!(opens[0].0.args[0] as i32, -100);
    assert_eq!(opens[0].0.args[2] & 3, 0); // O_RDONLY
    assert_eq!(opens[0].1, fd);
    assert_eq!(opens[1].1, -2);
    let close = py
        .iter()
        .find(|x| {
            x.kind == Kind::Entry && x.nr == 3 && x.args[0] as i64 == fd && x.seq > opens[1].0.seq
        })
        .expect("close(fd)");
    assert_eq!(returns[&close.seq].ret, 0);

    // The consumer renders them strace-like.
    let mut tracer = trace_cmd::Tracer::new("vm", "uuid", false);
    let mut lines = Vec::new();
    for x in &py {
        tracer.feed(x, Instant::now(), &mut lines);
    }
    let text: Vec<&str> = lines.iter().map(|(l, _)| l.as_str()).collect();
    assert!(
        text.iter()
            .any(|l| l.contains(&format!("getpid() = {pid}"))),
        "{text:?}"
    );
    let open_line = format!(
        "openat(AT_FDCWD, {:#x}, O_RDONLY|O_CLOEXEC) = {fd}",
        opens[0].0.args[1]
    );
    assert!(
        text.iter().any(|l| l.ends_with(&open_line)),
        "{open_line} in {text:?}"
    );
    assert!(text
        .iter()
        .any(|l| l.ends_with("= -1 ENOENT (No such file or directory)")));

    // 2. Two processes blocking in read on pipes: other tasks run on the
    // vCPUs meanwhile, and each return still pairs with its own entry.
    let script = "cat > /tmp/r.py <<'EOF'\n\
         import os, sys\n\
         print(os.getpid(), len(os.read(0, 100)), flush=True)\n\
         EOF\n\
         (sleep 1; echo aaaa) | python3 /tmp/r.py &\n\
         (sleep 2; echo bbbbbbbbb) | python3 /tmp/r.py &\n\
         wait";
    let (out, recs) = run_collect(&vm.0, &mut r, script);
    let mut sizes: Vec<i64> = out
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    sizes.sort();
    assert_eq!(sizes, vec![5, 10]);
    let by_seq: std::collections::HashMap<u64, &Record> = recs.iter().map(|x| (x.seq, x)).collect();
    let mut found = Vec::new();
    for ret in recs.iter().filter(|x| x.kind == Kind::Return && x.nr == 0) {
        let Some(e) = by_seq.get(&ret.entry_seq) else {
            continue;
        };
        if e.args[0] == 0 && e.args[2] == 100 {
            assert_eq!(
                (e.cr3 & !0x1fff, e.task_key),
                (ret.cr3 & !0x1fff, ret.task_key)
            );
            let between = recs
                .iter()
                .filter(|x| x.seq > e.seq && x.seq < ret.seq && x.cr3 & !0x1fff != e.cr3 & !0x1fff)
                .count();
            found.push((ret.ret, between));
        }
    }
    found.sort();
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!((found[0].0, found[1].0), (5, 10));
    assert!(found.iter().all(|(_, between)| *between > 0), "{found:?}");

    // 3. The filter changes at run time through the ring's control area, and
    // `vmwatch trace --syscall getpid --json` sees only getpid.
    drop(r);
    let args = trace_cmd::TraceArgs {
        vm: vm.0.info().name.clone(),
        syscall: vec!["getpid".into()],
        json: true,
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
            // It stays alive a moment: pids are resolved from guest RAM when
            // the record is consumed, and an exited process shows as `?`.
            "python3 -c 'import os, time\nfor _ in range(20): os.getpid()\ntime.sleep(2)'",
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
        assert_eq!(c["uuid"], vm.0.info().uuid.as_str());
        assert!(c["ret"].as_i64().unwrap() > 0);
        // The process is named from guest RAM (CR3 -> mm->pgd) when the record
        // is consumed: getpid's own result is the ground truth for its pid. A
        // call from an address space already gone (busybox sh's getpid just
        // before it exec'd python3) is left unnamed, never misnamed.
        if !c["pid"].is_null() {
            assert_eq!(c["pid"].as_i64(), c["ret"].as_i64(), "{c}");
        }
    }
    let named = calls.iter().filter(|c| c["comm"] == "python3").count();
    assert!(named >= 3, "python3's getpid calls should be named: {text}");
    let r = Ring::open(&vm.1).unwrap();
    assert_eq!(r.filter(), Filter::parse("getpid").unwrap());
    assert_eq!(r.filter_generation(), 1);
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

/// Guest getpid latency without the plugin and with it (getpid outside the
/// filter; everything in the filter with a consumer draining). Prints the
/// ratios; run with `cargo test --release -p hook-plugin --test trace -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_getpid_latency() {
    let plain = boot("bplain", None, 1);
    let hooked = boot("bhook", Some(",filter=none"), 1);
    let mut r = Ring::open(&hooked.1).unwrap();
    let bench = "python3 -c 'import os,time\n\
        n=1000000\n\
        t=time.perf_counter()\n\
        for _ in range(n): os.getpid()\n\
        a=time.perf_counter()-t\n\
        t=time.perf_counter()\n\
        for _ in range(n): pass\n\
        b=time.perf_counter()-t\n\
        print((a-b)/n*1e6, a/n*1e6)'";
    let measure = |vm: &Vm, r: Option<&mut RingReader>| -> (f64, f64) {
        let out = match r {
            Some(r) => run_collect(vm, r, bench).0,
            None => sh(vm, bench),
        };
        let v: Vec<f64> = out.split_whitespace().map(|s| s.parse().unwrap()).collect();
        (v[0], v[1])
    };
    let mut rows: Vec<(&str, Vec<(f64, f64)>)> = vec![
        ("no plugin", vec![]),
        ("plugin, filter=none", vec![]),
        ("plugin, filter=openat:read", vec![]),
        ("plugin, filter=all (drained)", vec![]),
    ];
    for _round in 0..5 {
        rows[0].1.push(measure(&plain.0, None));
        r.set_filter(&Filter::NONE);
        rows[1].1.push(measure(&hooked.0, None));
        r.set_filter(&Filter::parse("openat:read").unwrap());
        rows[2].1.push(measure(&hooked.0, Some(&mut r)));
        r.set_filter(&Filter::ALL);
        rows[3].1.push(measure(&hooked.0, Some(&mut r)));
    }
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.partial_cmp(b).unwrap());
        x[x.len() / 2]
    };
    let base_net = med(&rows[0].1, |x| x.0);
    let base_loop = med(&rows[0].1, |x| x.1);
    println!(
        "getpid under TCG, python3 loop of 1000000, median of 5 rounds (dropped {})",
        r.dropped()
    );
    for (name, v) in &rows {
        let net = med(v, |x| x.0);
        let lp = med(v, |x| x.1);
        println!(
            "{name:32} getpid {net:7.3} us (x{:.3})   loop iteration {lp:7.3} us (x{:.3})",
            net / base_net,
            lp / base_loop
        );
    }
}
