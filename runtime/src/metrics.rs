//! Prometheus metrics of the server, in the text format at `/metrics`:
//!
//! - `basalt_inference_requests_total{model,version,outcome}`: requests by
//!   outcome (`success`, `bad_request`, `rejected` when the queue is full or
//!   the model not ready, `error`);
//! - `basalt_inference_duration_seconds{model,version}`: a histogram of
//!   request latency, queue included;
//! - `basalt_inference_queue_depth`: requests waiting for the engine;
//! - `basalt_model_load_duration_seconds{model,version}`: how long loading
//!   (and the test vector) took;
//! - `basalt_model_ready{model,version}`: 1 when the model serves.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The `Content-Type` of `/metrics`: the Prometheus text format, which
/// every scraper and `promtool check metrics` read.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    model: String,
    version: String,
    outcome: String,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    latency: Family<ModelLabels, Histogram, fn() -> Histogram>,
    queue: Gauge,
    load: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    ready: Family<ModelLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<OutcomeLabels, Counter>::default();
        let latency = Family::<ModelLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let queue = Gauge::default();
        let load = Family::<ModelLabels, Gauge<f64, AtomicU64>>::default();
        let ready = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "basalt_inference_requests",
            "Inference requests by model, version and outcome",
            requests.clone(),
        );
        registry.register(
            "basalt_inference_duration_seconds",
            "Inference request latency in seconds, queueing included",
            latency.clone(),
        );
        registry.register(
            "basalt_inference_queue_depth",
            "Inference requests waiting for the engine",
            queue.clone(),
        );
        registry.register(
            "basalt_model_load_duration_seconds",
            "Time to load a model version and run its test vector, in seconds",
            load.clone(),
        );
        registry.register("basalt_model_ready", "1 when the model version serves", ready.clone());
        Metrics { registry, requests, latency, queue, load, ready }
    }

    fn labels(model: &str, version: &str) -> ModelLabels {
        ModelLabels { model: model.to_string(), version: version.to_string() }
    }

    /// Records a loaded (or failed) model version.
    pub fn model_loaded(&self, model: &str, version: &str, seconds: f64, ready: bool) {
        self.load.get_or_create(&Self::labels(model, version)).set(seconds);
        self.ready.get_or_create(&Self::labels(model, version)).set(i64::from(ready));
    }

    /// Records one request.
    pub fn request(&self, model: &str, version: &str, outcome: &str, seconds: f64) {
        let l = OutcomeLabels {
            model: model.to_string(),
            version: version.to_string(),
            outcome: outcome.to_string(),
        };
        self.requests.get_or_create(&l).inc();
        self.latency.get_or_create(&Self::labels(model, version)).observe(seconds);
    }

    /// Sets the queue depth.
    pub fn queue_depth(&self, depth: usize) {
        self.queue.set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// The text exposition, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut open_metrics = String::new();
        if prometheus_client::encoding::text::encode(&mut open_metrics, &self.registry).is_err() {
            return String::new();
        }
        to_prometheus_text(&open_metrics)
    }
}

/// Turns OpenMetrics text into the Prometheus text format: a counter's
/// `HELP` and `TYPE` name its samples (`x_total`), and there is no
/// `# EOF` line.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: Vec<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(&name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
