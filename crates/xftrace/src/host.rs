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
    let (symbolizer, warnings) = Symbolizer::from_guest(&guest, btf.as_ref());
    Ok(GuestNames {
        symbolizer,
        warnings,
    })
}
