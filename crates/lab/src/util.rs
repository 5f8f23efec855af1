//! Small helpers shared by the image builder and the VM runner: where the
//! cache lives, running host tools, file locks, log tails, timestamps.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{IoContext, LabError, Result};

/// Root of everything the lab keeps outside the repository:
/// `$VMWATCH_CACHE`, else `$XDG_CACHE_HOME/vmwatch`, else `~/.cache/vmwatch`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMWATCH_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("vmwatch");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".cache").join("vmwatch")
}

/// Finds `tool` in `PATH`.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Fails with [`LabError::ToolMissing`] unless `tool` is in `PATH`.
pub fn require_tool(tool: &'static str, package: &'static str) -> Result<PathBuf> {
    which(tool).ok_or(LabError::ToolMissing { tool, package })
}

/// Runs a command to completion and returns its stdout; a non-zero exit is
/// an error carrying the last line of stderr.
pub fn run_capture(cmd: &mut Command) -> Result<Vec<u8>> {
    let shown = describe(cmd);
    tracing::debug!("running {shown}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            command: shown.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_string())
            .unwrap_or_else(|| format!("exit {}", out.status));
        return Err(LabError::Command {
            command: shown,
            detail,
        });
    }
    Ok(out.stdout)
}

/// `program arg arg` for messages, shortened if long.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
        if s.len() > 200 {
            s.push_str(" ...");
            break;
        }
    }
    s
}

/// An exclusive `flock` held until dropped. Serialises builds of one image
/// and state changes of one VM between concurrent `vmwatch` processes.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the exclusive lock on `path` (created if needed) is ours.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        Self::lock(path, libc::LOCK_EX)
    }

    /// Blocks until we share the lock on `path` (readers; excludes [`FileLock::acquire`]).
    pub fn acquire_shared(path: &Path) -> Result<FileLock> {
        Self::lock(path, libc::LOCK_SH)
    }

    fn lock(path: &Path, how: libc::c_int) -> Result<FileLock> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .at(path)?;
        loop {
            // SAFETY: flock on an fd we own; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), how) };
            if rc == 0 {
                return Ok(FileLock { _file: file });
            }
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(LabError::io(path, err));
            }
        }
    }
}

/// The last `lines` lines of a text file (lossy UTF-8), reading at most the
/// last 64 KiB. Empty if the file is missing.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 << 10);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Formats log tails for an error message: `\n--- name (last lines) ---\n...`.
pub fn tails(files: &[&Path], lines: usize) -> String {
    let mut out = String::new();
    for f in files {
        let t = tail(f, lines);
        if !t.trim().is_empty() {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push_str(&format!(
                "\n--- {name} (last lines, {}) ---\n{t}",
                f.display()
            ));
        }
    }
    out
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (UTC; proleptic Gregorian).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86400) as i64;
    let secs = unix % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Writes `data` to `path` atomically (temporary file + rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)
}

/// Hex SHA-256-free fingerprint: we only need "did this file change", so a
/// 64-bit FNV-1a over the bytes plus the length is enough and needs no crate.
pub fn fingerprint(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}-{}", data.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
