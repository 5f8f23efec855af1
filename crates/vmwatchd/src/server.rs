//! Starting and stopping the daemon: the pid lock, the token, the listeners
//! (a unix socket always; loopback TCP on request), `--watch-all`, and a
//! shutdown that leaves every guest's filter at `none`.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::auth::Token;
use crate::diffusion::{DiffusionService, DiffusionVmEngine};
use crate::engine::{Engine, EventSink, VmContext};
use crate::error::DaemonError;
use crate::integrity::{IntegrityService, IntegrityVmEngine};
use crate::logvault::{LogVaultEngine, VaultService};
use crate::paths::{Paths, PidLock};
use crate::pump::PumpConfig;
use crate::registry::{default_engines, Registry};

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket, token and pid file ([`crate::paths`]).
    pub state_dir: PathBuf,
    /// The lab cache whose VMs are watched.
    pub cache: PathBuf,
    /// Also serve on this TCP address.
    pub listen: Option<SocketAddr>,
    /// Allow `listen` on a non-loopback address.
    pub allow_remote: bool,
    /// Attach every running lab VM, now and as they appear.
    pub watch_all: bool,
    /// Attach these VMs at start.
    pub watch: Vec<String>,
    /// `--watch-all` scan period.
    pub scan_every: Duration,
    pub pump: PumpConfig,
    pub vault: logvault::VaultConfig,
    pub log_rate: logvault::RateLimitConfig,
    /// Forward every stored log record to this collector (`tcp://HOST:PORT`
    /// or `tls://HOST:PORT` and its TLS options).
    pub forward: Option<crate::forward::ForwardConfig>,
    /// Integrity scan period per VM (zero: no continuous scanning).
    pub scan_interval: Duration,
}

impl Config {
    pub fn new(state_dir: PathBuf, cache: PathBuf) -> Config {
        Config {
            state_dir,
            cache,
            listen: None,
            allow_remote: false,
            watch_all: false,
            watch: Vec::new(),
            scan_every: Duration::from_millis(1500),
            pump: PumpConfig::default(),
            vault: logvault::VaultConfig::default(),
            log_rate: crate::logvault::default_rate(),
            forward: None,
            scan_interval: Duration::from_secs(1),
        }
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    run_until(config, stop_rx).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the default action (exit) still applies.
            std::future::pending::<()>().await;
        }
    }
}

/// Runs the daemon until `stop` becomes true.
pub async fn run_until(config: Config, mut stop: watch::Receiver<bool>) -> Result<(), DaemonError> {
    if let Some(addr) = config.listen {
        if !addr.ip().is_loopback() && !config.allow_remote {
            return Err(DaemonError::NotLoopback(addr));
        }
    }
    let paths = Paths::new(&config.state_dir);
    paths.create_dir()?;
    let lock = PidLock::acquire(&paths.pid())?;
    let token = Token::load_or_create(&paths.token())?;
    // Before the socket: a history that cannot be read stops the daemon
    // here, leaving the file as it is.
    let diffusion =
        DiffusionService::open(&paths.diffusion_dir()).map_err(DaemonError::Diffusion)?;
    let forward = match &config.forward {
        Some(fc) => Some(crate::forward::Forwarder::start(fc).map_err(DaemonError::Forward)?),
        None => None,
    };
    let vault = VaultService::open(
        &paths.vault_dir(),
        &paths.vault_key(),
        config.vault.clone(),
        config.log_rate,
        forward,
    )
    .map_err(DaemonError::Vault)?;

    let sock = paths.socket();
    // We hold the lock, so a socket file here is a dead daemon's.
    if let Ok(meta) = std::fs::symlink_metadata(&sock) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(&sock).map_err(DaemonError::io(&sock))?;
        }
    }
    let unix = tokio::net::UnixListener::bind(&sock).map_err(|source| DaemonError::Bind {
        addr: sock.display().to_string(),
        source,
    })?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(DaemonError::io(&sock))?;
    let tcp = match config.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Bind {
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };

    let svc = Arc::clone(&diffusion);
    let vsvc = Arc::clone(&vault);
    let integrity = IntegrityService::new(config.scan_interval);
    let isvc = Arc::clone(&integrity);
    let engines = move |ctx: &VmContext, sink: EventSink| -> Vec<Box<dyn Engine>> {
        let mut v = default_engines(ctx, sink);
        v.push(Box::new(DiffusionVmEngine::new(Arc::clone(&svc), ctx)));
        v.push(Box::new(LogVaultEngine::new(Arc::clone(&vsvc), ctx)));
        v.push(Box::new(IntegrityVmEngine::new(Arc::clone(&isvc), ctx)));
        v
    };
    let registry = Registry::new(&config.cache, config.pump, Box::new(engines));
    for name in &config.watch {
        let reg = Arc::clone(&registry);
        let n = name.clone();
        match tokio::task::spawn_blocking(move || reg.watch(&n)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("cannot watch `{name}`: {e}"),
            Err(e) => tracing::error!("watching `{name}`: {e}"),
        }
    }
    if config.watch_all {
        let reg = Arc::clone(&registry);
        let mut stop = stop.clone();
        let every = config.scan_every;
        tokio::spawn(async move {
            loop {
                let r = Arc::clone(&reg);
                let _ = tokio::task::spawn_blocking(move || r.scan()).await;
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        });
    }

    eprintln!(
        "vmwatchd: pid {}, listening on {}{}; token in {}; lab cache {}",
        std::process::id(),
        sock.display(),
        config
            .listen
            .map(|a| format!(" and http://{a}"))
            .unwrap_or_default(),
        token.path().display(),
        config.cache.display()
    );

    let app = crate::api::router(Arc::clone(&registry), diffusion, vault, integrity, token);
    // On stop: first end the pumps and the streams (filters to `none`,
    // rings released), then let the servers finish their connections.
    let (closed_tx, closed_rx) = watch::channel(false);
    {
        let reg = Arc::clone(&registry);
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            tracing::info!("stopping: releasing the rings");
            let _ = tokio::task::spawn_blocking(move || reg.shutdown()).await;
            let _ = closed_tx.send(true);
        });
    }
    let closed_rx2 = closed_rx.clone();
    let closed = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|c| *c).await;
    };
    let unix_server =
        axum::serve(unix, app.clone()).with_graceful_shutdown(closed(closed_rx.clone()));
    let serving = async move {
        match tcp {
            Some(tcp) => {
                let tcp_server =
                    axum::serve(tcp, app).with_graceful_shutdown(closed(closed_rx.clone()));
                let (a, b) = tokio::join!(unix_server, tcp_server);
                a.and(b)
            }
            None => unix_server.await,
        }
    };
    // A client that keeps a connection open must not keep the daemon alive.
    let grace = async move {
        closed(closed_rx2).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let served = tokio::select! {
        r = serving => r,
        _ = grace => Ok(()),
    };
    let _ = std::fs::remove_file(&sock);
    drop(lock);
    served.map_err(DaemonError::Serve)
}
