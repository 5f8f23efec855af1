//! Append throughput of the log vault per fsync policy, and verify speed.
//!
//! `cargo run --release -p logvault --example vault_append [DIR]`
//!
//! Appends ~120-byte syslog messages with the default segment and
//! checkpoint settings (64 MiB segments, a signed checkpoint every 1000
//! records or 1 s) into a temporary directory (or DIR: use the filesystem
//! the daemon will use; on tmpfs fsync costs nothing) and prints a Markdown
//! table.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use logvault::{verify, Fsync, LogRecord, Signer, Vault, VaultConfig};

fn record(i: u64) -> LogRecord {
    let mut message = format!(
        "<38>Nov 13 03:41:22 app[1234]: request {i:08} served in 12 ms from 10.0.2.15 status=200 bytes=5321"
    )
    .into_bytes();
    message.resize(120, b'.');
    LogRecord {
        vm: "bench".into(),
        vm_uuid: "4c4c4544-0042-3510-8052-b4c04f4d3732".into(),
        time_ns: 1_763_005_282_000_000_000 + i as i64,
        vcpu: (i % 2) as u32,
        cr3: 0x1a2b_3000,
        pid: 1234,
        tgid: 1234,
        comm: "app".into(),
        exe: Some("/usr/bin/app".into()),
        uid: Some(1000),
        flags: 0,
        message,
    }
}

fn main() {
    let base = std::env::args_os().nth(1).map(PathBuf::from);
    let tmp = match &base {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("cannot create a temporary directory");
    let signer = Signer::from_seed([42; 32]);
    let runs = [
        ("EveryRecord", Fsync::EveryRecord, 2_000u64),
        (
            "Interval(10 ms)",
            Fsync::Interval(Duration::from_millis(10)),
            200_000,
        ),
        ("Never", Fsync::Never, 200_000),
    ];
    println!("| fsync policy | records | seconds | records/s | µs/record |");
    println!("|---|---:|---:|---:|---:|");
    let mut verify_rows = Vec::new();
    for (i, (name, fsync, n)) in runs.into_iter().enumerate() {
        let data = tmp.path().join(format!("run{i}"));
        let cfg = VaultConfig {
            fsync,
            ..VaultConfig::default()
        };
        let start = Instant::now();
        let mut vault = Vault::open(&data, "bench", &signer, cfg).expect("open");
        for k in 0..n {
            vault.append(record(k)).expect("append");
        }
        vault.close().expect("close");
        let secs = start.elapsed().as_secs_f64();
        println!(
            "| {name} | {n} | {secs:.3} | {:.0} | {:.2} |",
            n as f64 / secs,
            secs * 1e6 / n as f64
        );
        let start = Instant::now();
        let report = verify(&data, "bench").expect("verify");
        assert!(report.ok(), "{report}");
        verify_rows.push((n, start.elapsed().as_secs_f64(), report.checkpoints));
    }
    let (n, secs, checkpoints) = verify_rows[2];
    println!();
    println!(
        "verify: {n} records (hashes, chain, {checkpoints} signed checkpoints) in {secs:.3} s = {:.0} records/s",
        n as f64 / secs
    );
}
