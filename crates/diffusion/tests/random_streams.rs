//! Random record streams (guest-controlled input): the engine never panics,
//! every table stays within its limit, and a restart rebuilds exactly the
//! state the live engine had.

mod common;

use common::*;
use diffusion::{Config, Limits, VmRef};
use events::payload::{FileKind, RESULT};
use events::{Kind, Record, FLAG_TASK};
use proptest::prelude::*;

const NRS: &[u64] = &[
    0, 1, 3, 9, 17, 18, 19, 20, 40, 42, 43, 44, 45, 46, 47, 49, 50, 51, 52, 53, 56, 57, 58, 59, 80,
    81, 82, 85, 86, 87, 231, 257, 263, 264, 265, 275, 276, 288, 295, 296, 299, 307, 316, 322, 326,
    327, 328, 435, 437, 39, 999,
];
const PATHS: &[&str] = &[
    "/root/secret.txt",
    "/root/a",
    "/root/b",
    "b",
    "../x",
    "/root/dir/c",
    "/root/dir",
    "/root/secret.txt (deleted)",
    "",
];

fn kind() -> impl Strategy<Value = FileKind> {
    prop_oneof![
        Just(FileKind::Regular),
        Just(FileKind::Pipe),
        Just(FileKind::Socket),
        Just(FileKind::Fifo),
        Just(FileKind::Directory),
        Just(FileKind::CharDevice),
        Just(FileKind::Unknown),
    ]
}

fn addr() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (
            prop::sample::select(vec![
                [10, 0, 3, 1],
                [10, 0, 3, 2],
                [127, 0, 0, 1],
                [10, 0, 2, 2],
                [0, 0, 0, 0]
            ]),
            1u16..5
        )
            .prop_map(|(ip, port)| sin(ip, port)),
        prop::sample::select(vec!["/run/a", "", "/run/b"]).prop_map(sun),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

fn item() -> impl Strategy<Value = It> {
    prop_oneof![
        1 => (0u8..6, prop::sample::select(PATHS)).prop_map(|(a, p)| It::Str(a, p.to_string())),
        1 => (0u8..6, addr()).prop_map(|(a, b)| It::Addr(a, b)),
        1 => (0u8..6, -2i32..8, -2i32..8).prop_map(|(a, x, y)| It::Pair(a, [x, y])),
        4 => (
            prop_oneof![3 => Just(0u8), 1 => 0u8..6, 1 => Just(RESULT)],
            kind(),
            1u64..12,
            prop::sample::select(PATHS)
        )
            .prop_map(|(a, k, ino, p)| It::File(
                a,
                F {
                    dev: 1,
                    ino,
                    kind: k,
                    path: p.to_string()
                }
            )),
        1 => (0u8..6, prop::collection::vec(prop::sample::select(PATHS), 0..3))
            .prop_map(|(a, v)| It::Argv(a, v.into_iter().map(str::to_string).collect())),
    ]
}

#[derive(Debug, Clone)]
struct Step {
    vm: bool,
    entry: bool,
    back: usize,
    nr: u64,
    args: [u64; 6],
    ret: i64,
    tid: u32,
    tgid: u32,
    named: bool,
    items: Vec<It>,
    junk: Option<Vec<u8>>,
    dt_ms: u64,
}

fn step() -> impl Strategy<Value = Step> {
    (
        (
            any::<bool>(),
            prop::bool::weighted(0.55),
            prop_oneof![3 => Just(0usize), 1 => 0usize..6],
            prop::sample::select(NRS)
        ),
        prop::array::uniform6(prop_oneof![0u64..8, Just((-100i64) as u64), any::<u64>()]),
        prop_oneof![4 => 1i64..200, 2 => 0i64..2, 1 => -3i64..0, 1 => Just(0x7f00_0000_0000i64), 1 => any::<i64>()],
        (1u32..7, 1u32..5, prop::bool::weighted(0.95)),
        prop::collection::vec(item(), 0..5),
        prop::option::weighted(0.05, prop::collection::vec(any::<u8>(), 0..64)),
        prop_oneof![0u64..5, Just(20_000)],
    )
        .prop_map(|((vm, entry, back, nr), args, ret, (tid, tgid, named), items, junk, dt_ms)| Step {
            vm,
            entry,
            back,
            nr,
            args,
            ret,
            tid,
            tgid,
            named,
            items,
            junk,
            dt_ms,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_streams_never_panic_and_stay_bounded(steps in prop::collection::vec(step(), 1..120)) {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            objects_per_vm: 12,
            pending_calls_per_vm: 6,
            helper_entries_per_vm: 6,
            recent_io_per_vm: 4,
            flows: 3,
            registrations_per_vm: 3,
        };
        let config = Config { limits, ..Config::default() };
        let (mut e, clock) = engine_with(dir.path(), config);
        e.set_vm_addresses("a", vec!["10.0.3.1".parse().unwrap()]);
        e.set_vm_addresses("b", vec!["10.0.3.2".parse().unwrap()]);
        e.track_add("a", "/root/secret.txt", &[]).unwrap();
        e.track_add("b", "/root/secret.txt", &[]).unwrap();
        e.track_add("a", "/root/a", &[]).unwrap();
        let vms = [VmRef::new("a", "ua"), VmRef::new("b", "ub")];
        let mut sims = [Sim::new(1_000_000_000), Sim::new(1_000_000_000)];
        let mut entries: [Vec<Record>; 2] = [Vec::new(), Vec::new()];
        for s in &steps {
            let i = usize::from(s.vm);
            let sim = &mut sims[i];
            sim.sleep_ms(s.dt_ms);
            let proc_ = P { tgid: s.tgid, tid: s.tid, comm: "x".into() };
            let name = events::syscalls::name(s.nr).unwrap_or("getpid");
            let mut rec = if s.entry || entries[i].is_empty() {
                let r = sim.enter(&proc_, name, s.args, &s.items);
                entries[i].push(r.clone());
                r
            } else {
                let n = entries[i].len();
                let e = entries[i][n - 1 - s.back.min(n - 1)].clone();
                sim.exit(&e, s.ret, &s.items)
            };
            sim.records.clear();
            if rec.kind == Kind::Entry {
                rec.nr = s.nr;
            }
            if !s.named {
                rec.flags &= !FLAG_TASK;
            }
            if let Some(j) = &s.junk {
                rec.payload.clone_from(j);
            }
            let _ = e.on_record(&vms[i], &rec);
            for vm in ["a", "b"] {
                let st = e.stats(vm).unwrap();
                prop_assert!(st.managed <= limits.objects_per_vm);
                prop_assert!(st.pending_calls <= limits.pending_calls_per_vm);
                prop_assert!(e.current(vm).len() <= limits.objects_per_vm);
            }
            prop_assert!(e.health().flows <= limits.flows);
            clock.set_monotonic(sims[i].time_ns);
            let _ = e.on_tick();
        }
        let _ = e.process_gone("a", 3);
        let _ = e.vm_stopped("b");
        let before: Vec<_> = ["a", "b"].iter().map(|vm| e.current(vm)).collect();
        let regs: Vec<_> = ["a", "b"].iter().map(|vm| e.track_list(vm)).collect();
        let graphs: Vec<_> = ["a", "b"].iter().map(|vm| e.graph(vm, None).unwrap()).collect();
        for (g, now) in graphs.iter().zip(&before) {
            prop_assert_eq!(g.live().count(), now.len());
        }
        prop_assert_eq!(e.health().unsaved, 0);
        drop(e);
        let (e, _clock) = engine_with(dir.path(), config);
        let after: Vec<_> = ["a", "b"].iter().map(|vm| e.current(vm)).collect();
        prop_assert_eq!(before, after);
        let regs_after: Vec<_> = ["a", "b"].iter().map(|vm| e.track_list(vm)).collect();
        prop_assert_eq!(regs, regs_after);
    }
}

/// A well-formed operation of a random workload.
#[derive(Debug, Clone)]
enum Op {
    Open(u32, u64),
    Read(u32, u8, i64),
    Write(u32, u8, i64),
    Fork(u32, u32),
    Clone3(u32, u32),
    Exec(u32),
    Exit(u32),
    Gone(u32),
    Rename(u32, u64, u64),
    Unlink(u32, u64),
    Bind(u32, u64, usize),
    Connect(u32, u64, usize),
    Accept(u32, u64, u64, usize),
    Send(u32, u64, usize, i64),
    Recv(u32, u64, usize, i64),
    Mmap(u32, u64, u64, u64),
    Pair(u32, [i32; 2]),
    Chdir(u32, u64),
    Tick(u64),
}

const FILES: &[&str] = &[
    "/root/secret.txt",
    "/root/a",
    "/root/b",
    "/tmp/c",
    "/tmp/d",
    "/root/dir/e",
];
const ADDRS: &[[u8; 4]] = &[[10, 0, 3, 1], [10, 0, 3, 2], [127, 0, 0, 1], [10, 0, 2, 2]];

/// Objects of the workload: files (by index in FILES), pipes, sockets.
fn obj(i: u8) -> F {
    match i % 12 {
        n @ 0..=5 => F::reg(100 + u64::from(n), FILES[usize::from(n)]),
        n @ 6..=8 => F::pipe(200 + u64::from(n)),
        n => F::sock(300 + u64::from(n)),
    }
}

fn op() -> impl Strategy<Value = Op> {
    let pid = 1u32..9;
    prop_oneof![
        3 => (pid.clone(), 0u64..6).prop_map(|(p, f)| Op::Open(p, f)),
        4 => (pid.clone(), any::<u8>(), -1i64..100).prop_map(|(p, o, n)| Op::Read(p, o, n)),
        4 => (pid.clone(), any::<u8>(), -1i64..100).prop_map(|(p, o, n)| Op::Write(p, o, n)),
        2 => (pid.clone(), 1u32..12).prop_map(|(p, c)| Op::Fork(p, c)),
        1 => (pid.clone(), 1u32..12).prop_map(|(p, c)| Op::Clone3(p, c)),
        1 => pid.clone().prop_map(Op::Exec),
        2 => pid.clone().prop_map(Op::Exit),
        1 => pid.clone().prop_map(Op::Gone),
        1 => (pid.clone(), 0u64..6, 0u64..6).prop_map(|(p, a, b)| Op::Rename(p, a, b)),
        1 => (pid.clone(), 0u64..6).prop_map(|(p, a)| Op::Unlink(p, a)),
        1 => (pid.clone(), 9u64..12, 0usize..4).prop_map(|(p, s, a)| Op::Bind(p, s, a)),
        2 => (pid.clone(), 9u64..12, 0usize..4).prop_map(|(p, s, a)| Op::Connect(p, s, a)),
        1 => (pid.clone(), 9u64..12, 9u64..12, 0usize..4).prop_map(|(p, l, s, a)| Op::Accept(p, l, s, a)),
        2 => (pid.clone(), 9u64..12, 0usize..4, 0i64..100).prop_map(|(p, s, a, n)| Op::Send(p, s, a, n)),
        2 => (pid.clone(), 9u64..12, 0usize..4, 0i64..100).prop_map(|(p, s, a, n)| Op::Recv(p, s, a, n)),
        1 => (pid.clone(), 0u64..6, 0u64..4, 0u64..4).prop_map(|(p, f, pr, fl)| Op::Mmap(p, f, pr, fl)),
        1 => (pid.clone(), 3i32..8, 3i32..8).prop_map(|(p, a, b)| Op::Pair(p, [a, b])),
        1 => (pid, 0u64..6).prop_map(|(p, d)| Op::Chdir(p, d)),
        1 => (0u64..30_000).prop_map(Op::Tick),
    ]
}

fn apply(s: &mut Sim, op: &Op) -> Option<(String, u32)> {
    let pr = |t: u32| P {
        tgid: t,
        tid: t,
        comm: format!("p{t}"),
    };
    match *op {
        Op::Open(t, f) => s.openat(
            &pr(t),
            FILES[f as usize],
            O_WRONLY_CREAT_TRUNC,
            3,
            Some(&obj(f as u8)),
        ),
        Op::Read(t, o, n) => s.read(&pr(t), 3, &obj(o), n),
        Op::Write(t, o, n) => s.write(&pr(t), 3, &obj(o), n),
        Op::Fork(t, c) => s.fork(&pr(t), c),
        Op::Clone3(t, c) => s.call(
            &pr(t),
            "clone3",
            [0x7000, 88, 0, 0, 0, 0],
            i64::from(c),
            &[],
            &[],
        ),
        Op::Exec(t) => s.execve(&mut pr(t), "/bin/prog", &["prog"]),
        Op::Exit(t) => s.exit_group(&pr(t)),
        Op::Gone(t) => return Some(("gone".into(), t)),
        Op::Rename(t, a, b) => s.renameat2(&pr(t), FILES[a as usize], FILES[b as usize], 0),
        Op::Unlink(t, a) => s.unlinkat(&pr(t), FILES[a as usize]),
        Op::Bind(t, k, a) => s.bind(&pr(t), 4, &obj(k as u8), sin(ADDRS[a], 9000)),
        Op::Connect(t, k, a) => s.connect(&pr(t), 4, &obj(k as u8), sin(ADDRS[a], 9000), 0),
        Op::Accept(t, l, k, a) => {
            let e = s.accept4_enter(&pr(t), 4, &obj(l as u8));
            s.accept4_exit(&e, 5, &obj(k as u8), sin(ADDRS[a], 40000));
        }
        Op::Send(t, k, a, n) => s.sendto(&pr(t), 4, &obj(k as u8), n, Some(sin(ADDRS[a], 9000))),
        Op::Recv(t, k, a, n) => s.recvfrom(&pr(t), 4, &obj(k as u8), n, Some(sin(ADDRS[a], 40000))),
        Op::Mmap(t, f, prot, flags) => s.mmap(&pr(t), 3, &obj(f as u8), prot, flags),
        Op::Pair(t, fds) => s.call(
            &pr(t),
            "socketpair",
            [1, 1, 0, 0x7000, 0, 0],
            0,
            &[],
            &[It::Pair(3, fds)],
        ),
        Op::Chdir(t, d) => s.chdir(&pr(t), FILES[d as usize]),
        Op::Tick(ms) => s.sleep_ms(ms),
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_workloads_respect_limits_and_replay_exactly(
        ops in prop::collection::vec((any::<bool>(), op()), 1..160),
        small in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let limits = if small {
            Limits {
                objects_per_vm: 7,
                pending_calls_per_vm: 2,
                helper_entries_per_vm: 3,
                recent_io_per_vm: 2,
                flows: 2,
                registrations_per_vm: 2,
            }
        } else {
            Limits::default()
        };
        let config = Config { limits, ..Config::default() };
        let (mut e, clock) = engine_with(dir.path(), config);
        e.set_vm_addresses("a", vec!["10.0.3.1".parse().unwrap()]);
        e.set_vm_addresses("b", vec!["10.0.3.2".parse().unwrap()]);
        e.track_add("a", "/root/secret.txt", &[]).unwrap();
        e.track_add("b", "/tmp/c", &[]).unwrap();
        let vms = [VmRef::new("a", "ua"), VmRef::new("b", "ub")];
        let mut sims = [Sim::new(1_000_000_000), Sim::new(1_000_000_000)];
        let mut managed_any = 0;
        for (which, op) in &ops {
            let i = usize::from(*which);
            let before = sims[i].records.len();
            let out = match apply(&mut sims[i], op) {
                Some((_, t)) => e.process_gone(&vms[i].name, t),
                None => {
                    let recs: Vec<Record> = sims[i].records[before..].to_vec();
                    feed(&mut e, &vms[i], &recs)
                }
            };
            managed_any += out.len();
            for vm in ["a", "b"] {
                let st = e.stats(vm).unwrap();
                prop_assert!(st.managed <= limits.objects_per_vm, "{:?}", st);
                prop_assert!(st.pending_calls <= limits.pending_calls_per_vm);
            }
            prop_assert!(e.health().flows <= limits.flows);
            clock.set_monotonic(sims[i].time_ns);
            let _ = e.on_tick();
        }
        let _ = managed_any;
        let before: Vec<_> = ["a", "b"].iter().map(|vm| e.current(vm)).collect();
        for (vm, now) in ["a", "b"].iter().zip(&before) {
            let g = e.graph(vm, None).unwrap();
            prop_assert_eq!(g.live().count(), now.len());
            let closed = g.dot().ends_with("}\n");
            prop_assert!(closed);
        }
        drop(e);
        let (e, _clock) = engine_with(dir.path(), config);
        let after: Vec<_> = ["a", "b"].iter().map(|vm| e.current(vm)).collect();
        prop_assert_eq!(before, after);
    }
}

#[test]
fn junk_payloads_and_unnamed_records_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    let vm = VmRef::new("a", "u");
    let mut r = Record::entry(0, 0, [0; 6], 0, 0);
    r.payload = vec![0xff; 300];
    r.flags = FLAG_TASK;
    assert!(e.on_record(&vm, &r).is_empty());
    r.flags = 0;
    assert!(e.on_record(&vm, &r).is_empty());
    let st = e.stats("a").unwrap();
    assert_eq!((st.records, st.unattributed), (2, 1));
}
