//! One OS thread per watched VM: polls its ring every few milliseconds,
//! feeds every record to the engines, keeps the ring's filter equal to what
//! the registry wants, and notices when QEMU dies.
//!
//! Why a thread and not a task: polling a shared-memory ring is a tight,
//! blocking loop that must never wait for the async side. The thread only
//! talks to the rest through atomics, one small mutex (the wanted filter),
//! and broadcast channels whose `send` never blocks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use events::{Filter, RingReader};

use crate::engine::{Engine, Interest, VmContext};

/// What a watched VM is doing, as `/v1/vms` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Watching,
    /// QEMU is gone (the `vm_stopped` event was sent).
    Stopped(String),
    /// Could not be attached (the message says what to do).
    Error(String),
}

/// State shared between a VM's pump thread and the registry / API.
pub struct Shared {
    pub status: Mutex<Status>,
    /// Counters copied from the ring header by the pump.
    pub records: AtomicU64,
    pub dropped: AtomicU64,
    pub unpaired: AtomicU64,
    /// Calls the plugin left out because an engine did not need them.
    pub quieted: AtomicU64,
    /// Log doorbells the plugin refused (per-process limit).
    pub log_refused: AtomicU64,
    /// Records the pump read from the ring.
    pub read: AtomicU64,
    /// Events the engines published.
    pub published: Arc<AtomicU64>,
    /// What the subscribers want in the filter; bumped generation on change.
    want: Mutex<Interest>,
    want_gen: AtomicU64,
    /// The generation the pump has put into the ring.
    applied_gen: AtomicU64,
    /// What the ring's filter is now (subscribers' union | engines' interest).
    applied: Mutex<Interest>,
    stop: AtomicBool,
}

impl Shared {
    pub fn new(status: Status) -> Shared {
        Shared {
            status: Mutex::new(status),
            records: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            unpaired: AtomicU64::new(0),
            quieted: AtomicU64::new(0),
            log_refused: AtomicU64::new(0),
            read: AtomicU64::new(0),
            published: Arc::new(AtomicU64::new(0)),
            want: Mutex::new(Interest::default()),
            want_gen: AtomicU64::new(0),
            applied_gen: AtomicU64::new(0),
            applied: Mutex::new(Interest::default()),
            stop: AtomicBool::new(false),
        }
    }

    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// Asks the pump to put `want` into the ring; returns the generation to
    /// wait for with [`Shared::applied`].
    pub fn want(&self, want: Interest) -> u64 {
        let mut w = lock(&self.want);
        *w = want;
        self.want_gen.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether the pump has applied generation `gen` (or stopped: then it never will).
    pub fn applied(&self, gen: u64) -> bool {
        self.applied_gen.load(Ordering::Acquire) >= gen || self.stop.load(Ordering::Acquire)
    }

    /// The filter in the ring now.
    pub fn ring_filter(&self) -> Interest {
        *lock(&self.applied)
    }

    /// Asks the pump to put the filter back to `none`, release the ring and end.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// A mutex poisoned by a panicking holder still guards plain data that is
/// valid at every step; keep going rather than take the daemon down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tuning of a pump.
#[derive(Debug, Clone, Copy)]
pub struct PumpConfig {
    /// Sleep when the ring was empty.
    pub idle_sleep: Duration,
    /// Engines' tick period.
    pub tick: Duration,
    /// How often an idle pump checks that QEMU lives.
    pub alive_check: Duration,
    /// Log doorbells per second and burst allowed per guest process, in
    /// the plugin (before the ring: a flooder cannot crowd others out).
    pub log_rate: u64,
    pub log_burst: u64,
}

impl Default for PumpConfig {
    fn default() -> PumpConfig {
        PumpConfig {
            idle_sleep: Duration::from_millis(2),
            tick: Duration::from_millis(50),
            alive_check: Duration::from_millis(100),
            log_rate: 1000,
            log_burst: 20_000,
        }
    }
}

/// Starts the pump of one VM. `alive` says whether the ring's writer (QEMU)
/// still runs.
pub fn spawn(
    ctx: Arc<VmContext>,
    reader: RingReader,
    shared: Arc<Shared>,
    engines: Vec<Box<dyn Engine>>,
    alive: Box<dyn Fn() -> bool + Send>,
    config: PumpConfig,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("pump-{}", ctx.name))
        .spawn(move || run(&ctx, reader, &shared, engines, &*alive, config))
}

fn run(
    ctx: &VmContext,
    mut reader: RingReader,
    shared: &Shared,
    mut engines: Vec<Box<dyn Engine>>,
    alive: &dyn Fn() -> bool,
    config: PumpConfig,
) {
    let mut applied_gen = u64::MAX;
    let mut applied = Interest::default();
    let mut quiet = AppliedQuiet::default();
    reader.set_log_limit(config.log_rate, config.log_burst);
    let mut last_tick = Instant::now();
    let mut last_alive = Instant::now();
    let mut last_dropped = reader.dropped();
    let mut qemu_gone = false;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        apply_filter(
            &reader,
            shared,
            &engines,
            &mut applied_gen,
            &mut applied,
            ctx,
        );
        apply_quiet(&reader, shared, &engines, &mut quiet);
        let now = Instant::now();
        let mut n = 0u64;
        for rec in reader.poll() {
            n += 1;
            for e in engines.iter_mut() {
                e.on_record(ctx, &rec, now);
            }
        }
        shared.read.fetch_add(n, Ordering::Relaxed);
        shared.records.store(reader.records(), Ordering::Relaxed);
        shared.unpaired.store(reader.unpaired(), Ordering::Relaxed);
        shared.quieted.store(reader.quieted(), Ordering::Relaxed);
        shared
            .log_refused
            .store(reader.log_dropped(), Ordering::Relaxed);
        let dropped = reader.dropped();
        shared.dropped.store(dropped, Ordering::Relaxed);
        if dropped > last_dropped {
            for e in engines.iter_mut() {
                e.on_dropped(ctx, dropped - last_dropped);
            }
            last_dropped = dropped;
        }
        if now.duration_since(last_tick) >= config.tick {
            last_tick = now;
            for e in engines.iter_mut() {
                e.on_tick(ctx, now);
            }
        }
        if qemu_gone {
            // That was the last drain after QEMU went away.
            break;
        }
        if n == 0 {
            if now.duration_since(last_alive) >= config.alive_check {
                last_alive = now;
                // Drain once more (records QEMU published before dying), then report.
                qemu_gone = !alive();
                if qemu_gone {
                    continue;
                }
            }
            std::thread::sleep(config.idle_sleep);
        }
    }
    if qemu_gone {
        tracing::info!("{}: QEMU is gone; the VM stopped", ctx.name);
        *lock(&shared.status) = Status::Stopped(format!(
            "QEMU (pid {}) exited: restart the VM with `vmwatch lab up {}`",
            reader.writer_pid(),
            ctx.name
        ));
        for e in engines.iter_mut() {
            e.on_vm_stopped(ctx);
        }
    } else {
        // Stopped watching a live VM: leave the guest at near-zero cost.
        reader.set_filter(&Filter::NONE);
        reader.set_fds(&Filter::NONE);
        reader.set_quiet(&Filter::NONE, &[]);
        *lock(&shared.applied) = Interest::default();
    }
    // Unblock anyone waiting for a filter generation.
    shared.stop.store(true, Ordering::Release);
    drop(reader); // releases the ring's reader lock
}

fn apply_filter(
    reader: &RingReader,
    shared: &Shared,
    engines: &[Box<dyn Engine>],
    applied_gen: &mut u64,
    applied: &mut Interest,
    ctx: &VmContext,
) {
    let gen = shared.want_gen.load(Ordering::Acquire);
    let mut want = *lock(&shared.want);
    for e in engines {
        let i = e.interest();
        for k in 0..want.syscalls.words.len() {
            want.syscalls.words[k] |= i.syscalls.words[k];
            want.fds.words[k] |= i.fds.words[k];
        }
    }
    if want != *applied || *applied_gen == u64::MAX {
        reader.set_filter(&want.syscalls);
        reader.set_fds(&want.fds);
        *applied = want;
        *lock(&shared.applied) = want;
        tracing::debug!("{}: ring filter changed", ctx.name);
    }
    if gen != *applied_gen {
        *applied_gen = gen;
        shared.applied_gen.store(gen, Ordering::Release);
    }
}

/// What the ring's quiet table holds now.
#[derive(Default)]
struct AppliedQuiet {
    syscalls: Option<Filter>,
    version: u64,
}

/// Puts the engines' quiet calls into the ring, less any syscall a
/// subscriber wants to see (a trace of `read` must show every read).
fn apply_quiet(
    reader: &RingReader,
    shared: &Shared,
    engines: &[Box<dyn Engine>],
    applied: &mut AppliedQuiet,
) {
    let subscribed = lock(&shared.want).syscalls;
    let mut quiets = engines.iter().filter_map(|e| e.quiet());
    let (mut syscalls, members, version) = match quiets.next() {
        Some(q) => (q.syscalls, q.members.as_slice(), q.version),
        None => (Filter::NONE, &[][..], 0),
    };
    // A second quieting engine would need the intersection of both; there
    // is one today, so a second one simply turns quieting off.
    if quiets.next().is_some() {
        syscalls = Filter::NONE;
    }
    for (w, s) in syscalls.words.iter_mut().zip(subscribed.words) {
        *w &= !s;
    }
    if applied.syscalls == Some(syscalls) && applied.version == version {
        return;
    }
    let members: &[(u64, u32)] = if syscalls == Filter::NONE {
        &[]
    } else {
        members
    };
    reader.set_quiet(&syscalls, members);
    applied.syscalls = Some(syscalls);
    applied.version = version;
}
