//! The x86-64 syscall numbers and flag values the rules look at. Kernel ABI
//! constants, checked against `events`' syscall table in the tests below.

pub const READ: u64 = 0;
pub const WRITE: u64 = 1;
pub const OPEN: u64 = 2;
pub const CLOSE: u64 = 3;
pub const MMAP: u64 = 9;
pub const PREAD64: u64 = 17;
pub const PWRITE64: u64 = 18;
pub const READV: u64 = 19;
pub const WRITEV: u64 = 20;
pub const SENDFILE: u64 = 40;
pub const CONNECT: u64 = 42;
pub const ACCEPT: u64 = 43;
pub const SENDTO: u64 = 44;
pub const RECVFROM: u64 = 45;
pub const SENDMSG: u64 = 46;
pub const RECVMSG: u64 = 47;
pub const BIND: u64 = 49;
pub const LISTEN: u64 = 50;
pub const GETSOCKNAME: u64 = 51;
pub const GETPEERNAME: u64 = 52;
pub const SOCKETPAIR: u64 = 53;
pub const CLONE: u64 = 56;
pub const FORK: u64 = 57;
pub const VFORK: u64 = 58;
pub const EXECVE: u64 = 59;
pub const CHDIR: u64 = 80;
pub const FCHDIR: u64 = 81;
pub const RENAME: u64 = 82;
pub const CREAT: u64 = 85;
pub const LINK: u64 = 86;
pub const UNLINK: u64 = 87;
pub const EXIT_GROUP: u64 = 231;
pub const OPENAT: u64 = 257;
pub const UNLINKAT: u64 = 263;
pub const RENAMEAT: u64 = 264;
pub const LINKAT: u64 = 265;
pub const SPLICE: u64 = 275;
pub const TEE: u64 = 276;
pub const ACCEPT4: u64 = 288;
pub const PREADV: u64 = 295;
pub const PWRITEV: u64 = 296;
pub const RECVMMSG: u64 = 299;
pub const SENDMMSG: u64 = 307;
pub const RENAMEAT2: u64 = 316;
pub const EXECVEAT: u64 = 322;
pub const COPY_FILE_RANGE: u64 = 326;
pub const PREADV2: u64 = 327;
pub const PWRITEV2: u64 = 328;
pub const CLONE3: u64 = 435;
pub const OPENAT2: u64 = 437;

/// `AT_FDCWD` as the kernel sees the 32-bit `int dirfd`.
pub const AT_FDCWD: i32 = -100;
/// `unlinkat` flag: remove a directory (no managed file can be one).
pub const AT_REMOVEDIR: u64 = 0x200;
/// `clone` flag: the child is a thread of the caller's process.
pub const CLONE_THREAD: u64 = 0x10000;
pub const PROT_READ: u64 = 1;
pub const PROT_WRITE: u64 = 2;
/// `mmap` flags & 3: `MAP_SHARED` (1) and `MAP_SHARED_VALIDATE` (3) write through to the file.
pub const MAP_TYPE: u64 = 3;
pub const MAP_PRIVATE: u64 = 2;
/// `connect` on a non-blocking socket: the connection is under way.
pub const EINPROGRESS: i64 = -115;

/// Calls that read content into the caller (result > 0: bytes or messages).
pub fn is_read(nr: u64) -> bool {
    matches!(nr, READ | PREAD64 | READV | PREADV | PREADV2)
}

/// Socket receives (result > 0); their sender address comes back at return.
pub fn is_recv(nr: u64) -> bool {
    matches!(nr, RECVFROM | RECVMSG | RECVMMSG)
}

/// Calls that write the caller's content to the fd at argument 0.
pub fn is_write(nr: u64) -> bool {
    matches!(nr, WRITE | PWRITE64 | WRITEV | PWRITEV | PWRITEV2)
}

/// Socket sends (result > 0).
pub fn is_send(nr: u64) -> bool {
    matches!(nr, SENDTO | SENDMSG | SENDMMSG)
}

/// In-kernel copies: (source fd argument, destination fd argument).
pub fn copy_args(nr: u64) -> Option<(u8, u8)> {
    match nr {
        SENDFILE => Some((1, 0)),
        SPLICE | COPY_FILE_RANGE => Some((0, 2)),
        TEE => Some((0, 1)),
        _ => None,
    }
}

/// Every syscall the engine acts on (the ring filter the daemon must ask for).
pub const WATCHED: &[u64] = &[
    READ,
    WRITE,
    OPEN,
    CLOSE,
    MMAP,
    PREAD64,
    PWRITE64,
    READV,
    WRITEV,
    SENDFILE,
    CONNECT,
    ACCEPT,
    SENDTO,
    RECVFROM,
    SENDMSG,
    RECVMSG,
    BIND,
    LISTEN,
    GETSOCKNAME,
    GETPEERNAME,
    SOCKETPAIR,
    CLONE,
    FORK,
    VFORK,
    EXECVE,
    CHDIR,
    FCHDIR,
    RENAME,
    CREAT,
    LINK,
    UNLINK,
    EXIT_GROUP,
    OPENAT,
    UNLINKAT,
    RENAMEAT,
    LINKAT,
    SPLICE,
    TEE,
    ACCEPT4,
    PREADV,
    PWRITEV,
    RECVMMSG,
    SENDMMSG,
    RENAMEAT2,
    EXECVEAT,
    COPY_FILE_RANGE,
    PREADV2,
    PWRITEV2,
    CLONE3,
    OPENAT2,
];

/// [`WATCHED`] as a bitmap (syscall numbers are below 512).
const WATCHED_BITS: [u64; 8] = {
    let mut bits = [0u64; 8];
    let mut i = 0;
    while i < WATCHED.len() {
        let nr = WATCHED[i];
        bits[(nr / 64) as usize] |= 1 << (nr % 64);
        i += 1;
    }
    bits
};

pub fn is_watched(nr: u64) -> bool {
    nr < 512 && WATCHED_BITS[(nr / 64) as usize] & (1 << (nr % 64)) != 0
}

/// Whether the engine needs the return of `nr` (it keeps the entry until then).
pub fn wants_return(nr: u64) -> bool {
    nr != EXIT_GROUP && nr != LISTEN && WATCHED.contains(&nr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_agree_with_the_events_table() {
        let pairs: &[(u64, &str)] = &[
            (READ, "read"),
            (WRITE, "write"),
            (OPEN, "open"),
            (CLOSE, "close"),
            (MMAP, "mmap"),
            (PREAD64, "pread64"),
            (PWRITE64, "pwrite64"),
            (READV, "readv"),
            (WRITEV, "writev"),
            (SENDFILE, "sendfile"),
            (CONNECT, "connect"),
            (ACCEPT, "accept"),
            (SENDTO, "sendto"),
            (RECVFROM, "recvfrom"),
            (SENDMSG, "sendmsg"),
            (RECVMSG, "recvmsg"),
            (BIND, "bind"),
            (LISTEN, "listen"),
            (GETSOCKNAME, "getsockname"),
            (GETPEERNAME, "getpeername"),
            (SOCKETPAIR, "socketpair"),
            (CLONE, "clone"),
            (FORK, "fork"),
            (VFORK, "vfork"),
            (EXECVE, "execve"),
            (CHDIR, "chdir"),
            (FCHDIR, "fchdir"),
            (RENAME, "rename"),
            (CREAT, "creat"),
            (LINK, "link"),
            (UNLINK, "unlink"),
            (EXIT_GROUP, "exit_group"),
            (OPENAT, "openat"),
            (UNLINKAT, "unlinkat"),
            (RENAMEAT, "renameat"),
            (LINKAT, "linkat"),
            (SPLICE, "splice"),
            (TEE, "tee"),
            (ACCEPT4, "accept4"),
            (PREADV, "preadv"),
            (PWRITEV, "pwritev"),
            (RECVMMSG, "recvmmsg"),
            (SENDMMSG, "sendmmsg"),
            (RENAMEAT2, "renameat2"),
            (EXECVEAT, "execveat"),
            (COPY_FILE_RANGE, "copy_file_range"),
            (PREADV2, "preadv2"),
            (PWRITEV2, "pwritev2"),
            (CLONE3, "clone3"),
            (OPENAT2, "openat2"),
        ];
        for &(nr, name) in pairs {
            assert_eq!(events::syscalls::number(name), Some(nr), "{name}");
        }
        assert_eq!(pairs.len(), WATCHED.len());
        for nr in 0..600 {
            assert_eq!(is_watched(nr), WATCHED.contains(&nr), "{nr}");
        }
    }

    #[test]
    fn copies_match_the_capture_table() {
        use events::capture::{at_entry, AtEntry};
        for nr in [SENDFILE, SPLICE, COPY_FILE_RANGE, TEE] {
            let (src, dst) = copy_args(nr).unwrap();
            assert!(at_entry(nr).contains(&AtEntry::Fd(src)));
            assert!(at_entry(nr).contains(&AtEntry::Fd(dst)));
        }
    }
}
