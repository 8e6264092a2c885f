//! `model.toml`: what a model bundle says about its model, and the test
//! vector the runtime runs before it serves it.
//!
//! A model bundle (kind `model`) holds two payloads: [`MODEL_ONNX`] and
//! [`MODEL_TOML`]:
//!
//! ```toml
//! name = "water-quality"
//! version = "1.0.0"
//! description = "virtual sensor: water quality from 32 probe features"
//!
//! [test]
//! tolerance = 1e-4          # relative, per element
//! absolute = 1e-5           # differences below this always pass
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

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The ONNX payload of a model bundle.
pub const MODEL_ONNX: &str = "model.onnx";
/// The description payload of a model bundle.
pub const MODEL_TOML: &str = "model.toml";
/// Largest `model.toml` accepted.
pub const MAX_MODEL_TOML: usize = 16 << 20;

/// `model.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use (`/v2/models/<name>`).
    pub name: String,
    /// The version (`/v2/models/<name>/versions/<version>`), semver.
    pub version: semver::Version,
    /// What it is, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The test vector run before the model serves.
    pub test: TestVector,
    /// How a new version is watched after the switch, and when it is
    /// rolled back.
    #[serde(default)]
    pub watch: Watch,
    /// The training distribution of inputs and outputs, for drift
    /// statistics; tensors not listed still get running statistics.
    #[serde(default, rename = "monitor", skip_serializing_if = "Vec::is_empty")]
    pub monitors: Vec<MonitorSpec>,
}

/// `[watch]`: the window after a switch in which the new version must stay
/// within bounds, or the runtime switches back to the previous one and
/// refuses the new one from then on. Every key is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watch {
    /// Seconds the new version is watched after the switch (default 300).
    /// 0 keeps it at once.
    #[serde(default = "Watch::default_window")]
    pub window: f64,
    /// Requests the window needs before the error rule judges it early
    /// (default 20); at the end of the window it judges whatever it saw.
    /// The latency rules judge at the end of the window, and only with
    /// this many requests.
    #[serde(default = "Watch::default_min_requests")]
    pub min_requests: u64,
    /// Largest share of requests the model fails (answered 500), 0 to 1
    /// (default 0.02).
    #[serde(default = "Watch::default_max_error_rate")]
    pub max_error_rate: f64,
    /// Largest 99th-percentile compute time as a multiple of the previous
    /// version's (default 2.0). Not judged when the previous version has
    /// served fewer than `min_requests` requests.
    #[serde(default = "Watch::default_max_latency_ratio")]
    pub max_latency_ratio: f64,
    /// Largest 99th-percentile compute time in seconds, whatever the
    /// previous version did (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_p99_seconds: Option<f64>,
}

impl Watch {
    fn default_window() -> f64 {
        300.0
    }
    fn default_min_requests() -> u64 {
        20
    }
    fn default_max_error_rate() -> f64 {
        0.02
    }
    fn default_max_latency_ratio() -> f64 {
        2.0
    }
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            window: Watch::default_window(),
            min_requests: Watch::default_min_requests(),
            max_error_rate: Watch::default_max_error_rate(),
            max_latency_ratio: Watch::default_max_latency_ratio(),
            max_p99_seconds: None,
        }
    }
}

/// `[[monitor]]`: one input or output and the distribution it had in
/// training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorSpec {
    /// The input or output, by name.
    pub tensor: String,
    /// The axis along which the tensor holds its features (default: the
    /// last). Every element counts toward the feature its index on this
    /// axis names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub axis: Option<usize>,
    /// The features in axis order: as many as the axis is long.
    #[serde(default, rename = "feature")]
    pub features: Vec<FeatureSpec>,
}

/// `[[monitor.feature]]`: one feature's training distribution.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// A name for metrics and statistics (default: its index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `[min, max]` seen in training; values outside are counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<[f64; 2]>,
    /// Inner bin edges, increasing: `k` edges make `k + 1` bins, the first
    /// below the first edge, the last from the last edge up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bins: Vec<f64>,
    /// The share of training values in each bin (`k + 1` numbers summing
    /// to 1): the reference of the population stability index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected: Vec<f64>,
}

/// An input and the outputs it must give.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestVector {
    /// Largest relative difference per element.
    pub tolerance: f64,
    /// Differences below this pass whatever the relative one.
    #[serde(default = "default_absolute")]
    pub absolute: f64,
    /// The inputs.
    #[serde(rename = "input")]
    pub inputs: Vec<TestTensor>,
    /// The expected outputs.
    #[serde(rename = "output")]
    pub outputs: Vec<TestTensor>,
}

fn default_absolute() -> f64 {
    1e-5
}

/// One tensor of a test vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestTensor {
    /// Name.
    pub name: String,
    /// Protocol datatype (`FP32`, `INT64`, ...).
    pub datatype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f64>,
}

/// Why a `model.toml` is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ModelConfigError {
    /// Over [`MAX_MODEL_TOML`].
    #[error("model.toml is {0} bytes; the limit is {MAX_MODEL_TOML}")]
    TooLarge(usize),
    /// Not TOML of this shape.
    #[error("model.toml: {0}")]
    Toml(String),
    /// A value is out of place.
    #[error("model.toml: {0}")]
    Invalid(String),
}

impl ModelConfig {
    /// Parses and checks a `model.toml`.
    pub fn parse(bytes: &[u8]) -> Result<ModelConfig, ModelConfigError> {
        if bytes.len() > MAX_MODEL_TOML {
            return Err(ModelConfigError::TooLarge(bytes.len()));
        }
        let text =
            std::str::from_utf8(bytes).map_err(|_| ModelConfigError::Toml("not UTF-8".into()))?;
        let c: ModelConfig =
            toml::from_str(text).map_err(|e| ModelConfigError::Toml(e.to_string()))?;
        let bad = |m: String| Err(ModelConfigError::Invalid(m));
        if !valid_name(&c.name) {
            return bad(format!("name {:?}: use 1-64 letters, digits, `-`, `_`, `.`", c.name));
        }
        let t = &c.test;
        if !(t.tolerance.is_finite()
            && t.tolerance >= 0.0
            && t.absolute.is_finite()
            && t.absolute >= 0.0)
        {
            return bad("test.tolerance and test.absolute are numbers of 0 or more".into());
        }
        if t.inputs.is_empty() || t.outputs.is_empty() {
            return bad(
                "the test vector needs at least one [[test.input]] and one [[test.output]]".into(),
            );
        }
        let w = &c.watch;
        let rate_ok = (0.0..=1.0).contains(&w.max_error_rate);
        let ratio_ok = w.max_latency_ratio.is_finite() && w.max_latency_ratio >= 1.0;
        let p99_ok = w.max_p99_seconds.is_none_or(|p| p.is_finite() && p > 0.0);
        if !(w.window.is_finite() && w.window >= 0.0 && rate_ok && ratio_ok && p99_ok) {
            return bad("[watch]: window is seconds (0 or more), max_error_rate 0 to 1, \
                 max_latency_ratio 1 or more, max_p99_seconds above 0"
                .into());
        }
        for m in &c.monitors {
            for (i, f) in m.features.iter().enumerate() {
                let at = format!("[[monitor]] {:?} feature {i}", m.tensor);
                if let Some([lo, hi]) = f.range {
                    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                        return bad(format!("{at}: range is [min, max] with min <= max"));
                    }
                }
                if !f.bins.windows(2).all(|w| w[0] < w[1]) || f.bins.iter().any(|b| !b.is_finite())
                {
                    return bad(format!("{at}: bins are finite and strictly increasing"));
                }
                if f.bins.is_empty() != f.expected.is_empty() {
                    return bad(format!("{at}: give bins and expected together"));
                }
                if !f.bins.is_empty() {
                    let sum: f64 = f.expected.iter().sum();
                    if f.expected.len() != f.bins.len() + 1
                        || f.expected.iter().any(|e| !(e.is_finite() && *e >= 0.0))
                        || (sum - 1.0).abs() > 1e-3
                    {
                        return bad(format!(
                            "{at}: expected holds one share per bin ({} for {} edges), each 0 \
                             or more, summing to 1 (they sum to {sum})",
                            f.bins.len() + 1,
                            f.bins.len()
                        ));
                    }
                }
            }
        }
        for x in t.inputs.iter().chain(&t.outputs) {
            let n = x.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
            if n != Some(x.data.len()) {
                return bad(format!(
                    "test tensor {:?}: shape {:?} does not hold the {} elements of data",
                    x.name,
                    x.shape,
                    x.data.len()
                ));
            }
        }
        Ok(c)
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

// Installed models ---------------------------------------------------------
//
// The layout both the update agent (which installs) and the runtime (which
// serves) read:
//
// ```text
// <store>/                      /data/models on a device
//   <name>/
//     state.toml                what the runtime serves; written by the runtime only
//     <version>/model.basalt    the signed bundle, exactly as received
//   .incoming-<pid>-<n>/        an install in progress; ignored, removed by the next install
//   <name>/.pruned-<version>/   a version being removed; ignored, removed likewise
// ```
//
// Every change goes through a [`Disk`], one call per write, flush, rename
// or removal, so that tests can cut the power after any of them.

/// What a model bundle holds and who signs it: the input of
/// [`bundle_bytes`].
pub struct NewBundle<'a> {
    /// The model's name (the manifest's `name`).
    pub name: &'a str,
    /// Its version.
    pub version: &'a semver::Version,
    /// Boards it is for; empty means `["any"]`.
    pub compatible: &'a [String],
    /// Creation time, Unix seconds (the manifest's `created`, the archive's
    /// mtimes).
    pub created: u64,
    /// The ONNX file.
    pub onnx: &'a [u8],
    /// The `model.toml` file, as it will be stored.
    pub model_toml: &'a [u8],
    /// zstd level of `model.onnx`.
    pub level: i32,
}

/// Writes a signed model bundle: [`MODEL_ONNX`] (zstd) and [`MODEL_TOML`],
/// the manifest signed by every key of `keys`. The one place that builds
/// a model bundle, for `basalt model bundle` and for tests.
pub fn bundle_bytes(b: &NewBundle<'_>, keys: &[crate::keys::SigningKey]) -> io::Result<Vec<u8>> {
    use crate::manifest::{BundleKind, Compression, Manifest, PayloadInfo, FORMAT_VERSION};
    let manifest = Manifest {
        format: FORMAT_VERSION,
        kind: BundleKind::Model,
        name: b.name.to_string(),
        version: b.version.clone(),
        compatible: if b.compatible.is_empty() {
            vec!["any".into()]
        } else {
            b.compatible.to_vec()
        },
        created: crate::civil::unix_to_datetime(b.created as i64),
        os: None,
        payloads: vec![
            PayloadInfo::describe(MODEL_ONNX, b.onnx, Compression::Zstd, None),
            PayloadInfo::describe(MODEL_TOML, b.model_toml, Compression::None, None),
        ],
    }
    .to_toml();
    let mut sigs = crate::signature::SignatureFile::default();
    for k in keys {
        sigs.add(crate::signature::sign(manifest.as_bytes(), k));
    }
    let sig_text = sigs.to_toml().map_err(io::Error::other)?;
    let onnx = crate::archive::compress(b.onnx, b.level)?;
    let payloads: [(&str, &[u8]); 2] = [(MODEL_ONNX, &onnx), (MODEL_TOML, b.model_toml)];
    crate::archive::write_bundle(
        Vec::new(),
        manifest.as_bytes(),
        sig_text.as_bytes(),
        &payloads,
        b.created,
    )
}

/// The signed bundle in a version folder.
pub const BUNDLE_FILE: &str = "model.basalt";
/// The runtime's record of one model, in its folder.
pub const STATE_FILE: &str = "state.toml";
/// Versions [`install`] keeps by default besides the serving one, its
/// fallback and one being tried.
pub const DEFAULT_KEEP: usize = 2;

/// What [`install`], [`prune`] and [`ModelState::save`] do to a disk, one
/// call per change. [`StdDisk`] does it; [`CutDisk`] stops after a budget
/// of calls, as a power cut would.
pub trait Disk: Send + Sync {
    /// Creates a folder and its parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates or truncates a file.
    fn create(&self, path: &Path) -> io::Result<File>;
    /// Writes all of `buf`.
    fn write_all(&self, file: &mut File, buf: &[u8]) -> io::Result<()>;
    /// Flushes a file's content to the disk.
    fn sync(&self, file: &File) -> io::Result<()>;
    /// Flushes a folder, so that the names created, renamed or removed in
    /// it are on the disk.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Renames a file or folder.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a folder and everything in it.
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
}

/// The real disk.
#[derive(Debug, Clone, Copy, Default)]
pub struct StdDisk;

impl Disk for StdDisk {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }
    fn create(&self, path: &Path) -> io::Result<File> {
        File::create(path)
    }
    fn write_all(&self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        file.write_all(buf)
    }
    fn sync(&self, file: &File) -> io::Result<()> {
        file.sync_all()
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        match fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// The error of a [`CutDisk`] call made after the simulated power cut.
pub const POWER_CUT: &str = "simulated power cut";

/// A disk for power-cut tests: after `budget` calls every call fails
/// without doing anything, as if the power went. Each call before is
/// whole, as on a journaling file system after a flush.
#[derive(Debug)]
pub struct CutDisk {
    left: AtomicU64,
    calls: AtomicU64,
    cut: AtomicBool,
}

impl CutDisk {
    /// A disk that does `budget` calls, then no more (`u64::MAX`: no cut,
    /// only counting).
    pub fn new(budget: u64) -> CutDisk {
        CutDisk {
            left: AtomicU64::new(budget),
            calls: AtomicU64::new(0),
            cut: AtomicBool::new(false),
        }
    }
    /// Calls made (those the cut stopped included).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
    /// Whether the cut happened.
    pub fn was_cut(&self) -> bool {
        self.cut.load(Ordering::SeqCst)
    }
    fn point(&self) -> io::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let ok = self.left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if ok.is_err() {
            self.cut.store(true, Ordering::SeqCst);
            return Err(io::Error::other(POWER_CUT));
        }
        Ok(())
    }
}

impl Disk for CutDisk {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        if path.is_dir() {
            return Ok(());
        }
        self.point()?;
        StdDisk.create_dir_all(path)
    }
    fn create(&self, path: &Path) -> io::Result<File> {
        self.point()?;
        StdDisk.create(path)
    }
    fn write_all(&self, file: &mut File, buf: &[u8]) -> io::Result<()> {
        self.point()?;
        StdDisk.write_all(file, buf)
    }
    fn sync(&self, file: &File) -> io::Result<()> {
        self.point()?;
        StdDisk.sync(file)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.point()?;
        StdDisk.sync_dir(dir)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.point()?;
        StdDisk.rename(from, to)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        self.point()?;
        StdDisk.remove_dir_all(path)
    }
}

/// Why installing, pruning or recording a model failed. What was serving
/// is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum ModelStoreError {
    /// A file or folder could not be read, written or flushed.
    #[error("cannot {what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The bundle's signatures, format or content are wrong.
    #[error("{0}")]
    Bundle(#[from] crate::archive::BundleError),
    /// The bundle is signed but is not a model this layout can hold.
    #[error("{0}")]
    Refused(String),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> ModelStoreError + 'a {
    move |source| ModelStoreError::Io { what, path: path.to_path_buf(), source }
}

/// The folder of one version of a model.
pub fn version_dir(store: &Path, name: &str, version: &semver::Version) -> PathBuf {
    store.join(name).join(version.to_string())
}

/// The names of the models installed in `store`, sorted; a missing store
/// has none.
pub fn installed_models(store: &Path) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(store)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| valid_name(n))
        .collect();
    out.sort();
    out
}

/// The versions of `name` installed in `store` (folders named by a
/// version that hold a bundle), oldest first.
pub fn installed_versions(store: &Path, name: &str) -> Vec<semver::Version> {
    let dir = store.join(name);
    let mut out: Vec<semver::Version> = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|v| version_dir(store, name, v).join(BUNDLE_FILE).is_file())
        .collect();
    out.sort();
    out
}

/// Whether `name` can name a model (and a folder): 1-64 letters, digits,
/// `-`, `_`, `.`, not starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.starts_with('.')
}

/// A version being tried: switched to (or about to be), not yet kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trial {
    /// The version.
    pub version: semver::Version,
    /// The kernel's boot id when the trial began: a runtime that finds its
    /// own boot's trial unfinished stopped during it (a crash), one from an
    /// earlier boot was cut by a reboot or power loss.
    pub boot_id: String,
    /// When it began (Unix seconds).
    pub since: i64,
}

/// A version that failed on this device and is never loaded again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// The version.
    pub version: semver::Version,
    /// Why, for people.
    pub reason: String,
    /// When (Unix seconds).
    pub at: i64,
}

/// The last update attempt of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// The version tried.
    pub version: semver::Version,
    /// `serving` (switched and kept), `watching`, `failed` or `damaged`
    /// (the installed bundle does not verify; it may be installed again).
    pub result: String,
    /// One line for people.
    pub message: String,
    /// When (Unix seconds).
    pub at: i64,
}

/// `<store>/<name>/state.toml`: which version of a model serves, which is
/// its fallback, and which failed. The runtime writes it, atomically; the
/// update agent reads it (never installs a failed version again, never
/// prunes the serving one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelState {
    /// The version kept after its watch window (or served at first start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<semver::Version>,
    /// The version before it, kept loaded to switch back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<semver::Version>,
    /// A version being loaded, tested or watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trying: Option<Trial>,
    /// The last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Outcome>,
    /// Versions that failed here.
    #[serde(default, rename = "failed", skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<Failure>,
}

impl ModelState {
    /// The state file of `name`.
    pub fn path(store: &Path, name: &str) -> PathBuf {
        store.join(name).join(STATE_FILE)
    }

    /// Reads the state of `name`. A missing file is an empty state; a
    /// damaged one is an empty state and a warning (the runtime then
    /// serves the newest version that passes, and writes a good file).
    pub fn load(store: &Path, name: &str) -> (ModelState, Option<String>) {
        let path = ModelState::path(store, name);
        match fs::read_to_string(&path) {
            Ok(text) => match toml::from_str(&text) {
                Ok(s) => (s, None),
                Err(e) => {
                    (ModelState::default(), Some(format!("{} is damaged: {e}", path.display())))
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => (ModelState::default(), None),
            Err(e) => (ModelState::default(), Some(format!("cannot read {}: {e}", path.display()))),
        }
    }

    /// Writes the state of `name` atomically: a temporary file, flushed,
    /// renamed over the old one, the folder flushed.
    pub fn save(&self, store: &Path, name: &str, disk: &dyn Disk) -> Result<(), ModelStoreError> {
        let dir = store.join(name);
        disk.create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let path = ModelState::path(store, name);
        let tmp = dir.join(".state.toml.tmp");
        let text = toml::to_string(self).map_err(|e| ModelStoreError::Refused(e.to_string()))?;
        let mut f = disk.create(&tmp).map_err(io_err("create", &tmp))?;
        disk.write_all(&mut f, text.as_bytes()).map_err(io_err("write", &tmp))?;
        disk.sync(&f).map_err(io_err("flush", &tmp))?;
        drop(f);
        disk.rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
        disk.sync_dir(&dir).map_err(io_err("flush", &dir))
    }

    /// Why `version` is refused here, if it failed before.
    pub fn failure(&self, version: &semver::Version) -> Option<&Failure> {
        self.failures.iter().find(|f| f.version == *version)
    }

    /// The versions [`prune`] must keep whatever their age.
    pub fn pinned(&self) -> Vec<semver::Version> {
        let mut v: Vec<semver::Version> = Vec::new();
        v.extend(self.serving.clone());
        v.extend(self.fallback.clone());
        v.extend(self.trying.as_ref().map(|t| t.version.clone()));
        v
    }
}

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The model's name.
    pub name: String,
    /// The version installed.
    pub version: semver::Version,
    /// Its folder.
    pub dir: PathBuf,
    /// True when that version was installed already (nothing written).
    pub already: bool,
    /// Versions removed to keep the count.
    pub pruned: Vec<semver::Version>,
}

/// Copies what a reader reads into a file, in large writes.
struct Tee<'a, R> {
    inner: R,
    file: File,
    path: &'a Path,
    disk: &'a dyn Disk,
    buf: Vec<u8>,
    failed: Option<io::Error>,
}

impl<R: Read> Tee<'_, R> {
    const CHUNK: usize = 1 << 20;

    fn flush_buf(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.disk.write_all(&mut self.file, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.buf.extend_from_slice(&out[..n]);
        if self.buf.len() >= Self::CHUNK {
            if let Err(e) = self.flush_buf() {
                let msg = format!("cannot write {}: {e}", self.path.display());
                self.failed = Some(e);
                return Err(io::Error::other(msg));
            }
        }
        Ok(n)
    }
}

static INSTALLS: AtomicU64 = AtomicU64::new(0);

/// Installs a model bundle into `store` as `<name>/<version>/model.basalt`,
/// so that a power cut at any moment leaves either no trace of it (but
/// perhaps an ignored `.incoming-*` folder) or all of it:
///
/// 1. the bundle streams into `.incoming-<pid>-<n>/model.basalt` while its
///    signatures (against `trust`) and every payload's sha256 are checked,
///    `model.toml` is parsed and must name the manifest's model and
///    version; only then is the file flushed, and its folder;
/// 2. the folder is renamed to `<name>/<version>` and both parents are
///    flushed;
/// 3. [`prune`] keeps `keep` versions besides the pinned ones and the new
///    one.
///
/// A version the runtime recorded as failed is refused. A version already
/// installed with the same bytes is left as it is; one whose bundle on
/// disk differs (damaged) is replaced. The caller (the update agent) decides
/// beforehand whether the version is one it wants (channel, order); the
/// runtime loads it when told (`POST /v2/repository/models/<name>/load`).
pub fn install(
    store: &Path,
    bundle: impl Read,
    trust: &crate::signature::Trust,
    keep: usize,
    disk: &dyn Disk,
) -> Result<Installed, ModelStoreError> {
    use crate::archive::BundleReader;
    disk.create_dir_all(store).map_err(io_err("create", store))?;
    remove_leftovers(store, disk);
    let n = INSTALLS.fetch_add(1, Ordering::SeqCst);
    let tmp = store.join(format!(".incoming-{}-{n}", std::process::id()));
    disk.remove_dir_all(&tmp).map_err(io_err("remove", &tmp))?;
    disk.create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
    let file_path = tmp.join(BUNDLE_FILE);
    let result = (|| {
        let file = disk.create(&file_path).map_err(io_err("create", &file_path))?;
        let tee =
            Tee { inner: bundle, file, path: &file_path, disk, buf: Vec::new(), failed: None };
        let mut reader = BundleReader::open(tee, trust)?;
        let manifest = reader.manifest().clone();
        if manifest.kind != crate::manifest::BundleKind::Model {
            return Err(ModelStoreError::Refused(format!(
                "{} {} is not a model bundle",
                manifest.name, manifest.version
            )));
        }
        let mut config = None;
        while let Some(mut p) = reader.next_payload()? {
            let name = p.info().name.clone();
            let mut bytes = Vec::new();
            let limit = if name == MODEL_TOML { MAX_MODEL_TOML as u64 + 1 } else { u64::MAX };
            let read = if name == MODEL_TOML {
                (&mut p).take(limit).read_to_end(&mut bytes).map(|_| ())
            } else {
                io::copy(&mut p, &mut io::sink()).map(|_| ())
            };
            read.map_err(|e| ModelStoreError::Refused(format!("payload {name:?}: {e}")))?;
            match name.as_str() {
                MODEL_TOML => {
                    config = Some(ModelConfig::parse(&bytes).map_err(|e| {
                        ModelStoreError::Refused(format!(
                            "{} {}: {e}",
                            manifest.name, manifest.version
                        ))
                    })?)
                }
                MODEL_ONNX => {}
                other => {
                    return Err(ModelStoreError::Refused(format!(
                        "unexpected payload {other:?} in a model bundle"
                    )))
                }
            }
        }
        let mut tee = reader.finish()?;
        if let Some(e) = tee.failed.take() {
            return Err(io_err("write", &file_path)(e));
        }
        tee.flush_buf().map_err(io_err("write", &file_path))?;
        let Some(config) = config else {
            return Err(ModelStoreError::Refused("the bundle has no model.toml".into()));
        };
        if config.name != manifest.name || config.version != manifest.version {
            return Err(ModelStoreError::Refused(format!(
                "the manifest says {} {} but model.toml says {} {}; rebuild the bundle",
                manifest.name, manifest.version, config.name, config.version
            )));
        }
        if !valid_name(&config.name) {
            return Err(ModelStoreError::Refused(format!("{:?} cannot name a model", config.name)));
        }
        disk.sync(&tee.file).map_err(io_err("flush", &file_path))?;
        drop(tee);
        disk.sync_dir(&tmp).map_err(io_err("flush", &tmp))?;
        Ok(config)
    })();
    let config = match result {
        Ok(c) => c,
        Err(e) => {
            let _ = disk.remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let (name, version) = (config.name, config.version);
    let (state, _) = ModelState::load(store, &name);
    if let Some(f) = state.failure(&version) {
        let _ = disk.remove_dir_all(&tmp);
        return Err(ModelStoreError::Refused(format!(
            "{name} {version} failed on this device before ({}); publish a new version",
            f.reason
        )));
    }
    let model_dir = store.join(&name);
    let dir = version_dir(store, &name, &version);
    if same_content(&dir.join(BUNDLE_FILE), &tmp.join(BUNDLE_FILE)) {
        let _ = disk.remove_dir_all(&tmp);
        // A cut may have come between the rename and the prune.
        let pruned = prune_except(store, &name, keep, Some(&version), disk)?;
        return Ok(Installed { name, version, dir, already: true, pruned });
    }
    if !model_dir.is_dir() {
        disk.create_dir_all(&model_dir).map_err(io_err("create", &model_dir))?;
        disk.sync_dir(store).map_err(io_err("flush", store))?;
    }
    // A folder of that version with another (damaged) bundle, or none,
    // goes aside first, in one rename.
    if dir.exists() {
        let aside = model_dir.join(format!(".pruned-{version}"));
        disk.remove_dir_all(&aside).map_err(io_err("remove", &aside))?;
        disk.rename(&dir, &aside).map_err(io_err("rename", &dir))?;
    }
    disk.rename(&tmp, &dir).map_err(io_err("rename", &tmp))?;
    disk.sync_dir(&model_dir).map_err(io_err("flush", &model_dir))?;
    disk.sync_dir(store).map_err(io_err("flush", store))?;
    let pruned = prune_except(store, &name, keep, Some(&version), disk)?;
    Ok(Installed { name, version, dir, already: false, pruned })
}

/// Whether two files hold the same bytes (false when either is missing).
fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(fa), Ok(fb)) = (File::open(a), File::open(b)) else { return false };
    match (fa.metadata(), fb.metadata()) {
        (Ok(ma), Ok(mb)) if ma.len() == mb.len() => {}
        _ => return false,
    }
    let (mut ra, mut rb) = (io::BufReader::new(fa), io::BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = match ra.read(&mut ba) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(_) => return false,
        };
        if rb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// Removes the versions of `name` beyond the newest `keep`, never one the
/// state pins (serving, fallback, being tried); versions that failed go
/// first. Each goes in one rename (to `.pruned-<version>`, flushed), then
/// is deleted, so a cut leaves either the whole version or none of it.
pub fn prune(
    store: &Path,
    name: &str,
    keep: usize,
    disk: &dyn Disk,
) -> Result<Vec<semver::Version>, ModelStoreError> {
    prune_except(store, name, keep, None, disk)
}

/// [`prune`], sparing `new` too (the version just installed).
fn prune_except(
    store: &Path,
    name: &str,
    keep: usize,
    new: Option<&semver::Version>,
    disk: &dyn Disk,
) -> Result<Vec<semver::Version>, ModelStoreError> {
    let (state, _) = ModelState::load(store, name);
    let mut pinned = state.pinned();
    pinned.extend(new.cloned());
    let mut kept = 0;
    let mut gone = Vec::new();
    let model_dir = store.join(name);
    for v in installed_versions(store, name).into_iter().rev() {
        if pinned.contains(&v) {
            continue;
        }
        if state.failure(&v).is_none() && kept < keep {
            kept += 1;
            continue;
        }
        let dir = version_dir(store, name, &v);
        let aside = model_dir.join(format!(".pruned-{v}"));
        disk.remove_dir_all(&aside).map_err(io_err("remove", &aside))?;
        disk.rename(&dir, &aside).map_err(io_err("rename", &dir))?;
        disk.sync_dir(&model_dir).map_err(io_err("flush", &model_dir))?;
        disk.remove_dir_all(&aside).map_err(io_err("remove", &aside))?;
        gone.push(v);
    }
    Ok(gone)
}

/// Deletes what cut installs and prunes left (`.incoming-*` of other
/// processes, `.pruned-*`); best effort.
fn remove_leftovers(store: &Path, disk: &dyn Disk) {
    let mine = format!(".incoming-{}-", std::process::id());
    let stale = |p: &Path| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
            (n.starts_with(".incoming-") && !n.starts_with(&mine)) || n.starts_with(".pruned-")
        })
    };
    for e in fs::read_dir(store).into_iter().flatten().flatten() {
        let p = e.path();
        if stale(&p) {
            let _ = disk.remove_dir_all(&p);
        } else if p.is_dir() {
            for e in fs::read_dir(&p).into_iter().flatten().flatten() {
                if stale(&e.path()) {
                    let _ = disk.remove_dir_all(&e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "wq"
version = "1.0.0"
[test]
tolerance = 1e-4
[[test.input]]
name = "x"
datatype = "FP32"
shape = [1, 2]
data = [1.0, 2.0]
[[test.output]]
name = "y"
datatype = "FP32"
shape = [1]
data = [3.0]
"#;

    #[test]
    fn parses_and_round_trips() {
        let c = ModelConfig::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(c.test.absolute, 1e-5);
        assert_eq!(c.watch, Watch::default());
        assert_eq!(ModelConfig::parse(c.to_toml().as_bytes()).unwrap(), c);
        let full = format!(
            "{GOOD}[watch]\nwindow = 60\nmax_p99_seconds = 0.01\n[[monitor]]\ntensor = \"x\"\n\
             axis = 1\n[[monitor.feature]]\nname = \"a\"\nrange = [0, 1]\nbins = [0.5]\n\
             expected = [0.25, 0.75]\n[[monitor.feature]]\n"
        );
        let c = ModelConfig::parse(full.as_bytes()).unwrap();
        assert_eq!(
            (c.watch.window, c.watch.max_p99_seconds, c.watch.min_requests),
            (60.0, Some(0.01), 20)
        );
        assert_eq!(c.monitors[0].features[0].expected, [0.25, 0.75]);
        assert_eq!(c.monitors[0].features.len(), 2);
        assert_eq!(ModelConfig::parse(c.to_toml().as_bytes()).unwrap(), c);
    }

    #[test]
    fn refuses_what_cannot_work() {
        for (edit, says) in [
            (GOOD.replace("\"wq\"", "\"../x\""), "name"),
            (GOOD.replace("shape = [1, 2]", "shape = [1, 3]"), "does not hold"),
            (GOOD.replace("tolerance = 1e-4", "tolerance = -1"), "tolerance"),
            (GOOD.replace("version = \"1.0.0\"", "version = \"one\""), "version"),
            (GOOD.replace("[test]", "extra = 1\n[test]"), "unknown field"),
            (format!("{GOOD}[watch]\nwindow = 10\nmax_errors = 1\n"), "unknown field"),
            (format!("{GOOD}[watch]\nmax_error_rate = 1.5\n"), "max_error_rate"),
            (format!("{GOOD}[watch]\nmax_latency_ratio = 0.5\n"), "max_latency_ratio"),
            (format!("{GOOD}[[monitor]]\ntensor = \"x\"\nbin = [1]\n"), "unknown field"),
            (
                format!("{GOOD}[[monitor]]\ntensor = \"x\"\n[[monitor.feature]]\nbins = [2, 1]\nexpected = [0.5, 0.2, 0.3]\n"),
                "increasing",
            ),
            (
                format!("{GOOD}[[monitor]]\ntensor = \"x\"\n[[monitor.feature]]\nbins = [1]\nexpected = [0.5, 0.6]\n"),
                "summing to 1",
            ),
            (
                format!("{GOOD}[[monitor]]\ntensor = \"x\"\n[[monitor.feature]]\nrange = [3, 1]\n"),
                "min <= max",
            ),
        ] {
            let e = ModelConfig::parse(edit.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::archive::BundleReader;
    use crate::keys::SigningKey;
    use crate::signature::Trust;

    fn config(version: &str) -> String {
        format!(
            "name = \"wq\"\nversion = \"{version}\"\n[test]\ntolerance = 1e-4\n[[test.input]]\n\
             name = \"x\"\ndatatype = \"FP32\"\nshape = [1]\ndata = [1.0]\n[[test.output]]\n\
             name = \"y\"\ndatatype = \"FP32\"\nshape = [1]\ndata = [2.0]\n"
        )
    }

    fn bundle(key: &SigningKey, version: &str, onnx_len: usize) -> Vec<u8> {
        let onnx: Vec<u8> = (0..onnx_len).map(|i| (i * 7 % 251) as u8).collect();
        let toml = config(version);
        let b = NewBundle {
            name: "wq",
            version: &version.parse().unwrap(),
            compatible: &[],
            created: 1_700_000_000,
            onnx: &onnx,
            model_toml: toml.as_bytes(),
            level: 3,
        };
        bundle_bytes(&b, std::slice::from_ref(key)).unwrap()
    }

    fn v(s: &str) -> semver::Version {
        s.parse().unwrap()
    }

    fn verifies(store: &Path, version: &str, trust: &Trust) -> bool {
        let f = File::open(version_dir(store, "wq", &v(version)).join(BUNDLE_FILE)).unwrap();
        let mut r = BundleReader::open(f, trust).unwrap();
        while let Some(mut p) = r.next_payload().unwrap() {
            io::copy(&mut p, &mut io::sink()).unwrap();
        }
        r.finish().is_ok()
    }

    #[test]
    fn installs_refuses_and_prunes() {
        let key = SigningKey::generate().unwrap();
        let trust = Trust { keys: vec![key.public()], threshold: 1 };
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("models");
        for ver in ["1.0.0", "2.0.0", "3.0.0"] {
            let i = install(&store, &bundle(&key, ver, 5000)[..], &trust, 5, &StdDisk).unwrap();
            assert_eq!((i.name.as_str(), i.already), ("wq", false));
            assert!(verifies(&store, ver, &trust));
        }
        let again = install(&store, &bundle(&key, "3.0.0", 5000)[..], &trust, 5, &StdDisk).unwrap();
        assert!(again.already);
        assert_eq!(installed_versions(&store, "wq"), [v("1.0.0"), v("2.0.0"), v("3.0.0")]);

        // A stranger's bundle and a damaged one leave nothing behind.
        let stranger = SigningKey::generate().unwrap();
        let e = install(&store, &bundle(&stranger, "4.0.0", 10)[..], &trust, 5, &StdDisk);
        assert!(e.unwrap_err().to_string().contains("signature"));
        let mut bad = bundle(&key, "4.0.0", 5000);
        let at = bad.len() / 2;
        bad[at] ^= 1;
        assert!(install(&store, &bad[..], &trust, 5, &StdDisk).is_err());
        assert_eq!(installed_versions(&store, "wq").len(), 3);
        assert_eq!(installed_models(&store), ["wq"]);

        // Failed versions are refused; pruning spares the pinned ones.
        let state = ModelState {
            serving: Some(v("1.0.0")),
            fallback: None,
            trying: None,
            last: None,
            failures: vec![Failure { version: v("5.0.0"), reason: "test vector".into(), at: 1 }],
        };
        state.save(&store, "wq", &StdDisk).unwrap();
        assert_eq!(ModelState::load(&store, "wq"), (state.clone(), None));
        let e = install(&store, &bundle(&key, "5.0.0", 10)[..], &trust, 5, &StdDisk).unwrap_err();
        assert!(e.to_string().contains("failed on this device"), "{e}");
        let i = install(&store, &bundle(&key, "6.0.0", 10)[..], &trust, 1, &StdDisk).unwrap();
        assert_eq!(i.pruned, [v("2.0.0")]);
        assert_eq!(installed_versions(&store, "wq"), [v("1.0.0"), v("3.0.0"), v("6.0.0")]);
        let left: Vec<_> = fs::read_dir(&store).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["wq"], "no temporary folders left");
    }

    #[test]
    fn damaged_state_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("wq")).unwrap();
        fs::write(ModelState::path(dir.path(), "wq"), "serving = 3").unwrap();
        let (s, warning) = ModelState::load(dir.path(), "wq");
        assert_eq!(s, ModelState::default());
        assert!(warning.unwrap().contains("damaged"));
    }

    /// A power cut after every single change of an install (with a prune)
    /// leaves the pinned versions whole, and the new version either whole
    /// and verifying or absent.
    #[test]
    fn a_cut_anywhere_in_an_install_leaves_whole_versions() {
        let key = SigningKey::generate().unwrap();
        let trust = Trust { keys: vec![key.public()], threshold: 1 };
        let new = bundle(&key, "3.0.0", 3 << 20);
        let setup = |store: &Path| {
            for ver in ["1.0.0", "2.0.0"] {
                install(store, &bundle(&key, ver, 1000)[..], &trust, 5, &StdDisk).unwrap();
            }
            let state = ModelState { serving: Some(v("2.0.0")), ..Default::default() };
            state.save(store, "wq", &StdDisk).unwrap();
        };
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("count");
        setup(&store);
        let counting = CutDisk::new(u64::MAX);
        install(&store, &new[..], &trust, 0, &counting).unwrap();
        let total = counting.calls();
        assert!(total >= 10, "only {total} cut points");
        for n in 0..=total {
            let store = dir.path().join(format!("cut{n}"));
            setup(&store);
            let disk = CutDisk::new(n);
            let r = install(&store, &new[..], &trust, 0, &disk);
            assert_eq!(disk.was_cut(), n < total, "cut {n}: {r:?}");
            let versions = installed_versions(&store, "wq");
            assert!(versions.contains(&v("2.0.0")), "cut {n}: the serving version is gone");
            assert!(verifies(&store, "2.0.0", &trust));
            if versions.contains(&v("3.0.0")) {
                assert!(verifies(&store, "3.0.0", &trust), "cut {n}: 3.0.0 is partial");
            }
            // The next install after the cut completes and cleans up.
            install(&store, &new[..], &trust, 0, &StdDisk).unwrap();
            assert_eq!(installed_versions(&store, "wq"), [v("2.0.0"), v("3.0.0")], "cut {n}");
        }
    }
}
