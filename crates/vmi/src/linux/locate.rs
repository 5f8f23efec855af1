//! Finding the running kernel in guest-physical memory, from memory alone.
//!
//! Nothing the guest says about itself is used: no registers, no
//! vmcoreinfo. The kernel image on the host tells us the bytes of
//! `linux_banner` and where `init_top_pgt` (the kernel's page-table root)
//! sits relative to it. KASLR moves the kernel physically and virtually by
//! independent multiples of `CONFIG_PHYSICAL_ALIGN` (2 MiB on x86-64), so:
//!
//! 1. every 2 MiB-aligned physical slide where the image's banner bytes
//!    appear at the banner's offset is a candidate;
//! 2. for a candidate, `init_top_pgt` is at the same distance from the banner
//!    as in the image; it is a page-table root;
//! 3. the virtual slide is the 2 MiB step (within the 1 GiB kernel-image
//!    window) at which that root maps the banner's virtual address to the
//!    banner's physical address, and a second symbol (`init_task`) must agree.
//!
//! A planted copy of the banner elsewhere fails step 3, so it cannot steer us.

use std::sync::Arc;

use crate::memory::PhysicalMemory;
use crate::paging::{self, PagingMode};

/// Start of the kernel-image virtual window (`__START_KERNEL_map`).
pub const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// KASLR granularity on x86-64 (`CONFIG_PHYSICAL_ALIGN` minimum and Debian's value).
pub const KASLR_ALIGN: u64 = 0x20_0000;
/// Size of the kernel-image virtual window (`KERNEL_IMAGE_SIZE` with KASLR).
const KERNEL_IMAGE_WINDOW: u64 = 0x4000_0000;

/// Where the running kernel is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KernelLocation {
    /// Added to link-time addresses to get run-time virtual addresses.
    pub virtual_slide: u64,
    /// Physical address of the kernel image's first byte minus its link-time physical address.
    pub physical_slide: u64,
    /// Physical address of the kernel page-table root (`init_top_pgt`).
    pub page_table_root: u64,
    /// 4- or 5-level paging.
    pub paging_mode: PagingMode,
}

/// Why the kernel could not be located.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// The image lacks a symbol we need.
    #[error("kernel image has no `{0}` symbol: is this the kernel the guest runs?")]
    MissingSymbol(&'static str),
    /// No candidate matched.
    #[error("the running kernel does not match this kernel image ({candidates} banner candidates, none with consistent page tables): pass the vmlinux the guest booted")]
    NotFound { candidates: usize },
}

/// Symbols the locator needs, as link-time addresses, plus the banner bytes.
pub struct LocateInputs<'a> {
    pub linux_banner: u64,
    pub banner_bytes: &'a [u8],
    pub init_top_pgt: u64,
    pub init_task: u64,
}

/// Finds the running kernel in `mem`.
pub fn locate_kernel(
    mem: &Arc<dyn PhysicalMemory>,
    inputs: &LocateInputs<'_>,
) -> Result<KernelLocation, LocateError> {
    let banner_link_phys = inputs
        .linux_banner
        .checked_sub(START_KERNEL_MAP)
        .ok_or(LocateError::MissingSymbol("linux_banner"))?;
    let pgt_delta = inputs.init_top_pgt.wrapping_sub(inputs.linux_banner);
    let task_delta = inputs.init_task.wrapping_sub(inputs.linux_banner);
    let end_of_ram = mem
        .ranges()
        .iter()
        .map(|r| r.gpa.saturating_add(r.len))
        .max()
        .unwrap_or(0);
    let mut buf = vec![0u8; inputs.banner_bytes.len()];
    let mut candidates = 0usize;
    let mut pslide = 0u64;
    while banner_link_phys.saturating_add(pslide) < end_of_ram {
        let banner_phys = banner_link_phys + pslide;
        pslide += KASLR_ALIGN;
        if mem.read_phys(banner_phys, &mut buf).is_err() || buf != inputs.banner_bytes {
            continue;
        }
        candidates += 1;
        let root = banner_phys.wrapping_add(pgt_delta);
        for mode in [PagingMode::FourLevel, PagingMode::FiveLevel] {
            if let Some(vslide) = find_virtual_slide(mem.as_ref(), root, mode, inputs, banner_phys)
            {
                // The init_task must map where the image layout puts it.
                let task_va = inputs.init_task.wrapping_add(vslide);
                let ok = paging::translate(mem.as_ref(), root, mode, task_va)
                    .map(|t| t.pa == banner_phys.wrapping_add(task_delta))
                    .unwrap_or(false);
                if ok {
                    return Ok(KernelLocation {
                        virtual_slide: vslide,
                        physical_slide: pslide - KASLR_ALIGN,
                        page_table_root: root,
                        paging_mode: mode,
                    });
                }
            }
        }
    }
    Err(LocateError::NotFound { candidates })
}

fn find_virtual_slide(
    mem: &dyn PhysicalMemory,
    root: u64,
    mode: PagingMode,
    inputs: &LocateInputs<'_>,
    banner_phys: u64,
) -> Option<u64> {
    let mut vslide = 0u64;
    while vslide < KERNEL_IMAGE_WINDOW {
        let va = inputs.linux_banner.wrapping_add(vslide);
        if let Ok(t) = paging::translate(mem, root, mode, va) {
            if t.pa == banner_phys {
                return Some(vslide);
            }
        }
        vslide += KASLR_ALIGN;
    }
    None
}
