//! Property tests: any single tampering operation on any vault is caught,
//! and arbitrary bytes in vault files never cause a panic.

mod common;

use std::time::Duration;

use common::*;
use logvault::format::{encode_record, CHECKPOINT_LEN};
use logvault::{read, verify, Fsync, LogRecord, Query, Vault, VaultConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Tamper {
    FlipSegmentByte { seg: usize, pos: usize, xor: u8 },
    FlipCheckpointByte { pos: usize, xor: u8 },
    Remove { rec: usize },
    Swap { a: usize, b: usize },
    Duplicate { rec: usize, at: usize },
    InsertForged { at: usize },
    TruncateSegment { seg: usize, cut: usize },
    DeleteSegment { seg: usize },
    Rewrite { rec: usize },
}

fn tamper() -> impl Strategy<Value = Tamper> {
    let n = any::<usize>();
    prop_oneof![
        (n, n, 1u8..).prop_map(|(seg, pos, xor)| Tamper::FlipSegmentByte { seg, pos, xor }),
        (n, 1u8..).prop_map(|(pos, xor)| Tamper::FlipCheckpointByte { pos, xor }),
        n.prop_map(|rec| Tamper::Remove { rec }),
        (n, n).prop_map(|(a, b)| Tamper::Swap { a, b }),
        (n, n).prop_map(|(rec, at)| Tamper::Duplicate { rec, at }),
        n.prop_map(|at| Tamper::InsertForged { at }),
        (n, n).prop_map(|(seg, cut)| Tamper::TruncateSegment { seg, cut }),
        n.prop_map(|seg| Tamper::DeleteSegment { seg }),
        n.prop_map(|rec| Tamper::Rewrite { rec }),
    ]
}

fn record() -> impl Strategy<Value = LogRecord> {
    (
        any::<i64>(),
        any::<u32>(),
        any::<u32>(),
        "[a-z]{0,15}",
        proptest::option::of("[ -~]{0,20}"),
        proptest::option::of(any::<u32>()),
        proptest::collection::vec(any::<u8>(), 0..120),
    )
        .prop_map(
            |(time_ns, tgid, flags, comm, exe, uid, message)| LogRecord {
                vm: VM.into(),
                vm_uuid: "u".into(),
                time_ns,
                vcpu: tgid % 4,
                cr3: u64::from(tgid) << 12,
                pid: tgid,
                tgid,
                comm,
                exe,
                uid,
                flags,
                message,
            },
        )
}

/// Every frame of every segment, in order: (segment, frame).
fn all(data: &std::path::Path) -> Vec<Vec<RawFrame>> {
    segments(data).iter().map(|p| frames(p)).collect()
}

fn write_all(data: &std::path::Path, segs: &[Vec<RawFrame>]) {
    for (i, f) in segs.iter().enumerate() {
        write_frames(&segment(data, i as u64), f);
    }
}

/// Applies `t`: `None` when it changed nothing (then it is not tampering),
/// else `Some(seq)` with the first bad seq `verify` must name, when the
/// operation determines it.
fn apply(data: &std::path::Path, t: &Tamper) -> Option<Option<u64>> {
    let mut segs = all(data);
    let flat: Vec<(usize, usize)> = segs
        .iter()
        .enumerate()
        .flat_map(|(s, f)| (0..f.len()).map(move |i| (s, i)))
        .collect();
    let n = flat.len();
    // Seq of the record at flat index k is k (the vault is 0..n).
    let first_of = |s: usize| flat.iter().position(|&(fs, _)| fs == s).map(|k| k as u64);
    let expected = match *t {
        Tamper::FlipSegmentByte { seg, pos, xor } => {
            let s = seg % segs.len();
            let path = segment(data, s as u64);
            let mut bytes = std::fs::read(&path).unwrap();
            if bytes.is_empty() {
                return None;
            }
            let p = pos % bytes.len();
            bytes[p] ^= xor;
            std::fs::write(&path, bytes).unwrap();
            let i = segs[s].iter().rposition(|f| f.offset <= p).unwrap();
            Some(segs[s][i].record.seq)
        }
        Tamper::FlipCheckpointByte { pos, xor } => {
            let path = checkpoints_path(data);
            let mut bytes = std::fs::read(&path).unwrap();
            let p = pos % bytes.len();
            bytes[p] ^= xor;
            std::fs::write(&path, bytes).unwrap();
            None
        }
        Tamper::Remove { rec } => {
            let (s, i) = flat[rec % n];
            segs[s].remove(i);
            write_all(data, &segs);
            Some((rec % n) as u64)
        }
        Tamper::Swap { a, b } => {
            let (a, b) = (flat[a % n], flat[b % n]);
            if a == b {
                return None;
            }
            let fa = segs[a.0][a.1].clone();
            let fb = std::mem::replace(&mut segs[b.0][b.1], fa);
            segs[a.0][a.1] = fb;
            write_all(data, &segs);
            Some(segs[a.0][a.1].record.seq.min(segs[b.0][b.1].record.seq))
        }
        Tamper::Duplicate { rec, at } => {
            let (s, i) = flat[rec % n];
            let copy = segs[s][i].clone();
            let (s2, i2) = flat[at % n];
            segs[s2].insert(i2 + (at / n) % 2, copy);
            write_all(data, &segs);
            None
        }
        Tamper::InsertForged { at } => {
            let (s, i) = flat[at % n];
            let target = &segs[s][i].record;
            let mut forged = target.record.clone();
            forged.message = b"<38>forged".to_vec();
            let (bytes, hash) = encode_record(target.seq, &target.prev_hash, &forged).unwrap();
            let mut frame = segs[s][i].clone();
            frame.bytes = bytes;
            frame.record.hash = hash;
            segs[s].insert(i, frame);
            write_all(data, &segs);
            Some((at % n) as u64)
        }
        Tamper::TruncateSegment { seg, cut } => {
            let s = seg % segs.len();
            let path = segment(data, s as u64);
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            if len == 0 {
                return None;
            }
            let cut = cut % len;
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(cut as u64).unwrap();
            // The first record not wholly kept.
            let i = segs[s]
                .iter()
                .position(|f| f.offset + f.bytes.len() > cut)
                .unwrap();
            Some(segs[s][i].record.seq)
        }
        Tamper::DeleteSegment { seg } => {
            let s = seg % segs.len();
            if segs[s].is_empty() {
                return None;
            }
            std::fs::remove_file(segment(data, s as u64)).unwrap();
            first_of(s)
        }
        Tamper::Rewrite { rec } => {
            // Change one record and re-chain everything after it.
            let start = rec % n;
            let mut prev = {
                let (s, i) = flat[start];
                segs[s][i].record.prev_hash
            };
            for (k, &(s, i)) in flat.iter().enumerate().skip(start) {
                let fr = &mut segs[s][i];
                let mut r = fr.record.record.clone();
                if k == start {
                    r.message.push(b'!');
                }
                let (bytes, hash) = encode_record(fr.record.seq, &prev, &r).unwrap();
                fr.bytes = bytes;
                prev = hash;
            }
            write_all(data, &segs);
            None
        }
    };
    Some(expected)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn any_tampering_is_detected(
        records in proptest::collection::vec(record(), 1..40),
        per_segment in 1u64..12,
        cp_every in 1u64..15,
        t in tamper(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        let cfg = VaultConfig {
            segment_max_bytes: 1 << 20,
            segment_max_records: per_segment,
            checkpoint_every_records: cp_every,
            checkpoint_every: Duration::from_secs(3600),
            fsync: Fsync::Never,
        };
        let mut v = Vault::open(data, VM, &signer(), cfg.clone()).unwrap();
        for r in &records {
            v.append(r.clone()).unwrap();
        }
        v.close().unwrap();
        prop_assert!(verify(data, VM).unwrap().ok());
        let Some(expected) = apply(data, &t) else {
            return Ok(());
        };
        let report = verify(data, VM).unwrap();
        prop_assert!(!report.ok(), "{:?} not detected: {}", t, report);
        if let (Some(seq), Some(bad)) = (expected, &report.first_bad) {
            prop_assert_eq!(bad.seq, seq, "{:?}: {}", t, bad);
        }
        // Readers and the writer never panic on it either.
        if let Ok(it) = read(data, VM, &Query::all()) {
            for r in it.take(1000) {
                let _ = r;
            }
        }
        let _ = Vault::open(data, VM, &signer(), cfg);
    }

    #[test]
    fn random_bytes_as_vault_files_never_panic(
        segment_bytes in proptest::collection::vec(any::<u8>(), 0..600),
        checkpoint_bytes in proptest::collection::vec(any::<u8>(), 0..300),
        magic in any::<bool>(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        drop(Vault::open(data, VM, &signer(), small_cfg()).unwrap());
        let mut seg = segment_bytes.clone();
        if magic && seg.len() >= 8 {
            // Reach past the magic check sometimes.
            seg[..4].copy_from_slice(b"LVR1");
        }
        std::fs::write(segment(data, 0), &seg).unwrap();
        let mut cp = checkpoint_bytes.clone();
        if magic && cp.len() >= 4 {
            cp[..4].copy_from_slice(b"LVC1");
        }
        std::fs::write(checkpoints_path(data), &cp).unwrap();

        let report = verify(data, VM).unwrap();
        let junk_segment = seg.iter().any(|&b| b != 0);
        if junk_segment {
            prop_assert!(!report.ok() || report.torn_tail.is_some(), "{}", report);
        }
        if let Ok(it) = read(data, VM, &Query::all()) {
            prop_assert!(it.filter(Result::is_ok).count() == 0);
        }
        let _ = Vault::open(data, VM, &signer(), small_cfg());
        // Checkpoint bytes of a whole frame's size that are not signed by
        // the key never verify.
        if cp.len() >= CHECKPOINT_LEN && cp.iter().any(|&b| b != 0) && report.records > 0 {
            prop_assert!(!report.ok());
        }
    }
}
