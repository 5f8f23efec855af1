//! A small client for the GDB remote serial protocol (RSP) as QEMU's
//! gdbstub speaks it over a unix socket (all-stop mode, acknowledged
//! packets: QEMU has no no-ack mode).
//!
//! Two layers:
//! - pure, fuzzable parsing: [`Framer`] cuts the byte stream into frames
//!   (`$payload#cs`, `+`, `-`, `%notification#cs`), [`decode_payload`] undoes
//!   escapes and run-length encoding, [`StopReply::parse`] reads stop replies.
//!   None of them panics or allocates without bound on any input.
//! - [`Client`]: one connection, one request at a time, a deadline on every
//!   wait.
//!
//! QEMU behaviour this client relies on (read from QEMU 10's
//! `gdbstub/gdbstub.c` and `gdbstub/system.c`, checked against QEMU 10.0.2):
//! - Connecting stops the VM; `?` answers with the stop reason and removes
//!   every breakpoint left by an earlier client; `D` removes all breakpoints
//!   and resumes the VM.
//! - Any byte other than 0x03 that reaches QEMU while the VM runs stops the
//!   VM *without* a stop reply, and any byte received clears QEMU's
//!   permission to send one. So after `c` the client sends nothing but 0x03
//!   until the stop reply has arrived; packets are acknowledged only while
//!   the VM is stopped (QEMU only sends packets then).
//! - The stop reply names the vCPU that stopped (`T05thread:02;`, thread =
//!   cpu_index + 1) and makes it the current thread for `g`, `p`, `m` and `c`.
//! - Every debug stop under TCG flushes the whole translation cache; this is
//!   most of the cost of a breakpoint hit there.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest decoded packet payload accepted (QEMU's own limit is 4096 bytes).
pub const MAX_PACKET: usize = 64 * 1024;
/// Largest object read through `qXfer` (target descriptions are ~10 KiB).
pub const MAX_XFER: usize = 1 << 20;
/// Most vCPU threads listed by `qfThreadInfo`/`qsThreadInfo`.
pub const MAX_THREADS: usize = 4096;
/// Packets received but not consumed yet that are kept (more is a protocol error).
const MAX_QUEUED: usize = 64;
/// Retransmissions of one packet after `-` before giving up.
const MAX_NACKS: u32 = 8;

/// Why a gdbstub operation failed. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum RspError {
    #[error("cannot connect to the gdbstub at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("gdbstub connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("gdbstub closed the connection")]
    Closed,
    #[error("gdbstub did not answer `{0}` in time")]
    Timeout(String),
    #[error("gdbstub sent a malformed packet in reply to `{cmd}`: {what}")]
    Malformed { cmd: String, what: String },
    #[error("gdbstub sent a packet over {MAX_PACKET} bytes")]
    Oversized,
    #[error("gdbstub kept rejecting the checksum of `{0}`")]
    Nacked(String),
    #[error("gdbstub refused `{cmd}` with error {code}")]
    Refused { cmd: String, code: String },
    #[error("gdbstub does not support `{0}`")]
    Unsupported(String),
    #[error("too many unread packets from the gdbstub")]
    Flooded,
}

type Result<T> = std::result::Result<T, RspError>;

/// Modulo-256 sum of the bytes between `$` and `#`.
pub fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// `$payload#cs` with the protocol's special bytes (`$ # } *`) escaped.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + 4);
    for &b in payload {
        if matches!(b, b'$' | b'#' | b'}' | b'*') {
            body.push(b'}');
            body.push(b ^ 0x20);
        } else {
            body.push(b);
        }
    }
    let cs = checksum(&body);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(b'$');
    out.extend_from_slice(&body);
    out.push(b'#');
    out.extend_from_slice(format!("{cs:02x}").as_bytes());
    out
}

/// Undoes `}` escapes and `*` run-length encoding. `None` when the payload
/// is malformed (dangling escape, repeat with nothing to repeat, bad count)
/// or decodes to more than [`MAX_PACKET`] bytes.
pub fn decode_payload(raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len().min(MAX_PACKET));
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'}' => {
                out.push(raw.get(i + 1)? ^ 0x20);
                i += 2;
            }
            b'*' => {
                let prev = *out.last()?;
                // The count byte is the number of extra copies plus 29 (printable).
                let n = usize::from(raw.get(i + 1)?.checked_sub(29)?);
                if out.len() + n > MAX_PACKET {
                    return None;
                }
                out.resize(out.len() + n, prev);
                i += 2;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
        if out.len() > MAX_PACKET {
            return None;
        }
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A big-endian hex number of 1..=16 digits (how RSP writes addresses and ids).
pub fn parse_hex_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter()
        .try_fold(0u64, |acc, &c| Some(acc << 4 | u64::from(hex_digit(c)?)))
}

/// Bytes from their hex encoding (registers, memory).
pub fn decode_hex(s: &[u8]) -> Option<Vec<u8>> {
    if s.len() & 1 != 0 || s.len() > 2 * MAX_PACKET {
        return None;
    }
    s.chunks_exact(2)
        .map(|p| Some(hex_digit(p[0])? << 4 | hex_digit(p[1])?))
        .collect()
}

/// One unit of the byte stream from the stub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `+`: the stub received our last packet.
    Ack,
    /// `-`: the stub wants our last packet again.
    Nack,
    /// A packet with a good checksum, payload decoded.
    Packet(Vec<u8>),
    /// `%...#cs` (non-stop notifications; QEMU does not send them).
    Notification(Vec<u8>),
    /// A packet whose checksum did not match (ask again with `-`).
    BadChecksum,
    /// A packet that did not decode or was longer than [`MAX_PACKET`]; dropped.
    Malformed,
}

/// Cuts the stub's byte stream into [`Frame`]s; keeps partial frames
/// between reads. Bytes outside frames are skipped.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    /// Adds bytes read from the stub.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held for an incomplete frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, if the buffer holds one.
    pub fn next_frame(&mut self) -> Option<Frame> {
        // Skip noise up to the next byte that can start a frame.
        let start = self
            .buf
            .iter()
            .position(|b| matches!(b, b'+' | b'-' | b'$' | b'%'))
            .unwrap_or(self.buf.len());
        self.buf.drain(..start);
        let first = *self.buf.first()?;
        if first == b'+' || first == b'-' {
            self.buf.drain(..1);
            return Some(if first == b'+' {
                Frame::Ack
            } else {
                Frame::Nack
            });
        }
        let Some(hash) = self.buf.iter().skip(1).position(|&b| b == b'#') else {
            if self.buf.len() > 2 * MAX_PACKET + 4 {
                // No end in sight: drop this start and resynchronise.
                self.buf.drain(..1);
                return Some(Frame::Malformed);
            }
            return None;
        };
        let hash = hash + 1;
        if self.buf.len() < hash + 3 {
            return None;
        }
        let raw = &self.buf[1..hash];
        let sum = match (hex_digit(self.buf[hash + 1]), hex_digit(self.buf[hash + 2])) {
            (Some(h), Some(l)) => Some(h << 4 | l),
            _ => None,
        };
        let frame = if raw.len() > 2 * MAX_PACKET {
            Frame::Malformed
        } else if sum != Some(checksum(raw)) {
            Frame::BadChecksum
        } else {
            match decode_payload(raw) {
                Some(p) if first == b'$' => Frame::Packet(p),
                Some(p) => Frame::Notification(p),
                None => Frame::Malformed,
            }
        };
        self.buf.drain(..hash + 3);
        Some(frame)
    }
}

/// Why the target stopped, from a stop reply packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReply {
    /// `S`/`T`: stopped with a signal (5 = SIGTRAP: breakpoint or step done;
    /// 2 = SIGINT: interrupted). `thread` is the vCPU (cpu_index + 1).
    Signal { signal: u8, thread: Option<u32> },
    /// `W`: the target exited (QEMU: the VM shut down).
    Exited { code: u8 },
    /// `X`: the target was terminated by a signal.
    Terminated { signal: u8 },
}

/// SIGTRAP: a breakpoint or a finished single-step.
pub const SIGTRAP: u8 = 5;
/// SIGINT: stopped by our interrupt (0x03).
pub const SIGINT: u8 = 2;

/// A thread id as RSP writes it: `hex` or `p<pid>.<tid>` (multiprocess).
/// `None` for "all" (`-1`), "any" (`0`) and anything malformed.
pub fn parse_thread_id(s: &[u8]) -> Option<u32> {
    let tid = match s.strip_prefix(b"p") {
        Some(rest) => {
            let dot = rest.iter().position(|&b| b == b'.')?;
            parse_hex_u64(&rest[..dot])?;
            &rest[dot + 1..]
        }
        None => s,
    };
    match parse_hex_u64(tid)? {
        0 => None,
        t => u32::try_from(t).ok(),
    }
}

impl StopReply {
    /// Parses a stop reply payload. `None` if it is not one (or malformed).
    pub fn parse(p: &[u8]) -> Option<StopReply> {
        let (&kind, rest) = p.split_first()?;
        let num = |r: &[u8]| -> Option<u8> {
            let n = r.get(..2)?;
            u8::try_from(parse_hex_u64(n)?).ok()
        };
        match kind {
            b'S' if rest.len() == 2 => Some(StopReply::Signal {
                signal: num(rest)?,
                thread: None,
            }),
            b'T' => {
                let signal = num(rest)?;
                let mut thread = None;
                for pair in rest[2..].split(|&b| b == b';') {
                    if pair.is_empty() {
                        continue;
                    }
                    let colon = pair.iter().position(|&b| b == b':')?;
                    if &pair[..colon] == b"thread" {
                        thread = Some(parse_thread_id(&pair[colon + 1..])?);
                    }
                }
                Some(StopReply::Signal { signal, thread })
            }
            b'W' => {
                let code = num(rest)?;
                matches!(rest.get(2), None | Some(b';')).then_some(StopReply::Exited { code })
            }
            b'X' => {
                let signal = num(rest)?;
                matches!(rest.get(2), None | Some(b';')).then_some(StopReply::Terminated { signal })
            }
            _ => None,
        }
    }

    /// The vCPU thread named in the reply.
    pub fn thread(&self) -> Option<u32> {
        match self {
            StopReply::Signal { thread, .. } => *thread,
            _ => None,
        }
    }
}

/// `O<hex>`: console output the stub forwards (not a stop reply).
fn is_console_output(p: &[u8]) -> bool {
    p.len() >= 3
        && p[0] == b'O'
        && p.len() % 2 == 1
        && p[1..].iter().all(|&c| hex_digit(c).is_some())
}

/// Packet and byte counters of one connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub packets_sent: u64,
    pub packets_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

enum Event {
    Ack,
    Packet,
}

/// One connection to a gdbstub.
pub struct Client {
    stream: UnixStream,
    framer: Framer,
    queued: VecDeque<Vec<u8>>,
    /// The last packet sent, for retransmission on `-`.
    last_sent: Vec<u8>,
    nacks: u32,
    /// Deadline for each request's answer.
    pub timeout: Duration,
    /// Largest packet the stub accepts (from `qSupported`).
    pub packet_size: usize,
    pub counters: Counters,
}

impl Client {
    /// Connects to the stub's unix socket. QEMU stops the VM on connect.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client> {
        let stream = UnixStream::connect(path).map_err(|source| RspError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Client {
            stream,
            framer: Framer::default(),
            queued: VecDeque::new(),
            last_sent: Vec::new(),
            nacks: 0,
            timeout,
            packet_size: 4096,
            counters: Counters::default(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        self.counters.bytes_sent += bytes.len() as u64;
        Ok(())
    }

    /// Reads once, waiting at most until `deadline`. False on timeout.
    fn fill(&mut self, deadline: Instant) -> Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        self.stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut buf = [0u8; 8192];
        match self.stream.read(&mut buf) {
            Ok(0) => Err(RspError::Closed),
            Ok(n) => {
                self.counters.bytes_received += n as u64;
                self.framer.push(&buf[..n]);
                Ok(true)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// The next ack or packet (packets are acknowledged and queued), or
    /// `None` at the deadline.
    fn next_event(&mut self, deadline: Instant, cmd: &str) -> Result<Option<Event>> {
        loop {
            while let Some(frame) = self.framer.next_frame() {
                match frame {
                    Frame::Ack => return Ok(Some(Event::Ack)),
                    Frame::Nack => {
                        self.nacks += 1;
                        if self.nacks > MAX_NACKS {
                            return Err(RspError::Nacked(cmd.to_string()));
                        }
                        let again = std::mem::take(&mut self.last_sent);
                        self.write(&again)?;
                        self.last_sent = again;
                    }
                    Frame::Packet(p) => {
                        // QEMU sends packets only while the VM is stopped, so
                        // this ack cannot stop a running VM (see module docs).
                        self.write(b"+")?;
                        self.counters.packets_received += 1;
                        if self.queued.len() >= MAX_QUEUED {
                            return Err(RspError::Flooded);
                        }
                        self.queued.push_back(p);
                        return Ok(Some(Event::Packet));
                    }
                    Frame::BadChecksum => self.write(b"-")?,
                    Frame::Notification(_) => {}
                    Frame::Malformed => return Err(RspError::Oversized),
                }
            }
            if !self.fill(deadline)? {
                return Ok(None);
            }
        }
    }

    /// Sends one packet and waits for the stub's `+`.
    pub fn send(&mut self, cmd: &str) -> Result<()> {
        let framed = frame(cmd.as_bytes());
        self.write(&framed)?;
        self.last_sent = framed;
        self.nacks = 0;
        self.counters.packets_sent += 1;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.next_event(deadline, cmd)? {
                Some(Event::Ack) => return Ok(()),
                Some(Event::Packet) => continue,
                None => return Err(RspError::Timeout(cmd.to_string())),
            }
        }
    }

    /// The next packet from the stub, or `None` at the deadline.
    pub fn recv(&mut self, deadline: Instant, cmd: &str) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(p) = self.queued.pop_front() {
                return Ok(Some(p));
            }
            if self.next_event(deadline, cmd)?.is_none() {
                return Ok(None);
            }
        }
    }

    /// Sends `cmd` and returns the reply; `E..` replies become
    /// [`RspError::Refused`], the empty reply [`RspError::Unsupported`].
    pub fn request(&mut self, cmd: &str) -> Result<Vec<u8>> {
        self.send(cmd)?;
        let deadline = Instant::now() + self.timeout;
        let reply = self
            .recv(deadline, cmd)?
            .ok_or_else(|| RspError::Timeout(cmd.to_string()))?;
        if reply.is_empty() {
            return Err(RspError::Unsupported(cmd.to_string()));
        }
        if reply.len() == 3 && reply[0] == b'E' && parse_hex_u64(&reply[1..]).is_some() {
            return Err(RspError::Refused {
                cmd: cmd.to_string(),
                code: String::from_utf8_lossy(&reply[1..]).into_owned(),
            });
        }
        Ok(reply)
    }

    /// A request whose only good answer is `OK`.
    pub fn request_ok(&mut self, cmd: &str) -> Result<()> {
        let reply = self.request(cmd)?;
        if reply != b"OK" {
            return Err(malformed(cmd, &reply));
        }
        Ok(())
    }

    /// `qSupported`: learns the packet size; returns the stub's feature list.
    pub fn query_supported(&mut self) -> Result<String> {
        // multiprocess+: QEMU never turns that mode off once a client asked for
        // it, so ask for it always and get the same thread-id format
        // (`p1.N`) whichever client came before.
        let reply = self.request("qSupported:multiprocess+;xmlRegisters=i386;vContSupported+")?;
        let text = String::from_utf8_lossy(&reply).into_owned();
        for feature in text.split(';') {
            if let Some(size) = feature.strip_prefix("PacketSize=") {
                if let Some(n) = parse_hex_u64(size.as_bytes()) {
                    self.packet_size = (n as usize).clamp(256, MAX_PACKET);
                }
            }
        }
        Ok(text)
    }

    /// Whether `vCont` supports continue and step (`vCont?`).
    pub fn has_vcont_step(&mut self) -> Result<bool> {
        match self.request("vCont?") {
            Ok(r) => {
                let actions: Vec<&[u8]> = r.split(|&b| b == b';').collect();
                Ok(actions.first() == Some(&&b"vCont"[..])
                    && actions.contains(&&b"s"[..])
                    && actions.contains(&&b"c"[..]))
            }
            Err(RspError::Unsupported(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `?`: why the target is stopped. QEMU also drops all breakpoints here.
    pub fn halt_reason(&mut self) -> Result<StopReply> {
        let reply = self.request("?")?;
        StopReply::parse(&reply).ok_or_else(|| malformed("?", &reply))
    }

    /// Reads a whole `qXfer` object (e.g. `features`, `target.xml`).
    pub fn read_xfer(&mut self, object: &str, annex: &str) -> Result<Vec<u8>> {
        let chunk = self.packet_size.saturating_sub(32).max(64);
        let mut out = Vec::new();
        // Each round adds at least one byte or ends, so this is bounded by MAX_XFER.
        loop {
            let cmd = format!("qXfer:{object}:read:{annex}:{:x},{chunk:x}", out.len());
            let reply = self.request(&cmd)?;
            let (&kind, data) = reply.split_first().ok_or_else(|| malformed(&cmd, &reply))?;
            if out.len() + data.len() > MAX_XFER {
                return Err(malformed(&cmd, b"object larger than 1 MiB"));
            }
            out.extend_from_slice(data);
            match kind {
                b'l' => return Ok(out),
                b'm' if !data.is_empty() => {}
                _ => return Err(malformed(&cmd, &reply)),
            }
        }
    }

    /// The vCPU threads (`qfThreadInfo`, `qsThreadInfo`...).
    pub fn thread_ids(&mut self) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut cmd = "qfThreadInfo";
        for _ in 0..MAX_THREADS {
            let reply = self.request(cmd)?;
            match reply.split_first() {
                Some((b'l', _)) => return Ok(ids),
                Some((b'm', list)) => {
                    for t in list.split(|&b| b == b',') {
                        let id = parse_thread_id(t).ok_or_else(|| malformed(cmd, &reply))?;
                        if ids.len() >= MAX_THREADS {
                            return Err(malformed(cmd, b"too many threads"));
                        }
                        ids.push(id);
                    }
                }
                _ => return Err(malformed(cmd, &reply)),
            }
            cmd = "qsThreadInfo";
        }
        Err(malformed(cmd, b"thread list does not end"))
    }

    /// `Hg`: the thread whose registers `g`/`p`/`m` read.
    pub fn select_thread(&mut self, thread: u32) -> Result<()> {
        self.request_ok(&format!("Hg{thread:x}"))
    }

    /// `g`: all registers of the current thread, in target-description order.
    pub fn read_registers(&mut self) -> Result<Vec<u8>> {
        let reply = self.request("g")?;
        decode_hex(&reply).ok_or_else(|| malformed("g", &reply))
    }

    /// `p`: one register of the current thread.
    pub fn read_register(&mut self, regnum: u32) -> Result<Vec<u8>> {
        let cmd = format!("p{regnum:x}");
        let reply = self.request(&cmd)?;
        decode_hex(&reply).ok_or_else(|| malformed(&cmd, &reply))
    }

    /// `P`: writes one register of the current thread (bytes in target order).
    pub fn write_register(&mut self, regnum: u32, value: &[u8]) -> Result<()> {
        let hex: String = value.iter().map(|b| format!("{b:02x}")).collect();
        self.request_ok(&format!("P{regnum:x}={hex}"))
    }

    /// `m`: guest virtual memory as the current vCPU sees it (its page tables).
    pub fn read_memory(&mut self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let cmd = format!("m{addr:x},{len:x}");
        if len == 0 || 2 * len + 8 > self.packet_size {
            return Err(RspError::Unsupported(cmd));
        }
        let reply = self.request(&cmd)?;
        match decode_hex(&reply) {
            Some(bytes) if bytes.len() == len => Ok(bytes),
            _ => Err(malformed(&cmd, &reply)),
        }
    }

    /// `Z1`: a hardware breakpoint (debug registers under KVM; under TCG the
    /// same as a software one, without touching guest memory).
    pub fn insert_hw_breakpoint(&mut self, addr: u64) -> Result<()> {
        self.request_ok(&format!("Z1,{addr:x},1"))
    }

    /// `z1`: removes a hardware breakpoint.
    pub fn remove_hw_breakpoint(&mut self, addr: u64) -> Result<()> {
        self.request_ok(&format!("z1,{addr:x},1"))
    }

    /// `c` (all vCPUs), or `c ADDR`: the current thread resumes at `addr`.
    /// No reply until the next stop ([`Client::wait_stop`]).
    pub fn resume(&mut self, at: Option<u64>) -> Result<()> {
        match at {
            Some(a) => self.send(&format!("c{a:x}")),
            None => self.send("c"),
        }
    }

    /// `vCont;s:T`: single-steps vCPU `thread` alone (the others stay
    /// stopped) and waits for it to stop.
    pub fn step(&mut self, thread: u32) -> Result<StopReply> {
        let cmd = format!("vCont;s:{thread:x}");
        self.send(&cmd)?;
        let deadline = Instant::now() + self.timeout;
        self.wait_stop(deadline)?.ok_or(RspError::Timeout(cmd))
    }

    /// The next stop reply, or `None` at the deadline (the target keeps
    /// running; call again). Console output packets are skipped.
    pub fn wait_stop(&mut self, deadline: Instant) -> Result<Option<StopReply>> {
        loop {
            let Some(p) = self.recv(deadline, "stop reply")? else {
                return Ok(None);
            };
            if is_console_output(&p) {
                continue;
            }
            return StopReply::parse(&p)
                .map(Some)
                .ok_or_else(|| malformed("stop reply", &p));
        }
    }

    /// Stops a running target (0x03) and returns its stop reply. If a
    /// breakpoint stopped it first, that stop reply is returned instead
    /// (QEMU ignores 0x03 while stopped): exactly one reply either way.
    pub fn interrupt(&mut self) -> Result<StopReply> {
        self.write(&[0x03])?;
        let deadline = Instant::now() + self.timeout;
        self.wait_stop(deadline)?
            .ok_or_else(|| RspError::Timeout("interrupt (0x03)".to_string()))
    }

    /// `D;1`: QEMU removes every breakpoint and resumes the VM. The process
    /// id is always given: QEMU keeps multiprocess mode on once any client
    /// (e.g. an earlier gdb) asked for it, and then refuses a bare `D`; in
    /// system emulation the one process (no CPU clusters on x86) is 1.
    pub fn detach(&mut self) -> Result<()> {
        self.request_ok("D;1")
    }
}

fn malformed(cmd: &str, reply: &[u8]) -> RspError {
    let mut what = String::from_utf8_lossy(&reply[..reply.len().min(80)]).into_owned();
    what.retain(|c| !c.is_control());
    if reply.len() > 80 {
        what.push_str("...");
    }
    RspError::Malformed {
        cmd: cmd.to_string(),
        what: format!("`{what}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut f = Framer::default();
        f.push(bytes);
        std::iter::from_fn(|| f.next_frame()).collect()
    }

    #[test]
    fn frames_and_checksums() {
        assert_eq!(frame(b"g"), b"$g#67");
        assert_eq!(frame(b"?"), b"$?#3f");
        assert_eq!(frame(b"a#b"), b"$a}\x03b#43".to_vec());
        assert_eq!(
            frames(b"+$OK#9a+junk-$T05thread:02;#07"),
            vec![
                Frame::Ack,
                Frame::Packet(b"OK".to_vec()),
                Frame::Ack,
                Frame::Nack,
                Frame::BadChecksum,
            ]
        );
        let reply = frame(b"T05thread:02;");
        assert_eq!(
            frames(&reply),
            vec![Frame::Packet(b"T05thread:02;".to_vec())]
        );
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut f = Framer::default();
        let whole = frame(b"T05thread:01;");
        for (i, b) in whole.iter().enumerate() {
            assert_eq!(f.next_frame(), None, "after {i} bytes");
            f.push(&[*b]);
        }
        assert_eq!(
            f.next_frame(),
            Some(Frame::Packet(b"T05thread:01;".to_vec()))
        );
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn escapes_and_run_length() {
        assert_eq!(decode_payload(b"0* "), Some(b"0000".to_vec()));
        assert_eq!(decode_payload(b"}\x03}\x04"), Some(b"#$".to_vec()));
        assert_eq!(decode_payload(b"*!"), None, "nothing to repeat");
        assert_eq!(decode_payload(b"a}"), None, "dangling escape");
        assert_eq!(decode_payload(b"a*\x01"), None, "count below 29");
        let big: Vec<u8> = std::iter::once(b'a')
            .chain((0..MAX_PACKET / 90 + 2).flat_map(|_| [b'*', b'~']))
            .collect();
        assert_eq!(decode_payload(&big), None, "bounded output");
    }

    #[test]
    fn stop_replies() {
        assert_eq!(
            StopReply::parse(b"T05thread:02;"),
            Some(StopReply::Signal {
                signal: 5,
                thread: Some(2)
            })
        );
        assert_eq!(
            StopReply::parse(b"T05thread:p01.0a;swbreak:;"),
            Some(StopReply::Signal {
                signal: 5,
                thread: Some(10)
            })
        );
        assert_eq!(
            StopReply::parse(b"T02thread:01;"),
            Some(StopReply::Signal {
                signal: 2,
                thread: Some(1)
            })
        );
        assert_eq!(
            StopReply::parse(b"S05"),
            Some(StopReply::Signal {
                signal: 5,
                thread: None
            })
        );
        assert_eq!(
            StopReply::parse(b"W00"),
            Some(StopReply::Exited { code: 0 })
        );
        assert_eq!(
            StopReply::parse(b"X09;process:1"),
            Some(StopReply::Terminated { signal: 9 })
        );
        for junk in [
            &b""[..],
            b"T",
            b"T5",
            b"Tzz",
            b"T05thread",
            b"T05thread:;",
            b"T05thread:-1;",
            b"T05thread:p1;",
            b"T05thread:123456789;",
            b"OK",
            b"W",
            b"S051",
            b"E01",
        ] {
            assert_eq!(StopReply::parse(junk), None, "{junk:?}");
        }
        assert!(is_console_output(b"O6869"));
        assert!(!is_console_output(b"OK"));
    }

    #[test]
    fn hex_helpers() {
        assert_eq!(
            parse_hex_u64(b"ffffffff81c00080"),
            Some(0xffff_ffff_81c0_0080)
        );
        assert_eq!(parse_hex_u64(b"1ffffffff81c00080"), None);
        assert_eq!(parse_hex_u64(b""), None);
        assert_eq!(decode_hex(b"00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex(b"0"), None);
        assert_eq!(decode_hex(b"xx"), None);
        assert_eq!(parse_thread_id(b"p01.02"), Some(2));
        assert_eq!(parse_thread_id(b"0"), None);
    }

    #[test]
    fn runaway_packet_is_dropped_and_stream_resyncs() {
        let mut f = Framer::default();
        f.push(b"$");
        f.push(&vec![b'a'; 2 * MAX_PACKET + 8]);
        assert_eq!(f.next_frame(), Some(Frame::Malformed));
        f.push(b"#00");
        // The tail is noise now (no '$' before it); a good packet follows.
        f.push(&frame(b"OK"));
        let rest: Vec<Frame> = std::iter::from_fn(|| f.next_frame()).collect();
        assert_eq!(rest.last(), Some(&Frame::Packet(b"OK".to_vec())));
    }

    proptest::proptest! {
        /// Any byte soup: the framer and parsers never panic, always make
        /// progress, and keep at most a bounded buffer.
        #[test]
        fn junk_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 0..20)) {
            let mut f = Framer::default();
            for c in &chunks {
                f.push(c);
                while let Some(fr) = f.next_frame() {
                    if let Frame::Packet(p) | Frame::Notification(p) = fr {
                        let _ = StopReply::parse(&p);
                        let _ = decode_hex(&p);
                        let _ = is_console_output(&p);
                    }
                }
                proptest::prop_assert!(f.pending() <= 2 * MAX_PACKET + 8 + 300);
            }
            for c in &chunks {
                let _ = StopReply::parse(c);
                let _ = decode_payload(c);
                let _ = parse_thread_id(c);
            }
        }

        /// Whatever we frame comes back out unchanged, also split at any point.
        #[test]
        fn frame_round_trip(payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), cut in 0usize..700) {
            let bytes = frame(&payload);
            let cut = cut.min(bytes.len());
            let mut f = Framer::default();
            f.push(&bytes[..cut]);
            let mut got: Vec<Frame> = std::iter::from_fn(|| f.next_frame()).collect();
            f.push(&bytes[cut..]);
            got.extend(std::iter::from_fn(|| f.next_frame()));
            // A payload starting with '+'/'-' noise cannot occur: the frame starts with '$'.
            proptest::prop_assert_eq!(got, vec![Frame::Packet(payload)]);
        }
    }
}
