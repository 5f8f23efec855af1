//! The host's view of a guest for decoding: its kernel located in its RAM
//! (KASLR slide), the image's symbols and BTF, the module list.

use std::path::Path;
use std::sync::Arc;

use vmi::btf::Btf;
use vmi::image::KernelImage;
use vmi::linux::{KernelProfile, LinuxGuest};
use vmi::memory::PhysicalMemory;

use crate::symbolize::Symbolizer;

/// Why the guest's names cannot be had. One line each.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("kernel image {path}: {source}")]
    Image {
        path: String,
        source: vmi::image::ImageError,
    },
    #[error("kernel image {path}: {source}")]
    Profile {
        path: String,
        source: vmi::linux::ProfileError,
    },
    #[error("guest kernel: {0}")]
    Attach(#[from] vmi::linux::AttachError),
}

/// Names for a live guest's addresses.
pub struct GuestNames {
    pub symbolizer: Symbolizer,
    /// Problems met reading the module list or module symbols.
    pub warnings: Vec<String>,
}

/// Locates the kernel (`vmlinux`, the ELF the guest booted) in `mem` and
/// reads its module list. Never pauses the guest.
pub fn guest_names(mem: Arc<dyn PhysicalMemory>, vmlinux: &Path) -> Result<GuestNames, HostError> {
    let a = attach_guest(mem, vmlinux)?;
    Ok(GuestNames {
        symbolizer: a.names,
        warnings: a.warnings,
    })
}

/// A live guest with its kernel located, the image's BTF, and the names of
/// its kernel and module addresses (read when attached).
pub struct AttachedGuest {
    pub guest: LinuxGuest,
    pub btf: Option<Btf>,
    pub names: Symbolizer,
    /// Problems met reading the module list or module symbols.
    pub warnings: Vec<String>,
}

/// Locates the kernel (`vmlinux`) in `mem`, parses its BTF and reads the
/// module list (shared by the TCG and the guest-module paths).
pub fn attach_guest(
    mem: Arc<dyn PhysicalMemory>,
    vmlinux: &Path,
) -> Result<AttachedGuest, HostError> {
    let path = vmlinux.display().to_string();
    let image = KernelImage::open(vmlinux).map_err(|source| HostError::Image {
        path: path.clone(),
        source,
    })?;
    let profile = KernelProfile::from_image(&image).map_err(|source| HostError::Profile {
        path: path.clone(),
        source,
    })?;
    let btf = image.btf().and_then(|b| Btf::parse(b).ok());
    let guest = LinuxGuest::attach(mem, Arc::new(profile))?;
    let (names, warnings) = Symbolizer::from_guest(&guest, btf.as_ref());
    Ok(AttachedGuest {
        guest,
        btf,
        names,
        warnings,
    })
}
