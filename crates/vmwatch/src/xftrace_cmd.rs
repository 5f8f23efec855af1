//! `vmwatch xftrace on|off|status`: the paper's command line (003). `on`
//! selects syscalls whose kernel call flow the VM's hook plugin records
//! from inside QEMU; `off` stops, writes `trace_graph.txt` (Ftrace's
//! function_graph layout, names from the guest's kallsyms and modules) and,
//! with `--baseline`, compares with a graph recorded on the clean system.

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
}

pub fn run(command: XftraceCommand) -> Result<()> {
    match command {
        XftraceCommand::On { vm, syscalls } => on(&vm, &syscalls),
        XftraceCommand::Off { vm, out, baseline } => off(&vm, &out, baseline.as_deref()),
        XftraceCommand::Status { vm } => status(&vm),
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

fn off(vm_name: &str, out: &Path, baseline: Option<&Path>) -> Result<()> {
    // Read the baseline first: a bad file should not cost the recording.
    let baseline = baseline
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
        .transpose()?;
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
