//! `vmwatch trace --vm NAME [--syscall a,b] [--json]`: a live strace-like
//! stream of a lab VM's syscalls, read from the event ring that the QEMU
//! plugin (`hook-plugin`) fills.
//!
//! When `vmwatchd` runs (its socket answers), the stream comes from the
//! daemon, which owns the rings (one consumer per ring) and shares them
//! between any number of clients; `--vm '*'` merges every VM it watches.
//! Without a daemon (or with `--ring`), this reads the ring directly,
//! rendering with the tracer engine (`crates/tracer`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use events::{Filter, Ring, RingError, RingReader};
use tracer::{GuestResolver, Selection, State, TraceEvent, Tracer};

// A child module by path so that this file keeps compiling on its own where
// it is included with #[path] (the hook-plugin test crate).
#[path = "daemon_client.rs"]
pub mod daemon_client;

use daemon_client::DaemonClient;

/// Arguments of `vmwatch trace`.
#[derive(clap::Args, Debug, Clone)]
pub struct TraceArgs {
    /// The lab VM to trace (started with the hook plugin; see --ring).
    /// With vmwatchd running, `'*'` traces every VM it watches, merged.
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
    /// given to the plugin). Reads the ring directly even when vmwatchd runs.
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
    let dir = daemon_client::state_dir();
    if args.ring.is_none() {
        match DaemonClient::discover_in(&dir)? {
            Some(client) => return run_via_daemon(&client, args, out, stop),
            None if args.vm == "*" => bail!(
                "--vm '*' needs vmwatchd, and none answers at {}: start it (`vmwatchd --watch-all`)",
                dir.join(daemon_client::SOCKET).display()
            ),
            None => eprintln!(
                "vmwatch: no vmwatchd at {}: reading the ring directly",
                dir.join(daemon_client::SOCKET).display()
            ),
        }
    }
    run_direct(args, out, stop, &dir)
}

/// The stream through vmwatchd: ask it to watch the VM (idempotent), then
/// read its NDJSON stream, on a thread so that `stop` and `--duration` are
/// checked while no event comes.
fn run_via_daemon(
    client: &DaemonClient,
    args: &TraceArgs,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    let merged = args.vm == "*";
    let path = if merged {
        "/v1/trace".to_string()
    } else {
        let vm = daemon_client::encode_query(&args.vm);
        client.call("POST", &format!("/v1/vms/{vm}/watch"), None)?;
        format!("/v1/vms/{vm}/trace")
    };
    let mut query = Vec::new();
    if !args.syscall.is_empty() {
        query.push(format!(
            "syscall={}",
            daemon_client::encode_query(&args.syscall.join(","))
        ));
    }
    if let Some(pid) = args.pid {
        query.push(format!("pid={pid}"));
    }
    if let Some(comm) = &args.comm {
        query.push(format!("comm={}", daemon_client::encode_query(comm)));
    }
    if args.fds {
        query.push("fds=1".into());
    }
    let mut stream = client.stream(&format!("{path}?{}", query.join("&")))?;
    let closer = stream.closer()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<u8>>>(1024);
    let reader = std::thread::spawn(move || loop {
        match stream.next_line() {
            Ok(Some(line)) => {
                if tx.send(Ok(line)).is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(e));
                break;
            }
        }
    });
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut printed = 0u64;
    let mut vm_stopped = false;
    let result: Result<()> = (|| loop {
        if stop() || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(anyhow!(
                    "vmwatchd ended the stream (it stopped, or stopped watching `{}`)",
                    args.vm
                ))
            }
        };
        let mut next = Some(first);
        while let Some(line) = next.take() {
            let line = line?;
            let ev: TraceEvent = serde_json::from_slice(&line).context(
                "vmwatchd sent an event this vmwatch cannot read: use the same build for both",
            )?;
            if args.json {
                out.write_all(&line)?;
                out.write_all(b"\n")?;
            } else if merged {
                writeln!(out, "{:<12} {}", ev.vm, ev.text())?;
            } else {
                writeln!(out, "{}", ev.text())?;
            }
            if ev.is_call() {
                printed += 1;
                if args.count.is_some_and(|c| printed >= c) {
                    out.flush()?;
                    return Ok(());
                }
            }
            if ev.state == State::VmStopped && !merged {
                vm_stopped = true;
                out.flush()?;
                return Ok(());
            }
            next = rx.try_recv().ok();
        }
        out.flush()?;
    })();
    closer.close();
    drop(rx);
    let _ = reader.join();
    result?;
    if vm_stopped {
        bail!("VM `{}` stopped (its QEMU exited)", args.vm);
    }
    Ok(())
}

/// Reads the ring directly (no daemon).
fn run_direct(
    args: &TraceArgs,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
    daemon_dir: &Path,
) -> Result<()> {
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
    let mut reader = Ring::open(&path).map_err(|e| match e {
        RingError::Busy { .. } => busy_ring(&path, &args.vm, daemon_dir),
        e => e.into(),
    })?;
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

/// Why the ring has another reader, and what to do.
fn busy_ring(path: &Path, vm: &str, daemon_dir: &Path) -> anyhow::Error {
    let sock = daemon_dir.join(daemon_client::SOCKET);
    match daemon_client::daemon_pid(daemon_dir) {
        Some(pid) if sock.exists() => anyhow!(
            "the event ring {} of `{vm}` is owned by vmwatchd (pid {pid}): trace through it (drop --ring)",
            path.display()
        ),
        Some(pid) => anyhow!(
            "the event ring {} of `{vm}` is owned by vmwatchd (pid {pid}), but its socket {} is gone: restart the daemon (`kill {pid}`, then `vmwatchd`)",
            path.display(),
            sock.display()
        ),
        None => anyhow!(
            "the event ring {} of `{vm}` already has a reader (another `vmwatch trace`, or a vmwatchd with another state dir): stop it (`fuser {}` names it)",
            path.display(),
            path.display()
        ),
    }
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
