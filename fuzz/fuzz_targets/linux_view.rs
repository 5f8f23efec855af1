//! The Linux view's walks over arbitrary guest memory and arbitrary struct
//! offsets must never panic, hang or allocate without bound.
//!
//! Input: `offset bytes... | memory...`. Every struct offset the view uses is
//! taken from the input (so structs overlap in every possible way), and the
//! memory wraps (every guest-physical address is `gpa % len`), so every
//! pointer leads somewhere and lists can loop.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmi::linux::{
    HashTableLayout, KernelLocation, KernelProfile, Layout, LinuxGuest, ModuleMemLayout,
};
use vmi::memory::{PhysicalMemory, WrappingMemory};
use vmi::paging::{AddressSpace, PagingMode};
use vmi::symbols::{KernelSymbols, Symbol};

const OFFSET_BYTES: usize = 72;

fn layout(bytes: &[u8]) -> Layout {
    let mut it = bytes.iter().cycle();
    // Offsets up to 2 KiB in 8-byte steps, like real struct members.
    let mut off = || u64::from(*it.next().unwrap_or(&0)) * 8;
    Layout {
        task_tasks: off(),
        task_pid: off(),
        task_tgid: off(),
        task_comm: off(),
        task_comm_len: off(),
        task_real_parent: off(),
        task_cred: off(),
        task_mm: off(),
        task_files: off(),
        task_state: off(),
        task_exit_state: off(),
        task_flags: off(),
        task_worker_private: Some(off()),
        pcpu_hot_current_task: Some(off()),
        kthread_full_name: Some(off()),
        cred_uid: off(),
        cred_euid: off(),
        cred_gid: off(),
        mm_pgd: off(),
        mm_exe_file: off(),
        files_fdt: off(),
        fdtable_max_fds: off(),
        fdtable_fd: off(),
        file_path: off(),
        file_inode: off(),
        file_private_data: off(),
        path_mnt: off(),
        path_dentry: off(),
        dentry_name: off(),
        dentry_parent: off(),
        dentry_hash_pprev: off(),
        qstr_name: off(),
        qstr_len: off(),
        inode_ino: off(),
        inode_mode: off(),
        inode_sb: off(),
        sb_magic: off(),
        sb_dev: off(),
        mount_mnt: off(),
        mount_parent: off(),
        mount_mountpoint: off(),
        vfsmount_root: off(),
        socket_sk: off(),
        socket_type: off(),
        sk_family: off(),
        sk_state: off(),
        sk_rcv_saddr: off(),
        sk_daddr: off(),
        sk_num: off(),
        sk_dport: off(),
        sk_v6_rcv_saddr: Some(off()),
        sk_v6_daddr: Some(off()),
        sk_protocol: Some(off()),
        sk_node: off(),
        sk_socket: off(),
        socket_alloc_inode: off(),
        socket_alloc_socket: off(),
        hash_tables: Some(HashTableLayout {
            ehash: off(),
            ehash_mask: off(),
            ehash_bucket_size: off(),
            lhash2: off(),
            lhash2_mask: off(),
            lhash2_bucket_size: off(),
            lhash2_head: off(),
            udp_hash: off(),
            udp_mask: off(),
            udp_slot_size: off(),
            udp_slot_head: off(),
        }),
        module_list: off(),
        module_name: off(),
        module_name_len: off(),
        module_state: off(),
        module_mem: ModuleMemLayout::MemArray {
            mem: off(),
            elem_size: off() + 1,
            count: 7,
            text_index: 0,
            base: off(),
            size: off(),
        },
        module_kallsyms: Some(vmi::linux::ModuleKallsymsLayout {
            kallsyms: off(),
            symtab: off(),
            num_symtab: off(),
            strtab: off(),
        }),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < OFFSET_BYTES + 64 {
        return;
    }
    let (offsets, memory) = data.split_at(OFFSET_BYTES);
    let Some(wrapping) = WrappingMemory::new(memory.to_vec(), 1 << 40) else {
        return;
    };
    let mem: Arc<dyn PhysicalMemory> = Arc::new(wrapping);
    let symbols = KernelSymbols::from_symbols(
        ["init_task", "modules", "linux_banner", "init_top_pgt"]
            .iter()
            .enumerate()
            .map(|(i, name)| Symbol {
                name: name.to_string(),
                addr: 0xffff_ffff_8100_0000 + (i as u64) * 0x1000,
                kind: 'D',
            })
            .collect(),
    );
    let profile = Arc::new(KernelProfile {
        symbols,
        layout: layout(offsets),
        banner: Vec::new(),
        current_task_offset: 0x2_0000,
    });
    let location = KernelLocation {
        virtual_slide: 0,
        physical_slide: 0,
        page_table_root: 0,
        paging_mode: PagingMode::FourLevel,
    };
    let space = AddressSpace::new(mem, 0, PagingMode::FourLevel);
    let guest = LinuxGuest::from_parts(space, profile, location);
    let _ = guest.processes();
    let _ = guest.open_files(None);
    let _ = guest.sockets();
    for m in guest.modules().items.iter().take(4) {
        let _ = guest.module_symbols(m.module);
    }
});
