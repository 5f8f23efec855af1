//! The on-disk BTF encoding (the kernel's `Documentation/bpf/btf.rst`): header
//! checks and one bounded pass over the type section.
//!
//! Only little-endian BTF is read: vmwatch inspects x86-64 guests.

use super::BtfError;

/// `BTF_MAGIC` as read little-endian.
pub(super) const MAGIC: u16 = 0xeb9f;
/// The header length of BTF version 1 (`struct btf_header`).
pub(super) const HEADER_LEN: usize = 24;
/// Size of `struct btf_type` (name_off, info, size/type).
const TYPE_LEN: usize = 12;
/// Bits of `btf_type.info` that carry meaning: vlen (0-15), kind (24-28) and
/// kind_flag (31). The kernel rejects the others; so do we.
const INFO_MASK: u32 = 0x9f00_ffff;

/// BTF kinds (`BTF_KIND_*`).
pub(super) mod kind {
    pub const VOID: u8 = 0;
    pub const INT: u8 = 1;
    pub const PTR: u8 = 2;
    pub const ARRAY: u8 = 3;
    pub const STRUCT: u8 = 4;
    pub const UNION: u8 = 5;
    pub const ENUM: u8 = 6;
    pub const FWD: u8 = 7;
    pub const TYPEDEF: u8 = 8;
    pub const VOLATILE: u8 = 9;
    pub const CONST: u8 = 10;
    pub const RESTRICT: u8 = 11;
    pub const FUNC: u8 = 12;
    pub const FUNC_PROTO: u8 = 13;
    pub const VAR: u8 = 14;
    pub const DATASEC: u8 = 15;
    pub const FLOAT: u8 = 16;
    pub const DECL_TAG: u8 = 17;
    pub const TYPE_TAG: u8 = 18;
    pub const ENUM64: u8 = 19;
    pub const MAX: u8 = ENUM64;
}

/// One `struct btf_type`, plus where its trailing records start.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RawType {
    pub name_off: u32,
    pub info: u32,
    /// `size` for sized kinds, `type` for references (ptr, typedef, modifiers).
    pub size_or_type: u32,
    /// Byte offset of the kind-specific trailing records in the type section.
    pub extra: u32,
}

impl RawType {
    pub fn kind(&self) -> u8 {
        ((self.info >> 24) & 0x1f) as u8
    }
    pub fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    pub fn kind_flag(&self) -> bool {
        self.info >> 31 != 0
    }
}

/// The parts of a BTF blob we keep: owned copies of both sections and the
/// type table (index = type id; id 0 is `void`).
pub(super) struct Sections {
    pub type_data: Vec<u8>,
    pub strings: Vec<u8>,
    pub types: Vec<RawType>,
}

/// Little-endian `u32` at `off`, `None` when out of bounds.
pub(super) fn u32_at(buf: &[u8], off: usize) -> Option<u32> {
    let end = off.checked_add(4)?;
    let bytes: [u8; 4] = buf.get(off..end)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

/// Size of the records that follow a type of kind `kind` with `vlen` entries.
fn trailing_len(kind: u8, vlen: usize) -> Option<usize> {
    Some(match kind {
        kind::INT | kind::VAR | kind::DECL_TAG => 4,
        kind::ARRAY => 12,
        kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => vlen * 12,
        kind::ENUM | kind::FUNC_PROTO => vlen * 8,
        kind::PTR
        | kind::FWD
        | kind::TYPEDEF
        | kind::VOLATILE
        | kind::CONST
        | kind::RESTRICT
        | kind::FUNC
        | kind::FLOAT
        | kind::TYPE_TAG => 0,
        _ => return None,
    })
}

/// Start and end of a section given its offset and length after the header,
/// checked against the blob length.
fn section(
    hdr_len: usize,
    off: u32,
    len: u32,
    total: usize,
    what: &'static str,
) -> Result<(usize, usize), BtfError> {
    let start = hdr_len
        .checked_add(off as usize)
        .ok_or(BtfError::BadHeader(what))?;
    let end = start
        .checked_add(len as usize)
        .ok_or(BtfError::BadHeader(what))?;
    if end > total {
        return Err(BtfError::BadHeader(what));
    }
    Ok((start, end))
}

/// Checks the header and walks the type section once.
pub(super) fn parse(data: &[u8]) -> Result<Sections, BtfError> {
    if data.len() < HEADER_LEN {
        return Err(BtfError::Truncated(data.len()));
    }
    let magic = u16::from_le_bytes([data[0], data[1]]);
    if magic == MAGIC.swap_bytes() {
        return Err(BtfError::BigEndian);
    }
    if magic != MAGIC {
        return Err(BtfError::BadMagic(magic));
    }
    if data[2] != 1 {
        return Err(BtfError::BadVersion(data[2]));
    }
    if data[3] != 0 {
        return Err(BtfError::BadHeader("unknown header flags"));
    }
    let field = |i: usize| u32_at(data, 4 + 4 * i).unwrap_or(0);
    let hdr_len = field(0) as usize;
    // A longer header is a later format revision: its extra fields describe
    // sections we do not need, so they are skipped (bounded by the blob).
    if hdr_len < HEADER_LEN || hdr_len > data.len() {
        return Err(BtfError::BadHeader("hdr_len out of bounds"));
    }
    let (type_off, type_len, str_off, str_len) = (field(1), field(2), field(3), field(4));
    if type_off % 4 != 0 || type_len % 4 != 0 {
        return Err(BtfError::BadHeader("type section not 4-byte aligned"));
    }
    let (ts, te) = section(
        hdr_len,
        type_off,
        type_len,
        data.len(),
        "type section out of bounds",
    )?;
    let (ss, se) = section(
        hdr_len,
        str_off,
        str_len,
        data.len(),
        "string section out of bounds",
    )?;
    if ts < se && ss < te {
        return Err(BtfError::BadHeader("type and string sections overlap"));
    }
    let strings = &data[ss..se];
    if strings.first() != Some(&0) || strings.last() != Some(&0) {
        return Err(BtfError::BadHeader(
            "string section must start and end with NUL",
        ));
    }
    let type_data = &data[ts..te];
    let types = walk_types(type_data, strings.len())?;
    Ok(Sections {
        type_data: type_data.to_vec(),
        strings: strings.to_vec(),
        types,
    })
}

/// Splits the type section into records, checking each record's kind, its
/// trailing length and every name offset it holds. The table grows with the
/// data actually present, never from a count read from the input.
fn walk_types(td: &[u8], str_len: usize) -> Result<Vec<RawType>, BtfError> {
    let mut types = Vec::with_capacity(td.len() / TYPE_LEN + 1);
    types.push(RawType::default()); // id 0: void
    let mut off = 0usize;
    while off < td.len() {
        let id = u32::try_from(types.len()).unwrap_or(u32::MAX);
        let bad = |reason: &'static str| BtfError::BadType {
            id,
            offset: off,
            reason,
        };
        let word = |i: usize| u32_at(td, off + 4 * i).ok_or_else(|| bad("truncated type record"));
        let (name_off, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
        if info & !INFO_MASK != 0 {
            return Err(bad("reserved info bits set"));
        }
        let t = RawType {
            name_off,
            info,
            size_or_type,
            extra: 0,
        };
        if t.kind() == kind::VOID || t.kind() > kind::MAX {
            return Err(bad("unknown kind"));
        }
        let extra = off + TYPE_LEN;
        let len = trailing_len(t.kind(), t.vlen()).ok_or_else(|| bad("unknown kind"))?;
        let end = extra
            .checked_add(len)
            .filter(|&e| e <= td.len())
            .ok_or_else(|| bad("trailing records run past the type section"))?;
        if name_off as usize >= str_len {
            return Err(BtfError::BadString(name_off));
        }
        // Members, enumerators and parameters carry a name offset first.
        let stride = match t.kind() {
            kind::STRUCT | kind::UNION | kind::ENUM64 => 12,
            kind::ENUM | kind::FUNC_PROTO => 8,
            _ => 0,
        };
        if stride != 0 {
            for rec in (extra..end).step_by(stride) {
                let n = u32_at(td, rec).ok_or_else(|| bad("truncated member"))?;
                if n as usize >= str_len {
                    return Err(BtfError::BadString(n));
                }
            }
        }
        types.push(RawType {
            extra: u32::try_from(extra).map_err(|_| bad("type section too large"))?,
            ..t
        });
        off = end;
    }
    Ok(types)
}
