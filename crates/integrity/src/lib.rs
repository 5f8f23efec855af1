//! Kernel integrity checks of a running Linux guest against its kernel image
//! (paper 003's detection side), read from guest memory without pausing it.
//!
//! A [`Baseline`] is computed once per kernel build from the image: text and
//! rodata bytes, where the kernel patches itself (`patchsites`), the syscall
//! tables, the IDT handlers, and BTF offsets. [`scan`] then compares a guest
//! with it: syscall tables, `x64_sys_call`'s calls, core text (inline hooks),
//! rodata ops tables, /proc's root entry, the IDT, ftrace ops, modules hidden
//! from the module list, processes hidden from the task list (found in the pid
//! namespace or on a CPU's run queue). Every finding
//! names the hooked object, the expected and the actual target, and the
//! module that owns the actual target, hidden or not.

mod baseline;
mod checks;
pub mod compare;
mod findings;
mod modules;
mod patchsites;
mod procnet;
mod runqueues;

use std::time::Instant;

use vmi::linux::LinuxGuest;

pub use baseline::{Baseline, BaselineError, SyscallTable};
pub use findings::{Check, Coverage, Finding, Owner, Report, Target};
pub use modules::{ModuleInfo, Owners};
pub use patchsites::Intervals;
pub use runqueues::Scheduled;

/// What the caller knows about the CPUs besides memory.
#[derive(Debug, Clone, Default)]
pub struct CpuState {
    /// Each vCPU's IDT base (from the monitor); empty when unknown.
    pub idt_bases: Vec<u64>,
    /// Where the guest's `syscall` instruction was last seen entering the
    /// kernel (the LSTAR MSR, observed by the hook plugin) and the number of
    /// samples; `None` when unknown (no plugin).
    pub syscall_entry: Option<(u64, u64)>,
    /// The syscall-entry MSRs (LSTAR, CSTAR, SYSENTER_EIP) per vCPU as the
    /// hook plugin saw the guest write them; `None` when unknown (no plugin).
    pub entry_msrs: Option<events::EntryMsrs>,
}

/// Runs every check on `guest` once.
pub fn scan(base: &Baseline, guest: &LinuxGuest, cpus: &CpuState) -> Report {
    let started = Instant::now();
    // A live guest changes its page tables: no stale translations across scans.
    guest.refresh();
    let mut r = Report::default();
    let owners = Owners::discover(base, guest, &mut r);
    checks::syscall_tables(base, guest, &owners, &mut r);
    let ftrace_targets = checks::ftrace_targets(base, guest);
    checks::kernel_text(base, guest, &owners, &ftrace_targets, &mut r);
    checks::rodata(base, guest, &owners, &mut r);
    checks::data_slots(base, guest, &owners, &mut r);
    procnet::proc_net_ops(base, guest, &owners, &mut r);
    checks::idt(base, guest, &owners, &cpus.idt_bases, &mut r);
    checks::syscall_entry(base, guest, &owners, cpus.syscall_entry, &mut r);
    if let Some(msrs) = &cpus.entry_msrs {
        checks::entry_msrs(base, guest, &owners, msrs, &mut r);
    }
    checks::ftrace(base, guest, &owners, &mut r);
    checks::hidden_processes(base, guest, &mut r);
    r.findings.sort_by_key(|f| (f.check, f.location));
    r.elapsed_us = started.elapsed().as_micros() as u64;
    r
}
