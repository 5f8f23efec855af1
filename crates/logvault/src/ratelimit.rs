//! Per-process rate limiting of log messages, so that one flooding guest
//! process cannot fill the host's disk or drown other processes' messages.
//!
//! A token bucket per (VM, tgid): `burst` tokens to start with, refilled at
//! `per_second`, one token per message. Arithmetic is in integer
//! nano-tokens, so results are exact and repeatable. Pure: the caller passes
//! `now`, nothing here reads a clock.
//!
//! The map is bounded ([`RateLimitConfig::max_entries`]): when full, the
//! least recently seen process is forgotten. Forgetting costs little (that
//! process gets a full bucket again; a pending drop count or a refusal of it
//! is lost), and a guest forking many processes cannot grow host memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

const NANO: u128 = 1_000_000_000;

/// What happens when a process's bucket is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatePolicy {
    /// Drop the message and count it; the next accepted message reports the
    /// count (the daemon sets `FLAG_RATE_LIMITED_BEFORE` on it).
    Drop,
    /// Drop the message and refuse everything from that process for
    /// `for_`, counted the same way.
    Refuse { for_: Duration },
}

/// Limits of a [`RateLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Sustained messages per second per process.
    pub per_second: u32,
    /// Messages a process may send at once.
    pub burst: u32,
    pub policy: RatePolicy,
    /// Processes tracked at most (all VMs together).
    pub max_entries: usize,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_second: 100,
            burst: 1000,
            policy: RatePolicy::Drop,
            max_entries: 65_536,
        }
    }
}

/// The verdict on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Keep it; `dropped_before` messages of this process were dropped or
    /// refused since the last accepted one.
    Accept { dropped_before: u64 },
    /// Bucket empty: drop it (counted).
    Drop,
    /// The process is in its refusal period: drop it (counted).
    Refused,
}

#[derive(Debug)]
struct Bucket {
    /// Nano-tokens (1 message = 10^9).
    tokens: u128,
    updated: Instant,
    dropped: u64,
    refused_until: Option<Instant>,
    stamp: u64,
}

/// Token buckets per (VM, tgid).
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimitConfig,
    vms: HashMap<Arc<str>, HashMap<u32, Bucket>>,
    /// Last-use stamp -> key, oldest first (for eviction).
    order: BTreeMap<u64, (Arc<str>, u32)>,
    next_stamp: u64,
    len: usize,
}

impl RateLimiter {
    pub fn new(cfg: RateLimitConfig) -> RateLimiter {
        RateLimiter {
            cfg,
            vms: HashMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
            len: 0,
        }
    }

    /// Processes tracked.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every process of `vm` (when the VM goes away).
    pub fn forget_vm(&mut self, vm: &str) {
        if let Some(map) = self.vms.remove(vm) {
            for bucket in map.values() {
                self.order.remove(&bucket.stamp);
            }
            self.len -= map.len();
        }
    }

    /// Decides on one message from process `tgid` of `vm` at `now`.
    pub fn check(&mut self, vm: &str, tgid: u32, now: Instant) -> Decision {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let burst = u128::from(self.cfg.burst) * NANO;
        let exists = self.vms.get(vm).is_some_and(|m| m.contains_key(&tgid));
        if !exists {
            if self.len >= self.cfg.max_entries.max(1) {
                self.evict_oldest();
            }
            let key: Arc<str> = match self.vms.get_key_value(vm) {
                Some((k, _)) => k.clone(),
                None => Arc::from(vm),
            };
            self.vms.entry(key.clone()).or_default().insert(
                tgid,
                Bucket {
                    tokens: burst,
                    updated: now,
                    dropped: 0,
                    refused_until: None,
                    stamp,
                },
            );
            self.order.insert(stamp, (key, tgid));
            self.len += 1;
        }
        let Some(bucket) = self.vms.get_mut(vm).and_then(|m| m.get_mut(&tgid)) else {
            // Inserted just above.
            return Decision::Drop;
        };
        if exists {
            if let Some((k, t)) = self.order.remove(&bucket.stamp) {
                self.order.insert(stamp, (k, t));
            }
            bucket.stamp = stamp;
        }

        // Refill for the time since the last message (a `now` earlier than
        // the last one counts as no time).
        let elapsed = now.saturating_duration_since(bucket.updated).as_nanos();
        if now > bucket.updated {
            bucket.updated = now;
        }
        bucket.tokens = (bucket.tokens + elapsed * u128::from(self.cfg.per_second)).min(burst);

        if let Some(until) = bucket.refused_until {
            if now < until {
                bucket.dropped += 1;
                return Decision::Refused;
            }
            bucket.refused_until = None;
        }
        if bucket.tokens >= NANO {
            bucket.tokens -= NANO;
            let dropped_before = std::mem::take(&mut bucket.dropped);
            return Decision::Accept { dropped_before };
        }
        bucket.dropped += 1;
        match self.cfg.policy {
            RatePolicy::Drop => Decision::Drop,
            RatePolicy::Refuse { for_ } => {
                bucket.refused_until = Some(now + for_);
                Decision::Refused
            }
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((_, (vm, tgid))) = self.order.pop_first() {
            if let Some(map) = self.vms.get_mut(&vm) {
                if map.remove(&tgid).is_some() {
                    self.len -= 1;
                }
                if map.is_empty() {
                    self.vms.remove(&vm);
                }
            }
        }
    }
}
