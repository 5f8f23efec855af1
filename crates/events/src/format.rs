//! strace-like rendering of syscall arguments and results from register
//! values alone. Strings and buffers are shown as guest addresses: reading
//! them (bounded, at the moment of the call) is a later slice.

use crate::record::Record;

/// How to show one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arg {
    /// Decimal, signed 32-bit (fds, counts, pids, signal numbers).
    Int,
    /// A directory fd (`AT_FDCWD` shown by name).
    DirFd,
    /// Decimal, unsigned 64-bit (sizes).
    Size,
    /// Hex (pointers, flags we do not decode).
    Hex,
    /// `open(2)` flags (`O_RDONLY|O_CLOEXEC`).
    OpenFlags,
    /// Octal file mode.
    Mode,
    /// A user-space C string (a path): quoted when the caller can read it.
    Path,
}

use Arg::*;

/// Argument shapes of the syscalls we know; others show six hex values.
fn shape(name: &str) -> Option<&'static [Arg]> {
    Some(match name {
        "read" | "write" | "getdents64" => &[Int, Hex, Size],
        "pread64" | "pwrite64" => &[Int, Hex, Size, Int],
        "readv" | "writev" => &[Int, Hex, Int],
        "open" => &[Path, OpenFlags, Mode],
        "openat" => &[DirFd, Path, OpenFlags, Mode],
        "creat" | "mkdir" | "chmod" => &[Path, Mode],
        "mkdirat" | "fchmodat" => &[DirFd, Path, Mode],
        "close" | "dup" | "fsync" | "fdatasync" | "fchdir" => &[Int],
        "dup2" | "listen" | "shutdown" => &[Int, Int],
        "dup3" => &[Int, Int, OpenFlags],
        "pipe" | "brk" | "set_tid_address" | "uname" | "sysinfo" => &[Hex],
        "chdir" | "unlink" | "rmdir" | "chroot" => &[Path],
        "pipe2" => &[Hex, OpenFlags],
        "stat" | "lstat" => &[Path, Hex],
        "rename" | "link" | "symlink" => &[Path, Path],
        "nanosleep" => &[Hex, Hex],
        "execve" => &[Path, Hex, Hex],
        "fstat" => &[Int, Hex],
        "access" => &[Path, Int],
        "faccessat" | "faccessat2" => &[DirFd, Path, Int, Hex],
        "newfstatat" => &[DirFd, Path, Hex, Hex],
        "statx" => &[DirFd, Path, Hex, Hex, Hex],
        "unlinkat" => &[DirFd, Path, Hex],
        "renameat" => &[DirFd, Path, DirFd, Path],
        "renameat2" => &[DirFd, Path, DirFd, Path, Hex],
        "readlink" => &[Path, Hex, Size],
        "readlinkat" => &[DirFd, Path, Hex, Size],
        "lseek" => &[Int, Int, Int],
        "mmap" => &[Hex, Size, Hex, Hex, Int, Hex],
        "mprotect" => &[Hex, Size, Hex],
        "munmap" => &[Hex, Size],
        "ioctl" | "fcntl" => &[Int, Hex, Hex],
        "getpid" | "getppid" | "gettid" | "getuid" | "geteuid" | "getgid" | "getegid" | "fork"
        | "vfork" | "sched_yield" | "getpgrp" | "setsid" | "pause" | "sync" => &[],
        "exit" | "exit_group" => &[Int],
        "kill" => &[Int, Int],
        "tgkill" => &[Int, Int, Int],
        "wait4" => &[Int, Hex, Hex, Hex],
        "execveat" => &[DirFd, Hex, Hex, Hex, Hex],
        "clone" => &[Hex, Hex, Hex, Hex, Hex],
        "clone3" => &[Hex, Size],
        "socket" | "socketpair" => &[Int, Int, Int],
        "connect" | "bind" => &[Int, Hex, Int],
        "accept" | "getsockname" | "getpeername" => &[Int, Hex, Hex],
        "accept4" => &[Int, Hex, Hex, Hex],
        "sendto" => &[Int, Hex, Size, Hex, Hex, Int],
        "recvfrom" => &[Int, Hex, Size, Hex, Hex, Hex],
        "sendmsg" | "recvmsg" => &[Int, Hex, Hex],
        "sendfile" => &[Int, Int, Hex, Size],
        "copy_file_range" => &[Int, Hex, Int, Hex, Size, Hex],
        "getrandom" => &[Hex, Size, Hex],
        "rt_sigaction" => &[Int, Hex, Hex, Size],
        "rt_sigprocmask" => &[Int, Hex, Hex, Size],
        "arch_prctl" => &[Hex, Hex],
        "set_robust_list" => &[Hex, Size],
        "prlimit64" => &[Int, Int, Hex, Hex],
        "futex" => &[Hex, Int, Int, Hex, Hex, Int],
        "clock_gettime" => &[Int, Hex],
        "clock_nanosleep" => &[Int, Hex, Hex, Hex],
        "poll" => &[Hex, Int, Int],
        "rseq" => &[Hex, Int, Hex, Hex],
        "getcwd" => &[Hex, Size],
        _ => return None,
    })
}

const AT_FDCWD: i32 = -100;

fn open_flags(v: u64) -> String {
    let mut out = vec![match v & 3 {
        0 => "O_RDONLY",
        1 => "O_WRONLY",
        2 => "O_RDWR",
        _ => "O_ACCMODE",
    }
    .to_string()];
    let mut rest = v & !3;
    const FLAGS: &[(u64, &str)] = &[
        (0o20200000, "O_TMPFILE"),
        (0o100, "O_CREAT"),
        (0o200, "O_EXCL"),
        (0o400, "O_NOCTTY"),
        (0o1000, "O_TRUNC"),
        (0o2000, "O_APPEND"),
        (0o4000, "O_NONBLOCK"),
        (0o4010000, "O_SYNC"),
        (0o10000, "O_DSYNC"),
        (0o20000, "O_ASYNC"),
        (0o40000, "O_DIRECT"),
        (0o100000, "O_LARGEFILE"),
        (0o200000, "O_DIRECTORY"),
        (0o400000, "O_NOFOLLOW"),
        (0o1000000, "O_NOATIME"),
        (0o2000000, "O_CLOEXEC"),
        (0o10000000, "O_PATH"),
    ];
    for (bits, name) in FLAGS {
        if rest & bits == *bits {
            out.push((*name).to_string());
            rest &= !bits;
        }
    }
    if rest != 0 {
        out.push(format!("{rest:#x}"));
    }
    out.join("|")
}

fn arg(kind: Arg, v: u64) -> String {
    match kind {
        Int => (v as i32).to_string(),
        DirFd if v as i32 == AT_FDCWD => "AT_FDCWD".to_string(),
        DirFd => (v as i32).to_string(),
        Size => v.to_string(),
        Hex | Path if v == 0 => "NULL".to_string(),
        Hex | Path => format!("{v:#x}"),
        OpenFlags => open_flags(v),
        Mode => format!("{:04o}", v & 0o7777),
    }
}

/// `openat(AT_FDCWD, 0x7ffd..., O_RDONLY|O_CLOEXEC)` for an entry record.
pub fn call(rec: &Record) -> String {
    call_with(rec, &|_| None)
}

/// Like [`call`], with path arguments shown as quoted strings where
/// `read_path(address)` can read them (`openat(AT_FDCWD, "/etc/passwd", O_RDONLY)`).
pub fn call_with(rec: &Record, read_path: &dyn Fn(u64) -> Option<Vec<u8>>) -> String {
    let name = rec.name();
    let args: Vec<String> = match shape(name) {
        Some(shape) => {
            // open/openat show the mode only with O_CREAT or O_TMPFILE, like strace.
            let n = match name {
                "open" if rec.args[1] & 0o20200100 == 0 => 2,
                "openat" if rec.args[2] & 0o20200100 == 0 => 3,
                _ => shape.len(),
            };
            shape[..n]
                .iter()
                .zip(rec.args)
                .map(|(k, v)| match (k, v != 0) {
                    (Path, true) => read_path(v).map_or_else(|| arg(*k, v), |p| quote(&p)),
                    _ => arg(*k, v),
                })
                .collect()
        }
        None => rec.args.iter().map(|v| format!("{v:#x}")).collect(),
    };
    if name == "?" {
        format!("syscall_{}({})", rec.nr, args.join(", "))
    } else {
        format!("{name}({})", args.join(", "))
    }
}

/// A C-style quoted string, escaping what is not printable ASCII.
fn quote(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &b in bytes {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push('"');
    out
}

/// `3`, `-1 ENOENT (No such file or directory)`, or a hex address for
/// syscalls that return one.
pub fn result(nr: u64, ret: i64) -> String {
    if (-4095..0).contains(&ret) {
        let e = -ret;
        return match errno(e) {
            Some((name, text)) => format!("-1 {name} ({text})"),
            None => format!("-1 errno {e}"),
        };
    }
    match crate::syscalls::name(nr) {
        Some("mmap" | "brk" | "mremap" | "shmat") => format!("{ret:#x}"),
        _ => ret.to_string(),
    }
}

fn errno(e: i64) -> Option<(&'static str, &'static str)> {
    Some(match e {
        1 => ("EPERM", "Operation not permitted"),
        2 => ("ENOENT", "No such file or directory"),
        3 => ("ESRCH", "No such process"),
        4 => ("EINTR", "Interrupted system call"),
        5 => ("EIO", "Input/output error"),
        9 => ("EBADF", "Bad file descriptor"),
        10 => ("ECHILD", "No child processes"),
        11 => ("EAGAIN", "Resource temporarily unavailable"),
        12 => ("ENOMEM", "Cannot allocate memory"),
        13 => ("EACCES", "Permission denied"),
        14 => ("EFAULT", "Bad address"),
        17 => ("EEXIST", "File exists"),
        20 => ("ENOTDIR", "Not a directory"),
        21 => ("EISDIR", "Is a directory"),
        22 => ("EINVAL", "Invalid argument"),
        25 => ("ENOTTY", "Inappropriate ioctl for device"),
        29 => ("ESPIPE", "Illegal seek"),
        32 => ("EPIPE", "Broken pipe"),
        34 => ("ERANGE", "Numerical result out of range"),
        38 => ("ENOSYS", "Function not implemented"),
        39 => ("ENOTEMPTY", "Directory not empty"),
        40 => ("ELOOP", "Too many levels of symbolic links"),
        61 => ("ENODATA", "No data available"),
        88 => ("ENOTSOCK", "Socket operation on non-socket"),
        95 => ("EOPNOTSUPP", "Operation not supported"),
        98 => ("EADDRINUSE", "Address already in use"),
        111 => ("ECONNREFUSED", "Connection refused"),
        115 => ("EINPROGRESS", "Operation now in progress"),
        512 => ("ERESTARTSYS", "To be restarted if SA_RESTART is set"),
        513 => ("ERESTARTNOINTR", "To be restarted"),
        514 => ("ERESTARTNOHAND", "To be restarted if no handler"),
        516 => ("ERESTART_RESTARTBLOCK", "Interrupted by signal"),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(nr: u64, args: [u64; 6]) -> Record {
        Record::entry(0, nr, args, 0, 0, 0)
    }

    #[test]
    fn renders_like_strace() {
        let fdcwd = (-100i64) as u64;
        assert_eq!(
            call(&rec(257, [fdcwd, 0x7ffd_1000, 0o2000000, 0, 0, 0])),
            "openat(AT_FDCWD, 0x7ffd1000, O_RDONLY|O_CLOEXEC)"
        );
        assert_eq!(
            call(&rec(257, [3, 0x10, 0o1101, 0o644, 0, 0])),
            "openat(3, 0x10, O_WRONLY|O_CREAT|O_TRUNC, 0644)"
        );
        assert_eq!(call(&rec(39, [7; 6])), "getpid()");
        assert_eq!(call(&rec(0, [3, 0, 4096, 0, 0, 0])), "read(3, NULL, 4096)");
        assert_eq!(
            call(&rec(400, [1, 0, 0, 0, 0, 0])),
            "syscall_400(0x1, 0x0, 0x0, 0x0, 0x0, 0x0)"
        );
        assert_eq!(result(257, 3), "3");
        assert_eq!(result(257, -2), "-1 ENOENT (No such file or directory)");
        assert_eq!(result(9, 0x7f00_0000_0000), "0x7f0000000000");
        assert_eq!(result(0, -4000), "-1 errno 4000");
        assert_eq!(open_flags(0o4 | 2), "O_RDWR|0x4");
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;
    use crate::record::Record;

    #[test]
    fn paths_are_quoted_when_readable() {
        let nr = crate::syscalls::number("openat").unwrap();
        let rec = Record::entry(0, nr, [(-100i64) as u64, 0x7000, 0, 0, 0, 0], 0x1000, 0, 0);
        assert_eq!(call(&rec), "openat(AT_FDCWD, 0x7000, O_RDONLY)");
        let read = |a: u64| (a == 0x7000).then(|| b"/root/se\"cret\n".to_vec());
        assert_eq!(
            call_with(&rec, &read),
            "openat(AT_FDCWD, \"/root/se\\\"cret\\n\", O_RDONLY)"
        );
    }
}
