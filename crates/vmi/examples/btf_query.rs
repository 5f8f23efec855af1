//! Prints struct member offsets from a vmlinux's BTF: a developer's tool.
//!
//! Usage: btf_query VMLINUX STRUCT [PATH...]   (no PATH: the struct's size)
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: btf_query VMLINUX STRUCT [PATH...]".into());
    }
    let image = vmi::image::KernelImage::open(&args[1])?;
    let btf = vmi::btf::Btf::parse(image.require_btf()?)?;
    println!("sizeof({}) = {}", args[2], btf.struct_size(&args[2])?);
    for path in &args[3..] {
        match btf.field(&args[2], path) {
            Ok(f) => println!(
                "{path}: offset {} size {} {} {:?}",
                f.offset, f.size, f.type_name, f.kind
            ),
            Err(e) => println!("{path}: {e}"),
        }
    }
    Ok(())
}
