//! The managed set of one VM as a pure function of its delta events: the
//! engine applies each event it emits here, and a restart (or `--at T`)
//! replays the stored events through the same code, so the live state and
//! the rebuilt one cannot disagree.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::model::{default_label, Change, DeltaEvent, Edge, ObjectInfo, ObjectKey};

/// A registered path (`track add`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub path: String,
    /// Wall-clock ns of the registration.
    pub since_ns: i64,
    /// The managed file the path names now (`None` until a record shows a
    /// file identity with this path, or after it was unlinked or moved away).
    pub file: Option<ObjectKey>,
}

/// A managed object as the current state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedObject {
    pub object: ObjectKey,
    pub info: ObjectInfo,
    pub label: String,
    /// Wall-clock ns it became managed.
    pub since_ns: i64,
    pub edge: Edge,
    /// Id of the event that added it.
    pub event_id: u64,
}

#[derive(Debug, Default)]
pub(crate) struct ManagedSet {
    objects: HashMap<ObjectKey, ManagedObject>,
    /// Current names of managed files.
    names: HashMap<String, ObjectKey>,
    registrations: BTreeMap<String, Registration>,
}

impl ManagedSet {
    pub fn apply(&mut self, ev: &DeltaEvent) {
        match &ev.change {
            Change::Track { path } => {
                let file = self.names.get(path).copied();
                self.registrations
                    .entry(path.clone())
                    .or_insert_with(|| Registration {
                        path: path.clone(),
                        since_ns: ev.at_ns,
                        file,
                    });
            }
            Change::Untrack { path } => {
                self.registrations.remove(path);
            }
            Change::Added { object, info, edge } => {
                if let ObjectInfo::File { names } = info {
                    for n in names {
                        self.name(n, *object);
                    }
                }
                self.objects.insert(
                    *object,
                    ManagedObject {
                        object: *object,
                        info: info.clone(),
                        label: info.label(object),
                        since_ns: ev.at_ns,
                        edge: edge.clone(),
                        event_id: ev.id,
                    },
                );
            }
            Change::Removed { object, .. } => {
                if let Some(o) = self.objects.remove(object) {
                    if let ObjectInfo::File { names } = &o.info {
                        for n in names {
                            self.unname(n, *object);
                        }
                    }
                }
            }
            Change::Renamed {
                object, from, to, ..
            } => {
                let Some(o) = self.objects.get_mut(object) else {
                    return;
                };
                let ObjectInfo::File { names } = &mut o.info else {
                    return;
                };
                match (from, to) {
                    (Some(a), Some(b)) => match names.iter().position(|n| n == a) {
                        Some(i) => names[i] = b.clone(),
                        None => names.insert(0, b.clone()),
                    },
                    (None, Some(b)) => {
                        if !names.contains(b) {
                            names.push(b.clone());
                        }
                    }
                    (Some(a), None) => names.retain(|n| n != a),
                    (None, None) => {}
                }
                o.label = o.info.label(object);
                if let Some(a) = from {
                    self.unname(a, *object);
                }
                if let Some(b) = to {
                    self.name(b, *object);
                }
            }
            Change::Exec {
                tgid, comm, exe, ..
            } => {
                let key = ObjectKey::Process { tgid: *tgid };
                if let Some(o) = self.objects.get_mut(&key) {
                    o.info = ObjectInfo::Process {
                        comm: comm.clone(),
                        exe: exe.clone(),
                    };
                    o.label = o.info.label(&key);
                }
            }
            Change::Send { .. } | Change::Overflow { .. } => {}
        }
    }

    fn name(&mut self, name: &str, key: ObjectKey) {
        self.names.insert(name.to_string(), key);
        if let Some(r) = self.registrations.get_mut(name) {
            r.file = Some(key);
        }
    }

    fn unname(&mut self, name: &str, key: ObjectKey) {
        if self.names.get(name) == Some(&key) {
            self.names.remove(name);
            if let Some(r) = self.registrations.get_mut(name) {
                r.file = None;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.objects.contains_key(key)
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&ManagedObject> {
        self.objects.get(key)
    }

    pub fn objects(&self) -> impl Iterator<Item = &ManagedObject> {
        self.objects.values()
    }

    pub fn label(&self, key: &ObjectKey) -> String {
        self.objects
            .get(key)
            .map_or_else(|| default_label(key), |o| o.label.clone())
    }

    /// The managed file currently named `path`.
    pub fn by_name(&self, path: &str) -> Option<ObjectKey> {
        self.names.get(path).copied()
    }

    /// Names of managed files under directory `dir` (for a directory rename).
    pub fn names_under(&self, dir: &str) -> Vec<(String, ObjectKey)> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let mut v: Vec<_> = self
            .names
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .map(|(n, k)| (n.clone(), *k))
            .collect();
        v.sort();
        v
    }

    pub fn file_names(&self, key: &ObjectKey) -> &[String] {
        match self.objects.get(key).map(|o| &o.info) {
            Some(ObjectInfo::File { names }) => names,
            _ => &[],
        }
    }

    pub fn is_registered(&self, path: &str) -> bool {
        self.registrations.contains_key(path)
    }

    pub fn registrations(&self) -> impl Iterator<Item = &Registration> {
        self.registrations.values()
    }

    pub fn registration_count(&self) -> usize {
        self.registrations.len()
    }
}
