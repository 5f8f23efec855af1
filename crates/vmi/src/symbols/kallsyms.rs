//! Recovery of the kallsyms tables compiled into a kernel image.
//!
//! Distribution kernels (Debian's among them) ship no ELF symbol table and a
//! stub System.map, but every kernel built with `CONFIG_KALLSYMS` carries its
//! own compressed symbol table in `.rodata` for `/proc/kallsyms`. Its format
//! is set by the kernel's `scripts/kallsyms.c` (writer) and
//! `kernel/kallsyms.c` (reader). Every table starts at an 8-byte aligned
//! label on 64-bit kernels:
//!
//! - `kallsyms_num_syms`: u32 symbol count.
//! - `kallsyms_names`: per symbol a length (one byte; since 6.1 a length of
//!   0x80 or more takes two bytes, low 7 bits first) then that many token
//!   indices. The first decoded character is the symbol's type letter.
//! - `kallsyms_markers`: u32 (u64 on old kernels) offset into the names of
//!   every 256th symbol.
//! - `kallsyms_token_table`: 256 NUL-terminated tokens.
//! - `kallsyms_token_index`: 256 u16 offsets of those tokens.
//! - `kallsyms_offsets` (i32 per symbol) + `kallsyms_relative_base` (u64),
//!   or on old kernels `kallsyms_addresses` (u64 per symbol).
//! - `kallsyms_seqs_of_names` (6.2+): 3 bytes per symbol, ignored here.
//!
//! The order of the tables changed: up to 6.1 the addresses come first
//! (offsets, relative_base, num_syms, names, markers, token_table,
//! token_index); 6.2 and 6.3 put seqs_of_names between markers and
//! token_table, and so do later 6.1.y stable kernels, where it was
//! backported (Debian's 6.1.0-56, i.e. 6.1.192, has it); 6.4+ moved the
//! addresses after token_index.
//!
//! There is no symbol telling where the tables are, so we search: the token
//! index must describe the token table right before it exactly, which is a
//! strong self-check. From there we walk back to the markers, the names and
//! num_syms (which must agree with each other exactly), and try each known
//! place for the addresses, keeping the one that is sorted as kallsyms is.
//!
//! All of this runs on untrusted bytes (a fuzz target feeds it arbitrary
//! input): every read is bounds-checked, counts are capped and checked
//! against the bytes available before anything is allocated.

use super::{Symbol, SymbolsError};

/// Most symbols we accept; real kernels have ~100–200k.
pub const MAX_SYMS: u32 = 1 << 22;
/// Longest decoded symbol we accept (type letter included). The kernel's
/// KSYM_NAME_LEN is 512 since 6.1 (128 before).
pub const MAX_NAME_LEN: usize = 1024;
/// Cap on the total size of all decoded names, so a crafted table whose
/// one-byte entries expand to long tokens cannot blow up memory.
pub const MAX_DECODED_TOTAL: usize = 64 << 20;
/// Longest token we accept in the token table.
const MAX_TOKEN_LEN: usize = 512;
/// How many token-table candidates we try before giving up (bounds the work
/// on hostile input; real images have exactly one).
const MAX_CANDIDATES: usize = 64;
/// Fraction of adjacent address pairs that must be in ascending order for an
/// address table to be believed (kallsyms is sorted by address).
const MIN_SORTED_FRACTION: f64 = 0.95;
/// Alignment of every kallsyms label on 64-bit kernels (`ALGN`).
const ALIGN: u64 = 8;

/// Which arrangement of the tables was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KallsymsLayout {
    /// Up to 6.1: offsets, relative_base, num_syms, names, markers,
    /// token_table, token_index.
    AddressesFirst,
    /// 6.2–6.3 and late 6.1.y: as [`Self::AddressesFirst`] with
    /// seqs_of_names between markers and token_table.
    AddressesFirstWithSeqs,
    /// 6.4+: num_syms, names, markers, token_table, token_index, offsets,
    /// relative_base, seqs_of_names.
    AddressesLast,
    /// Kernels without CONFIG_KALLSYMS_BASE_RELATIVE: absolute u64
    /// `kallsyms_addresses` before num_syms.
    AbsoluteAddresses,
}

/// How `kallsyms_offsets` encode addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressEncoding {
    /// CONFIG_KALLSYMS_ABSOLUTE_PERCPU: offset >= 0 is an absolute value
    /// (per-CPU symbols), negative is `relative_base - 1 - offset`.
    AbsolutePercpu,
    /// Unsigned offset from `relative_base`.
    Relative,
    /// Absolute u64 addresses.
    Absolute,
}

/// The recovered table and where its parts were found (link-time addresses),
/// kept for diagnostics.
#[derive(Debug, Clone)]
pub struct KallsymsTables {
    /// Symbols in kallsyms order (ascending address).
    pub symbols: Vec<Symbol>,
    /// Arrangement of the tables.
    pub layout: KallsymsLayout,
    /// Encoding of the address table.
    pub encoding: AddressEncoding,
    /// `kallsyms_relative_base`, when the offsets encoding is used.
    pub relative_base: Option<u64>,
    /// Address of `kallsyms_num_syms`.
    pub num_syms_addr: u64,
    /// Address of `kallsyms_names`.
    pub names_addr: u64,
    /// Address of `kallsyms_markers`.
    pub markers_addr: u64,
    /// Address of `kallsyms_token_table`.
    pub token_table_addr: u64,
    /// Address of `kallsyms_token_index`.
    pub token_index_addr: u64,
    /// Address of `kallsyms_offsets` / `kallsyms_addresses`.
    pub addresses_addr: u64,
}

/// A byte slice that knows the link-time address of its first byte, so that
/// alignment is computed on addresses, as the assembler did.
#[derive(Clone, Copy)]
struct Blob<'a> {
    data: &'a [u8],
    base: u64,
}

impl<'a> Blob<'a> {
    fn len(&self) -> usize {
        self.data.len()
    }

    fn bytes(&self, off: usize, len: usize) -> Option<&'a [u8]> {
        self.data.get(off..off.checked_add(len)?)
    }

    fn array<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.bytes(off, N)?.try_into().ok()
    }

    fn u8(&self, off: usize) -> Option<u8> {
        self.data.get(off).copied()
    }

    fn u16(&self, off: usize) -> Option<u16> {
        self.array(off).map(u16::from_le_bytes)
    }

    fn u32(&self, off: usize) -> Option<u32> {
        self.array(off).map(u32::from_le_bytes)
    }

    fn u64(&self, off: usize) -> Option<u64> {
        self.array(off).map(u64::from_le_bytes)
    }

    fn addr(&self, off: usize) -> u64 {
        self.base.wrapping_add(off as u64)
    }

    fn misalignment(&self, off: usize, align: u64) -> usize {
        // `align` is a small power of two, so the remainder fits a usize.
        (self.addr(off) % align) as usize
    }

    fn is_aligned(&self, off: usize, align: u64) -> bool {
        self.misalignment(off, align) == 0
    }

    fn align_up(&self, off: usize, align: u64) -> Option<usize> {
        match self.misalignment(off, align) {
            0 => Some(off),
            r => off.checked_add(align as usize - r),
        }
    }

    fn align_down(&self, off: usize, align: u64) -> Option<usize> {
        off.checked_sub(self.misalignment(off, align))
    }

    /// True when `data[from..to]` exists and is all zero (alignment padding).
    fn zeros(&self, from: usize, to: usize) -> bool {
        from <= to
            && self
                .data
                .get(from..to)
                .is_some_and(|b| b.iter().all(|&x| x == 0))
    }
}

/// The token table and its index, checked against each other.
struct Tokens<'a> {
    table_off: usize,
    index_off: usize,
    tokens: Vec<&'a [u8]>,
}

/// Recovers the kallsyms tables from the bytes of `.rodata` (or any region
/// containing them) whose first byte is at link-time address `rodata_addr`.
///
/// This is the entry point the fuzz target drives: it needs no ELF.
pub fn parse_kallsyms_blob(
    rodata: &[u8],
    rodata_addr: u64,
) -> Result<KallsymsTables, SymbolsError> {
    let blob = Blob {
        data: rodata,
        base: rodata_addr,
    };
    let mut last_err = SymbolsError::TokenTableNotFound;
    for tokens in find_token_tables(blob).take(MAX_CANDIDATES) {
        match tables_around(blob, &tokens) {
            Ok(tables) => return Ok(tables),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

/// Every place where 256 u16 offsets describe, exactly, 256 NUL-terminated
/// printable tokens stored right before them.
fn find_token_tables(blob: Blob<'_>) -> impl Iterator<Item = Tokens<'_>> {
    let start = blob.align_up(0, 2).unwrap_or(usize::MAX);
    let last = blob.len().saturating_sub(512);
    (start..=last)
        .step_by(2)
        .filter(move |&off| blob.u16(off) == Some(0))
        .filter_map(move |off| token_table_at(blob, off))
}

/// Checks the token index at `index_off` and finds its token table.
fn token_table_at(blob: Blob<'_>, index_off: usize) -> Option<Tokens<'_>> {
    let mut index = [0usize; 256];
    let mut prev = 0usize;
    for (i, slot) in index.iter_mut().enumerate() {
        *slot = usize::from(blob.u16(index_off + 2 * i)?);
        if i > 0 {
            let step = slot.checked_sub(prev)?;
            // Each token is at least one char plus its NUL.
            if !(2..=MAX_TOKEN_LEN + 1).contains(&step) {
                return None;
            }
        }
        prev = *slot;
    }
    // The table ends with the last token's NUL, then zero padding (< ALIGN
    // bytes) up to the index. Find the last non-zero byte before the index.
    let mut nz = index_off.checked_sub(1)?;
    while blob.u8(nz)? == 0 {
        nz = nz.checked_sub(1)?;
        if index_off - nz > ALIGN as usize + 1 {
            return None;
        }
    }
    let table_end = nz + 2; // past the NUL after the last char
    if table_end > index_off || index_off - table_end >= ALIGN as usize {
        return None;
    }
    // Start of the last token: just after the previous NUL.
    let mut last_start = nz;
    while last_start > 0 && blob.u8(last_start - 1)? != 0 {
        last_start -= 1;
        if nz - last_start > MAX_TOKEN_LEN {
            return None;
        }
    }
    let table_off = last_start.checked_sub(index[255])?;
    let mut tokens = Vec::with_capacity(256);
    for i in 0..256 {
        let start = table_off + index[i];
        let end = if i == 255 {
            table_end
        } else {
            table_off + index[i + 1]
        };
        let with_nul = blob.data.get(start..end)?;
        let (&nul, token) = with_nul.split_last()?;
        if nul != 0 || token.is_empty() || !token.iter().all(u8::is_ascii_graphic) {
            return None;
        }
        tokens.push(token);
    }
    Some(Tokens {
        table_off,
        index_off,
        tokens,
    })
}

/// The names table as located: where it starts, how many entries, where the
/// markers and num_syms are.
struct Names {
    num_syms_off: usize,
    names_off: usize,
    markers_off: usize,
    num_syms: u32,
}

/// Finds markers, names and num_syms before the token table, then the
/// addresses, and decodes everything.
fn tables_around(blob: Blob<'_>, tokens: &Tokens<'_>) -> Result<KallsymsTables, SymbolsError> {
    let at = blob.addr(tokens.table_off);
    let inconsistent = |reason| SymbolsError::TablesInconsistent { at, reason };

    // Markers right before the token table (early 6.1 and older, 6.4+).
    let mut names = None;
    for width in [4usize, 8] {
        if let Some((markers_off, markers)) = markers_ending_at(blob, tokens.table_off, width) {
            names = find_names(blob, tokens, markers_off, &markers);
            if names.is_some() {
                break;
            }
        }
    }
    let (names, with_seqs) = match names {
        Some(n) => (n, false),
        // 6.2–6.3, late 6.1.y: seqs_of_names (3 bytes per symbol) sits in between.
        None => (
            names_before_seqs(blob, tokens).ok_or_else(|| {
                inconsistent("no kallsyms_markers/kallsyms_names before the token table")
            })?,
            true,
        ),
    };

    let n = names.num_syms as usize;
    let mut candidates: Vec<(KallsymsLayout, Addresses)> = Vec::new();
    // 6.4+: offsets right after token_index, then relative_base.
    if !with_seqs {
        if let Some(off) = blob.align_up(tokens.index_off + 512, ALIGN) {
            if let Some(a) = relative_addresses(blob, off, n) {
                candidates.push((KallsymsLayout::AddressesLast, a));
            }
        }
    }
    // ≤ 6.3: relative_base right before num_syms, offsets before it.
    if let Some(base_off) = names.num_syms_off.checked_sub(8) {
        let start = base_off
            .checked_sub(4 * n)
            .and_then(|o| blob.align_down(o, ALIGN));
        if let Some(a) = start.and_then(|off| relative_addresses(blob, off, n)) {
            let layout = if with_seqs {
                KallsymsLayout::AddressesFirstWithSeqs
            } else {
                KallsymsLayout::AddressesFirst
            };
            candidates.push((layout, a));
        }
    }
    // Old kernels: absolute u64 addresses before num_syms.
    if let Some(off) = names.num_syms_off.checked_sub(8 * n) {
        if let Some(raw) = blob.bytes(off, 8 * n) {
            let addrs = raw
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect();
            let a = Addresses {
                off,
                encoding: AddressEncoding::Absolute,
                relative_base: None,
                addrs,
            };
            candidates.push((KallsymsLayout::AbsoluteAddresses, a));
        }
    }
    let best = candidates
        .into_iter()
        .map(|c| (sorted_fraction(&c.1.addrs), c))
        .filter(|(score, _)| *score >= MIN_SORTED_FRACTION)
        // Best score; on a tie (tiny tables) the earlier, more common layout.
        .reduce(|best, c| if c.0 > best.0 { c } else { best });
    let Some((_, (layout, addresses))) = best else {
        return Err(SymbolsError::AddressesNotFound {
            names_at: blob.addr(names.names_off),
        });
    };

    let decoded = decode_names(blob, tokens, &names)
        .ok_or_else(|| inconsistent("kallsyms_names does not decode"))?;
    let symbols = decoded
        .into_iter()
        .zip(addresses.addrs)
        .map(|((kind, name), addr)| Symbol { name, addr, kind })
        .collect();
    Ok(KallsymsTables {
        symbols,
        layout,
        encoding: addresses.encoding,
        relative_base: addresses.relative_base,
        num_syms_addr: blob.addr(names.num_syms_off),
        names_addr: blob.addr(names.names_off),
        markers_addr: blob.addr(names.markers_off),
        token_table_addr: blob.addr(tokens.table_off),
        token_index_addr: blob.addr(tokens.index_off),
        addresses_addr: blob.addr(addresses.off),
    })
}

/// One candidate address table.
struct Addresses {
    /// Offset of `kallsyms_offsets` / `kallsyms_addresses` in the blob.
    off: usize,
    encoding: AddressEncoding,
    relative_base: Option<u64>,
    /// Decoded addresses, one per symbol.
    addrs: Vec<u64>,
}

/// Reads `n` i32 offsets at `off` and `kallsyms_relative_base` at the first
/// aligned slot after them (where every layout puts it), and decodes them as
/// `kernel/kallsyms.c:kallsyms_sym_address` does.
fn relative_addresses(blob: Blob<'_>, off: usize, n: usize) -> Option<Addresses> {
    let end = off.checked_add(n.checked_mul(4)?)?;
    let base_off = blob.align_up(end, ALIGN)?;
    if !blob.zeros(end, base_off) {
        return None;
    }
    let base = blob.u64(base_off)?;
    if base == 0 {
        return None;
    }
    let raw = blob.bytes(off, n * 4)?;
    let offsets = raw
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let percpu = offsets.clone().any(|o| o < 0);
    let addrs = offsets
        .map(|o| {
            if !percpu {
                base.wrapping_add(u64::from(o as u32))
            } else if o >= 0 {
                o as u64
            } else {
                // base - 1 - o, with o negative.
                base.wrapping_sub(1)
                    .wrapping_add(i64::from(o).unsigned_abs())
            }
        })
        .collect();
    let enc = if percpu {
        AddressEncoding::AbsolutePercpu
    } else {
        AddressEncoding::Relative
    };
    Some(Addresses {
        off,
        encoding: enc,
        relative_base: Some(base),
        addrs,
    })
}

/// Fraction of adjacent pairs in ascending order (1.0 for fewer than two).
fn sorted_fraction(addrs: &[u64]) -> f64 {
    if addrs.len() < 2 {
        return 1.0;
    }
    let ok = addrs.windows(2).filter(|w| w[0] <= w[1]).count();
    ok as f64 / (addrs.len() - 1) as f64
}

/// Markers are strictly increasing from 0 and end (after at most one zero
/// padding slot) at `end`. Walks back from `end`; returns their start.
fn markers_ending_at(blob: Blob<'_>, end: usize, width: usize) -> Option<(usize, Vec<u64>)> {
    let read = |off: usize| match width {
        4 => blob.u32(off).map(u64::from),
        _ => blob.u64(off),
    };
    let max_markers = (MAX_SYMS as usize).div_ceil(256);
    let mut pos = end;
    if width == 4 && read(pos.checked_sub(4)?)? == 0 {
        pos -= 4; // padding after an odd number of u32 markers
    }
    let mut markers = Vec::new();
    loop {
        pos = pos.checked_sub(width)?;
        let v = read(pos)?;
        if markers.last().is_some_and(|&prev| v >= prev) || markers.len() >= max_markers {
            return None;
        }
        markers.push(v);
        if v == 0 {
            break;
        }
    }
    if !blob.is_aligned(pos, ALIGN) {
        return None;
    }
    markers.reverse();
    Some((pos, markers))
}

/// Reads one names entry's length header at `off`: (header size, length).
fn entry_len(blob: Blob<'_>, off: usize) -> Option<(usize, usize)> {
    let b = blob.u8(off)?;
    if b & 0x80 == 0 {
        Some((1, usize::from(b)))
    } else {
        let hi = blob.u8(off + 1)?;
        Some((2, usize::from(b & 0x7f) | usize::from(hi) << 7))
    }
}

/// Skips `count` names entries from `off`; returns the offset after them.
fn skip_entries(blob: Blob<'_>, mut off: usize, count: usize) -> Option<usize> {
    for _ in 0..count {
        let (hdr, len) = entry_len(blob, off)?;
        if len == 0 {
            return None;
        }
        off = off.checked_add(hdr + len)?;
        if off > blob.len() {
            return None;
        }
    }
    Some(off)
}

/// Given the markers, finds where the names start and num_syms such that
/// the names decode to exactly num_syms entries, every 256th entry starts at
/// its marker, and the last one ends (plus padding) at the markers.
fn find_names(
    blob: Blob<'_>,
    tokens: &Tokens<'_>,
    markers_off: usize,
    markers: &[u64],
) -> Option<Names> {
    let m = markers.len();
    let last_marker = usize::try_from(*markers.last()?).ok()?;
    let min_syms = 256 * (m - 1) + 1;
    let max_syms = (256 * m).min(MAX_SYMS as usize);
    if min_syms > max_syms {
        return None;
    }
    // names_off + last_marker < markers_off, and the last group (≤ 256
    // entries of ≤ 2 + MAX_NAME_LEN bytes) lies in between.
    let hi = markers_off.checked_sub(last_marker)?.checked_sub(1)?;
    let lo = hi.saturating_sub(256 * (2 + MAX_NAME_LEN));
    let mut names_off = blob.align_down(hi, 4)?;
    while names_off >= lo {
        for num_syms_off in [names_off.checked_sub(8), names_off.checked_sub(4)]
            .into_iter()
            .flatten()
        {
            let Some(n) = blob.u32(num_syms_off) else {
                continue;
            };
            let n_usize = n as usize;
            if !(min_syms..=max_syms).contains(&n_usize) || !blob.is_aligned(num_syms_off, 4) {
                continue;
            }
            if !blob.zeros(num_syms_off + 4, names_off) {
                continue;
            }
            // Cheap check on the last group first, then the whole table.
            let Some(end) = skip_entries(blob, names_off + last_marker, n_usize - 256 * (m - 1))
            else {
                continue;
            };
            if end > markers_off
                || markers_off - end >= ALIGN as usize
                || !blob.zeros(end, markers_off)
            {
                continue;
            }
            let names = Names {
                num_syms_off,
                names_off,
                markers_off,
                num_syms: n,
            };
            if markers_match(blob, &names, markers) && names_expand(blob, tokens, &names) {
                return Some(names);
            }
        }
        names_off = names_off.checked_sub(4)?;
    }
    None
}

/// Every 256th entry starts exactly at its marker.
fn markers_match(blob: Blob<'_>, names: &Names, markers: &[u64]) -> bool {
    let mut off = names.names_off;
    let n = names.num_syms as usize;
    for (k, &marker) in markers.iter().enumerate() {
        if (off - names.names_off) as u64 != marker {
            return false;
        }
        let group = (n - 256 * k).min(256);
        match skip_entries(blob, off, group) {
            Some(next) => off = next,
            None => return false,
        }
    }
    true
}

/// Dry run of [`decode_names`]: every entry expands to a type letter and a
/// non-empty name of bounded length, and the total stays under the cap.
fn names_expand(blob: Blob<'_>, tokens: &Tokens<'_>, names: &Names) -> bool {
    let mut off = names.names_off;
    let mut total = 0usize;
    for _ in 0..names.num_syms {
        let Some((hdr, len)) = entry_len(blob, off) else {
            return false;
        };
        let Some(entry) = blob.bytes(off + hdr, len) else {
            return false;
        };
        let expanded: usize = entry
            .iter()
            .map(|&t| tokens.tokens.get(usize::from(t)).map_or(0, |t| t.len()))
            .sum();
        if !(2..=MAX_NAME_LEN).contains(&expanded) {
            return false;
        }
        total += expanded;
        if total > MAX_DECODED_TOTAL {
            return false;
        }
        off += hdr + len;
    }
    true
}

/// Decodes every entry into (type letter, name).
fn decode_names(blob: Blob<'_>, tokens: &Tokens<'_>, names: &Names) -> Option<Vec<(char, String)>> {
    let n = names.num_syms as usize;
    // n entries take at least 2 bytes each: checked in find_names, so this
    // allocation is bounded by the input size.
    let mut out = Vec::with_capacity(n.min(blob.len() / 2));
    let mut off = names.names_off;
    let mut buf = Vec::with_capacity(MAX_NAME_LEN);
    for _ in 0..n {
        let (hdr, len) = entry_len(blob, off)?;
        let entry = blob.bytes(off.checked_add(hdr)?, len)?;
        buf.clear();
        for &t in entry {
            buf.extend_from_slice(tokens.tokens.get(usize::from(t))?);
        }
        let (&kind, name) = buf.split_first()?;
        if name.is_empty() || buf.len() > MAX_NAME_LEN {
            return None;
        }
        // Tokens were checked to be printable ASCII, so this is lossless.
        out.push((
            char::from(kind),
            name.iter().map(|&b| char::from(b)).collect(),
        ));
        off = off.checked_add(hdr + len)?;
    }
    Some(out)
}

/// 6.2–6.3 and late 6.1.y: seqs_of_names (3 bytes per symbol, 8-aligned) between the
/// markers and the token table. The symbol count is unknown, so try each:
/// it fixes where seqs start and therefore where the markers end.
fn names_before_seqs(blob: Blob<'_>, tokens: &Tokens<'_>) -> Option<Names> {
    let max_n = (MAX_SYMS as usize).min(tokens.table_off / 3);
    for n in 1..=max_n {
        let seqs_off = blob.align_down(tokens.table_off - 3 * n, ALIGN)?;
        if tokens.table_off - (seqs_off + 3 * n) >= ALIGN as usize {
            continue;
        }
        let m = n.div_ceil(256);
        // Markers (u32) start 8-aligned and end, padded, at seqs_off.
        let markers_off = seqs_off.checked_sub(4 * m + (m % 2) * 4)?;
        if blob.u32(markers_off) != Some(0) {
            continue;
        }
        let Some((found_off, markers)) = markers_ending_at(blob, seqs_off, 4) else {
            continue;
        };
        if found_off != markers_off || markers.len() != m {
            continue;
        }
        if let Some(names) = find_names(blob, tokens, markers_off, &markers) {
            if names.num_syms as usize == n {
                return Some(names);
            }
        }
    }
    None
}
