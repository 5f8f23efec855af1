//! Errors of the log vault: one line each, saying what to do.
//!
//! A vault that cannot be trusted is never repaired or replaced behind the
//! user's back: the error names the file and the offset and says which tool
//! to run. The only automatic repair is moving a torn last frame (a crash in
//! the middle of a write) aside, see [`crate::Vault::open`].

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("cannot {op} {path}: {source} (check the path, free space and permissions)")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` is not a usable VM name for a vault directory: use 1-64 characters of A-Z a-z 0-9 . _ - (not `.` or `..`)")]
    InvalidVmName(String),
    #[error(
        "record for VM `{got}` handed to the vault of VM `{expected}`: route records by VM name"
    )]
    VmMismatch { expected: String, got: String },
    #[error("record field `{field}` has {len} bytes, the vault keeps at most {max}: cut it before appending and set FLAG_CUT")]
    FieldTooLarge {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("no vault for VM `{vm}` in {dir}: check the data directory and the VM name")]
    NotFound { vm: String, dir: PathBuf },
    #[error(
        "vault {path} is in use by another process (lock held): stop the other vmwatchd first"
    )]
    Locked { path: PathBuf },
    #[error("key file {path} {problem}: restore it from a backup, or delete it to create a new key (vaults created with the old key keep verifying but cannot be appended to with the new one)")]
    KeyFile { path: PathBuf, problem: String },
    #[error("key file {path} has mode {mode:o}, readable by others: run `chmod 600 {path}` after checking nobody copied it")]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("vault of VM `{vm}` was created with public key {vault_key}, the daemon's key is {signer_key}: restore the original key file, or move {dir} aside to start a new vault")]
    KeyMismatch {
        vm: String,
        dir: PathBuf,
        vault_key: String,
        signer_key: String,
    },
    #[error("vault metadata {path} is invalid ({problem}): restore it from a backup (never edit it: the record chain starts from its hash)")]
    Meta { path: PathBuf, problem: String },
    #[error("vault file {path} is damaged at offset {offset} ({problem}): run `vmwatch vault verify` to see the first bad record; nothing was changed")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        problem: String,
    },
    #[error("vault of VM `{vm}` is inconsistent ({problem}): run `vmwatch vault verify`, then move {dir} aside to start a new vault; nothing was changed")]
    Inconsistent {
        vm: String,
        dir: PathBuf,
        problem: String,
    },
    #[error("a write to {path} failed earlier and could not be undone: reopen the vault (open moves the partial record aside)")]
    Poisoned { path: PathBuf },
    #[error("bad grep pattern: {0}")]
    Pattern(String),
}

impl VaultError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        VaultError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
