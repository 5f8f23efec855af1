//! `vmwatch trace --vm NAME [--syscall a,b] [--json]`: a live strace-like
//! stream of a lab VM's syscalls, read from the event ring that the QEMU
//! plugin (`hook-plugin`) fills.
//!
//! This slice reads the ring directly (one consumer per ring); the daemon
//! (vmwatchd) will own the rings later and this command will become its client.
//! Not yet here: the task's pid and comm (needs `gs_base` -> `current_task` via
//! the introspection core), and string/buffer arguments (paths are shown as
//! guest addresses until the plugin captures them at the call).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use events::{format, Filter, Kind, Record, Ring, RingReader, NO_ENTRY};

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
    // Live from now on: skip what the plugin wrote before we attached.
    while reader.poll().count() > 0 {}

    let mut tracer = Tracer::new(&args.vm, &info.uuid, args.json);
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
        let mut lines = Vec::new();
        let mut n = 0;
        for rec in reader.poll() {
            n += 1;
            if filter.contains(rec.nr) {
                tracer.feed(&rec, Instant::now(), &mut lines);
            }
        }
        tracer.tick(Instant::now(), &mut lines);
        let dropped = reader.dropped();
        if dropped != last_dropped {
            lines.push(tracer.dropped_line(dropped - last_dropped));
            last_dropped = dropped;
        }
        for (line, is_call) in lines {
            writeln!(out, "{line}")?;
            if is_call {
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

/// Show an entry as `<unfinished ...>` when its return has not come after this long.
const UNFINISHED_AFTER: Duration = Duration::from_millis(200);

/// Turns the record stream into strace-like lines: a call is printed when it
/// returns; a call still blocked after [`UNFINISHED_AFTER`] is printed as
/// unfinished, and its return later as `<... NAME resumed>`.
pub struct Tracer {
    vm: String,
    uuid: String,
    json: bool,
    /// Entries waiting for their return, by entry seq.
    pending: BTreeMap<u64, (Record, Instant, bool)>,
    /// Names processes from guest RAM, when attached.
    pub resolver: Option<GuestResolver>,
}

/// Page-table root bits of a CR3: drops the PCID (bits 0-11) and the PTI
/// user/kernel bit 12 (Linux allocates PGDs 8 KiB-aligned when PTI is built in).
const ROOT_MASK: u64 = 0x000f_ffff_ffff_e000;

/// Resolves a record's CR3 to the process owning that address space
/// (`mm->pgd`), from the guest's RAM via vmi, when the record is consumed
/// (a few ms after the call): a process that already exited shows as `?`.
pub struct GuestResolver {
    guest: vmi::linux::LinuxGuest,
    /// Page-table root -> the task_struct of the process that owns it.
    by_root: std::cell::RefCell<std::collections::HashMap<u64, u64>>,
    last_refresh: std::cell::Cell<Option<Instant>>,
}

impl GuestResolver {
    pub fn open(vm: &lab::Vm) -> Result<Self> {
        let mem = std::sync::Arc::new(vm.memory(false)?);
        let image = vmi::image::KernelImage::open(&vm.info().vmlinux)?;
        let profile = std::sync::Arc::new(vmi::linux::KernelProfile::from_image(&image)?);
        Ok(GuestResolver {
            guest: vmi::linux::LinuxGuest::attach(mem, profile)?,
            by_root: Default::default(),
            last_refresh: Default::default(),
        })
    }

    /// (tgid, comm) of the process whose page tables `cr3` points at. The
    /// task is cached per root; its comm is re-read each time (exec changes it).
    pub fn process(&self, cr3: u64) -> Option<(i32, String)> {
        let root = cr3 & ROOT_MASK;
        let cached = self.by_root.borrow().get(&root).copied();
        // A hit counts only if that task still runs on this root: page-table
        // pages of exited processes are reused.
        if let Some(task) = cached.filter(|&t| {
            self.guest
                .task_pgd_phys(t)
                .is_some_and(|p| p & ROOT_MASK == root)
        }) {
            return self.guest.task_identity(task).ok();
        }
        // A miss means a new process: relist, at most every 10 ms.
        let now = Instant::now();
        if self
            .last_refresh
            .get()
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(10))
        {
            return None;
        }
        self.last_refresh.set(Some(now));
        self.guest.refresh();
        let mut map = self.by_root.borrow_mut();
        map.clear();
        for p in self.guest.processes().items {
            if let Some(pgd) = p.pgd_phys {
                map.insert(pgd & ROOT_MASK, p.task);
            }
        }
        let task = map.get(&root).copied()?;
        drop(map);
        self.guest.task_identity(task).ok()
    }
}

impl Tracer {
    pub fn new(vm: &str, uuid: &str, json: bool) -> Tracer {
        Tracer {
            vm: vm.to_string(),
            uuid: uuid.to_string(),
            json,
            pending: BTreeMap::new(),
            resolver: None,
        }
    }

    /// Lines for one record: `(line, completes_a_call)`.
    pub fn feed(&mut self, rec: &Record, now: Instant, lines: &mut Vec<(String, bool)>) {
        match rec.kind {
            Kind::Entry => {
                // exit/exit_group never return: show them at once.
                if matches!(rec.name(), "exit" | "exit_group") {
                    lines.push((self.line(rec, None, "call"), true));
                } else {
                    // Bounded: a task that never returns (killed, execve) stays
                    // until the map is large, then the oldest go out as unfinished.
                    self.pending.insert(rec.seq, (*rec, now, false));
                    while self.pending.len() > 4096 {
                        if let Some((_, (e, _, shown))) = self.pending.pop_first() {
                            if !shown {
                                lines.push((self.line(&e, None, "unfinished"), false));
                            }
                        }
                    }
                }
            }
            Kind::Return => match self.pending.remove(&rec.entry_seq) {
                Some((entry, _, false)) => lines.push((self.line(&entry, Some(rec), "call"), true)),
                Some((entry, _, true)) => {
                    lines.push((self.line(&entry, Some(rec), "resumed"), true))
                }
                None => lines.push((self.line(rec, Some(rec), "unpaired_return"), true)),
            },
        }
    }

    /// Unfinished lines for entries blocked longer than [`UNFINISHED_AFTER`].
    pub fn tick(&mut self, now: Instant, lines: &mut Vec<(String, bool)>) {
        let mut late = Vec::new();
        for (entry, seen, shown) in self.pending.values_mut() {
            if !*shown && now.duration_since(*seen) >= UNFINISHED_AFTER {
                *shown = true;
                late.push(*entry);
            }
        }
        for e in late {
            lines.push((self.line(&e, None, "unfinished"), false));
        }
    }

    fn dropped_line(&self, n: u64) -> (String, bool) {
        if self.json {
            let v = serde_json::json!({"vm": self.vm, "uuid": self.uuid, "state": "dropped", "count": n});
            (v.to_string(), false)
        } else {
            (format!("--- {n} events dropped (ring full) ---"), false)
        }
    }

    /// One output line. `entry` is the entry record (or the return itself
    /// for an unpaired return).
    fn line(&self, entry: &Record, ret: Option<&Record>, state: &str) -> String {
        let owner = self.resolver.as_ref().and_then(|r| r.process(entry.cr3));
        // Path arguments stay addresses: read after the fact they are often
        // already overwritten (seen: stack buffers reused, execve's old mm
        // gone). The plugin must capture them at the call (issue 3, next slice).
        let call = format::call(entry);
        if self.json {
            let v = serde_json::json!({
                "vm": self.vm,
                "uuid": self.uuid,
                "state": state,
                "seq": entry.seq,
                "time_ns": entry.time_ns,
                "vcpu": entry.vcpu,
                "pid": owner.as_ref().map(|o| o.0),
                "comm": owner.as_ref().map(|o| o.1.clone()),
                "call": call,
                "cr3": format!("{:#x}", entry.cr3),
                "task_key": format!("{:#x}", entry.task_key),
                "nr": entry.nr,
                "syscall": entry.name(),
                "args": if entry.kind == Kind::Entry { entry.args.to_vec() } else { Vec::new() },
                "ret": ret.map(|r| r.ret),
                "ret_seq": ret.map(|r| r.seq),
                "duration_ns": ret.filter(|r| r.entry_seq != NO_ENTRY).map(|r| r.time_ns.saturating_sub(entry.time_ns)),
            });
            return v.to_string();
        }
        let head = match &owner {
            Some((pid, comm)) => format!("{pid:<5} {comm:<15}"),
            None => format!("{:<5} cr3={:#x}", "?", entry.cr3 & !0xfff),
        };
        match (state, ret) {
            ("resumed", Some(r)) => format!(
                "{head} <... {} resumed> = {}",
                entry.name(),
                format::result(r.nr, r.ret)
            ),
            ("unpaired_return", Some(r)) => format!(
                "{head} <... {} resumed> = {} (entry not seen)",
                entry.name(),
                format::result(r.nr, r.ret)
            ),
            (_, Some(r)) => format!("{head} {call} = {}", format::result(r.nr, r.ret)),
            ("unfinished", None) => format!("{head} {call} <unfinished ...>"),
            (_, None) => format!("{head} {call} = ?"),
        }
    }
}
