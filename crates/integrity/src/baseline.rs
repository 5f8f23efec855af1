//! What the kernel image says the running kernel should look like, computed
//! once per kernel build and shared by every scan of every guest running it.

use std::sync::Arc;

use vmi::btf::{Btf, BtfError};
use vmi::image::KernelImage;
use vmi::linux::KernelProfile;

use crate::patchsites::{self, Intervals};

/// Why a baseline could not be built from an image.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("kernel image has no `{0}` symbol: is this the kernel the guest runs?")]
    MissingSymbol(&'static str),
    #[error(
        "kernel image has no bytes for {0}: pass the uncompressed vmlinux of the guest's kernel"
    )]
    MissingBytes(&'static str),
    #[error("kernel image has no .BTF section: use a kernel built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    #[error("kernel BTF: {0}")]
    Btf(#[from] BtfError),
}

/// A syscall table as the image has it.
#[derive(Debug, Clone)]
pub struct SyscallTable {
    pub name: &'static str,
    /// Link-time address of the table.
    pub addr: u64,
    /// Link-time handler address of each entry.
    pub entries: Vec<u64>,
}

/// Struct offsets from BTF the checks need beyond the Linux view's layout.
/// `None` where this kernel lacks the structure (the check then says so).
#[derive(Debug, Clone, Default)]
pub struct Offsets {
    pub module_mkobj_mod: Option<u64>,
    pub module_mkobj_entry: Option<u64>,
    pub kset_list: Option<u64>,
    pub kobject_entry: Option<u64>,
    pub module_kobject_mod: Option<u64>,
    pub ftrace_ops_next: Option<u64>,
    pub ftrace_ops_func: Option<u64>,
    pub ftrace_ops_func_hash: Option<u64>,
    pub ftrace_ops_trampoline: Option<u64>,
    pub ops_hash_filter: Option<u64>,
    pub hash_size_bits: Option<u64>,
    pub hash_buckets: Option<u64>,
    pub func_entry_ip: Option<u64>,
    pub pid_nr: Option<u64>,
    pub pid_tasks: Option<u64>,
    pub task_pid_links: Option<u64>,
    pub pidns_idr_head: Option<u64>,
    pub xa_node_shift: Option<u64>,
    pub xa_node_slots: Option<u64>,
    pub pde_proc_iops: Option<u64>,
    pub pde_proc_dir_ops: Option<u64>,
    pub rq_curr: Option<u64>,
    pub rq_idle: Option<u64>,
    pub rq_cfs: Option<u64>,
    /// `cfs_rq.tasks_timeline.rb_root.rb_node`: the tree's root node.
    pub cfs_rq_timeline_node: Option<u64>,
    pub cfs_rq_curr: Option<u64>,
    pub se_run_node: Option<u64>,
    /// Only with group scheduling.
    pub se_my_q: Option<u64>,
    pub rb_left: Option<u64>,
    pub rb_right: Option<u64>,
    pub task_se: Option<u64>,
    pub task_group_leader: Option<u64>,
    pub pde_seq_ops: Option<u64>,
    pub pde_proc_ops: Option<u64>,
    /// `proc_dir_entry.subdir.rb_node`: a directory's tree of entries.
    pub pde_subdir_node: Option<u64>,
    pub pde_subdir_link: Option<u64>,
    pub pde_name: Option<u64>,
    pub pde_namelen: Option<u64>,
    pub net_list: Option<u64>,
    pub net_proc_net: Option<u64>,
    /// `proc_inode.pde` and `.vfs_inode` (tests reach a pde from a file).
    pub proc_inode_pde: Option<u64>,
    pub proc_inode_vfs_inode: Option<u64>,
}

impl Offsets {
    fn from_btf(btf: &Btf) -> Self {
        let o = |s: &str, f: &str| btf.offset_of(s, f).ok();
        let sum = |a: Option<u64>, b: Option<u64>| Some(a?.wrapping_add(b?));
        Offsets {
            module_mkobj_mod: sum(o("module", "mkobj"), o("module_kobject", "mod")),
            module_mkobj_entry: sum(
                sum(o("module", "mkobj"), o("module_kobject", "kobj")),
                o("kobject", "entry"),
            ),
            kset_list: o("kset", "list"),
            kobject_entry: o("kobject", "entry"),
            module_kobject_mod: o("module_kobject", "mod"),
            ftrace_ops_next: o("ftrace_ops", "next"),
            ftrace_ops_func: o("ftrace_ops", "func"),
            ftrace_ops_func_hash: o("ftrace_ops", "func_hash"),
            ftrace_ops_trampoline: o("ftrace_ops", "trampoline"),
            ops_hash_filter: o("ftrace_ops_hash", "filter_hash"),
            hash_size_bits: o("ftrace_hash", "size_bits"),
            hash_buckets: o("ftrace_hash", "buckets"),
            func_entry_ip: o("ftrace_func_entry", "ip"),
            pid_nr: sum(o("pid", "numbers"), o("upid", "nr")),
            pid_tasks: o("pid", "tasks"),
            task_pid_links: o("task_struct", "pid_links"),
            pidns_idr_head: sum(
                sum(o("pid_namespace", "idr"), o("idr", "idr_rt")),
                o("xarray", "xa_head"),
            ),
            xa_node_shift: o("xa_node", "shift"),
            xa_node_slots: o("xa_node", "slots"),
            pde_proc_iops: o("proc_dir_entry", "proc_iops"),
            pde_proc_dir_ops: o("proc_dir_entry", "proc_dir_ops"),
            rq_curr: o("rq", "curr"),
            rq_idle: o("rq", "idle"),
            rq_cfs: o("rq", "cfs"),
            cfs_rq_timeline_node: sum(
                sum(
                    o("cfs_rq", "tasks_timeline"),
                    o("rb_root_cached", "rb_root"),
                ),
                o("rb_root", "rb_node"),
            ),
            cfs_rq_curr: o("cfs_rq", "curr"),
            se_run_node: o("sched_entity", "run_node"),
            se_my_q: o("sched_entity", "my_q"),
            rb_left: o("rb_node", "rb_left"),
            rb_right: o("rb_node", "rb_right"),
            task_se: o("task_struct", "se"),
            task_group_leader: o("task_struct", "group_leader"),
            pde_seq_ops: o("proc_dir_entry", "seq_ops"),
            pde_proc_ops: o("proc_dir_entry", "proc_ops"),
            pde_subdir_node: sum(o("proc_dir_entry", "subdir"), o("rb_root", "rb_node")),
            pde_subdir_link: o("proc_dir_entry", "subdir_node"),
            pde_name: o("proc_dir_entry", "name"),
            pde_namelen: o("proc_dir_entry", "namelen"),
            net_list: o("net", "list"),
            net_proc_net: o("net", "proc_net"),
            proc_inode_pde: o("proc_inode", "pde"),
            proc_inode_vfs_inode: o("proc_inode", "vfs_inode"),
        }
    }
}

/// A pointer in a kernel data object that must keep its image value.
#[derive(Debug, Clone)]
pub struct DataSlot {
    pub name: String,
    /// Link-time address of the slot.
    pub addr: u64,
    /// Link-time value in the image.
    pub value: u64,
}

/// Everything a scan compares the running kernel with.
pub struct Baseline {
    pub profile: Arc<KernelProfile>,
    /// Core kernel text `[_stext, _etext)`, link-time, and its image bytes.
    pub text_start: u64,
    pub text: Vec<u8>,
    /// Bytes of text the kernel legitimately rewrites at run time.
    pub patchable: Intervals,
    /// Where each kind of patch site is, for naming a difference.
    pub mcount_sites: Intervals,
    /// Patch sites that may hold a call or jump, which must stay in core text.
    pub branch_sites: Vec<crate::patchsites::BranchSite>,
    /// Jump-label sites and the target each may jump to (link-time, by site).
    pub jump_sites: Vec<(u64, u64)>,
    /// `.rodata`, link-time, and its image bytes.
    pub rodata_start: u64,
    pub rodata: Vec<u8>,
    /// `[__start_ro_after_init, __end_ro_after_init)`: written during boot.
    pub ro_after_init: (u64, u64),
    pub syscall_tables: Vec<SyscallTable>,
    /// `x64_sys_call`'s link-time range, where the kernel has it.
    pub dispatcher: Option<(u64, u64)>,
    /// Link-time handlers the image installs per IDT vector (from its
    /// `idt_data` tables; an early handler may stay where no later one replaces it).
    pub idt_expected: Vec<Vec<u64>>,
    /// Link-time ranges of the IRQ entry stubs (vectors without a named gate).
    pub irq_stubs: Vec<(u64, u64)>,
    /// `early_idt_handler_array`: the boot handlers left on reserved exception vectors.
    pub early_idt_handlers: Option<(u64, u64)>,
    pub data_slots: Vec<DataSlot>,
    pub offsets: Offsets,
}

impl Baseline {
    /// Reads the image once: text, rodata, patch-site tables, syscall tables,
    /// IDT tables, and BTF offsets.
    pub fn new(image: &KernelImage, profile: Arc<KernelProfile>) -> Result<Self, BaselineError> {
        let btf = Btf::parse(image.btf().ok_or(BaselineError::NoBtf)?)?;
        let sym = |name: &'static str| {
            profile
                .symbols
                .address_of(name)
                .ok_or(BaselineError::MissingSymbol(name))
        };
        let text_start = sym("_stext")?;
        let text_end = sym("_etext")?;
        let text = image
            .read_vaddr(text_start, (text_end - text_start) as usize)
            .ok_or(BaselineError::MissingBytes("kernel text"))?
            .to_vec();
        let rodata_start = sym("__start_rodata")?;
        let rodata_end = sym("__end_rodata")?;
        // The segment's file data can end before the page-aligned symbol.
        let rodata = read_prefix(image, rodata_start, (rodata_end - rodata_start) as usize)
            .ok_or(BaselineError::MissingBytes(".rodata"))?
            .to_vec();
        let ro_after_init = (sym("__start_ro_after_init")?, sym("__end_ro_after_init")?);
        let sites = patchsites::collect(image, &profile.symbols, &btf, (text_start, text_end));

        let mut syscall_tables = Vec::new();
        for name in [
            "sys_call_table",
            "ia32_sys_call_table",
            "x32_sys_call_table",
        ] {
            if let Some(t) = syscall_table(image, &profile, name, (text_start, text_end)) {
                syscall_tables.push(t);
            }
        }
        if syscall_tables.is_empty() {
            return Err(BaselineError::MissingSymbol("sys_call_table"));
        }
        let dispatcher = profile
            .symbols
            .address_of("x64_sys_call")
            .map(|a| (a, symbol_end(&profile, a, 0x10000)));
        let (idt_expected, irq_stubs) = idt_tables(image, &profile, &btf);
        let early_idt_handlers = profile
            .symbols
            .address_of("early_idt_handler_array")
            .map(|a| (a, symbol_end(&profile, a, 32 * 16)));
        let offsets = Offsets::from_btf(&btf);
        let data_slots = data_slots(image, &profile, &offsets);
        Ok(Baseline {
            text_start,
            text,
            patchable: sites.patchable,
            mcount_sites: sites.mcount,
            branch_sites: sites.branch_sites,
            jump_sites: sites.jumps,
            rodata_start,
            rodata,
            ro_after_init,
            syscall_tables,
            dispatcher,
            idt_expected,
            irq_stubs,
            early_idt_handlers,
            data_slots,
            offsets,
            profile,
        })
    }

    /// Link-time end of core text.
    pub fn text_end(&self) -> u64 {
        self.text_start + self.text.len() as u64
    }

    /// Whether a link-time address is in core kernel text.
    pub fn in_text(&self, link: u64) -> bool {
        (self.text_start..self.text_end()).contains(&link)
    }
}

/// The longest prefix of `[va, va + len)` the image has bytes for.
fn read_prefix(image: &KernelImage, va: u64, len: usize) -> Option<&[u8]> {
    if let Some(b) = image.read_vaddr(va, len) {
        return Some(b);
    }
    let (mut lo, mut hi) = (0usize, len); // lo readable, hi not
    image.read_vaddr(va, 1)?;
    lo = lo.max(1);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if image.read_vaddr(va, mid).is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    image.read_vaddr(va, lo)
}

/// Address of the next symbol after `addr` (its end), at most `max` bytes on.
pub(crate) fn symbol_end(profile: &KernelProfile, addr: u64, max: u64) -> u64 {
    profile
        .symbols
        .iter()
        .map(|s| s.addr)
        .filter(|&a| a > addr)
        .min()
        .unwrap_or(addr + max)
        .min(addr + max)
}

/// Entries of a syscall table: every slot up to the next symbol that holds a
/// text address (at most 1024).
fn syscall_table(
    image: &KernelImage,
    profile: &KernelProfile,
    name: &'static str,
    text: (u64, u64),
) -> Option<SyscallTable> {
    let addr = profile.symbols.address_of(name)?;
    let end = symbol_end(profile, addr, 1024 * 8);
    let bytes = image.read_vaddr(addr, (end - addr) as usize)?;
    let entries: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .take_while(|&v| (text.0..text.1).contains(&v))
        .collect();
    (!entries.is_empty()).then_some(SyscallTable {
        name,
        addr,
        entries,
    })
}

/// The handlers the kernel installs for named vectors (`early_idts`,
/// `early_pf_idts`, `def_idts`, `ia32_idt`, `apic_idts`:
/// arrays of `struct idt_data { vector, segment, bits, addr }` in .init.data,
/// still present in the image), and the ranges of the generic IRQ stubs.
fn idt_tables(
    image: &KernelImage,
    profile: &KernelProfile,
    btf: &Btf,
) -> (Vec<Vec<u64>>, Vec<(u64, u64)>) {
    let mut expected = vec![Vec::new(); 256];
    let size = btf.struct_size("idt_data").ok();
    let vec_off = btf.offset_of("idt_data", "vector").ok();
    let addr_off = btf.offset_of("idt_data", "addr").ok();
    if let (Some(size), Some(vo), Some(ao)) = (size, vec_off, addr_off) {
        for table in [
            "early_idts",
            "early_pf_idts",
            "def_idts",
            "ia32_idt",
            "apic_idts",
        ] {
            let Some(start) = profile.symbols.address_of(table) else {
                continue;
            };
            let end = symbol_end(profile, start, 256 * size);
            let Some(bytes) = image.read_vaddr(start, (end - start) as usize) else {
                continue;
            };
            for e in bytes.chunks_exact(size as usize) {
                let v = read_u32(e, vo as usize) as usize;
                let a = read_u64(e, ao as usize);
                if v < 256 && a != 0 && !expected[v].contains(&a) {
                    expected[v].push(a);
                }
            }
        }
    }
    let mut stubs = Vec::new();
    for (start, len) in [
        ("irq_entries_start", 224 * 32),
        ("spurious_entries_start", 224 * 32),
    ] {
        if let Some(a) = profile.symbols.address_of(start) {
            stubs.push((a, symbol_end(profile, a, len)));
        }
    }
    (expected, stubs)
}

/// Pointers in writable kernel objects that rootkits swap and the kernel
/// never changes: /proc's root entry's inode and directory operations.
fn data_slots(image: &KernelImage, profile: &KernelProfile, o: &Offsets) -> Vec<DataSlot> {
    let mut out = Vec::new();
    if let Some(root) = profile.symbols.address_of("proc_root") {
        for (field, off) in [
            ("proc_iops", o.pde_proc_iops),
            ("proc_dir_ops", o.pde_proc_dir_ops),
        ] {
            let Some(off) = off else { continue };
            let addr = root + off;
            if let Some(b) = image.read_vaddr(addr, 8) {
                let value = read_u64(b, 0);
                if value != 0 {
                    out.push(DataSlot {
                        name: format!("proc_root.{field}"),
                        addr,
                        value,
                    });
                }
            }
        }
    }
    out
}

pub(crate) fn read_u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
        .unwrap_or(0)
}

pub(crate) fn read_u64(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
        .unwrap_or(0)
}

pub(crate) fn read_i32(b: &[u8], off: usize) -> i64 {
    i64::from(read_u32(b, off) as i32)
}
