//! `vmwatch xftrace on|off|status`: the paper's command line (003). `on`
//! selects syscalls whose kernel call flow the VM's hook plugin records
//! from inside QEMU; `off` stops, writes `trace_graph.txt` (Ftrace's
//! function_graph layout, names from the guest's kallsyms and modules) and,
//! with `--baseline`, compares with a graph recorded on the clean system.
//!
//! `vmwatch xftrace kmod` is the paper's own design, for hosts without the
//! TCG plugin (KVM): the user loads `xftrace.ko` in the guest (it records
//! the call flow with the guest's function-graph tracer, XOR-keyed); this
//! command runs the Key Controller for `--seconds` (a fresh key into the
//! module's `xft_key` every `--interval-ms`, straight into guest RAM), then
//! disarms the recorder and writes the same `trace_graph.txt` from the
//! buffer read out of guest memory (`xftrace::kmod`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use xftrace::{Controller, PluginState};

/// How long `on` and `off` wait for the plugin, which acts at the guest's
/// next syscall (an idle guest makes none for a while).
const ON_WAIT: Duration = Duration::from_secs(2);
const OFF_WAIT: Duration = Duration::from_millis(500);
/// Largest baseline file read.
const MAX_BASELINE: u64 = 512 << 20;

/// `vmwatch xftrace ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum XftraceCommand {
    /// Start recording the kernel call flow of these syscalls (`sys_openat`
    /// or `openat`); a new recording replaces the previous one.
    On {
        #[arg(long)]
        vm: String,
        #[arg(required = true, value_name = "SYSCALL")]
        syscalls: Vec<String>,
    },
    /// Stop recording and write the call graph.
    Off {
        #[arg(long)]
        vm: String,
        /// Where to write the graph.
        #[arg(long, default_value = "trace_graph.txt")]
        out: PathBuf,
        /// A trace_graph.txt of the clean system: report functions the new
        /// flows call that it never did.
        #[arg(long)]
        baseline: Option<PathBuf>,
    },
    /// Whether it records, which syscalls, and the counters.
    Status {
        #[arg(long)]
        vm: String,
    },
    /// The in-guest recorder (KVM hosts): with `xftrace.ko` loaded in the
    /// guest (`insmod xftrace.ko nrs=257`), change its key every interval
    /// for SECONDS, then stop it and write the call graph.
    Kmod {
        #[arg(long)]
        vm: String,
        /// How long to record.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Key change interval.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Where to write the graph.
        #[arg(long, default_value = "trace_graph.txt")]
        out: PathBuf,
        /// A trace_graph.txt of the clean system (see `off`).
        #[arg(long)]
        baseline: Option<PathBuf>,
    },
}

pub fn run(command: XftraceCommand) -> Result<()> {
    match command {
        XftraceCommand::On { vm, syscalls } => on(&vm, &syscalls),
        XftraceCommand::Off { vm, out, baseline } => off(&vm, &out, baseline.as_deref()),
        XftraceCommand::Status { vm } => status(&vm),
        XftraceCommand::Kmod {
            vm,
            seconds,
            interval_ms,
            out,
            baseline,
        } => kmod(
            &vm,
            Duration::from_secs(seconds),
            Duration::from_millis(interval_ms.max(1)),
            &out,
            baseline.as_deref(),
        ),
    }
}

fn controller(vm: &lab::Vm) -> Result<Controller> {
    let path = xftrace::file_in(&vm.info().state_dir);
    if !path.exists() {
        bail!(
            "VM `{}` was started without xftrace (no {}): restart it with this vmwatch (`vmwatch lab down {0}; vmwatch lab up {0}`), with the hook plugin loaded",
            vm.name(),
            path.display()
        );
    }
    Ok(Controller::open(&path)?)
}

fn names_of(syscalls: &[u64]) -> String {
    syscalls
        .iter()
        .map(|&nr| events::syscalls::name(nr).map_or_else(|| nr.to_string(), str::to_string))
        .collect::<Vec<_>>()
        .join(", ")
}

fn on(vm: &str, syscalls: &[String]) -> Result<()> {
    let bits = xftrace::names::bitmap(syscalls)?;
    let vm = lab::Vm::open(vm)?;
    let c = controller(&vm)?;
    let change = c.turn_on(&bits);
    let applied = c.wait_applied(change, ON_WAIT);
    let st = c.status();
    let which = names_of(&st.syscalls());
    if !applied {
        println!(
            "xftrace on in VM `{}` for {which}: takes effect at the guest's next syscall",
            vm.name()
        );
        return Ok(());
    }
    match st.state {
        Some(PluginState::Recording) => {
            println!(
                "xftrace on in VM `{}` for {which} (session {})",
                vm.name(),
                change.session
            );
            Ok(())
        }
        _ => bail!(
            "VM `{}`: the hook plugin cannot record call flows: it has not found the guest kernel in RAM yet (retry in a moment)",
            vm.name()
        ),
    }
}

fn read_baseline(baseline: Option<&Path>) -> Result<Option<Vec<xftrace::FlowSummary>>> {
    baseline
        .map(|p| -> Result<Vec<xftrace::FlowSummary>> {
            let meta = std::fs::metadata(p).with_context(|| format!("baseline {}", p.display()))?;
            if meta.len() > MAX_BASELINE {
                bail!(
                    "baseline {} is larger than {MAX_BASELINE} bytes",
                    p.display()
                );
            }
            let text =
                std::fs::read_to_string(p).with_context(|| format!("baseline {}", p.display()))?;
            xftrace::fgraph::parse(&text).with_context(|| format!("baseline {}", p.display()))
        })
        .transpose()
}

fn off(vm_name: &str, out: &Path, baseline: Option<&Path>) -> Result<()> {
    // Read the baseline first: a bad file should not cost the recording.
    let baseline = read_baseline(baseline)?;
    let vm = lab::Vm::open(vm_name)?;
    let c = controller(&vm)?;
    let change = c.turn_off();
    // An idle guest applies `off` at its next syscall; what was recorded
    // until now is read either way.
    let _ = c.wait_applied(change, OFF_WAIT);
    let st = c.status();
    let snap = c.snapshot();
    let trace = xftrace::build(&snap.records);
    let mem: Arc<dyn vmi::memory::PhysicalMemory> = Arc::new(vm.memory(false)?);
    let names = xftrace::host::guest_names(mem, &vm.info().vmlinux)?;
    for w in &names.warnings {
        eprintln!("warning: {w}");
    }
    if st.slide != 0 && st.slide != names.symbolizer.slide() {
        eprintln!(
            "warning: the plugin used KASLR slide {:#x}, the guest's is {:#x} now",
            st.slide,
            names.symbolizer.slide()
        );
    }
    let preamble = xftrace::Preamble {
        notes: vec![
            ("vm".into(), vm.name().to_string()),
            (
                "kernel".into(),
                format!(
                    "{} ({})",
                    vm.info().kernel_release,
                    vm.info().kernel_version
                ),
            ),
            ("syscalls".into(), names_of(&st.syscalls())),
            ("session".into(), st.applied_session.to_string()),
            (
                "records".into(),
                format!(
                    "{} read, {} lost (buffer full or task unreadable), {} calls past depth {}, {} flows evicted, {} indirect targets unread",
                    snap.records.len(),
                    st.lost,
                    st.deep,
                    xftrace::record::MAX_DEPTH,
                    st.evicted,
                    st.unread
                ),
            ),
        ],
    };
    let mut text = Vec::new();
    let written = xftrace::fgraph::write(&trace, &names.symbolizer, &preamble, &mut text)?;
    std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "xftrace off in VM `{}`: {} syscalls recorded ({} returned to user mode), {} calls, {} records lost, {} flagged addresses -> {}",
        vm.name(),
        written.flows,
        written.complete,
        written.calls,
        st.lost,
        written.flagged.len(),
        out.display()
    );
    for f in &written.flagged {
        println!(
            "  !! {} (pid {}): {} called {:#x}, outside kernel and module text",
            f.syscall, f.pid, f.caller, f.address
        );
    }
    if let Some(baseline) = baseline {
        let new = xftrace::fgraph::parse(&String::from_utf8_lossy(&text))?;
        let findings = xftrace::compare(&baseline, &new);
        if findings.is_empty() {
            println!("baseline: no deviation");
        }
        for f in findings {
            println!("baseline: {f}");
        }
    }
    Ok(())
}

fn status(vm: &str) -> Result<()> {
    let vm = lab::Vm::open(vm)?;
    let c = controller(&vm)?;
    let st = c.status();
    let state = match st.state {
        Some(PluginState::Recording) => "recording",
        Some(PluginState::Off) => "off",
        Some(PluginState::Refused) => "refused (guest kernel not found yet)",
        None => "unknown",
    };
    let pending = if st.applied_generation == st.control.generation {
        ""
    } else {
        " (a change is pending: it applies at the guest's next syscall)"
    };
    println!("VM `{}`: xftrace {state}{pending}", vm.name());
    println!(
        "  syscalls: {}",
        if st.syscalls().is_empty() {
            "-".to_string()
        } else {
            names_of(&st.syscalls())
        }
    );
    println!(
        "  session {}: {} entries, {} returns to user mode, {} of {} records used, {} lost, {} past depth {}, {} evicted, {} indirect targets unread",
        st.applied_session,
        st.entries,
        st.exits,
        st.written.min(st.capacity),
        st.capacity,
        st.lost,
        st.deep,
        xftrace::record::MAX_DEPTH,
        st.evicted,
        st.unread
    );
    println!("  file: {}", c.path().display());
    Ok(())
}

fn kmod(
    vm_name: &str,
    seconds: Duration,
    interval: Duration,
    out: &Path,
    baseline: Option<&Path>,
) -> Result<()> {
    use std::sync::atomic::AtomicBool;
    use xftrace::kmod::{self, guest};

    let baseline = read_baseline(baseline)?;
    let vm = lab::Vm::open(vm_name)?;
    let mem: Arc<dyn vmi::memory::PhysicalMemory> = Arc::new(vm.memory(false)?);
    let att = guest::attach(mem, &vm.info().vmlinux)?;
    for w in &att.warnings {
        eprintln!("warning: {w}");
    }
    let target = guest::locate(&att.guest, att.btf.as_ref())
        .with_context(|| format!("VM `{}`", vm.name()))?;
    let access =
        guest::LiveAccess::open(&att.guest, &target, &vm.info().ram_path, &vm.info().ranges)?;
    let header = kmod::read_header(&access, &target)?;
    for w in kmod::check_handlers(&header, &att.names) {
        println!("  !! {w}");
    }
    let nrs: Vec<u64> = header
        .syscalls
        .iter()
        .map(|&(nr, _)| u64::from(nr))
        .collect();
    println!(
        "xftrace (module) in VM `{}`: recording {} for {:.1} s, new key every {} ms",
        vm.name(),
        names_of(&nrs),
        seconds.as_secs_f64(),
        interval.as_millis()
    );
    let mut keys = kmod::KeyController::start(&access, target.clone())?;
    let stop = AtomicBool::new(false);
    let run = keys.run(seconds, interval, &stop);
    // Disarm whatever happened: the guest must not go on with a key we forget.
    let klog = keys.stop()?;
    run?;
    std::thread::sleep(kmod::SETTLE);
    let raw = kmod::read_buffer(&access, &target)?;
    let decoded = kmod::decode(&raw, &klog);
    let trace = kmod::to_trace(&decoded.records);
    let h = &raw.header;
    let st = &decoded.stats;
    let preamble = xftrace::Preamble {
        notes: vec![
            ("vm".into(), vm.name().to_string()),
            (
                "kernel".into(),
                format!(
                    "{} ({})",
                    vm.info().kernel_release,
                    vm.info().kernel_version
                ),
            ),
            ("syscalls".into(), names_of(&nrs)),
            ("recorder".into(), format!("guest module `{}`", kmod::MODULE_NAME)),
            (
                "keys".into(),
                format!(
                    "{} written, {} used by records, write index went backwards {} times",
                    klog.keys(),
                    st.keys_used,
                    klog.backwards.len()
                ),
            ),
            (
                "records".into(),
                format!(
                    "{} decoded of {} read; {} bad, {} blank, {} invalid, {} far, {} earlier; guest counted {} lost (full), {} busy, {} deep, {} while disarmed",
                    st.decoded, st.slots, st.bad, st.blank, st.invalid, st.far, st.earlier, h.lost, h.busy, h.deep, h.disarmed
                ),
            ),
        ],
    };
    let mut text = Vec::new();
    let written = kmod::write_graph(&trace, &att.names, &preamble, &mut text)?;
    std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "xftrace (module) in VM `{}`: {} syscalls recorded ({} complete), {} calls, {} records with {} keys, {} flagged addresses -> {}",
        vm.name(),
        written.flows,
        written.complete,
        written.calls,
        st.decoded,
        st.keys_used,
        written.flagged.len(),
        out.display()
    );
    for f in &written.flagged {
        println!(
            "  !! {} (pid {}): {} called {:#x}, outside kernel and module text",
            f.syscall, f.pid, f.caller, f.address
        );
    }
    if st.suspicious() || !klog.backwards.is_empty() {
        println!(
            "  !! the buffer was tampered with or torn: {} records no key verifies, {} wiped, {} out of range, {} only an old key verifies; write index reset {:?}",
            st.bad, st.blank, st.invalid, st.far, klog.backwards
        );
    }
    if let Some(baseline) = baseline {
        let new = xftrace::fgraph::parse(&String::from_utf8_lossy(&text))?;
        let findings = xftrace::compare(&baseline, &new);
        if findings.is_empty() {
            println!("baseline: no deviation");
        }
        for f in findings {
            println!("baseline: {f}");
        }
    }
    Ok(())
}
