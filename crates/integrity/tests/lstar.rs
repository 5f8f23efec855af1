//! The syscall entry MSR (LSTAR), which no QEMU monitor command shows: the
//! hook plugin samples where the guest's `syscall` instruction enters the
//! kernel, and the scan compares it with `entry_SYSCALL_64`. The test
//! rootkit `rk_lstar` (guest/kmods) points LSTAR at a stub in the module;
//! ground truth is the stub address it prints. Needs `pti=off` (the stub runs
//! before the kernel's page-table switch).

use std::sync::Arc;
use std::time::Duration;

use integrity::{Baseline, Check, CpuState, Report};
use lab::vm::ExecOptions;
use lab::{Flavour, Pti, UpOptions, Vm};
use vmi::linux::{KernelProfile, LinuxGuest};

struct Down(Vm);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

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

fn sh(vm: &Vm, script: &str) -> String {
    let out = vm
        .exec_with(
            &["/bin/sh", "-c", script],
            &ExecOptions {
                timeout: Duration::from_secs(120),
                ..ExecOptions::default()
            },
        )
        .expect("agent exec");
    assert!(out.success(), "`{script}`: {}", out.stderr_str());
    out.stdout_str()
}

/// Makes the guest issue well over one sampling period of syscalls.
fn busy(vm: &Vm) {
    sh(
        vm,
        "python3 -c 'import os\nfor _ in range(20000): os.getppid()'",
    );
}

fn lstar_is_checked(flavour: Flavour, tag: &str) {
    std::env::set_var("VMWATCH_HOOK_PLUGIN", plugin_path());
    let mut opts = UpOptions::new(&format!("t-lstar{tag}-{}", std::process::id()));
    opts.flavour = flavour;
    opts.pti = Pti::Off;
    opts.network = false;
    let vm = Down(Vm::up(&opts).expect("boot (run scripts/setup.sh)"));
    let vm = &vm.0;
    let ring = vm
        .info()
        .ring
        .clone()
        .expect("lab VMs load the hook plugin");
    let image = vmi::image::KernelImage::open(&vm.info().vmlinux).unwrap();
    let profile = Arc::new(KernelProfile::from_image(&image).unwrap());
    let base = Baseline::new(&image, Arc::clone(&profile)).unwrap();
    let guest = LinuxGuest::attach(Arc::new(vm.memory(false).unwrap()), profile).unwrap();
    let scan = || -> Report {
        let cpus = CpuState {
            idt_bases: Vec::new(),
            syscall_entry: events::peek_syscall_entry(&ring).unwrap(),
        };
        integrity::scan(&base, &guest, &cpus)
    };
    let ko = lab::util::cache_dir()
        .join("kmods")
        .join(&vm.info().kernel_release)
        .join("rk_lstar.ko");
    let bytes = std::fs::read(&ko)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/build-kmods.sh", ko.display()));
    let out = vm
        .exec_with(
            &["/bin/sh", "-c", "cat > /root/rk_lstar.ko"],
            &ExecOptions {
                stdin: Some(bytes),
                ..ExecOptions::default()
            },
        )
        .unwrap();
    assert!(out.success());

    // Clean: sampled, and it is entry_SYSCALL_64.
    busy(vm);
    let r = scan();
    assert!(
        r.coverage.syscall_entry_samples > 0,
        "no sample of the syscall entry"
    );
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    let before = r.coverage.syscall_entry_samples;

    sh(vm, "insmod /root/rk_lstar.ko");
    let line = sh(vm, "dmesg | grep 'rk_lstar: hooked'");
    let at = line.find("stub=").unwrap() + 5;
    let stub = u64::from_str_radix(&line[at..at + 16], 16).unwrap();
    busy(vm);
    let r = scan();
    assert!(r.coverage.syscall_entry_samples > before);
    let f: Vec<_> = r
        .findings
        .iter()
        .filter(|f| f.check == Check::SyscallEntry)
        .collect();
    assert_eq!(f.len(), 1, "{:?}", r.findings);
    assert_eq!(f[0].actual.as_ref().unwrap().addr, stub);
    assert_eq!(f[0].module.as_deref(), Some("rk_lstar"));
    let want = base.profile.symbols.address_of("entry_SYSCALL_64").unwrap()
        + guest.location().virtual_slide;
    assert_eq!(f[0].expected.as_ref().unwrap().addr, want);

    sh(vm, "rmmod rk_lstar");
    busy(vm);
    let r = scan();
    assert!(r.findings.is_empty(), "after rmmod: {:?}", r.findings);
}

#[test]
fn lstar_redirect_is_found_on_6_1() {
    lstar_is_checked(Flavour::Stable, "s");
}

#[test]
fn lstar_redirect_is_found_on_6_12() {
    lstar_is_checked(Flavour::Backports, "b");
}
