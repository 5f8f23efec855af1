//! Guest images built from Debian's own packages.
//!
//! An image is a kernel (`bzImage` as shipped, and the `vmlinux` ELF inside
//! it) plus an initramfs: busybox, a small real glibc userland (coreutils,
//! bash, python3.11, netcat...), a few kernel modules and the test agent.
//! Images live under `$VMWATCH_CACHE/images/<flavour>/`; downloaded `.deb`s
//! under `$VMWATCH_CACHE/debs/`. A rebuild with unchanged package versions,
//! agent and recipe is a no-op.

pub mod apt;
pub mod cpio;
pub mod guest;
pub mod kmod;
pub mod rootfs;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{IoContext, LabError, Result};
use crate::util::{self, cache_dir, fingerprint, require_tool, run_capture, FileLock};

/// Userland packages of the guest. Their library dependencies are added
/// automatically (see [`apt::library_closure`]).
pub const PACKAGES: [&str; 11] = [
    "busybox-static",
    "libc6",
    "libgcc-s1",
    "coreutils",
    "bash",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libexpat1",
    "zlib1g",
    "netcat-openbsd",
    "gzip",
];

/// Kernel modules put in the image (plus their dependencies): `dummy` for
/// module-list tests; `virtio_pci` and `virtio_net`, which `/init` loads for
/// the lab VMs' NICs (see `guest::INIT`); other NIC drivers and virtio
/// transports for host-guest channels later.
pub const MODULES: [&str; 9] = [
    "dummy",
    "e1000",
    "virtio_net",
    "virtio_pci",
    "virtio_console",
    "vmw_vsock_virtio_transport",
    "9pnet_virtio",
    "9p",
    "tun",
];

/// Links Debian's postinst scripts would create with update-alternatives
/// (or that the `python3-minimal` package would ship): (link, target).
pub const ALTERNATIVES: [(&str, &str); 2] = [
    ("usr/bin/python3", "python3.11"),
    ("usr/bin/nc", "nc.openbsd"),
];

/// Bump when the build steps change in a way the inputs do not show.
const RECIPE_VERSION: u32 = 4;

/// Which Debian kernel the image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// bookworm's `linux-image-amd64` (6.1.x).
    Stable,
    /// bookworm-backports' `linux-image-amd64` (6.12.x).
    Backports,
}

impl Flavour {
    pub const ALL: [Flavour; 2] = [Flavour::Stable, Flavour::Backports];

    pub fn as_str(self) -> &'static str {
        match self {
            Flavour::Stable => "stable",
            Flavour::Backports => "backports",
        }
    }

    /// The suite apt should prefer when resolving the kernel.
    fn default_release(self) -> Option<&'static str> {
        match self {
            Flavour::Stable => None,
            Flavour::Backports => Some("bookworm-backports"),
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Flavour {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stable" => Ok(Flavour::Stable),
            "backports" => Ok(Flavour::Backports),
            _ => Err(format!(
                "unknown kernel flavour `{s}`: use stable or backports"
            )),
        }
    }
}

/// Where an image's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePaths {
    pub flavour: Flavour,
    pub dir: PathBuf,
    /// The uncompressed kernel ELF (booted directly with `--nokaslr`; read by VMI).
    pub vmlinux: PathBuf,
    /// Debian's `vmlinuz` as shipped (booted by default: its decompressor applies KASLR).
    pub bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub info: PathBuf,
}

impl ImagePaths {
    /// Paths of the `flavour` image in the cache at `cache` (usually
    /// [`util::cache_dir`]).
    pub fn for_flavour(cache: &Path, flavour: Flavour) -> Self {
        let dir = cache.join("images").join(flavour.as_str());
        ImagePaths {
            flavour,
            vmlinux: dir.join("vmlinux"),
            bzimage: dir.join("bzImage"),
            initramfs: dir.join("initramfs.cpio"),
            info: dir.join("image.json"),
            dir,
        }
    }

    /// Held exclusively while a build replaces the image, and shared by a VM
    /// starting from it until QEMU has loaded the kernel and initramfs.
    pub fn swap_lock(&self) -> PathBuf {
        let name = format!(".{}.swap.lock", self.flavour);
        self.dir
            .parent()
            .map(|p| p.join(&name))
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// True if every file of a finished build is present.
    pub fn exists(&self) -> bool {
        [&self.vmlinux, &self.bzimage, &self.initramfs, &self.info]
            .iter()
            .all(|p| p.is_file())
    }

    /// Reads `image.json`; [`LabError::ImageMissing`] if the image was never built.
    pub fn load_info(&self) -> Result<ImageInfo> {
        if !self.exists() {
            return Err(LabError::ImageMissing {
                flavour: self.flavour.to_string(),
                dir: self.dir.clone(),
            });
        }
        let text = std::fs::read(&self.info).at(&self.info)?;
        serde_json::from_slice(&text).map_err(|e| LabError::BadFile {
            path: self.info.clone(),
            detail: e.to_string(),
        })
    }
}

/// `image.json`: what an image contains and how it was built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub flavour: Flavour,
    /// `uname -r` in the guest, e.g. `6.1.0-56-amd64`.
    pub kernel_release: String,
    /// e.g. `linux-image-6.1.0-56-amd64`.
    pub kernel_package: String,
    /// Debian version of that package, e.g. `6.1.192-2`.
    pub kernel_version: String,
    /// Every userland package in the image and its version.
    pub packages: BTreeMap<String, String>,
    pub modules: Vec<kmod::Module>,
    /// Fingerprint of the agent binary baked in (a changed agent means a rebuild).
    pub agent_fingerprint: String,
    /// Fingerprint of the build recipe (guest files, lists, [`RECIPE_VERSION`]).
    pub recipe: String,
    /// `none`: under TCG, decompressing an initramfs in the guest costs more
    /// boot time than reading the larger file does on the host.
    pub initramfs_compression: String,
    pub built_at_unix: u64,
    pub built_at: String,
    pub build_secs: f64,
    pub vmlinux_bytes: u64,
    pub bzimage_bytes: u64,
    pub initramfs_bytes: u64,
    /// Bytes of files in the guest tree, before archiving.
    pub rootfs_bytes: u64,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub flavour: Flavour,
    /// Rebuild even if nothing changed.
    pub force: bool,
    /// The `vmwatch-agent` binary to bake in; found automatically when `None`.
    pub agent: Option<PathBuf>,
    /// Cache root; [`util::cache_dir`] when `None`.
    pub cache: Option<PathBuf>,
}

impl BuildOptions {
    pub fn new(flavour: Flavour) -> Self {
        BuildOptions {
            flavour,
            force: false,
            agent: None,
            cache: None,
        }
    }
}

/// Result of [`build`].
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub paths: ImagePaths,
    pub info: ImageInfo,
    /// False if the existing image was already up to date.
    pub rebuilt: bool,
}

/// Finds the agent binary: `$VMWATCH_AGENT`, else next to the running
/// executable (`target/<profile>/`), also when that is a test in `deps/`.
pub fn find_agent(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    } else {
        if let Some(p) = std::env::var_os("VMWATCH_AGENT") {
            candidates.push(PathBuf::from(p));
        }
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                candidates.push(dir.join("vmwatch-agent"));
                if dir.file_name().is_some_and(|n| n == "deps") {
                    if let Some(up) = dir.parent() {
                        candidates.push(up.join("vmwatch-agent"));
                    }
                }
            }
        }
    }
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    Err(LabError::AgentBinaryMissing(tried.join(", ")))
}

fn recipe_fingerprint() -> String {
    let mut s = format!("recipe {RECIPE_VERSION}\n");
    for (path, text, mode) in guest::files() {
        s.push_str(&format!("{path} {mode:o}\n{text}\n"));
    }
    s.push_str(guest::SYSLOG_LIB_SOURCE);
    s.push_str(&guest::SYSLOG_LIB_CFLAGS.join(" "));
    s.push_str(&PACKAGES.join(","));
    s.push_str(&MODULES.join(","));
    for (link, target) in ALTERNATIVES {
        s.push_str(&format!("{link}->{target}"));
    }
    fingerprint(s.as_bytes())
}

/// Builds (or confirms up to date) the image of one flavour.
pub fn build(opts: &BuildOptions) -> Result<BuildOutcome> {
    let started = Instant::now();
    for (tool, pkg) in [
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
    ] {
        require_tool(tool, pkg)?;
    }
    let cache = opts.cache.clone().unwrap_or_else(cache_dir);
    let paths = ImagePaths::for_flavour(&cache, opts.flavour);
    let images = cache.join("images");
    std::fs::create_dir_all(&images).at(&images)?;
    let _lock = FileLock::acquire(&images.join(format!(".{}.lock", opts.flavour)))?;

    let agent_path = find_agent(opts.agent.as_deref())?;
    let agent = std::fs::read(&agent_path).at(&agent_path)?;
    let agent_fp = fingerprint(&agent);
    let recipe = recipe_fingerprint();

    apt::use_cache_dir(&cache.join("apt"));
    let previous = paths.load_info().ok();
    let hint: Vec<String> = previous
        .as_ref()
        .map(|p| p.packages.keys().cloned().collect())
        .unwrap_or_default();
    let kernel = apt::resolve_kernel(
        "linux-image-amd64",
        opts.flavour.default_release(),
        previous.as_ref().map(|p| p.kernel_package.as_str()),
    )?;
    let userland = apt::library_closure(&PACKAGES, &hint)?;
    let versions: BTreeMap<String, String> = userland
        .values()
        .map(|p| (p.name.clone(), p.version.clone()))
        .collect();

    if !opts.force {
        if let Some(old) = previous {
            if old.kernel_package == kernel.name
                && old.kernel_version == kernel.version
                && old.packages == versions
                && old.agent_fingerprint == agent_fp
                && old.recipe == recipe
            {
                tracing::info!("{} image is up to date", opts.flavour);
                return Ok(BuildOutcome {
                    paths,
                    info: old,
                    rebuilt: false,
                });
            }
        }
    }

    let mut all: Vec<&apt::Package> = userland.values().collect();
    all.push(&kernel);
    let debs = apt::download(&all, &cache.join("debs"))?;

    let staging = images.join(format!(".build-{}", opts.flavour));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).at(&staging)?;
    }
    let result = assemble(&staging, &kernel, &userland, &debs, &agent, &agent_path);
    let (out_dir, mut info) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    info.flavour = opts.flavour;
    info.agent_fingerprint = agent_fp;
    info.recipe = recipe;
    info.build_secs = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    let json = serde_json::to_vec_pretty(&info).expect("ImageInfo serialises");
    std::fs::write(out_dir.join("image.json"), json).at(out_dir.join("image.json"))?;

    // Swap the finished image in. VMs already running keep their own hard
    // links to the old kernel (see `vm`), so replacing files under them is
    // safe; VMs starting hold the swap lock shared until QEMU has read them.
    let _swap = FileLock::acquire(&paths.swap_lock())?;
    let old = images.join(format!(".old-{}", opts.flavour));
    let _ = std::fs::remove_dir_all(&old);
    if paths.dir.exists() {
        std::fs::rename(&paths.dir, &old).at(&paths.dir)?;
    }
    std::fs::rename(&out_dir, &paths.dir).at(&paths.dir)?;
    let _ = std::fs::remove_dir_all(&old);
    let _ = std::fs::remove_dir_all(&staging);
    Ok(BuildOutcome {
        paths,
        info,
        rebuilt: true,
    })
}

/// Compiles the log-vault syslog library (`guest/syslog/vmwsyslog.c`) with
/// the host's gcc against the host's glibc (Debian bookworm, as the guest).
fn build_syslog_lib(staging: &Path) -> Result<Vec<u8>> {
    use std::io::Write;
    require_tool("cc", "gcc")?;
    let out = staging.join("libvmwsyslog.so");
    let mut child = std::process::Command::new("cc")
        .args(guest::SYSLOG_LIB_CFLAGS)
        .arg("-o")
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .at(Path::new("cc"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(guest::SYSLOG_LIB_SOURCE.as_bytes())
            .at(Path::new("cc"))?;
    }
    let res = child.wait_with_output().at(Path::new("cc"))?;
    if !res.status.success() {
        return Err(LabError::BadFile {
            path: PathBuf::from("guest/syslog/vmwsyslog.c"),
            detail: format!(
                "cc failed: {}",
                String::from_utf8_lossy(&res.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            ),
        });
    }
    std::fs::read(&out).at(&out)
}

/// Unpacks, assembles and archives into `staging/out`; returns that dir and
/// the partly filled info (the caller adds fingerprints and timing).
fn assemble(
    staging: &Path,
    kernel: &apt::Package,
    userland: &BTreeMap<String, apt::Package>,
    debs: &BTreeMap<String, PathBuf>,
    agent: &[u8],
    agent_path: &Path,
) -> Result<(PathBuf, ImageInfo)> {
    let out = staging.join("out");
    std::fs::create_dir_all(&out).at(&out)?;

    // Kernel: the bzImage as shipped and the vmlinux inside it.
    let kdir = staging.join("kernel");
    apt::extract(&debs[&kernel.name], &kdir)?;
    let moddir = kdir.join("lib/modules");
    let release = std::fs::read_dir(&moddir)
        .at(&moddir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or_else(|| LabError::BadFile {
            path: moddir.clone(),
            detail: "no module tree".into(),
        })?;
    let vmlinuz = kdir.join("boot").join(format!("vmlinuz-{release}"));
    let bz = std::fs::read(&vmlinuz).at(&vmlinuz)?;
    let vmlinux = extract_vmlinux(&bz, &vmlinuz)?;
    std::fs::write(out.join("bzImage"), &bz).at(out.join("bzImage"))?;
    std::fs::write(out.join("vmlinux"), &vmlinux).at(out.join("vmlinux"))?;

    // Userland.
    let root = staging.join("rootfs");
    rootfs::skeleton(&root)?;
    let mut busybox_list = String::new();
    for name in userland.keys() {
        let pkg_dir = staging.join("pkgs").join(name);
        apt::extract(&debs[name], &pkg_dir)?;
        if name == "busybox-static" {
            let bb = pkg_dir.join("bin/busybox");
            busybox_list = String::from_utf8_lossy(&run_capture(
                std::process::Command::new(&bb).arg("--list-full"),
            )?)
            .into_owned();
        }
        rootfs::install_package(&pkg_dir, &root)?;
    }
    for (path, text, mode) in guest::files() {
        rootfs::put_file(&root, path, text.as_bytes(), mode)?;
    }
    rootfs::put_file(&root, "usr/sbin/vmwatch-agent", agent, 0o755)?;
    let syslog_lib = build_syslog_lib(staging)?;
    rootfs::put_file(&root, guest::SYSLOG_LIB_PATH, &syslog_lib, 0o755)?;
    rootfs::alternatives(&root, &ALTERNATIVES)?;
    let links = rootfs::busybox_links(&root, &busybox_list)?;
    tracing::debug!("{links} busybox applet links");

    let modules = kmod::install(
        &moddir.join(&release),
        &root.join("usr/lib/modules").join(&release),
        &MODULES,
    )?;

    let checked = rootfs::check_elf_deps(&root).map_err(|e| match e {
        LabError::MissingLibraries(m) if m.contains("vmwatch-agent") => {
            LabError::MissingLibraries(format!("{m} (agent from {})", agent_path.display()))
        }
        other => other,
    })?;
    tracing::info!("{checked} ELF files have all their libraries");

    let rootfs_bytes = rootfs::tree_size(&root);
    let initramfs_bytes = cpio::write_tree(
        &root,
        &out.join("initramfs.cpio"),
        &[("home/user", 1000, 1000)],
    )?;
    let now = util::now_unix();
    let info = ImageInfo {
        flavour: Flavour::Stable, // set by the caller
        kernel_release: release,
        kernel_package: kernel.name.clone(),
        kernel_version: kernel.version.clone(),
        packages: userland
            .values()
            .map(|p| (p.name.clone(), p.version.clone()))
            .collect(),
        modules,
        agent_fingerprint: String::new(),
        recipe: String::new(),
        initramfs_compression: "none".into(),
        built_at_unix: now,
        built_at: util::rfc3339(now),
        build_secs: 0.0,
        vmlinux_bytes: vmlinux.len() as u64,
        bzimage_bytes: bz.len() as u64,
        initramfs_bytes,
        rootfs_bytes,
    };
    Ok((out, info))
}

/// The ELF vmlinux inside a bzImage, via `vmi::image::extract_vmlinux`.
fn extract_vmlinux(bz: &[u8], path: &Path) -> Result<Vec<u8>> {
    vmi::image::extract_vmlinux(bz).map_err(|e| LabError::BadFile {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}
