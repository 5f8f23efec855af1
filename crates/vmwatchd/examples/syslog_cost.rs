//! What the log vault costs a guest (issue 5; paper 002's figures):
//! syslog() and getppid() latency with the vault's library preloaded and
//! the daemon storing every message, versus the same VM with the library
//! taken out of /etc/ld.so.preload, in one run.
//!
//! ```sh
//! cargo build --release
//! target/release/examples/syslog_cost [CALLS] [ROUNDS]
//! ```
//!
//! One lab VM (1 vCPU, TCG) with busybox syslogd writing /var/log/messages
//! (the normal local path in both configurations) and vmwatchd watching it.
//! A dynamically linked C program (guest/bench/syslog_bench.c) times CALLS
//! syslog() calls (default 20,000) and CALLS getppid() calls; rounds
//! alternate the two configurations; medians are printed as Markdown.

#[allow(dead_code)]
#[path = "../../vmwatch/src/daemon_client.rs"]
mod daemon_client;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lab::vm::ExecOptions;
use lab::{UpOptions, Vm};

struct Down(Vm);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn sh(vm: &Vm, script: &str) -> Result<String> {
    let out = vm.exec_with(
        &["/bin/sh", "-c", script],
        &ExecOptions {
            timeout: Duration::from_secs(600),
            ..ExecOptions::default()
        },
    )?;
    if !out.success() {
        bail!("`{script}` failed: {}", out.stderr_str());
    }
    Ok(out.stdout_str())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let calls: u64 = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let rounds: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3)
        .max(1);
    let exe = std::env::current_exe()?;
    let target = exe.ancestors().nth(2).context("target dir")?.to_path_buf();
    if std::env::var_os("VMWATCH_HOOK_PLUGIN").is_none() {
        std::env::set_var("VMWATCH_HOOK_PLUGIN", target.join("libhook_plugin.so"));
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/bench/syslog_bench.c");
    let bin = target.join("syslog_bench");
    if !Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()?
        .success()
    {
        bail!("gcc failed for {}", src.display());
    }
    let vm = Down(Vm::up(&UpOptions::new(&format!(
        "bench-log-{}",
        std::process::id()
    )))?);
    let vm = &vm.0;
    let out = vm.exec_with(
        &[
            "/bin/sh",
            "-c",
            "cat > /root/syslog_bench && chmod +x /root/syslog_bench",
        ],
        &ExecOptions {
            stdin: Some(std::fs::read(&bin)?),
            ..ExecOptions::default()
        },
    )?;
    if !out.success() {
        bail!("install: {}", out.stderr_str());
    }
    sh(
        vm,
        "mkdir -p /var/log; syslogd -O /var/log/messages; sleep 0.3",
    )?;
    let state = std::env::temp_dir().join(format!("vmwatch-logbench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state)?;
    let mut daemon = Command::new(target.join("vmwatchd"))
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--watch",
            vm.name(),
            "--log-rate",
            "1000000",
            "--log-burst",
            "1000000",
        ])
        .env("VMWATCHD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("vmwatchd")?;
    let until = Instant::now() + Duration::from_secs(20);
    while daemon_client::DaemonClient::discover_in(&state)?.is_none() {
        if Instant::now() > until {
            bail!("vmwatchd did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let (mut with_s, mut without_s, mut with_p, mut without_p) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        for preload in [true, false] {
            sh(
                vm,
                if preload {
                    "[ -e /etc/ld.so.preload.off ] && mv /etc/ld.so.preload.off /etc/ld.so.preload; true"
                } else {
                    "mv /etc/ld.so.preload /etc/ld.so.preload.off"
                },
            )?;
            let s: f64 = sh(vm, &format!("/root/syslog_bench syslog {calls}"))?
                .trim()
                .parse()?;
            // Let the guest's syslogd and the daemon finish the burst first:
            // getppid is timed on a quiet machine in both configurations.
            std::thread::sleep(Duration::from_secs(2));
            let p: f64 = sh(vm, &format!("/root/syslog_bench getppid {}", calls * 10))?
                .trim()
                .parse()?;
            if preload {
                with_s.push(s);
                with_p.push(p);
            } else {
                without_s.push(s);
                without_p.push(p);
            }
        }
    }
    sh(
        vm,
        "[ -e /etc/ld.so.preload.off ] && mv /etc/ld.so.preload.off /etc/ld.so.preload; true",
    )?;
    // A web server that logs every request through syslog (python3's
    // http.server), and a client in the same guest fetching a 1 KiB file
    // for a fixed time: requests per second with and without the library.
    let server = r#"cat > /root/web.py <<'PY'
import socket, syslog, os
syslog.openlog("web", syslog.LOG_PID)
body = b"x" * 1024
head = b"HTTP/1.0 200 OK\r\nContent-Length: 1024\r\n\r\n"
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8088)); s.listen(64)
while True:
    c, a = s.accept()
    req = c.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
    c.sendall(head + body)
    c.close()
    syslog.syslog(syslog.LOG_INFO, "%s:%d \"%s\" 200 1024" % (a[0], a[1], req))
PY"#;
    sh(vm, server)?;
    let web_round = |vm: &Vm| -> Result<f64> {
        let out = sh(
            vm,
            r#"python3 /root/web.py >/dev/null 2>&1 & w=$!; sleep 1.5
python3 -c '
import socket, time
n = 0; t = time.time()
while time.time() - t < 5:
    c = socket.create_connection(("127.0.0.1", 8088))
    c.sendall(b"GET /f1k HTTP/1.0\r\n\r\n")
    got = b""
    while True:
        x = c.recv(4096)
        if not x: break
        got += x
    c.close(); n += 1
print(n / (time.time() - t))
'
kill $w"#,
        )?;
        Ok(out.trim().parse()?)
    };
    let (mut with_w, mut without_w) = (vec![], vec![]);
    for _ in 0..rounds {
        for preload in [true, false] {
            sh(
                vm,
                if preload {
                    "[ -e /etc/ld.so.preload.off ] && mv /etc/ld.so.preload.off /etc/ld.so.preload; true"
                } else {
                    "mv /etc/ld.so.preload /etc/ld.so.preload.off"
                },
            )?;
            std::thread::sleep(Duration::from_secs(1));
            let r = web_round(vm)?;
            if preload {
                with_w.push(r);
            } else {
                without_w.push(r);
            }
        }
    }
    sh(
        vm,
        "[ -e /etc/ld.so.preload.off ] && mv /etc/ld.so.preload.off /etc/ld.so.preload; true",
    )?;
    let client = daemon_client::DaemonClient::discover_in(&state)?.context("daemon")?;
    let stats = client.call("GET", "/v1/logs/stats", None)?;
    // SAFETY: kill() has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM) };
    let _ = daemon.wait();
    let (ws, wos, wp, wop) = (
        median(with_s),
        median(without_s),
        median(with_p),
        median(without_p),
    );
    println!("guest latency (ns per call, median of {rounds} rounds; {calls} syslog, {} getppid calls per round; TCG, 1 vCPU; busybox syslogd on /dev/log; vmwatchd storing)", calls * 10);
    println!();
    println!("| call | without the library | with the library (vault) | change |");
    println!("|---|---|---|---|");
    println!(
        "| syslog() | {wos:.0} | {ws:.0} | {:+.1} % |",
        (ws / wos - 1.0) * 100.0
    );
    println!(
        "| getppid() | {wop:.0} | {wp:.0} | {:+.1} % |",
        (wp / wop - 1.0) * 100.0
    );
    let (ww, wow) = (median(with_w), median(without_w));
    println!(
        "| web server, requests/s, each logged via syslog | {wow:.1} | {ww:.1} | {:.1} % of baseline |",
        ww / wow * 100.0
    );
    println!();
    println!("vault stats: {}", stats["vms"][vm.name()]);
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
