//! `vmwatch track` and `vmwatch diffusion` as a user types them, against a
//! real vmwatchd (the binary next to this one, from `cargo build --release`):
//! bad input gives one line that says what to do; a corrupted history stops
//! the daemon without touching the file; and in a lab VM the commands show
//! what the guest did.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use lab::{UpOptions, Vm};

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("vmwatch-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn vmwatchd_bin() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_vmwatch"));
    let d = exe.parent().unwrap().join("vmwatchd");
    assert!(
        d.exists(),
        "{} not found: run `cargo build --release` first",
        d.display()
    );
    d
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill() has no memory-safety preconditions; the pid is our child's.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(state: &Path, cache: Option<&Path>) -> Daemon {
    let mut cmd = Command::new(vmwatchd_bin());
    cmd.arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(state.with_extension("log")).unwrap());
    if let Some(c) = cache {
        cmd.env("VMWATCH_CACHE", c);
    }
    let child = cmd.spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    while !state.join("vmwatchd.sock").exists() {
        assert!(Instant::now() < until, "vmwatchd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    Daemon(child)
}

fn vmwatch(state: &Path, cache: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmwatch"));
    cmd.args(args).env("VMWATCHD_DIR", state);
    if let Some(c) = cache {
        cmd.env("VMWATCH_CACHE", c);
    }
    cmd.output().unwrap()
}

/// Fails with `args`' stderr as one line containing `want`.
fn fails_with(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(want), "`{want}` not in: {err}");
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bad_input_is_one_line_and_loses_no_data() {
    let dir = Dir::new("bad");
    let state = dir.0.join("state");
    let cache = dir.0.join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let c = Some(cache.as_path());

    fails_with(
        &vmwatch(&state, c, &["track", "list", "--vm", "web1"]),
        "start it with `vmwatchd",
    );
    let daemon = start_daemon(&state, c);
    fails_with(
        &vmwatch(&state, c, &["track", "add", "--vm", "ghost", "/root/x"]),
        "no lab VM `ghost`",
    );
    fails_with(
        &vmwatch(&state, c, &["track", "add", "--vm", "ghost", "root/x"]),
        "is not an absolute path",
    );
    fails_with(
        &vmwatch(&state, c, &["track", "rm", "--vm", "ghost", "/root/x"]),
        "is not registered in VM `ghost`",
    );
    fails_with(
        &vmwatch(&state, c, &["diffusion", "show", "--vm", "ghost"]),
        "unknown VM `ghost`",
    );
    fails_with(
        &vmwatch(
            &state,
            c,
            &["diffusion", "show", "--vm", "ghost", "--at", "yesterday"],
        ),
        "bad time `yesterday`",
    );
    drop(daemon);

    // A history that is not SQLite: the daemon refuses to start, says what
    // to do, and leaves the file as it was.
    let store = state.join("diffusion").join(diffusion::STORE_FILE);
    let junk = b"not a database, but somebody's evidence".repeat(200);
    std::fs::write(&store, &junk).unwrap();
    let out = Command::new(vmwatchd_bin())
        .arg("--state-dir")
        .arg(&state)
        .env("VMWATCH_CACHE", &cache)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    fails_with(&out, "move it aside or restore a backup");
    assert_eq!(
        std::fs::read(&store).unwrap(),
        junk,
        "the store is untouched"
    );
}

struct Down(Vm);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = self.0.down();
    }
}

#[test]
fn track_and_show_in_a_lab_vm() {
    let dir = Dir::new("vm");
    let state = dir.0.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut opts = UpOptions::new(&format!("t-cli{}", std::process::id()));
    opts.mem_bytes = 512 << 20;
    let vm = Down(Vm::up(&opts).expect("boot (run scripts/setup.sh first)"));
    let name = vm.0.name().to_string();
    let _daemon = start_daemon(&state, None);
    let run = |script: &str| {
        let o = vm.0.exec_sh(script).unwrap();
        assert!(o.success(), "{}", o.stderr_str());
        o.stdout_str()
    };
    run("echo secret > /root/secret.txt");
    let out = stdout(&vmwatch(
        &state,
        None,
        &["track", "add", "--vm", &name, "/root/secret.txt"],
    ));
    assert!(
        out.contains(&format!("{name} +track /root/secret.txt")),
        "{out}"
    );
    // Nobody has touched the file since it was registered: its identity is
    // not known yet.
    let list = stdout(&vmwatch(&state, None, &["track", "list", "--vm", &name]));
    assert_eq!(list, "/root/secret.txt\tno file yet\n");
    let pid: u32 = run("cp /root/secret.txt /root/c.txt & echo $!; wait")
        .trim()
        .parse()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    let log = loop {
        let log = stdout(&vmwatch(&state, None, &["diffusion", "log", "--vm", &name]));
        if log.contains(&format!("-process {pid} cp (exit)")) || Instant::now() > until {
            break log;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        log.contains(&format!("+process {pid} cp  via ")),
        "delta log:\n{log}"
    );
    assert!(log.contains("+file /root/c.txt  via "), "{log}");
    let ino: u64 = run("stat -c %i /root/secret.txt").trim().parse().unwrap();
    let list = stdout(&vmwatch(&state, None, &["track", "list", "--vm", &name]));
    assert!(
        list.starts_with("/root/secret.txt\tfile dev ") && list.ends_with(&format!(" ino {ino}\n")),
        "{list}"
    );
    let dot = stdout(&vmwatch(
        &state,
        None,
        &["diffusion", "show", "--vm", &name, "--format", "dot"],
    ));
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(dot.contains("/root/c.txt"), "{dot}");
    let text = stdout(&vmwatch(
        &state,
        None,
        &["diffusion", "show", "--vm", &name],
    ));
    assert!(text.contains(&format!("{pid} cp")), "{text}");
    let rm = stdout(&vmwatch(
        &state,
        None,
        &["track", "rm", "--vm", &name, "/root/secret.txt"],
    ));
    assert!(rm.contains("-track /root/secret.txt"), "{rm}");
}
