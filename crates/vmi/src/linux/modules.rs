//! Loaded kernel modules: the `modules` list.

use super::{limits, lossy, LinuxGuest, Listing, ModuleMemLayout};
use crate::paging::PagingError;

/// One loaded module, with the figures /proc/modules shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Module {
    pub name: String,
    /// Start of the module's text (/proc/modules' address column).
    pub base: u64,
    /// Total size of its memory (/proc/modules' size column).
    pub size: u64,
    /// "Live", "Coming", "Going", "Unformed".
    pub state: &'static str,
    /// Address of the `struct module`.
    pub module: u64,
}

impl LinuxGuest {
    /// Modules on the kernel's `modules` list, in list order (newest first, like /proc/modules).
    pub fn modules(&self) -> Listing<Module> {
        self.read_kernel_list(
            self.symbol("modules"),
            self.layout().module_list,
            limits::MAX_MODULES,
            "module list",
            "struct module",
            |module| self.read_module(module),
        )
    }

    /// Reads one `struct module`.
    pub fn read_module(&self, module: u64) -> Result<Module, PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let mut name = vec![0u8; l.module_name_len as usize];
        k.read(module.wrapping_add(l.module_name), &mut name)?;
        let state = match k.read_u32(module.wrapping_add(l.module_state))? {
            0 => "Live",
            1 => "Coming",
            2 => "Going",
            3 => "Unformed",
            _ => "?",
        };
        let (base, size) = match l.module_mem {
            ModuleMemLayout::MemArray {
                mem,
                elem_size,
                count,
                text_index,
                base,
                size,
            } => {
                let text = module
                    .wrapping_add(mem)
                    .wrapping_add(text_index.wrapping_mul(elem_size));
                let b = k.read_u64(text.wrapping_add(base))?;
                let mut total = 0u64;
                for i in 0..count {
                    let m = module
                        .wrapping_add(mem)
                        .wrapping_add(i.wrapping_mul(elem_size));
                    total = total.saturating_add(u64::from(k.read_u32(m.wrapping_add(size))?));
                }
                (b, total)
            }
            ModuleMemLayout::Layouts {
                core,
                init,
                base,
                size,
            } => {
                let b = k.read_u64(module.wrapping_add(core).wrapping_add(base))?;
                let core_size =
                    u64::from(k.read_u32(module.wrapping_add(core).wrapping_add(size))?);
                let init_size =
                    u64::from(k.read_u32(module.wrapping_add(init).wrapping_add(size))?);
                (b, core_size.saturating_add(init_size))
            }
        };
        Ok(Module {
            name: lossy(&name),
            base,
            size,
            state,
            module,
        })
    }
}
