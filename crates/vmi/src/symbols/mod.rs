//! Kernel symbols: names and link-time addresses of kernel functions and
//! variables.
//!
//! Debian's kernels carry no ELF symbol table and their System.map is a
//! stub, so the symbols come from the kallsyms tables compiled into the
//! image itself (see [`kallsyms`]). Addresses here are link-time (unslid);
//! add the KASLR slide found at run time to get guest virtual addresses.
//! Per-CPU symbols (absolute values near 0 with
//! CONFIG_KALLSYMS_ABSOLUTE_PERCPU) are offsets into the per-CPU area and
//! never slide.

pub mod kallsyms;

use std::collections::HashSet;

use crate::image::{ImageError, KernelImage};

pub use kallsyms::{parse_kallsyms_blob, AddressEncoding, KallsymsLayout, KallsymsTables};

/// Lowest address of the kernel half of the x86-64 address space: symbols at
/// or above it are relocated by KASLR; those below (per-CPU offsets,
/// absolute values) are not.
pub const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

/// One kernel symbol.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Symbol {
    /// Symbol name, e.g. `entry_SYSCALL_64`.
    pub name: String,
    /// Link-time (unslid) address, or absolute value for per-CPU symbols.
    pub addr: u64,
    /// `nm`-style type letter (`T` global text, `t` local text, `D`, `b`...).
    pub kind: char,
}

/// Why symbols could not be recovered.
///
/// Each message is one line saying what is wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    /// The image itself is unusable (e.g. no `.rodata`).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// No token table/index pair was found.
    #[error("no kallsyms token table found: the kernel was built without CONFIG_KALLSYMS, or this is not a Linux vmlinux")]
    TokenTableNotFound,
    /// A token table was found but the tables around it do not agree.
    #[error("kallsyms tables near {at:#x} are inconsistent ({reason}): this kernel's kallsyms layout is not supported, report its version")]
    TablesInconsistent {
        /// Address of the token table the search started from.
        at: u64,
        /// Which check failed.
        reason: &'static str,
    },
    /// Names decoded, but no plausible (sorted) address table was next to them.
    #[error("kallsyms names at {names_at:#x} decode but no sorted address table lies next to them: this kernel's kallsyms layout is not supported, report its version")]
    AddressesNotFound {
        /// Address of `kallsyms_names`.
        names_at: u64,
    },
    /// Debian's System.map placeholder.
    #[error("System.map is a stub without symbols (Debian ships the real one in the -dbg package): recover symbols from the kernel image with KernelSymbols::from_image")]
    StubSystemMap,
    /// System.map had no symbol lines.
    #[error("System.map contains no symbols: pass the System.map of the exact kernel build")]
    EmptySystemMap,
    /// A System.map line did not parse.
    #[error("System.map line {line} is not '<hex address> <type> <name>': pass an unmodified System.map")]
    BadSystemMapLine {
        /// 1-based line number.
        line: usize,
    },
}

/// A kernel's symbol table, ordered by address, searchable by name.
#[derive(Debug, Clone, Default)]
pub struct KernelSymbols {
    /// Sorted by address; symbols at the same address keep table order.
    symbols: Vec<Symbol>,
    /// Indices into `symbols`, sorted by name, then by index, so the first
    /// of a run of equal names is the first in table order.
    by_name: Vec<u32>,
    /// Where the tables were found, when recovered from an image.
    tables: Option<TablesInfo>,
}

/// Where kallsyms was found in the image (for diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TablesInfo {
    /// Table arrangement (kernel-version dependent).
    pub layout: KallsymsLayout,
    /// Address encoding.
    pub encoding: AddressEncoding,
    /// `kallsyms_relative_base`, if any.
    pub relative_base: Option<u64>,
    /// Address of `kallsyms_names`.
    pub names_addr: u64,
    /// Address of `kallsyms_token_table`.
    pub token_table_addr: u64,
}

impl KernelSymbols {
    /// Recovers the symbols from the kallsyms tables in the image's `.rodata`.
    pub fn from_image(image: &KernelImage) -> Result<Self, SymbolsError> {
        let rodata = image.rodata()?;
        let tables = parse_kallsyms_blob(rodata.data, rodata.addr)?;
        tracing::debug!(
            layout = ?tables.layout,
            encoding = ?tables.encoding,
            num_syms = tables.symbols.len(),
            names = format_args!("{:#x}", tables.names_addr),
            token_table = format_args!("{:#x}", tables.token_table_addr),
            "recovered kallsyms"
        );
        Ok(Self::from_tables(tables))
    }

    /// Builds the index from recovered tables.
    pub fn from_tables(tables: KallsymsTables) -> Self {
        let info = TablesInfo {
            layout: tables.layout,
            encoding: tables.encoding,
            relative_base: tables.relative_base,
            names_addr: tables.names_addr,
            token_table_addr: tables.token_table_addr,
        };
        let mut symbols = Self::from_symbols(tables.symbols);
        symbols.tables = Some(info);
        symbols
    }

    /// Builds the index from any list of symbols.
    pub fn from_symbols(mut symbols: Vec<Symbol>) -> Self {
        // Stable: aliases at one address keep their table order.
        symbols.sort_by_key(|s| s.addr);
        // The symbol count is capped far below u32::MAX by every producer;
        // truncate rather than panic if a caller passes more.
        symbols.truncate(u32::MAX as usize);
        let mut by_name: Vec<u32> = (0..symbols.len() as u32).collect();
        by_name.sort_by(|&a, &b| symbols[a as usize].name.cmp(&symbols[b as usize].name));
        Self {
            symbols,
            by_name,
            tables: None,
        }
    }

    /// Parses a System.map (`nm -n` output), for kernels that ship a real one.
    pub fn from_system_map(text: &str) -> Result<Self, SymbolsError> {
        let mut symbols = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line.contains("The real System.map is in") {
                return Err(SymbolsError::StubSystemMap);
            }
            let sym = parse_nm_line(line).ok_or(SymbolsError::BadSystemMapLine { line: i + 1 })?;
            symbols.push(sym.0);
        }
        if symbols.is_empty() {
            return Err(SymbolsError::EmptySystemMap);
        }
        Ok(Self::from_symbols(symbols))
    }

    /// Where the kallsyms tables were found, if recovered from an image.
    pub fn tables_info(&self) -> Option<&TablesInfo> {
        self.tables.as_ref()
    }

    /// The run of `by_name` entries whose symbol is called `name`.
    fn named(&self, name: &str) -> &[u32] {
        let key = |&i: &u32| self.symbols[i as usize].name.as_str();
        let start = self.by_name.partition_point(|i| key(i) < name);
        let len = self.by_name[start..].partition_point(|i| key(i) == name);
        &self.by_name[start..start + len]
    }

    /// Link-time address of `name`. When several symbols share the name
    /// (static functions in different files), the first in table order —
    /// the lowest address — is returned; see [`Self::addresses_of`].
    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.get(name).map(|s| s.addr)
    }

    /// The first symbol called `name`.
    pub fn get(&self, name: &str) -> Option<&Symbol> {
        self.named(name).first().map(|&i| &self.symbols[i as usize])
    }

    /// Addresses of every symbol called `name`, in table order.
    pub fn addresses_of(&self, name: &str) -> Vec<u64> {
        self.named(name)
            .iter()
            .map(|&i| self.symbols[i as usize].addr)
            .collect()
    }

    /// The symbol at or below `addr` and the offset from it, like the
    /// kernel's `%pS`. Of aliases at one address the first is returned.
    /// There is no upper bound: an address past the last symbol still
    /// resolves to it, so callers checking code pointers should also check
    /// the address is inside the kernel's text.
    pub fn symbolize(&self, addr: u64) -> Option<(&str, u64)> {
        let after = self.symbols.partition_point(|s| s.addr <= addr);
        let at = self.symbols.get(after.checked_sub(1)?)?.addr;
        let first = self.symbols[..after].partition_point(|s| s.addr < at);
        let sym = self.symbols.get(first)?;
        Some((sym.name.as_str(), addr - sym.addr))
    }

    /// All symbols in address order.
    pub fn iter(&self) -> std::slice::Iter<'_, Symbol> {
        self.symbols.iter()
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// True when there are no symbols.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// Checks this table against a booted guest's `/proc/kallsyms` (read as
    /// root with kptr_restrict=0, otherwise every address is 0).
    ///
    /// Only core-kernel lines count: lines with a `[module]` suffix (modules,
    /// BPF programs, ftrace trampolines) are skipped. `slide` (the KASLR
    /// offset, 0 with `nokaslr` or when booting the ELF through its PVH
    /// entry) is added to our kernel-half addresses; per-CPU values below
    /// [`KERNEL_HALF`] do not move. A line matches when any of our symbols of
    /// that name sits at its address.
    pub fn compare_with_proc_kallsyms(
        &self,
        proc_kallsyms: &str,
        slide: u64,
    ) -> KallsymsComparison {
        let slid = |a: u64| {
            if a >= KERNEL_HALF {
                a.wrapping_add(slide)
            } else {
                a
            }
        };
        let mut cmp = KallsymsComparison::default();
        let mut seen: HashSet<&str> = HashSet::new();
        for line in proc_kallsyms.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let Some((proc_sym, module)) = parse_nm_line(line) else {
                cmp.unparsed_lines += 1;
                continue;
            };
            if module {
                cmp.module_lines += 1;
                continue;
            }
            let ours = self.named(&proc_sym.name);
            if ours.is_empty() {
                cmp.missing.push(proc_sym);
                continue;
            }
            seen.insert(self.symbols[ours[0] as usize].name.as_str());
            match ours
                .iter()
                .map(|&i| &self.symbols[i as usize])
                .find(|s| slid(s.addr) == proc_sym.addr)
            {
                Some(s) => {
                    cmp.matched += 1;
                    if s.kind != proc_sym.kind {
                        cmp.kind_differs += 1;
                    }
                }
                None => cmp.mismatched.push(AddressMismatch {
                    ours: ours
                        .iter()
                        .map(|&i| slid(self.symbols[i as usize].addr))
                        .collect(),
                    name: proc_sym.name,
                    proc_addr: proc_sym.addr,
                }),
            }
        }
        cmp.extra = self
            .symbols
            .iter()
            .filter(|s| !seen.contains(s.name.as_str()))
            .count();
        cmp
    }
}

impl<'a> IntoIterator for &'a KernelSymbols {
    type Item = &'a Symbol;
    type IntoIter = std::slice::Iter<'a, Symbol>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Parses `<hex addr> <type> <name> [\[module\]]`; returns the symbol and
/// whether a module suffix was present.
fn parse_nm_line(line: &str) -> Option<(Symbol, bool)> {
    let mut fields = line.split_whitespace();
    let addr = u64::from_str_radix(fields.next()?, 16).ok()?;
    let mut kind_field = fields.next()?.chars();
    let kind = kind_field.next()?;
    if kind_field.next().is_some() {
        return None;
    }
    let name = fields.next()?.to_owned();
    let module = match fields.next() {
        None => false,
        Some(m) if m.starts_with('[') && m.ends_with(']') => true,
        Some(_) => return None,
    };
    if fields.next().is_some() {
        return None;
    }
    Some((Symbol { name, addr, kind }, module))
}

/// A `/proc/kallsyms` symbol whose address disagrees with ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressMismatch {
    /// Symbol name.
    pub name: String,
    /// Address in `/proc/kallsyms`.
    pub proc_addr: u64,
    /// Our addresses for that name, slid.
    pub ours: Vec<u64>,
}

/// Result of [`KernelSymbols::compare_with_proc_kallsyms`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KallsymsComparison {
    /// Core lines whose name and address we have.
    pub matched: usize,
    /// Core lines whose name we do not have.
    pub missing: Vec<Symbol>,
    /// Core lines whose name we have, at other addresses.
    pub mismatched: Vec<AddressMismatch>,
    /// Matched lines whose type letter differs from ours.
    pub kind_differs: usize,
    /// Lines skipped for a `[module]` suffix.
    pub module_lines: usize,
    /// Lines that are not `<addr> <type> <name>`.
    pub unparsed_lines: usize,
    /// Our symbols whose name appears nowhere in the core lines.
    pub extra: usize,
}

impl KallsymsComparison {
    /// Core lines compared.
    pub fn core_lines(&self) -> usize {
        self.matched + self.missing.len() + self.mismatched.len()
    }

    /// True when every core line matched.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty()
    }
}

#[cfg(test)]
mod tests;
