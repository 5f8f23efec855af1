//! End-to-end: boot lab guests, start known processes, and compare what
//! vmwatch reads from guest RAM with what the guest reports about itself
//! through /proc (taken by the test-only agent's `snapshot` command).
//!
//! Needs the lab images (`scripts/setup.sh` builds them); without them these
//! tests fail with the message to run it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;

use lab::{Flavour, Pti, UpOptions, Vm};
use serde_json::Value;

/// A lab VM that is shut down when the test ends, pass or fail.
struct TestVm(Vm);

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

impl std::ops::Deref for TestVm {
    type Target = Vm;
    fn deref(&self) -> &Vm {
        &self.0
    }
}

/// VM names are unique per test process, so concurrent runs of this suite
/// (or a leftover from an aborted run) cannot collide.
fn vm_name(tag: &str) -> String {
    format!("t-{tag}-{}", std::process::id())
}

fn boot(name: &str, flavour: Flavour, kaslr: bool, pti: Pti) -> TestVm {
    boot_with(UpOptions::new(name), flavour, kaslr, pti)
}

fn boot_with(mut opts: UpOptions, flavour: Flavour, kaslr: bool, pti: Pti) -> TestVm {
    let name = opts.name.clone();
    opts.flavour = flavour;
    opts.kaslr = kaslr;
    opts.pti = pti;
    match Vm::up(&opts) {
        Ok(vm) => TestVm(vm),
        Err(e) => panic!("cannot boot lab VM `{name}` ({e}); run scripts/setup.sh first"),
    }
}

fn sh(vm: &Vm, script: &str) -> String {
    let out = vm.exec_sh(script).expect("agent exec");
    assert!(
        out.success(),
        "guest command failed ({}): {script}\nstdout: {}\nstderr: {}",
        out.code(),
        out.stdout_str(),
        out.stderr_str()
    );
    out.stdout_str()
}

/// Starts the known workload: a process holding the secret open, a TCP
/// listener with one accepted connection, a UDP socket, a closed connection
/// left in TIME_WAIT (held by no process), a pipeline, and a loaded module. Waits until all of it is in place.
fn start_workload(vm: &Vm) {
    let server = "import socket,time\n\
        s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
        s.bind(('127.0.0.1', 8080)); s.listen()\n\
        u=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('0.0.0.0', 5353))\n\
        c,_=s.accept(); time.sleep(100000)\n";
    let client = "import socket,time\n\
        c=socket.create_connection(('127.0.0.1', 8080)); time.sleep(100000)\n";
    // A connection opened and closed at once: the side that closes first stays in TIME_WAIT.
    let closed = "import socket; s=socket.socket(); s.bind(('127.0.0.1', 9090)); s.listen(); \
        c=socket.create_connection(('127.0.0.1', 9090)); a,_=s.accept(); c.close(); a.close(); s.close()";
    let script = format!(
        "set -e\n\
         mkdir -p /root && echo top-secret > /root/secret.txt\n\
         cat > /tmp/server.py <<'EOF'\n{server}EOF\n\
         cat > /tmp/client.py <<'EOF'\n{client}EOF\n\
         setsid sleep 100000 < /root/secret.txt > /dev/null 2>&1 &\n\
         setsid sh -c 'sleep 100001 | sleep 100002' < /dev/null > /dev/null 2>&1 &\n\
         setsid python3 /tmp/server.py < /dev/null > /dev/null 2>&1 &\n\
         for i in $(seq 100); do grep -q ':1F90 00000000:0000 0A' /proc/net/tcp && break; sleep 0.2; done\n\
         setsid python3 /tmp/client.py < /dev/null > /dev/null 2>&1 &\n\
         for i in $(seq 100); do [ $(grep -c ' 01 ' /proc/net/tcp) -ge 2 ] && break; sleep 0.2; done\n\
         python3 -c \"{closed}\"\n\
         for i in $(seq 100); do grep -q ' 06 ' /proc/net/tcp && break; sleep 0.2; done\n\
         modprobe dummy\n"
    );
    sh(vm, &script);
}

/// The guest's own view (agent `snapshot`), minus the snapshot process.
struct GroundTruth {
    processes: BTreeMap<i64, Value>,
    /// The agent that ran the snapshot: its pipes to the snapshot process are transient.
    agent_pid: i64,
    sockets: BTreeSet<(String, String, String, u64, u64)>,
    modules: BTreeSet<(String, u64, u64)>,
}

fn ground_truth(vm: &Vm) -> GroundTruth {
    let out = vm
        .exec(&["/usr/sbin/vmwatch-agent", "snapshot"])
        .expect("agent exec");
    assert!(out.success(), "snapshot failed: {}", out.stderr_str());
    let v: Value = serde_json::from_slice(&out.stdout).expect("snapshot JSON");
    let self_pid = v["self_pid"].as_i64().unwrap();
    let mut processes = BTreeMap::new();
    let mut agent_pid = -1;
    for p in v["processes"].as_array().unwrap() {
        let pid = p["pid"].as_i64().unwrap();
        if pid == self_pid {
            agent_pid = p["ppid"].as_i64().unwrap();
            continue;
        }
        processes.insert(pid, p.clone());
    }
    let sockets = v["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["table"].as_str().unwrap().to_string(),
                s["local"].as_str().unwrap().to_string(),
                s["remote"].as_str().unwrap().to_string(),
                s["state"].as_u64().unwrap(),
                s["inode"].as_u64().unwrap(),
            )
        })
        .collect();
    let modules = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["size"].as_u64().unwrap(),
                m["base"].as_u64().unwrap(),
            )
        })
        .collect();
    GroundTruth {
        processes,
        agent_pid,
        sockets,
        modules,
    }
}

/// Runs the vmwatch CLI with `--json` and returns its parsed output.
fn vmwatch_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vmwatch"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run vmwatch");
    assert!(
        out.status.success(),
        "vmwatch {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("vmwatch JSON")
}

fn items(v: &Value) -> &Vec<Value> {
    v["items"].as_array().expect("items")
}

/// pid -> (process JSON, set of (fd, path)).
type ProcessView = BTreeMap<i64, (Value, BTreeSet<(u64, String)>)>;

/// Process table and fds as vmwatch sees them, in the ground truth's shape.
fn vmwatch_processes(vm: &str) -> ProcessView {
    let ps = vmwatch_json(&["ps", "--vm", vm]);
    assert!(
        ps["warnings"].as_array().unwrap().is_empty(),
        "warnings on a healthy guest: {}",
        ps["warnings"]
    );
    let files = vmwatch_json(&["lsof", "--vm", vm]);
    let mut out: ProcessView = items(&ps)
        .iter()
        .map(|p| (p["pid"].as_i64().unwrap(), (p.clone(), BTreeSet::new())))
        .collect();
    for f in items(&files) {
        if let Some(entry) = out.get_mut(&f["pid"].as_i64().unwrap()) {
            entry.1.insert((
                f["fd"].as_u64().unwrap(),
                f["path"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

fn compare_processes(truth: &GroundTruth, ours: &ProcessView) {
    let truth_pids: BTreeSet<_> = truth.processes.keys().copied().collect();
    let our_pids: BTreeSet<_> = ours.keys().copied().collect();
    assert_eq!(our_pids, truth_pids, "pid sets differ");
    for (pid, t) in &truth.processes {
        let (p, fds) = &ours[pid];
        assert_eq!(p["ppid"], t["ppid"], "pid {pid}: ppid");
        let ours_comm = p["full_name"].as_str().or(p["comm"].as_str()).unwrap();
        let truth_comm = t["comm"].as_str().unwrap();
        // /proc appends a workqueue worker's current or last work queue
        // ("kworker/0:0-rcu_gp", "+" while busy); the task's comm is the part before.
        // 6.12 also names rescuers after their full work-queue name
        // ("kworker/R-kvfree_rcu_reclaim"); vmwatch shows the task's comm.
        let wq_suffix = ours_comm.starts_with("kworker/") && truth_comm.starts_with(ours_comm);
        assert!(
            ours_comm == truth_comm || wq_suffix,
            "pid {pid}: comm {ours_comm} vs {truth_comm}"
        );
        assert_eq!(p["uid"], t["uid"], "pid {pid}: uid");
        assert_eq!(p["euid"], t["euid"], "pid {pid}: euid");
        assert_eq!(p["exe"], t["exe"], "pid {pid}: exe");
        let mut truth_fds: BTreeSet<(u64, String)> = t["fds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f[0].as_u64().unwrap(), f[1].as_str().unwrap().to_string()))
            .collect();
        let mut our_fds = fds.clone();
        if *pid == truth.agent_pid {
            // The agent held pipes and a pidfd for the snapshot process only while it ran.
            let transient = |l: &str| l.starts_with("pipe:") || l == "anon_inode:[pidfd]";
            truth_fds.retain(|(_, l)| !transient(l));
            our_fds.retain(|(_, l)| !transient(l));
        }
        assert_eq!(our_fds, truth_fds, "pid {pid} ({}): open files", t["comm"]);
    }
}

fn vmwatch_sockets(vm: &str) -> BTreeSet<(String, String, String, u64, u64)> {
    let v = vmwatch_json(&["sockets", "--vm", vm]);
    let fmt = |a: &Value| -> String {
        let ip = a[0].as_str().unwrap();
        let port = a[1].as_u64().unwrap();
        if ip.contains(':') {
            format!("[{ip}]:{port}")
        } else {
            format!("{ip}:{port}")
        }
    };
    items(&v)
        .iter()
        .filter(|s| matches!(s["family"].as_str(), Some("inet" | "inet6")))
        .filter(|s| matches!(s["protocol"].as_str(), Some("tcp" | "udp")))
        .map(|s| {
            let v6 = s["family"] == "inet6";
            let table = format!(
                "{}{}",
                s["protocol"].as_str().unwrap(),
                if v6 { "6" } else { "" }
            );
            (
                table,
                fmt(&s["local"]),
                fmt(&s["remote"]),
                s["state"].as_u64().unwrap(),
                s["inode"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn vmwatch_modules(vm: &str) -> BTreeSet<(String, u64, u64)> {
    let v = vmwatch_json(&["modules", "--vm", vm]);
    items(&v)
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["size"].as_u64().unwrap(),
                m["base"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Retries until two ground-truth snapshots around vmwatch's read agree on the
/// pid set (kernel workers come and go), then compares everything exactly.
fn views_match_proc(vm: &Vm) {
    let name = vm.name().to_string();
    for attempt in 0..5 {
        let before = ground_truth(vm);
        let ours = vmwatch_processes(&name);
        let sockets = vmwatch_sockets(&name);
        let modules = vmwatch_modules(&name);
        let after = ground_truth(vm);
        let pids = |g: &GroundTruth| g.processes.keys().copied().collect::<BTreeSet<_>>();
        if pids(&before) != pids(&after) && attempt < 4 {
            continue;
        }
        compare_processes(&before, &ours);
        assert_eq!(
            sockets, before.sockets,
            "sockets differ from /proc/net/{{tcp,udp}}[6]"
        );
        assert_eq!(modules, before.modules, "modules differ from /proc/modules");
        // The workload is really there.
        assert!(before.modules.iter().any(|m| m.0 == "dummy"));
        assert!(ours
            .values()
            .any(|(_, fds)| fds.iter().any(|f| f.1 == "/root/secret.txt")));
        assert!(before
            .sockets
            .iter()
            .any(|s| s.1 == "127.0.0.1:8080" && s.3 == 10));
        assert_eq!(before.sockets.iter().filter(|s| s.3 == 1).count(), 2);
        assert!(
            before.sockets.iter().any(|s| s.3 == 6 && s.4 == 0),
            "a TIME_WAIT socket"
        );
        assert!(ours
            .values()
            .any(|(_, fds)| fds.iter().any(|f| f.1.starts_with("pipe:["))));
        return;
    }
}

/// Every core kernel symbol recovered from the image matches the guest's
/// /proc/kallsyms (addresses shifted by the slide vmwatch found).
fn kallsyms_match(vm: &Vm) {
    let k = vmwatch_json(&["kernel", "--vm", vm.name()]);
    let slide = k["location"]["virtual_slide"].as_u64().unwrap();
    let proc_kallsyms = sh(
        vm,
        "echo 0 > /proc/sys/kernel/kptr_restrict; cat /proc/kallsyms",
    );
    let image = vmi::image::KernelImage::open(&vm.info().vmlinux).unwrap();
    let symbols = vmi::symbols::KernelSymbols::from_image(&image).unwrap();
    let cmp = symbols.compare_with_proc_kallsyms(&proc_kallsyms, slide);
    assert!(cmp.matched > 50_000, "only {} symbols matched", cmp.matched);
    assert!(
        cmp.is_exact(),
        "kallsyms differ: {} missing, {} mismatched (first: {:?} {:?})",
        cmp.missing.len(),
        cmp.mismatched.len(),
        cmp.missing.first(),
        cmp.mismatched.first()
    );
}

fn full_check(name: &str, flavour: Flavour) {
    let vm = boot(name, flavour, true, Pti::Auto);
    assert!(sh(&vm, "cat /proc/cmdline").find("nokaslr").is_none());
    start_workload(&vm);
    views_match_proc(&vm);
    kallsyms_match(&vm);
}

#[test]
fn stable_kernel_with_kaslr_matches_proc() {
    full_check(&vm_name("intro-stable"), Flavour::Stable);
}

#[test]
fn backports_kernel_with_kaslr_matches_proc() {
    full_check(&vm_name("intro-bpo"), Flavour::Backports);
}

/// A CPU with LA57: the kernel runs with 5-level paging (direct map at
/// 0xff11...), and the whole view still matches /proc.
#[test]
fn five_level_paging_guest_matches_proc() {
    let mut opts = UpOptions::new(&vm_name("la57"));
    opts.cpu = Some("max".into()); // the lab default masks la57 off
    let vm = boot_with(opts, Flavour::Stable, true, Pti::Auto);
    assert!(sh(&vm, "cat /proc/cpuinfo").contains(" la57"));
    let k = vmwatch_json(&["kernel", "--vm", vm.name()]);
    assert_eq!(k["location"]["paging_mode"], "FiveLevel");
    start_workload(&vm);
    views_match_proc(&vm);
}

/// Without KASLR (PVH boot) the slide is zero; with PTI on and off the
/// kernel page tables are found the same way.
#[test]
fn without_kaslr_and_with_pti_on_and_off() {
    for (tag, flavour, pti) in [
        ("nokaslr-pti-on", Flavour::Stable, Pti::On),
        ("nokaslr-pti-off", Flavour::Backports, Pti::Off),
    ] {
        let name = &vm_name(tag);
        let vm = boot(name, flavour, false, pti);
        let cmdline = sh(&vm, "cat /proc/cmdline");
        assert!(cmdline.contains("nokaslr"));
        let k = vmwatch_json(&["kernel", "--vm", name]);
        assert_eq!(k["location"]["virtual_slide"].as_u64(), Some(0));
        let truth = ground_truth(&vm);
        let ours = vmwatch_processes(name);
        // pids of user processes must match exactly (no workload churn here).
        let user = |pids: BTreeSet<i64>| -> BTreeSet<i64> { pids };
        let ours_pids: BTreeSet<i64> = ours
            .iter()
            .filter(|(_, (p, _))| !p["kernel_thread"].as_bool().unwrap())
            .map(|(pid, _)| *pid)
            .collect();
        let truth_pids: BTreeSet<i64> = truth
            .processes
            .iter()
            .filter(|(_, p)| !p["exe"].is_null())
            .map(|(pid, _)| *pid)
            .collect();
        assert_eq!(user(ours_pids), truth_pids);
    }
}

/// A dump taken with QEMU's dump-guest-memory gives the same processes offline.
#[test]
fn dump_file_gives_the_same_view() {
    // 6.1 keeps `current_task` as a per-cpu variable, 6.12 in `pcpu_hot`.
    dump_check(Flavour::Stable);
    dump_check(Flavour::Backports);
}

fn dump_check(flavour: Flavour) {
    let name = &vm_name(&format!("dump-{flavour}"));
    let vm = boot(name, flavour, true, Pti::Auto);
    sh(&vm, "setsid sleep 100000 </dev/null >/dev/null 2>&1 &");
    let live = vmwatch_json(&["ps", "--vm", name]);
    let dump = std::env::temp_dir().join(format!("{name}.elf"));
    vm.dump(&dump).expect("dump-guest-memory");
    let vmlinux = vm.info().vmlinux.to_str().unwrap().to_string();
    let offline = vmwatch_json(&["ps", "--dump", dump.to_str().unwrap(), "--kernel", &vmlinux]);
    let pids = |v: &Value| -> BTreeSet<i64> {
        items(v)
            .iter()
            .filter(|p| !p["kernel_thread"].as_bool().unwrap())
            .map(|p| p["pid"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(pids(&live), pids(&offline));
    assert!(items(&offline).iter().any(|p| p["comm"] == "sleep"));

    // The dump's vCPU state gives the per-cpu base; the task it ran must be a
    // real task (the idle task, or one in the task list).
    let mem = Arc::new(vmi::memory::ElfDumpMemory::open(&dump).unwrap());
    let cpu = mem.cpu_states()[0].clone();
    let image = vmi::image::KernelImage::open(&vm.info().vmlinux).unwrap();
    let profile = Arc::new(vmi::linux::KernelProfile::from_image(&image).unwrap());
    let guest = vmi::linux::LinuxGuest::attach(mem, profile).unwrap();
    // In kernel mode GS holds the per-cpu base; in user mode the swapped-out KERNEL_GS_BASE does.
    let gs = cpu.gs_base();
    let percpu = if gs >> 63 == 1 {
        gs
    } else {
        cpu.kernel_gs_base.unwrap()
    };
    let current = guest.current_task(percpu).unwrap();
    let init_task = guest.symbol("init_task").unwrap();
    let tasks: BTreeSet<u64> = guest.processes().items.iter().map(|p| p.task).collect();
    let running = guest.read_process(current).unwrap();
    assert!(
        current == init_task || tasks.contains(&current),
        "vCPU 0 runs {current:#x} ({running:?}), which is no known task"
    );
    let _ = std::fs::remove_file(dump);
}

/// Overwrite one task's `tasks.next` through the shared RAM: vmwatch names the
/// bad entry, still lists every process (recovering the rest backward), and
/// the guest survives because the pointer is restored at once.
#[test]
fn corrupted_task_list_is_reported_and_the_rest_listed() {
    let name = &vm_name("corrupt");
    let vm = boot(name, Flavour::Stable, true, Pti::Auto);
    sh(&vm, "setsid sleep 100000 </dev/null >/dev/null 2>&1 &");
    let before = vmwatch_json(&["ps", "--vm", name]);
    let victim = items(&before)
        .iter()
        .find(|p| p["comm"] == "sleep")
        .expect("sleep process")["task"]
        .as_u64()
        .unwrap();

    let info = vm.info();
    let mem: Arc<dyn vmi::memory::PhysicalMemory> = Arc::new(
        vmi::memory::MappedFileMemory::open(&info.ram_path, info.ranges.clone(), true).unwrap(),
    );
    let image = vmi::image::KernelImage::open(&info.vmlinux).unwrap();
    let profile = Arc::new(vmi::linux::KernelProfile::from_image(&image).unwrap());
    let guest = vmi::linux::LinuxGuest::attach(mem, profile.clone()).unwrap();
    let next_ptr = victim + profile.layout.task_tasks;
    let space = guest.kernel_space();
    let saved = space.read_u64(next_ptr).unwrap();
    space
        .write(next_ptr, &0x4141_4141_4141_4141u64.to_le_bytes())
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmwatch"))
        .args(["ps", "--vm", name, "--json"])
        .output()
        .unwrap();
    space.write(next_ptr, &saved.to_le_bytes()).unwrap();

    assert!(out.status.success());
    let corrupted: Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = corrupted["warnings"].to_string();
    assert!(
        warnings.contains(&format!("{next_ptr:#x}")) && warnings.contains("0x4141414141414141"),
        "warning should name the bad entry and pointer: {warnings}"
    );
    let pids = |v: &Value| -> BTreeSet<i64> {
        items(v)
            .iter()
            .map(|p| p["pid"].as_i64().unwrap())
            .collect()
    };
    let (a, b) = (pids(&before), pids(&corrupted));
    assert!(
        a.difference(&b).count() <= 2,
        "lost processes: {:?}",
        a.difference(&b).collect::<Vec<_>>()
    );
    // The guest is unharmed.
    assert_eq!(sh(&vm, "echo alive").trim(), "alive");

    // A VM whose QEMU died is refused, not read from its stale RAM file.
    vm.kill_qemu().unwrap();
    let err = vmwatch_fails(&["ps", "--vm", name]);
    assert!(err.contains("not running"), "{err}");
}

fn vmwatch_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vmwatch"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "vmwatch {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(
        err.lines().count(),
        1,
        "one-line error expected, got: {err}"
    );
    err
}

#[test]
fn bad_input_gets_one_line_errors() {
    let err = vmwatch_fails(&["ps", "--vm", "no-such-vm"]);
    assert!(
        err.contains("no-such-vm") && err.contains("lab ls"),
        "{err}"
    );

    let dir = std::env::temp_dir().join("vmwatch-bad-input");
    std::fs::create_dir_all(&dir).unwrap();
    let not_a_dump = dir.join("notes.txt");
    std::fs::write(&not_a_dump, b"this is not a memory dump\n").unwrap();
    let image_dir = lab::image::ImagePaths::for_flavour(&lab::util::cache_dir(), Flavour::Stable);
    let vmlinux = image_dir.vmlinux.to_str().unwrap().to_string();
    let err = vmwatch_fails(&[
        "ps",
        "--dump",
        not_a_dump.to_str().unwrap(),
        "--kernel",
        &vmlinux,
    ]);
    assert!(err.contains("kernel"), "{err}");

    // An ELF that is not a core dump.
    let err = vmwatch_fails(&["ps", "--dump", "/bin/true", "--kernel", &vmlinux]);
    assert!(err.contains("dump"), "{err}");

    // A kernel image without kallsyms (any other ELF).
    let err = vmwatch_fails(&[
        "ps",
        "--dump",
        not_a_dump.to_str().unwrap(),
        "--kernel",
        "/bin/true",
    ]);
    assert!(err.contains("kallsyms") || err.contains("symbol"), "{err}");

    // A kernel image without BTF.
    let no_btf = dir.join("vmlinux-no-btf");
    let status = Command::new("objcopy")
        .args([
            "--remove-section",
            ".BTF",
            &vmlinux,
            no_btf.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let err = vmwatch_fails(&[
        "ps",
        "--dump",
        not_a_dump.to_str().unwrap(),
        "--kernel",
        no_btf.to_str().unwrap(),
    ]);
    assert!(err.contains("BTF"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}
