//! Errors of the diffusion engine: one line each, saying what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    #[error("cannot create the diffusion data directory {dir}: {source}")]
    DataDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("diffusion store {path} is unreadable ({detail}): move it aside or restore a backup, then restart (vmwatch will not start a new history over it)")]
    Corrupt { path: PathBuf, detail: String },
    #[error("diffusion store {path} has schema version {found}, this vmwatch reads version {expected}: use a matching vmwatch or move the store aside")]
    Schema {
        path: PathBuf,
        found: String,
        expected: u32,
    },
    #[error("diffusion store {path}: {detail}")]
    Store { path: PathBuf, detail: String },
    #[error("`{0}` is not an absolute path (register paths as the guest sees them, e.g. /root/secret.txt)")]
    RelativePath(String),
    #[error("path is longer than {max} bytes or contains a NUL byte")]
    BadPath { max: usize },
    #[error("VM `{vm}` already has {limit} registered paths (remove some with `track rm`)")]
    TooManyRegistrations { vm: String, limit: usize },
    #[error("`{path}` is not registered in VM `{vm}` (see `track list`)")]
    NotRegistered { vm: String, path: String },
    #[error("unknown VM `{0}`: it has no diffusion history")]
    UnknownVm(String),
    #[error("bad time `{0}`: use RFC 3339, e.g. 2026-11-21T10:00:01.123Z")]
    BadTime(String),
}
