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

/// One entry of a module's own symbol table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModuleSymbol {
    /// Run-time address.
    pub addr: u64,
    pub size: u64,
    pub name: String,
    /// `STT_FUNC` (else `STT_OBJECT`).
    pub function: bool,
}

/// Symbols read from one module's table at most (the guest sets the count).
const MAX_MODULE_SYMBOLS: u64 = 1 << 16;
/// Bytes of one module symbol name at most.
const MAX_SYMBOL_NAME: usize = 256;

impl LinuxGuest {
    /// The function and data symbols of a module (`mod->kallsyms`: its ELF
    /// symtab and strtab in module memory), unsorted. Bounded: at most 65536
    /// entries, names of at most 256 bytes; entries whose name cannot be read
    /// are skipped. Empty when the kernel's BTF does not describe
    /// `mod_kallsyms` or the module has no table.
    pub fn module_symbols(&self, module: u64) -> Result<Vec<ModuleSymbol>, PagingError> {
        let Some(l) = self.layout().module_kallsyms else {
            return Ok(Vec::new());
        };
        let k = self.kernel_space();
        let ks = k.read_u64(module.wrapping_add(l.kallsyms))?;
        if ks == 0 {
            return Ok(Vec::new());
        }
        let symtab = k.read_u64(ks.wrapping_add(l.symtab))?;
        let count = u64::from(k.read_u32(ks.wrapping_add(l.num_symtab))?).min(MAX_MODULE_SYMBOLS);
        let strtab = k.read_u64(ks.wrapping_add(l.strtab))?;
        // Elf64_Sym: st_name u32, st_info u8, st_other u8, st_shndx u16, st_value u64, st_size u64.
        let mut raw = vec![0u8; count as usize * 24];
        k.read(symtab, &mut raw)?;
        const STT_OBJECT: u8 = 1;
        const STT_FUNC: u8 = 2;
        let mut out = Vec::new();
        for e in raw.chunks_exact(24) {
            let function = match e[4] & 0xf {
                STT_FUNC => true,
                STT_OBJECT => false,
                _ => continue,
            };
            let name_off = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let addr = u64::from_le_bytes(e[8..16].try_into().unwrap_or_default());
            let size = u64::from_le_bytes(e[16..24].try_into().unwrap_or_default());
            if addr == 0 {
                continue;
            }
            if let Ok(name) =
                k.read_cstring(strtab.wrapping_add(u64::from(name_off)), MAX_SYMBOL_NAME)
            {
                if !name.is_empty() {
                    out.push(ModuleSymbol {
                        addr,
                        size,
                        name: String::from_utf8_lossy(&name).into_owned(),
                        function,
                    });
                }
            }
        }
        Ok(out)
    }

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
