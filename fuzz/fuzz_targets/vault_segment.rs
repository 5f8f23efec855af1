//! Log vault files are on the host, but anyone who can write them (or a
//! crash, or a bad disk) decides their bytes: decoding, reading, verifying
//! and reopening a vault must never panic, hang or allocate unboundedly,
//! whatever a segment or `checkpoints.log` holds.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use logvault::format::{decode_frame, Checkpoint, Frame, CHECKPOINT_LEN};
use logvault::{
    check_identity, json_line, parse_syslog, read, rfc5424, verify, Fsync, Query, Signer, Vault,
    VaultConfig,
};

const VM: &str = "fuzz";

fn signer() -> Signer {
    Signer::from_seed([5; 32])
}

fn config() -> VaultConfig {
    VaultConfig {
        segment_max_records: 4,
        checkpoint_every_records: 2,
        fsync: Fsync::Never,
        ..VaultConfig::default()
    }
}

/// One data directory per fuzzing process, with a real `vault.json`.
fn data_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("logvault-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        drop(Vault::open(&dir, VM, &signer(), config()).expect("create vault"));
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    // In memory: frames back to back, checkpoints, syslog headers.
    let mut rest = data;
    while let Frame::Record { record, len } = decode_frame(rest) {
        let _ = rfc5424(&record, "");
        let _ = json_line(&record);
        let _ = check_identity(&record.record.message, record.record.tgid, &record.record.comm);
        rest = &rest[len..];
    }
    let key = signer().verifying_key();
    for chunk in data.chunks_exact(CHECKPOINT_LEN) {
        if let Ok(cp) = Checkpoint::decode(chunk.try_into().expect("exact chunk")) {
            let _ = cp.verify(&key, &[0; 32]);
        }
    }
    let h = parse_syslog(data);
    let _ = (h.tag, h.pid, h.body);

    // On disk: the first byte splits the rest into a segment and a
    // checkpoints file of a real vault.
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let (segment, checkpoints) = body.split_at(usize::from(split) * body.len() / 256);
    let dir = data_dir();
    let vault = dir.join(VM);
    if let Ok(entries) = std::fs::read_dir(&vault) {
        for e in entries.flatten() {
            if e.file_name() != "vault.json" && e.file_name() != "lock" {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    std::fs::write(vault.join("segment-000000.log"), segment).expect("write segment");
    std::fs::write(vault.join("checkpoints.log"), checkpoints).expect("write checkpoints");

    let _ = verify(dir, VM).map(|r| r.to_string());
    if let Ok(records) = read(dir, VM, &Query::all()) {
        for r in records.take(10_000) {
            let _ = r.map(|r| r.seq);
        }
    }
    if let Ok(mut v) = Vault::open(dir, VM, &signer(), config()) {
        let _ = v.flush();
    }
});
