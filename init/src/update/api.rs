//! The agent's local HTTP API (hyper, HTTP/1.1):
//!
//! - `GET /v1/health`: `ok`, for the supervisor's health check; never
//!   needs the token;
//! - `GET /v1/status`: booted slot, both slots' versions and states, the
//!   pending install, the last result and the versions refused for good;
//! - `POST /v1/update[?reboot=false]`: an OS bundle as the body, streamed
//!   straight into the other slot while it arrives; answers once it is
//!   installed (200) or refused (400 for a bundle that is damaged or not
//!   trusted, 409 for one that does not fit this device now, 500 for a
//!   write error); then reboots unless told not to;
//! - `POST /v1/models`: a model bundle as the body, installed into the
//!   model store while it arrives, then handed to the runtime
//!   (`POST /v2/repository/models/<name>/load`); answers with what was
//!   installed and the runtime's own status and answer (400 for a bundle
//!   that is damaged, not trusted or failed here before, 502 when the
//!   runtime cannot be reached);
//! - `POST /v1/reboot`: reboots (into the installed version, if any).
//!
//! With a token configured every endpoint but health needs
//! `Authorization: Bearer <token>`. Answers are JSON.

use std::convert::Infallible;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::platform;
use crate::update::agent::{Agent, Machine, UpdateError};
use crate::update::install::InstallError;
use crate::update::models::{self, ModelSettings, ModelStatus};

/// What every connection shares.
pub struct Shared<M: Machine> {
    /// The agent; locked for the length of an install.
    pub agent: Mutex<Agent<M>>,
    /// The bearer token, if the API needs one.
    pub token: Option<String>,
    /// Whether to reboot after an install unless the request says not to.
    pub reboot: bool,
    /// Where models go and which runtime loads them; `None` when the
    /// image has no model store.
    pub models: Option<ModelSettings>,
    installing: AtomicBool,
}

impl<M: Machine> Shared<M> {
    /// Shares `agent` with the API.
    pub fn new(agent: Agent<M>, token: Option<String>, reboot: bool) -> Shared<M> {
        Shared {
            agent: Mutex::new(agent),
            token,
            reboot,
            models: None,
            installing: AtomicBool::new(false),
        }
    }

    /// Takes model bundles into `settings.store` too.
    pub fn with_models(mut self, settings: ModelSettings) -> Shared<M> {
        self.models = Some(settings);
        self
    }

    /// Marks an install as running; false if one already is.
    pub fn begin(&self) -> bool {
        !self.installing.swap(true, Ordering::SeqCst)
    }

    /// Marks the install as done.
    pub fn end(&self) {
        self.installing.store(false, Ordering::SeqCst);
    }

    /// Whether an install is running.
    pub fn busy(&self) -> bool {
        self.installing.load(Ordering::SeqCst)
    }
}

type Reply = Response<Full<Bytes>>;

/// How long an upload may pause before it counts as broken.
const BODY_IDLE: Duration = Duration::from_secs(60);

/// How much of a refused upload is read (and dropped) before the answer.
/// Beyond that the connection is closed with the answer.
const DRAIN_MAX: usize = 64 << 20;

fn json<T: Serialize>(status: StatusCode, body: &T) -> Reply {
    let text = serde_json::to_string_pretty(body).unwrap_or_else(|_| "{}".into());
    let mut r = Response::new(Full::new(Bytes::from(text + "\n")));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    r
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

fn error(status: StatusCode, msg: &str) -> Reply {
    json(status, &ErrorBody { error: msg })
}

/// Compares without an early exit, so timing does not reveal the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized<M: Machine>(req: &Request<Incoming>, shared: &Shared<M>) -> bool {
    let Some(token) = &shared.token else { return true };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    same(given.trim().as_bytes(), token.as_bytes())
}

/// The request body as a blocking reader, fed by the connection task.
struct BodyReader {
    rx: mpsc::Receiver<Bytes>,
    buf: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.buf = b,
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

fn status_code(e: &UpdateError) -> StatusCode {
    match e {
        // A payload that turns out damaged while it streams is the
        // bundle's fault too, even though writing had started.
        UpdateError::Bundle(_)
        | UpdateError::Install(InstallError::Payload { .. } | InstallError::Bundle(_)) => {
            StatusCode::BAD_REQUEST
        }
        UpdateError::Refused(_) | UpdateError::Busy => StatusCode::CONFLICT,
        UpdateError::Install(_) | UpdateError::Bootloader(_) | UpdateError::Machine(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// Schedules the reboot a moment after the answer went out.
pub fn reboot_soon() {
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("rebooting into the new version");
        if let Err(e) = platform::process::request_reboot() {
            eprintln!("cannot ask PID 1 to reboot: {e}");
        }
    });
}

async fn update<M: Machine + Send + 'static>(
    req: Request<Incoming>,
    shared: Arc<Shared<M>>,
) -> Reply {
    if !shared.begin() {
        return error(StatusCode::CONFLICT, &UpdateError::Busy.to_string());
    }
    let reboot = shared.reboot
        && !req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "reboot=false"));
    let sh = shared.clone();
    let result = feed(req, move |reader| match sh.agent.lock() {
        Ok(mut agent) => agent.install(reader),
        Err(_) => Err(UpdateError::Machine("the agent's state is poisoned; restart it".into())),
    })
    .await;
    shared.end();
    match result {
        Ok(Ok(done)) => {
            println!("installed {} into slot {} ({})", done.version, done.slot, done.entry);
            if reboot {
                reboot_soon();
            }
            #[derive(Serialize)]
            struct Done<'a> {
                installed: &'a crate::update::agent::Installed,
                reboot: bool,
            }
            json(StatusCode::OK, &Done { installed: &done, reboot })
        }
        Ok(Err(e)) => {
            eprintln!("update refused: {e}");
            error(status_code(&e), &e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("the install stopped: {e}")),
    }
}

/// Streams the request body into a blocking job that reads it; returns
/// the job's result.
async fn feed<T: Send + 'static>(
    req: Request<Incoming>,
    job: impl FnOnce(BodyReader) -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let job = tokio::task::spawn_blocking(move || job(BodyReader { rx, buf: Bytes::new() }));
    let mut body = req.into_body();
    let mut feeding = true;
    let mut dropped = 0usize;
    loop {
        // A client that stops sending must not hold the install forever:
        // the reader then sees the end of a truncated bundle.
        let frame = match tokio::time::timeout(BODY_IDLE, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(_)) | None) | Err(_) => break,
        };
        if let Ok(data) = frame.into_data() {
            if feeding {
                if tx.send(data).await.is_err() {
                    feeding = false;
                }
            } else {
                // The job has stopped (a refused bundle): read a bounded
                // rest of the body, so that the client, still sending,
                // gets to read the answer; then close.
                dropped += data.len();
                if dropped > DRAIN_MAX {
                    break;
                }
            }
        }
    }
    drop(tx);
    job.await
}

async fn models_push<M: Machine + Send + 'static>(
    req: Request<Incoming>,
    shared: Arc<Shared<M>>,
) -> Reply {
    let Some(settings) = shared.models.clone() else {
        return error(StatusCode::NOT_FOUND, "this image has no model store");
    };
    let trust = match shared.agent.lock() {
        Ok(a) => a.trust().clone(),
        Err(_) => return error(StatusCode::INTERNAL_SERVER_ERROR, "the agent's state is poisoned"),
    };
    if !shared.begin() {
        return error(StatusCode::CONFLICT, &UpdateError::Busy.to_string());
    }
    let s = settings.clone();
    let result = feed(req, move |reader| models::install(&s, reader, &trust)).await;
    shared.end();
    let installed = match result {
        Ok(Ok(i)) => i,
        Ok(Err(e)) => {
            eprintln!("model refused: {e}");
            let code = match e {
                basalt_bundle::model::ModelStoreError::Io { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => StatusCode::BAD_REQUEST,
            };
            return error(code, &e.to_string());
        }
        Err(e) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("the install stopped: {e}"))
        }
    };
    #[derive(Serialize)]
    struct Installed<'a> {
        name: &'a str,
        version: String,
        already: bool,
        pruned: Vec<String>,
    }
    #[derive(Serialize)]
    struct Done<'a> {
        installed: Installed<'a>,
        runtime: Option<models::LoadAnswer>,
        message: String,
    }
    let done = |runtime: Option<models::LoadAnswer>, message: String| Done {
        installed: Installed {
            name: &installed.name,
            version: installed.version.to_string(),
            already: installed.already,
            pruned: installed.pruned.iter().map(ToString::to_string).collect(),
        },
        runtime,
        message,
    };
    match models::load(&settings.runtime, &installed.name, models::LOAD_TIMEOUT).await {
        Ok(answer) => {
            let message = models::describe(&installed.name, &installed.version, &answer);
            println!("{message}");
            let code = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            json(code, &done(Some(answer), message))
        }
        Err(e) => {
            let message = format!(
                "model {} {} installed, but the runtime was not told: {e}",
                installed.name, installed.version
            );
            eprintln!("{message}");
            json(StatusCode::BAD_GATEWAY, &done(None, message))
        }
    }
}

async fn status<M: Machine + Send + 'static>(shared: Arc<Shared<M>>) -> Reply {
    if shared.busy() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "an update is being installed; ask again soon",
        );
    }
    let sh = shared.clone();
    let result = tokio::task::spawn_blocking(move || {
        let models = sh.models.as_ref().map(models::status).unwrap_or_default();
        sh.agent.lock().map(|mut a| (a.status(), models)).map_err(|_| ())
    })
    .await;
    #[derive(Serialize)]
    struct WithModels {
        #[serde(flatten)]
        status: crate::update::agent::Status,
        models: Vec<ModelStatus>,
    }
    match result {
        Ok(Ok((status, models))) => json(StatusCode::OK, &WithModels { status, models }),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "the agent's state is poisoned; restart it"),
    }
}

/// Answers one request.
pub async fn handle<M: Machine + Send + 'static>(
    req: Request<Incoming>,
    shared: Arc<Shared<M>>,
) -> Result<Reply, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    if path == "/v1/health" && method == Method::GET {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))));
    }
    if !authorized(&req, &shared) {
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "this API needs `Authorization: Bearer <token>`",
        ));
    }
    let reply = match (method, path.as_str()) {
        (Method::GET, "/v1/status") => status(shared).await,
        (Method::POST, "/v1/update") => update(req, shared).await,
        (Method::POST, "/v1/models") => models_push(req, shared).await,
        (Method::POST, "/v1/reboot") => {
            reboot_soon();
            json(StatusCode::ACCEPTED, &ErrorBody { error: "" })
        }
        (_, "/v1/status" | "/v1/update" | "/v1/models" | "/v1/reboot" | "/v1/health") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "wrong method; see the API in docs/ota.md")
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "no such endpoint: /v1/health, /v1/status, /v1/update, /v1/models, /v1/reboot",
        ),
    };
    Ok(reply)
}

/// Serves the API on `listener` until the process ends.
pub async fn serve<M: Machine + Send + 'static>(listener: TcpListener, shared: Arc<Shared<M>>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, shared.clone()));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
