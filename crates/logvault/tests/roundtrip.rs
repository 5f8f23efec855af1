//! Writing, reopening and reading back: exact equality of every field.

mod common;

use std::time::{Duration, Instant};

use common::*;
use logvault::{read, verify, Fsync, Query, Signer, Vault, VaultConfig, VaultError};

#[test]
fn ten_thousand_records_across_segments_and_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let cfg = VaultConfig {
        segment_max_bytes: 64 * 1024,
        segment_max_records: 1_000_000,
        checkpoint_every_records: 500,
        checkpoint_every: Duration::from_secs(3600),
        fsync: Fsync::Never,
    };
    let mut written = Vec::new();
    let mut v = Vault::open(data, VM, &signer(), cfg.clone()).unwrap();
    assert_eq!(v.last_seq(), None);
    for i in 0..6000 {
        let s = v.append(rec(i)).unwrap();
        assert_eq!(s.seq, i);
        written.push(s);
    }
    v.close().unwrap();

    let mut v = Vault::open(data, VM, &signer(), cfg).unwrap();
    assert_eq!(v.last_seq(), Some(5999));
    assert_eq!(v.last_hash(), written[5999].hash);
    assert_eq!(v.unsigned_records(), 0);
    for i in 6000..10_000 {
        written.push(v.append(rec(i)).unwrap());
    }
    v.close().unwrap();

    let back = read_all(data);
    assert_eq!(back.len(), 10_000);
    for (i, (w, b)) in written.iter().zip(&back).enumerate() {
        assert_eq!(w, b, "record {i}");
        assert_eq!(b.record, rec(i as u64), "record {i}");
    }
    // The chain continues across the reopen.
    assert_eq!(back[6000].prev_hash, back[5999].hash);

    let segs = segments(data).len();
    assert!(segs > 10, "only {segs} segments");
    let report = verify(data, VM).unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.records, 10_000);
    assert_eq!(report.segments, segs as u64);
    assert_eq!(report.unsigned_tail, 0);
    assert_eq!(report.last_signed_seq, Some(9999));

    // Queries.
    let q = |query: Query| -> Vec<u64> {
        read(data, VM, &query)
            .unwrap()
            .map(|r| r.unwrap().seq)
            .collect()
    };
    let t = rec(9990).time_ns;
    assert_eq!(q(Query::all().since(t)), (9990..10_000).collect::<Vec<_>>());
    assert_eq!(
        q(Query::all().since(rec(10).time_ns).until(rec(13).time_ns)),
        vec![10, 11, 12]
    );
    assert_eq!(q(Query::all().after(9997)), vec![9998, 9999]);
    assert_eq!(q(Query::all().after(4321).limit(3)), vec![4322, 4323, 4324]);
    assert_eq!(
        q(Query::all().grep(r"message number 12\d\d ").unwrap()),
        (1200..1300).collect::<Vec<_>>()
    );
    // grep on raw bytes (messages with invalid UTF-8).
    let raw = q(Query::all().grep(r"(?-u)\xff\xfe").unwrap().limit(4));
    assert_eq!(raw, vec![0, 5, 10, 15]);
    assert_eq!(
        q(Query::all().grep("app3\\[").unwrap().after(9000).limit(2)),
        vec![9005, 9012]
    );
    assert!(matches!(
        Query::all().grep("("),
        Err(VaultError::Pattern(_))
    ));
}

#[test]
fn fsync_policies_and_tick() {
    for fsync in [
        Fsync::EveryRecord,
        Fsync::Interval(Duration::from_millis(1)),
        Fsync::Never,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = VaultConfig {
            fsync,
            checkpoint_every_records: 1000,
            checkpoint_every: Duration::from_millis(5),
            ..small_cfg()
        };
        let mut v = Vault::open(tmp.path(), VM, &signer(), cfg).unwrap();
        for i in 0..30 {
            v.append(rec(i)).unwrap();
        }
        // tick signs the unsigned records once the checkpoint interval passed.
        v.tick(Instant::now() + Duration::from_secs(1)).unwrap();
        assert_eq!(v.unsigned_records(), 0);
        // Leave without close: nothing more to sign.
        std::mem::forget(v);
        let report = verify(tmp.path(), VM).unwrap();
        assert!(report.ok(), "{fsync:?}: {report}");
        assert_eq!(report.records, 30);
        assert_eq!(report.unsigned_tail, 0);
    }
}

#[test]
fn unsigned_tail_is_reported_but_ok() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = Vault::open(tmp.path(), VM, &signer(), small_cfg()).unwrap();
    for i in 0..95 {
        v.append(rec(i)).unwrap();
    }
    assert_eq!(v.unsigned_records(), 5);
    std::mem::forget(v); // a crash: no final checkpoint
    let report = verify(tmp.path(), VM).unwrap();
    assert!(report.ok(), "{report}");
    assert_eq!(report.unsigned_tail, 5);
    assert_eq!(report.last_signed_seq, Some(89));
    assert!(report.to_string().contains("unsigned tail: 5 records"));
}

#[test]
fn one_writer_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let v = Vault::open(tmp.path(), VM, &signer(), small_cfg()).unwrap();
    let err = Vault::open(tmp.path(), VM, &signer(), small_cfg()).unwrap_err();
    assert!(matches!(err, VaultError::Locked { .. }), "{err}");
    drop(v);
    Vault::open(tmp.path(), VM, &signer(), small_cfg()).unwrap();
}

#[test]
fn another_key_cannot_append() {
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path(), 3, small_cfg());
    let other = Signer::from_seed([9; 32]);
    let err = Vault::open(tmp.path(), VM, &other, small_cfg()).unwrap_err();
    assert!(matches!(err, VaultError::KeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("move"), "{err}");
    // Still verifies with the key recorded in vault.json.
    assert!(verify(tmp.path(), VM).unwrap().ok());
    assert!(
        logvault::verify_with_key(tmp.path(), VM, &signer().public_key())
            .unwrap()
            .ok()
    );
}

#[test]
fn bad_input_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for bad in ["", ".", "..", "a/b", "x y", &"v".repeat(65)] {
        assert!(matches!(
            Vault::open(tmp.path(), bad, &signer(), small_cfg()),
            Err(VaultError::InvalidVmName(_))
        ));
    }
    let mut v = Vault::open(tmp.path(), VM, &signer(), small_cfg()).unwrap();
    let mut r = rec(0);
    r.vm = "db1".into();
    assert!(matches!(v.append(r), Err(VaultError::VmMismatch { .. })));
    let mut r = rec(0);
    r.message = vec![b'x'; logvault::format::MAX_MESSAGE + 1];
    let err = v.append(r).unwrap_err();
    assert!(
        matches!(
            err,
            VaultError::FieldTooLarge {
                field: "message",
                ..
            }
        ),
        "{err}"
    );
    // Nothing was stored by the refused appends.
    assert_eq!(v.last_seq(), None);
    v.append(rec(0)).unwrap();
    assert_eq!(v.last_seq(), Some(0));
    assert!(matches!(
        read(tmp.path(), "db1", &Query::all()),
        Err(VaultError::NotFound { .. })
    ));
}
