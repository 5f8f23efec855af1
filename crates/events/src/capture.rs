//! What a producer captures for each x86-64 syscall, at entry (strings and
//! addresses the call reads from user memory, fds it uses) and at return
//! (addresses and fds the kernel wrote back, fds it returned). Shared by the
//! TCG plugin and the gdbstub backend so both record the same events.
//!
//! Captured at the instruction, not later: by the time a consumer reads the
//! record, the task may have reused or freed the memory.

/// An entry capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtEntry {
    /// A NUL-terminated path at this argument.
    Path(u8),
    /// A `char *const argv[]` at this argument.
    Argv(u8),
    /// A socket address the caller passes: pointer argument, length argument.
    SockAddr { addr: u8, len: u8 },
    /// A `struct msghdr *` at this argument: its `msg_name`.
    MsgName(u8),
    /// An fd argument, resolved to the file it names when the fd filter asks.
    Fd(u8),
}

/// A return capture (needs the entry's arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtReturn {
    /// A socket address the kernel wrote: pointer argument, `socklen_t *` argument.
    SockAddrOut { addr: u8, len_ptr: u8 },
    /// Two fds the kernel wrote at this argument (`int[2]`).
    FdPair(u8),
    /// The result is a new fd: resolved when the fd filter asks.
    FdResult,
    /// `fcntl`: the result is a new fd only for `F_DUPFD`/`F_DUPFD_CLOEXEC`.
    FcntlDupResult,
    /// A `struct msghdr *` at this argument: the `msg_name` the kernel filled.
    MsgNameOut(u8),
}

use AtEntry::*;
use AtReturn::*;

/// Entry captures of syscall `nr`, in argument order.
pub fn at_entry(nr: u64) -> &'static [AtEntry] {
    match nr {
        // read, write, pread64, pwrite64, readv, writev, preadv, pwritev,
        // preadv2, pwritev2, close, fstat, lseek, ioctl, fcntl, flock, fsync,
        // fdatasync, ftruncate, getdents, fchdir, fchmod, fchown, getdents64,
        // listen, shutdown, dup, dup2, dup3, recvmmsg, sendmmsg, accept, accept4,
        // getsockname, getpeername, sync_file_range
        0 | 1 | 17 | 18 | 19 | 20 | 295 | 296 | 327 | 328 | 3 | 5 | 8 | 16 | 72 | 73 | 74 | 75
        | 77 | 78 | 81 | 91 | 93 | 217 | 50 | 48 | 32 | 33 | 292 | 299 | 307 | 43 | 288 | 51
        | 52 | 277 => &[Fd(0)],
        // mmap(addr, len, prot, flags, fd, off)
        9 => &[Fd(4)],
        // sendfile(out, in, ...), splice(in, off, out, ...), tee(in, out),
        // copy_file_range(in, off, out, ...)
        40 => &[Fd(0), Fd(1)],
        275 | 326 => &[Fd(0), Fd(2)],
        276 => &[Fd(0), Fd(1)],
        // connect, bind (fd, addr, len); sendto (fd, buf, len, flags, addr, alen)
        42 | 49 => &[Fd(0), SockAddr { addr: 1, len: 2 }],
        44 => &[Fd(0), SockAddr { addr: 4, len: 5 }],
        // recvfrom: the address comes back at return
        45 => &[Fd(0)],
        // sendmsg, recvmsg (fd, msghdr)
        46 => &[Fd(0), MsgName(1)],
        47 => &[Fd(0)],
        // open, creat, stat, lstat, access, truncate, chdir, mkdir, rmdir,
        // unlink, readlink, chmod, chown, lchown, mknod, chroot, memfd_create
        // ... statfs, utime, utimes, setxattr, lsetxattr, getxattr, lgetxattr,
        // listxattr, llistxattr, removexattr, lremovexattr, umount2
        2 | 85 | 4 | 6 | 21 | 76 | 80 | 83 | 84 | 87 | 89 | 90 | 92 | 94 | 133 | 161 | 319
        | 137 | 132 | 235 | 188 | 189 | 191 | 192 | 194 | 195 | 197 | 198 | 166 => &[Path(0)],
        // mount(source, target, ...)
        165 => &[Path(0), Path(1)],
        // openat, openat2, mkdirat, fchownat, newfstatat, unlinkat, readlinkat,
        // fchmodat, faccessat, faccessat2, utimensat, statx, mknodat, inotify_add_watch
        // ..., futimesat, fchmodat2
        257 | 437 | 258 | 260 | 262 | 263 | 267 | 268 | 269 | 439 | 280 | 332 | 259 | 254 | 261
        | 452 => &[Path(1)],
        // rename, link, symlink (old, new)
        82 | 86 | 88 => &[Path(0), Path(1)],
        // renameat, renameat2, linkat (olddirfd, old, newdirfd, new)
        264 | 316 | 265 => &[Path(1), Path(3)],
        // symlinkat(target, newdirfd, linkpath)
        266 => &[Path(0), Path(2)],
        // execve(path, argv, envp), execveat(dirfd, path, argv, envp, flags)
        59 => &[Path(0), Argv(1)],
        322 => &[Path(1), Argv(2)],
        _ => &[],
    }
}

/// Return captures of syscall `nr`.
pub fn at_return(nr: u64) -> &'static [AtReturn] {
    match nr {
        // accept, accept4, getsockname, getpeername (fd, addr, len_ptr)
        43 | 288 => &[
            SockAddrOut {
                addr: 1,
                len_ptr: 2,
            },
            FdResult,
        ],
        51 | 52 => &[SockAddrOut {
            addr: 1,
            len_ptr: 2,
        }],
        // recvfrom(fd, buf, len, flags, addr, len_ptr)
        45 => &[SockAddrOut {
            addr: 4,
            len_ptr: 5,
        }],
        // recvmsg(fd, msghdr, flags)
        47 => &[MsgNameOut(1)],
        72 => &[FcntlDupResult],
        // pipe, pipe2 (fds); socketpair(domain, type, proto, fds)
        22 | 293 => &[FdPair(0)],
        53 => &[FdPair(3)],
        // open, creat, openat, openat2, socket, dup, dup2, dup3, memfd_create,
        // eventfd2, epoll_create1, eventfd, epoll_create, pidfd_open,
        // open_by_handle_at, signalfd4, timerfd_create, inotify_init1
        2 | 85 | 257 | 437 | 41 | 32 | 33 | 292 | 319 | 290 | 291 | 284 | 213 | 434 | 304 | 289
        | 283 | 294 => &[FdResult],
        _ => &[],
    }
}

/// Whether any capture of `nr` needs the kernel's view of an fd.
pub fn uses_fds(nr: u64) -> bool {
    at_entry(nr).iter().any(|c| matches!(c, Fd(_)))
        || at_return(nr)
            .iter()
            .any(|c| matches!(c, FdResult | FcntlDupResult))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::number;

    fn nr(name: &str) -> u64 {
        number(name).unwrap_or_else(|| panic!("{name}"))
    }

    #[test]
    fn table_agrees_with_the_syscall_names() {
        assert_eq!(at_entry(nr("openat")), &[Path(1)]);
        assert_eq!(at_entry(nr("renameat2")), &[Path(1), Path(3)]);
        assert_eq!(at_entry(nr("execve")), &[Path(0), Argv(1)]);
        assert_eq!(at_entry(nr("copy_file_range")), &[Fd(0), Fd(2)]);
        assert_eq!(at_entry(nr("sendfile")), &[Fd(0), Fd(1)]);
        assert_eq!(at_entry(nr("mmap")), &[Fd(4)]);
        assert_eq!(
            at_entry(nr("connect")),
            &[Fd(0), SockAddr { addr: 1, len: 2 }]
        );
        assert_eq!(at_entry(nr("symlinkat")), &[Path(0), Path(2)]);
        assert_eq!(at_entry(nr("mknodat")), &[Path(1)]);
        assert_eq!(at_entry(nr("inotify_add_watch")), &[Path(1)]);
        assert_eq!(at_return(nr("pipe2")), &[FdPair(0)]);
        assert_eq!(at_return(nr("socketpair")), &[FdPair(3)]);
        assert!(at_return(nr("accept4")).contains(&FdResult));
        assert_eq!(at_return(nr("memfd_create")), &[FdResult]);
        assert_eq!(at_return(nr("recvmsg")), &[MsgNameOut(1)]);
        assert_eq!(at_return(nr("fcntl")), &[FcntlDupResult]);
        assert_eq!(at_entry(nr("mount")), &[Path(0), Path(1)]);
        assert_eq!(at_entry(nr("fchmodat2")), &[Path(1)]);
        for name in ["eventfd", "epoll_create", "pidfd_open", "open_by_handle_at"] {
            assert_eq!(at_return(nr(name)), &[FdResult], "{name}");
        }
        assert!(uses_fds(nr("read")) && uses_fds(nr("openat")) && !uses_fds(nr("getpid")));
        for name in [
            "read",
            "write",
            "close",
            "dup2",
            "fcntl",
            "getdents64",
            "listen",
        ] {
            assert_eq!(at_entry(nr(name)), &[Fd(0)], "{name}");
        }
    }
}
