//! The syscall entry MSRs (LSTAR, SYSENTER_EIP, CSTAR), which no QEMU
//! monitor command shows: the hook plugin samples where the guest's
//! `syscall` instruction enters the kernel and sees every kernel `wrmsr`, and
//! the scan compares both with the kernel's entry symbols. The test rootkit
//! `rk_lstar` (guest/kmods) points one MSR (`msr=`) at a stub in the module;
//! ground truth is what it prints: the stub and the value it read with
//! `rdmsr` before. Needs `pti=off` (the LSTAR stub runs before the kernel's
//! page-table switch).

use std::sync::Arc;

use events::EntryMsr;
use integrity::{Baseline, Check, CpuState, Report};
use lab::{Flavour, Pti, UpOptions, Vm};
use labtest::{copy_kmod, sh, up_with_plugin, Down};
use vmi::linux::{KernelProfile, LinuxGuest};

/// Makes the guest issue well over one sampling period of syscalls.
fn busy(vm: &Vm) {
    sh(
        vm,
        "python3 -c 'import os\nfor _ in range(20000): os.getppid()'",
    );
}

fn lstar_is_checked(flavour: Flavour, tag: &str) {
    let mut opts = UpOptions::new(&format!("t-lstar{tag}-{}", std::process::id()));
    opts.flavour = flavour;
    opts.pti = Pti::Off;
    opts.network = false;
    let vm = Down(up_with_plugin(&opts));
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
            entry_msrs: Some(events::peek_entry_msrs(&ring).unwrap()),
        };
        integrity::scan(&base, &guest, &cpus)
    };
    let msrs = || events::peek_entry_msrs(&ring).unwrap();
    copy_kmod(vm, "rk_lstar");
    let vcpus: usize = sh(vm, "nproc").trim().parse().unwrap();
    let slide = guest.location().virtual_slide;
    let symbol = |name: &str| base.profile.symbols.address_of(name).unwrap() + slide;

    // Clean: sampled, every vCPU's boot-time writes seen, and they are the
    // kernel's entries.
    busy(vm);
    let r = scan();
    assert!(
        r.coverage.syscall_entry_samples > 0,
        "no sample of the syscall entry"
    );
    assert!(r.coverage.entry_msr_writes >= vcpus as u64 * 2);
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    let clean = msrs();
    for cpu in 0..vcpus {
        assert_eq!(
            clean.values[cpu][EntryMsr::Lstar.slot()],
            symbol("entry_SYSCALL_64")
        );
        assert_eq!(
            clean.values[cpu][EntryMsr::SysenterEip.slot()],
            symbol("entry_SYSENTER_compat")
        );
    }
    let before = r.coverage.syscall_entry_samples;

    // Each MSR in turn: every vCPU's value found, named and located; the
    // `old=` the module read with rdmsr is what the plugin saw written.
    for (param, msr) in [
        ("lstar", EntryMsr::Lstar),
        ("sysenter", EntryMsr::SysenterEip),
        ("cstar", EntryMsr::Cstar),
    ] {
        sh(
            vm,
            &format!("dmesg -C; insmod /root/rk_lstar.ko msr={param}"),
        );
        let line = sh(vm, &format!("dmesg | grep 'rk_lstar: hooked {param}'"));
        let hex = |key: &str| {
            let at = line.find(key).unwrap() + key.len();
            u64::from_str_radix(&line[at..at + 16], 16).unwrap()
        };
        let (stub, old) = (hex("stub="), hex("old="));
        let vcpu0 = clean.values[0][msr.slot()];
        assert_eq!(
            old, vcpu0,
            "{param}: the guest's rdmsr vs the plugin's view"
        );
        if msr == EntryMsr::Lstar {
            busy(vm);
        }
        let r = scan();
        let f: Vec<_> = r
            .findings
            .iter()
            .filter(|f| f.check == Check::SyscallEntry)
            .collect();
        let sampled = usize::from(msr == EntryMsr::Lstar);
        assert_eq!(f.len(), vcpus + sampled, "{param}: {:?}", r.findings);
        assert_eq!(r.findings.len(), f.len(), "{param}: {:?}", r.findings);
        for f in &f {
            assert_eq!(f.actual.as_ref().unwrap().addr, stub, "{f}");
            assert_eq!(f.module.as_deref(), Some("rk_lstar"), "{f}");
        }
        let per_cpu: Vec<_> = f
            .iter()
            .filter(|f| f.object.starts_with(msr.name()))
            .collect();
        assert_eq!(per_cpu.len(), vcpus, "{param}: {:?}", r.findings);
        // Who wrote it: the module's own `wrmsr`.
        assert!(per_cpu[0].detail.contains("[rk_lstar]"), "{}", per_cpu[0]);
        if msr != EntryMsr::Cstar || vcpu0 != 0 {
            assert_eq!(per_cpu[0].expected.as_ref().unwrap().addr, vcpu0);
        }
        if msr == EntryMsr::Lstar {
            assert!(r.coverage.syscall_entry_samples > before);
            let want = symbol("entry_SYSCALL_64");
            assert!(f.iter().all(|f| f.expected.as_ref().unwrap().addr == want));
        }

        sh(vm, "rmmod rk_lstar");
        if msr == EntryMsr::Lstar {
            busy(vm);
        }
        let r = scan();
        assert!(
            r.findings.is_empty(),
            "after rmmod ({param}): {:?}",
            r.findings
        );
        for cpu in 0..vcpus {
            assert_eq!(
                msrs().values[cpu][msr.slot()],
                clean.values[cpu][msr.slot()]
            );
        }
    }
}

#[test]
fn lstar_redirect_is_found_on_6_1() {
    lstar_is_checked(Flavour::Stable, "s");
}

#[test]
fn lstar_redirect_is_found_on_6_12() {
    lstar_is_checked(Flavour::Backports, "b");
}
