//! The variable part of a record: what the plugin captured at the instruction
//! (path strings, `execve` argv, socket addresses, fd pairs, file identities,
//! the task's comm), as a list of items:
//!
//! ```text
//! tag (u8, bit 7 = cut: the value was longer than captured)  arg (u8)  len (u16 LE)  len bytes
//! ```
//!
//! `arg` is the syscall argument the item belongs to (0..=5) or [`RESULT`] for
//! the return value (e.g. the file an `openat` returned). Decoding never
//! panics and stops at the first malformed item.

/// Most payload bytes one record carries.
pub const MAX_PAYLOAD: usize = 8192;
/// Most bytes captured of one string (PATH_MAX).
pub const MAX_STRING: usize = 4096;
/// Most bytes captured of a socket address (`sockaddr_storage`).
pub const MAX_SOCKADDR: usize = 128;
/// `arg` of an item describing the syscall's result.
pub const RESULT: u8 = 0xff;

const TAG_COMM: u8 = 1;
const TAG_STR: u8 = 2;
const TAG_SOCKADDR: u8 = 3;
const TAG_FILE: u8 = 4;
const TAG_ARGV: u8 = 5;
const TAG_FDS: u8 = 6;
const TAG_UNREADABLE: u8 = 7;
const TAG_DATA: u8 = 8;
const CUT: u8 = 0x80;
const ITEM_HEADER: usize = 4;
const FILE_FIXED: usize = 16;

/// What kind of object an fd refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FileKind {
    Unknown = 0,
    Regular = 1,
    Directory = 2,
    CharDevice = 3,
    BlockDevice = 4,
    Fifo = 5,
    Symlink = 6,
    Socket = 7,
    Pipe = 8,
    AnonInode = 9,
}

impl FileKind {
    fn from_raw(b: u8) -> FileKind {
        match b {
            1 => FileKind::Regular,
            2 => FileKind::Directory,
            3 => FileKind::CharDevice,
            4 => FileKind::BlockDevice,
            5 => FileKind::Fifo,
            6 => FileKind::Symlink,
            7 => FileKind::Socket,
            8 => FileKind::Pipe,
            9 => FileKind::AnonInode,
            _ => FileKind::Unknown,
        }
    }

    /// Lower-case name (`regular`, `pipe`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Unknown => "unknown",
            FileKind::Regular => "regular",
            FileKind::Directory => "directory",
            FileKind::CharDevice => "char",
            FileKind::BlockDevice => "block",
            FileKind::Fifo => "fifo",
            FileKind::Symlink => "symlink",
            FileKind::Socket => "socket",
            FileKind::Pipe => "pipe",
            FileKind::AnonInode => "anon_inode",
        }
    }
}

/// The identity of the object behind an fd at the moment of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId<'a> {
    /// `sb->s_dev` in the kernel's encoding (major << 20 | minor).
    pub dev: u32,
    pub ino: u64,
    pub kind: FileKind,
    /// As /proc/PID/fd shows it (`/root/x`, `pipe:[123]`, `socket:[45]`).
    pub path: &'a [u8],
    pub cut: bool,
}

/// One captured item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    /// The task's `comm` at the instruction (up to 16 bytes, no NUL).
    Comm(&'a [u8]),
    /// A NUL-terminated string argument (a path), without its NUL.
    Str { arg: u8, bytes: &'a [u8], cut: bool },
    /// `execve`'s argv: the strings, each followed by a NUL.
    Argv { arg: u8, bytes: &'a [u8], cut: bool },
    /// A socket address (`struct sockaddr_*` bytes as the guest passed or got them).
    SockAddr { arg: u8, bytes: &'a [u8], cut: bool },
    /// Two fds the kernel wrote to user memory (`pipe2`, `socketpair`).
    FdPair { arg: u8, fds: [i32; 2] },
    /// The object an fd argument (or the result) refers to.
    File { arg: u8, file: FileId<'a> },
    /// The argument points to memory the plugin could not read (not mapped yet).
    Unreadable { arg: u8 },
    /// Raw bytes (a slice of a log doorbell's buffer, [`crate::record::Kind::Log`]).
    Data { arg: u8, bytes: &'a [u8], cut: bool },
}

impl Item<'_> {
    /// The argument (or [`RESULT`]) the item belongs to; `None` for the comm.
    pub fn arg(&self) -> Option<u8> {
        match *self {
            Item::Comm(_) => None,
            Item::Str { arg, .. }
            | Item::Argv { arg, .. }
            | Item::SockAddr { arg, .. }
            | Item::FdPair { arg, .. }
            | Item::File { arg, .. }
            | Item::Unreadable { arg }
            | Item::Data { arg, .. } => Some(arg),
        }
    }
}

/// Iterator over a payload's items.
pub struct Items<'a> {
    rest: &'a [u8],
}

impl<'a> Items<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        Items { rest: payload }
    }
}

impl<'a> Iterator for Items<'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Item<'a>> {
        loop {
            if self.rest.len() < ITEM_HEADER {
                return None;
            }
            let tag = self.rest[0];
            let arg = self.rest[1];
            let len = u16::from_le_bytes([self.rest[2], self.rest[3]]) as usize;
            let Some(data) = self.rest.get(ITEM_HEADER..ITEM_HEADER + len) else {
                self.rest = &[];
                return None;
            };
            self.rest = &self.rest[ITEM_HEADER + len..];
            let cut = tag & CUT != 0;
            let item = match tag & !CUT {
                TAG_COMM => Item::Comm(data),
                TAG_STR => Item::Str {
                    arg,
                    bytes: data,
                    cut,
                },
                TAG_ARGV => Item::Argv {
                    arg,
                    bytes: data,
                    cut,
                },
                TAG_SOCKADDR => Item::SockAddr {
                    arg,
                    bytes: data,
                    cut,
                },
                TAG_FDS if data.len() == 8 => Item::FdPair {
                    arg,
                    fds: [
                        i32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                        i32::from_le_bytes([data[4], data[5], data[6], data[7]]),
                    ],
                },
                TAG_FILE if data.len() >= FILE_FIXED => {
                    let mut ino = [0u8; 8];
                    ino.copy_from_slice(&data[8..16]);
                    Item::File {
                        arg,
                        file: FileId {
                            dev: u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
                            kind: FileKind::from_raw(data[4]),
                            ino: u64::from_le_bytes(ino),
                            path: &data[FILE_FIXED..],
                            cut,
                        },
                    }
                }
                TAG_UNREADABLE => Item::Unreadable { arg },
                TAG_DATA => Item::Data {
                    arg,
                    bytes: data,
                    cut,
                },
                _ => continue, // unknown tag (newer plugin): skip it
            };
            return Some(item);
        }
    }
}

/// A fixed-size payload being built by a producer, without allocating.
pub struct PayloadBuf {
    buf: [u8; MAX_PAYLOAD],
    len: usize,
    cut: bool,
}

impl Default for PayloadBuf {
    fn default() -> Self {
        PayloadBuf {
            buf: [0; MAX_PAYLOAD],
            len: 0,
            cut: false,
        }
    }
}

impl PayloadBuf {
    pub fn clear(&mut self) {
        self.len = 0;
        self.cut = false;
    }

    /// The encoded items.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Whether an item did not fit (then [`crate::record::FLAG_PAYLOAD_CUT`]).
    pub fn was_cut(&self) -> bool {
        self.cut
    }

    /// Room for the data of one more item.
    pub fn room(&self) -> usize {
        (MAX_PAYLOAD - self.len)
            .saturating_sub(ITEM_HEADER)
            .min(u16::MAX as usize)
    }

    /// Appends one item whose data is written by `fill` into a buffer of at
    /// most `max` bytes; `fill` returns (bytes written, value was longer).
    /// Items that do not fit at all are dropped and counted in `was_cut`.
    fn push_with(
        &mut self,
        tag: u8,
        arg: u8,
        max: usize,
        min: usize,
        fill: impl FnOnce(&mut [u8]) -> (usize, bool),
    ) {
        let room = self.room();
        if room < min {
            self.cut = true;
            return;
        }
        let max = max.min(room);
        let start = self.len + ITEM_HEADER;
        let (n, cut) = fill(&mut self.buf[start..start + max]);
        let n = n.min(max);
        let tag = if cut { tag | CUT } else { tag };
        self.buf[self.len] = tag;
        self.buf[self.len + 1] = arg;
        self.buf[self.len + 2..self.len + 4].copy_from_slice(&(n as u16).to_le_bytes());
        self.len = start + n;
    }

    pub fn comm(&mut self, comm: &[u8]) {
        let comm = &comm[..comm.len().min(16)];
        self.push_with(TAG_COMM, 0, 16, comm.len(), |b| {
            b[..comm.len()].copy_from_slice(comm);
            (comm.len(), false)
        });
    }

    /// A string argument; `fill` writes up to the slice's length and reports
    /// (length without NUL, whether it was longer).
    pub fn string(&mut self, arg: u8, fill: impl FnOnce(&mut [u8]) -> (usize, bool)) {
        self.push_with(TAG_STR, arg, MAX_STRING, 1, fill);
    }

    /// `execve`'s argv, NUL-separated; `fill` as for [`PayloadBuf::string`].
    pub fn argv(&mut self, arg: u8, max: usize, fill: impl FnOnce(&mut [u8]) -> (usize, bool)) {
        self.push_with(TAG_ARGV, arg, max, 1, fill);
    }

    /// Raw bytes written by `fill` (at most `max`); see [`Item::Data`].
    pub fn data(&mut self, arg: u8, max: usize, fill: impl FnOnce(&mut [u8]) -> (usize, bool)) {
        self.push_with(TAG_DATA, arg, max, 1, fill);
    }

    pub fn sockaddr(&mut self, arg: u8, bytes: &[u8], longer: bool) {
        let bytes = &bytes[..bytes.len().min(MAX_SOCKADDR)];
        self.push_with(TAG_SOCKADDR, arg, MAX_SOCKADDR, bytes.len(), |b| {
            b[..bytes.len()].copy_from_slice(bytes);
            (bytes.len(), longer)
        });
    }

    pub fn fd_pair(&mut self, arg: u8, fds: [i32; 2]) {
        self.push_with(TAG_FDS, arg, 8, 8, |b| {
            b[..4].copy_from_slice(&fds[0].to_le_bytes());
            b[4..8].copy_from_slice(&fds[1].to_le_bytes());
            (8, false)
        });
    }

    pub fn file(&mut self, arg: u8, dev: u32, ino: u64, kind: FileKind, path: &[u8]) {
        let want = FILE_FIXED + path.len().min(MAX_STRING);
        self.push_with(TAG_FILE, arg, want, FILE_FIXED, |b| {
            b[..4].copy_from_slice(&dev.to_le_bytes());
            b[4] = kind as u8;
            b[5..8].fill(0);
            b[8..16].copy_from_slice(&ino.to_le_bytes());
            let n = path.len().min(b.len() - FILE_FIXED);
            b[FILE_FIXED..FILE_FIXED + n].copy_from_slice(&path[..n]);
            (FILE_FIXED + n, n < path.len())
        });
    }

    pub fn unreadable(&mut self, arg: u8) {
        self.push_with(TAG_UNREADABLE, arg, 0, 0, |_| (0, false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip() {
        let mut p = Box::<PayloadBuf>::default();
        p.comm(b"cp");
        p.string(1, |b| {
            b[..5].copy_from_slice(b"/root");
            (5, false)
        });
        p.sockaddr(1, &[2, 0, 0, 80, 10, 0, 2, 2], false);
        p.fd_pair(0, [3, -4]);
        p.file(RESULT, 0x800001, 42, FileKind::Regular, b"/root/secret.txt");
        p.unreadable(0);
        let items: Vec<_> = Items::new(p.as_bytes()).collect();
        assert_eq!(
            items,
            vec![
                Item::Comm(b"cp"),
                Item::Str {
                    arg: 1,
                    bytes: b"/root",
                    cut: false
                },
                Item::SockAddr {
                    arg: 1,
                    bytes: &[2, 0, 0, 80, 10, 0, 2, 2],
                    cut: false
                },
                Item::FdPair {
                    arg: 0,
                    fds: [3, -4]
                },
                Item::File {
                    arg: RESULT,
                    file: FileId {
                        dev: 0x800001,
                        ino: 42,
                        kind: FileKind::Regular,
                        path: b"/root/secret.txt",
                        cut: false
                    }
                },
                Item::Unreadable { arg: 0 },
            ]
        );
        assert!(!p.was_cut());
    }

    #[test]
    fn a_full_payload_cuts_and_says_so() {
        let mut p = Box::<PayloadBuf>::default();
        for _ in 0..3 {
            p.string(0, |b| {
                b.fill(b'a');
                (b.len(), true)
            });
        }
        let items: Vec<_> = Items::new(p.as_bytes()).collect();
        // One whole string of MAX_STRING, the second gets what is left, the third nothing.
        assert_eq!(items.len(), 2);
        assert!(p.was_cut());
        assert!(items
            .iter()
            .all(|i| matches!(i, Item::Str { cut: true, .. })));
        assert_eq!(p.as_bytes().len(), MAX_PAYLOAD);
    }

    proptest::proptest! {
        #[test]
        fn decoding_junk_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let n = Items::new(&bytes).count();
            proptest::prop_assert!(n <= bytes.len() / ITEM_HEADER + 1);
        }
    }
}
