//! xftrace sees a syscall hook: the kernel call flow of getdents64, recorded
//! by the plugin, before and after the test rootkit `rk_syscall`
//! (guest/kmods) hooks it. After insmod, `ls`'s flow goes through the
//! module's handler (at the address the module printed in dmesg), named
//! `hook_getdents64 [rk_syscall]` in trace_graph.txt, and comparing the flow
//! with the clean baseline reports that function as new.

use std::sync::Arc;
use std::time::Duration;

use lab::vm::ExecOptions;
use lab::{Flavour, UpOptions, Vm};
use xftrace::{Controller, Finding, Resolve};

struct TestVm(Vm);

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec_sh(script).expect("agent exec");
    assert!(out.success(), "`{script}`: {}", out.stderr_str());
    out.stdout_str()
}

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

/// The plugin next to the test binary (target/release/libhook_plugin.so).
fn plugin_path() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let so = dir.join("libhook_plugin.so");
    if !so.exists() {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "hook-plugin"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "cargo build -p hook-plugin"
        );
    }
    so
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
    std::env::set_var("VMWATCH_HOOK_PLUGIN", plugin_path());
    let mut opts = UpOptions::new(&format!("xf-rk{tag}-{}", std::process::id()));
    opts.flavour = flavour;
    opts.network = false;
    let vm = TestVm(Vm::up(&opts).expect("boot (run scripts/setup.sh)"));
    let vm = &vm.0;
    let ko = lab::util::cache_dir()
        .join("kmods")
        .join(&vm.info().kernel_release)
        .join("rk_syscall.ko");
    let bytes = std::fs::read(&ko)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-kmods.sh", ko.display()));
    let out = vm
        .exec_with(
            &["/bin/sh", "-c", "cat > /root/rk_syscall.ko"],
            &ExecOptions {
                stdin: Some(bytes),
                ..ExecOptions::default()
            },
        )
        .unwrap();
    assert!(out.success());
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
