//! What the engine reports: managed objects, the edge that made each one
//! managed, and the delta events (one per change, never a re-dump).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::net::NetAddr;
use crate::time::format_time;

/// Identity of a managed object inside one VM.
///
/// Pipes and sockets are keyed by inode alone: each lives on the kernel's
/// single pipefs / sockfs superblock, and introspection (which the daemon
/// may feed in) reports them by inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ObjectKey {
    /// A regular file or FIFO: device (kernel encoding) and inode.
    File {
        dev: u32,
        ino: u64,
    },
    /// A process (thread group): the unit of tracking.
    Process {
        tgid: u32,
    },
    Pipe {
        ino: u64,
    },
    Socket {
        ino: u64,
    },
}

impl ObjectKey {
    /// `file`, `process`, `pipe`, `socket`.
    pub fn kind(&self) -> &'static str {
        match self {
            ObjectKey::File { .. } => "file",
            ObjectKey::Process { .. } => "process",
            ObjectKey::Pipe { .. } => "pipe",
            ObjectKey::Socket { .. } => "socket",
        }
    }

    pub fn is_process(&self) -> bool {
        matches!(self, ObjectKey::Process { .. })
    }
}

/// What is known of a managed object besides its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ObjectInfo {
    /// `names[0]` is the name it was last seen under; hard links add names.
    File {
        names: Vec<String>,
    },
    Process {
        comm: String,
        exe: Option<String>,
    },
    Pipe {
        name: String,
    },
    Socket {
        name: String,
        local: Option<NetAddr>,
        peer: Option<NetAddr>,
    },
}

impl ObjectInfo {
    /// How users see the object: `/root/x`, `774 cp`, `pipe:[9933]`, `socket:[45]`.
    pub fn label(&self, key: &ObjectKey) -> String {
        match (self, key) {
            (ObjectInfo::File { names }, ObjectKey::File { dev, ino }) => match names.first() {
                Some(n) => n.clone(),
                None => format!("inode {dev}:{ino}"),
            },
            (ObjectInfo::Process { comm, .. }, ObjectKey::Process { tgid }) => {
                format!("{tgid} {comm}")
            }
            (ObjectInfo::Pipe { name }, _) | (ObjectInfo::Socket { name, .. }, _) => name.clone(),
            (_, key) => default_label(key),
        }
    }

    /// The label plus what helps reading a socket: `socket:[45] -> 10.0.2.2:8080`.
    pub fn long_label(&self, key: &ObjectKey) -> String {
        match self {
            ObjectInfo::Socket {
                peer: Some(peer), ..
            } => format!("{} -> {peer}", self.label(key)),
            _ => self.label(key),
        }
    }
}

/// The label of an object nothing more is known of.
pub fn default_label(key: &ObjectKey) -> String {
    match key {
        ObjectKey::File { dev, ino } => format!("inode {dev}:{ino}"),
        ObjectKey::Process { tgid } => format!("{tgid} ?"),
        ObjectKey::Pipe { ino } => format!("pipe:[{ino}]"),
        ObjectKey::Socket { ino } => format!("socket:[{ino}]"),
    }
}

/// A process as events name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRef {
    pub tgid: u32,
    pub comm: String,
}

impl fmt::Display for ProcRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.tgid, self.comm)
    }
}

/// Where content came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Set when the source is in another watched VM (a cross-VM edge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    pub object: ObjectKey,
    pub label: String,
}

/// Why an object became managed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    /// The syscall (`read`, `write`, `fork`, ...), `track` for a
    /// registration, `peer` for the other end of a socket, `mmap`.
    pub syscall: String,
    /// The object the content came from: for a process that read, the file
    /// (pipe, socket); for an object written, the writing process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Source>,
    /// Ring position of the record that showed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl fmt::Display for Edge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.from {
            None => write!(f, "via {}", self.syscall),
            Some(src) => {
                let vm = src
                    .vm
                    .as_deref()
                    .map(|v| format!("{v}:"))
                    .unwrap_or_default();
                if src.object.is_process() {
                    write!(f, "via {} by {vm}{}", self.syscall, src.label)
                } else {
                    write!(f, "via {}({vm}{})", self.syscall, src.label)
                }
            }
        }
    }
}

/// Why an object left management.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// `exit_group`.
    Exit,
    /// Introspection found the process gone (killed by a signal: no `exit_group`).
    Gone,
    /// Its last name was unlinked.
    Unlink,
    /// Its last name now names another file (rename over it, or recreated).
    Replaced,
    /// `track rm` of its path.
    Untracked,
    /// No process holds the pipe or socket any more (introspection).
    Closed,
    VmStopped,
    /// The VM came back with a new SMBIOS UUID: its processes, pipes and sockets are gone.
    VmRestarted,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Exit => "exit",
            Reason::Gone => "gone",
            Reason::Unlink => "unlink",
            Reason::Replaced => "replaced",
            Reason::Untracked => "untracked",
            Reason::Closed => "closed",
            Reason::VmStopped => "vm stopped",
            Reason::VmRestarted => "vm restarted",
        })
    }
}

/// One change of a VM's diffusion state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// A path was registered (`track add`).
    Track { path: String },
    /// A registration was removed (`track rm`).
    Untrack { path: String },
    /// A newly managed object.
    Added {
        object: ObjectKey,
        info: ObjectInfo,
        edge: Edge,
    },
    /// An object left management.
    Removed {
        object: ObjectKey,
        label: String,
        reason: Reason,
    },
    /// A managed file's name changed: `from -> to` (rename, or a new name
    /// seen in its file identity), `None -> to` (a hard link), `from -> None`
    /// (one of several names unlinked or taken by another file).
    Renamed {
        object: ObjectKey,
        from: Option<String>,
        to: Option<String>,
        syscall: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<ProcRef>,
    },
    /// A managed process called `execve`: it stays managed, under its new name.
    Exec {
        tgid: u32,
        from: String,
        comm: String,
        exe: Option<String>,
    },
    /// A managed process sent content through a socket to `dst`: a leak when
    /// `to_vm` is `None` (outside every watched VM), else a cross-VM flow.
    /// Repeated sends to one destination are summed (`calls` > 1).
    Send {
        by: ProcRef,
        socket: Option<ObjectKey>,
        dst: NetAddr,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_vm: Option<String>,
        bytes: u64,
        calls: u64,
    },
    /// A limit was hit: something was not tracked (see [`crate::Stats`]).
    Overflow { what: String, limit: usize },
}

/// A change with its place in the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaEvent {
    /// Position in the store's append-only log (0: not stored, see `Health`).
    pub id: u64,
    pub vm: String,
    /// The VM's SMBIOS UUID when the change happened.
    pub uuid: String,
    /// Wall-clock UTC, ns since the epoch.
    pub at_ns: i64,
    #[serde(flatten)]
    pub change: Change,
}

impl DeltaEvent {
    /// `2026-11-21T10:00:01.123Z web1 +process 774 cp  via read(/root/secret.txt)`.
    pub fn text(&self) -> String {
        format!("{} {} {}", format_time(self.at_ns), self.vm, self.change)
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Track { path } => write!(f, "+track {path}"),
            Change::Untrack { path } => write!(f, "-track {path}"),
            Change::Added { object, info, edge } => {
                write!(f, "+{} {}  {edge}", object.kind(), info.long_label(object))
            }
            Change::Removed {
                object,
                label,
                reason,
            } => write!(f, "-{} {label} ({reason})", object.kind()),
            Change::Renamed {
                object,
                from,
                to,
                syscall,
                by,
            } => {
                let by = by.as_ref().map(|p| format!(" by {p}")).unwrap_or_default();
                let kind = object.kind();
                match (from, to) {
                    (Some(a), Some(b)) => write!(f, "~{kind} {a} -> {b} ({syscall}{by})"),
                    (None, Some(b)) => write!(f, "~{kind} +name {b} ({syscall}{by})"),
                    (Some(a), None) => write!(f, "~{kind} -name {a} ({syscall}{by})"),
                    (None, None) => write!(f, "~{kind} ({syscall}{by})"),
                }
            }
            Change::Exec {
                tgid,
                from,
                comm,
                exe,
            } => {
                let exe = exe.as_deref().map(|e| format!(" {e}")).unwrap_or_default();
                write!(f, "~process {tgid} {from} -> {comm} (execve{exe})")
            }
            Change::Send {
                by,
                dst,
                to_vm,
                bytes,
                calls,
                ..
            } => {
                let amount = match (*calls, *bytes) {
                    (1, b) => format!("{b} bytes"),
                    (c, 0) => format!("{c} calls"),
                    (c, b) => format!("{b} bytes in {c} calls"),
                };
                match to_vm {
                    None => write!(f, "!leak {by} -> {dst} ({amount})"),
                    Some(vm) => write!(f, ">send {by} -> {vm} {dst} ({amount})"),
                }
            }
            Change::Overflow { what, limit } => {
                write!(
                    f,
                    "!overflow {what}: limit {limit} reached, further ones are not tracked"
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_the_issue_says() {
        let ev = DeltaEvent {
            id: 1,
            vm: "web1".into(),
            uuid: "u".into(),
            at_ns: crate::time::parse_time("2026-11-21T10:00:01.123Z").unwrap(),
            change: Change::Added {
                object: ObjectKey::Process { tgid: 774 },
                info: ObjectInfo::Process {
                    comm: "cp".into(),
                    exe: None,
                },
                edge: Edge {
                    syscall: "read".into(),
                    from: Some(Source {
                        vm: None,
                        object: ObjectKey::File { dev: 1, ino: 2 },
                        label: "/root/secret.txt".into(),
                    }),
                    seq: Some(9),
                },
            },
        };
        assert_eq!(
            ev.text(),
            "2026-11-21T10:00:01.123Z web1 +process 774 cp  via read(/root/secret.txt)"
        );
        let json = serde_json::to_string(&ev).unwrap();
        assert!(json.contains(r#""kind":"added""#), "{json}");
        let back: DeltaEvent = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ev);
        let leak = Change::Send {
            by: ProcRef {
                tgid: 774,
                comm: "cp".into(),
            },
            socket: None,
            dst: NetAddr::Inet("10.0.2.2:8080".parse().unwrap()),
            to_vm: None,
            bytes: 120,
            calls: 1,
        };
        assert_eq!(
            leak.to_string(),
            "!leak 774 cp -> 10.0.2.2:8080 (120 bytes)"
        );
        let removed = Change::Removed {
            object: ObjectKey::File { dev: 1, ino: 3 },
            label: "/root/copy02-secret.txt".into(),
            reason: Reason::Unlink,
        };
        assert_eq!(
            removed.to_string(),
            "-file /root/copy02-secret.txt (unlink)"
        );
    }
}
