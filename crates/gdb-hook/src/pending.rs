//! Syscall entries waiting for their return, per task.
//!
//! The rule is the TCG plugin's (`crates/hook-plugin/src/pairing.rs`; that
//! crate is a cdylib, so the small key function is copied here rather than
//! shared): a thread is its kernel `task_struct` address when the per-cpu
//! `current_task` could be read at both ends (exact, and it survives
//! `execve`), otherwise the user-context key (page-table root, TLS base,
//! user stack pointer). This backend is single-threaded (one gdbstub
//! connection, all-stop), so a plain map is enough.

use std::collections::HashMap;

/// Most entries remembered at once (a guest cannot make us grow beyond it).
pub const MAX_PENDING: usize = 1 << 16;

/// The user-context key of the plugin's pairing rule: CR3 without PCID
/// bits, the PTI user bit and bit 63, mixed with `fs_base` and the user
/// `rsp`. Copied from `hook-plugin/src/pairing.rs::key` (same constants, so
/// both backends pair alike).
pub fn key(cr3: u64, fs_base: u64, rsp: u64) -> u64 {
    let root = cr3 & 0x000f_ffff_ffff_e000;
    let mut h = root
        ^ fs_base.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ rsp.rotate_left(47).wrapping_mul(0xd6e8_feb8_6659_fd93);
    h ^= h >> 31;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 29;
    match h {
        0 => 1,
        u64::MAX => 2,
        h => h,
    }
}

/// The key of a thread known by its `task_struct` (as the plugin's `task_key`).
pub fn task_key(task: u64) -> u64 {
    key(0, task, 0x5441_534b)
}

/// What a return needs from its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub seq: u64,
    pub nr: u64,
    pub args: [u64; 6],
    /// The entering thread's `task_struct` and pid (0 when not known).
    pub task: u64,
    pub tid: u32,
}

/// Pending entries by key.
#[derive(Debug, Default)]
pub struct Table {
    map: HashMap<u64, Pending>,
}

impl Table {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Remembers `p` for `key`, replacing an older entry of the same key.
    /// False when the table is full.
    pub fn insert(&mut self, key: u64, p: Pending) -> bool {
        if self.map.len() >= MAX_PENDING && !self.map.contains_key(&key) {
            return false;
        }
        self.map.insert(key, p);
        true
    }

    pub fn take(&mut self, key: u64) -> Option<Pending> {
        self.map.remove(&key)
    }

    pub fn remove(&mut self, key: u64) {
        self.map.remove(&key);
    }

    /// Drops the entries of threads that died inside their syscall (they
    /// never return): those whose `alive(task, tid)` is false. Entries
    /// without a known thread stay. Returns how many went.
    pub fn sweep(&mut self, alive: impl Fn(u64, u32) -> bool) -> usize {
        let before = self.map.len();
        self.map
            .retain(|_, p| p.task == 0 || p.tid == 0 || alive(p.task, p.tid));
        before - self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_the_plugin_rule() {
        // PTI user root (bit 12) and PCID bits map to the same task.
        assert_eq!(
            key(0x1234_4000 | 0x1000 | 0x801, 7, 9),
            key(0x1234_4000 | 3, 7, 9)
        );
        assert_ne!(key(0x1234_5000, 1, 2), key(0x1234_5000, 1, 3));
        assert_ne!(
            task_key(0xffff_8880_0100_0000),
            task_key(0xffff_8880_0100_2000)
        );
    }

    #[test]
    fn bounded() {
        let mut t = Table::default();
        let p = Pending {
            seq: 1,
            nr: 0,
            args: [0; 6],
            task: 0,
            tid: 0,
        };
        for k in 0..MAX_PENDING as u64 {
            assert!(t.insert(k, p));
        }
        assert!(!t.insert(u64::MAX, p));
        assert!(
            t.insert(5, Pending { seq: 9, ..p }),
            "replacing is always possible"
        );
        assert_eq!(t.take(5).map(|p| p.seq), Some(9));
        assert_eq!(t.take(5), None);
    }

    #[test]
    fn sweep_keeps_live_and_unknown_threads() {
        let mut t = Table::default();
        let p = |task, tid| Pending {
            seq: 1,
            nr: 0,
            args: [0; 6],
            task,
            tid,
        };
        t.insert(1, p(0xa000, 10));
        t.insert(2, p(0xb000, 11));
        t.insert(3, p(0, 0));
        assert_eq!(t.sweep(|task, tid| (task, tid) == (0xa000, 10)), 1);
        assert_eq!(t.len(), 2);
        assert!(t.take(2).is_none());
    }
}
