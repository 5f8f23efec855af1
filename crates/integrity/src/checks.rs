//! The individual checks. Each reads the running guest (never pausing it),
//! compares with the baseline, and appends findings and coverage.

use std::collections::{BTreeMap, BTreeSet};

use events::{EntryMsr, EntryMsrs};
use vmi::linux::LinuxGuest;

use crate::baseline::{read_u64, Baseline};
use crate::compare::{transfer_covering, unexplained};
use crate::findings::{Check, Finding, Owner, Report};
use crate::modules::{Owners, MODULES_END, MODULES_VADDR};
use crate::runqueues;

/// Reads `len` bytes of the guest's kernel at run-time `va`, page by page;
/// unreadable pages stay zero and are counted.
fn read_range(guest: &LinuxGuest, va: u64, len: usize) -> (Vec<u8>, usize) {
    let k = guest.kernel_space();
    let mut buf = vec![0u8; len];
    let mut bad = 0;
    let mut off = 0;
    while off < len {
        let page_end = ((va + off as u64) | 0xfff) + 1;
        let n = ((page_end - (va + off as u64)) as usize).min(len - off);
        if k.read(va + off as u64, &mut buf[off..off + n]).is_err() {
            bad += 1;
        }
        off += n;
    }
    (buf, bad)
}

fn symbol_at(base: &Baseline, link: u64) -> String {
    match base.profile.symbols.symbolize(link) {
        Some((n, 0)) => n.to_string(),
        Some((n, off)) => format!("{n}+{off:#x}"),
        None => format!("{link:#x}"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every syscall table entry against the image's.
pub fn syscall_tables(base: &Baseline, guest: &LinuxGuest, owners: &Owners, r: &mut Report) {
    let slide = guest.location().virtual_slide;
    for t in &base.syscall_tables {
        let (run, bad) = read_range(guest, t.addr + slide, t.entries.len() * 8);
        if bad > 0 {
            r.warnings
                .push(format!("{}: {bad} unreadable pages", t.name));
            continue;
        }
        for (nr, &want) in t.entries.iter().enumerate() {
            r.coverage.syscall_entries += 1;
            let got = read_u64(&run, nr * 8);
            let want = want + slide;
            if got == want {
                continue;
            }
            let name = if t.name == "sys_call_table" {
                events::syscalls::name(nr as u64).unwrap_or("?")
            } else {
                "?"
            };
            r.findings.push(Finding {
                check: Check::SyscallTable,
                object: format!("{}[{nr}] ({name})", t.name),
                location: t.addr + slide + nr as u64 * 8,
                expected: Some(owners.target(base, want)),
                actual: Some(owners.target(base, got)),
                module: owners.module_of(base, got),
                detail: String::new(),
            });
        }
    }
}

/// Whether a difference is a jump-label site in one of its two legitimate
/// states: the nop of the site's size, or a jump to the entry's target.
fn jump_label_ok(base: &Baseline, run: &[u8], reg: crate::compare::Region, slide: u64) -> bool {
    let i = base.jump_sites.partition_point(|j| j.0 <= reg.start);
    let Some(&(site, target)) = i.checked_sub(1).and_then(|i| base.jump_sites.get(i)) else {
        return false;
    };
    let o = (site - base.text_start) as usize;
    let img = base.text.get(o..o + 2).unwrap_or_default();
    let size = if img.first() == Some(&0xeb) || img == [0x66, 0x90] {
        2
    } else {
        5
    };
    if reg.end > site + size {
        return false;
    }
    let Some(now) = run.get(o..o + size as usize) else {
        return false;
    };
    let dest = |len: u64, rel: i64| (site + slide + len).wrapping_add(rel as u64);
    match size {
        2 => {
            now == [0x66, 0x90]
                || (now[0] == 0xeb && dest(2, i64::from(now[1] as i8)) == target + slide)
        }
        _ => {
            now == NOP5
                || (now[0] == 0xe9
                    && dest(
                        5,
                        i64::from(i32::from_le_bytes([now[1], now[2], now[3], now[4]])),
                    ) == target + slide)
        }
    }
}

/// The 5-byte nop ftrace writes over its call sites (x86's `x86_nops[5]`).
const NOP5: &[u8] = &[0x0f, 0x1f, 0x44, 0x00, 0x00];

/// Core kernel text against the image, outside the kernel's patch sites.
/// A difference inside `x64_sys_call` is a syscall-dispatch hook. At an
/// ftrace site only a `call` to ftrace (`ftrace_targets`, run-time) is legitimate.
pub fn kernel_text(
    base: &Baseline,
    guest: &LinuxGuest,
    owners: &Owners,
    ftrace_targets: &[u64],
    r: &mut Report,
) {
    let slide = guest.location().virtual_slide;
    let (run, bad) = read_range(guest, base.text_start + slide, base.text.len());
    if bad > 0 {
        r.warnings.push(format!(
            "kernel text: {bad} unreadable pages (compared as zero)"
        ));
    }
    r.coverage.text_bytes += base.text.len() as u64;
    r.coverage.text_bytes_patchable = base.patchable.len_bytes();
    if let Some((s, e)) = base.dispatcher {
        let lo = (s - base.text_start) as usize;
        let hi = ((e - base.text_start) as usize).min(base.text.len());
        r.coverage.dispatch_calls = base.text[lo..hi]
            .iter()
            .filter(|&&b| b == 0xe8 || b == 0xe9)
            .count() as u64;
    }
    let regions = unexplained(
        &base.text,
        &run,
        base.text_start,
        slide,
        Some(&base.patchable),
        &[],
    );
    for reg in regions {
        if let Some((site, end)) = base.mcount_sites.range_of(reg.start) {
            // An ftrace site holds the image's `call __fentry__`, the 5-byte
            // nop ftrace puts there at boot, or a call into ftrace.
            let o = (site - base.text_start) as usize;
            let now = run.get(o..o + 5).unwrap_or_default();
            let to_ftrace = now.first() == Some(&0xe8)
                && crate::compare::decode_transfer(now, site + slide)
                    .is_some_and(|(_, dest)| ftrace_targets.contains(&dest));
            if reg.end <= end && (now == NOP5 || to_ftrace) {
                continue;
            }
        }
        if jump_label_ok(base, &run, reg, slide) {
            continue;
        }
        let lo = (reg.start - base.text_start) as usize;
        let hi = ((reg.end - base.text_start) as usize).min(run.len());
        let from = reg.start.saturating_sub(16).max(base.text_start);
        let f = (from - base.text_start) as usize;
        let to = (hi + 16).min(run.len());
        let actual = transfer_covering(&run[f..to], from, reg.start, slide);
        let expected = transfer_covering(&base.text[f..to], from, reg.start, slide);
        let at = actual.map_or(reg.start, |a| a.0);
        let in_dispatch = base
            .dispatcher
            .is_some_and(|(s, e)| (s..e).contains(&reg.start));
        let (check, object) = match (in_dispatch, expected) {
            (true, Some((_, exp))) => (
                Check::SyscallDispatch,
                format!(
                    "{} (call to {})",
                    symbol_at(base, at),
                    symbol_at(base, exp.wrapping_sub(slide))
                ),
            ),
            (true, None) => (Check::SyscallDispatch, symbol_at(base, at)),
            (false, _) => (
                Check::InlineHook,
                format!(
                    "{} ({} bytes patched)",
                    symbol_at(base, reg.start),
                    reg.end - reg.start
                ),
            ),
        };
        let actual_target = actual.map(|a| owners.target(base, a.1));
        let module = actual.and_then(|a| owners.module_of(base, a.1));
        r.findings.push(Finding {
            check,
            object,
            location: at + slide,
            expected: expected.map(|e| owners.target(base, e.1)),
            actual: actual_target,
            module,
            detail: format!(
                "image {} now {}",
                hex(&base.text[lo..hi]),
                hex(&run[lo..hi])
            ),
        });
    }
    patch_site_branches(base, &run, slide, owners, r);
}

/// The patch sites the text comparison skips (their bytes legitimately
/// change) may still not branch out of the kernel: a call or jump at a
/// changed site must go to core kernel code, or, from a static call, to a
/// module on the module list. A hook written exactly over an alternative,
/// a return thunk or a static call is found here.
fn patch_site_branches(base: &Baseline, run: &[u8], slide: u64, owners: &Owners, r: &mut Report) {
    for site in &base.branch_sites {
        let o = (site.addr - base.text_start) as usize;
        let len = usize::from(site.len);
        let (Some(now), Some(image)) = (run.get(o..o + len), base.text.get(o..o + len)) else {
            continue;
        };
        r.coverage.patch_sites += 1;
        if now == image {
            continue;
        }
        let window = run.get(o..(o + 16).min(run.len())).unwrap_or_default();
        let Some((_, dest)) = crate::compare::decode_transfer(window, site.addr + slide) else {
            continue;
        };
        let owner = owners.owner(base, dest);
        let allowed = match &owner {
            Owner::Kernel { .. } => true,
            Owner::Module { hidden, .. } => site.static_call && !hidden,
            Owner::Unknown => false,
        };
        if allowed {
            continue;
        }
        r.findings.push(Finding {
            check: Check::InlineHook,
            object: format!("{} (patch site)", symbol_at(base, site.addr)),
            location: site.addr + slide,
            expected: None,
            actual: Some(owners.target(base, dest)),
            module: owners.module_of(base, dest),
            detail: format!("image {} now {}", hex(image), hex(now)),
        });
    }
}

/// `.rodata` (ops tables, syscall tables...) against the image: it must be
/// identical up to the KASLR slide. `__ro_after_init` data is written during
/// boot, so there only pointers into module memory are reported.
pub fn rodata(base: &Baseline, guest: &LinuxGuest, owners: &Owners, r: &mut Report) {
    let slide = guest.location().virtual_slide;
    let (run, bad) = read_range(guest, base.rodata_start + slide, base.rodata.len());
    if bad > 0 {
        r.warnings.push(format!("rodata: {bad} unreadable pages"));
    }
    let mut skip: Vec<(u64, u64)> = vec![base.ro_after_init];
    // Syscall tables have their own, better-named check.
    for t in &base.syscall_tables {
        skip.push((t.addr, t.addr + t.entries.len() as u64 * 8));
    }
    r.coverage.rodata_pointers = (base.rodata.len() / 8) as u64;
    let regions = unexplained(&base.rodata, &run, base.rodata_start, slide, None, &skip);
    let mut words = BTreeSet::new();
    for reg in regions {
        let mut w = reg.start & !7;
        while w < reg.end && words.len() < crate::compare::MAX_REGIONS {
            words.insert(w);
            w += 8;
        }
    }
    let (ra_lo, ra_hi) = base.ro_after_init;
    for w in (ra_lo & !7..ra_hi).step_by(8) {
        let off = (w - base.rodata_start) as usize;
        // Only slots the image initialised with a code pointer: boot code
        // legitimately stores module-area addresses elsewhere (execmem_info).
        let v = read_u64(&run, off);
        let img = read_u64(&base.rodata, off);
        if (MODULES_VADDR..MODULES_END).contains(&v) && base.in_text(img) {
            words.insert(w);
        }
    }
    for w in words {
        let off = (w - base.rodata_start) as usize;
        let img = read_u64(&base.rodata, off);
        let now = read_u64(&run, off);
        let expected = if img == 0 { 0 } else { img.wrapping_add(slide) };
        r.findings.push(Finding {
            check: Check::OpsPointer,
            object: symbol_at(base, w),
            location: w + slide,
            expected: Some(owners.target(base, expected)),
            actual: Some(owners.target(base, now)),
            module: owners.module_of(base, now),
            detail: String::new(),
        });
    }
}

/// Pointers in kernel data objects rootkits swap (see `Baseline::data_slots`).
pub fn data_slots(base: &Baseline, guest: &LinuxGuest, owners: &Owners, r: &mut Report) {
    let slide = guest.location().virtual_slide;
    let k = guest.kernel_space();
    for s in &base.data_slots {
        r.coverage.data_pointers += 1;
        let Ok(now) = k.read_u64(s.addr + slide) else {
            r.warnings.push(format!("{}: unreadable", s.name));
            continue;
        };
        let want = s.value + slide;
        if now != want {
            r.findings.push(Finding {
                check: Check::DataPointer,
                object: s.name.clone(),
                location: s.addr + slide,
                expected: Some(owners.target(base, want)),
                actual: Some(owners.target(base, now)),
                module: owners.module_of(base, now),
                detail: String::new(),
            });
        }
    }
}

/// The IDT: every present gate's handler is the one the image installs for
/// that vector, or one of the generic IRQ stubs; and, when the CPU's IDT
/// register is known, it maps the kernel's `idt_table`.
pub fn idt(base: &Baseline, guest: &LinuxGuest, owners: &Owners, idtr: &[u64], r: &mut Report) {
    let slide = guest.location().virtual_slide;
    let Some(table) = base.profile.symbols.address_of("idt_table") else {
        r.warnings.push("idt: no idt_table symbol".into());
        return;
    };
    let table = table + slide;
    let k = guest.kernel_space();
    let (run, bad) = read_range(guest, table, 256 * 16);
    if bad > 0 {
        r.warnings.push("idt: idt_table unreadable".into());
        return;
    }
    for (v, g) in run.chunks_exact(16).enumerate() {
        if g[5] & 0x80 == 0 {
            continue;
        }
        r.coverage.idt_gates += 1;
        let handler = u64::from(u16::from_le_bytes([g[0], g[1]]))
            | u64::from(u16::from_le_bytes([g[6], g[7]])) << 16
            | u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]])) << 32;
        let link = handler.wrapping_sub(slide);
        let named = &base.idt_expected[v];
        let early = v < 32
            && base
                .early_idt_handlers
                .is_some_and(|(s, e)| (s..e).contains(&link));
        let ok = named.contains(&link)
            || early
            || (named.is_empty() && base.irq_stubs.iter().any(|&(s, e)| (s..e).contains(&link)));
        if !ok {
            let expected = named.last().map(|&w| owners.target(base, w + slide));
            r.findings.push(Finding {
                check: Check::Idt,
                object: format!("IDT vector {v:#04x}"),
                location: table + v as u64 * 16,
                expected,
                actual: Some(owners.target(base, handler)),
                module: owners.module_of(base, handler),
                detail: String::new(),
            });
        }
    }
    let table_pa = k.translate(table).map(|t| t.pa).ok();
    for (cpu, &base_va) in idtr.iter().enumerate() {
        let pa = k.translate(base_va).map(|t| t.pa).ok();
        if pa.is_none() || pa != table_pa {
            r.findings.push(Finding {
                check: Check::Idt,
                object: format!("IDT register of CPU {cpu}"),
                location: base_va,
                expected: Some(owners.target(base, table)),
                actual: Some(owners.target(base, base_va)),
                module: owners.module_of(base, base_va),
                detail: "the CPU's IDT is not the kernel's idt_table".into(),
            });
        }
    }
}

/// Where ftrace's call sites may legitimately call (run-time): its
/// callers in core text and the trampolines of registered ftrace ops.
pub fn ftrace_targets(base: &Baseline, guest: &LinuxGuest) -> Vec<u64> {
    let slide = guest.location().virtual_slide;
    let mut out: Vec<u64> = ["ftrace_caller", "ftrace_regs_caller"]
        .iter()
        .filter_map(|n| base.profile.symbols.address_of(n))
        .map(|a| a + slide)
        .collect();
    let o = &base.offsets;
    let (Some(next_off), Some(tramp_off)) = (o.ftrace_ops_next, o.ftrace_ops_trampoline) else {
        return out;
    };
    let (Ok(list), Ok(end)) = (
        guest.symbol("ftrace_ops_list"),
        guest.symbol("ftrace_list_end"),
    ) else {
        return out;
    };
    let k = guest.kernel_space();
    let mut ops = k.read_u64(list).unwrap_or(0);
    for _ in 0..MAX_FTRACE_OPS {
        if ops == end || ops == 0 {
            break;
        }
        if let Ok(t) = k.read_u64(ops + tramp_off) {
            if t != 0 {
                out.push(t);
            }
        }
        ops = k.read_u64(ops + next_off).unwrap_or(0);
    }
    out
}

/// The `syscall` instruction's kernel entry (LSTAR, as the plugin observed
/// it) must be `entry_SYSCALL_64`.
pub fn syscall_entry(
    base: &Baseline,
    guest: &LinuxGuest,
    owners: &Owners,
    seen: Option<(u64, u64)>,
    r: &mut Report,
) {
    let Some((addr, samples)) = seen else {
        return;
    };
    let Some(want) = base.profile.symbols.address_of("entry_SYSCALL_64") else {
        r.warnings
            .push("syscall entry: no entry_SYSCALL_64 symbol".into());
        return;
    };
    r.coverage.syscall_entry_samples = samples;
    let want = want + guest.location().virtual_slide;
    if addr != want {
        r.findings.push(Finding {
            check: Check::SyscallEntry,
            object: "syscall entry (LSTAR)".into(),
            location: addr,
            expected: Some(owners.target(base, want)),
            actual: Some(owners.target(base, addr)),
            module: owners.module_of(base, addr),
            detail: format!("last of {samples} samples of where `syscall` entered the kernel"),
        });
    }
}

/// What the kernel itself writes to each syscall-entry MSR (`syscall_init`
/// / `idt_syscall_init`): any of these symbols, or 0 where the kernel
/// disables the path (no ia32 emulation).
fn entry_msr_targets(msr: EntryMsr) -> &'static [&'static str] {
    match msr {
        EntryMsr::Lstar => &["entry_SYSCALL_64"],
        EntryMsr::Cstar => &[
            "entry_SYSCALL_compat",
            // No ia32 emulation: 6.1 points it at a `sysret`, 6.12 at a stub.
            "ignore_sysret",
            "entry_SYSCALL32_ignore",
        ],
        EntryMsr::SysenterEip => &["entry_SYSENTER_compat"],
    }
}

/// The syscall-entry MSRs as the hook plugin saw the guest write them (every
/// kernel `wrmsr` is instrumented), per vCPU: LSTAR must hold
/// `entry_SYSCALL_64`, CSTAR and SYSENTER_EIP the kernel's compat entries.
/// A finding names the value, its owner and the `wrmsr` that last wrote it.
pub fn entry_msrs(
    base: &Baseline,
    guest: &LinuxGuest,
    owners: &Owners,
    msrs: &EntryMsrs,
    r: &mut Report,
) {
    r.coverage.entry_msr_writes = msrs.writes;
    let slide = guest.location().virtual_slide;
    for (cpu, msr, value) in msrs.observed() {
        let wants: Vec<u64> = entry_msr_targets(msr)
            .iter()
            .filter_map(|s| base.profile.symbols.address_of(s))
            .map(|a| a + slide)
            .collect();
        let Some(&want) = wants.first() else {
            r.warnings
                .push(format!("{}: no kernel symbol to compare with", msr.name()));
            continue;
        };
        if wants.contains(&value) {
            continue;
        }
        let cpus = if cpu + 1 == events::MSR_VCPU_SLOTS {
            format!("vCPU {cpu} or later")
        } else {
            format!("vCPU {cpu}")
        };
        let caller = msrs.last_caller[msr.slot()];
        let detail = match msrs.last_writer(msr) {
            // The kernel's own MSR accessor: name who called it.
            Some(w)
                if owners.module_of(base, w).is_none()
                    && owners.module_of(base, caller).is_some() =>
            {
                format!(
                    "last written by `wrmsr` at {}, called from {}",
                    owners.target(base, w),
                    owners.target(base, caller)
                )
            }
            Some(w) => format!("last written by `wrmsr` at {}", owners.target(base, w)),
            None => String::new(),
        };
        r.findings.push(Finding {
            check: Check::SyscallEntry,
            object: format!("{} of {cpus}", msr.name()),
            location: value,
            expected: Some(owners.target(base, want)),
            actual: Some(owners.target(base, value)),
            module: owners.module_of(base, value),
            detail,
        });
    }
}

/// Bound on ftrace ops walked and on functions listed per ops.
const MAX_FTRACE_OPS: usize = 4096;
const MAX_FILTER_IPS: usize = 64;

/// ftrace ops whose callback is not core kernel code: a module hooking
/// functions through ftrace. Names the functions from the ops' filter hash.
pub fn ftrace(base: &Baseline, guest: &LinuxGuest, owners: &Owners, r: &mut Report) {
    let o = &base.offsets;
    let (Some(next_off), Some(func_off)) = (o.ftrace_ops_next, o.ftrace_ops_func) else {
        r.warnings
            .push("ftrace: this kernel's BTF lacks ftrace_ops".into());
        return;
    };
    let (Ok(list), Ok(end)) = (
        guest.symbol("ftrace_ops_list"),
        guest.symbol("ftrace_list_end"),
    ) else {
        r.warnings.push("ftrace: no ftrace_ops_list symbol".into());
        return;
    };
    let k = guest.kernel_space();
    let mut ops = match k.read_u64(list) {
        Ok(v) => v,
        Err(e) => {
            r.warnings.push(format!("ftrace: {e}"));
            return;
        }
    };
    let mut seen = 0;
    while ops != end && ops != 0 {
        seen += 1;
        if seen > MAX_FTRACE_OPS {
            r.warnings.push(format!(
                "ftrace: more than {MAX_FTRACE_OPS} ops; list corrupted?"
            ));
            break;
        }
        r.coverage.ftrace_ops += 1;
        let func = k.read_u64(ops + func_off).unwrap_or(0);
        let ops_owner = owners.owner(base, ops);
        let hooker_is_kernel =
            owners.in_core_text(base, func) && matches!(ops_owner, Owner::Kernel { .. });
        if !hooker_is_kernel {
            let hooked = filter_functions(base, guest, ops, owners);
            let what = if hooked.is_empty() {
                "every function".to_string()
            } else {
                hooked.join(", ")
            };
            r.findings.push(Finding {
                check: Check::Ftrace,
                object: format!("ftrace ops at {ops:#x} on {what}"),
                location: ops,
                expected: None,
                actual: Some(owners.target(base, func)),
                module: owners
                    .module_of(base, func)
                    .or_else(|| owners.module_of(base, ops)),
                detail: String::new(),
            });
        }
        ops = match k.read_u64(ops + next_off) {
            Ok(v) => v,
            Err(e) => {
                r.warnings.push(format!("ftrace: {e}"));
                break;
            }
        };
    }
}

/// Functions in an ops' filter hash (`func_hash->filter_hash`), by name.
fn filter_functions(base: &Baseline, guest: &LinuxGuest, ops: u64, owners: &Owners) -> Vec<String> {
    let o = &base.offsets;
    let (Some(fh), Some(filt), Some(bits), Some(buckets), Some(ip_off)) = (
        o.ftrace_ops_func_hash,
        o.ops_hash_filter,
        o.hash_size_bits,
        o.hash_buckets,
        o.func_entry_ip,
    ) else {
        return Vec::new();
    };
    let k = guest.kernel_space();
    let mut out = Vec::new();
    let Ok(func_hash) = k.read_u64(ops + fh) else {
        return out;
    };
    let Ok(hash) = k.read_u64(func_hash + filt) else {
        return out;
    };
    if hash == 0 {
        return out;
    }
    let size_bits = k.read_u64(hash + bits).unwrap_or(0).min(12);
    let Ok(table) = k.read_u64(hash + buckets) else {
        return out;
    };
    for b in 0..(1u64 << size_bits) {
        let mut node = k.read_u64(table + b * 8).unwrap_or(0);
        let mut steps = 0;
        while node != 0 && steps < MAX_FILTER_IPS && out.len() < MAX_FILTER_IPS {
            steps += 1;
            if let Ok(ip) = k.read_u64(node + ip_off) {
                out.push(owners.owner(base, ip).to_string());
            }
            node = k.read_u64(node).unwrap_or(0);
        }
    }
    out
}

/// Bounds on the pid namespace walk.
const MAX_XA_NODES: usize = 1 << 16;
const MAX_PIDS: usize = 1 << 20;

/// Processes the pid namespace knows (init_pid_ns's IDR, what /proc and
/// kill(2) use) but the task list does not: unlinked from `tasks` to hide.
pub fn hidden_processes(base: &Baseline, guest: &LinuxGuest, r: &mut Report) {
    let o = &base.offsets;
    let (
        Some(head_off),
        Some(shift_off),
        Some(slots_off),
        Some(tasks_off),
        Some(links_off),
        Some(nr_off),
    ) = (
        o.pidns_idr_head,
        o.xa_node_shift,
        o.xa_node_slots,
        o.pid_tasks,
        o.task_pid_links,
        o.pid_nr,
    )
    else {
        r.warnings
            .push("processes: this kernel's BTF lacks pid/idr/xarray".into());
        return;
    };
    let k = guest.kernel_space();
    let Ok(ns) = guest.symbol("init_pid_ns") else {
        r.warnings.push("processes: no init_pid_ns symbol".into());
        return;
    };
    let listing = guest.processes();
    let listed: BTreeSet<u64> = listing.items.iter().map(|p| p.task).collect();
    r.coverage.tasks_listed = listed.len() as u64;

    // Depth-first over the xarray: internal entries are node pointers | 2.
    let mut pids = Vec::new();
    let mut stack = vec![k.read_u64(ns + head_off).unwrap_or(0)];
    let mut nodes = 0;
    while let Some(entry) = stack.pop() {
        if entry == 0 || pids.len() >= MAX_PIDS {
            continue;
        }
        if entry & 3 == 2 && entry > 4096 {
            nodes += 1;
            if nodes > MAX_XA_NODES {
                r.warnings
                    .push("processes: pid xarray too large; corrupted?".into());
                break;
            }
            let node = entry - 2;
            let _ = k.read_u8(node + shift_off);
            let mut slots = [0u8; 64 * 8];
            if k.read(node + slots_off, &mut slots).is_ok() {
                for s in slots.chunks_exact(8) {
                    stack.push(u64::from_le_bytes(s.try_into().unwrap_or_default()));
                }
            }
        } else if entry & 3 == 0 {
            pids.push(entry);
        }
    }
    r.coverage.pids_in_namespace = pids.len() as u64;
    let l = &guest.profile().layout;
    // Candidates: thread-group leader -> what shows it exists.
    let mut unlisted: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for pid in pids {
        let Ok(first) = k.read_u64(pid + tasks_off) else {
            continue;
        };
        if first == 0 {
            continue;
        }
        let task = first - links_off;
        let (Ok(p), Ok(tg)) = (
            k.read_u32(task + l.task_pid),
            k.read_u32(task + l.task_tgid),
        ) else {
            continue;
        };
        let nr = k.read_u32(pid + nr_off).unwrap_or(0);
        if p != tg || p != nr || p == 0 || listed.contains(&task) {
            continue;
        }
        unlisted
            .entry(task)
            .or_default()
            .push("in the pid namespace".into());
    }
    // What the scheduler holds: a process out of the pid namespace too
    // still runs, or waits to, on some CPU.
    let scheduled = runqueues::scheduled_tasks(base, guest, r);
    r.coverage.tasks_on_run_queues = scheduled.len() as u64;
    for s in &scheduled {
        let leader = match base.offsets.task_group_leader {
            Some(off) => k.read_u64(s.task + off).unwrap_or(s.task),
            None => s.task,
        };
        if listed.contains(&leader) || exiting(guest, leader) || exiting(guest, s.task) {
            continue;
        }
        let how = if s.running { "running" } else { "queued" };
        let why = format!("{how} on CPU {}", s.cpu);
        let seen = unlisted.entry(leader).or_default();
        if !seen.contains(&why) {
            seen.push(why);
        }
    }
    if unlisted.is_empty() {
        return;
    }
    // A process forked while this scan ran is on the list now: only what a
    // second look at the list still lacks is hidden.
    let listed_again: BTreeSet<u64> = guest.processes().items.iter().map(|p| p.task).collect();
    for (task, evidence) in unlisted {
        if listed_again.contains(&task) || exiting(guest, task) {
            continue;
        }
        let (tgid, comm) = guest.task_identity(task).unwrap_or((0, "?".into()));
        r.findings.push(Finding {
            check: Check::HiddenProcess,
            object: format!("process {tgid} {comm}"),
            location: task,
            expected: None,
            actual: None,
            module: None,
            detail: format!("not on the task list, yet {}", evidence.join(", ")),
        });
    }
}

/// A task on its way out: `exit_state` set or `PF_EXITING`. It leaves the
/// task list and the pid namespace before it last leaves the CPU.
fn exiting(guest: &LinuxGuest, task: u64) -> bool {
    const PF_EXITING: u32 = 0x4;
    let l = &guest.profile().layout;
    let k = guest.kernel_space();
    k.read_u32(task + l.task_exit_state).is_ok_and(|s| s != 0)
        || k.read_u32(task + l.task_flags)
            .is_ok_and(|f| f & PF_EXITING != 0)
}
