//! The engine: per-VM state, the public API the daemon calls, emission of
//! delta events (persist, apply, hand out), cross-VM flows. The rules that
//! turn records into changes are in `rules.rs`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use events::{FileKind, Filter, Record};
use serde::{Deserialize, Serialize};

use crate::bounded::BoundedMap;
use crate::graph::{Graph, GraphBuilder};
use crate::model::{Change, DeltaEvent, Edge, ObjectInfo, ObjectKey, ProcRef, Reason, Source};
use crate::net::{canonical, NetAddr};
use crate::paths;
use crate::state::{ManagedObject, ManagedSet, Registration};
use crate::store::Store;
use crate::sys;
use crate::time::{Clock, SystemClock, WallOffset};
use crate::DiffusionError;

/// The VM a record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRef {
    pub name: String,
    /// SMBIOS UUID of this boot: a new one means the VM restarted (its
    /// processes, pipes and sockets are gone).
    pub uuid: String,
}

impl VmRef {
    pub fn new(name: impl Into<String>, uuid: impl Into<String>) -> VmRef {
        VmRef {
            name: name.into(),
            uuid: uuid.into(),
        }
    }
}

/// The object behind an fd, as introspection shows it (`vmwatch lsof`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentity {
    pub dev: u32,
    pub ino: u64,
    pub kind: FileKind,
    /// As /proc/PID/fd shows it.
    pub path: String,
}

/// An fd a process holds, found by introspection at registration time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFile {
    pub tgid: u32,
    pub comm: String,
    pub fd: i32,
    pub file: FileIdentity,
}

/// Hard limits: the guest drives every table, so each one is capped, and
/// what does not fit is counted in [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Managed objects per VM; past it new ones are not tracked (and one
    /// `overflow` event says so).
    pub objects_per_vm: usize,
    /// Syscall entries waiting for their return, per VM.
    pub pending_calls_per_vm: usize,
    /// Entries of each helper table per VM (socket addresses, working
    /// directories, shared mappings, connection queues, send summaries).
    pub helper_entries_per_vm: usize,
    /// Recent unmanaged reads and writes kept per VM to replay when a race
    /// is resolved (a fork whose return came late, a cross-VM flow whose
    /// sender's records came late).
    pub recent_io_per_vm: usize,
    /// Cross-VM flows waiting for (or matched to) the receiving side.
    pub flows: usize,
    pub registrations_per_vm: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            objects_per_vm: 50_000,
            pending_calls_per_vm: 4096,
            helper_entries_per_vm: 8192,
            recent_io_per_vm: 1024,
            flows: 4096,
            registrations_per_vm: 1024,
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub limits: Limits,
    /// Sends of one process to one destination within this window are
    /// summed into one event (the first one is reported at once).
    pub send_window_ns: u64,
    /// How long a cross-VM flow waits for the receiving VM's side.
    pub flow_ttl_ns: u64,
    /// How long recent unmanaged reads and writes are kept for replay.
    pub recent_ttl_ns: u64,
    /// How long a connect waits for its accept (and the reverse) to link
    /// the two ends of a local connection.
    pub link_ttl_ns: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            limits: Limits::default(),
            send_window_ns: 10_000_000_000,
            flow_ttl_ns: 120_000_000_000,
            recent_ttl_ns: 10_000_000_000,
            link_ttl_ns: 30_000_000_000,
        }
    }
}

/// What the engine needs recorded: the syscalls, and those whose fds the
/// plugin must resolve to file identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    pub syscalls: Filter,
    pub fds: Filter,
}

/// Counters of one VM (what was seen, what did not fit).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub records: u64,
    /// Records without a named thread (plugin without `vmlinux=`): ignored.
    pub unattributed: u64,
    /// Returns whose entry was not kept (attached mid-call, or dropped).
    pub unpaired_returns: u64,
    pub pending_dropped: u64,
    /// New managed objects refused at the limit.
    pub objects_dropped: u64,
    /// Helper entries forgotten at their limits (socket addresses, cwds, ...).
    pub helper_dropped: u64,
    pub recent_io_dropped: u64,
    pub managed: usize,
    pub pending_calls: usize,
}

/// The store's condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub store: PathBuf,
    /// Events not yet written (the store failed; retried on every write and tick).
    pub unsaved: usize,
    /// Events given up on (more than the retry queue holds).
    pub lost: u64,
    pub last_error: Option<String>,
    pub flows: usize,
    pub flows_dropped: u64,
}

/// Events kept for retry while the store fails.
const MAX_UNSAVED: usize = 65_536;
/// Most bound sockets remembered per local endpoint.
const MAX_BOUND_PER_ENDPOINT: usize = 8;

/// A file identity from a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileRef {
    /// `None` for objects content is not tracked through (directories,
    /// devices, anonymous inodes).
    pub key: Option<ObjectKey>,
    pub path: String,
    pub cut: bool,
}

impl FileRef {
    pub fn new(dev: u32, ino: u64, kind: FileKind, path: &[u8], cut: bool) -> FileRef {
        let key = match kind {
            FileKind::Regular | FileKind::Fifo => Some(ObjectKey::File { dev, ino }),
            FileKind::Pipe => Some(ObjectKey::Pipe { ino }),
            FileKind::Socket => Some(ObjectKey::Socket { ino }),
            _ => None,
        };
        FileRef {
            key,
            path: lossy(path),
            cut,
        }
    }

    /// A name usable for a file: absolute, whole, not ` (deleted)`.
    pub fn usable_name(&self) -> Option<&str> {
        let ok = !self.cut && self.path.starts_with('/') && !self.path.ends_with(" (deleted)");
        ok.then_some(self.path.as_str())
    }
}

pub(crate) fn lossy(b: &[u8]) -> String {
    let b = &b[..b.len().min(paths::MAX_PATH)];
    String::from_utf8_lossy(b).into_owned()
}

/// A syscall entry waiting for its return.
#[derive(Debug, Clone)]
pub(crate) struct PendingCall {
    pub nr: u64,
    pub seq: u64,
    pub time_ns: u64,
    pub tgid: u32,
    pub comm: String,
    pub args: [u64; 6],
    pub files: Vec<(u8, FileRef)>,
    pub paths: Vec<(u8, String)>,
    pub addr: Option<(u8, NetAddr)>,
}

impl PendingCall {
    pub fn file(&self, arg: u8) -> Option<&FileRef> {
        self.files.iter().find(|(a, _)| *a == arg).map(|(_, f)| f)
    }

    pub fn path(&self, arg: u8) -> Option<&str> {
        self.paths
            .iter()
            .find(|(a, _)| *a == arg)
            .map(|(_, p)| p.as_str())
    }

    pub fn addr(&self, arg: u8) -> Option<&NetAddr> {
        self.addr
            .as_ref()
            .filter(|(a, _)| *a == arg)
            .map(|(_, x)| x)
    }
}

/// What is known of a socket (managed or not).
#[derive(Debug, Clone, Default)]
pub(crate) struct SocketState {
    pub local: Option<NetAddr>,
    pub peer: Option<NetAddr>,
    /// The other end of a local connection or socketpair (same VM).
    pub linked: Option<u64>,
    /// `listen` or `accept` was seen on it: it carries no content.
    pub listener: bool,
}

/// Where a local connection or datagram arrives: a port (any address of
/// this VM) or a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Endpoint {
    Port(u16),
    Unix(String),
}

impl Endpoint {
    /// The endpoint a socket bound to `local` receives on.
    pub fn of_local(local: &NetAddr) -> Option<Endpoint> {
        match local {
            NetAddr::Inet(sa) if sa.port() != 0 => Some(Endpoint::Port(sa.port())),
            NetAddr::Unix(p) if !p.is_empty() => Some(Endpoint::Unix(p.clone())),
            _ => None,
        }
    }
}

/// A connect (or accept) waiting for the other end's record.
#[derive(Debug, Clone)]
pub(crate) struct QueuedConn {
    pub endpoint: Endpoint,
    pub sock: u64,
    /// The client's own address (connect side: its local address if known;
    /// accept side: the peer address accept returned).
    pub addr: Option<NetAddr>,
    pub time_ns: u64,
}

/// `socketpair` fds whose inodes are learned as they are used.
#[derive(Debug, Clone)]
pub(crate) struct PendingPair {
    pub tgid: u32,
    pub fds: [i32; 2],
    pub inos: [Option<u64>; 2],
}

/// A shared file mapping: content moves through memory without syscalls.
#[derive(Debug, Clone)]
pub(crate) struct Mapping {
    pub tgid: u32,
    pub comm: String,
    pub file: ObjectKey,
    pub name: String,
    pub readable: bool,
    pub writable: bool,
}

/// A `clone3` child not confirmed as a process yet.
#[derive(Debug, Clone)]
pub(crate) struct PendingChild {
    pub parent: ProcRef,
    pub parent_managed: bool,
    pub time_ns: u64,
    pub seq: u64,
}

/// A read or write by an unmanaged process, kept a while for replay.
#[derive(Debug, Clone)]
pub(crate) struct RecentIo {
    pub tgid: u32,
    pub comm: String,
    pub object: ObjectKey,
    pub file: FileRef,
    pub syscall: &'static str,
    pub time_ns: u64,
    pub seq: u64,
    /// Writes: explicit destination (sendto) and amount, for a replayed send.
    pub dst: Option<NetAddr>,
    pub bytes: u64,
    pub calls: u64,
}

/// Sends of one process to one destination being summed.
#[derive(Debug, Clone)]
pub(crate) struct SendAgg {
    pub by: ProcRef,
    pub socket: Option<ObjectKey>,
    pub to_vm: Option<String>,
    pub last_emit_ns: u64,
    pub last_ns: u64,
    pub bytes: u64,
    pub calls: u64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ProcAux {
    pub cwd: Option<String>,
    pub exe: Option<String>,
    /// The name `execve` gave it (a `vfork` child often execs before its
    /// parent's return names it as a child).
    pub comm: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct ExitedProc {
    pub at_ns: u64,
    pub aux: Option<ProcAux>,
}

/// Per-VM working state besides the managed set. Not persisted: a restart
/// keeps every managed object and its history, and relearns these.
#[derive(Debug, Default)]
pub(crate) struct Aux {
    pub pending: BTreeMap<u64, PendingCall>,
    pub sockets: BoundedMap<u64, SocketState>,
    pub bound: BoundedMap<Endpoint, Vec<u64>>,
    pub connects: VecDeque<QueuedConn>,
    pub accepts: VecDeque<QueuedConn>,
    pub pairs: VecDeque<PendingPair>,
    pub procs: BoundedMap<u32, ProcAux>,
    pub mappings: VecDeque<Mapping>,
    pub clone3: BoundedMap<u32, PendingChild>,
    /// tgid -> when it called `exit_group`, and what was known of it then
    /// (a child's records, exec included, may all come before the parent's
    /// fork return names it).
    pub exited: BoundedMap<u32, ExitedProc>,
    pub recent_writes: VecDeque<RecentIo>,
    pub recent_reads: VecDeque<RecentIo>,
    pub sends: BoundedMap<(u32, NetAddr), SendAgg>,
    /// Entries dropped from the queues above (the maps count their own).
    pub queue_dropped: u64,
}

impl Aux {
    fn new(limits: &Limits) -> Aux {
        let cap = limits.helper_entries_per_vm.max(1);
        Aux {
            sockets: BoundedMap::with_cap(cap),
            bound: BoundedMap::with_cap(cap),
            procs: BoundedMap::with_cap(cap),
            clone3: BoundedMap::with_cap(cap),
            exited: BoundedMap::with_cap(cap),
            sends: BoundedMap::with_cap(cap),
            ..Aux::default()
        }
    }

    pub fn helper_dropped(&self) -> u64 {
        self.sockets.evicted
            + self.bound.evicted
            + self.procs.evicted
            + self.clone3.evicted
            + self.exited.evicted
            + self.queue_dropped
    }

    pub fn socket(&mut self, ino: u64) -> Option<&mut SocketState> {
        self.sockets.entry(ino, SocketState::default)
    }
}

/// One watched VM.
#[derive(Debug, Default)]
pub(crate) struct Vm {
    pub name: String,
    pub uuid: String,
    pub set: ManagedSet,
    /// The graph as of now, kept up to date with every event, so the bulk
    /// view of the present needs no replay of the history.
    pub graph: GraphBuilder,
    pub aux: Aux,
    pub stats: Stats,
    pub overflow_reported: bool,
}

/// A managed send to another watched VM, waiting to be matched with the
/// receiving socket there (whichever VM's records come first).
#[derive(Debug, Clone)]
pub(crate) struct Flow {
    pub src_vm: String,
    pub by: ProcRef,
    pub src_port: Option<u16>,
    pub dst: SocketAddr,
    pub syscall: &'static str,
    pub start_ns: u64,
    pub last_ns: u64,
}

/// Flows by (sending VM's slot, socket, sender, destination).
pub(crate) type FlowKey = (usize, u64, u32, SocketAddr);

/// The diffusion engine of every watched VM (one instance per daemon: flows
/// cross VMs). Not thread-safe by itself; the daemon wraps it.
pub struct DiffusionEngine {
    pub(crate) store: Store,
    pub(crate) clock: Box<dyn Clock>,
    pub(crate) offset: WallOffset,
    pub(crate) config: Config,
    pub(crate) vms: Vec<Vm>,
    pub(crate) index: HashMap<String, usize>,
    pub(crate) addrs: HashMap<String, Vec<IpAddr>>,
    pub(crate) flows: BoundedMap<FlowKey, Flow>,
    pub(crate) out: Vec<DeltaEvent>,
    unsaved: VecDeque<DeltaEvent>,
    lost: u64,
    last_store_error: Option<String>,
}

impl DiffusionEngine {
    /// Opens the store under `data_dir` (created if missing) and rebuilds
    /// every VM's managed set from its history. A store that cannot be read
    /// is an error, never silently replaced.
    pub fn open(data_dir: &Path, config: Config) -> Result<DiffusionEngine, DiffusionError> {
        DiffusionEngine::open_with_clock(data_dir, config, Box::new(SystemClock))
    }

    /// [`DiffusionEngine::open`] with another clock (tests).
    pub fn open_with_clock(
        data_dir: &Path,
        config: Config,
        clock: Box<dyn Clock>,
    ) -> Result<DiffusionEngine, DiffusionError> {
        let store = Store::open(data_dir)?;
        let offset = WallOffset::capture(clock.as_ref());
        let mut engine = DiffusionEngine {
            store,
            clock,
            offset,
            config,
            vms: Vec::new(),
            index: HashMap::new(),
            addrs: HashMap::new(),
            flows: BoundedMap::with_cap(config.limits.flows),
            out: Vec::new(),
            unsaved: VecDeque::new(),
            lost: 0,
            last_store_error: None,
        };
        // Replay: every VM's managed set and registrations from its history.
        let DiffusionEngine {
            store,
            vms,
            index,
            config,
            ..
        } = &mut engine;
        store.scan(None, 0, None, None, |ev| {
            let i = slot_in(vms, index, &config.limits, &ev.vm);
            let vm = &mut vms[i];
            // Registrations made while the VM was not running carry no UUID.
            if !ev.uuid.is_empty() {
                vm.uuid.clone_from(&ev.uuid);
            }
            vm.set.apply(&ev);
            vm.graph.apply(&ev);
        })?;
        engine.seed_sockets();
        Ok(engine)
    }

    /// Managed sockets' addresses, back into the helper table after a replay.
    fn seed_sockets(&mut self) {
        for vm in &mut self.vms {
            let socks: Vec<(u64, Option<NetAddr>, Option<NetAddr>)> = vm
                .set
                .objects()
                .filter_map(|o| match (&o.object, &o.info) {
                    (ObjectKey::Socket { ino }, ObjectInfo::Socket { local, peer, .. }) => {
                        Some((*ino, local.clone(), peer.clone()))
                    }
                    _ => None,
                })
                .collect();
            for (ino, local, peer) in socks {
                if let Some(s) = vm.aux.socket(ino) {
                    s.local = local;
                    s.peer = peer;
                }
            }
        }
    }

    /// The syscalls (and fd resolutions) the engine needs in the ring filter.
    pub fn interest() -> Interest {
        let mut syscalls = Filter::NONE;
        let mut fds = Filter::NONE;
        for &nr in sys::WATCHED {
            syscalls.insert(nr);
            if events::capture::uses_fds(nr) {
                fds.insert(nr);
            }
        }
        Interest { syscalls, fds }
    }

    /// One record of `vm`, in ring order. Returns the delta events it caused
    /// (in any watched VM: a cross-VM edge lands in the receiving VM).
    pub fn on_record(&mut self, vm: &VmRef, rec: &Record) -> Vec<DeltaEvent> {
        if rec.kind == events::Kind::Log {
            return Vec::new(); // the log vault's
        }
        let i = self.vm_for(vm, rec.time_ns);
        let mut state = std::mem::take(&mut self.vms[i]);
        self.handle_record(&mut state, rec);
        state.stats.managed = state.set.len();
        state.stats.pending_calls = state.aux.pending.len();
        self.vms[i] = state;
        std::mem::take(&mut self.out)
    }

    /// Periodic work (the daemon calls it every few tens of ms): emits the
    /// summed sends whose window closed, expires flows, retries the store.
    pub fn on_tick(&mut self) -> Vec<DeltaEvent> {
        let now = self.clock.monotonic_ns();
        let window = self.config.send_window_ns;
        for i in 0..self.vms.len() {
            let mut vm = std::mem::take(&mut self.vms[i]);
            self.flush_sends(&mut vm, |_, agg| {
                now.saturating_sub(agg.last_emit_ns) >= window
            });
            self.vms[i] = vm;
        }
        let ttl = self.config.flow_ttl_ns;
        self.flows
            .retain(|_, f| now.saturating_sub(f.last_ns) <= ttl);
        if !self.unsaved.is_empty() {
            self.retry_unsaved();
        }
        std::mem::take(&mut self.out)
    }

    /// The addresses of a watched VM's interfaces: sends to them from
    /// another VM continue the diffusion there instead of being leaks.
    pub fn set_vm_addresses(&mut self, vm: &str, addrs: Vec<IpAddr>) {
        let mut addrs: Vec<IpAddr> = addrs.into_iter().map(canonical).collect();
        addrs.sort();
        addrs.dedup();
        self.addrs.insert(vm.to_string(), addrs);
    }

    /// Registers `path` in `vm`. `open_files` are the fds introspection
    /// found open in the VM right now: a process holding the path becomes
    /// managed at once, with the file.
    pub fn track_add(
        &mut self,
        vm: &str,
        path: &str,
        open_files: &[OpenFile],
    ) -> Result<Vec<DeltaEvent>, DiffusionError> {
        let path = check_path(path)?;
        let i = self.slot(vm);
        let mut state = std::mem::take(&mut self.vms[i]);
        let res = self.track_add_in(&mut state, &path, open_files);
        self.vms[i] = state;
        res.map(|()| std::mem::take(&mut self.out))
    }

    fn track_add_in(
        &mut self,
        vm: &mut Vm,
        path: &str,
        open_files: &[OpenFile],
    ) -> Result<(), DiffusionError> {
        let at = self.now_wall();
        if !vm.set.is_registered(path) {
            let limit = self.config.limits.registrations_per_vm;
            if vm.set.registration_count() >= limit {
                return Err(DiffusionError::TooManyRegistrations {
                    vm: vm.name.clone(),
                    limit,
                });
            }
            self.emit(
                vm,
                at,
                Change::Track {
                    path: path.to_string(),
                },
            );
        }
        for of in open_files {
            if of.file.path != path {
                continue;
            }
            let f = FileRef::new(
                of.file.dev,
                of.file.ino,
                of.file.kind,
                of.file.path.as_bytes(),
                false,
            );
            let Some(key @ ObjectKey::File { .. }) = f.key else {
                continue;
            };
            if !vm.set.contains(&key) {
                self.take_name(vm, path, key, at, "track", None);
                self.manage(
                    vm,
                    key,
                    ObjectInfo::File {
                        names: vec![path.to_string()],
                    },
                    Edge {
                        syscall: "track".into(),
                        from: None,
                        seq: None,
                    },
                    at,
                );
            }
        }
        // Holders: every process with an fd on a registered file now managed.
        for of in open_files {
            let f = FileRef::new(
                of.file.dev,
                of.file.ino,
                of.file.kind,
                of.file.path.as_bytes(),
                false,
            );
            let Some(key @ ObjectKey::File { .. }) = f.key else {
                continue;
            };
            let registered_here = vm
                .set
                .registrations()
                .any(|r| r.path == path && r.file == Some(key));
            if !registered_here {
                continue;
            }
            let p = ObjectKey::Process { tgid: of.tgid };
            let from = Source {
                vm: None,
                object: key,
                label: vm.set.label(&key),
            };
            let info = self.proc_info(vm, of.tgid, &of.comm);
            self.manage(
                vm,
                p,
                info,
                Edge {
                    syscall: "track".into(),
                    from: Some(from),
                    seq: None,
                },
                at,
            );
        }
        Ok(())
    }

    /// Removes the registration of `path`; the registered file itself leaves
    /// management (`untracked`), what it spread to stays until it leaves.
    pub fn track_rm(&mut self, vm: &str, path: &str) -> Result<Vec<DeltaEvent>, DiffusionError> {
        let path = check_path(path)?;
        let Some(&i) = self.index.get(vm) else {
            return Err(DiffusionError::NotRegistered {
                vm: vm.to_string(),
                path,
            });
        };
        let mut state = std::mem::take(&mut self.vms[i]);
        let res = if state.set.is_registered(&path) {
            let at = self.now_wall();
            let file = state
                .set
                .registrations()
                .find(|r| r.path == path)
                .and_then(|r| r.file);
            self.emit(&mut state, at, Change::Untrack { path: path.clone() });
            if let Some(key) = file {
                let label = state.set.label(&key);
                self.emit(
                    &mut state,
                    at,
                    Change::Removed {
                        object: key,
                        label,
                        reason: Reason::Untracked,
                    },
                );
            }
            Ok(())
        } else {
            Err(DiffusionError::NotRegistered {
                vm: vm.to_string(),
                path,
            })
        };
        self.vms[i] = state;
        res.map(|()| std::mem::take(&mut self.out))
    }

    /// The registrations of `vm`.
    pub fn track_list(&self, vm: &str) -> Vec<Registration> {
        self.index
            .get(vm)
            .map(|&i| self.vms[i].set.registrations().cloned().collect())
            .unwrap_or_default()
    }

    /// Introspection found process `tgid` gone without an `exit_group`
    /// (killed by a signal).
    pub fn process_gone(&mut self, vm: &str, tgid: u32) -> Vec<DeltaEvent> {
        let Some(&i) = self.index.get(vm) else {
            return Vec::new();
        };
        let now = self.clock.monotonic_ns();
        let mut state = std::mem::take(&mut self.vms[i]);
        self.process_exit(&mut state, tgid, now, Reason::Gone);
        self.vms[i] = state;
        std::mem::take(&mut self.out)
    }

    /// Introspection found no process holding this managed pipe or socket:
    /// it leaves management (the records alone cannot tell the last close).
    pub fn channel_gone(&mut self, vm: &str, key: ObjectKey) -> Vec<DeltaEvent> {
        let Some(&i) = self.index.get(vm) else {
            return Vec::new();
        };
        if !matches!(key, ObjectKey::Pipe { .. } | ObjectKey::Socket { .. }) {
            return Vec::new();
        }
        let at = self.now_wall();
        let mut state = std::mem::take(&mut self.vms[i]);
        if state.set.contains(&key) {
            let label = state.set.label(&key);
            self.emit(
                &mut state,
                at,
                Change::Removed {
                    object: key,
                    label,
                    reason: Reason::Closed,
                },
            );
        }
        if let ObjectKey::Socket { ino } = key {
            state.aux.sockets.remove(&ino);
        }
        self.vms[i] = state;
        std::mem::take(&mut self.out)
    }

    /// A socket's addresses from introspection (`vmwatch sockets`), for
    /// connections made before the engine saw their `connect`/`accept`.
    pub fn learn_socket(
        &mut self,
        vm: &str,
        ino: u64,
        local: Option<NetAddr>,
        peer: Option<NetAddr>,
    ) -> Vec<DeltaEvent> {
        let i = self.slot(vm);
        let now = self.clock.monotonic_ns();
        let mut state = std::mem::take(&mut self.vms[i]);
        if let Some(s) = state.aux.socket(ino) {
            if local.is_some() {
                s.local = local;
            }
        }
        if let Some(peer) = peer {
            self.learn_peer(&mut state, ino, peer, now);
        }
        self.vms[i] = state;
        std::mem::take(&mut self.out)
    }

    /// The VM's QEMU is gone: its processes, pipes and sockets leave
    /// management; its files stay (they may live on a persistent disk).
    pub fn vm_stopped(&mut self, vm: &str) -> Vec<DeltaEvent> {
        let Some(&i) = self.index.get(vm) else {
            return Vec::new();
        };
        let mut state = std::mem::take(&mut self.vms[i]);
        self.drop_volatile(&mut state, Reason::VmStopped);
        self.vms[i] = state;
        std::mem::take(&mut self.out)
    }

    /// The thread-group ids of `vm`'s managed processes now.
    pub fn processes(&self, vm: &str) -> Vec<u32> {
        let Some(&i) = self.index.get(vm) else {
            return Vec::new();
        };
        self.vms[i]
            .set
            .objects()
            .filter_map(|o| match o.object {
                ObjectKey::Process { tgid } => Some(tgid),
                _ => None,
            })
            .collect()
    }

    /// The managed objects of `vm` now.
    pub fn current(&self, vm: &str) -> Vec<ManagedObject> {
        let mut v: Vec<ManagedObject> = self
            .index
            .get(vm)
            .map(|&i| self.vms[i].set.objects().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|o| o.event_id);
        v
    }

    /// The diffusion graph of `vm` as it stood at `at_ns` (wall-clock ns;
    /// `None`: now), objects that left before included and marked.
    pub fn graph(&self, vm: &str, at_ns: Option<i64>) -> Result<Graph, DiffusionError> {
        let Some(&i) = self.index.get(vm) else {
            return Err(DiffusionError::UnknownVm(vm.to_string()));
        };
        // The present, or a time after the VM's last event: the live graph.
        if at_ns.is_none_or(|t| t >= self.vms[i].graph.last_at_ns()) {
            return Ok(self.vms[i].graph.snapshot(vm, at_ns));
        }
        let mut b = GraphBuilder::default();
        self.store
            .scan(Some(vm), 0, at_ns, None, |ev| b.apply(&ev))?;
        Ok(b.finish(vm, at_ns))
    }

    /// Stored events after id `after` (0: from the start), of one VM or all,
    /// at most `limit`: the delta log for `vmwatch diffusion log`.
    pub fn history(
        &self,
        vm: Option<&str>,
        after: u64,
        limit: u64,
    ) -> Result<Vec<DeltaEvent>, DiffusionError> {
        let mut v = Vec::new();
        self.store
            .scan(vm, after, None, Some(limit), |ev| v.push(ev))?;
        Ok(v)
    }

    /// Names of every VM the engine knows (live or with a history).
    pub fn vms(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn stats(&self, vm: &str) -> Option<Stats> {
        let vm = &self.vms[*self.index.get(vm)?];
        let mut s = vm.stats.clone();
        s.managed = vm.set.len();
        s.pending_calls = vm.aux.pending.len();
        s.helper_dropped = vm.aux.helper_dropped();
        Some(s)
    }

    pub fn health(&self) -> Health {
        Health {
            store: self.store.path().to_path_buf(),
            unsaved: self.unsaved.len(),
            lost: self.lost,
            last_error: self.last_store_error.clone(),
            flows: self.flows.len(),
            flows_dropped: self.flows.evicted,
        }
    }

    // ---- internals shared by the rules ----

    pub(crate) fn now_wall(&self) -> i64 {
        self.offset.wall(self.clock.monotonic_ns())
    }

    pub(crate) fn wall(&self, mono_ns: u64) -> i64 {
        self.offset.wall(mono_ns)
    }

    /// The slot of VM `name`, created empty if new.
    pub(crate) fn slot(&mut self, name: &str) -> usize {
        slot_in(&mut self.vms, &mut self.index, &self.config.limits, name)
    }

    /// The slot of `vm`; a new SMBIOS UUID means the VM rebooted.
    fn vm_for(&mut self, vm: &VmRef, time_ns: u64) -> usize {
        let i = self.slot(&vm.name);
        if self.vms[i].uuid != vm.uuid {
            let mut state = std::mem::take(&mut self.vms[i]);
            if !state.uuid.is_empty() {
                let at = self.wall(time_ns);
                self.drop_volatile_at(&mut state, Reason::VmRestarted, at);
            }
            state.uuid.clone_from(&vm.uuid);
            self.vms[i] = state;
        }
        i
    }

    fn drop_volatile(&mut self, vm: &mut Vm, reason: Reason) {
        let at = self.now_wall();
        self.drop_volatile_at(vm, reason, at);
    }

    fn drop_volatile_at(&mut self, vm: &mut Vm, reason: Reason, at: i64) {
        self.flush_sends(vm, |_, _| true);
        let mut keys: Vec<ObjectKey> = vm
            .set
            .objects()
            .map(|o| o.object)
            .filter(|k| !matches!(k, ObjectKey::File { .. }))
            .collect();
        keys.sort();
        for key in keys {
            let label = vm.set.label(&key);
            self.emit(
                vm,
                at,
                Change::Removed {
                    object: key,
                    label,
                    reason,
                },
            );
        }
        vm.aux = Aux::new(&self.config.limits);
    }

    /// Persists, applies and hands out one change of `vm`.
    pub(crate) fn emit(&mut self, vm: &mut Vm, at_ns: i64, change: Change) {
        let mut ev = DeltaEvent {
            id: 0,
            vm: vm.name.clone(),
            uuid: vm.uuid.clone(),
            at_ns,
            change,
        };
        self.persist(&mut ev);
        vm.set.apply(&ev);
        vm.graph.apply(&ev);
        self.out.push(ev);
    }

    fn persist(&mut self, ev: &mut DeltaEvent) {
        if !self.unsaved.is_empty() {
            self.retry_unsaved();
        }
        if self.unsaved.is_empty() {
            match self.store.append(std::slice::from_mut(ev)) {
                Ok(()) => return,
                Err(e) => self.last_store_error = Some(e.to_string()),
            }
        }
        // Behind the older unsaved ones, to keep the log's order.
        if self.unsaved.len() >= MAX_UNSAVED {
            self.unsaved.pop_front();
            self.lost += 1;
        }
        self.unsaved.push_back(ev.clone());
    }

    fn retry_unsaved(&mut self) {
        let mut batch: Vec<DeltaEvent> = self.unsaved.drain(..).collect();
        match self.store.append(&mut batch) {
            Ok(()) => self.last_store_error = None,
            Err(e) => {
                self.last_store_error = Some(e.to_string());
                self.unsaved.extend(batch);
            }
        }
    }

    /// Makes `key` managed (unless it is, or the VM is at its limit), then
    /// what follows from it at once: a process's shared writable mappings,
    /// the processes sharing a file's mapping, a socket's other end.
    /// Returns whether `key` is managed afterwards.
    pub(crate) fn manage(
        &mut self,
        vm: &mut Vm,
        key: ObjectKey,
        info: ObjectInfo,
        edge: Edge,
        at: i64,
    ) -> bool {
        let mut work = VecDeque::from([(key, info, edge)]);
        while let Some((k, info, edge)) = work.pop_front() {
            if vm.set.contains(&k) {
                continue;
            }
            let limit = self.config.limits.objects_per_vm;
            if vm.set.len() >= limit {
                vm.stats.objects_dropped += 1;
                if !vm.overflow_reported {
                    vm.overflow_reported = true;
                    self.emit(
                        vm,
                        at,
                        Change::Overflow {
                            what: "managed objects".into(),
                            limit,
                        },
                    );
                }
                continue;
            }
            let seq = edge.seq;
            self.emit(
                vm,
                at,
                Change::Added {
                    object: k,
                    info,
                    edge,
                },
            );
            let src = Source {
                vm: None,
                object: k,
                label: vm.set.label(&k),
            };
            let edge = |syscall: &str| Edge {
                syscall: syscall.to_string(),
                from: Some(src.clone()),
                seq,
            };
            match k {
                ObjectKey::Process { tgid } => {
                    for m in vm
                        .aux
                        .mappings
                        .iter()
                        .filter(|m| m.tgid == tgid && m.writable)
                    {
                        let info = ObjectInfo::File {
                            names: vec![m.name.clone()],
                        };
                        work.push_back((m.file, info, edge("mmap")));
                    }
                }
                ObjectKey::File { .. } => {
                    for m in vm.aux.mappings.iter().filter(|m| m.file == k && m.readable) {
                        let info = ObjectInfo::Process {
                            comm: m.comm.clone(),
                            exe: vm.aux.procs.get(&m.tgid).and_then(|p| p.exe.clone()),
                        };
                        work.push_back((ObjectKey::Process { tgid: m.tgid }, info, edge("mmap")));
                    }
                }
                ObjectKey::Socket { ino } => {
                    if let Some(peer) = vm.aux.sockets.get(&ino).and_then(|s| s.linked) {
                        let info = socket_info(vm, peer, None);
                        work.push_back((ObjectKey::Socket { ino: peer }, info, edge("peer")));
                    }
                }
                ObjectKey::Pipe { .. } => {}
            }
        }
        vm.set.contains(&key)
    }

    /// What a newly managed process is called.
    pub(crate) fn proc_info(&self, vm: &Vm, tgid: u32, comm: &str) -> ObjectInfo {
        ObjectInfo::Process {
            comm: comm.to_string(),
            exe: vm.aux.procs.get(&tgid).and_then(|p| p.exe.clone()),
        }
    }

    /// The managed file named `path` other than `new_key` loses that name
    /// (its last name: it leaves, `replaced`).
    pub(crate) fn take_name(
        &mut self,
        vm: &mut Vm,
        path: &str,
        new_key: ObjectKey,
        at: i64,
        syscall: &str,
        by: Option<ProcRef>,
    ) {
        if let Some(old) = vm.set.by_name(path) {
            if old != new_key {
                self.drop_name(vm, old, path, at, syscall, by, Reason::Replaced);
            }
        }
    }

    /// `key` loses `name`; without names left it leaves for `reason`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn drop_name(
        &mut self,
        vm: &mut Vm,
        key: ObjectKey,
        name: &str,
        at: i64,
        syscall: &str,
        by: Option<ProcRef>,
        reason: Reason,
    ) {
        let names = vm.set.file_names(&key);
        if names.len() <= 1 {
            let label = vm.set.label(&key);
            self.emit(
                vm,
                at,
                Change::Removed {
                    object: key,
                    label,
                    reason,
                },
            );
        } else {
            self.emit(
                vm,
                at,
                Change::Renamed {
                    object: key,
                    from: Some(name.to_string()),
                    to: None,
                    syscall: syscall.to_string(),
                    by,
                },
            );
        }
    }

    /// Process `tgid` ended: it leaves management, its helper entries go.
    pub(crate) fn process_exit(&mut self, vm: &mut Vm, tgid: u32, mono_ns: u64, reason: Reason) {
        self.flush_sends(vm, |k, _| k.0 == tgid);
        vm.aux.sends.retain(|k, _| k.0 != tgid);
        let key = ObjectKey::Process { tgid };
        if vm.set.contains(&key) {
            let label = vm.set.label(&key);
            let at = self.wall(mono_ns);
            self.emit(
                vm,
                at,
                Change::Removed {
                    object: key,
                    label,
                    reason,
                },
            );
        }
        let aux = vm.aux.procs.remove(&tgid);
        vm.aux.mappings.retain(|m| m.tgid != tgid);
        vm.aux.pairs.retain(|p| p.tgid != tgid);
        vm.aux.clone3.remove(&tgid);
        vm.aux.pending.retain(|_, c| c.tgid != tgid);
        vm.aux.exited.insert(
            tgid,
            ExitedProc {
                at_ns: mono_ns,
                aux,
            },
        );
    }

    /// Emits the summed sends of `vm` that `pick` selects and resets them.
    pub(crate) fn flush_sends(
        &mut self,
        vm: &mut Vm,
        pick: impl Fn(&(u32, NetAddr), &SendAgg) -> bool,
    ) {
        let mut due: Vec<((u32, NetAddr), SendAgg)> = vm
            .aux
            .sends
            .iter()
            .filter(|(k, a)| a.calls > 0 && pick(k, a))
            .map(|(k, a)| (k.clone(), a.clone()))
            .collect();
        due.sort_by_key(|(_, a)| a.last_ns);
        for (k, a) in due {
            if let Some(agg) = vm.aux.sends.get_mut(&k) {
                agg.bytes = 0;
                agg.calls = 0;
                agg.last_emit_ns = a.last_ns;
            }
            let at = self.wall(a.last_ns);
            self.emit(
                vm,
                at,
                Change::Send {
                    by: a.by,
                    socket: a.socket,
                    dst: k.1,
                    to_vm: a.to_vm,
                    bytes: a.bytes,
                    calls: a.calls,
                },
            );
        }
    }

    /// Which other watched VM owns `ip`.
    pub(crate) fn owner_other(&self, this: &str, ip: IpAddr) -> Option<String> {
        let ip = canonical(ip);
        let mut owners: Vec<&String> = self
            .addrs
            .iter()
            .filter(|(vm, a)| vm.as_str() != this && a.contains(&ip))
            .map(|(vm, _)| vm)
            .collect();
        owners.sort();
        owners.first().map(|s| s.to_string())
    }

    pub(crate) fn owns(&self, vm: &str, ip: IpAddr) -> bool {
        self.addrs
            .get(vm)
            .is_some_and(|a| a.contains(&canonical(ip)))
    }

    /// Whether `flow` went to the socket described by `s` in VM `vm`:
    /// its peer is one of the sender VM's addresses (and the sender's port,
    /// if known), the flow's destination is this VM's and its port is the
    /// socket's (if known). `t_ns`: when `vm`'s side was seen, if it must be
    /// close to the flow's time.
    pub(crate) fn flow_matches(
        &self,
        flow: &Flow,
        vm: &str,
        s: &SocketState,
        t_ns: Option<u64>,
    ) -> bool {
        let Some(peer) = s.peer.as_ref().and_then(NetAddr::inet) else {
            return false;
        };
        if flow.src_vm == vm || !self.owns(&flow.src_vm, peer.ip()) || !self.owns(vm, flow.dst.ip())
        {
            return false;
        }
        if flow.src_port.is_some_and(|p| p != peer.port()) {
            return false;
        }
        let local_port = s.local.as_ref().and_then(NetAddr::inet).map(|l| l.port());
        if local_port.is_some_and(|p| p != 0 && p != flow.dst.port()) {
            return false;
        }
        t_ns.is_none_or(|t| {
            t.saturating_add(self.config.flow_ttl_ns) >= flow.start_ns
                && t <= flow.last_ns.saturating_add(self.config.flow_ttl_ns)
        })
    }

    /// A managed send from `vm` to another watched VM: remember the flow and
    /// match it against the receiving VM's sockets seen so far.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn flow(
        &mut self,
        vm: &mut Vm,
        by: ProcRef,
        socket: u64,
        dst: SocketAddr,
        to_vm: &str,
        syscall: &'static str,
        time_ns: u64,
    ) {
        let Some(&src_slot) = self.index.get(&vm.name) else {
            return;
        };
        let key: FlowKey = (src_slot, socket, by.tgid, dst);
        if let Some(f) = self.flows.get_mut(&key) {
            f.last_ns = f.last_ns.max(time_ns);
            return;
        }
        let src_port = vm
            .aux
            .sockets
            .get(&socket)
            .and_then(|s| s.local.as_ref())
            .and_then(NetAddr::inet)
            .map(|a| a.port())
            .filter(|&p| p != 0);
        let flow = Flow {
            src_vm: vm.name.clone(),
            by,
            src_port,
            dst,
            syscall,
            start_ns: time_ns,
            last_ns: time_ns,
        };
        self.flows.insert(key, flow.clone());
        let Some(&j) = self.index.get(to_vm) else {
            return;
        };
        if j == src_slot {
            return;
        }
        let mut other = std::mem::take(&mut self.vms[j]);
        let mut matched: Vec<u64> = other
            .aux
            .sockets
            .iter()
            .filter(|(_, s)| self.flow_matches(&flow, &other.name, s, None))
            .map(|(ino, _)| *ino)
            .collect();
        matched.sort();
        let at = self.wall(time_ns);
        for ino in matched {
            self.cross_manage(&mut other, ino, &flow, at);
        }
        self.vms[j] = other;
    }

    /// Socket `ino` of `vm` received `flow`: it becomes managed with an edge
    /// naming the sending VM, then the reads from it already seen (after the
    /// flow began) and what their readers wrote since are replayed.
    pub(crate) fn cross_manage(&mut self, vm: &mut Vm, ino: u64, flow: &Flow, at: i64) {
        let key = ObjectKey::Socket { ino };
        if vm.set.contains(&key) {
            return;
        }
        let edge = Edge {
            syscall: flow.syscall.to_string(),
            from: Some(Source {
                vm: Some(flow.src_vm.clone()),
                object: ObjectKey::Process { tgid: flow.by.tgid },
                label: flow.by.to_string(),
            }),
            seq: None,
        };
        let info = socket_info(vm, ino, None);
        if !self.manage(vm, key, info, edge, at) {
            return;
        }
        let reads: Vec<RecentIo> = vm
            .aux
            .recent_reads
            .iter()
            .filter(|r| r.object == key && r.time_ns >= flow.start_ns)
            .cloned()
            .collect();
        vm.aux
            .recent_reads
            .retain(|r| !(r.object == key && r.time_ns >= flow.start_ns));
        for r in reads {
            let p = ObjectKey::Process { tgid: r.tgid };
            if vm.set.contains(&p) {
                continue;
            }
            let edge = Edge {
                syscall: r.syscall.to_string(),
                from: Some(Source {
                    vm: None,
                    object: key,
                    label: vm.set.label(&key),
                }),
                seq: Some(r.seq),
            };
            let info = self.proc_info(vm, r.tgid, &r.comm);
            let at = self.wall(r.time_ns);
            if self.manage(vm, p, info, edge, at) {
                self.settle_late(vm, r.tgid, r.time_ns);
            }
        }
    }
}

fn slot_in(
    vms: &mut Vec<Vm>,
    index: &mut HashMap<String, usize>,
    limits: &Limits,
    name: &str,
) -> usize {
    if let Some(&i) = index.get(name) {
        return i;
    }
    let i = vms.len();
    vms.push(Vm {
        name: name.to_string(),
        aux: Aux::new(limits),
        ..Vm::default()
    });
    index.insert(name.to_string(), i);
    i
}

/// What a newly managed socket is called, with its known addresses.
pub(crate) fn socket_info(vm: &Vm, ino: u64, name: Option<&str>) -> ObjectInfo {
    let s = vm.aux.sockets.get(&ino);
    ObjectInfo::Socket {
        name: name.map_or_else(|| format!("socket:[{ino}]"), str::to_string),
        local: s.and_then(|s| s.local.clone()),
        peer: s.and_then(|s| s.peer.clone()),
    }
}

/// A registrable path: absolute, normalized, bounded, no NUL.
fn check_path(path: &str) -> Result<String, DiffusionError> {
    if path.contains('\0') || path.len() > paths::MAX_PATH {
        return Err(DiffusionError::BadPath {
            max: paths::MAX_PATH,
        });
    }
    if !path.starts_with('/') {
        return Err(DiffusionError::RelativePath(path.to_string()));
    }
    paths::normalize(path).ok_or(DiffusionError::BadPath {
        max: paths::MAX_PATH,
    })
}

pub(crate) fn bound_push(aux: &mut Aux, ep: Endpoint, ino: u64) {
    if let Some(v) = aux.bound.entry(ep, Vec::new) {
        v.retain(|&i| i != ino);
        if v.len() >= MAX_BOUND_PER_ENDPOINT {
            v.remove(0);
        }
        v.push(ino);
    }
}
