//! The writer: one [`Vault`] per VM, appending records, rotating segments,
//! syncing and signing checkpoints.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::files::{
    list_segments, move_tail_aside, segment_name, sync_dir, CheckpointReader, CpScanned,
    FrameReader, Scanned, CHECKPOINTS, LOCK, META,
};
use crate::format::{checkpoint_message, encode_record, hex, Checkpoint};
use crate::meta::VaultMeta;
use crate::{LogRecord, Signer, StoredRecord, VaultError};

/// When appended records are forced to disk (`fdatasync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every record: nothing acknowledged is lost in a host crash.
    EveryRecord,
    /// At most once per interval, from [`Vault::append`] and [`Vault::tick`]
    /// (call `tick` at least that often so that an idle vault gets synced):
    /// a host crash loses at most the last interval.
    Interval(Duration),
    /// Only on [`Vault::flush`] / [`Vault::close`] and segment rotation is
    /// not synced either (tests and benchmarks).
    Never,
}

/// Tunables of one vault.
#[derive(Debug, Clone)]
pub struct VaultConfig {
    /// Start a new segment before one would exceed this size.
    pub segment_max_bytes: u64,
    /// Start a new segment after this many records.
    pub segment_max_records: u64,
    /// Sign a checkpoint after this many records...
    pub checkpoint_every_records: u64,
    /// ...or when this much time has passed since the last one and there
    /// are unsigned records. Bounds the unsigned tail (see `verify`).
    pub checkpoint_every: Duration,
    pub fsync: Fsync,
}

impl Default for VaultConfig {
    fn default() -> Self {
        VaultConfig {
            segment_max_bytes: 64 << 20,
            segment_max_records: 1_000_000,
            checkpoint_every_records: 1000,
            checkpoint_every: Duration::from_secs(1),
            fsync: Fsync::Interval(Duration::from_millis(50)),
        }
    }
}

/// Checks that `vm` can name a directory: 1-64 of `A-Z a-z 0-9 . _ -`,
/// not `.` or `..`.
pub fn validate_vm_name(vm: &str) -> Result<(), VaultError> {
    let ok = !vm.is_empty()
        && vm.len() <= 64
        && vm != "."
        && vm != ".."
        && vm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(VaultError::InvalidVmName(vm.to_string()))
    }
}

pub(crate) fn now_ns() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

struct Segment {
    file: File,
    path: PathBuf,
    index: u64,
    bytes: u64,
    records: u64,
}

/// What a scan of the last segment found.
#[derive(Clone)]
struct Tail {
    records: u64,
    first: Option<(u64, [u8; 32])>,
    last: Option<(u64, [u8; 32])>,
    end: u64,
    torn_at: Option<u64>,
}

/// Scans one whole segment, checking every record's hash and the chain
/// inside it, and the checkpoint `cp` if its record is in there.
fn scan_segment(
    path: &Path,
    cp: Option<&Checkpoint>,
    vm: &str,
    dir: &Path,
) -> Result<Tail, VaultError> {
    let mut reader = FrameReader::open(path)?;
    let mut tail = Tail {
        records: 0,
        first: None,
        last: None,
        end: 0,
        torn_at: None,
    };
    while let Some(item) = reader.next_frame()? {
        match item {
            Scanned::Record {
                offset,
                len,
                record,
            } => {
                if let Some((seq, hash)) = tail.last {
                    if record.seq != seq.wrapping_add(1) || record.prev_hash != hash {
                        return Err(VaultError::Corrupt {
                            path: path.into(),
                            offset,
                            problem: format!("record does not follow seq {seq}"),
                        });
                    }
                }
                if let Some(cp) = cp {
                    if cp.seq == record.seq && cp.hash != record.hash {
                        return Err(VaultError::Inconsistent {
                            vm: vm.into(),
                            dir: dir.into(),
                            problem: format!(
                                "record {} differs from its signed checkpoint",
                                cp.seq
                            ),
                        });
                    }
                }
                tail.first.get_or_insert((record.seq, record.prev_hash));
                tail.last = Some((record.seq, record.hash));
                tail.records += 1;
                tail.end = offset + len;
            }
            Scanned::Bad { offset, problem } => {
                return Err(VaultError::Corrupt {
                    path: path.into(),
                    offset,
                    problem: problem.to_string(),
                })
            }
            Scanned::Torn { offset } => tail.torn_at = Some(offset),
        }
    }
    Ok(tail)
}

/// The vault of one VM, open for appending. Only one process may have a
/// vault open (an advisory lock on `<vm>/lock`); readers and `verify` need
/// no lock.
///
/// Errors: if a write fails, the partial frame is cut off again and the
/// vault stays usable; if that or a sync fails (after a failed fsync the
/// kernel may have dropped the data), the vault refuses further appends
/// with [`VaultError::Poisoned`] and must be reopened, which resumes from
/// what is really on disk (check [`Vault::last_seq`] to see whether the
/// last record made it).
pub struct Vault {
    dir: PathBuf,
    vm: String,
    cfg: VaultConfig,
    signer: Signer,
    meta: VaultMeta,
    genesis: [u8; 32],
    segment: Segment,
    cp_file: File,
    cp_path: PathBuf,
    next_seq: u64,
    last_hash: [u8; 32],
    last_cp_seq: Option<u64>,
    last_cp_at: Instant,
    last_sync: Instant,
    seg_dirty: bool,
    cp_dirty: bool,
    poisoned: Option<PathBuf>,
    closed: bool,
    _lock: File,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("dir", &self.dir)
            .field("next_seq", &self.next_seq)
            .field("segment", &self.segment.path)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Opens (or creates) the vault of `vm` under `data_dir/<vm>/`.
    ///
    /// An existing vault is resumed: the last segment is read whole (every
    /// hash and the chain inside it checked) to find the last seq and hash,
    /// and the last checkpoint is checked against it. A torn last frame (a
    /// crash in the middle of a write) is moved to `<segment>.torn` and cut
    /// off, with a warning; the same for a torn checkpoint. Any other damage
    /// is an error and nothing is changed.
    pub fn open(
        data_dir: &Path,
        vm: &str,
        signer: &Signer,
        cfg: VaultConfig,
    ) -> Result<Vault, VaultError> {
        validate_vm_name(vm)?;
        let dir = data_dir.join(vm);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| VaultError::io("create directory", &dir, e))?;
        let lock_path = dir.join(LOCK);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| VaultError::io("open", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(VaultError::Locked { path: lock_path })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(VaultError::io("lock", &lock_path, e))
            }
        }

        let meta_path = dir.join(META);
        let cp_path = dir.join(CHECKPOINTS);
        let segments = list_segments(&dir)?;
        let meta = if meta_path.exists() {
            let meta = VaultMeta::load(&meta_path, vm)?;
            if meta.public_key_bytes() != signer.public_key() {
                return Err(VaultError::KeyMismatch {
                    vm: vm.into(),
                    dir,
                    vault_key: meta.public_key.clone(),
                    signer_key: signer.public_key_hex(),
                });
            }
            meta
        } else if !segments.is_empty() || cp_path.exists() {
            return Err(VaultError::Meta {
                path: meta_path,
                problem: "missing while segments or checkpoints exist".into(),
            });
        } else {
            let meta = VaultMeta::new(vm, now_ns(), &signer.public_key());
            meta.store(&dir)?;
            tracing::info!(vm, dir = %dir.display(), "created log vault");
            meta
        };
        let genesis = meta.genesis_bytes();
        let inconsistent = |problem: String| VaultError::Inconsistent {
            vm: vm.into(),
            dir: dir.clone(),
            problem,
        };

        // The last checkpoint, checked before anything is changed.
        let mut cps = CheckpointReader::open(&cp_path)?;
        let mut last_cp: Option<Checkpoint> = None;
        let mut cp_torn_at = None;
        let mut cp_len = 0u64;
        while let Some(item) = cps.next_checkpoint()? {
            match item {
                CpScanned::Checkpoint { offset, cp } => {
                    cp_len = offset + crate::format::CHECKPOINT_LEN as u64;
                    last_cp = Some(cp);
                }
                CpScanned::Bad { offset, problem } => {
                    return Err(VaultError::Corrupt {
                        path: cp_path,
                        offset,
                        problem: problem.to_string(),
                    })
                }
                CpScanned::Torn { offset } => cp_torn_at = Some(offset),
            }
        }
        if let Some(cp) = &last_cp {
            if !cp.verify(&meta.verifying_key(), &genesis) {
                return Err(VaultError::Corrupt {
                    path: cp_path,
                    offset: cp_len - crate::format::CHECKPOINT_LEN as u64,
                    problem: "the last checkpoint's signature is not valid".into(),
                });
            }
        }

        // The chain's tail.
        for (i, (index, _)) in segments.iter().enumerate() {
            if *index != i as u64 {
                let missing = dir.join(segment_name(i as u64));
                return Err(inconsistent(format!("{} is missing", missing.display())));
            }
        }
        let mut next_seq = 0;
        let mut last_hash = genesis;
        let mut torn_fixes = Vec::new();
        let segment = match segments.last() {
            None => None,
            Some((index, path)) => {
                let tail = scan_segment(path, last_cp.as_ref(), vm, &dir)?;
                if let Some(at) = tail.torn_at {
                    torn_fixes.push((path.clone(), at));
                }
                let found = if tail.records == 0 && *index > 0 {
                    let (prev_index, prev_path) = &segments[segments.len() - 2];
                    let prev = scan_segment(prev_path, last_cp.as_ref(), vm, &dir)?;
                    if prev.torn_at.is_some() || prev.records == 0 {
                        return Err(VaultError::Corrupt {
                            path: prev_path.clone(),
                            offset: prev.end,
                            problem: "segment before the last one is empty or ends inside a record"
                                .into(),
                        });
                    }
                    Some((prev, *prev_index))
                } else if tail.records > 0 {
                    Some((tail.clone(), *index))
                } else {
                    None
                };
                if let Some((scan, scanned_index)) = found {
                    if scanned_index == 0 && scan.first != Some((0, genesis)) {
                        return Err(inconsistent(
                            "the first record does not start this vault's chain".into(),
                        ));
                    }
                    if let Some((seq, hash)) = scan.last {
                        next_seq = seq + 1;
                        last_hash = hash;
                    }
                }
                Some((*index, path.clone(), tail.end, tail.records))
            }
        };
        if let Some(cp) = &last_cp {
            if cp.seq >= next_seq {
                return Err(inconsistent(format!(
                    "checkpoint signs seq {} but the vault ends {}: records were lost",
                    cp.seq,
                    match next_seq {
                        0 => "before seq 0".to_string(),
                        n => format!("at seq {}", n - 1),
                    }
                )));
            }
        }

        // Checks passed: only now move torn tails aside.
        if let Some(at) = cp_torn_at {
            torn_fixes.push((cp_path.clone(), at));
        }
        for (path, at) in torn_fixes {
            let aside = move_tail_aside(&path, at)?;
            tracing::warn!(
                file = %path.display(), offset = at, moved_to = %aside.display(),
                "log vault: the last frame was torn (crash during a write); moved it aside and continued after the last whole record"
            );
        }

        let segment = match segment {
            Some((index, path, bytes, records)) => Segment {
                file: OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .map_err(|e| VaultError::io("open", &path, e))?,
                path,
                index,
                bytes,
                records,
            },
            None => create_segment(&dir, 0)?,
        };
        let cp_file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&cp_path)
            .map_err(|e| VaultError::io("open", &cp_path, e))?;
        sync_dir(&dir)?;
        let now = Instant::now();
        Ok(Vault {
            dir,
            vm: vm.to_string(),
            cfg,
            signer: signer.clone(),
            meta,
            genesis,
            segment,
            cp_file,
            cp_path,
            next_seq,
            last_hash,
            last_cp_seq: last_cp.map(|c| c.seq),
            last_cp_at: now,
            last_sync: now,
            seg_dirty: false,
            cp_dirty: false,
            poisoned: None,
            closed: false,
            _lock: lock,
        })
    }

    /// The VM this vault belongs to.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// `data_dir/<vm>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What `vault.json` says.
    pub fn meta(&self) -> &VaultMeta {
        &self.meta
    }

    /// Seq of the last stored record, `None` while the vault is empty.
    pub fn last_seq(&self) -> Option<u64> {
        self.next_seq.checked_sub(1)
    }

    /// Hash of the last stored record (the genesis hash while empty).
    pub fn last_hash(&self) -> [u8; 32] {
        self.last_hash
    }

    /// Records after the last signed checkpoint.
    pub fn unsigned_records(&self) -> u64 {
        self.next_seq - self.last_cp_seq.map_or(0, |s| s + 1)
    }

    fn usable(&self) -> Result<(), VaultError> {
        match &self.poisoned {
            Some(path) => Err(VaultError::Poisoned { path: path.clone() }),
            None => Ok(()),
        }
    }

    fn poison<T>(&mut self, path: PathBuf, err: VaultError) -> Result<T, VaultError> {
        tracing::error!(path = %path.display(), error = %err, "log vault write failed; refusing further appends until reopened");
        self.poisoned = Some(path);
        Err(err)
    }

    /// Appends one record: it gets the next seq and is chained to the last
    /// record. Syncs and signs a checkpoint when the config says so.
    pub fn append(&mut self, rec: LogRecord) -> Result<StoredRecord, VaultError> {
        self.usable()?;
        if rec.vm != self.vm {
            return Err(VaultError::VmMismatch {
                expected: self.vm.clone(),
                got: rec.vm,
            });
        }
        let seq = self.next_seq;
        let (frame, hash) = encode_record(seq, &self.last_hash, &rec)?;
        self.rotate_if_needed(frame.len() as u64)?;
        let seg = &mut self.segment;
        if let Err(e) = seg.file.write_all(&frame) {
            let err = VaultError::io("append to", &seg.path, e);
            // Cut the partial frame off so the chain never continues after
            // garbage; if even that fails, stop until reopened.
            if seg.file.set_len(seg.bytes).is_err() {
                let path = seg.path.clone();
                return self.poison(path, err);
            }
            return Err(err);
        }
        seg.bytes += frame.len() as u64;
        seg.records += 1;
        self.seg_dirty = true;
        let stored = StoredRecord {
            seq,
            prev_hash: self.last_hash,
            hash,
            record: rec,
        };
        self.next_seq += 1;
        self.last_hash = hash;

        let now = Instant::now();
        if self.unsigned_records() >= self.cfg.checkpoint_every_records.max(1)
            || now.saturating_duration_since(self.last_cp_at) >= self.cfg.checkpoint_every
        {
            self.checkpoint(now)?;
        }
        self.maybe_sync(now)?;
        Ok(stored)
    }

    /// Interval syncs and time-based checkpoints; call it periodically (at
    /// least as often as the sync interval).
    pub fn tick(&mut self, now: Instant) -> Result<(), VaultError> {
        self.usable()?;
        if self.unsigned_records() > 0
            && now.saturating_duration_since(self.last_cp_at) >= self.cfg.checkpoint_every
        {
            self.checkpoint(now)?;
        }
        self.maybe_sync(now)
    }

    /// Syncs everything and signs a checkpoint of the last record (whatever
    /// the fsync policy).
    pub fn flush(&mut self) -> Result<(), VaultError> {
        self.usable()?;
        let now = Instant::now();
        self.seg_dirty = true;
        self.sync_segment()?;
        self.checkpoint(now)?;
        self.cp_dirty = true;
        self.sync_checkpoints()?;
        self.last_sync = now;
        Ok(())
    }

    /// [`Vault::flush`], then closes the vault.
    pub fn close(mut self) -> Result<(), VaultError> {
        let r = self.flush();
        self.closed = true;
        r
    }

    fn rotate_if_needed(&mut self, frame_len: u64) -> Result<(), VaultError> {
        let seg = &self.segment;
        let full = seg.records >= self.cfg.segment_max_records.max(1)
            || seg.bytes + frame_len > self.cfg.segment_max_bytes;
        if seg.records == 0 || !full {
            return Ok(());
        }
        let index = seg.index + 1;
        if self.cfg.fsync != Fsync::Never {
            // Only the current segment may hold unsynced records.
            self.sync_segment()?;
        }
        let next = create_segment(&self.dir, index)?;
        if self.cfg.fsync != Fsync::Never {
            sync_dir(&self.dir)?;
        }
        self.segment = next;
        self.seg_dirty = false;
        Ok(())
    }

    fn sync_segment(&mut self) -> Result<(), VaultError> {
        if !self.seg_dirty {
            return Ok(());
        }
        if let Err(e) = self.segment.file.sync_data() {
            let path = self.segment.path.clone();
            return self.poison(path.clone(), VaultError::io("sync", path, e));
        }
        self.seg_dirty = false;
        Ok(())
    }

    fn sync_checkpoints(&mut self) -> Result<(), VaultError> {
        if !self.cp_dirty {
            return Ok(());
        }
        if let Err(e) = self.cp_file.sync_data() {
            let path = self.cp_path.clone();
            return self.poison(path.clone(), VaultError::io("sync", path, e));
        }
        self.cp_dirty = false;
        Ok(())
    }

    fn maybe_sync(&mut self, now: Instant) -> Result<(), VaultError> {
        let due = match self.cfg.fsync {
            Fsync::EveryRecord => true,
            Fsync::Interval(d) => now.saturating_duration_since(self.last_sync) >= d,
            Fsync::Never => false,
        };
        if due && (self.seg_dirty || self.cp_dirty) {
            self.sync_segment()?;
            self.sync_checkpoints()?;
            self.last_sync = now;
        }
        Ok(())
    }

    /// Signs "record `last_seq` has hash `last_hash`" into `checkpoints.log`.
    fn checkpoint(&mut self, now: Instant) -> Result<(), VaultError> {
        self.last_cp_at = now;
        let Some(seq) = self.last_seq() else {
            return Ok(());
        };
        if self.last_cp_seq == Some(seq) {
            return Ok(());
        }
        if self.cfg.fsync != Fsync::Never {
            // A checkpoint must never sign records that a crash can still take.
            self.sync_segment()?;
        }
        let time_ns = now_ns();
        let signature = self.signer.sign(&checkpoint_message(
            &self.genesis,
            seq,
            &self.last_hash,
            time_ns,
        ));
        let cp = Checkpoint {
            seq,
            hash: self.last_hash,
            time_ns,
            signature,
        };
        if let Err(e) = self.cp_file.write_all(&cp.encode()) {
            let path = self.cp_path.clone();
            return self.poison(path.clone(), VaultError::io("append to", path, e));
        }
        self.cp_dirty = true;
        self.last_cp_seq = Some(seq);
        tracing::trace!(vm = %self.vm, seq, hash = %hex(&self.last_hash), "log vault checkpoint");
        Ok(())
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        if !self.closed && self.poisoned.is_none() {
            if let Err(e) = self.flush() {
                tracing::warn!(vm = %self.vm, error = %e, "log vault: final flush failed");
            }
        }
    }
}

fn create_segment(dir: &Path, index: u64) -> Result<Segment, VaultError> {
    let path = dir.join(segment_name(index));
    let file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| VaultError::io("create", &path, e))?;
    Ok(Segment {
        file,
        path,
        index,
        bytes: 0,
        records: 0,
    })
}
