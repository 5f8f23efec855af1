//! Paper 001's experiment: syscall latency in one VM while n-1 other VMs
//! run a read() loop, with diffusion tracking on in all n VMs versus the
//! same VMs unwatched, for n = 1, 2, 4, 7.
//!
//! ```sh
//! cargo build --release
//! target/release/examples/diffusion_fleet [CALLS]
//! ```
//!
//! Boots 7 lab VMs (1 vCPU, 256 MiB, TCG, the hook plugin loaded), copies
//! a static C program (guest/bench/latency.c) into each, and creates
//! /root/secret.txt and /root/plain.txt. For each n: VMs 1..n-1 start a
//! pread64 loop on their secret; VM 0 times CALLS (default 20,000) getpid,
//! pread64 of the plain file and pread64 of the secret, one call at a time
//! inside the guest. First unwatched (no vmwatchd: the rings' filter is
//! `none`), then watched: a fresh vmwatchd with /root/secret.txt registered
//! in all n VMs (so every read of it is a record the diffusion engine
//! handles; the reader becomes managed). Prints avg, median, p99 and max in
//! µs, and the watched/unwatched ratios, as Markdown.

#[allow(dead_code)]
#[path = "../../vmwatch/src/daemon_client.rs"]
mod daemon_client;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use daemon_client::DaemonClient;
use lab::vm::ExecOptions;
use lab::{UpOptions, Vm};

const VMS: usize = 7;

struct Down(Vm);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill() has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(15);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn build(target: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/bench/latency.c");
    let out = target.join("latency");
    let ok = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .context("gcc (install gcc and libc6-dev)")?
        .success();
    if !ok {
        bail!("gcc -static failed for {}", src.display());
    }
    Ok(out)
}

fn sh(vm: &Vm, script: &str) -> Result<String> {
    let out = vm.exec_with(
        &["/bin/sh", "-c", script],
        &ExecOptions {
            timeout: Duration::from_secs(900),
            ..ExecOptions::default()
        },
    )?;
    if !out.success() {
        bail!("{}: `{script}` failed: {}", vm.name(), out.stderr_str());
    }
    Ok(out.stdout_str())
}

/// avg, median, p99, max in ns.
fn measure(vm: &Vm, args: &str) -> Result<[f64; 4]> {
    let out = sh(vm, &format!("/root/latency {args}"))?;
    let v: Vec<f64> = out
        .split_whitespace()
        .map(|x| x.parse::<f64>())
        .collect::<Result<_, _>>()?;
    if v.len() != 4 {
        bail!("unexpected output: {out}");
    }
    Ok([v[0], v[1], v[2], v[3]])
}

fn start_daemon(bin: &Path, state: &Path) -> Result<(Daemon, DaemonClient)> {
    let _ = std::fs::remove_dir_all(state);
    std::fs::create_dir_all(state)?;
    let child = Command::new(bin)
        .arg("--state-dir")
        .arg(state)
        .env("VMWATCHD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(state.with_extension("log"))?)
        .spawn()
        .context("start vmwatchd")?;
    let d = Daemon(child);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(c) = DaemonClient::discover_in(state)? {
            if c.call("GET", "/v1/health", None).is_ok() {
                return Ok((d, c));
            }
        }
        if Instant::now() > until {
            bail!("vmwatchd did not answer");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn us(ns: f64) -> String {
    format!("{:.2}", ns / 1000.0)
}

fn main() -> Result<()> {
    let calls: u64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20_000);
    let exe = std::env::current_exe()?;
    let target = exe.ancestors().nth(2).context("target dir")?.to_path_buf();
    let daemon_bin = target.join("vmwatchd");
    if !daemon_bin.exists() {
        bail!(
            "{} not found: run `cargo build --release`",
            daemon_bin.display()
        );
    }
    if std::env::var_os("VMWATCH_HOOK_PLUGIN").is_none() {
        std::env::set_var("VMWATCH_HOOK_PLUGIN", target.join("libhook_plugin.so"));
    }
    let bin = std::fs::read(build(&target)?)?;
    let tag = std::process::id();
    let t0 = Instant::now();
    let boots: Vec<_> = (0..VMS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut o = UpOptions::new(&format!("fleet{i}-{tag}"));
                o.mem_bytes = 256 << 20;
                o.boot_timeout = Duration::from_secs(300);
                Vm::up(&o)
            })
        })
        .collect();
    let mut vms = Vec::new();
    for b in boots {
        vms.push(Down(b.join().map_err(|_| anyhow::anyhow!("boot thread"))??));
    }
    eprintln!("{VMS} VMs up in {:.1} s", t0.elapsed().as_secs_f64());
    for vm in &vms {
        let out = vm.0.exec_with(
            &["sh", "-c", "cat > /root/latency && chmod +x /root/latency && echo secret > /root/secret.txt && echo plain > /root/plain.txt"],
            &ExecOptions {
                stdin: Some(bin.clone()),
                ..ExecOptions::default()
            },
        )?;
        if !out.success() {
            bail!("install in {}: {}", vm.0.name(), out.stderr_str());
        }
    }
    let state = std::env::temp_dir().join(format!("vmwatch-fleet-{tag}"));
    let tests = [
        ("getpid", format!("getpid {calls}")),
        (
            "read, unmanaged file",
            format!("read {calls} /root/plain.txt"),
        ),
        (
            "read, managed file",
            format!("read {calls} /root/secret.txt"),
        ),
    ];
    println!("syscall latency in VM 0 (µs, {calls} calls each, timed in the guest); n-1 other VMs run a pread64 loop; TCG, 1 vCPU each, {} host cores", std::thread::available_parallelism().map_or(0, |n| n.get()));
    println!();
    println!("| n | syscall | unwatched avg / median / p99 / max | watched avg / median / p99 / max | ratio median | ratio p99 |");
    println!("|---|---|---|---|---|---|");
    for n in [1usize, 2, 4, 7] {
        for vm in &vms[1..n] {
            sh(
                &vm.0,
                "setsid /root/latency readloop /root/secret.txt >/dev/null 2>&1 < /dev/null & echo started",
            )?;
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut plain = Vec::new();
        for (_, args) in &tests {
            plain.push(measure(&vms[0].0, args)?);
        }
        let (daemon, client) = start_daemon(&daemon_bin, &state.join(format!("n{n}")))?;
        for vm in &vms[..n] {
            client.call(
                "POST",
                &format!("/v1/vms/{}/track", vm.0.name()),
                Some(&serde_json::json!({ "path": "/root/secret.txt" })),
            )?;
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut watched = Vec::new();
        for (_, args) in &tests {
            watched.push(measure(&vms[0].0, args)?);
        }
        let health = client.call("GET", "/v1/vms", None)?;
        let read: u64 = health
            .as_array()
            .map(|a| a.iter().filter_map(|v| v["read"].as_u64()).sum())
            .unwrap_or(0);
        let dropped: u64 = health
            .as_array()
            .map(|a| a.iter().filter_map(|v| v["dropped"].as_u64()).sum())
            .unwrap_or(0);
        drop(daemon);
        for vm in &vms[1..n] {
            sh(&vm.0, "pkill -f 'latency readloop'; true")?;
        }
        for (i, (name, _)) in tests.iter().enumerate() {
            let (p, w) = (plain[i], watched[i]);
            println!(
                "| {n} | {name} | {} / {} / {} / {} | {} / {} / {} / {} | {:.2} | {:.2} |",
                us(p[0]),
                us(p[1]),
                us(p[2]),
                us(p[3]),
                us(w[0]),
                us(w[1]),
                us(w[2]),
                us(w[3]),
                w[1] / p[1],
                w[2] / p[2]
            );
        }
        eprintln!(
            "n={n}: the daemon read {read} records from {n} VMs, {dropped} dropped by full rings"
        );
    }
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
