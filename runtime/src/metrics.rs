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
//! - `basalt_model_ready{model,version}`: 1 when the version loaded and
//!   passed its test vector;
//! - `basalt_model_serving{model,version}`: 1 for the version that answers
//!   requests naming no version, 0 for the others loaded;
//! - `basalt_model_updates_total{model,result}`: load requests and watch
//!   windows by result (`switched`, `kept`, `rolled-back`, `failed`,
//!   `damaged`);
//! - per model, version, tensor and feature, from [`crate::monitor`]:
//!   `basalt_model_feature_samples_total`, `..._mean`, `..._variance`,
//!   `..._min`, `..._max`, `..._out_of_range_total`, `..._nonfinite_total`
//!   and `basalt_model_feature_psi` (where `model.toml` declares the
//!   training bins). These are read from the statistics when scraped.

use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    model: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    model: String,
    version: String,
    tensor: String,
    feature: String,
}

/// The statistics of one model version's tensors at a scrape.
#[derive(Debug, Clone)]
pub struct VersionSnapshot {
    model: String,
    version: String,
    tensors: Vec<(String, Vec<crate::monitor::FeatureSnapshot>)>,
}

impl VersionSnapshot {
    /// Reads a version's monitor.
    pub fn of(model: &str, version: &str, m: &crate::monitor::Monitor) -> VersionSnapshot {
        VersionSnapshot {
            model: model.to_string(),
            version: version.to_string(),
            tensors: m
                .inputs
                .iter()
                .chain(&m.outputs)
                .map(|t| (t.tensor.clone(), t.snapshot()))
                .collect(),
        }
    }
}

/// Reads every loaded version's statistics, at each scrape.
pub type Snapshots = Box<dyn Fn() -> Vec<VersionSnapshot> + Send + Sync>;

struct Drift(Snapshots);

impl std::fmt::Debug for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Drift")
    }
}

impl Collector for Drift {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Pick = fn(&crate::monitor::FeatureSnapshot) -> Option<f64>;
        type Count = fn(&crate::monitor::FeatureSnapshot) -> u64;
        let snaps = (self.0)();
        let rows = || {
            snaps.iter().flat_map(|v| {
                v.tensors.iter().flat_map(move |(t, fs)| {
                    fs.iter().map(move |f| {
                        let labels = FeatureLabels {
                            model: v.model.clone(),
                            version: v.version.clone(),
                            tensor: t.clone(),
                            feature: f.name.clone(),
                        };
                        (labels, f)
                    })
                })
            })
        };
        let counters: [(&str, &str, Count); 3] = [
            (
                "basalt_model_feature_samples",
                "Finite values seen per model version, tensor and feature",
                |f| f.stats.count,
            ),
            (
                "basalt_model_feature_out_of_range",
                "Values outside the training range model.toml declares",
                |f| f.out_of_range,
            ),
            ("basalt_model_feature_nonfinite", "NaN and infinite values seen", |f| f.nonfinite),
        ];
        for (name, help, pick) in counters {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (labels, f) in rows() {
                ConstCounter::new(pick(f)).encode(m.encode_family(&labels)?)?;
            }
        }
        let gauges: [(&str, &str, Pick); 5] = [
            ("basalt_model_feature_mean", "Running mean of the feature", |f| {
                (f.stats.count > 0).then_some(f.stats.mean)
            }),
            ("basalt_model_feature_variance", "Running population variance of the feature", |f| {
                (f.stats.count > 0).then_some(f.stats.variance())
            }),
            ("basalt_model_feature_min", "Smallest value of the feature seen", |f| {
                (f.stats.count > 0).then_some(f.stats.min)
            }),
            ("basalt_model_feature_max", "Largest value of the feature seen", |f| {
                (f.stats.count > 0).then_some(f.stats.max)
            }),
            (
                "basalt_model_feature_psi",
                "Population stability index of the feature against its training bins",
                |f| f.psi,
            ),
        ];
        for (name, help, pick) in gauges {
            let mut m =
                encoder.encode_descriptor(name, help, None, ConstGauge::new(0f64).metric_type())?;
            for (labels, f) in rows() {
                if let Some(x) = pick(f) {
                    ConstGauge::new(x).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    latency: Family<ModelLabels, Histogram, fn() -> Histogram>,
    queue: Gauge,
    load: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    ready: Family<ModelLabels, Gauge>,
    serving: Family<ModelLabels, Gauge>,
    updates: Family<UpdateLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric, the drift statistics read by `snapshots`.
    pub fn with_drift(snapshots: Snapshots) -> Metrics {
        let mut m = Metrics::new();
        m.registry.register_collector(Box::new(Drift(snapshots)));
        m
    }

    /// Registers every metric but the drift statistics.
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
        registry.register(
            "basalt_model_ready",
            "1 when the model version loaded and passed its test vector",
            ready.clone(),
        );
        let serving = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "basalt_model_serving",
            "1 for the version that answers requests naming no version",
            serving.clone(),
        );
        let updates = Family::<UpdateLabels, Counter>::default();
        registry.register(
            "basalt_model_updates",
            "Model version switches and their outcomes by result",
            updates.clone(),
        );
        Metrics { registry, requests, latency, queue, load, ready, serving, updates }
    }

    /// Marks which version of `model` serves.
    pub fn serving(&self, model: &str, version: &str, serving: bool) {
        self.serving.get_or_create(&Self::labels(model, version)).set(i64::from(serving));
    }

    /// Counts one update step of `model` (`switched`, `kept`, ...).
    pub fn update(&self, model: &str, result: &str) {
        let l = UpdateLabels { model: model.to_string(), result: result.to_string() };
        self.updates.get_or_create(&l).inc();
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
