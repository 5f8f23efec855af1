//! The guest kernel as the plugin sees it: which thread runs on a vCPU and
//! what its fds are, read from guest RAM through the introspection core.
//!
//! With PTI the user page tables a `syscall` runs on do not map the kernel,
//! so kernel memory is not read through QEMU's current-CR3 accessor but
//! through our own walk of the kernel page tables (`init_top_pgt`, found by
//! `vmi::linux::locate_kernel`) over the guest RAM file, which the plugin
//! maps shared: QEMU's TCG writes land in the same pages, so what we read at
//! the instruction is what the guest kernel sees at that instant.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmi::image::KernelImage;
use vmi::linux::{
    locate_kernel, FileIdentity, KernelLocation, KernelProfile, LinuxGuest, LocateInputs, ThreadIds,
};
use vmi::memory::{MappedFileMemory, PhysRange, PhysicalMemory};
use vmi::paging::AddressSpace;

use crate::args::GuestConfig;

/// How long to wait before trying to locate a kernel that was not found
/// (early boot: the kernel is not in RAM yet).
const RETRY: Duration = Duration::from_secs(1);

/// Shared by all vCPUs: the parsed image, the RAM, and where the kernel is.
pub struct GuestSource {
    profile: Arc<KernelProfile>,
    ram: PathBuf,
    ram_below_4g: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    memory: Option<Arc<dyn PhysicalMemory>>,
    location: Option<KernelLocation>,
    last_try: Option<Instant>,
}

impl GuestSource {
    /// Parses the image (symbols and BTF): done once at plugin load, before
    /// the guest runs. The RAM file is mapped later: QEMU creates it after
    /// loading plugins.
    pub fn open(cfg: &GuestConfig) -> Result<GuestSource, String> {
        let image = KernelImage::open(&cfg.vmlinux)
            .map_err(|e| format!("vmlinux={}: {e}", cfg.vmlinux.display()))?;
        let profile = KernelProfile::from_image(&image)
            .map_err(|e| format!("vmlinux={}: {e}", cfg.vmlinux.display()))?;
        Ok(GuestSource {
            profile: Arc::new(profile),
            ram: cfg.ram.clone(),
            ram_below_4g: cfg.ram_below_4g,
            state: Mutex::new(State::default()),
        })
    }

    /// A per-vCPU view (its own translation cache), once the kernel is found.
    /// Until then at most one attempt per [`RETRY`].
    pub fn view(&self) -> Option<LinuxGuest> {
        let mut st = self.state.lock().ok()?;
        if st.location.is_none() {
            if st.last_try.is_some_and(|t| t.elapsed() < RETRY) {
                return None;
            }
            st.last_try = Some(Instant::now());
            if st.memory.is_none() {
                let len = std::fs::metadata(&self.ram).ok()?.len();
                let ranges = PhysRange::qemu_x86(len, self.ram_below_4g);
                let mem = MappedFileMemory::open(&self.ram, ranges, false).ok()?;
                st.memory = Some(Arc::new(mem));
            }
            let symbol = |name| self.profile.symbols.address_of(name);
            let inputs = LocateInputs {
                linux_banner: symbol("linux_banner")?,
                banner_bytes: &self.profile.banner,
                init_top_pgt: symbol("init_top_pgt")?,
                init_task: symbol("init_task")?,
            };
            st.location = locate_kernel(st.memory.as_ref()?, &inputs).ok();
        }
        let location = st.location?;
        let space = AddressSpace::new(
            Arc::clone(st.memory.as_ref()?),
            location.page_table_root,
            location.paging_mode,
        );
        Some(LinuxGuest::from_parts(
            space,
            Arc::clone(&self.profile),
            location,
        ))
    }
}

/// The thread on the vCPU whose kernel per-cpu base is `percpu_base`.
pub fn current_thread(guest: &LinuxGuest, percpu_base: u64) -> Option<(u64, ThreadIds)> {
    let task = guest.current_task(percpu_base).ok()?;
    if task == 0 {
        return None;
    }
    let ids = guest.thread_ids(task).ok()?;
    Some((task, ids))
}

/// The object behind fd `fd` of `task`, if open and readable.
pub fn fd_identity(guest: &LinuxGuest, task: u64, fd: u64) -> Option<FileIdentity> {
    let file = guest.file_of_fd(task, fd).ok()??;
    guest.file_identity(file).ok()
}

/// Our file kind in the ring's encoding.
pub fn kind(k: vmi::linux::FileKind) -> events::FileKind {
    use events::FileKind as E;
    use vmi::linux::FileKind as V;
    match k {
        V::Regular => E::Regular,
        V::Directory => E::Directory,
        V::CharDevice => E::CharDevice,
        V::BlockDevice => E::BlockDevice,
        V::Fifo => E::Fifo,
        V::Pipe => E::Pipe,
        V::Socket => E::Socket,
        V::Symlink => E::Symlink,
        V::AnonInode => E::AnonInode,
        V::Unknown => E::Unknown,
    }
}
