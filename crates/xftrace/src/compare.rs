//! The paper's detection step: compare a syscall's call flow with the flow
//! of the same syscall recorded on the clean system.
//!
//! A control-data rootkit that redirects a syscall (a `sys_call_table`
//! entry, a `file_operations` pointer) makes that syscall call code it
//! never called before, usually at an address that is no kernel symbol.
//! [`compare`] reports, per syscall:
//! - functions the new flows called that no baseline flow of that syscall
//!   called (interrupt handlers left out: they come at random times);
//! - calls to addresses outside the kernel's and the listed modules' text,
//!   always, baseline or not;
//! - syscalls with no baseline to compare against.
//!
//! Labels are compared as printed (`name`, `name+0x10`, `name [module]`),
//! so a baseline from another boot of the same kernel applies (KASLR moves
//! addresses, not names).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::fgraph::FlowSummary;

/// One deviation from the baseline.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    /// A call to an address outside known text.
    OutsideText {
        syscall: String,
        address: String,
        /// Flows of the syscall that made the call.
        flows: usize,
    },
    /// A function the syscall's baseline never called.
    NewFunction {
        syscall: String,
        function: String,
        flows: usize,
    },
    /// The syscall was recorded, but the baseline has no flow of it.
    NoBaseline { syscall: String },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::OutsideText {
                syscall,
                address,
                flows,
            } => write!(
                f,
                "{syscall}: call to {address}, outside kernel and module text ({flows} flow(s))"
            ),
            Finding::NewFunction {
                syscall,
                function,
                flows,
            } => write!(
                f,
                "{syscall}: calls {function}, which its baseline never called ({flows} flow(s))"
            ),
            Finding::NoBaseline { syscall } => {
                write!(f, "{syscall}: no baseline flow to compare with")
            }
        }
    }
}

/// Deviations of `new` from `baseline`, outside-text calls first, then new
/// functions, then missing baselines; each group sorted by syscall and name.
pub fn compare(baseline: &[FlowSummary], new: &[FlowSummary]) -> Vec<Finding> {
    let mut known: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for b in baseline {
        known
            .entry(b.syscall.as_str())
            .or_default()
            .extend(b.functions.iter().map(String::as_str));
    }
    let mut outside: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut fresh: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut missing: BTreeSet<&str> = BTreeSet::new();
    for n in new {
        for a in &n.flagged {
            *outside.entry((&n.syscall, a)).or_default() += 1;
        }
        match known.get(n.syscall.as_str()) {
            Some(base) => {
                for func in n.functions.iter().filter(|f| !base.contains(f.as_str())) {
                    *fresh.entry((&n.syscall, func)).or_default() += 1;
                }
            }
            None => {
                missing.insert(&n.syscall);
            }
        }
    }
    let mut out: Vec<Finding> = outside
        .into_iter()
        .map(|((s, a), flows)| Finding::OutsideText {
            syscall: s.to_string(),
            address: a.to_string(),
            flows,
        })
        .collect();
    out.extend(
        fresh
            .into_iter()
            .map(|((s, func), flows)| Finding::NewFunction {
                syscall: s.to_string(),
                function: func.to_string(),
                flows,
            }),
    );
    out.extend(missing.into_iter().map(|s| Finding::NoBaseline {
        syscall: s.to_string(),
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(syscall: &str, functions: &[&str], flagged: &[&str]) -> FlowSummary {
        FlowSummary {
            syscall: syscall.into(),
            header: String::new(),
            functions: functions.iter().map(|s| s.to_string()).collect(),
            flagged: flagged.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn reports_new_functions_and_outside_calls() {
        let baseline = vec![
            flow(
                "read",
                &["ksys_read", "vfs_read", "ext4_file_read_iter"],
                &[],
            ),
            flow("read", &["ksys_read", "vfs_read", "pipe_read"], &[]),
            flow("openat", &["do_sys_openat2"], &[]),
        ];
        // Same flows: nothing.
        assert!(compare(&baseline, &baseline[..2]).is_empty());
        // The paper's example: sys_read hijacked into a vmalloc'd page that
        // then calls the real function, plus a hook in a module.
        let new = vec![
            flow(
                "read",
                &["ksys_read", "vfs_read", "evil_filldir [rootkit]"],
                &["0xffffffffc0b37000"],
            ),
            flow("read", &["ksys_read", "vfs_read"], &["0xffffffffc0b37000"]),
            flow("getpid", &["__x64_sys_getpid"], &[]),
        ];
        let got = compare(&baseline, &new);
        assert_eq!(
            got,
            vec![
                Finding::OutsideText {
                    syscall: "read".into(),
                    address: "0xffffffffc0b37000".into(),
                    flows: 2
                },
                Finding::NewFunction {
                    syscall: "read".into(),
                    function: "evil_filldir [rootkit]".into(),
                    flows: 1
                },
                Finding::NoBaseline {
                    syscall: "getpid".into()
                },
            ]
        );
        assert_eq!(
            got[0].to_string(),
            "read: call to 0xffffffffc0b37000, outside kernel and module text (2 flow(s))"
        );
        // Outside calls are reported even with no baseline at all.
        assert!(matches!(
            compare(&[], &new[..1])[0],
            Finding::OutsideText { .. }
        ));
    }
}
