//! Diffusion tracking end to end (issue 4): real lab VMs with the hook
//! plugin, one vmwatchd, paths registered through the API. Every assertion
//! compares the delta log with what the guest itself reports (pids printed
//! by the shell, inodes from `stat`), and asserts exact sets of managed
//! objects, not "something was logged".
//!
//! Needs the lab images (`scripts/setup.sh`) and the plugin .so
//! (`cargo build --release`).

#![allow(clippy::duplicate_mod)]

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{Daemon, DaemonClient, TempRoot};
use diffusion::{Change, DeltaEvent, ObjectInfo, ObjectKey};
use lab::{Flavour, ImagePaths, UpOptions, Vm};

const SECRET: &str = "/root/secret.txt";

struct Guard(Vm);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("cleanup of {}: {e}", self.0.name());
        }
    }
}

fn boot(tag: &str, flavour: Flavour) -> Guard {
    let paths = ImagePaths::for_flavour(&lab::util::cache_dir(), flavour);
    if let Err(e) = paths.load_info() {
        panic!("this test needs the lab images: {e} (run scripts/setup.sh)");
    }
    assert!(
        lab::vm::hook_plugin_path().is_some(),
        "libhook_plugin.so not found next to the test binary: run `cargo build --release`"
    );
    let mut opts = UpOptions::new(&format!("t-df{}-{tag}", std::process::id()));
    opts.flavour = flavour;
    opts.mem_bytes = 512 << 20;
    opts.boot_timeout = Duration::from_secs(240);
    Guard(Vm::up(&opts).expect("boot lab VM"))
}

/// Runs a script in the guest; its stdout (the test fails if it fails).
fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec_sh(script).expect("agent exec");
    assert!(
        out.success(),
        "{}: script failed ({}):\n{script}\nstdout: {}\nstderr: {}",
        vm.name(),
        out.code(),
        out.stdout_str(),
        out.stderr_str()
    );
    out.stdout_str()
}

/// `pid=N` / `ino:PATH=N` lines a guest script prints.
fn values(out: &str, key: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().parse().expect("number"))
        .collect()
}

fn value(out: &str, key: &str) -> u64 {
    let v = values(out, key);
    assert_eq!(v.len(), 1, "one `{key}=` line expected in:\n{out}");
    v[0]
}

/// The stored delta log of `vm` after event id `after`.
fn log_after(c: &DaemonClient, vm: &str, after: u64) -> Vec<DeltaEvent> {
    let r = c
        .request(
            "GET",
            &format!("/v1/vms/{vm}/diffusion/log?after={after}&format=json"),
            None,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.error_line());
    String::from_utf8_lossy(&r.body)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Polls the log until `done` holds for the events after `after`, then
/// waits a little longer so nothing extra is still on its way.
fn wait_log(
    c: &DaemonClient,
    vm: &str,
    after: u64,
    limit: Duration,
    done: impl Fn(&[DeltaEvent]) -> bool,
) -> Vec<DeltaEvent> {
    let until = Instant::now() + limit;
    loop {
        let evs = log_after(c, vm, after);
        if done(&evs) {
            // The 1 s RAM sweep and late records: give them time to show.
            std::thread::sleep(Duration::from_millis(2500));
            return log_after(c, vm, after);
        }
        assert!(
            Instant::now() < until,
            "the delta log of {vm} did not reach the expected state in {limit:?}; it has:\n{}",
            texts(&evs).join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn last_id(c: &DaemonClient, vm: &str) -> u64 {
    log_after(c, vm, 0).last().map_or(0, |e| e.id)
}

fn texts(evs: &[DeltaEvent]) -> Vec<String> {
    evs.iter().map(DeltaEvent::text).collect()
}

/// `kind label` of every added object, e.g. `process 774 cp`, `file /root/x`.
fn added(evs: &[DeltaEvent]) -> BTreeSet<String> {
    evs.iter()
        .filter_map(|e| match &e.change {
            Change::Added { object, info, .. } => {
                Some(format!("{} {}", object.kind(), info.label(object)))
            }
            _ => None,
        })
        .collect()
}

fn added_count(evs: &[DeltaEvent]) -> usize {
    evs.iter()
        .filter(|e| matches!(e.change, Change::Added { .. }))
        .count()
}

fn removed(evs: &[DeltaEvent]) -> BTreeSet<String> {
    evs.iter()
        .filter_map(|e| match &e.change {
            Change::Removed { label, reason, .. } => Some(format!("{label} ({reason})")),
            _ => None,
        })
        .collect()
}

/// Inode of an added file with this label.
fn file_ino(evs: &[DeltaEvent], path: &str) -> Option<u64> {
    evs.iter().find_map(|e| match &e.change {
        Change::Added {
            object: ObjectKey::File { ino, .. },
            info: ObjectInfo::File { .. },
            ..
        } if e.change.to_string().contains(&format!("+file {path} ")) => Some(*ino),
        _ => None,
    })
}

fn set(items: &[String]) -> BTreeSet<String> {
    items.iter().cloned().collect()
}

fn register(c: &DaemonClient, vm: &str, path: &str) -> serde_json::Value {
    c.call(
        "POST",
        &format!("/v1/vms/{vm}/track"),
        Some(&serde_json::json!({ "path": path })),
    )
    .expect("track add")
}

fn graph_json(c: &DaemonClient, vm: &str, at: Option<&str>) -> diffusion::Graph {
    let q = match at {
        Some(t) => format!("/v1/vms/{vm}/diffusion?format=json&at={t}"),
        None => format!("/v1/vms/{vm}/diffusion?format=json"),
    };
    let r = c.request("GET", &q, None).unwrap();
    assert_eq!(r.status, 200, "{}", r.error_line());
    serde_json::from_slice(&r.body).expect("graph JSON")
}

/// Labels of the objects managed in a graph (left ones excluded).
fn live_labels(g: &diffusion::Graph) -> BTreeSet<String> {
    g.live()
        .map(|n| format!("{} {}", n.object.kind(), n.label))
        .collect()
}

#[test]
fn diffusion_in_one_vm() {
    let root = TempRoot::new("diffusion");
    let vm = boot("one", Flavour::Stable);
    let vm = &vm.0;
    let name = vm.name().to_string();
    let mut daemon = Daemon::start(&root.0.join("state"), None, &[]);
    let c = daemon.client();

    // A process holding the secret before registration is managed at once
    // (bootstrap from the guest's open fds).
    let holder = sh(
        vm,
        "echo 'top secret' > /root/secret.txt; (exec 3</root/secret.txt; exec sleep 600) >/dev/null 2>&1 & echo pid=$!; sleep 0.3; echo ino=$(stat -c %i /root/secret.txt)",
    );
    let holder_pid = value(&holder, "pid");
    let secret_ino = value(&holder, "ino");
    let reg = register(&c, &name, SECRET);
    let evs = log_after(&c, &name, 0);
    assert_eq!(
        added(&evs),
        set(&[
            format!("file {SECRET}"),
            format!("process {holder_pid} sleep")
        ]),
        "registration: {reg}\n{}",
        texts(&evs).join("\n")
    );
    assert_eq!(file_ino(&evs, SECRET), Some(secret_ino));
    // Times print to the millisecond: one ms after the phase's last event.
    let t_registered = diffusion::format_time(evs.last().unwrap().at_ns + 1_000_000);

    // The paper's run: cp five times -> exactly five processes and five
    // files, then five process removals.
    let mark = last_id(&c, &name);
    let out = sh(
        vm,
        "for i in 1 2 3 4 5; do cp /root/secret.txt /root/copy0$i-secret.txt & echo pid=$!; wait; done; for i in 1 2 3 4 5; do echo ino$i=$(stat -c %i /root/copy0$i-secret.txt); done",
    );
    let pids = values(&out, "pid");
    assert_eq!(pids.len(), 5);
    let evs = wait_log(&c, &name, mark, Duration::from_secs(30), |e| {
        removed(e).len() >= 5
    });
    let mut want = BTreeSet::new();
    for (i, pid) in pids.iter().enumerate() {
        want.insert(format!("process {pid} cp"));
        want.insert(format!("file /root/copy0{}-secret.txt", i + 1));
    }
    assert_eq!(added(&evs), want, "{}", texts(&evs).join("\n"));
    assert_eq!(
        added_count(&evs),
        10,
        "one line per new object, never a re-dump"
    );
    assert_eq!(
        removed(&evs),
        pids.iter().map(|p| format!("{p} cp (exit)")).collect(),
    );
    for i in 1..=5 {
        assert_eq!(
            file_ino(&evs, &format!("/root/copy0{i}-secret.txt")),
            Some(value(&out, &format!("ino{i}"))),
            "inode of copy {i}"
        );
    }
    let t_copied = diffusion::format_time(evs.last().unwrap().at_ns + 1_000_000);

    // A negative: processes that never touch the secret stay unmanaged.
    let mark = last_id(&c, &name);
    sh(
        vm,
        "cat /etc/hostname > /tmp/unrelated.txt; ls /root > /tmp/ls.txt; echo x | gzip > /tmp/x.gz",
    );
    std::thread::sleep(Duration::from_secs(3));
    let evs = log_after(&c, &name, mark);
    assert!(evs.is_empty(), "unexpected:\n{}", texts(&evs).join("\n"));

    // cat | gzip | base64 > out: three processes, two pipes, one file.
    let mark = last_id(&c, &name);
    let out = sh(
        vm,
        "sh -c 'echo pid=$$ >&2; exec cat /root/secret.txt' 2>/tmp/p1 | sh -c 'echo pid=$$ >&2; exec gzip' 2>/tmp/p2 | sh -c 'echo pid=$$ >&2; exec base64' 2>/tmp/p3 > /root/out.b64; cat /tmp/p1 /tmp/p2 /tmp/p3; echo ino=$(stat -c %i /root/out.b64)",
    );
    let p = values(&out, "pid");
    let evs = wait_log(&c, &name, mark, Duration::from_secs(30), |e| {
        removed(e).len() >= 5
    });
    let pipes: Vec<String> = added(&evs)
        .into_iter()
        .filter(|a| a.starts_with("pipe "))
        .collect();
    assert_eq!(pipes.len(), 2, "{}", texts(&evs).join("\n"));
    let mut want: BTreeSet<String> = pipes.iter().cloned().collect();
    want.insert(format!("process {} cat", p[0]));
    want.insert(format!("process {} gzip", p[1]));
    want.insert(format!("process {} base64", p[2]));
    want.insert("file /root/out.b64".into());
    assert_eq!(added(&evs), want, "{}", texts(&evs).join("\n"));
    assert_eq!(file_ino(&evs, "/root/out.b64"), Some(value(&out, "ino")));
    // Both pipes leave once closed (the RAM sweep), the processes at exit.
    assert_eq!(removed(&evs).len(), 5, "{}", texts(&evs).join("\n"));

    // Reads by a process that is managed already add nothing: after the
    // first ones the plugin leaves them out (the quiet table), and what the
    // process writes afterwards is still followed.
    let quieted = |c: &DaemonClient| {
        c.call("GET", &format!("/v1/vms/{name}"), None).unwrap()["quieted"]
            .as_u64()
            .unwrap()
    };
    let q0 = quieted(&c);
    let mark = last_id(&c, &name);
    let out = sh(
        vm,
        r#"python3 -c '
import os, time
print("pid=%d" % os.getpid(), flush=True)
f = os.open("/root/secret.txt", os.O_RDONLY)
t = time.time()
while time.time() - t < 1.5:
    os.pread(f, 1, 0)
os.write(os.open("/root/after-loop.txt", os.O_WRONLY | os.O_CREAT), b"x")
'"#,
    );
    let pid = value(&out, "pid");
    let evs = wait_log(&c, &name, mark, Duration::from_secs(20), |e| {
        !removed(e).is_empty()
    });
    assert_eq!(
        added(&evs),
        set(&[
            format!("process {pid} python3"),
            "file /root/after-loop.txt".into()
        ]),
        "{}",
        texts(&evs).join("\n")
    );
    let q = quieted(&c) - q0;
    assert!(q >= 1000, "only {q} reads left out by the quiet table");

    // python3 reads the secret and writes a new file; sendfile and
    // copy_file_range copies; sh redirections with an fd inherited across fork.
    let mark = last_id(&c, &name);
    let out = sh(
        vm,
        r#"python3 -c '
import os
print("pid=%d" % os.getpid(), flush=True)
d = open("/root/secret.txt").read()
open("/root/py-copy.txt", "w").write(d)
a = os.open("/root/secret.txt", os.O_RDONLY)
b = os.open("/root/sendfile.txt", os.O_WRONLY | os.O_CREAT)
os.sendfile(b, a, 0, 100)
c = os.open("/root/cfr.txt", os.O_WRONLY | os.O_CREAT)
os.copy_file_range(a, c, 100, 0)
'
echo cfr=$(stat -c %s /root/cfr.txt)
sh -c 'exec 3</root/secret.txt; sh -c "echo pid=\$\$; exec cat <&3 > /root/redir.txt"'
"#,
    );
    let p = values(&out, "pid");
    assert_eq!(p.len(), 2);
    assert!(value(&out, "cfr") > 0, "copy_file_range copied nothing");
    let evs = wait_log(&c, &name, mark, Duration::from_secs(30), |e| {
        removed(e).len() >= 2
    });
    assert_eq!(
        added(&evs),
        set(&[
            format!("process {} python3", p[0]),
            "file /root/py-copy.txt".into(),
            "file /root/sendfile.txt".into(),
            "file /root/cfr.txt".into(),
            format!("process {} cat", p[1]),
            "file /root/redir.txt".into(),
        ]),
        "{}",
        texts(&evs).join("\n")
    );
    let via: Vec<String> = texts(&evs);
    assert!(via
        .iter()
        .any(|t| t.contains("+file /root/sendfile.txt  via sendfile by")));
    assert!(via
        .iter()
        .any(|t| t.contains("+file /root/cfr.txt  via copy_file_range by")));

    // mv then rm of a copy: the name follows, then the file leaves.
    let mark = last_id(&c, &name);
    sh(
        vm,
        "mv /root/copy01-secret.txt /root/moved.txt; rm /root/moved.txt",
    );
    let evs = wait_log(&c, &name, mark, Duration::from_secs(20), |e| {
        !removed(e).is_empty()
    });
    let t = texts(&evs);
    assert!(
        t.iter()
            .any(|l| l.contains("~file /root/copy01-secret.txt -> /root/moved.txt")),
        "{}",
        t.join("\n")
    );
    assert_eq!(
        removed(&evs),
        set(&["/root/moved.txt (unlink)".to_string()])
    );
    assert_eq!(added_count(&evs), 0);

    // A leak over TCP to the host: destination and bytes as sent.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got.len()
    });
    let mark = last_id(&c, &name);
    let out = sh(
        vm,
        &format!(
            r#"python3 -c '
import os, socket
print("pid=%d" % os.getpid(), flush=True)
s = socket.create_connection(("10.0.2.2", {port}))
s.sendall(open("/root/secret.txt", "rb").read())
s.close()
'"#
        ),
    );
    let pid = value(&out, "pid");
    let got = server.join().unwrap();
    let evs = wait_log(&c, &name, mark, Duration::from_secs(20), |e| {
        e.iter().any(|x| matches!(x.change, Change::Send { .. })) && !removed(e).is_empty()
    });
    let leaks: Vec<&DeltaEvent> = evs
        .iter()
        .filter(|e| matches!(e.change, Change::Send { .. }))
        .collect();
    assert_eq!(leaks.len(), 1, "{}", texts(&evs).join("\n"));
    match &leaks[0].change {
        Change::Send {
            by,
            dst,
            to_vm,
            bytes,
            ..
        } => {
            assert_eq!(by.tgid as u64, pid);
            assert_eq!(dst.to_string(), format!("10.0.2.2:{port}"));
            assert_eq!(*to_vm, None, "the host is no watched VM: a leak");
            assert_eq!(*bytes as usize, got, "bytes the host received");
        }
        _ => unreachable!(),
    }
    assert!(leaks[0]
        .text()
        .contains(&format!("!leak {pid} python3 -> 10.0.2.2:{port}")));

    // The holder killed by a signal (no exit_group): the RAM sweep removes it.
    let mark = last_id(&c, &name);
    sh(vm, &format!("kill -9 {holder_pid}"));
    let evs = wait_log(&c, &name, mark, Duration::from_secs(20), |e| {
        !removed(e).is_empty()
    });
    assert_eq!(
        removed(&evs),
        set(&[format!("{holder_pid} sleep (gone)")]),
        "{}",
        texts(&evs).join("\n")
    );

    // Time travel: the graph at three instants.
    let g = graph_json(&c, &name, Some(&t_registered));
    assert_eq!(
        live_labels(&g),
        set(&[
            format!("file {SECRET}"),
            format!("process {holder_pid} sleep")
        ])
    );
    let g = graph_json(&c, &name, Some(&t_copied));
    let mut want = set(&[
        format!("file {SECRET}"),
        format!("process {holder_pid} sleep"),
    ]);
    for i in 1..=5 {
        want.insert(format!("file /root/copy0{i}-secret.txt"));
    }
    assert_eq!(live_labels(&g), want);
    assert_eq!(
        g.nodes.iter().filter(|n| n.left.is_some()).count(),
        5,
        "the five cp processes are there, marked as left"
    );
    let now = graph_json(&c, &name, None);
    let now_live = live_labels(&now);
    assert!(!now_live.contains(&format!("process {holder_pid} sleep")));
    assert!(!now_live.contains("file /root/copy01-secret.txt"));
    assert!(now_live.contains("file /root/out.b64"));

    // A restart of the daemon loses no managed object and no history.
    let history = log_after(&c, &name, 0);
    assert!(daemon.stop(Duration::from_secs(20)).is_some());
    let daemon2 = Daemon::start(&root.0.join("state"), None, &[]);
    let c2 = daemon2.client();
    assert_eq!(log_after(&c2, &name, 0), history);
    assert_eq!(live_labels(&graph_json(&c2, &name, None)), now_live);
    let regs = c2
        .call("GET", &format!("/v1/vms/{name}/track"), None)
        .unwrap();
    assert_eq!(regs["registrations"][0]["path"], SECRET);
}

#[test]
fn diffusion_across_two_vms() {
    let root = TempRoot::new("diffusion2");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| boot("a", Flavour::Stable));
        let b = s.spawn(|| boot("b", Flavour::Backports));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (va, vb) = (&a.0, &b.0);
    let b_ip = vb.info().network.as_ref().expect("network").lan_ip;
    let daemon = Daemon::start(&root.0.join("state"), None, &[]);
    let c = daemon.client();
    c.call("POST", &format!("/v1/vms/{}/watch", vb.name()), None)
        .unwrap();
    sh(va, "echo 'top secret' > /root/secret.txt");
    register(&c, va.name(), SECRET);
    // The receiver in the second VM writes what it gets to a file; the
    // sender retries until the listener is up.
    let receiver_script = r#"python3 -c '
import os, socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9000)); s.listen(1)
print("pid=%d" % os.getpid(), flush=True)
c, _ = s.accept()
d = b""
while True:
    x = c.recv(4096)
    if not x: break
    d += x
open("/root/received.txt", "wb").write(d)
'"#;
    let sender_script = format!(
        r#"python3 -c '
import os, socket, time
print("pid=%d" % os.getpid(), flush=True)
for i in range(200):
    try:
        s = socket.create_connection(("{b_ip}", 9000)); break
    except OSError:
        time.sleep(0.1)
s.sendall(open("/root/secret.txt", "rb").read())
s.close()
'"#
    );
    let (out, recv_out) = std::thread::scope(|s| {
        let r = s.spawn(|| sh(vb, receiver_script));
        std::thread::sleep(Duration::from_secs(1));
        let out = sh(va, &sender_script);
        (out, r.join().unwrap())
    });
    let sender = value(&out, "pid");
    let receiver = value(&recv_out, "pid");
    // (stat, not cat: a process reading the copy would be managed too.)
    assert_eq!(sh(vb, "stat -c %s /root/received.txt"), "11\n");
    let evs_a = wait_log(&c, va.name(), 0, Duration::from_secs(30), |e| {
        e.iter().any(|x| matches!(x.change, Change::Send { .. }))
    });
    let sends: Vec<&DeltaEvent> = evs_a
        .iter()
        .filter(|e| matches!(e.change, Change::Send { .. }))
        .collect();
    assert_eq!(sends.len(), 1, "{}", texts(&evs_a).join("\n"));
    match &sends[0].change {
        Change::Send { by, dst, to_vm, .. } => {
            assert_eq!(by.tgid as u64, sender);
            assert_eq!(dst.to_string(), format!("{b_ip}:9000"));
            assert_eq!(to_vm.as_deref(), Some(vb.name()), "a flow, not a leak");
        }
        _ => unreachable!(),
    }
    let evs_b = wait_log(&c, vb.name(), 0, Duration::from_secs(30), |e| {
        added(e).contains("file /root/received.txt")
    });
    let labels = added(&evs_b);
    assert!(
        labels.contains(&format!("process {receiver} python3")),
        "{}",
        texts(&evs_b).join("\n")
    );
    let sock = evs_b
        .iter()
        .find(|e| {
            matches!(
                &e.change,
                Change::Added {
                    object: ObjectKey::Socket { .. },
                    ..
                }
            )
        })
        .expect("the receiving socket is managed");
    assert!(
        sock.text()
            .contains(&format!(" by {}:{sender} python3", va.name())),
        "cross-VM edge: {}",
        sock.text()
    );
    // The edge is in both graphs: a send to the other VM in the sender's,
    // a socket whose edge names the sender in the receiver's.
    let ga = graph_json(&c, va.name(), None);
    assert_eq!(ga.sends.len(), 1);
    assert_eq!(ga.sends[0].to_vm.as_deref(), Some(vb.name()));
    assert_eq!(u64::from(ga.sends[0].by.tgid), sender);
    let gb = graph_json(&c, vb.name(), None);
    assert!(gb
        .nodes
        .iter()
        .any(|n| n.edge.from.as_ref().and_then(|f| f.vm.as_deref()) == Some(va.name())));
    // Exactly: the socket, the receiver, its file.
    assert_eq!(labels.len(), 3, "{}", texts(&evs_b).join("\n"));
    assert!(removed(&evs_b)
        .iter()
        .all(|r| r.ends_with("(exit)") || r.ends_with("(closed)") || r.ends_with("(gone)")));
}
