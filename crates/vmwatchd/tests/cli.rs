//! `vmwatch trace` (the CLI's own trace_cmd.rs, compiled in) against the
//! daemon and without it, on a fake VM: through the daemon when it answers
//! (asking it to watch the VM), a one-line error when the daemon owns the
//! ring but its socket is gone, and reading the ring directly when no daemon
//! runs. One test function: it sets process-wide environment variables.

// The CLI's trace_cmd.rs carries its own copy of daemon_client.rs (so it
// compiles alone in the hook-plugin tests); common/ has one too.
#![allow(clippy::duplicate_mod)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{eventually, FakeVm, TempRoot};

#[allow(dead_code)]
#[path = "../../vmwatch/src/trace_cmd.rs"]
mod trace_cmd;

const OPENAT: u64 = 257;

fn args(vm: &str, json: bool, count: u64) -> trace_cmd::TraceArgs {
    trace_cmd::TraceArgs {
        vm: vm.to_string(),
        syscall: vec!["openat".into()],
        pid: None,
        comm: None,
        fds: false,
        json,
        ring: None,
        count: Some(count),
        duration: Some(20.0),
    }
}

/// Runs the CLI on a thread; once the fake VM's ring records openat, makes
/// `calls` openat calls (pids 300, 301, ...); returns the output.
fn trace_while_calling(
    args: &trace_cmd::TraceArgs,
    vm: &FakeVm,
    calls: u32,
) -> anyhow::Result<String> {
    let mut buf = Vec::new();
    let done = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let r = trace_cmd::run_to(args, &mut buf, &|| false);
            done.store(true, Ordering::Relaxed);
            r
        });
        if eventually(Duration::from_secs(10), || {
            done.load(Ordering::Relaxed) || vm.writer.wants(OPENAT)
        }) && !done.load(Ordering::Relaxed)
        {
            // The daemon applies the filter before answering; the direct
            // reader drains old records right after setting it.
            std::thread::sleep(Duration::from_millis(100));
            for i in 0..calls {
                vm.call(OPENAT, 300 + i, 300 + i, 3);
            }
        }
        h.join().unwrap()
    });
    r.map(|()| String::from_utf8(buf).unwrap())
}

#[test]
fn trace_cli_with_and_without_the_daemon() {
    let root = TempRoot::new("cli");
    let cache = root.0.join("cache");
    let state = root.0.join("state");
    std::env::set_var("VMWATCH_CACHE", &cache);
    std::env::set_var("VMWATCHD_DIR", &state);
    let a = FakeVm::new(&root.0, &cache, "fake-f");
    let b = FakeVm::new(&root.0, &cache, "fake-g");
    let mut d = common::Daemon::start(&state, Some(&cache), &[]);
    let c = d.client();

    // Through the daemon, which is asked to watch the VM first.
    assert_eq!(
        c.request("GET", "/v1/vms/fake-f", None).unwrap().status,
        404
    );
    let text = trace_while_calling(&args("fake-f", false, 2), &a, 2).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("300 ")
            && lines[0].contains("openat(AT_FDCWD")
            && lines[0].ends_with(" = 3"),
        "{text}"
    );
    assert!(lines[1].starts_with("301 "), "{text}");
    assert_eq!(
        c.call("GET", "/v1/vms/fake-f", None).unwrap()["state"],
        "watching"
    );

    // JSON lines pass through as the daemon sent them.
    let text = trace_while_calling(&args("fake-f", true, 1), &a, 1).unwrap();
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        (v["vm"].as_str(), v["uuid"].as_str()),
        (Some("fake-f"), Some(a.uuid.as_str()))
    );

    // `--vm '*'`: every watched VM, text lines prefixed with the VM.
    c.call("POST", "/v1/vms/fake-g/watch", None).unwrap();
    let text = trace_while_calling(&args("*", false, 1), &b, 1).unwrap();
    assert!(text.starts_with("fake-g       300 "), "{text}");

    // `vmwatch daemon status` (to be wired in main.rs), once the CLI's
    // streams are gone (the daemon notices a closed stream within moments).
    assert!(eventually(Duration::from_secs(10), || !a
        .writer
        .wants(OPENAT)
        && !b.writer.wants(OPENAT)));
    let mut out = Vec::new();
    trace_cmd::daemon_client::status(false, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!("vmwatchd pid {} up ", d.child.id())),
        "{text}"
    );
    assert!(lines[0].contains("2 VMs watched, 0 streams open"), "{text}");
    assert!(
        lines[2].starts_with("fake-f ")
            && lines[2].contains(" watching ")
            && lines[2].ends_with(" log"),
        "{text}"
    );
    let mut out = Vec::new();
    trace_cmd::daemon_client::status(true, &mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["vms"][1]["uuid"], b.uuid.as_str());

    // `--ring` reads directly: the daemon owns it, and the error says so.
    let mut direct = args("fake-f", false, 1);
    direct.ring = Some(a.ring.clone());
    let e = trace_cmd::run_to(&direct, &mut Vec::new(), &|| true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "the event ring {} of `fake-f` is owned by vmwatchd (pid {}): trace through it (drop --ring)",
            a.ring.display(),
            d.child.id()
        )
    );

    // The daemon's socket vanishes while it still owns the rings.
    std::fs::remove_file(d.socket()).unwrap();
    let e = trace_cmd::run_to(&args("fake-f", false, 1), &mut Vec::new(), &|| true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "the event ring {} of `fake-f` is owned by vmwatchd (pid {pid}), but its socket {} is gone: restart the daemon (`kill {pid}`, then `vmwatchd`)",
            a.ring.display(),
            d.socket().display(),
            pid = d.child.id()
        )
    );
    // `--vm '*'` needs the daemon.
    let e = trace_cmd::run_to(&args("*", false, 1), &mut Vec::new(), &|| true)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--vm '*' needs vmwatchd"), "{e}");

    // No daemon: the CLI reads the ring itself; status says what to do.
    assert!(d.stop(Duration::from_secs(15)).is_some_and(|s| s.success()));
    let e = trace_cmd::daemon_client::status(false, &mut Vec::new())
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("no vmwatchd answers at "), "{e}");
    assert!(!a.writer.wants(OPENAT), "the daemon left a filter on");
    let text = trace_while_calling(&args("fake-f", false, 1), &a, 1).unwrap();
    assert!(
        text.starts_with("300 ") && text.contains("openat("),
        "{text}"
    );
}
