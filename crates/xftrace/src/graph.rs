//! From records to call trees: one [`Flow`] per traced syscall (entry to
//! the return to user mode) of one task, its calls nested by the depth the
//! plugin gave each record.
//!
//! Records of several tasks interleave in the buffer (several vCPUs, or a
//! traced task that blocked while another ran); they are separated by the
//! `task_struct` address each carries. Within a task they are in execution
//! order.
//!
//! Nesting rules (matching what the plugin writes):
//! - a call or tail call at depth `d` first closes frames deeper than or at
//!   `d` that are still open (their return was not seen: a call that never
//!   returned, a lost record), then opens a frame;
//! - a ret at depth `d` closes the frame at `d` with its duration, and the
//!   tail-called frames above it at the same instant (a tail-called
//!   function returns through the `ret` of the function that jumped to it);
//!   other frames above it are closed without a duration;
//! - the exit closes everything; a flow without one (tracing stopped, or
//!   `exit` which never returns) is kept, marked unterminated.
//!
//! Everything is bounded by the records: depth by [`MAX_DEPTH`], nodes by
//! the record count.

use std::collections::HashMap;

use crate::record::{Kind, Record, FLAG_INDIRECT, FLAG_UNREAD, MAX_DEPTH};

/// One call and what it called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The callee (0 when the indirect target could not be read).
    pub target: u64,
    /// The call (or jmp) instruction.
    pub call_site: u64,
    pub vcpu: u16,
    pub start_ns: u64,
    /// `None` when the return was not seen.
    pub duration_ns: Option<u64>,
    /// [`FLAG_INDIRECT`], [`FLAG_UNREAD`].
    pub flags: u8,
    /// Reached by a `jmp` to a function start rather than a `call`.
    pub tail: bool,
    pub children: Vec<Node>,
}

impl Node {
    pub fn unread(&self) -> bool {
        self.flags & FLAG_UNREAD != 0
    }

    pub fn indirect(&self) -> bool {
        self.flags & FLAG_INDIRECT != 0
    }

    /// This node and everything below it, depth first.
    pub fn walk(&self, f: &mut impl FnMut(&Node)) {
        f(self);
        for c in &self.children {
            c.walk(f);
        }
    }
}

/// One traced syscall of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub nr: u16,
    pub task: u64,
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    /// vCPU of the entry.
    pub vcpu: u16,
    pub start_ns: u64,
    /// The return to user mode, when seen.
    pub end_ns: Option<u64>,
    /// The syscall's result (rax at the return to user mode).
    pub result: Option<i64>,
    pub calls: Vec<Node>,
    /// Call and tail-call records in this flow.
    pub call_count: usize,
}

impl Flow {
    /// The syscall's name (`openat`), or `nr123` outside the table.
    pub fn name(&self) -> String {
        events::syscalls::name(u64::from(self.nr))
            .map(str::to_string)
            .unwrap_or_else(|| format!("nr{}", self.nr))
    }

    pub fn complete(&self) -> bool {
        self.end_ns.is_some()
    }

    /// Every node, depth first.
    pub fn walk(&self, mut f: impl FnMut(&Node)) {
        for n in &self.calls {
            n.walk(&mut f);
        }
    }
}

/// All flows of a record sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// In the order their entries were recorded.
    pub flows: Vec<Flow>,
    /// Call/ret/exit records of a task with no open flow (its entry was
    /// lost, or recording started mid-syscall).
    pub orphans: u64,
}

struct Open {
    order: usize,
    flow: Flow,
    stack: Vec<Node>,
}

fn attach(open: &mut Open, node: Node) {
    match open.stack.last_mut() {
        Some(parent) => parent.children.push(node),
        None => open.flow.calls.push(node),
    }
}

/// Closes the innermost open frame; `end` is its return time when known.
fn close_top(open: &mut Open, end: Option<u64>) {
    if let Some(mut node) = open.stack.pop() {
        node.duration_ns = end.map(|e| e.saturating_sub(node.start_ns));
        attach(open, node);
    }
}

fn finish(open: Open, done: &mut Vec<(usize, Flow)>) {
    let mut open = open;
    while !open.stack.is_empty() {
        close_top(&mut open, None);
    }
    done.push((open.order, open.flow));
}

/// Builds the flows of `records` (in buffer order).
pub fn build(records: &[Record]) -> Trace {
    let mut open: HashMap<u64, Open> = HashMap::new();
    let mut done: Vec<(usize, Flow)> = Vec::new();
    let mut orphans = 0u64;
    let mut order = 0usize;
    for r in records {
        match r.kind {
            Kind::Entry => {
                if let Some(prev) = open.remove(&r.task) {
                    finish(prev, &mut done);
                }
                open.insert(
                    r.task,
                    Open {
                        order,
                        flow: Flow {
                            nr: r.nr,
                            task: r.task,
                            pid: r.pid,
                            tgid: r.tgid,
                            comm: r.comm(),
                            vcpu: r.vcpu,
                            start_ns: r.time_ns,
                            end_ns: None,
                            result: None,
                            calls: Vec::new(),
                            call_count: 0,
                        },
                        stack: Vec::new(),
                    },
                );
                order += 1;
            }
            Kind::Call | Kind::Tail => {
                let Some(o) = open.get_mut(&r.task) else {
                    orphans += 1;
                    continue;
                };
                let depth = usize::from(r.depth.min(MAX_DEPTH - 1));
                while o.stack.len() > depth {
                    close_top(o, None);
                }
                o.flow.call_count += 1;
                o.stack.push(Node {
                    target: r.target,
                    call_site: r.pc,
                    vcpu: r.vcpu,
                    start_ns: r.time_ns,
                    duration_ns: None,
                    flags: r.flags,
                    tail: r.kind == Kind::Tail,
                    children: Vec::new(),
                });
            }
            Kind::Ret => {
                let Some(o) = open.get_mut(&r.task) else {
                    orphans += 1;
                    continue;
                };
                let depth = usize::from(r.depth);
                if o.stack.len() <= depth {
                    continue; // its frame is not open (lost call record)
                }
                while o.stack.len() > depth + 1 {
                    let tail = o.stack.last().is_some_and(|n| n.tail);
                    close_top(o, tail.then_some(r.time_ns));
                }
                close_top(o, Some(r.time_ns));
            }
            Kind::Exit => {
                let Some(mut o) = open.remove(&r.task) else {
                    orphans += 1;
                    continue;
                };
                o.flow.end_ns = Some(r.time_ns);
                o.flow.result = Some(r.target as i64);
                finish(o, &mut done);
            }
        }
    }
    for (_, o) in open.drain() {
        finish(o, &mut done);
    }
    done.sort_by_key(|(order, _)| *order);
    Trace {
        flows: done.into_iter().map(|(_, f)| f).collect(),
        orphans,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A hand-made record sequence: an openat of task A with nested calls,
    /// a tail call, an interrupt-free leaf, and a read of task B
    /// interleaved (the other vCPU) that never returns to user mode.
    pub fn sample() -> Vec<Record> {
        let base = |kind, time_ns, depth, target, task| Record {
            time_ns,
            vcpu: if task == 0xa { 0 } else { 1 },
            kind,
            flags: 0,
            depth,
            nr: if task == 0xa { 257 } else { 0 },
            pc: 0xffff_ffff_8100_0000 + time_ns,
            target,
            sp: 0,
            task,
            pid: if task == 0xa { 100 } else { 200 },
            tgid: if task == 0xa { 100 } else { 200 },
        };
        let mut entry = Record::entry(0, 257, 0x4010, 0xa, 100, 100, b"cat");
        entry.time_ns = 1000;
        let mut entry_b = Record::entry(1, 0, 0x4020, 0xb, 200, 200, b"sh");
        entry_b.time_ns = 1500;
        let mut exit = base(Kind::Exit, 90_000, 0, 3, 0xa);
        exit.pc = 0xffff_ffff_8100_0f00;
        vec![
            entry,
            base(Kind::Call, 2000, 0, 0x1000, 0xa), // do_syscall_64
            entry_b,
            base(Kind::Call, 2100, 0, 0x1000, 0xb),
            base(Kind::Call, 3000, 1, 0x2000, 0xa), // __x64_sys_openat
            base(Kind::Call, 4000, 2, 0x3000, 0xa), // do_sys_openat2
            base(Kind::Call, 4500, 3, 0x4000, 0xa), // getname (leaf)
            base(Kind::Ret, 5000, 3, 0, 0xa),
            base(Kind::Call, 6000, 3, 0x5000, 0xa), // do_filp_open
            base(Kind::Tail, 6500, 4, 0x6000, 0xa), // path_openat, tail-called
            base(Kind::Call, 7000, 5, 0x7000, 0xa), // leaf
            base(Kind::Ret, 7250, 5, 0, 0xa),
            base(Kind::Ret, 30_000, 3, 0, 0xa), // closes path_openat and do_filp_open
            base(Kind::Ret, 31_000, 2, 0, 0xa),
            base(Kind::Ret, 32_000, 1, 0, 0xa),
            base(Kind::Call, 40_000, 1, 0x8000, 0xa), // never returns
            base(Kind::Ret, 80_000, 0, 0, 0xa),
            exit,
            base(Kind::Ret, 99_000, 7, 0, 0xc), // unknown task
        ]
    }

    #[test]
    fn nests_by_depth_and_separates_tasks() {
        let t = build(&sample());
        assert_eq!(t.flows.len(), 2);
        assert_eq!(t.orphans, 1);
        let a = &t.flows[0];
        assert_eq!((a.nr, a.pid, a.comm.as_str()), (257, 100, "cat"));
        assert_eq!(
            (a.end_ns, a.result, a.call_count),
            (Some(90_000), Some(3), 8)
        );
        assert_eq!(a.calls.len(), 1);
        let top = &a.calls[0];
        assert_eq!((top.target, top.duration_ns), (0x1000, Some(78_000)));
        let sys = &top.children[0];
        assert_eq!(sys.target, 0x2000);
        assert_eq!(top.children[1].target, 0x8000);
        assert_eq!(top.children[1].duration_ns, None, "no return seen");
        let openat2 = &sys.children[0];
        assert_eq!(openat2.children.len(), 2);
        assert_eq!(openat2.children[0].duration_ns, Some(500));
        let filp = &openat2.children[1];
        assert_eq!(filp.duration_ns, Some(24_000));
        let path = &filp.children[0];
        assert!(path.tail);
        assert_eq!(path.duration_ns, Some(23_500), "closed by the ret below it");
        assert_eq!(path.children[0].duration_ns, Some(250));
        let b = &t.flows[1];
        assert_eq!((b.nr, b.comm.as_str(), b.complete()), (0, "sh", false));
        assert_eq!(b.calls.len(), 1);
    }

    #[test]
    fn a_second_entry_of_a_task_ends_its_open_flow() {
        let mut recs = sample();
        recs.truncate(5);
        let mut again = Record::entry(0, 0, 0, 0xa, 100, 100, b"cat");
        again.time_ns = 9000;
        recs.push(again);
        let t = build(&recs);
        assert_eq!(t.flows.len(), 3);
        assert!(!t.flows[0].complete());
        assert_eq!(t.flows[2].nr, 0);
    }
}
