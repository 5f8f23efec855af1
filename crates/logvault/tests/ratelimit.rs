//! Rate limiter, deterministic with explicit instants.

use std::time::{Duration, Instant};

use logvault::{Decision, RateLimitConfig, RateLimiter, RatePolicy};

const ACCEPT: Decision = Decision::Accept { dropped_before: 0 };

fn cfg(policy: RatePolicy) -> RateLimitConfig {
    RateLimitConfig {
        per_second: 10,
        burst: 5,
        policy,
        max_entries: 1000,
    }
}

#[test]
fn burst_then_steady_rate_and_drop_counts() {
    let t0 = Instant::now();
    let mut rl = RateLimiter::new(cfg(RatePolicy::Drop));
    for _ in 0..5 {
        assert_eq!(rl.check("web1", 100, t0), ACCEPT);
    }
    assert_eq!(rl.check("web1", 100, t0), Decision::Drop);
    assert_eq!(rl.check("web1", 100, t0), Decision::Drop);
    // 10/s: one token per 100 ms, exactly.
    let ms = |n| t0 + Duration::from_millis(n);
    assert_eq!(rl.check("web1", 100, ms(99)), Decision::Drop);
    assert_eq!(
        rl.check("web1", 100, ms(100)),
        Decision::Accept { dropped_before: 3 }
    );
    assert_eq!(rl.check("web1", 100, ms(150)), Decision::Drop);
    assert_eq!(
        rl.check("web1", 100, ms(200)),
        Decision::Accept { dropped_before: 1 }
    );
    // Steady: one message every 100 ms is always accepted.
    for k in 3..50 {
        assert_eq!(rl.check("web1", 100, ms(k * 100)), ACCEPT, "at {k}");
    }
    // A long pause refills only up to the burst.
    let later = ms(100_000);
    for _ in 0..5 {
        assert_eq!(rl.check("web1", 100, later), ACCEPT);
    }
    assert_eq!(rl.check("web1", 100, later), Decision::Drop);
    // Time going backwards counts as no time.
    assert_eq!(rl.check("web1", 100, t0), Decision::Drop);
}

#[test]
fn refuse_policy_refuses_for_the_duration() {
    let t0 = Instant::now();
    let ms = |n| t0 + Duration::from_millis(n);
    let mut rl = RateLimiter::new(cfg(RatePolicy::Refuse {
        for_: Duration::from_secs(2),
    }));
    for _ in 0..5 {
        assert_eq!(rl.check("web1", 7, t0), ACCEPT);
    }
    assert_eq!(rl.check("web1", 7, t0), Decision::Refused);
    // Tokens come back, but the process stays refused for 2 s.
    assert_eq!(rl.check("web1", 7, ms(500)), Decision::Refused);
    assert_eq!(rl.check("web1", 7, ms(1999)), Decision::Refused);
    assert_eq!(
        rl.check("web1", 7, ms(2000)),
        Decision::Accept { dropped_before: 3 }
    );
    assert_eq!(rl.check("web1", 7, ms(2000)), ACCEPT);
}

#[test]
fn one_flooder_does_not_affect_others() {
    let t0 = Instant::now();
    let mut rl = RateLimiter::new(cfg(RatePolicy::Drop));
    for _ in 0..1000 {
        rl.check("web1", 666, t0);
    }
    assert_eq!(rl.check("web1", 666, t0), Decision::Drop);
    // Another process of the same VM, and the same tgid in another VM.
    for _ in 0..5 {
        assert_eq!(rl.check("web1", 667, t0), ACCEPT);
        assert_eq!(rl.check("db1", 666, t0), ACCEPT);
    }
    assert_eq!(rl.len(), 3);
    rl.forget_vm("web1");
    assert_eq!(rl.len(), 1);
    assert_eq!(
        rl.check("web1", 666, t0),
        ACCEPT,
        "forgotten: a fresh bucket"
    );
}

#[test]
fn the_map_is_bounded_and_forgets_the_least_recent() {
    let t0 = Instant::now();
    let mut rl = RateLimiter::new(RateLimitConfig {
        max_entries: 4,
        ..cfg(RatePolicy::Drop)
    });
    for tgid in 1..=4 {
        for _ in 0..6 {
            rl.check("web1", tgid, t0);
        }
    }
    assert_eq!(rl.len(), 4);
    // Touch 1 so that 2 is the least recently seen.
    assert_eq!(rl.check("web1", 1, t0), Decision::Drop);
    assert_eq!(rl.check("web1", 5, t0), ACCEPT);
    assert_eq!(rl.len(), 4);
    // 2 was evicted: it starts over with a full bucket; 3 was not.
    assert_eq!(rl.check("web1", 3, t0), Decision::Drop);
    assert_eq!(rl.check("web1", 2, t0), ACCEPT);
    assert_eq!(rl.len(), 4);
    // A fork bomb of tgids never grows the map.
    for tgid in 10..100_000 {
        rl.check("web1", tgid, t0);
    }
    assert_eq!(rl.len(), 4);
}
