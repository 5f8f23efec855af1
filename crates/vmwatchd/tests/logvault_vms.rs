//! The log vault end to end (issue 5): programs in a lab VM call syslog()
//! through the preloaded library (the lab image installs it in
//! /etc/ld.so.preload), the plugin catches each `cpuid` doorbell, and
//! vmwatchd stores the messages in the VM's vault on the host.
//!
//! Ground truth from the guest: the bytes each doorbell carried (the
//! library's test tee, `VMWATCH_SYSLOG_TEE`) and the datagrams a /dev/log
//! receiver got on the normal path (what glibc would have sent; the host
//! tests in guest/syslog/test.sh show those equal glibc's byte for byte).

#![allow(clippy::duplicate_mod)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, TempRoot};
use lab::vm::ExecOptions;
use lab::{UpOptions, Vm};
use logvault::StoredRecord;

struct Guard(Vm);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn sh(vm: &Vm, script: &str) -> String {
    let out = vm
        .exec_with(
            &["/bin/sh", "-c", script],
            &ExecOptions {
                timeout: Duration::from_secs(300),
                ..ExecOptions::default()
            },
        )
        .expect("agent exec");
    assert!(
        out.success(),
        "script failed:\n{script}\n{}\n{}",
        out.stdout_str(),
        out.stderr_str()
    );
    out.stdout_str()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A test program of guest/syslog/tests, linked dynamically against the
/// host's glibc (Debian bookworm's, as the guest's), copied into the guest.
fn install_program(vm: &Vm, dir: &Path, name: &str) {
    let src = workspace().join(format!("guest/syslog/tests/{name}.c"));
    let out = dir.join(name);
    let ok = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc")
        .success();
    assert!(ok, "gcc {}", src.display());
    let bytes = std::fs::read(&out).unwrap();
    let r = vm
        .exec_with(
            &[
                "/bin/sh",
                "-c",
                &format!("cat > /root/{name} && chmod +x /root/{name}"),
            ],
            &ExecOptions {
                stdin: Some(bytes),
                ..ExecOptions::default()
            },
        )
        .unwrap();
    assert!(r.success(), "{}", r.stderr_str());
}

/// "LEN SP BYTES LF" records (the library's tee), or "LEN LF BYTES"
/// (recv.py's dgram file).
fn parse_framed(data: &[u8], sep: u8) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let Some(p) = rest.iter().position(|&b| b == sep) else {
            panic!(
                "bad framing near {:?}",
                String::from_utf8_lossy(&rest[..rest.len().min(40)])
            );
        };
        let n: usize = std::str::from_utf8(&rest[..p])
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let body = &rest[p + 1..p + 1 + n];
        out.push(body.to_vec());
        rest = &rest[p + 1 + n..];
        if sep == b' ' {
            assert_eq!(rest.first(), Some(&b'\n'));
            rest = &rest[1..];
        }
    }
    out
}

fn guest_file(vm: &Vm, path: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let b64 = sh(vm, &format!("base64 -w0 {path}"));
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Write from another thread: the decoded bytes fill the stdout pipe
    // while the input is still going in.
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(b64.trim().as_bytes()));
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    writer.join().unwrap().unwrap();
    assert!(child.wait().unwrap().success());
    out
}

fn vault(state: &Path, vm: &str) -> Vec<StoredRecord> {
    logvault::read(&state.join("vault"), vm, &logvault::Query::all())
        .expect("vault")
        .map(|r| r.expect("record"))
        .collect()
}

/// Waits until the vault has `n` records of process `tgid`.
fn wait_for(state: &Path, vm: &str, tgid: u32, n: usize) -> Vec<StoredRecord> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let v: Vec<StoredRecord> = vault(state, vm)
            .into_iter()
            .filter(|r| r.record.tgid == tgid)
            .collect();
        if v.len() >= n || Instant::now() > until {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Joins the library's `[part k/n] ` parts back into whole messages.
fn reassemble(msgs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut open = false;
    for m in msgs {
        let marker = find(m, b"[part ");
        match marker {
            Some(i) => {
                let close = i + find(&m[i..], b"] ").expect("part marker") + 2;
                let (k, n) = {
                    let inner = std::str::from_utf8(&m[i + 6..close - 2]).unwrap();
                    let (k, n) = inner.split_once('/').unwrap();
                    (k.parse::<u32>().unwrap(), n.parse::<u32>().unwrap())
                };
                if k == 1 {
                    out.push(m[..i].to_vec());
                }
                out.last_mut().unwrap().extend_from_slice(&m[close..]);
                open = k < n;
            }
            None => {
                assert!(!open, "a whole message inside a split one");
                out.push(m.clone());
            }
        }
    }
    out
}

/// A 512 MiB lab VM named `t-TAG<pid>`.
fn boot(tag: &str) -> Guard {
    let mut opts = UpOptions::new(&format!("t-{tag}{}", std::process::id()));
    opts.mem_bytes = 512 << 20;
    Guard(Vm::up(&opts).expect("boot (run scripts/setup.sh)"))
}

/// The number of the `KEY=N` line the guest printed.
fn value(out: &str, key: &str) -> u32 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in {out}"))
        .trim()
        .parse()
        .unwrap()
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

#[test]
fn every_message_reaches_the_vault_once_and_intact() {
    let root = TempRoot::new("vault");
    let vm = boot("lv");
    let vm = &vm.0;
    let name = vm.name().to_string();
    let state = root.0.join("state");
    let mut daemon = Daemon::start(&state, None, &["--watch", &name]);
    install_program(vm, &root.0, "t_basic");
    install_program(vm, &root.0, "t_threads");
    let recv = std::fs::read(workspace().join("guest/syslog/tests/recv.py")).unwrap();
    vm.exec_with(
        &["/bin/sh", "-c", "cat > /root/recv.py"],
        &ExecOptions {
            stdin: Some(recv),
            ..ExecOptions::default()
        },
    )
    .unwrap();

    // A /dev/log receiver stands in for syslogd; three programs log: the C
    // program with every format, size and option, 16 threads x 200
    // messages, and python3's syslog module.
    let out = sh(
        vm,
        r#"rm -f /dev/log /tmp/*.tee /tmp/recv.out*
python3 /root/recv.py dgram /dev/log /tmp/recv.out &
r=$!
while [ ! -e /tmp/recv.out.ready ]; do sleep 0.05; done
VMWATCH_SYSLOG_TEE=/tmp/basic.tee /root/t_basic > /dev/null & echo basic=$!; wait $!
VMWATCH_SYSLOG_TEE=/tmp/threads.tee /root/t_threads 16 200 & echo threads=$!; wait $!
VMWATCH_SYSLOG_TEE=/tmp/py.tee python3 -c '
import os, syslog
print("py=%d" % os.getpid(), flush=True)
syslog.openlog("python3", syslog.LOG_PID)
for i in range(50):
    syslog.syslog(syslog.LOG_NOTICE, "python message %d: %s" % (i, "x" * i))
'
sleep 0.5; kill $r; wait $r || true"#,
    );
    let pid = |k: &str| value(&out, k);
    let (basic, threads, py) = (pid("basic"), pid("threads"), pid("py"));
    let received = parse_framed(&guest_file(vm, "/tmp/recv.out"), b'\n');
    for (who, tgid, tee) in [
        ("t_basic", basic, "/tmp/basic.tee"),
        ("t_threads", threads, "/tmp/threads.tee"),
        ("python3", py, "/tmp/py.tee"),
    ] {
        let rung = parse_framed(&guest_file(vm, tee), b' ');
        let stored = wait_for(&state, &name, tgid, rung.len());
        let stored_msgs: Vec<Vec<u8>> = stored.iter().map(|r| r.record.message.clone()).collect();
        // Exactly once each, byte for byte, in order.
        assert_eq!(
            stored_msgs.len(),
            rung.len(),
            "{who}: doorbells vs vault records"
        );
        assert!(
            stored_msgs == rung,
            "{who}: vault bytes differ from the doorbells'"
        );
        for r in &stored {
            assert_eq!(r.record.vm, name);
            assert_eq!(r.record.vm_uuid, vm.info().uuid);
            assert_eq!(
                r.record.tgid, tgid,
                "{who}: sender named from the guest kernel"
            );
            assert_eq!(r.record.uid, Some(0));
        }
        // What glibc sent on the normal path is in the vault too (messages
        // over 64 KiB as parts, joined here).
        let whole = reassemble(&stored_msgs);
        let mine: Vec<&Vec<u8>> = received.iter().filter(|d| whole.contains(d)).collect();
        assert!(!mine.is_empty(), "{who}: nothing from /dev/log matched");
        if who == "t_threads" {
            assert_eq!(whole.len(), 16 * 200);
            let mut sorted = whole.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), 16 * 200, "every thread message exactly once");
        }
        if who == "t_basic" {
            // Long messages were split into parts and join back exactly.
            assert!(stored
                .iter()
                .any(|r| r.record.flags & logvault::FLAG_PART != 0));
            assert!(whole.iter().any(|m| m.len() > 100 * 1024));
        }
        if who == "python3" {
            assert_eq!(stored.len(), 50);
            assert!(stored
                .iter()
                .all(|r| r.record.exe.as_deref() == Some("/usr/bin/python3.11")));
            assert!(stored
                .iter()
                .all(|r| r.record.flags & logvault::FLAG_TAG_MISMATCH == 0));
        }
    }
    // Every datagram glibc's path delivered for these programs is in the vault.
    let all_whole: Vec<Vec<u8>> = reassemble(
        &vault(&state, &name)
            .into_iter()
            .map(|r| r.record.message)
            .collect::<Vec<_>>(),
    );
    for d in &received {
        assert!(
            all_whole.contains(d),
            "a /dev/log message missing from the vault: {:?}",
            String::from_utf8_lossy(&d[..d.len().min(80)])
        );
    }

    // The attacker: root in the guest runs a syslogd, logs, then kills it
    // and wipes /var/log; a process lying about its name is flagged.
    let out = sh(
        vm,
        r#"mkdir -p /var/log; rm -f /dev/log; syslogd -n -O /var/log/messages & s=$!; sleep 0.5
python3 -c '
import os, syslog
print("a=%d" % os.getpid(), flush=True)
for i in range(10): syslog.syslog("before the wipe %d" % i)
'
grep -c "before the wipe" /var/log/messages
kill -9 $s; wait $s; rm -rf /var/log; mkdir /var/log
python3 -c '
import os, syslog
print("b=%d" % os.getpid(), flush=True)
syslog.openlog("sshd", syslog.LOG_PID)
for i in range(10): syslog.syslog("after the wipe %d" % i)
'
echo "left: $(ls -A /var/log | tr '\n' ' ')"; ls -A /var/log | wc -l"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"10"), "syslogd got the first ten: {out}");
    assert_eq!(lines.last(), Some(&"0"), "/var/log is empty: {out}");
    let (a, b) = (value(&out, "a"), value(&out, "b"));
    let before = wait_for(&state, &name, a, 10);
    let after = wait_for(&state, &name, b, 10);
    assert_eq!(before.len(), 10);
    assert_eq!(after.len(), 10);
    assert!(
        after
            .iter()
            .all(|r| r.record.flags & logvault::FLAG_TAG_MISMATCH != 0),
        "python3 calling itself sshd is flagged"
    );

    // Tampering on the host: an untouched vault verifies; one flipped byte
    // in a record is named.
    assert!(daemon.stop(Duration::from_secs(20)).is_some());
    let vdir = state.join("vault");
    let rep = logvault::verify(&vdir, &name).unwrap();
    assert!(rep.ok(), "untouched vault: {:?}", rep.first_bad);
    let records = vault(&state, &name);
    let target = records
        .iter()
        .find(|r| find(&r.record.message, b"thread 07 msg 0123").is_some())
        .expect("a thread message");
    let seg = std::fs::read_dir(vdir.join(&name))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("segment-")
                && find(&std::fs::read(p).unwrap(), b"thread 07 msg 0123").is_some()
        })
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = find(&bytes, b"thread 07 msg 0123").unwrap() + 7;
    bytes[at] ^= 0x01; // "msg 0123" -> "msg 1123"
    std::fs::write(&seg, &bytes).unwrap();
    let rep = logvault::verify(&vdir, &name).unwrap();
    let bad = rep.first_bad.expect("tampering detected");
    assert_eq!(bad.seq, target.seq, "names the modified record: {bad}");
}

#[test]
fn a_flooding_process_starves_no_one() {
    let root = TempRoot::new("flood");
    let vm = boot("lf");
    let vm = &vm.0;
    let name = vm.name().to_string();
    let state = root.0.join("state");
    let daemon = Daemon::start(
        &state,
        None,
        &["--watch", &name, "--log-rate", "100", "--log-burst", "1000"],
    );
    let client = daemon.client();
    install_program(vm, &root.0, "t_flood");
    const FLOOD: u64 = 1_000_000;
    let t0 = Instant::now();
    let (out, health_max) = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            sh(
                vm,
                &format!(
                    r#"VMWATCH_SYSLOG_LOCAL=0 /root/t_flood {FLOOD} & f=$!
python3 -c '
import os, syslog, time
print("good=%d" % os.getpid(), flush=True)
for i in range(100):
    syslog.syslog("well-behaved %d" % i)
    time.sleep(0.02)
'
wait $f"#
                ),
            )
        });
        // The host stays responsive meanwhile: the daemon answers at once.
        let mut worst = Duration::ZERO;
        while !guest.is_finished() {
            let t = Instant::now();
            client
                .call("GET", "/v1/health", None)
                .expect("daemon answers");
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(200));
        }
        (guest.join().unwrap(), worst)
    });
    let elapsed = t0.elapsed();
    let pid = |k: &str| value(&out, k);
    let (flooder, good) = (pid("flood"), pid("good"));
    let good_recs = wait_for(&state, &name, good, 100);
    let got: Vec<String> = good_recs
        .iter()
        .map(|r| {
            let m = String::from_utf8_lossy(&r.record.message).into_owned();
            m.split(": ").nth(1).unwrap_or("").to_string()
        })
        .collect();
    let want: Vec<String> = (0..100).map(|i| format!("well-behaved {i}")).collect();
    assert_eq!(
        got, want,
        "every message of the well-behaved process, once, in order"
    );
    std::thread::sleep(Duration::from_secs(1));
    let flood_recs = vault(&state, &name)
        .into_iter()
        .filter(|r| r.record.tgid == flooder)
        .count() as u64;
    let vm_view = client
        .call("GET", &format!("/v1/vms/{name}"), None)
        .unwrap();
    let refused = vm_view["log_refused"].as_u64().unwrap();
    let stats = client.call("GET", "/v1/logs/stats", None).unwrap();
    let daemon_dropped = stats["vms"][&name]["rate_dropped"].as_u64().unwrap_or(0);
    eprintln!(
        "flood: {FLOOD} calls in {:.1} s; stored {flood_recs}, refused in QEMU {refused}, dropped by the daemon {daemon_dropped}; ring drops {}; slowest health answer {:?}",
        elapsed.as_secs_f64(),
        vm_view["dropped"],
        health_max
    );
    assert_eq!(
        flood_recs + refused + daemon_dropped,
        FLOOD,
        "every flood message accounted for"
    );
    let bound = 1000 + 100 * elapsed.as_secs() + 200;
    assert!(
        flood_recs <= bound,
        "{flood_recs} flood messages stored, bound {bound}"
    );
    assert!(flood_recs >= 1000, "the burst gets through");
    assert_eq!(
        vm_view["dropped"].as_u64(),
        Some(0),
        "the ring lost nothing"
    );
    assert!(
        health_max < Duration::from_secs(2),
        "daemon answered within {health_max:?}"
    );
}
