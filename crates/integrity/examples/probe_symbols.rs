//! Developer aid: prints symbol addresses and BTF facts of a vmlinux.
//! `probe_symbols VMLINUX NAME... [struct:FIELD...]`
fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: probe_symbols VMLINUX NAME...");
    let image = vmi::image::KernelImage::open(&path).expect("vmlinux");
    let syms = vmi::symbols::KernelSymbols::from_image(&image).expect("kallsyms");
    let btf = vmi::btf::Btf::parse(image.btf().expect("btf")).expect("btf");
    if std::env::var_os("PROBE_BASELINE").is_some() {
        let profile =
            std::sync::Arc::new(vmi::linux::KernelProfile::from_image(&image).expect("profile"));
        let b = integrity::Baseline::new(&image, profile).expect("baseline");
        if let Ok(a) = std::env::var("PROBE_ADDR") {
            let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).expect("hex");
            println!(
                "{a:#x}: patchable {:x?} mcount {:x?}",
                b.patchable.range_of(a),
                b.mcount_sites.range_of(a)
            );
        }
        println!(
            "dispatcher {:x?} tables {:?}",
            b.dispatcher,
            b.syscall_tables
                .iter()
                .map(|t| (t.name, t.entries.len()))
                .collect::<Vec<_>>()
        );
    }
    for name in std::env::args().skip(2) {
        match name.split_once(':') {
            Some((s, "")) => println!("sizeof {s}: {:?}", btf.struct_size(s)),
            Some((s, f)) => println!("{s}.{f}: {:?}", btf.offset_of(s, f)),
            None => match u64::from_str_radix(name.trim_start_matches("0x"), 16) {
                Ok(a) if name.starts_with("0x") => println!("{name}: {:?}", syms.symbolize(a)),
                _ => println!("{name}: {:x?}", syms.address_of(&name)),
            },
        }
    }
}
