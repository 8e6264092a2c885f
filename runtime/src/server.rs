//! The Open Inference Protocol (KServe V2) REST server, on hyper.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v2/health/live` | 200 while the process runs |
//! | `GET /v2/health/ready` | 200 when every model is ready, else 503 |
//! | `GET /v2` | server metadata |
//! | `GET /v2/models/{m}[/versions/{v}]` | model metadata: inputs, outputs |
//! | `GET /v2/models/{m}[/versions/{v}]/ready` | 200 ready, 503 not ready, 404 unknown |
//! | `POST /v2/models/{m}[/versions/{v}]/infer` | inference, JSON and binary tensors |
//! | `GET /v2/models[/{m}[/versions/{v}]]/stats` | the statistics extension |
//! | `GET /metrics` | Prometheus text format |
//!
//! Errors are `{"error": "..."}` with 400 (the request is wrong), 404
//! (no such model or version), 413 (body over the limit), 500 (the model
//! failed) or 503 (not ready, or the queue is full). In front of the engine
//! is a bounded queue: a request that finds it full is answered 503 at
//! once rather than waiting without end.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use basalt_bundle::model::Watch;

use crate::monitor::{Latency, Monitor};
use crate::repository::{Catalog, RepoError};
use crate::v2::{self, Datatype, Tensor};

/// The header that splits a body into JSON and binary tensor data.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An input or output as model metadata shows it; `-1` is a dimension the
/// model leaves open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Name.
    pub name: String,
    /// Element type.
    pub datatype: Datatype,
    /// Shape, `-1` for a dynamic dimension.
    pub shape: Vec<i64>,
}

impl TensorMeta {
    fn to_json(&self) -> Value {
        json!({ "name": self.name, "datatype": self.datatype.name(), "shape": self.shape })
    }
}

/// Why an inference failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    /// The inputs do not fit the model (400).
    #[error("{0}")]
    BadInput(String),
    /// The model failed to run (500).
    #[error("{0}")]
    Failed(String),
}

/// A model version the server can run.
pub trait Backend: Send + Sync {
    /// Its inputs.
    fn inputs(&self) -> Vec<TensorMeta>;
    /// Its outputs.
    fn outputs(&self) -> Vec<TensorMeta>;
    /// Runs it; the outputs in the model's order.
    fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferError>;
}

/// Counters of the statistics extension, per model version.
#[derive(Debug, Default)]
pub struct Stats {
    success_count: AtomicU64,
    success_ns: AtomicU64,
    fail_count: AtomicU64,
    fail_ns: AtomicU64,
    error_count: AtomicU64,
    queue_ns: AtomicU64,
    compute_ns: AtomicU64,
    last_ms: AtomicU64,
}

impl Stats {
    /// Requests answered with outputs.
    pub fn successes(&self) -> u64 {
        self.success_count.load(Ordering::Relaxed)
    }
    /// Requests the model failed (answered 500).
    pub fn errors(&self) -> u64 {
        self.error_count.load(Ordering::Relaxed)
    }
}

/// One model version as the server serves it.
pub struct Served {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: String,
    /// What runs it; `None` when it failed to load.
    pub backend: Option<Arc<dyn Backend>>,
    /// Why it is not ready, when it is not.
    pub problem: Option<String>,
    /// Counters.
    pub stats: Stats,
    /// Statistics of its inputs and outputs; `None` when it did not load.
    pub monitor: Option<Monitor>,
    /// Compute time of its successful requests, for the watch window.
    pub compute: Latency,
    /// The watch-window rules of its `model.toml`.
    pub watch: Watch,
}

impl Served {
    /// A version that does not serve, for `problem`.
    pub fn failed(name: &str, version: &str, problem: String) -> Served {
        Served {
            name: name.to_string(),
            version: version.to_string(),
            backend: None,
            problem: Some(problem),
            stats: Stats::default(),
            monitor: None,
            compute: Latency::default(),
            watch: Watch::default(),
        }
    }

    /// Whether it can answer requests.
    pub fn ready(&self) -> bool {
        self.backend.is_some() && self.problem.is_none()
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Inferences running at once.
    pub concurrency: usize,
    /// Requests that may wait for a turn; beyond, 503 at once.
    pub max_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body: 64 << 20, concurrency: 1, max_queue: 32 }
    }
}

/// What every connection shares.
pub struct Server {
    catalog: Arc<Catalog>,
    limits: Limits,
    running: Semaphore,
    waiting: AtomicUsize,
    /// Inference requests in flight, and how many have ended: the idle
    /// trim of the allocator's cache waits for both to stay still.
    in_flight: AtomicUsize,
    ended: AtomicU64,
}

/// Counts an inference request in flight while it lives (also when its
/// connection drops it half-way).
struct InFlight<'a>(&'a Server);

impl<'a> InFlight<'a> {
    fn new(s: &'a Server) -> InFlight<'a> {
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(s)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the idle trim has seen: the count of ended requests at the last
/// tick, for how many ticks nothing has moved, and ticks since the cache's
/// unused blocks were last released.
#[derive(Default)]
struct Quiet {
    ended: u64,
    ticks: u32,
    since_release: u32,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_reply(status: StatusCode, v: &Value) -> Reply {
    reply(status, serde_json::to_vec(v).unwrap_or_default(), "application/json")
}

fn error(status: StatusCode, msg: &str) -> Reply {
    json_reply(status, &json!({ "error": msg }))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Server {
    /// A server for the models of `catalog`.
    pub fn new(catalog: Arc<Catalog>, limits: Limits) -> Server {
        Server {
            running: Semaphore::new(limits.concurrency.max(1)),
            waiting: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            ended: AtomicU64::new(0),
            catalog,
            limits,
        }
    }

    /// The models.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Whether every model has a version serving.
    pub fn ready(&self) -> bool {
        self.catalog.ready()
    }

    /// The model version a path names: the serving one when none is given.
    fn find(&self, name: &str, version: Option<&str>) -> Result<Arc<Served>, Box<Reply>> {
        self.catalog.find(name, version).ok_or_else(|| {
            let what = match version {
                Some(v) => format!("model {name:?} has no version {v:?}"),
                None => format!("no model {name:?}"),
            };
            let known: Vec<String> = self
                .catalog
                .all_versions()
                .iter()
                .map(|m| format!("{}/{}", m.name, m.version))
                .collect();
            Box::new(error(StatusCode::NOT_FOUND, &format!("{what}; known: {}", known.join(", "))))
        })
    }

    fn metadata(&self, m: &Served) -> Reply {
        let all = self.catalog.versions(&m.name);
        let versions: Vec<&str> = all.iter().map(|x| x.version.as_str()).collect();
        let (inputs, outputs) = match &m.backend {
            Some(b) => (
                b.inputs().iter().map(TensorMeta::to_json).collect(),
                b.outputs().iter().map(TensorMeta::to_json).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        json_reply(
            StatusCode::OK,
            &json!({
                "name": m.name,
                "versions": versions,
                "platform": "onnx",
                "inputs": inputs,
                "outputs": outputs,
            }),
        )
    }

    fn stats(&self, models: Vec<Arc<Served>>) -> Reply {
        let pair = |c: &AtomicU64, ns: &AtomicU64| json!({ "count": c.load(Ordering::Relaxed), "ns": ns.load(Ordering::Relaxed) });
        let list: Vec<Value> = models
            .iter()
            .map(|m| {
                let s = &m.stats;
                let ok = s.success_count.load(Ordering::Relaxed);
                json!({
                    "name": m.name,
                    "version": m.version,
                    "last_inference": s.last_ms.load(Ordering::Relaxed),
                    "inference_count": ok,
                    "execution_count": ok,
                    "inference_stats": {
                        "success": pair(&s.success_count, &s.success_ns),
                        "fail": pair(&s.fail_count, &s.fail_ns),
                        "queue": pair(&s.success_count, &s.queue_ns),
                        "compute_infer": pair(&s.success_count, &s.compute_ns),
                    },
                    "model_errors": s.error_count.load(Ordering::Relaxed),
                    "compute_p99_seconds": m.compute.quantile(0.99),
                    "monitor": m.monitor.as_ref().map(monitor_json),
                })
            })
            .collect();
        json_reply(StatusCode::OK, &json!({ "model_stats": list }))
    }

    async fn infer(self: Arc<Self>, m: Arc<Served>, req: Request<Incoming>) -> Reply {
        let _in_flight = InFlight::new(&self);
        let start = Instant::now();
        let outcome = self.infer_inner(&m, req, start).await;
        let elapsed = start.elapsed();
        let (reply, label) = match outcome {
            Ok(r) => (r, "success"),
            Err((status, msg)) => {
                if status == StatusCode::INTERNAL_SERVER_ERROR {
                    m.stats.error_count.fetch_add(1, Ordering::Relaxed);
                }
                let label = match status {
                    StatusCode::SERVICE_UNAVAILABLE => "rejected",
                    s if s.is_client_error() => "bad_request",
                    _ => "error",
                };
                (error(status, &msg), label)
            }
        };
        let s = &m.stats;
        if label == "success" {
            s.success_count.fetch_add(1, Ordering::Relaxed);
            s.success_ns.fetch_add(nanos(elapsed), Ordering::Relaxed);
        } else {
            s.fail_count.fetch_add(1, Ordering::Relaxed);
            s.fail_ns.fetch_add(nanos(elapsed), Ordering::Relaxed);
        }
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        s.last_ms.store(u64::try_from(now_ms).unwrap_or(0), Ordering::Relaxed);
        self.catalog.metrics().request(&m.name, &m.version, label, elapsed.as_secs_f64());
        if self.catalog.watched(&m) {
            let catalog = self.catalog.clone();
            let name = m.name.clone();
            tokio::task::spawn_blocking(move || catalog.judge(&name));
        }
        reply
    }

    async fn infer_inner(
        &self,
        m: &Arc<Served>,
        req: Request<Incoming>,
        start: Instant,
    ) -> Result<Reply, (StatusCode, String)> {
        let Some(backend) = m.backend.clone().filter(|_| m.problem.is_none()) else {
            let why = m.problem.clone().unwrap_or_else(|| "it did not load".into());
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("model {} {} is not ready: {why}", m.name, m.version),
            ));
        };
        let header_len = match req.headers().get(HEADER_LENGTH) {
            None => None,
            Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()) {
                Some(n) => Some(n),
                None => {
                    return Err((
                        StatusCode::BAD_REQUEST,
                        "Inference-Header-Content-Length is not a byte count".into(),
                    ))
                }
            },
        };
        let body = match Limited::new(req.into_body(), self.limits.max_body).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is over the limit of {} bytes", self.limits.max_body),
                ))
            }
            Err(e) => {
                return Err((StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")))
            }
        };
        let request =
            v2::parse_request(&body, header_len).map_err(|e| (StatusCode::BAD_REQUEST, e.0))?;
        drop(body);
        let wanted_outputs = backend.outputs();
        for o in &request.outputs {
            if !wanted_outputs.iter().any(|w| w.name == o.name) {
                let names: Vec<&str> = wanted_outputs.iter().map(|w| w.name.as_str()).collect();
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!(
                        "model {} has no output {:?}; its outputs: {}",
                        m.name,
                        o.name,
                        names.join(", ")
                    ),
                ));
            }
        }

        // The bounded queue.
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.limits.max_queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the queue is full ({} requests wait); try again shortly",
                    self.limits.max_queue
                ),
            ));
        }
        self.catalog.metrics().queue_depth(self.waiting.load(Ordering::SeqCst));
        let permit = self.running.acquire().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.catalog.metrics().queue_depth(self.waiting.load(Ordering::SeqCst));
        let Ok(_permit) = permit else {
            return Err((StatusCode::SERVICE_UNAVAILABLE, "the server is stopping".into()));
        };
        m.stats.queue_ns.fetch_add(nanos(start.elapsed()), Ordering::Relaxed);
        let inputs = request.inputs;
        let me = m.clone();
        let result = tokio::task::spawn_blocking(move || {
            let compute = Instant::now();
            let out = backend.infer(&inputs);
            let took = compute.elapsed();
            me.stats.compute_ns.fetch_add(nanos(took), Ordering::Relaxed);
            if let Ok(outputs) = &out {
                me.compute.record(took.as_secs_f64());
                if let Some(monitor) = &me.monitor {
                    monitor.observe(&inputs, outputs);
                }
            }
            out
        })
        .await;
        let outputs = match result {
            Ok(Ok(o)) => o,
            Ok(Err(InferError::BadInput(e))) => return Err((StatusCode::BAD_REQUEST, e)),
            Ok(Err(InferError::Failed(e))) => return Err((StatusCode::INTERNAL_SERVER_ERROR, e)),
            Err(e) => {
                return Err((StatusCode::INTERNAL_SERVER_ERROR, format!("the model stopped: {e}")))
            }
        };
        let chosen: Vec<(Tensor, bool)> = if request.outputs.is_empty() {
            outputs.into_iter().map(|t| (t, request.binary_output)).collect()
        } else {
            let mut by_name: HashMap<String, Tensor> =
                outputs.into_iter().map(|t| (t.name.clone(), t)).collect();
            request
                .outputs
                .iter()
                .filter_map(|o| by_name.remove(&o.name).map(|t| (t, o.binary)))
                .collect()
        };
        let enc = v2::encode_response(&m.name, &m.version, request.id.as_deref(), &chosen);
        let mut r = match enc.header_len {
            None => reply(StatusCode::OK, enc.body, "application/json"),
            Some(n) => {
                let mut r = reply(StatusCode::OK, enc.body, "application/octet-stream");
                r.headers_mut().insert(HEADER_LENGTH, HeaderValue::from(n));
                r
            }
        };
        *r.status_mut() = StatusCode::OK;
        Ok(r)
    }

    /// Answers one request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Reply, Infallible> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let method = req.method().clone();
        let parts: Vec<&str> = path.split('/').skip(1).collect();
        let get = method == Method::GET || method == Method::HEAD;
        let r = match parts.as_slice() {
            ["v2", "health", "live"] if get => json_reply(StatusCode::OK, &json!({ "live": true })),
            ["v2", "health", "ready"] if get => {
                if self.ready() {
                    json_reply(StatusCode::OK, &json!({ "ready": true }))
                } else {
                    let why = self.catalog.problems().join("; ");
                    error(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {why}"))
                }
            }
            ["v2", "repository", "index"] if get || method == Method::POST => {
                json_reply(StatusCode::OK, &self.catalog.index())
            }
            ["v2", "repository", "models", name] if get => match self.catalog.status(name) {
                Some(v) => json_reply(StatusCode::OK, &v),
                None => error(StatusCode::NOT_FOUND, &format!("no model {name:?}")),
            },
            ["v2", "repository", "models", name, "load"] if method == Method::POST => {
                let (catalog, name) = (self.catalog.clone(), name.to_string());
                let done = tokio::task::spawn_blocking(move || catalog.load_newest(&name)).await;
                match done {
                    Ok(Ok(report)) => json_reply(StatusCode::OK, &report.to_json()),
                    Ok(Err(e)) => {
                        let status = match e {
                            RepoError::Unknown(_) => StatusCode::NOT_FOUND,
                            RepoError::Busy(_) => StatusCode::CONFLICT,
                            RepoError::Failed(_) => StatusCode::BAD_REQUEST,
                        };
                        error(status, &e.to_string())
                    }
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("the load stopped: {e}")),
                }
            }
            ["v2", "repository", ..] => error(
                StatusCode::NOT_FOUND,
                &format!("no such path: {path}; the repository takes GET|POST index, GET models/{{m}}, POST models/{{m}}/load"),
            ),
            ["v2"] if get => json_reply(
                StatusCode::OK,
                &json!({
                    "name": "basalt-runtime",
                    "version": env!("CARGO_PKG_VERSION"),
                    "extensions": ["binary_tensor_data", "statistics", "model_repository"],
                }),
            ),
            ["metrics"] if get => reply(
                StatusCode::OK,
                self.catalog.metrics().encode().into_bytes(),
                crate::metrics::CONTENT_TYPE,
            ),
            ["v2", "models", "stats"] if get => self.stats(self.catalog.all_versions()),
            ["v2", "models", name, rest @ ..] => {
                let (version, tail) = match rest {
                    ["versions", v, tail @ ..] => (Some(*v), tail),
                    tail => (None, tail),
                };
                match self.find(name, version) {
                    Err(r) => *r,
                    Ok(m) => match (tail, &method) {
                        ([], _) if get => self.metadata(&m),
                        (["ready"], _) if get => {
                            if m.ready() {
                                json_reply(
                                    StatusCode::OK,
                                    &json!({ "name": m.name, "ready": true }),
                                )
                            } else {
                                error(
                                    StatusCode::SERVICE_UNAVAILABLE,
                                    m.problem.as_deref().unwrap_or("not ready"),
                                )
                            }
                        }
                        (["stats"], _) if get => {
                            let all = version.is_none();
                            self.stats(
                                self.catalog
                                    .versions(&m.name)
                                    .into_iter()
                                    .filter(|x| all || x.version == m.version)
                                    .collect(),
                            )
                        }
                        (["infer"], &Method::POST) => {
                            let me = self.clone();
                            return Ok(me.infer(m, req).await);
                        }
                        ([] | ["ready"] | ["stats"] | ["infer"], _) => {
                            error(StatusCode::METHOD_NOT_ALLOWED, "wrong method for this path")
                        }
                        _ => error(StatusCode::NOT_FOUND, &format!("no such path: {path}")),
                    },
                }
            }
            _ => error(StatusCode::NOT_FOUND, &format!("no such path: {path}; see /v2")),
        };
        Ok(r)
    }
}

fn monitor_json(m: &Monitor) -> Value {
    let tensor = |t: &crate::monitor::TensorMonitor| {
        let features: Vec<Value> = t
            .snapshot()
            .iter()
            .map(|f| {
                json!({
                    "name": f.name,
                    "count": f.stats.count,
                    "mean": f.stats.mean,
                    "variance": f.stats.variance(),
                    "min": f.stats.min,
                    "max": f.stats.max,
                    "out_of_range": f.out_of_range,
                    "nonfinite": f.nonfinite,
                    "psi": f.psi,
                })
            })
            .collect();
        json!({ "name": t.tensor, "features": features })
    };
    json!({
        "inputs": m.inputs.iter().map(tensor).collect::<Vec<_>>(),
        "outputs": m.outputs.iter().map(tensor).collect::<Vec<_>>(),
    })
}

/// Orders versions numerically where they are numbers ("10" after "9").
pub fn cmp_versions(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => match (semver::Version::parse(a), semver::Version::parse(b)) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        },
    }
}

/// How often watch windows are judged without requests.
const TICK: Duration = Duration::from_millis(100);

/// Ticks without an inference in flight or ended before the allocator's
/// cache of freed buffers goes back to the system (1 s); also how often,
/// under load, the cached buffers nobody took again are returned.
const IDLE_TICKS: u32 = 10;

impl Server {
    /// Called every [`TICK`]: once no inference has been in flight for
    /// [`IDLE_TICKS`], returns the buffers the allocator keeps for the next
    /// one ([`crate::alloc::trim`]), so the idle RSS is low again; under
    /// load, every [`IDLE_TICKS`] returns those nobody took since
    /// ([`crate::alloc::release_unused`]). Cheap when there is nothing to
    /// return (atomic reads).
    fn release_memory(&self, quiet: &mut Quiet) {
        if crate::alloc::cached_bytes() > 0 {
            quiet.since_release += 1;
            if quiet.since_release >= IDLE_TICKS {
                quiet.since_release = 0;
                crate::alloc::release_unused();
            }
        }
        let ended = self.ended.load(Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) > 0 || ended != quiet.ended {
            quiet.ended = ended;
            quiet.ticks = 0;
            return;
        }
        quiet.ticks = quiet.ticks.saturating_add(1);
        if quiet.ticks >= IDLE_TICKS && crate::alloc::cached_bytes() > 0 {
            // On a blocking thread, where the inferences ran and the idle one
            // picked next: mimalloc returns a page to the system only from the
            // thread that owns it (from here the frees would wait for that
            // thread's next allocation).
            drop(tokio::task::spawn_blocking(crate::alloc::trim));
        }
    }
}

/// Serves `server` on `listener` until the process ends. Once it listens,
/// each model's newest version is tried (one installed while the runtime
/// was down), and watch windows are judged every 100 ms; after 1 s without
/// inferences the allocator's cached buffers go back to the system, and
/// under load, every second, those nobody used again.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    let catalog = server.catalog.clone();
    let idle = server.clone();
    tokio::spawn(async move {
        let c = catalog.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for name in c.names() {
                if let Err(e) = c.load_newest(&name) {
                    println!("model {name}: {e}");
                }
            }
            // What loading freed is not an inference's buffers.
            crate::alloc::trim();
        })
        .await;
        let mut quiet = Quiet::default();
        loop {
            tokio::time::sleep(TICK).await;
            idle.release_memory(&mut quiet);
            if catalog.watching() {
                let c = catalog.clone();
                let _ = tokio::task::spawn_blocking(move || c.tick()).await;
            }
        }
    });
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| server.clone().handle(req));
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
