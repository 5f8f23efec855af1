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

/// The ring i of a counted `doorbell N LEAF COUNT` run (its buffer starts with "#i ").
fn bell_index(r: &Record) -> u64 {
    let data = r
        .items()
        .find_map(|i| match i {
            Item::Data { bytes, .. } => Some(bytes.to_vec()),
            _ => None,
        })
        .expect("doorbell bytes");
    let text = String::from_utf8_lossy(&data);
    text.strip_prefix('#')
        .and_then(|t| t.split(' ').next())
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("no ring index in {text:?}"))
}

/// The pids printed by counted runs, by their COUNT.
fn pid_of(out: &str, count: u64) -> u32 {
    out.lines()
        .find_map(|l| {
            let (pid, c) = l.strip_prefix("pid=")?.split_once(" count=")?;
            (c.parse::<u64>().ok()? == count).then(|| pid.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no pid for count {count} in {out:?}"))
}

/// The doorbell records of process `pid`, in ring order.
fn bells_of(recs: &[Record], pid: u32) -> Vec<&Record> {
    recs.iter()
        .filter(|r| r.kind == Kind::Log && r.tgid == pid)
        .collect()
}

/// Guest ms a counted run of `pid` took (its "pid=P ms=T" line).
fn ms_of(out: &str, pid: u32) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("pid={pid} ms="))?.parse().ok())
        .unwrap_or_else(|| panic!("no time for pid {pid} in {out:?}"))
}

const RATE: u64 = 50;
const BURST: u64 = 20;

/// Checks the accepted doorbells `f` of a process that rang `count` times
/// (faster than `RATE`) against the bucket and the ring indices; returns
/// (accepted, refused before the last accepted, plugin-clock span in s).
fn check_limited(f: &[&Record], count: u64, host_secs: f64) -> (u64, u64, f64) {
    let got = f.len() as u64;
    let idx: Vec<u64> = f.iter().map(|x| bell_index(x)).collect();
    assert!(got >= 1);
    assert!(
        got >= BURST,
        "a new process starts with a full bucket: {got}"
    );
    assert!(got < count, "{got} of {count} accepted");
    assert_eq!(idx[..BURST as usize], (0..BURST).collect::<Vec<_>>()[..]);
    let span = (f[f.len() - 1].time_ns - f[0].time_ns) as f64 / 1e9;
    let bound = |secs: f64| BURST as f64 + RATE as f64 * secs + 2.0;
    assert!(
        (got as f64) <= bound(span),
        "{got} doorbells accepted in {span:.3} s"
    );
    assert!(
        (got as f64) <= bound(host_secs),
        "{got} doorbells accepted in {host_secs:.3} s"
    );
    // Each accepted doorbell reports the ones refused since the previous one.
    let mut prev: Option<u64> = None;
    for (x, &i) in f.iter().zip(&idx) {
        let want = prev.map_or(i, |p| i - p - 1);
        assert_eq!(
            x.args[4], want,
            "doorbell #{i}: refused since the previous one"
        );
        assert!(prev.is_none_or(|p| i > p), "in order");
        prev = Some(i);
    }
    let reported: u64 = f.iter().map(|x| x.args[4]).sum();
    let last = idx[idx.len() - 1];
    assert_eq!(
        reported,
        last + 1 - got,
        "refused before the last accepted one"
    );
    (got, reported, span)
}

#[test]
fn doorbell_rate_limit_keeps_a_flooder_from_starving_others() {
    const FLOOD: u64 = 5000;
    const PACED: u64 = 500;
    const POLITE: u64 = 30;
    let (vm, mut r) = boot_lab("bellrate", lab::Flavour::Stable);
    let bin = build_static_c(&workspace().join("guest/doorbell/doorbell.c"), "doorbell");
    copy_in(&vm.vm, "/root/doorbell", &std::fs::read(bin).unwrap());
    let mut filter = Filter::NONE;
    filter.insert(LOG_DOORBELL);
    r.set_filter(&filter);
    r.set_fds(&Filter::NONE);
    r.set_log_limit(RATE, BURST);
    assert_eq!(r.log_limit(), (RATE, BURST));
    let dropped_before = r.log_dropped();

    // One process rings 30 times, 50 ms apart (20/s: under the limit), while
    // another rings 5000 times as fast as it can, and a third 500 times 1 ms
    // apart (a flood long enough for its bucket to refill).
    let script = format!(
        "/root/doorbell 16 0xffff {POLITE} 50 & /root/doorbell 16 0xffff {PACED} 1 & \
         sleep 0.1; /root/doorbell 16 0xffff {FLOOD}; wait"
    );
    let start = std::time::Instant::now();
    let (out, recs) = run_collect(&vm.vm, &mut r, &script);
    let host_secs = start.elapsed().as_secs_f64();
    let (polite, flooder, paced) = (
        pid_of(&out, POLITE),
        pid_of(&out, FLOOD),
        pid_of(&out, PACED),
    );
    let refused = r.log_dropped() - dropped_before;

    // Every doorbell of the well-behaved process is there, none refused.
    let p = bells_of(&recs, polite);
    assert_eq!(
        p.iter().map(|x| bell_index(x)).collect::<Vec<_>>(),
        (0..POLITE).collect::<Vec<_>>(),
        "all of the well-behaved process's doorbells, in order"
    );
    assert!(p.iter().all(|x| x.args[4] == 0));

    // The flooders: their first `BURST` at once, then about RATE per second.
    let (f_got, f_rep, f_span) = check_limited(&bells_of(&recs, flooder), FLOOD, host_secs);
    let (s_got, s_rep, s_span) = check_limited(&bells_of(&recs, paced), PACED, host_secs);
    assert!(s_rep > 0, "the paced flooder's bucket refilled");
    // Every refusal is counted.
    assert_eq!(
        refused,
        (FLOOD - f_got) + (PACED - s_got),
        "log_dropped = refused doorbells"
    );
    assert_eq!(r.dropped(), 0, "the ring itself lost nothing");
    eprintln!(
        "flooder: {f_got} of {FLOOD} accepted over {f_span:.3} s (guest run {} ms), \
         {} refused, {f_rep} of them before its last accepted one; \
         paced flooder: {s_got} of {PACED} accepted over {s_span:.3} s (guest run {} ms), \
         {} refused, {s_rep} before its last accepted one; \
         log_dropped +{refused}; well-behaved: {} of {POLITE} (guest run {} ms); host run {host_secs:.3} s",
        ms_of(&out, flooder),
        FLOOD - f_got,
        ms_of(&out, paced),
        PACED - s_got,
        p.len(),
        ms_of(&out, polite),
    );

    // No limit: a quick burst all arrives.
    r.set_log_limit(0, 0);
    assert_eq!(r.log_limit(), (0, 0));
    let before = r.log_dropped();
    let (out, recs) = run_collect(&vm.vm, &mut r, "/root/doorbell 16 0xffff 200");
    let pid = pid_of(&out, 200);
    let quick = bells_of(&recs, pid);
    assert_eq!(
        quick.iter().map(|x| bell_index(x)).collect::<Vec<_>>(),
        (0..200).collect::<Vec<_>>()
    );
    assert!(quick.iter().all(|x| x.args[4] == 0));
    assert_eq!(r.log_dropped(), before);
    assert_eq!(r.dropped(), 0);
    eprintln!(
        "no limit: {} of 200 in {} ms",
        quick.len(),
        ms_of(&out, pid)
    );
}
