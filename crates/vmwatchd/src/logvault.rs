//! The log vault inside the daemon (issue 5): every watched VM's log
//! doorbells (syslog messages the guest library handed to the hypervisor,
//! `events::Kind::Log`) are joined from their slices, given the sender's
//! identity from guest RAM (exe, uid), checked (tag and pid against the
//! sending process), and appended to that VM's vault (`crates/logvault`)
//! under `<state dir>/vault/<vm>/`. The doorbell is on in every watched VM
//! whether or not anyone is looking: a vault that records only while
//! someone watches would be no vault.
//!
//! The per-process flood limit is applied in the plugin, before the ring
//! (a flooder must not fill the ring that carries the others' messages);
//! the daemon's own [`logvault::RateLimiter`] is a second line, per VM.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use events::payload::Item;
use events::{Filter, Kind, Record, FLAG_PAYLOAD_CUT, LOG_DOORBELL, LOG_MAX};
use logvault::{LogRecord, RateLimitConfig, RateLimiter, Signer, Vault, VaultConfig};
use serde::Serialize;

use crate::engine::{Engine, Interest, VmContext};
use crate::forward::Forwarder;

/// Doorbells being joined per VM at most (one per vCPU normally).
const MAX_PARTIAL: usize = 64;
/// How often a missing sender is looked up in guest RAM at most.
const IDENTITY_REFRESH: Duration = Duration::from_millis(100);
/// Senders remembered per VM.
const MAX_IDENTITIES: usize = 4096;

/// The daemon's second-line rate limit per process (the plugin's comes
/// first): generous, so a busy but honest program loses nothing.
pub fn default_rate() -> RateLimitConfig {
    RateLimitConfig {
        per_second: 1000,
        burst: 20_000,
        ..RateLimitConfig::default()
    }
}

/// Counters of one VM's vault, as the API shows them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VaultStats {
    pub stored: u64,
    /// Dropped by the daemon's rate limiter.
    pub rate_dropped: u64,
    /// Records whose syslog tag or pid does not match the sender.
    pub mismatched: u64,
    /// Messages the host had to cut (over 64 KiB, or unreadable guest memory).
    pub cut: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

/// Shared by every VM's vault engine.
pub struct VaultService {
    dir: PathBuf,
    signer: Signer,
    config: VaultConfig,
    rate: RateLimitConfig,
    stats: Mutex<HashMap<String, VaultStats>>,
    /// Copies of every stored record for a remote collector.
    forward: Option<Forwarder>,
}

impl VaultService {
    /// Vaults under `dir` (created 0700), the checkpoint key in `key`.
    pub fn open(
        dir: &Path,
        key: &Path,
        config: VaultConfig,
        rate: RateLimitConfig,
        forward: Option<Forwarder>,
    ) -> Result<Arc<VaultService>, logvault::VaultError> {
        let signer = Signer::load_or_create(key)?;
        Ok(Arc::new(VaultService {
            dir: dir.to_path_buf(),
            signer,
            config,
            rate,
            stats: Mutex::new(HashMap::new()),
            forward,
        }))
    }

    /// The forwarder's target and counters, if forwarding is on.
    pub fn forward_stats(&self) -> Option<serde_json::Value> {
        let f = self.forward.as_ref()?;
        Some(serde_json::json!({
            "target": f.target,
            "sent": f.stats.sent.load(std::sync::atomic::Ordering::Relaxed),
            "dropped": f.stats.dropped.load(std::sync::atomic::Ordering::Relaxed),
            "reconnects": f.stats.reconnects.load(std::sync::atomic::Ordering::Relaxed),
            "tls_failures": f.stats.tls_failures.load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn stats(&self) -> HashMap<String, VaultStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, vm: &str, f: impl FnOnce(&mut VaultStats)) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        f(s.entry(vm.to_string()).or_default());
    }
}

struct Partial {
    id: u64,
    first: Record,
    comm: String,
    want: usize,
    bytes: Vec<u8>,
    cut: bool,
}

struct Identity {
    exe: Option<String>,
    uid: Option<u32>,
}

/// One VM's vault writer, on its pump thread.
pub struct LogVaultEngine {
    svc: Arc<VaultService>,
    vault: Option<Vault>,
    limiter: RateLimiter,
    partial: HashMap<u32, Partial>,
    guest: Option<vmi::linux::LinuxGuest>,
    guest_tried: bool,
    identities: HashMap<u32, Identity>,
    last_lookup: Option<Instant>,
    /// Monotonic -> wall clock offset (records carry host CLOCK_MONOTONIC).
    wall_minus_mono: i64,
}

impl LogVaultEngine {
    pub fn new(svc: Arc<VaultService>, ctx: &VmContext) -> LogVaultEngine {
        let vault = match Vault::open(&svc.dir, &ctx.name, &svc.signer, svc.config.clone()) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!("{}: log vault not available: {e}", ctx.name);
                svc.update(&ctx.name, |s| {
                    s.errors += 1;
                    s.last_error = Some(e.to_string());
                });
                None
            }
        };
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        LogVaultEngine {
            limiter: RateLimiter::new(svc.rate),
            svc,
            vault,
            partial: HashMap::new(),
            guest: None,
            guest_tried: false,
            identities: HashMap::new(),
            last_lookup: None,
            wall_minus_mono: wall - events::now_ns() as i64,
        }
    }

    fn identity(&mut self, ctx: &VmContext, tgid: u32) -> (Option<String>, Option<u32>) {
        if let Some(i) = self.identities.get(&tgid) {
            return (i.exe.clone(), i.uid);
        }
        let now = Instant::now();
        if self.guest_tried
            && self
                .last_lookup
                .is_some_and(|t| now.duration_since(t) < IDENTITY_REFRESH)
        {
            return (None, None);
        }
        self.last_lookup = Some(now);
        if !self.guest_tried {
            self.guest_tried = true;
            if ctx.lab.is_some() {
                match lab::Vm::open_in(&ctx.cache, &ctx.name)
                    .map_err(|e| e.to_string())
                    .and_then(|v| crate::diffusion::open_guest(&v))
                {
                    Ok(g) => self.guest = Some(g),
                    Err(e) => tracing::warn!("{}: vault records without exe/uid: {e}", ctx.name),
                }
            }
        }
        let Some(g) = &self.guest else {
            return (None, None);
        };
        if self.identities.len() >= MAX_IDENTITIES {
            self.identities.clear();
        }
        for p in g.processes().items {
            if let Ok(t) = u32::try_from(p.tgid) {
                self.identities.insert(
                    t,
                    Identity {
                        exe: p.exe.clone(),
                        uid: Some(p.uid),
                    },
                );
            }
        }
        self.identities
            .get(&tgid)
            .map_or((None, None), |i| (i.exe.clone(), i.uid))
    }

    fn finish(&mut self, ctx: &VmContext, p: Partial) {
        let r = &p.first;
        let (exe, uid) = self.identity(ctx, r.tgid);
        let mut flags = 0;
        if p.cut || p.bytes.len() < p.want {
            flags |= logvault::FLAG_CUT;
        }
        let header = logvault::parse_syslog(&p.bytes);
        if header.body.starts_with(b"[part ") {
            flags |= logvault::FLAG_PART;
        }
        if r.has_task() && !logvault::check_identity(&p.bytes, r.tgid, &p.comm) {
            flags |= logvault::FLAG_TAG_MISMATCH;
        }
        match self.limiter.check(&ctx.name, r.tgid, Instant::now()) {
            logvault::Decision::Accept { dropped_before } => {
                if dropped_before > 0 || r.args[4] > 0 {
                    flags |= logvault::FLAG_RATE_LIMITED_BEFORE;
                }
            }
            logvault::Decision::Drop | logvault::Decision::Refused => {
                self.svc.update(&ctx.name, |s| s.rate_dropped += 1);
                return;
            }
        }
        let rec = LogRecord {
            vm: ctx.name.clone(),
            vm_uuid: ctx.uuid.clone(),
            time_ns: r.time_ns as i64 + self.wall_minus_mono,
            vcpu: r.vcpu,
            cr3: r.cr3,
            pid: r.pid,
            tgid: r.tgid,
            comm: p.comm,
            exe,
            uid,
            flags,
            message: p.bytes,
        };
        let Some(vault) = self.vault.as_mut() else {
            return;
        };
        match vault.append(rec) {
            Ok(stored) => {
                if let Some(f) = &self.svc.forward {
                    f.send(logvault::rfc5424(&stored, &ctx.name));
                }
                self.svc.update(&ctx.name, |s| {
                    s.stored += 1;
                    if flags & logvault::FLAG_TAG_MISMATCH != 0 {
                        s.mismatched += 1;
                    }
                    if flags & logvault::FLAG_CUT != 0 {
                        s.cut += 1;
                    }
                })
            }
            Err(e) => {
                tracing::error!("{}: vault append failed: {e}", ctx.name);
                self.svc.update(&ctx.name, |s| {
                    s.errors += 1;
                    s.last_error = Some(e.to_string());
                });
            }
        }
    }
}

impl Engine for LogVaultEngine {
    fn name(&self) -> &'static str {
        "logvault"
    }

    fn interest(&self) -> Interest {
        let mut syscalls = Filter::NONE;
        if self.vault.is_some() {
            syscalls.insert(LOG_DOORBELL);
        }
        Interest {
            syscalls,
            fds: Filter::NONE,
        }
    }

    fn on_record(&mut self, ctx: &VmContext, rec: &Record, _now: Instant) {
        if rec.kind != Kind::Log {
            return;
        }
        let mut comm = String::new();
        let mut data: &[u8] = &[];
        for item in rec.items() {
            match item {
                Item::Comm(c) => comm = String::from_utf8_lossy(c).into_owned(),
                Item::Data { bytes, .. } => data = bytes,
                _ => {}
            }
        }
        let (id, offset) = (rec.args[2], rec.args[1] as usize);
        let want = (rec.args[0] as usize).min(LOG_MAX);
        let cut = rec.flags & FLAG_PAYLOAD_CUT != 0;
        // Slices of one doorbell come in order from one vCPU; a new
        // doorbell on that vCPU ends any unfinished one (cut).
        if let Some(p) = self.partial.get(&rec.vcpu) {
            if p.id != id || offset != p.bytes.len() {
                if let Some(mut old) = self.partial.remove(&rec.vcpu) {
                    old.cut = true;
                    self.finish(ctx, old);
                }
            }
        }
        let p = match self.partial.remove(&rec.vcpu) {
            Some(mut p) => {
                p.bytes.extend_from_slice(data);
                p.cut |= cut;
                p
            }
            None if offset == 0 => Partial {
                id,
                first: rec.clone(),
                comm,
                want,
                bytes: data.to_vec(),
                cut,
            },
            None => {
                // The start of this doorbell was lost (ring full): keep what
                // came, marked cut.
                Partial {
                    id,
                    first: rec.clone(),
                    comm,
                    want,
                    bytes: data.to_vec(),
                    cut: true,
                }
            }
        };
        if p.bytes.len() >= p.want || p.cut {
            self.finish(ctx, p);
        } else if self.partial.len() < MAX_PARTIAL {
            self.partial.insert(rec.vcpu, p);
        } else {
            let mut p = p;
            p.cut = true;
            self.finish(ctx, p);
        }
    }

    fn on_tick(&mut self, ctx: &VmContext, now: Instant) {
        // Open the guest's RAM early: a short-lived sender may be gone by
        // the time its first message would otherwise pay for the opening.
        if !self.guest_tried {
            self.identity(ctx, 0);
        }
        if let Some(v) = self.vault.as_mut() {
            if let Err(e) = v.tick(now) {
                tracing::error!("{}: vault: {e}", ctx.name);
            }
        }
    }

    fn on_dropped(&mut self, ctx: &VmContext, lost: u64) {
        tracing::warn!(
            "{}: {lost} records lost (ring full): log messages among them are missing from the vault",
            ctx.name
        );
    }

    fn on_vm_stopped(&mut self, ctx: &VmContext) {
        let parts: Vec<Partial> = self.partial.drain().map(|(_, p)| p).collect();
        for mut p in parts {
            p.cut = true;
            self.finish(ctx, p);
        }
        if let Some(v) = self.vault.as_mut() {
            if let Err(e) = v.flush() {
                tracing::error!("{}: vault flush: {e}", ctx.name);
            }
        }
    }
}

impl Drop for LogVaultEngine {
    fn drop(&mut self) {
        if let Some(v) = self.vault.as_mut() {
            let _ = v.flush();
        }
    }
}
