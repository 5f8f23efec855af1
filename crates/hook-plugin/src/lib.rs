//! vmwatch's QEMU TCG plugin (x86-64 system emulation, plugin API v4, QEMU >= 9.2).
//!
//! Load it with `-plugin file=libhook_plugin.so,ring=/dev/shm/NAME.ring,vm=NAME,filter=all`
//! (filter: `all`, `none`, or syscall names separated by `:`).
//!
//! At translation time it instruments only three instruction encodings:
//! - `syscall` (0f 05) at a lower-half address: user mode (the kernel never
//!   executes `syscall`, and SMEP keeps it from running user pages);
//! - `sysretq` (48 0f 07) at an upper-half address: the kernel returning to user;
//! - `iretq` (48 cf) at an upper-half address: returns from interrupts and
//!   exceptions to user *or* kernel; at run time the callback looks at
//!   `gs_base` first (after the kernel's `swapgs` on the way to user mode it
//!   holds the user value, on a return to the kernel it is still the kernel's
//!   per-cpu base, upper half), then, only if a return is possible, at the
//!   iret frame: CS (CPL 3?) and the user `rsp` (16 bytes of guest memory,
//!   which the PTI user page tables map: it is the entry trampoline stack).
//!
//! Entry callback: one register read (`rax`) and one bitmap lookup in the
//! ring's control area for a syscall outside the filter; for one inside it,
//! `rdi, rsi, rdx, r10, r8, r9, cr3, fs_base, rsp` and a push into the ring.
//! Return callbacks: not even called while no entry is pending anywhere
//! (they are conditional on a per-vCPU scoreboard flag that TCG tests
//! inline; [`ReturnsGate`]); otherwise `rsp`, `cr3`, `fs_base` (and for iretq `gs_base` and the iret
//! frame) and a pairing-table probe, plus `rax` and a push when the task has a
//! pending entry. The pairing rule and its
//! limits are in [`pairing`].
//!
//! # Why `qemu-plugin-sys` and not the `qemu-plugin` wrapper
//! The `qemu-plugin` crate (10.1.0-v2, feature `plugin-api-v4`) builds and
//! would load, but its own `qemu_plugin_install` (always exported) panics
//! through `expect()` on argument or registration errors, which aborts QEMU
//! from an `extern "C"` function instead of failing the load with a message;
//! its instruction-callback trampoline rebuilds a `Box<FnMut>` from the shared
//! userdata pointer on every call, on several vCPU threads at once (MTTCG),
//! i.e. aliased mutable boxes; and every other callback goes through one
//! global `Mutex<Box<dyn Plugin>>`. Its FFI layer, `qemu-plugin-sys` (same
//! version, same v4 bindings), has none of that, so this crate uses it
//! directly: one `qemu_plugin_install` that returns an error, plain `extern "C"`
//! callbacks with no allocation or locking, per-vCPU register buffers.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use events::capture::{AtEntry, AtReturn};
use events::payload::{PayloadBuf, RESULT};
use events::{Record, RingWriter, FLAG_PAYLOAD_CUT, FLAG_TASK};
use qemu_plugin_sys as sys;
use vmi::linux::LinuxGuest;

mod args;
mod callflow;
mod guest;
mod pairing;

/// The plugin API version this plugin is built for (QEMU checks it).
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static qemu_plugin_version: c_int = sys::QEMU_PLUGIN_VERSION as c_int;

extern "C" {
    // GLib, provided by the QEMU process.
    fn g_byte_array_new() -> *mut sys::GByteArray;
    fn g_byte_array_set_size(array: *mut sys::GByteArray, length: c_uint) -> *mut sys::GByteArray;
    fn g_array_free(array: *mut sys::GArray, free_segment: c_int) -> *mut c_char;
}

const NR_EXIT: u64 = 60;
const NR_EXIT_GROUP: u64 = 231;
const NR_ARCH_PRCTL: u64 = 158;
const NR_EXECVE: u64 = 59;
const NR_EXECVEAT: u64 = 322;
/// Records between sweeps of the pending table for threads that died in a syscall.
const SWEEP_EVERY: u64 = 4096;
const ARCH_SET_FS: u64 = 0x1002;

/// Opaque QEMU register handles (stable for the whole run, same for all vCPUs).
#[derive(Clone, Copy)]
struct Regs {
    rax: usize,
    rbx: usize,
    rcx: usize,
    rdi: usize,
    rsi: usize,
    rdx: usize,
    r10: usize,
    r8: usize,
    r9: usize,
    rsp: usize,
    cr3: usize,
    fs_base: usize,
    gs_base: usize,
    /// The kernel's per-cpu base while in user mode (absent in old QEMUs).
    k_gs_base: Option<usize>,
}

/// Per-vCPU flag (a QEMU scoreboard) that the return sites' callbacks are
/// conditional on: TCG tests it inline and skips the call, register sync
/// included, while no syscall entry is pending anywhere.
struct ReturnsGate {
    flag: sys::qemu_plugin_u64,
}

// SAFETY: the scoreboard is owned by QEMU for the whole run; the handle is a
// pointer plus offset, only passed to QEMU's scoreboard accessors.
unsafe impl Send for ReturnsGate {}
// SAFETY: as above; concurrent sets of u64 slots are plain stores in QEMU.
unsafe impl Sync for ReturnsGate {}

impl ReturnsGate {
    fn set_all(&self, value: u64) {
        // SAFETY: called from vCPU callbacks after every vCPU was initialised
        // (QEMU sized the scoreboard for them); indexes stay below num_vcpus.
        unsafe {
            let n = sys::qemu_plugin_num_vcpus().max(0) as c_uint;
            for vcpu in 0..n {
                sys::qemu_plugin_u64_set(self.flag, vcpu, value);
            }
        }
    }

    /// An entry was remembered: every vCPU must look at its returns.
    fn open(&self) {
        self.set_all(1);
    }

    /// The pending table may be empty: stop calling the return callbacks,
    /// unless an entry slipped in meanwhile (then open again).
    fn close_if_idle(&self, pending: &pairing::Table) {
        if pending.is_empty() {
            self.set_all(0);
            std::sync::atomic::fence(Ordering::SeqCst);
            if !pending.is_empty() {
                self.set_all(1);
            }
        }
    }
}

struct Plugin {
    ring: RingWriter,
    returns: ReturnsGate,
    /// Per-vCPU flag: the next kernel block this vCPU runs is where its
    /// `syscall` entered (the LSTAR MSR, which no QEMU monitor command shows).
    entry_gate: EntryGate,
    /// User `syscall` instructions executed, for sampling the entry.
    user_syscalls: AtomicU64,
    vm: String,
    regs: OnceLock<Regs>,
    /// One GByteArray per vCPU, used only on that vCPU's thread.
    bufs: Box<[AtomicPtr<sys::GByteArray>]>,
    /// Per-vCPU scratch for events in the filter (allocated on first use).
    scratch: Box<[Mutex<Option<Box<Scratch>>>]>,
    pending: pairing::Table,
    /// Where to read the guest kernel from, when configured.
    guest: Option<guest::GuestSource>,
    /// Callbacks that returned early because of a missing register or buffer.
    skipped: AtomicU64,
    /// Events whose thread could not be read from guest RAM.
    unnamed: AtomicU64,
    /// Pending entries dropped because their thread died in the syscall.
    stale: AtomicU64,
    /// Entries recorded, for pacing the sweeps.
    entries: AtomicU64,
    /// Argument registers each syscall number uses ([`events::format::arg_count`]).
    arg_counts: Box<[u8; 512]>,
    /// Per-process token buckets of the log doorbell ([`LogLimiter`]).
    log_limiter: Mutex<LogLimiter>,
    /// xftrace (kernel call flows, `callflow.rs`), when `xftrace=` is given.
    xftrace: Option<callflow::CallFlow>,
}

/// The syscall-entry gate's scoreboard slot.
struct EntryGate(sys::qemu_plugin_u64);

// SAFETY: as for ReturnsGate: a handle into a QEMU-owned scoreboard.
unsafe impl Send for EntryGate {}
// SAFETY: as above.
unsafe impl Sync for EntryGate {}

/// One `syscall` in this many has its kernel entry observed (the first one too).
const ENTRY_SAMPLE_EVERY: u64 = 4096;

/// Processes whose log doorbell buckets the plugin keeps at once.
const LOG_BUCKETS: usize = 256;
/// Token fractions per doorbell: bucket levels are kept in nano-doorbells so
/// a refill of `elapsed_ns * rate` is exact in integers.
const NANO: u64 = 1_000_000_000;
/// [`LogLimiter`] key bit of a process the plugin could not name (keyed by
/// its page-table root, `cr3 >> 12`, instead of its tgid).
const KEY_CR3: u64 = 1 << 63;

/// One process's log doorbell bucket.
#[derive(Clone, Copy, Default)]
struct LogBucket {
    /// tgid, or `KEY_CR3 | cr3 >> 12`; meaningful only with `live`.
    key: u64,
    live: bool,
    /// Nano-doorbells in the bucket as of `last_ns`.
    level: u64,
    /// Host monotonic ns of the last refill (= the process's last doorbell):
    /// also the least-recently-used order.
    last_ns: u64,
    /// Doorbells refused since the process's last accepted one.
    dropped: u64,
}

/// The log doorbell's rate limit: a token bucket per process (thread group)
/// in a fixed table of [`LOG_BUCKETS`]; a process not in it takes the slot
/// of the least recently seen one and starts with a full bucket. Never
/// allocates. Doorbells are rare except in a flood, so one lock is enough.
struct LogLimiter {
    buckets: [LogBucket; LOG_BUCKETS],
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            buckets: [LogBucket::default(); LOG_BUCKETS],
        }
    }
}

impl LogLimiter {
    /// A doorbell of process `key` at `now_ns`, under the limit (`rate`
    /// doorbells per second, `burst` at most at once; rate 0 = no limit):
    /// `Some(refused since the process's previous accepted doorbell)` if it
    /// may ring, `None` if refused (then counted in the process's bucket).
    fn admit(&mut self, key: u64, now_ns: u64, rate: u64, burst: u64) -> Option<u64> {
        let found = self.buckets.iter().position(|b| b.live && b.key == key);
        if rate == 0 {
            // No limit: only hand over what the process had refused before.
            return Some(found.map_or(0, |i| std::mem::take(&mut self.buckets[i].dropped)));
        }
        let cap = burst.max(1).saturating_mul(NANO);
        let b = match found {
            Some(i) => {
                let b = &mut self.buckets[i];
                let elapsed = now_ns.saturating_sub(b.last_ns);
                b.level = b
                    .level
                    .saturating_add(elapsed.saturating_mul(rate))
                    .min(cap);
                b.last_ns = b.last_ns.max(now_ns);
                b
            }
            None => {
                // An empty slot, else the least recently seen process's.
                let i = self
                    .buckets
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, b)| (b.live, b.last_ns))
                    .map_or(0, |(i, _)| i);
                let b = &mut self.buckets[i];
                *b = LogBucket {
                    key,
                    live: true,
                    level: cap,
                    last_ns: now_ns,
                    dropped: 0,
                };
                b
            }
        };
        if b.level >= NANO {
            b.level -= NANO;
            Some(std::mem::take(&mut b.dropped))
        } else {
            b.dropped += 1;
            None
        }
    }
}

static PLUGIN: OnceLock<Plugin> = OnceLock::new();

/// Called by QEMU when it loads the plugin.
///
/// # Safety
/// QEMU passes a valid `info` for the duration of the call and `argc` valid
/// NUL-terminated strings in `argv`.
#[no_mangle]
pub unsafe extern "C" fn qemu_plugin_install(
    id: sys::qemu_plugin_id_t,
    info: *const sys::qemu_info_t,
    argc: c_int,
    argv: *const *const c_char,
) -> c_int {
    let argv: Vec<String> = (0..argc.max(0) as usize)
        // SAFETY: QEMU guarantees argc valid C strings in argv.
        .map(|i| {
            unsafe { CStr::from_ptr(*argv.add(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // SAFETY: `info` is valid for this call (QEMU's contract).
    match install(id, unsafe { &*info }, &argv) {
        Ok(()) => 0,
        Err(e) => {
            // QEMU prints its own line after ours and exits.
            eprintln!("hook-plugin: {e}");
            -1
        }
    }
}

fn install(
    id: sys::qemu_plugin_id_t,
    info: &sys::qemu_info_t,
    argv: &[String],
) -> Result<(), String> {
    // SAFETY: QEMU always sets target_name to a valid C string.
    let target = unsafe { CStr::from_ptr(info.target_name) }.to_string_lossy();
    if target != "x86_64" {
        return Err(format!("target `{target}` is not supported (x86_64 only)"));
    }
    if !info.system_emulation {
        return Err("needs system emulation (qemu-system-x86_64), not user mode".to_string());
    }
    // SAFETY: `system` is the union's only member, valid when system_emulation is set.
    let max_vcpus = unsafe { info.__bindgen_anon_1.system.max_vcpus }.clamp(1, 4096) as usize;
    let cfg = args::parse(argv)?;
    let guest = cfg
        .guest
        .as_ref()
        .map(guest::GuestSource::open)
        .transpose()?;
    let ring = RingWriter::create(&cfg.ring, cfg.capacity, &cfg.vm, &cfg.filter, &cfg.fds)
        .map_err(|e| e.to_string())?;
    let xftrace = cfg
        .xftrace
        .as_ref()
        .map(|path| callflow::CallFlow::new(id, path, cfg.xftrace_records, max_vcpus))
        .transpose()?;
    // SAFETY: plain allocation by QEMU; freed by QEMU at exit.
    // Per vCPU: the returns gate (offset 0) and the syscall-entry gate (8).
    let board = unsafe { sys::qemu_plugin_scoreboard_new(16) };
    if board.is_null() {
        return Err("QEMU could not allocate a scoreboard".to_string());
    }
    let plugin = Plugin {
        ring,
        returns: ReturnsGate {
            flag: sys::qemu_plugin_u64 {
                score: board,
                offset: 0,
            },
        },
        entry_gate: EntryGate(sys::qemu_plugin_u64 {
            score: board,
            offset: 8,
        }),
        user_syscalls: AtomicU64::new(0),
        vm: cfg.vm,
        regs: OnceLock::new(),
        bufs: (0..max_vcpus)
            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
            .collect(),
        scratch: (0..max_vcpus).map(|_| Mutex::new(None)).collect(),
        pending: pairing::Table::default(),
        guest,
        skipped: AtomicU64::new(0),
        unnamed: AtomicU64::new(0),
        stale: AtomicU64::new(0),
        entries: AtomicU64::new(0),
        arg_counts: Box::new(std::array::from_fn(|nr| {
            events::format::arg_count(nr as u64) as u8
        })),
        log_limiter: Mutex::new(LogLimiter::default()),
        xftrace,
    };
    if PLUGIN.set(plugin).is_err() {
        return Err("loaded twice in one QEMU".to_string());
    }
    // SAFETY: registering callbacks with QEMU during install, as the API requires.
    unsafe { register_callbacks(id) };
    Ok(())
}

/// Registers the plugin's callbacks: at install, and again after each
/// `qemu_plugin_reset` (xftrace on/off, see `callflow.rs`), which drops them.
///
/// # Safety
/// Only from `qemu_plugin_install` or a reset callback (QEMU's contract for
/// registering); the callbacks are 'static functions.
unsafe fn register_callbacks(id: sys::qemu_plugin_id_t) {
    // SAFETY: per this function's contract.
    unsafe {
        sys::qemu_plugin_register_vcpu_init_cb(id, Some(vcpu_init));
        sys::qemu_plugin_register_vcpu_tb_trans_cb(id, Some(tb_trans));
        sys::qemu_plugin_register_atexit_cb(id, Some(at_exit), std::ptr::null_mut());
    }
}

/// Runs on each vCPU's thread when it starts: register handles (the API wants
/// them looked up from a vCPU context) and the vCPU's read buffer.
unsafe extern "C" fn vcpu_init(_id: sys::qemu_plugin_id_t, vcpu: c_uint) {
    let Some(p) = PLUGIN.get() else { return };
    if p.regs.get().is_none() {
        // SAFETY: called from a vCPU init callback, where the API allows it.
        let arr = unsafe { sys::qemu_plugin_get_registers() };
        if !arr.is_null() {
            // SAFETY: QEMU returns a GArray of qemu_plugin_reg_descriptor,
            // `len` elements long, which we own and free below.
            let descs = unsafe {
                std::slice::from_raw_parts(
                    (*arr).data as *const sys::qemu_plugin_reg_descriptor,
                    (*arr).len as usize,
                )
            };
            let find = |want: &str| {
                descs
                    .iter()
                    // SAFETY: descriptor names are valid C strings owned by QEMU.
                    .find(|d| {
                        !d.name.is_null()
                            && unsafe { CStr::from_ptr(d.name) }.to_bytes() == want.as_bytes()
                    })
                    .map(|d| d.handle as usize)
            };
            let regs = (|| {
                Some(Regs {
                    rax: find("rax")?,
                    rbx: find("rbx")?,
                    rcx: find("rcx")?,
                    rdi: find("rdi")?,
                    rsi: find("rsi")?,
                    rdx: find("rdx")?,
                    r10: find("r10")?,
                    r8: find("r8")?,
                    r9: find("r9")?,
                    rsp: find("rsp")?,
                    cr3: find("cr3")?,
                    fs_base: find("fs_base")?,
                    gs_base: find("gs_base")?,
                    k_gs_base: find("k_gs_base"),
                })
            })();
            if let Some(cf) = &p.xftrace {
                cf.set_registers(find);
            }
            // SAFETY: `arr` came from qemu_plugin_get_registers and is freed once.
            unsafe { g_array_free(arr, 1) };
            match regs {
                Some(r) => {
                    let _ = p.regs.set(r);
                }
                None => eprintln!(
                    "hook-plugin: QEMU does not expose rax..r9, rsp, cr3, fs_base and gs_base to plugins; no events will be recorded"
                ),
            }
        }
    }
    if let Some(slot) = p.bufs.get(vcpu as usize) {
        if slot.load(Ordering::Relaxed).is_null() {
            // SAFETY: plain GLib allocation; the array lives until QEMU exits.
            slot.store(unsafe { g_byte_array_new() }, Ordering::Release);
        }
    }
}

const USER_TOP: u64 = 1 << 63;

/// Translation-time filter: instrument only the instructions we need (user
/// `syscall` and `cpuid`; kernel returns to user and MSR writes).
unsafe extern "C" fn tb_trans(_id: sys::qemu_plugin_id_t, tb: *mut sys::qemu_plugin_tb) {
    // xftrace's call/ret instrumentation, only while it records (one load otherwise).
    let xftrace = PLUGIN
        .get()
        .and_then(|p| p.xftrace.as_ref())
        .and_then(|cf| cf.translating().map(|marks| (cf, marks)));
    // SAFETY: `tb` is valid during this callback (QEMU's contract), and so are
    // the instruction handles it hands out.
    unsafe {
        // Every kernel block, conditional on the entry gate (TCG tests it
        // inline): the first one after a sampled `syscall` is its entry.
        let start = sys::qemu_plugin_tb_vaddr(tb);
        if let (Some(p), true) = (PLUGIN.get(), start >= USER_TOP) {
            sys::qemu_plugin_register_vcpu_tb_exec_cond_cb(
                tb,
                Some(on_entry_block),
                sys::qemu_plugin_cb_flags::QEMU_PLUGIN_CB_NO_REGS,
                sys::qemu_plugin_cond::QEMU_PLUGIN_COND_NE,
                p.entry_gate.0,
                0,
                start as usize as *mut c_void,
            );
        }
        for i in 0..sys::qemu_plugin_tb_n_insns(tb) {
            let insn = sys::qemu_plugin_tb_get_insn(tb, i);
            if let Some((cf, marks)) = xftrace {
                cf.translate(marks, insn, sys::qemu_plugin_insn_vaddr(insn));
            }
            let size = sys::qemu_plugin_insn_size(insn);
            if size != 2 && size != 3 {
                continue;
            }
            let mut bytes = [0u8; 3];
            let got = sys::qemu_plugin_insn_data(insn, bytes.as_mut_ptr() as *mut c_void, size);
            let vaddr = sys::qemu_plugin_insn_vaddr(insn);
            let user = vaddr < USER_TOP;
            let (cb, gated): (sys::qemu_plugin_vcpu_udata_cb_t, bool) = match &bytes[..got.min(3)] {
                [0x0f, 0x05] if user => (Some(on_syscall), false),
                // The log doorbell (paper 002); any other cpuid returns at
                // the first register read.
                [0x0f, 0xa2] if user => (Some(on_cpuid), false),
                [0x48, 0x0f, 0x07] if !user => (Some(on_sysret), true),
                [0x48, 0xcf] if !user => (Some(on_iret), true),
                // MSR writes (`wrmsr`, `wrmsrns`): the syscall-entry MSRs
                // are checked against the kernel image by integrity scans.
                [0x0f, 0x30] | [0x0f, 0x01, 0xc6] if !user => (Some(on_wrmsr), false),
                _ => continue,
            };
            // The instruction's address travels as userdata: `rip` read in the
            // callback would be stale (known QEMU behaviour).
            let udata = vaddr as usize as *mut c_void;
            let flags = sys::qemu_plugin_cb_flags::QEMU_PLUGIN_CB_R_REGS;
            match PLUGIN.get() {
                Some(p) if gated => sys::qemu_plugin_register_vcpu_insn_exec_cond_cb(
                    insn,
                    cb,
                    flags,
                    sys::qemu_plugin_cond::QEMU_PLUGIN_COND_NE,
                    p.returns.flag,
                    0,
                    udata,
                ),
                _ => sys::qemu_plugin_register_vcpu_insn_exec_cb(insn, cb, flags, udata),
            }
        }
    }
}

/// The first kernel block after a sampled `syscall`: its address is where
/// the instruction entered the kernel.
unsafe extern "C" fn on_entry_block(vcpu: c_uint, udata: *mut c_void) {
    if let Some(p) = PLUGIN.get() {
        // SAFETY: our scoreboard slot of this vCPU.
        unsafe { sys::qemu_plugin_u64_set(p.entry_gate.0, vcpu, 0) };
        p.ring.record_syscall_entry(udata as u64);
    }
}

/// Reads one register of the current vCPU (little-endian, up to 8 bytes).
///
/// # Safety
/// Only from a callback registered with `QEMU_PLUGIN_CB_R_REGS`, on the vCPU
/// thread that owns `buf`.
#[inline]
unsafe fn read(buf: *mut sys::GByteArray, handle: usize) -> u64 {
    // SAFETY: per this function's contract; `buf` is our GByteArray, which QEMU
    // appends the register bytes to.
    unsafe {
        g_byte_array_set_size(buf, 0);
        if sys::qemu_plugin_read_register(handle as *mut sys::qemu_plugin_register, buf) <= 0 {
            return 0;
        }
        let len = ((*buf).len as usize).min(8);
        let mut b = [0u8; 8];
        std::ptr::copy_nonoverlapping((*buf).data, b.as_mut_ptr(), len);
        u64::from_le_bytes(b)
    }
}

/// Reads guest virtual memory of the current vCPU (its current CR3) into
/// `out`; false if any byte is not mapped.
///
/// # Safety
/// Only from a vCPU callback, on the vCPU thread that owns `buf`.
unsafe fn read_mem(buf: *mut sys::GByteArray, vaddr: u64, out: &mut [u8]) -> bool {
    if out.is_empty() {
        return true;
    }
    // SAFETY: per this function's contract; QEMU resizes our heap GByteArray
    // and we copy no more than it holds.
    unsafe {
        if !sys::qemu_plugin_read_memory_vaddr(vaddr, buf, out.len())
            || ((*buf).len as usize) < out.len()
        {
            return false;
        }
        std::ptr::copy_nonoverlapping((*buf).data, out.as_mut_ptr(), out.len());
    }
    true
}

/// # Safety
/// As [`read_mem`].
unsafe fn read_u64(buf: *mut sys::GByteArray, vaddr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    // SAFETY: per this function's contract.
    unsafe { read_mem(buf, vaddr, &mut b) }.then(|| u64::from_le_bytes(b))
}

/// Reads the NUL-terminated string at `vaddr` into `out`, a page piece at a
/// time (so a string ending before an unmapped page is still read). Returns
/// (length without NUL, cut: longer than `out` or unreadable part way), or
/// `None` if its first byte cannot be read.
///
/// # Safety
/// As [`read_mem`].
unsafe fn read_cstr(
    buf: *mut sys::GByteArray,
    vaddr: u64,
    out: &mut [u8],
) -> Option<(usize, bool)> {
    let mut n = 0;
    while n < out.len() {
        let addr = vaddr.wrapping_add(n as u64);
        let page_left = 4096 - (addr & 4095) as usize;
        let chunk = page_left.min(256).min(out.len() - n);
        // SAFETY: per this function's contract.
        if !unsafe { read_mem(buf, addr, &mut out[n..n + chunk]) } {
            return (n > 0).then_some((n, true));
        }
        if let Some(z) = out[n..n + chunk].iter().position(|&b| b == 0) {
            return Some((n + z, false));
        }
        n += chunk;
    }
    Some((n, true))
}

/// Most `execve` argv bytes captured, and most argv entries followed.
const ARGV_BYTES: usize = 2048;
const ARGV_ENTRIES: u64 = 64;

/// Per-vCPU scratch state. Only the vCPU's own thread locks it (callbacks
/// run on the vCPU thread), so the lock is never contended.
struct Scratch {
    payload: PayloadBuf,
    text: [u8; events::payload::MAX_STRING],
    /// This vCPU's view of the guest kernel (own translation cache).
    guest: Option<LinuxGuest>,
    /// Records since the translation cache was last dropped.
    since_flush: u32,
}

/// How often a vCPU drops its kernel translation cache: direct-map
/// translations never change, but vmalloc'd fd tables can move.
const FLUSH_EVERY: u32 = 1024;

/// The thread on this vCPU: `(task_struct, ids)` from `k_gs_base` and the
/// per-cpu `current_task`, if the plugin reads the guest kernel.
///
/// # Safety
/// Only from a callback registered with R_REGS, on `vcpu`'s thread owning `buf`.
unsafe fn thread(
    p: &Plugin,
    s: &mut Scratch,
    r: &Regs,
    buf: *mut sys::GByteArray,
) -> Option<(u64, vmi::linux::ThreadIds)> {
    let source = p.guest.as_ref()?;
    // SAFETY: per this function's contract.
    let percpu = unsafe { read(buf, r.k_gs_base?) };
    if percpu < USER_TOP {
        return None;
    }
    if s.guest.is_none() {
        s.guest = source.view();
    }
    let g = s.guest.as_ref()?;
    s.since_flush += 1;
    if s.since_flush >= FLUSH_EVERY {
        g.refresh();
        s.since_flush = 0;
    }
    let found = guest::current_thread(g, percpu);
    if found.is_none() {
        p.unnamed.fetch_add(1, Ordering::Relaxed);
    }
    found
}

fn name_thread(rec: &mut Record, th: Option<(u64, vmi::linux::ThreadIds)>) {
    if let Some((task, ids)) = th {
        rec.task = task;
        rec.pid = ids.pid;
        rec.tgid = ids.tgid;
        rec.flags |= FLAG_TASK;
    }
}

fn push_file(s: &mut Scratch, arg: u8, task: Option<u64>, fd: i64) {
    let (Some(task), Some(g)) = (task, s.guest.as_ref()) else {
        return;
    };
    if fd < 0 {
        return;
    }
    if let Some(f) = guest::fd_identity(g, task, fd as u64) {
        s.payload
            .file(arg, f.dev, f.ino, guest::kind(f.kind), f.path.as_bytes());
    }
}

/// The entry captures of `nr` into `s.payload`.
///
/// # Safety
/// As [`read_mem`].
unsafe fn capture_entry(
    p: &Plugin,
    s: &mut Scratch,
    buf: *mut sys::GByteArray,
    nr: u64,
    args: &[u64; 6],
    task: Option<u64>,
) {
    for c in events::capture::at_entry(nr) {
        // SAFETY (all reads below): per this function's contract.
        match *c {
            AtEntry::Path(a) => {
                let ptr = args[a as usize];
                if ptr == 0 {
                    continue;
                }
                match unsafe { read_cstr(buf, ptr, &mut s.text) } {
                    Some((n, cut)) => {
                        let text = &s.text[..n];
                        s.payload.string(a, |b| {
                            let n = n.min(b.len());
                            b[..n].copy_from_slice(&text[..n]);
                            (n, cut || n < text.len())
                        });
                    }
                    None => s.payload.unreadable(a),
                }
            }
            AtEntry::Argv(a) => {
                let array = args[a as usize];
                if array == 0 {
                    continue;
                }
                let mut len = 0;
                let mut cut = false;
                for i in 0..ARGV_ENTRIES {
                    let Some(ptr) = (unsafe { read_u64(buf, array.wrapping_add(i * 8)) }) else {
                        cut = true;
                        break;
                    };
                    if ptr == 0 {
                        break;
                    }
                    if i == ARGV_ENTRIES - 1 || len + 1 >= ARGV_BYTES {
                        cut = true;
                        break;
                    }
                    let room = ARGV_BYTES - len - 1;
                    match unsafe { read_cstr(buf, ptr, &mut s.text[len..len + room]) } {
                        Some((n, more)) => {
                            s.text[len + n] = 0;
                            len += n + 1;
                            if more {
                                cut = true;
                                break;
                            }
                        }
                        None => {
                            cut = true;
                            break;
                        }
                    }
                }
                let text = &s.text[..len];
                s.payload.argv(a, ARGV_BYTES, |b| {
                    let n = len.min(b.len());
                    b[..n].copy_from_slice(&text[..n]);
                    (n, cut || n < len)
                });
            }
            AtEntry::SockAddr { addr, len } => {
                let ptr = args[addr as usize];
                let want = args[len as usize] as u32 as usize;
                if ptr != 0 && want > 0 {
                    sockaddr(s, buf, addr, ptr, want);
                }
            }
            AtEntry::MsgName(a) => {
                // struct msghdr { void *msg_name; socklen_t msg_namelen; ... }
                let hdr = args[a as usize];
                let mut m = [0u8; 12];
                if hdr != 0 && unsafe { read_mem(buf, hdr, &mut m) } {
                    let name = u64::from_le_bytes(m[..8].try_into().unwrap_or_default());
                    let len = u32::from_le_bytes(m[8..].try_into().unwrap_or_default()) as usize;
                    if name != 0 && len > 0 {
                        sockaddr(s, buf, a, name, len);
                    }
                }
            }
            AtEntry::Fd(a) => {
                if p.ring.wants_fds(nr) {
                    push_file(s, a, task, args[a as usize] as i32 as i64);
                }
            }
        }
    }
}

/// Reads a socket address of `len` bytes (at most `MAX_SOCKADDR`) at `ptr`.
///
/// # Safety
/// As [`read_mem`] (callers are).
fn sockaddr(s: &mut Scratch, buf: *mut sys::GByteArray, arg: u8, ptr: u64, len: usize) {
    let n = len.min(events::payload::MAX_SOCKADDR);
    let mut b = [0u8; events::payload::MAX_SOCKADDR];
    // SAFETY: only called from the capture functions, which run in vCPU
    // callbacks on the thread owning `buf`.
    if unsafe { read_mem(buf, ptr, &mut b[..n]) } {
        s.payload.sockaddr(arg, &b[..n], len > n);
    } else {
        s.payload.unreadable(arg);
    }
}

/// The return captures of `nr` into `s.payload`.
///
/// # Safety
/// As [`read_mem`].
unsafe fn capture_return(
    p: &Plugin,
    s: &mut Scratch,
    buf: *mut sys::GByteArray,
    nr: u64,
    args: &[u64; 6],
    ret: i64,
    task: Option<u64>,
) {
    if ret < 0 {
        return;
    }
    for c in events::capture::at_return(nr) {
        match *c {
            AtReturn::SockAddrOut { addr, len_ptr } => {
                let (ptr, lp) = (args[addr as usize], args[len_ptr as usize]);
                if ptr == 0 || lp == 0 {
                    continue;
                }
                let mut l = [0u8; 4];
                // SAFETY: per this function's contract.
                if unsafe { read_mem(buf, lp, &mut l) } {
                    let len = u32::from_le_bytes(l) as usize;
                    if len > 0 {
                        sockaddr(s, buf, addr, ptr, len);
                    }
                }
            }
            AtReturn::FdPair(a) => {
                let mut b = [0u8; 8];
                // SAFETY: per this function's contract.
                if unsafe { read_mem(buf, args[a as usize], &mut b) } {
                    let fd =
                        |i: usize| i32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
                    s.payload.fd_pair(a, [fd(0), fd(4)]);
                }
            }
            AtReturn::FdResult => {
                if p.ring.wants_fds(nr) {
                    push_file(s, RESULT, task, ret);
                }
            }
            AtReturn::FcntlDupResult => {
                const F_DUPFD: u64 = 0;
                const F_DUPFD_CLOEXEC: u64 = 1030;
                if matches!(args[1], F_DUPFD | F_DUPFD_CLOEXEC) && p.ring.wants_fds(nr) {
                    push_file(s, RESULT, task, ret);
                }
            }
            AtReturn::MsgNameOut(a) => {
                // struct msghdr { void *msg_name; socklen_t msg_namelen; ... },
                // the length as the kernel updated it.
                let mut m = [0u8; 12];
                // SAFETY: per this function's contract.
                if args[a as usize] != 0 && unsafe { read_mem(buf, args[a as usize], &mut m) } {
                    let name = u64::from_le_bytes(m[..8].try_into().unwrap_or_default());
                    let len = u32::from_le_bytes(m[8..].try_into().unwrap_or_default()) as usize;
                    if name != 0 && len > 0 {
                        sockaddr(s, buf, a, name, len);
                    }
                }
            }
        }
    }
}

#[inline]
fn context(vcpu: c_uint) -> Option<(&'static Plugin, Regs, *mut sys::GByteArray)> {
    let p = PLUGIN.get()?;
    let ctx = (|| {
        let regs = *p.regs.get()?;
        let buf = p.bufs.get(vcpu as usize)?.load(Ordering::Acquire);
        (!buf.is_null()).then_some((regs, buf))
    })();
    match ctx {
        Some((regs, buf)) => Some((p, regs, buf)),
        None => {
            p.skipped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Runs `f` with this vCPU's scratch state.
fn with_scratch<T>(p: &Plugin, vcpu: c_uint, f: impl FnOnce(&mut Scratch) -> T) -> Option<T> {
    let mut slot = p.scratch.get(vcpu as usize)?.lock().ok()?;
    let s = slot.get_or_insert_with(|| {
        Box::new(Scratch {
            payload: PayloadBuf::default(),
            text: [0; events::payload::MAX_STRING],
            guest: None,
            since_flush: 0,
        })
    });
    Some(f(s))
}

/// Before a user-mode `syscall`.
unsafe extern "C" fn on_syscall(vcpu: c_uint, udata: *mut c_void) {
    let Some((p, r, buf)) = context(vcpu) else {
        return;
    };
    if p.user_syscalls.fetch_add(1, Ordering::Relaxed) % ENTRY_SAMPLE_EVERY == 0 {
        // SAFETY: our scoreboard slot of this vCPU (index < num_vcpus).
        unsafe { sys::qemu_plugin_u64_set(p.entry_gate.0, vcpu, 1) };
    }
    // SAFETY: registered with R_REGS; runs on `vcpu`'s own thread.
    let nr = unsafe { read(buf, r.rax) };
    if let Some(cf) = &p.xftrace {
        // SAFETY: as above.
        unsafe { cf.on_syscall(p, vcpu, nr, &r, buf, udata as u64) };
    }
    if !p.ring.wants(nr) {
        return;
    }
    let done = with_scratch(p, vcpu, |s| {
        // SAFETY: as above.
        unsafe {
            let th = thread(p, s, &r, buf);
            // A call the consumer said it does not need from this process
            // (e.g. a read by a process already known to hold the secret).
            if let Some((task, ids)) = &th {
                if ids.pid == ids.tgid && p.ring.is_quiet(nr, *task, ids.tgid) {
                    p.ring.count_quieted();
                    return;
                }
            }
            // Only the argument registers this syscall uses: each read costs.
            let mut args = [0u64; 6];
            let used = p.arg_counts.get(nr as usize).map_or(6, |&n| usize::from(n));
            for (arg, handle) in args
                .iter_mut()
                .zip([r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9])
                .take(used)
            {
                *arg = read(buf, handle);
            }
            let cr3 = read(buf, r.cr3);
            let mut rec = Record::entry(vcpu, nr, args, cr3, udata as u64);
            name_thread(&mut rec, th);
            s.payload.clear();
            if let Some((_, ids)) = &th {
                s.payload.comm(ids.comm());
            }
            capture_entry(p, s, buf, nr, &args, th.map(|t| t.0));
            if s.payload.was_cut() {
                rec.flags |= FLAG_PAYLOAD_CUT;
            }
            let key = match th {
                Some((task, _)) => pairing::task_key(task),
                None => {
                    // arch_prctl(ARCH_SET_FS, addr) returns with the new fs_base loaded.
                    let tls = if nr == NR_ARCH_PRCTL && args[0] == ARCH_SET_FS {
                        args[1]
                    } else {
                        read(buf, r.fs_base)
                    };
                    pairing::key(cr3, tls, read(buf, r.rsp))
                }
            };
            if p.entries.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                if let Some(g) = s.guest.as_ref() {
                    let gone = p.pending.sweep(|task, tid| g.thread_alive(task, tid));
                    p.stale.fetch_add(gone as u64, Ordering::Relaxed);
                    p.returns.close_if_idle(&p.pending);
                }
            }
            match p.ring.push_parts(&rec, s.payload.as_bytes()) {
                Some(seq) if nr != NR_EXIT && nr != NR_EXIT_GROUP => {
                    let (task, tid) = th.map_or((0, 0), |(task, ids)| (task, ids.pid));
                    let pending = pairing::Pending {
                        seq,
                        nr,
                        args,
                        task,
                        tid,
                    };
                    if p.pending.insert(key, &pending) {
                        p.returns.open();
                    } else {
                        p.ring.count_unpaired();
                    }
                }
                // Dropped (counted by the ring): forget any older entry of this task
                // so its return is not paired with the wrong call.
                _ => p.pending.remove(key),
            }
        }
    });
    if done.is_none() {
        p.skipped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts log doorbells per vCPU, for their ids.
static DOORBELLS: AtomicU64 = AtomicU64::new(0);

/// Before a user-mode `cpuid`: the log doorbell when `eax` is
/// [`events::LOG_DOORBELL_LEAF`] and the ring's filter has
/// [`events::LOG_DOORBELL`]. Copies `rcx` bytes (at most [`events::LOG_MAX`])
/// at `rbx` at this instant, from the calling process's memory, into
/// records of [`events::LOG_SLICE`] bytes. The guest kernel is not on the
/// path: the bytes are read by QEMU from the process's page tables.
///
/// Each process (by tgid; by page-table root when its thread cannot be
/// named) may ring at the rate the ring's control area sets
/// ([`events::RingReader::set_log_limit`], [`LogLimiter`]): a refused
/// doorbell copies nothing and writes no record; it is counted in the ring's
/// `log_dropped` and reported in `args[4]` of the process's next accepted one.
unsafe extern "C" fn on_cpuid(vcpu: c_uint, udata: *mut c_void) {
    let Some((p, r, buf)) = context(vcpu) else {
        return;
    };
    // SAFETY: registered with R_REGS; runs on `vcpu`'s own thread.
    let leaf = unsafe { read(buf, r.rax) } as u32;
    if leaf != events::LOG_DOORBELL_LEAF || !p.ring.wants(events::LOG_DOORBELL) {
        return;
    }
    let done = with_scratch(p, vcpu, |s| {
        // SAFETY: as above.
        unsafe {
            let cr3 = read(buf, r.cr3);
            let th = thread(p, s, &r, buf);
            let key = th.map_or(KEY_CR3 | cr3 >> 12, |(_, ids)| u64::from(ids.tgid));
            let (rate, burst) = p.ring.log_limit();
            let admitted = {
                let mut limiter = p.log_limiter.lock().unwrap_or_else(|e| e.into_inner());
                limiter.admit(key, events::now_ns(), rate, burst)
            };
            let Some(refused) = admitted else {
                p.ring.count_log_dropped();
                return;
            };
            let addr = read(buf, r.rbx);
            let asked = read(buf, r.rcx);
            let total = (asked as usize).min(events::LOG_MAX);
            let id = (u64::from(vcpu) << 48)
                | (DOORBELLS.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff_ffff);
            let mut off = 0usize;
            // One record even for an empty message, so it is seen.
            loop {
                let n = (total - off).min(events::LOG_SLICE);
                let mut rec = Record::entry(
                    vcpu,
                    events::LOG_DOORBELL,
                    [asked, off as u64, id, addr, refused, 0],
                    cr3,
                    udata as u64,
                );
                rec.kind = events::Kind::Log;
                name_thread(&mut rec, th);
                s.payload.clear();
                if let Some((_, ids)) = &th {
                    s.payload.comm(ids.comm());
                }
                let mut ok = true;
                s.payload.data(0, n, |b| {
                    let n = n.min(b.len());
                    // (Inside the callback's unsafe block: vCPU thread, R_REGS.)
                    ok = read_mem(buf, addr.wrapping_add(off as u64), &mut b[..n]);
                    (if ok { n } else { 0 }, false)
                });
                off += n;
                let last = off >= total;
                if !ok || (last && asked as usize > total) || s.payload.was_cut() {
                    rec.flags |= FLAG_PAYLOAD_CUT;
                }
                p.ring.push_parts(&rec, s.payload.as_bytes());
                if last || !ok {
                    break;
                }
            }
        }
    });
    if done.is_none() {
        p.skipped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Before `sysretq`: always a return to user mode.
unsafe extern "C" fn on_sysret(vcpu: c_uint, udata: *mut c_void) {
    // SAFETY: same contract as on_return.
    unsafe { on_return(vcpu, udata, false) }
}

/// Before a kernel `wrmsr`: publishes writes to the syscall-entry MSRs
/// (LSTAR, CSTAR, SYSENTER_EIP) and where they came from. Other MSRs (timer,
/// FS base on context switches) cost one register read.
unsafe extern "C" fn on_wrmsr(vcpu: c_uint, udata: *mut c_void) {
    let Some((p, r, buf)) = context(vcpu) else {
        return;
    };
    // SAFETY: registered with R_REGS; runs on `vcpu`'s own thread.
    let ecx = unsafe { read(buf, r.rcx) } as u32;
    let Some(msr) = events::EntryMsr::from_number(ecx) else {
        return;
    };
    // SAFETY: as above.
    let (eax, edx, rsp) = unsafe { (read(buf, r.rax), read(buf, r.rdx), read(buf, r.rsp)) };
    let value = (edx << 32) | (eax & 0xffff_ffff);
    // Paravirt kernels write MSRs in `native_write_msr`, a leaf: the top of
    // the stack is its caller, the code that chose the value.
    // SAFETY: as above; the kernel stack is mapped in the current CR3.
    let caller = unsafe { read_u64(buf, rsp) }.unwrap_or(0);
    p.ring
        .record_msr_write(vcpu, msr, value, udata as u64, caller);
}

/// Before `iretq`: a return to user mode only if `swapgs` already ran.
unsafe extern "C" fn on_iret(vcpu: c_uint, udata: *mut c_void) {
    // SAFETY: same contract as on_return.
    unsafe { on_return(vcpu, udata, true) }
}

/// # Safety
/// Only from a callback registered with R_REGS, on `vcpu`'s thread.
#[inline]
unsafe fn on_return(vcpu: c_uint, udata: *mut c_void, iret: bool) {
    let Some(p) = PLUGIN.get() else { return };
    if p.pending.is_empty() {
        p.returns.close_if_idle(&p.pending);
        return;
    }
    let Some((p, r, buf)) = context(vcpu) else {
        return;
    };
    // SAFETY: per this function's contract.
    let user_rsp = unsafe {
        if iret {
            if read(buf, r.gs_base) >= USER_TOP {
                return; // back to the kernel: gs_base is still the kernel's per-cpu base
            }
            // The iret frame: rip, cs, rflags, rsp, ss.
            let frame = read(buf, r.rsp);
            let mut f = [0u8; 24];
            if !read_mem(buf, frame.wrapping_add(8), &mut f) || f[0] & 3 != 3 {
                return; // not to CPL 3 (or unreadable)
            }
            Some(u64::from_le_bytes(f[16..24].try_into().unwrap_or_default()))
        } else {
            None // at sysretq the user rsp is already in rsp: read it only if needed
        }
    };
    with_scratch(p, vcpu, |s| {
        // SAFETY: per this function's contract.
        unsafe {
            let th = thread(p, s, &r, buf);
            let mut cr3 = 0;
            let pending = th
                .and_then(|(task, _)| p.pending.take(pairing::task_key(task)))
                .or_else(|| {
                    // No thread from guest RAM: the register key.
                    cr3 = read(buf, r.cr3);
                    let fs_base = read(buf, r.fs_base);
                    let rsp = user_rsp.unwrap_or_else(|| read(buf, r.rsp));
                    p.pending.take(pairing::key(cr3, fs_base, rsp))
                });
            let Some(pending) = pending else {
                return;
            };
            p.returns.close_if_idle(&p.pending);
            if let Some((_, ids)) = th {
                // Same task_struct, other thread: the entering thread died in
                // its syscall and the address was reused. A successful execve
                // from a non-leader thread comes back with the leader's pid.
                let exec = matches!(pending.nr, NR_EXECVE | NR_EXECVEAT) && ids.pid == ids.tgid;
                if pending.tid != 0 && pending.tid != ids.pid && !exec {
                    p.stale.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            let ret = read(buf, r.rax) as i64;
            let mut rec = Record::ret(vcpu, pending.nr, ret, cr3, udata as u64, pending.seq);
            rec.args = pending.args;
            name_thread(&mut rec, th);
            s.payload.clear();
            capture_return(p, s, buf, pending.nr, &pending.args, ret, th.map(|t| t.0));
            if s.payload.was_cut() {
                rec.flags |= FLAG_PAYLOAD_CUT;
            }
            let _ = p.ring.push_parts(&rec, s.payload.as_bytes());
        }
    });
}

unsafe extern "C" fn at_exit(_id: sys::qemu_plugin_id_t, _udata: *mut c_void) {
    if let Some(p) = PLUGIN.get() {
        eprintln!(
            "hook-plugin: vm `{}`: {} records written, {} dropped (ring full), {} callbacks skipped, {} events without a named thread, {} entries of threads that died in the call",
            p.vm,
            p.ring.written(),
            p.ring.dropped(),
            p.skipped.load(Ordering::Relaxed),
            p.unnamed.load(Ordering::Relaxed),
            p.stale.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn log_limiter_is_a_token_bucket_per_process() {
        let mut l = LogLimiter::default();
        let t0 = 5 * S;
        // A new process starts with a full bucket: `burst` at once, then refused.
        for _ in 0..20 {
            assert_eq!(l.admit(7, t0, 50, 20), Some(0));
        }
        for _ in 0..3 {
            assert_eq!(l.admit(7, t0, 50, 20), None);
        }
        // Another process is not affected.
        assert_eq!(l.admit(8, t0, 50, 20), Some(0));
        // 1/50 s refills one doorbell, which carries the 3 refused before it.
        assert_eq!(l.admit(7, t0 + S / 100, 50, 20), None);
        assert_eq!(l.admit(7, t0 + S / 50, 50, 20), Some(4));
        assert_eq!(l.admit(7, t0 + S / 50, 50, 20), None);
        // A long pause refills at most `burst`.
        let t1 = t0 + 100 * S;
        for _ in 0..20 {
            assert!(l.admit(7, t1, 50, 20).is_some());
        }
        assert_eq!(l.admit(7, t1, 50, 20), None);
        // Rate 0: no limit, and the pending refusals are handed over once.
        assert_eq!(l.admit(7, t1, 0, 0), Some(1));
        for _ in 0..1000 {
            assert_eq!(l.admit(7, t1, 0, 0), Some(0));
        }
        // Burst 0 is taken as 1; a clock going back refills nothing.
        assert_eq!(l.admit(9, t1, 1, 0), Some(0));
        assert_eq!(l.admit(9, t1 - S, 1, 0), None);
        assert_eq!(l.admit(9, t1 + S, 1, 0), Some(1));
    }

    #[test]
    fn log_limiter_evicts_the_least_recently_seen() {
        let mut l = LogLimiter::default();
        // Process 1 empties its bucket, then LOG_BUCKETS others arrive later.
        assert_eq!(l.admit(1, S, 1, 1), Some(0));
        assert_eq!(l.admit(1, S, 1, 1), None);
        for k in 0..LOG_BUCKETS as u64 - 1 {
            assert_eq!(l.admit(100 + k, 2 * S + k, 1, 1), Some(0));
        }
        // Table full, process 1 still known (refused, not a fresh bucket).
        assert_eq!(l.admit(1, S, 1, 1), None);
        // One more: process 1 (least recently seen) goes, and comes back fresh.
        assert_eq!(l.admit(99, 3 * S, 1, 1), Some(0));
        assert_eq!(l.admit(1, 3 * S, 1, 1), Some(0));
        // ... having taken the slot of process 100, now the oldest.
        let known = |l: &LogLimiter, k: u64| l.buckets.iter().any(|b| b.live && b.key == k);
        assert!(!known(&l, 100) && known(&l, 101) && known(&l, 99));
        assert_eq!(l.buckets.iter().filter(|b| b.live).count(), LOG_BUCKETS);
    }
}
