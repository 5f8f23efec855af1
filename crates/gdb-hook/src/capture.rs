//! What is captured with each record, from [`events::capture`]'s table (the
//! same table the TCG plugin follows, so both backends record the same
//! items): path strings, `execve` argv, socket addresses, fd pairs, and the
//! file behind an fd when the ring's fd filter asks for it.
//!
//! The VM is stopped at the breakpoint, so guest memory is read directly
//! from the shared RAM file, no gdbstub round trip: user memory through the
//! page tables in CR3 at the hit (the user copy under PTI at entry, the
//! kernel copy at the return site; both map all of user space), kernel
//! structures through the introspection core. Unreadable memory (not
//! faulted in, swapped out) gives an "unreadable" item, as in the plugin.

use std::sync::Arc;

use events::capture::{AtEntry, AtReturn};
use events::payload::{PayloadBuf, MAX_SOCKADDR, MAX_STRING, RESULT};
use events::RingWriter;
use vmi::linux::LinuxGuest;
use vmi::memory::PhysicalMemory;
use vmi::paging::{AddressSpace, PagingMode};

/// Most `execve` argv bytes captured, and most argv entries followed (as the plugin).
const ARGV_BYTES: usize = 2048;
const ARGV_ENTRIES: u64 = 64;

/// Reads guest user memory at a hit.
pub struct Capture {
    memory: Arc<dyn PhysicalMemory>,
    mode: PagingMode,
    text: Vec<u8>,
}

/// The user address space of the stopped vCPU.
struct User(AddressSpace);

impl User {
    fn read(&self, va: u64, out: &mut [u8]) -> bool {
        self.0.read(va, out).is_ok()
    }

    fn read_u64(&self, va: u64) -> Option<u64> {
        self.0.read_u64(va).ok()
    }

    /// The NUL-terminated string at `va` into `out`, a page piece at a time
    /// (a string ending before an unmapped page is still read): (length,
    /// cut), or `None` if its first byte is unreadable.
    fn cstr(&self, va: u64, out: &mut [u8]) -> Option<(usize, bool)> {
        let mut n = 0;
        while n < out.len() {
            let addr = va.wrapping_add(n as u64);
            let page_left = 4096 - (addr & 4095) as usize;
            let chunk = page_left.min(256).min(out.len() - n);
            if !self.read(addr, &mut out[n..n + chunk]) {
                return (n > 0).then_some((n, true));
            }
            if let Some(z) = out[n..n + chunk].iter().position(|&b| b == 0) {
                return Some((n + z, false));
            }
            n += chunk;
        }
        Some((n, true))
    }
}

impl Capture {
    pub fn new(memory: Arc<dyn PhysicalMemory>, mode: PagingMode) -> Capture {
        Capture {
            memory,
            mode,
            text: vec![0; MAX_STRING],
        }
    }

    fn user(&self, cr3: u64) -> User {
        // No cache: one record's reads, in an address space that changes
        // with every process.
        User(AddressSpace::without_cache(
            Arc::clone(&self.memory),
            cr3,
            self.mode,
        ))
    }

    /// Entry captures of `nr` into `payload`.
    #[allow(clippy::too_many_arguments)]
    pub fn at_entry(
        &mut self,
        guest: &LinuxGuest,
        ring: &RingWriter,
        payload: &mut PayloadBuf,
        nr: u64,
        args: &[u64; 6],
        cr3: u64,
        task: Option<u64>,
    ) {
        let captures = events::capture::at_entry(nr);
        if captures.is_empty() {
            return;
        }
        let user = self.user(cr3);
        for c in captures {
            match *c {
                AtEntry::Path(a) => {
                    let ptr = args[usize::from(a)];
                    if ptr == 0 {
                        continue;
                    }
                    match user.cstr(ptr, &mut self.text) {
                        Some((n, cut)) => {
                            let text = &self.text[..n];
                            payload.string(a, |b| {
                                let k = n.min(b.len());
                                b[..k].copy_from_slice(&text[..k]);
                                (k, cut || k < n)
                            });
                        }
                        None => payload.unreadable(a),
                    }
                }
                AtEntry::Argv(a) => {
                    let array = args[usize::from(a)];
                    if array == 0 {
                        continue;
                    }
                    let (len, cut) = argv(&user, array, &mut self.text[..ARGV_BYTES]);
                    let text = &self.text[..len];
                    payload.argv(a, ARGV_BYTES, |b| {
                        let k = len.min(b.len());
                        b[..k].copy_from_slice(&text[..k]);
                        (k, cut || k < len)
                    });
                }
                AtEntry::SockAddr { addr, len } => {
                    let ptr = args[usize::from(addr)];
                    let want = args[usize::from(len)] as u32 as usize;
                    if ptr != 0 && want > 0 {
                        sockaddr(&user, payload, addr, ptr, want);
                    }
                }
                AtEntry::MsgName(a) => msg_name(&user, payload, a, args[usize::from(a)]),
                AtEntry::Fd(a) => {
                    if ring.wants_fds(nr) {
                        file(guest, payload, a, task, args[usize::from(a)] as i32 as i64);
                    }
                }
            }
        }
    }

    /// Return captures of `nr` (needs the entry's arguments) into `payload`.
    #[allow(clippy::too_many_arguments)]
    pub fn at_return(
        &mut self,
        guest: &LinuxGuest,
        ring: &RingWriter,
        payload: &mut PayloadBuf,
        nr: u64,
        args: &[u64; 6],
        ret: i64,
        cr3: u64,
        task: Option<u64>,
    ) {
        let captures = events::capture::at_return(nr);
        if ret < 0 || captures.is_empty() {
            return;
        }
        let user = self.user(cr3);
        for c in captures {
            match *c {
                AtReturn::SockAddrOut { addr, len_ptr } => {
                    let (ptr, lp) = (args[usize::from(addr)], args[usize::from(len_ptr)]);
                    if ptr == 0 || lp == 0 {
                        continue;
                    }
                    let mut l = [0u8; 4];
                    if user.read(lp, &mut l) {
                        let len = u32::from_le_bytes(l) as usize;
                        if len > 0 {
                            sockaddr(&user, payload, addr, ptr, len);
                        }
                    }
                }
                AtReturn::FdPair(a) => {
                    let mut b = [0u8; 8];
                    if user.read(args[usize::from(a)], &mut b) {
                        let fd = |i: usize| {
                            i32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default())
                        };
                        payload.fd_pair(a, [fd(0), fd(4)]);
                    }
                }
                AtReturn::FdResult => {
                    if ring.wants_fds(nr) {
                        file(guest, payload, RESULT, task, ret);
                    }
                }
                AtReturn::FcntlDupResult => {
                    const F_DUPFD: u64 = 0;
                    const F_DUPFD_CLOEXEC: u64 = 1030;
                    if matches!(args[1], F_DUPFD | F_DUPFD_CLOEXEC) && ring.wants_fds(nr) {
                        file(guest, payload, RESULT, task, ret);
                    }
                }
                // The length as the kernel updated it.
                AtReturn::MsgNameOut(a) => msg_name(&user, payload, a, args[usize::from(a)]),
            }
        }
    }
}

/// `argv` strings, NUL-separated, into `out`: (bytes, cut).
fn argv(user: &User, array: u64, out: &mut [u8]) -> (usize, bool) {
    let mut len = 0;
    for i in 0..ARGV_ENTRIES {
        let Some(ptr) = user.read_u64(array.wrapping_add(i * 8)) else {
            return (len, true);
        };
        if ptr == 0 {
            return (len, false);
        }
        if i == ARGV_ENTRIES - 1 || len + 1 >= out.len() {
            return (len, true);
        }
        let room = out.len() - len - 1;
        match user.cstr(ptr, &mut out[len..len + room]) {
            Some((n, more)) => {
                out[len + n] = 0;
                len += n + 1;
                if more {
                    return (len, true);
                }
            }
            None => return (len, true),
        }
    }
    (len, true)
}

/// The socket address a `struct msghdr { void *msg_name; socklen_t
/// msg_namelen; ... }` at `hdr` points to.
fn msg_name(user: &User, payload: &mut PayloadBuf, arg: u8, hdr: u64) {
    let mut m = [0u8; 12];
    if hdr != 0 && user.read(hdr, &mut m) {
        let name = u64::from_le_bytes(m[..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(m[8..].try_into().unwrap_or_default());
        if name != 0 && len > 0 {
            sockaddr(user, payload, arg, name, len as usize);
        }
    }
}

/// A socket address of `len` bytes (at most `MAX_SOCKADDR` kept) at `ptr`.
fn sockaddr(user: &User, payload: &mut PayloadBuf, arg: u8, ptr: u64, len: usize) {
    let n = len.min(MAX_SOCKADDR);
    let mut b = [0u8; MAX_SOCKADDR];
    if user.read(ptr, &mut b[..n]) {
        payload.sockaddr(arg, &b[..n], len > n);
    } else {
        payload.unreadable(arg);
    }
}

/// The file behind `fd` of `task`, if open and readable.
fn file(guest: &LinuxGuest, payload: &mut PayloadBuf, arg: u8, task: Option<u64>, fd: i64) {
    let Some(task) = task else { return };
    if fd < 0 {
        return;
    }
    let Ok(Some(f)) = guest.file_of_fd(task, fd as u64) else {
        return;
    };
    if let Ok(id) = guest.file_identity(f) {
        payload.file(arg, id.dev, id.ino, kind(id.kind), id.path.as_bytes());
    }
}

/// The ring's encoding of a file kind.
fn kind(k: vmi::linux::FileKind) -> events::FileKind {
    use events::FileKind as E;
    use vmi::linux::FileKind as V;
    match k {
        V::Regular => E::Regular,
        V::Directory => E::Directory,
        V::CharDevice => E::CharDevice,
        V::BlockDevice => E::BlockDevice,
        V::Fifo => E::Fifo,
        V::Pipe => E::Pipe,
        V::Socket => E::Socket,
        V::Symlink => E::Symlink,
        V::AnonInode => E::AnonInode,
        V::Unknown => E::Unknown,
    }
}
