//! What integrity scanning costs: `cargo run --release -p integrity --example
//! scan_cost [ROUNDS]` (scripts/bench.sh runs it).
//!
//! Boots one lab VM per kernel (no hook plugin, so only scanning differs),
//! times full scans, then runs the guest microbenchmark (guest/bench/
//! syscall_bench.c: getpid and 1-byte pread64, timed inside the guest)
//! alternately without scanning and with a scan every second from a host
//! thread, ROUNDS times each (default 3), and prints medians and the ratio.
//! The guest is never paused: the monitor's run state is sampled during
//! the scanning rounds and must always be `running`. Last, detection
//! latency: a scan every second runs while the guest loads the test rootkit
//! `rk_inline` (guest/kmods) 5 times; the time from insmod's return to the
//! first scan that reports it.

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

/// Milliseconds from each insmod of rk_inline to the first 1-second scan
/// that reports an inline hook (5 loads; the scanner runs like vmwatchd's).
fn detection_latency(vm: &Vm, base: &Arc<Baseline>, guest: &Arc<LinuxGuest>) -> Result<Vec<f64>> {
    let ko = lab::util::cache_dir()
        .join("kmods")
        .join(&vm.info().kernel_release)
        .join("rk_inline.ko");
    let bytes = std::fs::read(&ko)
        .with_context(|| format!("{}: run scripts/build-kmods.sh", ko.display()))?;
    let out = vm.exec_with(
        &["sh", "-c", "cat > /root/rk_inline.ko"],
        &ExecOptions {
            stdin: Some(bytes),
            ..ExecOptions::default()
        },
    )?;
    if !out.success() {
        bail!("copy rk_inline.ko: {}", out.stderr_str());
    }
    let loaded_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let (stop, base, guest, loaded_at, seen) = (
            stop.clone(),
            base.clone(),
            guest.clone(),
            loaded_at.clone(),
            seen.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = integrity::scan(&base, &guest, &CpuState::default());
                if r.findings
                    .iter()
                    .any(|f| f.check == integrity::Check::InlineHook)
                {
                    if let Some(at) = loaded_at.lock().unwrap().take() {
                        seen.lock()
                            .unwrap()
                            .push(at.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(1) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    };
    for i in 0..5 {
        let out = vm.exec_sh("insmod /root/rk_inline.ko")?;
        *loaded_at.lock().unwrap() = Some(Instant::now());
        if !out.success() {
            bail!("insmod: {}", out.stderr_str());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().len() <= i && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        vm.exec_sh("rmmod rk_inline")?;
        // Let a clean scan pass before the next load.
        std::thread::sleep(Duration::from_millis(1500));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = t.join();
    let v = seen.lock().unwrap().clone();
    if v.len() != 5 {
        bail!("only {} of 5 loads detected within 10 s", v.len());
    }
    Ok(v)
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
    println!("| kernel | full scan (median of 10) | getpid ns, no scan / scan 1 s | ratio | pread64 ns, no scan / scan 1 s | ratio | scans during runs | run state samples not `running` | insmod -> detected, median / max of 5 |");
    println!("|---|---|---|---|---|---|---|---|---|");
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
        let latencies = detection_latency(vm, &base, &guest)?;
        let (g0, g1) = (median(plain.0), median(scanned.0));
        let (r0, r1) = (median(plain.1), median(scanned.1));
        println!(
            "| {} | {scan_ms:.1} ms | {g0:.0} / {g1:.0} | x{:.3} | {r0:.0} / {r1:.0} | x{:.3} | {} | {not_running} | {:.0} / {:.0} ms |",
            vm.info().kernel_release,
            g1 / g0,
            r1 / r0,
            scans.load(Ordering::Relaxed),
            median(latencies.clone()),
            latencies.iter().copied().fold(0.0, f64::max),
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
