//! `verify`: walks a vault's whole chain and its signed checkpoints and
//! names the first record that is not what was written.
//!
//! Each record's hash covers its content and the previous record's hash, and
//! each checkpoint signs (seq, hash) of a record with the key recorded in
//! `vault.json`, bound to the vault by the genesis hash. So:
//! - a changed byte breaks that record's own hash (**modified**);
//! - a record taken out leaves a seq gap (**removed**), a whole segment
//!   file taken out leaves a gap in the file numbers (**segment missing**);
//! - a record put in, even with a correct hash, does not chain to both
//!   neighbours (**inserted**); records moved around arrive out of seq
//!   (**reordered**);
//! - records cut off the end are missing below the last signed checkpoint
//!   (**truncated**);
//! - a changed checkpoint fails its signature (**bad signature**);
//! - a rewritten stretch of chain (records changed and every later hash
//!   recomputed) contradicts the next signed checkpoint (**rewritten**;
//!   only the stretch since the previous good checkpoint can be named).
//!
//! What it cannot see: records after the last checkpoint that were cut
//! off cleanly (the unsigned tail, reported as a count; bounded by the
//! checkpoint interval), checkpoints cut off the end of `checkpoints.log`
//! together with their records, and a vault re-created wholesale with a
//! new key (use [`verify_with_key`] with the daemon's known public key,
//! and export checkpoints off the host for stronger guarantees).

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::export::rfc3339;
use crate::files::{
    list_segments, list_torn, segment_name, CheckpointReader, CpScanned, FrameReader, Scanned,
    CHECKPOINTS, META,
};
use crate::format::{hex, Checkpoint, FrameError};
use crate::meta::VaultMeta;
use crate::vault::validate_vm_name;
use crate::VaultError;

/// How many records `verify` reads past an anomaly to tell a removed
/// record from a moved or an inserted one.
const LOOKAHEAD: usize = 4096;

/// What is wrong with the first bad record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    /// Bytes changed (the record's hash does not match, or it cannot be
    /// decoded, or its hash was recomputed but it no longer chains).
    Modified,
    /// One or more records are missing from the middle.
    Removed,
    /// A record that was never written stands in the chain.
    Inserted,
    /// Records are stored out of order.
    Reordered,
    /// Records are missing at the end (fewer than a signed checkpoint says),
    /// or a segment ends inside a record.
    Truncated,
    /// A segment file is missing.
    SegmentMissing,
    /// A checkpoint's signature does not verify (forged or modified).
    BadSignature,
    /// The chain is self-consistent but contradicts a signed checkpoint:
    /// records were changed and every later hash recomputed.
    Rewritten,
    /// `vault.json` names another key than the one the caller trusts.
    UntrustedKey,
}

impl BadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BadKind::Modified => "modified",
            BadKind::Removed => "removed",
            BadKind::Inserted => "inserted",
            BadKind::Reordered => "reordered",
            BadKind::Truncated => "truncated",
            BadKind::SegmentMissing => "segment missing",
            BadKind::BadSignature => "bad signature",
            BadKind::Rewritten => "rewritten",
            BadKind::UntrustedKey => "untrusted key",
        }
    }
}

impl fmt::Display for BadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The first place where the vault differs from what was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// The first seq whose record is not intact where it belongs (for a
    /// checkpoint problem: the seq the checkpoint is about; for
    /// `Rewritten`: the first seq of the stretch that may have changed).
    pub seq: u64,
    /// The file where the problem was seen (segment, `checkpoints.log`,
    /// `vault.json`, or the missing segment's name).
    pub file: PathBuf,
    /// Byte offset in `file`.
    pub offset: u64,
    pub what: BadKind,
    pub detail: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seq {}: {} ({} offset {}): {}",
            self.seq,
            self.what,
            self.file.display(),
            self.offset,
            self.detail
        )
    }
}

/// Result of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Segment files found.
    pub segments: u64,
    /// Records verified in order (up to the first bad one).
    pub records: u64,
    /// Checkpoints whose signature and hash were verified.
    pub checkpoints: u64,
    /// Seq of the last verified checkpoint.
    pub last_signed_seq: Option<u64>,
    /// Records after the last verified checkpoint: chained correctly but not
    /// signed yet. Cutting these off cleanly cannot be detected.
    pub unsigned_tail: u64,
    /// A frame cut off at the end of the last segment (a crash during a
    /// write, or a write in progress): file and offset. Not an error by
    /// itself; `truncated` if a checkpoint had signed it.
    pub torn_tail: Option<(PathBuf, u64)>,
    /// Torn fragments that `open` moved aside earlier (`*.torn*`).
    pub torn_files: Vec<PathBuf>,
    pub first_bad: Option<BadRecord>,
}

impl VerifyReport {
    /// True when nothing was found wrong.
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.first_bad {
            None => writeln!(
                f,
                "ok: {} records in {} segments",
                self.records, self.segments
            )?,
            Some(bad) => writeln!(f, "TAMPERED: first bad record: {bad}")?,
        }
        writeln!(
            f,
            "checkpoints verified: {} (last signs seq {})",
            self.checkpoints,
            self.last_signed_seq
                .map_or_else(|| "-".to_string(), |s| s.to_string())
        )?;
        if self.unsigned_tail > 0 {
            writeln!(f, "unsigned tail: {} records", self.unsigned_tail)?;
        }
        if let Some((file, offset)) = &self.torn_tail {
            writeln!(f, "torn last frame: {} offset {offset}", file.display())?;
        }
        for t in &self.torn_files {
            writeln!(f, "fragment moved aside earlier: {}", t.display())?;
        }
        Ok(())
    }
}

/// Verifies the vault of `vm` under `data_dir/<vm>/` against the public key
/// recorded in its `vault.json`. Needs no lock (it sees a consistent prefix
/// while the daemon appends). I/O problems and an unreadable `vault.json`
/// are errors; everything found in the records is in the report.
pub fn verify(data_dir: &Path, vm: &str) -> Result<VerifyReport, VaultError> {
    verify_inner(data_dir, vm, None)
}

/// [`verify`], and also require that the vault's key is `trusted` (the
/// daemon's public key known from elsewhere): catches a vault re-created
/// wholesale and re-signed with another key.
pub fn verify_with_key(
    data_dir: &Path,
    vm: &str,
    trusted: &[u8; 32],
) -> Result<VerifyReport, VaultError> {
    verify_inner(data_dir, vm, Some(trusted))
}

/// A record's identity, without its content.
#[derive(Debug, Clone)]
struct RecMeta {
    seq: u64,
    prev: [u8; 32],
    hash: [u8; 32],
    seg: usize,
    offset: u64,
}

enum Item {
    Rec(RecMeta),
    Bad {
        seg: usize,
        offset: u64,
        problem: FrameError,
    },
    Torn {
        seg: usize,
        offset: u64,
        last: bool,
    },
    Missing {
        index: u64,
    },
}

/// All segments' frames in order, with a look-ahead buffer.
struct Stream {
    segments: Vec<(u64, PathBuf)>,
    next_segment: usize,
    reader: Option<(FrameReader, usize)>,
    buffer: VecDeque<Item>,
    ended: bool,
}

impl Stream {
    fn pull(&mut self) -> Result<Option<Item>, VaultError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            let Some((reader, seg)) = self.reader.as_mut() else {
                let Some((index, path)) = self.segments.get(self.next_segment) else {
                    self.ended = true;
                    return Ok(None);
                };
                let expected = match self.next_segment {
                    0 => 0,
                    n => self.segments[n - 1].0 + 1,
                };
                if *index != expected {
                    self.ended = true;
                    return Ok(Some(Item::Missing { index: expected }));
                }
                self.reader = Some((FrameReader::open(path)?, self.next_segment));
                self.next_segment += 1;
                continue;
            };
            let seg = *seg;
            let last = self.next_segment == self.segments.len();
            let item = match reader.next_frame()? {
                None => {
                    self.reader = None;
                    continue;
                }
                Some(Scanned::Record { offset, record, .. }) => Item::Rec(RecMeta {
                    seq: record.seq,
                    prev: record.prev_hash,
                    hash: record.hash,
                    seg,
                    offset,
                }),
                Some(Scanned::Bad { offset, problem }) => {
                    self.ended = true;
                    Item::Bad {
                        seg,
                        offset,
                        problem,
                    }
                }
                Some(Scanned::Torn { offset }) => {
                    if !last {
                        self.ended = true;
                    }
                    Item::Torn { seg, offset, last }
                }
            };
            return Ok(Some(item));
        }
    }

    fn next(&mut self) -> Result<Option<Item>, VaultError> {
        match self.buffer.pop_front() {
            Some(item) => Ok(Some(item)),
            None => self.pull(),
        }
    }

    /// Up to `n` records following the current position (stops at anything
    /// that is not a record).
    fn lookahead(&mut self, n: usize) -> Result<Vec<RecMeta>, VaultError> {
        while self.buffer.len() < n && matches!(self.buffer.back(), None | Some(Item::Rec(_))) {
            match self.pull()? {
                Some(item) => self.buffer.push_back(item),
                None => break,
            }
        }
        Ok(self
            .buffer
            .iter()
            .map_while(|i| match i {
                Item::Rec(r) => Some(r.clone()),
                _ => None,
            })
            .collect())
    }
}

enum Pending {
    Cp { offset: u64, cp: Checkpoint },
    Bad { offset: u64, problem: FrameError },
}

fn next_checkpoint(
    cps: &mut CheckpointReader,
    report: &mut VerifyReport,
) -> Result<Option<Pending>, VaultError> {
    Ok(match cps.next_checkpoint()? {
        None => None,
        Some(CpScanned::Checkpoint { offset, cp }) => Some(Pending::Cp { offset, cp }),
        Some(CpScanned::Bad { offset, problem }) => Some(Pending::Bad { offset, problem }),
        Some(CpScanned::Torn { offset }) => {
            // A checkpoint cut short by a crash signs nothing; `open` moves
            // it aside. Report it like a torn record.
            if report.torn_tail.is_none() {
                report.torn_tail = Some((cps.path.clone(), offset));
            }
            None
        }
    })
}

struct Walk {
    segments: Vec<(u64, PathBuf)>,
    dir: PathBuf,
    cp_path: PathBuf,
}

impl Walk {
    fn seg_path(&self, seg: usize) -> PathBuf {
        self.segments[seg].1.clone()
    }
}

fn verify_inner(
    data_dir: &Path,
    vm: &str,
    trusted: Option<&[u8; 32]>,
) -> Result<VerifyReport, VaultError> {
    validate_vm_name(vm)?;
    let dir = data_dir.join(vm);
    let meta_path = dir.join(META);
    if !meta_path.exists() {
        return Err(VaultError::NotFound {
            vm: vm.into(),
            dir: data_dir.into(),
        });
    }
    let meta = VaultMeta::load(&meta_path, vm)?;
    let mut report = VerifyReport {
        torn_files: list_torn(&dir)?,
        ..VerifyReport::default()
    };
    if let Some(trusted) = trusted {
        if meta.public_key_bytes() != *trusted {
            report.first_bad = Some(BadRecord {
                seq: 0,
                file: meta_path,
                offset: 0,
                what: BadKind::UntrustedKey,
                detail: format!(
                    "the vault's key {} is not the trusted key {}",
                    meta.public_key,
                    hex(trusted)
                ),
            });
            return Ok(report);
        }
    }
    let key = meta.verifying_key();
    let genesis = meta.genesis_bytes();

    // Checkpoints are opened before the segments are listed: every
    // checkpoint seen then signs records that are already in the segments
    // (the writer writes records before the checkpoint that signs them).
    let cp_path = dir.join(CHECKPOINTS);
    let mut cps = CheckpointReader::open(&cp_path)?;
    let segments = list_segments(&dir)?;
    report.segments = segments.len() as u64;
    let walk = Walk {
        segments: segments.clone(),
        dir: dir.clone(),
        cp_path: cp_path.clone(),
    };
    let mut stream = Stream {
        segments,
        next_segment: 0,
        reader: None,
        buffer: VecDeque::new(),
        ended: false,
    };

    let mut expected = 0u64;
    let mut hash = genesis;
    let mut last: Option<RecMeta> = None;
    let mut last_good_cp: Option<u64> = None;
    let mut pending = next_checkpoint(&mut cps, &mut report)?;
    let mut end_of_chain: Option<(PathBuf, u64)> = None;

    let bad = |report: &mut VerifyReport, seq, file, offset, what, detail: String| {
        report.first_bad = Some(BadRecord {
            seq,
            file,
            offset,
            what,
            detail,
        });
    };

    while let Some(item) = stream.next()? {
        let r = match item {
            Item::Missing { index } => {
                bad(
                    &mut report,
                    expected,
                    walk.dir.join(segment_name(index)),
                    0,
                    BadKind::SegmentMissing,
                    format!("segment file {} is missing", segment_name(index)),
                );
                return Ok(finish(report, expected, last_good_cp));
            }
            Item::Bad {
                seg,
                offset,
                problem,
            } => {
                bad(
                    &mut report,
                    expected,
                    walk.seg_path(seg),
                    offset,
                    BadKind::Modified,
                    format!("record bytes changed: {problem}"),
                );
                return Ok(finish(report, expected, last_good_cp));
            }
            Item::Torn {
                seg,
                offset,
                last: false,
            } => {
                bad(
                    &mut report,
                    expected,
                    walk.seg_path(seg),
                    offset,
                    BadKind::Truncated,
                    "segment ends inside a record (cut short or its length changed)".into(),
                );
                return Ok(finish(report, expected, last_good_cp));
            }
            Item::Torn {
                seg,
                offset,
                last: true,
            } => {
                report.torn_tail = Some((walk.seg_path(seg), offset));
                end_of_chain = Some((walk.seg_path(seg), offset));
                break;
            }
            Item::Rec(r) => r,
        };
        if r.seq != expected || r.prev != hash {
            let (what, seq, seg, offset, detail) =
                classify(&r, expected, &hash, last.as_ref(), &mut stream)?;
            bad(&mut report, seq, walk.seg_path(seg), offset, what, detail);
            return Ok(finish(report, expected, last_good_cp));
        }
        report.records += 1;
        expected += 1;
        hash = r.hash;
        // Every checkpoint about this record.
        while let Some(p) = pending.take() {
            match p {
                Pending::Bad { offset, problem } => {
                    bad(
                        &mut report,
                        last_good_cp.map_or(0, |s| s + 1),
                        walk.cp_path.clone(),
                        offset,
                        BadKind::BadSignature,
                        format!("not a checkpoint: {problem}"),
                    );
                    return Ok(finish(report, expected, last_good_cp));
                }
                Pending::Cp { offset, cp } => {
                    if cp.seq > r.seq {
                        pending = Some(Pending::Cp { offset, cp });
                        break;
                    }
                    if !cp.verify(&key, &genesis) {
                        bad(
                            &mut report,
                            cp.seq,
                            walk.cp_path.clone(),
                            offset,
                            BadKind::BadSignature,
                            "checkpoint signature does not verify (forged or modified)".into(),
                        );
                        return Ok(finish(report, expected, last_good_cp));
                    }
                    if cp.seq < r.seq {
                        bad(
                            &mut report,
                            cp.seq,
                            walk.cp_path.clone(),
                            offset,
                            BadKind::Reordered,
                            format!(
                                "checkpoint for seq {} is stored after one for seq {}",
                                cp.seq,
                                last_good_cp.unwrap_or(0)
                            ),
                        );
                        return Ok(finish(report, expected, last_good_cp));
                    }
                    if cp.hash != r.hash {
                        // The record right after tells which record the
                        // checkpoint really signed, if it is still there.
                        let next = stream.lookahead(1)?.into_iter().next();
                        if let Some(n) = next {
                            let inserted = n.seq == r.seq && n.prev == r.prev && n.hash == cp.hash;
                            let modified = n.seq == r.seq + 1 && n.prev == cp.hash;
                            if inserted || modified {
                                let (what, detail) = if inserted {
                                    (BadKind::Inserted, format!("a record with a recomputed hash was put in front of the real (signed) seq {}", r.seq))
                                } else {
                                    (BadKind::Modified, format!("record {} was changed and its hash recomputed (its checkpoint and seq {} say otherwise)", r.seq, n.seq))
                                };
                                bad(
                                    &mut report,
                                    r.seq,
                                    walk.seg_path(r.seg),
                                    r.offset,
                                    what,
                                    detail,
                                );
                                return Ok(finish(report, expected, last_good_cp));
                            }
                        }
                        let from = last_good_cp.map_or(0, |s| s + 1);
                        bad(
                            &mut report,
                            from,
                            walk.cp_path.clone(),
                            offset,
                            BadKind::Rewritten,
                            format!(
                                "the checkpoint signed {} for seq {} has another hash: records {from}..={} were changed and re-chained",
                                rfc3339(cp.time_ns, 3),
                                cp.seq,
                                cp.seq
                            ),
                        );
                        return Ok(finish(report, expected, last_good_cp));
                    }
                    report.checkpoints += 1;
                    last_good_cp = Some(cp.seq);
                    pending = next_checkpoint(&mut cps, &mut report)?;
                }
            }
        }
        last = Some(r);
    }

    // The chain ended; a checkpoint beyond it means records were cut off.
    if let Some(p) = pending {
        let (file, offset) = end_of_chain.unwrap_or_else(|| match walk.segments.last() {
            Some((_, path)) => {
                let len = std::fs::metadata(path).map_or(0, |m| m.len());
                (path.clone(), len)
            }
            None => (walk.dir.join(segment_name(0)), 0),
        });
        match p {
            Pending::Bad { offset, problem } => bad(
                &mut report,
                last_good_cp.map_or(0, |s| s + 1),
                walk.cp_path.clone(),
                offset,
                BadKind::BadSignature,
                format!("not a checkpoint: {problem}"),
            ),
            Pending::Cp {
                offset: cp_offset,
                cp,
            } => {
                if !cp.verify(&key, &genesis) {
                    bad(
                        &mut report,
                        cp.seq,
                        walk.cp_path.clone(),
                        cp_offset,
                        BadKind::BadSignature,
                        "checkpoint signature does not verify (forged or modified)".into(),
                    );
                } else {
                    bad(
                        &mut report,
                        expected,
                        file,
                        offset,
                        BadKind::Truncated,
                        format!(
                            "a checkpoint signed {} covers seq {} but the vault ends {}: records from seq {expected} on were cut off",
                            rfc3339(cp.time_ns, 3),
                            cp.seq,
                            match expected {
                                0 => "before seq 0".to_string(),
                                n => format!("at seq {}", n - 1),
                            }
                        ),
                    );
                }
            }
        }
    }
    Ok(finish(report, expected, last_good_cp))
}

fn finish(mut report: VerifyReport, expected: u64, last_good_cp: Option<u64>) -> VerifyReport {
    report.last_signed_seq = last_good_cp;
    report.unsigned_tail = if report.first_bad.is_none() {
        expected - last_good_cp.map_or(0, |s| s + 1)
    } else {
        0
    };
    report
}

/// Names the first bad record when record `r` does not continue the chain
/// (expected seq `e`, previous hash `h`, last good record `last`).
fn classify(
    r: &RecMeta,
    e: u64,
    h: &[u8; 32],
    last: Option<&RecMeta>,
    stream: &mut Stream,
) -> Result<(BadKind, u64, usize, u64, String), VaultError> {
    if r.seq < e {
        if let Some(l) = last {
            if r.seq == l.seq && r.prev == l.prev && r.hash != l.hash {
                // Two different records both chain to seq l.seq - 1: the
                // first of them was put in front of the real one.
                return Ok((
                    BadKind::Inserted,
                    l.seq,
                    l.seg,
                    l.offset,
                    format!(
                        "a record with a valid hash was put in front of the real seq {}",
                        l.seq
                    ),
                ));
            }
        }
        return Ok((
            BadKind::Inserted,
            e,
            r.seg,
            r.offset,
            format!(
                "a record with seq {} stands where seq {e} belongs (copied or replayed)",
                r.seq
            ),
        ));
    }
    if r.seq != e && r.prev == *h {
        return Ok((
            BadKind::Modified,
            e,
            r.seg,
            r.offset,
            format!("seq changed to {} and the hash recomputed", r.seq),
        ));
    }
    let window = stream.lookahead(LOOKAHEAD)?;
    let real = window.iter().position(|w| w.seq == e && w.prev == *h);
    if r.seq == e {
        if real == Some(0) {
            return Ok((
                BadKind::Inserted,
                e,
                r.seg,
                r.offset,
                format!("a record with a recomputed hash was put in front of the real seq {e}"),
            ));
        }
        return Ok(match last {
            None => (
                BadKind::Modified,
                e,
                r.seg,
                r.offset,
                "record 0 does not start from this vault's genesis (vault.json replaced, or a segment from another vault)".into(),
            ),
            // The link between the last good record and this one is
            // broken with both hashes valid: the last good record's content
            // was changed and its hash recomputed (or this record's link).
            Some(l) => (
                BadKind::Modified,
                l.seq,
                l.seg,
                l.offset,
                format!(
                    "record {} was changed and its hash recomputed (seq {e} does not chain to it)",
                    l.seq
                ),
            ),
        });
    }
    // r.seq > e: seq e is not here.
    Ok(match real {
        Some(_)
            if window
                .iter()
                .any(|w| w.seq.wrapping_add(1) == r.seq && w.hash == r.prev) =>
        {
            (
                BadKind::Reordered,
                e,
                r.seg,
                r.offset,
                format!("seq {} is stored before seq {e}", r.seq),
            )
        }
        Some(_) => (
            BadKind::Inserted,
            e,
            r.seg,
            r.offset,
            format!(
                "a record with seq {} that does not belong stands before seq {e}",
                r.seq
            ),
        ),
        None if r.seq == e + 1 => (
            BadKind::Removed,
            e,
            r.seg,
            r.offset,
            format!("record {e} is missing"),
        ),
        None => (
            BadKind::Removed,
            e,
            r.seg,
            r.offset,
            format!("records {e}..={} are missing", r.seq - 1),
        ),
    })
}
