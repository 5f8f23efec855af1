//! Forwarding the vaults' records to a remote syslog collector, so a fleet
//! can centralise its logs in the tools it already has: RFC 5424 messages
//! over TCP with octet-counting framing (`LEN SP MSG`, RFC 6587 / the framing
//! of RFC 5425). The vault stays the record of truth: forwarding never
//! blocks a pump; if the collector is slow or away, records wait in a bounded
//! queue, and what does not fit is counted and can be re-sent from the vault
//! (`vmwatch logs --vm NAME --rfc5424`).
//!
//! TLS (RFC 5425 proper) is not implemented yet: put a TLS proxy (stunnel,
//! the collector's own TLS listener in front of its TCP one) on the host.

use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

/// Messages waiting for the collector at most.
const QUEUE: usize = 65_536;

/// Counters of the forwarder.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub sent: AtomicU64,
    /// Lost because the queue was full (the vault still has them).
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
}

/// The sending half, shared by every VM's vault engine.
#[derive(Clone)]
pub struct Forwarder {
    tx: SyncSender<String>,
    pub stats: Arc<ForwardStats>,
    pub target: String,
}

impl Forwarder {
    /// Parses `tcp://HOST:PORT` and starts the sender thread.
    pub fn start(url: &str) -> Result<Forwarder, String> {
        let Some(hostport) = url.strip_prefix("tcp://") else {
            return Err(format!(
                "cannot forward to `{url}`: use tcp://HOST:PORT (TLS: put a TLS proxy in front)"
            ));
        };
        let addrs: Vec<SocketAddr> = hostport
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{hostport}`: {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("`{hostport}` resolves to no address"));
        }
        let (tx, rx) = sync_channel(QUEUE);
        let stats = Arc::new(ForwardStats::default());
        let s = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("forward".into())
            .spawn(move || run(rx, addrs, &s))
            .map_err(|e| format!("cannot start the forwarder: {e}"))?;
        Ok(Forwarder {
            tx,
            stats,
            target: url.to_string(),
        })
    }

    /// Queues one RFC 5424 message; never blocks.
    pub fn send(&self, msg: String) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// `LEN SP MSG` (octet counting).
pub fn frame(msg: &str) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

fn run(rx: Receiver<String>, addrs: Vec<SocketAddr>, stats: &ForwardStats) {
    let mut conn: Option<TcpStream> = None;
    let mut pending: Option<String> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        let msg = match pending.take() {
            Some(m) => m,
            None => match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            },
        };
        if conn.is_none() {
            conn = addrs
                .iter()
                .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(3)).ok());
            match &conn {
                Some(c) => {
                    let _ = c.set_write_timeout(Some(Duration::from_secs(5)));
                    let _ = c.set_nodelay(true);
                    backoff = Duration::from_millis(100);
                }
                None => {
                    pending = Some(msg);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match c.write_all(&frame(&msg)) {
            Ok(()) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("forwarding: {e}; reconnecting");
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                conn = None;
                pending = Some(msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn frames_and_delivers_in_order() {
        assert_eq!(frame("<14>1 x"), b"7 <14>1 x".to_vec());
        assert!(Forwarder::start("udp://127.0.0.1:1").is_err());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let f = Forwarder::start(&format!("tcp://127.0.0.1:{port}")).unwrap();
        for i in 0..100 {
            f.send(format!("<14>1 - h app - - - message {i}"));
        }
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while got.len() < 100 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
            // Parse complete frames.
            let mut msgs = Vec::new();
            let mut rest = &got[..];
            while let Some(sp) = rest.iter().position(|&b| b == b' ') {
                let len: usize = std::str::from_utf8(&rest[..sp]).unwrap().parse().unwrap();
                if rest.len() < sp + 1 + len {
                    break;
                }
                msgs.push(String::from_utf8(rest[sp + 1..sp + 1 + len].to_vec()).unwrap());
                rest = &rest[sp + 1 + len..];
            }
            if msgs.len() == 100 {
                for (i, m) in msgs.iter().enumerate() {
                    assert_eq!(m, &format!("<14>1 - h app - - - message {i}"));
                }
                break;
            }
        }
        // The counter follows the write that the reader already saw.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while f.stats.sent.load(Ordering::Relaxed) < 100 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(f.stats.sent.load(Ordering::Relaxed), 100);
        assert_eq!(f.stats.dropped.load(Ordering::Relaxed), 0);
    }
}
