//! Reading a vault back: filtered iteration over the stored records.

use std::path::{Path, PathBuf};

use crate::files::{list_segments, segment_name, FrameReader, Scanned, META};
use crate::meta::VaultMeta;
use crate::vault::validate_vm_name;
use crate::{StoredRecord, VaultError};

/// Which records [`read`] returns. All conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only records with `time_ns >= since_ns`.
    pub since_ns: Option<i64>,
    /// Only records with `time_ns < until_ns`.
    pub until_ns: Option<i64>,
    /// Only records whose raw message bytes match (`regex::bytes`, so
    /// non-UTF-8 messages can be searched too).
    pub grep: Option<regex::bytes::Regex>,
    /// Only records with `seq > after_seq` (for "continue from here").
    pub after_seq: Option<u64>,
    /// At most this many records.
    pub limit: Option<usize>,
}

impl Query {
    /// Every record.
    pub fn all() -> Query {
        Query::default()
    }

    pub fn since(mut self, time_ns: i64) -> Query {
        self.since_ns = Some(time_ns);
        self
    }

    pub fn until(mut self, time_ns: i64) -> Query {
        self.until_ns = Some(time_ns);
        self
    }

    pub fn after(mut self, seq: u64) -> Query {
        self.after_seq = Some(seq);
        self
    }

    pub fn limit(mut self, n: usize) -> Query {
        self.limit = Some(n);
        self
    }

    /// Adds a regular expression on the message (compiled size capped, so
    /// a user-supplied pattern cannot eat the daemon's memory).
    pub fn grep(mut self, pattern: &str) -> Result<Query, VaultError> {
        let re = regex::bytes::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| VaultError::Pattern(e.to_string().replace('\n', " ")))?;
        self.grep = Some(re);
        Ok(self)
    }

    /// True when `rec` passes every condition except `limit`.
    pub fn matches(&self, rec: &StoredRecord) -> bool {
        self.after_seq.is_none_or(|a| rec.seq > a)
            && self.since_ns.is_none_or(|t| rec.record.time_ns >= t)
            && self.until_ns.is_none_or(|t| rec.record.time_ns < t)
            && self
                .grep
                .as_ref()
                .is_none_or(|re| re.is_match(&rec.record.message))
    }
}

/// Iterator returned by [`read`].
///
/// Every record's hash is checked, and each record must follow the one
/// before it (seq and `prev_hash`); the first problem is returned as an
/// error and ends the iteration (run [`crate::verify`] for the full
/// diagnosis). A frame cut off at the end of the last segment is a write in
/// progress and ends the iteration quietly. With `after_seq`, whole
/// segments before it are skipped and the chain is checked from the first
/// record read.
pub struct Records {
    segments: Vec<(u64, PathBuf)>,
    next_segment: usize,
    reader: Option<FrameReader>,
    dir: PathBuf,
    query: Query,
    expect: Option<(u64, [u8; 32])>,
    yielded: usize,
    done: bool,
}

/// Reads the vault of `vm` under `data_dir/<vm>/`. Needs no lock: it can
/// run while the daemon appends (it sees a consistent prefix).
pub fn read(data_dir: &Path, vm: &str, query: &Query) -> Result<Records, VaultError> {
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
    let segments = list_segments(&dir)?;
    let mut start = 0;
    if let Some(after) = query.after_seq {
        // Skip segment i when segment i+1 starts at or before after + 1.
        while start + 1 < segments.len() {
            let mut next = FrameReader::open(&segments[start + 1].1)?;
            match next.next_frame()? {
                Some(Scanned::Record { record, .. }) if record.seq <= after.saturating_add(1) => {
                    start += 1
                }
                _ => break,
            }
        }
    }
    let expect = if start == 0 {
        Some((0, meta.genesis_bytes()))
    } else {
        None
    };
    Ok(Records {
        segments,
        next_segment: start,
        reader: None,
        dir,
        query: query.clone(),
        expect,
        yielded: 0,
        done: false,
    })
}

impl Records {
    fn fail(&mut self, err: VaultError) -> Option<Result<StoredRecord, VaultError>> {
        self.done = true;
        Some(Err(err))
    }
}

impl Iterator for Records {
    type Item = Result<StoredRecord, VaultError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done || self.query.limit.is_some_and(|l| self.yielded >= l) {
                self.done = true;
                return None;
            }
            let Some(reader) = self.reader.as_mut() else {
                let Some((index, path)) = self.segments.get(self.next_segment) else {
                    self.done = true;
                    return None;
                };
                // Segment files are numbered without gaps from 0.
                let expected_index = if self.next_segment == 0 {
                    0
                } else {
                    self.segments[self.next_segment - 1].0 + 1
                };
                if *index != expected_index {
                    let missing = self.dir.join(segment_name(expected_index));
                    return self.fail(VaultError::Corrupt {
                        path: missing,
                        offset: 0,
                        problem: "segment file is missing".into(),
                    });
                }
                match FrameReader::open(path) {
                    Ok(r) => self.reader = Some(r),
                    Err(e) => return self.fail(e),
                }
                self.next_segment += 1;
                continue;
            };
            let path = reader.path.clone();
            let is_last = self.next_segment == self.segments.len();
            match reader.next_frame() {
                Err(e) => return self.fail(e),
                Ok(None) => self.reader = None,
                Ok(Some(Scanned::Record { offset, record, .. })) => {
                    if let Some((seq, hash)) = self.expect {
                        if record.seq != seq || record.prev_hash != hash {
                            return self.fail(VaultError::Corrupt {
                                path,
                                offset,
                                problem: format!(
                                    "record (seq {}) does not chain to the one before (seq {})",
                                    record.seq,
                                    seq.wrapping_sub(1)
                                ),
                            });
                        }
                    }
                    self.expect = Some((record.seq.wrapping_add(1), record.hash));
                    if self.query.matches(&record) {
                        self.yielded += 1;
                        return Some(Ok(record));
                    }
                }
                Ok(Some(Scanned::Bad { offset, problem })) => {
                    return self.fail(VaultError::Corrupt {
                        path,
                        offset,
                        problem: problem.to_string(),
                    })
                }
                Ok(Some(Scanned::Torn { offset })) => {
                    if is_last {
                        self.done = true;
                        return None;
                    }
                    return self.fail(VaultError::Corrupt {
                        path,
                        offset,
                        problem: "segment ends inside a record".into(),
                    });
                }
            }
        }
    }
}
