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
        let vm = lab::Vm::open(name)?;
        match vm.qmp().and_then(|mut q| q.idt_bases()) {
            Ok(b) => cpus.idt_bases = b,
            Err(e) => {
                eprintln!("vmwatch: warning: IDT registers not read ({e}); scanning memory only")
            }
        }
        // Where `syscall` enters the kernel and what the guest wrote to the
        // entry MSRs, as the hook plugin saw it.
        match vm.info().ring.as_deref() {
            Some(ring) => match (events::peek_syscall_entry(ring), events::peek_entry_msrs(ring)) {
                (Ok(seen), Ok(msrs)) => {
                    cpus.syscall_entry = seen;
                    cpus.entry_msrs = Some(msrs);
                }
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("vmwatch: warning: syscall entry MSRs not read ({e})")
                }
            },
            None => eprintln!(
                "vmwatch: warning: the VM runs without the hook plugin: the syscall entry MSRs (LSTAR, CSTAR, SYSENTER_EIP) are not checked"
            ),
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
            "{} finding(s) in {:.1} ms: {} syscall entries, {} dispatcher calls, {} KiB of text ({} KiB patchable), {} KiB of rodata, {} IDT gates, syscall entry {} samples / {} MSR writes, {} ftrace ops, modules {} listed / {} in sysfs / {} in memory, processes {} listed / {} pids / {} on run queues",
            report.findings.len(),
            report.elapsed_us as f64 / 1000.0,
            c.syscall_entries,
            c.dispatch_calls,
            c.text_bytes / 1024,
            c.text_bytes_patchable / 1024,
            c.rodata_pointers * 8 / 1024,
            c.idt_gates,
            c.syscall_entry_samples,
            c.entry_msr_writes,
            c.ftrace_ops,
            c.modules_listed,
            c.modules_in_sysfs,
            c.modules_in_memory,
            c.tasks_listed,
            c.pids_in_namespace,
            c.tasks_on_run_queues,
        )?;
    }
    Ok(!report.findings.is_empty())
}

/// `vmwatch alerts`: the daemon's continuous-scan alerts.
#[derive(Args, Debug)]
pub struct AlertsArgs {
    /// Only this VM.
    #[arg(long)]
    pub vm: Option<String>,
    /// Keep waiting for new alerts.
    #[arg(long, short)]
    pub follow: bool,
    /// Only alerts after this sequence number (see --json).
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// One JSON object per alert.
    #[arg(long)]
    pub json: bool,
}

pub fn alerts(args: &AlertsArgs) -> Result<()> {
    let c = crate::diffusion_cmd::client()?;
    let mut since = args.since;
    let mut out = std::io::stdout().lock();
    loop {
        let mut q = format!("/v1/integrity/alerts?since={since}");
        if let Some(vm) = &args.vm {
            q.push_str(&format!(
                "&vm={}",
                crate::trace_cmd::daemon_client::encode_query(vm)
            ));
        }
        if args.follow {
            q.push_str("&wait=20");
        }
        let r = c.call("GET", &q, None)?;
        for a in r.as_array().into_iter().flatten() {
            since = since.max(a["seq"].as_u64().unwrap_or(0));
            if args.json {
                writeln!(out, "{a}")?;
                continue;
            }
            let f = &a["finding"];
            let target = |t: &serde_json::Value| -> String {
                if t.is_null() {
                    return String::new();
                }
                let owner = &t["owner"];
                let who = match owner["kind"].as_str() {
                    Some("kernel") => owner["symbol"].as_str().unwrap_or("?").to_string(),
                    Some("module") => match owner["symbol"].as_str() {
                        Some(sym) => format!("{sym} [{}]", owner["name"].as_str().unwrap_or("?")),
                        None => format!("[{}]", owner["name"].as_str().unwrap_or("?")),
                    },
                    _ => "unknown memory".into(),
                };
                format!("{:#x} {who}", t["addr"].as_u64().unwrap_or(0))
            };
            let ms = a["unix_ms"].as_u64().unwrap_or(0);
            let when = humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            );
            writeln!(
                out,
                "{when} {} {} {:<16} {}  expected {}  actual {}  module {}",
                a["vm"].as_str().unwrap_or("?"),
                if a["change"] == "new" { "+" } else { "-" },
                f["check"].as_str().unwrap_or("?"),
                f["object"].as_str().unwrap_or("?"),
                target(&f["expected"]),
                target(&f["actual"]),
                f["module"].as_str().unwrap_or("-"),
            )?;
        }
        out.flush()?;
        if !args.follow {
            return Ok(());
        }
    }
}
