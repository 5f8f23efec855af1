//! Fuzzes the BTF parser and its lookups: arbitrary bytes must yield an error
//! or answers, never a panic, a hang or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmi::btf::Btf;

/// Identifier-like pieces of the input (its own string table, typically),
/// so lookups hit names that exist in the blob.
fn names(data: &[u8]) -> Vec<&str> {
    data.split(|&b| b == 0)
        .filter_map(|s| std::str::from_utf8(s).ok())
        .filter(|s| !s.is_empty() && s.len() <= 32)
        .take(8)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    let names = names(data);
    for &s in &names {
        let _ = btf.struct_size(s);
        let _ = btf.enum_value("", s);
        for &m in &names {
            let _ = btf.field(s, m);
            let _ = btf.field(s, &format!("{m}[1]"));
            let _ = btf.enum_value(s, m);
            for &n in names.iter().take(3) {
                let _ = btf.has_field(s, &format!("{m}.{n}"));
                let _ = btf.offset_of(s, &format!("{m}[0].{n}[2]"));
            }
        }
    }
});
