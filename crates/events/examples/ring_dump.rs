//! Prints what is in a ring now: `cargo run --release -p events --example ring_dump -- /dev/shm/X.ring [max]`.
fn main() {
    let mut a = std::env::args().skip(1);
    let path = a.next().expect("usage: ring_dump RING [MAX]");
    let max: usize = a
        .next()
        .map(|s| s.parse().expect("MAX"))
        .unwrap_or(usize::MAX);
    let mut r = match events::Ring::open(path.as_ref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ring_dump: {e}");
            std::process::exit(1);
        }
    };
    let mut n = 0;
    for rec in r.poll().take(max) {
        n += 1;
        match rec.kind {
            events::Kind::Entry => println!(
                "{} v{} cr3={:#x} pid={} tgid={} {}",
                rec.seq,
                rec.vcpu,
                rec.cr3,
                rec.pid,
                rec.tgid,
                events::format::call(&rec, None)
            ),
            events::Kind::Log => println!(
                "{} v{} pid={} tgid={} log doorbell: {} of {} bytes at offset {}",
                rec.seq,
                rec.vcpu,
                rec.pid,
                rec.tgid,
                rec.payload.len(),
                rec.args[0],
                rec.args[1]
            ),
            events::Kind::Return => println!(
                "{} v{} cr3={:#x} pid={} tgid={}   <- {} #{} = {} (rip {:#x})",
                rec.seq,
                rec.vcpu,
                rec.cr3,
                rec.pid,
                rec.tgid,
                rec.name(),
                rec.entry_seq,
                events::format::result_of(&rec),
                rec.rip
            ),
        }
    }
    eprintln!(
        "{n} records, dropped {}, unpaired {}, backlog {}",
        r.dropped(),
        r.unpaired(),
        r.backlog()
    );
}
