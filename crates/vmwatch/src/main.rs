//! `vmwatch`: a thin command line over the `vmi`, `lab`, `tracer` libraries
//! and the `vmwatchd` daemon's API.

mod diffusion_cmd;
mod hook_cmd;
mod inspect_cmd;
mod lab_cmd;
mod logs_cmd;
mod scan_cmd;
mod trace_cmd;
mod xftrace_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vmwatch",
    version,
    about = "Hypervisor-side security for Linux VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build guest images and run lab VMs (QEMU with shared RAM).
    Lab {
        #[command(subcommand)]
        command: lab_cmd::LabCommand,
    },
    /// List the guest's processes from its kernel's task list.
    Ps {
        #[command(flatten)]
        target: inspect_cmd::Target,
    },
    /// List open files of the guest's processes.
    Lsof {
        #[command(flatten)]
        target: inspect_cmd::Target,
        /// Only this process (tgid).
        #[arg(long)]
        pid: Option<i32>,
    },
    /// List sockets held by the guest's processes.
    Sockets {
        #[command(flatten)]
        target: inspect_cmd::Target,
    },
    /// List the guest's loaded kernel modules.
    Modules {
        #[command(flatten)]
        target: inspect_cmd::Target,
    },
    /// Live strace-like stream of a lab VM's syscalls (needs the hook plugin loaded).
    Trace(trace_cmd::TraceArgs),
    /// Register confidential files whose spread vmwatchd tracks.
    Track {
        #[command(subcommand)]
        command: diffusion_cmd::TrackCommand,
    },
    /// Where registered files' content went: the graph (now or at a past
    /// time) and the delta log.
    Diffusion {
        #[command(subcommand)]
        command: diffusion_cmd::DiffusionCommand,
    },
    /// Application logs kept outside the guest (the log vault): show, follow,
    /// export (JSON, RFC 5424), verify.
    Logs(logs_cmd::LogsArgs),
    /// Syscall hooks without the TCG plugin: QEMU's gdbstub with hardware
    /// breakpoints (the papers' mechanism, for KVM hosts).
    Hook {
        #[command(subcommand)]
        command: hook_cmd::HookCommand,
    },
    /// Talk to the running vmwatchd.
    Daemon {
        #[command(subcommand)]
        command: DaemonCommand,
    },
    /// Kernel integrity checks (rootkit detection) against the kernel image,
    /// without pausing the guest. Exit status 2 when something is found.
    Scan(scan_cmd::ScanArgs),
    /// Integrity alerts from vmwatchd's continuous scanning (`+` new, `-` gone).
    Alerts(scan_cmd::AlertsArgs),
    /// Show where the guest's kernel is (KASLR slides, page-table root).
    Kernel {
        #[command(flatten)]
        target: inspect_cmd::Target,
    },
    /// Record the kernel call flow of chosen syscalls (paper 003): `on
    /// sys_openat ...`, `off` writes trace_graph.txt (function_graph layout).
    Xftrace {
        #[command(subcommand)]
        command: xftrace_cmd::XftraceCommand,
    },
}

#[derive(Subcommand)]
enum DaemonCommand {
    /// The daemon's health and the VMs it watches (ring counters, filters, streams).
    Status {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMWATCH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Lab { command } => lab_cmd::run(command),
        Command::Ps { target } => inspect_cmd::ps(&target),
        Command::Lsof { target, pid } => inspect_cmd::lsof(&target, pid),
        Command::Sockets { target } => inspect_cmd::sockets(&target),
        Command::Modules { target } => inspect_cmd::modules(&target),
        Command::Kernel { target } => inspect_cmd::kernel(&target),
        Command::Trace(args) => trace_cmd::run(args),
        Command::Xftrace { command } => xftrace_cmd::run(command),
        Command::Alerts(args) => scan_cmd::alerts(&args),
        Command::Scan(args) => match scan_cmd::run(&args) {
            Ok(true) => std::process::exit(scan_cmd::EXIT_FINDINGS),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        },
        Command::Hook { command } => hook_cmd::run(command),
        Command::Logs(args) => logs_cmd::run(args),
        Command::Track { command } => diffusion_cmd::track(command),
        Command::Diffusion { command } => diffusion_cmd::diffusion(command),
        Command::Daemon {
            command: DaemonCommand::Status { json },
        } => trace_cmd::daemon_client::status(json, &mut std::io::stdout().lock()),
    };
    if let Err(err) = result {
        // One line that says what is wrong and what to do.
        eprintln!("vmwatch: {err:#}");
        std::process::exit(1);
    }
}
