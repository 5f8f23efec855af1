//! strace-like rendering of syscall arguments and results: register values,
//! plus what the producer captured at the instruction (paths, argv, socket
//! addresses, fd pairs, and the files behind fds, shown like `strace -y`:
//! `read(3</root/secret.txt>, 0x7ffd..., 4096)`). An argument with nothing
//! captured is shown as its value (an address in hex).

use crate::payload::{FileId, Item, RESULT};
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
        "splice" => &[Int, Hex, Int, Hex, Size, Hex],
        "tee" => &[Int, Int, Size, Hex],
        "linkat" => &[DirFd, Path, DirFd, Path, Hex],
        "symlinkat" => &[Path, DirFd, Path],
        "memfd_create" => &[Path, Hex],
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
        "openat2" => &[DirFd, Path, Hex, Size],
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

/// How many argument registers syscall `nr` uses (6 when unknown): producers
/// read only those, since each register read costs the guest time.
pub fn arg_count(nr: u64) -> usize {
    let shaped = crate::syscalls::name(nr)
        .and_then(shape)
        .map_or(6, |s| s.len());
    let captured = crate::capture::at_entry(nr)
        .iter()
        .map(|c| match *c {
            crate::capture::AtEntry::Path(a)
            | crate::capture::AtEntry::Argv(a)
            | crate::capture::AtEntry::MsgName(a)
            | crate::capture::AtEntry::Fd(a) => a,
            crate::capture::AtEntry::SockAddr { addr, len } => addr.max(len),
        })
        .chain(crate::capture::at_return(nr).iter().map(|c| match *c {
            crate::capture::AtReturn::SockAddrOut { addr, len_ptr } => addr.max(len_ptr),
            crate::capture::AtReturn::FdPair(a) => a,
            crate::capture::AtReturn::FdResult => 0,
            crate::capture::AtReturn::FcntlDupResult => 1,
            crate::capture::AtReturn::MsgNameOut(a) => a,
        }))
        .map(|a| usize::from(a) + 1)
        .max()
        .unwrap_or(0);
    shaped.max(captured).min(6)
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

/// `openat(AT_FDCWD, "/etc/passwd", O_RDONLY|O_CLOEXEC)` for an entry
/// record, with what its return captured (`ret`: addresses and fds the
/// kernel wrote back) when known.
pub fn call(entry: &Record, ret: Option<&Record>) -> String {
    let name = entry.name();
    let items: Vec<Item<'_>> = entry
        .items()
        .chain(ret.into_iter().flat_map(|r| r.items()))
        .collect();
    let captured = |i: usize| {
        items
            .iter()
            .filter(|it| it.arg() == Some(i as u8))
            .find(|it| !matches!(it, Item::Unreadable { .. }))
    };
    let show = |i: usize, k: Arg, v: u64| -> String {
        match captured(i) {
            Some(Item::Str { bytes, cut, .. }) => quote_cut(bytes, *cut),
            Some(Item::Argv { bytes, cut, .. }) => argv(bytes, *cut),
            Some(Item::SockAddr { bytes, cut, .. }) => sockaddr(bytes, *cut),
            Some(Item::FdPair { fds, .. }) => format!("[{}, {}]", fds[0], fds[1]),
            Some(Item::File { file, .. }) => format!("{}{}", arg(k, v), file_tag(file)),
            _ => arg(k, v),
        }
    };
    let args: Vec<String> = match shape(name) {
        Some(shape) => {
            // open/openat show the mode only with O_CREAT or O_TMPFILE, like strace.
            let n = match name {
                "open" if entry.args[1] & 0o20200100 == 0 => 2,
                "openat" if entry.args[2] & 0o20200100 == 0 => 3,
                _ => shape.len(),
            };
            shape[..n]
                .iter()
                .zip(entry.args)
                .enumerate()
                .map(|(i, (k, v))| show(i, *k, v))
                .collect()
        }
        None => entry
            .args
            .iter()
            .enumerate()
            .map(|(i, v)| match captured(i) {
                Some(_) => show(i, Hex, *v),
                None => format!("{v:#x}"),
            })
            .collect(),
    };
    if name == "?" {
        format!("syscall_{}({})", entry.nr, args.join(", "))
    } else {
        format!("{name}({})", args.join(", "))
    }
}

/// The result of a return record, with the file it names when the result is
/// an fd the producer resolved (`3</root/copy.txt>`).
pub fn result_of(ret: &Record) -> String {
    let base = result(ret.nr, ret.ret);
    match ret.items().find_map(|it| match it {
        Item::File { arg: RESULT, file } if ret.ret >= 0 => Some(file_tag(&file)),
        _ => None,
    }) {
        Some(tag) => base + &tag,
        None => base,
    }
}

/// `</root/secret.txt>` (strace -y), with `...` when the path was cut.
pub fn file_tag(file: &FileId<'_>) -> String {
    let path = String::from_utf8_lossy(file.path);
    format!("<{path}{}>", if file.cut { "..." } else { "" })
}

fn quote_cut(bytes: &[u8], cut: bool) -> String {
    let q = quote(bytes);
    if cut {
        q + "..."
    } else {
        q
    }
}

fn argv(bytes: &[u8], cut: bool) -> String {
    let parts: Vec<String> = bytes
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .map(quote)
        .collect();
    format!("[{}{}]", parts.join(", "), if cut { ", ..." } else { "" })
}

/// `{AF_INET, 10.0.2.2:80}`, `{AF_INET6, [::1]:22}`, `{AF_UNIX, "/run/x"}`.
pub fn sockaddr(b: &[u8], cut: bool) -> String {
    let family = if b.len() >= 2 {
        u16::from_le_bytes([b[0], b[1]])
    } else {
        return "{}".to_string();
    };
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    let s = match family {
        1 => {
            let path = &b[2..];
            let path = if path.first() == Some(&0) {
                // Abstract socket: the name is the rest, shown with a leading @.
                let end = path.len();
                format!("@{}", String::from_utf8_lossy(&path[1..end]))
            } else {
                let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
                String::from_utf8_lossy(&path[..end]).into_owned()
            };
            format!("{{AF_UNIX, {}}}", quote(path.as_bytes()))
        }
        2 if b.len() >= 8 => format!(
            "{{AF_INET, {}.{}.{}.{}:{}}}",
            b[4],
            b[5],
            b[6],
            b[7],
            port(b)
        ),
        10 if b.len() >= 24 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&b[8..24]);
            format!(
                "{{AF_INET6, [{}]:{}}}",
                std::net::Ipv6Addr::from(a),
                port(b)
            )
        }
        16 => "{AF_NETLINK}".to_string(),
        17 => "{AF_PACKET}".to_string(),
        f => format!("{{family {f}}}"),
    };
    if cut {
        s + "..."
    } else {
        s
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
        Record::entry(0, nr, args, 0, 0)
    }

    fn call(r: &Record) -> String {
        super::call(r, None)
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
        assert_eq!(arg_count(39), 0); // getpid
        assert_eq!(arg_count(17), 4); // pread64
        assert_eq!(arg_count(45), 6); // recvfrom: the address comes back in args 4 and 5
        assert_eq!(arg_count(400), 6); // unknown: all six
    }
}

#[cfg(test)]
mod capture_tests {
    use super::*;
    use crate::payload::{FileKind, PayloadBuf};
    use crate::record::Record;
    use crate::syscalls::number;

    fn with(nr: &str, args: [u64; 6], build: impl FnOnce(&mut PayloadBuf)) -> Record {
        let mut r = Record::entry(0, number(nr).unwrap(), args, 0x1000, 0);
        let mut p = Box::<PayloadBuf>::default();
        build(&mut p);
        r.payload = p.as_bytes().to_vec();
        r
    }

    fn s(p: &mut PayloadBuf, arg: u8, text: &[u8], cut: bool) {
        p.string(arg, |b| {
            b[..text.len()].copy_from_slice(text);
            (text.len(), cut)
        });
    }

    #[test]
    fn captured_items_replace_addresses() {
        let fdcwd = (-100i64) as u64;
        let e = with("openat", [fdcwd, 0x7000, 0, 0, 0, 0], |p| {
            s(p, 1, b"/root/se\"cret\n", false)
        });
        assert_eq!(
            call(&e, None),
            "openat(AT_FDCWD, \"/root/se\\\"cret\\n\", O_RDONLY)"
        );
        let mut r = Record::ret(0, e.nr, 3, 0, 0, 0);
        let mut p = Box::<PayloadBuf>::default();
        p.file(RESULT, 0x800001, 12, FileKind::Regular, b"/root/secret.txt");
        r.payload = p.as_bytes().to_vec();
        assert_eq!(result_of(&r), "3</root/secret.txt>");

        let e = with("read", [3, 0x5000, 4096, 0, 0, 0], |p| {
            p.file(0, 1, 2, FileKind::Pipe, b"pipe:[77]")
        });
        assert_eq!(call(&e, None), "read(3<pipe:[77]>, 0x5000, 4096)");

        let e = with("execve", [0x1000, 0x2000, 0x3000, 0, 0, 0], |p| {
            s(p, 0, b"/bin/ls", false);
            p.argv(1, 64, |b| {
                b[..9].copy_from_slice(b"ls\0-l\0/x\0");
                (9, true)
            });
        });
        assert_eq!(
            call(&e, None),
            "execve(\"/bin/ls\", [\"ls\", \"-l\", \"/x\", ...], 0x3000)"
        );

        let sin = [2, 0, 0, 80, 10, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0];
        let e = with("connect", [4, 0x6000, 16, 0, 0, 0], |p| {
            p.sockaddr(1, &sin, false)
        });
        assert_eq!(call(&e, None), "connect(4, {AF_INET, 10.0.2.2:80}, 16)");

        let e = with("pipe2", [0x7000, 0o2000000, 0, 0, 0, 0], |_| {});
        let mut r = Record::ret(0, e.nr, 0, 0, 0, 0);
        let mut p = Box::<PayloadBuf>::default();
        p.fd_pair(0, [3, 4]);
        r.payload = p.as_bytes().to_vec();
        assert_eq!(call(&e, Some(&r)), "pipe2([3, 4], O_RDONLY|O_CLOEXEC)");

        let mut six = [0u8; 28];
        six[0] = 10;
        six[2..4].copy_from_slice(&22u16.to_be_bytes());
        six[23] = 1;
        assert_eq!(sockaddr(&six, false), "{AF_INET6, [::1]:22}");
        let mut un = vec![1u8, 0];
        un.extend_from_slice(b"/run/x\0");
        assert_eq!(sockaddr(&un, false), "{AF_UNIX, \"/run/x\"}");
        assert_eq!(sockaddr(&[1], false), "{}");
    }
}
