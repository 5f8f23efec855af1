//! Feeds arbitrary bytes to the kallsyms table recovery, which runs on a
//! kernel image we do not trust. It must return an error, never panic, hang
//! or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmi::symbols::{parse_kallsyms_blob, KernelSymbols};

fuzz_target!(|data: &[u8]| {
    // The first 8 bytes choose the blob's link-time address, so alignment
    // (computed on addresses, as the assembler did) is exercised too.
    let (base, blob) = match data.split_first_chunk::<8>() {
        Some((head, rest)) => (u64::from_le_bytes(*head), rest),
        None => (0xffff_ffff_8200_0000, data),
    };
    if let Ok(tables) = parse_kallsyms_blob(blob, base) {
        let symbols = KernelSymbols::from_tables(tables);
        if let Some(first) = symbols.iter().next() {
            let _ = symbols.address_of(&first.name);
            let _ = symbols.symbolize(first.addr.wrapping_add(1));
        }
    }
});
