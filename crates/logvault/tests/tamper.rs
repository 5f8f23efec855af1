//! Tampering with real vault files: `verify` must name exactly the first
//! bad record, and an untouched vault must verify clean.

mod common;

use common::*;
use logvault::format::{encode_record, CHECKPOINT_LEN};
use logvault::{verify, verify_with_key, BadKind, Signer, Vault, VaultError};

/// 100 records, 25 per segment (4 segments), a checkpoint every 10 records.
fn vault() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path(), 100, small_cfg());
    tmp
}

fn first_bad(data: &std::path::Path) -> (u64, BadKind) {
    let report = verify(data, VM).unwrap();
    let bad = report
        .first_bad
        .clone()
        .unwrap_or_else(|| panic!("tampering not detected: {report}"));
    assert!(!report.ok());
    (bad.seq, bad.what)
}

#[test]
fn untouched_vault_is_clean() {
    let tmp = vault();
    let report = verify(tmp.path(), VM).unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.records, 100);
    assert_eq!(report.segments, 4);
    assert_eq!(report.checkpoints, 10);
    assert_eq!(report.last_signed_seq, Some(99));
    assert_eq!(report.unsigned_tail, 0);
    assert!(report.torn_tail.is_none());
}

#[test]
fn flipped_byte_in_every_part_of_a_record() {
    let tmp = vault();
    let (path, _, frame) = locate(tmp.path(), 37);
    let original = std::fs::read(&path).unwrap();
    // Magic, length, prev_hash, seq, fields, message, stored hash.
    for at in [
        0,
        5,
        8,
        45,
        60,
        frame.bytes.len() / 2,
        frame.bytes.len() - 40,
        frame.bytes.len() - 1,
    ] {
        let mut bytes = original.clone();
        bytes[frame.offset + at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let report = verify(tmp.path(), VM).unwrap();
        let bad = report.first_bad.expect("not detected");
        assert_eq!(bad.seq, 37, "flip at {at}: {bad}");
        assert_eq!(bad.file, path);
        assert_eq!(bad.offset, frame.offset as u64, "flip at {at}: {bad}");
    }
    std::fs::write(&path, &original).unwrap();
    assert!(verify(tmp.path(), VM).unwrap().ok());
}

#[test]
fn removed_record() {
    let tmp = vault();
    let (path, i, _) = locate(tmp.path(), 37);
    let mut f = frames(&path);
    f.remove(i);
    write_frames(&path, &f);
    assert_eq!(first_bad(tmp.path()), (37, BadKind::Removed));
}

#[test]
fn swapped_records() {
    let tmp = vault();
    let (path, i, _) = locate(tmp.path(), 37);
    let mut f = frames(&path);
    f.swap(i, i + 1);
    write_frames(&path, &f);
    assert_eq!(first_bad(tmp.path()), (37, BadKind::Reordered));

    let tmp = vault();
    let mut f = frames(&path_of(tmp.path(), 37));
    let (_, i, _) = locate(tmp.path(), 37);
    f.swap(i, i + 5);
    write_frames(&path_of(tmp.path(), 37), &f);
    assert_eq!(first_bad(tmp.path()), (37, BadKind::Reordered));
}

fn path_of(data: &std::path::Path, seq: u64) -> std::path::PathBuf {
    locate(data, seq).0
}

#[test]
fn inserted_forged_record_with_valid_hash() {
    let tmp = vault();
    let (path, i, _) = locate(tmp.path(), 37);
    let (_, _, prev) = locate(tmp.path(), 36);
    let mut forged = rec(37);
    forged.message = b"<38>Nov 13 03:41:22 sshd[1]: Accepted password for root".to_vec();
    // The forger knows the format and the previous hash: the forged record
    // itself is valid and chains to seq 36...
    let (bytes, hash) = encode_record(37, &prev.record.hash, &forged).unwrap();
    let mut f = frames(&path);
    let forged_frame = RawFrame {
        offset: 0,
        bytes,
        record: logvault::StoredRecord {
            seq: 37,
            prev_hash: prev.record.hash,
            hash,
            record: forged,
        },
    };
    f.insert(i, forged_frame.clone());
    write_frames(&path, &f);
    // ...but the real seq 37 after it does not chain to it.
    let report = verify(tmp.path(), VM).unwrap();
    let bad = report.first_bad.unwrap();
    assert_eq!((bad.seq, bad.what), (37, BadKind::Inserted), "{bad}");
    assert_eq!(bad.offset, frames(&path)[i].offset as u64);

    // A foreign record with some other seq.
    let tmp = vault();
    let path = path_of(tmp.path(), 37);
    let (bytes, _) = encode_record(1000, &[1; 32], &rec(5)).unwrap();
    let mut f = frames(&path);
    let (_, i, _) = locate(tmp.path(), 37);
    f.insert(
        i,
        RawFrame {
            bytes,
            ..forged_frame.clone()
        },
    );
    write_frames(&path, &f);
    assert_eq!(first_bad(tmp.path()), (37, BadKind::Inserted));

    // A copy of an old record replayed.
    let tmp = vault();
    let path = path_of(tmp.path(), 37);
    let (_, _, old) = locate(tmp.path(), 30);
    let mut f = frames(&path);
    let (_, i, _) = locate(tmp.path(), 37);
    f.insert(i, old);
    write_frames(&path, &f);
    assert_eq!(first_bad(tmp.path()), (37, BadKind::Inserted));
}

#[test]
fn modified_record_with_recomputed_hash() {
    // 37: the next record's link breaks; 39: also its checkpoint disagrees;
    // 99: the last record, only its checkpoint disagrees.
    for (seq, kind) in [
        (37, BadKind::Modified),
        (39, BadKind::Modified),
        (99, BadKind::Rewritten),
    ] {
        let tmp = vault();
        let (path, i, frame) = locate(tmp.path(), seq);
        let mut changed = frame.record.record.clone();
        changed.message = b"<38>Nov 13 03:41:22 app2[1002]: nothing happened".to_vec();
        let (bytes, _) = encode_record(seq, &frame.record.prev_hash, &changed).unwrap();
        let mut f = frames(&path);
        f[i].bytes = bytes;
        write_frames(&path, &f);
        let expected_seq = if kind == BadKind::Rewritten { 90 } else { seq };
        assert_eq!(first_bad(tmp.path()), (expected_seq, kind), "seq {seq}");
    }
}

#[test]
fn inserted_before_a_signed_record() {
    // Record 39 is signed by a checkpoint; a forged seq 39 in front of it
    // is accepted by the chain but contradicts the checkpoint.
    let tmp = vault();
    let (path, i, real) = locate(tmp.path(), 39);
    let mut forged = real.record.record.clone();
    forged.message = b"<38>forged".to_vec();
    let (bytes, _) = encode_record(39, &real.record.prev_hash, &forged).unwrap();
    let mut f = frames(&path);
    f.insert(
        i,
        RawFrame {
            bytes,
            ..real.clone()
        },
    );
    write_frames(&path, &f);
    assert_eq!(first_bad(tmp.path()), (39, BadKind::Inserted));
}

#[test]
fn rewritten_chain_is_caught_by_the_checkpoint() {
    let tmp = vault();
    // Change record 37 and recompute every later hash: the chain is
    // consistent again, only the signed checkpoint of seq 39 disagrees.
    let mut prev = locate(tmp.path(), 36).2.record.hash;
    for path in segments(tmp.path()) {
        let mut f = frames(&path);
        for fr in f.iter_mut().filter(|fr| fr.record.seq >= 37) {
            let mut r = fr.record.record.clone();
            if fr.record.seq == 37 {
                r.message = b"<38>edited".to_vec();
            }
            let (bytes, hash) = encode_record(fr.record.seq, &prev, &r).unwrap();
            fr.bytes = bytes;
            prev = hash;
        }
        write_frames(&path, &f);
    }
    // The stretch after the last good checkpoint (seq 29) is named.
    assert_eq!(first_bad(tmp.path()), (30, BadKind::Rewritten));
}

#[test]
fn truncated_last_segment() {
    // Cut inside record 90.
    let tmp = vault();
    let (path, _, frame) = locate(tmp.path(), 90);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(frame.offset as u64 + 5).unwrap();
    assert_eq!(first_bad(tmp.path()), (90, BadKind::Truncated));

    // Cut exactly at a record boundary.
    let tmp = vault();
    let (path, _, frame) = locate(tmp.path(), 90);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(frame.offset as u64).unwrap();
    let report = verify(tmp.path(), VM).unwrap();
    let bad = report.first_bad.unwrap();
    assert_eq!((bad.seq, bad.what), (90, BadKind::Truncated), "{bad}");
    // open refuses to build on it.
    let err = Vault::open(tmp.path(), VM, &signer(), small_cfg()).unwrap_err();
    assert!(matches!(err, VaultError::Inconsistent { .. }), "{err}");
}

#[test]
fn deleted_segments() {
    let tmp = vault();
    std::fs::remove_file(segment(tmp.path(), 1)).unwrap();
    let report = verify(tmp.path(), VM).unwrap();
    let bad = report.first_bad.unwrap();
    assert_eq!((bad.seq, bad.what), (25, BadKind::SegmentMissing), "{bad}");
    assert_eq!(bad.file, segment(tmp.path(), 1));
    assert!(Vault::open(tmp.path(), VM, &signer(), small_cfg()).is_err());

    let tmp = vault();
    std::fs::remove_file(segment(tmp.path(), 0)).unwrap();
    assert_eq!(first_bad(tmp.path()), (0, BadKind::SegmentMissing));

    let tmp = vault();
    std::fs::remove_file(segment(tmp.path(), 3)).unwrap();
    assert_eq!(first_bad(tmp.path()), (75, BadKind::Truncated));

    // Renumbering the files to hide the gap leaves a seq gap.
    let tmp = vault();
    std::fs::remove_file(segment(tmp.path(), 1)).unwrap();
    std::fs::rename(segment(tmp.path(), 2), segment(tmp.path(), 1)).unwrap();
    std::fs::rename(segment(tmp.path(), 3), segment(tmp.path(), 2)).unwrap();
    assert_eq!(first_bad(tmp.path()), (25, BadKind::Removed));
}

#[test]
fn edited_checkpoints() {
    // Checkpoint 3 signs seq 39; change a byte of its hash, its time, its
    // signature.
    for at in [12, 30, 45, 60, CHECKPOINT_LEN - 1] {
        let tmp = vault();
        let path = checkpoints_path(tmp.path());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3 * CHECKPOINT_LEN + at] ^= 0x04;
        std::fs::write(&path, &bytes).unwrap();
        let report = verify(tmp.path(), VM).unwrap();
        let bad = report.first_bad.unwrap();
        assert_eq!(
            (bad.seq, bad.what),
            (39, BadKind::BadSignature),
            "byte {at}: {bad}"
        );
        assert_eq!(bad.file, path);
        assert_eq!(bad.offset, 3 * CHECKPOINT_LEN as u64);
    }
    // A checkpoint forged with another key.
    let tmp = vault();
    let path = checkpoints_path(tmp.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let forger = Signer::from_seed([1; 32]);
    let sig = {
        // Re-sign checkpoint 3's content with the wrong key via a vault of
        // the forger: simplest is to copy a checkpoint from a forger's vault.
        let other = tempfile::tempdir().unwrap();
        let mut v = Vault::open(other.path(), VM, &forger, small_cfg()).unwrap();
        for i in 0..10 {
            v.append(rec(i)).unwrap();
        }
        drop(v);
        std::fs::read(checkpoints_path(other.path())).unwrap()[..CHECKPOINT_LEN].to_vec()
    };
    bytes[..CHECKPOINT_LEN].copy_from_slice(&sig);
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(first_bad(tmp.path()), (9, BadKind::BadSignature));
}

#[test]
fn swapped_vault_json() {
    let tmp = vault();
    let other = tempfile::tempdir().unwrap();
    drop(Vault::open(other.path(), VM, &Signer::from_seed([3; 32]), small_cfg()).unwrap());
    std::fs::copy(
        vault_dir(other.path()).join("vault.json"),
        vault_dir(tmp.path()).join("vault.json"),
    )
    .unwrap();
    // Record 0 does not start from the other vault's genesis.
    assert_eq!(first_bad(tmp.path()), (0, BadKind::Modified));
    // And the daemon's real key is not the one in vault.json.
    let report = verify_with_key(tmp.path(), VM, &signer().public_key()).unwrap();
    assert_eq!(report.first_bad.unwrap().what, BadKind::UntrustedKey);
    // A hand-edited vault.json is refused outright.
    let meta = vault_dir(tmp.path()).join("vault.json");
    let text = std::fs::read_to_string(&meta)
        .unwrap()
        .replace("\"created_ns\": ", "\"created_ns\": 1");
    std::fs::write(&meta, text).unwrap();
    assert!(matches!(
        verify(tmp.path(), VM),
        Err(VaultError::Meta { .. })
    ));
}

#[test]
fn torn_tail_is_moved_aside_and_the_chain_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let mut written = build(data, 50, small_cfg());
    // A crash in the middle of writing record 50: half of its frame landed.
    let (bytes, _) = encode_record(50, &written[49].hash, &rec(50)).unwrap();
    let half = &bytes[..bytes.len() / 2];
    let last = segments(data).pop().unwrap();
    let before = std::fs::read(&last).unwrap();
    let mut torn = before.clone();
    torn.extend_from_slice(half);
    std::fs::write(&last, &torn).unwrap();

    // verify notices the torn frame; it was never signed, so it is ok.
    let report = verify(data, VM).unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.torn_tail, Some((last.clone(), before.len() as u64)));
    // Readers stop quietly before it (it looks like a write in progress).
    assert_eq!(read_all(data).len(), 50);

    let mut v = Vault::open(data, VM, &signer(), small_cfg()).unwrap();
    assert_eq!(v.last_seq(), Some(49));
    let aside = last.with_extension("log.torn");
    assert_eq!(std::fs::read(&aside).unwrap(), half);
    assert_eq!(std::fs::read(&last).unwrap(), before);
    for i in 50..60 {
        written.push(v.append(rec(i)).unwrap());
    }
    v.close().unwrap();
    let report = verify(data, VM).unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.records, 60);
    assert_eq!(report.torn_files, vec![aside]);
    assert_eq!(read_all(data), written);

    // A zero-filled tail (file grew, data never landed) is handled the same.
    let last = segments(data).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    bytes.extend_from_slice(&[0; 300]);
    std::fs::write(&last, &bytes).unwrap();
    assert!(verify(data, VM).unwrap().ok());
    let v = Vault::open(data, VM, &signer(), small_cfg()).unwrap();
    assert_eq!(v.last_seq(), Some(59));
    drop(v);
    assert!(last.with_extension("log.torn").exists());

    // A torn checkpoint too.
    let cps = checkpoints_path(data);
    let mut bytes = std::fs::read(&cps).unwrap();
    let n = bytes.len();
    bytes.extend_from_within(n - CHECKPOINT_LEN..n - 50);
    std::fs::write(&cps, &bytes).unwrap();
    assert!(verify(data, VM).unwrap().ok());
    drop(Vault::open(data, VM, &signer(), small_cfg()).unwrap());
    assert_eq!(std::fs::metadata(&cps).unwrap().len() as usize, n);
    assert!(verify(data, VM).unwrap().ok());
}

#[test]
fn damage_in_the_middle_is_never_overwritten() {
    let tmp = vault();
    let (path, _, frame) = locate(tmp.path(), 90);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[frame.offset + 20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = Vault::open(tmp.path(), VM, &signer(), small_cfg()).unwrap_err();
    assert!(matches!(err, VaultError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("verify"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    // Readers stop with an error at the damaged record.
    let results: Vec<_> = logvault::read(tmp.path(), VM, &logvault::Query::all())
        .unwrap()
        .collect();
    assert_eq!(results.len(), 91);
    assert!(results[..90].iter().all(Result::is_ok));
    assert!(results[90].is_err());
}
