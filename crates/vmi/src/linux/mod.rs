//! The Linux view: processes, open files, sockets and modules of a running
//! (or dumped) guest, read from its memory through the kernel's own data
//! structures, located with symbols and BTF from the host's copy of the image.
//!
//! Every walk is bounded and cycle-safe; a corrupted structure produces a
//! [`Warning`] naming the bad entry, and the walk lists what it can.

mod files;
mod layout;
mod locate;
mod modules;
mod sockets;
mod tasks;

use std::sync::Arc;

pub use files::{FileIdentity, FileKind, OpenFile};
pub use layout::{HashTableLayout, Layout, ModuleKallsymsLayout, ModuleMemLayout};
pub use locate::{locate_kernel, KernelLocation, LocateError, LocateInputs, KASLR_ALIGN};
pub use modules::{Module, ModuleSymbol};
pub use sockets::{Socket, SocketFamily};
pub use tasks::{Process, ThreadIds};

use crate::btf::{Btf, BtfError};
use crate::image::KernelImage;
use crate::memory::PhysicalMemory;
use crate::paging::{AddressSpace, PagingError};
use crate::symbols::{KernelSymbols, SymbolsError};

/// Upper bounds on guest-controlled walks.
pub mod limits {
    /// Processes in the task list.
    pub const MAX_TASKS: usize = 1 << 16;
    /// File descriptors examined per process.
    pub const MAX_FDS: u64 = 1 << 16;
    /// fd-table slots examined in one listing of all processes, so that a
    /// guest faking many processes with huge fd tables cannot stall us.
    pub const MAX_TOTAL_FD_SLOTS: u64 = 1 << 22;
    /// Path components followed up the dentry/mount chain.
    pub const MAX_PATH_COMPONENTS: usize = 256;
    /// Bytes of one path name component.
    pub const MAX_NAME_LEN: usize = 255;
    /// Bytes of an assembled path.
    pub const MAX_PATH_LEN: usize = 4096;
    /// Loaded modules.
    pub const MAX_MODULES: usize = 1 << 12;
    /// Buckets of one socket hash table examined.
    pub const MAX_HASH_BUCKETS: u64 = 1 << 22;
    /// Sockets taken from the hash tables in all.
    pub const MAX_HASHED_SOCKETS: usize = 1 << 18;
}

/// What the kernel image tells us, parsed once and shared by every attach.
pub struct KernelProfile {
    pub symbols: KernelSymbols,
    pub layout: Layout,
    /// Bytes of `linux_banner` in the image, without the trailing NUL.
    pub banner: Vec<u8>,
    /// Offset of the running task pointer in a CPU's per-cpu area:
    /// `pcpu_hot.current_task` (6.2+) or `current_task` (per-cpu symbols are
    /// offsets, not moved by KASLR).
    pub current_task_offset: u64,
}

/// Why a kernel profile could not be built from an image.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(transparent)]
    Symbols(#[from] SymbolsError),
    #[error("kernel image has no .BTF section: use a kernel built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("kernel image has no `{0}` symbol: is this a Linux x86-64 vmlinux?")]
    MissingSymbol(&'static str),
}

impl KernelProfile {
    /// Parses kallsyms and BTF from the image.
    pub fn from_image(image: &KernelImage) -> Result<Self, ProfileError> {
        let symbols = KernelSymbols::from_image(image)?;
        let btf = Btf::parse(image.btf().ok_or(ProfileError::NoBtf)?)?;
        let layout = Layout::from_btf(&btf)?;
        let banner_va = symbols
            .address_of("linux_banner")
            .ok_or(ProfileError::MissingSymbol("linux_banner"))?;
        let raw = image
            .read_vaddr(banner_va, 512)
            .ok_or(ProfileError::MissingSymbol("linux_banner"))?;
        let banner = raw.split(|&b| b == 0).next().unwrap_or_default().to_vec();
        let current_task_offset =
            match (symbols.address_of("pcpu_hot"), layout.pcpu_hot_current_task) {
                (Some(hot), Some(field)) => hot.wrapping_add(field),
                _ => symbols.address_of("current_task").unwrap_or(0),
            };
        Ok(KernelProfile {
            symbols,
            layout,
            banner,
            current_task_offset,
        })
    }

    fn symbol(&self, name: &'static str) -> Result<u64, AttachError> {
        self.symbols
            .address_of(name)
            .ok_or(AttachError::MissingSymbol(name))
    }
}

/// Why attaching to a guest failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Locate(#[from] LocateError),
    #[error("kernel image has no `{0}` symbol")]
    MissingSymbol(&'static str),
}

/// A problem met during a walk: the walk went on without the bad entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Warning {
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A result list plus the warnings met while producing it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listing<T> {
    pub items: Vec<T>,
    pub warnings: Vec<Warning>,
}

/// A running (or dumped) Linux guest, located and ready to read.
pub struct LinuxGuest {
    kernel: AddressSpace,
    profile: Arc<KernelProfile>,
    location: KernelLocation,
}

impl LinuxGuest {
    /// Locates the kernel in `mem` (see [`locate_kernel`]); never pauses the guest.
    pub fn attach(
        mem: Arc<dyn PhysicalMemory>,
        profile: Arc<KernelProfile>,
    ) -> Result<Self, AttachError> {
        let inputs = LocateInputs {
            linux_banner: profile.symbol("linux_banner")?,
            banner_bytes: &profile.banner,
            init_top_pgt: profile.symbol("init_top_pgt")?,
            init_task: profile.symbol("init_task")?,
        };
        let location = locate_kernel(&mem, &inputs)?;
        let kernel = AddressSpace::new(mem, location.page_table_root, location.paging_mode);
        Ok(LinuxGuest {
            kernel,
            profile,
            location,
        })
    }

    /// A guest from already-known parts, without locating the kernel: for
    /// tests and fuzzing, or when the location is known from elsewhere.
    pub fn from_parts(
        kernel: AddressSpace,
        profile: Arc<KernelProfile>,
        location: KernelLocation,
    ) -> Self {
        LinuxGuest {
            kernel,
            profile,
            location,
        }
    }

    /// Where the kernel was found (KASLR slides, page-table root).
    pub fn location(&self) -> &KernelLocation {
        &self.location
    }

    /// The kernel's address space (kernel page tables).
    pub fn kernel_space(&self) -> &AddressSpace {
        &self.kernel
    }

    /// The shared kernel profile (to build more state on it).
    pub fn profile_arc(&self) -> &Arc<KernelProfile> {
        &self.profile
    }

    /// The parsed kernel image.
    pub fn profile(&self) -> &KernelProfile {
        &self.profile
    }

    /// Run-time address of a kernel symbol.
    pub fn symbol(&self, name: &'static str) -> Result<u64, AttachError> {
        Ok(self
            .profile
            .symbol(name)?
            .wrapping_add(self.location.virtual_slide))
    }

    fn layout(&self) -> &Layout {
        &self.profile.layout
    }

    /// Drops cached translations: call between independent looks at a live guest.
    pub fn refresh(&self) {
        self.kernel.flush_cache();
    }

    /// Walks the circular list at `head` (the run-time address of its head
    /// `list_head`) whose entries embed their link at `link_offset`, and reads
    /// each entry with `read`. Bad entries become warnings; the rest is listed.
    fn read_kernel_list<T>(
        &self,
        head: Result<u64, AttachError>,
        link_offset: u64,
        max: usize,
        list_name: &str,
        entry_name: &str,
        read: impl Fn(u64) -> Result<T, PagingError>,
    ) -> Listing<T> {
        let head = match head {
            Ok(a) => a,
            Err(e) => {
                return Listing {
                    items: Vec::new(),
                    warnings: vec![Warning {
                        message: e.to_string(),
                    }],
                }
            }
        };
        let (links, mut warnings) = walk_list(self.kernel_space(), head, max, list_name);
        let mut items = Vec::with_capacity(links.len());
        for link in links {
            let entry = link.wrapping_sub(link_offset);
            match read(entry) {
                Ok(item) => items.push(item),
                Err(e) => warnings.push(Warning {
                    message: format!("{entry_name} at {entry:#x}: {e}"),
                }),
            }
        }
        Listing { items, warnings }
    }

    fn read_ptr(&self, va: u64) -> Result<u64, PagingError> {
        self.kernel.read_u64(va)
    }
}

/// Reads a NUL-terminated byte string of at most `max` bytes as lossy UTF-8.
pub(crate) fn lossy(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// A kernel pointer must be canonical for the paging mode and in the upper
/// half (from 0xffff8000_00000000 with 4 levels, 0xff000000_00000000 with 5).
pub(crate) fn is_kernel_pointer(space: &AddressSpace, va: u64) -> bool {
    va >> 63 == 1 && space.mode().is_canonical(va)
}

/// Walks a circular `list_head` from `head`, returning the addresses of the
/// `list_head`s of its entries (not the head). Forward first; if a `next`
/// pointer is bad, walks backward from the head over `prev` to recover the
/// rest, and reports the bad entry.
pub(crate) fn walk_list(
    space: &AddressSpace,
    head: u64,
    max: usize,
    what: &str,
) -> (Vec<u64>, Vec<Warning>) {
    let mut seen = std::collections::HashSet::new();
    let mut forward = Vec::new();
    let mut warnings = Vec::new();
    let mut cur = head;
    let mut broken = false;
    loop {
        let next = match space.read_u64(cur) {
            Ok(n) => n,
            Err(e) => {
                warnings.push(Warning {
                    message: format!("{what}: cannot read next pointer of entry {cur:#x}: {e}"),
                });
                broken = true;
                break;
            }
        };
        if next == head {
            break;
        }
        if !is_kernel_pointer(space, next) || !seen.insert(next) {
            warnings.push(Warning {
                message: format!(
                    "{what}: entry {cur:#x} has a bad next pointer {next:#x} ({}); the list is corrupted",
                    if is_kernel_pointer(space, next) { "loops back" } else { "not a kernel address" }
                ),
            });
            broken = true;
            break;
        }
        if forward.len() >= max {
            warnings.push(Warning {
                message: format!("{what}: more than {max} entries; listing stops there"),
            });
            return (forward, warnings);
        }
        forward.push(next);
        cur = next;
    }
    if !broken {
        return (forward, warnings);
    }
    // Recover the tail by walking `prev` (at offset 8) from the head.
    let mut backward = Vec::new();
    let mut cur = head;
    while backward.len() + forward.len() < max {
        let prev = match space.read_u64(cur.wrapping_add(8)) {
            Ok(p) => p,
            Err(_) => break,
        };
        if prev == head || !is_kernel_pointer(space, prev) || !seen.insert(prev) {
            break;
        }
        backward.push(prev);
        cur = prev;
    }
    if !backward.is_empty() {
        warnings.push(Warning {
            message: format!(
                "{what}: recovered {} entries by walking backward from the head",
                backward.len()
            ),
        });
    }
    backward.reverse();
    forward.extend(backward);
    (forward, warnings)
}
