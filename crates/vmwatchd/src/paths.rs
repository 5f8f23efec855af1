//! Where the daemon keeps its files, and the pid lock that keeps two daemons
//! from fighting over the same rings.
//!
//! `<state dir>` is `--state-dir`, else `$VMWATCHD_DIR`, else
//! `<lab cache>/vmwatchd` (`~/.cache/vmwatch/vmwatchd`): mode 0700, holding
//! `vmwatchd.sock` (0600), `token` (0600) and `vmwatchd.pid` (locked while
//! the daemon runs), and `diffusion/` (the diffusion history). The CLI's
//! client finds the same files the same way.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::DaemonError;

/// File names inside the state directory.
pub const SOCKET: &str = "vmwatchd.sock";
pub const TOKEN: &str = "token";
pub const PID: &str = "vmwatchd.pid";

/// The default state directory (see the module docs).
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMWATCHD_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    lab::util::cache_dir().join("vmwatchd")
}

/// The daemon's files.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Paths {
        Paths {
            dir: dir.to_path_buf(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET)
    }

    pub fn token(&self) -> PathBuf {
        self.dir.join(TOKEN)
    }

    pub fn pid(&self) -> PathBuf {
        self.dir.join(PID)
    }

    /// The diffusion tracker's history (SQLite).
    pub fn diffusion_dir(&self) -> PathBuf {
        self.dir.join("diffusion")
    }

    /// The log vaults, one directory per VM.
    pub fn vault_dir(&self) -> PathBuf {
        self.dir.join("vault")
    }

    /// The key that signs the vaults' checkpoints (0600).
    pub fn vault_key(&self) -> PathBuf {
        self.dir.join("vault.key")
    }

    /// Creates the directory (0700: the socket and token inside are private
    /// to this user even before their own modes are set).
    pub fn create_dir(&self) -> Result<(), DaemonError> {
        std::fs::create_dir_all(&self.dir).map_err(DaemonError::io(&self.dir))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(DaemonError::io(&self.dir))
    }
}

/// The locked pid file; the lock goes with the process (also on SIGKILL).
pub struct PidLock {
    path: PathBuf,
    _file: File,
}

impl PidLock {
    /// Takes the lock or fails naming the daemon that holds it.
    pub fn acquire(path: &Path) -> Result<PidLock, DaemonError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(DaemonError::io(path))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.take(32).read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(DaemonError::AlreadyRunning {
                    pid: if pid.is_empty() { "?" } else { pid }.to_string(),
                    dir: path.parent().unwrap_or(path).to_path_buf(),
                });
            }
            return Err(DaemonError::Io {
                path: path.to_path_buf(),
                source: err,
            });
        }
        file.set_len(0).map_err(DaemonError::io(path))?;
        writeln!(file, "{}", std::process::id()).map_err(DaemonError::io(path))?;
        Ok(PidLock {
            path: path.to_path_buf(),
            _file: file,
        })
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        // Removed while still locked, so a daemon starting now either sees
        // our lock or no file at all.
        let _ = std::fs::remove_file(&self.path);
    }
}
