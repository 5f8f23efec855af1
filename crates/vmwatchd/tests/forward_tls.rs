//! `--forward tls://` (RFC 5425) against a rustls collector in a test
//! thread, with a throwaway rcgen CA: delivery (TLS 1.3 and 1.2, the server
//! name override), a wrong CA or name, mutual authentication, start-up errors.
//! No VM needed.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection, SupportedProtocolVersion};
use vmwatchd::forward::{ForwardConfig, Forwarder};

/// A throwaway certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate it issued, with its key.
struct Leaf {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, names: &[&str], client: bool) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, "leaf");
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key,
        }
    }
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivatePkcs8KeyDer::from(key.serialize_der()).into()
}

/// A scratch directory, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(test: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "vmwatchd-forward-tls-{}-{test}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the collector saw, over all connections.
#[derive(Default)]
struct Seen {
    /// Application data, as received.
    plaintext: Mutex<Vec<u8>>,
    handshakes: AtomicU64,
    failed_handshakes: AtomicU64,
    /// Connections whose client presented a certificate.
    client_certs: AtomicU64,
}

/// A syslog-over-TLS collector on 127.0.0.1, one connection at a time.
struct Collector {
    port: u16,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    /// Serves `server` (certificate for `localhost` by `ca`); requires a
    /// client certificate by `ca` if `client_auth`.
    fn start(
        ca: &Ca,
        server: &Leaf,
        client_auth: bool,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Collector {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .unwrap();
        let builder = if client_auth {
            let mut roots = RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = Arc::new(
            builder
                .with_single_cert(
                    vec![server.cert.clone(), ca.issuer.der().clone()],
                    key_der(&server.key),
                )
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => serve(sock, &config, &s, &st),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Collector {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn plaintext(&self) -> Vec<u8> {
        self.seen.plaintext.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// One connection: the handshake, then application data until EOF or stop.
fn serve(mut sock: TcpStream, config: &Arc<ServerConfig>, seen: &Seen, stop: &AtomicBool) {
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut tls = ServerConnection::new(Arc::clone(config)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls.is_handshaking() {
        match tls.complete_io(&mut sock) {
            Ok(_) => {}
            Err(e) if timed_out(&e) && Instant::now() < deadline => {}
            Err(_) => {
                seen.failed_handshakes.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    seen.handshakes.fetch_add(1, Ordering::Relaxed);
    if tls.peer_certificates().is_some_and(|c| !c.is_empty()) {
        seen.client_certs.fetch_add(1, Ordering::Relaxed);
    }
    while !stop.load(Ordering::Relaxed) {
        match tls.read_tls(&mut sock) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if timed_out(&e) => continue,
            Err(_) => return,
        }
        let Ok(state) = tls.process_new_packets() else {
            return;
        };
        let n = state.plaintext_bytes_to_read();
        if n > 0 {
            let mut buf = vec![0; n];
            tls.reader().read_exact(&mut buf).unwrap();
            seen.plaintext.lock().unwrap().extend_from_slice(&buf);
        }
        while tls.wants_write() {
            if tls.write_tls(&mut sock).is_err() {
                return;
            }
        }
        if state.peer_has_closed() {
            return;
        }
    }
}

fn wait_until(what: &str, timeout: Duration, f: impl Fn() -> bool) {
    let until = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Messages of varied lengths, some with multi-byte UTF-8, so a length in
/// characters instead of octets would show.
fn messages(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "<14>1 2026-01-01T00:00:00.000Z web1 app {i} - - message {i} é→ {}",
                "x".repeat(i * 37 % 500)
            )
        })
        .collect()
}

/// `LEN SP MSG` for each, LEN in octets (written here, not taken from the
/// crate, so a wrong framing there shows).
fn octet_counted(msgs: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        out.extend_from_slice(format!("{} {m}", m.len()).as_bytes());
    }
    out
}

/// Sends `msgs` and checks they arrive byte-identical and all are counted.
fn delivers(f: &Forwarder, collector: &Collector, msgs: &[String]) {
    for m in msgs {
        f.send(m.clone());
    }
    let want = octet_counted(msgs);
    wait_until(
        "the messages at the collector",
        Duration::from_secs(20),
        || collector.plaintext().len() >= want.len(),
    );
    assert!(collector.plaintext() == want, "not byte-identical");
    let n = msgs.len() as u64;
    wait_until("the sent counter", Duration::from_secs(5), || {
        f.stats.sent.load(Ordering::Relaxed) >= n
    });
    assert_eq!(f.stats.sent.load(Ordering::Relaxed), n);
    assert_eq!(f.stats.dropped.load(Ordering::Relaxed), 0);
    assert_eq!(f.stats.tls_failures.load(Ordering::Relaxed), 0);
}

/// Waits for a refused connection, then checks nothing got through.
fn refused(f: &Forwarder, collector: &Collector) {
    for m in messages(5) {
        f.send(m);
    }
    wait_until("a counted TLS failure", Duration::from_secs(20), || {
        f.stats.tls_failures.load(Ordering::Relaxed) > 0
    });
    wait_until(
        "a failed handshake at the collector",
        Duration::from_secs(20),
        || collector.seen.failed_handshakes.load(Ordering::Relaxed) > 0,
    );
    assert!(collector.plaintext().is_empty(), "a message got through");
    assert_eq!(f.stats.sent.load(Ordering::Relaxed), 0);
    // Still queued, not dropped.
    assert_eq!(f.stats.dropped.load(Ordering::Relaxed), 0);
}

const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

#[test]
fn tls_delivers_100_in_order_octet_counted() {
    let dir = Dir::new("deliver");
    let ca = Ca::new("test CA");
    let collector = Collector::start(&ca, &ca.leaf(&["localhost"], false), false, TLS13);
    let f = Forwarder::start(&ForwardConfig {
        url: format!("tls://localhost:{}", collector.port),
        ca: Some(dir.file("ca.pem", &ca.pem())),
        ..ForwardConfig::default()
    })
    .unwrap();
    delivers(&f, &collector, &messages(100));
    assert_eq!(collector.seen.handshakes.load(Ordering::Relaxed), 1);
}

#[test]
fn tls12_collector_and_server_name_override() {
    let dir = Dir::new("tls12");
    let ca = Ca::new("test CA");
    let collector = Collector::start(&ca, &ca.leaf(&["localhost"], false), false, TLS12);
    // HOST is an IP address the certificate does not name.
    let f = Forwarder::start(&ForwardConfig {
        url: format!("tls://127.0.0.1:{}", collector.port),
        ca: Some(dir.file("ca.pem", &ca.pem())),
        server_name: Some("localhost".into()),
        ..ForwardConfig::default()
    })
    .unwrap();
    delivers(&f, &collector, &messages(20));
}

#[test]
fn wrong_ca_delivers_nothing_and_counts_failures() {
    let dir = Dir::new("wrong-ca");
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let collector = Collector::start(&ca, &ca.leaf(&["localhost"], false), false, TLS13);
    let f = Forwarder::start(&ForwardConfig {
        url: format!("tls://localhost:{}", collector.port),
        ca: Some(dir.file("other.pem", &other.pem())),
        ..ForwardConfig::default()
    })
    .unwrap();
    refused(&f, &collector);
}

#[test]
fn wrong_server_name_delivers_nothing() {
    let dir = Dir::new("wrong-name");
    let ca = Ca::new("test CA");
    let collector = Collector::start(&ca, &ca.leaf(&["localhost"], false), false, TLS13);
    let f = Forwarder::start(&ForwardConfig {
        url: format!("tls://localhost:{}", collector.port),
        ca: Some(dir.file("ca.pem", &ca.pem())),
        server_name: Some("collector.example".into()),
        ..ForwardConfig::default()
    })
    .unwrap();
    refused(&f, &collector);
}

#[test]
fn mutual_auth_with_client_cert_delivers() {
    for (versions, tag) in [(TLS13, "13"), (TLS12, "12")] {
        let dir = Dir::new(&format!("mutual-{tag}"));
        let ca = Ca::new("test CA");
        let collector = Collector::start(&ca, &ca.leaf(&["localhost"], false), true, versions);
        let client = ca.leaf(&["vmwatchd"], true);
        let f = Forwarder::start(&ForwardConfig {
            url: format!("tls://localhost:{}", collector.port),
            ca: Some(dir.file("ca.pem", &ca.pem())),
            cert: Some(dir.file("client.pem", &client.cert_pem)),
            key: Some(dir.file("client.key", &client.key.serialize_pem())),
            ..ForwardConfig::default()
        })
        .unwrap();
        delivers(&f, &collector, &messages(50));
        assert_eq!(collector.seen.client_certs.load(Ordering::Relaxed), 1);
    }
}

#[test]
fn mutual_auth_without_client_cert_is_refused() {
    // TLS 1.3: the collector refuses after our side of the handshake is
    // done; TLS 1.2: during it.
    for (versions, tag) in [(TLS13, "13"), (TLS12, "12")] {
        let dir = Dir::new(&format!("no-client-cert-{tag}"));
        let ca = Ca::new("test CA");
        let collector = Collector::start(&ca, &ca.leaf(&["localhost"], false), true, versions);
        let f = Forwarder::start(&ForwardConfig {
            url: format!("tls://localhost:{}", collector.port),
            ca: Some(dir.file("ca.pem", &ca.pem())),
            ..ForwardConfig::default()
        })
        .unwrap();
        refused(&f, &collector);
    }
}

/// A TCP relay to `port` that holds what the server says for `delay`: a
/// slow link. Returns its port.
fn slow_relay(port: u16, delay: Duration) -> u16 {
    fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
        let mut buf = [0u8; 16384];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    std::thread::sleep(delay);
                    if to.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
                return;
            };
            let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || pipe(c, s, Duration::ZERO));
            std::thread::spawn(move || pipe(server, client, delay));
        }
    });
    relay
}

#[test]
fn mutual_auth_refusal_seen_over_a_slow_link() {
    // Under TLS 1.3 our handshake is over before the collector's refusal
    // arrives: on a slow link, only waiting for its first word keeps a
    // record from being written to a connection that is being refused.
    let dir = Dir::new("slow-link");
    let ca = Ca::new("test CA");
    let collector = Collector::start(&ca, &ca.leaf(&["localhost"], false), true, TLS13);
    let relay = slow_relay(collector.port, Duration::from_millis(100));
    let f = Forwarder::start(&ForwardConfig {
        url: format!("tls://127.0.0.1:{relay}"),
        ca: Some(dir.file("ca.pem", &ca.pem())),
        server_name: Some("localhost".into()),
        ..ForwardConfig::default()
    })
    .unwrap();
    refused(&f, &collector);
}

fn start_err(config: ForwardConfig) -> String {
    match Forwarder::start(&config) {
        Ok(_) => panic!("{config:?} started"),
        Err(e) => {
            assert!(!e.contains('\n'), "not one line: {e}");
            e
        }
    }
}

#[test]
fn start_up_errors_are_one_line() {
    let dir = Dir::new("errors");
    let ca = Ca::new("test CA");
    let ca_pem = dir.file("ca.pem", &ca.pem());
    let a = ca.leaf(&["vmwatchd"], true);
    let b = ca.leaf(&["vmwatchd"], true);
    let a_cert = dir.file("a.pem", &a.cert_pem);
    let b_key = dir.file("b.key", &b.key.serialize_pem());
    let tls = |f: fn(&mut ForwardConfig)| {
        let mut c = ForwardConfig {
            url: "tls://localhost:6514".into(),
            ca: Some(ca_pem.clone()),
            ..ForwardConfig::default()
        };
        f(&mut c);
        c
    };

    for url in ["udp://127.0.0.1:514", "localhost:514", "tls://localhost"] {
        let e = start_err(ForwardConfig::new(url));
        assert!(
            e.contains("use tcp://HOST:PORT or tls://HOST:PORT"),
            "{url}: {e}"
        );
    }

    let missing = dir.0.join("missing.pem");
    let e = start_err(ForwardConfig {
        ca: Some(missing.clone()),
        ..tls(|_| {})
    });
    assert!(
        e.contains("--forward-ca") && e.contains(&*missing.to_string_lossy()),
        "{e}"
    );

    let garbage = dir.file("garbage.pem", "not a certificate\n");
    let e = start_err(ForwardConfig {
        ca: Some(garbage),
        ..tls(|_| {})
    });
    assert!(
        e.contains("--forward-ca") && e.contains("no certificate"),
        "{e}"
    );

    let e = start_err(ForwardConfig {
        key: Some(b_key.clone()),
        ..tls(|_| {})
    });
    assert!(e.contains("--forward-key needs --forward-cert"), "{e}");

    let e = start_err(ForwardConfig {
        cert: Some(a_cert.clone()),
        ..tls(|_| {})
    });
    assert!(e.contains("--forward-cert needs --forward-key"), "{e}");

    // A key that is not the certificate's.
    let e = start_err(ForwardConfig {
        cert: Some(a_cert),
        key: Some(b_key),
        ..tls(|_| {})
    });
    assert!(
        e.contains("--forward-cert") && e.contains("--forward-key"),
        "{e}"
    );

    let e = start_err(ForwardConfig {
        ca: Some(ca_pem.clone()),
        ..ForwardConfig::new("tcp://localhost:514")
    });
    assert!(e.contains("tls:// only"), "{e}");

    let e = start_err(tls(|c| c.server_name = Some("not a name!".into())));
    assert!(e.contains("--forward-server-name"), "{e}");

    // The same files are fine.
    let ok = ca.leaf(&["vmwatchd"], true);
    assert!(Forwarder::start(&ForwardConfig {
        cert: Some(dir.file("ok.pem", &ok.cert_pem)),
        key: Some(dir.file("ok.key", &ok.key.serialize_pem())),
        ..tls(|_| {})
    })
    .is_ok());
}
