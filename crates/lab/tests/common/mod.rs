//! Shared helpers of the lab integration tests.
//!
//! These tests boot real VMs under QEMU (TCG) from the images that
//! `scripts/setup.sh` builds. Without the images they fail with a message
//! saying so; they never pass silently.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use lab::{Flavour, ImageInfo, ImagePaths, UpOptions, Vm};

/// Loads the image of `flavour` or panics with what to run.
pub fn require_image(flavour: Flavour) -> ImageInfo {
    let paths = ImagePaths::for_flavour(&lab::util::cache_dir(), flavour);
    match paths.load_info() {
        Ok(info) => info,
        Err(e) => panic!(
            "lab integration tests need the `{flavour}` guest image: {e}\n\
             (run scripts/setup.sh, or `cargo run --release -p vmwatch -- lab build --kernel {flavour}`)"
        ),
    }
}

/// A VM name unique to this test process: `t-<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = format!("t-{tag}-{}-{n}", std::process::id());
    assert!(name.len() <= 32, "test VM name too long: {name}");
    name
}

/// Stops the VM when dropped, also when the test panics.
pub struct VmGuard(pub Vm);

impl std::ops::Deref for VmGuard {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        &self.0
    }
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("cleanup of {}: {e}", self.0.name());
        }
    }
}

/// Boots a VM (checking the image first) and wraps it in a guard.
pub fn boot(opts: &UpOptions) -> VmGuard {
    require_image(opts.flavour);
    let vm = Vm::up(opts).unwrap_or_else(|e| panic!("cannot boot {}: {e}", opts.name));
    eprintln!(
        "{}: {} booted in {:.1} s",
        vm.name(),
        vm.info().kernel_release,
        vm.info().boot_to_ready_secs.unwrap_or(0.0)
    );
    VmGuard(vm)
}
