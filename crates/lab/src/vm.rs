//! Lab VMs: one QEMU process each, with guest RAM in a shared file that
//! vmwatch maps from outside, a QMP socket, a serial console log and the
//! test agent on the second serial port.
//!
//! State lives in `$VMWATCH_CACHE/vms/NAME/` (`vm.json`, sockets, logs); the
//! RAM file in `/dev/shm/vmwatch/` when that tmpfs exists, so guest RAM is
//! never written to disk. QEMU runs in its own session and outlives the
//! process that started it; any later process finds it again with
//! [`Vm::open`].

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmi::memory::PhysRange;
use vmwatch_agent::ExecRequest;

use crate::agent::AgentConn;
use crate::error::{IoContext, LabError, Result};
use crate::image::{Flavour, ImagePaths};
use crate::qmp::Qmp;
use crate::util::{self, cache_dir, tails, FileLock};

/// Guest RAM below the PCI hole (`max-ram-below-4g`); the rest sits at 4 GiB.
pub const RAM_BELOW_4G: u64 = 2 << 30;

/// Oldest QEMU we accept: plugin API v4 (the syscall-hook plugin needs it).
pub const MIN_QEMU: (u32, u32) = (9, 2);

/// Name of the memory backend object, as it appears in `info mtree`.
const BACKEND_ID: &str = "mem";

/// eth0 of every lab VM: QEMU's user-mode network (slirp), private to each
/// VM. The guest has this address; slirp plays the host at
/// [`SLIRP_HOST_IP`] and forwards a guest connection to `10.0.2.2:PORT` to
/// the host's `127.0.0.1:PORT` (made by the QEMU process).
pub const SLIRP_GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The host as a lab guest reaches it (slirp's default gateway).
pub const SLIRP_HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const SLIRP_NET: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 0);
/// slirp's DNS forwarder.
const SLIRP_DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// eth1 of every lab VM: the lab LAN, `10.77.0.0/24`, shared by all running
/// VMs of one cache. Hosts `.2` to `.254`; `.1` is left for a host-side
/// endpoint should one ever join.
pub const LAN_NET: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 0);
pub const LAN_PREFIX_LEN: u8 = 24;
const LAN_FIRST_HOST: u8 = 2;
const LAN_LAST_HOST: u8 = 254;
/// The LAN is a UDP multicast group on the host's loopback: every VM's LAN
/// NIC sends its frames to the group and receives everyone's (a hub needing
/// no daemon and no root network setup). The port is derived from the cache
/// directory, so VMs of different caches (whose addresses are allocated
/// independently) are on different LANs.
const LAN_GROUP: Ipv4Addr = Ipv4Addr::new(239, 77, 0, 1);
/// Below Linux's ephemeral port range (32768-60999), so a client socket of
/// some other program cannot hold it.
const LAN_PORT_BASE: u16 = 27700;
/// Fixed PCI slots for the two NICs: the guest enumerates them in slot
/// order, so the slirp NIC is always eth0 and the LAN NIC eth1, whatever
/// other devices are added.
const SLIRP_PCI_SLOT: u8 = 0x10;
const LAN_PCI_SLOT: u8 = 0x11;

/// How the guest CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// QEMU's translator; works everywhere, what the lab uses.
    Tcg,
    /// Hardware virtualisation, as in production.
    Kvm,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        })
    }
}

impl FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            _ => Err(format!("unknown accelerator `{s}`: use tcg or kvm")),
        }
    }
}

/// Kernel page-table isolation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pti {
    /// The kernel decides (off on CPUs it thinks are not vulnerable, such as TCG's).
    Auto,
    /// `pti=on`: user-mode CR3 maps almost no kernel memory.
    On,
    /// `pti=off`.
    Off,
}

impl fmt::Display for Pti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Pti::Auto => "auto",
            Pti::On => "on",
            Pti::Off => "off",
        })
    }
}

impl FromStr for Pti {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Pti::Auto),
            "on" => Ok(Pti::On),
            "off" => Ok(Pti::Off),
            _ => Err(format!("unknown pti mode `{s}`: use on, off or auto")),
        }
    }
}

/// Parses a memory size: `512M`, `4G`, `1024` (MiB), `262144K`.
pub fn parse_mem(s: &str) -> Result<u64> {
    let bad = || LabError::Invalid(format!("bad memory size `{s}`: use e.g. 256M, 512M or 4G"));
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last().ok_or_else(bad)? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1 << 20),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if bytes < (64 << 20) || bytes % (2 << 20) != 0 {
        return Err(LabError::Invalid(format!(
            "memory size `{s}` must be at least 64M and a multiple of 2M"
        )));
    }
    Ok(bytes)
}

/// How to start a VM. [`UpOptions::new`] gives the lab defaults.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// `[a-z0-9-]{1,32}`; also the guest's hostname.
    pub name: String,
    pub flavour: Flavour,
    pub accel: Accel,
    /// Guest RAM in bytes (see [`parse_mem`]).
    pub mem_bytes: u64,
    pub cpus: u32,
    /// `-cpu` model; `None` picks `max` under TCG and `host` under KVM.
    pub cpu: Option<String>,
    /// Boot the bzImage (its decompressor randomises the kernel's physical
    /// and virtual base). `false` boots the vmlinux ELF directly through
    /// QEMU's PVH entry (no decompressor, no KASLR) and passes `nokaslr`.
    pub kaslr: bool,
    pub pti: Pti,
    /// Extra kernel command-line arguments.
    pub append: Vec<String>,
    /// TCG plugins, each a `-plugin` argument (`file=...so,arg=...`).
    pub plugins: Vec<String>,
    /// Load vmwatch's syscall-hook plugin with its event ring (filter `none`:
    /// near-zero cost until a consumer sets a filter).
    pub hook: bool,
    /// Open QEMU's gdbstub on `STATE_DIR/gdb.sock` (for the hardware-breakpoint
    /// syscall backend, `vmwatch hook gdb`).
    pub gdbstub: bool,
    /// Give the guest two NICs: eth0 on QEMU's user-mode network (TCP to the
    /// host at [`SLIRP_HOST_IP`]) and eth1 on the lab LAN shared with the
    /// other lab VMs (see [`VmNetwork`]). `false`: the guest has only `lo`.
    pub network: bool,
    /// Raw extra QEMU arguments, appended last.
    pub extra_qemu_args: Vec<String>,
    /// Give up waiting for the agent after this long.
    pub boot_timeout: Duration,
    /// Cache root; [`util::cache_dir`] when `None`.
    pub cache: Option<PathBuf>,
}

impl UpOptions {
    pub fn new(name: &str) -> Self {
        UpOptions {
            name: name.to_string(),
            flavour: Flavour::Stable,
            accel: Accel::Tcg,
            mem_bytes: 512 << 20,
            cpus: 1,
            cpu: None,
            kaslr: true,
            pti: Pti::Auto,
            append: Vec::new(),
            plugins: Vec::new(),
            hook: true,
            gdbstub: false,
            network: true,
            extra_qemu_args: Vec::new(),
            boot_timeout: Duration::from_secs(180),
            cache: None,
        }
    }
}

/// `vm.json`: everything about a VM other processes need to attach to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    /// The SMBIOS UUID (`-uuid`), random per VM; the guest sees it in
    /// `/sys/class/dmi/id/product_uuid`.
    pub uuid: String,
    pub flavour: Flavour,
    /// `uname -r` of the guest.
    pub kernel_release: String,
    /// Debian version of the kernel package.
    pub kernel_version: String,
    /// The kernel ELF this guest runs (a hard link private to the VM, so an
    /// image rebuild cannot change it under a running guest).
    pub vmlinux: PathBuf,
    /// What QEMU booted: the bzImage (KASLR) or the vmlinux (no KASLR).
    pub boot_kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Guest RAM: the memory-backend file, mapped by vmwatch.
    pub ram_path: PathBuf,
    /// Where each run of guest-physical RAM is in `ram_path`.
    pub ranges: Vec<PhysRange>,
    pub state_dir: PathBuf,
    pub qmp_socket: PathBuf,
    pub agent_socket: PathBuf,
    /// Serial console (ttyS0); connect with `socat - UNIX:path` for a shell.
    pub console_socket: PathBuf,
    /// Everything the guest printed on ttyS0.
    pub serial_log: PathBuf,
    /// QEMU's stdout and stderr (plugin output too).
    pub qemu_log: PathBuf,
    pub accel: Accel,
    pub cpu: String,
    pub mem_bytes: u64,
    pub cpus: u32,
    pub kaslr: bool,
    pub pti: Pti,
    /// The full kernel command line.
    pub cmdline: String,
    pub plugins: Vec<String>,
    /// The syscall-hook plugin's event ring, when it is loaded.
    #[serde(default)]
    pub ring: Option<PathBuf>,
    /// QEMU's gdbstub socket, when started with [`UpOptions::gdbstub`].
    #[serde(default)]
    pub gdb_socket: Option<PathBuf>,
    /// The guest's addresses; `None` when started with
    /// [`UpOptions::network`] off (or by a vmwatch without networking).
    #[serde(default)]
    pub network: Option<VmNetwork>,
    pub qemu_pid: u32,
    pub qemu_argv: Vec<String>,
    pub started_at_unix: u64,
    /// Seconds from starting QEMU to the agent's first answer.
    pub boot_to_ready_secs: Option<f64>,
}

/// A lab VM's network addresses (see [`UpOptions::network`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNetwork {
    /// eth0's address on QEMU's user-mode network ([`SLIRP_GUEST_IP`]; the
    /// same in every VM, each VM's slirp network being private).
    pub guest_ip: Ipv4Addr,
    /// The host as the guest reaches it ([`SLIRP_HOST_IP`]): a guest
    /// connection to `host_ip:PORT` arrives at the host's `127.0.0.1:PORT`,
    /// from a socket of the VM's QEMU process.
    pub host_ip: Ipv4Addr,
    /// eth1's address on the lab LAN (`10.77.0.0/24`), distinct among the
    /// running VMs of this cache.
    pub lan_ip: Ipv4Addr,
    pub lan_prefix_len: u8,
    /// eth1's MAC address (derived from `lan_ip`, so unique on the LAN too).
    pub lan_mac: String,
    /// The UDP multicast group and port on the host's loopback that carry
    /// the LAN's Ethernet frames (one port per cache).
    pub lan_group: Ipv4Addr,
    pub lan_port: u16,
}

/// Whether a VM's QEMU is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Dead,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            VmState::Running => "running",
            VmState::Dead => "dead",
        })
    }
}

/// One line of [`list`].
#[derive(Debug, Clone, Serialize)]
pub struct VmSummary {
    pub name: String,
    pub state: VmState,
    /// `None` if `vm.json` is missing or unreadable (an interrupted `up`).
    pub info: Option<VmInfo>,
}

/// Options of one command run through the agent.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Fed to stdin (`/dev/null` when `None`).
    pub stdin: Option<Vec<u8>>,
    /// Killed (its whole process group) after this long.
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            stdin: None,
            timeout: Duration::from_secs(120),
            env: BTreeMap::new(),
            cwd: None,
        }
    }
}

/// How a command in the guest ended and what it printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status; `None` if a signal ended it.
    pub status: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// It overran its timeout and was killed.
    pub timed_out: bool,
    /// Output went past 16 MiB per stream and was cut.
    pub truncated: bool,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// Shell-style exit code: the status, or 128 + signal.
    pub fn code(&self) -> i32 {
        self.status
            .unwrap_or_else(|| 128 + self.signal.unwrap_or(0))
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A lab VM (running or dead) known by its state directory.
#[derive(Debug, Clone)]
pub struct Vm {
    info: VmInfo,
    cache: PathBuf,
}

/// Checks `[a-z0-9-]{1,32}`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(LabError::BadName(name.to_string()))
    }
}

fn vms_dir(cache: &Path) -> PathBuf {
    cache.join("vms")
}

fn lock_path(cache: &Path, name: &str) -> PathBuf {
    vms_dir(cache).join(format!(".{name}.lock"))
}

/// The QEMU binary (`$VMWATCH_QEMU` or `qemu-system-x86_64` in `PATH`),
/// checked once per process to be at least [`MIN_QEMU`].
pub fn qemu_binary() -> Result<PathBuf> {
    static FOUND: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let bin = std::env::var_os("VMWATCH_QEMU")
                .map(PathBuf::from)
                .or_else(|| util::which("qemu-system-x86_64"))
                .ok_or_else(|| "qemu-system-x86_64 not found".to_string())?;
            let out = Command::new(&bin)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            let version = parse_qemu_version(&text)
                .ok_or_else(|| format!("cannot parse `{} --version`", bin.display()))?;
            if (version.0, version.1) < MIN_QEMU {
                return Err(format!(
                    "{} is QEMU {}.{}.{}, older than {}.{}",
                    bin.display(),
                    version.0,
                    version.1,
                    version.2,
                    MIN_QEMU.0,
                    MIN_QEMU.1
                ));
            }
            Ok(bin)
        })
        .clone()
        .map_err(LabError::Qemu)
}

/// `QEMU emulator version 10.0.2 (Debian ...)` → (10, 0, 2).
pub fn parse_qemu_version(text: &str) -> Option<(u32, u32, u32)> {
    let rest = text.split("version ").nth(1)?;
    let v = rest
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        it.next()??,
        it.next().flatten().unwrap_or(0),
        it.next().flatten().unwrap_or(0),
    ))
}

/// True if `pid` is a live (not zombie) QEMU started for the VM with this
/// UUID. The UUID check guards against a recycled pid.
pub fn qemu_alive(pid: u32, uuid: &str) -> bool {
    if pid == 0 {
        return false;
    }
    // If the QEMU is our own child (a test started it), reap it once dead so
    // it does not linger as a zombie that still "exists".
    // SAFETY: waitpid with WNOHANG and a null status pointer only affects
    // our own children and has no memory-safety preconditions.
    unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), libc::WNOHANG) };
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    if matches!(state, Some('Z' | 'X') | None) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.windows(uuid.len()).any(|w| w == uuid.as_bytes()))
        .unwrap_or(false)
}

fn read_info(dir: &Path) -> Result<VmInfo> {
    let path = dir.join("vm.json");
    let text = std::fs::read(&path).at(&path)?;
    serde_json::from_slice(&text).map_err(|e| LabError::BadFile {
        path,
        detail: e.to_string(),
    })
}

fn write_info(info: &VmInfo) -> Result<()> {
    let json = serde_json::to_vec_pretty(info).expect("VmInfo serialises");
    util::write_atomic(&info.state_dir.join("vm.json"), &json)
}

/// Where the RAM file goes: `/dev/shm/vmwatch/` if usable (tmpfs: RAM stays
/// in RAM), else the state dir.
fn ram_file(dir: &Path, name: &str, uuid: &str) -> PathBuf {
    let shm = Path::new("/dev/shm/vmwatch");
    if Path::new("/dev/shm").is_dir() && !shm.exists() && std::fs::create_dir(shm).is_ok() {
        // Shared by every user's VMs, like /tmp (each RAM file is its owner's).
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(shm, std::fs::Permissions::from_mode(0o1777));
    }
    if shm.is_dir() {
        let probe = shm.join(format!(".probe-{}", std::process::id()));
        if std::fs::write(&probe, b"").is_ok() {
            let _ = std::fs::remove_file(&probe);
            // The UUID keeps VMs of the same name in different caches apart.
            return shm.join(format!("{name}-{uuid}.ram"));
        }
    }
    dir.join("ram")
}

impl Vm {
    /// Starts a VM and waits until its agent answers (or fails with the
    /// reason and the end of its logs). The VM keeps running after this
    /// process exits; stop it with [`Vm::down`].
    pub fn up(opts: &UpOptions) -> Result<Vm> {
        validate_name(&opts.name)?;
        if opts.cpus == 0 || opts.cpus > 64 {
            return Err(LabError::Invalid(format!(
                "bad cpu count {}: use 1 to 64",
                opts.cpus
            )));
        }
        let qemu = qemu_binary()?;
        let cache = opts.cache.clone().unwrap_or_else(cache_dir);
        let image = ImagePaths::for_flavour(&cache, opts.flavour);
        // A concurrent `lab build` must not swap the image out between here
        // and QEMU loading it (released once QMP answers, see below).
        image.load_info()?; // "no image: run lab build" before any lock file is made
        let mut image_lock = Some(FileLock::acquire_shared(&image.swap_lock())?);
        let image_info = image.load_info()?;
        let vms = vms_dir(&cache);
        std::fs::create_dir_all(&vms).at(&vms)?;
        let _lock = FileLock::acquire(&lock_path(&cache, &opts.name))?;

        let dir = vms.join(&opts.name);
        if dir.exists() {
            match read_info(&dir) {
                Ok(old) if qemu_alive(old.qemu_pid, &old.uuid) => {
                    return Err(LabError::AlreadyRunning(opts.name.clone()))
                }
                Ok(old) => remove_state(Some(&old), &dir)?,
                Err(_) => remove_state(None, &dir)?,
            }
        }
        std::fs::create_dir_all(&dir).at(&dir)?;

        let uuid = uuid::Uuid::new_v4().to_string();
        let ram_path = ram_file(&dir, &opts.name, &uuid);
        let qmp_socket = dir.join("qmp.sock");
        let agent_socket = dir.join("agent.sock");
        let console_socket = dir.join("console.sock");
        for s in [&qmp_socket, &agent_socket, &console_socket] {
            // sun_path is 108 bytes including the NUL.
            if s.as_os_str().len() > 107 {
                return Err(LabError::Invalid(format!(
                    "socket path {} is longer than 107 bytes: use a shorter VMWATCH_CACHE",
                    s.display()
                )));
            }
        }
        let vmlinux = dir.join("vmlinux");
        if std::fs::hard_link(&image.vmlinux, &vmlinux).is_err() {
            std::fs::copy(&image.vmlinux, &vmlinux).at(&vmlinux)?;
        }
        let boot_kernel = if opts.kaslr {
            image.bzimage.clone()
        } else {
            vmlinux.clone()
        };

        let mut cmdline = vec![
            "console=ttyS0,115200".to_string(),
            "panic=-1".to_string(),
            format!("vmwatch.name={}", opts.name),
        ];
        if !opts.kaslr {
            cmdline.push("nokaslr".into());
        }
        match opts.pti {
            Pti::Auto => {}
            Pti::On => cmdline.push("pti=on".into()),
            Pti::Off => cmdline.push("pti=off".into()),
        }
        // Held until vm.json records the LAN address (see allocate_network).
        let (network, lan_lock) = if opts.network {
            let (net, lock) = allocate_network(&cache, &opts.name)?;
            cmdline.extend(network_cmdline(&net));
            (Some(net), Some(lock))
        } else {
            (None, None)
        };
        cmdline.extend(opts.append.iter().cloned());
        let cmdline = cmdline.join(" ");
        let cpu = opts.cpu.clone().unwrap_or_else(|| match opts.accel {
            // `max` gives TCG guests SMEP/SMAP/PCID like real hardware; la57
            // off keeps 4-level paging, what production hosts run.
            Accel::Tcg => "max,la57=off".to_string(),
            Accel::Kvm => "host".to_string(),
        });
        let serial_log = dir.join("serial.log");
        let qemu_log = dir.join("qemu.log");
        let mem_mib = opts.mem_bytes >> 20;
        let mut argv: Vec<String> = vec![
            "-name".into(),
            format!("vmwatch-{}", opts.name),
            "-machine".into(),
            // A fixed split of RAM below/above the PCI hole, so the hook
            // plugin can map guest-physical addresses before QMP answers.
            format!("pc,memory-backend={BACKEND_ID},max-ram-below-4g={RAM_BELOW_4G}"),
            "-accel".into(),
            opts.accel.to_string(),
            "-cpu".into(),
            cpu.clone(),
            "-smp".into(),
            opts.cpus.to_string(),
            "-m".into(),
            format!("{mem_mib}M"),
            "-object".into(),
            format!(
                "memory-backend-file,id={BACKEND_ID},size={mem_mib}M,mem-path={},share=on",
                ram_path.display()
            ),
            "-uuid".into(),
            uuid.clone(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_socket.display()),
            // ttyS0: console, logged whether or not anyone is attached.
            "-chardev".into(),
            format!(
                "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
                console_socket.display(),
                serial_log.display()
            ),
            "-serial".into(),
            "chardev:console".into(),
            // ttyS1: the agent.
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                agent_socket.display()
            ),
            "-serial".into(),
            "chardev:agent".into(),
            "-kernel".into(),
            boot_kernel.display().to_string(),
            "-initrd".into(),
            image.initramfs.display().to_string(),
            "-append".into(),
            cmdline.clone(),
        ];
        let mut plugins = opts.plugins.clone();
        let mut ring = None;
        let own_hook = plugins.iter().any(|p| p.contains("libhook_plugin"));
        if opts.hook && !own_hook {
            match hook_plugin_path() {
                Some(so) => {
                    let path = hook_ring_path(&opts.name);
                    let _ = std::fs::remove_file(&path);
                    // xftrace's control and record file (`vmwatch xftrace`),
                    // in the state dir so `lab down` removes it.
                    plugins.push(format!(
                        "file={},ring={},vm={},filter=none,ram={},ram_below_4g={},vmlinux={},xftrace={}",
                        so.display(),
                        path.display(),
                        opts.name,
                        ram_path.display(),
                        opts.mem_bytes.min(RAM_BELOW_4G),
                        vmlinux.display(),
                        dir.join("xftrace.buf").display(),
                    ));
                    ring = Some(path);
                }
                None => eprintln!(
                    "warning: {}: libhook_plugin.so not found next to this program or in $VMWATCH_HOOK_PLUGIN; \
                     the VM starts without syscall hooks (run `cargo build --release`)",
                    opts.name
                ),
            }
        }
        let gdb_socket = opts.gdbstub.then(|| dir.join("gdb.sock"));
        if let Some(sock) = &gdb_socket {
            argv.push("-gdb".into());
            argv.push(format!("unix:{},server=on,wait=off", sock.display()));
        }
        if let Some(net) = &network {
            argv.extend(network_qemu_args(net));
        }
        for p in &plugins {
            argv.push("-plugin".into());
            argv.push(p.clone());
        }
        argv.extend(opts.extra_qemu_args.iter().cloned());

        let log = File::create(&qemu_log).at(&qemu_log)?;
        let log2 = log.try_clone().at(&qemu_log)?;
        let mut cmd = Command::new(&qemu);
        cmd.args(&argv)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .current_dir("/");
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setsid(), which is async-signal-safe. A new session detaches
        // QEMU from our terminal and process group, so it outlives us and a
        // Ctrl-C aimed at the CLI or test does not reach it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| LabError::Qemu(format!("cannot start {}: {e}", qemu.display())))?;
        let info = VmInfo {
            name: opts.name.clone(),
            uuid: uuid.clone(),
            flavour: opts.flavour,
            kernel_release: image_info.kernel_release.clone(),
            kernel_version: image_info.kernel_version.clone(),
            vmlinux,
            boot_kernel,
            initramfs: image.initramfs.clone(),
            ram_path,
            ranges: Vec::new(),
            state_dir: dir.clone(),
            qmp_socket,
            agent_socket,
            console_socket,
            serial_log,
            qemu_log,
            accel: opts.accel,
            cpu,
            mem_bytes: opts.mem_bytes,
            cpus: opts.cpus,
            kaslr: opts.kaslr,
            pti: opts.pti,
            cmdline,
            plugins,
            ring,
            gdb_socket,
            network,
            qemu_pid: child.id(),
            qemu_argv: std::iter::once(qemu.display().to_string())
                .chain(argv)
                .collect(),
            started_at_unix: util::now_unix(),
            boot_to_ready_secs: None,
        };
        write_info(&info)?;
        drop(lan_lock);
        let vm = Vm { info, cache };

        // From here on a failure must not leave QEMU behind or RAM in /dev/shm.
        let deadline = started + opts.boot_timeout;
        let exited = |child: &mut std::process::Child| -> Option<String> {
            child.try_wait().ok().flatten().map(|s| s.to_string())
        };
        let fail = |vm: &Vm, status: String| -> LabError {
            let _ = std::fs::remove_file(&vm.info.ram_path);
            LabError::BootFailed {
                name: vm.info.name.clone(),
                status,
                tail: tails(&[&vm.info.qemu_log, &vm.info.serial_log], 15),
            }
        };

        // 1. QMP: the RAM layout as QEMU maps it.
        let mut qmp = loop {
            if let Some(status) = exited(&mut child) {
                return Err(fail(&vm, status));
            }
            if vm.info.qmp_socket.exists() {
                if let Ok(q) =
                    Qmp::connect(&vm.info.qmp_socket, &vm.info.name, Duration::from_secs(10))
                {
                    break q;
                }
            }
            if Instant::now() >= deadline {
                return Err(vm.boot_timeout(opts.boot_timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // QMP answers once machine init is done: kernel and initramfs are loaded.
        image_lock.take();
        let mtree = qmp.hmp("info mtree -f")?;
        drop(qmp);
        let ranges = crate::mtree::parse_ram_ranges(&mtree, BACKEND_ID);
        let total: u64 = ranges.iter().map(|r| r.len).sum();
        // The plugin was told this split on its command line; QEMU must agree.
        let expected = vmi::memory::PhysRange::qemu_x86(opts.mem_bytes, RAM_BELOW_4G);
        // (QEMU maps the RAM around the legacy VGA/ROM hole; what it maps must
        // sit where the split says.)
        let agrees = ranges.iter().all(|r| {
            expected
                .iter()
                .any(|e| e.file_offset_of(r.gpa, r.len) == Some(r.file_offset))
        });
        if ranges.is_empty() || total > opts.mem_bytes || !agrees {
            let _ = vm.kill_qemu();
            return Err(LabError::Qmp {
                name: vm.info.name.clone(),
                detail: format!(
                    "RAM of backend `{BACKEND_ID}` in `info mtree -f` is {ranges:?}, expected {expected:?}"
                ),
            });
        }
        let mut vm = vm;
        vm.info.ranges = ranges;
        write_info(&vm.info)?;

        // 2. The agent: wait for its `ready` line, pinging in case we missed it.
        let mut conn = loop {
            if let Some(status) = exited(&mut child) {
                return Err(fail(&vm, status));
            }
            if let Ok(c) =
                AgentConn::connect(&vm.info.agent_socket, &vm.info.name, &vm.info.serial_log)
            {
                break c;
            }
            if Instant::now() >= deadline {
                return Err(vm.boot_timeout(opts.boot_timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let child = std::cell::RefCell::new(child);
        loop {
            let alive = || exited(&mut child.borrow_mut()).is_none();
            if conn.ping(Duration::from_secs(1), &alive)? {
                break;
            }
            if let Some(status) = exited(&mut child.borrow_mut()) {
                return Err(fail(&vm, status));
            }
            if Instant::now() >= deadline {
                return Err(vm.boot_timeout(opts.boot_timeout));
            }
        }
        drop(conn);
        let secs = started.elapsed().as_secs_f64();
        vm.info.boot_to_ready_secs = Some((secs * 100.0).round() / 100.0);
        write_info(&vm.info)?;
        tracing::info!(
            "{}: agent ready {secs:.2} s after QEMU started",
            vm.info.name
        );
        Ok(vm)
    }

    /// Kills QEMU after a boot timeout and builds the error.
    fn boot_timeout(&self, after: Duration) -> LabError {
        let _ = self.kill_qemu();
        let _ = std::fs::remove_file(&self.info.ram_path);
        LabError::BootTimeout {
            name: self.info.name.clone(),
            secs: after.as_secs(),
            tail: tails(&[&self.info.qemu_log, &self.info.serial_log], 15),
        }
    }

    /// Opens an existing VM (running or dead) in the default cache.
    pub fn open(name: &str) -> Result<Vm> {
        Self::open_in(&cache_dir(), name)
    }

    /// Opens an existing VM in the cache at `cache`.
    pub fn open_in(cache: &Path, name: &str) -> Result<Vm> {
        validate_name(name).map_err(|_| LabError::NoSuchVm(name.to_string()))?;
        let dir = vms_dir(cache).join(name);
        if !dir.join("vm.json").is_file() {
            return Err(LabError::NoSuchVm(name.to_string()));
        }
        Ok(Vm {
            info: read_info(&dir)?,
            cache: cache.to_path_buf(),
        })
    }

    /// The guest's RAM as `vmi` memory (the shared backing file, mapped; the
    /// guest keeps running). Fails if QEMU is gone: its RAM file is stale.
    pub fn memory(&self, writable: bool) -> Result<vmi::memory::MappedFileMemory> {
        if !self.is_running() {
            return Err(LabError::Dead {
                name: self.info.name.clone(),
                pid: self.info.qemu_pid,
                log: self.info.serial_log.clone(),
            });
        }
        vmi::memory::MappedFileMemory::open(&self.info.ram_path, self.info.ranges.clone(), writable)
            .map_err(|e| {
                LabError::Invalid(format!("VM `{}`: cannot map its RAM: {e}", self.info.name))
            })
    }

    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn state(&self) -> VmState {
        if qemu_alive(self.info.qemu_pid, &self.info.uuid) {
            VmState::Running
        } else {
            VmState::Dead
        }
    }

    pub fn is_running(&self) -> bool {
        self.state() == VmState::Running
    }

    fn dead(&self) -> LabError {
        LabError::Dead {
            name: self.info.name.clone(),
            pid: self.info.qemu_pid,
            log: self.info.serial_log.clone(),
        }
    }

    fn require_running(&self) -> Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            Err(self.dead())
        }
    }

    /// Runs `argv` in the guest (default [`ExecOptions`]: no stdin, 120 s).
    pub fn exec(&self, argv: &[&str]) -> Result<ExecOutput> {
        self.exec_with(argv, &ExecOptions::default())
    }

    /// Runs a shell script in the guest with `/bin/sh -c`.
    pub fn exec_sh(&self, script: &str) -> Result<ExecOutput> {
        self.exec(&["/bin/sh", "-c", script])
    }

    /// Runs `argv` in the guest. Commands run one at a time per VM (callers
    /// in other threads or processes wait their turn).
    pub fn exec_with(&self, argv: &[&str], opts: &ExecOptions) -> Result<ExecOutput> {
        if argv.is_empty() {
            return Err(LabError::Invalid("exec: empty command".into()));
        }
        self.require_running()?;
        let _lock = FileLock::acquire(&self.info.state_dir.join("agent.lock"))?;
        let mut conn = AgentConn::connect(
            &self.info.agent_socket,
            &self.info.name,
            &self.info.serial_log,
        )
        .map_err(|e| {
            if self.is_running() {
                LabError::Agent {
                    name: self.info.name.clone(),
                    detail: format!(
                        "cannot connect to {}: {e}",
                        self.info.agent_socket.display()
                    ),
                }
            } else {
                self.dead()
            }
        })?;
        let req = ExecRequest {
            id: 0,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: opts.stdin.clone(),
            timeout_ms: Some(opts.timeout.as_millis() as u64),
            env: opts.env.clone(),
            cwd: opts.cwd.clone(),
        };
        let alive = || self.is_running();
        // The agent enforces the timeout; we allow extra time for the reply
        // to cross the serial line.
        let wait = opts.timeout + Duration::from_secs(30);
        match conn.exec(req, wait, &alive) {
            Ok(r) => Ok(ExecOutput {
                status: r.status,
                signal: r.signal,
                stdout: r.stdout,
                stderr: r.stderr,
                timed_out: r.timed_out,
                truncated: r.truncated,
            }),
            Err(e) if !self.is_running() => {
                tracing::debug!("exec failed as QEMU died: {e}");
                Err(self.dead())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the agent answers a ping within `wait`.
    pub fn ping(&self, wait: Duration) -> Result<bool> {
        self.require_running()?;
        let _lock = FileLock::acquire(&self.info.state_dir.join("agent.lock"))?;
        let mut conn = AgentConn::connect(
            &self.info.agent_socket,
            &self.info.name,
            &self.info.serial_log,
        )
        .map_err(|_| self.dead())?;
        conn.ping(wait, &|| self.is_running())
    }

    /// A QMP session with this VM's QEMU.
    pub fn qmp(&self) -> Result<Qmp> {
        self.require_running()?;
        Qmp::connect(
            &self.info.qmp_socket,
            &self.info.name,
            Duration::from_secs(10),
        )
    }

    /// Writes the guest's physical memory to an ELF core file (QEMU's
    /// `dump-guest-memory`; the guest is paused while QEMU writes it).
    pub fn dump(&self, path: &Path) -> Result<PathBuf> {
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().at(".")?.join(path)
        };
        let mut qmp = self.qmp()?;
        qmp.dump_guest_memory(&abs, Duration::from_secs(600))?;
        Ok(abs)
    }

    /// Stops QEMU (QMP `quit`, then SIGTERM, then SIGKILL, each with a
    /// deadline) and removes the RAM file and the state directory.
    pub fn down(&self) -> Result<()> {
        let _lock = FileLock::acquire(&lock_path(&self.cache, &self.info.name))?;
        remove_state(Some(&self.info), &self.info.state_dir)
    }

    /// SIGKILLs QEMU without cleaning up (for tests of crash handling).
    pub fn kill_qemu(&self) -> Result<()> {
        if qemu_alive(self.info.qemu_pid, &self.info.uuid) {
            // SAFETY: kill() has no memory-safety preconditions; the pid was
            // just checked to be this VM's QEMU.
            unsafe { libc::kill(self.info.qemu_pid as libc::pid_t, libc::SIGKILL) };
            wait_gone(&self.info, Duration::from_secs(5));
        }
        Ok(())
    }
}

/// Waits until QEMU is gone; true if it went.
fn wait_gone(info: &VmInfo, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if !qemu_alive(info.qemu_pid, &info.uuid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !qemu_alive(info.qemu_pid, &info.uuid)
}

/// The event ring of VM `name`'s hook plugin (tmpfs, like the RAM file).
pub fn hook_ring_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/vmwatch-{name}.ring"))
}

/// `$VMWATCH_HOOK_PLUGIN`, or `libhook_plugin.so` next to this executable
/// (or one directory up, for test binaries in `target/*/deps`).
pub fn hook_plugin_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMWATCH_HOOK_PLUGIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("libhook_plugin.so"))
        .find(|so| so.exists())
}

/// Stops QEMU if it runs, then removes the RAM file, the event ring and the state dir.
fn remove_state(info: Option<&VmInfo>, dir: &Path) -> Result<()> {
    if let Some(info) = info {
        if qemu_alive(info.qemu_pid, &info.uuid) {
            if let Ok(q) = Qmp::connect(&info.qmp_socket, &info.name, Duration::from_secs(2)) {
                let _ = q.quit();
            }
            let mut gone = wait_gone(info, Duration::from_secs(5));
            for sig in [libc::SIGTERM, libc::SIGKILL] {
                if gone {
                    break;
                }
                // SAFETY: kill() has no memory-safety preconditions; the pid
                // was checked (with its UUID) to be this VM's QEMU.
                unsafe { libc::kill(info.qemu_pid as libc::pid_t, sig) };
                gone = wait_gone(info, Duration::from_secs(3));
            }
            if !gone {
                return Err(LabError::Qemu(format!(
                    "QEMU pid {} of `{}` survived SIGKILL",
                    info.qemu_pid, info.name
                )));
            }
        }
        for file in std::iter::once(&info.ram_path).chain(info.ring.as_ref()) {
            match std::fs::remove_file(file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LabError::io(file, e)),
            }
        }
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LabError::io(dir, e)),
    }
}

/// Stops and removes the VM `name` in the default cache, including one whose
/// `up` was interrupted before `vm.json` was written.
pub fn down(name: &str) -> Result<()> {
    down_in(&cache_dir(), name)
}

/// [`down`] for the cache at `cache`.
pub fn down_in(cache: &Path, name: &str) -> Result<()> {
    validate_name(name).map_err(|_| LabError::NoSuchVm(name.to_string()))?;
    let dir = vms_dir(cache).join(name);
    if !dir.exists() {
        return Err(LabError::NoSuchVm(name.to_string()));
    }
    let _lock = FileLock::acquire(&lock_path(cache, name))?;
    let info = read_info(&dir).ok();
    remove_state(info.as_ref(), &dir)
}

/// All VMs in the default cache, sorted by name.
pub fn list() -> Result<Vec<VmSummary>> {
    list_in(&cache_dir())
}

/// All VMs in the cache at `cache`, sorted by name.
pub fn list_in(cache: &Path) -> Result<Vec<VmSummary>> {
    let dir = vms_dir(cache);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LabError::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.at(&dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !entry.path().is_dir() {
            continue;
        }
        let info = read_info(&entry.path()).ok();
        let state = match &info {
            Some(i) if qemu_alive(i.qemu_pid, &i.uuid) => VmState::Running,
            _ => VmState::Dead,
        };
        out.push(VmSummary { name, state, info });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// 64-bit FNV-1a: a stable hash (std's `DefaultHasher` may change between
/// Rust releases, and these values pick addresses that should not).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The LAN's multicast port for the cache at `cache`.
fn lan_port(cache: &Path) -> u16 {
    let path = std::fs::canonicalize(cache).unwrap_or_else(|_| cache.to_path_buf());
    LAN_PORT_BASE + (fnv1a(path.as_os_str().as_encoded_bytes()) % 256) as u16
}

/// The host number VM `name` prefers on the LAN, then the ones after it
/// (wrapping): a VM usually gets the same address every time it starts,
/// whatever order VMs start in.
fn lan_candidates(name: &str) -> impl Iterator<Item = u8> {
    let span = u64::from(LAN_LAST_HOST - LAN_FIRST_HOST) + 1;
    let start = fnv1a(name.as_bytes()) % span;
    (0..span).map(move |i| LAN_FIRST_HOST + ((start + i) % span) as u8)
}

/// The first of VM `name`'s [`lan_candidates`] that is not `taken`.
fn pick_lan_host(name: &str, taken: &std::collections::BTreeSet<Ipv4Addr>) -> Option<u8> {
    lan_candidates(name).find(|&h| !taken.contains(&lan_ip(h)))
}

fn lan_ip(host: u8) -> Ipv4Addr {
    let [a, b, c, _] = LAN_NET.octets();
    Ipv4Addr::new(a, b, c, host)
}

/// Picks VM `name`'s addresses: the first LAN address among
/// [`lan_candidates`] that no running VM of this cache has. The returned
/// lock must be held until `vm.json` records the address, because another
/// `up` learns the addresses in use from those files.
fn allocate_network(cache: &Path, name: &str) -> Result<(VmNetwork, FileLock)> {
    let lock = FileLock::acquire(&vms_dir(cache).join(".lan.lock"))?;
    let taken: std::collections::BTreeSet<Ipv4Addr> = list_in(cache)?
        .into_iter()
        .filter(|s| s.name != name && s.state == VmState::Running)
        .filter_map(|s| s.info?.network.map(|n| n.lan_ip))
        .collect();
    let host = pick_lan_host(name, &taken).ok_or_else(|| {
        LabError::Invalid(format!(
            "all {} lab LAN addresses are taken by running VMs: stop one \
                 (`vmwatch lab down NAME`) or start `{name}` without networking (--no-network)",
            LAN_LAST_HOST - LAN_FIRST_HOST + 1
        ))
    })?;
    let net = VmNetwork {
        guest_ip: SLIRP_GUEST_IP,
        host_ip: SLIRP_HOST_IP,
        lan_ip: lan_ip(host),
        lan_prefix_len: LAN_PREFIX_LEN,
        // 52:54:00 is QEMU's prefix; 0x4d = 77, as in 10.77.
        lan_mac: format!("52:54:00:4d:00:{host:02x}"),
        lan_group: LAN_GROUP,
        lan_port: lan_port(cache),
    };
    Ok((net, lock))
}

/// Kernel command-line arguments the guest's `/init` reads to configure
/// its interfaces (see `image::guest`).
fn network_cmdline(net: &VmNetwork) -> [String; 2] {
    [
        format!(
            "vmwatch.net={}/24,{},{SLIRP_DNS_IP}",
            net.guest_ip, net.host_ip
        ),
        format!("vmwatch.lan={}/{}", net.lan_ip, net.lan_prefix_len),
    ]
}

/// QEMU arguments of the two NICs (virtio-net; the guest loads the driver).
fn network_qemu_args(net: &VmNetwork) -> Vec<String> {
    vec![
        "-netdev".into(),
        // IPv4 only: IPv6 router adverts would give the guest more
        // addresses and traffic nobody asked for.
        format!(
            "user,id=host0,ipv6=off,net={SLIRP_NET}/24,host={},dns={SLIRP_DNS_IP}",
            net.host_ip
        ),
        "-device".into(),
        // romfile= : no PXE option ROM, the kernel is loaded directly.
        format!(
            "virtio-net-pci,netdev=host0,mac=52:54:00:12:34:56,addr={SLIRP_PCI_SLOT:#x},romfile="
        ),
        "-netdev".into(),
        // local.host picks the interface for the group (IP_MULTICAST_IF):
        // loopback, so LAN frames never leave the host; QEMU turns on
        // IP_MULTICAST_LOOP so every VM on this host hears the others.
        format!(
            "dgram,id=lan0,remote.type=inet,remote.host={},remote.port={},\
             local.type=inet,local.host=127.0.0.1,local.port=0",
            net.lan_group, net.lan_port
        ),
        "-device".into(),
        format!(
            "virtio-net-pci,netdev=lan0,mac={},addr={LAN_PCI_SLOT:#x},romfile=",
            net.lan_mac
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("web1").is_ok());
        assert!(validate_name("a-b-0").is_ok());
        assert!(validate_name(&"a".repeat(32)).is_ok());
        for bad in ["", "Web", "a_b", "a/b", "..", &"a".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem("512M").unwrap(), 512 << 20);
        assert_eq!(parse_mem("4G").unwrap(), 4 << 30);
        assert_eq!(parse_mem("256").unwrap(), 256 << 20);
        assert!(parse_mem("1M").is_err());
        assert!(parse_mem("12x").is_err());
        assert!(parse_mem("99999999999999G").is_err());
    }

    #[test]
    fn lan_addresses() {
        use std::collections::BTreeSet;
        // Every usable host number once, the same order each time.
        let all: Vec<u8> = lan_candidates("web1").collect();
        assert_eq!(all.len(), 253);
        assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 253);
        assert!(all.iter().all(|h| (2..=254).contains(h)));
        assert_eq!(all, lan_candidates("web1").collect::<Vec<_>>());

        let mut taken = BTreeSet::new();
        let first = pick_lan_host("web1", &taken).unwrap();
        assert_eq!(first, all[0]);
        // Taken by another running VM: the next one.
        taken.insert(lan_ip(first));
        assert_eq!(pick_lan_host("web1", &taken), Some(all[1]));
        // All taken: none (the caller says to stop a VM or use --no-network).
        taken.extend((2..=254).map(lan_ip));
        assert_eq!(pick_lan_host("web1", &taken), None);
    }

    #[test]
    fn network_arguments() {
        let net = VmNetwork {
            guest_ip: SLIRP_GUEST_IP,
            host_ip: SLIRP_HOST_IP,
            lan_ip: lan_ip(7),
            lan_prefix_len: LAN_PREFIX_LEN,
            lan_mac: "52:54:00:4d:00:07".into(),
            lan_group: LAN_GROUP,
            lan_port: 27701,
        };
        // What the guest's /init parses.
        assert_eq!(
            network_cmdline(&net),
            [
                "vmwatch.net=10.0.2.15/24,10.0.2.2,10.0.2.3".to_string(),
                "vmwatch.lan=10.77.0.7/24".to_string()
            ]
        );
        let args = network_qemu_args(&net).join(" ");
        assert!(
            args.contains("remote.host=239.77.0.1,remote.port=27701"),
            "{args}"
        );
        assert!(args.contains("mac=52:54:00:4d:00:07,addr=0x11"), "{args}");
        assert!(
            args.contains("netdev=host0,mac=52:54:00:12:34:56,addr=0x10"),
            "{args}"
        );
        // The port depends on the cache, within the range below the ephemeral ports.
        let p = lan_port(Path::new("/nonexistent/cache"));
        assert!((LAN_PORT_BASE..LAN_PORT_BASE + 256).contains(&p));
    }

    #[test]
    fn qemu_versions() {
        let v = parse_qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\n");
        assert_eq!(v, Some((10, 0, 2)));
        assert_eq!(
            parse_qemu_version("QEMU emulator version 7.2.15"),
            Some((7, 2, 15))
        );
        assert_eq!(parse_qemu_version("nonsense"), None);
    }
}
