//! Struct layouts of the guest kernel, read from the kernel image's `.BTF`
//! section, so that no offset of one kernel build is ever hard-coded.
//!
//! Own parser rather than `btfparse` 1.3.9: that crate overflows its stack on
//! cyclic or self-nesting types (found in seconds by our fuzz target), loops on
//! typedef cycles and keeps the last of duplicate names; it also needs Rust 1.85.
//!
//! [`Btf::parse`] checks the header, copies the type and string sections and
//! indexes struct, union and typedef names once (a 5 MB, 110k-type vmlinux BTF
//! parses in about 5 ms in release). Lookups walk the type records on demand, with
//! every type chain, nesting level and index bounded, so hostile data yields an
//! error rather than a panic, a hang or a large allocation.
//!
//! Only base (vmlinux) BTF is supported, not split module BTF.

mod raw;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};

use raw::{kind, u32_at, RawType};

/// Longest chain of typedef / const / volatile / restrict / type-tag links
/// followed before giving up (real kernels need fewer than ten); a cycle of
/// typedefs therefore ends in [`BtfError::TypeChainTooLong`].
const MAX_TYPE_CHAIN: usize = 64;
/// Deepest nesting of anonymous members or arrays of arrays followed.
const MAX_NESTING: usize = 32;
/// Longest member path accepted by [`Btf::field`].
const MAX_PATH_LEN: usize = 512;
/// Pointer size: BTF does not record it and vmwatch inspects x86-64 guests.
const POINTER_SIZE: u64 = 8;
/// Longest rendered type name; longer ones are cut.
const MAX_TYPE_NAME: usize = 256;

/// Why BTF data could not be read or a layout question not answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BtfError {
    #[error("BTF: data too short for a header ({0} bytes)")]
    Truncated(usize),
    #[error("BTF: bad magic {0:#06x} (expected 0xeb9f)")]
    BadMagic(u16),
    #[error("BTF: big-endian BTF is not supported")]
    BigEndian,
    #[error("BTF: unsupported version {0}")]
    BadVersion(u8),
    #[error("BTF: bad header: {0}")]
    BadHeader(&'static str),
    #[error("BTF: type #{id} at type-section offset {offset}: {reason}")]
    BadType {
        id: u32,
        offset: usize,
        reason: &'static str,
    },
    #[error("BTF: bad string offset {0}")]
    BadString(u32),
    #[error("BTF: type id {0} out of range")]
    BadTypeId(u32),
    #[error("BTF: type chain from type #{0} is too long or cyclic")]
    TypeChainTooLong(u32),
    #[error("BTF: nesting deeper than {MAX_NESTING} levels at type #{0}")]
    TooDeep(u32),
    #[error("BTF: type #{0} has no size")]
    Unsized(u32),
    #[error("BTF: size or offset overflow at type #{0}")]
    Overflow(u32),
    #[error("BTF: no struct or union named `{0}`")]
    NoSuchStruct(String),
    #[error("BTF: struct {0} is only declared (forward), its layout is unknown")]
    ForwardOnly(String),
    #[error("BTF: {container} has no member `{member}`")]
    NoSuchMember { container: String, member: String },
    #[error("BTF: `{path}` in struct {root} is a {found}, not a struct or union")]
    NotComposite {
        root: String,
        path: String,
        found: String,
    },
    #[error("BTF: `{path}` in struct {root} is a {found}, not an array")]
    NotArray {
        root: String,
        path: String,
        found: String,
    },
    #[error("BTF: index {index} out of bounds for `{path}` in struct {root} (length {len})")]
    IndexOutOfBounds {
        root: String,
        path: String,
        index: u64,
        len: u64,
    },
    #[error("BTF: invalid member path `{0}`")]
    InvalidPath(String),
    #[error("BTF: no enum named `{0}`")]
    NoSuchEnum(String),
    #[error("BTF: {enum_desc} has no variant `{variant}`")]
    NoSuchVariant { enum_desc: String, variant: String },
    #[error("BTF: enumerator `{0}` has different values in different enums")]
    AmbiguousVariant(String),
    #[error("BTF: enumerator `{0}` does not fit in an i64")]
    ValueOutOfRange(String),
}

/// Where a member lies and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Byte offset from the start of the outer struct; for a bitfield, the
    /// byte holding its first bit.
    pub offset: u64,
    /// Absolute offset in bits from the start of the outer struct.
    pub bit_offset: u64,
    /// Width in bits when the member is a bitfield.
    pub bit_size: Option<u32>,
    /// Size in bytes of the member's type (for a bitfield, of its base type).
    pub size: u64,
    /// The declared type, C-like (`struct list_head`, `pid_t`, `char[16]`).
    pub type_name: String,
    /// What the type is once typedefs and qualifiers are looked through.
    pub kind: FieldKind,
}

/// The shape of a member's type, typedefs and qualifiers looked through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Int { signed: bool },
    Pointer,
    Struct,
    Union,
    Array { elem_size: u64, len: u64 },
    Enum,
    Other,
}

/// Parsed BTF of one kernel build.
pub struct Btf {
    types: Vec<RawType>,
    type_data: Vec<u8>,
    strings: Vec<u8>,
    /// Struct / union / forward name -> the chosen type id. BTF may hold several
    /// types of one name (dedup leaves distinct layouts, and forward
    /// declarations); we keep a complete one with members and the largest size.
    composites: HashMap<Box<str>, u32>,
    /// Typedef name -> first typedef id, for `typedef struct {..} name_t`.
    typedefs: HashMap<Box<str>, u32>,
    /// Ids of all ENUM and ENUM64 types, scanned by [`Btf::enum_value`].
    enums: Vec<u32>,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.types.len())
            .field("strings_len", &self.strings.len())
            .field("named_composites", &self.composites.len())
            .finish()
    }
}

/// A struct or union member as found by a lookup.
struct Located {
    ty: u32,
    bit_offset: u64,
    bit_size: Option<u32>,
}

/// Preference among types of one name: complete before forward, with members
/// before empty, then larger.
fn rank(t: &RawType) -> (bool, bool, u32) {
    let complete = t.kind() != kind::FWD;
    (
        complete,
        t.vlen() > 0,
        if complete { t.size_or_type } else { 0 },
    )
}

impl Btf {
    /// Parses the raw bytes of a `.BTF` section.
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        let raw::Sections {
            type_data,
            strings,
            types,
        } = raw::parse(data)?;
        let mut btf = Btf {
            types,
            type_data,
            strings,
            composites: HashMap::new(),
            typedefs: HashMap::new(),
            enums: Vec::new(),
        };
        btf.index()?;
        Ok(btf)
    }

    /// Builds the name indexes in one pass over the type table.
    fn index(&mut self) -> Result<(), BtfError> {
        let mut composites: HashMap<Box<str>, u32> = HashMap::new();
        let mut typedefs: HashMap<Box<str>, u32> = HashMap::new();
        let mut enums = Vec::new();
        let mut duplicates = 0usize;
        for (id, t) in self.types.iter().enumerate().skip(1) {
            let id = u32::try_from(id).map_err(|_| BtfError::BadTypeId(u32::MAX))?;
            match t.kind() {
                kind::STRUCT | kind::UNION | kind::FWD if t.name_off != 0 => {
                    let name = self.str_at(t.name_off)?;
                    match composites.get_mut(name) {
                        None => {
                            composites.insert(name.into(), id);
                        }
                        Some(best) => {
                            duplicates += 1;
                            if rank(t) > rank(&self.types[*best as usize]) {
                                *best = id;
                            }
                        }
                    }
                }
                kind::TYPEDEF if t.name_off != 0 => {
                    let name = self.str_at(t.name_off)?;
                    typedefs.entry(name.into()).or_insert(id);
                }
                kind::ENUM | kind::ENUM64 => enums.push(id),
                _ => {}
            }
        }
        if duplicates > 0 {
            tracing::debug!(
                duplicates,
                "BTF: several structs/unions share a name; using the complete, largest one"
            );
        }
        self.composites = composites;
        self.typedefs = typedefs;
        self.enums = enums;
        Ok(())
    }

    /// Size in bytes of the struct or union `name` (a typedef naming one is
    /// accepted too).
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        let id = self.lookup_composite(name)?;
        self.size_of(id)
    }

    /// Locates the member at `path` (dot-separated member names, each optionally
    /// followed by `[index]`s) inside struct `struct_name`. Members of anonymous
    /// structs and unions are found as if they were direct members, as in C.
    pub fn field(&self, struct_name: &str, path: &str) -> Result<Field, BtfError> {
        let root_name = strip_tag(struct_name);
        let root = self.lookup_composite(root_name)?;
        let components = parse_path(path)?;
        let mut ty = root;
        let mut bit_offset = 0u64;
        let mut bit_size: Option<u32> = None;
        let mut walked = String::new();
        for (name, indices) in components {
            let container = self.resolve(ty)?;
            let ct = self.ty(container)?;
            if bit_size.is_some() || !matches!(ct.kind(), kind::STRUCT | kind::UNION) {
                return Err(BtfError::NotComposite {
                    root: root_name.to_string(),
                    path: walked,
                    found: self.type_name(ty),
                });
            }
            let mut searched = HashSet::new();
            let found = self
                .find_member(container, name, 0, &mut searched)?
                .ok_or_else(|| BtfError::NoSuchMember {
                    container: self.describe_container(container, root_name, &walked),
                    member: name.to_string(),
                })?;
            if !walked.is_empty() {
                walked.push('.');
            }
            walked.push_str(name);
            ty = found.ty;
            bit_size = found.bit_size;
            bit_offset = bit_offset
                .checked_add(found.bit_offset)
                .ok_or(BtfError::Overflow(container))?;
            for index in indices {
                let arr = self.resolve(ty)?;
                let at = self.ty(arr)?;
                if bit_size.is_some() || at.kind() != kind::ARRAY {
                    return Err(BtfError::NotArray {
                        root: root_name.to_string(),
                        path: walked,
                        found: self.type_name(ty),
                    });
                }
                let (elem, len) = self.array(arr)?;
                if index >= len {
                    return Err(BtfError::IndexOutOfBounds {
                        root: root_name.to_string(),
                        path: walked,
                        index,
                        len,
                    });
                }
                let step = self
                    .size_of(elem)?
                    .checked_mul(index)
                    .and_then(|b| b.checked_mul(8))
                    .ok_or(BtfError::Overflow(arr))?;
                bit_offset = bit_offset
                    .checked_add(step)
                    .ok_or(BtfError::Overflow(arr))?;
                walked.push_str(&format!("[{index}]"));
                ty = elem;
            }
        }
        Ok(Field {
            offset: bit_offset / 8,
            bit_offset,
            bit_size,
            size: self.size_of(ty)?,
            type_name: self.type_name(ty),
            kind: self.field_kind(ty)?,
        })
    }

    /// Byte offset of the member at `path` in `struct_name` (see [`Btf::field`]).
    pub fn offset_of(&self, struct_name: &str, path: &str) -> Result<u64, BtfError> {
        self.field(struct_name, path).map(|f| f.offset)
    }

    /// Whether [`Btf::field`] finds `path` in `struct_name`: for members that
    /// exist only in some kernel versions (`__state` vs `state`).
    pub fn has_field(&self, struct_name: &str, path: &str) -> bool {
        self.field(struct_name, path).is_ok()
    }

    /// Value of enumerator `variant`, in the enum named `enum_name`, or in any
    /// enum (named or anonymous) when `enum_name` is empty. Several enums may
    /// define the same enumerator only with the same value.
    pub fn enum_value(&self, enum_name: &str, variant: &str) -> Result<i64, BtfError> {
        let wanted = enum_name.strip_prefix("enum ").unwrap_or(enum_name).trim();
        let mut seen_enum = wanted.is_empty();
        let mut value: Option<i64> = None;
        for &id in &self.enums {
            let t = self.ty(id)?;
            if !wanted.is_empty() {
                if !self.name_eq(t.name_off, wanted) {
                    continue;
                }
                seen_enum = true;
            }
            let (stride, wide) = if t.kind() == kind::ENUM64 {
                (12, true)
            } else {
                (8, false)
            };
            for i in 0..t.vlen() {
                let rec = t.extra as usize + i * stride;
                let name_off = self.word(rec)?;
                if !self.name_eq(name_off, variant) {
                    continue;
                }
                let lo = self.word(rec + 4)?;
                let v = match (wide, t.kind_flag()) {
                    (false, true) => i64::from(lo as i32),
                    (false, false) => i64::from(lo),
                    (true, signed) => {
                        let raw = (u64::from(self.word(rec + 8)?) << 32) | u64::from(lo);
                        if signed {
                            raw as i64
                        } else {
                            i64::try_from(raw)
                                .map_err(|_| BtfError::ValueOutOfRange(variant.to_string()))?
                        }
                    }
                };
                match value {
                    Some(prev) if prev != v => {
                        return Err(BtfError::AmbiguousVariant(variant.to_string()))
                    }
                    _ => value = Some(v),
                }
            }
        }
        match value {
            Some(v) => Ok(v),
            None if !seen_enum => Err(BtfError::NoSuchEnum(wanted.to_string())),
            None => Err(BtfError::NoSuchVariant {
                enum_desc: if wanted.is_empty() {
                    "no enum".to_string()
                } else {
                    format!("enum {wanted}")
                },
                variant: variant.to_string(),
            }),
        }
    }

    // ---- lookups on the raw records ----

    fn ty(&self, id: u32) -> Result<&RawType, BtfError> {
        self.types.get(id as usize).ok_or(BtfError::BadTypeId(id))
    }

    /// A `u32` of the type section (offsets were checked at parse time; a
    /// failure here still errors rather than panics).
    fn word(&self, off: usize) -> Result<u32, BtfError> {
        u32_at(&self.type_data, off).ok_or(BtfError::BadType {
            id: 0,
            offset: off,
            reason: "record out of bounds",
        })
    }

    /// The NUL-terminated string at `off` of the string section.
    fn str_at(&self, off: u32) -> Result<&str, BtfError> {
        let tail = self
            .strings
            .get(off as usize..)
            .ok_or(BtfError::BadString(off))?;
        let len = tail
            .iter()
            .position(|&b| b == 0)
            .ok_or(BtfError::BadString(off))?;
        std::str::from_utf8(&tail[..len]).map_err(|_| BtfError::BadString(off))
    }

    /// Whether the string at `off` equals `s`, without scanning for its end.
    fn name_eq(&self, off: u32, s: &str) -> bool {
        let start = off as usize;
        let end = start.saturating_add(s.len());
        self.strings.get(start..end) == Some(s.as_bytes()) && self.strings.get(end) == Some(&0)
    }

    fn lookup_composite(&self, name: &str) -> Result<u32, BtfError> {
        let name = strip_tag(name);
        if let Some(&id) = self.composites.get(name) {
            if self.ty(id)?.kind() == kind::FWD {
                return Err(BtfError::ForwardOnly(name.to_string()));
            }
            return Ok(id);
        }
        if let Some(&id) = self.typedefs.get(name) {
            let r = self.resolve(id)?;
            if matches!(self.ty(r)?.kind(), kind::STRUCT | kind::UNION) {
                return Ok(r);
            }
        }
        Err(BtfError::NoSuchStruct(name.to_string()))
    }

    /// Follows typedefs, qualifiers and type tags to the underlying type.
    fn resolve(&self, start: u32) -> Result<u32, BtfError> {
        let mut id = start;
        for _ in 0..MAX_TYPE_CHAIN {
            let t = self.ty(id)?;
            match t.kind() {
                kind::TYPEDEF | kind::CONST | kind::VOLATILE | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(id),
            }
        }
        Err(BtfError::TypeChainTooLong(start))
    }

    /// `(element type, length)` of an ARRAY type.
    fn array(&self, id: u32) -> Result<(u32, u64), BtfError> {
        let extra = self.ty(id)?.extra as usize;
        Ok((self.word(extra)?, u64::from(self.word(extra + 8)?)))
    }

    fn size_of(&self, id: u32) -> Result<u64, BtfError> {
        self.size_at_depth(id, 0)
    }

    fn size_at_depth(&self, id: u32, depth: usize) -> Result<u64, BtfError> {
        let id = self.resolve(id)?;
        let t = self.ty(id)?;
        match t.kind() {
            kind::INT
            | kind::ENUM
            | kind::ENUM64
            | kind::STRUCT
            | kind::UNION
            | kind::FLOAT
            | kind::DATASEC => Ok(u64::from(t.size_or_type)),
            kind::PTR => Ok(POINTER_SIZE),
            kind::ARRAY => {
                if depth >= MAX_NESTING {
                    return Err(BtfError::TooDeep(id));
                }
                let (elem, len) = self.array(id)?;
                self.size_at_depth(elem, depth + 1)?
                    .checked_mul(len)
                    .ok_or(BtfError::Overflow(id))
            }
            _ => Err(BtfError::Unsized(id)),
        }
    }

    /// Searches `container` (a struct or union) for member `name`, descending
    /// into anonymous struct/union members. `searched` holds the anonymous
    /// types already searched in this lookup, so each is searched at most once
    /// (bounding the work and breaking self-nesting).
    fn find_member(
        &self,
        container: u32,
        name: &str,
        depth: usize,
        searched: &mut HashSet<u32>,
    ) -> Result<Option<Located>, BtfError> {
        let t = *self.ty(container)?;
        let bitfield_flag = t.kind_flag();
        for i in 0..t.vlen() {
            let rec = t.extra as usize + i * 12;
            let (name_off, mty, raw_off) =
                (self.word(rec)?, self.word(rec + 4)?, self.word(rec + 8)?);
            let (mut bit_offset, declared_bits) = if bitfield_flag {
                (u64::from(raw_off & 0x00ff_ffff), raw_off >> 24)
            } else {
                (u64::from(raw_off), 0)
            };
            if name_off != 0 {
                if !self.name_eq(name_off, name) {
                    continue;
                }
                let mut bit_size = (declared_bits != 0).then_some(declared_bits);
                if !bitfield_flag {
                    // Old encoding: the bitfield is described by the INT itself.
                    let r = self.resolve(mty)?;
                    let rt = self.ty(r)?;
                    if rt.kind() == kind::INT {
                        let enc = self.word(rt.extra as usize)?;
                        let (bits, shift) = (enc & 0xff, (enc >> 16) & 0xff);
                        if shift != 0 || u64::from(bits) != u64::from(rt.size_or_type) * 8 {
                            bit_offset += u64::from(shift);
                            bit_size = Some(bits);
                        }
                    }
                }
                return Ok(Some(Located {
                    ty: mty,
                    bit_offset,
                    bit_size,
                }));
            }
            let inner = self.resolve(mty)?;
            if !matches!(self.ty(inner)?.kind(), kind::STRUCT | kind::UNION) {
                continue;
            }
            if !searched.insert(inner) {
                continue;
            }
            if depth >= MAX_NESTING {
                return Err(BtfError::TooDeep(inner));
            }
            if let Some(found) = self.find_member(inner, name, depth + 1, searched)? {
                return Ok(Some(Located {
                    bit_offset: found
                        .bit_offset
                        .checked_add(bit_offset)
                        .ok_or(BtfError::Overflow(container))?,
                    ..found
                }));
            }
        }
        Ok(None)
    }

    fn field_kind(&self, id: u32) -> Result<FieldKind, BtfError> {
        let r = self.resolve(id)?;
        let t = self.ty(r)?;
        Ok(match t.kind() {
            kind::INT => FieldKind::Int {
                signed: self.word(t.extra as usize)? & (1 << 24) != 0,
            },
            kind::PTR => FieldKind::Pointer,
            kind::STRUCT => FieldKind::Struct,
            kind::UNION => FieldKind::Union,
            kind::ENUM | kind::ENUM64 => FieldKind::Enum,
            kind::ARRAY => {
                let (elem, len) = self.array(r)?;
                FieldKind::Array {
                    elem_size: self.size_of(elem)?,
                    len,
                }
            }
            _ => FieldKind::Other,
        })
    }

    /// "struct foo", or for an anonymous struct where it was met.
    fn describe_container(&self, id: u32, root: &str, walked: &str) -> String {
        let Ok(t) = self.ty(id) else {
            return format!("type #{id}");
        };
        let tag = if t.kind() == kind::UNION {
            "union"
        } else {
            "struct"
        };
        match self.str_at(t.name_off) {
            Ok(n) if !n.is_empty() => format!("{tag} {n}"),
            _ => format!("anonymous {tag} at `{walked}` in struct {root}"),
        }
    }

    /// The C-like name of a type, for display (bounded in depth and length).
    fn type_name(&self, id: u32) -> String {
        let mut s = self.type_name_at(id, 0);
        if s.len() > MAX_TYPE_NAME {
            let mut cut = MAX_TYPE_NAME;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push('…');
        }
        s
    }

    fn type_name_at(&self, id: u32, depth: usize) -> String {
        if depth > MAX_NESTING {
            return "…".to_string();
        }
        let Ok(t) = self.ty(id) else {
            return format!("<bad type #{id}>");
        };
        if id == 0 {
            return "void".to_string();
        }
        let name = self.str_at(t.name_off).unwrap_or("?");
        let named = |tag: &str| {
            if name.is_empty() {
                format!("{tag} <anonymous>")
            } else {
                format!("{tag} {name}")
            }
        };
        let inner = || self.type_name_at(t.size_or_type, depth + 1);
        match t.kind() {
            kind::INT | kind::FLOAT | kind::TYPEDEF => name.to_string(),
            kind::STRUCT => named("struct"),
            kind::UNION => named("union"),
            kind::ENUM | kind::ENUM64 => named("enum"),
            kind::FWD => named(if t.kind_flag() { "union" } else { "struct" }),
            kind::PTR => format!("{} *", inner()),
            kind::CONST => format!("const {}", inner()),
            kind::VOLATILE => format!("volatile {}", inner()),
            kind::RESTRICT => format!("restrict {}", inner()),
            kind::TYPE_TAG => inner(),
            kind::FUNC_PROTO => "fn(..)".to_string(),
            kind::ARRAY => match self.array(id) {
                Ok((elem, len)) => format!("{}[{len}]", self.type_name_at(elem, depth + 1)),
                Err(_) => "<bad array>".to_string(),
            },
            _ => format!("<kind {}>", t.kind()),
        }
    }
}

/// Drops a leading `struct ` / `union ` so that both spellings are accepted.
fn strip_tag(name: &str) -> &str {
    let name = name.trim();
    name.strip_prefix("struct ")
        .or_else(|| name.strip_prefix("union "))
        .unwrap_or(name)
        .trim()
}

/// Splits `a.b[1][2].c` into `[("a", []), ("b", [1, 2]), ("c", [])]`.
fn parse_path(path: &str) -> Result<Vec<(&str, Vec<u64>)>, BtfError> {
    let invalid = || BtfError::InvalidPath(path.chars().take(MAX_PATH_LEN).collect());
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err(invalid());
    }
    let mut out = Vec::new();
    for comp in path.split('.') {
        let name_end = comp.find('[').unwrap_or(comp.len());
        let (name, mut rest) = comp.split_at(name_end);
        let mut chars = name.chars();
        let ident_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident_ok {
            return Err(invalid());
        }
        let mut indices = Vec::new();
        while !rest.is_empty() {
            let close = rest.find(']').ok_or_else(invalid)?;
            let digits = rest.get(1..close).ok_or_else(invalid)?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            indices.push(digits.parse::<u64>().map_err(|_| invalid())?);
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(invalid());
            }
        }
        out.push((name, indices));
    }
    Ok(out)
}
