//! Time: records carry the host's `CLOCK_MONOTONIC`; users read wall-clock
//! UTC. The engine captures the offset between the two once, at start (a
//! [`Clock`] is injectable so tests get fixed, readable timestamps).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::DiffusionError;

/// Source of "now" on both time bases.
pub trait Clock: Send {
    /// Host `CLOCK_MONOTONIC` in ns: the records' time base.
    fn monotonic_ns(&self) -> u64;
    /// Wall-clock UTC, ns since the Unix epoch.
    fn wall_ns(&self) -> i64;
}

/// The host's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn monotonic_ns(&self) -> u64 {
        events::now_ns()
    }

    fn wall_ns(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(_) => 0,
        }
    }
}

/// A clock tests move by hand: wall = `wall_at_zero` + monotonic.
#[derive(Debug, Clone)]
pub struct ManualClock {
    mono: Arc<AtomicU64>,
    wall_at_zero: i64,
}

impl ManualClock {
    pub fn new(wall_at_zero: i64) -> ManualClock {
        ManualClock {
            mono: Arc::new(AtomicU64::new(0)),
            wall_at_zero,
        }
    }

    /// Sets the monotonic "now" (shared by every clone).
    pub fn set_monotonic(&self, ns: u64) {
        self.mono.store(ns, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn monotonic_ns(&self) -> u64 {
        self.mono.load(Ordering::Relaxed)
    }

    fn wall_ns(&self) -> i64 {
        self.wall_at_zero
            .saturating_add(i64::try_from(self.monotonic_ns()).unwrap_or(i64::MAX))
    }
}

/// Monotonic ns -> wall-clock ns, by the offset captured at construction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WallOffset(i128);

impl WallOffset {
    pub fn capture(clock: &dyn Clock) -> WallOffset {
        WallOffset(i128::from(clock.wall_ns()) - i128::from(clock.monotonic_ns()))
    }

    pub fn wall(self, mono_ns: u64) -> i64 {
        let w = i128::from(mono_ns) + self.0;
        w.clamp(0, i128::from(i64::MAX)) as i64
    }
}

/// RFC 3339 UTC with milliseconds: `2026-11-21T10:00:01.123Z`.
pub fn format_time(wall_ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(u64::try_from(wall_ns).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

/// Parses an RFC 3339 time (`2026-11-21T10:00:01.123Z`; a space for the `T`
/// and a missing `Z` are accepted, the time is UTC) into wall-clock ns.
pub fn parse_time(text: &str) -> Result<i64, DiffusionError> {
    let t = humantime::parse_rfc3339_weak(text.trim())
        .map_err(|_| DiffusionError::BadTime(text.to_string()))?;
    let d = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| DiffusionError::BadTime(text.to_string()))?;
    i64::try_from(d.as_nanos()).map_err(|_| DiffusionError::BadTime(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_offsets() {
        let t = parse_time("2026-11-21T10:00:01.123Z").unwrap();
        assert_eq!(format_time(t), "2026-11-21T10:00:01.123Z");
        assert_eq!(parse_time("2026-11-21 10:00:01.123").unwrap(), t);
        assert!(parse_time("yesterday").is_err());
        let clock = ManualClock::new(t);
        clock.set_monotonic(5_000_000_000);
        let off = WallOffset::capture(&clock);
        assert_eq!(off.wall(5_000_000_000), t + 5_000_000_000);
        assert_eq!(off.wall(6_000_000_000), t + 6_000_000_000);
        assert_eq!(
            format_time(off.wall(6_000_000_000)),
            "2026-11-21T10:00:07.123Z"
        );
        assert_eq!(format_time(-5), "1970-01-01T00:00:00.000Z");
    }
}
