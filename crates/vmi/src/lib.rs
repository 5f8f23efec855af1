//! Virtual machine introspection for Linux guests, outside the guest.
//!
//! Layers, bottom to top (memflow-style: memory behind a trait, OS logic above):
//! - [`memory`]: guest-physical memory sources (live shared-RAM file, dump files).
//! - [`paging`]: x86-64 address translation from a page-table root.
//! - [`image`]: the kernel image on the host (ELF vmlinux) and its sections.
//! - [`symbols`]: kernel symbols recovered from the image's kallsyms tables.
//! - [`btf`]: struct layouts from the image's `.BTF` section.
//!
//! Every value read from guest memory is untrusted: walks are bounded and
//! cycle-safe, lengths are capped, and nothing panics on bad data.

pub mod btf;
pub mod image;
pub mod linux;
pub mod memory;
pub mod paging;
pub mod symbols;
