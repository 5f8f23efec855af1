//! `vmwatch lab ...`: build guest images and run lab VMs (a thin layer over
//! the `lab` library; every error is one line that says what to do).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use lab::{Accel, BuildOptions, ExecOptions, Flavour, LabError, Pti, UpOptions, Vm};

#[derive(Subcommand)]
pub enum LabCommand {
    /// Build a guest image (kernel + initramfs) from Debian packages.
    Build {
        /// Which Debian kernel: stable (bookworm, 6.1) or backports (6.12).
        #[arg(long, default_value = "stable")]
        kernel: Flavour,
        /// Rebuild even if packages, agent and recipe are unchanged.
        #[arg(long)]
        force: bool,
        /// The vmwatch-agent binary to bake in (default: next to this executable).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// Start a VM and wait until its guest agent answers.
    Up {
        /// VM name: 1-32 of a-z, 0-9, - (also the guest's hostname).
        name: String,
        #[arg(long, default_value = "stable")]
        kernel: Flavour,
        /// tcg (emulation, works everywhere) or kvm.
        #[arg(long, default_value = "tcg")]
        accel: Accel,
        /// Guest RAM, e.g. 256M, 512M, 4G.
        #[arg(long, default_value = "512M")]
        mem: String,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// QEMU -cpu model (default: max,la57=off under TCG, host under KVM).
        #[arg(long)]
        cpu: Option<String>,
        /// Boot the vmlinux directly with `nokaslr` (default: the bzImage, with KASLR).
        #[arg(long)]
        nokaslr: bool,
        /// Kernel page-table isolation: on, off or auto (the kernel decides).
        #[arg(long, default_value = "auto")]
        pti: Pti,
        /// Extra kernel command-line arguments (one string, space-separated).
        #[arg(long, allow_hyphen_values = true)]
        append: Option<String>,
        /// A TCG plugin, passed as `-plugin SPEC` (repeatable).
        #[arg(long = "plugin")]
        plugins: Vec<String>,
        /// Start without vmwatch's syscall-hook plugin (loaded by default, filter off).
        #[arg(long)]
        no_hook: bool,
        /// Open QEMU's gdbstub (STATE_DIR/gdb.sock) for `vmwatch hook gdb`.
        #[arg(long)]
        gdbstub: bool,
        /// No NICs (the guest has only lo). By default eth0 reaches the host
        /// (10.0.2.2:PORT is the host's 127.0.0.1:PORT) and eth1 the other
        /// lab VMs on 10.77.0.0/24 (addresses: `vmwatch lab info NAME`).
        #[arg(long)]
        no_network: bool,
        /// Seconds to wait for the guest agent.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Run a command in a VM through its agent; exits with the command's status.
    Exec {
        name: String,
        /// Kill the command after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Command and arguments (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// List lab VMs.
    Ls {
        /// Print JSON (the full vm.json of each VM).
        #[arg(long)]
        json: bool,
    },
    /// Print a VM's vm.json (paths, UUID, RAM layout, boot time).
    Info { name: String },
    /// Stop VMs and remove their state, sockets and RAM files.
    Down {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every lab VM.
        #[arg(long)]
        all: bool,
    },
    /// Write a VM's physical memory to an ELF core file (QMP dump-guest-memory).
    Dump { name: String, file: PathBuf },
}

pub fn run(cmd: LabCommand) -> Result<()> {
    match cmd {
        LabCommand::Build {
            kernel,
            force,
            agent,
        } => {
            let outcome = lab::image::build(&BuildOptions {
                flavour: kernel,
                force,
                agent,
                cache: None,
            })?;
            let i = &outcome.info;
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            println!(
                "{} image {} ({} {}, kernel {}): vmlinux {:.1} MiB, bzImage {:.1} MiB, initramfs {:.1} MiB, {} packages, built {}{}",
                kernel,
                if outcome.rebuilt { "built" } else { "up to date" },
                i.kernel_package,
                i.kernel_version,
                i.kernel_release,
                mib(i.vmlinux_bytes),
                mib(i.bzimage_bytes),
                mib(i.initramfs_bytes),
                i.packages.len(),
                i.built_at,
                if outcome.rebuilt { format!(" in {:.1} s", i.build_secs) } else { String::new() },
            );
            println!("  {}", outcome.paths.dir.display());
        }
        LabCommand::Up {
            name,
            kernel,
            accel,
            mem,
            cpus,
            cpu,
            nokaslr,
            pti,
            append,
            plugins,
            no_hook,
            gdbstub,
            no_network,
            timeout,
        } => {
            let mut opts = UpOptions::new(&name);
            opts.flavour = kernel;
            opts.accel = accel;
            opts.mem_bytes = lab::parse_mem(&mem)?;
            opts.cpus = cpus;
            opts.cpu = cpu;
            opts.kaslr = !nokaslr;
            opts.pti = pti;
            opts.append = append
                .map(|a| a.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default();
            opts.plugins = plugins;
            opts.hook = !no_hook;
            opts.gdbstub = gdbstub;
            opts.network = !no_network;
            opts.boot_timeout = Duration::from_secs(timeout);
            let vm = Vm::up(&opts)?;
            let i = vm.info();
            println!(
                "{} up: {} kernel {}, {} MiB, {} cpu(s), {}, uuid {}, pid {}; agent ready after {:.1} s",
                i.name,
                i.flavour,
                i.kernel_release,
                i.mem_bytes >> 20,
                i.cpus,
                if i.kaslr { "KASLR" } else { "nokaslr" },
                i.uuid,
                i.qemu_pid,
                i.boot_to_ready_secs.unwrap_or(0.0),
            );
        }
        LabCommand::Exec {
            name,
            timeout,
            command,
        } => {
            let vm = Vm::open(&name)?;
            let argv: Vec<&str> = command.iter().map(String::as_str).collect();
            // Forward our stdin when it is a file or a pipe (not a terminal),
            // so `vmwatch lab exec VM -- sh -c 'cat > f' < file` copies a file in.
            let stdin = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                None
            } else {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                Some(buf)
            };
            let opts = ExecOptions {
                stdin,
                timeout: Duration::from_secs(timeout),
                ..Default::default()
            };
            let out = match vm.exec_with(&argv, &opts) {
                Ok(out) => out,
                Err(LabError::Agent { detail, .. }) if detail.starts_with("cannot run") => {
                    // Like a shell: command not found or not executable.
                    eprintln!("vmwatch: in `{name}`: {detail}");
                    std::process::exit(127);
                }
                Err(e) => return Err(e.into()),
            };
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stdout().flush()?;
            std::io::stderr().write_all(&out.stderr)?;
            if out.timed_out {
                eprintln!(
                    "vmwatch: `{}` timed out after {timeout} s and was killed",
                    command[0]
                );
            }
            if out.truncated {
                eprintln!("vmwatch: output was longer than 16 MiB and was cut");
            }
            std::process::exit(out.code());
        }
        LabCommand::Ls { json } => {
            let vms = lab::list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
                return Ok(());
            }
            println!(
                "{:<16} {:<8} {:<36} {:<10} {:<18} {:>8} {:>7} {:>7}",
                "NAME", "STATE", "UUID", "FLAVOUR", "KERNEL", "PID", "MEM", "BOOT"
            );
            for s in vms {
                match &s.info {
                    Some(i) => println!(
                        "{:<16} {:<8} {:<36} {:<10} {:<18} {:>8} {:>6}M {:>6}",
                        s.name,
                        s.state,
                        i.uuid,
                        i.flavour,
                        i.kernel_release,
                        i.qemu_pid,
                        i.mem_bytes >> 20,
                        i.boot_to_ready_secs
                            .map(|b| format!("{b:.1}s"))
                            .unwrap_or_else(|| "-".into()),
                    ),
                    None => println!(
                        "{:<16} {:<8} (no vm.json: `vmwatch lab down {}` cleans up)",
                        s.name, s.state, s.name
                    ),
                }
            }
        }
        LabCommand::Info { name } => {
            let vm = Vm::open(&name)?;
            let mut v = serde_json::to_value(vm.info())?;
            v["state"] = serde_json::Value::String(vm.state().to_string());
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        LabCommand::Down { name, all } => {
            let names: Vec<String> = if all {
                lab::list()?.into_iter().map(|s| s.name).collect()
            } else {
                name.into_iter().collect()
            };
            for n in names {
                lab::down(&n)?;
                println!("{n} down");
            }
        }
        LabCommand::Dump { name, file } => {
            let vm = Vm::open(&name)?;
            let path = vm.dump(&file)?;
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            println!(
                "{}: {} MiB ELF core of `{name}`",
                path.display(),
                size >> 20
            );
        }
    }
    Ok(())
}
