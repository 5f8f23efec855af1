//! What the breakpoint backend costs the guest: per-`getpid` latency,
//! timed inside the guest (python3 loop minus an empty loop), in one lab VM
//! with the backend detached and attached, as ratios measured in one run.
//!
//! ```sh
//! cargo run --release -p gdb-hook --example gdb_cost            # defaults
//! cargo run --release -p gdb-hook --example gdb_cost -- 300 3   # hooked calls per loop, rounds
//! ```
//!
//! Rows: no backend (1,000,000 calls per loop); attached with the filter
//! `none` (one stop per syscall: the entry breakpoint; nothing recorded);
//! attached with the filter `getpid` (two stops: entry and the return
//! breakpoint, armed while a recorded call is pending; two records each);
//! the same with every breakpoint single-stepped with the breakpoint
//! removed meanwhile (the portable path, what KVM needs where the kernel's
//! instruction at a site cannot be skipped: four stops per call).
//! The guest's other syscalls (python start-up) are hooked too but not timed.

use std::time::{Duration, Instant};

use events::{Filter, Ring, RingWriter};
use gdb_hook::{GdbHook, Options, Stats};
use lab::{UpOptions, Vm};

struct Down(Vm);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn bench_script(n: usize) -> String {
    format!(
        "python3 -c 'import os,time\n\
         n={n}\n\
         t=time.perf_counter()\n\
         for _ in range(n): os.getpid()\n\
         a=time.perf_counter()-t\n\
         t=time.perf_counter()\n\
         for _ in range(n): pass\n\
         b=time.perf_counter()-t\n\
         print((a-b)/n*1e6, a/n*1e6)'"
    )
}

/// (µs per getpid net of the loop, µs per loop iteration).
fn measure(vm: &Vm, n: usize) -> (f64, f64) {
    let out = vm.exec_sh(&bench_script(n)).expect("agent");
    assert!(out.success(), "{}", out.stderr_str());
    let v: Vec<f64> = out
        .stdout_str()
        .split_whitespace()
        .map(|s| s.parse().expect("number"))
        .collect();
    (v[0], v[1])
}

/// One measurement with the backend attached and `filter` in its ring.
fn measure_hooked(vm: &Vm, n: usize, filter: &Filter, options: &Options) -> ((f64, f64), Stats) {
    let path = std::env::temp_dir().join(format!("gdb-cost-{}.ring", std::process::id()));
    let ring = RingWriter::create(&path, 1 << 16, vm.name(), filter, &Filter::NONE).expect("ring");
    let mut reader = Ring::open(&path).expect("ring");
    let mut hook = GdbHook::attach(vm, options).expect("attach");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (m, stats) = std::thread::scope(|s| {
        let h = s.spawn(|| hook.run(&ring, &|| stop.load(std::sync::atomic::Ordering::Relaxed)));
        let w = s.spawn(|| measure(vm, n));
        while !w.is_finished() {
            reader.poll().for_each(drop);
            std::thread::sleep(Duration::from_millis(10));
        }
        let m = w.join();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let stats = h.join().expect("hook thread").expect("hook run");
        (m.unwrap_or_else(|e| std::panic::resume_unwind(e)), stats)
    });
    let _ = std::fs::remove_file(&path);
    (m, stats)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n_hooked: usize = args.get(1).map_or(300, |s| s.parse().expect("calls"));
    let rounds: usize = args.get(2).map_or(3, |s| s.parse().expect("rounds"));
    let n_plain = 1_000_000;

    let name = format!("gdbcost-{}", std::process::id());
    let mut opts = UpOptions::new(&name);
    opts.cpus = 1;
    opts.hook = false;
    opts.gdbstub = true;
    let t = Instant::now();
    let vm = Down(Vm::up(&opts).unwrap_or_else(|e| {
        panic!("cannot boot lab VM `{name}` ({e}); run scripts/setup.sh first")
    }));
    eprintln!(
        "booted {} in {:.1} s",
        vm.0.info().kernel_release,
        t.elapsed().as_secs_f64()
    );

    let mut plain = Vec::new();
    let mut none = Vec::new();
    let mut getpid = Vec::new();
    let mut stepped = Vec::new();
    let mut stats_none = Stats::default();
    let mut stats_getpid = Stats::default();
    let mut stats_stepped = Stats::default();
    let f_getpid = Filter::parse("getpid").expect("filter");
    let step = Options {
        always_step: true,
        remove_to_step: Some(true),
        ..Options::default()
    };
    for round in 0..rounds {
        plain.push(measure(&vm.0, n_plain));
        let (m, s) = measure_hooked(&vm.0, n_hooked, &Filter::NONE, &Options::default());
        none.push(m);
        stats_none = s;
        let (m, s) = measure_hooked(&vm.0, n_hooked, &f_getpid, &Options::default());
        getpid.push(m);
        stats_getpid = s;
        let (m, s) = measure_hooked(&vm.0, n_hooked, &f_getpid, &step);
        stepped.push(m);
        stats_stepped = s;
        eprintln!(
            "round {round}: plain {:.3} us, filter=none {:.1} us, filter=getpid {:.1} us, stepped {:.1} us",
            plain[round].0, none[round].0, getpid[round].0, stepped[round].0
        );
    }
    // Detached again: the guest is back to its own speed.
    let after = measure(&vm.0, n_plain);

    let base = median(plain.iter().map(|x| x.0).collect());
    let base_loop = median(plain.iter().map(|x| x.1).collect());
    println!(
        "getpid under TCG ({}), python3 loop timed in the guest, median of {rounds} rounds",
        vm.0.info().kernel_release
    );
    let row = |label: &str, v: &[(f64, f64)], n: usize| {
        let net = median(v.iter().map(|x| x.0).collect());
        let lp = median(v.iter().map(|x| x.1).collect());
        println!(
            "{label:34} {n:>8} calls  getpid {net:10.3} us (x{:>8.0})  loop iteration {lp:10.3} us (x{:.0})",
            net / base,
            lp / base_loop
        );
    };
    row("no backend", &plain, n_plain);
    row("gdb backend, filter=none", &none, n_hooked);
    row("gdb backend, filter=getpid", &getpid, n_hooked);
    row("gdb backend, getpid, single-steps", &stepped, n_hooked);
    row("detached again", &[after], n_plain);
    println!("last filter=none run:   {}", stats_none.summary());
    println!("last filter=getpid run: {}", stats_getpid.summary());
    println!("last single-step run:   {}", stats_stepped.summary());
}
