//! Continuous rootkit detection inside the daemon (issue 6): every watched
//! lab VM gets a scanner thread that runs [`integrity::scan`] at a fixed
//! interval over the guest's shared RAM (the guest is never paused), and
//! turns changes in the set of findings into alerts: `new` when a finding
//! appears, `gone` when it disappears. Alerts go to the daemon's log and to
//! `GET /v1/integrity/alerts`; the last report of each VM is at
//! `GET /v1/vms/{name}/integrity`.
//!
//! A scan runs on its own thread, not the VM's pump thread: it reads tens
//! of MiB and must not hold up the event ring. Baselines (computed from the
//! kernel image, ~30 MiB each) are shared by every VM running that kernel.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integrity::{Baseline, CpuState, Finding, Report};
use serde::Serialize;

use crate::engine::{Engine, VmContext};

/// Alerts kept for the API (oldest dropped first).
const MAX_ALERTS: usize = 4096;
/// How often the IDT registers are asked from QEMU's monitor (a monitor
/// command is heavier than a memory read, and the monitor is shared).
const IDTR_EVERY: Duration = Duration::from_secs(30);

/// One change in a VM's findings.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    /// Increasing across all VMs, for `?since=`.
    pub seq: u64,
    pub unix_ms: u64,
    pub vm: String,
    pub uuid: String,
    /// `new` or `gone`.
    pub change: &'static str,
    pub finding: Finding,
    /// Milliseconds from the start of the scan that saw the change to the alert.
    pub scan_ms: u64,
}

/// What the API shows for one VM.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VmIntegrity {
    pub scans: u64,
    pub interval_ms: u64,
    pub last_scan_unix_ms: u64,
    pub last_report: Option<Report>,
    pub error: Option<String>,
}

/// Shared by the scanner threads and the API.
pub struct IntegrityService {
    interval: Duration,
    baselines: Mutex<HashMap<PathBuf, Arc<Baseline>>>,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    vms: BTreeMap<String, VmIntegrity>,
    alerts: VecDeque<Alert>,
    next_seq: u64,
}

impl IntegrityService {
    /// `interval` zero: no continuous scanning.
    pub fn new(interval: Duration) -> Arc<IntegrityService> {
        Arc::new(IntegrityService {
            interval,
            baselines: Mutex::default(),
            state: Mutex::default(),
            changed: Condvar::new(),
        })
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The last report of a VM.
    pub fn vm(&self, name: &str) -> Option<VmIntegrity> {
        lock(&self.state).vms.get(name).cloned()
    }

    /// Alerts after `since` (a seq), of one VM or all, oldest first.
    pub fn alerts(&self, since: u64, vm: Option<&str>) -> Vec<Alert> {
        lock(&self.state)
            .alerts
            .iter()
            .filter(|a| a.seq > since && vm.is_none_or(|v| v == a.vm))
            .cloned()
            .collect()
    }

    /// Waits up to `timeout` for an alert after `since`.
    pub fn wait_alerts(&self, since: u64, vm: Option<&str>, timeout: Duration) -> Vec<Alert> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        loop {
            let out: Vec<Alert> = st
                .alerts
                .iter()
                .filter(|a| a.seq > since && vm.is_none_or(|v| v == a.vm))
                .cloned()
                .collect();
            let now = Instant::now();
            if !out.is_empty() || now >= deadline {
                return out;
            }
            st = match self.changed.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// The baseline of a kernel image, built once.
    fn baseline(
        &self,
        guest: &vmi::linux::LinuxGuest,
        vmlinux: &PathBuf,
    ) -> Result<Arc<Baseline>, String> {
        if let Some(b) = lock(&self.baselines).get(vmlinux) {
            return Ok(Arc::clone(b));
        }
        let image = vmi::image::KernelImage::open(vmlinux).map_err(|e| e.to_string())?;
        let b = Arc::new(
            Baseline::new(&image, Arc::clone(guest.profile_arc())).map_err(|e| e.to_string())?,
        );
        lock(&self.baselines).insert(vmlinux.clone(), Arc::clone(&b));
        Ok(b)
    }

    /// Records a scan's report and turns the difference into alerts.
    fn record(
        &self,
        ctx: &VmContext,
        report: Report,
        started: SystemTime,
        prev: &mut Vec<Finding>,
    ) {
        let key = |f: &Finding| (f.check, f.object.clone(), f.location);
        let now_ms = unix_ms(SystemTime::now());
        let scan_ms = SystemTime::now()
            .duration_since(started)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut changes = Vec::new();
        for f in &report.findings {
            if !prev.iter().any(|p| key(p) == key(f)) {
                changes.push(("new", f.clone()));
            }
        }
        for p in prev.iter() {
            if !report.findings.iter().any(|f| key(f) == key(p)) {
                changes.push(("gone", p.clone()));
            }
        }
        *prev = report.findings.clone();
        let mut st = lock(&self.state);
        for (change, finding) in changes {
            if change == "new" {
                tracing::warn!(vm = %ctx.name, "integrity: {finding}");
            } else {
                tracing::info!(vm = %ctx.name, "integrity: gone: {finding}");
            }
            st.next_seq += 1;
            let seq = st.next_seq;
            if st.alerts.len() >= MAX_ALERTS {
                st.alerts.pop_front();
            }
            st.alerts.push_back(Alert {
                seq,
                unix_ms: now_ms,
                vm: ctx.name.clone(),
                uuid: ctx.uuid.clone(),
                change,
                finding,
                scan_ms,
            });
        }
        let e = st.vms.entry(ctx.name.clone()).or_default();
        e.scans += 1;
        e.interval_ms = self.interval.as_millis() as u64;
        e.last_scan_unix_ms = unix_ms(started);
        e.last_report = Some(report);
        e.error = None;
        drop(st);
        self.changed.notify_all();
    }

    fn record_error(&self, ctx: &VmContext, error: String) {
        let mut st = lock(&self.state);
        let e = st.vms.entry(ctx.name.clone()).or_default();
        if e.error.as_deref() != Some(&error) {
            tracing::warn!(vm = %ctx.name, "integrity scan: {error}");
        }
        e.error = Some(error);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The per-VM engine: owns the scanner thread, needs no records.
pub struct IntegrityVmEngine {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl IntegrityVmEngine {
    pub fn new(svc: Arc<IntegrityService>, ctx: &VmContext) -> IntegrityVmEngine {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = if svc.interval.is_zero() || ctx.lab.is_none() {
            None
        } else {
            let ctx = ctx.clone();
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("scan-{}", ctx.name))
                .spawn(move || scanner(svc, ctx, stop))
                .ok()
        };
        IntegrityVmEngine { stop, thread }
    }
}

impl Drop for IntegrityVmEngine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Engine for IntegrityVmEngine {
    fn name(&self) -> &'static str {
        "integrity"
    }

    fn on_record(&mut self, _vm: &VmContext, _rec: &events::Record, _now: Instant) {}

    fn on_vm_stopped(&mut self, _vm: &VmContext) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn scanner(svc: Arc<IntegrityService>, ctx: VmContext, stop: Arc<AtomicBool>) {
    let mut guest = None;
    let mut prev: Vec<Finding> = Vec::new();
    let mut cpus = CpuState::default();
    let mut idtr_at: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let started_at = Instant::now();
        let started = SystemTime::now();
        let vm = lab::Vm::open_in(&ctx.cache, &ctx.name);
        match vm {
            Err(e) => svc.record_error(&ctx, e.to_string()),
            Ok(vm) => {
                if guest.is_none() {
                    match crate::diffusion::open_guest(&vm) {
                        Ok(g) => guest = Some(g),
                        Err(e) => svc.record_error(&ctx, e),
                    }
                }
                if idtr_at.is_none_or(|t| t.elapsed() >= IDTR_EVERY) {
                    idtr_at = Some(Instant::now());
                    if let Ok(b) = vm.qmp().and_then(|mut q| q.idt_bases()) {
                        cpus.idt_bases = b;
                    }
                }
                if let Some(ring) = vm.info().ring.as_deref() {
                    cpus.syscall_entry = events::peek_syscall_entry(ring).ok().flatten();
                    cpus.entry_msrs = events::peek_entry_msrs(ring).ok();
                }
                if let Some(g) = &guest {
                    match svc.baseline(g, &vm.info().vmlinux) {
                        Ok(base) => {
                            let report = integrity::scan(&base, g, &cpus);
                            svc.record(&ctx, report, started, &mut prev);
                        }
                        Err(e) => svc.record_error(&ctx, e),
                    }
                }
            }
        }
        // Sleep the rest of the interval in small steps, to stop promptly.
        while !stop.load(Ordering::Relaxed) && started_at.elapsed() < svc.interval {
            std::thread::sleep(Duration::from_millis(20).min(svc.interval));
        }
    }
}
