//! `vmwatch hook gdb --vm NAME [--syscall LIST] [--duration SECS]`: the
//! hardware-breakpoint syscall backend (`gdb-hook`), for VMs without the TCG
//! plugin (e.g. under KVM). It writes the same event ring the plugin would,
//! at the same place, so `vmwatch trace --vm NAME` reads it unchanged.
//!
//! `vmwatch hook release --vm NAME` clears what a monitor that died while
//! attached left in QEMU (its breakpoints would freeze the guest at the
//! next syscall).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use events::{Filter, RingWriter};

/// `vmwatch hook ...`
#[derive(clap::Subcommand, Debug, Clone)]
pub enum HookCommand {
    /// Hook a lab VM's syscalls through QEMU's gdbstub (hardware breakpoints on
    /// the kernel's syscall entry and return); the VM must be started with
    /// `vmwatch lab up NAME --gdbstub --no-hook`. Every syscall stops the VM
    /// twice: slow under TCG, the papers' mechanism under KVM.
    Gdb(GdbArgs),
    /// Remove breakpoints a crashed `vmwatch hook gdb` left in the VM's
    /// gdbstub and let the VM run.
    Release {
        #[arg(long)]
        vm: String,
    },
}

/// Arguments of `vmwatch hook gdb`.
#[derive(clap::Args, Debug, Clone)]
pub struct GdbArgs {
    /// The lab VM (started with --gdbstub).
    #[arg(long)]
    pub vm: String,
    /// Record only these syscalls (x86-64 names or numbers, comma-separated;
    /// consumers such as `vmwatch trace --syscall` change it at run time).
    /// Default: all. The VM stops at every syscall either way.
    #[arg(long, value_delimiter = ',')]
    pub syscall: Vec<String>,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Where to create the event ring (default: /dev/shm/vmwatch-NAME.ring,
    /// where `vmwatch trace` looks).
    #[arg(long)]
    pub ring: Option<PathBuf>,
}

/// Ring capacity in 128-byte slots (8 MiB): several seconds of a busy guest
/// at the rate breakpoints allow.
const RING_SLOTS: u64 = 1 << 16;

pub fn run(command: HookCommand) -> Result<()> {
    match command {
        HookCommand::Gdb(args) => gdb(&args),
        HookCommand::Release { vm } => {
            let vm = lab::Vm::open(&vm)?;
            gdb_hook::GdbHook::release(&vm, Duration::from_secs(10))?;
            println!(
                "VM `{}`: gdbstub breakpoints cleared, VM running",
                vm.name()
            );
            Ok(())
        }
    }
}

fn gdb(args: &GdbArgs) -> Result<()> {
    let vm = lab::Vm::open(&args.vm)?;
    if vm.info().gdb_socket.is_none() {
        bail!(
            "VM `{0}` was started without a gdbstub: restart it with `vmwatch lab up {0} --gdbstub --no-hook`",
            args.vm
        );
    }
    let filter = if args.syscall.is_empty() {
        Filter::ALL
    } else {
        Filter::parse(&args.syscall.join(","))?
    };
    let path = args
        .ring
        .clone()
        .unwrap_or_else(|| lab::vm::hook_ring_path(&args.vm));
    refuse_live_ring(&path)?;
    let ring = RingWriter::create(&path, RING_SLOTS, &args.vm, &filter, &Filter::NONE)?;
    // Ctrl-C, SIGTERM and SIGHUP detach cleanly instead of killing us with
    // the breakpoints still in QEMU.
    let stop = gdb_hook::signals::stop_flag();
    let mut hook = match gdb_hook::GdbHook::attach(&vm, &gdb_hook::Options::default()) {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e.into());
        }
    };
    let info = hook.info().clone();
    eprintln!(
        "vmwatch: hooking VM `{}` through its gdbstub: breakpoints at {:#x} (entry_SYSCALL_64) and {:#x} (return of do_syscall_64), {} vCPUs, VM paused {:.1} ms to attach; events in {}; Ctrl-C to stop",
        args.vm,
        info.entry.addr,
        info.ret.addr,
        info.vcpus,
        info.paused.as_secs_f64() * 1e3,
        path.display()
    );
    let deadline = args
        .duration
        .map(|s| Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let result = hook.run(&ring, &|| {
        stop.load(std::sync::atomic::Ordering::Relaxed)
            || deadline.is_some_and(|d| Instant::now() >= d)
    });
    // Consumers that have it open keep their mapping; a new consumer must
    // not find a ring nobody writes any more.
    let _ = std::fs::remove_file(&path);
    let stats = result?;
    println!("vmwatch: VM `{}`: {}", args.vm, stats.summary());
    Ok(())
}

/// Refuses to replace a ring whose writer (QEMU with the hook plugin, or
/// another `vmwatch hook gdb`) is alive: its consumers would silently lose
/// their events. A ring left by a dead writer is replaced.
fn refuse_live_ring(path: &Path) -> Result<()> {
    // The header's first bytes: magic (8), version, record size, capacity,
    // header size, then the writer's pid at offset 32 (events::ring layout).
    let mut head = [0u8; 40];
    let Ok(mut f) = std::fs::File::open(path) else {
        return Ok(());
    };
    if std::io::Read::read_exact(&mut f, &mut head).is_err() || head[..8] != events::MAGIC {
        bail!(
            "{} exists and is not a vmwatch event ring: remove it or pass --ring",
            path.display()
        );
    }
    let pid = u64::from_le_bytes(head[32..40].try_into().unwrap_or_default());
    if pid == 0 || pid == u64::from(std::process::id()) {
        return Ok(());
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    if !proc_dir.exists() {
        return Ok(());
    }
    let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
    let comm = comm.trim();
    let who = if comm.starts_with("qemu") {
        format!("QEMU (pid {pid}) with the TCG hook plugin: the VM is already hooked; use `vmwatch trace`, or restart it with --no-hook --gdbstub")
    } else {
        format!("pid {pid} ({comm}), another hook backend")
    };
    bail!("event ring {} is live, written by {who}", path.display());
}
