//! Syscall names as the paper's command line takes them: `sys_openat` or
//! `openat` (x86-64 names; a number below 512 is accepted too).

use crate::record::MAX_SYSCALLS;

/// A name that is no x86-64 syscall.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("unknown syscall `{0}` (use x86-64 names such as sys_openat or openat)")]
    Unknown(String),
    #[error("no syscall given (e.g. sys_openat sys_read)")]
    Empty,
}

/// The syscall number of `name`.
pub fn number(name: &str) -> Result<u64, NameError> {
    let n = name.trim();
    let bare = n
        .strip_prefix("__x64_sys_")
        .or_else(|| n.strip_prefix("sys_"))
        .unwrap_or(n);
    if let Ok(nr) = bare.parse::<u64>() {
        if nr < u64::from(MAX_SYSCALLS) {
            return Ok(nr);
        }
    }
    events::syscalls::number(bare).ok_or_else(|| NameError::Unknown(n.to_string()))
}

/// The bitmap of `names` (each may hold several, separated by `,`).
pub fn bitmap<S: AsRef<str>>(names: &[S]) -> Result<[u64; 8], NameError> {
    let mut bits = [0u64; 8];
    let mut any = false;
    for item in names
        .iter()
        .flat_map(|s| s.as_ref().split(','))
        .filter(|s| !s.trim().is_empty())
    {
        let nr = number(item)?;
        bits[(nr / 64) as usize] |= 1 << (nr % 64);
        any = true;
    }
    if !any {
        return Err(NameError::Empty);
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_and_plain_names() {
        assert_eq!(number("sys_openat"), Ok(257));
        assert_eq!(number("openat"), Ok(257));
        assert_eq!(number("__x64_sys_read"), Ok(0));
        assert_eq!(number("sys_open"), Ok(2));
        assert_eq!(number("39"), Ok(39));
        assert_eq!(
            number("sys_nope").unwrap_err().to_string(),
            "unknown syscall `sys_nope` (use x86-64 names such as sys_openat or openat)"
        );
        assert!(number("512").is_err());
        let b = bitmap(&["sys_openat", "read,getpid"]).unwrap();
        assert_eq!(b[0], 1 | 1 << 39);
        assert_eq!(b[4], 1 << (257 - 256));
        assert_eq!(bitmap::<&str>(&[]), Err(NameError::Empty));
        assert_eq!(bitmap(&[" , "]), Err(NameError::Empty));
    }
}
