//! The engine boundary: what the pump of each VM hands to every engine.
//!
//! An engine sees one VM's records in ring order on that VM's pump thread
//! (so it needs no locking of its own), a periodic tick, ring losses, and the
//! VM's end. It publishes what it makes through the [`EventSink`] it was
//! built with. The tracer is the first engine; the diffusion tracker and the
//! log vault of later issues consume the same records the same way, and say
//! which syscalls they always need through [`Engine::interest`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use events::{Filter, Record};
use tokio::sync::broadcast;
use tracer::{GuestResolver, State, TraceEvent, Tracer};

/// The VM an engine works for.
#[derive(Debug, Clone)]
pub struct VmContext {
    pub name: String,
    /// SMBIOS UUID: every event carries it beside the name.
    pub uuid: String,
    /// `uname -r` of the guest.
    pub kernel_release: String,
    /// The lab VM (cache and vm.json), when the VM is a lab VM: engines that
    /// read guest RAM open it from here.
    pub lab: Option<lab::VmInfo>,
    /// The lab cache the VM lives in.
    pub cache: std::path::PathBuf,
}

/// Syscalls an engine needs recorded whether or not anyone subscribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    pub syscalls: Filter,
    /// Syscalls whose fds the plugin should resolve to file identities.
    pub fds: Filter,
}

impl Default for Interest {
    fn default() -> Interest {
        Interest {
            syscalls: Filter::NONE,
            fds: Filter::NONE,
        }
    }
}

/// Calls an engine does not need from some processes, so the plugin can
/// leave them out (see `events::RingReader::set_quiet`): `syscalls` made by
/// the thread-group leaders in `members` (task_struct address, tgid).
/// `version` changes whenever the rest does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quiet {
    pub syscalls: Filter,
    pub members: Vec<(u64, u32)>,
    pub version: u64,
}

/// One engine of one VM. Called on that VM's pump thread only.
pub trait Engine: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// What the engine needs in the ring's filter on its own (the pump ORs it
    /// with what the API's subscribers ask for). Polled on every pump pass,
    /// so it may change at run time; keep it cheap.
    fn interest(&self) -> Interest {
        Interest::default()
    }

    /// Calls this engine does not need (`None`: it needs every call it asked
    /// for). The pump quiets a call only if no subscriber and no other
    /// engine needs it. Polled on every pump pass: keep it cheap.
    fn quiet(&self) -> Option<&Quiet> {
        None
    }

    /// One record, in ring order. Records of syscalls nobody asked for may
    /// appear (returns of calls that entered before a filter change).
    fn on_record(&mut self, vm: &VmContext, rec: &Record, now: Instant);

    /// Called every few tens of milliseconds (also when no record came).
    fn on_tick(&mut self, _vm: &VmContext, _now: Instant) {}

    /// `lost` records were dropped by the plugin because the ring was full.
    fn on_dropped(&mut self, _vm: &VmContext, _lost: u64) {}

    /// The VM's QEMU is gone; no more records will come. The engine is
    /// dropped after this.
    fn on_vm_stopped(&mut self, _vm: &VmContext) {}
}

/// A [`TraceEvent`] as subscribers get it: the event (for filtering) and its
/// NDJSON line, serialised once however many subscribers there are.
#[derive(Debug)]
pub struct Published {
    pub ev: TraceEvent,
    pub line: Bytes,
}

/// Where an engine's events go: the VM's own channel and the merged one.
/// Sending never blocks: a subscriber that falls behind by more than the
/// channel's capacity loses the oldest events and is told how many.
#[derive(Clone)]
pub struct EventSink {
    vm: broadcast::Sender<Arc<Published>>,
    all: broadcast::Sender<Arc<Published>>,
    published: Arc<AtomicU64>,
}

impl EventSink {
    pub fn new(
        vm: broadcast::Sender<Arc<Published>>,
        all: broadcast::Sender<Arc<Published>>,
        published: Arc<AtomicU64>,
    ) -> EventSink {
        EventSink { vm, all, published }
    }

    /// Whether anyone listens (engines may skip work when not).
    pub fn listened(&self) -> bool {
        self.vm.receiver_count() > 0 || self.all.receiver_count() > 0
    }

    pub fn publish(&self, ev: TraceEvent) {
        self.published.fetch_add(1, Ordering::Relaxed);
        if !self.listened() {
            return;
        }
        // Sized for a typical event at once: growing from serde's default
        // was a measurable share of the pump's time in a syscall storm.
        let mut line = Vec::with_capacity(1024);
        match serde_json::to_writer(&mut line, &ev) {
            Ok(()) => {}
            Err(e) => {
                // TraceEvent has only plain fields; this cannot happen, but a
                // daemon must not die of it.
                tracing::error!("cannot serialise an event of `{}`: {e}", ev.vm);
                return;
            }
        };
        line.push(b'\n');
        let p = Arc::new(Published {
            ev,
            line: line.into(),
        });
        // Err only means nobody listens on that channel right now.
        let _ = self.vm.send(Arc::clone(&p));
        let _ = self.all.send(p);
    }
}

/// The tracer engine: records into strace-like [`TraceEvent`]s.
pub struct TracerEngine {
    tracer: Tracer,
    sink: EventSink,
    out: Vec<TraceEvent>,
    /// Whether opening the guest resolver was tried (it is opened only when a
    /// record without a thread shows up: lab VMs' plugins name every thread).
    resolver_tried: bool,
    /// No subscriber at the last record: events are not being built.
    idle: bool,
}

impl TracerEngine {
    pub fn new(vm: &VmContext, sink: EventSink) -> TracerEngine {
        TracerEngine {
            tracer: Tracer::new(&vm.name, &vm.uuid),
            sink,
            out: Vec::new(),
            resolver_tried: false,
            idle: false,
        }
    }

    fn flush(&mut self) {
        for ev in self.out.drain(..) {
            self.sink.publish(ev);
        }
    }
}

impl Engine for TracerEngine {
    fn name(&self) -> &'static str {
        "tracer"
    }

    fn on_record(&mut self, vm: &VmContext, rec: &Record, now: Instant) {
        // Nobody reads trace events (the records are here for another
        // engine): building them would be most of the daemon's work in a
        // syscall storm. Entries waiting for a return are forgotten; a later
        // subscriber sees those returns as unpaired.
        if !self.sink.listened() {
            if !self.idle {
                self.tracer.forget_pending();
                self.idle = true;
            }
            return;
        }
        self.idle = false;
        if !rec.has_task() && !self.resolver_tried {
            self.resolver_tried = true;
            if let Some(info) = &vm.lab {
                match lab::Vm::open_in(&vm.cache, &info.name)
                    .map_err(anyhow_free)
                    .and_then(|v| GuestResolver::open(&v).map_err(|e| format!("{e:#}")))
                {
                    Ok(r) => self.tracer.resolver = Some(r),
                    Err(e) => tracing::warn!(
                        "{}: processes of thread-less records not named: {e}",
                        vm.name
                    ),
                }
            }
        }
        self.tracer.feed(rec, now, &mut self.out);
        self.flush();
    }

    fn on_tick(&mut self, _vm: &VmContext, now: Instant) {
        if self.idle {
            return;
        }
        self.tracer.tick(now, &mut self.out);
        self.flush();
    }

    fn on_dropped(&mut self, _vm: &VmContext, lost: u64) {
        self.sink.publish(self.tracer.dropped(lost));
    }

    fn on_vm_stopped(&mut self, _vm: &VmContext) {
        let ev = self.tracer.stopped();
        debug_assert_eq!(ev.state, State::VmStopped);
        self.sink.publish(ev);
    }
}

fn anyhow_free(e: lab::LabError) -> String {
    e.to_string()
}
