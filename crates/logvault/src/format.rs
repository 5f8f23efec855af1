//! The on-disk format: record frames, checkpoint frames and the genesis hash.
//!
//! Everything here is pure (no I/O) so that it can be fuzzed and so that
//! other tools can read a vault without this crate's file handling.
//!
//! # Record frame (in `segment-NNNNNN.log`)
//! ```text
//! "LVR1" | payload_len: u32 LE | payload
//! payload = prev_hash[32] | version: u8 = 1 | seq: u64 | time_ns: i64
//!         | vcpu: u32 | cr3: u64 | pid: u32 | tgid: u32 | flags: u32
//!         | uid: (0 | 1 u32) | vm: str16 | vm_uuid: str16 | comm: str16
//!         | exe: (0 | 1 str16) | message: u32 len + bytes | hash[32]
//! hash    = SHA-256(payload without its last 32 bytes)
//!         = SHA-256(prev_hash || canonical encoding of seq and all fields)
//! ```
//! All integers are little-endian, `str16` is a u16 length and UTF-8 bytes.
//! The encoding is canonical: decoding rejects anything the encoder would not
//! have produced (unknown version, option tags other than 0/1, invalid UTF-8,
//! bytes left over), so one record has exactly one byte string and one hash.
//! A payload is at most [`MAX_PAYLOAD`] bytes: a reader never allocates more
//! than that for one frame, whatever the length field says.
//!
//! # Checkpoint frame (in `checkpoints.log`, fixed [`CHECKPOINT_LEN`] bytes)
//! ```text
//! "LVC1" | seq: u64 | hash[32] of record seq | time_ns: i64 | signature[64]
//! signature = Ed25519(CHECKPOINT_DOMAIN || genesis[32] || seq || hash || time_ns)
//! ```
//!
//! # Genesis
//! `genesis = SHA-256(GENESIS_DOMAIN || format: u32 || vm: str16 || created_ns: i64 || public_key[32])`.
//! It is record 0's `prev_hash` and part of every signed checkpoint, so a
//! segment or checkpoint from another vault (another VM, another creation,
//! another key) never chains into this one.

use sha2::{Digest, Sha256};

use crate::{LogRecord, StoredRecord};

/// Magic of a record frame.
pub const RECORD_MAGIC: [u8; 4] = *b"LVR1";
/// Magic of a checkpoint frame.
pub const CHECKPOINT_MAGIC: [u8; 4] = *b"LVC1";
/// Magic plus payload length.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest payload of one record frame (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest message kept in one record; the rest of [`MAX_PAYLOAD`] is room
/// for the other fields at their maximum sizes.
pub const MAX_MESSAGE: usize = MAX_PAYLOAD - 32 * 1024;
/// Largest `vm`, `vm_uuid`, `comm` or `exe` field, in bytes.
pub const MAX_FIELD: usize = 4096;
/// Size of one checkpoint frame.
pub const CHECKPOINT_LEN: usize = 4 + 8 + 32 + 8 + 64;
/// Version of the record payload and of `vault.json`.
pub const FORMAT_VERSION: u32 = 1;

const RECORD_VERSION: u8 = 1;
const GENESIS_DOMAIN: &[u8] = b"vmwatch-logvault-genesis-v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"vmwatch-logvault-checkpoint-v1\0";
/// Payload bytes other than the variable-length fields and option tails.
const FIXED_PAYLOAD: usize = 32 + 1 + 8 + 8 + 4 + 8 + 4 + 4 + 4 + 1 + 2 + 2 + 2 + 1 + 4 + 32;

/// Why a frame could not be read. Every variant means "these bytes are not
/// what the writer wrote".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("no frame magic")]
    BadMagic,
    #[error("length field {0} exceeds the 1 MiB cap")]
    TooLong(u64),
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
    #[error("stored hash does not match the content")]
    HashMismatch,
}

/// Result of looking at the bytes at one position of a segment.
// Returned once per frame and destructured at once: boxing the record
// would only add an allocation per record.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Frame {
    /// A whole, well-formed record whose hash matches its content; `len` is
    /// the frame's size in bytes.
    Record { record: StoredRecord, len: usize },
    /// The bytes end inside a frame (a crash in the middle of a write) or are
    /// all zero (a crash after the file grew but before the data landed).
    Incomplete,
    /// Anything else.
    Bad(FrameError),
}

fn check_field(field: &'static str, len: usize, max: usize) -> Result<(), crate::VaultError> {
    if len > max {
        return Err(crate::VaultError::FieldTooLarge { field, len, max });
    }
    Ok(())
}

/// Checks the size limits of a record (so that its frame fits in [`MAX_PAYLOAD`]).
pub fn check_limits(rec: &LogRecord) -> Result<(), crate::VaultError> {
    check_field("vm", rec.vm.len(), MAX_FIELD)?;
    check_field("vm_uuid", rec.vm_uuid.len(), MAX_FIELD)?;
    check_field("comm", rec.comm.len(), MAX_FIELD)?;
    check_field("exe", rec.exe.as_ref().map_or(0, String::len), MAX_FIELD)?;
    check_field("message", rec.message.len(), MAX_MESSAGE)
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Fits: check_limits caps every str16 field at MAX_FIELD (< u16::MAX).
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Encodes one record frame and returns it with the record's hash.
/// Fails only when a field is over its limit.
pub fn encode_record(
    seq: u64,
    prev_hash: &[u8; 32],
    rec: &LogRecord,
) -> Result<(Vec<u8>, [u8; 32]), crate::VaultError> {
    check_limits(rec)?;
    let payload_len = FIXED_PAYLOAD
        + rec.uid.map_or(0, |_| 4)
        + rec.vm.len()
        + rec.vm_uuid.len()
        + rec.comm.len()
        + rec.exe.as_ref().map_or(0, |e| 2 + e.len())
        + rec.message.len();
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload_len);
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(prev_hash);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&rec.time_ns.to_le_bytes());
    out.extend_from_slice(&rec.vcpu.to_le_bytes());
    out.extend_from_slice(&rec.cr3.to_le_bytes());
    out.extend_from_slice(&rec.pid.to_le_bytes());
    out.extend_from_slice(&rec.tgid.to_le_bytes());
    out.extend_from_slice(&rec.flags.to_le_bytes());
    match rec.uid {
        Some(uid) => {
            out.push(1);
            out.extend_from_slice(&uid.to_le_bytes());
        }
        None => out.push(0),
    }
    put_str16(&mut out, &rec.vm);
    put_str16(&mut out, &rec.vm_uuid);
    put_str16(&mut out, &rec.comm);
    match &rec.exe {
        Some(exe) => {
            out.push(1);
            put_str16(&mut out, exe);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(rec.message.len() as u32).to_le_bytes());
    out.extend_from_slice(&rec.message);
    let hash: [u8; 32] = Sha256::digest(&out[FRAME_HEADER_LEN..]).into();
    out.extend_from_slice(&hash);
    debug_assert_eq!(out.len(), FRAME_HEADER_LEN + payload_len);
    Ok((out, hash))
}

/// Reads the frame header at the start of `buf`: `Ok(Some(payload_len))`,
/// `Ok(None)` when `buf` is too short to tell (or all zero), or the error.
pub fn frame_header(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < FRAME_HEADER_LEN {
        let n = buf.len().min(4);
        return if buf[..n] == RECORD_MAGIC[..n] || buf.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err(FrameError::BadMagic)
        };
    }
    if buf[..4] != RECORD_MAGIC {
        return Err(FrameError::BadMagic);
    }
    let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLong(len as u64));
    }
    if len < FIXED_PAYLOAD {
        return Err(FrameError::Malformed(
            "payload shorter than the fixed fields",
        ));
    }
    Ok(Some(len))
}

/// Looks at the frame at the start of `buf` (the rest of a segment).
pub fn decode_frame(buf: &[u8]) -> Frame {
    match frame_header(buf) {
        // A zero-filled tail is what a crash leaves when the file grew but
        // the data never reached the disk.
        Err(_) if buf.iter().all(|&b| b == 0) => Frame::Incomplete,
        Err(e) => Frame::Bad(e),
        Ok(None) => Frame::Incomplete,
        Ok(Some(len)) => {
            if buf.len() - FRAME_HEADER_LEN < len {
                return Frame::Incomplete;
            }
            match decode_payload(&buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len]) {
                Ok(record) => Frame::Record {
                    record,
                    len: FRAME_HEADER_LEN + len,
                },
                Err(e) => Frame::Bad(e),
            }
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Malformed("field runs past the payload"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn tag(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FrameError::Malformed("option tag is neither 0 nor 1")),
        }
    }
    fn str16(&mut self) -> Result<String, FrameError> {
        let len = usize::from(self.u16()?);
        if len > MAX_FIELD {
            return Err(FrameError::Malformed("text field over 4096 bytes"));
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| FrameError::Malformed("text field is not UTF-8"))
    }
}

/// Decodes and checks one payload (the bytes after the frame header).
pub fn decode_payload(payload: &[u8]) -> Result<StoredRecord, FrameError> {
    if payload.len() > MAX_PAYLOAD || payload.len() < FIXED_PAYLOAD {
        return Err(FrameError::Malformed("payload size out of bounds"));
    }
    let (content, stored_hash) = payload.split_at(payload.len() - 32);
    let mut c = Cursor { buf: content };
    let prev_hash = c.array::<32>()?;
    if c.u8()? != RECORD_VERSION {
        return Err(FrameError::Malformed("unknown record version"));
    }
    let seq = c.u64()?;
    let time_ns = c.u64()? as i64;
    let vcpu = c.u32()?;
    let cr3 = c.u64()?;
    let pid = c.u32()?;
    let tgid = c.u32()?;
    let flags = c.u32()?;
    let uid = if c.tag()? { Some(c.u32()?) } else { None };
    let vm = c.str16()?;
    let vm_uuid = c.str16()?;
    let comm = c.str16()?;
    let exe = if c.tag()? { Some(c.str16()?) } else { None };
    let msg_len = c.u32()? as usize;
    if msg_len > MAX_MESSAGE {
        return Err(FrameError::Malformed("message over the cap"));
    }
    let message = c.take(msg_len)?.to_vec();
    if !c.buf.is_empty() {
        return Err(FrameError::Malformed("bytes after the message"));
    }
    let hash: [u8; 32] = Sha256::digest(content).into();
    if hash[..] != stored_hash[..] {
        return Err(FrameError::HashMismatch);
    }
    Ok(StoredRecord {
        seq,
        prev_hash,
        hash,
        record: LogRecord {
            vm,
            vm_uuid,
            time_ns,
            vcpu,
            cr3,
            pid,
            tgid,
            comm,
            exe,
            uid,
            flags,
            message,
        },
    })
}

/// Hash that starts a vault's chain (record 0's `prev_hash`).
pub fn genesis_hash(vm: &str, created_ns: i64, public_key: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(GENESIS_DOMAIN);
    h.update(FORMAT_VERSION.to_le_bytes());
    h.update((vm.len() as u16).to_le_bytes());
    h.update(vm.as_bytes());
    h.update(created_ns.to_le_bytes());
    h.update(public_key);
    h.finalize().into()
}

/// A signed statement "record `seq` of this vault has hash `hash`", made at
/// wall-clock time `time_ns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: [u8; 32],
    pub time_ns: i64,
    pub signature: [u8; 64],
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(genesis: &[u8; 32], seq: u64, hash: &[u8; 32], time_ns: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 32 + 8 + 32 + 8);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(genesis);
    m.extend_from_slice(&seq.to_le_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&time_ns.to_le_bytes());
    m
}

impl Checkpoint {
    pub fn encode(&self) -> [u8; CHECKPOINT_LEN] {
        let mut out = [0u8; CHECKPOINT_LEN];
        out[..4].copy_from_slice(&CHECKPOINT_MAGIC);
        out[4..12].copy_from_slice(&self.seq.to_le_bytes());
        out[12..44].copy_from_slice(&self.hash);
        out[44..52].copy_from_slice(&self.time_ns.to_le_bytes());
        out[52..].copy_from_slice(&self.signature);
        out
    }

    pub fn decode(buf: &[u8; CHECKPOINT_LEN]) -> Result<Checkpoint, FrameError> {
        if buf[..4] != CHECKPOINT_MAGIC {
            return Err(FrameError::BadMagic);
        }
        let mut c = Cursor { buf: &buf[4..] };
        Ok(Checkpoint {
            seq: c.u64()?,
            hash: c.array()?,
            time_ns: c.u64()? as i64,
            signature: c.array()?,
        })
    }

    /// Checks the signature against the vault's public key and genesis.
    pub fn verify(&self, key: &ed25519_dalek::VerifyingKey, genesis: &[u8; 32]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(&self.signature);
        let msg = checkpoint_message(genesis, self.seq, &self.hash, self.time_ns);
        key.verify_strict(&msg, &sig).is_ok()
    }
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Parses exactly `N` bytes of hex (either case).
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LogRecord {
        LogRecord {
            vm: "web1".into(),
            vm_uuid: "u".into(),
            time_ns: -5,
            vcpu: 1,
            cr3: 0x1234_5000,
            pid: 10,
            tgid: 9,
            comm: "sshd".into(),
            exe: Some("/usr/sbin/sshd".into()),
            uid: Some(0),
            flags: 3,
            message: b"<38>hi\xff".to_vec(),
        }
    }

    #[test]
    fn round_trip_and_every_byte_matters() {
        let prev = [7u8; 32];
        let (frame, hash) = encode_record(42, &prev, &sample()).unwrap();
        let Frame::Record { record, len } = decode_frame(&frame) else {
            panic!("not decoded");
        };
        assert_eq!(len, frame.len());
        assert_eq!(record.seq, 42);
        assert_eq!(record.prev_hash, prev);
        assert_eq!(record.hash, hash);
        assert_eq!(record.record, sample());
        for i in 0..frame.len() {
            let mut f = frame.clone();
            f[i] ^= 0x20;
            assert!(
                !matches!(decode_frame(&f), Frame::Record { .. }),
                "flip at {i} not noticed"
            );
        }
        for cut in 0..frame.len() {
            assert!(matches!(decode_frame(&frame[..cut]), Frame::Incomplete));
        }
    }

    #[test]
    fn no_uid_no_exe() {
        let mut r = sample();
        r.uid = None;
        r.exe = None;
        let (frame, _) = encode_record(0, &[0; 32], &r).unwrap();
        let Frame::Record { record, .. } = decode_frame(&frame) else {
            panic!()
        };
        assert_eq!(record.record, r);
    }

    #[test]
    fn limits() {
        let mut r = sample();
        r.message = vec![b'a'; MAX_MESSAGE];
        r.vm = "v".repeat(MAX_FIELD);
        r.vm_uuid = "v".repeat(MAX_FIELD);
        r.comm = "v".repeat(MAX_FIELD);
        r.exe = Some("v".repeat(MAX_FIELD));
        let (frame, _) = encode_record(0, &[0; 32], &r).unwrap();
        assert!(frame.len() - FRAME_HEADER_LEN <= MAX_PAYLOAD);
        assert!(matches!(decode_frame(&frame), Frame::Record { .. }));
        r.message.push(b'a');
        assert!(encode_record(0, &[0; 32], &r).is_err());
    }

    #[test]
    fn hex_round_trip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex::<4>("0001ABff"), Some(b));
        assert_eq!(unhex::<4>("0001abf"), None);
        assert_eq!(unhex::<4>("0001abfg"), None);
    }
}
