//! One stable-kernel VM through its paces: the agent, exit status, stderr,
//! stdin, timeouts, background daemons, dumps, and cleanup by `down`.

mod common;

use std::time::{Duration, Instant};

use common::{boot, require_image, unique_name};
use lab::{ExecOptions, Flavour, LabError, UpOptions, Vm, VmState};

#[test]
fn stable_vm_runs_commands_through_the_agent() {
    let image = require_image(Flavour::Stable);
    let name = unique_name("basic");
    let vm = boot(&UpOptions::new(&name));
    let info = vm.info().clone();

    // The kernel we booted is the one image.json describes.
    let out = vm.exec(&["uname", "-r"]).unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout_str().trim(), image.kernel_release);
    assert_eq!(info.kernel_release, image.kernel_release);

    // Hostname comes from the kernel command line.
    assert_eq!(vm.exec(&["hostname"]).unwrap().stdout_str().trim(), name);

    // Exit status and stderr pass through unchanged.
    let out = vm.exec_sh("echo out; echo err >&2; exit 7").unwrap();
    assert_eq!(out.status, Some(7));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");

    // A real glibc program reading procfs.
    let out = vm.exec(&["cat", "/proc/self/status"]).unwrap();
    assert!(out.success());
    let status = out.stdout_str();
    assert!(status.starts_with("Name:\tcat\n"), "{status}");
    assert!(status.contains("\nUid:\t0\t0\t0\t0\n"), "{status}");

    // Bytes are carried losslessly both ways.
    let blob: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let opts = ExecOptions {
        stdin: Some(blob.clone()),
        ..Default::default()
    };
    let out = vm.exec_with(&["cat"], &opts).unwrap();
    assert_eq!(out.stdout, blob);

    // Python (3.11 minimal) and bash are there.
    let out = vm
        .exec(&[
            "python3",
            "-c",
            "import os, socket; print(os.uname().nodename)",
        ])
        .unwrap();
    assert_eq!(out.stdout_str().trim(), name, "{out:?}");
    let out = vm
        .exec(&["bash", "-c", "echo ${BASH_VERSINFO[0]}"])
        .unwrap();
    assert!(out.success() && out.stdout_str().trim().parse::<u32>().unwrap() >= 5);

    // A missing program is an error from the agent, not a hang.
    match vm.exec(&["/no/such/program"]) {
        Err(LabError::Agent { detail, .. }) => assert!(detail.contains("cannot run"), "{detail}"),
        other => panic!("expected an agent error, got {other:?}"),
    }

    // A command that leaves a daemon behind returns at once; the daemon lives on.
    vm.exec_sh("echo top-secret > /root/secret.txt").unwrap();
    let t = Instant::now();
    let out = vm
        .exec_sh("sleep 1000 </root/secret.txt >/dev/null 2>&1 &")
        .unwrap();
    assert!(out.success());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // Even one that keeps our pipes open returns (after the agent's grace period).
    let t = Instant::now();
    let out = vm.exec_sh("sleep 1000 & echo started").unwrap();
    assert_eq!(out.stdout, b"started\n");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let out = vm.exec_sh("ps -o comm | grep -c '^sleep$'").unwrap();
    assert_eq!(out.stdout_str().trim(), "2", "{out:?}");

    // Timeouts kill the command's process group.
    let t = Instant::now();
    let opts = ExecOptions {
        timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let out = vm
        .exec_with(&["sh", "-c", "sleep 60; echo never"], &opts)
        .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.signal, Some(9));
    assert!(out.stdout.is_empty());
    assert!(t.elapsed() < Duration::from_secs(10));

    // The guest sees the UUID we gave QEMU.
    let out = vm.exec(&["cat", "/sys/class/dmi/id/product_uuid"]).unwrap();
    assert_eq!(out.stdout_str().trim(), info.uuid);

    // Another handle (as another process would get) sees the same VM.
    let again = Vm::open(&name).unwrap();
    assert_eq!(again.info(), &info);
    assert_eq!(again.state(), VmState::Running);
    assert!(lab::list()
        .unwrap()
        .iter()
        .any(|s| s.name == name && s.state == VmState::Running));

    // RAM: one range, the whole 512 MiB, in a file we can map.
    let total: u64 = info.ranges.iter().map(|r| r.len).sum();
    assert!(total > 500 << 20 && total <= 512 << 20, "{:?}", info.ranges);
    assert_eq!(std::fs::metadata(&info.ram_path).unwrap().len(), 512 << 20);

    // A dump is an ELF core with the guest's RAM.
    let dump = std::env::temp_dir().join(format!("{name}.core"));
    let path = vm.dump(&dump).unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    assert!(bytes > 500 << 20, "dump is {bytes} bytes");
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open(&path).unwrap(), &mut magic).unwrap();
    assert_eq!(&magic, b"\x7fELF");
    std::fs::remove_file(&path).unwrap();
    // The guest still runs after the dump.
    assert!(vm.exec(&["true"]).unwrap().success());

    // `down` stops QEMU and removes the state dir, sockets and RAM file.
    vm.down().unwrap();
    assert!(!info.state_dir.exists());
    assert!(!info.ram_path.exists());
    assert!(!info.qmp_socket.exists());
    assert!(
        !std::path::Path::new(&format!("/proc/{}", info.qemu_pid)).exists()
            || !lab::vm::qemu_alive(info.qemu_pid, &info.uuid)
    );
    assert!(matches!(Vm::open(&name), Err(LabError::NoSuchVm(_))));
    match lab::down(&name) {
        Err(e) => assert_eq!(
            e.to_string(),
            format!("no lab VM named `{name}` (see `vmwatch lab ls`)")
        ),
        Ok(()) => panic!("down of a removed VM succeeded"),
    }
}

#[test]
fn nokaslr_boots_the_vmlinux_at_its_link_address() {
    let name = unique_name("nokaslr");
    let mut opts = UpOptions::new(&name);
    opts.kaslr = false;
    opts.pti = lab::Pti::On;
    let vm = boot(&opts);
    assert_eq!(vm.info().boot_kernel, vm.info().vmlinux);
    let cmdline = vm.exec(&["cat", "/proc/cmdline"]).unwrap().stdout_str();
    assert!(
        cmdline.contains("nokaslr") && cmdline.contains("pti=on"),
        "{cmdline}"
    );
    // Without KASLR the kernel runs where the ELF says: _text at 0xffffffff81000000.
    let out = vm.exec_sh("grep ' _text$' /proc/kallsyms").unwrap();
    assert!(out.stdout_str().starts_with("ffffffff81000000 "), "{out:?}");
    let out = vm
        .exec_sh(
            "cat /sys/devices/system/cpu/vulnerabilities/meltdown; dmesg | grep -i 'isolation'",
        )
        .unwrap();
    eprintln!("pti=on: {}", out.stdout_str().trim());
    assert!(
        out.stdout_str()
            .contains("Kernel/User page tables isolation: enabled"),
        "{out:?}"
    );
}

#[test]
fn bad_names_and_unknown_vms_are_one_line_errors() {
    for bad in ["UPPER", "a_b", "", "x/../y"] {
        let err = Vm::up(&UpOptions::new(bad)).unwrap_err();
        assert!(matches!(err, LabError::BadName(_)), "{err}");
        assert!(!err.to_string().contains('\n'));
    }
    let err = Vm::open("does-not-exist-42").unwrap_err();
    assert_eq!(
        err.to_string(),
        "no lab VM named `does-not-exist-42` (see `vmwatch lab ls`)"
    );
}
