//! The daemon end to end without a VM: fake VMs (a ring we write records
//! into, `vm.json`, and a process standing in for QEMU) in a private lab
//! cache, the real `vmwatchd` binary on a private socket, and the CLI's
//! client.

mod common;

use std::time::Duration;

use common::{eventually, raw_request, Daemon, Events, FakeVm, TempRoot};
use events::{Filter, Ring};
use tracer::State;

const OPENAT: u64 = 257;
const READ: u64 = 0;
const GETPID: u64 = 39;
const WAIT: Duration = Duration::from_secs(10);

#[test]
fn token_is_required() {
    let root = TempRoot::new("auth");
    let cache = root.0.join("cache");
    let d = Daemon::start(&root.0.join("state"), Some(&cache), &[]);
    let sock = d.socket();
    // The token file and the socket are private to this user.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.state_dir.join("token")), 0o600);
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(d.token().len(), 64);

    for auth in [
        String::new(),
        "Authorization: Bearer 0123\r\n".to_string(),
        format!("Authorization: Bearer {}x\r\n", d.token()),
        format!("Authorization: Basic {}\r\n", d.token()),
    ] {
        let (status, body) = raw_request(
            &sock,
            &format!("GET /v1/vms HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
        );
        assert_eq!(status, 401, "{auth}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains("Authorization: Bearer"), "{msg}");
        assert!(!msg.contains('\n'));
        assert!(
            !body.contains(&d.token()),
            "the error must not leak the token"
        );
    }
    // Also unknown paths answer 401 first (nothing is learned without the token).
    let (status, _) = raw_request(
        &sock,
        "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 401);
    let (status, body) = raw_request(
        &sock,
        &format!(
            "GET /v1/health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            d.token()
        ),
    );
    assert_eq!(status, 200, "{body}");
    let c = d.client();
    let r = c.request("GET", "/nope", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(
        r.error_line().contains("no endpoint GET /nope"),
        "{}",
        r.error_line()
    );

    // A second daemon on the same state dir refuses, naming the first.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmwatchd"))
        .arg("--state-dir")
        .arg(&d.state_dir)
        .env("VMWATCH_CACHE", &cache)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().last().unwrap_or("");
    assert!(
        line.contains(&format!("another vmwatchd (pid {})", d.child.id())),
        "{err}"
    );
    // Non-loopback TCP is refused without --allow-remote.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmwatchd"))
        .args(["--listen", "0.0.0.0:0", "--state-dir"])
        .arg(root.0.join("state2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[test]
fn two_vms_stream_filters_union_and_a_dead_vm() {
    let root = TempRoot::new("stream");
    let cache = root.0.join("cache");
    let a = FakeVm::new(&root.0, &cache, "fake-a");
    let mut b = FakeVm::new(&root.0, &cache, "fake-b");
    let d = Daemon::start(&root.0.join("state"), Some(&cache), &[]);
    let c = d.client();

    // Watching: idempotent, and the VM shows with its identity.
    for vm in [&a, &b] {
        let v = c
            .call("POST", &format!("/v1/vms/{}/watch", vm.name), None)
            .unwrap();
        assert_eq!(v["state"], "watching");
        assert_eq!(v["uuid"], vm.uuid.as_str());
        assert_eq!(v["kernel_release"], "6.1.0-fake-amd64");
        // The log vault's doorbell is on in every watched VM (once the pump
        // has applied it); no syscall is.
        assert!(
            v["filter"] == "none" || v["filter"] == "log",
            "{}",
            v["filter"]
        );
        c.call("POST", &format!("/v1/vms/{}/watch", vm.name), None)
            .unwrap();
    }
    // The daemon owns the rings now.
    assert!(matches!(
        Ring::open(&a.ring),
        Err(events::RingError::Busy { .. })
    ));
    // Nobody subscribed: the plugin records nothing.
    assert!(!a.writer.wants(OPENAT) && !b.writer.wants(OPENAT));

    // A merged stream of openat,read and a stream of fake-a's getpid with fds.
    let merged = Events::open(&c, "/v1/trace?syscall=openat,read");
    // When the stream answers, the filters are in the rings.
    for vm in [&a, &b] {
        assert!(vm.writer.wants(OPENAT) && vm.writer.wants(READ));
        assert!(!vm.writer.wants(GETPID));
        assert!(!vm.writer.wants_fds(OPENAT));
    }
    let only_a = Events::open(&c, "/v1/vms/fake-a/trace?syscall=getpid&fds=1");
    assert!(a.writer.wants(GETPID) && a.writer.wants(OPENAT) && a.writer.wants(READ));
    assert!(a.writer.wants_fds(GETPID) && !a.writer.wants_fds(OPENAT));
    assert!(!b.writer.wants(GETPID) && !b.writer.wants_fds(GETPID));
    let vms = c.call("GET", "/v1/vms", None).unwrap();
    let va = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "fake-a")
        .unwrap();
    assert_eq!(va["filter"], "read,getpid,openat,log");
    assert_eq!(va["fds"], "getpid");
    assert_eq!(va["subscribers"], 2);

    // Calls in both VMs: each arrives with its own VM's name, uuid and pid.
    a.call(OPENAT, 101, 102, 3);
    b.call(OPENAT, 201, 201, 4);
    a.call(GETPID, 101, 101, 101);
    let mut seen = Vec::new();
    for _ in 0..2 {
        let ev = merged
            .wait_for(WAIT, |e| e.state == State::Call)
            .expect("openat call on the merged stream");
        seen.push((
            ev.vm.clone(),
            ev.uuid.clone(),
            ev.pid,
            ev.tid,
            ev.syscall.clone(),
            ev.ret,
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (
                "fake-a".into(),
                a.uuid.clone(),
                Some(101),
                Some(102),
                "openat".into(),
                Some(3)
            ),
            (
                "fake-b".into(),
                b.uuid.clone(),
                Some(201),
                Some(201),
                "openat".into(),
                Some(4)
            ),
        ]
    );
    // The per-VM stream has fake-a's getpid only (openat is not its syscall).
    let ev = only_a
        .wait_for(WAIT, |e| e.is_call())
        .expect("getpid on fake-a's stream");
    assert_eq!(
        (ev.vm.as_str(), ev.syscall.as_str(), ev.ret),
        ("fake-a", "getpid", Some(101))
    );
    assert_eq!(ev.uuid, a.uuid);
    // ... and the merged stream never shows getpid.
    assert!(merged
        .collect_for(Duration::from_millis(300))
        .iter()
        .all(|e| e.syscall != "getpid"));

    // Selection by pid on the server side.
    let by_pid = Events::open(&c, "/v1/vms/fake-b/trace?syscall=openat&pid=202");
    b.call(OPENAT, 201, 201, 5);
    b.call(OPENAT, 202, 202, 6);
    let ev = by_pid.wait_for(WAIT, |e| e.is_call()).unwrap();
    assert_eq!((ev.pid, ev.ret), (Some(202), Some(6)));
    drop(by_pid);

    // The last subscriber of fake-a leaving: its getpid goes, openat stays (merged).
    drop(only_a);
    assert!(
        eventually(WAIT, || !a.writer.wants(GETPID)
            && !a.writer.wants_fds(GETPID)),
        "fake-a's filter still has getpid after its stream closed"
    );
    assert!(a.writer.wants(OPENAT));

    // fake-b's QEMU dies: the merged stream reports it, fake-a keeps streaming.
    b.kill_qemu();
    let ev = merged
        .wait_for(WAIT, |e| e.state == State::VmStopped)
        .expect("vm_stopped for fake-b");
    assert_eq!(
        (ev.vm.as_str(), ev.uuid.as_str()),
        ("fake-b", b.uuid.as_str())
    );
    assert_eq!(ev.text(), "--- VM `fake-b` stopped ---");
    a.call(OPENAT, 111, 111, 7);
    let ev = merged
        .wait_for(WAIT, |e| e.is_call())
        .expect("fake-a after fake-b died");
    assert_eq!(
        (ev.vm.as_str(), ev.pid, ev.ret),
        ("fake-a", Some(111), Some(7))
    );
    let vb = c.call("GET", "/v1/vms/fake-b", None).unwrap();
    assert_eq!(vb["state"], "stopped", "{vb}");
    assert!(vb["message"]
        .as_str()
        .unwrap()
        .contains("vmwatch lab up fake-b"));
    assert_eq!(
        c.call("GET", "/v1/vms/fake-a", None).unwrap()["state"],
        "watching"
    );
    // A stopped VM cannot be subscribed to; the answer says what to do.
    let e = c.stream("/v1/vms/fake-b/trace").err().unwrap().to_string();
    assert!(e.contains("restart it with `vmwatch lab up fake-b`"), "{e}");
    let r = c.request("GET", "/v1/vms/fake-b/trace", None).unwrap();
    assert_eq!(r.status, 409);

    // Everyone leaves: the filter goes back to none.
    drop(merged);
    assert!(
        eventually(WAIT, || !a.writer.wants(OPENAT) && !a.writer.wants(READ)),
        "fake-a's filter is not back to none"
    );
    let health = c.call("GET", "/v1/health", None).unwrap();
    assert_eq!(health["subscribers"], 0);

    // Unwatching releases the ring: another reader can open it right away.
    c.call("DELETE", "/v1/vms/fake-a", None).unwrap();
    let r = Ring::open(&a.ring).expect("ring released");
    assert_eq!(r.filter(), Filter::NONE);
    let r2 = c.request("DELETE", "/v1/vms/fake-a", None).unwrap();
    assert_eq!(r2.status, 404);
    assert!(
        r2.error_line().contains("not watched"),
        "{}",
        r2.error_line()
    );
}

#[test]
fn bad_requests_get_one_line_errors() {
    let root = TempRoot::new("bad");
    let cache = root.0.join("cache");
    let a = FakeVm::new(&root.0, &cache, "fake-c");
    let d = Daemon::start(&root.0.join("state"), Some(&cache), &["--watch", "fake-c"]);
    let c = d.client();
    assert_eq!(
        c.call("GET", "/v1/vms/fake-c", None).unwrap()["state"],
        "watching"
    );

    let cases = [
        (
            "/v1/vms/fake-c/trace?syscall=openat,bogus",
            400,
            Filter::parse("openat,bogus").unwrap_err().to_string(),
        ),
        (
            "/v1/trace?syscall=9999",
            400,
            Filter::parse("9999").unwrap_err().to_string(),
        ),
        (
            "/v1/trace?pid=abc",
            400,
            "bad pid `abc`: use a process or thread id".into(),
        ),
        (
            "/v1/trace?fds=maybe",
            400,
            "bad fds `maybe`: use fds=1 or fds=0".into(),
        ),
        ("/v1/trace?sycall=read", 400, "bad query:".into()),
        ("/v1/vms/nope/trace", 404, "VM `nope` is not watched".into()),
    ];
    for (path, status, msg) in cases {
        let r = c.request("GET", path, None).unwrap();
        assert_eq!(r.status, status, "{path}");
        let line = r.error_line();
        assert!(line.starts_with(&msg), "{path}: {line}");
        assert!(!line.contains('\n'));
    }
    // Watching what is not there.
    let r = c.request("POST", "/v1/vms/no-such-vm/watch", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(
        r.error_line().contains("no lab VM `no-such-vm`"),
        "{}",
        r.error_line()
    );
    // Starting with a bad body.
    let r = c
        .request(
            "POST",
            "/v1/vms",
            Some(&serde_json::json!({"name": "x", "mem": 3})),
        )
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.error_line());
    let r = c
        .request(
            "POST",
            "/v1/vms",
            Some(&serde_json::json!({"name": "Bad_Name"})),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.error_line().contains("bad VM name"), "{}", r.error_line());
    let r = c
        .request(
            "POST",
            "/v1/vms",
            Some(&serde_json::json!({"name": "ok1", "flavour": "testing"})),
        )
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.error_line().contains("use stable or backports"));
    // A second reader of a watched ring is refused with what to do.
    let e = Ring::open(&a.ring).err().unwrap();
    assert!(matches!(e, events::RingError::Busy { .. }));
    // Wrong method.
    let r = c.request("PUT", "/v1/vms", None).unwrap();
    assert_eq!(r.status, 405);
}

#[test]
fn shutdown_leaves_filters_off_and_rings_free() {
    let root = TempRoot::new("shutdown");
    let cache = root.0.join("cache");
    let a = FakeVm::new(&root.0, &cache, "fake-d");
    let mut d = Daemon::start(&root.0.join("state"), Some(&cache), &["--watch-all"]);
    let c = d.client();
    assert!(eventually(WAIT, || c
        .call("GET", "/v1/vms/fake-d", None)
        .is_ok_and(|v| v["state"] == "watching")));
    // A VM that appears later is picked up by the scan.
    let b = FakeVm::new(&root.0, &cache, "fake-e");
    assert!(eventually(WAIT, || c
        .call("GET", "/v1/vms/fake-e", None)
        .is_ok_and(|v| v["state"] == "watching")));
    let s = Events::open(&c, "/v1/trace?syscall=all&fds=1");
    assert!(a.writer.wants(OPENAT) && a.writer.wants_fds(READ) && b.writer.wants(GETPID));
    let status = d
        .stop(Duration::from_secs(15))
        .expect("vmwatchd exits on SIGTERM");
    assert!(status.success(), "{status}");
    // The open stream ended, the guests pay nothing, the rings are free.
    assert!(s.ended_within(Duration::from_secs(5)));
    for vm in [&a, &b] {
        assert!(!vm.writer.wants(OPENAT) && !vm.writer.wants_fds(READ));
        Ring::open(&vm.ring).expect("ring free after shutdown");
    }
    assert!(!d.socket().exists());
    assert!(!d.state_dir.join("vmwatchd.pid").exists());
}
