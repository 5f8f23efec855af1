//! Wire protocol of the test-only guest agent `vmwatch-agent`.
//!
//! The agent runs inside a lab VM on the second serial port (`/dev/ttyS1`),
//! which QEMU connects to a Unix socket on the host. Both directions carry
//! newline-delimited JSON: one object per line, UTF-8, no embedded newlines
//! (serde_json never emits raw newlines inside strings).
//!
//! Byte strings (a command's stdin, stdout and stderr) travel as **standard
//! base64 with padding** (RFC 4648 §4). That is lossless for any bytes and
//! keeps every line plain ASCII, so nothing on the serial path (the guest's
//! tty layer, QEMU's chardev) can mangle it.
//!
//! Host → guest:
//! - `{"ping": 7}` → `{"pong": 7, "version": "0.1.0"}`
//! - `{"id": 1, "argv": ["uname", "-r"], "stdin": "<base64>", "timeout_ms": 5000,
//!   "env": {"K": "V"}, "cwd": "/"}` (all but `id` and `argv` optional) →
//!   `{"id": 1, "status": 0, "signal": null, "stdout": "<base64>",
//!   "stderr": "<base64>", "timed_out": false, "truncated": false, "duration_ms": 12}`
//!
//! Guest → host, unsolicited: `{"ready": true, "version": "0.1.0", "pid": 123}`
//! each time the agent starts (so a host waiting for a response knows the agent
//! restarted and the request is lost).
//!
//! A request the agent cannot parse or run gets `{"id": N or null, "error": "..."}`.
//! The host ignores lines it cannot parse (for example the tty's echo of a ping
//! sent before the agent switched the port to raw mode).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most bytes of stdout (and, separately, stderr) the agent returns for one command.
/// Output past this is drained and dropped, and the response says `truncated`.
pub const MAX_OUTPUT: usize = 16 << 20;

/// Longest request line the agent accepts (stdin is base64 inside it).
pub const MAX_REQUEST_LINE: usize = 64 << 20;

/// Version string the agent reports in `ready` and `pong`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A liveness probe; the agent answers with [`Pong`] carrying the same number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ping {
    pub ping: u64,
}

/// Answer to [`Ping`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pong {
    pub pong: u64,
    pub version: String,
}

/// Printed once each time the agent starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    pub ready: bool,
    pub version: String,
    pub pid: u32,
}

/// Run one command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecRequest {
    /// Chosen by the host; echoed in the response so stale answers can be told apart.
    pub id: u64,
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Bytes fed to the command's stdin (which is `/dev/null` when absent).
    #[serde(default, with = "b64_opt", skip_serializing_if = "Option::is_none")]
    pub stdin: Option<Vec<u8>>,
    /// Kill the command's process group after this long. No limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Added to (overriding) the agent's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory; `/` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// How a command ended and what it printed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecResponse {
    pub id: u64,
    /// Exit status, or `None` if a signal ended it.
    pub status: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// The command overran `timeout_ms` and its process group was killed.
    pub timed_out: bool,
    /// Output went past [`MAX_OUTPUT`] and the rest was dropped.
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub duration_ms: u64,
}

/// A request that could not be parsed or run (for example: no such program).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorResponse {
    pub id: Option<u64>,
    pub error: String,
}

/// Any line the agent sends. Untagged: the variants have disjoint required fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum FromAgent {
    Exec(ExecResponse),
    Error(ErrorResponse),
    Pong(Pong),
    Ready(Ready),
}

/// Any line the host sends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ToAgent {
    Ping(Ping),
    Exec(ExecRequest),
}

/// Serde adapter: `Vec<u8>` as a base64 string.
pub mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: `Option<Vec<u8>>` as an optional base64 string.
pub mod b64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::b64::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::b64")] Vec<u8>);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_round_trip_is_lossless() {
        let req = ExecRequest {
            id: 9,
            argv: vec!["cat".into()],
            stdin: Some(vec![0, 255, b'\n', 0x80]),
            timeout_ms: Some(10),
            env: BTreeMap::new(),
            cwd: None,
        };
        let line = serde_json::to_string(&ToAgent::Exec(req.clone())).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<ToAgent>(&line).unwrap(),
            ToAgent::Exec(req)
        );
    }

    #[test]
    fn discriminates_agent_lines() {
        let l =
            r#"{"id":1,"status":0,"signal":null,"stdout":"aGk=","stderr":"","timed_out":false}"#;
        match serde_json::from_str::<FromAgent>(l).unwrap() {
            FromAgent::Exec(r) => assert_eq!(r.stdout, b"hi"),
            other => panic!("{other:?}"),
        }
        let l = r#"{"id":null,"error":"bad"}"#;
        assert!(matches!(
            serde_json::from_str::<FromAgent>(l).unwrap(),
            FromAgent::Error(_)
        ));
        let l = r#"{"ready":true,"version":"x","pid":3}"#;
        assert!(matches!(
            serde_json::from_str::<FromAgent>(l).unwrap(),
            FromAgent::Ready(_)
        ));
        let l = r#"{"pong":3,"version":"x"}"#;
        assert!(matches!(
            serde_json::from_str::<FromAgent>(l).unwrap(),
            FromAgent::Pong(_)
        ));
        assert!(matches!(
            serde_json::from_str::<ToAgent>(r#"{"ping":4}"#).unwrap(),
            ToAgent::Ping(Ping { ping: 4 })
        ));
    }
}
