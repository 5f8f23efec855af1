//! xftrace (paper 003): the kernel call flow of selected guest syscalls,
//! recorded outside the guest and written in Ftrace's function_graph layout,
//! to find control-data rootkits by their behaviour.
//!
//! The paper runs Ftrace inside the guest and reads its ring buffer from the
//! host, XOR-keyed against tampering. Here nothing runs or lives in the
//! guest: vmwatch's TCG plugin (`hook-plugin`, `callflow.rs`) instruments
//! the guest kernel's `call`/`ret` instructions while tracing is on and
//! writes records into a file only QEMU and the host map. A rootkit in the
//! guest can neither switch the recording off nor edit it.
//!
//! - [`buffer`]: that file: control area (on/off, syscall bitmap) and record
//!   buffer; [`Writer`] for the plugin, [`Controller`] for the host.
//! - [`record`]: one record (entry, call, tail call, ret, exit).
//! - [`graph`]: records to per-syscall call trees.
//! - [`symbolize`]: names from kallsyms + KASLR slide and the module list;
//!   addresses outside known text are flagged.
//! - [`fgraph`]: the `trace_graph.txt` writer (and reader, for baselines).
//! - [`compare`]: a flow against its clean baseline.
//! - [`names`]: `sys_openat` / `openat` to syscall numbers.
//! - [`host`]: attaching to a live guest's RAM for the names.

pub mod buffer;
pub mod compare;
pub mod fgraph;
pub mod graph;
pub mod host;
pub mod kmod;
pub mod names;
pub mod record;
pub mod symbolize;

pub use buffer::{
    BufferError, Change, ControlState, Controller, PluginState, Snapshot, Status, Writer, FILE_NAME,
};
pub use compare::{compare, Finding};
pub use fgraph::{FlowSummary, Preamble, Written};
pub use graph::{build, Flow, Node, Trace};
pub use record::{Kind, Record};
pub use symbolize::{Place, Resolve, Symbolizer};

/// Where a lab VM's xftrace file is: `STATE_DIR/xftrace.buf`.
pub fn file_in(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join(FILE_NAME)
}
