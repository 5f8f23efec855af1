//! File handling shared by the writer, the reader and the verifier: segment
//! names, bounded frame scanning, and moving a torn tail aside.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::format::{
    decode_payload, frame_header, Checkpoint, FrameError, CHECKPOINT_LEN, FRAME_HEADER_LEN,
};
use crate::{StoredRecord, VaultError};

pub(crate) const CHECKPOINTS: &str = "checkpoints.log";
pub(crate) const META: &str = "vault.json";
pub(crate) const LOCK: &str = "lock";

pub(crate) fn segment_name(index: u64) -> String {
    format!("segment-{index:06}.log")
}

/// Segment files of a vault directory, sorted by index. Only canonical names
/// count (`segment-000012.log`, not `segment-12.log`), so one index has one file.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, VaultError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| VaultError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| VaultError::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(digits) = name
            .strip_prefix("segment-")
            .and_then(|n| n.strip_suffix(".log"))
        else {
            continue;
        };
        let Ok(index) = digits.parse::<u64>() else {
            continue;
        };
        if digits.bytes().all(|b| b.is_ascii_digit()) && segment_name(index) == name {
            out.push((index, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Files whose names say open moved a torn tail there.
pub(crate) fn list_torn(dir: &Path) -> Result<Vec<PathBuf>, VaultError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| VaultError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| VaultError::io("list", dir, e))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.contains(".torn"))
        {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), VaultError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VaultError::io("sync directory", dir, e))
}

/// True when the next `left` bytes of `reader` are all zero (read in
/// chunks: a huge file costs time, never memory).
fn all_zero(reader: &mut impl Read, mut left: u64, path: &Path) -> Result<bool, VaultError> {
    let mut chunk = [0u8; 8192];
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        reader
            .read_exact(&mut chunk[..n])
            .map_err(|e| VaultError::io("read", path, e))?;
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

/// What one step of a scan found.
// Returned once per frame and destructured at once: boxing the record
// would only add an allocation per record.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Scanned {
    Record {
        offset: u64,
        len: u64,
        record: StoredRecord,
    },
    /// Bytes from `offset` to the end of the file are not a frame.
    Bad { offset: u64, problem: FrameError },
    /// The file ends inside a frame at `offset` (or is zero from there on).
    Torn { offset: u64 },
}

/// Reads the frames of one segment up to the length it had when opened (a
/// writer appending meanwhile is not seen, so a scan is a consistent prefix).
/// Memory is bounded by one payload (1 MiB), whatever the file holds.
pub(crate) struct FrameReader {
    pub(crate) path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    len: u64,
    payload: Vec<u8>,
}

impl FrameReader {
    pub(crate) fn open(path: &Path) -> Result<FrameReader, VaultError> {
        let file = File::open(path).map_err(|e| VaultError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| VaultError::io("stat", path, e))?
            .len();
        Ok(FrameReader {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(64 * 1024, file),
            offset: 0,
            len,
            payload: Vec::new(),
        })
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), VaultError> {
        self.reader
            .read_exact(buf)
            .map_err(|e| VaultError::io("read", &self.path, e))
    }

    /// True when the file is zero from the current read position to its end.
    fn rest_is_zero(&mut self, consumed: u64) -> Result<bool, VaultError> {
        let left = self.len - self.offset - consumed;
        all_zero(&mut self.reader, left, &self.path)
    }

    /// The next frame, or `None` at the end. After `Bad` or `Torn` the scan
    /// is over (nothing after a damaged frame can be framed reliably).
    pub(crate) fn next_frame(&mut self) -> Result<Option<Scanned>, VaultError> {
        if self.offset >= self.len {
            return Ok(None);
        }
        let offset = self.offset;
        let remaining = self.len - offset;
        let n = remaining.min(FRAME_HEADER_LEN as u64) as usize;
        let mut head = [0u8; FRAME_HEADER_LEN];
        self.read(&mut head[..n])?;
        let result = match frame_header(&head[..n]) {
            Err(problem) => {
                if head[..n].iter().all(|&b| b == 0) && self.rest_is_zero(n as u64)? {
                    Scanned::Torn { offset }
                } else {
                    Scanned::Bad { offset, problem }
                }
            }
            Ok(None) => Scanned::Torn { offset },
            Ok(Some(plen)) if plen as u64 > remaining - FRAME_HEADER_LEN as u64 => {
                Scanned::Torn { offset }
            }
            Ok(Some(plen)) => {
                // plen <= MAX_PAYLOAD (checked by frame_header) and the file
                // really has that many bytes: the allocation is bounded.
                self.payload.resize(plen, 0);
                let mut payload = std::mem::take(&mut self.payload);
                let read = self.read(&mut payload);
                let decoded = read.map(|()| decode_payload(&payload));
                self.payload = payload;
                match decoded? {
                    Ok(record) => {
                        let len = (FRAME_HEADER_LEN + plen) as u64;
                        self.offset += len;
                        return Ok(Some(Scanned::Record {
                            offset,
                            len,
                            record,
                        }));
                    }
                    Err(problem) => Scanned::Bad { offset, problem },
                }
            }
        };
        self.offset = self.len;
        Ok(Some(result))
    }
}

/// What one step of a checkpoint scan found.
#[derive(Debug)]
pub(crate) enum CpScanned {
    Checkpoint { offset: u64, cp: Checkpoint },
    Bad { offset: u64, problem: FrameError },
    Torn { offset: u64 },
}

/// Reads `checkpoints.log` up to the length it had when opened.
pub(crate) struct CheckpointReader {
    pub(crate) path: PathBuf,
    reader: Option<BufReader<File>>,
    offset: u64,
    len: u64,
}

impl CheckpointReader {
    /// A missing file reads as no checkpoints.
    pub(crate) fn open(path: &Path) -> Result<CheckpointReader, VaultError> {
        let (reader, len) = match File::open(path) {
            Ok(f) => {
                let len = f
                    .metadata()
                    .map_err(|e| VaultError::io("stat", path, e))?
                    .len();
                (Some(BufReader::new(f)), len)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, 0),
            Err(e) => return Err(VaultError::io("open", path, e)),
        };
        Ok(CheckpointReader {
            path: path.to_path_buf(),
            reader,
            offset: 0,
            len,
        })
    }

    pub(crate) fn next_checkpoint(&mut self) -> Result<Option<CpScanned>, VaultError> {
        let Some(reader) = self.reader.as_mut() else {
            return Ok(None);
        };
        if self.offset >= self.len {
            return Ok(None);
        }
        let offset = self.offset;
        let remaining = self.len - offset;
        let n = remaining.min(CHECKPOINT_LEN as u64) as usize;
        let mut buf = [0u8; CHECKPOINT_LEN];
        reader
            .read_exact(&mut buf[..n])
            .map_err(|e| VaultError::io("read", &self.path, e))?;
        if n == CHECKPOINT_LEN {
            match Checkpoint::decode(&buf) {
                Ok(cp) => {
                    self.offset += CHECKPOINT_LEN as u64;
                    return Ok(Some(CpScanned::Checkpoint { offset, cp }));
                }
                Err(problem) => {
                    self.offset = self.len;
                    let zero = buf.iter().all(|&b| b == 0)
                        && all_zero(reader, remaining - n as u64, &self.path)?;
                    return Ok(Some(if zero {
                        CpScanned::Torn { offset }
                    } else {
                        CpScanned::Bad { offset, problem }
                    }));
                }
            }
        }
        self.offset = self.len;
        let m = n.min(4);
        Ok(Some(
            if buf[..m] == crate::format::CHECKPOINT_MAGIC[..m] || buf[..n].iter().all(|&b| b == 0)
            {
                CpScanned::Torn { offset }
            } else {
                CpScanned::Bad {
                    offset,
                    problem: FrameError::BadMagic,
                }
            },
        ))
    }
}

/// Copies the bytes of `path` from `offset` to its end into a new file next
/// to it (`<name>.torn`, or `.torn.N` when that exists), syncs the copy,
/// then cuts `path` back to `offset`. Nothing is lost: the fragment can be
/// inspected later; the chain continues from the last whole record.
pub(crate) fn move_tail_aside(path: &Path, offset: u64) -> Result<PathBuf, VaultError> {
    let mut src = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| VaultError::io("open", path, e))?;
    src.seek(SeekFrom::Start(offset))
        .map_err(|e| VaultError::io("seek", path, e))?;
    let mut n = 0u32;
    let (mut dst, dst_path) = loop {
        let mut name = path.as_os_str().to_owned();
        name.push(if n == 0 {
            ".torn".to_string()
        } else {
            format!(".torn.{n}")
        });
        let candidate = PathBuf::from(name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&candidate)
        {
            Ok(f) => break (f, candidate),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 10_000 => n += 1,
            Err(e) => return Err(VaultError::io("create", candidate, e)),
        }
    };
    std::io::copy(&mut src, &mut dst).map_err(|e| VaultError::io("copy", &dst_path, e))?;
    dst.flush()
        .and_then(|()| dst.sync_all())
        .map_err(|e| VaultError::io("sync", &dst_path, e))?;
    src.set_len(offset)
        .and_then(|()| src.sync_all())
        .map_err(|e| VaultError::io("truncate", path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(dst_path)
}
