//! A map with a hard size limit that forgets its oldest insertions first:
//! the engine's helper tables (socket addresses, working directories, ...)
//! are fed by the guest, which must not be able to grow host memory.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

#[derive(Debug)]
pub(crate) struct BoundedMap<K, V> {
    map: HashMap<K, (u64, V)>,
    order: BTreeMap<u64, K>,
    next: u64,
    cap: usize,
    /// Entries forgotten because the map was full.
    pub evicted: u64,
}

impl<K, V> Default for BoundedMap<K, V> {
    fn default() -> Self {
        BoundedMap {
            map: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
            cap: 1024,
            evicted: 0,
        }
    }
}

impl<K: Hash + Eq + Clone, V> BoundedMap<K, V> {
    pub fn with_cap(cap: usize) -> Self {
        BoundedMap {
            cap: cap.max(1),
            ..BoundedMap::default()
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.map.get_mut(k).map(|(_, v)| v)
    }

    /// Inserts or replaces; a new key past the limit evicts the oldest.
    pub fn insert(&mut self, k: K, v: V) {
        if let Some(slot) = self.map.get_mut(&k) {
            slot.1 = v;
            return;
        }
        while self.map.len() >= self.cap {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&old);
            self.evicted += 1;
        }
        let n = self.next;
        self.next += 1;
        self.order.insert(n, k.clone());
        self.map.insert(k, (n, v));
    }

    /// The value for `k`, inserted with `make` if missing (always `Some`:
    /// the limit is at least 1; an `Option` rather than a panic path).
    pub fn entry(&mut self, k: K, make: impl FnOnce() -> V) -> Option<&mut V> {
        if !self.map.contains_key(&k) {
            self.insert(k.clone(), make());
        }
        self.map.get_mut(&k).map(|(_, v)| v)
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        let (n, v) = self.map.remove(k)?;
        self.order.remove(&n);
        Some(v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(k, (_, v))| (k, v))
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        let order = &mut self.order;
        self.map.retain(|k, (n, v)| {
            let kept = keep(k, v);
            if !kept {
                order.remove(n);
            }
            kept
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_past_the_limit() {
        let mut m = BoundedMap::with_cap(2);
        m.insert(1, "a");
        m.insert(2, "b");
        m.insert(1, "A"); // replace: no eviction, order kept
        m.insert(3, "c");
        assert_eq!(
            (m.get(&1), m.get(&2), m.get(&3)),
            (None, Some(&"b"), Some(&"c"))
        );
        assert_eq!(m.evicted, 1);
        *m.entry(4, || "d").unwrap() = "D";
        assert_eq!(m.get(&4), Some(&"D"));
        assert_eq!(m.len(), 2);
        m.retain(|k, _| *k == 4);
        assert_eq!(m.len(), 1);
        m.insert(5, "e");
        assert_eq!(m.len(), 2);
        assert_eq!(m.remove(&4), Some("D"));
    }
}
