//! End-to-end: boot a lab guest (6.1 and 6.12 kernels, TCG) with the hook
//! plugin, record the kernel call flow of `openat` while the guest runs
//! `cat /etc/hostname`, and check the function_graph that comes out.
//!
//! Needs the lab images (`scripts/setup.sh`) and the plugin .so (built by
//! `cargo build --release -p hook-plugin`; built here if missing). One VM
//! at a time (the tests of this file take turns).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lab::{Flavour, UpOptions, Vm};
use labtest::{up_with_plugin, Down};
use xftrace::{Controller, Flow, Node, PluginState, Resolve};

/// One booted VM at a time across the tests of this binary.
static ONE_VM: Mutex<()> = Mutex::new(());

fn boot(tag: &str, flavour: Flavour) -> Down {
    let name = format!("xf-{tag}-{}", std::process::id());
    let mut opts = UpOptions::new(&name);
    opts.flavour = flavour;
    opts.cpus = 2;
    opts.network = false;
    Down(up_with_plugin(&opts))
}

fn run(vm: &Vm, argv: &[&str]) -> String {
    let out = vm.exec(argv).expect("agent exec");
    assert!(out.success(), "{argv:?}: {}", out.stderr_str());
    out.stdout_str()
}

/// Turns recording on for `syscalls` and waits until the plugin applied it
/// (it does at the guest's next syscall: a `true` in the guest makes one).
fn turn_on(vm: &Vm, c: &Controller, syscalls: &[&str]) {
    let change = c.turn_on(&xftrace::names::bitmap(syscalls).unwrap());
    if !c.wait_applied(change, Duration::from_secs(2)) {
        run(vm, &["true"]);
        assert!(
            c.wait_applied(change, Duration::from_secs(30)),
            "plugin never applied `on`"
        );
    }
    assert_eq!(c.status().state, Some(PluginState::Recording));
}

/// The first node (depth first) called `name`.
fn find<'a>(nodes: &'a [Node], names: &dyn Resolve, name: &str) -> Option<&'a Node> {
    for n in nodes {
        if names.resolve(n.target).label(n.target) == name {
            return Some(n);
        }
        if let Some(found) = find(&n.children, names, name) {
            return Some(found);
        }
    }
    None
}

fn check_openat(flavour: Flavour, tag: &str) {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let vm = boot(tag, flavour);
    let vm = &vm.0;
    let path = xftrace::file_in(&vm.info().state_dir);
    let c = Controller::open(&path).expect("lab VMs start the plugin with xftrace=");
    assert_eq!(c.status().state, Some(PluginState::Off));

    turn_on(vm, &c, &["sys_openat"]);
    let hostname = run(vm, &["cat", "/etc/hostname"]);
    assert_eq!(hostname.trim(), vm.name());
    let off = c.turn_off();
    let snap = c.snapshot();
    let st = c.status();
    assert_eq!(st.lost, 0, "{st:?}");
    assert!(snap.records.len() > 100, "{} records", snap.records.len());
    assert_eq!(snap.skipped, 0);

    // Names from the guest itself (kallsyms + KASLR slide, modules).
    let mem: Arc<dyn vmi::memory::PhysicalMemory> = Arc::new(vm.memory(false).unwrap());
    let names = xftrace::host::guest_names(mem, &vm.info().vmlinux).unwrap();
    assert_eq!(
        st.slide,
        names.symbolizer.slide(),
        "plugin and host agree on KASLR"
    );
    let trace = xftrace::build(&snap.records);
    let mut text = Vec::new();
    let written = xftrace::fgraph::write(
        &trace,
        &names.symbolizer,
        &xftrace::Preamble::default(),
        &mut text,
    )
    .unwrap();
    let text = String::from_utf8(text).unwrap();
    std::fs::write(
        std::env::temp_dir().join(format!("xftrace-{tag}-trace_graph.txt")),
        &text,
    )
    .unwrap();

    // Only openat was recorded: every flow is an openat, and no other
    // syscall's handler shows up anywhere.
    assert!(
        trace.flows.iter().all(|f| f.nr == 257),
        "{:?}",
        trace.flows.iter().map(Flow::name).collect::<Vec<_>>()
    );
    assert!(
        !text.contains("__x64_sys_read"),
        "an untraced syscall in the graph"
    );
    assert!(!text.contains("__x64_sys_getpid"));
    // cat's open of /etc/hostname: complete, result an fd.
    let cat: Vec<&Flow> = trace.flows.iter().filter(|f| f.comm == "cat").collect();
    assert!(!cat.is_empty(), "no openat of cat recorded");
    let flow = *cat.last().unwrap();
    assert!(
        flow.complete() && flow.result.is_some_and(|r| r >= 0),
        "{flow:?}"
    );
    // The kernel's openat path, nested: do_syscall_64 > ... > __x64_sys_openat
    // > do_sys_openat2 > do_filp_open > path_openat.
    let n = &names.symbolizer;
    assert!(find(&flow.calls, n, "do_syscall_64").is_some());
    let sys = find(&flow.calls, n, "__x64_sys_openat").expect("__x64_sys_openat in cat's flow");
    let openat2 = find(&sys.children, n, "do_sys_openat2").expect("do_sys_openat2 under it");
    let filp =
        find(&openat2.children, n, "do_filp_open").expect("do_filp_open under do_sys_openat2");
    let path_openat =
        find(&filp.children, n, "path_openat").expect("path_openat under do_filp_open");
    // Durations: each returned, the callee within its caller.
    for (outer, inner) in [(sys, openat2), (openat2, filp), (filp, path_openat)] {
        let (o, i) = (outer.duration_ns.unwrap(), inner.duration_ns.unwrap());
        assert!(i > 0 && i <= o, "{i} ns inside {o} ns");
    }
    // The text: function_graph layout with durations, nested lines.
    assert!(text.starts_with("# tracer: function_graph\n"));
    assert!(text.contains(&format!("comm=\"cat\" task={:#x}", flow.task)));
    // The function column (after `|`) of each line, and its indentation.
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('|').map(|(_, f)| f))
        .collect();
    let indent = |f: &str| f.len() - f.trim_start().len();
    let at = lines
        .iter()
        .position(|f| f.trim() == "do_sys_openat2() {")
        .expect("a `do_sys_openat2() {` line");
    assert_eq!(lines[at - 1].trim(), "__x64_sys_openat() {");
    assert_eq!(
        indent(lines[at - 1]) + 2,
        indent(lines[at]),
        "nested by two spaces"
    );
    // A leaf: `CPU)  DURATION us    |  name();` on whichever vCPU cat ran,
    // with a duration of any size (Ftrace's overhead marks included).
    let leaf = |l: &str| -> bool {
        let Some((cpu, rest)) = l.split_once(')') else {
            return false;
        };
        let Some((time, func)) = rest.split_once('|') else {
            return false;
        };
        cpu.trim().parse::<u32>().is_ok()
            && time.trim_end().ends_with(" us")
            && time
                .trim()
                .trim_start_matches(['+', '!', '#', '*', '@', '$'])
                .trim()
                .trim_end_matches(" us")
                .parse::<f64>()
                .is_ok()
            && func.ends_with("();")
    };
    assert!(text.lines().any(leaf), "leaf lines with durations:\n{text}");
    assert!(text.contains("|  do_syscall_64() {"));
    // A clean guest calls nothing outside kernel and module text.
    assert!(written.flagged.is_empty(), "{:?}", written.flagged);
    assert!(written.calls > 100);

    // Once off is applied, nothing more is recorded (the next syscall
    // applies it: retranslation without call/ret instrumentation).
    run(vm, &["true"]);
    assert!(c.wait_applied(off, Duration::from_secs(30)));
    assert_eq!(c.status().state, Some(PluginState::Off));
    let before = c.status();
    run(vm, &["cat", "/etc/hostname"]);
    let after = c.status();
    assert_eq!(
        (after.written, after.entries),
        (before.written, before.entries)
    );

    // A second recording compared with the first as its baseline: the same
    // workload shows no call outside known text.
    turn_on(vm, &c, &["openat"]);
    run(vm, &["cat", "/etc/hostname"]);
    c.turn_off();
    let again = xftrace::build(&c.snapshot().records);
    let mut text2 = Vec::new();
    xftrace::fgraph::write(
        &again,
        &names.symbolizer,
        &xftrace::Preamble::default(),
        &mut text2,
    )
    .unwrap();
    let base = xftrace::fgraph::parse(&text).unwrap();
    let new = xftrace::fgraph::parse(&String::from_utf8(text2).unwrap()).unwrap();
    assert!(new.iter().any(|f| f.functions.contains("path_openat")));
    let findings = xftrace::compare(&base, &new);
    assert!(
        findings
            .iter()
            .all(|f| matches!(f, xftrace::Finding::NewFunction { .. })),
        "{findings:?}"
    );
}

#[test]
fn openat_call_flow_stable_6_1() {
    check_openat(Flavour::Stable, "s");
}

#[test]
fn openat_call_flow_backports_6_12() {
    check_openat(Flavour::Backports, "b");
}
