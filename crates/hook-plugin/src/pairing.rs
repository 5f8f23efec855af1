//! Pending syscall entries, keyed by task, so that a return is paired with its
//! entry even when other tasks ran on the vCPU meanwhile (blocking calls).
//!
//! # The pairing rule
//! A task is identified, at both ends of a syscall, by what the CPU shows in
//! user context: the page-table root (CR3 with the PCID bits, the PTI user bit
//! 12 and bit 63 masked off, so the user and kernel copies under PTI agree),
//! `fs_base` (the thread's TLS pointer, which the kernel restores for the task
//! before returning) and the user stack pointer (`rsp` at `syscall` and at
//! `sysretq`; at `iretq` the user `rsp` saved in the iret frame). Between a
//! task's `syscall` and its return it does not run in user mode, so the first
//! return-to-user with the same key is that syscall's return.
//!
//! The stack pointer separates a `vfork`/`posix_spawn` child from its
//! suspended parent (same mm, same TLS, but the child runs on another stack or
//! deeper in the same one).
//!
//! Limits:
//! - A successful `execve` returns in a new address space with another stack
//!   and `fs_base` 0: its return is not reported and its entry stays pending
//!   (stale) until a task with the same root page, TLS pointer and stack
//!   pointer makes a syscall. `rt_sigreturn` returns to the interrupted
//!   context's key, so an interrupted call (e.g. `read` = -EINTR after a
//!   handler ran) is reported with the result the task finally sees.
//! - A return with a key that collides with a stale entry (same root page,
//!   TLS and stack pointer, i.e. in practice the same task after a lost
//!   return) is paired with that entry.
//! - `exit`/`exit_group` never return; they are not remembered.
//! - `arch_prctl(ARCH_SET_FS, addr)` changes `fs_base`: its entry is keyed by
//!   the new value (`addr`), which the kernel loads before returning.
//! - The table is fixed-size (4096 buckets, 16-bucket probe window); an entry
//!   that finds no room is counted (`unpaired` in the ring header).
//! - When the plugin can read the guest kernel (`ram=`/`vmlinux=` given), the
//!   key is the calling thread's `task_struct` address instead ([`task_key`]),
//!   from the per-cpu `current_task` at both ends: exact, and it survives
//!   `execve`. The register key above is the fallback.

use std::sync::atomic::{AtomicU64, Ordering};

const BUCKETS: usize = 4096;
const PROBE: usize = 16;
const EMPTY: u64 = 0;
const BUSY: u64 = u64::MAX;

/// The task identity for pairing (never EMPTY or BUSY).
pub fn key(cr3: u64, fs_base: u64, rsp: u64) -> u64 {
    let root = cr3 & 0x000f_ffff_ffff_e000;
    let mut h = root
        ^ fs_base.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ rsp.rotate_left(47).wrapping_mul(0xd6e8_feb8_6659_fd93);
    h ^= h >> 31;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 29;
    match h {
        EMPTY => 1,
        BUSY => 2,
        h => h,
    }
}

/// The key of a thread known by its kernel `task_struct` address.
pub fn task_key(task: u64) -> u64 {
    key(0, task, 0x5441_534b) // "TASK": never a user stack pointer value in practice
}

/// What the return needs from its entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub seq: u64,
    pub nr: u64,
    pub args: [u64; 6],
    /// The entering thread's `task_struct` and pid (0 when unknown): a
    /// thread that dies in a syscall never returns, and its `task_struct`
    /// address is reused by a later task, whose returns must not be paired
    /// with the dead thread's entry.
    pub task: u64,
    pub tid: u32,
}

struct Bucket {
    key: AtomicU64,
    seq: AtomicU64,
    nr: AtomicU64,
    args: [AtomicU64; 6],
    task: AtomicU64,
    tid: AtomicU64,
}

/// Lock-free table of pending entries, shared by all vCPU threads. One task
/// runs on one vCPU at a time, so operations on one key never race each
/// other; different keys claim buckets by CAS.
pub struct Table {
    buckets: Box<[Bucket]>,
    live: AtomicU64,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            buckets: (0..BUCKETS)
                .map(|_| Bucket {
                    key: AtomicU64::new(EMPTY),
                    seq: AtomicU64::new(0),
                    nr: AtomicU64::new(0),
                    args: Default::default(),
                    task: AtomicU64::new(0),
                    tid: AtomicU64::new(0),
                })
                .collect(),
            live: AtomicU64::new(0),
        }
    }
}

impl Table {
    fn window(&self, key: u64) -> impl Iterator<Item = &Bucket> {
        let start = (key as usize) & (BUCKETS - 1);
        (0..PROBE).map(move |i| &self.buckets[(start + i) & (BUCKETS - 1)])
    }

    /// No entry pending anywhere: returns need no register reads at all.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.live.load(Ordering::Acquire) == 0
    }

    /// Remembers that the task `key` entered a syscall (`p`), replacing an
    /// older entry of the same key. False if there was no room.
    pub fn insert(&self, key: u64, p: &Pending) -> bool {
        let fill = |b: &Bucket| {
            b.seq.store(p.seq, Ordering::Relaxed);
            b.nr.store(p.nr, Ordering::Relaxed);
            for (dst, v) in b.args.iter().zip(p.args) {
                dst.store(v, Ordering::Relaxed);
            }
            b.task.store(p.task, Ordering::Relaxed);
            b.tid.store(u64::from(p.tid), Ordering::Relaxed);
        };
        for b in self.window(key) {
            if b.key.load(Ordering::Acquire) == key {
                fill(b);
                b.key.store(key, Ordering::Release);
                return true;
            }
        }
        for b in self.window(key) {
            if b.key
                .compare_exchange(EMPTY, BUSY, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                fill(b);
                b.key.store(key, Ordering::Release);
                self.live.fetch_add(1, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Removes the entries of threads that `alive(task, tid)` says are gone
    /// (they died inside the syscall); returns how many. Bounded: one pass
    /// over the table.
    pub fn sweep(&self, alive: impl Fn(u64, u32) -> bool) -> usize {
        let mut removed = 0;
        for b in self.buckets.iter() {
            let key = b.key.load(Ordering::Acquire);
            if key == EMPTY || key == BUSY {
                continue;
            }
            let task = b.task.load(Ordering::Relaxed);
            let tid = b.tid.load(Ordering::Relaxed) as u32;
            if task == 0 || alive(task, tid) {
                continue;
            }
            // Only if still the same entry: its own thread is dead, so nobody
            // else updates this key, except a new task at the same address,
            // which would have replaced task/tid (then the CAS still guards the key).
            if b.key
                .compare_exchange(key, EMPTY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.live.fetch_sub(1, Ordering::Release);
                removed += 1;
            }
        }
        removed
    }

    /// Forgets `key`'s entry, if any.
    pub fn remove(&self, key: u64) {
        let _ = self.take(key);
    }

    /// The pending entry of task `key`, removed.
    pub fn take(&self, key: u64) -> Option<Pending> {
        for b in self.window(key) {
            if b.key.load(Ordering::Acquire) == key {
                let found = Pending {
                    seq: b.seq.load(Ordering::Relaxed),
                    nr: b.nr.load(Ordering::Relaxed),
                    args: std::array::from_fn(|i| b.args[i].load(Ordering::Relaxed)),
                    task: b.task.load(Ordering::Relaxed),
                    tid: b.tid.load(Ordering::Relaxed) as u32,
                };
                b.key.store(EMPTY, Ordering::Release);
                self.live.fetch_sub(1, Ordering::Release);
                return Some(found);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn p(seq: u64, nr: u64) -> Pending {
        Pending {
            seq,
            nr,
            args: [seq, nr, 3, 4, 5, 6],
            task: 0,
            tid: 0,
        }
    }

    #[test]
    fn sweep_removes_entries_of_dead_threads() {
        let t = Table::default();
        let live = Pending {
            task: 0xa000,
            tid: 10,
            ..p(1, 0)
        };
        let dead = Pending {
            task: 0xb000,
            tid: 11,
            ..p(2, 0)
        };
        t.insert(task_key(0xa000), &live);
        t.insert(task_key(0xb000), &dead);
        t.insert(key(1, 2, 3), &p(3, 0)); // no task: never swept
        assert_eq!(t.sweep(|task, tid| (task, tid) == (0xa000, 10)), 1);
        assert_eq!(t.take(task_key(0xb000)), None);
        assert_eq!(t.take(task_key(0xa000)).map(|x| x.tid), Some(10));
        assert!(t.take(key(1, 2, 3)).is_some());
        assert!(t.is_empty());
    }

    fn sn(x: Option<Pending>) -> Option<(u64, u64)> {
        x.map(|p| {
            assert_eq!(p.args[..2], [p.seq, p.nr]);
            (p.seq, p.nr)
        })
    }

    #[test]
    fn pairs_per_task_across_interleavings() {
        let t = Table::default();
        assert!(t.is_empty());
        let a = key(0x1234_5000, 0x7f00_0000_1000, 0x7ffc_0000);
        let b = key(0x1234_5000, 0x7f00_0000_2000, 0x7ffc_0000); // another thread, same mm
        let c = key(0x9999_0000, 0x7f00_0000_1000, 0x7ffc_0000); // another process
        assert!(a != b && a != c && b != c);
        // A vfork child on its own stack is another task.
        assert_ne!(a, key(0x1234_5000, 0x7f00_0000_1000, 0x7000_0000));
        // PTI user root (bit 12) and PCID bits map to the same task.
        assert_eq!(
            key(0x1234_4000 | 0x1000 | 0x801, 7, 9),
            key(0x1234_4000 | 3, 7, 9)
        );
        t.insert(a, &p(10, 0));
        t.insert(b, &p(11, 0));
        assert_eq!(sn(t.take(c)), None);
        assert_eq!(sn(t.take(b)), Some((11, 0)));
        t.insert(a, &p(12, 39)); // a's older entry (e.g. vfork parent) is replaced
        assert_eq!(sn(t.take(a)), Some((12, 39)));
        assert_eq!(sn(t.take(a)), None);
        assert!(t.is_empty());
    }

    #[test]
    fn full_window_is_reported() {
        let t = Table::default();
        // Keys landing in the same window.
        let keys: Vec<u64> = (1..=(PROBE as u64 + 1))
            .map(|i| i * BUCKETS as u64)
            .collect();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(t.insert(*k, &p(i as u64, 0)), i < PROBE);
        }
        assert_eq!(sn(t.take(keys[3])), Some((3, 0)));
        assert!(t.insert(keys[PROBE], &p(99, 0)));
        assert_eq!(sn(t.take(keys[PROBE])), Some((99, 0)));
    }

    #[test]
    fn concurrent_tasks() {
        let t = Arc::new(Table::default());
        let hs: Vec<_> = (0..4u64)
            .map(|th| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        let k = key(th << 13, i % 64, 0x7ffc_0000);
                        assert!(t.insert(k, &p(i, th)));
                        assert_eq!(sn(t.take(k)), Some((i, th)));
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert!(t.is_empty());
    }
}
