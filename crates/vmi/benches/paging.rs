//! Translation cost: the cached address space against the plain walk, and
//! a page-crossing read, over synthetic page tables in a `VecMemory`.
//!
//! `cargo bench -p vmi --bench paging`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use vmi::memory::{PhysicalMemory, VecMemory};
use vmi::paging::{AddressSpace, PagingMode};

const BASE_VA: u64 = 0xffff_8880_0000_0000;
const PAGES: u64 = 64;

/// 4-level tables mapping `PAGES` 4 KiB pages at `BASE_VA` onto frames from
/// 0x10_0000; tables at 0x1000..0x5000 (PML4, PDPT, PD, PT).
fn tables() -> (Arc<dyn PhysicalMemory>, u64) {
    let mem = VecMemory::zeroed(0x10_0000 + (PAGES as usize) * 0x1000);
    let idx = |shift: u32| ((BASE_VA >> shift) & 0x1ff) * 8;
    mem.write_u64(0x1000 + idx(39), 0x2000 | 3).unwrap();
    mem.write_u64(0x2000 + idx(30), 0x3000 | 3).unwrap();
    mem.write_u64(0x3000 + idx(21), 0x4000 | 3).unwrap();
    for p in 0..PAGES {
        mem.write_u64(0x4000 + idx(12) + p * 8, (0x10_0000 + p * 0x1000) | 3)
            .unwrap();
    }
    (Arc::new(mem), 0x1000)
}

fn bench(c: &mut Criterion) {
    let (mem, root) = tables();
    let cached = AddressSpace::new(mem.clone(), root, PagingMode::FourLevel);
    let plain = AddressSpace::without_cache(mem, root, PagingMode::FourLevel);
    let vas: Vec<u64> = (0..PAGES).map(|p| BASE_VA + p * 0x1000 + 0x18).collect();

    let mut g = c.benchmark_group("translate_64_pages");
    g.throughput(Throughput::Elements(PAGES));
    g.bench_function("uncached", |b| {
        b.iter(|| {
            for &va in &vas {
                black_box(plain.translate(black_box(va)).unwrap());
            }
        })
    });
    g.bench_function("cached", |b| {
        b.iter(|| {
            for &va in &vas {
                black_box(cached.translate(black_box(va)).unwrap());
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("read_64k_across_pages");
    g.throughput(Throughput::Bytes(64 * 1024));
    let mut buf = vec![0u8; 64 * 1024];
    g.bench_function("uncached", |b| {
        b.iter(|| plain.read(black_box(BASE_VA + 0x800), &mut buf))
    });
    g.bench_function("cached", |b| {
        b.iter(|| cached.read(black_box(BASE_VA + 0x800), &mut buf))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
