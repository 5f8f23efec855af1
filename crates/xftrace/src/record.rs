//! One call-flow record: what the plugin writes for a syscall entry, a
//! kernel `call`, a kernel `ret` and the return to user mode.
//!
//! A record is 8 little-endian u64 words (64 bytes). Word 0 is the
//! publication stamp (see [`crate::buffer`]); this module encodes and decodes
//! words 1..8:
//!
//! ```text
//! 1  time: host CLOCK_MONOTONIC ns at the instruction
//! 2  vcpu u16 | kind u8 | flags u8 | depth u16 | syscall nr u16
//! 3  pc: entry = the user `syscall` instruction, call/tail = the call or
//!    jmp instruction, ret = the ret instruction, exit = sysretq/iretq
//! 4  target: call/tail = the callee (0 when FLAG_UNREAD), exit = the
//!    syscall's result (rax), entry = comm bytes 0..8
//! 5  sp: call/tail = the return-address slot the frame is known by, ret = rsp at
//!    the ret, entry = comm bytes 8..16
//! 6  task: the guest `task_struct` address
//! 7  pid u32 | tgid u32
//! ```
//!
//! Decoding never trusts the words: an unknown kind, a depth past
//! [`MAX_DEPTH`] or a syscall number past the table is an error, not a panic.

/// Deepest call nesting the plugin records; deeper calls are counted, not written.
pub const MAX_DEPTH: u16 = 128;
/// Syscall numbers the bitmap covers (x86-64 uses 0..=462 today).
pub const MAX_SYSCALLS: u16 = 512;

/// The call went through a register or memory operand (or a retpoline thunk).
pub const FLAG_INDIRECT: u8 = 1;
/// The indirect target could not be read (`target` is 0).
pub const FLAG_UNREAD: u8 = 2;

/// What a record stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A selected syscall entered (the `syscall` instruction in user mode).
    Entry,
    /// A kernel `call` of the traced task.
    Call,
    /// A kernel `ret` that closed the frame at `depth` (and any tail-called
    /// frames above it).
    Ret,
    /// The traced task returned to user mode (`sysretq`, or `iretq` to CPL 3).
    Exit,
    /// A `jmp` to the start of another function (a tail call): a frame with
    /// no return address of its own, closed by the `ret` of the frame below.
    Tail,
}

impl Kind {
    pub fn to_raw(self) -> u8 {
        match self {
            Kind::Entry => 1,
            Kind::Call => 2,
            Kind::Ret => 3,
            Kind::Exit => 4,
            Kind::Tail => 5,
        }
    }

    pub fn from_raw(raw: u8) -> Option<Kind> {
        Some(match raw {
            1 => Kind::Entry,
            2 => Kind::Call,
            3 => Kind::Ret,
            4 => Kind::Exit,
            5 => Kind::Tail,
            _ => return None,
        })
    }
}

/// One decoded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub time_ns: u64,
    pub vcpu: u16,
    pub kind: Kind,
    pub flags: u8,
    /// Call nesting below the syscall entry: the first kernel call is at 0.
    pub depth: u16,
    pub nr: u16,
    pub pc: u64,
    pub target: u64,
    pub sp: u64,
    pub task: u64,
    pub pid: u32,
    pub tgid: u32,
}

/// Why a record's words do not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("call depth {0} is past the limit {MAX_DEPTH}")]
    Depth(u16),
    #[error("syscall number {0} is past the table ({MAX_SYSCALLS})")]
    Syscall(u16),
    #[error("unknown flags {0:#x}")]
    Flags(u8),
}

impl Record {
    /// A syscall entry; the thread's name travels in `target` and `sp`.
    pub fn entry(vcpu: u16, nr: u16, pc: u64, task: u64, pid: u32, tgid: u32, comm: &[u8]) -> Self {
        let mut c = [0u8; 16];
        let n = comm.len().min(16);
        c[..n].copy_from_slice(&comm[..n]);
        let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        Record {
            time_ns: 0,
            vcpu,
            kind: Kind::Entry,
            flags: 0,
            depth: 0,
            nr,
            pc,
            target: word(&c[..8]),
            sp: word(&c[8..]),
            task,
            pid,
            tgid,
        }
    }

    /// The thread name of an entry record (up to the first NUL).
    pub fn comm(&self) -> String {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.target.to_le_bytes());
        b[8..].copy_from_slice(&self.sp.to_le_bytes());
        let end = b.iter().position(|&c| c == 0).unwrap_or(16);
        String::from_utf8_lossy(&b[..end]).into_owned()
    }

    /// Words 1..8 of the record's slot.
    pub fn encode(&self) -> [u64; 7] {
        [
            self.time_ns,
            u64::from(self.vcpu)
                | (u64::from(self.kind.to_raw()) << 16)
                | (u64::from(self.flags) << 24)
                | (u64::from(self.depth) << 32)
                | (u64::from(self.nr) << 48),
            self.pc,
            self.target,
            self.sp,
            self.task,
            u64::from(self.pid) | (u64::from(self.tgid) << 32),
        ]
    }

    /// The record in words 1..8 of a slot.
    pub fn decode(w: &[u64; 7]) -> Result<Record, RecordError> {
        let packed = w[1];
        let raw_kind = (packed >> 16) as u8;
        let kind = Kind::from_raw(raw_kind).ok_or(RecordError::Kind(raw_kind))?;
        let flags = (packed >> 24) as u8;
        if flags & !(FLAG_INDIRECT | FLAG_UNREAD) != 0 {
            return Err(RecordError::Flags(flags));
        }
        let depth = (packed >> 32) as u16;
        if depth >= MAX_DEPTH {
            return Err(RecordError::Depth(depth));
        }
        let nr = (packed >> 48) as u16;
        if nr >= MAX_SYSCALLS {
            return Err(RecordError::Syscall(nr));
        }
        Ok(Record {
            time_ns: w[0],
            vcpu: packed as u16,
            kind,
            flags,
            depth,
            nr,
            pc: w[2],
            target: w[3],
            sp: w[4],
            task: w[5],
            pid: w[6] as u32,
            tgid: (w[6] >> 32) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_comm() {
        let mut e = Record::entry(1, 257, 0x401000, 0xffff_8880_0100_0000, 77, 76, b"cat");
        e.time_ns = 123;
        assert_eq!(Record::decode(&e.encode()), Ok(e));
        assert_eq!(e.comm(), "cat");
        let long = Record::entry(0, 0, 0, 0, 0, 0, b"a-very-long-thread-name");
        assert_eq!(long.comm(), "a-very-long-thre");
        let c = Record {
            time_ns: 5,
            vcpu: 3,
            kind: Kind::Call,
            flags: FLAG_INDIRECT,
            depth: MAX_DEPTH - 1,
            nr: MAX_SYSCALLS - 1,
            pc: u64::MAX,
            target: 1,
            sp: 2,
            task: 3,
            pid: u32::MAX,
            tgid: 9,
        };
        assert_eq!(Record::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn bad_words_are_errors() {
        let ok = Record::entry(0, 1, 0, 0, 0, 0, b"").encode();
        let mut w = ok;
        w[1] &= !(0xff << 16);
        assert_eq!(Record::decode(&w), Err(RecordError::Kind(0)));
        let mut w = ok;
        w[1] |= u64::from(MAX_DEPTH) << 32;
        assert_eq!(Record::decode(&w), Err(RecordError::Depth(MAX_DEPTH)));
        let mut w = ok;
        w[1] |= 0xffff << 48;
        assert_eq!(Record::decode(&w), Err(RecordError::Syscall(0xffff)));
        let mut w = ok;
        w[1] |= 0x80 << 24;
        assert_eq!(Record::decode(&w), Err(RecordError::Flags(0x80)));
    }
}
