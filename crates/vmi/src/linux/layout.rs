//! The struct offsets the Linux view needs, resolved once from BTF.
//!
//! Nothing here is specific to one kernel build: every offset comes from the
//! image's `.BTF`. Where kernels renamed or reshaped a field between the
//! versions we support (6.1 to 6.12), both shapes are tried.

use crate::btf::{Btf, BtfError};

/// Offsets (bytes) into kernel structs.
#[derive(Debug, Clone)]
pub struct Layout {
    pub task_tasks: u64,
    pub task_pid: u64,
    pub task_tgid: u64,
    pub task_comm: u64,
    pub task_comm_len: u64,
    pub task_real_parent: u64,
    pub task_cred: u64,
    pub task_mm: u64,
    pub task_files: u64,
    pub task_state: u64,
    pub task_exit_state: u64,
    pub task_flags: u64,
    /// `task_struct.worker_private` -> `struct kthread` (kernel threads), and its `full_name`.
    pub task_worker_private: Option<u64>,
    /// `struct pcpu_hot.current_task` (6.2+); older kernels have a per-cpu `current_task`.
    pub pcpu_hot_current_task: Option<u64>,
    pub kthread_full_name: Option<u64>,
    pub cred_uid: u64,
    pub cred_euid: u64,
    pub cred_gid: u64,
    pub mm_pgd: u64,
    pub mm_exe_file: u64,
    pub files_fdt: u64,
    pub fdtable_max_fds: u64,
    pub fdtable_fd: u64,
    pub file_path: u64,
    pub file_inode: u64,
    pub file_private_data: u64,
    pub path_mnt: u64,
    pub path_dentry: u64,
    pub dentry_name: u64,
    pub dentry_parent: u64,
    /// `d_hash.pprev`: NULL when the dentry is unhashed (unlinked).
    pub dentry_hash_pprev: u64,
    pub qstr_name: u64,
    pub qstr_len: u64,
    pub inode_ino: u64,
    pub inode_mode: u64,
    pub inode_sb: u64,
    pub sb_magic: u64,
    pub sb_dev: u64,
    /// Offset of the embedded `struct vfsmount` inside `struct mount`.
    pub mount_mnt: u64,
    pub mount_parent: u64,
    pub mount_mountpoint: u64,
    pub vfsmount_root: u64,
    pub socket_sk: u64,
    pub socket_type: u64,
    pub sk_family: u64,
    pub sk_state: u64,
    pub sk_rcv_saddr: u64,
    pub sk_daddr: u64,
    pub sk_num: u64,
    pub sk_dport: u64,
    pub sk_v6_rcv_saddr: Option<u64>,
    pub sk_v6_daddr: Option<u64>,
    pub sk_protocol: Option<u64>,
    /// `sock_common.skc_node` / `skc_nulls_node` (the same place): hash-chain links.
    pub sk_node: u64,
    pub sk_socket: u64,
    /// Offset of the inode in `struct socket_alloc` (the socket's inode).
    pub socket_alloc_inode: u64,
    pub socket_alloc_socket: u64,
    /// The kernel's socket hash tables, if this kernel's BTF describes them.
    pub hash_tables: Option<HashTableLayout>,
    pub module_list: u64,
    pub module_name: u64,
    pub module_name_len: u64,
    pub module_state: u64,
    pub module_mem: ModuleMemLayout,
    /// `module.kallsyms` -> `mod_kallsyms` {symtab, num_symtab, strtab}, if BTF has it.
    pub module_kallsyms: Option<ModuleKallsymsLayout>,
}

/// Where a module's own symbol table is (`CONFIG_KALLSYMS`).
#[derive(Debug, Clone, Copy)]
pub struct ModuleKallsymsLayout {
    pub kallsyms: u64,
    pub symtab: u64,
    pub num_symtab: u64,
    pub strtab: u64,
}

/// `struct inet_hashinfo` (TCP) and `struct udp_table`.
#[derive(Debug, Clone)]
pub struct HashTableLayout {
    pub ehash: u64,
    pub ehash_mask: u64,
    pub ehash_bucket_size: u64,
    pub lhash2: u64,
    pub lhash2_mask: u64,
    pub lhash2_bucket_size: u64,
    pub lhash2_head: u64,
    pub udp_hash: u64,
    pub udp_mask: u64,
    pub udp_slot_size: u64,
    pub udp_slot_head: u64,
}

impl HashTableLayout {
    fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let off = |s: &str, p: &str| btf.offset_of(s, p);
        Ok(HashTableLayout {
            ehash: off("inet_hashinfo", "ehash")?,
            ehash_mask: off("inet_hashinfo", "ehash_mask")?,
            ehash_bucket_size: btf.struct_size("inet_ehash_bucket")?,
            lhash2: off("inet_hashinfo", "lhash2")?,
            lhash2_mask: off("inet_hashinfo", "lhash2_mask")?,
            lhash2_bucket_size: btf.struct_size("inet_listen_hashbucket")?,
            lhash2_head: off("inet_listen_hashbucket", "nulls_head")?,
            udp_hash: off("udp_table", "hash")?,
            udp_mask: off("udp_table", "mask")?,
            udp_slot_size: btf.struct_size("udp_hslot")?,
            udp_slot_head: off("udp_hslot", "head")?,
        })
    }
}

/// Where a module's base and size live.
#[derive(Debug, Clone, Copy)]
pub enum ModuleMemLayout {
    /// 6.4+: `struct module_memory mem[MOD_MEM_NUM_TYPES]`; text is `mem[MOD_TEXT]`.
    MemArray {
        mem: u64,
        elem_size: u64,
        count: u64,
        text_index: u64,
        base: u64,
        size: u64,
    },
    /// Before 6.4: `core_layout` and `init_layout` (`struct module_layout`).
    Layouts {
        core: u64,
        init: u64,
        base: u64,
        size: u64,
    },
}

impl Layout {
    /// Resolves every offset from `btf`. Fails naming the first field missing.
    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let off = |s: &str, p: &str| btf.offset_of(s, p);
        let first_of = |s: &str, paths: &[&str]| -> Result<u64, BtfError> {
            let mut last = None;
            for p in paths {
                match btf.offset_of(s, p) {
                    Ok(o) => return Ok(o),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("at least one path"))
        };
        let module_mem = if btf.has_field("module", "mem") {
            let mem = btf.field("module", "mem")?;
            let (elem_size, count) = match mem.kind {
                crate::btf::FieldKind::Array { elem_size, len } => (elem_size, len),
                _ => (btf.struct_size("module_memory")?, 1),
            };
            ModuleMemLayout::MemArray {
                mem: mem.offset,
                elem_size,
                count: count.min(16),
                text_index: btf.enum_value("", "MOD_TEXT")?.max(0) as u64,
                base: off("module_memory", "base")?,
                size: off("module_memory", "size")?,
            }
        } else {
            ModuleMemLayout::Layouts {
                core: off("module", "core_layout")?,
                init: off("module", "init_layout")?,
                base: off("module_layout", "base")?,
                size: off("module_layout", "size")?,
            }
        };
        let comm = btf.field("task_struct", "comm")?;
        let name = btf.field("module", "name")?;
        let qstr_len = first_of("qstr", &["len", "hash_len"])?;
        // `len` shares a u64 with `hash` (hash_len); on little-endian the len is the high half.
        let qstr_len = if btf.has_field("qstr", "len") {
            qstr_len
        } else {
            qstr_len + 4
        };
        Ok(Layout {
            task_tasks: off("task_struct", "tasks")?,
            task_pid: off("task_struct", "pid")?,
            task_tgid: off("task_struct", "tgid")?,
            task_comm: comm.offset,
            task_comm_len: comm.size.clamp(1, 64),
            task_real_parent: off("task_struct", "real_parent")?,
            task_cred: off("task_struct", "cred")?,
            task_mm: off("task_struct", "mm")?,
            task_files: off("task_struct", "files")?,
            task_state: first_of("task_struct", &["__state", "state"])?,
            task_exit_state: off("task_struct", "exit_state")?,
            task_flags: off("task_struct", "flags")?,
            task_worker_private: off("task_struct", "worker_private").ok(),
            pcpu_hot_current_task: off("pcpu_hot", "current_task").ok(),
            kthread_full_name: off("kthread", "full_name").ok(),
            cred_uid: off("cred", "uid")?,
            cred_euid: off("cred", "euid")?,
            cred_gid: off("cred", "gid")?,
            mm_pgd: off("mm_struct", "pgd")?,
            mm_exe_file: off("mm_struct", "exe_file")?,
            files_fdt: off("files_struct", "fdt")?,
            fdtable_max_fds: off("fdtable", "max_fds")?,
            fdtable_fd: off("fdtable", "fd")?,
            file_path: off("file", "f_path")?,
            file_inode: off("file", "f_inode")?,
            file_private_data: off("file", "private_data")?,
            path_mnt: off("path", "mnt")?,
            path_dentry: off("path", "dentry")?,
            dentry_name: off("dentry", "d_name")?,
            dentry_parent: off("dentry", "d_parent")?,
            dentry_hash_pprev: off("dentry", "d_hash.pprev")?,
            qstr_name: off("qstr", "name")?,
            qstr_len,
            inode_ino: off("inode", "i_ino")?,
            inode_mode: off("inode", "i_mode")?,
            inode_sb: off("inode", "i_sb")?,
            sb_magic: off("super_block", "s_magic")?,
            sb_dev: off("super_block", "s_dev")?,
            mount_mnt: off("mount", "mnt")?,
            mount_parent: off("mount", "mnt_parent")?,
            mount_mountpoint: off("mount", "mnt_mountpoint")?,
            vfsmount_root: off("vfsmount", "mnt_root")?,
            socket_sk: off("socket", "sk")?,
            socket_type: off("socket", "type")?,
            sk_family: off("sock", "__sk_common.skc_family")?,
            sk_state: off("sock", "__sk_common.skc_state")?,
            sk_rcv_saddr: off("sock", "__sk_common.skc_rcv_saddr")?,
            sk_daddr: off("sock", "__sk_common.skc_daddr")?,
            sk_num: off("sock", "__sk_common.skc_num")?,
            sk_dport: off("sock", "__sk_common.skc_dport")?,
            sk_v6_rcv_saddr: off("sock", "__sk_common.skc_v6_rcv_saddr").ok(),
            sk_v6_daddr: off("sock", "__sk_common.skc_v6_daddr").ok(),
            sk_protocol: off("sock", "sk_protocol").ok(),
            sk_node: off("sock", "__sk_common.skc_node")?,
            sk_socket: off("sock", "sk_socket")?,
            socket_alloc_inode: off("socket_alloc", "vfs_inode")?,
            socket_alloc_socket: off("socket_alloc", "socket")?,
            hash_tables: HashTableLayout::from_btf(btf).ok(),
            module_list: off("module", "list")?,
            module_name: name.offset,
            module_name_len: name.size.clamp(1, 256),
            module_state: off("module", "state")?,
            module_mem,
            module_kallsyms: (|| {
                Some(ModuleKallsymsLayout {
                    kallsyms: off("module", "kallsyms").ok()?,
                    symtab: off("mod_kallsyms", "symtab").ok()?,
                    num_symtab: off("mod_kallsyms", "num_symtab").ok()?,
                    strtab: off("mod_kallsyms", "strtab").ok()?,
                })
            })(),
        })
    }
}
