//! xftrace in the plugin (paper 003): the guest kernel's call flow of
//! selected syscalls, recorded at the instructions into the xftrace file
//! (`xftrace=PATH`, format in `xftrace::buffer`). Nothing is put into the
//! guest: no Ftrace, no guest buffer, no key to protect.
//!
//! # On and off
//! While off, translation does not look at kernel `call`/`ret` at all: the
//! only cost is one load and compare of the control generation in the
//! `syscall` callback the plugin has anyway. When the host changes the
//! control area, the next guest syscall sees the new generation and calls
//! `qemu_plugin_reset`: QEMU stops every vCPU, flushes the translation
//! cache and calls [`after_reset`], which registers the plugin's callbacks
//! again and applies the change ([`CallFlow::apply`]) while nothing runs.
//! Code is then retranslated with (on) or without (off) the call-flow
//! instrumentation.
//!
//! # What is instrumented while on (kernel half of the address space only)
//! - `call` (e8 rel32, ff /2 with a register or memory operand); a call to a
//!   retpoline thunk (`__x86_indirect_thunk_REG`, `..._call_thunk_`,
//!   `..._its_thunk_`) is a call through REG. Calls inside the thunks and
//!   the return thunks, calls to a label inside the calling function (the
//!   RSB-filling `call 1f` sequences) and calls of `error_entry` /
//!   `paranoid_entry` (which move their own return address) are not
//!   function calls and are skipped;
//! - `jmp` (e9, eb, ff /4) to the start of another kernel function, or from
//!   kernel text to outside it: a tail call, recorded when the jumping
//!   function has popped its frame (`rsp` is its return-address slot);
//! - `ret` (c3, c2 iw) outside the indirect thunks;
//! - `sysretq`/`iretq` (the return to user mode);
//! - the first instruction of `__switch_to_asm(prev, next)` (always called).
//!
//! All but the last are conditional callbacks on a per-vCPU flag (a QEMU
//! scoreboard) that is 1 only while a traced task runs on that vCPU: TCG
//! tests it inline, so other tasks and untraced syscalls pay a compare per
//! call/ret, not a call into the plugin.
//!
//! # Following one syscall of one task
//! The `syscall` callback of a selected syscall reads the calling task
//! (`task_struct`, through the guest kernel's per-cpu `current_task`),
//! gives it a slot in a fixed table ([`Tasks`]) and sets the flag of the
//! vCPU. The `__switch_to_asm` callback moves the flag with the task: on
//! when `next` is a traced task, off otherwise. So a traced syscall that
//! blocks, is preempted or migrates to another vCPU is followed exactly,
//! and the tasks that run meanwhile are not recorded. Interrupts taken
//! while the traced task runs are recorded inside its flow (as Ftrace
//! does; the writer frames them). The return to user mode of the task
//! (`sysretq`, or `iretq` whose frame returns to CPL 3) ends the flow.
//!
//! Nesting comes from a shadow stack per task of return-address slots:
//! a `call` pushes `rsp - 8`; a `ret` at `rsp` closes the frame with that
//! slot (and tail-called frames above it at the same slot); a `ret` that
//! matches no frame (e.g. inside a retpoline sequence) is ignored. So
//! stack switches (interrupt stacks) and calls that never return do not
//! derail the depth.
//!
//! # Indirect targets
//! Read at the call instruction, before it executes: the register, or the
//! 8 bytes at the memory operand's address (base + index * scale + disp,
//! RIP-relative, `%gs:`/`%fs:`) through QEMU's view of guest memory. A
//! target that cannot be read is recorded as 0 with `FLAG_UNREAD`.
//!
//! # Bounds and limits
//! 32 traced tasks in flight (the oldest is evicted and counted beyond
//! that); 128 nested frames per task (deeper calls counted, not recorded);
//! the buffer never wraps (a full buffer counts lost records); at most 2^20
//! distinct call sites are instrumented. Conditional tail calls (`jcc` to
//! another function) and tail jumps inside modules are not recognised: the
//! callee's calls then show under the jumping function. Timestamps are host
//! `CLOCK_MONOTONIC` at the callback, so durations include the
//! instrumentation's own cost.

use std::collections::HashMap;
use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use qemu_plugin_sys as sys;
use xftrace::record::{Kind, Record, FLAG_INDIRECT, FLAG_UNREAD, MAX_DEPTH};
use xftrace::{PluginState, Writer};

use crate::{read, read_mem, read_u64, thread, with_scratch, Plugin, Regs, PLUGIN, USER_TOP};

/// Traced syscalls in flight at once.
const TASK_SLOTS: usize = 32;
/// Call-site descriptors the plugin makes at most (tens of MiB at worst).
const MAX_SITES: usize = 1 << 20;

/// x86 general-purpose registers by encoding number.
const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15",
];
const RAX: usize = 0;
const RSP: usize = 4;
const RSI: usize = 6;

/// A segment override on a memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seg {
    None,
    Fs,
    Gs,
}

/// Where a call or jump goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// A relative target, known at translation.
    Direct(u64),
    /// A register (encoding number).
    Reg(u8),
    /// The 8 bytes at base + index * scale + disp (+ segment base).
    Mem {
        base: Option<u8>,
        index: Option<u8>,
        scale: u8,
        disp: i64,
        seg: Seg,
    },
    /// The 8 bytes at a fixed (RIP-relative or absolute) address.
    Abs { addr: u64, seg: Seg },
}

/// The control-flow instructions xftrace looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insn {
    Call(Operand),
    Jmp(Operand),
    Ret,
    Sysret,
    Iret,
}

/// Decodes `bytes` (one whole instruction at `pc`) if it is one of ours.
pub fn decode(bytes: &[u8], pc: u64) -> Option<Insn> {
    let mut i = 0;
    let mut seg = Seg::None;
    let (mut opsize, mut addr32) = (false, false);
    while i < bytes.len() && i < 14 {
        match bytes[i] {
            0x64 => seg = Seg::Fs,
            0x65 => seg = Seg::Gs,
            0x66 => opsize = true,
            0x67 => addr32 = true,
            0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 => {}
            _ => break,
        }
        i += 1;
    }
    let mut rex = 0u8;
    if let Some(&b @ 0x40..=0x4f) = bytes.get(i) {
        rex = b;
        i += 1;
    }
    let (rex_w, rex_x, rex_b) = (rex & 8 != 0, (rex >> 1) & 1, rex & 1);
    let op = *bytes.get(i)?;
    i += 1;
    let rel = |i: usize, n: usize| -> Option<(u64, usize)> {
        let raw = bytes.get(i..i + n)?;
        let v = match n {
            1 => i64::from(raw[0] as i8),
            _ => i64::from(i32::from_le_bytes(raw.try_into().ok()?)),
        };
        let end = i + n;
        (end == bytes.len()).then(|| (pc.wrapping_add(end as u64).wrapping_add(v as u64), end))
    };
    match op {
        0xe8 if !opsize => rel(i, 4).map(|(t, _)| Insn::Call(Operand::Direct(t))),
        0xe9 if !opsize => rel(i, 4).map(|(t, _)| Insn::Jmp(Operand::Direct(t))),
        0xeb => rel(i, 1).map(|(t, _)| Insn::Jmp(Operand::Direct(t))),
        0xc3 if i == bytes.len() => Some(Insn::Ret),
        0xc2 if i + 2 == bytes.len() => Some(Insn::Ret),
        0xcf if i == bytes.len() => Some(Insn::Iret),
        0x0f if bytes.get(i) == Some(&0x07) && i + 1 == bytes.len() => Some(Insn::Sysret),
        0xff if !addr32 => {
            let modrm = *bytes.get(i)?;
            let reg = (modrm >> 3) & 7;
            if reg != 2 && reg != 4 {
                return None;
            }
            let _ = rex_w; // calls and jumps through memory are 64-bit either way
            let operand = modrm_operand(bytes, i, pc, rex_x, rex_b, seg)?;
            Some(if reg == 2 {
                Insn::Call(operand)
            } else {
                Insn::Jmp(operand)
            })
        }
        _ => None,
    }
}

/// The r/m operand whose ModRM byte is at `bytes[at]`; the instruction must
/// end right after it (no immediate follows for ff /2, ff /4).
fn modrm_operand(
    bytes: &[u8],
    at: usize,
    pc: u64,
    rex_x: u8,
    rex_b: u8,
    seg: Seg,
) -> Option<Operand> {
    let modrm = *bytes.get(at)?;
    let (md, rm) = (modrm >> 6, modrm & 7);
    let mut i = at + 1;
    if md == 3 {
        return (i == bytes.len()).then_some(Operand::Reg(rm | (rex_b << 3)));
    }
    let mut base = Some(rm | (rex_b << 3));
    let (mut index, mut scale) = (None, 1u8);
    let mut disp_len = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    let mut rip = false;
    if rm == 4 {
        let sib = *bytes.get(i)?;
        i += 1;
        scale = 1 << (sib >> 6);
        let idx = ((sib >> 3) & 7) | (rex_x << 3);
        index = (idx != 4).then_some(idx);
        base = Some((sib & 7) | (rex_b << 3));
        if sib & 7 == 5 && md == 0 {
            base = None;
            disp_len = 4;
        }
    } else if rm == 5 && md == 0 {
        rip = true;
        base = None;
        disp_len = 4;
    }
    let raw = bytes.get(i..i + disp_len)?;
    let disp = match disp_len {
        0 => 0,
        1 => i64::from(raw[0] as i8),
        _ => i64::from(i32::from_le_bytes(raw.try_into().ok()?)),
    };
    i += disp_len;
    if i != bytes.len() {
        return None;
    }
    Some(match (rip, base, index) {
        (true, _, _) => Operand::Abs {
            addr: pc.wrapping_add(i as u64).wrapping_add(disp as u64),
            seg,
        },
        (false, None, None) => Operand::Abs {
            addr: disp as u64,
            seg,
        },
        _ => Operand::Mem {
            base,
            index,
            scale,
            disp,
            seg,
        },
    })
}

/// Kernel addresses xftrace needs, at run time (link-time + KASLR slide).
pub struct Marks {
    slide: u64,
    /// `_stext.._etext`.
    text: (u64, u64),
    switch_to: u64,
    /// Function starts in kernel text (no `.cold` parts), sorted.
    starts: Vec<u64>,
    /// Retpoline / call / ITS thunk address -> the register it jumps through.
    thunks: HashMap<u64, u8>,
    /// Indirect thunks: neither their calls nor their rets are real.
    skip_all: Vec<(u64, u64)>,
    /// Return thunks and untraining sequences: their rets are function
    /// returns, their calls are not.
    skip_calls: Vec<(u64, u64)>,
    /// Entry helpers called from the IDT stubs that move their own return
    /// address (`PUSH_AND_CLEAR_REGS save_ret=1`): their `ret` matches no
    /// frame, so calling them is not recorded.
    not_calls: Vec<u64>,
}

fn in_ranges(ranges: &[(u64, u64)], a: u64) -> bool {
    ranges.iter().any(|&(s, e)| (s..e).contains(&a))
}

impl Marks {
    fn from_guest(g: &vmi::linux::LinuxGuest) -> Option<Marks> {
        let slide = g.location().virtual_slide;
        let syms = &g.profile().symbols;
        let rt = |name: &str| syms.address_of(name).map(|a| a.wrapping_add(slide));
        let text = (rt("_stext")?, rt("_etext")?);
        let switch_to = rt("__switch_to_asm")?;
        let all: Vec<&vmi::symbols::Symbol> = syms.iter().collect();
        let mut starts = Vec::new();
        let mut thunks = HashMap::new();
        let (mut skip_all, mut skip_calls) = (Vec::new(), Vec::new());
        for (i, s) in all.iter().enumerate() {
            let a = s.addr.wrapping_add(slide);
            if !(text.0..text.1).contains(&a) || !matches!(s.kind, 'T' | 't' | 'W' | 'w') {
                continue;
            }
            let next = all[i + 1..]
                .iter()
                .map(|n| n.addr.wrapping_add(slide))
                .find(|&n| n > a)
                .unwrap_or(text.1);
            let n = s.name.as_str();
            if !n.contains(".cold") {
                starts.push(a);
            }
            for prefix in [
                "__x86_indirect_thunk_",
                "__x86_indirect_call_thunk_",
                "__x86_indirect_its_thunk_",
                "__x86_indirect_jump_thunk_",
            ] {
                if let Some(reg) = n.strip_prefix(prefix) {
                    if let Some(r) = GPR_NAMES.iter().position(|g| *g == reg) {
                        thunks.insert(a, r as u8);
                    }
                }
            }
            if n.starts_with("__x86_indirect_") {
                skip_all.push((a, next));
            } else if n.starts_with("srso_")
                || n.starts_with("retbleed_")
                || n.starts_with("__x86_return_")
                || n.starts_with("its_return_thunk")
                || n.contains("untrain_ret")
            {
                skip_calls.push((a, next));
            }
        }
        starts.sort_unstable();
        starts.dedup();
        let not_calls = ["error_entry", "paranoid_entry", "xen_error_entry"]
            .iter()
            .filter_map(|n| rt(n))
            .collect();
        Some(Marks {
            slide,
            text,
            switch_to,
            starts,
            thunks,
            skip_all,
            skip_calls,
            not_calls,
        })
    }

    fn in_text(&self, a: u64) -> bool {
        (self.text.0..self.text.1).contains(&a)
    }

    fn is_start(&self, a: u64) -> bool {
        self.starts.binary_search(&a).is_ok()
    }

    /// The start of the kernel function holding `a`.
    fn function_of(&self, a: u64) -> Option<u64> {
        if !self.in_text(a) {
            return None;
        }
        let i = self.starts.partition_point(|&s| s <= a);
        Some(self.starts[i.checked_sub(1)?])
    }

    /// Whether a jump from `pc` to `t` is a tail call (see the module docs).
    fn tail_target(&self, pc: u64, t: u64) -> bool {
        if self.in_text(t) {
            self.is_start(t) && self.function_of(pc) != Some(t)
        } else {
            self.in_text(pc)
        }
    }
}

/// What a call-site callback needs, decided at translation.
pub struct Site {
    /// The call or jmp instruction.
    pc: u64,
    bytes: [u8; 16],
    len: u8,
    tail: bool,
    operand: Operand,
    /// `FLAG_INDIRECT` when the operand is read at run time.
    flags: u8,
}

/// One traced syscall in flight.
struct TaskSlot {
    /// The guest `task_struct`; 0 = free.
    task: AtomicU64,
    /// pid | tgid << 32.
    ids: AtomicU64,
    nr: AtomicU64,
    since: AtomicU64,
    /// Return-address slots of the open frames, innermost last.
    frames: Mutex<Vec<u64>>,
}

/// The traced tasks (fixed size; the vCPU running a task is the only one
/// touching its frames, the lock is for safety, never contended).
struct Tasks {
    slots: Box<[TaskSlot]>,
    live: AtomicUsize,
    alloc: Mutex<()>,
}

impl Tasks {
    fn new() -> Tasks {
        Tasks {
            slots: (0..TASK_SLOTS)
                .map(|_| TaskSlot {
                    task: AtomicU64::new(0),
                    ids: AtomicU64::new(0),
                    nr: AtomicU64::new(0),
                    since: AtomicU64::new(0),
                    frames: Mutex::new(Vec::with_capacity(usize::from(MAX_DEPTH))),
                })
                .collect(),
            live: AtomicUsize::new(0),
            alloc: Mutex::new(()),
        }
    }

    fn find(&self, task: u64) -> Option<usize> {
        if task == 0 || self.live.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.slots
            .iter()
            .position(|s| s.task.load(Ordering::Acquire) == task)
    }

    /// A slot for a new syscall of `task` (its own if it has one: a flow
    /// whose exit was not seen ends here). Returns (slot, evicted another).
    fn begin(&self, task: u64, ids: u64, nr: u64, now: u64) -> (usize, bool) {
        let _g = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let free = || {
            self.slots
                .iter()
                .position(|s| s.task.load(Ordering::Relaxed) == 0)
        };
        let (i, evicted) = match self.find(task) {
            Some(i) => (i, false),
            None => match free() {
                Some(i) => {
                    self.live.fetch_add(1, Ordering::AcqRel);
                    (i, false)
                }
                None => {
                    let oldest = self
                        .slots
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, s)| s.since.load(Ordering::Relaxed))
                        .map_or(0, |(i, _)| i);
                    (oldest, true)
                }
            },
        };
        let s = &self.slots[i];
        s.frames.lock().unwrap_or_else(|e| e.into_inner()).clear();
        s.ids.store(ids, Ordering::Relaxed);
        s.nr.store(nr, Ordering::Relaxed);
        s.since.store(now, Ordering::Relaxed);
        s.task.store(task, Ordering::Release);
        (i, evicted)
    }

    fn end(&self, i: usize) {
        let _g = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let s = &self.slots[i];
        if s.task.swap(0, Ordering::AcqRel) != 0 {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn clear(&self) {
        for i in 0..self.slots.len() {
            self.end(i);
        }
    }
}

/// The plugin's xftrace state.
pub struct CallFlow {
    id: sys::qemu_plugin_id_t,
    buf: Writer,
    /// Per-vCPU flag: 1 while a traced task runs there.
    gate: sys::qemu_plugin_u64,
    /// The control generation last applied.
    applied: AtomicU64,
    resetting: AtomicBool,
    /// Recording (as applied): translation instruments calls and rets.
    on: AtomicBool,
    syscalls: [AtomicU64; 8],
    marks: OnceLock<Marks>,
    tasks: Tasks,
    /// Per vCPU: 1 + the task slot running there, 0 = none traced.
    cur: Box<[AtomicU32]>,
    /// Call-site descriptors by address, and how many were ever made
    /// (they are never freed: TCG may still hold code that points to them).
    sites: Mutex<(HashMap<u64, &'static Site>, usize)>,
    gprs: OnceLock<[usize; 16]>,
    /// fs_base, gs_base handles (segment overrides of memory operands).
    segs: OnceLock<(usize, usize)>,
}

// SAFETY: the scoreboard handle is a pointer owned by QEMU for the whole
// run, only passed to QEMU's scoreboard accessors; everything else is Sync.
unsafe impl Send for CallFlow {}
// SAFETY: as above; concurrent sets of scoreboard slots are plain stores.
unsafe impl Sync for CallFlow {}

impl CallFlow {
    /// Creates the xftrace file (tracing off) and the per-vCPU flag.
    pub fn new(
        id: sys::qemu_plugin_id_t,
        path: &std::path::Path,
        records: u64,
        max_vcpus: usize,
    ) -> Result<CallFlow, String> {
        let buf = Writer::create(path, records).map_err(|e| e.to_string())?;
        // SAFETY: plain allocation by QEMU; freed by QEMU at exit.
        let board = unsafe { sys::qemu_plugin_scoreboard_new(8) };
        if board.is_null() {
            return Err("QEMU could not allocate a scoreboard".to_string());
        }
        Ok(CallFlow {
            id,
            buf,
            gate: sys::qemu_plugin_u64 {
                score: board,
                offset: 0,
            },
            applied: AtomicU64::new(0),
            resetting: AtomicBool::new(false),
            on: AtomicBool::new(false),
            syscalls: Default::default(),
            marks: OnceLock::new(),
            tasks: Tasks::new(),
            cur: (0..max_vcpus).map(|_| AtomicU32::new(0)).collect(),
            sites: Mutex::new((HashMap::new(), 0)),
            gprs: OnceLock::new(),
            segs: OnceLock::new(),
        })
    }

    /// From the vCPU init callback: the register handles (`find` looks a
    /// register up by its QEMU name).
    pub fn set_registers(&self, find: impl Fn(&str) -> Option<usize>) {
        let gprs: Option<Vec<usize>> = GPR_NAMES.iter().map(|n| find(n)).collect();
        if let Some(g) = gprs.and_then(|g| <[usize; 16]>::try_from(g).ok()) {
            let _ = self.gprs.set(g);
        }
        if let (Some(fs), Some(gs)) = (find("fs_base"), find("gs_base")) {
            let _ = self.segs.set((fs, gs));
        }
    }

    fn set_gate(&self, vcpu: usize, value: u64) {
        // SAFETY: the scoreboard has a slot per vCPU QEMU started (vcpu is a
        // vCPU index QEMU gave a callback, or below num_vcpus).
        unsafe { sys::qemu_plugin_u64_set(self.gate, vcpu as c_uint, value) };
    }

    fn set_cur(&self, vcpu: usize, slot: Option<usize>) {
        if let Some(c) = self.cur.get(vcpu) {
            c.store(slot.map_or(0, |s| s as u32 + 1), Ordering::Relaxed);
            self.set_gate(vcpu, u64::from(slot.is_some()));
        }
    }

    fn current(&self, vcpu: c_uint) -> Option<&TaskSlot> {
        let i = self.cur.get(vcpu as usize)?.load(Ordering::Relaxed);
        self.tasks.slots.get(i.checked_sub(1)? as usize)
    }

    fn push(&self, rec: &Record) {
        let mut rec = *rec;
        rec.time_ns = events::now_ns();
        self.buf.push(&rec);
    }

    /// Called by the plugin's `syscall` callback for every guest syscall:
    /// notices control changes, and starts a flow for a selected syscall.
    ///
    /// # Safety
    /// Only from a callback registered with R_REGS, on `vcpu`'s thread owning `buf`.
    pub unsafe fn on_syscall(
        &self,
        p: &Plugin,
        vcpu: c_uint,
        nr: u64,
        r: &Regs,
        buf: *mut sys::GByteArray,
        pc: u64,
    ) {
        if self.buf.generation() != self.applied.load(Ordering::Relaxed)
            && !self.resetting.swap(true, Ordering::AcqRel)
        {
            // SAFETY: called from a vCPU callback (current_cpu is set), so
            // QEMU flushes the translation cache in its exclusive context
            // before calling after_reset.
            unsafe { sys::qemu_plugin_reset(self.id, Some(after_reset)) };
        }
        // While a change is pending no flow starts: it would be cut by the reset.
        if self.resetting.load(Ordering::Relaxed)
            || !self.on.load(Ordering::Relaxed)
            || nr >= 512
            || self.syscalls[(nr / 64) as usize].load(Ordering::Relaxed) & (1 << (nr % 64)) == 0
        {
            return;
        }
        self.buf.count_entry();
        if self.buf.is_full() {
            self.buf.count_lost();
            return;
        }
        // SAFETY: per this function's contract.
        let th = with_scratch(p, vcpu, |s| unsafe { thread(p, s, r, buf) }).flatten();
        let Some((task, ids)) = th else {
            // The task could not be read from guest RAM: not followed.
            self.buf.count_lost();
            return;
        };
        let packed = u64::from(ids.pid) | (u64::from(ids.tgid) << 32);
        let (slot, evicted) = self.tasks.begin(task, packed, nr, events::now_ns());
        if evicted {
            self.buf.count_evicted();
            for (v, c) in self.cur.iter().enumerate() {
                if c.load(Ordering::Relaxed) == slot as u32 + 1 {
                    self.set_cur(v, None);
                }
            }
        }
        self.push(&Record::entry(
            vcpu as u16,
            nr as u16,
            pc,
            task,
            ids.pid,
            ids.tgid,
            ids.comm(),
        ));
        self.set_cur(vcpu as usize, Some(slot));
    }

    /// The operand's value now; `None` if unreadable.
    ///
    /// # Safety
    /// As [`read_mem`].
    unsafe fn eval(&self, op: Operand, buf: *mut sys::GByteArray) -> Option<u64> {
        let gprs = self.gprs.get()?;
        // SAFETY: per this function's contract (R_REGS callback, own buffer).
        let reg = |r: u8| unsafe { read(buf, gprs[usize::from(r & 15)]) };
        let seg = |s: Seg| -> Option<u64> {
            let (fs, gs) = *self.segs.get()?;
            let handle = match s {
                Seg::None => return Some(0),
                Seg::Fs => fs,
                Seg::Gs => gs,
            };
            // SAFETY: as above.
            Some(unsafe { read(buf, handle) })
        };
        match op {
            Operand::Direct(t) => Some(t),
            Operand::Reg(r) => Some(reg(r)),
            // SAFETY: as above (a vCPU callback reading guest memory).
            Operand::Abs { addr, seg: s } => unsafe { read_u64(buf, addr.wrapping_add(seg(s)?)) },
            Operand::Mem {
                base,
                index,
                scale,
                disp,
                seg: s,
            } => {
                let ea = (disp as u64)
                    .wrapping_add(base.map_or(0, reg))
                    .wrapping_add(index.map_or(0, |i| reg(i).wrapping_mul(u64::from(scale))))
                    .wrapping_add(seg(s)?);
                // SAFETY: as above.
                unsafe { read_u64(buf, ea) }
            }
        }
    }

    /// Registers this instruction's callbacks, if it is one xftrace needs.
    /// Only called while recording.
    ///
    /// # Safety
    /// From the translation callback, with `insn` valid for it.
    unsafe fn instrument(&self, marks: &Marks, insn: *mut sys::qemu_plugin_insn, vaddr: u64) {
        // SAFETY: per this function's contract.
        unsafe {
            if vaddr == marks.switch_to {
                sys::qemu_plugin_register_vcpu_insn_exec_cb(
                    insn,
                    Some(on_switch),
                    sys::qemu_plugin_cb_flags::QEMU_PLUGIN_CB_R_REGS,
                    std::ptr::null_mut(),
                );
            }
            let size = sys::qemu_plugin_insn_size(insn).min(16);
            let mut bytes = [0u8; 16];
            let got =
                sys::qemu_plugin_insn_data(insn, bytes.as_mut_ptr() as *mut c_void, size).min(size);
            let Some(decoded) = decode(&bytes[..got], vaddr) else {
                return;
            };
            let skip_all = in_ranges(&marks.skip_all, vaddr);
            let (cb, udata): (sys::qemu_plugin_vcpu_udata_cb_t, *mut c_void) = match decoded {
                Insn::Ret if skip_all => return,
                Insn::Ret => (Some(on_ret), vaddr as usize as *mut c_void),
                Insn::Sysret => (Some(on_sysret), std::ptr::null_mut()),
                Insn::Iret => (Some(on_iret), std::ptr::null_mut()),
                Insn::Call(_) | Insn::Jmp(_) if skip_all || in_ranges(&marks.skip_calls, vaddr) => {
                    return
                }
                Insn::Call(op) | Insn::Jmp(op) => {
                    let tail = matches!(decoded, Insn::Jmp(_));
                    let operand = match op {
                        Operand::Direct(t) if marks.not_calls.contains(&t) => return,
                        Operand::Direct(t) => match marks.thunks.get(&t) {
                            Some(&r) => Operand::Reg(r),
                            None if tail && !marks.tail_target(vaddr, t) => return,
                            // A call to a label of its own function is no call.
                            None if !tail
                                && !marks.is_start(t)
                                && marks.function_of(t).is_some()
                                && marks.function_of(t) == marks.function_of(vaddr) =>
                            {
                                return
                            }
                            None => op,
                        },
                        _ => op,
                    };
                    let Some(site) = self.site(vaddr, &bytes[..got], tail, operand) else {
                        return;
                    };
                    (Some(on_call), site as *const Site as *mut c_void)
                }
            };
            sys::qemu_plugin_register_vcpu_insn_exec_cond_cb(
                insn,
                cb,
                sys::qemu_plugin_cb_flags::QEMU_PLUGIN_CB_R_REGS,
                sys::qemu_plugin_cond::QEMU_PLUGIN_COND_NE,
                self.gate,
                0,
                udata,
            );
        }
    }

    /// The descriptor of the call site at `pc`: the cached one if the code
    /// there is unchanged (retranslations), else a new one (bounded).
    fn site(&self, pc: u64, bytes: &[u8], tail: bool, operand: Operand) -> Option<&'static Site> {
        let mut guard = self.sites.lock().ok()?;
        let (sites, made) = &mut *guard;
        if let Some(s) = sites.get(&pc) {
            if &s.bytes[..usize::from(s.len)] == bytes && s.tail == tail && s.operand == operand {
                return Some(*s);
            }
        }
        // Bounded even if the guest rewrites its code over and over.
        if *made >= MAX_SITES {
            return None;
        }
        *made += 1;
        let mut b = [0u8; 16];
        b[..bytes.len()].copy_from_slice(bytes);
        let site: &'static Site = Box::leak(Box::new(Site {
            pc,
            bytes: b,
            len: bytes.len() as u8,
            tail,
            operand,
            flags: if matches!(operand, Operand::Direct(_)) {
                0
            } else {
                FLAG_INDIRECT
            },
        }));
        sites.insert(pc, site);
        Some(site)
    }

    /// Applies the control area (QEMU's exclusive context, after a reset):
    /// on/off, the syscalls; a new session starts with an empty table.
    fn apply(&self, p: &Plugin) {
        let c = self.buf.control();
        self.tasks.clear();
        for v in 0..self.cur.len() {
            self.cur[v].store(0, Ordering::Relaxed);
        }
        // SAFETY: QEMU's exclusive context; indexes below num_vcpus.
        let n = unsafe { sys::qemu_plugin_num_vcpus() }.max(0) as usize;
        for v in 0..n {
            self.set_gate(v, 0);
        }
        let mut state = PluginState::Off;
        if c.enabled {
            if self.marks.get().is_none() {
                if let Some(m) = p
                    .guest
                    .as_ref()
                    .and_then(|g| g.view())
                    .and_then(|g| Marks::from_guest(&g))
                {
                    let _ = self.marks.set(m);
                }
            }
            state = if self.marks.get().is_some() && self.gprs.get().is_some() {
                PluginState::Recording
            } else {
                PluginState::Refused
            };
        }
        for (dst, src) in self.syscalls.iter().zip(c.syscalls) {
            dst.store(src, Ordering::Relaxed);
        }
        self.on
            .store(state == PluginState::Recording, Ordering::Release);
        let slide = self.marks.get().map_or(0, |m| m.slide);
        self.buf.apply(&c, state, slide);
        self.applied.store(c.generation, Ordering::Release);
        self.resetting.store(false, Ordering::Release);
    }

    /// What the translation callback needs while recording; `None` (the
    /// cost when off: this one load) otherwise.
    #[inline]
    pub fn translating(&self) -> Option<&Marks> {
        if self.on.load(Ordering::Acquire) {
            self.marks.get()
        } else {
            None
        }
    }

    /// For the translation callback: see [`CallFlow::instrument`].
    ///
    /// # Safety
    /// From the translation callback, with `insn` valid for it.
    pub unsafe fn translate(&self, marks: &Marks, insn: *mut sys::qemu_plugin_insn, vaddr: u64) {
        if vaddr >= USER_TOP {
            // SAFETY: per this function's contract.
            unsafe { self.instrument(marks, insn, vaddr) }
        }
    }
}

/// QEMU calls this once the reset requested in [`CallFlow::on_syscall`] is
/// done (every vCPU stopped, translation cache flushed, our callbacks
/// unregistered): register them again and apply the control change.
unsafe extern "C" fn after_reset(id: sys::qemu_plugin_id_t) {
    // SAFETY: QEMU's reset callback is the place to register again.
    unsafe { crate::register_callbacks(id) };
    if let Some(p) = PLUGIN.get() {
        if let Some(cf) = &p.xftrace {
            cf.apply(p);
        }
    }
}

/// The plugin, its xftrace state and this vCPU's read buffer.
fn parts(vcpu: c_uint) -> Option<(&'static Plugin, &'static CallFlow, *mut sys::GByteArray)> {
    let p = PLUGIN.get()?;
    let cf = p.xftrace.as_ref()?;
    let buf = p.bufs.get(vcpu as usize)?.load(Ordering::Acquire);
    (!buf.is_null()).then_some((p, cf, buf))
}

/// Before a kernel call or tail jump while the vCPU runs a traced task.
unsafe extern "C" fn on_call(vcpu: c_uint, udata: *mut c_void) {
    let Some((_, cf, buf)) = parts(vcpu) else {
        return;
    };
    let Some(slot) = cf.current(vcpu) else {
        return;
    };
    if cf.buf.is_full() {
        cf.buf.count_lost();
        return;
    }
    // SAFETY: udata is the &'static Site registered with this callback.
    let site = unsafe { &*(udata as *const Site) };
    let Some(gprs) = cf.gprs.get() else {
        return;
    };
    // SAFETY: registered with R_REGS; runs on `vcpu`'s thread owning `buf`.
    let rsp = unsafe { read(buf, gprs[RSP]) };
    // SAFETY: as above.
    let target = unsafe { cf.eval(site.operand, buf) };
    let mut flags = site.flags;
    if target.is_none() {
        flags |= FLAG_UNREAD;
    }
    let target = target.unwrap_or(0);
    let depth = {
        let mut frames = slot.frames.lock().unwrap_or_else(|e| e.into_inner());
        if site.tail {
            // A tail call only once the jumping function popped its frame,
            // and (checked now for indirect jumps) to another function.
            let to_function = site.flags & FLAG_INDIRECT == 0
                || (flags & FLAG_UNREAD == 0
                    && cf
                        .marks
                        .get()
                        .is_some_and(|m| m.tail_target(site.pc, target)));
            if frames.last() != Some(&rsp) || !to_function {
                return;
            }
        }
        if frames.len() >= usize::from(MAX_DEPTH) {
            cf.buf.count_deep();
            return;
        }
        let depth = frames.len();
        frames.push(if site.tail { rsp } else { rsp.wrapping_sub(8) });
        depth
    };
    if flags & FLAG_UNREAD != 0 {
        cf.buf.count_unread();
    }
    let (pid, tgid) = unpack(slot.ids.load(Ordering::Relaxed));
    cf.push(&Record {
        time_ns: 0,
        vcpu: vcpu as u16,
        kind: if site.tail { Kind::Tail } else { Kind::Call },
        flags,
        depth: depth as u16,
        nr: slot.nr.load(Ordering::Relaxed) as u16,
        pc: site.pc,
        target,
        sp: if site.tail { rsp } else { rsp.wrapping_sub(8) },
        task: slot.task.load(Ordering::Relaxed),
        pid,
        tgid,
    });
}

fn unpack(ids: u64) -> (u32, u32) {
    (ids as u32, (ids >> 32) as u32)
}

/// Before a kernel `ret` while the vCPU runs a traced task.
unsafe extern "C" fn on_ret(vcpu: c_uint, udata: *mut c_void) {
    let Some((_, cf, buf)) = parts(vcpu) else {
        return;
    };
    let (Some(slot), Some(gprs)) = (cf.current(vcpu), cf.gprs.get()) else {
        return;
    };
    // SAFETY: registered with R_REGS; runs on `vcpu`'s thread owning `buf`.
    let rsp = unsafe { read(buf, gprs[RSP]) };
    let depth = {
        let mut frames = slot.frames.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut i) = frames.iter().rposition(|&s| s == rsp) else {
            return; // no frame of ours (a retpoline's inner ret, a frame past the depth cap)
        };
        while i > 0 && frames[i - 1] == rsp {
            i -= 1; // tail-called frames share the slot of the frame below
        }
        frames.truncate(i);
        i
    };
    if cf.buf.is_full() {
        cf.buf.count_lost();
        return;
    }
    let (pid, tgid) = unpack(slot.ids.load(Ordering::Relaxed));
    cf.push(&Record {
        time_ns: 0,
        vcpu: vcpu as u16,
        kind: Kind::Ret,
        flags: 0,
        depth: depth as u16,
        nr: slot.nr.load(Ordering::Relaxed) as u16,
        pc: udata as u64,
        target: 0,
        sp: rsp,
        task: slot.task.load(Ordering::Relaxed),
        pid,
        tgid,
    });
}

/// Before `sysretq` of a traced task: the flow ends.
unsafe extern "C" fn on_sysret(vcpu: c_uint, _udata: *mut c_void) {
    // SAFETY: same contract.
    unsafe { on_exit(vcpu, false) }
}

/// Before `iretq` of a traced task: the flow ends if it returns to user mode.
unsafe extern "C" fn on_iret(vcpu: c_uint, _udata: *mut c_void) {
    // SAFETY: same contract.
    unsafe { on_exit(vcpu, true) }
}

/// # Safety
/// Only from a callback registered with R_REGS, on `vcpu`'s thread.
unsafe fn on_exit(vcpu: c_uint, iret: bool) {
    let Some((_, cf, buf)) = parts(vcpu) else {
        return;
    };
    let (Some(slot), Some(gprs)) = (cf.current(vcpu), cf.gprs.get()) else {
        return;
    };
    if iret {
        // The iret frame: rip, cs, ...; CPL 3 in cs = back to user mode.
        let mut f = [0u8; 16];
        // SAFETY: per this function's contract.
        let rsp = unsafe { read(buf, gprs[RSP]) };
        // SAFETY: as above (the frame is mapped: PTI maps the entry stack).
        if !unsafe { read_mem(buf, rsp, &mut f) } || f[8] & 3 != 3 {
            return;
        }
    }
    // SAFETY: per this function's contract.
    let rax = unsafe { read(buf, gprs[RAX]) };
    let (pid, tgid) = unpack(slot.ids.load(Ordering::Relaxed));
    cf.push(&Record {
        time_ns: 0,
        vcpu: vcpu as u16,
        kind: Kind::Exit,
        flags: 0,
        depth: 0,
        nr: slot.nr.load(Ordering::Relaxed) as u16,
        pc: 0,
        target: rax,
        sp: 0,
        task: slot.task.load(Ordering::Relaxed),
        pid,
        tgid,
    });
    cf.buf.count_exit();
    if let Some(i) = cf.tasks.slots.iter().position(|s| std::ptr::eq(s, slot)) {
        cf.tasks.end(i);
    }
    cf.set_cur(vcpu as usize, None);
}

/// At `__switch_to_asm(prev, next)`: the flag follows the traced tasks.
unsafe extern "C" fn on_switch(vcpu: c_uint, _udata: *mut c_void) {
    let Some((_, cf, buf)) = parts(vcpu) else {
        return;
    };
    let running = cf
        .cur
        .get(vcpu as usize)
        .map_or(0, |c| c.load(Ordering::Relaxed));
    if running == 0 && cf.tasks.live.load(Ordering::Acquire) == 0 {
        return;
    }
    let Some(gprs) = cf.gprs.get() else {
        return;
    };
    // SAFETY: registered with R_REGS; runs on `vcpu`'s thread owning `buf`.
    let next = unsafe { read(buf, gprs[RSI]) };
    cf.set_cur(vcpu as usize, cf.tasks.find(next));
}

#[cfg(test)]
mod tests {
    use super::*;

    const PC: u64 = 0xffff_ffff_8100_1000;

    #[test]
    fn decodes_calls_jumps_and_returns() {
        // call rel32 (forward and backward).
        assert_eq!(
            decode(&[0xe8, 0x10, 0, 0, 0], PC),
            Some(Insn::Call(Operand::Direct(PC + 5 + 0x10)))
        );
        assert_eq!(
            decode(&[0xe8, 0xfb, 0xff, 0xff, 0xff], PC),
            Some(Insn::Call(Operand::Direct(PC)))
        );
        // jmp rel32 / rel8.
        assert_eq!(
            decode(&[0xe9, 0, 1, 0, 0], PC),
            Some(Insn::Jmp(Operand::Direct(PC + 5 + 0x100)))
        );
        assert_eq!(
            decode(&[0xeb, 0xfe], PC),
            Some(Insn::Jmp(Operand::Direct(PC)))
        );
        // call *%rax, call *%r11 (41 ff d3), jmp *%rcx.
        assert_eq!(decode(&[0xff, 0xd0], PC), Some(Insn::Call(Operand::Reg(0))));
        assert_eq!(
            decode(&[0x41, 0xff, 0xd3], PC),
            Some(Insn::Call(Operand::Reg(11)))
        );
        assert_eq!(decode(&[0xff, 0xe1], PC), Some(Insn::Jmp(Operand::Reg(1))));
        // call *0x10(%rbx): ff 53 10.
        assert_eq!(
            decode(&[0xff, 0x53, 0x10], PC),
            Some(Insn::Call(Operand::Mem {
                base: Some(3),
                index: None,
                scale: 1,
                disp: 0x10,
                seg: Seg::None
            }))
        );
        // call *-0x7e000000(,%rax,8) (sys_call_table style): ff 14 c5 disp32.
        assert_eq!(
            decode(&[0xff, 0x14, 0xc5, 0x00, 0x00, 0x00, 0x82], PC),
            Some(Insn::Call(Operand::Mem {
                base: None,
                index: Some(0),
                scale: 8,
                disp: -0x7e00_0000,
                seg: Seg::None
            }))
        );
        // call *0x1234(%rip) (pv_ops style): ff 15 disp32.
        assert_eq!(
            decode(&[0xff, 0x15, 0x34, 0x12, 0, 0], PC),
            Some(Insn::Call(Operand::Abs {
                addr: PC + 6 + 0x1234,
                seg: Seg::None
            }))
        );
        // call *%gs:0x28 : 65 ff 14 25 28 00 00 00.
        assert_eq!(
            decode(&[0x65, 0xff, 0x14, 0x25, 0x28, 0, 0, 0], PC),
            Some(Insn::Call(Operand::Abs {
                addr: 0x28,
                seg: Seg::Gs
            }))
        );
        // call *0x8(%r12,%r13,4): 43 ff 54 ac 08.
        assert_eq!(
            decode(&[0x43, 0xff, 0x54, 0xac, 0x08], PC),
            Some(Insn::Call(Operand::Mem {
                base: Some(12),
                index: Some(13),
                scale: 4,
                disp: 8,
                seg: Seg::None
            }))
        );
        // notrack call *%rax (3e ff d0), rets, sysretq, sysretl, iretq.
        assert_eq!(
            decode(&[0x3e, 0xff, 0xd0], PC),
            Some(Insn::Call(Operand::Reg(0)))
        );
        assert_eq!(decode(&[0xc3], PC), Some(Insn::Ret));
        assert_eq!(decode(&[0xf3, 0xc3], PC), Some(Insn::Ret));
        assert_eq!(decode(&[0xc2, 0x08, 0x00], PC), Some(Insn::Ret));
        assert_eq!(decode(&[0x48, 0x0f, 0x07], PC), Some(Insn::Sysret));
        assert_eq!(decode(&[0x0f, 0x07], PC), Some(Insn::Sysret));
        assert_eq!(decode(&[0x48, 0xcf], PC), Some(Insn::Iret));
    }

    #[test]
    fn rejects_everything_else() {
        for bytes in [
            &[][..],
            &[0x90],                   // nop
            &[0x0f, 0x05],             // syscall
            &[0xff, 0x30],             // push (%rax): ff /6
            &[0xff, 0x10, 0x00],       // call *(%rax) with a stray byte
            &[0xe8, 0, 0, 0],          // truncated call
            &[0x66, 0xe8, 0, 0],       // call rel16
            &[0x67, 0xff, 0x10],       // 32-bit addressing
            &[0xc3, 0x90],             // length mismatch
            &[0x0f, 0x84, 0, 0, 0, 0], // jcc
            &[0xf3; 15],               // prefixes only
        ] {
            assert_eq!(decode(bytes, PC), None, "{bytes:x?}");
        }
    }
}
