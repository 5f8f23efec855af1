//! A small blocking client of `vmwatchd`'s HTTP/JSON API over its unix socket.
//!
//! Plain std (HTTP/1.1 by hand: one request per connection, `Connection:
//! close`, chunked or sized bodies), because `trace_cmd.rs`, which uses it,
//! is also compiled into the hook-plugin test crate, whose dependencies are
//! only anyhow, serde_json, tracer, events, lab and vmi. vmwatchd's own tests
//! drive the daemon through this same file.
//!
//! The daemon's files are found as the daemon makes them: `$VMWATCHD_DIR`,
//! else `<lab cache>/vmwatchd`, holding `vmwatchd.sock`, `token` and
//! `vmwatchd.pid`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// File names in the state directory (as vmwatchd's `paths` module makes them).
pub const SOCKET: &str = "vmwatchd.sock";
pub const TOKEN: &str = "token";
pub const PID: &str = "vmwatchd.pid";

/// Longest status line or header line accepted.
const MAX_HEAD_LINE: usize = 8 << 10;
/// Most header lines accepted.
const MAX_HEADERS: usize = 100;
/// Largest non-streamed body accepted.
const MAX_BODY: u64 = 64 << 20;
/// Longest NDJSON line accepted from a stream (an event is a few KiB at most).
pub const MAX_LINE: usize = 1 << 20;

/// The daemon's state directory.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMWATCHD_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    lab::util::cache_dir().join("vmwatchd")
}

/// A reachable daemon.
#[derive(Debug, Clone)]
pub struct DaemonClient {
    socket: PathBuf,
    token: String,
    /// Timeout for the request and the response head.
    pub timeout: Duration,
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON (`null` if it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The `error` line of an error answer, else the body's start.
    pub fn error_line(&self) -> String {
        match self.json().get("error").and_then(|e| e.as_str()) {
            Some(e) => e.to_string(),
            None => {
                let text = String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
                    .trim()
                    .to_string();
                format!("HTTP {}: {}", self.status, text)
            }
        }
    }
}

impl DaemonClient {
    /// The daemon of `dir`, if one answers there: `Ok(None)` when there is
    /// no socket or nobody listens on it (a dead daemon's leftover).
    pub fn discover_in(dir: &Path) -> Result<Option<DaemonClient>> {
        let socket = dir.join(SOCKET);
        match UnixStream::connect(&socket) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None)
            }
            Err(e) => {
                return Err(anyhow!(
                    "cannot connect to vmwatchd at {}: {e}",
                    socket.display()
                ))
            }
        }
        let token_path = dir.join(TOKEN);
        let mut token = String::new();
        std::fs::File::open(&token_path)
            .and_then(|f| f.take(256).read_to_string(&mut token))
            .with_context(|| {
                format!(
                    "vmwatchd answers at {} but its token {} is unreadable: run vmwatch as the daemon's user",
                    socket.display(),
                    token_path.display()
                )
            })?;
        Ok(Some(DaemonClient {
            socket,
            token: token.trim().to_string(),
            timeout: Duration::from_secs(30),
        }))
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<UnixStream> {
        let mut s = UnixStream::connect(&self.socket)
            .with_context(|| format!("cannot connect to vmwatchd at {}", self.socket.display()))?;
        s.set_read_timeout(Some(self.timeout))?;
        s.set_write_timeout(Some(self.timeout))?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: vmwatchd\r\nAuthorization: Bearer {}\r\nConnection: close\r\n",
            self.token
        );
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        if let Some(b) = body {
            s.write_all(b)?;
        }
        Ok(s)
    }

    /// One request; the whole answer (any status).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Reply> {
        let body = body.map(|b| b.to_string().into_bytes());
        let s = self.send(method, path, body.as_deref())?;
        let mut r = BufReader::new(s);
        let head = read_head(&mut r)?;
        let mut out = Vec::new();
        body_reader(r, &head)
            .take(MAX_BODY + 1)
            .read_to_end(&mut out)
            .context("reading vmwatchd's answer")?;
        if out.len() as u64 > MAX_BODY {
            bail!("vmwatchd's answer is larger than {MAX_BODY} bytes");
        }
        Ok(Reply {
            status: head.status,
            body: out,
        })
    }

    /// One request whose answer must be a 2xx JSON document.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let reply = self.request(method, path, body)?;
        if !(200..300).contains(&reply.status) {
            bail!("vmwatchd: {}", reply.error_line());
        }
        Ok(reply.json())
    }

    /// Opens an NDJSON stream (`/v1/vms/NAME/trace?...`, `/v1/trace?...`).
    /// When this returns, the daemon's ring filters include the request's
    /// syscalls. Errors carry the daemon's one-line message.
    pub fn stream(&self, path: &str) -> Result<EventStream> {
        let s = self.send("GET", path, None)?;
        let control = s.try_clone()?;
        let mut r = BufReader::new(s);
        let head = read_head(&mut r)?;
        if !(200..300).contains(&head.status) {
            let mut out = Vec::new();
            body_reader(r, &head).take(64 << 10).read_to_end(&mut out)?;
            let reply = Reply {
                status: head.status,
                body: out,
            };
            bail!("vmwatchd: {}", reply.error_line());
        }
        // Events may be minutes apart; the daemon's heartbeats keep it alive.
        control.set_read_timeout(None)?;
        Ok(EventStream {
            lines: BufReader::new(body_reader(r, &head)),
            control,
        })
    }
}

/// An open stream of NDJSON lines.
pub struct EventStream {
    lines: BufReader<Box<dyn Read + Send>>,
    control: UnixStream,
}

impl EventStream {
    /// The next non-empty line (without its newline), `None` at the end.
    /// Blocks; [`EventStream::closer`] unblocks it from another thread.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            let mut line = Vec::new();
            let n = (&mut self.lines)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)?;
            if n == 0 {
                return Ok(None);
            }
            if line.len() > MAX_LINE {
                bail!("vmwatchd sent a line longer than {MAX_LINE} bytes");
            }
            while line.last().is_some_and(|b| matches!(b, b'\n' | b'\r')) {
                line.pop();
            }
            if !line.is_empty() {
                return Ok(Some(line));
            }
            // An empty line is the daemon's heartbeat.
        }
    }

    /// A handle that ends the stream (the blocked reader sees the end).
    pub fn closer(&self) -> Result<StreamCloser> {
        Ok(StreamCloser(self.control.try_clone()?))
    }
}

/// Ends an [`EventStream`] from another thread.
pub struct StreamCloser(UnixStream);

impl StreamCloser {
    pub fn close(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Status and the headers we act on.
struct Head {
    status: u16,
    chunked: bool,
    length: Option<u64>,
}

fn read_line_bounded(r: &mut impl BufRead) -> Result<String> {
    let mut buf = Vec::new();
    r.take(MAX_HEAD_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if buf.len() > MAX_HEAD_LINE {
        bail!("vmwatchd sent an overlong header line");
    }
    if buf.is_empty() {
        bail!("vmwatchd closed the connection without an answer");
    }
    Ok(String::from_utf8_lossy(&buf).trim_end().to_string())
}

fn read_head(r: &mut impl BufRead) -> Result<Head> {
    let status_line = read_line_bounded(r).context("reading vmwatchd's answer")?;
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("vmwatchd sent a bad status line `{status_line}`"))?;
    let mut head = Head {
        status,
        chunked: false,
        length: None,
    };
    for _ in 0..MAX_HEADERS {
        let line = read_line_bounded(r)?;
        if line.is_empty() {
            return Ok(head);
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            head.length = value.parse().ok();
        }
    }
    bail!("vmwatchd sent more than {MAX_HEADERS} headers")
}

fn body_reader<R: BufRead + Send + 'static>(r: R, head: &Head) -> Box<dyn Read + Send> {
    if head.chunked {
        Box::new(Chunked {
            inner: r,
            left: 0,
            done: false,
        })
    } else if let Some(n) = head.length {
        Box::new(r.take(n))
    } else {
        // Connection: close delimits the body.
        Box::new(r)
    }
}

/// `Transfer-Encoding: chunked` decoding.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: u64,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = Vec::new();
            (&mut self.inner).take(1024).read_until(b'\n', &mut line)?;
            if line.is_empty() {
                // Connection closed mid-stream: the end for us.
                self.done = true;
                return Ok(0);
            }
            let text = String::from_utf8_lossy(&line);
            let size = text.trim().split(';').next().unwrap_or("");
            let size =
                u64::from_str_radix(size, 16).map_err(|_| bad("bad chunk size from vmwatchd"))?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.done = true;
            return Ok(0);
        }
        self.left -= n as u64;
        if self.left == 0 {
            // The CRLF after the chunk's data.
            let mut crlf = Vec::new();
            (&mut self.inner).take(2).read_until(b'\n', &mut crlf)?;
        }
        Ok(n)
    }
}

/// Percent-encodes a query value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b',') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The daemon's pid from its pid file, if that process still runs.
pub fn daemon_pid(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join(PID)).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "vmwatchd").then_some(pid)
}

/// `vmwatch daemon status`: the daemon's health and its VMs.
pub fn status(json: bool, out: &mut dyn Write) -> Result<()> {
    let dir = state_dir();
    let Some(client) = DaemonClient::discover_in(&dir)? else {
        bail!(
            "no vmwatchd answers at {}: start one with `vmwatchd` (or `vmwatchd --watch-all`)",
            dir.join(SOCKET).display()
        );
    };
    let health = client.call("GET", "/v1/health", None)?;
    let vms = client.call("GET", "/v1/vms", None)?;
    if json {
        serde_json::to_writer(
            &mut *out,
            &serde_json::json!({ "health": health, "vms": vms }),
        )?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "vmwatchd pid {} up {} s, {} VMs watched, {} streams open ({})",
        health["pid"],
        health["uptime_secs"],
        health["watching"],
        health["subscribers"],
        client.socket().display()
    )?;
    writeln!(
        out,
        "{:<20} {:<9} {:<22} {:>10} {:>8} {:>5}  filter",
        "NAME", "STATE", "KERNEL", "RECORDS", "DROPPED", "SUBS"
    )?;
    for v in vms.as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        writeln!(
            out,
            "{:<20} {:<9} {:<22} {:>10} {:>8} {:>5}  {}",
            s("name"),
            s("state"),
            s("kernel_release"),
            v["records"].as_u64().unwrap_or(0),
            v["dropped"].as_u64().unwrap_or(0),
            v["subscribers"].as_u64().unwrap_or(0),
            match v["message"].as_str() {
                Some(m) => m.to_string(),
                None => s("filter"),
            }
        )?;
    }
    Ok(())
}
