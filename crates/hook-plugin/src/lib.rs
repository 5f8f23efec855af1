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
//! Return callbacks: nothing at all while no entry is pending anywhere;
//! otherwise `rsp`, `cr3`, `fs_base` (and for iretq `gs_base` and the iret
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
use std::sync::OnceLock;

use events::{Record, RingWriter};
use qemu_plugin_sys as sys;

mod args;
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
const ARCH_SET_FS: u64 = 0x1002;

/// Opaque QEMU register handles (stable for the whole run, same for all vCPUs).
#[derive(Clone, Copy)]
struct Regs {
    rax: usize,
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
}

struct Plugin {
    ring: RingWriter,
    vm: String,
    regs: OnceLock<Regs>,
    /// One GByteArray per vCPU, used only on that vCPU's thread.
    bufs: Box<[AtomicPtr<sys::GByteArray>]>,
    pending: pairing::Table,
    /// Callbacks that returned early because of a missing register or buffer.
    skipped: AtomicU64,
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
    let ring = RingWriter::create(&cfg.ring, cfg.capacity, &cfg.vm, &cfg.filter)
        .map_err(|e| e.to_string())?;
    let plugin = Plugin {
        ring,
        vm: cfg.vm,
        regs: OnceLock::new(),
        bufs: (0..max_vcpus)
            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
            .collect(),
        pending: pairing::Table::default(),
        skipped: AtomicU64::new(0),
    };
    if PLUGIN.set(plugin).is_err() {
        return Err("loaded twice in one QEMU".to_string());
    }
    // SAFETY: registering callbacks with QEMU during install, as the API requires;
    // the callbacks are 'static functions.
    unsafe {
        sys::qemu_plugin_register_vcpu_init_cb(id, Some(vcpu_init));
        sys::qemu_plugin_register_vcpu_tb_trans_cb(id, Some(tb_trans));
        sys::qemu_plugin_register_atexit_cb(id, Some(at_exit), std::ptr::null_mut());
    }
    Ok(())
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
                })
            })();
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

/// Translation-time filter: instrument only the three instructions we need.
unsafe extern "C" fn tb_trans(_id: sys::qemu_plugin_id_t, tb: *mut sys::qemu_plugin_tb) {
    // SAFETY: `tb` is valid during this callback (QEMU's contract), and so are
    // the instruction handles it hands out.
    unsafe {
        for i in 0..sys::qemu_plugin_tb_n_insns(tb) {
            let insn = sys::qemu_plugin_tb_get_insn(tb, i);
            let size = sys::qemu_plugin_insn_size(insn);
            if size != 2 && size != 3 {
                continue;
            }
            let mut bytes = [0u8; 3];
            let got = sys::qemu_plugin_insn_data(insn, bytes.as_mut_ptr() as *mut c_void, size);
            let vaddr = sys::qemu_plugin_insn_vaddr(insn);
            let user = vaddr < USER_TOP;
            let cb: sys::qemu_plugin_vcpu_udata_cb_t = match &bytes[..got.min(3)] {
                [0x0f, 0x05] if user => Some(on_syscall),
                [0x48, 0x0f, 0x07] if !user => Some(on_sysret),
                [0x48, 0xcf] if !user => Some(on_iret),
                _ => continue,
            };
            // The instruction's address travels as userdata: `rip` read in the
            // callback would be stale (known QEMU behaviour).
            sys::qemu_plugin_register_vcpu_insn_exec_cb(
                insn,
                cb,
                sys::qemu_plugin_cb_flags::QEMU_PLUGIN_CB_R_REGS,
                vaddr as usize as *mut c_void,
            );
        }
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

/// Reads `len` (<= 24) bytes of guest virtual memory of the current vCPU as
/// little-endian words.
///
/// # Safety
/// Only from a vCPU callback, on the vCPU thread that owns `buf`.
unsafe fn read_guest(buf: *mut sys::GByteArray, vaddr: u64, len: usize) -> Option<[u64; 3]> {
    let len = len.min(24);
    // SAFETY: per this function's contract; QEMU resizes our heap GByteArray
    // (not a stack one: see the design notes on the crate's safe wrapper).
    unsafe {
        if !sys::qemu_plugin_read_memory_vaddr(vaddr, buf, len) || ((*buf).len as usize) < len {
            return None;
        }
        let mut b = [0u8; 24];
        std::ptr::copy_nonoverlapping((*buf).data, b.as_mut_ptr(), len);
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        Some([w(0), w(1), w(2)])
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

/// Before a user-mode `syscall`.
unsafe extern "C" fn on_syscall(vcpu: c_uint, udata: *mut c_void) {
    let Some((p, r, buf)) = context(vcpu) else {
        return;
    };
    // SAFETY: registered with R_REGS; runs on `vcpu`'s own thread.
    unsafe {
        let nr = read(buf, r.rax);
        if !p.ring.wants(nr) {
            return;
        }
        let args = [
            read(buf, r.rdi),
            read(buf, r.rsi),
            read(buf, r.rdx),
            read(buf, r.r10),
            read(buf, r.r8),
            read(buf, r.r9),
        ];
        let cr3 = read(buf, r.cr3);
        let fs_base = read(buf, r.fs_base);
        let rsp = read(buf, r.rsp);
        let rec = Record::entry(vcpu, nr, args, cr3, udata as u64, fs_base);
        // arch_prctl(ARCH_SET_FS, addr) returns with the new fs_base loaded.
        let tls = if nr == NR_ARCH_PRCTL && args[0] == ARCH_SET_FS {
            args[1]
        } else {
            fs_base
        };
        let key = pairing::key(cr3, tls, rsp);
        match p.ring.push(&rec) {
            Some(seq) if nr != NR_EXIT && nr != NR_EXIT_GROUP => {
                if !p.pending.insert(key, seq, nr) {
                    p.ring.count_unpaired();
                }
            }
            // Dropped (counted by the ring): forget any older entry of this task
            // so its return is not paired with the wrong call.
            None => p.pending.remove(key),
            Some(_) => p.pending.remove(key),
        }
    }
}

/// Before `sysretq`: always a return to user mode.
unsafe extern "C" fn on_sysret(vcpu: c_uint, udata: *mut c_void) {
    // SAFETY: same contract as on_return.
    unsafe { on_return(vcpu, udata, false) }
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
        return;
    }
    let Some((p, r, buf)) = context(vcpu) else {
        return;
    };
    // SAFETY: per this function's contract.
    unsafe {
        let user_rsp = if iret {
            if read(buf, r.gs_base) >= USER_TOP {
                return; // back to the kernel: gs_base is still the kernel's per-cpu base
            }
            // The iret frame: rip, cs, rflags, rsp, ss.
            let frame = read(buf, r.rsp);
            match read_guest(buf, frame.wrapping_add(8), 24) {
                Some(w) if w[0] & 3 == 3 => w[2],
                _ => return, // not to CPL 3 (or unreadable)
            }
        } else {
            read(buf, r.rsp)
        };
        let cr3 = read(buf, r.cr3);
        let fs_base = read(buf, r.fs_base);
        let Some((entry_seq, nr)) = p.pending.take(pairing::key(cr3, fs_base, user_rsp)) else {
            return;
        };
        let ret = read(buf, r.rax) as i64;
        let rec = Record::ret(vcpu, nr, ret, cr3, udata as u64, fs_base, entry_seq);
        let _ = p.ring.push(&rec);
    }
}

unsafe extern "C" fn at_exit(_id: sys::qemu_plugin_id_t, _udata: *mut c_void) {
    if let Some(p) = PLUGIN.get() {
        eprintln!(
            "hook-plugin: vm `{}`: {} records written, {} dropped (ring full), {} callbacks skipped",
            p.vm,
            p.ring.written(),
            p.ring.dropped(),
            p.skipped.load(Ordering::Relaxed)
        );
    }
}
