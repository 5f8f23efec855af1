//! Developer aid: prints symbol addresses and BTF facts of a vmlinux.
//! `probe_symbols VMLINUX NAME... [struct:FIELD...]`
fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: probe_symbols VMLINUX NAME...");
    let image = vmi::image::KernelImage::open(&path).expect("vmlinux");
    let syms = vmi::symbols::KernelSymbols::from_image(&image).expect("kallsyms");
    let btf = vmi::btf::Btf::parse(image.btf().expect("btf")).expect("btf");
    for name in std::env::args().skip(2) {
        match name.split_once(':') {
            Some((s, "")) => println!("sizeof {s}: {:?}", btf.struct_size(s)),
            Some((s, f)) => println!("{s}.{f}: {:?}", btf.offset_of(s, f)),
            None => println!("{name}: {:x?}", syms.address_of(&name)),
        }
    }
}
