//! Modules three ways — the module list, sysfs's module kset, and a scan of
//! module memory for `struct module`s — and the owner of any kernel address.
//! A module in memory that the list does not show is hidden; every other
//! check names hooks by the module (hidden or not) that owns their target.

use std::collections::BTreeMap;

use vmi::linux::{LinuxGuest, ModuleMemLayout};
use vmi::paging::mapped_ranges;

use crate::baseline::Baseline;
use crate::findings::{Check, Finding, Owner, Report, Target};

/// x86-64's module area: `[MODULES_VADDR, MODULES_END)`, the same with 4- and 5-level paging.
pub const MODULES_VADDR: u64 = 0xffff_ffff_c000_0000;
pub const MODULES_END: u64 = 0xffff_ffff_ff00_0000;
/// Bound on the leaves of the module area walked (4 KiB pages: 1 GiB).
const MAX_MODULE_PAGES: usize = 1 << 18;
/// Bound on sysfs module kobjects walked.
const MAX_KOBJECTS: usize = 1 << 14;
/// Bound on `struct module` candidates checked in the memory scan.
const MAX_CANDIDATES: usize = 1 << 12;

/// One module, wherever it was seen.
#[derive(Debug, Clone)]
pub struct ModuleInfo {
    pub name: String,
    /// Address of its `struct module`.
    pub addr: u64,
    /// Its memory (text, data, rodata...): `[start, end)`.
    pub ranges: Vec<(u64, u64)>,
    pub listed: bool,
    pub in_sysfs: bool,
    pub in_memory: bool,
    /// Its function symbols (run-time address, name), sorted by address.
    pub functions: Vec<(u64, String)>,
}

/// Every module found, and what it takes to name an address's owner.
pub struct Owners {
    pub modules: Vec<ModuleInfo>,
    slide: u64,
    image: (u64, u64),
}

impl Owners {
    /// Finds the modules; reports hidden ones into `report`.
    pub fn discover(base: &Baseline, guest: &LinuxGuest, report: &mut Report) -> Self {
        let slide = guest.location().virtual_slide;
        let mut by_addr: BTreeMap<u64, ModuleInfo> = BTreeMap::new();
        let listing = guest.modules();
        for w in &listing.warnings {
            report.warnings.push(format!("module list: {w}"));
        }
        for m in &listing.items {
            by_addr.insert(m.module, info(guest, m.module, &m.name, true));
        }
        report.coverage.modules_listed = listing.items.len() as u64;

        match sysfs_modules(base, guest) {
            Ok(list) => {
                report.coverage.modules_in_sysfs = list.len() as u64;
                for addr in list {
                    match by_addr.get_mut(&addr) {
                        Some(m) => m.in_sysfs = true,
                        None => {
                            if let Ok(m) = guest.read_module(addr) {
                                let mut i = info(guest, addr, &m.name, false);
                                i.in_sysfs = true;
                                by_addr.insert(addr, i);
                            }
                        }
                    }
                }
            }
            Err(why) => report.warnings.push(format!("sysfs modules: {why}")),
        }

        match memory_modules(base, guest) {
            Ok(found) => {
                report.coverage.modules_in_memory = found.len() as u64;
                for (addr, name) in found {
                    by_addr
                        .entry(addr)
                        .or_insert_with(|| info(guest, addr, &name, false))
                        .in_memory = true;
                }
            }
            Err(why) => report.warnings.push(format!("module memory scan: {why}")),
        }

        for m in by_addr.values().filter(|m| !m.listed) {
            let mut seen = Vec::new();
            if m.in_sysfs {
                seen.push("sysfs");
            }
            if m.in_memory {
                seen.push("module memory");
            }
            report.findings.push(Finding {
                check: Check::HiddenModule,
                object: format!("module {}", m.name),
                location: m.addr,
                expected: None,
                actual: None,
                module: Some(m.name.clone()),
                detail: format!(
                    "struct module at {:#x} is not on the module list; found in {}; memory {}",
                    m.addr,
                    seen.join(" and "),
                    ranges_text(&m.ranges)
                ),
            });
        }
        let image = (
            base.profile
                .symbols
                .address_of("_text")
                .unwrap_or(base.text_start),
            base.profile
                .symbols
                .address_of("_end")
                .unwrap_or(base.text_end()),
        );
        Owners {
            modules: by_addr.into_values().collect(),
            slide,
            image,
        }
    }

    /// Who owns run-time address `addr`.
    pub fn owner(&self, base: &Baseline, addr: u64) -> Owner {
        let link = addr.wrapping_sub(self.slide);
        if (self.image.0..self.image.1).contains(&link) {
            let symbol = match base.profile.symbols.symbolize(link) {
                Some((name, 0)) => name.to_string(),
                Some((name, off)) => format!("{name}+{off:#x}"),
                None => format!("{link:#x}"),
            };
            return Owner::Kernel { symbol };
        }
        for m in &self.modules {
            if m.ranges.iter().any(|r| (r.0..r.1).contains(&addr)) {
                let start = m.ranges.iter().map(|r| r.0).min().unwrap_or(addr);
                let i = m.functions.partition_point(|f| f.0 <= addr);
                let symbol = i.checked_sub(1).map(|i| {
                    let (at, name) = &m.functions[i];
                    match addr - at {
                        0 => name.clone(),
                        off => format!("{name}+{off:#x}"),
                    }
                });
                return Owner::Module {
                    name: m.name.clone(),
                    offset: addr - start,
                    symbol,
                    hidden: !m.listed,
                };
            }
        }
        Owner::Unknown
    }

    pub fn target(&self, base: &Baseline, addr: u64) -> Target {
        Target {
            addr,
            owner: self.owner(base, addr),
        }
    }

    /// The module name behind `addr`, if a module owns it.
    pub fn module_of(&self, base: &Baseline, addr: u64) -> Option<String> {
        match self.owner(base, addr) {
            Owner::Module { name, .. } => Some(name),
            _ => None,
        }
    }

    /// Whether `addr` (run-time) is core kernel text.
    pub fn in_core_text(&self, base: &Baseline, addr: u64) -> bool {
        base.in_text(addr.wrapping_sub(self.slide))
    }
}

fn info(guest: &LinuxGuest, addr: u64, name: &str, listed: bool) -> ModuleInfo {
    let ranges = module_ranges(guest, addr);
    let mut functions: Vec<(u64, String)> = guest
        .module_symbols(addr)
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.function && ranges.iter().any(|r| (r.0..r.1).contains(&s.addr)))
        .map(|s| (s.addr, s.name))
        .collect();
    functions.sort_unstable();
    ModuleInfo {
        name: name.to_string(),
        addr,
        ranges,
        listed,
        in_sysfs: false,
        in_memory: false,
        functions,
    }
}

fn ranges_text(r: &[(u64, u64)]) -> String {
    r.iter()
        .map(|(s, e)| format!("{s:#x}-{e:#x}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The memory regions of a `struct module` (each `mem[]` type on 6.4+,
/// core and init layouts before), bounded to the module area.
pub fn module_ranges(guest: &LinuxGuest, module: u64) -> Vec<(u64, u64)> {
    let k = guest.kernel_space();
    let mut out = Vec::new();
    let mut add = |base: u64, size: u64| {
        if size > 0 && size < (1 << 30) && (MODULES_VADDR..MODULES_END).contains(&base) {
            out.push((base, base + size));
        }
    };
    match guest.profile().layout.module_mem {
        ModuleMemLayout::MemArray {
            mem,
            elem_size,
            count,
            base,
            size,
            ..
        } => {
            for i in 0..count.min(16) {
                let m = module + mem + i * elem_size;
                if let (Ok(b), Ok(s)) = (k.read_u64(m + base), k.read_u32(m + size)) {
                    add(b, u64::from(s));
                }
            }
        }
        ModuleMemLayout::Layouts {
            core,
            init,
            base,
            size,
        } => {
            for l in [core, init] {
                if let (Ok(b), Ok(s)) =
                    (k.read_u64(module + l + base), k.read_u32(module + l + size))
                {
                    add(b, u64::from(s));
                }
            }
        }
    }
    out
}

/// `struct module`s whose kobject is in sysfs's `module_kset` (built-in
/// modules there have no `struct module` and are skipped).
fn sysfs_modules(base: &Baseline, guest: &LinuxGuest) -> Result<Vec<u64>, String> {
    let o = &base.offsets;
    let (Some(kset_list), Some(entry), Some(mk_mod)) =
        (o.kset_list, o.kobject_entry, o.module_kobject_mod)
    else {
        return Err("this kernel's BTF lacks kset/kobject/module_kobject".into());
    };
    let k = guest.kernel_space();
    let kset_ptr = guest.symbol("module_kset").map_err(|e| e.to_string())?;
    let kset = k.read_u64(kset_ptr).map_err(|e| e.to_string())?;
    let head = kset + kset_list;
    let mut out = Vec::new();
    let mut node = k.read_u64(head).map_err(|e| e.to_string())?;
    let mut steps = 0;
    while node != head {
        steps += 1;
        if steps > MAX_KOBJECTS {
            return Err(format!(
                "more than {MAX_KOBJECTS} module kobjects: list corrupted?"
            ));
        }
        let kobj = node.wrapping_sub(entry);
        // module_kobject starts with its kobject.
        if let Ok(m) = k.read_u64(kobj + mk_mod) {
            if m != 0 {
                out.push(m);
            }
        }
        node = k.read_u64(node).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Scans every mapped page of the module area for a `struct module`: a
/// word equal to its own address minus `offsetof(struct module, mkobj.mod)`
/// (the kobject's back pointer to its module), with a valid state and a
/// printable name. Unlinking from lists does not change this.
fn memory_modules(base: &Baseline, guest: &LinuxGuest) -> Result<Vec<(u64, String)>, String> {
    let off = base
        .offsets
        .module_mkobj_mod
        .ok_or("this kernel's BTF lacks module.mkobj.mod")?;
    let k = guest.kernel_space();
    let mem = k.memory();
    let leaves = mapped_ranges(
        mem.as_ref(),
        k.root(),
        k.mode(),
        MODULES_VADDR,
        MODULES_END,
        MAX_MODULE_PAGES,
    );
    let mut found = Vec::new();
    let mut page = vec![0u8; 4096];
    let mut candidates = 0;
    for leaf in leaves {
        let mut at = 0;
        while at < leaf.len {
            let va = leaf.va + at;
            let pa = leaf.pa + at;
            at += 4096;
            if mem.read_phys(pa, &mut page).is_err() {
                continue;
            }
            for (i, w) in page.chunks_exact(8).enumerate() {
                let v = u64::from_le_bytes(w.try_into().unwrap_or_default());
                let here = va + (i as u64) * 8;
                if v == 0 || v.wrapping_add(off) != here {
                    continue;
                }
                candidates += 1;
                if candidates > MAX_CANDIDATES {
                    return Err(format!("more than {MAX_CANDIDATES} candidates"));
                }
                if let Ok(m) = guest.read_module(v) {
                    let printable = !m.name.is_empty()
                        && m.name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if printable && m.state != "?" {
                        found.push((v, m.name));
                    }
                }
            }
        }
    }
    Ok(found)
}
