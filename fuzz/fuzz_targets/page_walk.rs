//! Page-table walks over arbitrary guest memory must never panic or loop.
//!
//! Input: `flags:u8 | root:u64 | va:u64 | len:u16 | memory...` (little-endian).
//! Flags bit 0 picks 5-level paging; bit 1 makes memory wrap (every gpa is
//! `gpa % len`, so any entry points somewhere and walks go deep); otherwise
//! the bytes are a plain `VecMemory` at gpa 0 and most entries point outside
//! it (exercising the error paths). Checks: the cached and uncached walks
//! agree, translations keep the page offset, reads and C-string reads stay
//! within their bounds.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmi::memory::{PhysicalMemory, VecMemory, WrappingMemory};
use vmi::paging::{translate, AddressSpace, PagingMode};

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().unwrap())
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 19 {
        return;
    }
    let flags = input[0];
    let root = le64(&input[1..9]);
    let va = le64(&input[9..17]);
    let len = usize::from(u16::from_le_bytes([input[17], input[18]])) % 8193;
    let data = input[19..].to_vec();
    let mode = if flags & 1 != 0 {
        PagingMode::FiveLevel
    } else {
        PagingMode::FourLevel
    };
    let mem: Arc<dyn PhysicalMemory> = if flags & 2 != 0 && !data.is_empty() {
        let len = data.len() as u64;
        match WrappingMemory::new(data, len) {
            Some(m) => Arc::new(m),
            None => return,
        }
    } else {
        Arc::new(VecMemory::new(data))
    };

    let cached = AddressSpace::new(mem.clone(), root, mode);
    let plain = AddressSpace::without_cache(mem.clone(), root, mode);

    let t = translate(&*mem, root, mode, va);
    assert_eq!(t, plain.translate(va));
    assert_eq!(t, cached.translate(va));
    assert_eq!(t, cached.translate(va), "cache hit differs from the walk");
    if let Ok(t) = t {
        let off_mask = t.size.bytes() - 1;
        assert_eq!(t.pa & off_mask, va & off_mask, "page offset not kept");
        assert!(t.pa < 1 << 52, "physical address beyond 52 bits");
        // A neighbour in the same 4 KiB page must agree with the cache too.
        let near = va ^ 0x10;
        assert_eq!(cached.translate(near), plain.translate(near));
    }

    let mut buf = vec![0u8; len];
    let a = cached.read(va, &mut buf);
    let mut buf2 = vec![0u8; len];
    let b = plain.read(va, &mut buf2);
    assert_eq!(a, b);
    if a.is_ok() {
        assert_eq!(buf, buf2);
    }

    match cached.read_cstring(va, len) {
        Ok(s) => {
            assert!(s.len() <= len);
            assert!(!s.contains(&0));
            // What the string read returned is a prefix of a plain read.
            if a.is_ok() {
                assert_eq!(&buf[..s.len()], &s[..]);
            }
        }
        Err(_) => assert!(len > 0),
    }
    let _ = cached.read_u64(va);
    let _ = cached.read_u16(va.wrapping_add(0xfff));
    // Writes go through the same walk; VecMemory accepts them.
    let _ = cached.write(va, &buf[..len.min(16)]);
});
