//! Export formats: RFC 5424 syslog lines (for forwarding to existing log
//! systems) and JSON lines.
//!
//! Both are single lines whatever the guest sent: the guest chooses the
//! message bytes, comm and exe, and must not be able to forge a second log
//! line downstream.

use std::borrow::Cow;
use std::fmt::Write as _;

use base64::Engine as _;
use serde::Serialize;

use crate::format::hex;
use crate::syslog::parse_syslog;
use crate::{StoredRecord, FLAG_CUT, FLAG_PART, FLAG_RATE_LIMITED_BEFORE, FLAG_TAG_MISMATCH};

/// Our private enterprise number in RFC 5424 structured data (as the brief
/// fixes it: `vmwatch@32473`, 32473 being the documentation PEN of RFC 5612).
pub const SD_ID: &str = "vmwatch@32473";

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard
/// Hinnant's `civil_from_days`): exact for every i64 nanosecond time.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// UTC nanoseconds since the epoch as RFC 3339 with `digits` (0-9)
/// fractional digits, truncated: `2026-11-13T03:41:22.123456Z`. Written
/// here rather than with `humantime` because that panics before 1970 and
/// guest-facing times must never panic.
pub fn rfc3339(time_ns: i64, digits: u32) -> String {
    let secs = time_ns.div_euclid(1_000_000_000);
    let nanos = time_ns.rem_euclid(1_000_000_000) as u32;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    let mut s = format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    let digits = digits.min(9);
    if digits > 0 {
        let frac = nanos / 10u32.pow(9 - digits);
        let _ = write!(s, ".{frac:0width$}", width = digits as usize);
    }
    s.push('Z');
    s
}

/// Names of the set flag bits (unknown bits as hex).
pub fn flag_names(flags: u32) -> Vec<Cow<'static, str>> {
    let mut out = Vec::new();
    let mut rest = flags;
    for (bit, name) in [
        (FLAG_TAG_MISMATCH, "tag-mismatch"),
        (FLAG_PART, "part"),
        (FLAG_CUT, "cut"),
        (FLAG_RATE_LIMITED_BEFORE, "rate-limited-before"),
    ] {
        if flags & bit != 0 {
            out.push(Cow::Borrowed(name));
            rest &= !bit;
        }
    }
    if rest != 0 {
        out.push(Cow::Owned(format!("{rest:#x}")));
    }
    out
}

/// RFC 5424 header field: printable US-ASCII only (others become `_`), at
/// most `max` characters, `-` when empty.
fn header_field(value: &[u8], max: usize) -> String {
    let s: String = value
        .iter()
        .take(max)
        .map(|&b| {
            if (33..=126).contains(&b) {
                char::from(b)
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// Control characters as `#ooo` (octal, rsyslog's convention), so the line
/// stays one line.
fn push_escaped_control(out: &mut String, c: char) -> bool {
    if c.is_control() && (c as u32) < 0x80 {
        let _ = write!(out, "#{:03o}", c as u32);
        true
    } else {
        false
    }
}

/// An SD-PARAM value: `"`, `\` and `]` escaped with `\` (RFC 5424 6.3.3),
/// control characters as `#ooo`.
fn sd_value(out: &mut String, value: &str) {
    for c in value.chars() {
        if push_escaped_control(out, c) {
            continue;
        }
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// One RFC 5424 line (no trailing newline):
/// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID - [vmwatch@32473 ...] MSG`.
///
/// - PRI from the message's `<PRI>` prefix, 13 (user.notice) if absent;
/// - TIMESTAMP: `time_ns` (when the doorbell rang, UTC), microseconds;
/// - HOSTNAME: `hostname`, or the VM name when `hostname` is empty (callers
///   normally pass the VM name);
/// - APP-NAME: the syslog tag in the message, or comm when there is none;
/// - PROCID: the tgid (the process id that `getpid()` and the message's
///   `[PID]` show; the kernel thread id is the `tid` parameter);
/// - MSGID: `-`;
/// - structured data: `vm`, `uuid`, `seq`, `tid`, `comm`, then `exe`, `uid`
///   and `flags` (names, comma-separated) when present;
/// - MSG: the message after its syslog header, invalid UTF-8 replaced by
///   U+FFFD, control characters as `#ooo`. Left out when empty.
pub fn rfc5424(rec: &StoredRecord, hostname: &str) -> String {
    let r = &rec.record;
    let h = parse_syslog(&r.message);
    let host = if hostname.is_empty() { &r.vm } else { hostname };
    let app = h.tag.unwrap_or(r.comm.as_bytes());
    let mut out = format!(
        "<{}>1 {} {} {} {} - [{SD_ID}",
        h.pri.unwrap_or(13),
        rfc3339(r.time_ns, 6),
        header_field(host.as_bytes(), 255),
        header_field(app, 48),
        r.tgid,
    );
    let mut param = |name: &str, value: &str| {
        out.push(' ');
        out.push_str(name);
        out.push_str("=\"");
        sd_value(&mut out, value);
        out.push('"');
    };
    param("vm", &r.vm);
    param("uuid", &r.vm_uuid);
    param("seq", &rec.seq.to_string());
    param("tid", &r.pid.to_string());
    param("comm", &r.comm);
    if let Some(exe) = &r.exe {
        param("exe", exe);
    }
    if let Some(uid) = r.uid {
        param("uid", &uid.to_string());
    }
    if r.flags != 0 {
        param("flags", &flag_names(r.flags).join(","));
    }
    out.push(']');
    if !h.body.is_empty() {
        out.push(' ');
        for c in String::from_utf8_lossy(h.body).chars() {
            if !push_escaped_control(&mut out, c) {
                out.push(c);
            }
        }
    }
    out
}

#[derive(Serialize)]
struct JsonRecord<'a> {
    vm: &'a str,
    vm_uuid: &'a str,
    seq: u64,
    time: String,
    time_ns: i64,
    vcpu: u32,
    cr3: String,
    pid: u32,
    tgid: u32,
    comm: &'a str,
    exe: Option<&'a str>,
    uid: Option<u32>,
    flags: u32,
    flag_names: Vec<Cow<'static, str>>,
    message: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_base64: Option<String>,
    prev_hash: String,
    hash: String,
}

/// One JSON object (no trailing newline). `message` is the raw message as
/// UTF-8 (invalid bytes as U+FFFD); when the bytes are not valid UTF-8,
/// `message_base64` carries them exactly. `cr3` is a hex string (JSON
/// numbers lose precision above 2^53), hashes are hex.
pub fn json_line(rec: &StoredRecord) -> String {
    let r = &rec.record;
    let utf8 = std::str::from_utf8(&r.message).is_ok();
    let j = JsonRecord {
        vm: &r.vm,
        vm_uuid: &r.vm_uuid,
        seq: rec.seq,
        time: rfc3339(r.time_ns, 9),
        time_ns: r.time_ns,
        vcpu: r.vcpu,
        cr3: format!("{:#x}", r.cr3),
        pid: r.pid,
        tgid: r.tgid,
        comm: &r.comm,
        exe: r.exe.as_deref(),
        uid: r.uid,
        flags: r.flags,
        flag_names: flag_names(r.flags),
        message: String::from_utf8_lossy(&r.message),
        message_base64: (!utf8)
            .then(|| base64::engine::general_purpose::STANDARD.encode(&r.message)),
        prev_hash: hex(&rec.prev_hash),
        hash: hex(&rec.hash),
    };
    // Serializing plain strings and numbers cannot fail.
    serde_json::to_string(&j).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(-1, 9), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(
            rfc3339(1_763_005_282_123_456_789, 6),
            "2025-11-13T03:41:22.123456Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000, 3),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(rfc3339(i64::MAX, 9), "2262-04-11T23:47:16.854775807Z");
        assert_eq!(rfc3339(i64::MIN, 9), "1677-09-21T00:12:43.145224192Z");
    }

    #[test]
    fn flags() {
        assert_eq!(flag_names(0).len(), 0);
        assert_eq!(
            flag_names(FLAG_TAG_MISMATCH | FLAG_CUT | 0x100).join(","),
            "tag-mismatch,cut,0x100"
        );
    }
}
