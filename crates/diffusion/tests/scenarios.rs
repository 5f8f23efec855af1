//! Diffusion scenarios on record streams shaped like the hook plugin's.

mod common;

use std::collections::BTreeSet;

use common::*;
use diffusion::{
    Change, DeltaEvent, DiffusionEngine, FileIdentity, ObjectKey, OpenFile, Reason, VmRef,
};
use events::payload::FileKind;

const SECRET: &str = "/root/secret.txt";
const SECRET_INO: u64 = 4242;

fn secret() -> F {
    F::reg(SECRET_INO, SECRET)
}

fn web1() -> VmRef {
    VmRef::new("web1", "11111111-1111-1111-1111-111111111111")
}

fn web2() -> VmRef {
    VmRef::new("web2", "22222222-2222-2222-2222-222222222222")
}

/// Every object the log ever added, by kind and label.
fn added(evs: &[DeltaEvent]) -> BTreeSet<String> {
    evs.iter()
        .filter_map(|e| match &e.change {
            Change::Added { object, info, .. } => {
                Some(format!("{} {}", object.kind(), info.label(object)))
            }
            _ => None,
        })
        .collect()
}

fn removed(evs: &[DeltaEvent]) -> Vec<String> {
    evs.iter()
        .filter(|e| matches!(e.change, Change::Removed { .. }))
        .map(|e| e.change.to_string())
        .collect()
}

fn current(e: &DiffusionEngine, vm: &str) -> BTreeSet<String> {
    e.current(vm)
        .iter()
        .map(|o| format!("{} {}", o.object.kind(), o.label))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The paper's run: `sh` starts `cp /root/secret.txt /root/copyNN-secret.txt` five times.
fn five_copies(sim: &mut Sim, sh: &P, first_pid: u32) {
    for i in 0..5u32 {
        let pid = first_pid + i;
        sim.fork(sh, pid);
        let mut cp = p(pid, "sh");
        sim.execve(
            &mut cp,
            "/usr/bin/cp",
            &["cp", SECRET, &format!("/root/copy0{}-secret.txt", i + 1)],
        );
        sim.openat(&cp, SECRET, O_RDONLY, 3, Some(&secret()));
        let copy = F::reg(
            5000 + u64::from(i),
            &format!("/root/copy0{}-secret.txt", i + 1),
        );
        sim.openat(
            &cp,
            &copy.path.clone(),
            O_WRONLY_CREAT_TRUNC,
            4,
            Some(&copy),
        );
        sim.read(&cp, 3, &secret(), 120);
        sim.write(&cp, 4, &copy, 120);
        sim.read(&cp, 3, &secret(), 0);
        sim.close(&cp, 4, &copy);
        sim.close(&cp, 3, &secret());
        sim.exit_group(&cp);
        sim.sleep_ms(1000);
    }
}

#[test]
fn the_papers_five_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    let vm = web1();
    let reg = e.track_add("web1", SECRET, &[]).unwrap();
    assert_eq!(texts(&reg), ["+track /root/secret.txt"]);
    let mut sim = Sim::new(1_000_000_000);
    let sh = p(700, "sh");
    five_copies(&mut sim, &sh, 773);
    let evs = feed(&mut e, &vm, &sim.records);

    let mut expected = vec!["file /root/secret.txt".to_string()];
    for i in 0..5 {
        expected.push(format!("process {} cp", 773 + i));
        expected.push(format!("file /root/copy0{}-secret.txt", i + 1));
    }
    assert_eq!(added(&evs), expected.iter().cloned().collect());
    let adds = evs
        .iter()
        .filter(|e| matches!(e.change, Change::Added { .. }))
        .count();
    assert_eq!(adds, 11, "one event per new object, never a re-dump");
    assert_eq!(
        removed(&evs),
        (773..778)
            .map(|p| format!("-process {p} cp (exit)"))
            .collect::<Vec<_>>()
    );
    // The exact delta log of the first copy, as users read it.
    let lines: Vec<String> = evs.iter().take(4).map(DeltaEvent::text).collect();
    assert_eq!(
        lines,
        [
            "2026-11-21T10:00:01.006Z web1 +file /root/secret.txt  via track",
            "2026-11-21T10:00:01.010Z web1 +process 773 cp  via read(/root/secret.txt)",
            "2026-11-21T10:00:01.012Z web1 +file /root/copy01-secret.txt  via write by 773 cp",
            "2026-11-21T10:00:01.019Z web1 -process 773 cp (exit)",
        ]
    );
    assert_eq!(
        current(&e, "web1"),
        set(&[
            "file /root/secret.txt",
            "file /root/copy01-secret.txt",
            "file /root/copy02-secret.txt",
            "file /root/copy03-secret.txt",
            "file /root/copy04-secret.txt",
            "file /root/copy05-secret.txt",
        ])
    );
    // The shell never touched the content.
    assert!(!evs.iter().any(|e| e.change.to_string().contains(" 700 ")));
    let reg = e.track_list("web1");
    assert_eq!(reg.len(), 1);
    assert_eq!(
        reg[0].file,
        Some(ObjectKey::File {
            dev: ROOT_DEV,
            ino: SECRET_INO
        })
    );
}

#[test]
fn graph_at_three_past_instants() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    let vm = web1();
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut sim = Sim::new(1_000_000_000);
    five_copies(&mut sim, &p(700, "sh"), 773);
    // Then remove the third copy.
    let rm = p(790, "rm");
    sim.unlinkat(&rm, "/root/copy03-secret.txt");
    let evs = feed(&mut e, &vm, &sim.records);
    let at = |s: &str| diffusion::parse_time(s).unwrap();

    // Mid first copy: the secret and the cp that read it, nothing written yet.
    let g = e
        .graph("web1", Some(at("2026-11-21T10:00:01.011Z")))
        .unwrap();
    let live: BTreeSet<String> = g.live().map(|n| n.label.clone()).collect();
    assert_eq!(live, set(&["/root/secret.txt", "773 cp"]));
    assert!(g.nodes.iter().all(|n| n.left.is_none()));

    // After the third copy: three copies live, three processes left (exit).
    let g = e
        .graph("web1", Some(at("2026-11-21T10:00:04.000Z")))
        .unwrap();
    let live: BTreeSet<String> = g.live().map(|n| n.label.clone()).collect();
    assert_eq!(
        live,
        set(&[
            "/root/secret.txt",
            "/root/copy01-secret.txt",
            "/root/copy02-secret.txt",
            "/root/copy03-secret.txt"
        ])
    );
    let left: Vec<(String, Reason)> = g
        .nodes
        .iter()
        .filter_map(|n| n.left.as_ref().map(|l| (n.label.clone(), l.reason)))
        .collect();
    assert_eq!(
        left,
        [
            ("773 cp".to_string(), Reason::Exit),
            ("774 cp".to_string(), Reason::Exit),
            ("775 cp".to_string(), Reason::Exit)
        ]
    );
    let cp774 = g.nodes.iter().find(|n| n.label == "774 cp").unwrap();
    let copy02 = g
        .nodes
        .iter()
        .find(|n| n.label == "/root/copy02-secret.txt")
        .unwrap();
    assert_eq!(
        copy02.from_node,
        Some(cp774.id),
        "the copy came from the cp that wrote it"
    );
    let secret_node = g.nodes.iter().find(|n| n.label == SECRET).unwrap();
    assert_eq!(cp774.from_node, Some(secret_node.id));

    // Now: every copy but the third, which left by unlink; all cp processes left.
    let g = e.graph("web1", None).unwrap();
    let live: BTreeSet<String> = g.live().map(|n| n.label.clone()).collect();
    assert_eq!(
        live,
        set(&[
            "/root/secret.txt",
            "/root/copy01-secret.txt",
            "/root/copy02-secret.txt",
            "/root/copy04-secret.txt",
            "/root/copy05-secret.txt"
        ])
    );
    let copy03 = g
        .nodes
        .iter()
        .find(|n| n.label == "/root/copy03-secret.txt")
        .unwrap();
    assert_eq!(copy03.left.as_ref().unwrap().reason, Reason::Unlink);
    assert_eq!(g.nodes.len(), 11);
    assert_eq!(
        removed(&evs).last().unwrap(),
        "-file /root/copy03-secret.txt (unlink)"
    );

    // The three formats.
    let text = g.text();
    assert!(
        text.starts_with("diffusion graph of web1 now: 5 managed, 6 left, 0 sends\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "+file /root/copy03-secret.txt  via write by 775 cp  [left 2026-11-21T10:00:06."
        ),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&g.json()).unwrap();
    assert_eq!(json["nodes"].as_array().unwrap().len(), 11);
    let dot = g.dot();
    assert!(dot.starts_with("digraph \"diffusion web1\" {"), "{dot}");
    assert!(
        dot.contains(&format!(
            "n{} -> n{} [label=\"write\"];",
            cp774.id, copy02.id
        )),
        "{dot}"
    );
    assert!(dot.contains("style=dashed"), "{dot}");
}

#[test]
fn pipeline_through_two_pipes() {
    // sh -c 'cat /root/secret.txt | gzip | base64 > /root/out.b64'
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let sh = p(800, "sh");
    let (p1, p2) = (F::pipe(9001), F::pipe(9002));
    let out = F::reg(6000, "/root/out.b64");
    s.pipe2(&sh, [3, 4]);
    s.pipe2(&sh, [5, 6]);
    s.clone_process(&sh, 801);
    s.clone_process(&sh, 802);
    s.clone_process(&sh, 803);
    let mut cat = p(801, "sh");
    let mut gz = p(802, "sh");
    let mut b64 = p(803, "sh");
    s.close(&cat, 5, &p2);
    s.execve(&mut cat, "/usr/bin/cat", &["cat", SECRET]);
    // The shell's child for base64 opens the redirection before exec.
    s.openat(&b64, "/root/out.b64", O_WRONLY_CREAT_TRUNC, 7, Some(&out));
    s.execve(&mut gz, "/usr/bin/gzip", &["gzip"]);
    s.execve(&mut b64, "/usr/bin/base64", &["base64"]);
    let gz_read = s.enter(
        &gz,
        "read",
        [0, 0x7f00_0000, 65536, 0, 0, 0],
        &[It::File(0, p1.clone())],
    );
    s.openat(&cat, SECRET, O_RDONLY, 3, Some(&secret()));
    s.read(&cat, 3, &secret(), 120);
    s.write(&cat, 1, &p1, 120);
    s.exit(&gz_read, 120, &[]);
    s.read(&cat, 3, &secret(), 0);
    s.exit_group(&cat);
    s.write(&gz, 1, &p2, 90);
    s.exit_group(&gz);
    s.read(&b64, 0, &p2, 90);
    s.write(&b64, 1, &out, 124);
    s.exit_group(&b64);
    s.exit_group(&sh);
    let evs = feed(&mut e, &web1(), &s.records);
    assert_eq!(
        added(&evs),
        set(&[
            "file /root/secret.txt",
            "process 801 cat",
            "pipe pipe:[9001]",
            "process 802 gzip",
            "pipe pipe:[9002]",
            "process 803 base64",
            "file /root/out.b64",
        ])
    );
    let t = texts(&evs);
    assert!(
        t.contains(&"+pipe pipe:[9001]  via write by 801 cat".to_string()),
        "{t:#?}"
    );
    assert!(
        t.contains(&"+process 802 gzip  via read(pipe:[9001])".to_string()),
        "{t:#?}"
    );
    assert!(
        t.contains(&"+file /root/out.b64  via write by 803 base64".to_string()),
        "{t:#?}"
    );
    assert_eq!(
        current(&e, "web1"),
        set(&[
            "file /root/secret.txt",
            "pipe pipe:[9001]",
            "pipe pipe:[9002]",
            "file /root/out.b64"
        ])
    );
}

#[test]
fn shell_redirection_in_the_child() {
    // sh -c 'cat /root/secret.txt > /root/o.txt': the child opens o.txt, then execs cat.
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let sh = p(900, "sh");
    let o = F::reg(6100, "/root/o.txt");
    s.clone_process(&sh, 901);
    let mut child = p(901, "sh");
    s.openat(&child, "/root/o.txt", O_WRONLY_CREAT_TRUNC, 3, Some(&o));
    s.call(
        &child,
        "dup2",
        [3, 1, 0, 0, 0, 0],
        1,
        &[It::File(0, o.clone())],
        &[],
    );
    s.close(&child, 3, &o);
    s.execve(&mut child, "/usr/bin/cat", &["cat", SECRET]);
    s.openat(&child, SECRET, O_RDONLY, 3, Some(&secret()));
    s.read(&child, 3, &secret(), 50);
    s.write(&child, 1, &o, 50);
    s.exit_group(&child);
    let evs = feed(&mut e, &web1(), &s.records);
    assert_eq!(
        added(&evs),
        set(&[
            "file /root/secret.txt",
            "process 901 cat",
            "file /root/o.txt"
        ])
    );
    assert_eq!(removed(&evs), ["-process 901 cat (exit)"]);
}

#[test]
fn fd_inherited_across_fork() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let parent = p(950, "python3");
    s.openat(&parent, SECRET, O_RDONLY, 3, Some(&secret()));
    s.fork(&parent, 951);
    s.fork(&parent, 952);
    let reader = p(951, "python3");
    let idle = p(952, "python3");
    s.read(&reader, 3, &secret(), 10);
    s.write(&idle, 1, &F::pipe(77), 5);
    let evs = feed(&mut e, &web1(), &s.records);
    assert_eq!(
        added(&evs),
        set(&["file /root/secret.txt", "process 951 python3"])
    );
}

#[test]
fn copy_file_range_and_sendfile() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let cp = p(1000, "cp");
    let dst = F::reg(6200, "/root/cfr.txt");
    s.openat(&cp, SECRET, O_RDONLY, 3, Some(&secret()));
    s.openat(&cp, "/root/cfr.txt", O_WRONLY_CREAT_TRUNC, 4, Some(&dst));
    s.copy_file_range(&cp, (3, &secret()), (4, &dst), 120);
    s.copy_file_range(&cp, (3, &secret()), (4, &dst), 0);
    let py = p(1001, "python3");
    let dst2 = F::reg(6201, "/root/sf.txt");
    s.openat(&py, SECRET, O_RDONLY, 3, Some(&secret()));
    s.openat(&py, "/root/sf.txt", O_WRONLY_CREAT_TRUNC, 5, Some(&dst2));
    s.sendfile(&py, (5, &dst2), (3, &secret()), 120);
    // sendfile from an unmanaged file by an unmanaged process moves nothing.
    let other = p(1002, "python3");
    let (a, b) = (F::reg(7000, "/etc/hosts"), F::reg(7001, "/tmp/hosts"));
    s.sendfile(&other, (5, &b), (3, &a), 100);
    let evs = feed(&mut e, &web1(), &s.records);
    assert_eq!(
        texts(&evs),
        [
            "+file /root/secret.txt  via track",
            "+process 1000 cp  via copy_file_range(/root/secret.txt)",
            "+file /root/cfr.txt  via copy_file_range by 1000 cp",
            "+process 1001 python3  via sendfile(/root/secret.txt)",
            "+file /root/sf.txt  via sendfile by 1001 python3",
        ]
    );
}

#[test]
fn mv_then_rm_follows_the_path_then_removes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let sh = p(1090, "sh");
    s.chdir(&sh, "/root");
    five_copies(&mut s, &sh, 1095);
    s.fork(&sh, 1100);
    let mut mv = p(1100, "sh");
    s.execve(
        &mut mv,
        "/usr/bin/mv",
        &["mv", "copy01-secret.txt", "moved.txt"],
    );
    // Relative names: resolved against the cwd inherited from the shell.
    s.renameat2(&mv, "copy01-secret.txt", "moved.txt", 1);
    s.exit_group(&mv);
    let evs1 = feed(&mut e, &web1(), &s.records);
    assert_eq!(
        texts(&evs1).last().unwrap(),
        "~file /root/copy01-secret.txt -> /root/moved.txt (renameat2 by 1100 mv)"
    );
    assert!(current(&e, "web1").contains("file /root/moved.txt"));
    assert!(!current(&e, "web1").contains("file /root/copy01-secret.txt"));

    let mut s2 = Sim::new(s.time_ns);
    s2.seq = s.seq;
    s2.fork(&sh, 1101);
    let mut rm = p(1101, "sh");
    s2.execve(&mut rm, "/usr/bin/rm", &["rm", "moved.txt"]);
    s2.unlinkat(&rm, "moved.txt");
    // A rename relative to a directory fd cannot be resolved from the record:
    // the next file identity of the inode corrects the name.
    s2.call(
        &rm,
        "renameat",
        [5, 0x5000, 5, 0x5100, 0, 0],
        0,
        &[
            It::Str(1, "copy02-secret.txt".into()),
            It::Str(3, "c2.txt".into()),
        ],
        &[],
    );
    let cat = p(1102, "cat");
    s2.openat(
        &cat,
        "/root/c2.txt",
        O_RDONLY,
        3,
        Some(&F::reg(5001, "/root/c2.txt")),
    );
    let evs2 = feed(&mut e, &web1(), &s2.records);
    assert_eq!(
        texts(&evs2),
        [
            "-file /root/moved.txt (unlink)",
            "~file /root/copy02-secret.txt -> /root/c2.txt (openat by 1102 cat)",
        ]
    );
    let files = current(&e, "web1");
    assert_eq!(
        files,
        set(&[
            "file /root/secret.txt",
            "file /root/c2.txt",
            "file /root/copy03-secret.txt",
            "file /root/copy04-secret.txt",
            "file /root/copy05-secret.txt",
        ])
    );
    let g = e.graph("web1", None).unwrap();
    let moved = g
        .nodes
        .iter()
        .find(|n| n.label == "/root/moved.txt")
        .unwrap();
    assert_eq!(moved.left.as_ref().unwrap().reason, Reason::Unlink);
}

#[test]
fn leak_over_tcp_to_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let curl = p(1200, "curl");
    let sock = F::sock(8100);
    s.openat(&curl, SECRET, O_RDONLY, 3, Some(&secret()));
    s.read(&curl, 3, &secret(), 120);
    s.socket(&curl, 2, 1, 4, &sock);
    s.connect(&curl, 4, &sock, sin([10, 0, 2, 2], 8080), 0);
    s.write(&curl, 4, &sock, 120);
    s.write(&curl, 4, &sock, 30);
    s.write(&curl, 4, &sock, 50);
    // Loopback is not a leak.
    let lo = F::sock(8101);
    s.connect(&curl, 5, &lo, sin([127, 0, 0, 1], 9999), 0);
    s.write(&curl, 5, &lo, 10);
    // An unmanaged process sending out is nothing to report.
    let other = p(1201, "wget");
    let osock = F::sock(8102);
    s.connect(&other, 3, &osock, sin([10, 0, 2, 2], 8080), 0);
    s.write(&other, 3, &osock, 500);
    let evs = feed(&mut e, &web1(), &s.records);
    let t = texts(&evs);
    assert_eq!(
        t,
        [
            "+file /root/secret.txt  via track",
            "+process 1200 curl  via read(/root/secret.txt)",
            "+socket socket:[8100] -> 10.0.2.2:8080  via write by 1200 curl",
            "!leak 1200 curl -> 10.0.2.2:8080 (120 bytes)",
            "+socket socket:[8101] -> 127.0.0.1:9999  via write by 1200 curl",
        ]
    );
    // The two later sends are summed and reported when the window closes.
    clock.set_monotonic(s.time_ns + 11_000_000_000);
    let later = e.on_tick();
    assert_eq!(
        texts(&later),
        ["!leak 1200 curl -> 10.0.2.2:8080 (80 bytes in 2 calls)"]
    );
    assert!(e.on_tick().is_empty());
    let g = e.graph("web1", None).unwrap();
    assert_eq!(g.sends.len(), 2);
    assert_eq!(g.sends.iter().map(|s| s.bytes).sum::<u64>(), 200);
    assert!(
        g.dot().contains("\"leak 120 bytes\", color=red"),
        "{}",
        g.dot()
    );
}

/// web1 (10.0.3.1) sends the secret to web2 (10.0.3.2), which writes it to a file.
fn cross_vm_streams() -> (Sim, Sim) {
    let mut a = Sim::new(1_000_000_000);
    let nc = p(2000, "nc");
    let sock = F::sock(8200);
    a.openat(&nc, SECRET, O_RDONLY, 3, Some(&secret()));
    a.read(&nc, 3, &secret(), 120);
    a.socket(&nc, 2, 1, 4, &sock);
    a.connect(&nc, 4, &sock, sin([10, 0, 3, 2], 9000), 0);
    a.write(&nc, 4, &sock, 120);
    a.exit_group(&nc);

    let mut b = Sim::new(900_000_000);
    let srv = p(3000, "nc");
    let (ls, conn) = (F::sock(9100), F::sock(9101));
    let recv = F::reg(6300, "/root/recv.txt");
    b.socket(&srv, 2, 1, 3, &ls);
    b.bind(&srv, 3, &ls, sin([0, 0, 0, 0], 9000));
    b.listen(&srv, 3, &ls);
    let acc = b.accept4_enter(&srv, 3, &ls);
    b.time_ns = 1_006_000_000; // the connection arrives after web1's connect
    b.accept4_exit(&acc, 4, &conn, sin([10, 0, 3, 1], 40000));
    b.openat(&srv, "/root/recv.txt", O_WRONLY_CREAT_TRUNC, 5, Some(&recv));
    b.time_ns = 1_010_000_000;
    b.read(&srv, 4, &conn, 120);
    b.write(&srv, 5, &recv, 120);
    b.exit_group(&srv);
    (a, b)
}

fn check_cross_vm(e: &DiffusionEngine, evs: &[DeltaEvent]) {
    let web1_evs: Vec<_> = evs.iter().filter(|e| e.vm == "web1").cloned().collect();
    let web2_evs: Vec<_> = evs.iter().filter(|e| e.vm == "web2").cloned().collect();
    assert_eq!(
        added(&web1_evs),
        set(&[
            "file /root/secret.txt",
            "process 2000 nc",
            "socket socket:[8200]"
        ])
    );
    assert!(
        texts(&web1_evs).contains(&">send 2000 nc -> web2 10.0.3.2:9000 (120 bytes)".to_string())
    );
    assert!(!texts(&web1_evs).iter().any(|t| t.starts_with("!leak")));
    assert_eq!(
        added(&web2_evs),
        set(&[
            "socket socket:[9101]",
            "process 3000 nc",
            "file /root/recv.txt"
        ])
    );
    let t2 = texts(&web2_evs);
    assert_eq!(
        t2[0], "+socket socket:[9101] -> 10.0.3.1:40000  via write by web1:2000 nc",
        "{t2:#?}"
    );
    assert!(
        t2.contains(&"+process 3000 nc  via read(socket:[9101])".to_string()),
        "{t2:#?}"
    );
    assert!(
        t2.contains(&"+file /root/recv.txt  via write by 3000 nc".to_string()),
        "{t2:#?}"
    );
    // The edge is in both graphs.
    let g1 = e.graph("web1", None).unwrap();
    assert_eq!(g1.sends.len(), 1);
    assert_eq!(g1.sends[0].to_vm.as_deref(), Some("web2"));
    assert!(g1.dot().contains("web2: 10.0.3.2:9000"), "{}", g1.dot());
    let g2 = e.graph("web2", None).unwrap();
    let sock = g2
        .nodes
        .iter()
        .find(|n| n.label == "socket:[9101]")
        .unwrap();
    let from = sock.edge.from.as_ref().unwrap();
    assert_eq!(
        (from.vm.as_deref(), from.label.as_str()),
        (Some("web1"), "2000 nc")
    );
    assert!(g2.dot().contains("web1: 2000 nc"), "{}", g2.dot());
}

fn cross_vm_engine(dir: &std::path::Path) -> DiffusionEngine {
    let (mut e, _clock) = engine(dir);
    e.set_vm_addresses("web1", vec!["10.0.3.1".parse().unwrap()]);
    e.set_vm_addresses("web2", vec!["10.0.3.2".parse().unwrap()]);
    e.track_add("web1", SECRET, &[]).unwrap();
    e
}

#[test]
fn cross_vm_sender_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = cross_vm_engine(dir.path());
    let (a, b) = cross_vm_streams();
    let mut evs = feed(&mut e, &web1(), &a.records);
    evs.extend(feed(&mut e, &web2(), &b.records));
    check_cross_vm(&e, &evs);
}

#[test]
fn cross_vm_receiver_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = cross_vm_engine(dir.path());
    let (a, b) = cross_vm_streams();
    let mut evs = feed(&mut e, &web2(), &b.records);
    assert!(evs.is_empty(), "nothing is known to be secret in web2 yet");
    evs.extend(feed(&mut e, &web1(), &a.records));
    check_cross_vm(&e, &evs);
    // The receiver's process had exited before the match: it is added, and
    // its exit is not lost (it is no longer current).
    assert!(!current(&e, "web2").contains("process 3000 nc"));
}

#[test]
fn cross_vm_interleaved() {
    let dir = tempfile::tempdir().unwrap();
    let mut e = cross_vm_engine(dir.path());
    let (a, b) = cross_vm_streams();
    let mut evs = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.records.len() || j < b.records.len() {
        if j >= b.records.len()
            || (i < a.records.len() && a.records[i].time_ns <= b.records[j].time_ns)
        {
            evs.extend(e.on_record(&web1(), &a.records[i]));
            i += 1;
        } else {
            evs.extend(e.on_record(&web2(), &b.records[j]));
            j += 1;
        }
    }
    check_cross_vm(&e, &evs);
}

#[test]
fn unrelated_processes_stay_unmanaged() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let sh = p(700, "sh");
    let tty = F::chr(3, "/dev/pts/0");
    // Noise before, between and after the copies.
    let ls = p(1500, "ls");
    s.openat(&ls, "/root", O_RDONLY, 3, Some(&F::dir(2, "/root")));
    s.call(
        &ls,
        "getdents64",
        [3, 0x5000, 32768, 0, 0, 0],
        200,
        &[It::File(0, F::dir(2, "/root"))],
        &[],
    );
    s.write(&ls, 1, &tty, 80);
    five_copies(&mut s, &sh, 773);
    let cat = p(1501, "cat");
    let host = F::reg(7100, "/etc/hostname");
    s.openat(&cat, "/etc/hostname", O_RDONLY, 3, Some(&host));
    s.read(&cat, 3, &host, 5);
    s.write(&cat, 1, &F::pipe(9500), 5);
    let wc = p(1502, "wc");
    s.read(&wc, 0, &F::pipe(9500), 5);
    // A managed process writes to the terminal: devices are not tracked,
    // so the shell reading the terminal stays unmanaged.
    let leaker = p(1503, "cat");
    s.openat(&leaker, SECRET, O_RDONLY, 3, Some(&secret()));
    s.read(&leaker, 3, &secret(), 120);
    s.write(&leaker, 1, &tty, 120);
    s.read(&sh, 0, &tty, 10);
    let evs = feed(&mut e, &web1(), &s.records);
    let mut expected = vec![
        "file /root/secret.txt".to_string(),
        "process 1503 cat".to_string(),
    ];
    for i in 0..5 {
        expected.push(format!("process {} cp", 773 + i));
        expected.push(format!("file /root/copy0{}-secret.txt", i + 1));
    }
    assert_eq!(added(&evs), expected.into_iter().collect());
}

#[test]
fn registration_of_open_files_and_of_paths_created_later() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    let open = [
        OpenFile {
            tgid: 600,
            comm: "less".into(),
            fd: 3,
            file: FileIdentity {
                dev: ROOT_DEV,
                ino: SECRET_INO,
                kind: FileKind::Regular,
                path: SECRET.into(),
            },
        },
        OpenFile {
            tgid: 601,
            comm: "vi".into(),
            fd: 3,
            file: FileIdentity {
                dev: ROOT_DEV,
                ino: 99,
                kind: FileKind::Regular,
                path: "/etc/passwd".into(),
            },
        },
    ];
    let evs = e.track_add("web1", SECRET, &open).unwrap();
    assert_eq!(
        texts(&evs),
        [
            "+track /root/secret.txt",
            "+file /root/secret.txt  via track",
            "+process 600 less  via track(/root/secret.txt)",
        ]
    );
    // A path that does not exist yet takes effect when it is created...
    e.track_add("web1", "/root/future.txt", &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let ed = p(610, "ed");
    s.openat(
        &ed,
        "/root/future.txt",
        O_WRONLY_CREAT_TRUNC,
        3,
        Some(&F::reg(8000, "/root/future.txt")),
    );
    s.write(&ed, 3, &F::reg(8000, "/root/future.txt"), 10);
    // ... and follows the path when the file is deleted and recreated.
    s.unlinkat(&ed, "/root/future.txt");
    s.openat(
        &ed,
        "/root/future.txt",
        O_WRONLY_CREAT_TRUNC,
        3,
        Some(&F::reg(8001, "/root/future.txt")),
    );
    let evs = feed(&mut e, &web1(), &s.records);
    assert_eq!(
        texts(&evs),
        [
            "+file /root/future.txt  via track",
            "-file /root/future.txt (unlink)",
            "+file /root/future.txt  via track",
        ]
    );
    let reg = e.track_list("web1");
    let fut = reg.iter().find(|r| r.path == "/root/future.txt").unwrap();
    assert_eq!(
        fut.file,
        Some(ObjectKey::File {
            dev: ROOT_DEV,
            ino: 8001
        })
    );
    // track rm: the registered file leaves.
    let evs = e.track_rm("web1", "/root/future.txt").unwrap();
    assert_eq!(
        texts(&evs),
        [
            "-track /root/future.txt",
            "-file /root/future.txt (untracked)"
        ]
    );
    assert!(e.track_rm("web1", "/root/future.txt").is_err());
    assert_eq!(
        e.track_add("web1", "root/x", &[]).unwrap_err().to_string(),
        "`root/x` is not an absolute path (register paths as the guest sees them, e.g. /root/secret.txt)"
    );
}

#[test]
fn children_threads_clone3_and_exec() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let mut py = p(1300, "python3");
    s.openat(&py, SECRET, O_RDONLY, 3, Some(&secret()));
    s.read(&py, 3, &secret(), 120);
    // A thread (clone with CLONE_THREAD) is no new process, but writes for it.
    s.call(&py, "clone", [0x003d_0f00, 0, 0, 0, 0, 0], 1301, &[], &[]);
    let thread = P {
        tgid: 1300,
        tid: 1301,
        comm: "worker".into(),
    };
    s.write(&thread, 5, &F::reg(8100, "/tmp/t.txt"), 10);
    // clone3: the child counts once a record shows it leads its own group.
    s.call(&py, "clone3", [0x7ffc_0600, 88, 0, 0, 0, 0], 1302, &[], &[]);
    s.call(&py, "clone3", [0x7ffc_0600, 88, 0, 0, 0, 0], 1303, &[], &[]);
    let child = p(1302, "python3");
    s.call(&child, "getpid", [0; 6], 1302, &[], &[]);
    let thread2 = P {
        tgid: 1300,
        tid: 1303,
        comm: "python3".into(),
    };
    s.call(&thread2, "getpid", [0; 6], 1300, &[], &[]);
    // vfork: the parent's return comes after the child has exec'd and exited.
    let vfork = s.enter(&py, "vfork", [0; 6], &[]);
    let mut sh = p(1304, "python3");
    s.execve(&mut sh, "/bin/sh", &["sh", "-c", "echo x > /tmp/v.txt"]);
    s.write(&sh, 1, &F::reg(8101, "/tmp/v.txt"), 2);
    s.exit_group(&sh);
    s.exit(&vfork, 1304, &[]);
    // fork then exec keeps it managed under its new name.
    s.fork(&py, 1305);
    let mut sh2 = p(1305, "python3");
    s.execve(&mut sh2, "/bin/sh", &["sh"]);
    py.comm = "python3".into();
    let evs = feed(&mut e, &web1(), &s.records);
    assert_eq!(
        texts(&evs),
        [
            "+file /root/secret.txt  via track",
            "+process 1300 python3  via read(/root/secret.txt)",
            "+file /tmp/t.txt  via write by 1300 python3",
            "+process 1302 python3  via clone3 by 1300 python3",
            "+process 1304 sh  via vfork by 1300 python3",
            "+file /tmp/v.txt  via write by 1304 sh",
            "-process 1304 sh (exit)",
            "+process 1305 python3  via fork by 1300 python3",
            "~process 1305 python3 -> sh (execve /bin/sh)",
        ]
    );
}

#[test]
fn a_child_seen_before_its_fork_returns() {
    // Two vCPUs: the child runs (and even exits) before the parent's fork return is recorded.
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    let py = p(1400, "python3");
    s.openat(&py, SECRET, O_RDONLY, 3, Some(&secret()));
    s.read(&py, 3, &secret(), 120);
    let fork = s.enter(&py, "fork", [0; 6], &[]);
    let child = p(1401, "python3");
    let out = F::reg(8200, "/tmp/child.txt");
    s.openat(
        &child,
        "/tmp/child.txt",
        O_WRONLY_CREAT_TRUNC,
        4,
        Some(&out),
    );
    s.write(&child, 4, &out, 120);
    s.exit_group(&child);
    s.exit(&fork, 1401, &[]);
    let evs = feed(&mut e, &web1(), &s.records);
    assert_eq!(
        texts(&evs),
        [
            "+file /root/secret.txt  via track",
            "+process 1400 python3  via read(/root/secret.txt)",
            "+process 1401 python3  via fork by 1400 python3",
            "+file /tmp/child.txt  via write by 1401 python3",
            "-process 1401 python3 (exit)",
        ]
    );
}

#[test]
fn local_sockets_unix_and_socketpair_and_shared_mmap() {
    let dir = tempfile::tempdir().unwrap();
    let (mut e, _clock) = engine(dir.path());
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    // A unix stream server.
    let srv = p(1600, "agentd");
    let (ls, conn) = (F::sock(9200), F::sock(9201));
    s.bind(&srv, 3, &ls, sun("/run/agent.sock"));
    s.listen(&srv, 3, &ls);
    let acc = s.accept4_enter(&srv, 3, &ls);
    // A managed client connects and writes the secret.
    let cli = p(1601, "client");
    let csock = F::sock(9202);
    s.openat(&cli, SECRET, O_RDONLY, 3, Some(&secret()));
    s.read(&cli, 3, &secret(), 120);
    s.connect(&cli, 4, &csock, sun("/run/agent.sock"), 0);
    s.accept4_exit(&acc, 4, &conn, sun(""));
    s.write(&cli, 4, &csock, 120);
    s.read(&srv, 4, &conn, 120);
    // socketpair: the inodes show as the fds are used.
    let (sa, sb) = (F::sock(9300), F::sock(9301));
    s.call(
        &cli,
        "socketpair",
        [1, 1, 0, 0x7ffc_0700, 0, 0],
        0,
        &[],
        &[It::Pair(3, [5, 6])],
    );
    s.fork(&cli, 1602);
    let kid = p(1602, "client");
    s.close(&cli, 6, &sb);
    s.write(&cli, 5, &sa, 10);
    s.close(&kid, 5, &sa);
    s.read(&kid, 6, &sb, 10);
    // A shared writable mapping by a process mapping the file before it held anything.
    let shm = F::reg(8300, "/dev/shm/buf");
    let mapper = p(1603, "mapper");
    s.mmap(&mapper, 3, &shm, 3, 1);
    s.mmap(&cli, 7, &shm, 3, 1);
    let evs = feed(&mut e, &web1(), &s.records);
    let t = texts(&evs);
    assert_eq!(
        added(&evs),
        set(&[
            "file /root/secret.txt",
            "process 1601 client",
            "socket socket:[9202]",
            "socket socket:[9201]",
            "process 1600 agentd",
            "process 1602 client",
            "socket socket:[9300]",
            "socket socket:[9301]",
            "file /dev/shm/buf",
            "process 1603 mapper",
        ]),
        "{t:#?}"
    );
    assert!(
        t.contains(&"+socket socket:[9201]  via peer(socket:[9202])".to_string()),
        "{t:#?}"
    );
    assert!(
        t.contains(&"+process 1600 agentd  via read(socket:[9201])".to_string()),
        "{t:#?}"
    );
    assert!(
        t.contains(&"+socket socket:[9301]  via peer(socket:[9300])".to_string()),
        "{t:#?}"
    );
    assert!(
        t.contains(&"+process 1603 mapper  via mmap(/dev/shm/buf)".to_string()),
        "{t:#?}"
    );
}

#[test]
fn persistence_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (history, now, graph_text, before_secret_count) = {
        let (mut e, _clock) = engine(dir.path());
        e.track_add("web1", SECRET, &[]).unwrap();
        let mut s = Sim::new(1_000_000_000);
        five_copies(&mut s, &p(700, "sh"), 773);
        let cat = p(780, "cat");
        s.openat(&cat, SECRET, O_RDONLY, 3, Some(&secret()));
        s.read(&cat, 3, &secret(), 120);
        feed(&mut e, &web1(), &s.records);
        let history = e.history(None, 0, 1000).unwrap();
        let now: Vec<_> = e.current("web1");
        let count = now.len();
        (history, now, e.graph("web1", None).unwrap().text(), count)
    };
    assert_eq!(before_secret_count, 7);
    let (mut e, _clock) = engine(dir.path());
    assert_eq!(e.current("web1"), now, "no managed object lost");
    assert_eq!(
        e.history(None, 0, 1000).unwrap(),
        history,
        "no history lost"
    );
    assert_eq!(e.graph("web1", None).unwrap().text(), graph_text);
    assert_eq!(e.track_list("web1").len(), 1);
    // The engine goes on: cat (managed before the restart) writes and exits.
    let mut s = Sim::new(100_000_000_000);
    s.seq = 10_000;
    let cat = p(780, "cat");
    s.write(&cat, 1, &F::pipe(9900), 120);
    s.exit_group(&cat);
    let evs = feed(&mut e, &web1(), &s.records);
    assert_eq!(
        texts(&evs),
        [
            "+pipe pipe:[9900]  via write by 780 cat",
            "-process 780 cat (exit)"
        ]
    );
    assert!(evs.iter().all(|e| e.id > history.last().unwrap().id));
    // A new boot of the VM (new SMBIOS UUID): its pipes and processes are gone.
    let evs = e.on_record(&VmRef::new("web1", "another-boot"), &s.records[0]);
    assert_eq!(texts(&evs), ["-pipe pipe:[9900] (vm restarted)"]);
}

#[test]
fn a_corrupted_store_is_an_error_not_a_new_history() {
    // Not SQLite at all.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(diffusion::STORE_FILE), vec![0x5a; 8192]).unwrap();
    let err = DiffusionEngine::open(dir.path(), diffusion::Config::default())
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("is unreadable") && msg.contains("move it aside"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    assert_eq!(
        std::fs::read(dir.path().join(diffusion::STORE_FILE)).unwrap(),
        vec![0x5a; 8192],
        "left alone"
    );

    // A real store with damaged pages.
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut e, _clock) = engine(dir.path());
        e.track_add("web1", SECRET, &[]).unwrap();
        let mut s = Sim::new(1_000_000_000);
        for k in 0..20 {
            five_copies(&mut s, &p(700, "sh"), 10_000 + k * 10);
        }
        feed(&mut e, &web1(), &s.records);
    }
    let path = dir.path().join(diffusion::STORE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 3 * 4096, "{}", bytes.len());
    for b in &mut bytes[4096 + 100..3 * 4096] {
        *b = 0xa5;
    }
    std::fs::write(&path, bytes).unwrap();
    let err = DiffusionEngine::open(dir.path(), diffusion::Config::default())
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("is unreadable") && msg.contains("move it aside"),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
}

#[test]
fn limits_refuse_and_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = diffusion::Config {
        limits: diffusion::Limits {
            objects_per_vm: 4,
            ..diffusion::Limits::default()
        },
        ..diffusion::Config::default()
    };
    let (mut e, _clock) = engine_with(dir.path(), config);
    e.track_add("web1", SECRET, &[]).unwrap();
    let mut s = Sim::new(1_000_000_000);
    five_copies(&mut s, &p(700, "sh"), 773);
    let evs = feed(&mut e, &web1(), &s.records);
    let overflow: Vec<_> = texts(&evs)
        .into_iter()
        .filter(|t| t.starts_with("!overflow"))
        .collect();
    assert_eq!(
        overflow,
        ["!overflow managed objects: limit 4 reached, further ones are not tracked"]
    );
    assert!(e.current("web1").len() <= 4);
    let stats = e.stats("web1").unwrap();
    assert!(stats.objects_dropped > 0);
    assert_eq!(stats.records, s.records.len() as u64);
}

#[test]
fn interest_covers_the_rules() {
    let i = DiffusionEngine::interest();
    for name in [
        "read",
        "write",
        "openat",
        "execve",
        "exit_group",
        "clone3",
        "renameat2",
        "sendto",
        "recvfrom",
        "mmap",
    ] {
        assert!(
            i.syscalls.contains(events::syscalls::number(name).unwrap()),
            "{name}"
        );
    }
    for name in [
        "read", "write", "openat", "accept4", "connect", "mmap", "sendfile", "close",
    ] {
        assert!(
            i.fds.contains(events::syscalls::number(name).unwrap()),
            "{name}"
        );
    }
    assert!(!i
        .syscalls
        .contains(events::syscalls::number("getpid").unwrap()));
    assert!(!i.fds.contains(events::syscalls::number("execve").unwrap()));
}
