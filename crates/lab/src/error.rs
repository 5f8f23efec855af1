//! The one error type of the lab crate.
//!
//! Every message is one line that says what went wrong and what to do about
//! it; only failures with a log worth reading (QEMU died, boot timed out) add
//! the last lines of that log after the first line.

use std::path::PathBuf;

/// Errors from building images and running lab VMs.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// QEMU is not installed, or too old for the plugin API we need.
    #[error("{0}: run scripts/setup.sh (installs qemu-system-x86 >= 9.2 from bookworm-backports)")]
    Qemu(String),
    /// A host tool the image build needs is missing.
    #[error("`{tool}` not found: run scripts/setup.sh (or apt-get install {package})")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    /// A host command failed.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// Debian packages could not be resolved.
    #[error("apt: {0}: check /etc/apt/sources.list.d (scripts/setup.sh adds bookworm-backports) and run apt-get update")]
    Apt(String),
    /// The assembled guest tree lacks shared libraries some ELF file needs.
    #[error("guest image incomplete: {0}: add the packages that ship them to the package list in crates/lab/src/image/mod.rs")]
    MissingLibraries(String),
    /// The guest agent binary to put in the image was not found.
    #[error("guest agent binary not found (looked at {0}): run `cargo build --release` (or set VMWATCH_AGENT)")]
    AgentBinaryMissing(String),
    /// No image of this flavour has been built yet.
    #[error("no `{flavour}` guest image in {dir}: run `vmwatch lab build --kernel {flavour}` (or scripts/setup.sh)")]
    ImageMissing { flavour: String, dir: PathBuf },
    /// A bad option value.
    #[error("{0}")]
    Invalid(String),
    /// A VM name outside `[a-z0-9-]{1,32}`.
    #[error("bad VM name `{0}`: use 1 to 32 characters from a-z, 0-9 and -")]
    BadName(String),
    /// No state directory for this name.
    #[error("no lab VM named `{0}` (see `vmwatch lab ls`)")]
    NoSuchVm(String),
    /// `up` for a name whose QEMU is alive.
    #[error("lab VM `{0}` is already running: `vmwatch lab down {0}` first, or pick another name")]
    AlreadyRunning(String),
    /// The VM's QEMU is gone (crashed, killed, or the guest powered off).
    #[error("lab VM `{name}` is not running (QEMU pid {pid} is gone; see {log}): `vmwatch lab down {name}` cleans up")]
    Dead {
        name: String,
        pid: u32,
        log: PathBuf,
    },
    /// QEMU exited while the VM was starting.
    #[error("lab VM `{name}`: QEMU exited during boot ({status}){tail}")]
    BootFailed {
        name: String,
        status: String,
        tail: String,
    },
    /// The agent did not answer within the boot deadline.
    #[error("lab VM `{name}`: guest agent not ready after {secs} s (QEMU left running; `vmwatch lab down {name}` stops it){tail}")]
    BootTimeout {
        name: String,
        secs: u64,
        tail: String,
    },
    /// The guest agent misbehaved, restarted, or refused the request.
    #[error("guest agent of `{name}`: {detail}")]
    Agent { name: String, detail: String },
    /// The guest agent did not answer in time.
    #[error(
        "guest agent of `{name}` did not answer within {secs} s: the guest may be hung (see {log})"
    )]
    AgentTimeout {
        name: String,
        secs: u64,
        log: PathBuf,
    },
    /// QMP failed.
    #[error("QMP of `{name}`: {detail}")]
    Qmp { name: String, detail: String },
    /// A state or image file is unreadable or malformed.
    #[error("{path}: {detail}")]
    BadFile { path: PathBuf, detail: String },
    /// An I/O error on a named path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl LabError {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LabError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result with [`LabError`].
pub type Result<T, E = LabError> = std::result::Result<T, E>;

/// Adds the path to I/O errors: `fs::read(&p).at(&p)?`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| LabError::io(path, e))
    }
}
