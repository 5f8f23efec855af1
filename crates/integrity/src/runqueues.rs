//! The tasks the scheduler holds: each CPU's running task and its CFS run
//! queue (a red-black tree of scheduling entities, nested through group
//! entities when tasks sit in cgroups). A process a rootkit has taken off
//! the task list and out of the pid namespace still has to be scheduled to
//! run, so this is where it shows while it runs or waits to run. Real-time
//! and deadline queues are not walked.

use vmi::linux::LinuxGuest;

use crate::baseline::Baseline;
use crate::findings::Report;

/// Bounds on a walk of guest-controlled trees.
const MAX_CPUS: u64 = 8192;
const MAX_CFS_RQS: usize = 4096;
const MAX_NODES: usize = 1 << 16;

/// A task the scheduler holds on a CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub task: u64,
    pub cpu: u32,
    /// Running now (`rq->curr`), else waiting in the CFS tree.
    pub running: bool,
}

/// Every task on every CPU's run queue (idle tasks left out); empty with a
/// warning when the kernel's BTF or symbols lack what the walk needs.
pub fn scheduled_tasks(base: &Baseline, guest: &LinuxGuest, r: &mut Report) -> Vec<Scheduled> {
    let o = &base.offsets;
    let (
        Some(rq_curr),
        Some(rq_idle),
        Some(rq_cfs),
        Some(timeline),
        Some(cfs_curr),
        Some(run_node),
        Some(rb_left),
        Some(rb_right),
        Some(task_se),
    ) = (
        o.rq_curr,
        o.rq_idle,
        o.rq_cfs,
        o.cfs_rq_timeline_node,
        o.cfs_rq_curr,
        o.se_run_node,
        o.rb_left,
        o.rb_right,
        o.task_se,
    )
    else {
        r.warnings
            .push("run queues: this kernel's BTF lacks rq/cfs_rq/sched_entity".into());
        return Vec::new();
    };
    let k = guest.kernel_space();
    let (Some(runqueues), Ok(offsets), Ok(nr_cpus)) = (
        // A per-cpu symbol: an offset into each CPU's area, not moved by KASLR.
        base.profile.symbols.address_of("runqueues"),
        guest.symbol("__per_cpu_offset"),
        guest.symbol("nr_cpu_ids"),
    ) else {
        r.warnings
            .push("run queues: no runqueues / __per_cpu_offset / nr_cpu_ids symbol".into());
        return Vec::new();
    };
    let nr_cpus = u64::from(k.read_u32(nr_cpus).unwrap_or(1)).clamp(1, MAX_CPUS);
    let mut out = Vec::new();
    let mut nodes = 0usize;
    for cpu in 0..nr_cpus {
        let Ok(area) = k.read_u64(offsets + 8 * cpu) else {
            continue;
        };
        let rq = runqueues.wrapping_add(area);
        let (Ok(curr), Ok(idle)) = (k.read_u64(rq + rq_curr), k.read_u64(rq + rq_idle)) else {
            continue;
        };
        if curr != 0 && curr != idle {
            out.push(Scheduled {
                task: curr,
                cpu: cpu as u32,
                running: true,
            });
        }
        // Depth-first over cfs_rqs and their trees; a group entity (my_q
        // set) leads to its own cfs_rq.
        let mut queues = vec![rq + rq_cfs];
        let mut seen_queues = 0usize;
        while let Some(cfs) = queues.pop() {
            seen_queues += 1;
            if seen_queues > MAX_CFS_RQS {
                r.warnings.push(format!(
                    "run queues: CPU {cpu}: too many group queues; corrupted?"
                ));
                break;
            }
            let mut entities = Vec::new();
            if let Ok(se) = k.read_u64(cfs + cfs_curr) {
                entities.push(se);
            }
            let mut stack = vec![k.read_u64(cfs + timeline).unwrap_or(0)];
            while let Some(node) = stack.pop() {
                if node == 0 {
                    continue;
                }
                nodes += 1;
                if nodes > MAX_NODES {
                    r.warnings
                        .push("run queues: too many entities; corrupted?".into());
                    return out;
                }
                entities.push(node.wrapping_sub(run_node));
                stack.push(k.read_u64(node + rb_left).unwrap_or(0));
                stack.push(k.read_u64(node + rb_right).unwrap_or(0));
            }
            for se in entities.into_iter().filter(|&se| se != 0) {
                let group = o
                    .se_my_q
                    .and_then(|my_q| k.read_u64(se + my_q).ok())
                    .unwrap_or(0);
                if group != 0 {
                    queues.push(group);
                } else {
                    out.push(Scheduled {
                        task: se.wrapping_sub(task_se),
                        cpu: cpu as u32,
                        running: false,
                    });
                }
            }
        }
    }
    out
}
