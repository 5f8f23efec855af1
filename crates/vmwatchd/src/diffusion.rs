//! The diffusion tracker inside the daemon (issue 4).
//!
//! One [`DiffusionService`] holds the `diffusion` crate's engine for every
//! VM (cross-VM flows need one engine that sees all of them) and its SQLite
//! history under the state directory. Each watched VM gets a
//! [`DiffusionVmEngine`] on its pump thread that feeds the records in and
//! publishes the resulting delta events. While no path is registered in any
//! VM the engine asks for no syscalls, so an untracked fleet pays nothing.
//!
//! Records alone cannot tell everything: a process killed by a signal makes
//! no `exit_group`, and the last `close` of a pipe or socket is invisible
//! among many. So once a second the adapter also lists the guest's
//! processes and open fds from its RAM (vmi) and removes managed processes,
//! pipes and sockets that are gone (after two sweeps in a row agree, so a
//! record still in the ring cannot lose a race with the sweep).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use diffusion::{DeltaEvent, DiffusionEngine, DiffusionError, ObjectKey, OpenFile, VmRef};
use events::Record;
use tokio::sync::broadcast;

use crate::engine::{Engine, Interest, Quiet, VmContext};

/// Delta events buffered for `diffusion log --follow` streams.
pub const DELTA_CHANNEL: usize = 16384;
/// How often each VM's processes and fds are compared with the managed set.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How often the quiet table is brought up to date with the managed set.
pub const QUIET_EVERY: Duration = Duration::from_millis(100);
/// Thread-group leaders remembered per VM (tgid -> task_struct).
const MAX_LEADERS: usize = 65_536;

/// Reads by a process that is managed already add nothing: the plugin may
/// leave them out. (Socket receives stay recorded: their sender addresses
/// link flows.)
const QUIET_SYSCALLS: &str = "read,pread64,readv,preadv,preadv2";

/// The engine shared by every VM's pump and the API.
pub struct DiffusionService {
    engine: Mutex<DiffusionEngine>,
    deltas: broadcast::Sender<Arc<DeltaEvent>>,
    /// Whether any VM has a registered path (then every watched VM records
    /// what the engine needs: content may flow into a VM without one).
    active: AtomicBool,
}

impl DiffusionService {
    /// Opens (or creates) the history under `data_dir` and rebuilds every
    /// VM's managed set from it.
    pub fn open(data_dir: &Path) -> Result<Arc<DiffusionService>, DiffusionError> {
        let engine = DiffusionEngine::open(data_dir, diffusion::Config::default())?;
        let svc = DiffusionService {
            engine: Mutex::new(engine),
            deltas: broadcast::channel(DELTA_CHANNEL).0,
            active: AtomicBool::new(false),
        };
        svc.refresh_active();
        Ok(Arc::new(svc))
    }

    /// The engine (API reads: graphs, history, registrations).
    pub fn engine(&self) -> MutexGuard<'_, DiffusionEngine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Recomputes [`DiffusionService::active`] from the registrations.
    pub fn refresh_active(&self) {
        let e = self.engine();
        let any = e.vms().iter().any(|vm| !e.track_list(vm).is_empty());
        self.active.store(any, Ordering::Release);
    }

    /// Turns recording on before a registration, so nothing between the
    /// bootstrap scan and the registration is missed.
    pub fn activate(&self) {
        self.active.store(true, Ordering::Release);
    }

    /// Live delta events, for `diffusion log --follow`.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<DeltaEvent>> {
        self.deltas.subscribe()
    }

    /// Logs and broadcasts delta events.
    pub fn publish(&self, evs: Vec<DeltaEvent>) {
        for ev in evs {
            tracing::info!(target: "diffusion", "{}", ev.text());
            // Err only means no follower right now.
            let _ = self.deltas.send(Arc::new(ev));
        }
    }

    /// What the engine needs in a VM's ring while active.
    pub fn interest(&self) -> Interest {
        if !self.active() {
            return Interest::default();
        }
        let i = DiffusionEngine::interest();
        Interest {
            syscalls: i.syscalls,
            fds: i.fds,
        }
    }
}

/// The guest's open fds with the identity of each file, for the bootstrap
/// of a registration (processes that hold the file already).
pub fn open_files(guest: &vmi::linux::LinuxGuest) -> Vec<OpenFile> {
    let listing = guest.open_files(None);
    for w in &listing.warnings {
        tracing::warn!("bootstrap scan: {w:?}");
    }
    listing
        .items
        .iter()
        .filter_map(|f| {
            let id = guest.file_identity(f.file).ok()?;
            Some(OpenFile {
                tgid: u32::try_from(f.pid).ok()?,
                comm: f.comm.clone(),
                fd: i32::try_from(f.fd).ok()?,
                file: diffusion::FileIdentity {
                    dev: id.dev,
                    ino: id.ino,
                    kind: file_kind(&id.kind),
                    path: id.path,
                },
            })
        })
        .collect()
}

fn file_kind(k: &vmi::linux::FileKind) -> events::payload::FileKind {
    use events::payload::FileKind as E;
    use vmi::linux::FileKind as V;
    match k {
        V::Regular => E::Regular,
        V::Directory => E::Directory,
        V::Fifo => E::Fifo,
        V::Pipe => E::Pipe,
        V::Socket => E::Socket,
        V::CharDevice => E::CharDevice,
        V::BlockDevice => E::BlockDevice,
        V::Symlink => E::Symlink,
        V::AnonInode => E::AnonInode,
        V::Unknown => E::Unknown,
    }
}

/// Opens a lab VM's guest for introspection (RAM file, kernel image, profile).
pub fn open_guest(vm: &lab::Vm) -> Result<vmi::linux::LinuxGuest, String> {
    let mem = Arc::new(vm.memory(false).map_err(|e| e.to_string())?);
    let image = vmi::image::KernelImage::open(&vm.info().vmlinux).map_err(|e| e.to_string())?;
    let profile =
        Arc::new(vmi::linux::KernelProfile::from_image(&image).map_err(|e| format!("{e:#}"))?);
    vmi::linux::LinuxGuest::attach(mem, profile).map_err(|e| format!("{e:#}"))
}

/// One VM's side of the diffusion service, on that VM's pump thread.
pub struct DiffusionVmEngine {
    svc: Arc<DiffusionService>,
    vm: VmRef,
    guest: Option<vmi::linux::LinuxGuest>,
    guest_tried: bool,
    next_sweep: Instant,
    /// Objects the last sweep found gone (removed when the next one agrees).
    suspects: BTreeSet<ObjectKey>,
    /// tgid -> (the leader's task_struct, seen with another task since).
    /// A tgid whose leader changed while it was managed (pid reuse after a
    /// death the engine has not noticed yet) is never quieted.
    leaders: HashMap<u32, (u64, bool)>,
    quiet: Quiet,
    next_quiet: Instant,
}

impl DiffusionVmEngine {
    pub fn new(svc: Arc<DiffusionService>, ctx: &VmContext) -> DiffusionVmEngine {
        if let Some(net) = ctx.lab.as_ref().and_then(|i| i.network.as_ref()) {
            // The LAN address is what other VMs reach this one at; the slirp
            // address is the same in every VM, so it names none of them.
            svc.engine()
                .set_vm_addresses(&ctx.name, vec![std::net::IpAddr::V4(net.lan_ip)]);
        }
        DiffusionVmEngine {
            svc,
            vm: VmRef::new(&ctx.name, &ctx.uuid),
            guest: None,
            guest_tried: false,
            next_sweep: Instant::now() + SWEEP_EVERY,
            suspects: BTreeSet::new(),
            leaders: HashMap::new(),
            quiet: Quiet {
                syscalls: events::Filter::parse(QUIET_SYSCALLS).unwrap_or(events::Filter::NONE),
                members: Vec::new(),
                version: 0,
            },
            next_quiet: Instant::now(),
        }
    }

    /// Remembers which task leads each thread group.
    fn learn_leader(&mut self, rec: &Record) {
        const EXIT_GROUP: u64 = 231;
        if rec.nr == EXIT_GROUP && rec.has_task() {
            // The group is gone; its tgid may lead another group next.
            self.leaders.remove(&rec.tgid);
            return;
        }
        if !rec.has_task() || rec.pid != rec.tgid || rec.task == 0 {
            return;
        }
        match self.leaders.get_mut(&rec.tgid) {
            Some((task, conflicted)) => {
                if *task != rec.task {
                    *conflicted = true;
                }
            }
            None => {
                if self.leaders.len() >= MAX_LEADERS {
                    self.leaders.clear();
                }
                self.leaders.insert(rec.tgid, (rec.task, false));
            }
        }
    }

    /// The quiet table: managed processes whose leader is known for sure.
    fn update_quiet(&mut self) {
        let managed: BTreeSet<u32> = self
            .svc
            .engine()
            .processes(&self.vm.name)
            .into_iter()
            .collect();
        // A process that left management may come back as another one.
        self.leaders
            .retain(|tgid, (_, conflicted)| !*conflicted || managed.contains(tgid));
        let mut members: Vec<(u64, u32)> = managed
            .iter()
            .filter_map(|tgid| match self.leaders.get(tgid) {
                Some(&(task, false)) => Some((task, *tgid)),
                _ => None,
            })
            .collect();
        members.sort_unstable();
        if members != self.quiet.members {
            self.quiet.members = members;
            self.quiet.version += 1;
        }
    }

    fn guest(&mut self, ctx: &VmContext) -> Option<&vmi::linux::LinuxGuest> {
        if !self.guest_tried {
            self.guest_tried = true;
            if ctx.lab.is_some() {
                match lab::Vm::open_in(&ctx.cache, &ctx.name)
                    .map_err(|e| e.to_string())
                    .and_then(|v| open_guest(&v))
                {
                    Ok(g) => self.guest = Some(g),
                    Err(e) => tracing::warn!(
                        "{}: diffusion cannot read guest RAM ({e}); processes killed by signals and closed pipes/sockets stay managed until their VM stops",
                        ctx.name
                    ),
                }
            }
        }
        self.guest.as_ref()
    }

    /// Removes managed processes, pipes and sockets the guest no longer has.
    fn sweep(&mut self, ctx: &VmContext) {
        let volatile: Vec<ObjectKey> = self
            .svc
            .engine()
            .current(&self.vm.name)
            .into_iter()
            .map(|o| o.object)
            .filter(|k| !matches!(k, ObjectKey::File { .. }))
            .collect();
        if volatile.is_empty() {
            self.suspects.clear();
            return;
        }
        let Some(guest) = self.guest(ctx) else {
            return;
        };
        let files = guest.open_files(None);
        // A walk that met a corrupted list proves nothing about absence.
        if !files.warnings.is_empty() {
            return;
        }
        let procs = guest.processes();
        if !procs.warnings.is_empty() {
            return;
        }
        let live_procs: BTreeSet<u32> = procs
            .items
            .iter()
            .filter_map(|p| u32::try_from(p.tgid).ok())
            .collect();
        let mut held: HashMap<u64, ()> = HashMap::new();
        for f in &files.items {
            held.insert(f.inode, ());
        }
        let gone: BTreeSet<ObjectKey> = volatile
            .into_iter()
            .filter(|k| match *k {
                ObjectKey::Process { tgid } => !live_procs.contains(&tgid),
                ObjectKey::Pipe { ino } | ObjectKey::Socket { ino } => !held.contains_key(&ino),
                ObjectKey::File { .. } => false,
            })
            .collect();
        let confirmed: Vec<ObjectKey> = gone.intersection(&self.suspects).copied().collect();
        self.suspects = gone;
        if confirmed.is_empty() {
            return;
        }
        let mut out = Vec::new();
        {
            let mut e = self.svc.engine();
            for k in confirmed {
                self.suspects.remove(&k);
                match k {
                    ObjectKey::Process { tgid } => out.extend(e.process_gone(&self.vm.name, tgid)),
                    k => out.extend(e.channel_gone(&self.vm.name, k)),
                }
            }
        }
        self.svc.publish(out);
    }
}

impl Engine for DiffusionVmEngine {
    fn name(&self) -> &'static str {
        "diffusion"
    }

    fn interest(&self) -> Interest {
        self.svc.interest()
    }

    fn quiet(&self) -> Option<&Quiet> {
        self.svc.active().then_some(&self.quiet)
    }

    fn on_record(&mut self, _vm: &VmContext, rec: &Record, _now: Instant) {
        if !self.svc.active() {
            return;
        }
        self.learn_leader(rec);
        let evs = self.svc.engine().on_record(&self.vm, rec);
        if !evs.is_empty() {
            self.svc.publish(evs);
        }
    }

    fn on_tick(&mut self, vm: &VmContext, now: Instant) {
        if !self.svc.active() {
            return;
        }
        let evs = self.svc.engine().on_tick();
        if !evs.is_empty() {
            self.svc.publish(evs);
        }
        if now >= self.next_quiet {
            self.next_quiet = now + QUIET_EVERY;
            self.update_quiet();
        }
        if now >= self.next_sweep {
            self.next_sweep = now + SWEEP_EVERY;
            self.sweep(vm);
        }
    }

    fn on_dropped(&mut self, vm: &VmContext, lost: u64) {
        if self.svc.active() {
            tracing::warn!(
                "{}: {lost} syscall records lost (ring full): diffusion may miss edges",
                vm.name
            );
        }
    }

    fn on_vm_stopped(&mut self, _vm: &VmContext) {
        let evs = self.svc.engine().vm_stopped(&self.vm.name);
        self.svc.publish(evs);
    }
}
