//! Tests on small BTF blobs made by a tiny encoder, so that no kernel image
//! is needed.

use super::raw::kind;
use super::*;

/// Encodes BTF type records; ids are handed out in call order from 1, so a
/// test can refer to a type defined later (needed for cycles).
struct Enc {
    types: Vec<u8>,
    strings: Vec<u8>,
    next: u32,
}

impl Enc {
    fn new() -> Self {
        Enc {
            types: Vec::new(),
            strings: vec![0],
            next: 1,
        }
    }

    fn s(&mut self, name: &str) -> u32 {
        if name.is_empty() {
            return 0;
        }
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        off
    }

    fn words(&mut self, ws: &[u32]) {
        for w in ws {
            self.types.extend_from_slice(&w.to_le_bytes());
        }
    }

    fn head(&mut self, name: &str, k: u8, vlen: usize, kflag: bool, size_or_type: u32) -> u32 {
        let n = self.s(name);
        let info = (u32::from(kflag) << 31) | (u32::from(k) << 24) | vlen as u32;
        self.words(&[n, info, size_or_type]);
        self.next += 1;
        self.next - 1
    }

    fn int(&mut self, name: &str, size: u32, signed: bool) -> u32 {
        self.int_bits(name, size, signed, 0, size * 8)
    }

    fn int_bits(&mut self, name: &str, size: u32, signed: bool, shift: u32, bits: u32) -> u32 {
        let id = self.head(name, kind::INT, 0, false, size);
        self.words(&[(u32::from(signed) << 24) | (shift << 16) | bits]);
        id
    }

    fn ptr(&mut self, to: u32) -> u32 {
        self.head("", kind::PTR, 0, false, to)
    }

    fn typedef(&mut self, name: &str, to: u32) -> u32 {
        self.head(name, kind::TYPEDEF, 0, false, to)
    }

    fn modifier(&mut self, k: u8, to: u32) -> u32 {
        self.head("", k, 0, false, to)
    }

    fn array(&mut self, elem: u32, len: u32) -> u32 {
        let id = self.head("", kind::ARRAY, 0, false, 0);
        self.words(&[elem, elem, len]);
        id
    }

    /// `members`: (name, type, offset in bits).
    fn composite(&mut self, k: u8, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        let id = self.head(name, k, members.len(), false, size);
        for &(n, t, off) in members {
            let n = self.s(n);
            self.words(&[n, t, off]);
        }
        id
    }

    fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        self.composite(kind::STRUCT, name, size, members)
    }

    fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
        self.composite(kind::UNION, name, size, members)
    }

    /// kind_flag struct: (name, type, bit offset, bitfield width or 0).
    fn bitfield_struct(&mut self, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
        let id = self.head(name, kind::STRUCT, members.len(), true, size);
        for &(n, t, off, bits) in members {
            let n = self.s(n);
            self.words(&[n, t, (bits << 24) | off]);
        }
        id
    }

    fn fwd(&mut self, name: &str) -> u32 {
        self.head(name, kind::FWD, 0, false, 0)
    }

    fn enum32(&mut self, name: &str, signed: bool, values: &[(&str, i32)]) -> u32 {
        let id = self.head(name, kind::ENUM, values.len(), signed, 4);
        for &(n, v) in values {
            let n = self.s(n);
            self.words(&[n, v as u32]);
        }
        id
    }

    fn enum64(&mut self, name: &str, signed: bool, values: &[(&str, u64)]) -> u32 {
        let id = self.head(name, kind::ENUM64, values.len(), signed, 8);
        for &(n, v) in values {
            let n = self.s(n);
            self.words(&[n, v as u32, (v >> 32) as u32]);
        }
        id
    }

    fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&raw::MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        let tl = self.types.len() as u32;
        for w in [24, 0, tl, tl, self.strings.len() as u32] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// A miniature kernel: list_head, task_struct with an anonymous union and a
/// typedef'd pid, sock_common with nested anonymous unions/structs, bitfields,
/// arrays and enums.
fn kernel_like() -> Vec<u8> {
    let mut e = Enc::new();
    let int = e.int("int", 4, true); // 1
    let uint = e.int("unsigned int", 4, false); // 2
    let char_ = e.int("char", 1, true); // 3
    let ulong = e.int("long unsigned int", 8, false); // 4
    let list_head = e.next + 1; // defined after its pointer
    let plist = e.ptr(list_head); // 5
    let lh = e.strukt("list_head", 16, &[("next", plist, 0), ("prev", plist, 64)]);
    assert_eq!(lh, list_head);
    let pid_t_ = e.typedef("__kernel_pid_t", int);
    let pid_t = e.typedef("pid_t", pid_t_);
    let comm = e.array(char_, 16);
    let c_uint = e.modifier(kind::CONST, uint);
    let v_c_uint = e.modifier(kind::VOLATILE, c_uint);
    // union { unsigned int __state; long unsigned int flags2; }
    let anon_u = e.union("", 8, &[("__state", v_c_uint, 0), ("flags2", ulong, 0)]);
    let task = e.next + 3;
    let ptask = e.ptr(task);
    let mm = e.fwd("mm_struct");
    let pmm = e.ptr(mm);
    assert_eq!(pmm, task - 1);
    let t = e.strukt(
        "task_struct",
        96,
        &[
            ("flags", uint, 0),
            ("", anon_u, 64),
            ("tasks", lh, 128),
            ("pid", pid_t, 256),
            ("tgid", pid_t, 288),
            ("comm", comm, 320),
            ("real_parent", ptask, 448),
            ("mm", pmm, 512),
        ],
    );
    assert_eq!(t, task);
    // sock_common: union { u64 skc_addrpair; struct { u32 skc_daddr; u32 skc_rcv_saddr; }; }
    let addr_s = e.strukt(
        "",
        8,
        &[("skc_daddr", uint, 0), ("skc_rcv_saddr", uint, 32)],
    );
    let addr_u = e.union("", 8, &[("skc_addrpair", ulong, 0), ("", addr_s, 0)]);
    let u16_ = e.int("short unsigned int", 2, false);
    let ports_s = e.strukt("", 4, &[("skc_dport", u16_, 0), ("skc_num", u16_, 16)]);
    let ports_u = e.union("", 4, &[("skc_portpair", uint, 0), ("", ports_s, 0)]);
    let sc = e.bitfield_struct(
        "sock_common",
        24,
        &[
            ("", addr_u, 0, 0),
            ("", ports_u, 64, 0),
            ("skc_family", u16_, 96, 0),
            ("skc_state", uint, 112, 4),
            ("skc_reuse", uint, 116, 4),
        ],
    );
    let sk = e.strukt("sock", 24, &[("__sk_common", sc, 0)]);
    let psk = e.ptr(sk);
    e.strukt("socket", 8, &[("sk", psk, 0)]);
    // module_memory mem[3], through a typedef of the array
    let mm_s = e.strukt(
        "module_memory",
        16,
        &[("base", ulong, 0), ("size", uint, 64)],
    );
    let mem_arr = e.array(mm_s, 3);
    let mem_t = e.typedef("mem_arr_t", mem_arr);
    let grid = e.array(comm, 2); // char[2][16]
    e.strukt("module", 64, &[("mem", mem_t, 0), ("grid", grid, 384)]);
    e.enum32(
        "mod_mem_type",
        false,
        &[("MOD_TEXT", 0), ("MOD_DATA", 1), ("MOD_RODATA", 2)],
    );
    e.enum32("", false, &[("TCP_ESTABLISHED", 1), ("TCP_LISTEN", 10)]);
    e.enum32("neg", true, &[("NEG_ONE", -1)]);
    e.enum64("big", false, &[("BIG", 1 << 40)]);
    let anon_t = e.strukt("", 8, &[("x", ulong, 0)]);
    e.typedef("anon_t", anon_t);
    e.build()
}

fn btf() -> Btf {
    Btf::parse(&kernel_like()).expect("synthetic BTF parses")
}

#[test]
fn sizes_and_plain_members() {
    let b = btf();
    assert_eq!(b.struct_size("list_head").unwrap(), 16);
    assert_eq!(b.struct_size("struct task_struct").unwrap(), 96);
    assert_eq!(b.offset_of("list_head", "next").unwrap(), 0);
    assert_eq!(b.offset_of("list_head", "prev").unwrap(), 8);
    let tasks = b.field("task_struct", "tasks").unwrap();
    assert_eq!((tasks.offset, tasks.size), (16, 16));
    assert_eq!(tasks.kind, FieldKind::Struct);
    assert_eq!(tasks.type_name, "struct list_head");
    let rp = b.field("task_struct", "real_parent").unwrap();
    assert_eq!((rp.offset, rp.size, rp.kind), (56, 8, FieldKind::Pointer));
    assert_eq!(rp.type_name, "struct task_struct *");
    assert_eq!(b.offset_of("task_struct", "tasks.prev").unwrap(), 24);
    assert_eq!(b.offset_of("socket", "sk").unwrap(), 0);
}

#[test]
fn typedef_chains_and_qualifiers_are_looked_through() {
    let b = btf();
    let pid = b.field("task_struct", "pid").unwrap();
    assert_eq!(pid.offset, 32);
    assert_eq!(pid.size, 4);
    assert_eq!(pid.type_name, "pid_t");
    assert_eq!(pid.kind, FieldKind::Int { signed: true });
    let st = b.field("task_struct", "__state").unwrap();
    assert_eq!(st.offset, 8);
    assert_eq!(st.kind, FieldKind::Int { signed: false });
    assert_eq!(st.type_name, "volatile const unsigned int");
    // A typedef naming an anonymous struct is accepted as a struct name.
    assert_eq!(b.struct_size("anon_t").unwrap(), 8);
    assert_eq!(b.offset_of("anon_t", "x").unwrap(), 0);
}

#[test]
fn anonymous_members_are_transparent() {
    let b = btf();
    assert_eq!(b.offset_of("task_struct", "flags2").unwrap(), 8);
    assert_eq!(b.offset_of("sock", "__sk_common.skc_daddr").unwrap(), 0);
    assert_eq!(b.offset_of("sock", "__sk_common.skc_rcv_saddr").unwrap(), 4);
    assert_eq!(b.offset_of("sock", "__sk_common.skc_dport").unwrap(), 8);
    assert_eq!(b.offset_of("sock", "__sk_common.skc_num").unwrap(), 10);
    assert_eq!(b.offset_of("sock_common", "skc_family").unwrap(), 12);
    assert!(b.has_field("task_struct", "__state"));
    assert!(!b.has_field("task_struct", "state"));
}

#[test]
fn bitfields() {
    let b = btf();
    let st = b.field("sock_common", "skc_state").unwrap();
    assert_eq!((st.bit_offset, st.bit_size, st.offset), (112, Some(4), 14));
    let re = b.field("sock", "__sk_common.skc_reuse").unwrap();
    assert_eq!((re.bit_offset, re.bit_size, re.offset), (116, Some(4), 14));
    assert_eq!(re.size, 4);
    // A bitfield has no members.
    assert!(matches!(
        b.field("sock_common", "skc_state.x"),
        Err(BtfError::NotComposite { .. })
    ));
    // Not bitfields: kind_flag members with width 0.
    assert_eq!(b.field("sock_common", "skc_family").unwrap().bit_size, None);
}

#[test]
fn old_style_bitfield_from_int_encoding() {
    let mut e = Enc::new();
    let bits3 = e.int_bits("unsigned int", 4, false, 0, 3);
    let shifted = e.int_bits("unsigned int", 4, false, 2, 5);
    e.strukt("s", 4, &[("a", bits3, 0), ("b", shifted, 3)]);
    let b = Btf::parse(&e.build()).unwrap();
    let a = b.field("s", "a").unwrap();
    assert_eq!((a.bit_offset, a.bit_size), (0, Some(3)));
    let bb = b.field("s", "b").unwrap();
    assert_eq!((bb.bit_offset, bb.bit_size, bb.offset), (5, Some(5), 0));
}

#[test]
fn arrays_and_indices() {
    let b = btf();
    let comm = b.field("task_struct", "comm").unwrap();
    assert_eq!(comm.offset, 40);
    assert_eq!(comm.size, 16);
    assert_eq!(
        comm.kind,
        FieldKind::Array {
            elem_size: 1,
            len: 16
        }
    );
    assert_eq!(comm.type_name, "char[16]");
    assert_eq!(b.offset_of("task_struct", "comm[3]").unwrap(), 43);
    assert_eq!(b.offset_of("module", "mem[1]").unwrap(), 16);
    assert_eq!(b.offset_of("module", "mem[2].size").unwrap(), 40);
    assert_eq!(b.field("module", "mem[2].size").unwrap().size, 4);
    assert_eq!(b.offset_of("module", "grid[1][2]").unwrap(), 48 + 16 + 2);
    assert_eq!(
        b.offset_of("module", "mem[3]"),
        Err(BtfError::IndexOutOfBounds {
            root: "module".into(),
            path: "mem".into(),
            index: 3,
            len: 3
        })
    );
    assert!(matches!(
        b.field("task_struct", "pid[0]"),
        Err(BtfError::NotArray { .. })
    ));
    assert!(b.offset_of("module", "mem[99999999999999999999]").is_err());
}

#[test]
fn errors_name_the_struct_and_member() {
    let b = btf();
    let err = b.field("task_struct", "foo").unwrap_err();
    assert_eq!(
        err.to_string(),
        "BTF: struct task_struct has no member `foo`"
    );
    let err = b.field("sock", "__sk_common.nope").unwrap_err();
    assert_eq!(
        err.to_string(),
        "BTF: struct sock_common has no member `nope`"
    );
    assert_eq!(
        b.struct_size("nosuch"),
        Err(BtfError::NoSuchStruct("nosuch".into()))
    );
    assert!(matches!(
        b.field("task_struct", "pid.x"),
        Err(BtfError::NotComposite { .. })
    ));
    assert_eq!(
        b.struct_size("mm_struct"),
        Err(BtfError::ForwardOnly("mm_struct".into()))
    );
    for bad in [
        "", ".", "a..b", "1a", "a[", "a[]", "a[1", "a[x]", "a]", "a[1]b", "a b",
    ] {
        assert!(
            matches!(b.field("task_struct", bad), Err(BtfError::InvalidPath(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn enums() {
    let b = btf();
    assert_eq!(b.enum_value("", "MOD_TEXT").unwrap(), 0);
    assert_eq!(b.enum_value("mod_mem_type", "MOD_RODATA").unwrap(), 2);
    assert_eq!(b.enum_value("enum mod_mem_type", "MOD_DATA").unwrap(), 1);
    assert_eq!(b.enum_value("", "TCP_LISTEN").unwrap(), 10);
    assert_eq!(b.enum_value("", "NEG_ONE").unwrap(), -1);
    assert_eq!(b.enum_value("big", "BIG").unwrap(), 1 << 40);
    assert!(matches!(
        b.enum_value("mod_mem_type", "TCP_LISTEN"),
        Err(BtfError::NoSuchVariant { .. })
    ));
    assert!(matches!(
        b.enum_value("", "NOPE"),
        Err(BtfError::NoSuchVariant { .. })
    ));
    assert_eq!(
        b.enum_value("nope", "X"),
        Err(BtfError::NoSuchEnum("nope".into()))
    );
}

#[test]
fn conflicting_and_out_of_range_enumerators() {
    let mut e = Enc::new();
    e.enum32("a", false, &[("X", 1), ("Y", 5)]);
    e.enum32("b", false, &[("X", 2), ("Y", 5)]);
    e.enum64("c", false, &[("HUGE", u64::MAX)]);
    e.enum64("d", true, &[("MINUS", u64::MAX)]);
    let b = Btf::parse(&e.build()).unwrap();
    assert_eq!(
        b.enum_value("", "X"),
        Err(BtfError::AmbiguousVariant("X".into()))
    );
    assert_eq!(b.enum_value("a", "X").unwrap(), 1);
    assert_eq!(b.enum_value("", "Y").unwrap(), 5);
    assert!(matches!(
        b.enum_value("", "HUGE"),
        Err(BtfError::ValueOutOfRange(_))
    ));
    assert_eq!(b.enum_value("", "MINUS").unwrap(), -1);
}

#[test]
fn duplicate_names_prefer_complete_and_largest() {
    let mut e = Enc::new();
    let int = e.int("int", 4, true);
    e.fwd("dup");
    e.strukt("dup", 4, &[("small", int, 0)]);
    e.strukt("dup", 8, &[("a", int, 0), ("big", int, 32)]);
    e.strukt("dup", 0, &[]);
    e.fwd("dup");
    let b = Btf::parse(&e.build()).unwrap();
    assert_eq!(b.struct_size("dup").unwrap(), 8);
    assert_eq!(b.offset_of("dup", "big").unwrap(), 4);
}

#[test]
fn typedef_cycle_errors_instead_of_hanging() {
    let mut e = Enc::new();
    let a = e.next;
    e.typedef("a_t", a + 1);
    e.typedef("b_t", a);
    let self_td = e.typedef("self_t", e.next);
    e.strukt("s", 8, &[("x", a, 0), ("y", self_td, 0)]);
    let b = Btf::parse(&e.build()).unwrap();
    assert!(matches!(
        b.struct_size("a_t"),
        Err(BtfError::TypeChainTooLong(_))
    ));
    assert!(matches!(
        b.field("s", "x"),
        Err(BtfError::TypeChainTooLong(_))
    ));
    assert!(matches!(
        b.field("s", "y"),
        Err(BtfError::TypeChainTooLong(_))
    ));
    assert!(matches!(
        b.field("s", "x.z"),
        Err(BtfError::TypeChainTooLong(_))
    ));
}

#[test]
fn self_nesting_and_deep_anonymous_members_are_bounded() {
    let mut e = Enc::new();
    let int = e.int("int", 4, true);
    // struct loop { struct loop; int a; } and an array of itself.
    let me = e.next;
    e.strukt("loop", 4, &[("", me, 0), ("a", int, 0)]);
    let arr = e.next;
    e.array(arr, 2);
    e.strukt("arr", 4, &[("x", arr, 0)]);
    // 100 nested anonymous structs.
    let mut inner = e.strukt("", 4, &[("deep", int, 0)]);
    for _ in 0..100 {
        inner = e.strukt("", 4, &[("", inner, 0)]);
    }
    e.strukt("deep", 4, &[("", inner, 0)]);
    let b = Btf::parse(&e.build()).unwrap();
    assert_eq!(b.offset_of("loop", "a").unwrap(), 0);
    assert!(matches!(
        b.field("loop", "nope"),
        Err(BtfError::NoSuchMember { .. })
    ));
    assert!(matches!(b.field("arr", "x"), Err(BtfError::TooDeep(_))));
    assert!(matches!(b.field("deep", "deep"), Err(BtfError::TooDeep(_))));
}

#[test]
fn header_checks() {
    let good = kernel_like();
    let mut bad = good.clone();
    bad[0] = 0;
    assert!(matches!(Btf::parse(&bad), Err(BtfError::BadMagic(_))));
    let mut bad = good.clone();
    bad.swap(0, 1);
    assert_eq!(Btf::parse(&bad).unwrap_err(), BtfError::BigEndian);
    let mut bad = good.clone();
    bad[2] = 2;
    assert_eq!(Btf::parse(&bad).unwrap_err(), BtfError::BadVersion(2));
    let patch = |field: usize, v: u32| {
        let mut b = good.clone();
        b[4 + 4 * field..8 + 4 * field].copy_from_slice(&v.to_le_bytes());
        Btf::parse(&b)
    };
    for (field, v) in [
        (0, 8),        // hdr_len too small
        (0, u32::MAX), // hdr_len past the end
        (1, u32::MAX - 3),
        (1, 2), // misaligned type_off
        (2, u32::MAX - 3),
        (3, u32::MAX),
        (4, u32::MAX),
        (4, 0), // no string section
        (3, 0), // overlapping sections
    ] {
        assert!(
            matches!(patch(field, v), Err(BtfError::BadHeader(_))),
            "field {field} = {v:#x}"
        );
    }
    assert_eq!(
        Btf::parse(&good[..10]).unwrap_err(),
        BtfError::Truncated(10)
    );
}

#[test]
fn bad_type_records() {
    let mut e = Enc::new();
    e.head("", 0, 0, false, 0); // kind 0 is not a type
    assert!(matches!(
        Btf::parse(&e.build()),
        Err(BtfError::BadType { .. })
    ));
    let mut e = Enc::new();
    e.head("", 20, 0, false, 0);
    assert!(matches!(
        Btf::parse(&e.build()),
        Err(BtfError::BadType { .. })
    ));
    let mut e = Enc::new();
    e.head("", kind::STRUCT, 1000, false, 0); // members missing
    assert!(matches!(
        Btf::parse(&e.build()),
        Err(BtfError::BadType { .. })
    ));
    let mut e = Enc::new();
    e.words(&[1 << 20, u32::from(kind::PTR) << 24, 0]); // name past strings
    e.next += 1;
    assert_eq!(
        Btf::parse(&e.build()).unwrap_err(),
        BtfError::BadString(1 << 20)
    );
    let mut e = Enc::new();
    e.ptr(77); // dangling type id: caught on use
    let p = e.next - 1;
    e.strukt("s", 8, &[("p", p, 0), ("q", 555, 0)]);
    let b = Btf::parse(&e.build()).unwrap();
    assert_eq!(b.field("s", "p").unwrap().kind, FieldKind::Pointer);
    assert!(b.field("s", "p").unwrap().type_name.contains("bad type"));
    assert_eq!(b.field("s", "q"), Err(BtfError::BadTypeId(555)));
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let good = kernel_like();
    for len in 0..good.len() {
        let cut = &good[..len];
        if let Ok(b) = Btf::parse(cut) {
            let _ = b.field("task_struct", "comm[1]");
        }
        // Also shrink the declared sections to the cut length.
        let mut hdr = cut.to_vec();
        if hdr.len() >= 24 {
            let tl = u32::from_le_bytes(hdr[12..16].try_into().unwrap());
            let sl = (len as u32).saturating_sub(24 + tl);
            hdr[20..24].copy_from_slice(&sl.to_le_bytes());
            if let Ok(b) = Btf::parse(&hdr) {
                let _ = b.enum_value("", "TCP_LISTEN");
            }
        }
    }
}

proptest::proptest! {
    #[test]
    fn random_mutations_never_panic(
        flips in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..16)
    ) {
        let mut data = kernel_like();
        for (pos, byte) in flips {
            let n = data.len();
            data[pos % n] = byte;
        }
        if let Ok(b) = Btf::parse(&data) {
            for (s, p) in [
                ("task_struct", "comm[2]"),
                ("sock", "__sk_common.skc_num"),
                ("module", "mem[1].size"),
                ("task_struct", "__state"),
            ] {
                let _ = b.field(s, p);
                let _ = b.struct_size(s);
            }
            let _ = b.enum_value("", "TCP_LISTEN");
        }
    }

    #[test]
    fn random_bytes_never_panic(mut data in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        if data.len() >= 4 {
            data[..4].copy_from_slice(&[0x9f, 0xeb, 1, 0]);
        }
        if let Ok(b) = Btf::parse(&data) {
            let _ = b.field("a", "b.c[1]");
            let _ = b.enum_value("", "a");
        }
    }
}
