//! `vmwatch ps|lsof|sockets|modules`: the Linux view of a running lab VM or a dump.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use vmi::image::KernelImage;
use vmi::linux::{KernelProfile, LinuxGuest, Listing};
use vmi::memory::{ElfDumpMemory, PhysicalMemory, RawMemory};

/// Which guest to look at: a running lab VM, or a memory dump plus its kernel.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Name of a running lab VM (see `vmwatch lab ls`).
    #[arg(long, conflicts_with = "dump")]
    pub vm: Option<String>,
    /// A memory dump: QEMU's dump-guest-memory ELF, or a raw image (gpa == offset).
    #[arg(long, requires = "kernel")]
    pub dump: Option<PathBuf>,
    /// The kernel the dumped guest ran: a vmlinux ELF or a bzImage.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Target {
    /// Opens the memory and locates the kernel in it. Never pauses the guest.
    pub fn attach(&self) -> Result<LinuxGuest> {
        Ok(self.attach_with_image()?.0)
    }

    /// [`Target::attach`], also returning the kernel image it used.
    pub fn attach_with_image(&self) -> Result<(LinuxGuest, KernelImage)> {
        let (mem, kernel): (Arc<dyn PhysicalMemory>, PathBuf) = match (&self.vm, &self.dump) {
            (Some(name), None) => {
                let vm = lab::Vm::open(name)?;
                (Arc::new(vm.memory(false)?), vm.info().vmlinux.clone())
            }
            (None, Some(dump)) => (open_dump(dump)?, self.kernel.clone().unwrap_or_default()),
            _ => bail!(
                "say which guest: --vm NAME (a running lab VM) or --dump FILE --kernel VMLINUX"
            ),
        };
        let image = load_kernel(&kernel)?;
        let profile = KernelProfile::from_image(&image)
            .with_context(|| format!("kernel image {}", kernel.display()))?;
        Ok((LinuxGuest::attach(mem, Arc::new(profile))?, image))
    }
}

fn open_dump(path: &Path) -> Result<Arc<dyn PhysicalMemory>> {
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path)
            .with_context(|| format!("cannot open dump {}", path.display()))?;
        f.read_exact(&mut magic)
            .with_context(|| format!("{}: too short to be a memory dump", path.display()))?;
    }
    if &magic == b"\x7fELF" {
        Ok(Arc::new(ElfDumpMemory::open(path)?))
    } else {
        Ok(Arc::new(RawMemory::open(path)?))
    }
}

fn load_kernel(path: &Path) -> Result<KernelImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read kernel {}", path.display()))?;
    if bytes.starts_with(b"\x7fELF") {
        Ok(KernelImage::from_bytes(bytes)?)
    } else {
        let vmlinux = vmi::image::extract_vmlinux(&bytes)
            .with_context(|| format!("{}: neither a vmlinux ELF nor a bzImage", path.display()))?;
        Ok(KernelImage::from_bytes(vmlinux)?)
    }
}

/// Prints warnings to stderr, then the listing as JSON or as a table.
pub fn print_listing<T: Serialize>(
    listing: &Listing<T>,
    json: bool,
    header: &str,
    row: impl Fn(&T) -> String,
) -> Result<()> {
    for w in &listing.warnings {
        eprintln!("warning: {w}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(listing)?);
    } else {
        println!("{header}");
        for item in &listing.items {
            println!("{}", row(item));
        }
    }
    Ok(())
}

pub fn ps(target: &Target) -> Result<()> {
    let guest = target.attach()?;
    let list = guest.processes();
    print_listing(
        &list,
        target.json,
        &format!(
            "{:>7} {:>7} {:>5} {:>5} {:1} {:<16} EXE",
            "PID", "PPID", "UID", "EUID", "S", "COMM"
        ),
        |p| {
            format!(
                "{:>7} {:>7} {:>5} {:>5} {:1} {:<16} {}",
                p.pid,
                p.ppid,
                p.uid,
                p.euid,
                p.state,
                p.comm,
                p.exe
                    .as_deref()
                    .unwrap_or(if p.kernel_thread { "[kernel]" } else { "-" })
            )
        },
    )
}

pub fn lsof(target: &Target, pid: Option<i32>) -> Result<()> {
    let guest = target.attach()?;
    let list = guest.open_files(pid);
    print_listing(
        &list,
        target.json,
        &format!(
            "{:>7} {:<16} {:>4} {:<10} {:>10} PATH",
            "PID", "COMM", "FD", "KIND", "INODE"
        ),
        |f| {
            format!(
                "{:>7} {:<16} {:>4} {:<10} {:>10} {}",
                f.pid,
                f.comm,
                f.fd,
                format!("{:?}", f.kind).to_lowercase(),
                f.inode,
                f.path
            )
        },
    )
}

pub fn sockets(target: &Target) -> Result<()> {
    let guest = target.attach()?;
    let list = guest.sockets();
    let addr = |a: &Option<(std::net::IpAddr, u16)>| match a {
        Some((ip, port)) => format!("{ip}:{port}"),
        None => "-".to_string(),
    };
    print_listing(
        &list,
        target.json,
        &format!(
            "{:<6} {:<22} {:<22} {:<12} {:>8} OWNERS",
            "PROTO", "LOCAL", "REMOTE", "STATE", "INODE"
        ),
        |s| {
            let owners: Vec<String> = s
                .owners
                .iter()
                .map(|(pid, comm, fd)| format!("{pid}/{comm}:{fd}"))
                .collect();
            let proto = match s.family {
                vmi::linux::SocketFamily::Inet6 => format!("{}6", s.protocol),
                vmi::linux::SocketFamily::Unix => "unix".to_string(),
                _ => s.protocol.clone(),
            };
            format!(
                "{:<6} {:<22} {:<22} {:<12} {:>8} {}",
                proto,
                addr(&s.local),
                addr(&s.remote),
                s.state_name,
                s.inode,
                owners.join(",")
            )
        },
    )
}

pub fn modules(target: &Target) -> Result<()> {
    let guest = target.attach()?;
    let list = guest.modules();
    print_listing(
        &list,
        target.json,
        &format!("{:<24} {:>8} {:<8} BASE", "NAME", "SIZE", "STATE"),
        |m| format!("{:<24} {:>8} {:<8} {:#x}", m.name, m.size, m.state, m.base),
    )
}

pub fn kernel(target: &Target) -> Result<()> {
    let guest = target.attach()?;
    let loc = guest.location();
    let banner = String::from_utf8_lossy(&guest.profile().banner)
        .trim_end()
        .to_string();
    if target.json {
        println!(
            "{}",
            serde_json::json!({ "location": loc, "banner": banner, "symbols": guest.profile().symbols.len() })
        );
    } else {
        println!("kernel          {banner}");
        println!(
            "symbols         {} (from the image's kallsyms)",
            guest.profile().symbols.len()
        );
        println!("virtual slide   {:#x}", loc.virtual_slide);
        println!("physical slide  {:#x}", loc.physical_slide);
        println!(
            "page-table root {:#x} ({:?})",
            loc.page_table_root, loc.paging_mode
        );
    }
    Ok(())
}
