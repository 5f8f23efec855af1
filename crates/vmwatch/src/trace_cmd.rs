//! `vmwatch trace --vm NAME [--syscall a,b] [--json]`: a live strace-like
//! stream of a lab VM's syscalls, read from the event ring that the QEMU
//! plugin (`hook-plugin`) fills.
//!
//! This reads the ring directly (one consumer per ring), rendering with the
//! tracer engine (`crates/tracer`).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use events::{Filter, Ring, RingReader};
use tracer::{GuestResolver, Selection, TraceEvent, Tracer};

/// Arguments of `vmwatch trace`.
#[derive(clap::Args, Debug, Clone)]
pub struct TraceArgs {
    /// The lab VM to trace (started with the hook plugin; see --ring).
    #[arg(long)]
    pub vm: String,
    /// Only these syscalls (x86-64 names or numbers, comma-separated); the
    /// plugin's filter is set to them at run time, so others cost the guest
    /// almost nothing. Without it every syscall is traced.
    #[arg(long, value_delimiter = ',')]
    pub syscall: Vec<String>,
    /// Only this process (or thread) id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only processes with this comm.
    #[arg(long)]
    pub comm: Option<String>,
    /// Show the file behind each fd argument and result (`read(3</root/x>, ...)`),
    /// resolved by the plugin at the call.
    #[arg(long)]
    pub fds: bool,
    /// One JSON object per line instead of strace-like text.
    #[arg(long)]
    pub json: bool,
    /// The VM's event ring (default: /dev/shm/vmwatch-NAME.ring, the `ring=`
    /// given to the plugin).
    #[arg(long)]
    pub ring: Option<PathBuf>,
    /// Stop after this many calls.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
}

/// The ring path `vmwatch lab up NAME` gives the plugin.
pub fn default_ring_path(vm: &str) -> PathBuf {
    lab::vm::hook_ring_path(vm)
}

pub fn run(args: TraceArgs) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_to(&args, &mut out, &|| false)
}

/// [`run`] writing to `out`, also stopping when `stop()` says so.
pub fn run_to(args: &TraceArgs, out: &mut dyn Write, stop: &dyn Fn() -> bool) -> Result<()> {
    let vm = lab::Vm::open(&args.vm).with_context(|| format!("no lab VM `{}`", args.vm))?;
    let info = vm.info().clone();
    let path = args
        .ring
        .clone()
        .or_else(|| info.ring.clone())
        .unwrap_or_else(|| default_ring_path(&args.vm));
    if !path.exists() {
        bail!(
            "VM `{}` has no event ring at {}: it was started without the hook plugin; restart it with `vmwatch lab up {}` (the plugin loads by default)",
            args.vm,
            path.display(),
            args.vm
        );
    }
    let mut reader = Ring::open(&path)?;
    let owner = reader.vm_name();
    if !owner.is_empty() && owner != args.vm {
        bail!(
            "ring {} belongs to VM `{owner}`, not `{}`",
            path.display(),
            args.vm
        );
    }
    let filter = if args.syscall.is_empty() {
        Filter::ALL
    } else {
        Filter::parse(&args.syscall.join(","))?
    };
    reader.set_filter(&filter);
    reader.set_fds(if args.fds { &filter } else { &Filter::NONE });
    let selection = Selection {
        pid: args.pid,
        comm: args.comm.clone(),
    };
    // Live from now on: skip what the plugin wrote before we attached.
    while reader.poll().count() > 0 {}

    let mut tracer = Tracer::new(&args.vm, &info.uuid);
    match GuestResolver::open(&vm) {
        Ok(r) => tracer.resolver = Some(r),
        Err(e) => eprintln!("warning: pids and paths not shown: {e:#}"),
    }
    let started = Instant::now();
    let deadline = args
        .duration
        .map(|s| started + Duration::from_secs_f64(s.max(0.0)));
    let mut last_dropped = reader.dropped();
    let mut printed = 0u64;
    let mut writer_gone = false;
    loop {
        let mut events = Vec::new();
        let mut n = 0;
        for rec in reader.poll() {
            n += 1;
            if filter.contains(rec.nr) {
                tracer.feed(&rec, Instant::now(), &mut events);
            }
        }
        tracer.tick(Instant::now(), &mut events);
        let dropped = reader.dropped();
        if dropped != last_dropped {
            events.push(tracer.dropped(dropped - last_dropped));
            last_dropped = dropped;
        }
        for ev in events.iter().filter(|e| selection.matches(e)) {
            write_event(out, ev, args.json)?;
            if ev.is_call() {
                printed += 1;
                if args.count.is_some_and(|c| printed >= c) {
                    out.flush()?;
                    return Ok(());
                }
            }
        }
        out.flush()?;
        if writer_gone || stop() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if n == 0 {
            // Drain once more after QEMU is gone, then report it.
            writer_gone = !process_alive(reader.writer_pid());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if writer_gone {
        write_event(out, &tracer.stopped(), args.json)?;
        bail!(
            "VM `{}` stopped (QEMU pid {} exited)",
            args.vm,
            reader.writer_pid()
        );
    }
    report_losses(&reader);
    Ok(())
}

fn report_losses(reader: &RingReader) {
    if reader.dropped() > 0 || reader.unpaired() > 0 {
        eprintln!(
            "vmwatch: {} events dropped (ring full), {} entries unpaired",
            reader.dropped(),
            reader.unpaired()
        );
    }
}

fn process_alive(pid: u64) -> bool {
    pid == 0 || std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// One event as a text line or a JSON object.
pub fn write_event(out: &mut dyn Write, ev: &TraceEvent, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, ev)?;
        writeln!(out)
    } else {
        writeln!(out, "{}", ev.text())
    }
}
