//! The diffusion routes of the API (issue 4).
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/vms/{name}/track` | registered paths of a VM |
//! | `POST /v1/vms/{name}/track` `{"path": "/root/secret.txt"}` | register (watches the VM; processes holding the file now are managed at once) |
//! | `DELETE /v1/vms/{name}/track?path=P` | unregister |
//! | `GET /v1/vms/{name}/diffusion?at=T&format=text\|json\|dot` | the graph now or as it stood at `T` |
//! | `GET /v1/vms/{name}/diffusion/log?after=ID&follow=1&format=text\|json` | the delta log (then live, with `follow`) |
//! | `GET /v1/diffusion/log?...` | the same for every VM |

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use diffusion::{DeltaEvent, DiffusionError};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::api::{blocking, AppState, HEARTBEAT};
use crate::diffusion::{open_files, open_guest, DiffusionService};
use crate::error::{ApiError, WatchError};
use crate::registry::Registry;

/// How long a registration waits for the VM's ring to record what the
/// engine needs before scanning the guest's open files.
const FILTER_WAIT: Duration = Duration::from_secs(3);
/// Events per page of the stored log.
const PAGE: u64 = 10_000;

fn diffusion_error(e: DiffusionError) -> ApiError {
    let status = match &e {
        DiffusionError::RelativePath(_)
        | DiffusionError::BadPath { .. }
        | DiffusionError::BadTime(_) => StatusCode::BAD_REQUEST,
        DiffusionError::NotRegistered { .. } | DiffusionError::UnknownVm(_) => {
            StatusCode::NOT_FOUND
        }
        DiffusionError::TooManyRegistrations { .. } => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackBody {
    pub path: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    pub path: String,
}

pub(crate) async fn track_list(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    let regs = st.diffusion.engine().track_list(&name);
    Json(serde_json::json!({ "vm": name, "registrations": regs })).into_response()
}

pub(crate) async fn track_add(
    State(st): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<TrackBody>, JsonRejection>,
) -> Response {
    let path = match body {
        Ok(Json(b)) => b.path,
        Err(e) => {
            return ApiError::bad_request(format!(
                "bad request body: {} (send {{\"path\": \"/root/secret.txt\"}})",
                e.body_text()
            ))
            .into_response()
        }
    };
    let (reg, svc) = (Arc::clone(&st.registry), Arc::clone(&st.diffusion));
    let vm = name.clone();
    match blocking(move || register(&reg, &svc, &vm, &path)).await {
        Ok((evs, note)) => Json(serde_json::json!({
            "vm": name,
            "events": evs.iter().map(DeltaEvent::text).collect::<Vec<_>>(),
            "note": note,
            "registrations": st.diffusion.engine().track_list(&name),
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Registration: watch the VM, let its ring record what the engine needs,
/// then read which processes hold the file now, then register. A VM that
/// is not running is registered without the scan (it takes effect when the
/// daemon watches the VM).
fn register(
    reg: &Arc<Registry>,
    svc: &DiffusionService,
    vm: &str,
    path: &str,
) -> Result<(Vec<DeltaEvent>, Option<String>), WatchError> {
    // Bad paths are refused before anything changes.
    if !path.starts_with('/') {
        return Err(WatchError::Invalid(
            DiffusionError::RelativePath(path.to_string()).to_string(),
        ));
    }
    let mut note = None;
    let mut open = Vec::new();
    match reg.watch(vm) {
        Ok(_) => {
            svc.activate();
            let want = svc.interest();
            let deadline = Instant::now() + FILTER_WAIT;
            while !reg
                .ring_filter(vm)
                .is_some_and(|f| covers(&f.syscalls, &want.syscalls))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            let lab_vm = lab::Vm::open_in(reg.cache(), vm).map_err(|e| WatchError::lab(&e))?;
            match open_guest(&lab_vm) {
                Ok(g) => open = open_files(&g),
                Err(e) => {
                    note = Some(format!(
                        "cannot read guest RAM ({e}): processes that hold the file now are not managed until they touch it"
                    ))
                }
            }
        }
        Err(WatchError::NotRunning(_)) => {
            note = Some(format!(
                "VM `{vm}` is not running: the registration takes effect when vmwatchd watches it"
            ));
        }
        Err(e) => return Err(e),
    }
    let evs = svc
        .engine()
        .track_add(vm, path, &open)
        .map_err(|e| WatchError::Invalid(e.to_string()));
    svc.refresh_active();
    let evs = evs?;
    svc.publish(evs.clone());
    Ok((evs, note))
}

fn covers(have: &events::Filter, want: &events::Filter) -> bool {
    have.words
        .iter()
        .zip(want.words.iter())
        .all(|(h, w)| h & w == *w)
}

pub(crate) async fn track_rm(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<PathQuery>, QueryRejection>,
) -> Response {
    let path = match q {
        Ok(Query(q)) => q.path,
        Err(e) => {
            return ApiError::bad_request(format!(
                "bad query: {} (use ?path=/root/secret.txt)",
                e.body_text()
            ))
            .into_response()
        }
    };
    let r = st.diffusion.engine().track_rm(&name, &path);
    st.diffusion.refresh_active();
    match r {
        Ok(evs) => {
            let texts: Vec<String> = evs.iter().map(DeltaEvent::text).collect();
            st.diffusion.publish(evs);
            Json(serde_json::json!({ "vm": name, "events": texts })).into_response()
        }
        Err(e) => diffusion_error(e).into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphQuery {
    pub at: Option<String>,
    pub format: Option<String>,
}

pub(crate) async fn graph(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<GraphQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return ApiError::bad_request(format!(
                "bad query: {} (use ?at=2026-11-21T10:00:01Z&format=text|json|dot)",
                e.body_text()
            ))
            .into_response()
        }
    };
    let at = match q.at.as_deref().filter(|a| !a.is_empty()) {
        None => None,
        Some(a) => match diffusion::parse_time(a) {
            Ok(t) => Some(t),
            Err(e) => return diffusion_error(e).into_response(),
        },
    };
    let svc = Arc::clone(&st.diffusion);
    let n = name.clone();
    // Replays the stored history: off the async workers.
    let g = match tokio::task::spawn_blocking(move || svc.engine().graph(&n, at)).await {
        Ok(Ok(g)) => g,
        Ok(Err(e)) => return diffusion_error(e).into_response(),
        Err(e) => {
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        }
    };
    let (body, ctype) = match q.format.as_deref().unwrap_or("json") {
        "json" => (g.json(), "application/json"),
        "text" => (g.text(), "text/plain; charset=utf-8"),
        "dot" => (g.dot(), "text/vnd.graphviz"),
        other => {
            return ApiError::bad_request(format!("bad format `{other}`: use text, json or dot"))
                .into_response()
        }
    };
    ([(header::CONTENT_TYPE, ctype)], body).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Events after this id (0: from the start).
    pub after: Option<u64>,
    pub follow: Option<String>,
    pub format: Option<String>,
}

pub(crate) async fn log_vm(
    State(st): State<AppState>,
    Path(name): Path<String>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Response {
    log(st, Some(name), q).await
}

pub(crate) async fn log_all(
    State(st): State<AppState>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Response {
    log(st, None, q).await
}

async fn log(
    st: AppState,
    vm: Option<String>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return ApiError::bad_request(format!(
                "bad query: {} (use ?after=ID&follow=1&format=text|json)",
                e.body_text()
            ))
            .into_response()
        }
    };
    let follow = match q.follow.as_deref() {
        None | Some("" | "0" | "false") => false,
        Some("1" | "true") => true,
        Some(o) => {
            return ApiError::bad_request(format!("bad follow `{o}`: use follow=1 or follow=0"))
                .into_response()
        }
    };
    let json = match q.format.as_deref().unwrap_or("json") {
        "json" => true,
        "text" => false,
        o => {
            return ApiError::bad_request(format!("bad format `{o}`: use text or json"))
                .into_response()
        }
    };
    // Subscribe before reading the store, so nothing falls in between.
    let live = follow.then(|| st.diffusion.subscribe());
    let state = LogState {
        svc: Arc::clone(&st.diffusion),
        vm,
        after: q.after.unwrap_or(0),
        stored_done: false,
        live,
        json,
        closing: st.registry.closing(),
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<Bytes, Infallible>(chunk), s))
    });
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            if json {
                "application/x-ndjson"
            } else {
                "text/plain; charset=utf-8"
            },
        )
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
        })
}

struct LogState {
    svc: Arc<DiffusionService>,
    vm: Option<String>,
    /// Last id written.
    after: u64,
    stored_done: bool,
    live: Option<tokio::sync::broadcast::Receiver<Arc<DeltaEvent>>>,
    json: bool,
    closing: tokio::sync::watch::Receiver<bool>,
}

/// One event as a log line: NDJSON or the delta log's text.
fn line(ev: &DeltaEvent, json: bool) -> Option<Bytes> {
    let mut line = if json {
        serde_json::to_vec(ev).ok()?
    } else {
        ev.text().into_bytes()
    };
    line.push(b'\n');
    Some(line.into())
}

impl LogState {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.stored_done {
            let (svc, vm, after) = (Arc::clone(&self.svc), self.vm.clone(), self.after);
            let page = tokio::task::spawn_blocking(move || {
                svc.engine().history(vm.as_deref(), after, PAGE)
            })
            .await;
            match page {
                Ok(Ok(evs)) if !evs.is_empty() => {
                    let mut out = Vec::new();
                    for ev in &evs {
                        if let Some(l) = line(ev, self.json) {
                            out.extend_from_slice(&l);
                        }
                        self.after = self.after.max(ev.id);
                    }
                    return Some(out.into());
                }
                Ok(Ok(_)) => self.stored_done = true,
                Ok(Err(e)) => {
                    self.stored_done = true;
                    self.live = None;
                    let msg = serde_json::json!({ "error": e.to_string() }).to_string();
                    return Some(Bytes::from(msg + "\n"));
                }
                Err(_) => return None,
            }
        }
        let json = self.json;
        let closing = &mut self.closing;
        let rx = self.live.as_mut()?;
        loop {
            let r = tokio::select! {
                r = rx.recv() => r,
                _ = closing.wait_for(|c| *c) => return None,
                _ = tokio::time::sleep(HEARTBEAT) => return Some(Bytes::from_static(b"\n")),
            };
            match r {
                Ok(ev) => {
                    let vm_ok = self.vm.as_deref().is_none_or(|v| v == ev.vm);
                    // Unstored events (id 0: the store failed) still go out.
                    if vm_ok && (ev.id == 0 || ev.id > self.after) {
                        self.after = self.after.max(ev.id);
                        if let Some(l) = line(&ev, json) {
                            return Some(l);
                        }
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    let msg =
                        serde_json::json!({ "lagged": n, "hint": "re-read with ?after=LAST_ID" });
                    return Some(Bytes::from(msg.to_string() + "\n"));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}
