//! End to end: the project's test rootkits (guest/kmods, built by
//! scripts/build-kmods.sh for each lab kernel) loaded with insmod in a lab
//! guest, each detected, named and located by a scan of guest memory; and a
//! clean guest, idle and busy, gives zero findings. Ground truth comes from
//! the guest: what the rootkit visibly does (hidden files, uname, /proc) and
//! the addresses it prints in dmesg.

use std::sync::Arc;
use std::time::{Duration, Instant};

use integrity::{Baseline, Check, CpuState, Finding, Report};
use lab::{Flavour, UpOptions, Vm};
use labtest::{kmod_bytes, put_file};
use vmi::linux::{KernelProfile, LinuxGuest};

struct Lab {
    vm: Vm,
    guest: LinuxGuest,
    base: Baseline,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.vm.down();
    }
}

fn boot(tag: &str, flavour: Flavour) -> Lab {
    let name = format!("t-rk{tag}-{}", std::process::id());
    let mut opts = UpOptions::new(&name);
    opts.flavour = flavour;
    opts.hook = false;
    opts.network = false;
    let vm = labtest::up(&opts);
    let image = vmi::image::KernelImage::open(&vm.info().vmlinux).expect("vmlinux");
    let profile = Arc::new(KernelProfile::from_image(&image).expect("profile"));
    let base = Baseline::new(&image, Arc::clone(&profile)).expect("baseline");
    let mem = Arc::new(vm.memory(false).expect("guest RAM"));
    let guest = LinuxGuest::attach(mem, profile).expect("attach");
    for m in [
        "rk_syscall",
        "rk_ftrace",
        "rk_inline",
        "rk_seqops",
        "rk_pdeops",
        "rk_idt",
        "rk_hide",
    ] {
        put_file(
            &vm,
            &format!("/root/{m}.ko"),
            kmod_bytes(&vm, m),
            Duration::from_secs(60),
        );
    }
    Lab { vm, guest, base }
}

impl Lab {
    fn sh(&self, script: &str) -> String {
        labtest::sh(&self.vm, script)
    }

    fn scan(&self) -> Report {
        // The IDT register of each vCPU from the monitor, as vmwatchd does.
        let cpus = CpuState {
            idt_bases: self
                .vm
                .qmp()
                .and_then(|mut q| q.idt_bases())
                .expect("info registers"),
            // Without the hook plugin (this VM has none) the entry is unknown.
            syscall_entry: None,
            entry_msrs: None,
        };
        assert!(!cpus.idt_bases.is_empty());
        let r = integrity::scan(&self.base, &self.guest, &cpus);
        for w in &r.warnings {
            eprintln!("scan warning: {w}");
        }
        r
    }

    fn assert_clean(&self, when: &str) {
        let r = self.scan();
        let list: Vec<String> = r.findings.iter().map(|f| f.to_string()).collect();
        assert!(
            list.is_empty(),
            "{when}: findings on a clean guest:\n{}",
            list.join("\n")
        );
        assert!(
            r.coverage.syscall_entries > 300 && r.coverage.text_bytes > 8 << 20,
            "{when}: {:?}",
            r.coverage
        );
        // Every listed module is also found by the memory scan and in sysfs.
        assert_eq!(
            r.coverage.modules_in_memory, r.coverage.modules_listed,
            "{when}: {:?}",
            r.coverage
        );
        assert_eq!(
            r.coverage.modules_in_sysfs, r.coverage.modules_listed,
            "{when}: {:?}",
            r.coverage
        );
        // /proc's root (2 pointers) and at least init_net's tcp, udp and
        // unix entries (2 each).
        assert!(
            r.coverage.data_pointers >= 2 + 2 * 3,
            "{when}: {:?}",
            r.coverage
        );
        assert!(
            r.coverage.pids_in_namespace >= r.coverage.tasks_listed,
            "{when}: {:?}",
            r.coverage
        );
    }

    /// The module's `hooked` line from dmesg (waiting up to 10 s for it).
    fn hooked_line(&self, module: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let d = self.sh("dmesg");
            if let Some(l) = d
                .lines()
                .rev()
                .find(|l| l.contains(&format!("{module}: hooked")))
            {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no `{module}: hooked` line in dmesg:\n{d}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The hex address after `key` in a dmesg line (`%px`: no 0x).
fn addr_after(line: &str, key: &str) -> u64 {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("no `{key}` in {line}"))
        + key.len()..];
    let hex: String = rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    u64::from_str_radix(&hex, 16).unwrap_or_else(|_| panic!("no address after `{key}` in {line}"))
}

fn describe(fs: &[Finding]) -> String {
    fs.iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The scan's one finding, which must be of `check`.
fn only_finding(r: &Report, check: Check) -> &Finding {
    assert_eq!(checks_of(r), vec![check], "{}", describe(&r.findings));
    assert_eq!(r.findings.len(), 1, "{}", describe(&r.findings));
    &r.findings[0]
}

fn checks_of(r: &Report) -> Vec<Check> {
    let mut v: Vec<Check> = r.findings.iter().map(|f| f.check).collect();
    v.dedup();
    v
}

fn rootkits_are_found(flavour: Flavour, tag: &str) {
    let lab = boot(tag, flavour);
    lab.assert_clean("after boot");

    // A busy guest: processes, files, sockets, module listing; still clean.
    lab.sh("(i=0; while [ $i -lt 400 ]; do ls -R /usr/lib >/dev/null; cat /proc/net/tcp /proc/modules >/dev/null; python3 -c 'import os; os.listdir(\"/proc\")'; echo x > /tmp/f$i; rm /tmp/f$i; i=$((i+1)); done) >/dev/null 2>&1 & echo $! > /tmp/busy");
    for i in 0..5 {
        lab.assert_clean(&format!("busy workload, scan {i}"));
        std::thread::sleep(Duration::from_millis(300));
    }
    lab.sh("kill $(cat /tmp/busy) 2>/dev/null; true");

    // 1. Syscall hooks: sys_call_table on 6.1 (also patched there: this 6.1
    //    dispatches through x64_sys_call too), x64_sys_call's calls on both.
    lab.sh("touch /tmp/rkhide_secret /tmp/visible; insmod /root/rk_syscall.ko");
    let line = lab.hooked_line("rk_syscall");
    assert_eq!(
        lab.sh("ls /tmp | grep -c rkhide_ || true").trim(),
        "0",
        "the rootkit hides the file"
    );
    let getdents = addr_after(&line, "hook_getdents64=");
    let kill = addr_after(&line, "hook_kill=");
    let r = lab.scan();
    let by = |check: Check, name: &str, addr: u64| {
        r.findings.iter().any(|f| {
            f.check == check
                && f.object.contains(name)
                && f.actual.as_ref().is_some_and(|a| a.addr == addr)
                && f.module.as_deref() == Some("rk_syscall")
        })
    };
    assert!(
        by(Check::SyscallDispatch, "__x64_sys_getdents64", getdents),
        "{}",
        describe(&r.findings)
    );
    // The module's own symbol table names the handler.
    assert!(
        r.findings.iter().any(|f| f.actual.as_ref().is_some_and(|a| a.addr == getdents
            && matches!(&a.owner, integrity::Owner::Module { name, symbol: Some(sym), hidden: false, .. }
                if name == "rk_syscall" && sym == "hook_getdents64"))),
        "{}",
        describe(&r.findings)
    );
    assert!(
        by(Check::SyscallDispatch, "__x64_sys_kill", kill),
        "{}",
        describe(&r.findings)
    );
    if flavour == Flavour::Stable {
        assert!(
            by(
                Check::SyscallTable,
                "sys_call_table[217] (getdents64)",
                getdents
            ),
            "{}",
            describe(&r.findings)
        );
        assert!(
            by(Check::SyscallTable, "sys_call_table[62] (kill)", kill),
            "{}",
            describe(&r.findings)
        );
        assert_eq!(
            checks_of(&r),
            vec![Check::SyscallTable, Check::SyscallDispatch],
            "{}",
            describe(&r.findings)
        );
    } else {
        assert_eq!(
            checks_of(&r),
            vec![Check::SyscallDispatch],
            "{}",
            describe(&r.findings)
        );
    }
    lab.sh("rmmod rk_syscall");
    lab.assert_clean("after rmmod rk_syscall");
    assert_eq!(
        lab.scan().coverage.modules_in_memory,
        lab.scan().coverage.modules_listed
    );

    // 2. An ftrace hook on getdents64.
    lab.sh("touch /tmp/rkftr_x; insmod /root/rk_ftrace.ko");
    let line = lab.hooked_line("rk_ftrace");
    assert_eq!(lab.sh("ls /tmp | grep -c rkftr_ || true").trim(), "0");
    let callback = addr_after(&line, "callback=");
    let r = lab.scan();
    assert_eq!(
        checks_of(&r),
        vec![Check::Ftrace],
        "{}",
        describe(&r.findings)
    );
    assert!(
        r.findings
            .iter()
            .any(|f| f.object.contains("__x64_sys_getdents64")
                && f.actual.as_ref().is_some_and(|a| a.addr == callback)
                && f.module.as_deref() == Some("rk_ftrace")),
        "{}",
        describe(&r.findings)
    );
    lab.sh("rmmod rk_ftrace");
    lab.assert_clean("after rmmod rk_ftrace");

    // 3. An inline patch of a function's first bytes (over its ftrace nop).
    lab.sh("insmod /root/rk_inline.ko");
    let line = lab.hooked_line("rk_inline");
    assert_eq!(lab.sh("uname -n").trim(), "rk-inline-owned");
    let target = addr_after(&line, "->jmp ");
    let r = lab.scan();
    assert_eq!(
        checks_of(&r),
        vec![Check::InlineHook],
        "{}",
        describe(&r.findings)
    );
    assert!(
        r.findings
            .iter()
            .any(|f| f.object.starts_with("__x64_sys_newuname")
                && f.actual.as_ref().is_some_and(|a| a.addr == target)
                && f.module.as_deref() == Some("rk_inline")),
        "{}",
        describe(&r.findings)
    );
    lab.sh("rmmod rk_inline");
    lab.assert_clean("after rmmod rk_inline");

    // 3b. The first return site at or after __x64_sys_newuname (a byte
    //     range the kernel itself rewrites at boot; the compiler may have
    //     made newuname a tail call, so it can be the next function's) made
    //     a jmp into the module; uname works on.
    lab.sh("insmod /root/rk_inline.ko at=return");
    let line = lab.hooked_line("rk_inline");
    assert!(line.contains("hooked newuname return"), "{line}");
    let site = addr_after(&line, "@");
    let stub = addr_after(&line, "->jmp ");
    assert!(!lab.sh("uname -n").trim().is_empty());
    let r = lab.scan();
    let f = only_finding(&r, Check::InlineHook);
    assert!(f.object.ends_with("(patch site)"), "{f}");
    assert_eq!(f.location, site, "{f}");
    assert_eq!(f.actual.as_ref().map(|a| a.addr), Some(stub), "{f}");
    assert_eq!(f.module.as_deref(), Some("rk_inline"), "{f}");
    assert!(r.coverage.patch_sites > 1000, "{:?}", r.coverage);
    lab.sh("rmmod rk_inline");
    lab.assert_clean("after rmmod rk_inline at=return");

    // 4. tcp4's seq_operations.show and /proc's iterate_shared swapped.
    let pid = lab
        .sh("nc.openbsd -4 -k -l 31337 >/dev/null 2>&1 & echo $!")
        .trim()
        .to_string();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lab.sh("grep -c :7A69 /proc/net/tcp || true").trim(), "1");
    lab.sh(&format!(
        "insmod /root/rk_seqops.ko port=31337 hide_pid={pid}"
    ));
    let line = lab.hooked_line("rk_seqops");
    assert_eq!(
        lab.sh("grep -c :7A69 /proc/net/tcp || true").trim(),
        "0",
        "socket hidden"
    );
    assert_eq!(
        lab.sh(&format!("ls /proc | grep -cx {pid} || true")).trim(),
        "0",
        "process hidden"
    );
    let show = addr_after(&line, "tcp4_seq_ops.show@");
    let iterate = addr_after(&line, "proc_root_operations.iterate_shared@");
    let r = lab.scan();
    assert_eq!(
        checks_of(&r),
        vec![Check::OpsPointer],
        "{}",
        describe(&r.findings)
    );
    for (slot, name) in [(show, "tcp4_seq_ops+"), (iterate, "proc_root_operations+")] {
        assert!(
            r.findings.iter().any(|f| f.location == slot
                && f.object.starts_with(name)
                && f.module.as_deref() == Some("rk_seqops")),
            "{name} at {slot:#x}:\n{}",
            describe(&r.findings)
        );
    }
    lab.sh("rmmod rk_seqops");
    lab.assert_clean("after rmmod rk_seqops");

    // 4b. The same socket hidden through init_net's /proc/net/tcp entry: its
    //     seq_ops pointer (heap memory) swapped for a module-made table;
    //     rodata untouched. The module needs two offsets from the BTF.
    assert_eq!(lab.sh("grep -c :7A69 /proc/net/tcp || true").trim(), "1");
    let o = &lab.base.offsets;
    let pde_delta = o.proc_inode_pde.unwrap() as i64 - o.proc_inode_vfs_inode.unwrap() as i64;
    lab.sh(&format!(
        "insmod /root/rk_pdeops.ko port=31337 pde_delta={pde_delta} seq_ops_off={}",
        o.pde_seq_ops.unwrap()
    ));
    let line = lab.hooked_line("rk_pdeops");
    assert_eq!(
        lab.sh("grep -c :7A69 /proc/net/tcp || true").trim(),
        "0",
        "socket hidden"
    );
    let slot = addr_after(&line, "seq_ops@");
    let new = addr_after(&line, "->");
    let r = lab.scan();
    let f = only_finding(&r, Check::DataPointer);
    assert_eq!(f.object, "/proc/net/tcp seq_ops (init_net)");
    assert_eq!(f.location, slot);
    assert_eq!(f.actual.as_ref().map(|a| a.addr), Some(new));
    assert_eq!(f.module.as_deref(), Some("rk_pdeops"));
    let want = lab.base.profile.symbols.address_of("tcp4_seq_ops").unwrap()
        + lab.guest.location().virtual_slide;
    assert_eq!(f.expected.as_ref().map(|e| e.addr), Some(want));
    lab.sh("rmmod rk_pdeops");
    assert_eq!(lab.sh("grep -c :7A69 /proc/net/tcp || true").trim(), "1");
    lab.assert_clean("after rmmod rk_pdeops");

    // 5. The IDT: a gate of idt_table redirected, then the IDT register
    //    moved to a modified copy.
    lab.sh("insmod /root/rk_idt.ko");
    let line = lab.hooked_line("rk_idt");
    let handler = addr_after(&line, "handler=");
    let r = lab.scan();
    assert_eq!(checks_of(&r), vec![Check::Idt], "{}", describe(&r.findings));
    assert!(
        r.findings.iter().any(|f| f.object == "IDT vector 0x81"
            && f.actual.as_ref().is_some_and(|a| a.addr == handler)
            && f.module.as_deref() == Some("rk_idt")),
        "{}",
        describe(&r.findings)
    );
    lab.sh("rmmod rk_idt");
    lab.assert_clean("after rmmod rk_idt");
    lab.sh("insmod /root/rk_idt.ko mode=lidt");
    let line = lab.hooked_line("rk_idt");
    assert!(line.contains("mode=lidt"), "{line}");
    let table = addr_after(&line, "idt=");
    let r = lab.scan();
    assert_eq!(checks_of(&r), vec![Check::Idt], "{}", describe(&r.findings));
    assert!(
        r.findings
            .iter()
            .any(|f| f.object == "IDT register of CPU 0"
                && f.actual.as_ref().is_some_and(|a| a.addr == table)),
        "{}",
        describe(&r.findings)
    );
    lab.sh("rmmod rk_idt");
    lab.assert_clean("after rmmod rk_idt (lidt)");

    // 6. A module that unlinks itself (list and sysfs), also hides the
    //    loaded rk_syscall the same way, and unlinks a process from the task
    //    list. Neither module can be removed: last. The syscall hooks are
    //    still named after rk_syscall, found only in module memory.
    lab.sh("insmod /root/rk_syscall.ko");
    let line = lab.hooked_line("rk_syscall");
    let getdents = addr_after(&line, "hook_getdents64=");
    // A process that keeps running: the scheduler must hold it, so it is on
    // a run queue as well as in the pid namespace.
    let victim = lab
        .sh("sh -c 'while :; do :; done' >/dev/null 2>&1 & echo $!")
        .trim()
        .parse::<i32>()
        .unwrap();
    let victim_comm = lab
        .sh(&format!("cat /proc/{victim}/comm"))
        .trim()
        .to_string();
    lab.sh(&format!(
        "insmod /root/rk_hide.ko pid={victim} also=rk_syscall"
    ));
    let line = lab.hooked_line("rk_hide");
    assert!(line.contains("also=rk_syscall"), "{line}");
    assert_eq!(lab.sh("grep -c rk_ /proc/modules || true").trim(), "0");
    assert_eq!(lab.sh("ls /sys/module | grep -c rk_ || true").trim(), "0");
    assert_eq!(
        lab.sh("ls /tmp | grep -c rkhide_ || true").trim(),
        "0",
        "rk_syscall still hides files"
    );
    lab.sh(&format!("kill -0 {victim}"));
    // The guest's own view: runnable.
    let stat = lab.sh(&format!("cat /proc/{victim}/stat"));
    assert_eq!(
        stat.rsplit(')').next().unwrap().split_whitespace().next(),
        Some("R"),
        "{stat}"
    );
    let r = lab.scan();
    let mut want = vec![
        Check::SyscallDispatch,
        Check::HiddenModule,
        Check::HiddenProcess,
    ];
    if flavour == Flavour::Stable {
        want.insert(0, Check::SyscallTable);
    }
    assert_eq!(checks_of(&r), want, "{}", describe(&r.findings));
    for m in ["rk_hide", "rk_syscall"] {
        assert!(
            r.findings
                .iter()
                .any(|f| f.check == Check::HiddenModule && f.module.as_deref() == Some(m)),
            "{m}:\n{}",
            describe(&r.findings)
        );
    }
    assert!(
        r.findings.iter().any(|f| f.check == Check::SyscallDispatch
            && f.actual.as_ref().is_some_and(|a| a.addr == getdents
                && matches!(&a.owner, integrity::Owner::Module { name, symbol: Some(sym), hidden: true, .. }
                    if name == "rk_syscall" && sym == "hook_getdents64"))),
        "{}",
        describe(&r.findings)
    );
    let hidden: Vec<_> = r
        .findings
        .iter()
        .filter(|f| f.check == Check::HiddenProcess)
        .collect();
    assert_eq!(hidden.len(), 1, "{}", describe(&r.findings));
    assert_eq!(hidden[0].object, format!("process {victim} {victim_comm}"));
    // Found both ways: the pid namespace and a CPU's run queue.
    assert!(
        hidden[0].detail.contains("in the pid namespace")
            && (hidden[0].detail.contains("running on CPU")
                || hidden[0].detail.contains("queued on CPU")),
        "{}",
        hidden[0]
    );
    assert!(r.coverage.tasks_on_run_queues > 0, "{:?}", r.coverage);
}

#[test]
fn rootkits_on_6_1_are_found_and_a_clean_guest_is_clean() {
    rootkits_are_found(Flavour::Stable, "s");
}

#[test]
fn rootkits_on_6_12_are_found_and_a_clean_guest_is_clean() {
    rootkits_are_found(Flavour::Backports, "b");
}
