//! The operations behind `/proc/net/*` in every network namespace. Their
//! seq_operations tables are const (the rodata check covers their bytes), so
//! a rootkit hiding sockets swaps the pointer in the entry instead: the
//! `proc_dir_entry` is ordinary heap memory. Each well-known entry must
//! still point at the table its creator passed (`proc_create_net_data`).

use vmi::linux::LinuxGuest;

use crate::baseline::Baseline;
use crate::findings::{Check, Finding, Report};
use crate::modules::Owners;

/// Bounds on guest-controlled walks.
const MAX_NETS: usize = 4096;
const MAX_ENTRIES: usize = 4096;

/// Entry name -> the seq_operations the kernel gives it. Entries of a part
/// built as a module (e.g. IPv6 in some configurations) have no symbol in
/// the image and are skipped.
const ENTRIES: [(&str, &str); 7] = [
    ("tcp", "tcp4_seq_ops"),
    ("tcp6", "tcp6_seq_ops"),
    ("udp", "udp_seq_ops"),
    ("udp6", "udp6_seq_ops"),
    ("raw", "raw_seq_ops"),
    ("raw6", "raw6_seq_ops"),
    ("unix", "unix_seq_ops"),
];

/// The file operations of every seq-file entry made by `proc_create_net*`.
const NET_SEQ_PROC_OPS: &str = "proc_net_seq_ops";

pub fn proc_net_ops(base: &Baseline, guest: &LinuxGuest, owners: &Owners, r: &mut Report) {
    let o = &base.offsets;
    let (
        Some(seq_ops),
        Some(proc_ops),
        Some(subdir),
        Some(link),
        Some(name_off),
        Some(namelen_off),
        Some(net_list),
        Some(proc_net),
        Some(rb_left),
        Some(rb_right),
    ) = (
        o.pde_seq_ops,
        o.pde_proc_ops,
        o.pde_subdir_node,
        o.pde_subdir_link,
        o.pde_name,
        o.pde_namelen,
        o.net_list,
        o.net_proc_net,
        o.rb_left,
        o.rb_right,
    )
    else {
        r.warnings
            .push("/proc/net: this kernel's BTF lacks proc_dir_entry / net".into());
        return;
    };
    let slide = guest.location().virtual_slide;
    let sym = |s: &str| base.profile.symbols.address_of(s).map(|a| a + slide);
    let (Some(head), Some(init_net), Some(net_seq)) = (
        sym("net_namespace_list"),
        sym("init_net"),
        sym(NET_SEQ_PROC_OPS),
    ) else {
        r.warnings
            .push("/proc/net: no net_namespace_list / init_net / proc_net_seq_ops symbol".into());
        return;
    };
    let wanted: Vec<(&str, u64)> = ENTRIES
        .iter()
        .filter_map(|&(name, ops)| Some((name, sym(ops)?)))
        .collect();
    let k = guest.kernel_space();
    let mut at = k.read_u64(head).unwrap_or(head);
    for _ in 0..MAX_NETS {
        if at == head || at == 0 {
            break;
        }
        let net = at.wrapping_sub(net_list);
        at = k.read_u64(at).unwrap_or(head);
        let netname = if net == init_net {
            "init_net".to_string()
        } else {
            format!("net {net:#x}")
        };
        let Ok(dir) = k.read_u64(net + proc_net) else {
            continue;
        };
        // The directory's entries: a red-black tree by name.
        let mut stack = vec![k.read_u64(dir + subdir).unwrap_or(0)];
        let mut seen = 0;
        while let Some(node) = stack.pop() {
            if node == 0 {
                continue;
            }
            seen += 1;
            if seen > MAX_ENTRIES {
                r.warnings.push(format!(
                    "/proc/net of {netname}: too many entries; corrupted?"
                ));
                break;
            }
            stack.push(k.read_u64(node + rb_left).unwrap_or(0));
            stack.push(k.read_u64(node + rb_right).unwrap_or(0));
            let pde = node.wrapping_sub(link);
            let len = usize::from(k.read_u8(pde + namelen_off).unwrap_or(0));
            let mut name = [0u8; 8];
            let Some(buf) = name.get_mut(..len) else {
                continue;
            };
            let Ok(name_ptr) = k.read_u64(pde + name_off) else {
                continue;
            };
            if k.read(name_ptr, buf).is_err() {
                continue;
            }
            let Some(&(entry, want)) = wanted.iter().find(|(n, _)| n.as_bytes() == &name[..len])
            else {
                continue;
            };
            for (field, off, want) in [("seq_ops", seq_ops, want), ("proc_ops", proc_ops, net_seq)]
            {
                r.coverage.data_pointers += 1;
                let Ok(now) = k.read_u64(pde + off) else {
                    continue;
                };
                if now != want {
                    r.findings.push(Finding {
                        check: Check::DataPointer,
                        object: format!("/proc/net/{entry} {field} ({netname})"),
                        location: pde + off,
                        expected: Some(owners.target(base, want)),
                        actual: Some(owners.target(base, now)),
                        module: owners.module_of(base, now),
                        detail: String::new(),
                    });
                }
            }
        }
    }
}
