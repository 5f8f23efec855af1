//! The log doorbell (paper 002's transfer): a guest process executes `cpuid`
//! with eax = 0xffff, rbx = a buffer, rcx = its length; the plugin copies the
//! buffer at that instant into `Kind::Log` records, the guest kernel never on
//! the path. Checked against the bytes the guest program wrote and the pid
//! it printed.

mod common;

use common::*;
use events::payload::Item;
use events::{Filter, Kind, Record, FLAG_PAYLOAD_CUT, LOG_DOORBELL, LOG_MAX, LOG_SLICE};

fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| b'a' + ((i * 7 + i / 251) % 26) as u8)
        .collect()
}

/// The doorbells in `recs`: (id, pid, comm, bytes, cut), slices joined in order.
fn doorbells(recs: &[Record]) -> Vec<(u64, u32, String, Vec<u8>, bool)> {
    let mut out: Vec<(u64, u32, String, Vec<u8>, bool)> = Vec::new();
    for r in recs.iter().filter(|r| r.kind == Kind::Log) {
        assert_eq!(r.nr, LOG_DOORBELL);
        let data: Vec<u8> = events::payload::Items::new(&r.payload)
            .find_map(|i| match i {
                Item::Data { bytes, .. } => Some(bytes.to_vec()),
                _ => None,
            })
            .unwrap_or_default();
        let cut = r.flags & FLAG_PAYLOAD_CUT != 0;
        match out.last_mut() {
            Some(last) if last.0 == r.args[2] => {
                assert_eq!(r.args[1] as usize, last.3.len(), "slices in order");
                last.3.extend_from_slice(&data);
                last.4 |= cut;
            }
            _ => {
                assert_eq!(r.args[1], 0, "a doorbell starts at offset 0");
                out.push((r.args[2], r.tgid, comm(r).unwrap_or_default(), data, cut));
            }
        }
    }
    out
}

#[test]
fn doorbell_copies_the_buffer_at_the_instruction() {
    let (vm, mut r) = boot_lab("bell", lab::Flavour::Stable);
    let bin = build_static_c(&workspace().join("guest/doorbell/doorbell.c"), "doorbell");
    copy_in(&vm.vm, "/root/doorbell", &std::fs::read(bin).unwrap());
    let mut filter = Filter::NONE;
    filter.insert(LOG_DOORBELL);
    r.set_filter(&filter);
    r.set_fds(&Filter::NONE);
    let sizes = [
        1usize,
        100,
        LOG_SLICE,
        LOG_SLICE + 1,
        20_000,
        LOG_MAX,
        LOG_MAX + 5000,
    ];
    let script: String = sizes
        .iter()
        .map(|n| format!("/root/doorbell {n}; "))
        .collect::<String>()
        + "/root/doorbell 64 0; /root/doorbell 64 0x0000ffff00000000";
    let (out, recs) = run_collect(&vm.vm, &mut r, &script);
    let pids: Vec<u32> = out
        .lines()
        .filter_map(|l| l.strip_prefix("pid=")?.parse().ok())
        .collect();
    assert_eq!(pids.len(), sizes.len() + 2);
    let bells = doorbells(&recs);
    // Other leaves (0, and 0xffff only in rax's upper half) ring nothing.
    assert_eq!(
        bells.len(),
        sizes.len(),
        "one doorbell per ring with leaf 0xffff"
    );
    for (i, &n) in sizes.iter().enumerate() {
        let (_, pid, comm, bytes, cut) = &bells[i];
        assert_eq!(*pid, pids[i], "doorbell {i} names its process");
        assert_eq!(comm, "doorbell");
        let want = n.min(LOG_MAX);
        assert_eq!(bytes.len(), want, "doorbell {i}: {n} bytes asked");
        assert!(*bytes == pattern(want), "doorbell {i}: bytes differ");
        assert_eq!(*cut, n > LOG_MAX, "doorbell {i}: cut flag");
    }
    // The filter without the doorbell: nothing.
    r.set_filter(&Filter::parse("getpid").unwrap());
    let (_, recs) = run_collect(&vm.vm, &mut r, "/root/doorbell 10");
    assert!(doorbells(&recs).is_empty());
}
