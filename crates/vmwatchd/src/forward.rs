//! Forwarding the vaults' records to a remote syslog collector, so a fleet
//! can centralise its logs in the tools it already has: RFC 5424 messages
//! with octet-counting framing (`LEN SP MSG`, RFC 6587 / RFC 5425), over
//! TCP (`tcp://HOST:PORT`) or TLS (`tls://HOST:PORT`, RFC 5425). The vault
//! stays the record of truth: forwarding never blocks a pump; if the
//! collector is slow, away or refuses us, records wait in a bounded queue,
//! and what does not fit is counted and can be re-sent from the vault
//! (`vmwatch logs --vm NAME --rfc5424`).
//!
//! TLS, and why it is done this way:
//! - rustls with the ring provider (no OpenSSL to link against, no cmake for
//!   aws-lc-rs), TLS 1.2 and 1.3: collectors (rsyslog, syslog-ng) still
//!   often stop at 1.2. The provider is passed explicitly, so another crate
//!   enabling a second one cannot make rustls' process default ambiguous.
//! - The collector's certificate is always verified (RFC 5425 wants
//!   authentication, and an unverified stream gives an attacker on the path
//!   the logs): against `--forward-ca` when given (a private CA is the usual
//!   case for collectors), else the system's roots; the name checked is HOST
//!   unless `--forward-server-name` says otherwise (HOST an IP address, a
//!   tunnel). There is no option to turn verification off.
//! - `--forward-cert`/`--forward-key`: the client certificate for collectors
//!   that require mutual authentication.
//! - Everything that can be checked before connecting (files, keys, names,
//!   the address) is checked at start-up and fails with one line; what only
//!   the collector can tell (a wrong CA or name, a refused client
//!   certificate) is a warning per attempt, counted in `tls_failures`, and
//!   retried with the same backoff as a refused TCP connection.
//! - A collector never speaks on a syslog stream except to end it (alerts,
//!   close_notify) or to hand out TLS 1.3 session tickets, so before each
//!   write we take in what has arrived: a record goes to a connection that
//!   is being closed only while the collector's alert is still on its way
//!   (that record is counted as sent, the vault keeps it; plain TCP has the
//!   same window). Under TLS 1.3 the server judges our certificate after
//!   our side of the handshake is done, so we also wait briefly for its
//!   first word ([`POST_HANDSHAKE_WAIT`]) before writing any record.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

/// Messages waiting for the collector at most.
const QUEUE: usize = 65_536;

/// Socket timeouts for connecting, the handshake and writes: a collector
/// that stops reading must not hold the queue forever.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long, after a TLS 1.3 handshake, we wait for the collector's first
/// records (session tickets, or the alert refusing our certificate).
/// Collectors answer at once; one that sends nothing costs this once per
/// connection.
pub const POST_HANDSHAKE_WAIT: Duration = Duration::from_millis(500);

/// Where and how to forward (`--forward` and the `--forward-*` options).
#[derive(Debug, Clone, Default)]
pub struct ForwardConfig {
    /// `tcp://HOST:PORT` or `tls://HOST:PORT`.
    pub url: String,
    /// tls://: PEM file of the CA certificate(s) the collector's
    /// certificate must chain to (default: the system's roots).
    pub ca: Option<PathBuf>,
    /// tls://: the name the collector's certificate must carry (default: HOST).
    pub server_name: Option<String>,
    /// tls://: our certificate chain (PEM), for mutual authentication.
    pub cert: Option<PathBuf>,
    /// tls://: the private key (PEM) of `cert`.
    pub key: Option<PathBuf>,
}

impl ForwardConfig {
    /// Plain `url`, no TLS options.
    pub fn new(url: impl Into<String>) -> ForwardConfig {
        ForwardConfig {
            url: url.into(),
            ..ForwardConfig::default()
        }
    }
}

/// Counters of the forwarder.
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub sent: AtomicU64,
    /// Lost because the queue was full (the vault still has them).
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
    /// TLS connections that failed: handshakes (wrong CA or name, our
    /// certificate refused) and TLS errors on a live connection.
    pub tls_failures: AtomicU64,
}

/// The sending half, shared by every VM's vault engine.
#[derive(Clone)]
pub struct Forwarder {
    tx: SyncSender<String>,
    pub stats: Arc<ForwardStats>,
    pub target: String,
}

/// What the sender thread connects to.
struct Target {
    /// HOST:PORT, for messages.
    name: String,
    addrs: Vec<SocketAddr>,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Forwarder {
    /// Checks `config` (URL, TLS files, the address) and starts the sender
    /// thread.
    pub fn start(config: &ForwardConfig) -> Result<Forwarder, String> {
        let url = config.url.as_str();
        let bad_url =
            || format!("cannot forward to `{url}`: use tcp://HOST:PORT or tls://HOST:PORT");
        let (tls, hostport) = if let Some(hp) = url.strip_prefix("tcp://") {
            (false, hp)
        } else if let Some(hp) = url.strip_prefix("tls://") {
            (true, hp)
        } else {
            return Err(bad_url());
        };
        let host = split_host(hostport).ok_or_else(bad_url)?;
        let tls = if tls {
            Some(tls_config(config, host)?)
        } else {
            if config.ca.is_some()
                || config.server_name.is_some()
                || config.cert.is_some()
                || config.key.is_some()
            {
                return Err(format!(
                    "--forward-ca, --forward-server-name, --forward-cert and --forward-key \
                     apply to tls:// only: use --forward tls://{hostport}"
                ));
            }
            None
        };
        let addrs: Vec<SocketAddr> = hostport
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{hostport}`: {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("`{hostport}` resolves to no address"));
        }
        let target = Target {
            name: hostport.to_string(),
            addrs,
            tls,
        };
        let (tx, rx) = sync_channel(QUEUE);
        let stats = Arc::new(ForwardStats::default());
        let s = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("forward".into())
            .spawn(move || run(rx, target, &s))
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

/// HOST of `HOST:PORT` (brackets of `[v6]:PORT` removed), if PORT is a port.
fn split_host(hostport: &str) -> Option<&str> {
    let (host, port) = hostport.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// The rustls client configuration and the name to verify, from the
/// `--forward-*` files; every error is one line saying what to fix.
fn tls_config(
    config: &ForwardConfig,
    host: &str,
) -> Result<(Arc<ClientConfig>, ServerName<'static>), String> {
    let mut roots = RootCertStore::empty();
    match &config.ca {
        Some(path) => {
            let p = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--forward-ca `{p}`: cannot read PEM certificates: {e}"))?;
            if certs.is_empty() {
                return Err(format!(
                    "--forward-ca `{p}`: no certificate in it (give the collector's CA, PEM)"
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("--forward-ca `{p}`: bad certificate: {e}"))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                let why = native
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(format!(
                    "no system root certificates found{why}: give the collector's CA with \
                     --forward-ca FILE"
                ));
            }
        }
    }
    let name = config.server_name.as_deref().unwrap_or(host);
    let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
        if config.server_name.is_some() {
            format!("--forward-server-name `{name}`: not a DNS name or IP address")
        } else {
            format!(
                "`{name}` is not a name a certificate can carry: give one with \
                 --forward-server-name NAME"
            )
        }
    })?;
    // Explicit provider: see the module doc.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_root_certificates(roots);
    let client = match (&config.cert, &config.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(
                "--forward-cert needs --forward-key (the certificate's private key, PEM)".into(),
            )
        }
        (None, Some(_)) => {
            return Err("--forward-key needs --forward-cert (the client certificate, PEM)".into())
        }
        (Some(cert), Some(key)) => {
            let c = cert.display();
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("--forward-cert `{c}`: cannot read PEM certificates: {e}"))?;
            if chain.is_empty() {
                return Err(format!("--forward-cert `{c}`: no certificate in it (PEM)"));
            }
            let k = key.display();
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("--forward-key `{k}`: cannot read a PEM private key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--forward-cert `{c}` with --forward-key `{k}`: {e}"))?
        }
    };
    Ok((Arc::new(client), server_name))
}

/// `LEN SP MSG` (octet counting).
pub fn frame(msg: &str) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

/// A connection to the collector.
enum Conn {
    Tcp(TcpStream),
    Tls(Box<ClientConnection>, TcpStream),
}

impl Conn {
    /// Writes one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(frame),
            Conn::Tls(tls, sock) => {
                // A collector closing or refusing us says so first: then the
                // record stays pending for the next connection.
                take_incoming(tls, sock, Duration::ZERO)?;
                tls.writer().write_all(frame)?;
                write_out(tls, sock)
            }
        }
    }

    /// Ends a TLS stream with close_notify, as RFC 5425 asks (best effort).
    fn close(self) {
        if let Conn::Tls(mut tls, mut sock) = self {
            tls.send_close_notify();
            let _ = write_out(&mut tls, &mut sock);
        }
    }
}

/// Writes what rustls has to send.
fn write_out(tls: &mut ClientConnection, sock: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        if tls.write_tls(sock)? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

/// Takes in what the collector sent, waiting at most `wait` (zero: only what
/// has arrived). It can only be session tickets (kept by nobody: we do not
/// resume), an alert or close_notify; the two last are errors.
fn take_incoming(
    tls: &mut ClientConnection,
    sock: &mut TcpStream,
    wait: Duration,
) -> io::Result<()> {
    if wait.is_zero() {
        sock.set_nonblocking(true)?;
    } else {
        sock.set_read_timeout(Some(wait))?;
    }
    let got = tls.read_tls(sock);
    if wait.is_zero() {
        sock.set_nonblocking(false)?;
    } else {
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
    }
    match got {
        Ok(0) => {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the collector closed the connection",
            ))
        }
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(())
        }
        Err(e) => return Err(e),
    }
    let state = tls
        .process_new_packets()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if state.peer_has_closed() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the collector closed the connection (close_notify)",
        ));
    }
    // Application data from a collector means nothing to us: discard it so
    // rustls' buffer never fills.
    let n = state.plaintext_bytes_to_read() as u64;
    if n > 0 {
        io::copy(&mut tls.reader().take(n), &mut io::sink())?;
    }
    Ok(())
}

/// Why connecting failed.
enum ConnectError {
    /// No address accepted a TCP connection.
    Unreachable,
    /// TCP connected, TLS failed.
    Tls(io::Error),
}

fn connect(target: &Target) -> Result<Conn, ConnectError> {
    let sock = target
        .addrs
        .iter()
        .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(3)).ok())
        .ok_or(ConnectError::Unreachable)?;
    let _ = sock.set_write_timeout(Some(IO_TIMEOUT));
    let _ = sock.set_nodelay(true);
    let Some((config, name)) = &target.tls else {
        return Ok(Conn::Tcp(sock));
    };
    let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
    handshake(config, name, sock).map_err(ConnectError::Tls)
}

fn handshake(
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    mut sock: TcpStream,
) -> io::Result<Conn> {
    let mut tls = ClientConnection::new(Arc::clone(config), name.clone())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    while tls.is_handshaking() {
        tls.complete_io(&mut sock)?;
    }
    if tls.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
        take_incoming(&mut tls, &mut sock, POST_HANDSHAKE_WAIT)?;
    }
    // rustls' default limit (64 KiB) would take part of a larger frame;
    // the buffer never holds more than the frame being sent.
    tls.set_buffer_limit(None);
    Ok(Conn::Tls(Box::new(tls), sock))
}

/// Whether `e` came from TLS itself (rather than the socket under it).
fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<rustls::Error>())
}

/// What to check, for the TLS errors a configuration causes.
fn hint(e: &io::Error) -> &'static str {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e.get_ref().and_then(|i| i.downcast_ref::<E>()) {
        Some(E::InvalidCertificate(C::UnknownIssuer)) => {
            " (is the collector's CA in --forward-ca, or in the system's roots without it?)"
        }
        Some(E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
            " (see --forward-server-name)"
        }
        Some(E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA)) => {
            " (the collector refused our client certificate: see --forward-cert)"
        }
        _ => "",
    }
}

fn run(rx: Receiver<String>, target: Target, stats: &ForwardStats) {
    let mut conn: Option<Conn> = None;
    let mut pending: Option<String> = None;
    let mut backoff = Duration::from_millis(100);
    // The last connection ended in a TLS error: connecting again is no
    // success yet (a refusal can come after the handshake), so the
    // backoff keeps growing.
    let mut refused = false;
    loop {
        let msg = match pending.take() {
            Some(m) => m,
            None => match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    if let Some(c) = conn.take() {
                        c.close();
                    }
                    return;
                }
            },
        };
        if conn.is_none() {
            match connect(&target) {
                Ok(c) => {
                    conn = Some(c);
                    if !refused {
                        backoff = Duration::from_millis(100);
                    }
                    refused = false;
                }
                Err(e) => {
                    if let ConnectError::Tls(e) = e {
                        tracing::warn!(
                            "forwarding to {}: TLS handshake failed: {e}{}; retrying in {backoff:?}",
                            target.name,
                            hint(&e)
                        );
                        stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    pending = Some(msg);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match c.send(&frame(&msg)) {
            Ok(()) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if is_tls_error(&e) => {
                // A refusal (a TLS 1.3 server judging our certificate late)
                // would repeat at once: back off as for a failed handshake.
                refused = true;
                tracing::warn!(
                    "forwarding to {}: TLS: {e}{}; reconnecting in {backoff:?}",
                    target.name,
                    hint(&e)
                );
                stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                conn = None;
                pending = Some(msg);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
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
    fn splits_host_from_port() {
        assert_eq!(
            split_host("collector.example:6514"),
            Some("collector.example")
        );
        assert_eq!(split_host("10.0.0.1:6514"), Some("10.0.0.1"));
        assert_eq!(split_host("[::1]:6514"), Some("::1"));
        assert_eq!(split_host("collector.example"), None);
        assert_eq!(split_host("collector.example:"), None);
        assert_eq!(split_host("collector.example:6514/"), None);
        assert_eq!(split_host(":6514"), None);
    }

    #[test]
    fn frames_and_delivers_in_order() {
        assert_eq!(frame("<14>1 x"), b"7 <14>1 x".to_vec());
        assert!(Forwarder::start(&ForwardConfig::new("udp://127.0.0.1:1")).is_err());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let f = Forwarder::start(&ForwardConfig::new(format!("tcp://127.0.0.1:{port}"))).unwrap();
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
