//! What integrity scanning costs: `cargo run --release -p integrity --example
//! scan_cost [ROUNDS]` (scripts/bench.sh runs it).
//!
//! Boots one lab VM per kernel (no hook plugin, so only scanning differs),
//! times full scans, then runs the guest microbenchmark (guest/bench/
//! syscall_bench.c: getpid and 1-byte pread64, timed inside the guest)
//! alternately without scanning and with a scan every second from a host
//! thread, ROUNDS times each (default 3), and prints medians and the ratio.
//! The guest is never paused: the monitor's run state is sampled during
//! the scanning rounds and must always be `running`.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use integrity::{Baseline, CpuState};
use lab::vm::ExecOptions;
use lab::{Flavour, UpOptions, Vm};
use vmi::linux::{KernelProfile, LinuxGuest};

struct Down(Vm);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(vm: &Vm, op: &str, n: u64) -> Result<f64> {
    let out = vm.exec_sh(&format!("/root/bench {op} {n} /etc/hostname"))?;
    if !out.success() {
        bail!("bench {op}: {}", out.stderr_str());
    }
    let s = out.stdout_str();
    s.split_whitespace()
        .find_map(|w| w.parse::<f64>().ok())
        .with_context(|| format!("bench output `{s}`"))
}

fn main() -> Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let tmp = std::env::temp_dir().join(format!("scan-cost-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/bench/syscall_bench.c");
    let bin = tmp.join("bench");
    let ok = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()?;
    if !ok.success() {
        bail!(
            "gcc -static {} failed (install gcc and libc6-dev)",
            src.display()
        );
    }
    println!("| kernel | full scan (median of 10) | getpid ns, no scan / scan 1 s | ratio | pread64 ns, no scan / scan 1 s | ratio | scans during runs | run state samples not `running` |");
    println!("|---|---|---|---|---|---|---|---|");
    for flavour in [Flavour::Stable, Flavour::Backports] {
        let mut opts = UpOptions::new(&format!("scancost-{}", std::process::id()));
        opts.flavour = flavour;
        opts.hook = false;
        opts.network = false;
        let vm = Down(Vm::up(&opts)?);
        let vm = &vm.0;
        let out = vm.exec_with(
            &["sh", "-c", "cat > /root/bench && chmod +x /root/bench"],
            &ExecOptions {
                stdin: Some(std::fs::read(&bin)?),
                ..ExecOptions::default()
            },
        )?;
        if !out.success() {
            bail!("copy bench: {}", out.stderr_str());
        }
        let image = vmi::image::KernelImage::open(&vm.info().vmlinux)?;
        let profile = Arc::new(KernelProfile::from_image(&image)?);
        let base = Arc::new(Baseline::new(&image, Arc::clone(&profile))?);
        let guest = Arc::new(LinuxGuest::attach(Arc::new(vm.memory(false)?), profile)?);

        let mut times = Vec::new();
        for _ in 0..10 {
            let r = integrity::scan(&base, &guest, &CpuState::default());
            if !r.findings.is_empty() {
                bail!("clean guest has findings: {:?}", r.findings);
            }
            times.push(r.elapsed_us as f64 / 1000.0);
        }
        let scan_ms = median(times);

        let mut plain = (Vec::new(), Vec::new());
        let mut scanned = (Vec::new(), Vec::new());
        let scans = Arc::new(AtomicU64::new(0));
        let mut not_running = 0;
        for _ in 0..rounds {
            plain.0.push(bench(vm, "getpid", 2_000_000)?);
            plain.1.push(bench(vm, "read", 1_000_000)?);
            let stop = Arc::new(AtomicBool::new(false));
            let t = {
                let (stop, base, guest, scans) =
                    (stop.clone(), base.clone(), guest.clone(), scans.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        integrity::scan(&base, &guest, &CpuState::default());
                        scans.fetch_add(1, Ordering::Relaxed);
                        while !stop.load(Ordering::Relaxed)
                            && started.elapsed() < Duration::from_secs(1)
                        {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                })
            };
            scanned.0.push(bench(vm, "getpid", 2_000_000)?);
            if format!("{:?}", vm.qmp()?.status()?.status) != "running" {
                not_running += 1;
            }
            scanned.1.push(bench(vm, "read", 1_000_000)?);
            if format!("{:?}", vm.qmp()?.status()?.status) != "running" {
                not_running += 1;
            }
            stop.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
        let (g0, g1) = (median(plain.0), median(scanned.0));
        let (r0, r1) = (median(plain.1), median(scanned.1));
        println!(
            "| {} | {scan_ms:.1} ms | {g0:.0} / {g1:.0} | x{:.3} | {r0:.0} / {r1:.0} | x{:.3} | {} | {not_running} |",
            vm.info().kernel_release,
            g1 / g0,
            r1 / r0,
            scans.load(Ordering::Relaxed)
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
