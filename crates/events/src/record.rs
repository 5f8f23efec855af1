//! One syscall event: the entry (number, six arguments, captured strings) or
//! the return (result, captured outputs) of a system call made by a guest task.

/// `entry_seq` of a return whose entry the plugin could not pair (e.g. the
/// successful return of `execve`, which lands in a new address space).
pub const NO_ENTRY: u64 = u64::MAX;

/// [`Record::flags`]: `pid`, `tgid` and `task` were read from the guest
/// kernel at the instruction (the per-cpu `current_task`).
pub const FLAG_TASK: u16 = 1;
/// [`Record::flags`]: the payload was cut at [`crate::payload::MAX_PAYLOAD`]
/// (items that did not fit are missing; the ones present are whole or marked).
pub const FLAG_PAYLOAD_CUT: u16 = 2;

/// Entry into or return from a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A user-mode `syscall` instruction about to execute.
    Entry,
    /// The kernel returning to user mode (`sysretq`, or `iretq` to CPL 3)
    /// for a task with a recorded entry.
    Return,
    /// A slice of a log doorbell: user space executed `cpuid` with
    /// `rax = LOG_DOORBELL_LEAF`, `rbx` = a buffer, `rcx` = its length (the
    /// log vault's transfer, paper 002). `nr` is [`LOG_DOORBELL`]; `args`:
    /// total length asked, this slice's offset, doorbell id (vCPU << 48 |
    /// per-vCPU counter: the slices of one doorbell share it), buffer
    /// address, refused (the process's doorbells the plugin refused because
    /// of the ring's log limit since its previous accepted one,
    /// [`crate::RingReader::set_log_limit`]; on every slice; the count of a
    /// process the plugin stopped tracking is only in
    /// [`crate::RingReader::log_dropped`]); the payload has the comm and an
    /// [`crate::Item::Data`] with the bytes. A doorbell longer than
    /// [`LOG_MAX`] is cut (flag [`FLAG_PAYLOAD_CUT`] on its last slice).
    Log,
}

/// `rax` (32 bits) of the log doorbell's `cpuid`.
pub const LOG_DOORBELL_LEAF: u32 = 0xffff;
/// The pseudo syscall number of doorbell records: in the ring's filter it
/// turns the doorbell on (beyond every x86-64 syscall number).
pub const LOG_DOORBELL: u64 = 511;
/// Most bytes taken from one doorbell (the guest library splits longer messages).
pub const LOG_MAX: usize = 65536;
/// Bytes of one doorbell slice (fits a record's payload with the comm).
pub const LOG_SLICE: usize = 7936;

impl Kind {
    pub(crate) fn to_raw(self) -> u8 {
        match self {
            Kind::Entry => 1,
            Kind::Return => 2,
            Kind::Log => 3,
        }
    }

    pub(crate) fn from_raw(raw: u8) -> Option<Kind> {
        match raw {
            1 => Some(Kind::Entry),
            2 => Some(Kind::Return),
            3 => Some(Kind::Log),
            _ => None,
        }
    }
}

/// One event as the consumer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position of the record in the ring's stream, assigned by the ring:
    /// increasing, with gaps where a record spans several slots.
    pub seq: u64,
    /// Host `CLOCK_MONOTONIC` ns when the vCPU reached the instruction.
    pub time_ns: u64,
    /// QEMU vCPU index.
    pub vcpu: u32,
    pub kind: Kind,
    /// Syscall number (`rax` at entry; the paired entry's number at return).
    pub nr: u64,
    /// `rdi, rsi, rdx, r10, r8, r9` at entry; at return the entry's arguments
    /// when the plugin kept them (it does for pairing), else zero.
    pub args: [u64; 6],
    /// `rax` at return (the result, negative errno on failure); zero at entry.
    pub ret: i64,
    /// CR3 at the instruction (the user page-table root; with PTI the user
    /// copy, i.e. kernel root | 0x1000). Zero in a return whose thread is
    /// known (not read: each register read costs the guest time).
    pub cr3: u64,
    /// Guest virtual address of the instrumented instruction.
    pub rip: u64,
    /// The kernel's `task_struct` of the calling thread (0: unknown).
    pub task: u64,
    /// Kernel pid of the calling thread (the tid user space sees); valid with [`FLAG_TASK`].
    pub pid: u32,
    /// Thread-group id (the pid user space sees); valid with [`FLAG_TASK`].
    pub tgid: u32,
    /// For a return: `seq` of its entry, or [`NO_ENTRY`]. For an entry: [`NO_ENTRY`].
    pub entry_seq: u64,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Captured items ([`crate::payload`]): strings, socket addresses, file
    /// identities, the task's comm.
    pub payload: Vec<u8>,
}

impl Record {
    /// A blank entry record; the ring fills `seq`.
    pub fn entry(vcpu: u32, nr: u64, args: [u64; 6], cr3: u64, rip: u64) -> Self {
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
            task: 0,
            pid: 0,
            tgid: 0,
            entry_seq: NO_ENTRY,
            flags: 0,
            payload: Vec::new(),
        }
    }

    /// A blank return record; the ring fills `seq`.
    pub fn ret(vcpu: u32, nr: u64, ret: i64, cr3: u64, rip: u64, entry_seq: u64) -> Self {
        Record {
            kind: Kind::Return,
            ret,
            entry_seq,
            ..Record::entry(vcpu, nr, [0; 6], cr3, rip)
        }
    }

    /// Name of the syscall (`"?"` for numbers outside the table).
    pub fn name(&self) -> &'static str {
        crate::syscalls::name(self.nr).unwrap_or("?")
    }

    /// Whether the plugin named the calling task.
    pub fn has_task(&self) -> bool {
        self.flags & FLAG_TASK != 0
    }

    /// The captured items, in the order the plugin wrote them.
    pub fn items(&self) -> crate::payload::Items<'_> {
        crate::payload::Items::new(&self.payload)
    }
}
