//! End-to-end: real programs in a lab guest (6.12 kernel) with the hook
//! plugin tracing every syscall and fd: coreutils `cp`, a `cat FILE | gzip >
//! OUT` pipeline, and python3 copying a file. The guest prints the ground
//! truth (the programs' pids, the inodes and sizes `stat` reports, the pipe
//! `/proc/PID/fd` names); the test checks that the records show each process
//! opening the right files and moving exactly those bytes between them.
//!
//! The guest's `/bin/sh` is busybox, which runs its own applets for bare
//! `cp`, `cat`, `stat`, ...; the scripts call coreutils by full path.

mod common;

use common::{Calls, File};
use events::payload::RESULT;
use events::Record;

const SRC: &str = "/tmp/p-src";
const SRC_LEN: u64 = 300_000;

/// `stat` of a guest file: inode, size, and st_dev in the kernel's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    ino: u64,
    size: u64,
    dev: u32,
}

/// Parses `/usr/bin/stat -c '%i %s %d'` (st_dev in glibc's user encoding).
fn parse_stat(line: &str) -> Stat {
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("stat line `{line}`")))
        .collect();
    assert_eq!(v.len(), 3, "stat line `{line}`");
    let d = v[2];
    let major = ((d >> 8) & 0xfff) | ((d >> 32) & !0xfff);
    let minor = (d & 0xff) | ((d >> 12) & !0xff);
    Stat {
        ino: v[0],
        size: v[1],
        dev: ((major << 20) | minor) as u32,
    }
}

/// `key value...` lines of the guest's output.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no `{key}` line in:\n{out}"))
}

fn pid(out: &str, key: &str) -> u32 {
    let v = field(out, key).split_whitespace().next().unwrap();
    v.parse()
        .unwrap_or_else(|_| panic!("`{key}` pid `{v}` in:\n{out}"))
}

type Call<'a> = (&'a Record, Option<&'a Record>);

/// The process's calls after its (last) successful execve: the program's own.
fn after_exec<'a>(calls: &'a Calls<'a>, tgid: u32, comm: &str) -> Vec<Call<'a>> {
    let mine: Vec<Call<'a>> = calls.of_process(tgid).copied().collect();
    let exec = mine
        .iter()
        .rposition(|(e, x)| e.name() == "execve" && x.is_some_and(|x| x.ret == 0))
        .unwrap_or_else(|| panic!("no successful execve of process {tgid}"));
    let rest = mine[exec + 1..].to_vec();
    assert!(
        !rest.is_empty(),
        "no calls of {comm} ({tgid}) after its execve"
    );
    for (e, _) in &rest {
        assert_eq!(
            common::comm(e).as_deref(),
            Some(comm),
            "comm of process {tgid} at {}",
            e.name()
        );
    }
    rest
}

/// The process's `openat` of `path` (the first one whose flags pass `flags_ok`):
/// the fd it got, with the file the plugin resolved for the result.
fn opened(calls: &[Call<'_>], path: &str, flags_ok: impl Fn(u64) -> bool) -> (i64, File) {
    let (_, x) = calls
        .iter()
        .find(|(e, _)| {
            e.name() == "openat"
                && common::path_arg(e, 1).as_deref() == Some(path)
                && flags_ok(e.args[2])
        })
        .unwrap_or_else(|| panic!("no matching openat of {path}"));
    let x = x.unwrap_or_else(|| panic!("openat of {path}: no return"));
    assert!(x.ret >= 0, "openat of {path} = {}", x.ret);
    let f = common::file_item(x, RESULT)
        .unwrap_or_else(|| panic!("openat of {path}: no file for the result"));
    (x.ret, f)
}

const O_ACCMODE: u64 = 3;
const O_WRONLY: u64 = 1;
const O_CREAT: u64 = 0o100;

/// Bytes the calls moved out of files matching `from` (reads, and in-kernel
/// copies from it) and into files matching `to` (writes, in-kernel copies to
/// it); each with the (syscall, fd) used.
struct Moved {
    read: u64,
    written: u64,
    read_fds: Vec<(&'static str, i64)>,
    write_fds: Vec<(&'static str, i64)>,
}

fn moved(calls: &[Call<'_>], from: &dyn Fn(&File) -> bool, to: &dyn Fn(&File) -> bool) -> Moved {
    let mut m = Moved {
        read: 0,
        written: 0,
        read_fds: Vec::new(),
        write_fds: Vec::new(),
    };
    for (e, x) in calls {
        let Some(x) = x else { continue };
        if x.ret <= 0 {
            continue;
        }
        // (argument read from, argument written to)
        let (src, dst): (Option<u8>, Option<u8>) = match e.name() {
            "read" | "pread64" | "readv" | "preadv" | "preadv2" => (Some(0), None),
            "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2" => (None, Some(0)),
            "copy_file_range" | "splice" => (Some(0), Some(2)),
            "sendfile" => (Some(1), Some(0)),
            "tee" => (Some(0), Some(1)),
            _ => continue,
        };
        let fd = |a: u8| e.args[a as usize] as i32 as i64;
        if let Some(a) = src {
            if common::file_item(e, a).is_some_and(|f| from(&f)) {
                m.read += x.ret as u64;
                m.read_fds.push((e.name(), fd(a)));
            }
        }
        if let Some(a) = dst {
            if common::file_item(e, a).is_some_and(|f| to(&f)) {
                m.written += x.ret as u64;
                m.write_fds.push((e.name(), fd(a)));
            }
        }
    }
    m.read_fds.dedup();
    m.write_fds.dedup();
    m
}

fn is_file(st: Stat, path: &'static str) -> impl Fn(&File) -> bool {
    move |f: &File| f.ino == st.ino && f.dev == st.dev && f.path == path
}

fn check_file(what: &str, f: &File, st: Stat, path: &str) {
    assert_eq!(
        (f.path.as_str(), f.ino, f.dev),
        (path, st.ino, st.dev),
        "{what}: the file vmwatch resolved vs stat in the guest"
    );
}

#[test]
fn real_programs_move_the_bytes_vmwatch_reports() {
    let (vm, mut r) = common::boot_lab("prog", lab::Flavour::Backports);
    let vm = &vm.vm;
    let stat = |path: &str| {
        parse_stat(&common::sh(
            vm,
            &format!("/usr/bin/stat -c '%i %s %d' {path}"),
        ))
    };
    let version = common::sh(
        vm,
        "/usr/bin/cp --version; /usr/bin/cat --version; /usr/bin/gzip --version",
    );
    assert!(
        version.contains("cp (GNU coreutils)") && version.contains("cat (GNU coreutils)"),
        "{version}"
    );
    common::sh(vm, &format!("head -c {SRC_LEN} /dev/urandom > {SRC}"));
    let src = stat(SRC);
    assert_eq!(src.size, SRC_LEN);

    // 1. coreutils cp: opens the source for reading and creates the copy;
    // every byte goes from one to the other.
    let dropped = r.dropped();
    let (out, recs) = common::run_collect(
        vm,
        &mut r,
        "sh -c 'echo cp $$; exec /usr/bin/cp /tmp/p-src /tmp/p-dst'\n\
         cmp /tmp/p-src /tmp/p-dst && echo same",
    );
    assert_eq!(r.dropped(), dropped, "records dropped (ring full)");
    assert!(
        recs.iter().all(|x| x.has_task()),
        "records without a thread"
    );
    assert_eq!(out.lines().last(), Some("same"), "{out}");
    let dst = stat("/tmp/p-dst");
    let calls = Calls::new(&recs);
    let cp = after_exec(&calls, pid(&out, "cp"), "cp");
    let (src_fd, f) = opened(&cp, SRC, |fl| fl & O_ACCMODE == 0);
    check_file("cp's source", &f, src, SRC);
    let (dst_fd, f) = opened(&cp, "/tmp/p-dst", |fl| {
        fl & O_ACCMODE == O_WRONLY && fl & O_CREAT != 0
    });
    check_file("cp's destination", &f, dst, "/tmp/p-dst");
    let m = moved(&cp, &is_file(src, SRC), &is_file(dst, "/tmp/p-dst"));
    assert_eq!(
        (m.read, m.written),
        (SRC_LEN, SRC_LEN),
        "bytes cp moved from {SRC} and into /tmp/p-dst ({:?} -> {:?})",
        m.read_fds,
        m.write_fds
    );
    // Through the fds it opened, by copy_file_range or read/write.
    assert!(
        m.read_fds.iter().all(|&(_, fd)| fd == src_fd)
            && m.write_fds.iter().all(|&(_, fd)| fd == dst_fd),
        "cp's fds {src_fd} -> {dst_fd}: {:?} -> {:?}",
        m.read_fds,
        m.write_fds
    );
    eprintln!("cp: {:?} -> {:?}", m.read_fds, m.write_fds);

    // 2. cat FILE | gzip > OUT: cat reads the file into the pipe, gzip reads
    // the same pipe (the inode /proc/PID/fd shows) and writes OUT.
    let dropped = r.dropped();
    let (out, recs) = common::run_collect(
        vm,
        &mut r,
        "rm -f /tmp/p-ids\n\
         sh -c 'echo cat $$ $(/usr/bin/readlink /proc/$$/fd/1) >> /tmp/p-ids; exec /usr/bin/cat /tmp/p-src' \
         | sh -c 'echo gzip $$ $(/usr/bin/readlink /proc/$$/fd/0) >> /tmp/p-ids; exec /usr/bin/gzip -c > /tmp/p-gz'\n\
         cat /tmp/p-ids; /usr/bin/gzip -dc < /tmp/p-gz | cmp - /tmp/p-src && echo same",
    );
    assert_eq!(r.dropped(), dropped, "records dropped (ring full)");
    assert!(
        recs.iter().all(|x| x.has_task()),
        "records without a thread"
    );
    assert_eq!(out.lines().last(), Some("same"), "{out}");
    let gz = stat("/tmp/p-gz");
    let pipe = field(&out, "cat")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert!(pipe.starts_with("pipe:["), "{out}");
    assert_eq!(
        field(&out, "gzip").split_whitespace().nth(1),
        Some(pipe.as_str())
    );
    let pipe_ino: u64 = pipe["pipe:[".len()..pipe.len() - 1].parse().unwrap();
    let is_pipe = |f: &File| f.path == pipe && f.ino == pipe_ino;
    let calls = Calls::new(&recs);

    let cat = after_exec(&calls, pid(&out, "cat"), "cat");
    let (src_fd, f) = opened(&cat, SRC, |fl| fl & O_ACCMODE == 0);
    check_file("cat's input", &f, src, SRC);
    let m = moved(&cat, &is_file(src, SRC), &is_pipe);
    assert_eq!(
        (m.read, m.written),
        (SRC_LEN, SRC_LEN),
        "bytes cat moved from {SRC} into {pipe} ({:?} -> {:?})",
        m.read_fds,
        m.write_fds
    );
    assert!(
        m.read_fds.iter().all(|&(_, fd)| fd == src_fd)
            && m.write_fds.iter().all(|&(_, fd)| fd == 1),
        "cat's fds {src_fd} -> 1: {:?} -> {:?}",
        m.read_fds,
        m.write_fds
    );
    eprintln!("cat: {:?} -> {:?}", m.read_fds, m.write_fds);

    let gzip_pid = pid(&out, "gzip");
    // The shell opened OUT for gzip before its exec.
    let sh_calls: Vec<Call<'_>> = calls.of_process(gzip_pid).copied().collect();
    let (_, f) = opened(&sh_calls, "/tmp/p-gz", |fl| {
        fl & O_ACCMODE == O_WRONLY && fl & O_CREAT != 0
    });
    check_file("gzip's output (opened by sh)", &f, gz, "/tmp/p-gz");
    let gzip = after_exec(&calls, gzip_pid, "gzip");
    let m = moved(&gzip, &is_pipe, &is_file(gz, "/tmp/p-gz"));
    assert_eq!(
        (m.read, m.written),
        (SRC_LEN, gz.size),
        "bytes gzip moved from {pipe} into /tmp/p-gz ({:?} -> {:?})",
        m.read_fds,
        m.write_fds
    );
    assert!(
        m.read_fds.iter().all(|&(_, fd)| fd == 0) && m.write_fds.iter().all(|&(_, fd)| fd == 1),
        "gzip's fds 0 -> 1: {:?} -> {:?}",
        m.read_fds,
        m.write_fds
    );
    eprintln!("gzip: {:?} -> {:?}", m.read_fds, m.write_fds);

    // 3. python3 reads the file and writes a reversed copy.
    let dropped = r.dropped();
    let (out, recs) = common::run_collect(
        vm,
        &mut r,
        "python3 -c 'import os\n\
         print(\"python\", os.getpid())\n\
         d = open(\"/tmp/p-src\", \"rb\").read()\n\
         with open(\"/tmp/p-py\", \"wb\") as f: f.write(d[::-1])\n\
         print(\"len\", len(d))'",
    );
    assert_eq!(r.dropped(), dropped, "records dropped (ring full)");
    assert!(
        recs.iter().all(|x| x.has_task()),
        "records without a thread"
    );
    assert_eq!(field(&out, "len"), SRC_LEN.to_string());
    let py_out = stat("/tmp/p-py");
    assert_eq!(py_out.size, SRC_LEN);
    let calls = Calls::new(&recs);
    let py = after_exec(&calls, pid(&out, "python"), "python3");
    let (src_fd, f) = opened(&py, SRC, |fl| fl & O_ACCMODE == 0);
    check_file("python's input", &f, src, SRC);
    let (dst_fd, f) = opened(&py, "/tmp/p-py", |fl| {
        fl & O_ACCMODE == O_WRONLY && fl & O_CREAT != 0
    });
    check_file("python's output", &f, py_out, "/tmp/p-py");
    let m = moved(&py, &is_file(src, SRC), &is_file(py_out, "/tmp/p-py"));
    assert_eq!(
        (m.read, m.written),
        (SRC_LEN, SRC_LEN),
        "bytes python moved ({:?} -> {:?})",
        m.read_fds,
        m.write_fds
    );
    assert!(
        m.read_fds.iter().all(|&(_, fd)| fd == src_fd)
            && m.write_fds.iter().all(|&(_, fd)| fd == dst_fd),
        "python's fds {src_fd} -> {dst_fd}: {:?} -> {:?}",
        m.read_fds,
        m.write_fds
    );
    eprintln!("python3: {:?} -> {:?}", m.read_fds, m.write_fds);
}
