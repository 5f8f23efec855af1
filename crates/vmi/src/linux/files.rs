//! Open files: each process's fd table, and paths rebuilt the way the
//! kernel's `d_path` does (dentry names up to the mount root, then across
//! mounts up to the namespace root).

use super::{limits, lossy, LinuxGuest, Listing, Warning};
use crate::paging::PagingError;

/// Filesystem magic numbers (include/uapi/linux/magic.h); part of the ABI.
const PIPEFS_MAGIC: u64 = 0x5049_5045;
const SOCKFS_MAGIC: u64 = 0x534f_434b;
const ANON_INODE_FS_MAGIC: u64 = 0x0904_1934;

/// What kind of object an fd refers to (from the inode's mode and filesystem).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    Regular,
    Directory,
    CharDevice,
    BlockDevice,
    Fifo,
    Pipe,
    Socket,
    Symlink,
    AnonInode,
    Unknown,
}

/// What an fd names, independent of the process holding it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileIdentity {
    /// `sb->s_dev` (kernel encoding: major << 20 | minor).
    pub dev: u32,
    pub ino: u64,
    pub kind: FileKind,
    pub path: String,
}

/// One open fd of a process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpenFile {
    pub pid: i32,
    pub comm: String,
    pub fd: u32,
    pub kind: FileKind,
    /// As `readlink /proc/PID/fd/N` shows it: a path, `pipe:[INO]`, `socket:[INO]`, `anon_inode:NAME`.
    pub path: String,
    pub inode: u64,
    /// Address of the `struct file`.
    pub file: u64,
}

impl LinuxGuest {
    /// Open files of every process (or only of `pid`).
    pub fn open_files(&self, pid: Option<i32>) -> Listing<OpenFile> {
        let procs = self.processes();
        let mut warnings = procs.warnings;
        let mut items = Vec::new();
        let mut slots_left = limits::MAX_TOTAL_FD_SLOTS;
        for p in procs.items {
            if pid.is_some_and(|want| want != p.tgid) {
                continue;
            }
            if slots_left == 0 {
                warnings.push(Warning {
                    message: format!(
                        "more than {} fd-table slots in all; files of pid {} and later processes not listed",
                        limits::MAX_TOTAL_FD_SLOTS,
                        p.tgid
                    ),
                });
                break;
            }
            match self.fds_of_bounded(p.task, &mut slots_left) {
                Ok(mut fds) => {
                    warnings.append(&mut fds.warnings);
                    for (fd, file) in fds.items {
                        match self.describe_file(file) {
                            Ok((kind, path, inode)) => items.push(OpenFile {
                                pid: p.tgid,
                                comm: p.comm.clone(),
                                fd,
                                kind,
                                path,
                                inode,
                                file,
                            }),
                            Err(e) => warnings.push(Warning {
                                message: format!("pid {} fd {fd}: file {file:#x}: {e}", p.tgid),
                            }),
                        }
                    }
                }
                Err(e) => warnings.push(Warning {
                    message: format!("pid {}: fd table: {e}", p.tgid),
                }),
            }
        }
        Listing { items, warnings }
    }

    /// Non-null `(fd, struct file *)` pairs of a task's fd table.
    pub fn fds_of(&self, task: u64) -> Result<Listing<(u32, u64)>, PagingError> {
        let mut slots = limits::MAX_FDS;
        self.fds_of_bounded(task, &mut slots)
    }

    /// [`Self::fds_of`], examining at most `slots_left` slots and deducting them.
    fn fds_of_bounded(
        &self,
        task: u64,
        slots_left: &mut u64,
    ) -> Result<Listing<(u32, u64)>, PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let files = self.read_ptr(task.wrapping_add(l.task_files))?;
        if files == 0 {
            return Ok(Listing {
                items: Vec::new(),
                warnings: Vec::new(),
            });
        }
        let fdt = self.read_ptr(files.wrapping_add(l.files_fdt))?;
        let max_fds = u64::from(k.read_u32(fdt.wrapping_add(l.fdtable_max_fds))?);
        let mut warnings = Vec::new();
        if max_fds > limits::MAX_FDS {
            warnings.push(Warning {
                message: format!(
                    "task {task:#x}: fd table claims {max_fds} slots; examining the first {}",
                    limits::MAX_FDS
                ),
            });
        }
        let n = max_fds.min(limits::MAX_FDS).min(*slots_left);
        *slots_left -= n;
        let array = self.read_ptr(fdt.wrapping_add(l.fdtable_fd))?;
        let mut out = Vec::new();
        // Read the pointer array a page at a time.
        let mut buf = vec![0u8; 4096];
        let mut fd = 0u64;
        while fd < n {
            let chunk = ((n - fd) * 8).min(4096) as usize;
            k.read(array.wrapping_add(fd * 8), &mut buf[..chunk])?;
            for (i, ptr) in buf[..chunk].chunks_exact(8).enumerate() {
                let file = u64::from_le_bytes(ptr.try_into().unwrap_or_default());
                if file != 0 {
                    out.push(((fd + i as u64) as u32, file));
                }
            }
            fd += (chunk / 8) as u64;
        }
        Ok(Listing {
            items: out,
            warnings,
        })
    }

    /// The `struct file` behind fd `fd` of a task, or `None` if the fd is not open.
    pub fn file_of_fd(&self, task: u64, fd: u64) -> Result<Option<u64>, PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let files = self.read_ptr(task.wrapping_add(l.task_files))?;
        if files == 0 {
            return Ok(None);
        }
        let fdt = self.read_ptr(files.wrapping_add(l.files_fdt))?;
        let max_fds = u64::from(k.read_u32(fdt.wrapping_add(l.fdtable_max_fds))?);
        if fd >= max_fds.min(limits::MAX_FDS) {
            return Ok(None);
        }
        let array = self.read_ptr(fdt.wrapping_add(l.fdtable_fd))?;
        match self.read_ptr(array.wrapping_add(fd * 8))? {
            0 => Ok(None),
            file => Ok(Some(file)),
        }
    }

    /// Device, inode, kind and display path of a `struct file`: what names
    /// the object behind an fd across processes.
    pub fn file_identity(&self, file: u64) -> Result<FileIdentity, PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let (kind, path, ino) = self.describe_file(file)?;
        let inode = self.read_ptr(file.wrapping_add(l.file_inode))?;
        let sb = self.read_ptr(inode.wrapping_add(l.inode_sb))?;
        let dev = k.read_u32(sb.wrapping_add(l.sb_dev))?;
        Ok(FileIdentity {
            dev,
            ino,
            kind,
            path,
        })
    }

    /// Kind, display path and inode number of a `struct file`.
    pub fn describe_file(&self, file: u64) -> Result<(FileKind, String, u64), PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let inode = self.read_ptr(file.wrapping_add(l.file_inode))?;
        let ino = k.read_u64(inode.wrapping_add(l.inode_ino))?;
        let mode = k.read_u16(inode.wrapping_add(l.inode_mode))?;
        let sb = self.read_ptr(inode.wrapping_add(l.inode_sb))?;
        let magic = k.read_u64(sb.wrapping_add(l.sb_magic))?;
        let kind = match (magic, mode & 0o170000) {
            (PIPEFS_MAGIC, _) => FileKind::Pipe,
            (SOCKFS_MAGIC, _) | (_, 0o140000) => FileKind::Socket,
            (ANON_INODE_FS_MAGIC, _) => FileKind::AnonInode,
            (_, 0o100000) => FileKind::Regular,
            (_, 0o040000) => FileKind::Directory,
            (_, 0o020000) => FileKind::CharDevice,
            (_, 0o060000) => FileKind::BlockDevice,
            (_, 0o010000) => FileKind::Fifo,
            (_, 0o120000) => FileKind::Symlink,
            _ => FileKind::Unknown,
        };
        let path = match kind {
            FileKind::Pipe => format!("pipe:[{ino}]"),
            FileKind::Socket if magic == SOCKFS_MAGIC => format!("socket:[{ino}]"),
            FileKind::AnonInode => {
                let dentry =
                    self.read_ptr(file.wrapping_add(l.file_path).wrapping_add(l.path_dentry))?;
                format!("anon_inode:{}", self.dentry_name(dentry)?)
            }
            _ => self.file_path(file)?,
        };
        Ok((kind, path, ino))
    }

    fn dentry_name(&self, dentry: u64) -> Result<String, PagingError> {
        let l = self.layout();
        let k = self.kernel_space();
        let len = k.read_u32(dentry.wrapping_add(l.dentry_name).wrapping_add(l.qstr_len))? as usize;
        let name = self.read_ptr(dentry.wrapping_add(l.dentry_name).wrapping_add(l.qstr_name))?;
        let mut buf = vec![0u8; len.min(limits::MAX_NAME_LEN)];
        k.read(name, &mut buf)?;
        Ok(lossy(&buf))
    }

    /// The path of a `struct file`, as `d_path` would print it from the namespace root.
    pub fn file_path(&self, file: u64) -> Result<String, PagingError> {
        let l = self.layout();
        let mnt = self.read_ptr(file.wrapping_add(l.file_path).wrapping_add(l.path_mnt))?;
        let dentry = self.read_ptr(file.wrapping_add(l.file_path).wrapping_add(l.path_dentry))?;
        let mut path = self.path_of(mnt, dentry)?;
        // Like d_path: an unhashed dentry that is not a root was unlinked.
        let pprev = self.read_ptr(dentry.wrapping_add(l.dentry_hash_pprev))?;
        let parent = self.read_ptr(dentry.wrapping_add(l.dentry_parent))?;
        if pprev == 0 && parent != dentry {
            path.push_str(" (deleted)");
        }
        Ok(path)
    }

    /// Rebuilds a path from a (vfsmount, dentry) pair; bounded.
    pub fn path_of(&self, mut vfsmount: u64, mut dentry: u64) -> Result<String, PagingError> {
        let l = self.layout();
        let mut components: Vec<String> = Vec::new();
        let mut total = 0usize;
        for _ in 0..limits::MAX_PATH_COMPONENTS {
            let mnt_root = self.read_ptr(vfsmount.wrapping_add(l.vfsmount_root))?;
            if dentry == mnt_root {
                // Cross to the parent mount, unless this is the namespace root.
                let mount = vfsmount.wrapping_sub(l.mount_mnt);
                let parent = self.read_ptr(mount.wrapping_add(l.mount_parent))?;
                if parent == mount || parent == 0 {
                    break;
                }
                dentry = self.read_ptr(mount.wrapping_add(l.mount_mountpoint))?;
                vfsmount = parent.wrapping_add(l.mount_mnt);
                continue;
            }
            let parent = self.read_ptr(dentry.wrapping_add(l.dentry_parent))?;
            if parent == dentry {
                // Root of a filesystem that is not mounted here (e.g. a detached mount).
                break;
            }
            let name = self.dentry_name(dentry)?;
            total += name.len() + 1;
            if total > limits::MAX_PATH_LEN {
                break;
            }
            components.push(name);
            dentry = parent;
        }
        if components.is_empty() {
            return Ok("/".to_string());
        }
        let mut path = String::with_capacity(total);
        for c in components.iter().rev() {
            path.push('/');
            path.push_str(c);
        }
        Ok(path)
    }
}
