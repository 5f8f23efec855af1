//! The MSRs that say where system calls enter the kernel, as the hook plugin
//! saw the guest write them (every `wrmsr` in kernel code is instrumented;
//! QEMU shows no MSR through its monitor or to plugins).

/// Per-vCPU slots in the ring header; vCPUs at or past the last slot share it
/// (the last write among them wins).
pub const MSR_VCPU_SLOTS: usize = 16;

/// A syscall-entry MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryMsr {
    /// 64-bit `syscall`.
    Lstar,
    /// `syscall` from 32-bit code (AMD).
    Cstar,
    /// `sysenter` (32-bit code on Intel).
    SysenterEip,
}

impl EntryMsr {
    pub const ALL: [EntryMsr; 3] = [EntryMsr::Lstar, EntryMsr::Cstar, EntryMsr::SysenterEip];

    /// The architectural MSR number (`ecx` of `wrmsr`).
    pub const fn number(self) -> u32 {
        match self {
            EntryMsr::Lstar => 0xc000_0082,
            EntryMsr::Cstar => 0xc000_0083,
            EntryMsr::SysenterEip => 0x176,
        }
    }

    pub fn from_number(ecx: u32) -> Option<EntryMsr> {
        EntryMsr::ALL.into_iter().find(|m| m.number() == ecx)
    }

    /// Position in the header's per-vCPU triples.
    pub const fn slot(self) -> usize {
        self as usize
    }

    pub const fn name(self) -> &'static str {
        match self {
            EntryMsr::Lstar => "LSTAR",
            EntryMsr::Cstar => "CSTAR",
            EntryMsr::SysenterEip => "SYSENTER_EIP",
        }
    }
}

/// What the plugin saw written to the entry MSRs since the VM started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryMsrs {
    /// Writes observed to any of them, all vCPUs.
    pub writes: u64,
    /// Per MSR, the address of the `wrmsr` that last wrote it (any vCPU);
    /// 0 = never written.
    pub last_writer: [u64; 3],
    /// Per MSR, the word on top of the stack at that `wrmsr`: the return
    /// address into the caller when the `wrmsr` sits in a leaf accessor
    /// such as `native_write_msr` (paravirt kernels write MSRs there).
    pub last_caller: [u64; 3],
    /// Per vCPU slot, the value last written to each MSR (0 = never
    /// written, or written 0). Slot `MSR_VCPU_SLOTS - 1` also holds the
    /// vCPUs past it.
    pub values: Vec<[u64; 3]>,
}

impl EntryMsrs {
    /// (vCPU slot, MSR, value) for every MSR written on a slot.
    pub fn observed(&self) -> impl Iterator<Item = (usize, EntryMsr, u64)> + '_ {
        self.values.iter().enumerate().flat_map(|(cpu, v)| {
            EntryMsr::ALL
                .into_iter()
                .map(move |m| (cpu, m, v[m.slot()]))
                .filter(|&(_, _, value)| value != 0)
        })
    }

    pub fn last_writer(&self, msr: EntryMsr) -> Option<u64> {
        Some(self.last_writer[msr.slot()]).filter(|&a| a != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip() {
        for m in EntryMsr::ALL {
            assert_eq!(EntryMsr::from_number(m.number()), Some(m));
        }
        assert_eq!(EntryMsr::from_number(0x10), None);
        assert_eq!(EntryMsr::from_number(0x6e0), None);
    }
}
