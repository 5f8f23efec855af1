//! The vmwatch lab: guest images built from Debian packages, and QEMU VMs
//! with shared RAM for tests, demos and benchmarks.
//!
//! ```no_run
//! use lab::{UpOptions, Vm};
//! let vm = Vm::up(&UpOptions::new("web1"))?;        // boots, waits for the agent
//! let out = vm.exec(&["uname", "-r"])?;              // runs in the guest
//! println!("{} ranges of RAM in {}", vm.info().ranges.len(), vm.info().ram_path.display());
//! vm.down()?;
//! # Ok::<(), lab::LabError>(())
//! ```
//!
//! - [`image`]: `vmwatch lab build`: kernel + initramfs from Debian packages.
//! - [`vm`]: `vmwatch lab up/exec/ls/down/dump`: QEMU processes and their state.
//! - [`qmp`], [`agent`], [`mtree`]: the QMP client, the guest agent client,
//!   and the parser that finds guest RAM in the backing file.
//!
//! Nothing in the monitor may depend on the guest agent; it only drives
//! workloads for tests.

pub mod agent;
pub mod error;
pub mod image;
pub mod mtree;
pub mod qmp;
pub mod util;
pub mod vm;

pub use error::{LabError, Result};
pub use image::{BuildOptions, Flavour, ImageInfo, ImagePaths};
pub use vm::{
    down, list, parse_mem, Accel, ExecOptions, ExecOutput, Pti, UpOptions, Vm, VmInfo, VmState,
    VmSummary,
};
