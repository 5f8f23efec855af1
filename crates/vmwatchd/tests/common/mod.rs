//! Shared helpers of vmwatchd's tests: a daemon process on a private state
//! directory, fake VMs (a ring plus a process standing in for QEMU), and the
//! CLI's own client (compiled in from crates/vmwatch).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use events::{Filter, Record, RingWriter, FLAG_TASK};
use tracer::TraceEvent;

#[path = "../../../vmwatch/src/daemon_client.rs"]
pub mod daemon_client;

pub use daemon_client::DaemonClient;

static N: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempRoot(pub PathBuf);

impl TempRoot {
    pub fn new(tag: &str) -> TempRoot {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vmwatchd-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempRoot(dir)
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A vmwatchd process; SIGTERM on drop (and a check that it exits).
pub struct Daemon {
    pub child: Child,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `vmwatchd --state-dir STATE` over the lab cache `cache`
    /// (`None`: the default cache) and waits until it answers.
    pub fn start(state_dir: &Path, cache: Option<&Path>, extra: &[&str]) -> Daemon {
        std::fs::create_dir_all(state_dir).unwrap();
        let log = state_dir.with_extension("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmwatchd"));
        cmd.arg("--state-dir")
            .arg(state_dir)
            .args(extra)
            .env("VMWATCHD_LOG", "info,vmwatchd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(c) = cache {
            cmd.env("VMWATCH_CACHE", c);
        }
        let mut child = cmd.spawn().expect("start vmwatchd");
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "vmwatchd exited at start ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if let Ok(Some(c)) = DaemonClient::discover_in(state_dir) {
                if c.call("GET", "/v1/health", None).is_ok() {
                    break;
                }
            }
            assert!(Instant::now() < until, "vmwatchd did not answer in 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child,
            state_dir: state_dir.to_path_buf(),
            log,
        }
    }

    pub fn client(&self) -> DaemonClient {
        DaemonClient::discover_in(&self.state_dir)
            .unwrap()
            .expect("daemon answers")
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir.join(daemon_client::SOCKET)
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state_dir.join(daemon_client::TOKEN))
            .unwrap()
            .trim()
            .to_string()
    }

    /// SIGTERM, and the exit status within `limit`.
    pub fn stop(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill() has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none()
            && self.stop(Duration::from_secs(10)).is_none()
        {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- vmwatchd log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// One raw HTTP request over the daemon's socket: (status, body).
pub fn raw_request(socket: &Path, request: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A stream's events, read on a thread.
pub struct Events {
    rx: mpsc::Receiver<TraceEvent>,
    closer: daemon_client::StreamCloser,
}

impl Events {
    pub fn open(client: &DaemonClient, path: &str) -> Events {
        let mut stream = client
            .stream(path)
            .unwrap_or_else(|e| panic!("stream {path}: {e:#}"));
        let closer = stream.closer().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            while let Ok(Some(line)) = stream.next_line() {
                let ev: TraceEvent = serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("bad event line: {e}: {}", String::from_utf8_lossy(&line))
                });
                if tx.send(ev).is_err() {
                    break;
                }
            }
        });
        Events { rx, closer }
    }

    /// The next event that `pred` accepts within `limit` (others are skipped).
    pub fn wait_for(
        &self,
        limit: Duration,
        pred: impl Fn(&TraceEvent) -> bool,
    ) -> Option<TraceEvent> {
        let until = Instant::now() + limit;
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok(ev) if pred(&ev) => return Some(ev),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Everything that arrives within `limit`.
    pub fn collect_for(&self, limit: Duration) -> Vec<TraceEvent> {
        let until = Instant::now() + limit;
        let mut out = Vec::new();
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(ev) => out.push(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        out
    }

    /// Whether the stream ended (the reader thread saw its end) within `limit`.
    pub fn ended_within(&self, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.rx.recv_timeout(left) {
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return true,
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
        false
    }

    pub fn close(&self) {
        self.closer.close();
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.closer.close();
    }
}

/// A lab VM as far as the daemon can tell: `vm.json` in the cache, a ring,
/// and a live process whose command line carries the VM's UUID (what
/// `lab::vm::qemu_alive` checks), standing in for QEMU.
pub struct FakeVm {
    pub name: String,
    pub uuid: String,
    pub ring: PathBuf,
    pub writer: RingWriter,
    pub qemu: Child,
}

impl FakeVm {
    pub fn new(root: &Path, cache: &Path, name: &str) -> FakeVm {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let uuid = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            std::process::id(),
            n as u64 * 7919 + 1
        );
        let qemu = Command::new("sleep")
            .arg0(format!("fake-qemu-{uuid}"))
            .arg("600")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep");
        let ring = root.join(format!("{name}.ring"));
        let writer = RingWriter::create(&ring, 1024, name, &Filter::NONE, &Filter::NONE).unwrap();
        // The ring names its creator (QEMU): point it at the stand-in. The
        // file is mapped shared, so this write is what readers see.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&ring).unwrap();
            f.write_all_at(&u64::from(qemu.id()).to_le_bytes(), 32)
                .unwrap();
        }
        let state_dir = cache.join("vms").join(name);
        std::fs::create_dir_all(&state_dir).unwrap();
        let info = lab::VmInfo {
            name: name.to_string(),
            uuid: uuid.clone(),
            flavour: lab::Flavour::Stable,
            kernel_release: "6.1.0-fake-amd64".into(),
            kernel_version: "6.1.0-1".into(),
            vmlinux: root.join("no-vmlinux"),
            boot_kernel: root.join("no-bzimage"),
            initramfs: root.join("no-initramfs"),
            ram_path: root.join(format!("{name}.ram")),
            ranges: Vec::new(),
            state_dir: state_dir.clone(),
            qmp_socket: state_dir.join("qmp.sock"),
            agent_socket: state_dir.join("agent.sock"),
            console_socket: state_dir.join("console.sock"),
            serial_log: state_dir.join("serial.log"),
            qemu_log: state_dir.join("qemu.log"),
            accel: lab::Accel::Tcg,
            cpu: "max".into(),
            mem_bytes: 512 << 20,
            cpus: 1,
            kaslr: true,
            pti: lab::Pti::Auto,
            cmdline: String::new(),
            plugins: Vec::new(),
            ring: Some(ring.clone()),
            gdb_socket: None,
            network: None,
            qemu_pid: qemu.id(),
            qemu_argv: vec![format!("fake-qemu-{uuid}")],
            started_at_unix: 0,
            boot_to_ready_secs: None,
        };
        std::fs::write(
            state_dir.join("vm.json"),
            serde_json::to_vec_pretty(&info).unwrap(),
        )
        .unwrap();
        FakeVm {
            name: name.to_string(),
            uuid,
            ring,
            writer,
            qemu,
        }
    }

    /// A complete call (entry, then return) by thread `pid` of process `tgid`.
    pub fn call(&self, nr: u64, tgid: u32, pid: u32, ret: i64) {
        let mut e = Record::entry(
            0,
            nr,
            [(-100i64) as u64, 0x1000, 0, 0, 0, 0],
            0x5000,
            0x40_1000,
        );
        (e.pid, e.tgid, e.task, e.flags) = (pid, tgid, 0xffff_8880_0000_1000, FLAG_TASK);
        let seq = self.writer.push(&e).expect("ring has room");
        let mut r = Record::ret(0, nr, ret, 0x5000, 0xffff_ffff_8100_0000, seq);
        (r.pid, r.tgid, r.task, r.flags) = (pid, tgid, 0xffff_8880_0000_1000, FLAG_TASK);
        self.writer.push(&r).expect("ring has room");
    }

    /// The stand-in QEMU dies.
    pub fn kill_qemu(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.kill_qemu();
        let _ = std::fs::remove_file(&self.ring);
    }
}

/// Polls `f` until it holds or `limit` passes.
pub fn eventually(limit: Duration, f: impl Fn() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}
