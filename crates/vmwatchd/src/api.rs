//! The HTTP/JSON API (`/v1/...`). Every request needs the bearer token
//! ([`crate::auth`]); errors are `{"error": "one line that says what to do"}`
//! with a fitting status.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/health` | daemon pid, version, counts |
//! | `GET /v1/vms` | watched VMs ([`VmView`]) |
//! | `POST /v1/vms` | start a lab VM and watch it ([`StartRequest`]) |
//! | `GET /v1/vms/{name}` | one VM |
//! | `POST /v1/vms/{name}/watch` | attach a running lab VM (idempotent) |
//! | `DELETE /v1/vms/{name}` | stop watching (filter back to `none`, ring released) |
//! | `GET /v1/vms/{name}/trace?syscall=&pid=&comm=&fds=` | NDJSON stream of one VM's `TraceEvent`s |
//! | `GET /v1/trace?...` | the same, all watched VMs merged |
//! | `/v1/vms/{name}/track`, `/v1/vms/{name}/diffusion[/log]`, `/v1/diffusion/log` | diffusion tracking ([`crate::diffusion_api`]) |
//! | `GET /v1/logs/stats` | the log vaults' counters per VM ([`crate::logvault`]) |
//! | `GET /v1/vms/{name}/integrity` | the VM's last integrity scan ([`crate::integrity`]) |
//! | `GET /v1/integrity/alerts?since=SEQ&vm=&wait=SECS` | integrity alerts after `since`; `wait` long-polls |
//!
//! A stream's response headers are sent once the ring filters include the
//! subscriber's syscalls, so a client may start its workload when it has
//! them. Idle streams carry an empty line every few seconds (NDJSON readers
//! skip it), which is also how a vanished client is noticed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use bytes::Bytes;
use events::Filter;
use serde::Deserialize;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;
use tracer::{Selection, State as EvState, TraceEvent};

use crate::auth::{self, Token};
use crate::diffusion::DiffusionService;
use crate::diffusion_api as dapi;
use crate::engine::Published;
use crate::error::{ApiError, WatchError};
use crate::integrity::IntegrityService;
use crate::logvault::VaultService;
use crate::registry::{Registry, Scope, StartRequest, Subscription};

/// An idle stream sends an empty line this often.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Bytes gathered into one response chunk at most.
const CHUNK: usize = 64 << 10;
/// How long a new stream waits for the pumps to apply its filter.
const FILTER_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct AppState {
    pub registry: Arc<Registry>,
    pub diffusion: Arc<DiffusionService>,
    pub vault: Arc<VaultService>,
    pub integrity: Arc<IntegrityService>,
    pub started: Instant,
}

/// All routes, behind the token check.
pub fn router(
    registry: Arc<Registry>,
    diffusion: Arc<DiffusionService>,
    vault: Arc<VaultService>,
    integrity: Arc<IntegrityService>,
    token: Token,
) -> Router {
    let state = AppState {
        registry,
        diffusion,
        vault,
        integrity,
        started: Instant::now(),
    };
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/vms", get(list_vms).post(start_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(unwatch_vm))
        .route("/v1/vms/{name}/watch", post(watch_vm))
        .route("/v1/vms/{name}/trace", get(trace_vm))
        .route("/v1/trace", get(trace_all))
        .route(
            "/v1/vms/{name}/track",
            get(dapi::track_list)
                .post(dapi::track_add)
                .delete(dapi::track_rm),
        )
        .route("/v1/vms/{name}/diffusion", get(dapi::graph))
        .route("/v1/vms/{name}/diffusion/log", get(dapi::log_vm))
        .route("/v1/diffusion/log", get(dapi::log_all))
        .route("/v1/logs/stats", get(log_stats))
        .route("/v1/vms/{name}/integrity", get(vm_integrity))
        .route("/v1/integrity/alerts", get(integrity_alerts))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(middleware::from_fn_with_state(token, auth::require_token))
}

async fn health(State(st): State<AppState>) -> Response {
    let vms = st.registry.list();
    Json(serde_json::json!({
        "ok": true,
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "uptime_secs": st.started.elapsed().as_secs(),
        "vms": vms.len(),
        "watching": vms.iter().filter(|v| v.state == "watching").count(),
        "subscribers": st.registry.subscribers(),
    }))
    .into_response()
}

/// The log vaults' counters per VM, and where the vaults are.
async fn log_stats(State(st): State<AppState>) -> Response {
    Json(serde_json::json!({
        "dir": st.vault.dir(),
        "vms": st.vault.stats(),
        "forward": st.vault.forward_stats(),
    }))
    .into_response()
}

/// The last integrity scan of one VM.
async fn vm_integrity(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    if st.registry.get(&name).is_none() {
        return ApiError::from(WatchError::NotWatched(name)).into_response();
    }
    let mut v = st.integrity.vm(&name).unwrap_or_default();
    v.interval_ms = st.integrity.interval().as_millis() as u64;
    Json(v).into_response()
}

#[derive(Debug, Deserialize)]
struct AlertsQuery {
    #[serde(default)]
    since: u64,
    vm: Option<String>,
    /// Seconds to wait for a new alert (long poll), at most 60.
    #[serde(default)]
    wait: u64,
}

/// Integrity alerts after `since`, oldest first (long poll with `wait`).
async fn integrity_alerts(
    State(st): State<AppState>,
    q: Result<Query<AlertsQuery>, QueryRejection>,
) -> Response {
    let Query(q) = match q {
        Ok(q) => q,
        Err(e) => {
            return ApiError::bad_request(format!(
                "bad query ({e}): use ?since=SEQ&vm=NAME&wait=SECS"
            ))
            .into_response()
        }
    };
    let svc = Arc::clone(&st.integrity);
    let wait = Duration::from_secs(q.wait.min(60));
    let alerts =
        tokio::task::spawn_blocking(move || svc.wait_alerts(q.since, q.vm.as_deref(), wait))
            .await
            .unwrap_or_default();
    Json(alerts).into_response()
}

async fn list_vms(State(st): State<AppState>) -> Response {
    Json(st.registry.list()).into_response()
}

async fn get_vm(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    match st.registry.get(&name) {
        Some(v) => Json(v).into_response(),
        None => ApiError::from(WatchError::NotWatched(name)).into_response(),
    }
}

/// Runs blocking registry work (file and ring I/O, joins, boots) off the runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WatchError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}; see the daemon's log"),
        )),
    }
}

async fn watch_vm(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    let reg = Arc::clone(&st.registry);
    match blocking(move || reg.watch(&name)).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn unwatch_vm(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    let reg = Arc::clone(&st.registry);
    let n = name.clone();
    match blocking(move || reg.unwatch(&n)).await {
        Ok(()) => Json(serde_json::json!({ "ok": true, "name": name })).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn start_vm(
    State(st): State<AppState>,
    body: Result<Json<StartRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return ApiError::bad_request(format!(
                "bad request body: {} (send {{\"name\": \"web1\", \"flavour\": \"stable\", \"mem_mib\": 512, \"cpus\": 1}})",
                e.body_text()
            ))
            .into_response()
        }
    };
    let reg = Arc::clone(&st.registry);
    match blocking(move || reg.start(&req)).await {
        Ok(v) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The query of the trace streams.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceQuery {
    /// Syscall names or numbers, comma-separated; absent or empty: all.
    pub syscall: Option<String>,
    pub pid: Option<String>,
    pub comm: Option<String>,
    /// `1`/`true`: resolve fd arguments and results to files.
    pub fds: Option<String>,
}

struct StreamSpec {
    syscalls: Filter,
    fds: bool,
    selection: Selection,
}

fn parse_query(q: Result<Query<TraceQuery>, QueryRejection>) -> Result<StreamSpec, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::bad_request(format!(
            "bad query: {} (use syscall=a,b&pid=N&comm=NAME&fds=1)",
            e.body_text()
        ))
    })?;
    let syscalls = match q.syscall.as_deref().map(str::trim) {
        None | Some("") => Filter::ALL,
        Some(s) => Filter::parse(s).map_err(|e| ApiError::bad_request(e.to_string()))?,
    };
    let pid = match q.pid.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(p) => Some(p.parse::<u32>().map_err(|_| {
            ApiError::bad_request(format!("bad pid `{p}`: use a process or thread id"))
        })?),
    };
    let comm = q.comm.filter(|c| !c.is_empty());
    if comm.as_ref().is_some_and(|c| c.len() > 64) {
        return Err(ApiError::bad_request(
            "comm is longer than 64 bytes: the kernel keeps 15",
        ));
    }
    let fds = match q.fds.as_deref().map(str::trim) {
        None | Some("" | "0" | "false" | "no") => false,
        Some("1" | "true" | "yes") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "bad fds `{other}`: use fds=1 or fds=0"
            )))
        }
    };
    Ok(StreamSpec {
        syscalls,
        fds,
        selection: Selection { pid, comm },
    })
}

async fn trace_vm(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<TraceQuery>, QueryRejection>,
) -> Response {
    match open_stream(&st, Scope::Vm(name), q).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn trace_all(
    State(st): State<AppState>,
    q: Result<Query<TraceQuery>, QueryRejection>,
) -> Response {
    match open_stream(&st, Scope::All, q).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn open_stream(
    st: &AppState,
    scope: Scope,
    q: Result<Query<TraceQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let spec = parse_query(q)?;
    let per_vm = matches!(scope, Scope::Vm(_));
    let fds = if spec.fds {
        spec.syscalls
    } else {
        Filter::NONE
    };
    let sub = st.registry.subscribe(scope, spec.syscalls, fds)?;
    // Answer once the rings record what this subscriber asked for.
    let deadline = Instant::now() + FILTER_WAIT;
    while !sub.pending.iter().all(|(s, g)| s.applied(*g)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let state = StreamState {
        sub,
        filter: spec.syscalls,
        selection: spec.selection,
        closing: st.registry.closing(),
        per_vm,
        done: false,
        last_write: tokio::time::Instant::now(),
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        let chunk = st.next_chunk().await?;
        Some((Ok::<Bytes, Infallible>(chunk), st))
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }))
}

/// One subscriber's stream: events from the broadcast channel, filtered by
/// its syscalls, pid and comm, gathered into chunks.
struct StreamState {
    sub: Subscription,
    filter: Filter,
    selection: Selection,
    closing: watch::Receiver<bool>,
    /// A per-VM stream ends after the VM's `vm_stopped`.
    per_vm: bool,
    done: bool,
    last_write: tokio::time::Instant,
}

impl StreamState {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        let mut buf: Vec<u8> = Vec::new();
        while !self.done {
            let heartbeat = self.last_write + HEARTBEAT;
            let first = tokio::select! {
                r = self.sub.rx.recv() => r,
                _ = self.closing.wait_for(|c| *c) => {
                    self.done = true;
                    break;
                }
                _ = tokio::time::sleep_until(heartbeat) => {
                    self.last_write = tokio::time::Instant::now();
                    return Some(Bytes::from_static(b"\n"));
                }
            };
            if buf.capacity() == 0 {
                buf.reserve(CHUNK / 4);
            }
            self.take(
                first.map_err(|e| match e {
                    RecvError::Lagged(n) => TryRecvError::Lagged(n),
                    RecvError::Closed => TryRecvError::Closed,
                }),
                &mut buf,
            );
            // Whatever else is ready, without waiting: fewer, larger writes.
            while buf.len() < CHUNK && !self.done {
                match self.sub.rx.try_recv() {
                    Err(TryRecvError::Empty) => break,
                    r => self.take(r, &mut buf),
                }
            }
            if !buf.is_empty() {
                break;
            }
        }
        if buf.is_empty() {
            return None;
        }
        self.last_write = tokio::time::Instant::now();
        Some(Bytes::from(buf))
    }

    fn take(&mut self, r: Result<Arc<Published>, TryRecvError>, buf: &mut Vec<u8>) {
        match r {
            Ok(p) => {
                let ev = &p.ev;
                let notice = matches!(ev.state, EvState::Dropped | EvState::VmStopped);
                if notice || (self.filter.contains(ev.nr) && self.selection.matches(ev)) {
                    buf.extend_from_slice(&p.line);
                }
                if self.per_vm && ev.state == EvState::VmStopped {
                    self.done = true;
                }
            }
            Err(TryRecvError::Lagged(n)) => {
                let (vm, uuid) = match &self.sub.vm {
                    Some(c) => (c.name.as_str(), c.uuid.as_str()),
                    None => ("*", ""),
                };
                // Not the ring: this stream's reader was too slow.
                let ev = TraceEvent::notice(vm, uuid, EvState::Lagged, Some(n));
                if let Ok(mut line) = serde_json::to_vec(&ev) {
                    line.push(b'\n');
                    buf.extend_from_slice(&line);
                }
            }
            Err(TryRecvError::Closed) => self.done = true,
            Err(TryRecvError::Empty) => {}
        }
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {method} {}: see GET /v1/health, /v1/vms, /v1/vms/NAME/trace, /v1/trace, /v1/vms/NAME/track, /v1/vms/NAME/diffusion",
            uri.path()
        ),
    )
    .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}: see the route table in crates/vmwatchd/src/api.rs",
            uri.path()
        ),
    )
    .into_response()
}
