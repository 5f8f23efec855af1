//! What a scan reports: findings that name the hooked object, the expected and
//! the actual target, and who owns the actual target.

use std::fmt;

use serde::Serialize;

/// Which check produced a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// An entry of a syscall table differs from the image's.
    SyscallTable,
    /// A call in the syscall dispatcher (`x64_sys_call`, kernels >= 6.9 and
    /// stable backports) goes somewhere the image does not say.
    SyscallDispatch,
    /// An IDT gate, or the IDT register, is not what the kernel set up.
    Idt,
    /// The `syscall` instruction enters the kernel somewhere else than
    /// `entry_SYSCALL_64` (the LSTAR MSR was changed).
    SyscallEntry,
    /// Kernel text differs from the image where the kernel never patches itself.
    InlineHook,
    /// An ftrace ops whose callback is not core kernel code.
    Ftrace,
    /// A function pointer in read-only data (file/seq/proc operations...) changed.
    OpsPointer,
    /// A pointer in a kernel data object rootkits swap (e.g. /proc's root) changed.
    DataPointer,
    /// A module in memory that the module list does not show.
    HiddenModule,
    /// A process the pid namespace knows but the task list does not show.
    HiddenProcess,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::SyscallTable => "syscall-table",
            Check::SyscallDispatch => "syscall-dispatch",
            Check::Idt => "idt",
            Check::SyscallEntry => "syscall-entry",
            Check::InlineHook => "inline-hook",
            Check::Ftrace => "ftrace",
            Check::OpsPointer => "ops-pointer",
            Check::DataPointer => "data-pointer",
            Check::HiddenModule => "hidden-module",
            Check::HiddenProcess => "hidden-process",
        }
    }
}

/// Who owns an address of the running kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Owner {
    /// The core kernel image, at this symbol (+offset).
    Kernel { symbol: String },
    /// A loaded module; `hidden` when the module list does not show it.
    Module {
        name: String,
        /// Offset from the module's lowest address.
        offset: u64,
        /// The module's function at or below the address, `name+0xoff`.
        symbol: Option<String>,
        hidden: bool,
    },
    /// Neither kernel text nor any module we found.
    Unknown,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Kernel { symbol } => f.write_str(symbol),
            Owner::Module {
                name,
                offset,
                symbol,
                hidden,
            } => {
                match symbol {
                    Some(sym) => write!(f, "{sym} [{name}]")?,
                    None => write!(f, "[{name}]+{offset:#x}")?,
                }
                if *hidden {
                    f.write_str(" (hidden module)")?;
                }
                Ok(())
            }
            Owner::Unknown => f.write_str("unknown memory"),
        }
    }
}

/// An address and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub addr: u64,
    pub owner: Owner,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x} {}", self.addr, self.owner)
    }
}

/// One integrity violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: Check,
    /// The hooked object, e.g. `sys_call_table[217] (getdents64)`.
    pub object: String,
    /// Run-time address of the hooked object (the slot, the patched byte...).
    pub location: u64,
    pub expected: Option<Target>,
    pub actual: Option<Target>,
    /// The module behind the hook, when one is: the owner of `actual`, or the
    /// hidden module itself.
    pub module: Option<String>,
    /// One line of detail (bytes, counts...).
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<16} {}", self.check.name(), self.object)?;
        if let Some(e) = &self.expected {
            write!(f, "  expected {e}")?;
        }
        if let Some(a) = &self.actual {
            write!(f, "  actual {a}")?;
        }
        if let Some(m) = &self.module {
            write!(f, "  module {m}")?;
        }
        if !self.detail.is_empty() {
            write!(f, "  ({})", self.detail)?;
        }
        Ok(())
    }
}

/// How much each check looked at, so "0 findings" can be told from "0 checked".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Coverage {
    pub syscall_entries: u64,
    pub dispatch_calls: u64,
    pub idt_gates: u64,
    /// Samples of the `syscall` entry the check had (0: not checked).
    pub syscall_entry_samples: u64,
    /// Writes to the syscall-entry MSRs the hook plugin saw (0: not checked).
    pub entry_msr_writes: u64,
    pub text_bytes: u64,
    pub text_bytes_patchable: u64,
    /// Patch sites whose branch was checked.
    pub patch_sites: u64,
    pub rodata_pointers: u64,
    pub ftrace_ops: u64,
    pub data_pointers: u64,
    pub modules_listed: u64,
    pub modules_in_sysfs: u64,
    pub modules_in_memory: u64,
    pub tasks_listed: u64,
    pub pids_in_namespace: u64,
    /// Tasks found running or queued on the CPUs' run queues.
    pub tasks_on_run_queues: u64,
}

/// The result of one scan.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub coverage: Coverage,
    /// Checks that could not run in full, and why (never silently skipped).
    pub warnings: Vec<String>,
    /// Wall-clock time of the scan.
    pub elapsed_us: u64,
}
