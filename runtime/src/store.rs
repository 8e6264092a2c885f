//! Model bundles: a model is served only from a signed bundle of kind
//! `model`, holding `model.onnx` and `model.toml`.
//!
//! Loading checks the bundle's signatures against the trusted keys before
//! it reads a payload, checks every payload against its sha256 while it
//! reads it, loads the ONNX file, and runs the test vector `model.toml`
//! carries: a model whose outputs do not match is not served, and the
//! reason shows in `/v2/health/ready`, the model's `ready` endpoint, the
//! metrics and the log.
//!
//! ```toml
//! name = "water-quality"
//! version = "1.0.0"
//! description = "virtual sensor: water quality from 32 probe features"
//!
//! [test]
//! tolerance = 1e-4          # relative, per element
//! absolute = 1e-5           # floor for elements near zero
//! [[test.input]]
//! name = "features"
//! datatype = "FP32"
//! shape = [1, 32]
//! data = [0.1, ...]
//! [[test.output]]
//! name = "quality"
//! datatype = "FP32"
//! shape = [1, 1]
//! data = [0.42]
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_bundle::archive::{BundleReader, Trust};
use basalt_bundle::manifest::BundleKind;
use basalt_bundle::model::{
    ModelConfig, TestTensor, TestVector, MAX_MODEL_TOML, MODEL_ONNX, MODEL_TOML,
};

use crate::monitor::Monitor;
use crate::server::{Backend, Served};
use crate::v2::{Data, Datatype, Tensor};

/// Largest `model.onnx` read into memory.
pub const MAX_MODEL_ONNX: u64 = 1 << 30;

/// A test tensor as a protocol tensor.
pub fn to_tensor(t: &TestTensor) -> Result<Tensor, String> {
    let dt = Datatype::parse(&t.datatype)
        .ok_or_else(|| format!("test tensor {:?}: unknown datatype {:?}", t.name, t.datatype))?;
    let n: usize = t.shape.iter().product();
    if n != t.data.len() {
        return Err(format!(
            "test tensor {:?}: shape {:?} holds {n} elements, data has {}",
            t.name,
            t.shape,
            t.data.len()
        ));
    }
    let d = &t.data;
    let data = match dt {
        Datatype::F32 => Data::F32(d.iter().map(|&x| x as f32).collect()),
        Datatype::F64 => Data::F64(d.clone()),
        Datatype::I64 => Data::I64(d.iter().map(|&x| x as i64).collect()),
        Datatype::I32 => Data::I32(d.iter().map(|&x| x as i32).collect()),
        Datatype::U8 => Data::U8(d.iter().map(|&x| x as u8).collect()),
        Datatype::Bool => Data::Bool(d.iter().map(|&x| x != 0.0).collect()),
    };
    Ok(Tensor { name: t.name.clone(), shape: t.shape.clone(), data })
}

fn as_f64(d: &Data) -> Vec<f64> {
    match d {
        Data::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
        Data::U8(v) => v.iter().map(|&x| f64::from(x)).collect(),
        Data::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
        Data::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        Data::F64(v) => v.clone(),
    }
}

/// Runs the test vector; `Ok(largest relative error)` when every output
/// matches.
pub fn check(backend: &dyn Backend, test: &TestVector) -> Result<f64, String> {
    let inputs: Vec<Tensor> = test.inputs.iter().map(to_tensor).collect::<Result<_, _>>()?;
    let outputs =
        backend.infer(&inputs).map_err(|e| format!("the test vector does not run: {e}"))?;
    let mut worst = 0.0f64;
    for want in &test.outputs {
        let Some(got) = outputs.iter().find(|o| o.name == want.name) else {
            return Err(format!("the model has no output {:?}", want.name));
        };
        if got.shape != want.shape {
            return Err(format!(
                "output {:?} has shape {:?}, the test vector expects {:?}",
                want.name, got.shape, want.shape
            ));
        }
        for (i, (g, w)) in as_f64(&got.data).iter().zip(&want.data).enumerate() {
            let diff = (g - w).abs();
            let rel = diff / w.abs().max(f64::MIN_POSITIVE);
            if !(diff <= test.absolute || rel <= test.tolerance) {
                return Err(format!(
                    "output {:?} element {i} is {g}, the test vector expects {w} (tolerance {})",
                    want.name, test.tolerance
                ));
            }
            if diff > test.absolute {
                worst = worst.max(rel);
            }
        }
    }
    Ok(worst)
}

/// Loads an ONNX file into something the server runs.
pub type Loader = dyn Fn(&[u8]) -> Result<Arc<dyn Backend>, String> + Send + Sync;

/// How long each step of reading a model bundle took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Steps {
    /// Reading the bundle: its signatures, and each payload against its
    /// sha256.
    pub verify: Duration,
    /// Building the engine's plan from the ONNX file (and the monitors).
    pub load: Duration,
    /// Running the test vector.
    pub test_vector: Duration,
}

/// A model version read from a bundle, served or not.
pub struct Loaded {
    /// What the server serves.
    pub served: Served,
    /// How long loading and the test vector took.
    pub took: Duration,
    /// The same, step by step.
    pub steps: Steps,
    /// One line for the log.
    pub message: String,
}

fn read_payload(r: &mut dyn Read, max: u64, what: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    r.take(max + 1).read_to_end(&mut out).map_err(|e| format!("{what}: {e}"))?;
    if out.len() as u64 > max {
        return Err(format!("{what} is larger than {max} bytes"));
    }
    Ok(out)
}

/// Reads, verifies and loads one model bundle.
pub fn load_bundle(input: impl Read, trust: &Trust, loader: &Loader) -> Result<Loaded, String> {
    let start = Instant::now();
    let mut reader = BundleReader::open(input, trust).map_err(|e| e.to_string())?;
    let manifest = reader.manifest().clone();
    if manifest.kind != BundleKind::Model {
        return Err(format!("{} {} is not a model bundle", manifest.name, manifest.version));
    }
    let (mut onnx, mut toml_bytes) = (None, None);
    while let Some(mut p) = reader.next_payload().map_err(|e| e.to_string())? {
        let name = p.info().name.clone();
        match name.as_str() {
            MODEL_ONNX => onnx = Some(read_payload(&mut p, MAX_MODEL_ONNX, MODEL_ONNX)?),
            MODEL_TOML => {
                toml_bytes = Some(read_payload(&mut p, MAX_MODEL_TOML as u64, MODEL_TOML)?)
            }
            other => return Err(format!("unexpected payload {other:?} in a model bundle")),
        }
    }
    reader.finish().map_err(|e| e.to_string())?;
    let onnx = onnx.ok_or("the bundle has no model.onnx")?;
    let text = toml_bytes.ok_or("the bundle has no model.toml")?;
    let config = ModelConfig::parse(&text).map_err(|e| e.to_string())?;
    let mut steps = Steps { verify: start.elapsed(), ..Steps::default() };
    let mut served = Served::failed(&config.name, &config.version.to_string(), String::new());
    served.problem = None;
    served.watch = config.watch.clone();
    let loading = Instant::now();
    let loaded = loader(&onnx);
    let message = match loaded {
        Err(e) => {
            steps.load = loading.elapsed();
            served.problem = Some(format!("it does not load: {e}"));
            format!("model {} {}: does not load: {e}", config.name, config.version)
        }
        Ok(backend) => {
            let monitor = Monitor::new(&config.monitors, &backend.inputs(), &backend.outputs());
            steps.load = loading.elapsed();
            let testing = Instant::now();
            let verdict = monitor.and_then(|m| {
                served.monitor = Some(m);
                check(backend.as_ref(), &config.test)
            });
            steps.test_vector = testing.elapsed();
            served.backend = Some(backend);
            match verdict {
                Ok(worst) => format!(
                    "model {} {}: loaded, test vector passed (largest relative error {worst:.1e}) in {:.0} ms",
                    config.name,
                    config.version,
                    start.elapsed().as_secs_f64() * 1000.0
                ),
                Err(e) => {
                    served.problem = Some(format!("its test vector fails: {e}"));
                    format!("model {} {}: NOT SERVED, test vector fails: {e}", config.name, config.version)
                }
            }
        }
    };
    Ok(Loaded { served, took: start.elapsed(), steps, message })
}

/// Every `*.basalt` in `dirs` (missing folders are skipped), sorted.
pub fn find_bundles(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "basalt") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Reads, verifies and loads the bundle in a file.
pub fn load_file(path: &Path, trust: &Trust, loader: &Loader) -> Result<Loaded, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    load_bundle(std::io::BufReader::new(f), trust, loader)
}

/// The model name and version a bundle's manifest gives, once its
/// signatures check; nothing else is read.
pub fn peek(path: &Path, trust: &Trust) -> Result<(String, semver::Version), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let reader =
        BundleReader::open(std::io::BufReader::new(f), trust).map_err(|e| e.to_string())?;
    let m = reader.manifest();
    if m.kind != BundleKind::Model {
        return Err(format!("{} {} is not a model bundle", m.name, m.version));
    }
    Ok((m.name.clone(), m.version.clone()))
}
