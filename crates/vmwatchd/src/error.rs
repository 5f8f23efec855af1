//! The daemon's error types. Every message is one line that says what is
//! wrong and what to do about it.

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Why the daemon cannot start (or had to stop).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another vmwatchd (pid {pid}) owns {dir}: stop it (`kill {pid}`) or give this one another --state-dir")]
    AlreadyRunning { pid: String, dir: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {0} is malformed (expected 64 hex digits): delete it and restart vmwatchd, which makes a new one")]
    BadToken(PathBuf),
    #[error("refusing to listen on {0}: not a loopback address (use 127.0.0.1:PORT, or add --allow-remote if you really mean to serve other hosts)")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Diffusion(diffusion::DiffusionError),
    #[error("log vault: {0}")]
    Vault(logvault::VaultError),
    #[error("--forward: {0}")]
    Forward(String),
}

impl DaemonError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DaemonError {
        let path = path.into();
        move |source| DaemonError::Io { path, source }
    }
}

/// Why a VM cannot be watched, started or subscribed to.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("no lab VM `{0}` (see `vmwatch lab ls`; start one with `vmwatch lab up {0}`)")]
    NoSuchVm(String),
    #[error("lab VM `{0}` is not running: start it with `vmwatch lab up {0}` (or `vmwatch lab down {0}` to clean up)")]
    NotRunning(String),
    #[error("lab VM `{0}` has no event ring (started with --no-hook): restart it with `vmwatch lab up {0}`")]
    NoRing(String),
    #[error("the event ring {path} of `{name}` already has a reader (a `vmwatch trace --ring` or another daemon?): stop that reader and retry")]
    RingBusy { name: String, path: PathBuf },
    #[error("the event ring {path} was written by pid {writer}, but `{name}` runs as QEMU pid {qemu}: the ring is stale; restart the VM (`vmwatch lab down {name}; vmwatch lab up {name}`)")]
    StaleRing {
        name: String,
        path: PathBuf,
        writer: u64,
        qemu: u32,
    },
    #[error("the event ring {path} belongs to VM `{owner}`, not `{name}`: restart `{name}`")]
    WrongRing {
        name: String,
        owner: String,
        path: PathBuf,
    },
    #[error("VM `{0}` is not watched: watch it first (`POST /v1/vms/{0}/watch`, or just `vmwatch trace --vm {0}`)")]
    NotWatched(String),
    #[error("VM `{name}` is not being watched ({state}): restart it with `vmwatch lab up {name}`, then watch it again")]
    NotWatching { name: String, state: String },
    #[error("already watching {0} VMs, the most one daemon takes: stop watching some (`DELETE /v1/vms/NAME`)")]
    TooManyVms(usize),
    #[error("{0} trace streams are open, the most one daemon serves: close some")]
    TooManySubscribers(usize),
    #[error("lab VM `{0}` is being started by another request: wait for it")]
    Starting(String),
    #[error("{0} lab VMs are booting already, the most at once: wait for them")]
    TooManyBoots(usize),
    #[error("event ring: {0}")]
    Ring(#[from] events::RingError),
    #[error("{0}")]
    Lab(String),
    #[error("{0}")]
    Invalid(String),
    #[error("vmwatchd is shutting down: restart it")]
    ShuttingDown,
}

impl WatchError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            WatchError::NoSuchVm(_) | WatchError::NotWatched(_) => StatusCode::NOT_FOUND,
            WatchError::NotRunning(_)
            | WatchError::NoRing(_)
            | WatchError::RingBusy { .. }
            | WatchError::StaleRing { .. }
            | WatchError::WrongRing { .. }
            | WatchError::NotWatching { .. }
            | WatchError::Starting(_) => StatusCode::CONFLICT,
            WatchError::TooManyVms(_)
            | WatchError::TooManySubscribers(_)
            | WatchError::TooManyBoots(_) => StatusCode::TOO_MANY_REQUESTS,
            WatchError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            WatchError::Invalid(_) => StatusCode::BAD_REQUEST,
            WatchError::Ring(_) | WatchError::Lab(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A lab error as one line: the lab appends log tails to boot failures
    /// after the first line; the API answers with the first line and where
    /// the logs are.
    pub fn lab(e: &lab::LabError) -> WatchError {
        WatchError::Lab(one_line(&e.to_string()))
    }
}

/// An error answer of the API: a status and `{"error": "one line"}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: one_line(&message.into()),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<WatchError> for ApiError {
    fn from(e: WatchError) -> ApiError {
        ApiError::new(e.status(), e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// The first line of `s`, at most 1000 bytes (API errors are one line).
pub fn one_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or("").trim_end();
    if first.len() <= 1000 {
        return first.to_string();
    }
    let mut end = 1000;
    while !first.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &first[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_are_one_line() {
        assert_eq!(one_line("boot failed\nlog tail\nmore"), "boot failed");
        let long = "é".repeat(800);
        let l = one_line(&long);
        assert!(l.len() <= 1003 && l.ends_with("..."));
        let e = ApiError::from(WatchError::NotWatched("web1".into()));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("POST /v1/vms/web1/watch"));
    }
}
