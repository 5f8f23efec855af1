//! Helpers shared by the integration tests: record generators and raw
//! access to a vault's files for tampering.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use logvault::format::{decode_frame, Frame};
use logvault::{Fsync, LogRecord, Signer, StoredRecord, Vault, VaultConfig};

pub const VM: &str = "web1";

pub fn signer() -> Signer {
    Signer::from_seed([7; 32])
}

/// A varied record: every field changes with `i`, some messages are not
/// UTF-8, some have no exe/uid.
pub fn rec(i: u64) -> LogRecord {
    let mut message = format!(
        "<{}>Nov 13 03:41:{:02} app{}[{}]: message number {i} \"quoted\" ]",
        8 + i % 100,
        i % 60,
        i % 7,
        1000 + i % 13
    )
    .into_bytes();
    if i.is_multiple_of(5) {
        message.extend_from_slice(b"\xff\xfe\x00raw");
    }
    LogRecord {
        vm: VM.into(),
        vm_uuid: format!("4c4c4544-0042-3510-8052-{:012x}", i % 3),
        time_ns: 1_763_005_282_000_000_000 + i as i64 * 1_000_000,
        vcpu: (i % 4) as u32,
        cr3: 0x1a2b_3000 + (i % 9) * 0x1000,
        pid: 1000 + (i % 13) as u32 + (i % 3) as u32,
        tgid: 1000 + (i % 13) as u32,
        comm: format!("app{}", i % 7),
        exe: (!i.is_multiple_of(4)).then(|| format!("/usr/bin/app{}", i % 7)),
        uid: (!i.is_multiple_of(6)).then_some((i % 1001) as u32),
        flags: (i % 16) as u32,
        message,
    }
}

/// Small segments and frequent checkpoints, no syncs.
pub fn small_cfg() -> VaultConfig {
    VaultConfig {
        segment_max_bytes: 1 << 20,
        segment_max_records: 25,
        checkpoint_every_records: 10,
        checkpoint_every: Duration::from_secs(3600),
        fsync: Fsync::Never,
    }
}

/// A closed vault with records 0..n.
pub fn build(data: &Path, n: u64, cfg: VaultConfig) -> Vec<StoredRecord> {
    let mut v = Vault::open(data, VM, &signer(), cfg).unwrap();
    let out = (0..n).map(|i| v.append(rec(i)).unwrap()).collect();
    v.close().unwrap();
    out
}

pub fn vault_dir(data: &Path) -> PathBuf {
    data.join(VM)
}

pub fn segment(data: &Path, index: u64) -> PathBuf {
    vault_dir(data).join(format!("segment-{index:06}.log"))
}

pub fn segments(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(vault_dir(data))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with("segment-") && n.ends_with(".log")
        })
        .collect();
    v.sort();
    v
}

/// A frame in a segment file.
#[derive(Clone, Debug)]
pub struct RawFrame {
    pub offset: usize,
    pub bytes: Vec<u8>,
    pub record: StoredRecord,
}

/// The frames of one segment file (must be intact).
pub fn frames(path: &Path) -> Vec<RawFrame> {
    let data = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        match decode_frame(&data[off..]) {
            Frame::Record { record, len } => {
                out.push(RawFrame {
                    offset: off,
                    bytes: data[off..off + len].to_vec(),
                    record,
                });
                off += len;
            }
            other => panic!("{} at {off}: {other:?}", path.display()),
        }
    }
    out
}

/// Rewrites a segment from frames.
pub fn write_frames(path: &Path, frames: &[RawFrame]) {
    let bytes: Vec<u8> = frames
        .iter()
        .flat_map(|f| f.bytes.iter().copied())
        .collect();
    std::fs::write(path, bytes).unwrap();
}

/// (segment index, frame index) of record `seq`.
pub fn locate(data: &Path, seq: u64) -> (PathBuf, usize, RawFrame) {
    for path in segments(data) {
        for (i, f) in frames(&path).into_iter().enumerate() {
            if f.record.seq == seq {
                return (path, i, f);
            }
        }
    }
    panic!("seq {seq} not found");
}

pub fn checkpoints_path(data: &Path) -> PathBuf {
    vault_dir(data).join("checkpoints.log")
}

/// Reads every record back.
pub fn read_all(data: &Path) -> Vec<StoredRecord> {
    logvault::read(data, VM, &logvault::Query::all())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}
