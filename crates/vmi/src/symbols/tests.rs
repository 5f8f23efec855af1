//! Tests on synthetic kallsyms blobs built by a tiny encoder that follows
//! scripts/kallsyms.c's output format, in each known table order.

use super::*;
use proptest::prelude::*;

const RODATA: u64 = 0xffff_ffff_8200_0000;
const TEXT: u64 = 0xffff_ffff_8100_0000;

/// Multi-character tokens for the codes that no symbol character uses.
const WORDS: &[&str] = &[
    "__", "sys_", "_x64", "init", "ker", "nel", "task", "_struct", "entry", "SYSCALL", "_64",
    "do_", "per_cpu", "fixed", "data", "start", "end", "_t", "ex", "ar",
];

struct Encoder {
    tokens: Vec<Vec<u8>>,
    /// (code, token) for multi-char tokens, longest first.
    multi: Vec<(u8, Vec<u8>)>,
}

impl Encoder {
    fn new() -> Self {
        let mut tokens = Vec::with_capacity(256);
        let mut multi = Vec::new();
        let mut filler = 0usize;
        for code in 0u16..256 {
            let c = code as u8;
            let tok: Vec<u8> = if c.is_ascii_graphic() {
                vec![c]
            } else {
                let t = match WORDS.get(filler) {
                    Some(w) => w.as_bytes().to_vec(),
                    // Distinct filler tokens that never match our names.
                    None => vec![b'~', b'!' + (filler / 90) as u8, b'!' + (filler % 90) as u8],
                };
                filler += 1;
                multi.push((c, t.clone()));
                t
            };
            tokens.push(tok);
        }
        multi.sort_by_key(|(_, t)| std::cmp::Reverse(t.len()));
        Self { tokens, multi }
    }

    fn compress(&self, s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            if let Some((code, t)) = self.multi.iter().find(|(_, t)| s[i..].starts_with(t)) {
                out.push(*code);
                i += t.len();
            } else {
                out.push(s[i]);
                i += 1;
            }
        }
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Emit {
    AddressesFirst,
    WithSeqs,
    AddressesLast,
    Absolute,
}

/// How the addresses are encoded in the offsets table.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Enc {
    Percpu,
    Relative,
}

struct Out {
    buf: Vec<u8>,
    base: u64,
}

impl Out {
    fn label(&mut self) -> usize {
        while (self.base + self.buf.len() as u64) & 7 != 0 {
            self.buf.push(0);
        }
        self.buf.len()
    }
    fn put(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
}

/// Builds a `.rodata`-like blob at `base` holding `prefix`, the kallsyms
/// tables for `syms` (which must be sorted by address) and `suffix`.
fn build(
    syms: &[Symbol],
    emit: Emit,
    enc: Enc,
    base: u64,
    prefix: &[u8],
    suffix: &[u8],
) -> Vec<u8> {
    let e = Encoder::new();
    let mut o = Out {
        buf: prefix.to_vec(),
        base,
    };
    let rel_base = syms
        .iter()
        .map(|s| s.addr)
        .filter(|&a| a >= KERNEL_HALF)
        .min()
        .unwrap_or(TEXT);
    let offsets: Vec<u8> = syms
        .iter()
        .flat_map(|s| {
            let v: i32 = match enc {
                Enc::Percpu if s.addr < KERNEL_HALF => s.addr as i32,
                Enc::Percpu => (i128::from(rel_base) - i128::from(s.addr) - 1) as i32,
                Enc::Relative => (s.addr - rel_base) as u32 as i32,
            };
            v.to_le_bytes()
        })
        .collect();
    let offsets_and_base = |o: &mut Out| {
        o.label();
        o.put(&offsets);
        o.label();
        o.put(&rel_base.to_le_bytes());
    };
    let mut names = Vec::new();
    let mut markers = Vec::new();
    for (i, s) in syms.iter().enumerate() {
        if i % 256 == 0 {
            markers.push(names.len() as u32);
        }
        let mut full = vec![s.kind as u8];
        full.extend_from_slice(s.name.as_bytes());
        let c = e.compress(&full);
        if c.len() < 0x80 {
            names.push(c.len() as u8);
        } else {
            names.push((c.len() & 0x7f) as u8 | 0x80);
            names.push((c.len() >> 7) as u8);
        }
        names.extend_from_slice(&c);
    }
    let seqs: Vec<u8> = {
        let mut idx: Vec<usize> = (0..syms.len()).collect();
        idx.sort_by(|&a, &b| syms[a].name.cmp(&syms[b].name));
        idx.iter()
            .flat_map(|&i| [(i >> 16) as u8, (i >> 8) as u8, i as u8])
            .collect()
    };

    match emit {
        Emit::AddressesFirst | Emit::WithSeqs => offsets_and_base(&mut o),
        Emit::Absolute => {
            o.label();
            for s in syms {
                o.put(&s.addr.to_le_bytes());
            }
        }
        Emit::AddressesLast => {}
    }
    o.label();
    o.put(&(syms.len() as u32).to_le_bytes());
    o.label();
    o.put(&names);
    o.label();
    for m in &markers {
        o.put(&m.to_le_bytes());
    }
    if emit == Emit::WithSeqs {
        o.label();
        o.put(&seqs);
    }
    o.label();
    let mut index = Vec::new();
    let mut off = 0u16;
    for t in &e.tokens {
        index.push(off);
        o.put(t);
        o.put(&[0]);
        off += t.len() as u16 + 1;
    }
    o.label();
    for i in index {
        o.put(&i.to_le_bytes());
    }
    if emit == Emit::AddressesLast {
        offsets_and_base(&mut o);
        o.label();
        o.put(&seqs);
    }
    o.put(suffix);
    o.buf
}

fn sym(name: &str, addr: u64, kind: char) -> Symbol {
    Symbol {
        name: name.to_owned(),
        addr,
        kind,
    }
}

/// A kernel-like table: per-CPU symbols first, a long name, duplicates.
fn sample(n: usize) -> Vec<Symbol> {
    let mut v = vec![
        sym("fixed_percpu_data", 0, 'A'),
        sym("__per_cpu_start", 0, 'A'),
        sym("cpu_number", 0x1a000, 'A'),
        sym("_text", TEXT, 'T'),
        sym("startup_64", TEXT, 'T'),
    ];
    let long = format!("very_long_{}", "q".repeat(300));
    for i in 0..n {
        let addr = TEXT + 0x1000 + 0x40 * i as u64;
        let name = match i % 7 {
            0 => format!("__x64_sys_call_{i}"),
            1 => "dup_static_fn".to_owned(),
            2 if i == 2 => long.clone(),
            _ => format!("kernel_fn_{i}"),
        };
        v.push(sym(&name, addr, if i % 3 == 0 { 't' } else { 'T' }));
    }
    v.push(sym("entry_SYSCALL_64", TEXT + 0x100_0000, 'T'));
    v
}

fn check_roundtrip(syms: &[Symbol], emit: Emit, enc: Enc, base: u64, prefix: &[u8], suffix: &[u8]) {
    let blob = build(syms, emit, enc, base, prefix, suffix);
    let t = parse_kallsyms_blob(&blob, base).unwrap_or_else(|e| panic!("{emit:?}/{enc:?}: {e}"));
    assert_eq!(t.symbols, syms, "{emit:?}/{enc:?}");
    let layout = match emit {
        Emit::AddressesFirst => KallsymsLayout::AddressesFirst,
        Emit::WithSeqs => KallsymsLayout::AddressesFirstWithSeqs,
        Emit::AddressesLast => KallsymsLayout::AddressesLast,
        Emit::Absolute => KallsymsLayout::AbsoluteAddresses,
    };
    assert_eq!(t.layout, layout);
}

#[test]
fn roundtrips_every_layout() {
    let syms = sample(700);
    let prefix: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    for emit in [
        Emit::AddressesFirst,
        Emit::WithSeqs,
        Emit::AddressesLast,
        Emit::Absolute,
    ] {
        check_roundtrip(&syms, emit, Enc::Percpu, RODATA, &prefix, b"trailing junk");
        check_roundtrip(&syms, emit, Enc::Percpu, RODATA + 4, &[], &[]);
    }
}

#[test]
fn relative_encoding_without_percpu() {
    let syms: Vec<Symbol> = sample(300)
        .into_iter()
        .filter(|s| s.addr >= KERNEL_HALF)
        .collect();
    for emit in [Emit::AddressesFirst, Emit::AddressesLast] {
        let blob = build(&syms, emit, Enc::Relative, RODATA, &[1, 2, 3], &[]);
        let t = parse_kallsyms_blob(&blob, RODATA).unwrap();
        assert_eq!(t.encoding, AddressEncoding::Relative);
        assert_eq!(t.symbols, syms);
    }
}

#[test]
fn group_boundaries() {
    // Exactly one full group, one more than that, and a single symbol.
    for n in [1usize, 250, 251, 506, 507] {
        let syms = sample(n);
        for emit in [Emit::AddressesFirst, Emit::AddressesLast, Emit::WithSeqs] {
            check_roundtrip(&syms, emit, Enc::Percpu, RODATA, &[0; 16], &[]);
        }
    }
}

#[test]
fn truncation_and_corruption_do_not_panic() {
    let syms = sample(300);
    let blob = build(&syms, Emit::AddressesLast, Enc::Percpu, RODATA, &[], &[]);
    for cut in (0..blob.len()).step_by(97) {
        let _ = parse_kallsyms_blob(&blob[..cut], RODATA);
        let _ = parse_kallsyms_blob(&blob[cut..], RODATA + cut as u64);
    }
    let mut bad = blob.clone();
    for i in (0..bad.len()).step_by(131) {
        bad[i] ^= 0x5a;
        let _ = parse_kallsyms_blob(&bad, RODATA);
    }
    assert!(matches!(
        parse_kallsyms_blob(&[], RODATA),
        Err(SymbolsError::TokenTableNotFound)
    ));
}

#[test]
fn lookups_and_symbolize() {
    let syms = sample(20);
    let blob = build(&syms, Emit::AddressesLast, Enc::Percpu, RODATA, &[], &[]);
    let ks = KernelSymbols::from_tables(parse_kallsyms_blob(&blob, RODATA).unwrap());
    assert_eq!(ks.len(), syms.len());
    assert_eq!(ks.address_of("entry_SYSCALL_64"), Some(TEXT + 0x100_0000));
    assert_eq!(ks.address_of("cpu_number"), Some(0x1a000));
    assert_eq!(ks.address_of("nope"), None);
    let dups = ks.addresses_of("dup_static_fn");
    assert_eq!(dups.len(), 3);
    assert!(dups.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(ks.address_of("dup_static_fn"), Some(dups[0]));
    // Aliases: the first at the address wins.
    assert_eq!(ks.symbolize(TEXT), Some(("_text", 0)));
    assert_eq!(ks.symbolize(TEXT + 0x1005), Some(("__x64_sys_call_0", 5)));
    assert_eq!(ks.symbolize(5), Some(("fixed_percpu_data", 5)));
    assert_eq!(ks.iter().count(), ks.len());
    assert!(ks.tables_info().is_some());
}

#[test]
fn system_map() {
    let ks = KernelSymbols::from_system_map(
        "ffffffff81000000 T _text\nffffffff81000000 T startup_64\n\nffffffff81001000 t helper\n",
    )
    .unwrap();
    assert_eq!(ks.len(), 3);
    assert_eq!(ks.address_of("helper"), Some(0xffff_ffff_8100_1000));
    assert!(matches!(
        KernelSymbols::from_system_map(
            "ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n"
        ),
        Err(SymbolsError::StubSystemMap)
    ));
    assert!(matches!(
        KernelSymbols::from_system_map("\n"),
        Err(SymbolsError::EmptySystemMap)
    ));
    assert!(matches!(
        KernelSymbols::from_system_map("ffffffff81000000 T _text\nzz T x\n"),
        Err(SymbolsError::BadSystemMapLine { line: 2 })
    ));
}

#[test]
fn compare_with_proc() {
    let ks = KernelSymbols::from_symbols(sample(10));
    let slide = 0x2a0_0000;
    let mut proc = String::new();
    for s in ks.iter() {
        let addr = if s.addr >= KERNEL_HALF {
            s.addr + slide
        } else {
            s.addr
        };
        proc.push_str(&format!("{addr:016x} {} {}\r\n", s.kind, s.name));
    }
    proc.push_str("ffffffffc0000000 t mod_fn\t[e1000]\n");
    proc.push_str("ffffffff81000000 T not_ours\n");
    proc.push_str("garbage\n");
    let c = ks.compare_with_proc_kallsyms(&proc, slide);
    assert_eq!(c.matched, ks.len());
    assert_eq!(c.missing.len(), 1);
    assert_eq!(c.module_lines, 1);
    assert_eq!(c.unparsed_lines, 1);
    assert_eq!(c.extra, 0);
    assert!(c.mismatched.is_empty());
    // Wrong slide: every kernel-half symbol mismatches, per-CPU ones still match.
    let c = ks.compare_with_proc_kallsyms(&proc, 0);
    assert_eq!(c.matched, 3);
    assert_eq!(c.mismatched.len(), ks.len() - 3);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_tables_roundtrip(
        names in prop::collection::vec("[a-z_][a-z0-9_.]{0,40}", 1..600),
        gaps in prop::collection::vec(0u64..0x400, 600),
        percpu in 0usize..4,
        emit in prop::sample::select(vec![Emit::AddressesFirst, Emit::AddressesLast, Emit::WithSeqs]),
        prefix in prop::collection::vec(any::<u8>(), 0..64),
        misalign in 0u64..8,
    ) {
        let mut addr = TEXT;
        let syms: Vec<Symbol> = names.iter().enumerate().map(|(i, n)| {
            if i < percpu && i + 1 < names.len() {
                sym(n, 0x40 * i as u64, 'A')
            } else {
                addr += gaps[i];
                sym(n, addr, if i % 2 == 0 { 'T' } else { 'd' })
            }
        }).collect();
        let base = RODATA + misalign;
        let blob = build(&syms, emit, Enc::Percpu, base, &prefix, &[]);
        let t = parse_kallsyms_blob(&blob, base).unwrap();
        prop_assert_eq!(t.symbols, syms);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4096), base in any::<u64>()) {
        let _ = parse_kallsyms_blob(&data, base);
    }
}
