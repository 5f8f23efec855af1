//! `vmwatch-agent`: the test-only guest agent of vmwatch lab VMs.
//!
//! Runs inside the guest, started (and restarted) by the image's init. It
//! serves the protocol in [`vmwatch_agent`] (newline-delimited JSON, bytes as
//! base64) on a serial port, `/dev/ttyS1` by default: the 8250 UART driver is
//! built into every Debian kernel, while virtio-console is a module on 6.1.
//!
//! Usage: `vmwatch-agent [PORT]`, `vmwatch-agent --stdio` (serve on
//! stdin/stdout, for tests on the host), or `vmwatch-agent snapshot` (print
//! the guest's own view of processes, sockets and modules as JSON: ground
//! truth for tests of vmwatch's outside view).
//!
//! Requests are handled one at a time. A bad request gets an error reply; the
//! agent never exits because of one. Monitors never depend on this agent: it
//! only drives workloads for tests and demos.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

mod snapshot;

use vmwatch_agent::{
    ErrorResponse, ExecRequest, ExecResponse, Pong, Ready, ToAgent, MAX_OUTPUT, MAX_REQUEST_LINE,
    VERSION,
};

/// How long to keep reading a command's pipes after it exited. Background
/// processes it started may hold the pipes open forever (`daemon &`); we
/// return what arrived by then instead of waiting for them.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

fn main() {
    let arg = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/dev/ttyS1".to_string());
    if arg == "snapshot" {
        let json = serde_json::to_vec(&snapshot::take()).unwrap_or_default();
        let mut out = io::stdout().lock();
        let ok = out
            .write_all(&json)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush());
        std::process::exit(if ok.is_ok() { 0 } else { 1 });
    }
    let (reader, writer): (Box<dyn Read>, Box<dyn Write>) = if arg == "--stdio" {
        (Box::new(io::stdin()), Box::new(io::stdout()))
    } else {
        match open_port(&arg) {
            Ok(port) => match port.try_clone() {
                Ok(clone) => (Box::new(port), Box::new(clone)),
                Err(e) => fatal(&arg, e),
            },
            Err(e) => fatal(&arg, e),
        }
    };
    serve(reader, writer);
}

fn fatal(port: &str, err: io::Error) -> ! {
    eprintln!("vmwatch-agent: {port}: {err}");
    std::process::exit(1);
}

/// Opens the serial port and puts it in raw mode: no echo, no line editing,
/// no CR/LF translation, 8-bit clean, modem lines ignored.
fn open_port(path: &str) -> io::Result<File> {
    let cpath = CString::new(path).map_err(|_| io::ErrorKind::InvalidInput)?;
    // O_NONBLOCK so open() does not wait for carrier before CLOCAL is set.
    // SAFETY: `cpath` is a valid NUL-terminated string; open has no other preconditions.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open() and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    // SAFETY: `fd` is open; isatty only inspects it.
    if unsafe { libc::isatty(fd) } == 1 {
        // SAFETY: termios is plain old data; tcgetattr fills it completely on success.
        let mut tio: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is an open tty and `tio` a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut tio) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `tio` is a valid termios obtained from tcgetattr.
        unsafe {
            libc::cfmakeraw(&mut tio);
            libc::cfsetspeed(&mut tio, libc::B115200);
        }
        tio.c_cflag |= libc::CLOCAL | libc::CREAD;
        tio.c_cflag &= !(libc::HUPCL | libc::CRTSCTS);
        tio.c_cc[libc::VMIN] = 1;
        tio.c_cc[libc::VTIME] = 0;
        // SAFETY: `fd` is an open tty and `tio` a fully initialised termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &tio) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // Drop whatever arrived before raw mode (half lines, echoed bytes).
        // SAFETY: `fd` is an open tty.
        unsafe { libc::tcflush(fd, libc::TCIOFLUSH) };
    }
    set_nonblocking(fd, false)?;
    Ok(file)
}

fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own have no memory-safety preconditions.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The request loop. Returns only when the input ends (stdio mode); on a
/// serial port reads never see end of file.
fn serve(reader: Box<dyn Read>, mut writer: Box<dyn Write>) {
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    send(
        &mut writer,
        &Ready {
            ready: true,
            version: VERSION.to_string(),
            pid: std::process::id(),
        },
    );
    let mut line = Vec::new();
    loop {
        match read_line_bounded(&mut reader, &mut line, MAX_REQUEST_LINE) {
            Ok(Line::Eof) => return,
            Ok(Line::TooLong) => send(
                &mut writer,
                &ErrorResponse {
                    id: None,
                    error: format!("request line longer than {MAX_REQUEST_LINE} bytes"),
                },
            ),
            Ok(Line::Complete) => {
                // Blank lines are what the host sends to flush half lines out of our buffer.
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                let reply = std::panic::catch_unwind(|| handle(&line)).unwrap_or_else(|_| {
                    error_line(None, "internal error (agent panicked); request dropped")
                });
                if writer
                    .write_all(&reply)
                    .and_then(|()| writer.flush())
                    .is_err()
                {
                    // The host went away mid-reply; nothing to do but carry on.
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

enum Line {
    Complete,
    TooLong,
    Eof,
}

/// Reads one `\n`-terminated line (without the `\n`) into `buf`, never
/// holding more than `max` bytes: a longer line is consumed and reported.
fn read_line_bounded(r: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok(Line::Eof);
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if !too_long && buf.len() + take <= max {
            buf.extend_from_slice(&chunk[..take]);
        } else {
            too_long = true;
            buf.clear();
        }
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

fn send(w: &mut dyn Write, msg: &impl serde::Serialize) {
    let mut out = serde_json::to_vec(msg).unwrap_or_default();
    out.push(b'\n');
    let _ = w.write_all(&out).and_then(|()| w.flush());
}

fn error_line(id: Option<u64>, error: &str) -> Vec<u8> {
    let mut out = serde_json::to_vec(&ErrorResponse {
        id,
        error: error.to_string(),
    })
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// Parses and serves one request line; returns the reply line.
fn handle(line: &[u8]) -> Vec<u8> {
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_line(None, &format!("bad request (not JSON): {e}")),
    };
    let id = value.get("id").and_then(|v| v.as_u64());
    let request: ToAgent = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return error_line(id, &format!("bad request: {e}")),
    };
    let mut out = match request {
        ToAgent::Ping(p) => serde_json::to_vec(&Pong {
            pong: p.ping,
            version: VERSION.to_string(),
        }),
        ToAgent::Exec(req) => match run(&req) {
            Ok(resp) => serde_json::to_vec(&resp),
            Err(e) => return error_line(Some(req.id), &e),
        },
    }
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// Collected output of one pipe, capped at [`MAX_OUTPUT`].
struct Sink {
    pipe: Option<OwnedFd>,
    data: Vec<u8>,
    truncated: bool,
}

impl Sink {
    fn new(pipe: Option<OwnedFd>) -> Self {
        Sink {
            pipe,
            data: Vec::new(),
            truncated: false,
        }
    }

    /// Reads what is available; closes the pipe at end of file or on error.
    fn pump(&mut self) {
        let Some(fd) = &self.pipe else { return };
        let mut chunk = [0u8; 64 << 10];
        loop {
            // SAFETY: `fd` is an open pipe we own; `chunk` is a writable buffer of the given length.
            let n = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
            if n > 0 {
                let n = n as usize;
                let room = MAX_OUTPUT.saturating_sub(self.data.len());
                self.data.extend_from_slice(&chunk[..n.min(room)]);
                self.truncated |= n > room;
                continue;
            }
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return,
                    _ => {}
                }
            }
            self.pipe = None; // EOF or a real error.
            return;
        }
    }
}

fn run(req: &ExecRequest) -> Result<ExecResponse, String> {
    let start = Instant::now();
    let Some(program) = req.argv.first() else {
        return Err("empty argv".to_string());
    };
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .envs(&req.env)
        .current_dir(req.cwd.as_deref().unwrap_or("/"))
        // Own process group, so a timeout kills the command and its children.
        .process_group(0)
        .stdin(if req.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run `{program}`: {e}"))?;

    let mut out = Sink::new(child.stdout.take().map(OwnedFd::from));
    let mut err = Sink::new(child.stderr.take().map(OwnedFd::from));
    let mut stdin_fd = child.stdin.take().map(OwnedFd::from);
    let stdin_data = req.stdin.as_deref().unwrap_or(&[]);
    let mut stdin_pos = 0usize;
    for fd in [&out.pipe, &err.pipe, &stdin_fd].into_iter().flatten() {
        set_nonblocking(fd.as_raw_fd(), true).map_err(|e| format!("pipe: {e}"))?;
    }
    let wake = child_exit_pipe();
    let deadline = req.timeout_ms.map(|ms| start + Duration::from_millis(ms));
    let mut timed_out = false;
    let mut status: Option<ExitStatus> = None;
    let mut drain_until: Option<Instant> = None;

    loop {
        if status.is_none() {
            match child.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s);
                    drain_until = Some(Instant::now() + DRAIN_GRACE);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("wait: {e}")),
            }
        }
        if status.is_some() {
            // The command's own writes are all in the pipes by now.
            stdin_fd = None;
            if (out.pipe.is_none() && err.pipe.is_none())
                || drain_until.is_some_and(|t| Instant::now() >= t)
            {
                break;
            }
        }
        let now = Instant::now();
        if let Some(d) = deadline {
            if status.is_none() && !timed_out && now >= d {
                timed_out = true;
                kill_group(&child);
            }
        }
        if stdin_fd.is_some() && stdin_pos >= stdin_data.len() {
            stdin_fd = None; // All fed: close so the command sees end of file.
        }

        let mut wait = Duration::from_secs(3600);
        if let (Some(d), false) = (deadline, timed_out) {
            wait = wait.min(d.saturating_duration_since(now));
        }
        if let Some(t) = drain_until {
            wait = wait.min(t.saturating_duration_since(now));
        }
        if wake.is_none() && status.is_none() {
            wait = wait.min(Duration::from_millis(10)); // No SIGCHLD pipe: poll for exit.
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(4);
        let mut push = |fd: &Option<OwnedFd>, events: libc::c_short| {
            fds.push(libc::pollfd {
                fd: fd.as_ref().map_or(-1, |f| f.as_raw_fd()), // -1 is ignored by poll.
                events,
                revents: 0,
            })
        };
        push(&out.pipe, libc::POLLIN);
        push(&err.pipe, libc::POLLIN);
        push(&stdin_fd, libc::POLLOUT);
        fds.push(libc::pollfd {
            fd: if status.is_none() {
                wake.unwrap_or(-1)
            } else {
                -1
            },
            events: libc::POLLIN,
            revents: 0,
        });
        let ms = wait.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms.max(1)) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(format!("poll: {e}"));
            }
            continue;
        }
        if fds[0].revents != 0 {
            out.pump();
        }
        if fds[1].revents != 0 {
            err.pump();
        }
        if fds[3].revents != 0 {
            drain_child_exit_pipe();
        }
        if fds[2].revents != 0 {
            if let Some(fd) = &stdin_fd {
                let rest = &stdin_data[stdin_pos..];
                // SAFETY: `fd` is an open pipe we own; `rest` is a valid readable buffer.
                let n = unsafe { libc::write(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len()) };
                if n >= 0 {
                    stdin_pos += n as usize;
                } else if io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
                    stdin_fd = None; // EPIPE: the command stopped reading.
                }
            }
        }
    }
    let status = status.expect("loop exits only after the child was reaped");
    Ok(ExecResponse {
        id: req.id,
        status: status.code(),
        signal: status.signal(),
        stdout: out.data,
        stderr: err.data,
        timed_out,
        truncated: out.truncated || err.truncated,
        duration_ms: start.elapsed().as_millis() as u64,
    })
}

/// Both ends of the SIGCHLD self-pipe, or -1 before it exists.
static CHILD_PIPE: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

/// The read end of a pipe that gets a byte whenever a child exits, so the
/// command loop sleeps in poll() until something happens. Created once and
/// kept for the agent's life: a per-command fd (a pidfd) would show up,
/// transiently, in the agent's open files, which tests compare with
/// vmwatch's outside view. `None` if it cannot be set up (we then poll).
fn child_exit_pipe() -> Option<RawFd> {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let mut fds = [-1; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return;
        }
        CHILD_PIPE[0].store(fds[0], Ordering::SeqCst);
        CHILD_PIPE[1].store(fds[1], Ordering::SeqCst);
        // SAFETY: sigaction is plain data; we fill the fields we need and
        // zero the rest. The handler only calls write(2), which is
        // async-signal-safe, and restores errno.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigchld as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()) != 0 {
                CHILD_PIPE[0].store(-1, Ordering::SeqCst);
            }
        }
    });
    let fd = CHILD_PIPE[0].load(Ordering::SeqCst);
    (fd >= 0).then_some(fd)
}

extern "C" fn on_sigchld(_: libc::c_int) {
    let fd = CHILD_PIPE[1].load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: errno location and write(2) are async-signal-safe; the
        // buffer is a valid one-byte static. A full pipe (EAGAIN) is fine:
        // a wake-up is already pending.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, b"x".as_ptr().cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

/// Empties the self-pipe after a wake-up.
fn drain_child_exit_pipe() {
    let fd = CHILD_PIPE[0].load(Ordering::SeqCst);
    let mut buf = [0u8; 64];
    // SAFETY: reading into a valid local buffer from our own non-blocking pipe.
    while fd >= 0 && unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

/// SIGKILLs the command's process group (it leads its own group).
fn kill_group(child: &Child) {
    // SAFETY: kill() with a negative pid signals that process group; no memory is involved.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
}
