//! `vmwatchd`: the vmwatch daemon (see the library docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Watches lab VMs' syscall event rings and serves them over a local,
/// token-protected HTTP/JSON API (used by `vmwatch trace`).
#[derive(Parser, Debug)]
#[command(name = "vmwatchd", version)]
struct Args {
    /// Where the socket, token and pid file live (default: $VMWATCHD_DIR,
    /// else <lab cache>/vmwatchd).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Also serve HTTP on this address (loopback only unless --allow-remote).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Allow --listen on a non-loopback address (the token is then the only protection).
    #[arg(long)]
    allow_remote: bool,
    /// Attach every running lab VM now, and new ones as they start.
    #[arg(long)]
    watch_all: bool,
    /// Attach these lab VMs at start (repeatable).
    #[arg(long = "watch", value_name = "NAME")]
    watch: Vec<String>,
    /// Log vault: fsync at most every N ms (0: after every record).
    #[arg(long, default_value_t = 50)]
    vault_fsync_ms: u64,
    /// Log vault: sustained syslog messages per second accepted per guest
    /// process (enforced in QEMU's plugin, before the ring, and again here);
    /// the rest are refused and counted.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    log_rate: u32,
    /// Log vault: messages a process may send at once above the rate.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    log_burst: u32,
    /// Forward every stored log record to a syslog collector: tcp://HOST:PORT
    /// or tls://HOST:PORT (RFC 5424, octet-counting framing; TLS: RFC 5425).
    #[arg(long, value_name = "URL")]
    forward: Option<String>,
    /// tls:// forwarding: the collector's certificate must chain to a CA in
    /// this PEM file (default: the system's root certificates).
    #[arg(long, value_name = "FILE", requires = "forward")]
    forward_ca: Option<PathBuf>,
    /// tls:// forwarding: the name the collector's certificate must carry
    /// (default: HOST; give it when HOST is an IP address).
    #[arg(long, value_name = "NAME", requires = "forward")]
    forward_server_name: Option<String>,
    /// tls:// forwarding: our certificate (PEM, with its chain) for a
    /// collector that requires client authentication; needs --forward-key.
    #[arg(long, value_name = "FILE", requires = "forward")]
    forward_cert: Option<PathBuf>,
    /// tls:// forwarding: the private key (PEM) of --forward-cert.
    #[arg(long, value_name = "FILE", requires = "forward")]
    forward_key: Option<PathBuf>,
    /// Integrity (rootkit) scan of each watched VM every N ms (0: off).
    #[arg(long, default_value_t = 1000)]
    scan_interval_ms: u64,
    /// Milliseconds between ring polls when a ring is empty.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1000))]
    poll_ms: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMWATCHD_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let mut config = vmwatchd::Config::new(
        args.state_dir
            .unwrap_or_else(vmwatchd::paths::default_state_dir),
        lab::util::cache_dir(),
    );
    config.listen = args.listen;
    config.allow_remote = args.allow_remote;
    config.watch_all = args.watch_all;
    config.watch = args.watch;
    config.pump.idle_sleep = Duration::from_millis(args.poll_ms);
    config.vault.fsync = if args.vault_fsync_ms == 0 {
        logvault::Fsync::EveryRecord
    } else {
        logvault::Fsync::Interval(Duration::from_millis(args.vault_fsync_ms))
    };
    config.log_rate.per_second = args.log_rate;
    config.log_rate.burst = args.log_burst;
    config.forward = args.forward.map(|url| vmwatchd::forward::ForwardConfig {
        url,
        ca: args.forward_ca,
        server_name: args.forward_server_name,
        cert: args.forward_cert,
        key: args.forward_key,
    });
    config.scan_interval = Duration::from_millis(args.scan_interval_ms);
    config.pump.log_rate = u64::from(args.log_rate);
    config.pump.log_burst = u64::from(args.log_burst);
    // Two workers: the API is light; the pumps have their own threads.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vmwatchd: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(vmwatchd::run(config)) {
        eprintln!("vmwatchd: {e}");
        std::process::exit(1);
    }
}
