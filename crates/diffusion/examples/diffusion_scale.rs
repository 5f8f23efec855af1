//! Does logging a new object stay O(1) as the managed set grows (paper
//! 000's problem 1), and how long does the bulk view of a large graph take?
//!
//! ```sh
//! cargo run --release -p diffusion --example diffusion_scale
//! ```
//!
//! For N = 10, 1 000 and 100 000 managed objects (one managed process that
//! wrote N files, fed as the plugin's records into an engine with its
//! SQLite store in a temp dir), it then times 1 000 more new files (two
//! records each: openat + write, each write one new object and one stored
//! delta event) and prints the cost per new object; then the bulk view:
//! `graph(vm, now)` (the live graph) and its text and JSON renderings, and
//! the graph half way back in time (a replay of the stored history).
//! Markdown rows on stdout.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::*;
use diffusion::{DiffusionEngine, VmRef};

const SECRET: &str = "/root/secret.txt";
const MEASURED: u64 = 1000;

/// The writer opens and writes file `i`.
fn write_file(sim: &mut Sim, w: &P, i: u64) {
    let f = F::reg(100_000 + i, &format!("/root/out/f{i}"));
    sim.openat(w, &f.path.clone(), O_WRONLY_CREAT_TRUNC, 4, Some(&f));
    sim.write(w, 4, &f, 64);
}

fn feed_all(e: &mut DiffusionEngine, vm: &VmRef, sim: &mut Sim) -> usize {
    let mut n = 0;
    for r in sim.records.drain(..) {
        n += e.on_record(vm, &r).len();
    }
    n
}

fn main() {
    println!("| managed objects | ns per new object (1,000 added, store included) | bulk view now: graph | + text | + JSON | graph at a past time (replay of the store) |");
    println!("|---|---|---|---|---|---|");
    for &n in &[10u64, 1_000, 100_000] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = diffusion::Config::default();
        config.limits.objects_per_vm = 200_000;
        let (mut e, _clock) = engine_with(dir.path(), config);
        let vm = VmRef::new("bench", "00000000-0000-0000-0000-000000000000");
        e.track_add("bench", SECRET, &[]).expect("track");
        let secret = F::reg(42, SECRET);
        let w = p(500, "writer");
        let mut sim = Sim::new(1_000_000_000);
        sim.openat(&w, SECRET, O_RDONLY, 3, Some(&secret));
        sim.read(&w, 3, &secret, 64);
        // N objects: the secret, the writer, and N-2 files.
        let mut added = feed_all(&mut e, &vm, &mut sim);
        let mut i = 0;
        let managed = |e: &DiffusionEngine| e.stats("bench").map_or(0, |s| s.managed as u64);
        while managed(&e) < n {
            for _ in 0..1000u64.min(n - managed(&e)) {
                write_file(&mut sim, &w, i);
                i += 1;
            }
            added += feed_all(&mut e, &vm, &mut sim);
        }
        assert_eq!(managed(&e), n, "{added} events");
        for k in 0..MEASURED {
            write_file(&mut sim, &w, i + k);
        }
        let t = Instant::now();
        let evs = feed_all(&mut e, &vm, &mut sim);
        let per = t.elapsed().as_nanos() as u64 / MEASURED;
        assert_eq!(evs as u64, MEASURED, "one event per new object");
        let total = n + MEASURED;
        let t = Instant::now();
        let g = e.graph("bench", None).expect("graph");
        let now_t = t.elapsed();
        assert_eq!(g.live().count() as u64, total);
        let t = Instant::now();
        let text = g.text();
        let text_t = t.elapsed();
        let t = Instant::now();
        let json = g.json();
        let json_t = t.elapsed();
        // Half way through the history.
        let past = g.nodes[g.nodes.len() / 2].since_ns;
        let t = Instant::now();
        let old = e.graph("bench", Some(past)).expect("graph at");
        let past_t = t.elapsed();
        assert!(old.nodes.len() < g.nodes.len());
        println!(
            "| {n} (+{MEASURED}) | {per} | {:.1} ms | {:.1} ms ({} KiB) | {:.1} ms ({} KiB) | {:.1} ms ({} nodes) |",
            now_t.as_secs_f64() * 1e3,
            text_t.as_secs_f64() * 1e3,
            text.len() >> 10,
            json_t.as_secs_f64() * 1e3,
            json.len() >> 10,
            past_t.as_secs_f64() * 1e3,
            old.nodes.len()
        );
    }
}
