//! How many events per second vmwatchd delivers from a guest syscall storm,
//! and how long from a syscall's return in the guest to its event reaching
//! an API subscriber.
//!
//! ```sh
//! cargo build --release
//! target/release/examples/daemon_throughput [--vm NAME] [--calls N]
//! ```
//!
//! Boots a lab VM (1 vCPU, 512 MiB; or uses `--vm NAME`, a running lab VM),
//! starts `vmwatchd` (the binary next to this example's directory) on a
//! private state dir, and in the guest runs a python3 loop of `os.getpid()`:
//! 1. with the daemon watching but nobody subscribed (filter `none`),
//! 2. with a subscriber streaming `getpid` calls of `python3` over the API.
//!
//! Prints the guest's ns per call in both runs (their ratio is what the
//! subscriber costs the guest), events per second received by the
//! subscriber, ring drops, stream lags, and the latency from the return
//! instruction (the Return record's host CLOCK_MONOTONIC `time_ns` = the
//! event's `time_ns + duration_ns`) to the subscriber reading the event's
//! line (`events::now_ns()`): p50, p99, max.

#[allow(dead_code)]
#[path = "../../vmwatch/src/daemon_client.rs"]
mod daemon_client;

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use daemon_client::DaemonClient;

struct Opts {
    vm: Option<String>,
    calls: u64,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        vm: None,
        calls: 200_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--vm" => o.vm = Some(it.next().context("--vm NAME")?),
            "--calls" => o.calls = it.next().context("--calls N")?.parse()?,
            "--help" | "-h" => {
                println!("daemon_throughput [--vm NAME] [--calls N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}`: use --vm NAME, --calls N"),
        }
    }
    Ok(o)
}

struct Guard(Option<lab::Vm>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            let _ = vm.down();
        }
    }
}

struct DaemonProc(Child, std::path::PathBuf);

impl Drop for DaemonProc {
    fn drop(&mut self) {
        // SAFETY: kill() has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn guest_loop(vm: &lab::Vm, calls: u64) -> Result<f64> {
    let script = format!(
        "import os, time\nt = time.monotonic()\nfor _ in range({calls}): os.getpid()\nprint(time.monotonic() - t)\n"
    );
    let out = vm.exec_with(
        &["python3", "-c", &script],
        &lab::ExecOptions {
            timeout: Duration::from_secs(600),
            ..Default::default()
        },
    )?;
    if !out.success() {
        bail!("guest loop failed: {}", out.stderr_str());
    }
    let secs: f64 = out.stdout_str().trim().parse()?;
    Ok(secs * 1e9 / calls as f64)
}

/// `calls` getpid calls about `gap_ms` apart (a light load: the pipeline's own latency).
fn guest_paced(vm: &lab::Vm, calls: u64, gap_ms: f64) -> Result<()> {
    let script = format!(
        "import os, time\nfor _ in range({calls}):\n    os.getpid()\n    time.sleep({})\n",
        gap_ms / 1000.0
    );
    let out = vm.exec_with(
        &["python3", "-c", &script],
        &lab::ExecOptions {
            timeout: Duration::from_secs(600),
            ..Default::default()
        },
    )?;
    if !out.success() {
        bail!("guest loop failed: {}", out.stderr_str());
    }
    Ok(())
}

/// A subscriber on `getpid` of `python3`: (receipt time, line) of everything it reads.
struct Subscriber {
    rx: mpsc::Receiver<(u64, Vec<u8>)>,
    closer: daemon_client::StreamCloser,
    reader: std::thread::JoinHandle<()>,
}

impl Subscriber {
    fn open(client: &DaemonClient, vm: &str) -> Result<Subscriber> {
        let mut stream =
            client.stream(&format!("/v1/vms/{vm}/trace?syscall=getpid&comm=python3"))?;
        let closer = stream.closer()?;
        let (tx, rx) = mpsc::channel::<(u64, Vec<u8>)>();
        let reader = std::thread::spawn(move || {
            while let Ok(Some(line)) = stream.next_line() {
                if tx.send((events::now_ns(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Subscriber { rx, closer, reader })
    }

    /// Closes the stream and tallies what came.
    fn finish(self) -> Result<Tally> {
        // Let the tail arrive.
        std::thread::sleep(Duration::from_millis(500));
        self.closer.close();
        let _ = self.reader.join();
        let mut t = Tally::default();
        let (mut first, mut last) = (u64::MAX, 0u64);
        for (seen, line) in self.rx.try_iter() {
            let ev: tracer::TraceEvent = serde_json::from_slice(&line)?;
            match ev.state {
                tracer::State::Call => {
                    t.calls += 1;
                    first = first.min(seen);
                    last = last.max(seen);
                    if let Some(d) = ev.duration_ns {
                        t.latency.push(seen.saturating_sub(ev.time_ns + d));
                    }
                }
                tracer::State::Dropped if ev.syscall == "lagged" => {
                    t.lagged += ev.count.unwrap_or(0)
                }
                tracer::State::Dropped => t.ring_dropped += ev.count.unwrap_or(0),
                _ => {}
            }
        }
        t.latency.sort_unstable();
        t.window_s = last.saturating_sub(first) as f64 / 1e9;
        Ok(t)
    }
}

#[derive(Default)]
struct Tally {
    calls: u64,
    lagged: u64,
    ring_dropped: u64,
    window_s: f64,
    latency: Vec<u64>,
}

impl Tally {
    fn latency_line(&self) -> String {
        let us = |p: f64| percentile(&self.latency, p) as f64 / 1e3;
        format!(
            "p50 {:.0} us, p99 {:.0} us, max {:.0} us ({} samples)",
            us(0.50),
            us(0.99),
            self.latency.last().copied().unwrap_or(0) as f64 / 1e3,
            self.latency.len()
        )
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let exe_dir = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.to_path_buf())
        .context("executable path")?;
    let daemon_bin = exe_dir.join("vmwatchd");
    if !daemon_bin.exists() {
        bail!(
            "{} not found: run `cargo build --release`",
            daemon_bin.display()
        );
    }
    let mut guard = Guard(None);
    let vm = match &o.vm {
        Some(name) => lab::Vm::open(name)?,
        None => {
            let name = format!("bench-d-{}", std::process::id());
            eprintln!("booting lab VM `{name}` ...");
            let vm = lab::Vm::up(&lab::UpOptions::new(&name))?;
            guard.0 = Some(lab::Vm::open(&name)?);
            vm
        }
    };
    let name = vm.name().to_string();
    let state = std::env::temp_dir().join(format!("vmwatchd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    let log = std::fs::File::create(state.join("daemon.log"))?;
    let child = Command::new(&daemon_bin)
        .arg("--state-dir")
        .arg(&state)
        .arg("--watch")
        .arg(&name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let _daemon = DaemonProc(child, state.clone());
    let until = Instant::now() + Duration::from_secs(20);
    let client = loop {
        if let Some(c) = DaemonClient::discover_in(&state)? {
            if c.call("GET", &format!("/v1/vms/{name}"), None)
                .is_ok_and(|v| v["state"] == "watching")
            {
                break c;
            }
        }
        if Instant::now() > until {
            bail!(
                "vmwatchd did not watch `{name}` within 20 s (see {}/daemon.log)",
                state.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    // Warm python3 up (page cache, first-exec costs) before measuring.
    guest_loop(&vm, 1000)?;
    let idle_ns = guest_loop(&vm, o.calls)?;

    let vm_path = format!("/v1/vms/{name}");
    let sub = Subscriber::open(&client, &name)?;
    let before = client.call("GET", &vm_path, None)?;
    let t = Instant::now();
    let traced_ns = guest_loop(&vm, o.calls)?;
    let guest_secs = t.elapsed().as_secs_f64();
    let storm = sub.finish()?;
    let after = client.call("GET", &vm_path, None)?;

    // A light load: the latency of the pipeline itself, not of a full ring.
    let paced_calls = 1000;
    let sub = Subscriber::open(&client, &name)?;
    guest_paced(&vm, paced_calls, 2.0)?;
    let paced = sub.finish()?;

    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    println!(
        "vmwatchd throughput and latency, VM `{name}` ({}, 1 vCPU TCG), {} getpid calls",
        vm.info().kernel_release,
        o.calls
    );
    println!("guest getpid, daemon watching, no subscriber: {idle_ns:.0} ns/call");
    println!(
        "guest getpid, one API subscriber on getpid:    {traced_ns:.0} ns/call  (x{:.2})",
        traced_ns / idle_ns
    );
    println!(
        "storm: {} of {} calls received in {:.2} s = {:.0} events/s (guest loop {guest_secs:.2} s)",
        storm.calls,
        o.calls,
        storm.window_s,
        storm.calls as f64 / storm.window_s.max(1e-9)
    );
    println!(
        "storm: ring records {} (entry+return), ring drops {} (notices {}), stream lag {}",
        n(&after, "records") - n(&before, "records"),
        n(&after, "dropped") - n(&before, "dropped"),
        storm.ring_dropped,
        storm.lagged
    );
    println!(
        "storm: latency return -> subscriber: {}",
        storm.latency_line()
    );
    println!(
        "paced ({paced_calls} calls, 2 ms apart): {} received, latency return -> subscriber: {}",
        paced.calls,
        paced.latency_line()
    );
    Ok(())
}
