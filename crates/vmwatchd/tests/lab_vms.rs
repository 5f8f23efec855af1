//! One daemon, seven real lab VMs (QEMU TCG with the hook plugin): each
//! guest's `cat /etc/hostname` arrives through the merged stream with that
//! VM's name, SMBIOS UUID and the pid the guest printed; a VM whose QEMU is
//! killed is reported while another keeps delivering; and `vmwatch trace`
//! (the CLI's code) goes through the daemon.
//!
//! Needs the lab images (`scripts/setup.sh`) and the plugin .so next to the
//! test binary's directory (`cargo build --release`). Boots 7 x 512 MiB VMs.

// The CLI's trace_cmd.rs carries its own copy of daemon_client.rs (so it
// compiles alone in the hook-plugin tests); common/ has one too.
#![allow(clippy::duplicate_mod)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Daemon, Events, TempRoot};
use lab::{Flavour, ImagePaths, UpOptions, Vm};
use tracer::State;

#[allow(dead_code)]
#[path = "../../vmwatch/src/trace_cmd.rs"]
mod trace_cmd;

struct Guard(Vm);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("cleanup of {}: {e}", self.0.name());
        }
    }
}

fn require_image() {
    let paths = ImagePaths::for_flavour(&lab::util::cache_dir(), Flavour::Stable);
    if let Err(e) = paths.load_info() {
        panic!("this test needs the stable lab image: {e} (run scripts/setup.sh)");
    }
    assert!(
        lab::vm::hook_plugin_path().is_some(),
        "libhook_plugin.so not found next to the test binary: run `cargo build --release`"
    );
}

/// Runs `sh -c 'echo $$; exec cat /etc/hostname'`: the pid that opens the file, and the hostname.
fn cat_hostname(vm: &Vm) -> (u32, String) {
    let out = vm
        .exec_sh("sh -c 'echo $$; exec cat /etc/hostname'")
        .expect("agent exec");
    assert!(out.success(), "{}", out.stderr_str());
    let text = out.stdout_str();
    let mut lines = text.lines();
    let pid = lines.next().unwrap().trim().parse().unwrap();
    (pid, lines.next().unwrap_or("").trim().to_string())
}

fn is_hostname_open(ev: &tracer::TraceEvent, vm: &Vm, pid: u32) -> bool {
    ev.state == State::Call
        && ev.vm == vm.name()
        && ev.syscall == "openat"
        && ev.pid == Some(pid)
        && ev.paths.iter().any(|(_, p)| p == "/etc/hostname")
}

#[test]
fn one_daemon_seven_vms() {
    require_image();
    let t0 = Instant::now();
    let names: Vec<String> = (0..7)
        .map(|i| format!("t-d{}-{i}", std::process::id()))
        .collect();
    let boots: Vec<_> = names
        .iter()
        .cloned()
        .map(|name| {
            std::thread::spawn(move || {
                let mut opts = UpOptions::new(&name);
                opts.mem_bytes = 512 << 20;
                opts.boot_timeout = Duration::from_secs(240);
                Vm::up(&opts)
            })
        })
        .collect();
    let results: Vec<_> = boots.into_iter().map(|h| h.join().unwrap()).collect();
    let mut vms = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(vm) => vms.push(Guard(vm)),
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(errors.is_empty(), "boot failures: {errors:#?}");
    eprintln!("7 VMs up after {:.1} s", t0.elapsed().as_secs_f64());

    // The daemon on a private state dir, over the default lab cache; it
    // watches exactly these VMs (not --watch-all: other VMs there are not ours).
    let root = TempRoot::new("lab");
    let state = root.0.join("state");
    let d = Daemon::start(&state, None, &[]);
    let c = d.client();
    for vm in &vms {
        let v = c
            .call("POST", &format!("/v1/vms/{}/watch", vm.0.name()), None)
            .unwrap();
        assert_eq!(v["uuid"], vm.0.info().uuid.as_str());
        assert_eq!(v["kernel_release"], vm.0.info().kernel_release.as_str());
    }
    let merged = Events::open(&c, "/v1/trace?syscall=openat");
    let list = c.call("GET", "/v1/vms", None).unwrap();
    let ours: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| names.iter().any(|n| v["name"] == n.as_str()))
        .collect();
    assert_eq!(ours.len(), 7);
    assert!(ours
        .iter()
        .all(|v| v["state"] == "watching" && v["filter"] == "openat,log"));

    // Each guest opens /etc/hostname; the guest prints the pid that did.
    let mut expected = Vec::new();
    for vm in &vms {
        let (pid, host) = cat_hostname(&vm.0);
        assert_eq!(host, vm.0.name());
        expected.push((vm, pid));
    }
    let until = Instant::now() + Duration::from_secs(30);
    let mut missing: Vec<_> = expected.clone();
    while !missing.is_empty() && Instant::now() < until {
        let Some(ev) = merged.wait_for(Duration::from_secs(1), |e| e.state == State::Call) else {
            continue;
        };
        if let Some(i) = missing
            .iter()
            .position(|(vm, pid)| is_hostname_open(&ev, &vm.0, *pid))
        {
            let (vm, _) = missing.remove(i);
            assert_eq!(ev.uuid, vm.0.info().uuid, "{}", ev.vm);
            assert_eq!(ev.comm.as_deref(), Some("cat"));
            assert!(ev.ret.is_some_and(|r| r >= 0), "{ev:?}");
        }
    }
    assert!(
        missing.is_empty(),
        "no openat(/etc/hostname) from {:?}",
        missing
            .iter()
            .map(|(v, p)| (v.0.name(), *p))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "7 VMs' calls seen after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // The CLI's `vmwatch trace --vm NAME --comm cat --json --count 1`, via the daemon.
    std::env::set_var("VMWATCHD_DIR", &state);
    let args = trace_cmd::TraceArgs {
        vm: vms[2].0.name().to_string(),
        syscall: vec!["openat".into()],
        pid: None,
        comm: Some("cat".into()),
        fds: true,
        json: true,
        ring: None,
        count: Some(1),
        duration: Some(60.0),
    };
    let mut buf = Vec::new();
    let started = AtomicBool::new(false);
    let pid = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let r = trace_cmd::run_to(&args, &mut buf, &|| {
                started.store(true, Ordering::Relaxed);
                false
            });
            r.expect("trace through the daemon")
        });
        // The CLI checks `stop` once its stream is open (filters applied).
        while !started.load(Ordering::Relaxed) && !h.is_finished() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (pid, _) = cat_hostname(&vms[2].0);
        h.join().unwrap();
        pid
    });
    let line: serde_json::Value = serde_json::from_slice(&buf).unwrap();
    assert_eq!(line["vm"], vms[2].0.name(), "{line}");
    assert_eq!(line["uuid"], vms[2].0.info().uuid.as_str());
    assert_eq!(line["comm"], "cat");
    // The first openat of cat is the dynamic loader's; the pid is the shell's (exec).
    assert_eq!(line["pid"].as_u64(), Some(u64::from(pid)), "{line}");

    // Kill one VM's QEMU: the merged stream says so; the others go on.
    let victim = &vms[0].0;
    victim.kill_qemu().unwrap();
    let ev = merged
        .wait_for(Duration::from_secs(20), |e| e.state == State::VmStopped)
        .expect("vm_stopped");
    assert_eq!(ev.vm, victim.name());
    assert_eq!(ev.uuid, victim.info().uuid);
    let (pid, _) = cat_hostname(&vms[1].0);
    let ev = merged
        .wait_for(Duration::from_secs(20), |e| {
            is_hostname_open(e, &vms[1].0, pid)
        })
        .expect("another VM still delivers after one died");
    assert_eq!(ev.uuid, vms[1].0.info().uuid);
    let v = c
        .call("GET", &format!("/v1/vms/{}", victim.name()), None)
        .unwrap();
    assert_eq!(v["state"], "stopped");
    let v = c
        .call("GET", &format!("/v1/vms/{}", vms[1].0.name()), None)
        .unwrap();
    assert_eq!(v["state"], "watching");
    assert_eq!(v["dropped"], 0);
    eprintln!("done after {:.1} s", t0.elapsed().as_secs_f64());
    drop(merged);
    drop(d);
}
