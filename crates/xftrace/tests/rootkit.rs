//! xftrace sees a syscall hook: the kernel call flow of getdents64, recorded
//! by the plugin, before and after the test rootkit `rk_syscall`
//! (guest/kmods) hooks it. After insmod, `ls`'s flow goes through the
//! module's handler (at the address the module printed in dmesg), named
//! `hook_getdents64 [rk_syscall]` in trace_graph.txt, and comparing the flow
//! with the clean baseline reports that function as new.

use std::sync::Arc;
use std::time::Duration;

use lab::{Flavour, UpOptions, Vm};
use labtest::{copy_kmod, sh, up_with_plugin, Down};
use xftrace::{Controller, Finding, Resolve};

/// Records getdents64 while the guest lists /tmp; returns the graph text.
fn record(vm: &Vm, c: &Controller, names: &xftrace::host::GuestNames) -> String {
    let change = c.turn_on(&xftrace::names::bitmap(&["sys_getdents64"]).unwrap());
    sh(vm, "true");
    assert!(
        c.wait_applied(change, Duration::from_secs(30)),
        "plugin never applied `on`"
    );
    sh(vm, "ls /tmp > /dev/null");
    let off = c.turn_off();
    sh(vm, "true");
    assert!(c.wait_applied(off, Duration::from_secs(30)));
    let trace = xftrace::build(&c.snapshot().records);
    let mut text = Vec::new();
    xftrace::fgraph::write(
        &trace,
        &names.symbolizer,
        &xftrace::Preamble::default(),
        &mut text,
    )
    .unwrap();
    String::from_utf8(text).unwrap()
}

#[test]
fn the_syscall_rootkit_shows_in_the_getdents64_call_flow_6_1() {
    rootkit_in_flow(Flavour::Stable, "s");
}

#[test]
fn the_syscall_rootkit_shows_in_the_getdents64_call_flow_6_12() {
    rootkit_in_flow(Flavour::Backports, "b");
}

fn rootkit_in_flow(flavour: Flavour, tag: &str) {
    let mut opts = UpOptions::new(&format!("xf-rk{tag}-{}", std::process::id()));
    opts.flavour = flavour;
    opts.network = false;
    let vm = Down(up_with_plugin(&opts));
    let vm = &vm.0;
    copy_kmod(vm, "rk_syscall");
    let c = Controller::open(&xftrace::file_in(&vm.info().state_dir)).expect("xftrace file");
    let mem: Arc<dyn vmi::memory::PhysicalMemory> = Arc::new(vm.memory(false).unwrap());

    let names = xftrace::host::guest_names(Arc::clone(&mem), &vm.info().vmlinux).unwrap();
    let clean = record(vm, &c, &names);
    assert!(clean.contains("__x64_sys_getdents64() {"), "{clean}");
    assert!(!clean.contains("rk_syscall"));

    sh(vm, "touch /tmp/rkhide_x; insmod /root/rk_syscall.ko");
    assert_eq!(
        sh(vm, "ls /tmp | grep -c rkhide_ || true").trim(),
        "0",
        "the rootkit hides files"
    );
    let line = sh(vm, "dmesg | grep 'rk_syscall: hooked'");
    let at = line
        .find("hook_getdents64=")
        .expect("hook address in dmesg")
        + "hook_getdents64=".len();
    let hook = u64::from_str_radix(&line[at..at + 16], 16).unwrap();
    // Names again: the module list changed.
    let names = xftrace::host::guest_names(mem, &vm.info().vmlinux).unwrap();
    assert_eq!(
        names.symbolizer.resolve(hook).label(hook),
        "hook_getdents64 [rk_syscall]"
    );
    let hooked = record(vm, &c, &names);
    std::fs::write(
        std::env::temp_dir().join(format!("xftrace-rootkit-{tag}-trace_graph.txt")),
        &hooked,
    )
    .unwrap();
    assert!(
        hooked.contains("hook_getdents64 [rk_syscall]() {"),
        "{hooked}"
    );

    let base = xftrace::fgraph::parse(&clean).unwrap();
    let now = xftrace::fgraph::parse(&hooked).unwrap();
    let findings = xftrace::compare(&base, &now);
    assert!(
        findings.iter().any(|f| matches!(f, Finding::NewFunction { function, .. } if function == "hook_getdents64 [rk_syscall]")),
        "{findings:?}"
    );
}
