//! The log vault (issue 5; paper 002): guest syslog messages caught by the
//! hypervisor, kept outside the guest, tamper-evident.
//!
//! A guest library sends each `syslog()` message through a `cpuid` doorbell
//! that the QEMU plugin catches; the daemon attaches what the hypervisor
//! knows about the sender (VM, vCPU, CR3, pid/tgid/comm read from guest
//! kernel memory) and hands a [`LogRecord`] to this crate. The guest kernel
//! never sees the message on its way out, and nothing in the guest can
//! change what was stored.
//!
//! Storage, per VM, under `<data_dir>/<vm>/` (see `README.md`):
//! - `vault.json`: VM name, creation time, the checkpoint public key, format;
//! - `segment-NNNNNN.log`: append-only, length-prefixed binary frames, one
//!   per record, each carrying its seq, the previous record's hash and its
//!   own SHA-256 hash (a hash chain starting at a genesis hash of
//!   `vault.json`'s fields, so two vaults cannot be swapped);
//! - `checkpoints.log`: Ed25519-signed (seq, hash, time) every N records or
//!   T ms and on flush/close.
//!
//! [`Vault`] writes, [`read`] queries, [`verify`] checks everything and
//! names the first bad record. [`rfc5424`] and [`json_line`] export;
//! [`RateLimiter`] and [`check_identity`] are the daemon's policy helpers.
//!
//! No unsafe code; every reader of vault files is bounded (1 MiB per frame,
//! no allocation from a length field before the bytes are known to exist)
//! and fuzzed (`fuzz/fuzz_targets/vault_segment.rs`).

#![forbid(unsafe_code)]

mod error;
mod export;
mod files;
pub mod format;
mod meta;
mod ratelimit;
mod read;
mod signer;
mod syslog;
mod vault;
mod verify;

pub use error::VaultError;
pub use export::{flag_names, json_line, rfc3339, rfc5424, SD_ID};
pub use meta::VaultMeta;
pub use ratelimit::{Decision, RateLimitConfig, RateLimiter, RatePolicy};
pub use read::{read, Query, Records};
pub use signer::Signer;
pub use syslog::{check_identity, parse_syslog, tag_matches, SyslogHeader};
pub use vault::{validate_vm_name, Fsync, Vault, VaultConfig};
pub use verify::{verify, verify_with_key, BadKind, BadRecord, VerifyReport};

/// The syslog tag or `[PID]` in the message does not match the process
/// that sent it (see [`check_identity`]).
pub const FLAG_TAG_MISMATCH: u32 = 1 << 0;
/// One part of a message the guest library split (too long for one doorbell).
pub const FLAG_PART: u32 = 1 << 1;
/// The host cut its copy of the message (over its size limit).
pub const FLAG_CUT: u32 = 1 << 2;
/// Messages of this process were dropped by the rate limiter before this
/// one (see [`RateLimiter`]).
pub const FLAG_RATE_LIMITED_BEFORE: u32 = 1 << 3;

/// One message as the daemon hands it in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogRecord {
    /// VM name (the vault's VM).
    pub vm: String,
    /// The VM's SMBIOS UUID (fresh per boot in the lab).
    pub vm_uuid: String,
    /// Wall clock, UTC nanoseconds, when the doorbell rang.
    pub time_ns: i64,
    pub vcpu: u32,
    pub cr3: u64,
    /// Kernel thread id of the sender.
    pub pid: u32,
    /// Kernel thread group id (what user space calls the pid).
    pub tgid: u32,
    /// The sending thread's kernel `comm` (at most 15 bytes).
    pub comm: String,
    pub exe: Option<String>,
    pub uid: Option<u32>,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Exactly the bytes the guest library sent.
    pub message: Vec<u8>,
}

/// A record as stored: its place in the chain and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Per-VM, from 0, without gaps.
    pub seq: u64,
    /// Hash of record `seq - 1` (the vault's genesis hash for record 0).
    pub prev_hash: [u8; 32],
    /// SHA-256 over `prev_hash` and the canonical encoding of `seq` and all
    /// fields (see [`format`](mod@crate::format)).
    pub hash: [u8; 32],
    pub record: LogRecord,
}
