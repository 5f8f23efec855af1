//! The bookworm-backports kernel (6.12.x): boots, matches image.json, loads
//! the modules we decompressed on the host; and a 4 GiB guest whose RAM
//! straddles the PCI hole is found where `ranges` says.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use common::{boot, require_image, unique_name};
use lab::{Flavour, UpOptions};

#[test]
fn backports_kernel_boots_and_loads_modules() {
    let image = require_image(Flavour::Backports);
    let name = unique_name("bpo");
    let mut opts = UpOptions::new(&name);
    opts.flavour = Flavour::Backports;
    let vm = boot(&opts);
    let out = vm.exec(&["uname", "-r"]).unwrap();
    assert_eq!(out.stdout_str().trim(), image.kernel_release);
    assert!(
        image.kernel_release.starts_with("6.12."),
        "{}",
        image.kernel_release
    );

    // dummy.ko and a module with dependencies (virtio_net -> net_failover -> failover).
    let out = vm
        .exec_sh("modprobe dummy && modprobe virtio_net && cut -d' ' -f1 /proc/modules | sort")
        .unwrap();
    assert!(out.success(), "{out:?}");
    let mods = out.stdout_str();
    for m in ["dummy", "virtio_net", "net_failover", "failover"] {
        assert!(mods.lines().any(|l| l == m), "{m} not loaded: {mods}");
    }
    let out = vm
        .exec_sh("ip link add d0 type dummy && ip link show d0")
        .unwrap();
    assert!(out.success(), "{out:?}");
}

#[test]
fn ram_above_4g_is_where_ranges_say() {
    require_image(Flavour::Stable);
    let name = unique_name("4g");
    let mut opts = UpOptions::new(&name);
    opts.mem_bytes = 4 << 30;
    let vm = boot(&opts);
    let info = vm.info();
    let gib = 1u64 << 30;
    // lab VMs: 2 GiB below the PCI hole (max-ram-below-4g), the rest at 4 GiB, file-contiguous.
    let above = info
        .ranges
        .iter()
        .find(|r| r.gpa == 4 * gib)
        .expect("a range at 4 GiB");
    assert_eq!(above.len, 2 * gib);
    assert_eq!(above.file_offset, 2 * gib);

    // The guest's own view agrees: System RAM from 4 GiB to 6 GiB.
    let iomem = vm.exec(&["cat", "/proc/iomem"]).unwrap().stdout_str();
    assert!(
        iomem.contains("100000000-17fffffff : System RAM"),
        "{iomem}"
    );

    // Put a marker in a page of a guest process, learn its guest-physical
    // address from /proc/self/pagemap, and find it in the RAM file through
    // `ranges`. CPython's id(bytes) + 32 is the address of the bytes' data.
    let script = r#"
import os, struct, time
marker = b"VMWATCH-RANGE-MARKER-" + os.urandom(16).hex().encode()
va = id(marker) + 32
with open("/proc/self/pagemap", "rb") as f:
    f.seek((va // 4096) * 8)
    entry, = struct.unpack("<Q", f.read(8))
assert entry >> 63, "page not present"
pfn = entry & ((1 << 55) - 1)
with open("/tmp/marker", "w") as out:
    out.write("%d %s\n" % (pfn * 4096 + va % 4096, marker.decode()))
time.sleep(120)
"#;
    vm.exec_with(
        &[
            "sh",
            "-c",
            "cat > /tmp/m.py && (python3 /tmp/m.py >/dev/null 2>&1 &)",
        ],
        &lab::ExecOptions {
            stdin: Some(script.as_bytes().to_vec()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut line = String::new();
    for _ in 0..100 {
        line = vm.exec(&["cat", "/tmp/marker"]).unwrap().stdout_str();
        if !line.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (gpa, marker) = line.trim().split_once(' ').expect("marker line");
    let gpa: u64 = gpa.parse().unwrap();
    let offset = info
        .ranges
        .iter()
        .find_map(|r| r.file_offset_of(gpa, marker.len() as u64))
        .unwrap_or_else(|| panic!("gpa {gpa:#x} not in {:?}", info.ranges));
    let mut f = std::fs::File::open(&info.ram_path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; marker.len()];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&buf),
        marker,
        "at gpa {gpa:#x}, file offset {offset:#x}"
    );
    eprintln!(
        "marker at gpa {gpa:#x} (file offset {offset:#x}) {}",
        if gpa >= 4 * gib {
            "above 4 GiB"
        } else {
            "below 4 GiB"
        }
    );
}
