//! The watched VMs and the API's trace subscribers.
//!
//! Each watched VM has a pump thread ([`crate::pump`]) that owns its ring.
//! The ring's filter is the union of the syscall sets of the subscribers that
//! cover the VM (its own stream, or the merged one), ORed with what its
//! engines always need; with no subscriber it is `none`, so a guest nobody
//! watches closely pays almost nothing for its syscalls.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use events::{Filter, Ring, RingError};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::engine::{Engine, EventSink, Interest, Published, TracerEngine, VmContext};
use crate::error::WatchError;
use crate::pump::{self, lock, PumpConfig, Shared, Status};

/// Most VMs one daemon watches (each costs a thread and a ring mapping).
pub const MAX_VMS: usize = 64;
/// Most `POST /v1/vms` boots at once (each holds a blocking thread for the boot).
pub const MAX_BOOTS: usize = 8;
/// Most open trace streams.
pub const MAX_SUBSCRIBERS: usize = 256;
/// Events buffered per channel for the slowest subscriber; beyond, it loses
/// the oldest and gets a `dropped` notice with the count.
pub const CHANNEL_CAPACITY: usize = 8192;

/// Makes the engines of one VM.
pub type EngineFactory = dyn Fn(&VmContext, EventSink) -> Vec<Box<dyn Engine>> + Send + Sync;

/// The default engines: the tracer.
pub fn default_engines(vm: &VmContext, sink: EventSink) -> Vec<Box<dyn Engine>> {
    vec![Box::new(TracerEngine::new(vm, sink))]
}

/// Which VMs a subscriber listens to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Vm(String),
    /// Every watched VM, including those attached later.
    All,
}

impl Scope {
    fn covers(&self, vm: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Vm(n) => n == vm,
        }
    }
}

#[derive(Debug, Clone)]
struct SubSpec {
    scope: Scope,
    want: Interest,
}

struct VmEntry {
    ctx: Arc<VmContext>,
    shared: Arc<Shared>,
    tx: broadcast::Sender<Arc<Published>>,
    ring: Option<PathBuf>,
    qemu_pid: u32,
    pump: Option<JoinHandle<()>>,
    attached_unix: u64,
}

#[derive(Default)]
struct Inner {
    vms: BTreeMap<String, VmEntry>,
    subs: HashMap<u64, SubSpec>,
    /// Names being booted by `POST /v1/vms`.
    starting: HashSet<String>,
    closed: bool,
}

/// One VM as `GET /v1/vms` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmView {
    pub name: String,
    pub uuid: String,
    pub kernel_release: String,
    /// `watching`, `stopped` (QEMU gone) or `error`.
    pub state: String,
    /// For `stopped` and `error`: what happened and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub ring: Option<PathBuf>,
    pub qemu_pid: u32,
    /// Ring counters: records the plugin published, lost because the ring
    /// was full, entries it could not keep for pairing.
    pub records: u64,
    pub dropped: u64,
    pub unpaired: u64,
    /// Calls the plugin left out because no engine needed them (quiet table).
    #[serde(default)]
    pub quieted: u64,
    /// Log doorbells the plugin refused (per-process flood limit).
    #[serde(default)]
    pub log_refused: u64,
    /// Records the daemon read, events its engines published.
    pub read: u64,
    pub events: u64,
    /// Open trace streams that cover this VM.
    pub subscribers: usize,
    /// The ring's syscall filter and fd filter now (`none`, `all`, or names).
    pub filter: String,
    pub fds: String,
    pub attached_at: String,
}

/// `POST /v1/vms`: start a lab VM and watch it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub name: String,
    #[serde(default)]
    pub flavour: Option<String>,
    #[serde(default)]
    pub mem_mib: Option<u64>,
    #[serde(default)]
    pub cpus: Option<u32>,
}

/// The daemon's state.
pub struct Registry {
    cache: PathBuf,
    inner: Mutex<Inner>,
    all: broadcast::Sender<Arc<Published>>,
    closing: watch::Sender<bool>,
    next_id: AtomicU64,
    pump: PumpConfig,
    engines: Box<EngineFactory>,
}

/// An open trace stream's registration; dropping it unsubscribes (and the
/// ring filters shrink back).
pub struct Subscription {
    pub rx: broadcast::Receiver<Arc<Published>>,
    /// The VM, for a per-VM stream.
    pub vm: Option<Arc<VmContext>>,
    /// Generations each covered VM's pump must apply before the ring filter
    /// includes this subscriber's syscalls.
    pub pending: Vec<(Arc<Shared>, u64)>,
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.registry.unsubscribe(self.id);
    }
}

impl Registry {
    pub fn new(cache: &Path, pump: PumpConfig, engines: Box<EngineFactory>) -> Arc<Registry> {
        Arc::new(Registry {
            cache: cache.to_path_buf(),
            inner: Mutex::new(Inner::default()),
            all: broadcast::channel(CHANNEL_CAPACITY).0,
            closing: watch::channel(false).0,
            next_id: AtomicU64::new(1),
            pump,
            engines,
        })
    }

    /// The lab cache the VMs are looked up in.
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// Becomes `true` when the daemon shuts down (streams end).
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Attaches to the running lab VM `name` (idempotent: a VM already
    /// watched is returned as it is; one that stopped or failed is retried).
    pub fn watch(&self, name: &str) -> Result<VmView, WatchError> {
        let mut inner = lock(&self.inner);
        if inner.closed {
            return Err(WatchError::ShuttingDown);
        }
        if let Some(e) = inner.vms.get(name) {
            if e.shared.status() == Status::Watching {
                return Ok(view(&inner, e));
            }
        }
        if let Some(old) = inner.vms.remove(name) {
            old.shared.request_stop();
            // A stopped pump has ended or is about to; never block on it here.
            drop(old.pump);
        }
        let watched = inner
            .vms
            .values()
            .filter(|e| e.shared.status() == Status::Watching)
            .count();
        if watched >= MAX_VMS {
            return Err(WatchError::TooManyVms(MAX_VMS));
        }
        let entry = self.attach(name)?;
        inner.vms.insert(name.to_string(), entry);
        recompute(&mut inner, Some(name));
        let e = &inner.vms[name];
        tracing::info!(
            "watching `{name}` (uuid {}, kernel {}, ring {})",
            e.ctx.uuid,
            e.ctx.kernel_release,
            e.ring.as_deref().unwrap_or(Path::new("?")).display()
        );
        Ok(view(&inner, e))
    }

    fn attach(&self, name: &str) -> Result<VmEntry, WatchError> {
        let vm = lab::Vm::open_in(&self.cache, name).map_err(|e| match e {
            lab::LabError::NoSuchVm(_) => WatchError::NoSuchVm(name.to_string()),
            e => WatchError::lab(&e),
        })?;
        let info = vm.info().clone();
        if !vm.is_running() {
            return Err(WatchError::NotRunning(name.to_string()));
        }
        let Some(path) = info.ring.clone().filter(|p| p.exists()) else {
            return Err(WatchError::NoRing(name.to_string()));
        };
        let mut reader = Ring::open(&path).map_err(|e| match e {
            RingError::Busy { path } => WatchError::RingBusy {
                name: name.to_string(),
                path,
            },
            e => WatchError::Ring(e),
        })?;
        let owner = reader.vm_name();
        if !owner.is_empty() && owner != name {
            return Err(WatchError::WrongRing {
                name: name.to_string(),
                owner,
                path,
            });
        }
        let writer = reader.writer_pid();
        if writer != 0 && writer != u64::from(info.qemu_pid) {
            return Err(WatchError::StaleRing {
                name: name.to_string(),
                path,
                writer,
                qemu: info.qemu_pid,
            });
        }
        // Quiet the guest first (a daemon that was killed may have left a
        // filter on), then skip what was written before we came: the stream
        // is live from now on. Bounded: a few ring-fulls at most.
        reader.set_filter(&Filter::NONE);
        reader.set_fds(&Filter::NONE);
        for _ in 0..4 {
            if reader.poll().count() == 0 {
                break;
            }
        }
        let ctx = Arc::new(VmContext {
            name: name.to_string(),
            uuid: info.uuid.clone(),
            kernel_release: info.kernel_release.clone(),
            lab: Some(info.clone()),
            cache: self.cache.clone(),
        });
        let shared = Arc::new(Shared::new(Status::Watching));
        let tx = broadcast::channel(CHANNEL_CAPACITY).0;
        let sink = EventSink::new(tx.clone(), self.all.clone(), Arc::clone(&shared.published));
        let engines = (self.engines)(&ctx, sink);
        let (pid, uuid) = (info.qemu_pid, info.uuid.clone());
        let alive = Box::new(move || lab::vm::qemu_alive(pid, &uuid));
        let handle = pump::spawn(
            Arc::clone(&ctx),
            reader,
            Arc::clone(&shared),
            engines,
            alive,
            self.pump,
        )
        .map_err(|e| WatchError::Lab(format!("cannot start a thread for `{name}`: {e}")))?;
        Ok(VmEntry {
            ctx,
            shared,
            tx,
            ring: Some(path),
            qemu_pid: info.qemu_pid,
            pump: Some(handle),
            attached_unix: lab::util::now_unix(),
        })
    }

    /// Stops watching `name`: the ring's filter goes back to `none` and the
    /// ring is released (another reader may open it when this returns).
    /// Blocks until the pump has ended.
    pub fn unwatch(&self, name: &str) -> Result<(), WatchError> {
        let entry = {
            let mut inner = lock(&self.inner);
            inner
                .vms
                .remove(name)
                .ok_or_else(|| WatchError::NotWatched(name.to_string()))?
        };
        stop_entry(entry);
        tracing::info!("stopped watching `{name}`");
        Ok(())
    }

    /// Boots a lab VM (blocks for the boot: seconds to minutes) and watches it.
    pub fn start(&self, req: &StartRequest) -> Result<VmView, WatchError> {
        lab::vm::validate_name(&req.name).map_err(|e| WatchError::Invalid(e.to_string()))?;
        let mut opts = lab::UpOptions::new(&req.name);
        opts.cache = Some(self.cache.clone());
        opts.hook = true;
        if let Some(f) = &req.flavour {
            opts.flavour = f.parse().map_err(WatchError::Invalid)?;
        }
        if let Some(mib) = req.mem_mib {
            if !(64..=65536).contains(&mib) || mib % 2 != 0 {
                return Err(WatchError::Invalid(format!(
                    "bad mem_mib {mib}: use an even number of MiB from 64 to 65536"
                )));
            }
            opts.mem_bytes = mib << 20;
        }
        if let Some(cpus) = req.cpus {
            if !(1..=64).contains(&cpus) {
                return Err(WatchError::Invalid(format!("bad cpus {cpus}: use 1 to 64")));
            }
            opts.cpus = cpus;
        }
        {
            let mut inner = lock(&self.inner);
            if inner.closed {
                return Err(WatchError::ShuttingDown);
            }
            if inner.starting.len() >= MAX_BOOTS {
                return Err(WatchError::TooManyBoots(MAX_BOOTS));
            }
            if !inner.starting.insert(req.name.clone()) {
                return Err(WatchError::Starting(req.name.clone()));
            }
        }
        tracing::info!("starting lab VM `{}`", req.name);
        let booted = lab::Vm::up(&opts);
        lock(&self.inner).starting.remove(&req.name);
        booted.map_err(|e| WatchError::lab(&e))?;
        self.watch(&req.name)
    }

    /// Every VM the daemon knows, by name.
    pub fn list(&self) -> Vec<VmView> {
        let inner = lock(&self.inner);
        inner.vms.values().map(|e| view(&inner, e)).collect()
    }

    pub fn get(&self, name: &str) -> Option<VmView> {
        let inner = lock(&self.inner);
        inner.vms.get(name).map(|e| view(&inner, e))
    }

    /// The filter `name`'s ring has now (what its pump last applied).
    pub fn ring_filter(&self, name: &str) -> Option<Interest> {
        let inner = lock(&self.inner);
        inner.vms.get(name).map(|e| e.shared.ring_filter())
    }

    /// Open trace streams.
    pub fn subscribers(&self) -> usize {
        lock(&self.inner).subs.len()
    }

    /// Opens a trace stream over `scope` for these syscalls (and fds).
    pub fn subscribe(
        self: &Arc<Self>,
        scope: Scope,
        syscalls: Filter,
        fds: Filter,
    ) -> Result<Subscription, WatchError> {
        let mut inner = lock(&self.inner);
        if inner.closed {
            return Err(WatchError::ShuttingDown);
        }
        if inner.subs.len() >= MAX_SUBSCRIBERS {
            return Err(WatchError::TooManySubscribers(MAX_SUBSCRIBERS));
        }
        let (rx, vm) = match &scope {
            Scope::All => (self.all.subscribe(), None),
            Scope::Vm(name) => {
                let e = inner
                    .vms
                    .get(name)
                    .ok_or_else(|| WatchError::NotWatched(name.clone()))?;
                match e.shared.status() {
                    Status::Watching => {}
                    Status::Stopped(m) | Status::Error(m) => {
                        return Err(WatchError::NotWatching {
                            name: name.clone(),
                            state: m,
                        })
                    }
                }
                (e.tx.subscribe(), Some(Arc::clone(&e.ctx)))
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let only = match &scope {
            Scope::Vm(n) => Some(n.clone()),
            Scope::All => None,
        };
        inner.subs.insert(
            id,
            SubSpec {
                scope,
                want: Interest { syscalls, fds },
            },
        );
        let pending = recompute(&mut inner, only.as_deref());
        Ok(Subscription {
            rx,
            vm,
            pending,
            registry: Arc::clone(self),
            id,
        })
    }

    fn unsubscribe(&self, id: u64) {
        let mut inner = lock(&self.inner);
        if let Some(spec) = inner.subs.remove(&id) {
            let only = match spec.scope {
                Scope::Vm(n) => Some(n),
                Scope::All => None,
            };
            recompute(&mut inner, only.as_deref());
        }
    }

    /// `--watch-all`: attaches every running lab VM with a ring that is not
    /// watched yet (and re-attaches restarted ones); forgets stopped VMs
    /// whose lab state is gone (`vmwatch lab down`). Failures show in
    /// `/v1/vms` as `error` and are retried on the next scan.
    pub fn scan(&self) {
        let list = match lab::vm::list_in(&self.cache) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("cannot list lab VMs in {}: {e}", self.cache.display());
                return;
            }
        };
        let present: HashSet<&str> = list.iter().map(|s| s.name.as_str()).collect();
        {
            let mut inner = lock(&self.inner);
            let gone: Vec<String> = inner
                .vms
                .iter()
                .filter(|(n, e)| {
                    !present.contains(n.as_str()) && e.shared.status() != Status::Watching
                })
                .map(|(n, _)| n.clone())
                .collect();
            for n in gone {
                inner.vms.remove(&n);
            }
        }
        for s in &list {
            let Some(info) = &s.info else { continue };
            if s.state != lab::VmState::Running || info.ring.is_none() {
                continue;
            }
            let retry = {
                let inner = lock(&self.inner);
                if inner.starting.contains(&s.name) {
                    false
                } else {
                    match inner.vms.get(&s.name) {
                        None => true,
                        Some(e) => match e.shared.status() {
                            Status::Watching => false,
                            Status::Error(_) => true,
                            // Same QEMU: it stays stopped; a new QEMU: attach again.
                            Status::Stopped(_) => e.qemu_pid != info.qemu_pid,
                        },
                    }
                }
            };
            if !retry {
                continue;
            }
            if let Err(err) = self.watch(&s.name) {
                let msg = err.to_string();
                let mut inner = lock(&self.inner);
                let changed = inner
                    .vms
                    .get(&s.name)
                    .is_none_or(|e| e.shared.status() != Status::Error(msg.clone()));
                if changed {
                    tracing::warn!("cannot watch `{}`: {msg}", s.name);
                }
                if inner.closed || inner.vms.len() >= MAX_VMS {
                    continue;
                }
                inner.vms.insert(
                    s.name.clone(),
                    VmEntry {
                        ctx: Arc::new(VmContext {
                            name: s.name.clone(),
                            uuid: info.uuid.clone(),
                            kernel_release: info.kernel_release.clone(),
                            lab: Some(info.clone()),
                            cache: self.cache.clone(),
                        }),
                        shared: Arc::new(Shared::new(Status::Error(msg))),
                        tx: broadcast::channel(1).0,
                        ring: info.ring.clone(),
                        qemu_pid: info.qemu_pid,
                        pump: None,
                        attached_unix: lab::util::now_unix(),
                    },
                );
            }
        }
    }

    /// Ends every stream and pump (filters back to `none`, rings released).
    pub fn shutdown(&self) {
        let entries: Vec<VmEntry> = {
            let mut inner = lock(&self.inner);
            inner.closed = true;
            std::mem::take(&mut inner.vms).into_values().collect()
        };
        let _ = self.closing.send(true);
        for e in entries {
            stop_entry(e);
        }
    }
}

fn stop_entry(mut e: VmEntry) {
    e.shared.request_stop();
    if let Some(h) = e.pump.take() {
        if h.join().is_err() {
            tracing::error!("the pump of `{}` panicked", e.ctx.name);
        }
    }
}

/// Puts the union of the subscribers' wants into each covered VM's pump;
/// returns the generations to wait for.
fn recompute(inner: &mut Inner, only: Option<&str>) -> Vec<(Arc<Shared>, u64)> {
    let mut pending = Vec::new();
    for (name, e) in &inner.vms {
        if only.is_some_and(|o| o != name) || e.shared.status() != Status::Watching {
            continue;
        }
        let mut want = Interest::default();
        for s in inner.subs.values().filter(|s| s.scope.covers(name)) {
            for k in 0..want.syscalls.words.len() {
                want.syscalls.words[k] |= s.want.syscalls.words[k];
                want.fds.words[k] |= s.want.fds.words[k];
            }
        }
        let gen = e.shared.want(want);
        pending.push((Arc::clone(&e.shared), gen));
    }
    pending
}

fn view(inner: &Inner, e: &VmEntry) -> VmView {
    let (state, message) = match e.shared.status() {
        Status::Watching => ("watching", None),
        Status::Stopped(m) => ("stopped", Some(m)),
        Status::Error(m) => ("error", Some(m)),
    };
    let applied = e.shared.ring_filter();
    VmView {
        name: e.ctx.name.clone(),
        uuid: e.ctx.uuid.clone(),
        kernel_release: e.ctx.kernel_release.clone(),
        state: state.to_string(),
        message,
        ring: e.ring.clone(),
        qemu_pid: e.qemu_pid,
        records: e.shared.records.load(Ordering::Relaxed),
        dropped: e.shared.dropped.load(Ordering::Relaxed),
        unpaired: e.shared.unpaired.load(Ordering::Relaxed),
        quieted: e.shared.quieted.load(Ordering::Relaxed),
        log_refused: e.shared.log_refused.load(Ordering::Relaxed),
        read: e.shared.read.load(Ordering::Relaxed),
        events: e.shared.published.load(Ordering::Relaxed),
        subscribers: inner
            .subs
            .values()
            .filter(|s| s.scope.covers(&e.ctx.name))
            .count(),
        filter: filter_names(&applied.syscalls),
        fds: filter_names(&applied.fds),
        attached_at: lab::util::rfc3339(e.attached_unix),
    }
}

/// `none`, `all`, or the syscall names (numbers for unnamed ones), comma-separated.
pub fn filter_names(f: &Filter) -> String {
    if *f == Filter::NONE {
        return "none".into();
    }
    if *f == Filter::ALL {
        return "all".into();
    }
    (0..events::syscalls::FILTER_BITS as u64)
        .filter(|&nr| f.contains(nr))
        .map(|nr| {
            if nr == events::LOG_DOORBELL {
                return "log".to_string(); // the log vault's doorbell
            }
            events::syscalls::name(nr)
                .map(str::to_string)
                .unwrap_or_else(|| nr.to_string())
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_names_read_back() {
        assert_eq!(filter_names(&Filter::NONE), "none");
        assert_eq!(filter_names(&Filter::ALL), "all");
        let f = Filter::parse("openat,read,335").unwrap();
        assert_eq!(filter_names(&f), "read,openat,335");
        assert_eq!(Filter::parse(&filter_names(&f)).unwrap(), f);
    }

    #[test]
    fn scopes() {
        assert!(Scope::All.covers("a"));
        assert!(Scope::Vm("a".into()).covers("a"));
        assert!(!Scope::Vm("a".into()).covers("b"));
    }
}
