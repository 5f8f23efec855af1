//! Test support for tests that boot lab VMs — never a dependency of non-test code.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use lab::vm::ExecOptions;
use lab::{UpOptions, Vm};

/// A lab VM that goes down when dropped, also when the test panics.
pub struct Down(pub Vm);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

/// `target/<profile>` of the running test binary (`target/<profile>/deps/NAME-HASH`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The hook plugin next to the test binary (`target/<profile>/libhook_plugin.so`),
/// built with `cargo build -p hook-plugin [--release]` if missing.
pub fn plugin_path() -> PathBuf {
    let dir = profile_dir();
    let so = dir.join("libhook_plugin.so");
    if !so.exists() {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "hook-plugin"]);
        if release {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "cargo build -p hook-plugin"
        );
    }
    so
}

/// Boots `opts`; panics (saying to run scripts/setup.sh) if it cannot.
pub fn up(opts: &UpOptions) -> Vm {
    Vm::up(opts).unwrap_or_else(|e| {
        panic!(
            "cannot boot lab VM `{}` ({e}); run scripts/setup.sh first",
            opts.name
        )
    })
}

/// Boots `opts` with the hook plugin of this build: points
/// `VMWATCH_HOOK_PLUGIN` at [`plugin_path`], then [`up`].
pub fn up_with_plugin(opts: &UpOptions) -> Vm {
    std::env::set_var("VMWATCH_HOOK_PLUGIN", plugin_path());
    up(opts)
}

/// Runs a shell script in the guest (`/bin/sh -c`, the agent's default
/// timeout of 120 s); panics unless it exits 0. Returns its stdout.
pub fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec_sh(script).expect("agent exec");
    assert!(
        out.success(),
        "guest command failed: {script}\n{}\n{}",
        out.stdout_str(),
        out.stderr_str()
    );
    out.stdout_str()
}

/// Writes `bytes` to the guest file `path` (`cat > PATH` with them on
/// stdin, killed after `timeout`); panics unless that succeeds.
pub fn put_file(vm: &Vm, path: &str, bytes: Vec<u8>, timeout: Duration) {
    let out = vm
        .exec_with(
            &["/bin/sh", "-c", &format!("cat > {path}")],
            &ExecOptions {
                stdin: Some(bytes),
                timeout,
                ..ExecOptions::default()
            },
        )
        .expect("agent exec");
    assert!(out.success(), "copy to {path}: {}", out.stderr_str());
}

/// The test kernel module `name` built for the VM's kernel:
/// `<cache>/kmods/<kernel_release>/<name>.ko` (scripts/build-kmods.sh writes it).
pub fn kmod_path(vm: &Vm, name: &str) -> PathBuf {
    lab::util::cache_dir()
        .join("kmods")
        .join(&vm.info().kernel_release)
        .join(format!("{name}.ko"))
}

/// The bytes of [`kmod_path`]; panics saying to run scripts/build-kmods.sh.
pub fn kmod_bytes(vm: &Vm, name: &str) -> Vec<u8> {
    let ko = kmod_path(vm, name);
    std::fs::read(&ko).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run scripts/build-kmods.sh (or `scripts/build-kmods.sh {name}`)",
            ko.display()
        )
    })
}

/// Copies the test kernel module `name` into the guest as `/root/<name>.ko`
/// (the agent's default timeout of 120 s).
pub fn copy_kmod(vm: &Vm, name: &str) {
    put_file(
        vm,
        &format!("/root/{name}.ko"),
        kmod_bytes(vm, name),
        ExecOptions::default().timeout,
    );
}
