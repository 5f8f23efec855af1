//! One syscall event: the entry (number, six arguments) or the return (result)
//! of a system call made by a guest task.

/// `entry_seq` of a return whose entry the plugin could not pair (e.g. the
/// successful return of `execve`, which lands in a new address space).
pub const NO_ENTRY: u64 = u64::MAX;

/// Entry into or return from a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A user-mode `syscall` instruction about to execute.
    Entry,
    /// The kernel returning to user mode (`sysretq`, or `iretq` to CPL 3)
    /// for a task with a recorded entry.
    Return,
}

impl Kind {
    pub(crate) fn to_raw(self) -> u32 {
        match self {
            Kind::Entry => 1,
            Kind::Return => 2,
        }
    }

    pub(crate) fn from_raw(raw: u32) -> Option<Kind> {
        match raw {
            1 => Some(Kind::Entry),
            2 => Some(Kind::Return),
            _ => None,
        }
    }
}

/// One event as the consumer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Position in the ring's stream: dense, starts at 0, assigned by the ring.
    pub seq: u64,
    /// Host `CLOCK_MONOTONIC` ns when the vCPU reached the instruction.
    pub time_ns: u64,
    /// QEMU vCPU index.
    pub vcpu: u32,
    pub kind: Kind,
    /// Syscall number (`rax` at entry; the paired entry's number at return).
    pub nr: u64,
    /// `rdi, rsi, rdx, r10, r8, r9` at entry; zero at return.
    pub args: [u64; 6],
    /// `rax` at return (the result, negative errno on failure); zero at entry.
    pub ret: i64,
    /// CR3 at the instruction (the user page-table root; with PTI the user
    /// copy, i.e. kernel root | 0x1000).
    pub cr3: u64,
    /// Guest virtual address of the instrumented instruction.
    pub rip: u64,
    /// The user-visible task identity the plugin pairs by (`fs_base`, the
    /// thread's TLS pointer; see hook-plugin's pairing rule).
    pub task_key: u64,
    /// For a return: `seq` of its entry, or [`NO_ENTRY`]. For an entry: [`NO_ENTRY`].
    pub entry_seq: u64,
}

impl Record {
    /// A blank entry record; the ring fills `seq`.
    pub fn entry(vcpu: u32, nr: u64, args: [u64; 6], cr3: u64, rip: u64, task_key: u64) -> Self {
        Record {
            seq: 0,
            time_ns: crate::now_ns(),
            vcpu,
            kind: Kind::Entry,
            nr,
            args,
            ret: 0,
            cr3,
            rip,
            task_key,
            entry_seq: NO_ENTRY,
        }
    }

    /// A blank return record; the ring fills `seq`.
    pub fn ret(
        vcpu: u32,
        nr: u64,
        ret: i64,
        cr3: u64,
        rip: u64,
        task_key: u64,
        entry_seq: u64,
    ) -> Self {
        Record {
            seq: 0,
            time_ns: crate::now_ns(),
            vcpu,
            kind: Kind::Return,
            nr,
            args: [0; 6],
            ret,
            cr3,
            rip,
            task_key,
            entry_seq,
        }
    }

    /// Name of the syscall (`"?"` for numbers outside the table).
    pub fn name(&self) -> &'static str {
        crate::syscalls::name(self.nr).unwrap_or("?")
    }
}
