//! The integrity scanner's byte comparison and jump decoder on guest text
//! of any content: image bytes, guest bytes, slide and position all come
//! from the input. Must stay bounded and never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let slide = u64::from_le_bytes(data[..8].try_into().unwrap());
    let pos = u64::from(u32::from_le_bytes(data[8..12].try_into().unwrap()));
    let rest = &data[16..];
    let (img, run) = rest.split_at(rest.len() / 2);
    let start = 0xffff_ffff_8100_0000u64;
    let regions = integrity::compare::unexplained(img, run, start, slide, None, &[]);
    assert!(regions.len() <= integrity::compare::MAX_REGIONS);
    for r in regions {
        let _ = integrity::compare::transfer_covering(run, start, r.start, slide);
    }
    let _ = integrity::compare::transfer_covering(run, start, start.wrapping_add(pos), slide);
});
