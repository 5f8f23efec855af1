//! Where the breakpoints go, found in the kernel image and checked in the
//! running kernel, and how to resume past each one.
//!
//! Two hardware breakpoints cover every 64-bit syscall:
//! - **entry**, in `entry_SYSCALL_64` (the LSTAR target), before the kernel
//!   touches any user register: `rax` = number, `rdi rsi rdx r10 r8 r9` =
//!   arguments, `rcx` = user return address, `rsp` = user stack. The exact
//!   instruction is chosen by [`entry_site`] (the symbol itself, or just
//!   after `swapgs; mov %rsp, %gs:..`); the kernel per-cpu base is whichever
//!   of `gs_base`/`k_gs_base` is a kernel address.
//! - **return**: the instruction right after `call do_syscall_64` inside
//!   `entry_SYSCALL_64`. Every syscall that returns to user mode passes
//!   here, whether the kernel then leaves through `sysretq` or through
//!   `iretq` (`execve`, `rt_sigreturn`, ptrace'd or otherwise unusual
//!   returns take `swapgs_restore_regs_and_return_to_usermode`): one
//!   breakpoint instead of one on `sysretq` plus one on the shared `iretq`,
//!   which would also stop at every interrupt and page-fault return. The
//!   result and the user stack pointer are in the `pt_regs` frame at `rsp`
//!   (`ax` at 80, `sp` at 152: `struct pt_regs`, kernel ABI); `gs_base` is
//!   the kernel per-cpu base. It is armed only while a recorded entry waits
//!   for its return.
//!
//! The `sysretq` (`48 0f 07`, after `swapgs`) inside `entry_SYSCALL_64` is
//! located too and checked, as the papers hook it, but is not used.
//!
//! Resuming: a breakpoint re-triggers when execution continues at its
//! address, so the vCPU must get past the instruction. [`resume_for`]
//! decides from the instruction in the *running* kernel (read through the
//! gdbstub: boot-time alternatives may have patched the image's bytes):
//! - a no-op (`endbr64`, a NOP form) or a direct `jmp`: the vCPU continues
//!   after it or at the jump target (`c ADDR`);
//! - `test %al,%al; je T` (6.12's return site): emulated exactly (RFLAGS
//!   written as `test` leaves them, one `P` packet), then `c T` or `c next`;
//! - anything else: single-stepped (under KVM with the breakpoint removed
//!   meanwhile, since debug registers would fire again; TCG's single-step
//!   ignores breakpoints), which is a second stop per hit.
//!
//! Measured: Debian 6.1 (entry after `swapgs; mov`: a `jmp`; return: a
//! 5-byte NOP) and 6.12 (entry: `endbr64`; return: `test; je`) both need
//! no single-step.

use vmi::image::KernelImage;
use vmi::symbols::KernelSymbols;

/// Bytes of `entry_SYSCALL_64` scanned at most.
pub const MAX_SCAN: u64 = 4096;

/// Why the breakpoint sites are not where we expect them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiteError {
    #[error("kernel image has no `{0}` symbol: is it an x86-64 Linux vmlinux?")]
    MissingSymbol(&'static str),
    #[error("kernel image has no bytes at `entry_SYSCALL_64` ({0:#x})")]
    NoCode(u64),
    #[error("no `call do_syscall_64` within {MAX_SCAN} bytes of `entry_SYSCALL_64`: this kernel's entry code is not supported")]
    NoDispatchCall,
}

/// The sites at link-time (unslid) addresses, with the image's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSites {
    /// `entry_SYSCALL_64`.
    pub entry: u64,
    /// The instruction after `call do_syscall_64`.
    pub ret: u64,
    /// `sysretq` inside `entry_SYSCALL_64`, if found.
    pub sysret: Option<u64>,
    /// The call's 5 bytes (`e8` + rel32), to check the running kernel.
    pub call_bytes: [u8; 5],
}

/// End of the code to scan: the first symbol after `start` that is not one
/// of `entry_SYSCALL_64`'s inner labels (they mark points inside it), at
/// most [`MAX_SCAN`] bytes on.
fn scan_end(symbols: &KernelSymbols, start: u64) -> u64 {
    let inner = |name: &str| {
        name.starts_with("entry_SYSCALL_64")
            || name.starts_with("entry_SYSRETQ")
            || name.starts_with("syscall_return_via_sysret")
    };
    symbols
        .iter()
        .filter(|s| s.addr > start && s.addr < start + MAX_SCAN)
        .find(|s| !inner(&s.name))
        .map_or(start + MAX_SCAN, |s| s.addr)
}

/// Finds the sites in the image.
pub fn find(image: &KernelImage, symbols: &KernelSymbols) -> Result<ImageSites, SiteError> {
    let entry = symbols
        .address_of("entry_SYSCALL_64")
        .ok_or(SiteError::MissingSymbol("entry_SYSCALL_64"))?;
    let dispatch = symbols
        .address_of("do_syscall_64")
        .ok_or(SiteError::MissingSymbol("do_syscall_64"))?;
    let end = scan_end(symbols, entry);
    let len = (end - entry) as usize;
    // The last symbol of a section may have fewer bytes after it.
    let code = (1..=len)
        .rev()
        .step_by(64)
        .find_map(|n| image.read_vaddr(entry, n))
        .ok_or(SiteError::NoCode(entry))?;
    find_in(code, entry, dispatch)
}

/// [`find`] on raw code bytes at `va` (testable without an image).
pub fn find_in(code: &[u8], va: u64, dispatch: u64) -> Result<ImageSites, SiteError> {
    let (ret, call_bytes) = find_call(code, va, dispatch).ok_or(SiteError::NoDispatchCall)?;
    Ok(ImageSites {
        entry: va,
        ret,
        sysret: find_sysret(code, va),
        call_bytes,
    })
}

/// The address after a `call rel32` (e8) to `target` in `code`.
fn find_call(code: &[u8], va: u64, target: u64) -> Option<(u64, [u8; 5])> {
    code.windows(5).enumerate().find_map(|(i, w)| {
        if w[0] != 0xe8 {
            return None;
        }
        let rel = i32::from_le_bytes([w[1], w[2], w[3], w[4]]);
        let next = va.wrapping_add(i as u64 + 5);
        (next.wrapping_add(rel as i64 as u64) == target)
            .then(|| (next, [w[0], w[1], w[2], w[3], w[4]]))
    })
}

/// `sysretq` preceded by `swapgs` (how every kernel since 4.x leaves), else
/// the first `48 0f 07`.
fn find_sysret(code: &[u8], va: u64) -> Option<u64> {
    let at = |pat: &[u8]| code.windows(pat.len()).position(|w| w == pat);
    at(&[0x0f, 0x01, 0xf8, 0x48, 0x0f, 0x07])
        .map(|i| i + 3)
        .or_else(|| at(&[0x48, 0x0f, 0x07]))
        .map(|i| va + i as u64)
}

/// The no-op instructions recognised (the kernel's own NOP forms, x86 `nops.h`,
/// and `endbr64`).
const NOPS: &[&[u8]] = &[
    &[0x90],
    &[0x66, 0x90],
    &[0x0f, 0x1f, 0x00],
    &[0x0f, 0x1f, 0x40, 0x00],
    &[0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00],
    &[0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00],
    &[0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00],
    &[0xf3, 0x0f, 0x1e, 0xfa],
];

/// How to get a vCPU past the breakpoint at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The instruction does nothing but move on: continue at this address.
    At(u64),
    /// `test %al,%al; je taken` (6.12's check of `do_syscall_64`'s "may use
    /// sysret" result): emulated exactly from `rax` and `rflags`
    /// ([`test_al_flags`]), then continue at `taken` (al == 0) or `next`.
    TestAlJe { taken: u64, next: u64 },
    /// Execute the instruction with a single-step.
    Step,
}

/// Arithmetic flags in RFLAGS: CF, PF, AF, ZF, SF, OF.
const ARITH_FLAGS: u64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x800;

/// RFLAGS after `test %al,%al` from RFLAGS before it: CF, OF cleared, ZF,
/// SF, PF from `al`, AF (architecturally undefined) cleared as CPUs do;
/// every other bit kept.
pub fn test_al_flags(rflags: u64, rax: u64) -> u64 {
    let al = rax as u8;
    let mut f = rflags & !ARITH_FLAGS;
    if al == 0 {
        f |= 0x40;
    }
    if al & 0x80 != 0 {
        f |= 0x80;
    }
    if al.count_ones() & 1 == 0 {
        f |= 0x4;
    }
    f
}

/// Decides [`Resume`] for the instruction at `va`, whose run-time bytes
/// (at least 10 when readable) are `code`.
pub fn resume_for(code: &[u8], va: u64) -> Resume {
    if let Some(nop) = NOPS.iter().find(|n| code.starts_with(n)) {
        return Resume::At(va.wrapping_add(nop.len() as u64));
    }
    match code {
        // test %al,%al; je rel32 | je rel8
        [0x84, 0xc0, 0x0f, 0x84, a, b, c, d, ..] => Resume::TestAlJe {
            taken: va
                .wrapping_add(8)
                .wrapping_add(i32::from_le_bytes([*a, *b, *c, *d]) as i64 as u64),
            next: va.wrapping_add(8),
        },
        [0x84, 0xc0, 0x74, rel, ..] => Resume::TestAlJe {
            taken: va.wrapping_add(4).wrapping_add(*rel as i8 as i64 as u64),
            next: va.wrapping_add(4),
        },
        [0xeb, rel, ..] => Resume::At(va.wrapping_add(2).wrapping_add(*rel as i8 as i64 as u64)),
        [0xe9, a, b, c, d, ..] => Resume::At(
            va.wrapping_add(5)
                .wrapping_add(i32::from_le_bytes([*a, *b, *c, *d]) as i64 as u64),
        ),
        _ => Resume::Step,
    }
}

/// `endbr64`, `swapgs`, and the start of `mov %rsp, %gs:disp32` (the
/// entry's save of the user stack pointer; 4 displacement bytes follow).
const ENDBR64: &[u8] = &[0xf3, 0x0f, 0x1e, 0xfa];
const SWAPGS: &[u8] = &[0x0f, 0x01, 0xf8];
const MOV_RSP_TO_GS: &[u8] = &[0x65, 0x48, 0x89, 0x24, 0x25];

/// The entry breakpoint: its address and how to resume, from the run-time
/// bytes `code` at `entry_SYSCALL_64` (`va`).
///
/// The cheapest place is one the vCPU can be moved past without a
/// single-step (a second stop, which under TCG is a second translation
/// cache flush), while every user register is still intact:
/// - an `endbr64` at the symbol (kernels built with IBT, e.g. 6.12):
///   the breakpoint sits on it;
/// - else, after the known prologue `swapgs; mov %rsp, %gs:disp32` (6.1),
///   the next instruction if it is a no-op or a `jmp` (there: the PTI
///   alternative, `jmp` without PTI, NOPs with it). Only `gs_base` and
///   `k_gs_base` have been swapped by then, and the per-cpu base is told by
///   its address, not by which register holds it.
///
/// Otherwise the symbol itself, single-stepped.
pub fn entry_site(code: &[u8], va: u64) -> (u64, Resume) {
    if code.starts_with(ENDBR64) {
        return (va, Resume::At(va.wrapping_add(ENDBR64.len() as u64)));
    }
    if code.starts_with(SWAPGS) && code[SWAPGS.len()..].starts_with(MOV_RSP_TO_GS) {
        let off = SWAPGS.len() + MOV_RSP_TO_GS.len() + 4;
        let at = va.wrapping_add(off as u64);
        if let Some(rest) = code.get(off..) {
            if let r @ Resume::At(_) = resume_for(rest, at) {
                return (at, r);
            }
        }
    }
    (va, resume_for(code, va))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first 0xd0 bytes of Debian 6.1.0-56's `entry_SYSCALL_64`
    /// (at 0xffffffff81c00080; `do_syscall_64` at 0xffffffff81a43dc0), cut to
    /// what the tests need: swapgs, the pushes, the call and the sysret tail.
    fn debian_6_1() -> (Vec<u8>, u64, u64) {
        let mut code = vec![0x90u8; 0x1b0];
        code[..3].copy_from_slice(&[0x0f, 0x01, 0xf8]);
        // call do_syscall_64 at +0xa1
        code[0xa1..0xa6].copy_from_slice(&[0xe8, 0x9a, 0x3c, 0xe4, 0xff]);
        // a decoy e8 whose target is elsewhere
        code[0x50..0x55].copy_from_slice(&[0xe8, 0, 0, 0, 0]);
        // swapgs; sysretq at +0x19b
        code[0x19b..0x1a1].copy_from_slice(&[0x0f, 0x01, 0xf8, 0x48, 0x0f, 0x07]);
        (code, 0xffff_ffff_81c0_0080, 0xffff_ffff_81a4_3dc0)
    }

    #[test]
    fn finds_the_call_and_sysret() {
        let (code, va, dispatch) = debian_6_1();
        let s = find_in(&code, va, dispatch).unwrap();
        assert_eq!(s.entry, va);
        assert_eq!(s.ret, 0xffff_ffff_81c0_0126);
        assert_eq!(s.sysret, Some(0xffff_ffff_81c0_021e));
        assert_eq!(s.call_bytes, [0xe8, 0x9a, 0x3c, 0xe4, 0xff]);
        assert_eq!(
            find_in(&code, va, dispatch + 1),
            Err(SiteError::NoDispatchCall)
        );
        assert_eq!(find_in(&[], va, dispatch), Err(SiteError::NoDispatchCall));
    }

    #[test]
    fn entry_sites() {
        let va = 0xffff_ffff_a580_0080u64;
        // Debian 6.1 without PTI: swapgs; mov %rsp,%gs:0x6014; jmp +0x12.
        let v61 = [
            0x0f, 0x01, 0xf8, 0x65, 0x48, 0x89, 0x24, 0x25, 0x14, 0x60, 0x00, 0x00, 0xeb, 0x12,
            0x0f, 0x20, 0xdc,
        ];
        assert_eq!(entry_site(&v61, va), (va + 0xc, Resume::At(va + 0x20)));
        // With PTI the jmp is patched to a 2-byte NOP.
        let mut pti = v61;
        pti[12..14].copy_from_slice(&[0x66, 0x90]);
        assert_eq!(entry_site(&pti, va), (va + 0xc, Resume::At(va + 0xe)));
        // 6.12 (IBT): endbr64 first.
        assert_eq!(
            entry_site(&[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x01, 0xf8], va),
            (va, Resume::At(va + 4))
        );
        // Anything else: the symbol, stepped.
        let mut odd = v61;
        odd[12] = 0x48;
        assert_eq!(entry_site(&odd, va), (va, Resume::Step));
        assert_eq!(entry_site(&v61[..12], va), (va, Resume::Step));
        assert_eq!(entry_site(&[], va), (va, Resume::Step));
    }

    #[test]
    fn test_al_flags_match_the_cpu() {
        // IF (0x200) and the reserved bit 1 survive; CF/OF/AF are cleared.
        let before = 0x202 | 0x1 | 0x800 | 0x10;
        assert_eq!(test_al_flags(before, 0), 0x202 | 0x40 | 0x4); // ZF, PF (0 set bits)
        assert_eq!(test_al_flags(before, 0x1), 0x202); // odd parity
        assert_eq!(test_al_flags(before, 0x3), 0x202 | 0x4);
        assert_eq!(test_al_flags(before, 0x80), 0x202 | 0x80); // SF
        assert_eq!(
            test_al_flags(before, 0xff00),
            0x202 | 0x40 | 0x4,
            "only al counts"
        );
    }

    #[test]
    fn resume_decisions() {
        let va = 0xffff_ffff_8100_0000u64;
        assert_eq!(resume_for(&[0x90, 0x90], va), Resume::At(va + 1));
        assert_eq!(
            resume_for(&[0xf3, 0x0f, 0x1e, 0xfa, 0x0f], va),
            Resume::At(va + 4)
        );
        assert_eq!(
            resume_for(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0xcc], va),
            Resume::At(va + 5)
        );
        assert_eq!(resume_for(&[0xeb, 0x18], va), Resume::At(va + 0x1a));
        assert_eq!(resume_for(&[0xeb, 0xfe], va), Resume::At(va));
        assert_eq!(
            resume_for(&[0xe9, 0x0b, 0x10, 0x00, 0x00], va),
            Resume::At(va + 0x1010)
        );
        // 6.12 after `call do_syscall_64`: test %al,%al; je swapgs_restore...
        assert_eq!(
            resume_for(&[0x84, 0xc0, 0x0f, 0x84, 0xf9, 0x16, 0x00, 0x00, 0xeb], va),
            Resume::TestAlJe {
                taken: va + 8 + 0x16f9,
                next: va + 8
            }
        );
        assert_eq!(
            resume_for(&[0x84, 0xc0, 0x74, 0xf0], va),
            Resume::TestAlJe {
                taken: va + 4 - 0x10,
                next: va + 4
            }
        );
        assert_eq!(
            resume_for(&[0x84, 0xc0, 0x0f, 0x84, 0xf9], va),
            Resume::Step
        );
        // swapgs, a mov, a truncated jmp: stepped.
        assert_eq!(resume_for(&[0x0f, 0x01, 0xf8], va), Resume::Step);
        assert_eq!(
            resume_for(&[0x48, 0x8b, 0x4c, 0x24, 0x58], va),
            Resume::Step
        );
        assert_eq!(resume_for(&[0xe9, 0x00], va), Resume::Step);
        assert_eq!(resume_for(&[], va), Resume::Step);
    }
}
