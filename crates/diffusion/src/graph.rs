//! The bulk view: a VM's diffusion graph as it stood at a time, rebuilt by
//! replaying the stored delta events up to it. Objects that left before
//! that time stay in the graph, marked with when and why.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::model::{Change, DeltaEvent, Edge, ObjectInfo, ObjectKey, ProcRef, Reason};
use crate::net::NetAddr;
use crate::state::{ManagedSet, Registration};
use crate::time::format_time;

/// When and why a node left management.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Left {
    pub at_ns: i64,
    pub reason: Reason,
}

/// One managed object (one stay under management: a pid reused later is another node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Id of the event that added it: unique in the store.
    pub id: u64,
    pub object: ObjectKey,
    /// As last known before the graph's time (renames and execve applied).
    pub info: ObjectInfo,
    pub label: String,
    pub since_ns: i64,
    pub edge: Edge,
    /// The node (in this VM) the edge comes from, as it was when this one was added.
    pub from_node: Option<u64>,
    pub left: Option<Left>,
}

/// Content sent out of the VM by a managed process (a leak, or a cross-VM flow).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendEdge {
    pub id: u64,
    pub at_ns: i64,
    pub by: ProcRef,
    /// The sending process's node.
    pub from_node: Option<u64>,
    pub dst: NetAddr,
    pub to_vm: Option<String>,
    pub bytes: u64,
    pub calls: u64,
}

/// A VM's diffusion graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Graph {
    pub vm: String,
    /// The time it shows (`None`: now).
    pub at_ns: Option<i64>,
    pub registrations: Vec<Registration>,
    /// In the order they became managed.
    pub nodes: Vec<Node>,
    pub sends: Vec<SendEdge>,
}

#[derive(Debug, Default)]
pub(crate) struct GraphBuilder {
    set: ManagedSet,
    nodes: Vec<Node>,
    sends: Vec<SendEdge>,
    live: HashMap<ObjectKey, usize>,
    /// Time of the latest event applied.
    last_at_ns: i64,
}

impl GraphBuilder {
    pub fn apply(&mut self, ev: &DeltaEvent) {
        self.last_at_ns = self.last_at_ns.max(ev.at_ns);
        self.set.apply(ev);
        match &ev.change {
            Change::Added { object, info, edge } => {
                let from_node = edge
                    .from
                    .as_ref()
                    .filter(|s| s.vm.is_none())
                    .and_then(|s| self.live.get(&s.object))
                    .map(|&i| self.nodes[i].id);
                self.live.insert(*object, self.nodes.len());
                self.nodes.push(Node {
                    id: ev.id,
                    object: *object,
                    info: info.clone(),
                    label: info.label(object),
                    since_ns: ev.at_ns,
                    edge: edge.clone(),
                    from_node,
                    left: None,
                });
            }
            Change::Removed { object, reason, .. } => {
                if let Some(i) = self.live.remove(object) {
                    self.nodes[i].left = Some(Left {
                        at_ns: ev.at_ns,
                        reason: *reason,
                    });
                }
            }
            Change::Renamed { object, .. } => self.refresh(object),
            Change::Exec { tgid, .. } => self.refresh(&ObjectKey::Process { tgid: *tgid }),
            Change::Send {
                by,
                dst,
                to_vm,
                bytes,
                calls,
                ..
            } => {
                let from_node = self
                    .live
                    .get(&ObjectKey::Process { tgid: by.tgid })
                    .map(|&i| self.nodes[i].id);
                self.sends.push(SendEdge {
                    id: ev.id,
                    at_ns: ev.at_ns,
                    by: by.clone(),
                    from_node,
                    dst: dst.clone(),
                    to_vm: to_vm.clone(),
                    bytes: *bytes,
                    calls: *calls,
                });
            }
            Change::Track { .. } | Change::Untrack { .. } | Change::Overflow { .. } => {}
        }
    }

    fn refresh(&mut self, key: &ObjectKey) {
        if let (Some(&i), Some(o)) = (self.live.get(key), self.set.get(key)) {
            self.nodes[i].info = o.info.clone();
            self.nodes[i].label = o.label.clone();
        }
    }

    pub fn last_at_ns(&self) -> i64 {
        self.last_at_ns
    }

    /// The graph so far, leaving the builder as it is.
    pub fn snapshot(&self, vm: &str, at_ns: Option<i64>) -> Graph {
        Graph {
            vm: vm.to_string(),
            at_ns,
            registrations: self.set.registrations().cloned().collect(),
            nodes: self.nodes.clone(),
            sends: self.sends.clone(),
        }
    }

    pub fn finish(self, vm: &str, at_ns: Option<i64>) -> Graph {
        Graph {
            vm: vm.to_string(),
            at_ns,
            registrations: self.set.registrations().cloned().collect(),
            nodes: self.nodes,
            sends: self.sends,
        }
    }
}

impl Graph {
    /// Nodes still managed at the graph's time.
    pub fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.left.is_none())
    }

    /// One line per node and per send, in history order.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let when = self
            .at_ns
            .map_or_else(|| "now".to_string(), |t| format!("at {}", format_time(t)));
        let live = self.live().count();
        let _ = writeln!(
            out,
            "diffusion graph of {} {when}: {live} managed, {} left, {} sends",
            self.vm,
            self.nodes.len() - live,
            self.sends.len()
        );
        for r in &self.registrations {
            let _ = writeln!(
                out,
                "registered {} (since {})",
                r.path,
                format_time(r.since_ns)
            );
        }
        out.reserve(self.nodes.len() * 96);
        // Nodes and sends are each in id order (the order they happened):
        // merge them into one timeline.
        let (mut ni, mut si) = (0, 0);
        while ni < self.nodes.len() || si < self.sends.len() {
            let node_first = match (self.nodes.get(ni), self.sends.get(si)) {
                (Some(n), Some(s)) => n.id <= s.id,
                (Some(_), None) => true,
                _ => false,
            };
            if node_first {
                let n = &self.nodes[ni];
                ni += 1;
                let _ = write!(
                    out,
                    "{} +{} {}  {}",
                    format_time(n.since_ns),
                    n.object.kind(),
                    n.info.long_label(&n.object),
                    n.edge
                );
                if let Some(l) = &n.left {
                    let _ = write!(out, "  [left {} ({})]", format_time(l.at_ns), l.reason);
                }
            } else {
                let s = &self.sends[si];
                si += 1;
                let change = Change::Send {
                    by: s.by.clone(),
                    socket: None,
                    dst: s.dst.clone(),
                    to_vm: s.to_vm.clone(),
                    bytes: s.bytes,
                    calls: s.calls,
                };
                let _ = write!(out, "{} {change}", format_time(s.at_ns));
            }
            out.push('\n');
        }
        out
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
    }

    /// Graphviz: content flows along the arrows; objects that left are dashed
    /// and grey; sources in other VMs dotted; leaks red, cross-VM sends blue.
    pub fn dot(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "digraph {} {{",
            quote(&format!("diffusion {}", self.vm))
        );
        out.push_str("  rankdir=LR;\n  node [fontname=\"monospace\"];\n");
        for n in &self.nodes {
            let shape = match n.object {
                ObjectKey::File { .. } => "note",
                ObjectKey::Process { .. } => "box",
                ObjectKey::Pipe { .. } => "cds",
                ObjectKey::Socket { .. } => "ellipse",
            };
            let mut label = format!(
                "{}\n{}\nsince {}",
                n.object.kind(),
                n.info.long_label(&n.object),
                format_time(n.since_ns)
            );
            let mut style = String::new();
            if let Some(l) = &n.left {
                let _ = write!(label, "\nleft {} ({})", format_time(l.at_ns), l.reason);
                style = ", style=dashed, color=gray50, fontcolor=gray50".to_string();
            }
            let _ = writeln!(
                out,
                "  n{} [shape={shape}, label={}{style}];",
                n.id,
                quote(&label)
            );
        }
        // Objects outside this VM's graph (other VMs' processes, addresses
        // sent to, sources that left before): declared once, after the nodes.
        let mut externals = Externals::default();
        let mut edges = String::new();
        for n in &self.nodes {
            let Some(src) = &n.edge.from else { continue };
            let edge_label = quote(&n.edge.syscall);
            match (&src.vm, n.from_node) {
                (Some(vm), _) => {
                    let x =
                        externals.id(format!("{vm}: {}", src.label), ", shape=box, style=dotted");
                    let _ = writeln!(
                        edges,
                        "  {x} -> n{} [label={edge_label}, style=dotted, color=blue];",
                        n.id
                    );
                }
                (None, Some(from)) => {
                    let _ = writeln!(edges, "  n{from} -> n{} [label={edge_label}];", n.id);
                }
                (None, None) => {
                    let x = externals.id(src.label.clone(), ", shape=plaintext");
                    let _ = writeln!(edges, "  {x} -> n{} [label={edge_label}];", n.id);
                }
            }
        }
        for s in &self.sends {
            let (label, color, what) = match &s.to_vm {
                None => (s.dst.to_string(), "red", "leak"),
                Some(vm) => (format!("{vm}: {}", s.dst), "blue", "send"),
            };
            let x = externals.id(label, &format!(", shape=diamond, color={color}"));
            let from = match s.from_node {
                Some(n) => format!("n{n}"),
                None => externals.id(s.by.to_string(), ", shape=plaintext"),
            };
            let _ = writeln!(
                edges,
                "  {from} -> {x} [label={}, color={color}];",
                quote(&format!("{what} {} bytes", s.bytes))
            );
        }
        for (label, (id, attrs)) in &externals.0 {
            let _ = writeln!(out, "  {id} [label={}{attrs}];", quote(label));
        }
        out.push_str(&edges);
        out.push_str("}\n");
        out
    }
}

/// External nodes by label: (`x<n>` id, attributes).
#[derive(Default)]
struct Externals(BTreeMap<String, (String, String)>);

impl Externals {
    fn id(&mut self, label: String, attrs: &str) -> String {
        let next = format!("x{}", self.0.len());
        self.0
            .entry(label)
            .or_insert_with(|| (next, attrs.to_string()))
            .0
            .clone()
    }
}

fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c if c.is_control() => q.push(' '),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}
