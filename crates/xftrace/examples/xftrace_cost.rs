//! What xftrace costs the guest: `cargo run --release -p xftrace --example
//! xftrace_cost [ROUNDS]`.
//!
//! Boots one lab VM (hook plugin loaded, its event ring filter off), copies
//! the static C microbenchmark (guest/bench/syscall_bench.c: raw syscalls
//! timed with CLOCK_MONOTONIC inside the guest) into it, and measures in
//! one run, per round:
//! - xftrace off (no call/ret instrumentation at all);
//! - xftrace on for `sys_read`: getpid and pread64 are untraced, but the
//!   kernel's calls and rets are instrumented (conditional on a per-vCPU
//!   flag, which stays 0);
//! - xftrace on for `sys_pread64`: the benchmark's pread64 loop is traced
//!   (every kernel call and ret of it recorded), getpid untraced.
//!
//! Prints the median ns per call of ROUNDS rounds (default 3) per cell, the
//! ratio to xftrace off, and the records written per traced call.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lab::vm::ExecOptions;
use lab::{UpOptions, Vm};
use xftrace::Controller;

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
    let out = vm.exec_with(
        &["sh", "-c", "cat > /root/bench && chmod +x /root/bench"],
        &ExecOptions {
            stdin: Some(std::fs::read(bench)?),
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
            timeout: Duration::from_secs(900),
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

/// Applies a control change now (the plugin acts at the guest's next syscall).
fn settle(vm: &Vm, c: &Controller, change: xftrace::Change) -> Result<()> {
    if !c.wait_applied(change, Duration::from_millis(200)) {
        vm.exec(&["true"])?;
        if !c.wait_applied(change, Duration::from_secs(30)) {
            bail!("the plugin did not apply the change");
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    OnRead,
    OnPread,
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
    let mut opts = UpOptions::new(&format!("xf-bench-{}", std::process::id()));
    opts.network = false;
    let vm = Down(Vm::up(&opts)?);
    let vm = &vm.0;
    install(vm, &bench)?;
    let c = Controller::open(&xftrace::file_in(&vm.info().state_dir))?;
    // (op, iterations when untraced, when traced)
    let ops: [(&str, u64, u64, &str); 2] = [
        ("getpid", 200_000, 200_000, "getpid"),
        ("read", 100_000, 8_000, "pread64 1 B"),
    ];
    let modes = [
        (Mode::Off, "xftrace off"),
        (Mode::OnRead, "xftrace on for sys_read"),
        (Mode::OnPread, "xftrace on for sys_pread64"),
    ];
    let mut cells = vec![vec![Vec::new(); modes.len()]; ops.len()];
    let mut per_call = Vec::new();
    for _ in 0..rounds {
        for (mi, (mode, _)) in modes.iter().enumerate() {
            for (oi, (op, n_plain, n_traced, _)) in ops.iter().enumerate() {
                let traced = *mode == Mode::OnPread && *op == "read";
                let n = if traced { *n_traced } else { *n_plain };
                // A fresh session per measurement: the buffer never fills.
                let change = match mode {
                    Mode::Off => c.turn_off(),
                    Mode::OnRead => c.turn_on(&xftrace::names::bitmap(&["sys_read"])?),
                    Mode::OnPread => c.turn_on(&xftrace::names::bitmap(&["sys_pread64"])?),
                };
                settle(vm, &c, change)?;
                // Warm-up: the change flushed QEMU's translations.
                measure(vm, op, 500)?;
                let ns = measure(vm, op, n)?;
                let st = c.status();
                if traced {
                    if st.lost > 0 {
                        eprintln!("warning: {} records lost", st.lost);
                    }
                    per_call.push(st.written as f64 / (n + 500) as f64);
                }
                eprintln!("{op} x{n}, {}: {ns:.0} ns", modes[mi].1);
                cells[oi][mi].push(ns);
            }
        }
    }
    settle(vm, &c, c.turn_off())?;
    println!(
        "xftrace cost in the guest (TCG, 1 vCPU, {} kernel, median of {rounds} rounds, ns per syscall; ratio to xftrace off)\n",
        vm.info().kernel_release
    );
    println!("| operation | xftrace off | on for sys_read (untraced) | on for sys_pread64 |");
    println!("|---|---|---|---|");
    for (oi, (op, _, _, what)) in ops.iter().enumerate() {
        let m: Vec<f64> = cells[oi].iter().map(|v| median(v.clone())).collect();
        let note = if *op == "read" { "traced" } else { "untraced" };
        println!(
            "| {what} | {:.0} | {:.0} (x{:.2}) | {:.0} (x{:.2}, {note}) |",
            m[0],
            m[1],
            m[1] / m[0],
            m[2],
            m[2] / m[0]
        );
    }
    println!(
        "\nrecords per traced pread64 (entry, calls, rets, exit): {:.0}",
        median(per_call)
    );
    Ok(())
}
