//! The record parser and the graph builder/writer/reader never trust their
//! input: arbitrary bytes, arbitrary record sequences and arbitrary text
//! give results or skips, bounded, never a panic.

use proptest::prelude::*;
use xftrace::buffer::{parse_slots, RECORD_SIZE};
use xftrace::record::{Kind, Record, MAX_DEPTH};
use xftrace::{Node, Place, Resolve};

/// Names every address in a small fake kernel; others are outside text.
struct Names;

impl Resolve for Names {
    fn resolve(&self, addr: u64) -> Place {
        if (0x1000..0x9000).contains(&addr) {
            Place::Kernel {
                name: format!("f{}", addr >> 12),
                offset: addr & 0xfff,
            }
        } else {
            Place::Outside
        }
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Entry),
        Just(Kind::Call),
        Just(Kind::Tail),
        Just(Kind::Ret),
        Just(Kind::Exit),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    (
        kind(),
        0u16..MAX_DEPTH,
        0u64..4,
        0u64..0xa000,
        0u16..3,
        any::<u64>(),
        0u8..4,
    )
        .prop_map(|(kind, depth, task, target, vcpu, time_ns, flags)| Record {
            time_ns,
            vcpu,
            kind,
            flags,
            depth,
            nr: (task * 100) as u16,
            pc: target ^ 0x10,
            target,
            sp: 0,
            task,
            pid: task as u32,
            tgid: task as u32,
        })
}

fn depth_of(nodes: &[Node]) -> usize {
    nodes
        .iter()
        .map(|n| 1 + depth_of(&n.children))
        .max()
        .unwrap_or(0)
}

fn count(nodes: &[Node]) -> usize {
    nodes.iter().map(|n| 1 + count(&n.children)).sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random slot bytes: every slot is a record or a skip, never more.
    #[test]
    fn slot_parser_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..4096), session in 0u64..3) {
        let snap = parse_slots(&bytes, session);
        prop_assert_eq!(snap.records.len() as u64 + snap.skipped, (bytes.len() / RECORD_SIZE) as u64);
    }

    /// Well-stamped slots with random words: decoded or rejected, and what
    /// decodes re-encodes to the same words.
    #[test]
    fn stamped_slots_decode_or_fail(words in proptest::collection::vec(any::<[u64; 7]>(), 0..64), session in 1u64..5) {
        let mut bytes = Vec::new();
        for (i, w) in words.iter().enumerate() {
            bytes.extend_from_slice(&((session << 32) | (i as u64 + 1)).to_le_bytes());
            for x in w {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        let snap = parse_slots(&bytes, session);
        prop_assert_eq!(snap.records.len() as u64 + snap.skipped, words.len() as u64);
        for r in &snap.records {
            prop_assert!(words.contains(&r.encode()));
        }
        // The same slots read for another session: all skipped.
        prop_assert_eq!(parse_slots(&bytes, session + 1).records.len(), 0);
    }

    /// Any record sequence: flows whose node count is their call count,
    /// nesting never past the depth cap, and text that reads back.
    #[test]
    fn graph_from_any_records(recs in proptest::collection::vec(record(), 0..400)) {
        let trace = xftrace::build(&recs);
        let entries = recs.iter().filter(|r| r.kind == Kind::Entry).count();
        prop_assert_eq!(trace.flows.len(), entries);
        let mut nodes = 0;
        for f in &trace.flows {
            prop_assert_eq!(count(&f.calls), f.call_count);
            prop_assert!(depth_of(&f.calls) <= usize::from(MAX_DEPTH));
            nodes += f.call_count;
        }
        let calls = recs.iter().filter(|r| matches!(r.kind, Kind::Call | Kind::Tail)).count();
        prop_assert!(nodes <= calls);
        let mut text = Vec::new();
        let w = xftrace::fgraph::write(&trace, &Names, &xftrace::Preamble::default(), &mut text).unwrap();
        prop_assert_eq!(w.flows, trace.flows.len());
        prop_assert_eq!(w.calls, nodes);
        let back = xftrace::fgraph::parse(&String::from_utf8(text).unwrap()).unwrap();
        prop_assert_eq!(back.len(), trace.flows.len());
        let flagged: usize = back.iter().map(|f| f.flagged.len()).sum();
        prop_assert!(flagged <= w.flagged.len());
        prop_assert_eq!(w.flagged.is_empty(), flagged == 0);
    }

    /// Any text: parsed or refused, never a panic; names stay bounded.
    #[test]
    fn graph_reader_is_total(lines in proptest::collection::vec("[ -~]{0,80}", 0..60)) {
        let text = format!("# tracer: function_graph\n{}", lines.join("\n"));
        let flows = xftrace::fgraph::parse(&text).unwrap();
        for f in flows {
            prop_assert!(f.functions.iter().all(|n| n.len() <= 512 && !n.is_empty()));
        }
    }
}
