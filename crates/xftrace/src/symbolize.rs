//! Names for the addresses in the records: kernel text from the image's
//! kallsyms plus the KASLR slide, module text and module symbols from the
//! guest's module list, and everything else flagged.
//!
//! An address is *known text* when it lies in the kernel's text
//! (`_stext.._etext`, `_sinittext.._einittext`) or in the text of a module
//! on the guest's `modules` list. A call to anything else (a vmalloc'd
//! page, a module that unlinked itself from the list, a BPF trampoline) is
//! what the paper's detector looks for: it is printed as raw hex and flagged.

use std::sync::Arc;

use vmi::btf::Btf;
use vmi::linux::LinuxGuest;
use vmi::symbols::KernelSymbols;

/// Where an address is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// Kernel text: the symbol at or below it and the offset.
    Kernel { name: String, offset: u64 },
    /// Text of a listed module, with its symbol when the module's own
    /// symbol table names it.
    Module {
        module: String,
        name: Option<String>,
        offset: u64,
    },
    /// Not in the kernel's text nor in any listed module's.
    Outside,
}

impl Place {
    /// How the graph prints the callee at `addr`.
    pub fn label(&self, addr: u64) -> String {
        let off = |name: &str, offset: u64| {
            if offset == 0 {
                name.to_string()
            } else {
                format!("{name}+{offset:#x}")
            }
        };
        match self {
            Place::Kernel { name, offset } => off(name, *offset),
            Place::Module {
                module,
                name: Some(name),
                offset,
            } => format!("{} [{module}]", off(name, *offset)),
            Place::Module {
                module,
                name: None,
                offset,
            } => format!("{module}+{offset:#x}"),
            Place::Outside => format!("{addr:#x}"),
        }
    }

    /// Whether this address is outside known text.
    pub fn flagged(&self) -> bool {
        matches!(self, Place::Outside)
    }
}

/// Something that names addresses (the real one reads the guest; tests use a table).
pub trait Resolve {
    fn resolve(&self, addr: u64) -> Place;
}

/// One module's text and its function symbols (run-time addresses, sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleText {
    pub name: String,
    pub start: u64,
    pub end: u64,
    pub symbols: Vec<(u64, String)>,
}

/// Kernel and module symbols at run-time addresses.
pub struct Symbolizer {
    symbols: Arc<KernelSymbols>,
    slide: u64,
    /// Run-time kernel text ranges.
    text: Vec<(u64, u64)>,
    modules: Vec<ModuleText>,
}

impl Symbolizer {
    /// From parts: kernel symbols (link-time), the KASLR slide, and modules.
    pub fn new(symbols: Arc<KernelSymbols>, slide: u64, mut modules: Vec<ModuleText>) -> Self {
        let sym = |n: &str| symbols.address_of(n).map(|a| a.wrapping_add(slide));
        let text = [("_stext", "_etext"), ("_sinittext", "_einittext")]
            .iter()
            .filter_map(|(a, b)| Some((sym(a)?, sym(b)?)))
            .filter(|(a, b)| a < b)
            .collect();
        for m in &mut modules {
            m.symbols.sort();
        }
        modules.sort_by_key(|m| m.start);
        Symbolizer {
            symbols,
            slide,
            text,
            modules,
        }
    }

    /// Reads the guest's module list and each module's text range and
    /// symbol table (through BTF offsets of the running kernel), bounded.
    /// A module whose symbols cannot be read is still known text.
    pub fn from_guest(guest: &LinuxGuest, btf: Option<&Btf>) -> (Self, Vec<String>) {
        let mut warnings = Vec::new();
        let list = guest.modules();
        warnings.extend(list.warnings.iter().map(|w| w.to_string()));
        let layout = btf.and_then(|b| match ModLayout::from_btf(b) {
            Ok(l) => Some(l),
            Err(e) => {
                warnings.push(format!("module symbols unavailable: {e}"));
                None
            }
        });
        let modules = list
            .items
            .iter()
            .map(|m| {
                let mut text = ModuleText {
                    name: m.name.clone(),
                    start: m.base,
                    end: m.base.saturating_add(m.size),
                    symbols: Vec::new(),
                };
                if let Some(l) = &layout {
                    match l.read(guest, m.module) {
                        Ok((start, size, syms)) => {
                            text.start = start;
                            text.end = start.saturating_add(size);
                            text.symbols = syms;
                        }
                        Err(e) => warnings.push(format!("module {}: {e}", m.name)),
                    }
                }
                text
            })
            .collect();
        let symbols = Arc::new(guest.profile().symbols.clone());
        (
            Symbolizer::new(symbols, guest.location().virtual_slide, modules),
            warnings,
        )
    }

    pub fn slide(&self) -> u64 {
        self.slide
    }

    pub fn modules(&self) -> &[ModuleText] {
        &self.modules
    }

    /// Whether `addr` is kernel text.
    pub fn in_kernel_text(&self, addr: u64) -> bool {
        self.text.iter().any(|&(a, b)| (a..b).contains(&addr))
    }
}

impl Resolve for Symbolizer {
    fn resolve(&self, addr: u64) -> Place {
        if self.in_kernel_text(addr) {
            if let Some((name, offset)) = self.symbols.symbolize(addr.wrapping_sub(self.slide)) {
                return Place::Kernel {
                    name: name.to_string(),
                    offset,
                };
            }
        }
        let after = self.modules.partition_point(|m| m.start <= addr);
        if let Some(m) = after.checked_sub(1).map(|i| &self.modules[i]) {
            if addr < m.end {
                let at = m.symbols.partition_point(|(a, _)| *a <= addr);
                return match at.checked_sub(1).map(|i| &m.symbols[i]) {
                    Some((a, name)) => Place::Module {
                        module: m.name.clone(),
                        name: Some(name.clone()),
                        offset: addr - a,
                    },
                    None => Place::Module {
                        module: m.name.clone(),
                        name: None,
                        offset: addr - m.start,
                    },
                };
            }
        }
        Place::Outside
    }
}

/// `struct module` offsets for the text range (BTF of the image); the
/// module's symbols come from `LinuxGuest::module_symbols`.
pub(crate) struct ModLayout {
    /// (offset of the text base, offset of the text size; u32) in `struct module`.
    text_base: u64,
    text_size: u64,
}

impl ModLayout {
    pub(crate) fn from_btf(btf: &Btf) -> Result<Self, vmi::btf::BtfError> {
        let (text_base, text_size) = if btf.has_field("module", "mem") {
            // 6.4+: struct module_memory mem[MOD_MEM_NUM_TYPES], text at MOD_TEXT.
            let index = btf.enum_value("mod_mem_type", "MOD_TEXT")?.max(0) as u64;
            let mem = btf.offset_of("module", "mem")?;
            let elem = btf.struct_size("module_memory")?;
            let at = mem + index * elem;
            (
                at + btf.offset_of("module_memory", "base")?,
                at + btf.offset_of("module_memory", "size")?,
            )
        } else {
            let core = btf.offset_of("module", "core_layout")?;
            (
                core + btf.offset_of("module_layout", "base")?,
                core + btf.offset_of("module_layout", "text_size")?,
            )
        };
        Ok(ModLayout {
            text_base,
            text_size,
        })
    }

    /// (text start, text size, function symbols at run-time addresses).
    #[allow(clippy::type_complexity)]
    fn read(
        &self,
        guest: &LinuxGuest,
        module: u64,
    ) -> Result<(u64, u64, Vec<(u64, String)>), vmi::paging::PagingError> {
        let k = guest.kernel_space();
        let start = k.read_u64(module.wrapping_add(self.text_base))?;
        let size = u64::from(k.read_u32(module.wrapping_add(self.text_size))?);
        let end = start.saturating_add(size);
        let syms = guest
            .module_symbols(module)?
            .into_iter()
            .filter(|sym| sym.function && (start..end).contains(&sym.addr))
            .map(|sym| (sym.addr, sym.name))
            .collect();
        Ok((start, size, syms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmi::symbols::Symbol;

    pub(crate) fn table() -> Symbolizer {
        let s = |name: &str, addr: u64| Symbol {
            name: name.into(),
            addr,
            kind: 'T',
        };
        let symbols = KernelSymbols::from_symbols(vec![
            s("_stext", 0xffff_ffff_8100_0000),
            s("do_syscall_64", 0xffff_ffff_8100_1000),
            s("__x64_sys_read", 0xffff_ffff_8100_2000),
            s("_etext", 0xffff_ffff_8200_0000),
            s("jiffies", 0xffff_ffff_8300_0000),
        ]);
        let modules = vec![ModuleText {
            name: "ext4".into(),
            start: 0xffff_ffff_c010_0000,
            end: 0xffff_ffff_c011_0000,
            symbols: vec![(0xffff_ffff_c010_0100, "ext4_read".into())],
        }];
        Symbolizer::new(Arc::new(symbols), 0x20_0000, modules)
    }

    #[test]
    fn places_and_labels() {
        let t = table();
        let k = |a: u64| t.resolve(a).label(a);
        assert_eq!(k(0xffff_ffff_8120_1000), "do_syscall_64");
        assert_eq!(k(0xffff_ffff_8120_2010), "__x64_sys_read+0x10");
        assert_eq!(k(0xffff_ffff_c010_0100), "ext4_read [ext4]");
        assert_eq!(k(0xffff_ffff_c010_0108), "ext4_read+0x8 [ext4]");
        assert_eq!(k(0xffff_ffff_c010_0010), "ext4+0x10");
        // Past kernel text (a data symbol is not text), in no module, below
        // the slide: flagged and printed raw.
        for a in [
            0xffff_ffff_8320_0000u64,
            0xffff_ffff_c0b3_7000,
            0xffff_ffff_8100_1000,
            0xffff_c900_0000_1000,
        ] {
            let p = t.resolve(a);
            assert!(p.flagged(), "{a:#x} -> {p:?}");
            assert_eq!(p.label(a), format!("{a:#x}"));
        }
        assert!(!t.resolve(0xffff_ffff_c010_ffff).flagged());
        assert!(t.resolve(0xffff_ffff_c011_0000).flagged());
    }
}
