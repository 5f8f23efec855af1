//! A VM whose QEMU dies is reported as dead by exec, ls and open, promptly;
//! a QEMU that cannot start is a one-line error plus its log.

mod common;

use std::time::{Duration, Instant};

use common::{boot, require_image, unique_name};
use lab::{ExecOptions, Flavour, LabError, UpOptions, Vm, VmState};

#[test]
fn killed_qemu_is_reported_not_waited_for() {
    let name = unique_name("kill");
    let vm = boot(&UpOptions::new(&name));
    let info = vm.info().clone();

    // Kill QEMU while a command is running in the guest.
    let killer = {
        let pid = info.qemu_pid;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            // SAFETY: kill() has no memory-safety preconditions; pid is our VM's QEMU.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        })
    };
    let t = Instant::now();
    let opts = ExecOptions {
        timeout: Duration::from_secs(100),
        ..Default::default()
    };
    let err = vm.exec_with(&["sleep", "60"], &opts).unwrap_err();
    killer.join().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "noticed after {:?}",
        t.elapsed()
    );
    assert!(matches!(err, LabError::Dead { .. }), "{err}");
    assert!(err.to_string().contains("is not running"), "{err}");

    // Later calls fail at once, and ls says dead.
    let t = Instant::now();
    assert!(matches!(vm.exec(&["true"]), Err(LabError::Dead { .. })));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(Vm::open(&name).unwrap().state(), VmState::Dead);
    let listed = lab::list().unwrap();
    let me = listed
        .iter()
        .find(|s| s.name == name)
        .expect("dead VM still listed");
    assert_eq!(me.state, VmState::Dead);

    // `down` of a dead VM cleans up its files.
    vm.down().unwrap();
    assert!(!info.state_dir.exists());
    assert!(!info.ram_path.exists());
}

#[test]
fn qemu_that_cannot_start_is_a_clear_error() {
    require_image(Flavour::Stable);
    let name = unique_name("badqemu");
    let mut opts = UpOptions::new(&name);
    opts.extra_qemu_args = vec!["-device".into(), "no-such-device-xyz".into()];
    let t = Instant::now();
    let err = Vm::up(&opts).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(30));
    let msg = err.to_string();
    assert!(matches!(err, LabError::BootFailed { .. }), "{msg}");
    assert!(
        msg.lines()
            .next()
            .unwrap()
            .contains("QEMU exited during boot"),
        "{msg}"
    );
    assert!(
        msg.contains("no-such-device-xyz"),
        "log tail missing: {msg}"
    );
    // Its state stays for inspection until `down`; no RAM file is left.
    let vm = Vm::open(&name).unwrap();
    assert_eq!(vm.state(), VmState::Dead);
    assert!(!vm.info().ram_path.exists());
    lab::down(&name).unwrap();
}

#[test]
fn same_name_twice_is_refused() {
    let name = unique_name("twice");
    let _vm = boot(&UpOptions::new(&name));
    let err = Vm::up(&UpOptions::new(&name)).unwrap_err();
    assert!(matches!(err, LabError::AlreadyRunning(_)), "{err}");
}
