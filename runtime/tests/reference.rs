//! Runs every model in `.cache/models/` on its reference input and compares each output
//! element with onnxruntime's, within 1e-4 relative (absolute floor 1e-5).
//!
//! The models come from `ci/models/make_models.py` (run by `ci/setup.sh`); without them
//! this test fails rather than passing silently.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use basalt_runtime::engine::{DataType, Model};
use candle_core::{Device, Tensor};
use serde_json::Value;

/// The allocator the shipped `basalt-runtime` binary runs on, so the latency measured here
/// is the engine's as served (freed large buffers are reused, not mapped again).
#[global_allocator]
static ALLOCATOR: basalt_runtime::alloc::Global = basalt_runtime::alloc::Global;

const MODELS: &[&str] = &["mlp", "cnn", "mobilenetv3", "resnet18", "transformer"];
const RELATIVE: f64 = 1e-4;
const ABSOLUTE_FLOOR: f64 = 1e-5;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(".cache").join("models")
}

fn tensor_of(name: &str, v: &Value) -> Tensor {
    let shape: Vec<usize> = v["shape"]
        .as_array()
        .unwrap_or_else(|| panic!("{name}: no shape"))
        .iter()
        .map(|d| d.as_u64().expect("dimension") as usize)
        .collect();
    let data = v["data"].as_array().unwrap_or_else(|| panic!("{name}: no data"));
    match v["datatype"].as_str() {
        Some("FP32") => {
            let d: Vec<f32> = data.iter().map(|x| x.as_f64().expect("number") as f32).collect();
            Tensor::from_vec(d, shape, &Device::Cpu).unwrap()
        }
        Some("INT64") => {
            let d: Vec<i64> = data.iter().map(|x| x.as_i64().expect("integer")).collect();
            Tensor::from_vec(d, shape, &Device::Cpu).unwrap()
        }
        other => panic!("{name}: unexpected datatype {other:?}"),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Returns the largest relative error (error / max(|reference|, floor / relative)).
fn check_model(name: &str, dir: &Path) -> f64 {
    let bytes = std::fs::read(dir.join(format!("{name}.onnx"))).unwrap();
    let started = Instant::now();
    let model = Model::load(&bytes).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    let load_time = started.elapsed();
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.ref.json"))).unwrap())
            .unwrap();
    let inputs: Vec<(String, Tensor)> = reference["inputs"]
        .as_object()
        .expect("inputs")
        .iter()
        .map(|(k, v)| (k.clone(), tensor_of(k, v)))
        .collect();
    let feeds: Vec<(&str, Tensor)> = inputs.iter().map(|(k, t)| (k.as_str(), t.clone())).collect();
    let outputs = model.run(&feeds).unwrap_or_else(|e| panic!("{name}: run failed: {e}"));
    let mut worst: f64 = 0.0;
    for (out_name, want) in reference["outputs"].as_object().expect("outputs") {
        let (_, got) = outputs
            .iter()
            .find(|(n, _)| n == out_name)
            .unwrap_or_else(|| panic!("{name}: no output {out_name}"));
        let want_t = tensor_of(out_name, want);
        assert_eq!(got.dims(), want_t.dims(), "{name}/{out_name}: shape");
        let spec = model.outputs().iter().find(|s| &s.name == out_name).expect("spec");
        assert_eq!(spec.datatype.dtype(), got.dtype(), "{name}/{out_name}: dtype");
        let (g, w): (Vec<f64>, Vec<f64>) = if spec.datatype == DataType::I64 {
            let g: Vec<i64> = got.flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<i64> = want_t.flatten_all().unwrap().to_vec1().unwrap();
            (g.iter().map(|&v| v as f64).collect(), w.iter().map(|&v| v as f64).collect())
        } else {
            let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
            let w: Vec<f32> = want_t.flatten_all().unwrap().to_vec1().unwrap();
            (g.iter().map(|&v| f64::from(v)).collect(), w.iter().map(|&v| f64::from(v)).collect())
        };
        for (i, (g, w)) in g.iter().zip(&w).enumerate() {
            let allowed = (RELATIVE * w.abs()).max(ABSOLUTE_FLOOR);
            let err = (g - w).abs();
            assert!(
                err <= allowed,
                "{name}/{out_name}[{i}]: got {g}, onnxruntime gives {w} (error {err:e}, allowed {allowed:e})"
            );
            worst = worst.max(err / w.abs().max(ABSOLUTE_FLOOR / RELATIVE));
        }
    }
    let runs = 5;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        model.run(&feeds).unwrap();
        times.push(t.elapsed());
    }
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    println!(
        "{name}: {} nodes, load {:.1} ms, median run {:.2} ms ({profile}, {runs} runs), max relative error {worst:.2e}",
        model.node_count(),
        load_time.as_secs_f64() * 1e3,
        median(times).as_secs_f64() * 1e3,
    );
    worst
}

/// Calls `f` with each model `BENCH_MODELS` names (comma-separated; default all), loaded,
/// its reference inputs at batch 1, and the seconds `BENCH_SECONDS` gives it (default 2).
fn each_bench_model(mut f: impl FnMut(&str, &Model, &[(&str, Tensor)], f64)) {
    let dir = models_dir();
    let wanted = std::env::var("BENCH_MODELS").unwrap_or_else(|_| MODELS.join(","));
    let seconds: f64 =
        std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    for name in wanted.split(',').filter(|s| !s.is_empty()) {
        let (model, inputs) = batch_one(&dir, name);
        let feeds: Vec<(&str, Tensor)> =
            inputs.iter().map(|(k, t)| (k.as_str(), t.clone())).collect();
        f(name, &model, &feeds, seconds);
    }
}

/// A model from `dir` and its reference inputs at batch 1 (the first row of each).
fn batch_one(dir: &Path, name: &str) -> (Model, Vec<(String, Tensor)>) {
    let bytes = std::fs::read(dir.join(format!("{name}.onnx")))
        .unwrap_or_else(|e| panic!("{name}: {e}; run ci/setup.sh first"));
    let model = Model::load(&bytes).unwrap_or_else(|e| panic!("{name}: load failed: {e}"));
    let reference: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.ref.json"))).unwrap())
            .unwrap();
    let inputs = reference["inputs"]
        .as_object()
        .expect("inputs")
        .iter()
        .map(|(k, v)| (k.clone(), tensor_of(k, v).narrow(0, 0, 1).unwrap()))
        .collect();
    (model, inputs)
}

#[test]
fn reference_models_match_onnxruntime() {
    let dir = models_dir();
    for m in MODELS {
        assert!(
            dir.join(format!("{m}.onnx")).is_file() && dir.join(format!("{m}.ref.json")).is_file(),
            "{m} is not in {}: run ci/setup.sh (it runs ci/models/make_models.py) first",
            dir.display()
        );
        check_model(m, &dir);
    }
}

/// Median latency of each reference model at batch 1, on the engine's thread count
/// (`RAYON_NUM_THREADS`). Timing, not a check: `ci/bench/runtime.sh` runs it beside
/// onnxruntime. `BENCH_MODELS` (comma-separated) picks models, `BENCH_SECONDS` the time
/// spent per model (default 2). Prints one `latency <model> <ms> <runs>` line per model.
#[test]
#[ignore = "timing, not a check: run by ci/bench/runtime.sh"]
fn reference_latency() {
    each_bench_model(|name, model, feeds, seconds| {
        for _ in 0..3 {
            model.run(feeds).unwrap();
        }
        let budget = Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let mut times = Vec::new();
        while times.len() < 10 || (started.elapsed() < budget && times.len() < 5000) {
            let t = Instant::now();
            model.run(feeds).unwrap();
            times.push(t.elapsed());
        }
        let runs = times.len();
        println!("latency {name} {:.4} {runs}", median(times).as_secs_f64() * 1e3);
    });
}

/// Where each model's time goes, node by node: `BENCH_MODELS` (default all) at batch 1,
/// profiled for `BENCH_SECONDS` each. Prints the `BENCH_TOP` (default 25) nodes that take
/// the most time (median per node over the runs), or with `BENCH_ORDER=graph` the first
/// nodes in the order they run, then the time per operator. A tool for the engine's speed
/// work.
#[test]
#[ignore = "timing, not a check: a profile to read"]
fn reference_profile() {
    each_bench_model(|name, model, feeds, seconds| {
        let mut per_node: Vec<Vec<Duration>> = Vec::new();
        let mut nodes = Vec::new();
        let started = Instant::now();
        let mut runs = 0;
        while runs < 10 || started.elapsed() < Duration::from_secs_f64(seconds) {
            let times = model.profile(feeds).unwrap().nodes;
            per_node.resize(times.len(), Vec::new());
            for (all, t) in per_node.iter_mut().zip(&times) {
                all.push(t.elapsed);
            }
            nodes = times;
            runs += 1;
        }
        let medians: Vec<f64> =
            per_node.into_iter().map(|t| median(t).as_secs_f64() * 1e3).collect();
        let total: f64 = medians.iter().sum();
        println!(
            "profile {name}: {total:.4} ms in {} nodes (median per node, {runs} runs)",
            nodes.len()
        );
        let mut order: Vec<usize> = (0..nodes.len()).collect();
        // Slowest first, or in the order the nodes run if BENCH_ORDER=graph.
        if std::env::var("BENCH_ORDER").as_deref() != Ok("graph") {
            order.sort_by(|&a, &b| medians[b].total_cmp(&medians[a]));
        }
        // The first 25 nodes, or as many as BENCH_TOP says.
        let top = std::env::var("BENCH_TOP").ok().and_then(|s| s.parse().ok()).unwrap_or(25);
        for &i in order.iter().take(top) {
            let n = &nodes[i];
            println!(
                "  {:>8.4} ms {:>5.1}%  {:<14} {:<28} {:?}",
                medians[i],
                100.0 * medians[i] / total,
                n.op,
                n.node,
                n.shape
            );
        }
        let mut by_op: Vec<(String, f64, usize)> = Vec::new();
        for (n, ms) in nodes.iter().zip(&medians) {
            match by_op.iter_mut().find(|(op, _, _)| *op == n.op) {
                Some(entry) => {
                    entry.1 += ms;
                    entry.2 += 1;
                }
                None => by_op.push((n.op.clone(), *ms, 1)),
            }
        }
        by_op.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (op, ms, count) in by_op {
            println!("  {ms:>8.4} ms {:>5.1}%  {op} x{count}", 100.0 * ms / total);
        }
    });
}

/// What the per-version statistics cost on the served path (`backend.infer` on protocol
/// tensors, then `Monitor::observe` of inputs and outputs), beside the inference alone, for
/// `BENCH_MODEL` (default mlp) at batch 1. Each input feature is declared with a training
/// range and ten drift bins, as a watched model declares them, so every observation updates
/// the moments, the range counts and a bin. The two paths alternate run by run, so a busy
/// machine disturbs both alike. Timing, not a check: `ci/bench/monitor.sh` runs it. Prints
/// `monitor <model> plain <ms> observed <ms> overhead <percent> <runs>`.
#[test]
#[ignore = "timing, not a check: run by ci/bench/monitor.sh"]
fn monitor_overhead() {
    use basalt_bundle::model::{FeatureSpec, ModelConfig, MonitorSpec};
    use basalt_runtime::monitor::Monitor;
    let name = std::env::var("BENCH_MODEL").unwrap_or_else(|_| "mlp".into());
    let seconds: f64 =
        std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let dir = models_dir();
    let onnx = std::fs::read(dir.join(format!("{name}.onnx")))
        .unwrap_or_else(|e| panic!("{name}: {e}; run ci/setup.sh first"));
    let config =
        ModelConfig::parse(&std::fs::read(dir.join(format!("{name}.model.toml"))).unwrap())
            .unwrap();
    let backend = basalt_runtime::backend::load_onnx(&onnx).unwrap();
    let inputs: Vec<_> =
        config.test.inputs.iter().map(|t| basalt_runtime::store::to_tensor(t).unwrap()).collect();
    // Every input declared feature by feature along its last axis.
    let specs: Vec<MonitorSpec> = backend
        .inputs()
        .iter()
        .zip(&inputs)
        .map(|(meta, t)| MonitorSpec {
            tensor: meta.name.clone(),
            axis: None,
            features: (0..*t.shape.last().unwrap())
                .map(|i| FeatureSpec {
                    name: Some(format!("f{i}")),
                    range: Some([-4.0, 4.0]),
                    bins: (1..10).map(|k| -4.0 + 0.8 * k as f64).collect(),
                    expected: vec![0.1; 10],
                })
                .collect(),
        })
        .collect();
    let monitor = Monitor::new(&specs, &backend.inputs(), &backend.outputs()).unwrap();
    for _ in 0..100 {
        monitor.observe(&inputs, &backend.infer(&inputs).unwrap());
    }
    let (mut plain, mut observed) = (Vec::new(), Vec::new());
    let started = Instant::now();
    while plain.len() < 1000 || started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        let out = backend.infer(&inputs).unwrap();
        plain.push(t.elapsed());
        std::hint::black_box(out);
        let t = Instant::now();
        let out = backend.infer(&inputs).unwrap();
        monitor.observe(&inputs, &out);
        observed.push(t.elapsed());
    }
    let runs = plain.len();
    let (p, o) = (median(plain).as_secs_f64() * 1e3, median(observed).as_secs_f64() * 1e3);
    // The statistics alone, 1000 requests' worth at a time.
    let out = backend.infer(&inputs).unwrap();
    let mut alone = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        for _ in 0..1000 {
            monitor.observe(&inputs, &out);
        }
        alone.push(t.elapsed() / 1000);
    }
    let a = median(alone).as_secs_f64() * 1e3;
    println!(
        "monitor {name} plain {p:.5} observed {o:.5} overhead {:.2} {runs} alone {a:.6}",
        (o / p - 1.0) * 100.0
    );
}
