//! What the syscall hooks cost the guest: `cargo run --release -p hook-plugin
//! --example syscall_cost [ROUNDS]` (scripts/bench.sh runs it).
//!
//! Boots two lab VMs side by side, one without the plugin and one with it,
//! copies a static C microbenchmark (guest/bench/syscall_bench.c, raw
//! syscalls timed with CLOCK_MONOTONIC inside the guest) into both, and
//! measures getpid, pread64 of one byte, openat+close and fork+exit+wait4
//! under several plugin configurations, a consumer draining the ring the
//! whole time. Prints the median of ROUNDS rounds (default 3) per cell and
//! the ratio hooked / plain, as a markdown table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use events::{Filter, Ring};
use lab::vm::ExecOptions;
use lab::{UpOptions, Vm};

struct Down(Vm);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn build_bench(target: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/bench/syscall_bench.c");
    let out = target.join("syscall_bench");
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .context("gcc (install gcc and libc6-dev)")?;
    if !status.success() {
        bail!(
            "gcc -static failed for {} (install libc6-dev)",
            src.display()
        );
    }
    Ok(out)
}

fn install(vm: &Vm, bench: &Path) -> Result<()> {
    let bytes = std::fs::read(bench)?;
    let out = vm.exec_with(
        &["sh", "-c", "cat > /root/bench && chmod +x /root/bench"],
        &ExecOptions {
            stdin: Some(bytes),
            ..ExecOptions::default()
        },
    )?;
    if !out.success() {
        bail!(
            "copying the benchmark into {}: {}",
            vm.name(),
            out.stderr_str()
        );
    }
    Ok(())
}

fn measure(vm: &Vm, op: &str, n: u64) -> Result<f64> {
    let out = vm.exec_with(
        &["/root/bench", op, &n.to_string(), "/etc/hostname"],
        &ExecOptions {
            timeout: Duration::from_secs(600),
            ..ExecOptions::default()
        },
    )?;
    if !out.success() {
        bail!("bench {op} in {}: {}", vm.name(), out.stderr_str());
    }
    Ok(out.stdout_str().trim().parse()?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(3)
        .max(1);
    let exe = std::env::current_exe()?;
    let target = exe.ancestors().nth(2).context("target dir")?.to_path_buf();
    let bench = build_bench(&target)?;
    if std::env::var_os("VMWATCH_HOOK_PLUGIN").is_none() {
        std::env::set_var("VMWATCH_HOOK_PLUGIN", target.join("libhook_plugin.so"));
    }
    let tag = std::process::id();
    let mut plain_opts = UpOptions::new(&format!("bench-plain-{tag}"));
    plain_opts.hook = false;
    let hooked_opts = UpOptions::new(&format!("bench-hook-{tag}"));
    let plain = Down(Vm::up(&plain_opts)?);
    let hooked = Down(Vm::up(&hooked_opts)?);
    install(&plain.0, &bench)?;
    install(&hooked.0, &bench)?;
    let ring_path = hooked
        .0
        .info()
        .ring
        .clone()
        .context("hooked VM has no ring")?;
    let reader = Arc::new(Mutex::new(Ring::open(&ring_path)?));
    // The consumer: drains the ring the whole time, as vmwatchd would.
    let stop = Arc::new(AtomicBool::new(false));
    let consumed = Arc::new(AtomicU64::new(0));
    let drain = {
        let (reader, stop, consumed) = (reader.clone(), stop.clone(), consumed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let n = reader.lock().map(|mut r| r.poll().count()).unwrap_or(0);
                consumed.fetch_add(n as u64, Ordering::Relaxed);
                if n == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let set = |filter: &str, fds: &str| -> Result<()> {
        let r = reader.lock().map_err(|_| anyhow::anyhow!("reader lock"))?;
        r.set_filter(&Filter::parse(filter)?);
        r.set_fds(&Filter::parse(fds)?);
        Ok(())
    };
    // (op, iterations, plugin filter, fd filter, what the row means)
    let rows: &[(&str, u64, &str, &str, &str)] = &[
        ("getpid", 200_000, "none", "none", "getpid, filter off"),
        (
            "getpid",
            200_000,
            "openat,close",
            "none",
            "getpid, not in the filter",
        ),
        (
            "getpid",
            200_000,
            "getpid",
            "none",
            "getpid, in the filter (recorded)",
        ),
        (
            "read",
            100_000,
            "openat,close",
            "none",
            "pread64 1 B, untracked (not in the filter)",
        ),
        (
            "read",
            100_000,
            "pread64",
            "pread64",
            "pread64 1 B, tracked (recorded, fd -> file)",
        ),
        (
            "openclose",
            20_000,
            "none",
            "none",
            "openat+close, filter off",
        ),
        (
            "openclose",
            20_000,
            "openat,close",
            "openat,close",
            "openat+close, recorded with paths and files",
        ),
        (
            "forkexit",
            300,
            "none",
            "none",
            "fork+exit+wait4, filter off",
        ),
        (
            "forkexit",
            300,
            "all",
            "all",
            "fork+exit+wait4, everything recorded",
        ),
    ];
    let mut results = Vec::new();
    for (op, n, filter, fds, what) in rows {
        let mut p = Vec::new();
        let mut h = Vec::new();
        for _ in 0..rounds {
            set("none", "none")?;
            p.push(measure(&plain.0, op, *n)?);
            set(filter, fds)?;
            h.push(measure(&hooked.0, op, *n)?);
        }
        set("none", "none")?;
        let (p, h) = (median(p), median(h));
        eprintln!("{what}: plain {p:.0} ns, hooked {h:.0} ns, x{:.2}", h / p);
        results.push((what, p, h));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = drain.join();
    let r = reader.lock().map_err(|_| anyhow::anyhow!("reader lock"))?;
    println!(
        "syscall cost in the guest (TCG, 1 vCPU, median of {rounds} rounds; {} records consumed, {} dropped)\n",
        consumed.load(Ordering::Relaxed),
        r.dropped()
    );
    println!("| operation | without plugin (ns) | with plugin (ns) | ratio |");
    println!("|---|---|---|---|");
    for (what, p, h) in results {
        println!("| {what} | {p:.0} | {h:.0} | x{:.2} |", h / p);
    }
    Ok(())
}
