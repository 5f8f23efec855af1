//! Host side of the test agent protocol ([`vmwatch_agent`]): one connection
//! to the VM's `agent.sock` (QEMU's end of the guest's `/dev/ttyS1`).
//!
//! QEMU serves one client at a time on that socket, so callers hold the VM's
//! agent lock while connected (see `Vm::exec`). Every wait has a deadline
//! and a liveness check, so a dead or hung guest is an error, never a hang.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmwatch_agent::{ExecRequest, ExecResponse, FromAgent, Ping, ToAgent, MAX_OUTPUT};

use crate::error::{LabError, Result};

/// How often a waiting reader wakes to check that QEMU still lives.
const POLL: Duration = Duration::from_millis(250);

/// Longest line we accept from the agent: two base64'd [`MAX_OUTPUT`]s plus slack.
const MAX_LINE: usize = MAX_OUTPUT * 3 + (1 << 20);

/// Request ids unique across processes (pid in the high bits), so a reply
/// left in the pipe for a client that gave up is never taken for ours.
fn next_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    (u64::from(std::process::id()) << 32) | (COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff)
}

/// What ended a wait for the agent.
pub enum Event {
    Line(FromAgent),
    /// QEMU closed the socket (it exited).
    Closed,
    /// The deadline passed.
    Timeout,
}

/// A connection to one VM's agent.
pub struct AgentConn {
    name: String,
    log: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    partial: Vec<u8>,
}

impl AgentConn {
    /// Connects to `socket`. `name` and `log` (the serial log) label errors.
    pub fn connect(socket: &Path, name: &str, log: &Path) -> std::io::Result<AgentConn> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(POLL))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        let reader = BufReader::with_capacity(1 << 20, stream.try_clone()?);
        Ok(AgentConn {
            name: name.to_string(),
            log: log.to_path_buf(),
            writer: stream,
            reader,
            partial: Vec::new(),
        })
    }

    fn agent_err(&self, detail: impl Into<String>) -> LabError {
        LabError::Agent {
            name: self.name.clone(),
            detail: detail.into(),
        }
    }

    /// Sends one message. A leading newline ends any half line an earlier
    /// client left in the agent's buffer, so ours parses on its own.
    pub fn send(&mut self, msg: &ToAgent) -> Result<()> {
        let mut line = b"\n".to_vec();
        line.extend(serde_json::to_vec(msg).expect("requests serialise"));
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .and_then(|()| self.writer.flush())
            .map_err(|e| self.agent_err(format!("cannot send request: {e}")))
    }

    /// Waits for the next line that parses as an agent message, until
    /// `deadline`. `alive` is asked at every wake-up; when it says QEMU is
    /// gone the wait ends as [`Event::Closed`].
    pub fn next_event(&mut self, deadline: Instant, alive: &dyn Fn() -> bool) -> Result<Event> {
        loop {
            if Instant::now() >= deadline {
                return Ok(Event::Timeout);
            }
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Ok(Event::Closed),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    match serde_json::from_slice::<FromAgent>(&line) {
                        Ok(msg) => return Ok(Event::Line(msg)),
                        Err(_) => {
                            // Echo, half lines from an earlier client, noise: skip.
                            tracing::trace!("agent: ignoring {:?}", String::from_utf8_lossy(&line));
                        }
                    }
                }
                Ok(_) => {} // partial line without newline: EOF follows
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    if !alive() {
                        return Ok(Event::Closed);
                    }
                }
                Err(e) => return Err(self.agent_err(format!("read: {e}"))),
            }
            if self.partial.len() > MAX_LINE {
                return Err(self.agent_err(format!("reply line longer than {MAX_LINE} bytes")));
            }
        }
    }

    /// Sends a ping and waits for its pong (or a `ready` line).
    pub fn ping(&mut self, wait: Duration, alive: &dyn Fn() -> bool) -> Result<bool> {
        let n = next_id();
        self.send(&ToAgent::Ping(Ping { ping: n }))?;
        let deadline = Instant::now() + wait;
        loop {
            match self.next_event(deadline, alive)? {
                Event::Line(FromAgent::Pong(p)) if p.pong == n => return Ok(true),
                Event::Line(FromAgent::Ready(_)) => return Ok(true),
                Event::Line(_) => {}
                Event::Closed | Event::Timeout => return Ok(false),
            }
        }
    }

    /// Runs a command and waits up to `wait` for its result.
    pub fn exec(
        &mut self,
        mut req: ExecRequest,
        wait: Duration,
        alive: &dyn Fn() -> bool,
    ) -> Result<ExecResponse> {
        let deadline = Instant::now() + wait;
        req.id = next_id();
        let id = req.id;
        let program = req.argv.first().cloned().unwrap_or_default();
        self.send(&ToAgent::Exec(req))?;
        loop {
            match self.next_event(deadline, alive)? {
                Event::Line(FromAgent::Exec(r)) if r.id == id => return Ok(r),
                Event::Line(FromAgent::Error(e)) if e.id == Some(id) => {
                    return Err(self.agent_err(e.error));
                }
                Event::Line(FromAgent::Ready(_)) => {
                    return Err(self.agent_err(format!(
                        "the agent restarted while running `{program}` (did the command kill it?)"
                    )));
                }
                Event::Line(_) => {}
                Event::Closed => {
                    return Err(self.agent_err(format!(
                        "connection closed while running `{program}`: QEMU exited (see {})",
                        self.log.display()
                    )))
                }
                Event::Timeout => {
                    return Err(LabError::AgentTimeout {
                        name: self.name.clone(),
                        secs: wait.as_secs().max(1),
                        log: self.log.clone(),
                    })
                }
            }
        }
    }
}
