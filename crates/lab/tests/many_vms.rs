//! Seven VMs at once: distinct names and UUIDs, each guest sees its own UUID
//! and hostname, and `down` removes everything.

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::{require_image, unique_name, VmGuard};
use lab::{Flavour, UpOptions, Vm};

#[test]
fn seven_vms_at_once() {
    require_image(Flavour::Stable);
    let t = Instant::now();
    let names: Vec<String> = (0..7).map(|_| unique_name("many")).collect();
    let handles: Vec<_> = names
        .iter()
        .cloned()
        .map(|name| {
            std::thread::spawn(move || {
                let mut opts = UpOptions::new(&name);
                opts.mem_bytes = 256 << 20;
                opts.boot_timeout = std::time::Duration::from_secs(300);
                Vm::up(&opts)
            })
        })
        .collect();
    // Collect every result before asserting, so all booted VMs get a guard.
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut vms = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(vm) => vms.push(VmGuard(vm)),
            Err(e) => errors.push(e.to_string()),
        }
    }
    assert!(errors.is_empty(), "boot failures: {errors:#?}");
    let boot_secs: Vec<f64> = vms
        .iter()
        .map(|v| v.info().boot_to_ready_secs.unwrap())
        .collect();
    eprintln!(
        "7 VMs up after {:.1} s; boot-to-ready {boot_secs:?}",
        t.elapsed().as_secs_f64()
    );

    let uuids: BTreeSet<&str> = vms.iter().map(|v| v.info().uuid.as_str()).collect();
    assert_eq!(uuids.len(), 7);
    let rams: BTreeSet<_> = vms.iter().map(|v| v.info().ram_path.clone()).collect();
    assert_eq!(rams.len(), 7);

    for vm in &vms {
        let out = vm
            .exec_sh("cat /sys/class/dmi/id/product_uuid; hostname")
            .unwrap();
        let text = out.stdout_str();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(vm.info().uuid.as_str()), "{}", vm.name());
        assert_eq!(lines.next(), Some(vm.name()));
    }

    let listed: BTreeSet<String> = lab::list().unwrap().into_iter().map(|s| s.name).collect();
    for n in &names {
        assert!(listed.contains(n), "{n} missing from list");
    }

    let infos: Vec<_> = vms.iter().map(|v| v.info().clone()).collect();
    drop(vms); // guards run `down`
    for i in infos {
        assert!(
            !i.state_dir.exists(),
            "{} left {}",
            i.name,
            i.state_dir.display()
        );
        assert!(
            !i.ram_path.exists(),
            "{} left {}",
            i.name,
            i.ram_path.display()
        );
    }
}
