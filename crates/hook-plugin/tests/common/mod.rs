//! Helpers shared by the end-to-end tests that boot a lab guest with the hook
//! plugin and compare the records with what the guest itself reports
//! (`scripted.rs`, `programs.rs`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use events::{Filter, Item, Kind, Record, Ring, RingReader};
use lab::{UpOptions, Vm};
pub use labtest::sh;
use labtest::{profile_dir, up_with_plugin};

/// A lab VM that goes down (and loses its ring file) when dropped.
pub struct TestVm {
    pub vm: Vm,
    pub ring: PathBuf,
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = self.vm.down();
        let _ = std::fs::remove_file(&self.ring);
    }
}

/// Boots a VM the way `vmwatch lab up` does (the plugin with `ram=`/`vmlinux=`,
/// so every record names its thread), with every syscall and every fd traced.
pub fn boot_lab(tag: &str, flavour: lab::Flavour) -> (TestVm, RingReader) {
    let name = format!("t-{tag}-{}", std::process::id());
    let mut opts = UpOptions::new(&name);
    opts.cpus = 2;
    opts.flavour = flavour;
    let vm = up_with_plugin(&opts);
    let ring = vm
        .info()
        .ring
        .clone()
        .expect("lab VMs load the hook plugin");
    let vm = TestVm { vm, ring };
    let r = Ring::open(&vm.ring).expect("ring");
    r.set_filter(&Filter::ALL);
    r.set_fds(&Filter::ALL);
    (vm, r)
}

/// Copies `bytes` into the guest as the executable `path` (gzip'd on the
/// way: the agent's serial line moves about 50 KiB/s under TCG).
pub fn copy_in(vm: &Vm, path: &str, bytes: &[u8]) {
    use std::io::Write;
    let mut gz = Command::new("gzip")
        .args(["-c", "-6"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip on the host");
    let mut stdin = gz.stdin.take().unwrap();
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let packed = gz.wait_with_output().expect("gzip");
    writer.join().unwrap().expect("gzip stdin");
    assert!(packed.status.success(), "gzip");
    let opts = lab::vm::ExecOptions {
        stdin: Some(packed.stdout),
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let script = format!("gzip -dc > {path} && chmod +x {path} && wc -c < {path}");
    let out = vm
        .exec_with(&["/bin/sh", "-c", &script], &opts)
        .expect("agent exec");
    assert!(out.success(), "copy to {path}: {}", out.stderr_str());
    assert_eq!(
        out.stdout_str().trim(),
        bytes.len().to_string(),
        "bytes of {path} in the guest"
    );
}

fn drain(r: &mut RingReader, into: &mut Vec<Record>) {
    loop {
        let before = into.len();
        into.extend(r.poll());
        if into.len() == before {
            return;
        }
    }
}

/// Runs `f` (a guest command) while draining the ring on this thread; returns
/// its result and the records written meanwhile.
pub fn collect_during<T: Send>(
    r: &mut RingReader,
    f: impl FnOnce() -> T + Send,
) -> (T, Vec<Record>) {
    let mut recs = Vec::new();
    drain(r, &mut Vec::new()); // older events
    let out = std::thread::scope(|s| {
        let h = s.spawn(f);
        while !h.is_finished() {
            drain(r, &mut recs);
            std::thread::sleep(Duration::from_millis(5));
        }
        h.join().unwrap()
    });
    // Records of the last calls may still be on their way (other vCPU).
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(300) {
        drain(r, &mut recs);
        std::thread::sleep(Duration::from_millis(20));
    }
    (out, recs)
}

/// Runs `script` (must exit 0) while collecting records.
pub fn run_collect(vm: &Vm, r: &mut RingReader, script: &str) -> (String, Vec<Record>) {
    collect_during(r, || sh(vm, script))
}

pub fn comm(rec: &Record) -> Option<String> {
    rec.items().find_map(|it| match it {
        Item::Comm(c) => Some(String::from_utf8_lossy(c).into_owned()),
        _ => None,
    })
}

/// The path captured for argument `arg`.
pub fn path_arg(rec: &Record, arg: u8) -> Option<String> {
    rec.items().find_map(|it| match it {
        Item::Str { arg: a, bytes, .. } if a == arg => {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
        _ => None,
    })
}

/// A file identity as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Kernel encoding: major << 20 | minor.
    pub dev: u32,
    pub ino: u64,
    pub path: String,
}

/// The file the plugin resolved for argument `arg` (or `events::payload::RESULT`).
pub fn file_item(rec: &Record, arg: u8) -> Option<File> {
    rec.items().find_map(|it| match it {
        Item::File { arg: a, file } if a == arg => Some(File {
            dev: file.dev,
            ino: file.ino,
            path: String::from_utf8_lossy(file.path).into_owned(),
        }),
        _ => None,
    })
}

/// Entries with their returns (when one came), in entry order.
pub struct Calls<'a> {
    pub calls: Vec<(&'a Record, Option<&'a Record>)>,
}

impl<'a> Calls<'a> {
    pub fn new(recs: &'a [Record]) -> Calls<'a> {
        let returns: HashMap<u64, &Record> = recs
            .iter()
            .filter(|x| x.kind == Kind::Return && x.entry_seq != events::NO_ENTRY)
            .map(|x| (x.entry_seq, x))
            .collect();
        let mut calls: Vec<(&Record, Option<&Record>)> = recs
            .iter()
            .filter(|x| x.kind == Kind::Entry)
            .map(|e| (e, returns.get(&e.seq).copied()))
            .collect();
        calls.sort_by_key(|c| c.0.seq);
        Calls { calls }
    }

    /// Calls of process `tgid` (any thread).
    pub fn of_process(&self, tgid: u32) -> impl Iterator<Item = &(&'a Record, Option<&'a Record>)> {
        self.calls.iter().filter(move |c| c.0.tgid == tgid)
    }
}

/// Compiles `src` (C) with `gcc -static -O1` into `target/<profile>/guest-bin/NAME`,
/// unless a binary newer than the source is there.
pub fn build_static_c(src: &Path, name: &str) -> PathBuf {
    let dir = profile_dir().join("guest-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(name);
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let src_time = mtime(src).unwrap_or_else(|| panic!("{} is missing", src.display()));
    if mtime(&out).is_some_and(|t| t >= src_time) {
        return out;
    }
    // Tests of one binary run as threads of one process: the temporary name must
    // differ per call, or two threads building the same program race on it.
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("{name}.tmp{}-{n}", std::process::id()));
    let res = Command::new("gcc")
        .args(["-static", "-O1", "-s", "-Wall", "-o"])
        .arg(&tmp)
        .arg(src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run gcc ({e}): install Debian's `gcc` and `libc6-dev` (scripts/setup.sh does)"));
    let stderr = String::from_utf8_lossy(&res.stderr);
    if !res.status.success() {
        if stderr.contains("cannot find -lc") || stderr.contains("No such file") {
            panic!(
                "gcc -static failed: static glibc (libc.a) is missing; install Debian's `libc6-dev` \
                 (scripts/setup.sh does)\n{stderr}"
            );
        }
        panic!("gcc -static {} failed:\n{stderr}", src.display());
    }
    std::fs::rename(&tmp, &out).unwrap();
    out
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
