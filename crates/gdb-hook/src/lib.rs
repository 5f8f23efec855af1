//! Syscall hooks through QEMU's gdbstub, as papers 000/001 do it on KVM
//! hosts: hardware breakpoints on the guest kernel's syscall entry and
//! return, registers read at each hit, the vCPU moved past the breakpoint,
//! the VM continued. The events are written as [`events::Record`]s into the
//! VM's ring, in the format the TCG plugin writes, so every consumer
//! (`vmwatch trace`, ...) works unchanged with either backend.
//!
//! - [`rsp`]: the GDB remote-protocol client (framing, stop replies,
//!   registers, memory, breakpoints, stepping, interrupt, detach).
//! - [`target`]: register numbers and `g` offsets from QEMU's target description.
//! - [`sites`]: where the breakpoints go (`entry_SYSCALL_64` and the return
//!   of `do_syscall_64` inside it) and how to get past each.
//! - [`pending`]: entry/return pairing per task (the plugin's rule).
//! - [`capture`]: strings, socket addresses and file identities captured at
//!   the call (`events::capture`'s table, read from guest RAM).
//!
//! What it costs: every syscall of every process stops the whole VM once
//! (the entry breakpoint), whatever the filter; a syscall the filter
//! records stops it a second time at its return. Under TCG each stop also
//! flushes QEMU's translation cache: ~4 ms of guest time per stop here
//! (`examples/gdb_cost.rs`), against ~1 us for a plain getpid. It is the
//! mechanism for hosts where the TCG plugin cannot run (KVM), where a stop
//! is a VM exit and a few socket round trips instead.
//!
//! Covered: every 64-bit syscall, entry and return, including returns the
//! kernel makes through `iretq` (`execve`, `rt_sigreturn`, ...): the return
//! breakpoint sits where `do_syscall_64` returns, before the kernel picks
//! `sysretq` or `iretq`. Two hardware breakpoints at most (KVM has four).
//! Records are the plugin's: same pairing rule, the same argument registers
//! (those the call uses; others 0), the same captures; the return's `rip`
//! is the return breakpoint's address and its `cr3` always set.
//!
//! Limits: 64-bit `syscall` only (not `int 0x80`/`sysenter`); the gdbstub
//! takes one client, so this backend excludes a debugger on the same VM;
//! if the monitor dies without detaching, QEMU keeps the breakpoints and
//! the guest freezes at its next syscall until [`GdbHook::release`] (or any
//! gdb client connecting and detaching) clears them.

pub mod capture;
pub mod pending;
pub mod rsp;
pub mod signals;
pub mod sites;
pub mod target;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use events::{Record, RingWriter, FLAG_PAYLOAD_CUT, FLAG_TASK};
use vmi::image::KernelImage;
use vmi::linux::{KernelProfile, LinuxGuest};
use vmi::memory::PhysicalMemory;

use rsp::{Client, RspError, StopReply};
use sites::Resume;
use target::{RegisterMap, TargetError};

/// Lowest kernel-half address: tells the kernel per-cpu base from a user GS base.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
const NR_EXIT: u64 = 60;
const NR_EXIT_GROUP: u64 = 231;
const NR_EXECVE: u64 = 59;
const NR_EXECVEAT: u64 = 322;
const NR_ARCH_PRCTL: u64 = 158;
const ARCH_SET_FS: u64 = 0x1002;
/// Entries recorded between sweeps of the pending table (as the plugin).
const SWEEP_EVERY: u64 = 4096;
/// Bound on the per-vCPU state (QEMU's thread ids come from the target).
const MAX_VCPUS: usize = 1024;
/// `struct pt_regs` (kernel ABI, same order as ptrace's `user_regs_struct`):
/// offsets of `ax` and `sp` in the frame the entry code builds.
const PT_REGS_AX: u64 = 80;
const PT_REGS_SP: u64 = 152;

/// Why the backend could not attach or stopped. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("VM `{0}` was started without a gdbstub: start it with `vmwatch lab up {0} --gdbstub --no-hook`")]
    NoGdbstub(String),
    #[error(transparent)]
    Lab(#[from] lab::LabError),
    #[error("kernel image {path}: {msg}")]
    Image { path: PathBuf, msg: String },
    #[error("cannot find the running kernel in the VM's RAM: {0}")]
    Locate(String),
    #[error(transparent)]
    Sites(#[from] sites::SiteError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Rsp(#[from] RspError),
    #[error("the running kernel's bytes at {what} ({addr:#x}) are not the image's: the VM does not run {vmlinux} (or KASLR was mislocated)")]
    Mismatch {
        what: &'static str,
        addr: u64,
        vmlinux: PathBuf,
    },
    #[error(
        "gdbstub register self-check failed: `{name}` is {from_g:#x} in `g` but {from_p:#x} by `p`"
    )]
    RegisterCheck {
        name: &'static str,
        from_g: u64,
        from_p: u64,
    },
    #[error("the gdbstub lacks `vCont` with step and continue (QEMU >= 2.x has it)")]
    NoVcont,
    #[error("gdbstub {0} does not answer: another client (gdb, another `vmwatch hook gdb`) is probably attached")]
    Busy(PathBuf),
    #[error("the VM is gone (gdbstub reported {0:?})")]
    VmGone(StopReply),
    #[error("the backend is detached")]
    Detached,
}

/// Counters of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Stops at the syscall entry breakpoint (= syscalls entered).
    pub entry_hits: u64,
    /// Stops at the return breakpoint (armed only while a recorded entry
    /// waits for its return, so about the returns recorded).
    pub return_hits: u64,
    /// Stops that were not at our breakpoints (interrupts, stale events).
    pub other_stops: u64,
    /// Single-steps done to get past a breakpoint.
    pub steps: u64,
    /// Times the return breakpoint was inserted or removed.
    pub arm_changes: u64,
    /// Records written to the ring.
    pub records: u64,
    /// Records the ring had no room for.
    pub dropped: u64,
    /// Records whose thread could not be read from guest RAM.
    pub unnamed: u64,
    /// Entries not remembered for pairing (table full).
    pub unpaired: u64,
    /// Entries dropped because their thread died in the syscall.
    pub stale: u64,
    /// Entry stops that repeated the vCPU's previous stop register for
    /// register (the same `syscall` reported twice), not recorded again.
    pub rereported: u64,
    /// Time the VM was held stopped by us: from each stop reply to the
    /// resume (excludes QEMU's own stop/resume work and the protocol wait).
    pub held_ns: u64,
    /// Wall time of [`GdbHook::run`].
    pub run_ns: u64,
}

impl Stats {
    /// One line for humans.
    pub fn summary(&self) -> String {
        let hits = self.entry_hits + self.return_hits;
        let per_hit = self.held_ns.checked_div(hits).unwrap_or(0);
        let per_call = self.held_ns.checked_div(self.entry_hits).unwrap_or(0);
        format!(
            "{hits} breakpoint hits ({} entries, {} returns, {} steps, {} other stops, {} re-reported), {} records, {} dropped, {} unnamed; VM held {:.1} ms in all: {:.1} us per hit, {:.1} us per hooked syscall (host side), over {:.1} s",
            self.entry_hits,
            self.return_hits,
            self.steps,
            self.other_stops,
            self.rereported,
            self.records,
            self.dropped,
            self.unnamed,
            self.held_ns as f64 / 1e6,
            per_hit as f64 / 1e3,
            per_call as f64 / 1e3,
            self.run_ns as f64 / 1e9,
        )
    }
}

/// Options of [`GdbHook::attach`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Deadline of each gdbstub request.
    pub timeout: Duration,
    /// How often [`GdbHook::run`] checks its stop condition while the VM runs.
    pub poll: Duration,
    /// Remove a breakpoint while single-stepping over it (needed under KVM,
    /// where debug registers fire again; TCG's single-step ignores
    /// breakpoints). Default: from the VM's accelerator.
    pub remove_to_step: Option<bool>,
    /// Capture strings, socket addresses and file identities (default on).
    pub capture: bool,
    /// Single-step past both breakpoints even where continuing after a
    /// no-op would do (tests the path kernels without such sites take).
    pub always_step: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(10),
            poll: Duration::from_millis(50),
            remove_to_step: None,
            capture: true,
            always_step: false,
        }
    }
}

/// One breakpoint: run-time address and how to get past it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Site {
    pub addr: u64,
    pub resume: Resume,
}

/// Registers read at a hit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Regs {
    rax: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rsp: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    rip: u64,
    cr3: u64,
    fs_base: u64,
    gs_base: u64,
    k_gs_base: u64,
    eflags: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Stopped by us (connect, a hit): must resume or detach.
    Stopped,
    Running,
    Detached,
}

/// An attached backend: breakpoints set, VM running.
pub struct GdbHook {
    client: Client,
    regs: RegisterMap,
    guest: LinuxGuest,
    entry: Site,
    ret: Site,
    /// Whether the return breakpoint is in.
    ret_armed: bool,
    remove_to_step: bool,
    pending: pending::Table,
    capture: Option<capture::Capture>,
    stats: Stats,
    /// Entries to record before the next sweep of the pending table.
    until_sweep: u64,
    /// Per vCPU (bounded): the registers of its last stop when that stop
    /// was at the entry, to recognise the same hit reported twice.
    last_entry: Vec<Option<Regs>>,
    state: State,
    poll: Duration,
    info: AttachInfo,
}

/// What [`GdbHook::attach`] found, for diagnostics.
#[derive(Debug, Clone)]
pub struct AttachInfo {
    pub entry: Site,
    pub ret: Site,
    pub sysret: Option<u64>,
    pub virtual_slide: u64,
    pub vcpus: usize,
    /// Time the VM was stopped while attaching.
    pub paused: Duration,
}

// The hook runs on its own thread in tests and in the daemon.
const _: () = {
    const fn send<T: Send>() {}
    send::<GdbHook>();
};

fn kernel_base(a: u64, b: u64) -> u64 {
    // The user GS base is always a lower-half address (the kernel refuses
    // others), so the upper-half one is the kernel's per-cpu base.
    if a >= KERNEL_HALF {
        a
    } else {
        b
    }
}

impl GdbHook {
    /// Connects to `vm`'s gdbstub, checks the running kernel against its
    /// image, sets the two hardware breakpoints and lets the VM run. The VM
    /// is stopped from the connection until the breakpoints are in (tens of
    /// milliseconds; see [`AttachInfo::paused`]).
    pub fn attach(vm: &lab::Vm, options: &Options) -> Result<GdbHook, HookError> {
        let info = vm.info();
        let socket = info
            .gdb_socket
            .clone()
            .ok_or_else(|| HookError::NoGdbstub(info.name.clone()))?;
        let image_err = |msg: String| HookError::Image {
            path: info.vmlinux.clone(),
            msg,
        };
        let image = KernelImage::open(&info.vmlinux).map_err(|e| image_err(e.to_string()))?;
        let profile =
            Arc::new(KernelProfile::from_image(&image).map_err(|e| image_err(e.to_string()))?);
        let found = sites::find(&image, &profile.symbols)?;
        let memory: Arc<dyn PhysicalMemory> = Arc::new(vm.memory(false)?);
        let guest = LinuxGuest::attach(Arc::clone(&memory), Arc::clone(&profile))
            .map_err(|e| HookError::Locate(e.to_string()))?;
        let remove_to_step = options
            .remove_to_step
            .unwrap_or(info.accel != lab::Accel::Tcg);
        Self::attach_parts(
            &socket,
            &info.vmlinux,
            &image,
            &found,
            guest,
            memory,
            remove_to_step,
            options,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn attach_parts(
        socket: &Path,
        vmlinux: &Path,
        image: &KernelImage,
        found: &sites::ImageSites,
        guest: LinuxGuest,
        memory: Arc<dyn PhysicalMemory>,
        remove_to_step: bool,
        options: &Options,
    ) -> Result<GdbHook, HookError> {
        let slide = guest.location().virtual_slide;
        let started = Instant::now();
        // The VM stops here. Until the hook is built, the guard detaches on
        // any error (QEMU then drops our breakpoints and resumes the VM).
        let mut guard = DetachGuard(Some(Client::connect(socket, options.timeout)?));
        let client = guard.client();
        match client.query_supported() {
            // QEMU serves one client; a second connection waits unanswered.
            // The guard still queues `D;1`: when QEMU takes this connection
            // later it stops the VM, and that `D` lets it run again.
            Err(RspError::Timeout(_)) => return Err(HookError::Busy(socket.to_path_buf())),
            r => r?,
        };
        // `?` also makes QEMU drop breakpoints a crashed earlier client left.
        let first = client.halt_reason()?;
        if matches!(
            first,
            StopReply::Exited { .. } | StopReply::Terminated { .. }
        ) {
            return Err(HookError::VmGone(first));
        }
        if !client.has_vcont_step()? {
            return Err(HookError::NoVcont);
        }
        let descs = target::registers(&mut |file| {
            let bytes = client
                .read_xfer("features", file)
                .map_err(|e| TargetError::Malformed(format!("{file}: {e}")))?;
            String::from_utf8(bytes)
                .map_err(|_| TargetError::Malformed(format!("{file} is not UTF-8")))
        })?;
        let regs = RegisterMap::new(&descs)?;
        let vcpus = client.thread_ids()?.len();
        check_registers(client, &regs)?;

        // The running kernel must be the image's (same bytes at the sites).
        let mismatch = |what, addr| HookError::Mismatch {
            what,
            addr,
            vmlinux: vmlinux.to_path_buf(),
        };
        let entry_addr = found.entry.wrapping_add(slide);
        let ret_addr = found.ret.wrapping_add(slide);
        let sysret = found.sysret.map(|a| a.wrapping_add(slide));
        let call_at = ret_addr.wrapping_sub(5);
        if client.read_memory(call_at, 5)? != found.call_bytes {
            return Err(mismatch("`call do_syscall_64`", call_at));
        }
        let image_entry = image.read_vaddr(found.entry, 4).unwrap_or_default();
        let entry_code = client.read_memory(entry_addr, 32)?;
        if image_entry.is_empty() || !entry_code.starts_with(image_entry) {
            return Err(mismatch("`entry_SYSCALL_64`", entry_addr));
        }
        if let Some(s) = sysret {
            if client.read_memory(s, 3)? != [0x48, 0x0f, 0x07] {
                return Err(mismatch("`sysretq`", s));
            }
        }
        let ret_code = client.read_memory(ret_addr, 16)?;
        let (entry, ret) = if options.always_step {
            (
                Site {
                    addr: entry_addr,
                    resume: Resume::Step,
                },
                Site {
                    addr: ret_addr,
                    resume: Resume::Step,
                },
            )
        } else {
            let (addr, resume) = sites::entry_site(&entry_code, entry_addr);
            let ret_resume = sites::resume_for(&ret_code, ret_addr);
            (
                Site { addr, resume },
                Site {
                    addr: ret_addr,
                    resume: ret_resume,
                },
            )
        };
        // The return breakpoint is armed only while an entry waits for its
        // return (see `sync_return_breakpoint`).
        client.insert_hw_breakpoint(entry.addr)?;
        client.resume(None)?;
        let paused = started.elapsed();
        let capture = options
            .capture
            .then(|| capture::Capture::new(Arc::clone(&memory), guest.location().paging_mode));
        let info = AttachInfo {
            entry,
            ret,
            sysret,
            virtual_slide: slide,
            vcpus,
            paused,
        };
        tracing::debug!(?info, "gdb-hook attached");
        Ok(GdbHook {
            client: guard.disarm(),
            regs,
            guest,
            entry,
            ret,
            ret_armed: false,
            remove_to_step,
            pending: pending::Table::default(),
            capture,
            stats: Stats::default(),
            until_sweep: SWEEP_EVERY,
            last_entry: Vec::new(),
            state: State::Running,
            poll: options.poll,
            info,
        })
    }

    /// Where the breakpoints are and how the attach went.
    pub fn info(&self) -> &AttachInfo {
        &self.info
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Handles breakpoint hits, writing records into `ring`, until `stop()`
    /// returns true (checked every [`Options::poll`] while the VM runs, and
    /// after each hit), then detaches: breakpoints removed, VM running
    /// normally. Detaches also when it fails.
    pub fn run(&mut self, ring: &RingWriter, stop: &dyn Fn() -> bool) -> Result<Stats, HookError> {
        let started = Instant::now();
        let result = self.run_inner(ring, stop);
        let detached = self.detach(Some(ring));
        self.stats.run_ns += started.elapsed().as_nanos() as u64;
        result?;
        detached?;
        Ok(self.stats)
    }

    fn run_inner(&mut self, ring: &RingWriter, stop: &dyn Fn() -> bool) -> Result<(), HookError> {
        if self.state == State::Detached {
            return Err(HookError::Detached);
        }
        while !stop() {
            let deadline = Instant::now() + self.poll;
            let Some(reply) = self.client.wait_stop(deadline)? else {
                continue;
            };
            self.state = State::Stopped;
            let t0 = Instant::now();
            let site = self.on_stop(&reply, Some(ring))?;
            self.resume_past(&reply, site)?;
            self.stats.held_ns += t0.elapsed().as_nanos() as u64;
        }
        Ok(())
    }

    /// Records what the stop shows; returns the site it was at, if ours.
    fn on_stop(
        &mut self,
        reply: &StopReply,
        ring: Option<&RingWriter>,
    ) -> Result<Option<(Site, Regs)>, HookError> {
        let StopReply::Signal { thread, .. } = *reply else {
            self.state = State::Detached;
            return Err(HookError::VmGone(reply.clone()));
        };
        let r = self.read_regs()?;
        // QEMU numbers threads cpu_index + 1.
        let vcpu = thread.unwrap_or(1).saturating_sub(1);
        let slot = (vcpu as usize) % MAX_VCPUS;
        if self.last_entry.len() <= slot {
            self.last_entry.resize(slot + 1, None);
        }
        let last = self.last_entry[slot];
        if r.rip != self.entry.addr {
            // A return (of any task, on any vCPU) or another stop ends
            // every candidate: a task may return on another vCPU.
            self.last_entry.fill(None);
        }
        if r.rip == self.entry.addr {
            self.stats.entry_hits += 1;
            self.last_entry[slot] = Some(r);
            // A second stop at the entry with every register as at this
            // vCPU's previous stop, and nothing in between, is the same
            // `syscall` (seen once in CI under TCG, single-stepping with the
            // breakpoint removed): a new call of a recorded thread would
            // have stopped at the return first, which stays armed while a
            // recorded entry waits.
            if last == Some(r) {
                self.stats.rereported += 1;
            } else if let Some(ring) = ring {
                self.on_entry(vcpu, &r, ring);
            }
            Ok(Some((self.entry, r)))
        } else if r.rip == self.ret.addr {
            self.stats.return_hits += 1;
            if let Some(ring) = ring {
                self.on_return(vcpu, &r, ring);
            }
            Ok(Some((self.ret, r)))
        } else {
            self.stats.other_stops += 1;
            Ok(None)
        }
    }

    /// Arms the return breakpoint while some entry waits for its return,
    /// disarms it when none does: syscalls outside the filter then cost one
    /// stop (the entry) instead of two. Called while the VM is stopped.
    fn sync_return_breakpoint(&mut self) -> Result<(), HookError> {
        let want = !self.pending.is_empty();
        if want != self.ret_armed {
            if want {
                self.client.insert_hw_breakpoint(self.ret.addr)?;
            } else {
                self.client.remove_hw_breakpoint(self.ret.addr)?;
            }
            self.ret_armed = want;
            self.stats.arm_changes += 1;
        }
        Ok(())
    }

    /// Gets the stopped vCPU past `site`'s breakpoint (still in, as it was
    /// when hit), updates the return breakpoint, and lets the VM run.
    fn resume_past(
        &mut self,
        reply: &StopReply,
        hit: Option<(Site, Regs)>,
    ) -> Result<(), HookError> {
        let mut at = None;
        match hit.map(|(s, r)| (s.addr, s.resume, r)) {
            None => {}
            Some((_, Resume::At(next), _)) => at = Some(next),
            Some((_, Resume::TestAlJe { taken, next }, r)) => {
                // Exactly what the two instructions do: flags from al, then
                // the branch on ZF. One register write instead of a step.
                let flags = sites::test_al_flags(u64::from(r.eflags), r.rax) as u32;
                self.client
                    .write_register(self.regs.eflags.regnum, &flags.to_le_bytes())?;
                at = Some(if r.rax as u8 == 0 { taken } else { next });
            }
            Some((addr, Resume::Step, _)) => {
                let thread = reply.thread().unwrap_or(1);
                if self.remove_to_step {
                    self.client.remove_hw_breakpoint(addr)?;
                }
                let stepped = self.client.step(thread)?;
                self.stats.steps += 1;
                if let StopReply::Exited { .. } | StopReply::Terminated { .. } = stepped {
                    self.state = State::Detached;
                    return Err(HookError::VmGone(stepped));
                }
                if self.remove_to_step {
                    self.client.insert_hw_breakpoint(addr)?;
                }
            }
        }
        self.sync_return_breakpoint()?;
        self.client.resume(at)?;
        self.state = State::Running;
        Ok(())
    }

    fn read_regs(&mut self) -> Result<Regs, HookError> {
        let g = self.client.read_registers()?;
        let m = self.regs;
        let mut get = |loc: target::RegLoc| -> Result<u64, HookError> {
            match target::from_g(&g, loc) {
                Some(v) => Ok(v),
                // Not in `g` (another QEMU layout): one `p` round trip.
                None => read_p(&mut self.client, loc.regnum),
            }
        };
        Ok(Regs {
            rax: get(m.rax)?,
            rcx: get(m.rcx)?,
            rdx: get(m.rdx)?,
            rsi: get(m.rsi)?,
            rdi: get(m.rdi)?,
            rsp: get(m.rsp)?,
            r8: get(m.r8)?,
            r9: get(m.r9)?,
            r10: get(m.r10)?,
            rip: get(m.rip)?,
            cr3: get(m.cr3)?,
            fs_base: get(m.fs_base)?,
            gs_base: get(m.gs_base)?,
            k_gs_base: get(m.k_gs_base)?,
            eflags: match target::from_g32(&g, m.eflags) {
                Some(v) => v,
                None => read_p32(&mut self.client, m.eflags.regnum)?,
            },
        })
    }

    /// The thread on the vCPU with kernel per-cpu base `percpu`: its
    /// `task_struct` and ids, read from guest RAM (the VM is stopped, so
    /// the values are those of this instant).
    fn thread(&mut self, percpu: u64) -> Option<(u64, vmi::linux::ThreadIds)> {
        // Kernel stacks and task structs are freed and reused: never trust
        // a translation cached at an earlier stop.
        self.guest.refresh();
        let task = self.guest.current_task(percpu).ok().filter(|&t| t != 0)?;
        let ids = self.guest.thread_ids(task).ok()?;
        Some((task, ids))
    }

    fn push(&mut self, ring: &RingWriter, rec: &Record, payload: &[u8]) -> Option<u64> {
        let seq = ring.push_parts(rec, payload);
        match seq {
            Some(_) => self.stats.records += 1,
            None => self.stats.dropped += 1,
        }
        seq
    }

    fn on_entry(&mut self, vcpu: u32, r: &Regs, ring: &RingWriter) {
        let nr = r.rax;
        let th = self.thread(kernel_base(r.k_gs_base, r.gs_base));
        let key = match th {
            Some((task, _)) => pending::task_key(task),
            None => {
                // arch_prctl(ARCH_SET_FS, addr) returns with the new fs_base loaded.
                let tls = if nr == NR_ARCH_PRCTL && r.rdi == ARCH_SET_FS {
                    r.rsi
                } else {
                    r.fs_base
                };
                pending::key(r.cr3, tls, r.rsp)
            }
        };
        if !ring.wants(nr) {
            // Not recorded; an older entry of this thread can no longer
            // return (it is making another call), so forget it.
            self.pending.remove(key);
            return;
        }
        // Only the registers the call uses, as the plugin records them (the
        // others hold whatever user code left there).
        let mut args = [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9];
        let used = events::format::arg_count(nr).min(6);
        args[used..].fill(0);
        // rcx holds the address after the 2-byte `syscall`; the plugin
        // records the `syscall` instruction itself.
        let mut rec = Record::entry(vcpu, nr, args, r.cr3, r.rcx.wrapping_sub(2));
        let mut payload = events::PayloadBuf::default();
        if let Some((task, ids)) = &th {
            rec.task = *task;
            rec.pid = ids.pid;
            rec.tgid = ids.tgid;
            rec.flags |= FLAG_TASK;
            payload.comm(ids.comm());
        } else {
            self.stats.unnamed += 1;
        }
        if let Some(c) = &mut self.capture {
            c.at_entry(
                &self.guest,
                ring,
                &mut payload,
                nr,
                &args,
                r.cr3,
                th.map(|t| t.0),
            );
        }
        if payload.was_cut() {
            rec.flags |= FLAG_PAYLOAD_CUT;
        }
        self.until_sweep = self.until_sweep.saturating_sub(1);
        if self.until_sweep == 0 {
            self.until_sweep = SWEEP_EVERY;
            let guest = &self.guest;
            self.stats.stale +=
                self.pending
                    .sweep(|task, tid| guest.thread_alive(task, tid)) as u64;
        }
        match self.push(ring, &rec, payload.as_bytes()) {
            Some(seq) if nr != NR_EXIT && nr != NR_EXIT_GROUP => {
                let (task, tid) = th.map_or((0, 0), |(task, ids)| (task, ids.pid));
                let p = pending::Pending {
                    seq,
                    nr,
                    args,
                    task,
                    tid,
                };
                if !self.pending.insert(key, p) {
                    self.stats.unpaired += 1;
                    ring.count_unpaired();
                }
            }
            // Dropped, or a call that never returns: nothing to pair.
            _ => self.pending.remove(key),
        }
    }

    fn on_return(&mut self, vcpu: u32, r: &Regs, ring: &RingWriter) {
        if self.pending.is_empty() {
            return;
        }
        // After `swapgs` on entry: gs_base is the kernel per-cpu base.
        let th = self.thread(kernel_base(r.gs_base, r.k_gs_base));
        // The user-visible result and stack pointer are in the pt_regs frame
        // at rsp (kernel memory: read through the kernel's page tables).
        let k = self.guest.kernel_space();
        let frame = (
            k.read_u64(r.rsp.wrapping_add(PT_REGS_AX)),
            k.read_u64(r.rsp.wrapping_add(PT_REGS_SP)),
        );
        let (ax, user_sp) = match frame {
            (Ok(ax), Ok(sp)) => (ax, sp),
            _ => match self.client.read_memory(r.rsp.wrapping_add(PT_REGS_AX), 80) {
                // Through QEMU's view instead (one more round trip).
                Ok(b) => (
                    le_u64(&b, 0),
                    le_u64(&b, (PT_REGS_SP - PT_REGS_AX) as usize),
                ),
                Err(_) => return,
            },
        };
        let pending = th
            .and_then(|(task, _)| self.pending.take(pending::task_key(task)))
            .or_else(|| self.pending.take(pending::key(r.cr3, r.fs_base, user_sp)));
        let Some(p) = pending else {
            return;
        };
        if let Some((_, ids)) = &th {
            // Same task_struct, another thread: the entering thread died in
            // its syscall and the memory was reused. A successful execve
            // from a non-leader thread comes back as the leader (its pid).
            let exec = matches!(p.nr, NR_EXECVE | NR_EXECVEAT) && ids.pid == ids.tgid;
            if p.tid != 0 && p.tid != ids.pid && !exec {
                self.stats.stale += 1;
                return;
            }
        }
        let ret = ax as i64;
        let mut rec = Record::ret(vcpu, p.nr, ret, r.cr3, r.rip, p.seq);
        rec.args = p.args;
        if let Some((task, ids)) = &th {
            rec.task = *task;
            rec.pid = ids.pid;
            rec.tgid = ids.tgid;
            rec.flags |= FLAG_TASK;
        } else {
            self.stats.unnamed += 1;
        }
        let mut payload = events::PayloadBuf::default();
        if let Some(c) = &mut self.capture {
            c.at_return(
                &self.guest,
                ring,
                &mut payload,
                p.nr,
                &p.args,
                ret,
                r.cr3,
                th.map(|t| t.0),
            );
        }
        if payload.was_cut() {
            rec.flags |= FLAG_PAYLOAD_CUT;
        }
        self.push(ring, &rec, payload.as_bytes());
    }

    /// Stops the VM if it runs (recording a hit that raced with the stop),
    /// removes the breakpoints and detaches: the VM runs on unhooked.
    fn detach(&mut self, ring: Option<&RingWriter>) -> Result<(), HookError> {
        if self.state == State::Detached {
            return Ok(());
        }
        if self.state == State::Running {
            let reply = self.client.interrupt()?;
            self.state = State::Stopped;
            // The VM is detached right after, so the vCPU needs no step.
            self.on_stop(&reply, ring)?;
        }
        // `D` removes them too; removing first keeps a detach that fails
        // half-way from leaving them in.
        let _ = self.client.remove_hw_breakpoint(self.entry.addr);
        if self.ret_armed {
            let _ = self.client.remove_hw_breakpoint(self.ret.addr);
            self.ret_armed = false;
        }
        self.client.detach()?;
        self.state = State::Detached;
        Ok(())
    }

    /// Clears what a crashed monitor left behind on `vm`'s gdbstub (its
    /// breakpoints; a VM it left stopped) and lets the VM run.
    pub fn release(vm: &lab::Vm, timeout: Duration) -> Result<(), HookError> {
        let socket = vm
            .info()
            .gdb_socket
            .clone()
            .ok_or_else(|| HookError::NoGdbstub(vm.name().to_string()))?;
        let mut client = Client::connect(&socket, timeout)?;
        client.halt_reason()?;
        client.detach()?;
        Ok(())
    }
}

impl Drop for GdbHook {
    fn drop(&mut self) {
        if self.state != State::Detached {
            self.client.timeout = self.client.timeout.min(Duration::from_secs(2));
            if let Err(e) = self.detach(None) {
                tracing::warn!("gdb-hook: detaching on drop failed: {e}");
            }
        }
    }
}

/// Detaches a connection that is dropped before the hook owns it.
struct DetachGuard(Option<Client>);

impl DetachGuard {
    fn client(&mut self) -> &mut Client {
        // Always Some until disarm(), which consumes the guard.
        self.0
            .as_mut()
            .expect("guard holds the client until disarmed")
    }

    fn disarm(mut self) -> Client {
        self.0
            .take()
            .expect("guard holds the client until disarmed")
    }
}

impl Drop for DetachGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            c.timeout = c.timeout.min(Duration::from_secs(2));
            let _ = c.detach();
        }
    }
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn read_p32(client: &mut Client, regnum: u32) -> Result<u32, HookError> {
    let b = client.read_register(regnum)?;
    match b.get(..4) {
        Some(w) => Ok(u32::from_le_bytes(w.try_into().unwrap_or_default())),
        None => Err(HookError::Rsp(RspError::Malformed {
            cmd: format!("p{regnum:x}"),
            what: format!("{} bytes for a 32-bit register", b.len()),
        })),
    }
}

fn read_p(client: &mut Client, regnum: u32) -> Result<u64, HookError> {
    let b = client.read_register(regnum)?;
    if b.len() < 8 {
        return Err(HookError::Rsp(RspError::Malformed {
            cmd: format!("p{regnum:x}"),
            what: format!("{} bytes for a 64-bit register", b.len()),
        }));
    }
    Ok(le_u64(&b, 0))
}

/// The `g` layout derived from the target description must agree with `p`
/// (which QEMU answers by register number): catches a description we read
/// wrong before any record is built from it.
fn check_registers(client: &mut Client, regs: &RegisterMap) -> Result<(), HookError> {
    let g = client.read_registers()?;
    for (name, loc) in [
        ("rip", regs.rip),
        ("cr3", regs.cr3),
        ("k_gs_base", regs.k_gs_base),
    ] {
        if let Some(from_g) = target::from_g(&g, loc) {
            let from_p = read_p(client, loc.regnum)?;
            if from_g != from_p {
                return Err(HookError::RegisterCheck {
                    name,
                    from_g,
                    from_p,
                });
            }
        }
    }
    Ok(())
}
