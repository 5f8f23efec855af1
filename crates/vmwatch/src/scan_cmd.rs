//! `vmwatch scan`: kernel integrity checks of a running lab VM (or a dump)
//! against its kernel image, without pausing the guest.

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use integrity::{Baseline, CpuState};

use crate::inspect_cmd::Target;

#[derive(Args, Debug)]
pub struct ScanArgs {
    #[command(flatten)]
    pub target: Target,
}

/// Exit status when the scan found something (0: clean, 1: error).
pub const EXIT_FINDINGS: i32 = 2;

/// Runs one scan; returns whether anything was found.
pub fn run(args: &ScanArgs) -> Result<bool> {
    let (guest, image) = args.target.attach_with_image()?;
    let base = Baseline::new(&image, Arc::clone(guest.profile_arc()))
        .context("building the integrity baseline from the kernel image")?;
    let mut cpus = CpuState::default();
    if let Some(name) = &args.target.vm {
        // The IDT register is CPU state, not memory: ask the monitor. A VM
        // whose monitor does not answer is still scanned (with a warning).
        match lab::Vm::open(name).and_then(|vm| vm.qmp()?.idt_bases()) {
            Ok(b) => cpus.idt_bases = b,
            Err(e) => {
                eprintln!("vmwatch: warning: IDT registers not read ({e}); scanning memory only")
            }
        }
    }
    let report = integrity::scan(&base, &guest, &cpus);
    let mut out = std::io::stdout().lock();
    if args.target.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        for f in &report.findings {
            writeln!(out, "{f}")?;
        }
        let c = &report.coverage;
        writeln!(
            out,
            "{} finding(s) in {:.1} ms: {} syscall entries, {} dispatcher calls, {} KiB of text ({} KiB patchable), {} KiB of rodata, {} IDT gates, {} ftrace ops, modules {} listed / {} in sysfs / {} in memory, processes {} listed / {} pids",
            report.findings.len(),
            report.elapsed_us as f64 / 1000.0,
            c.syscall_entries,
            c.dispatch_calls,
            c.text_bytes / 1024,
            c.text_bytes_patchable / 1024,
            c.rodata_pointers * 8 / 1024,
            c.idt_gates,
            c.ftrace_ops,
            c.modules_listed,
            c.modules_in_sysfs,
            c.modules_in_memory,
            c.tasks_listed,
            c.pids_in_namespace,
        )?;
    }
    Ok(!report.findings.is_empty())
}
