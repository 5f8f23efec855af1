//! A `newc` cpio writer for the initramfs.
//!
//! Written here rather than piping to `cpio` so that every entry is owned by
//! root whoever builds the image, device nodes (`/dev/console`) need no
//! privileges, and the archive is reproducible (sorted, fixed mtime).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::error::{IoContext, Result};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Streams entries into a newc archive.
pub struct CpioWriter<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn header(&mut self, name: &str, mode: u32, size: u32, rdev: (u32, u32)) -> io::Result<()> {
        self.header_owned(name, mode, size, rdev, (0, 0))
    }

    fn header_owned(
        &mut self,
        name: &str,
        mode: u32,
        size: u32,
        rdev: (u32, u32),
        owner: (u32, u32),
    ) -> io::Result<()> {
        let namesize = name.len() as u32 + 1;
        let ino = self.ino;
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = owner.0,
            gid = owner.1,
            mtime = 0,
            dmaj = 0,
            dmin = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0
        );
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, S_IFDIR | (perm & 0o7777), 0, (0, 0))
    }

    /// A directory owned by `uid:gid` (everything else belongs to root).
    pub fn dir_owned(&mut self, name: &str, perm: u32, uid: u32, gid: u32) -> io::Result<()> {
        self.header_owned(name, S_IFDIR | (perm & 0o7777), 0, (0, 0), (uid, gid))
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, S_IFLNK | 0o777, target.len() as u32, (0, 0))?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.header(name, S_IFCHR | (perm & 0o7777), 0, (major, minor))
    }

    pub fn file(
        &mut self,
        name: &str,
        perm: u32,
        data: &mut dyn Read,
        size: u64,
    ) -> io::Result<()> {
        let size32 = u32::try_from(size)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file over 4 GiB"))?;
        self.header(name, S_IFREG | (perm & 0o7777), size32, (0, 0))?;
        let copied = io::copy(&mut data.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name} shrank"),
            ));
        }
        self.written += size;
        self.pad()
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        // Round to 512 like GNU cpio; the kernel does not care.
        let n = ((512 - self.written % 512) % 512) as usize;
        self.put(&vec![0u8; n])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Archives the directory tree `root` (paths relative to it, sorted) plus
/// `/dev/console` into `dest`. Every entry belongs to root except the
/// directories listed in `owned` (`(path, uid, gid)`). Returns the archive size.
pub fn write_tree(root: &Path, dest: &Path, owned: &[(&str, u32, u32)]) -> Result<u64> {
    let file = File::create(dest).at(dest)?;
    let mut w = CpioWriter::new(BufWriter::with_capacity(1 << 20, file));
    let mut entries = Vec::new();
    collect(root, root, &mut entries)?;
    entries.sort();
    for rel in &entries {
        let path = root.join(rel);
        let meta = path.symlink_metadata().at(&path)?;
        let name = rel.to_string_lossy();
        let perm = meta.permissions().mode() & 0o7777;
        let ft = meta.file_type();
        let res = if ft.is_symlink() {
            let target = std::fs::read_link(&path).at(&path)?;
            w.symlink(&name, &target.to_string_lossy())
        } else if ft.is_dir() {
            match owned.iter().find(|(p, _, _)| Path::new(p) == rel.as_path()) {
                Some(&(_, uid, gid)) => w.dir_owned(&name, perm, uid, gid),
                None => w.dir(&name, perm),
            }
        } else if ft.is_file() {
            let mut f = File::open(&path).at(&path)?;
            w.file(&name, perm, &mut f, meta.size())
        } else {
            continue;
        };
        res.at(&path)?;
    }
    // The kernel opens /dev/console for init's stdio before anything can
    // mount devtmpfs; without this node init starts with no stdin/stdout.
    if !entries.iter().any(|e| e == Path::new("dev")) {
        w.dir("dev", 0o755).at(dest)?;
    }
    w.char_device("dev/console", 0o600, 5, 1).at(dest)?;
    let out = w.finish().at(dest)?;
    drop(out);
    Ok(std::fs::metadata(dest).at(dest)?.len())
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path = entry.path();
        let rel = path
            .strip_prefix(root)
            .expect("walk stays under root")
            .to_path_buf();
        let is_dir = entry.file_type().at(&path)?.is_dir();
        out.push(rel);
        if is_dir {
            collect(root, &path, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, &mut &b"hello"[..], 5).unwrap();
        let out = w.finish().unwrap();
        assert!(out.starts_with(b"070701"));
        // Header 110 bytes + "a\0" = 112 (aligned), then data 5 padded to 8.
        assert_eq!(&out[110..112], b"a\0");
        assert_eq!(&out[112..117], b"hello");
        assert_eq!(&out[120..126], b"070701");
        assert_eq!(out.len() % 512, 0);
    }
}
