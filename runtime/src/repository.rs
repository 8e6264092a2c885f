//! The model repository: which version of each model serves, the switch
//! to a new one, its watch window and the rollback.
//!
//! Versions come from two places: bundles baked into the image (flat
//! `*.basalt` files, read-only) and the installed-model store
//! (`/data/models/<name>/<version>/model.basalt`, see
//! [`basalt_bundle::model`]). Each model serves one version and keeps the
//! previous one loaded as its fallback. [`Catalog::load_newest`] (the
//! protocol's `POST /v2/repository/models/{m}/load`) loads the newest
//! version beside the running one, runs its test vector, and only then
//! swaps an `Arc` under a lock held for the swap alone: requests in flight
//! keep the `Arc` they took and finish on the old version. The new version
//! is then watched ([`basalt_bundle::model::Watch`]); if it breaks its
//! bounds, the fallback serves again and the version is refused for good.
//!
//! What serves is recorded in `<store>/<name>/state.toml`, written
//! atomically, before each step that could fail: a trial is recorded
//! before it loads, so a runtime that crashes while loading, testing or
//! watching a version (same boot id) refuses that version when it comes
//! back, while one cut by a reboot or power loss (another boot id) serves
//! the kept version and tries the new one again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use basalt_bundle::archive::Trust;
use basalt_bundle::model::{
    installed_models, installed_versions, version_dir, Disk, Failure, ModelState, Outcome, Trial,
    BUNDLE_FILE,
};
use serde_json::{json, Value};

use crate::metrics::{Metrics, VersionSnapshot};
use crate::server::Served;
use crate::store::{self, Loader, Steps};

/// Where the versions are and whom to trust.
pub struct Settings {
    /// The installed-model store (`/data/models`); `None` serves only
    /// baked bundles and records nothing.
    pub store: Option<PathBuf>,
    /// Folders of baked bundles (`/usr/share/basalt/models`).
    pub baked: Vec<PathBuf>,
    /// The keys bundles must be signed with.
    pub trust: Trust,
    /// This boot's id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
}

/// Why a load request did not switch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoError {
    /// No version of the model exists anywhere (404).
    #[error("no model {0:?} is installed or baked in")]
    Unknown(String),
    /// Another load or a watch window is in progress (409).
    #[error("{0}")]
    Busy(String),
    /// The new version failed; the old one serves on (400).
    #[error("{0}")]
    Failed(String),
}

/// What a load request did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// The model.
    pub name: String,
    /// The version serving now.
    pub serving: Option<String>,
    /// The version before, now the fallback, when it switched.
    pub previous: Option<String>,
    /// `watching` (switched, in its window), `serving` (switched and kept
    /// at once) or `unchanged` (nothing newer).
    pub state: &'static str,
    /// Seconds of watch window ahead.
    pub watch_seconds: f64,
    /// How long each step took, when a version was loaded.
    pub timings: Option<Timings>,
}

/// How long a load took, step by step (the runtime's side of the time
/// from `basalt publish` to a device serving the new version).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timings {
    /// Reading and verifying the bundle, loading it and running its test
    /// vector.
    pub steps: Steps,
    /// From the test vector's end to the new version serving: the state
    /// recorded on disk (synced) and the swap.
    pub switch: Duration,
}

impl Timings {
    /// `{"verify_ms", "load_ms", "test_vector_ms", "switch_ms"}`.
    pub fn to_json(&self) -> Value {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        json!({
            "verify_ms": ms(self.steps.verify),
            "load_ms": ms(self.steps.load),
            "test_vector_ms": ms(self.steps.test_vector),
            "switch_ms": ms(self.switch),
        })
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        format!(
            "verified in {:.1} ms, loaded in {:.1} ms, test vector in {:.1} ms, switched in {:.1} ms",
            ms(self.steps.verify),
            ms(self.steps.load),
            ms(self.steps.test_vector),
            ms(self.switch)
        )
    }
}

impl LoadReport {
    /// The JSON answer.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "version": self.serving,
            "previous": self.previous,
            "state": self.state,
            "watch_seconds": self.watch_seconds,
            "timings": self.timings.as_ref().map(Timings::to_json),
        })
    }
}

struct Watching {
    version: Arc<Served>,
    earlier_fallback: Option<Arc<Served>>,
    until: Instant,
    baseline_p99: Option<f64>,
}

#[derive(Default)]
struct Inner {
    serving: Option<Arc<Served>>,
    fallback: Option<Arc<Served>>,
    watch: Option<Watching>,
    failed: Vec<Arc<Served>>,
    state: ModelState,
}

/// One model: its versions and what it remembers.
pub struct Slot {
    name: String,
    inner: RwLock<Inner>,
    busy: Mutex<()>,
    judging: Mutex<()>,
}

impl Slot {
    fn new(name: &str) -> Slot {
        Slot {
            name: name.to_string(),
            inner: RwLock::default(),
            busy: Mutex::new(()),
            judging: Mutex::new(()),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Inner) -> T) -> T {
        match self.inner.read() {
            Ok(g) => f(&g),
            Err(p) => f(&p.into_inner()),
        }
    }

    fn write<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        match self.inner.write() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

type Models = Arc<RwLock<BTreeMap<String, Arc<Slot>>>>;

enum Attempt {
    Loaded(Arc<Served>, Steps),
    /// The bundle does not verify or cannot be read: not the version's
    /// fault on this device, so not refused for good.
    Damaged(String),
    /// The version loaded and failed (does not load, test vector).
    Failed(Arc<Served>),
}

/// Every model the runtime knows.
pub struct Catalog {
    models: Models,
    settings: Settings,
    loader: Box<Loader>,
    disk: Arc<dyn Disk>,
    metrics: Metrics,
    baked: Vec<(String, semver::Version, PathBuf)>,
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl Catalog {
    /// Finds every model and serves, for each, its kept version (or, on a
    /// first start, the newest that passes its test vector), with its
    /// fallback loaded beside it. Newer versions are not tried here: call
    /// [`Catalog::load_newest`] (the server does, once it listens).
    pub fn open(settings: Settings, loader: Box<Loader>, disk: Arc<dyn Disk>) -> Catalog {
        let models: Models = Arc::default();
        let snapshot_models = models.clone();
        let metrics = Metrics::with_drift(Box::new(move || snapshots(&snapshot_models)));
        let mut c = Catalog { models, settings, loader, disk, metrics, baked: Vec::new() };
        let mut names: Vec<String> = Vec::new();
        for path in store::find_bundles(&c.settings.baked) {
            match store::peek(&path, &c.settings.trust) {
                Ok((name, version)) => {
                    names.push(name.clone());
                    c.baked.push((name, version, path));
                }
                Err(e) => {
                    println!("model bundle {}: refused: {e}", path.display());
                    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
                    let name = name.unwrap_or_default();
                    let slot = c.slot(&name);
                    let rec = Served::failed(&name, "0", format!("{}: {e}", path.display()));
                    slot.write(|i| i.failed.push(Arc::new(rec)));
                }
            }
        }
        if let Some(store) = &c.settings.store {
            names.extend(installed_models(store));
        }
        names.sort();
        names.dedup();
        for name in names {
            c.start(&name);
        }
        c
    }

    /// The metrics, drift statistics included.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        let mut map = match self.models.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.entry(name.to_string()).or_insert_with(|| Arc::new(Slot::new(name))).clone()
    }

    fn get(&self, name: &str) -> Option<Arc<Slot>> {
        let map = match self.models.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.get(name).cloned()
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        let map = match self.models.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.values().cloned().collect()
    }

    /// The names of all models.
    pub fn names(&self) -> Vec<String> {
        self.slots().iter().map(|s| s.name.clone()).collect()
    }

    /// Every version of `name` there is, installed over baked, oldest
    /// first.
    fn available(&self, name: &str) -> BTreeMap<semver::Version, PathBuf> {
        let mut out = BTreeMap::new();
        for (n, v, p) in &self.baked {
            if n == name {
                out.insert(v.clone(), p.clone());
            }
        }
        if let Some(store) = &self.settings.store {
            for v in installed_versions(store, name) {
                let path = version_dir(store, name, &v).join(BUNDLE_FILE);
                out.insert(v, path);
            }
        }
        out
    }

    fn save(&self, name: &str, state: &ModelState) {
        let Some(store) = &self.settings.store else { return };
        if let Err(e) = state.save(store, name, self.disk.as_ref()) {
            println!("model {name}: cannot record its state: {e}");
        }
    }

    fn attempt(&self, name: &str, version: &semver::Version, path: &Path) -> Attempt {
        let start = Instant::now();
        let loaded = match store::load_file(path, &self.settings.trust, self.loader.as_ref()) {
            Ok(l) => l,
            Err(e) => {
                println!("model {name} {version}: refused: {e}");
                return Attempt::Damaged(format!("{}: {e}", path.display()));
            }
        };
        println!("{}", loaded.message);
        let mut served = loaded.served;
        if served.name != name || served.version != version.to_string() {
            return Attempt::Damaged(format!(
                "{} holds {} {}, not {name} {version}",
                path.display(),
                served.name,
                served.version
            ));
        }
        let ready = served.ready();
        self.metrics.model_loaded(name, &served.version, start.elapsed().as_secs_f64(), ready);
        if ready {
            Attempt::Loaded(Arc::new(served), loaded.steps)
        } else {
            served.backend = None;
            served.monitor = None;
            Attempt::Failed(Arc::new(served))
        }
    }

    fn start(&self, name: &str) {
        let slot = self.slot(name);
        let (mut state, warning) = match &self.settings.store {
            Some(store) => ModelState::load(store, name),
            None => (ModelState::default(), None),
        };
        if let Some(w) = warning {
            println!("model {name}: {w}");
        }
        let mut changed = false;
        if let Some(t) = state.trying.take() {
            changed = true;
            if t.boot_id == self.settings.boot_id {
                let reason =
                    "the runtime stopped while loading, testing or watching it".to_string();
                println!("model {name} {}: refused from now on: {reason}", t.version);
                self.metrics.update(name, "failed");
                state.last = Some(outcome(&t.version, "failed", &reason));
                state.failures.push(Failure { version: t.version, reason, at: now_unix() });
            }
        }
        let avail = self.available(name);
        let usable: Vec<(&semver::Version, &PathBuf)> =
            avail.iter().rev().filter(|(v, _)| state.failure(v).is_none()).collect();
        // The kept version first, then its fallback, then older ones, and
        // only then versions never kept here (newest first); without a
        // kept version, the newest that passes. Newer versions get their
        // trial with a watch window from load_newest.
        let rank = |v: &semver::Version| {
            if Some(v) == state.serving.as_ref() {
                0
            } else if Some(v) == state.fallback.as_ref() {
                1
            } else if state.serving.as_ref().is_some_and(|k| v < k) {
                2
            } else {
                3
            }
        };
        let mut order = usable.clone();
        order.sort_by_key(|(v, _)| rank(v));
        let mut serving = None;
        for (v, path) in order {
            match self.attempt(name, v, path) {
                Attempt::Loaded(s, _) => {
                    serving = Some((v.clone(), s));
                    break;
                }
                Attempt::Damaged(why) => {
                    slot.write(|i| {
                        i.failed.push(Arc::new(Served::failed(name, &v.to_string(), why)))
                    });
                }
                Attempt::Failed(rec) => {
                    let reason = rec.problem.clone().unwrap_or_default();
                    state.failures.push(Failure { version: v.clone(), reason, at: now_unix() });
                    changed = true;
                    slot.write(|i| i.failed.push(rec));
                }
            }
        }
        let serving_version = serving.as_ref().map(|(v, _)| v.clone());
        if serving_version != state.serving {
            if state.serving.is_some() {
                state.fallback = None;
            }
            state.serving = serving_version.clone();
            changed = true;
        }
        let mut fallback = None;
        if let Some(f) = state.fallback.clone().filter(|f| Some(f) != serving_version.as_ref()) {
            match avail.get(&f).map(|p| self.attempt(name, &f, p)) {
                Some(Attempt::Loaded(s, _)) => fallback = Some(s),
                _ => {
                    println!("model {name}: fallback {f} is not available");
                    state.fallback = None;
                    changed = true;
                }
            }
        }
        if changed {
            self.save(name, &state);
        }
        if let Some((_, s)) = &serving {
            self.metrics.serving(name, &s.version, true);
        }
        slot.write(|i| {
            i.serving = serving.map(|(_, s)| s);
            i.fallback = fallback;
            i.state = state;
        });
    }

    /// Whether every model has a version serving.
    pub fn ready(&self) -> bool {
        self.slots().iter().all(|s| s.read(|i| i.serving.is_some()))
    }

    /// Why each model that is not ready is not, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.slots() {
            s.read(|i| {
                if i.serving.is_none() {
                    let why: Vec<String> = i
                        .failed
                        .iter()
                        .map(|f| {
                            format!(
                                "{}: {}",
                                f.version,
                                f.problem.as_deref().unwrap_or("not loaded")
                            )
                        })
                        .collect();
                    let why =
                        if why.is_empty() { "no version".to_string() } else { why.join("; ") };
                    out.push(format!("{}: {why}", s.name));
                }
            });
        }
        out
    }

    /// The version a request names: the serving one when `version` is
    /// `None` (or, when none serves, the last that failed, to say why).
    pub fn find(&self, name: &str, version: Option<&str>) -> Option<Arc<Served>> {
        let slot = self.get(name)?;
        slot.read(|i| match version {
            None => i.serving.clone().or_else(|| i.failed.last().cloned()),
            Some(v) => i
                .serving
                .iter()
                .chain(&i.fallback)
                .chain(i.failed.iter().rev())
                .find(|s| s.version == v)
                .cloned(),
        })
    }

    /// Every version of `name` the runtime holds: serving, fallback, then
    /// those that failed.
    pub fn versions(&self, name: &str) -> Vec<Arc<Served>> {
        let Some(slot) = self.get(name) else { return Vec::new() };
        slot.read(|i| i.serving.iter().chain(&i.fallback).chain(&i.failed).cloned().collect())
    }

    /// Every version of every model.
    pub fn all_versions(&self) -> Vec<Arc<Served>> {
        self.names().iter().flat_map(|n| self.versions(n)).collect()
    }

    /// Loads the newest version of `name` not yet tried and, when it passes
    /// its test vector, switches to it and watches it. Blocks while it
    /// loads: call it off the async threads.
    pub fn load_newest(&self, name: &str) -> Result<LoadReport, RepoError> {
        let avail = self.available(name);
        if avail.is_empty() && self.get(name).is_none() {
            return Err(RepoError::Unknown(name.to_string()));
        }
        let slot = self.slot(name);
        let Ok(_busy) = slot.busy.try_lock() else {
            return Err(RepoError::Busy(format!("model {name} is being loaded already")));
        };
        let (mut state, current, watching) = slot.read(|i| {
            let w = i.watch.as_ref().map(|w| (w.version.version.clone(), w.until));
            (i.state.clone(), i.serving.clone(), w)
        });
        if let Some((v, until)) = watching {
            let left = until.saturating_duration_since(Instant::now()).as_secs_f64();
            return Err(RepoError::Busy(format!(
                "model {name} {v} is in its watch window for {left:.0} s more; load again after"
            )));
        }
        let current_version: Option<semver::Version> =
            current.as_ref().and_then(|c| c.version.parse().ok());
        let unchanged = || LoadReport {
            name: name.to_string(),
            serving: current.as_ref().map(|c| c.version.clone()),
            previous: None,
            state: "unchanged",
            watch_seconds: 0.0,
            timings: None,
        };
        let Some((version, path)) = avail
            .iter()
            .rev()
            .find(|(v, _)| state.failure(v).is_none() && Some(*v) > current_version.as_ref())
        else {
            return Ok(unchanged());
        };
        state.trying = Some(Trial {
            version: version.clone(),
            boot_id: self.settings.boot_id.clone(),
            since: now_unix(),
        });
        self.save(name, &state);
        let record = |state: &mut ModelState, result: &str, message: String| {
            state.trying = None;
            state.last = Some(outcome(version, result, &message));
            self.metrics.update(name, result);
        };
        let (new, steps) = match self.attempt(name, version, path) {
            Attempt::Loaded(s, steps) => (s, steps),
            Attempt::Damaged(why) => {
                record(&mut state, "damaged", why.clone());
                self.save(name, &state);
                slot.write(|i| i.state = state);
                return Err(RepoError::Failed(format!(
                    "{name} {version} was not loaded: {why}; {} serves on",
                    served_name(&current)
                )));
            }
            Attempt::Failed(rec) => {
                let why = rec.problem.clone().unwrap_or_default();
                record(&mut state, "failed", why.clone());
                state.failures.push(Failure {
                    version: version.clone(),
                    reason: why.clone(),
                    at: now_unix(),
                });
                self.save(name, &state);
                slot.write(|i| {
                    i.failed.push(rec);
                    i.state = state;
                });
                return Err(RepoError::Failed(format!(
                    "{name} {version} is refused: {why}; {} serves on",
                    served_name(&current)
                )));
            }
        };
        let switching = Instant::now();
        let timings = |switch| Timings { steps, switch };
        let window = new.watch.window;
        let previous = current.as_ref().map(|c| c.version.clone());
        self.metrics.serving(name, &new.version, true);
        if let Some(c) = &current {
            self.metrics.serving(name, &c.version, false);
        }
        if current.is_none() || window <= 0.0 {
            // Nothing to compare with, or no window asked for: kept now.
            slot.write(|i| {
                i.fallback = i.serving.take();
                i.serving = Some(new.clone());
            });
            self.keep(&slot, &mut state, version, previous.clone(), "kept at once".into());
            let timings = timings(switching.elapsed());
            println!("model {name} {version}: {}", timings.describe());
            return Ok(LoadReport {
                name: name.to_string(),
                serving: Some(new.version.clone()),
                previous,
                state: "serving",
                watch_seconds: 0.0,
                timings: Some(timings),
            });
        }
        let baseline_p99 = current
            .as_ref()
            .filter(|c| c.compute.count() >= new.watch.min_requests)
            .and_then(|c| c.compute.quantile(0.99));
        state.last = Some(outcome(
            version,
            "watching",
            &format!("switched from {}; watched for {window} s", served_name(&current)),
        ));
        self.metrics.update(name, "switched");
        self.save(name, &state);
        slot.write(|i| {
            let earlier_fallback = i.fallback.take();
            i.fallback = i.serving.take();
            i.serving = Some(new.clone());
            i.watch = Some(Watching {
                version: new.clone(),
                earlier_fallback,
                until: Instant::now() + Duration::from_secs_f64(window),
                baseline_p99,
            });
            i.state = state;
        });
        let timings = timings(switching.elapsed());
        println!("model {name}: switched to {version}, watching it for {window} s");
        println!("model {name} {version}: {}", timings.describe());
        Ok(LoadReport {
            name: name.to_string(),
            serving: Some(new.version.clone()),
            previous,
            state: "watching",
            watch_seconds: window,
            timings: Some(timings),
        })
    }

    fn keep(
        &self,
        slot: &Slot,
        state: &mut ModelState,
        version: &semver::Version,
        previous: Option<String>,
        message: String,
    ) {
        state.serving = Some(version.clone());
        state.fallback = previous.and_then(|p| p.parse().ok());
        state.trying = None;
        state.last = Some(outcome(version, "serving", &message));
        self.metrics.update(&slot.name, "kept");
        self.save(&slot.name, state);
        let s = state.clone();
        slot.write(|i| i.state = s);
        println!("model {}: {version} kept ({message})", slot.name);
    }

    /// Whether `served` is being watched (its requests then call
    /// [`Catalog::judge`]).
    pub fn watched(&self, served: &Served) -> bool {
        self.get(&served.name).is_some_and(|s| {
            s.read(|i| i.watch.as_ref().is_some_and(|w| w.version.version == served.version))
        })
    }

    /// Whether any model is in its watch window.
    pub fn watching(&self) -> bool {
        self.slots().iter().any(|s| s.read(|i| i.watch.is_some()))
    }

    /// Judges the watched version of `name` on what it has done so far:
    /// switches back when it breaks a bound, keeps it when its window is
    /// over. Returns what it decided, if anything.
    pub fn judge(&self, name: &str) -> Option<String> {
        let slot = self.get(name)?;
        let _judging = slot.judging.try_lock().ok()?;
        let (v, until, baseline) =
            slot.read(|i| i.watch.as_ref().map(|w| (w.version.clone(), w.until, w.baseline_p99)))?;
        let over = Instant::now() >= until;
        let w = &v.watch;
        let (ok, errors) = (v.stats.successes(), v.stats.errors());
        let n = ok + errors;
        let mut breach = None;
        if n > 0 && (n >= w.min_requests || over) {
            let rate = errors as f64 / n as f64;
            if rate > w.max_error_rate {
                breach = Some(format!(
                    "error rate {rate:.3} over {n} requests is above max_error_rate {}",
                    w.max_error_rate
                ));
            }
        }
        // Latency only at the end: early in a window a few slow first
        // requests (cold caches) would decide alone.
        if breach.is_none() && over && v.compute.count() >= w.min_requests {
            let p99 = v.compute.quantile(0.99).unwrap_or(0.0);
            if let Some(b) = baseline.filter(|b| p99 > b * w.max_latency_ratio) {
                breach = Some(format!(
                    "p99 compute time {:.2} ms is more than {} x the previous version's {:.2} ms",
                    p99 * 1e3,
                    w.max_latency_ratio,
                    b * 1e3
                ));
            } else if let Some(max) = w.max_p99_seconds.filter(|m| p99 > *m) {
                breach = Some(format!(
                    "p99 compute time {:.2} ms is above max_p99_seconds {max}",
                    p99 * 1e3
                ));
            }
        }
        let mut state = slot.read(|i| i.state.clone());
        let version: semver::Version = v.version.parse().ok()?;
        if let Some(reason) = breach {
            let back = slot.read(|i| i.fallback.as_ref().map(|f| f.version.clone()));
            let back = back.unwrap_or_default();
            let message = format!("rolled back to {back}: {reason}");
            // Recorded first: once switched back, the version must stay
            // refused even if the power goes now.
            state.trying = None;
            state.last = Some(outcome(&version, "rolled-back", &message));
            state.failures.push(Failure { version, reason: message.clone(), at: now_unix() });
            self.save(name, &state);
            slot.write(|i| {
                let w = i.watch.take().filter(|w| Arc::ptr_eq(&w.version, &v))?;
                i.serving = i.fallback.take();
                i.fallback = w.earlier_fallback;
                let mut rec = Served::failed(name, &v.version, format!("rolled back: {reason}"));
                rec.watch = v.watch.clone();
                i.failed.push(Arc::new(rec));
                i.state = state;
                Some(())
            })?;
            println!("model {name} {}: {message}", v.version);
            self.metrics.update(name, "rolled-back");
            self.metrics.serving(name, &v.version, false);
            self.metrics.serving(name, &back, true);
            return Some(message);
        }
        if !over {
            return None;
        }
        let previous = slot.write(|i| {
            i.watch.take().filter(|w| Arc::ptr_eq(&w.version, &v))?;
            Some(i.fallback.as_ref().map(|f| f.version.clone()))
        })?;
        let message = format!("{n} requests, {errors} failed, in its watch window");
        self.keep(&slot, &mut state, &version, previous, message.clone());
        Some(format!("kept: {message}"))
    }

    /// Judges every model in its watch window (the server calls this
    /// periodically, so a window ends even without requests).
    pub fn tick(&self) {
        for s in self.slots() {
            if s.read(|i| i.watch.is_some()) {
                self.judge(&s.name);
            }
        }
    }

    /// `GET /v2/repository/index`: every version with its state.
    pub fn index(&self) -> Value {
        let mut out = Vec::new();
        for s in self.slots() {
            s.read(|i| {
                let watched = i.watch.as_ref().map(|w| w.version.version.clone());
                for (role, v) in i
                    .serving
                    .iter()
                    .map(|v| ("serving", v))
                    .chain(i.fallback.iter().map(|v| ("fallback", v)))
                    .chain(i.failed.iter().map(|v| ("failed", v)))
                {
                    let role =
                        if watched.as_deref() == Some(&v.version) { "watching" } else { role };
                    out.push(json!({
                        "name": s.name,
                        "version": v.version,
                        "state": if v.ready() { "READY" } else { "UNAVAILABLE" },
                        "reason": v.problem.clone().unwrap_or_default(),
                        "role": role,
                    }));
                }
            });
        }
        Value::Array(out)
    }

    /// `GET /v2/repository/models/{m}`: what serves, the fallback, the
    /// watch window, the last attempt and the refused versions.
    pub fn status(&self, name: &str) -> Option<Value> {
        let slot = self.get(name)?;
        Some(slot.read(|i| {
            let watch = i.watch.as_ref().map(|w| {
                json!({
                    "version": w.version.version,
                    "seconds_left": w.until.saturating_duration_since(Instant::now()).as_secs_f64(),
                    "requests": w.version.stats.successes() + w.version.stats.errors(),
                    "errors": w.version.stats.errors(),
                    "p99_seconds": w.version.compute.quantile(0.99),
                    "baseline_p99_seconds": w.baseline_p99,
                    "rules": w.version.watch,
                })
            });
            json!({
                "name": name,
                "serving": i.serving.as_ref().map(|s| &s.version),
                "fallback": i.fallback.as_ref().map(|s| &s.version),
                "watch": watch,
                "last": i.state.last,
                "failed": i.state.failures,
                "ready": i.serving.is_some(),
            })
        }))
    }
}

fn served_name(s: &Option<Arc<Served>>) -> String {
    s.as_ref().map_or_else(|| "nothing".to_string(), |s| s.version.clone())
}

fn outcome(version: &semver::Version, result: &str, message: &str) -> Outcome {
    Outcome {
        version: version.clone(),
        result: result.to_string(),
        message: message.to_string(),
        at: now_unix(),
    }
}

fn snapshots(models: &Models) -> Vec<VersionSnapshot> {
    let slots: Vec<Arc<Slot>> = match models.read() {
        Ok(g) => g.values().cloned().collect(),
        Err(p) => p.into_inner().values().cloned().collect(),
    };
    let mut out = Vec::new();
    for s in slots {
        let versions: Vec<Arc<Served>> =
            s.read(|i| i.serving.iter().chain(&i.fallback).cloned().collect());
        for v in versions {
            if let Some(m) = &v.monitor {
                out.push(VersionSnapshot::of(&v.name, &v.version, m));
            }
        }
    }
    out
}

/// This boot's id, to tell a crash from a reboot; empty off Linux.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}
