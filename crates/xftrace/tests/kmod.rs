//! End to end, paper 003's own design (`xftrace::kmod`): boot a lab guest
//! (6.1 and 6.12 kernels) without vmwatch's TCG plugin, load the recorder
//! module (guest/kmods/xftrace, built by scripts/build-kmods.sh) for
//! openat, run the Key Controller while the guest runs `cat /etc/hostname`
//! a few times, then decode the buffer read from guest memory.
//!
//! Checked: cat's openat flow nested as the kernel runs it; the raw buffer
//! holds none of the recorded function addresses in the clear; several keys
//! decoded records; no record failed its check; a record altered in guest
//! memory fails it; rmmod leaves no kernel warning. One VM at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lab::{Flavour, UpOptions};
use labtest::{copy_kmod, sh, up, Down};
use vmi::memory::PhysicalMemory;
use xftrace::kmod::{self, guest, KeyController, RawKind};
use xftrace::{Node, Resolve};

static ONE_VM: Mutex<()> = Mutex::new(());

/// The first node (depth first) called `name`.
fn find<'a>(nodes: &'a [Node], names: &dyn Resolve, name: &str) -> Option<&'a Node> {
    for n in nodes {
        if names.resolve(n.target).label(n.target) == name {
            return Some(n);
        }
        if let Some(found) = find(&n.children, names, name) {
            return Some(found);
        }
    }
    None
}

fn check(flavour: Flavour, tag: &str) {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let name = format!("xk-{tag}-{}", std::process::id());
    let mut opts = UpOptions::new(&name);
    opts.flavour = flavour;
    opts.cpus = 2;
    opts.network = false;
    opts.hook = false; // the module needs no plugin: as on KVM
    let vm = Down(up(&opts));
    let vm = &vm.0;

    copy_kmod(vm, "xftrace");
    sh(vm, "insmod /root/xftrace.ko nrs=257");

    // Everything from guest memory: the module, its symbols, the buffer.
    let mem: Arc<dyn PhysicalMemory> = Arc::new(vm.memory(false).unwrap());
    let att = guest::attach(Arc::clone(&mem), &vm.info().vmlinux).unwrap();
    let target = guest::locate(&att.guest, att.btf.as_ref()).expect("module found in memory");
    assert_eq!(target.capacity, 65536);
    let access =
        guest::LiveAccess::open(&att.guest, &target, &vm.info().ram_path, &vm.info().ranges)
            .unwrap();
    let header = kmod::read_header(&access, &target).unwrap();
    assert_eq!(header.syscalls.len(), 1);
    assert_eq!(header.syscalls[0].0, 257);
    let handler = header.syscalls[0].1;
    assert_eq!(
        att.names.resolve(handler).label(handler),
        "__x64_sys_openat"
    );
    assert!(kmod::check_handlers(&header, &att.names).is_empty());
    // Disarmed until the host writes a key: nothing recorded yet.
    sh(vm, "cat /etc/hostname");
    let h = kmod::read_header(&access, &target).unwrap();
    assert_eq!(h.write_index, 0, "{h:?}");
    assert!(h.disarmed == 0, "no record attempted before arming: {h:?}");

    // The Key Controller in its own thread while the guest works.
    let keys = KeyController::start(&access, target.clone()).unwrap();
    let stop = AtomicBool::new(false);
    let klog = std::thread::scope(|s| {
        let controller = s.spawn(|| {
            let mut keys = keys;
            keys.run(Duration::from_secs(600), kmod::DEFAULT_INTERVAL, &stop)
                .unwrap();
            keys.stop().unwrap()
        });
        let out = sh(
            vm,
            "for i in 1 2 3 4; do cat /etc/hostname; sleep 0.3; done",
        );
        stop.store(true, Ordering::Relaxed);
        assert_eq!(out.lines().collect::<Vec<_>>(), vec![vm.name(); 4]);
        controller.join().unwrap()
    });
    std::thread::sleep(kmod::SETTLE);
    assert!(klog.keys() >= 5, "{} key changes", klog.keys());
    assert!(klog.backwards.is_empty());
    assert_eq!(klog.entries.last().unwrap().key, 0, "disarmed");

    let raw = kmod::read_buffer(&access, &target).unwrap();
    let d = kmod::decode(&raw, &klog);
    assert!(!d.stats.suspicious(), "{:?}", d.stats);
    assert_eq!(d.stats.earlier, 0);
    assert!(d.stats.decoded > 200, "{:?}", d.stats);
    assert_eq!(d.stats.decoded, raw.records() as u64);
    assert_eq!(raw.header.lost + raw.header.busy + raw.header.deep, 0);
    assert!(
        d.stats.keys_used >= 2,
        "records under {} keys",
        d.stats.keys_used
    );
    assert!(d.records.iter().all(|r| r.nr == 257));

    // XOR hides the records: no recorded function address, task pointer
    // or pid word appears in the raw buffer.
    let plain: std::collections::BTreeSet<u64> =
        d.records.iter().flat_map(|r| [r.func, r.task]).collect();
    assert!(plain.contains(&handler));
    let leaked: Vec<u64> = raw
        .words
        .iter()
        .copied()
        .filter(|w| plain.contains(w))
        .collect();
    assert!(leaked.is_empty(), "plain words in the buffer: {leaked:x?}");

    // The graph: cat's openat flows, nested as the kernel runs them.
    let trace = kmod::to_trace(&d.records);
    let mut text = Vec::new();
    let written =
        kmod::write_graph(&trace, &att.names, &xftrace::Preamble::default(), &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    std::fs::write(
        std::env::temp_dir().join(format!("xftrace-kmod-{tag}-trace_graph.txt")),
        &text,
    )
    .unwrap();
    assert!(written.flagged.is_empty(), "{:?}", written.flagged);
    let cat: Vec<_> = trace.flows.iter().filter(|f| f.comm == "cat").collect();
    assert!(cat.len() >= 4, "{} openat flows of cat", cat.len());
    let n = &att.names;
    let flow = cat
        .iter()
        .rev()
        .find(|f| f.complete() && find(&f.calls, n, "path_openat").is_some())
        .expect("a complete openat of cat through path_openat");
    assert_eq!(
        n.resolve(flow.calls[0].target).label(flow.calls[0].target),
        "__x64_sys_openat"
    );
    let sys = &flow.calls[0];
    let openat2 = find(&sys.children, n, "do_sys_openat2").expect("do_sys_openat2 under it");
    let filp = find(&openat2.children, n, "do_filp_open").expect("do_filp_open under it");
    let path = find(&filp.children, n, "path_openat").expect("path_openat under it");
    for (outer, inner) in [(sys, openat2), (openat2, filp), (filp, path)] {
        let (o, i) = (outer.duration_ns.unwrap(), inner.duration_ns.unwrap());
        assert!(i <= o, "{i} ns inside {o} ns");
    }
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once('|').map(|(_, f)| f))
        .collect();
    let at = lines
        .iter()
        .position(|f| f.trim() == "do_sys_openat2() {")
        .expect("a `do_sys_openat2() {` line");
    assert_eq!(lines[at - 1].trim(), "__x64_sys_openat() {");
    assert!(text.contains("recorded in the guest by the xftrace module"));

    // A record altered in guest memory without the key (one bit of its
    // function word) fails its check; restored, it decodes again.
    let victim = d
        .records
        .iter()
        .find(|r| r.kind == RawKind::Call)
        .unwrap()
        .index;
    let va = target.buffer_va + kmod::HEADER_SIZE + victim * kmod::RECORD_SIZE + 16;
    let pa = att.guest.kernel_space().translate(va).unwrap().pa;
    let rw = vm.memory(true).unwrap();
    let word = rw.read_u64(pa).unwrap();
    rw.write_phys(pa, &(word ^ 1).to_le_bytes()).unwrap();
    let d2 = kmod::decode(&kmod::read_buffer(&access, &target).unwrap(), &klog);
    assert_eq!(
        (d2.stats.bad, d2.stats.decoded),
        (1, d.stats.decoded - 1),
        "{:?}",
        d2.stats
    );
    assert!(d2.records.iter().all(|r| r.index != victim));
    rw.write_phys(pa, &word.to_le_bytes()).unwrap();
    let d3 = kmod::decode(&kmod::read_buffer(&access, &target).unwrap(), &klog);
    assert_eq!(d3.records, d.records);

    // Disarmed: the guest records nothing more.
    let before = kmod::read_header(&access, &target).unwrap().write_index;
    sh(vm, "cat /etc/hostname");
    assert_eq!(
        kmod::read_header(&access, &target).unwrap().write_index,
        before
    );
    sh(vm, "rmmod xftrace");
    let dmesg = sh(vm, "dmesg");
    for bad in ["WARNING", "BUG", "Oops", "Call Trace"] {
        assert!(!dmesg.contains(bad), "{bad} in dmesg:\n{dmesg}");
    }
    assert!(dmesg.contains("xftrace: stopped"));
}

#[test]
fn kmod_openat_stable_6_1() {
    check(Flavour::Stable, "s");
}

#[test]
fn kmod_openat_backports_6_12() {
    check(Flavour::Backports, "b");
}
