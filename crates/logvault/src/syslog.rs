//! Reading the header glibc's `syslog(3)` puts in front of a message, and
//! checking it against the process that really sent it.
//!
//! glibc formats `<PRI>Mmm dd hh:mm:ss TAG[PID]: MSG` (the timestamp is
//! `strftime("%h %e %T ")`, so the day is space-padded: `Nov  3`); `[PID]`
//! only with `LOG_PID`; `TAG` is `openlog`'s ident or the program's short
//! name, and `TAG: ` is left out when there is no tag. musl writes the same
//! shape. Everything here is bounded and total: any bytes parse to
//! something, never a panic.

/// The parts of a syslog line. Parts that are absent are `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyslogHeader<'a> {
    /// `<PRI>` value (0..=191).
    pub pri: Option<u8>,
    /// `Mmm dd hh:mm:ss` as sent.
    pub timestamp: Option<&'a [u8]>,
    /// The tag (non-empty, no spaces).
    pub tag: Option<&'a [u8]>,
    /// The digits between `[` and `]` after the tag.
    pub pid: Option<&'a [u8]>,
    /// The message text after the header.
    pub body: &'a [u8],
}

const MONTHS: [&[u8; 3]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

fn parse_pri(msg: &[u8]) -> Option<(u8, &[u8])> {
    let rest = msg.strip_prefix(b"<")?;
    let end = rest.iter().take(4).position(|&b| b == b'>')?;
    let digits = &rest[..end];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let value = digits
        .iter()
        .fold(0u32, |v, &d| v * 10 + u32::from(d - b'0'));
    if value > 191 {
        return None;
    }
    Some((value as u8, &rest[end + 1..]))
}

fn is_timestamp(t: &[u8]) -> bool {
    let digit = |i: usize| t[i].is_ascii_digit();
    t.len() >= 16
        && MONTHS.iter().any(|m| t[..3] == m[..])
        && t[3] == b' '
        && (t[4] == b' ' || digit(4))
        && digit(5)
        && t[6] == b' '
        && digit(7)
        && digit(8)
        && t[9] == b':'
        && digit(10)
        && digit(11)
        && t[12] == b':'
        && digit(13)
        && digit(14)
        && t[15] == b' '
}

/// `[digits]` at the end of `header`: (tag before it, digits).
fn split_pid(header: &[u8]) -> Option<(&[u8], &[u8])> {
    let inner = header.strip_suffix(b"]")?;
    let open = inner.iter().rposition(|&b| b == b'[')?;
    let digits = &inner[open + 1..];
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some((&inner[..open], digits))
}

/// Splits a syslog line into its header parts and body.
///
/// Rule for the tag: the text before the first `": "` is the tag (with an
/// optional `[PID]` suffix) when it contains no space; otherwise there is no
/// tag and the whole rest is the body. A bare `[PID] ` (LOG_PID without a
/// tag) is recognised too.
pub fn parse_syslog(msg: &[u8]) -> SyslogHeader<'_> {
    let (pri, rest) = match parse_pri(msg) {
        Some((p, rest)) => (Some(p), rest),
        None => (None, msg),
    };
    let (timestamp, rest) = if is_timestamp(rest) {
        (Some(&rest[..15]), &rest[16..])
    } else {
        (None, rest)
    };
    let mut out = SyslogHeader {
        pri,
        timestamp,
        tag: None,
        pid: None,
        body: rest,
    };
    if let Some(colon) = rest.windows(2).position(|w| w == b": ") {
        let header = &rest[..colon];
        if !header.contains(&b' ') {
            let (tag, pid) = match split_pid(header) {
                Some((tag, pid)) => (tag, Some(pid)),
                None => (header, None),
            };
            out.tag = (!tag.is_empty()).then_some(tag);
            out.pid = pid;
            out.body = &rest[colon + 2..];
            return out;
        }
    }
    if rest.first() == Some(&b'[') {
        let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
        if let Some((tag, pid)) = split_pid(&rest[..end]) {
            if tag.is_empty() {
                out.pid = Some(pid);
                out.body = rest.get(end + 1..).unwrap_or_default();
            }
        }
    }
    out
}

fn basename(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

/// True when `tag` is a plausible syslog tag for a process whose kernel
/// `comm` is `comm`: equal; or equal after taking the tag's basename
/// (`/usr/sbin/sshd` for `sshd`); or, when `comm` has 15 bytes (the kernel
/// cut a longer name at `TASK_COMM_LEN - 1`), the tag or its basename
/// starts with `comm`.
pub fn tag_matches(tag: &[u8], comm: &str) -> bool {
    let comm = comm.as_bytes();
    if comm.is_empty() {
        return false;
    }
    let base = basename(tag);
    tag == comm
        || base == comm
        || (comm.len() == 15 && (tag.starts_with(comm) || base.starts_with(comm)))
}

/// True when the message's header agrees with the process that sent it:
/// the `[PID]`, if present, equals `tgid` (glibc writes `getpid()`, the
/// thread group id), and the tag, if present, matches `comm` by
/// [`tag_matches`]. A message without tag and PID cannot lie about them and
/// passes. The daemon sets [`crate::FLAG_TAG_MISMATCH`] when this is false;
/// the record is kept either way.
///
/// Expected false alarms: programs whose ident is not their executable's
/// name (`openlog("myapp")` in a Python script has comm `python3`) and
/// threads renamed with `prctl(PR_SET_NAME)`.
pub fn check_identity(message: &[u8], tgid: u32, comm: &str) -> bool {
    let h = parse_syslog(message);
    if let Some(pid) = h.pid {
        // At most 10 digits (split_pid): fits in u64.
        let value = pid.iter().fold(0u64, |v, &d| v * 10 + u64::from(d - b'0'));
        if value != u64::from(tgid) {
            return false;
        }
    }
    h.tag.is_none_or(|tag| tag_matches(tag, comm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_with_pid() {
        let h = parse_syslog(b"<38>Nov 13 03:41:22 sshd[1177]: Server listening on 0.0.0.0");
        assert_eq!(h.pri, Some(38));
        assert_eq!(h.timestamp, Some(&b"Nov 13 03:41:22"[..]));
        assert_eq!(h.tag, Some(&b"sshd"[..]));
        assert_eq!(h.pid, Some(&b"1177"[..]));
        assert_eq!(h.body, b"Server listening on 0.0.0.0");
    }

    #[test]
    fn glibc_padded_day_without_pid() {
        let h = parse_syslog(b"<13>Nov  3 03:41:22 cron: job done");
        assert_eq!(h.timestamp, Some(&b"Nov  3 03:41:22"[..]));
        assert_eq!(h.tag, Some(&b"cron"[..]));
        assert_eq!(h.pid, None);
        assert_eq!(h.body, b"job done");
    }

    #[test]
    fn no_tag() {
        let h = parse_syslog(b"<13>Nov  3 03:41:22 hello world: x");
        assert_eq!(h.tag, None);
        assert_eq!(h.body, b"hello world: x");
        let h = parse_syslog(b"<13>Nov  3 03:41:22 [42] hi");
        assert_eq!(h.tag, None);
        assert_eq!(h.pid, Some(&b"42"[..]));
        assert_eq!(h.body, b"hi");
        let h = parse_syslog(b"plain");
        assert_eq!(
            (h.pri, h.timestamp, h.tag, h.body),
            (None, None, None, &b"plain"[..])
        );
    }

    #[test]
    fn odd_input_never_panics() {
        for m in [
            &b""[..],
            b"<",
            b"<>",
            b"<999>x",
            b"<1",
            b"<12>",
            b"<12>Nov",
            b"[",
            b"[]",
            b"]: ",
            b": ",
            b"[99999999999]: x",
            b"a[1]",
        ] {
            let _ = parse_syslog(m);
            let _ = check_identity(m, 1, "a");
        }
    }
}
