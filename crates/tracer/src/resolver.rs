//! Naming a process by its page-table root, for records that carry no
//! thread (plugin started without `vmlinux=`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

/// Page-table root bits of a CR3: drops the PCID (bits 0-11) and the PTI
/// user/kernel bit 12 (Linux allocates PGDs 8 KiB-aligned when PTI is built in).
const ROOT_MASK: u64 = 0x000f_ffff_ffff_e000;

/// Resolves a record's CR3 to the process owning that address space
/// (`mm->pgd`), from the guest's RAM via vmi, when the record is consumed
/// (a few ms after the call): a process that already exited shows as `?`.
pub struct GuestResolver {
    guest: vmi::linux::LinuxGuest,
    /// Page-table root -> the task_struct of the process that owns it.
    by_root: RefCell<HashMap<u64, u64>>,
    last_refresh: Cell<Option<Instant>>,
}

impl GuestResolver {
    pub fn open(vm: &lab::Vm) -> Result<Self> {
        let mem = Arc::new(vm.memory(false)?);
        let image = vmi::image::KernelImage::open(&vm.info().vmlinux)?;
        let profile = Arc::new(vmi::linux::KernelProfile::from_image(&image)?);
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
