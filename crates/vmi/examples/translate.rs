//! Translate a guest kernel virtual address and print what is there, from a
//! live VM's shared RAM file, a QEMU ELF dump, or both (then compare them).
//!
//! ```text
//! translate [--ram FILE [--range GPA:LEN:OFFSET]...] [--dump FILE]
//!           [--cr3 HEX] [--five-level]
//!           (--va HEX | --vmlinux FILE [--find TEXT]) [--len N]
//! ```
//! - `--ram`: the `mem-path` of `-object memory-backend-file,share=on`;
//!   without `--range` gpa == file offset (all RAM below the PCI hole).
//! - `--dump`: a `dump-guest-memory` ELF file; its vCPU 0 CR3/CR4 are used
//!   when `--cr3` is not given.
//! - `--vmlinux`: find TEXT (default "Linux version ") in the kernel image's
//!   bytes and translate the link-time virtual address of each hit (right for
//!   a guest booted with `nokaslr`).
//!
//! Example (QEMU booted with `nokaslr` and shared RAM in /dev/shm/pw.ram):
//! `cargo run -p vmi --example translate -- --ram /dev/shm/pw.ram --cr3 0x... --vmlinux vmlinux`

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use object::{Object, ObjectSegment};
use vmi::memory::{ElfDumpMemory, MappedFileMemory, PhysRange, PhysicalMemory};
use vmi::paging::{AddressSpace, PagingMode};

#[derive(Default)]
struct Args {
    ram: Option<String>,
    ranges: Vec<PhysRange>,
    dump: Option<String>,
    cr3: Option<u64>,
    five_level: bool,
    va: Option<u64>,
    vmlinux: Option<String>,
    find: Option<String>,
    len: usize,
}

fn parse_hex(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|e| format!("{s}: {e}"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        len: 256,
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--ram" => a.ram = Some(val()?),
            "--range" => {
                let v = val()?;
                let p: Vec<_> = v.split(':').collect();
                let [g, l, o] = p[..] else {
                    return Err(format!("--range {v}: want GPA:LEN:OFFSET"));
                };
                a.ranges.push(PhysRange {
                    gpa: parse_hex(g)?,
                    len: parse_hex(l)?,
                    file_offset: parse_hex(o)?,
                });
            }
            "--dump" => a.dump = Some(val()?),
            "--cr3" => a.cr3 = Some(parse_hex(&val()?)?),
            "--five-level" => a.five_level = true,
            "--va" => a.va = Some(parse_hex(&val()?)?),
            "--vmlinux" => a.vmlinux = Some(val()?),
            "--find" => a.find = Some(val()?),
            "--len" => a.len = val()?.parse().map_err(|e| format!("--len: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.ram.is_none() && a.dump.is_none() {
        return Err("give --ram and/or --dump".into());
    }
    if a.va.is_none() && a.vmlinux.is_none() {
        return Err("give --va or --vmlinux".into());
    }
    Ok(a)
}

/// Link-time virtual addresses of every occurrence of `needle` in the ELF
/// file `path`, mapped through its loadable segments.
fn find_in_vmlinux(path: &str, needle: &[u8]) -> Result<Vec<(u64, String)>, Box<dyn Error>> {
    let data = std::fs::read(path)?;
    let elf = object::File::parse(&*data)?;
    let mut hits = Vec::new();
    let mut start = 0;
    while let Some(pos) = data[start..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + start)
    {
        start = pos + 1;
        let off = pos as u64;
        for seg in elf.segments() {
            let (fo, fl) = seg.file_range();
            if off >= fo && off < fo + fl {
                let end = data[pos..].iter().position(|&b| b == 0).unwrap_or(0);
                let text = String::from_utf8_lossy(&data[pos..pos + end.min(200)]).into_owned();
                hits.push((seg.address() + (off - fo), text));
            }
        }
    }
    Ok(hits)
}

fn show(name: &str, space: &AddressSpace, va: u64, len: usize) -> Option<Vec<u8>> {
    let t0 = Instant::now();
    match space.translate(va) {
        Ok(t) => println!(
            "  [{name}] {va:#x} -> pa {:#x} ({:?}, writable={}, user={}, nx={}) in {:?}",
            t.pa,
            t.size,
            t.writable,
            t.user,
            t.nx,
            t0.elapsed()
        ),
        Err(e) => {
            // PagingError messages start with the address already.
            println!("  [{name}] {}", chain(&e));
            return None;
        }
    }
    match space.read_cstring(va, len) {
        Ok(s) => {
            println!("  [{name}] string: {:?}", String::from_utf8_lossy(&s));
            Some(s)
        }
        Err(e) => {
            println!("  [{name}] read: {}", chain(&e));
            None
        }
    }
}

fn chain(e: &dyn Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

fn run() -> Result<bool, Box<dyn Error>> {
    let a = parse_args()?;
    let dump = a.dump.as_ref().map(ElfDumpMemory::open).transpose()?;
    let mut cr3 = a.cr3;
    let mut mode = if a.five_level {
        PagingMode::FiveLevel
    } else {
        PagingMode::FourLevel
    };
    if let Some(d) = &dump {
        println!(
            "dump {}: {} RAM ranges",
            d.path().display(),
            d.ranges().len()
        );
        for c in d.cpu_states() {
            println!(
                "  cpu {}: cr0={:#x} cr3={:#x} cr4={:#x} rip={:#x} rsp={:#x} idt={:#x}/{:#x} gs_base={:#x} kernel_gs_base={:?} mode={:?}",
                c.index, c.cr0, c.cr3, c.cr4, c.rip, c.rsp, c.idt_base(), c.idt_limit(),
                c.gs_base(), c.kernel_gs_base.map(|v| format!("{v:#x}")), c.paging_mode()
            );
        }
        if let Some(info) = d.vmcoreinfo() {
            println!("  vmcoreinfo: {} bytes", info.len());
        }
        if cr3.is_none() {
            let c = d
                .cpu_states()
                .first()
                .ok_or("dump has no CPU notes; give --cr3")?;
            cr3 = Some(c.cr3);
            mode = c
                .paging_mode()
                .ok_or("vCPU 0 is not in long mode with paging")?;
        }
    }
    let cr3 = cr3.ok_or("give --cr3 (or a --dump with CPU notes)")?;

    let mut spaces: Vec<(&str, AddressSpace)> = Vec::new();
    let mut live: Option<Arc<MappedFileMemory>> = None;
    if let Some(ram) = &a.ram {
        let mem = if a.ranges.is_empty() {
            MappedFileMemory::open_identity(ram, false)?
        } else {
            MappedFileMemory::open(ram, a.ranges.clone(), false)?
        };
        println!("live RAM {ram}: ranges {:x?}", mem.ranges());
        let mem = Arc::new(mem);
        live = Some(mem.clone());
        spaces.push(("live", AddressSpace::new(mem, cr3, mode)));
    }
    if let Some(d) = dump {
        spaces.push(("dump", AddressSpace::new(Arc::new(d), cr3, mode)));
    }
    println!("cr3 {cr3:#x}, {mode:?}");

    let targets: Vec<(u64, String)> = match (a.va, &a.vmlinux) {
        (Some(va), _) => vec![(va, String::new())],
        (None, Some(vmlinux)) => {
            let needle = a.find.clone().unwrap_or_else(|| "Linux version ".into());
            find_in_vmlinux(vmlinux, needle.as_bytes())?
        }
        _ => unreachable!(),
    };
    let mut all_ok = true;
    for (va, expected) in &targets {
        println!(
            "va {va:#x}{}",
            if expected.is_empty() {
                String::new()
            } else {
                format!(" (vmlinux: {expected:?})")
            }
        );
        let got: Vec<_> = spaces.iter().map(|(n, s)| show(n, s, *va, a.len)).collect();
        if !expected.is_empty() {
            let want = &expected.as_bytes()[..expected.len().min(a.len)];
            for ((n, _), g) in spaces.iter().zip(&got) {
                let ok = g
                    .as_deref()
                    .is_some_and(|g| g.starts_with(want) || want.starts_with(g));
                println!("  [{n}] matches vmlinux: {ok}");
                all_ok &= ok;
            }
        }
        if got.len() == 2 {
            println!("  live == dump: {}", got[0] == got[1]);
        }
    }

    // With both sources: how much of guest RAM is identical (a running guest
    // changes some pages between the dump and now).
    if let (Some(live), Some((_, ds))) = (live, spaces.iter().find(|(n, _)| *n == "dump")) {
        let dm = ds.memory();
        let (mut same, mut differ, mut missing) = (0u64, 0u64, 0u64);
        let (mut x, mut y) = (vec![0u8; 4096], vec![0u8; 4096]);
        for r in dm.ranges() {
            let mut gpa = r.gpa;
            while gpa + 4096 <= r.gpa_end() {
                if dm.read_phys(gpa, &mut x).is_err() || live.read_phys(gpa, &mut y).is_err() {
                    missing += 1;
                } else if x == y {
                    same += 1;
                } else {
                    differ += 1;
                }
                gpa += 4096;
            }
        }
        println!("RAM pages: {same} identical, {differ} differ, {missing} not in both");
    }
    Ok(all_ok)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("translate: {e}");
            ExitCode::FAILURE
        }
    }
}
