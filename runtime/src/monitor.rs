//! Model monitoring: running statistics of every input and output feature
//! of a model version, its drift from the training distribution that
//! `model.toml` declares, and its compute-time distribution.
//!
//! Per feature: count, mean and variance (one pass, no stored samples:
//! sums of the differences from the feature's first value and of their
//! squares, so there is no division per value and the digits survive a
//! large mean), min, max, the values outside the
//! training range, non-finite values, and counts per training bin, from
//! which the population stability index (PSI) is computed when read:
//! `PSI = Σ (a_i − e_i) · ln(a_i / e_i)` over the bins, `a_i` the share of
//! live values in bin `i`, `e_i` the training share (both floored at
//! [`PSI_FLOOR`] so an empty bin does not make it infinite).
//!
//! The work per request is one pass over the tensor's elements with a
//! lock per tensor taken once; nothing is allocated: every counter is
//! sized when the version loads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use basalt_bundle::model::MonitorSpec;

use crate::server::TensorMeta;
use crate::v2::{Data, Tensor};

/// Share below which a bin counts as this share in the PSI.
pub const PSI_FLOOR: f64 = 1e-4;

/// Tensors whose feature axis is longer than this are watched as one
/// aggregate unless `model.toml` lists their features.
pub const MAX_DEFAULT_FEATURES: usize = 64;

/// Running statistics of one feature.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Welford {
    /// Finite values seen.
    pub count: u64,
    /// Their mean.
    pub mean: f64,
    /// Sum of squared differences from the mean.
    pub m2: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Welford {
    /// Adds one value.
    #[inline]
    pub fn push(&mut self, x: f64) {
        self.count += 1;
        if self.count == 1 {
            self.min = x;
            self.max = x;
        } else {
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
        let d = x - self.mean;
        self.mean += d / self.count as f64;
        self.m2 += d * (x - self.mean);
    }

    /// The population variance (0 before two values).
    pub fn variance(&self) -> f64 {
        if self.count < 2 {
            0.0
        } else {
            self.m2 / self.count as f64
        }
    }
}

/// The population stability index of `actual` counts per bin against the
/// `expected` shares; `None` before any count.
pub fn psi(actual: &[u64], expected: &[f64]) -> Option<f64> {
    let total: u64 = actual.iter().sum();
    if total == 0 || actual.len() != expected.len() {
        return None;
    }
    let mut sum = 0.0;
    for (&a, &e) in actual.iter().zip(expected) {
        let a = (a as f64 / total as f64).max(PSI_FLOOR);
        let e = e.max(PSI_FLOOR);
        sum += (a - e) * (a / e).ln();
    }
    Some(sum)
}

/// One feature's running sums: of `x - shift` and of its square, with
/// `shift` the first value seen (the shifted-data algorithm: as exact as
/// Welford's when values sit far from zero, and no division per value).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Moments {
    count: u64,
    shift: f64,
    s1: f64,
    s2: f64,
    min: f64,
    max: f64,
}

impl Moments {
    #[inline]
    fn push(&mut self, x: f64) {
        if self.count == 0 {
            self.shift = x;
            self.min = x;
            self.max = x;
        }
        self.count += 1;
        let d = x - self.shift;
        self.s1 += d;
        self.s2 += d * d;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// Count, mean, sum of squared differences from the mean, min, max.
    fn stats(&self) -> Welford {
        if self.count == 0 {
            return Welford::default();
        }
        let n = self.count as f64;
        Welford {
            count: self.count,
            mean: self.shift + self.s1 / n,
            m2: (self.s2 - self.s1 * self.s1 / n).max(0.0),
            min: self.min,
            max: self.max,
        }
    }
}

#[derive(Debug, Default)]
struct FeatureCounters {
    moments: Moments,
    out_of_range: u64,
    nonfinite: u64,
    bins: Vec<u64>,
}

impl FeatureCounters {
    /// Counts one value of the feature `r` describes.
    #[inline]
    fn add(&mut self, r: &FeatureRef, x: f64) {
        if !x.is_finite() {
            self.nonfinite += 1;
            return;
        }
        self.moments.push(x);
        if let Some((lo, hi)) = r.range {
            self.out_of_range += u64::from(x < lo || x > hi);
        }
        if let Some(last) = self.bins.len().checked_sub(1) {
            // The edges increase: the bin is how many are <= x (a
            // branch-free count over a few edges).
            let bin: usize = r.edges.iter().map(|e| usize::from(*e <= x)).sum();
            self.bins[bin.min(last)] += 1;
        }
    }
}

#[derive(Debug)]
struct FeatureRef {
    name: String,
    range: Option<(f64, f64)>,
    edges: Vec<f64>,
    expected: Vec<f64>,
}

/// What is known of one feature now.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSnapshot {
    /// Its name (`model.toml`) or index.
    pub name: String,
    /// Running statistics of the finite values.
    pub stats: Welford,
    /// Values outside the declared training range.
    pub out_of_range: u64,
    /// NaN and infinite values (not in the statistics).
    pub nonfinite: u64,
    /// The PSI against the training bins, when declared and seen.
    pub psi: Option<f64>,
}

/// One watched input or output.
#[derive(Debug)]
pub struct TensorMonitor {
    /// The tensor's name.
    pub tensor: String,
    /// The feature axis; `None` watches the whole tensor as one feature.
    axis: Option<usize>,
    refs: Vec<FeatureRef>,
    counters: Mutex<Vec<FeatureCounters>>,
}

impl TensorMonitor {
    fn new(
        meta: &TensorMeta,
        spec: Option<&MonitorSpec>,
        kind: &str,
    ) -> Result<TensorMonitor, String> {
        let rank = meta.shape.len();
        let declared = spec.map(|s| s.features.as_slice()).unwrap_or_default();
        let axis = match spec.and_then(|s| s.axis) {
            Some(a) if a >= rank => {
                return Err(format!(
                    "[[monitor]] {:?}: axis {a} but the {kind} has {rank} dimensions",
                    meta.name
                ))
            }
            Some(a) => Some(a),
            None if rank == 0 => None,
            None => Some(rank - 1),
        };
        let fixed = axis.and_then(|a| usize::try_from(meta.shape[a]).ok());
        let (axis, n) = match (declared.len(), fixed) {
            (0, Some(f)) if f <= MAX_DEFAULT_FEATURES && (rank <= 2 || spec.is_some()) => (axis, f),
            (0, _) => (None, 1),
            (d, Some(f)) if d != f => {
                return Err(format!(
                    "[[monitor]] {:?} lists {d} features but axis {} of the {kind} holds {f}",
                    meta.name,
                    axis.unwrap_or(0)
                ))
            }
            (d, _) => (axis, d),
        };
        let refs: Vec<FeatureRef> = (0..n)
            .map(|i| {
                let d = declared.get(i);
                FeatureRef {
                    name: d.and_then(|d| d.name.clone()).unwrap_or_else(|| {
                        if axis.is_some() {
                            i.to_string()
                        } else {
                            "all".into()
                        }
                    }),
                    range: d.and_then(|d| d.range).map(|[lo, hi]| (lo, hi)),
                    edges: d.map(|d| d.bins.clone()).unwrap_or_default(),
                    expected: d.map(|d| d.expected.clone()).unwrap_or_default(),
                }
            })
            .collect();
        let counters = refs
            .iter()
            .map(|r| FeatureCounters {
                bins: vec![0; if r.edges.is_empty() { 0 } else { r.edges.len() + 1 }],
                ..Default::default()
            })
            .collect();
        Ok(TensorMonitor { tensor: meta.name.clone(), axis, refs, counters: Mutex::new(counters) })
    }

    /// Adds one tensor's elements.
    pub fn observe(&self, t: &Tensor) {
        match &t.data {
            Data::F32(v) => self.observe_with(&t.shape, v, |x| f64::from(*x)),
            Data::F64(v) => self.observe_with(&t.shape, v, |x| *x),
            Data::I64(v) => self.observe_with(&t.shape, v, |x| *x as f64),
            Data::I32(v) => self.observe_with(&t.shape, v, |x| f64::from(*x)),
            Data::U8(v) => self.observe_with(&t.shape, v, |x| f64::from(*x)),
            Data::Bool(v) => self.observe_with(&t.shape, v, |x| f64::from(u8::from(*x))),
        }
    }

    fn observe_with<T>(&self, shape: &[usize], data: &[T], f: impl Fn(&T) -> f64) {
        let Ok(mut counters) = self.counters.lock() else { return };
        let n = self.refs.len();
        // Elements are row-major: with `inner` the product of the
        // dimensions after the axis, each run of `n * inner` elements holds
        // feature 0's `inner` values, then feature 1's, and so on.
        let inner = match self.axis {
            None => data.len().max(1),
            Some(a) => {
                if shape.get(a) != Some(&n) {
                    return;
                }
                shape[a + 1..].iter().product::<usize>().max(1)
            }
        };
        let (refs, counters) = (&self.refs[..], &mut counters[..]);
        for row in data.chunks(n * inner) {
            for ((r, c), values) in refs.iter().zip(counters.iter_mut()).zip(row.chunks(inner)) {
                for x in values {
                    c.add(r, f(x));
                }
            }
        }
    }

    /// Every feature's statistics now.
    pub fn snapshot(&self) -> Vec<FeatureSnapshot> {
        let Ok(counters) = self.counters.lock() else { return Vec::new() };
        self.refs
            .iter()
            .zip(counters.iter())
            .map(|(r, c)| FeatureSnapshot {
                name: r.name.clone(),
                stats: c.moments.stats(),
                out_of_range: c.out_of_range,
                nonfinite: c.nonfinite,
                psi: if c.bins.is_empty() { None } else { psi(&c.bins, &r.expected) },
            })
            .collect()
    }
}

/// Everything watched of one model version.
#[derive(Debug, Default)]
pub struct Monitor {
    /// The inputs.
    pub inputs: Vec<TensorMonitor>,
    /// The outputs.
    pub outputs: Vec<TensorMonitor>,
}

impl Monitor {
    /// Watches every input and output of a model; `specs` (from
    /// `model.toml`) give feature axes, names and training distributions.
    pub fn new(
        specs: &[MonitorSpec],
        inputs: &[TensorMeta],
        outputs: &[TensorMeta],
    ) -> Result<Monitor, String> {
        if let Some(s) =
            specs.iter().find(|s| !inputs.iter().chain(outputs).any(|m| m.name == s.tensor))
        {
            return Err(format!("[[monitor]] names {:?}, which the model has not", s.tensor));
        }
        let make = |metas: &[TensorMeta], kind: &str| -> Result<Vec<TensorMonitor>, String> {
            metas
                .iter()
                .map(|m| TensorMonitor::new(m, specs.iter().find(|s| s.tensor == m.name), kind))
                .collect()
        };
        Ok(Monitor { inputs: make(inputs, "input")?, outputs: make(outputs, "output")? })
    }

    /// Adds one request's inputs and outputs.
    pub fn observe(&self, inputs: &[Tensor], outputs: &[Tensor]) {
        for (monitors, tensors) in [(&self.inputs, inputs), (&self.outputs, outputs)] {
            for m in monitors {
                if let Some(t) = tensors.iter().find(|t| t.name == m.tensor) {
                    m.observe(t);
                }
            }
        }
    }
}

/// Buckets per doubling of [`Latency`]: a quantile is known within 19 %.
const PER_OCTAVE: f64 = 4.0;
const BUCKETS: usize = 120;
const SMALLEST: f64 = 1e-6;

/// A lock-free histogram of durations, from 1 µs to about 17 minutes in
/// steps of 2^(1/4), for the p99 the watch window judges.
#[derive(Debug)]
pub struct Latency {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency { buckets: std::array::from_fn(|_| AtomicU64::new(0)), count: AtomicU64::new(0) }
    }
}

impl Latency {
    fn upper(i: usize) -> f64 {
        SMALLEST * 2f64.powf((i + 1) as f64 / PER_OCTAVE)
    }

    /// Records one duration in seconds.
    pub fn record(&self, seconds: f64) {
        let i = if seconds <= SMALLEST {
            0
        } else {
            ((seconds / SMALLEST).log2() * PER_OCTAVE).floor() as usize
        };
        self.buckets[i.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Durations recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The upper edge of the bucket holding quantile `q` (0 to 1); `None`
    /// before any duration.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= want {
                return Some(Latency::upper(i));
            }
        }
        Some(Latency::upper(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v2::Datatype;
    use basalt_bundle::model::FeatureSpec;

    /// Welford against a direct two-pass computation, on values whose
    /// mean is large against their spread (where a naive sum of squares
    /// loses its digits).
    #[test]
    fn welford_matches_two_passes() {
        let xs: Vec<f64> = (0..10_000).map(|i| 1e6 + ((i * 7919) % 1000) as f64 * 0.001).collect();
        let mut w = Welford::default();
        xs.iter().for_each(|&x| w.push(x));
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert_eq!(w.count, 10_000);
        assert!((w.mean - mean).abs() < 1e-12 * mean, "{} vs {mean}", w.mean);
        assert!((w.variance() - var).abs() < 1e-6 * var, "{} vs {var}", w.variance());
        assert_eq!(w.min, xs.iter().cloned().fold(f64::INFINITY, f64::min));
        assert_eq!(w.max, xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max));
        // The shifted sums the monitor keeps give the same.
        let mut m = Moments::default();
        xs.iter().for_each(|&x| m.push(x));
        let s = m.stats();
        assert_eq!((s.count, s.min, s.max), (w.count, w.min, w.max));
        assert!((s.mean - mean).abs() < 1e-12 * mean, "{} vs {mean}", s.mean);
        assert!((s.variance() - var).abs() < 1e-6 * var, "{} vs {}", s.variance(), var);
        // Starting far from the mean loses no more than that.
        let mut m = Moments::default();
        m.push(0.0);
        xs.iter().for_each(|&x| m.push(x));
        let all: Vec<f64> = std::iter::once(0.0).chain(xs.iter().copied()).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / all.len() as f64;
        assert!((m.stats().variance() - var).abs() < 1e-6 * var);
    }

    /// A uniform distribution on [0, 1): mean 1/2, variance 1/12 in closed
    /// form; PSI 0 against its own quartiles and the closed form of
    /// `(a − e) ln(a / e)` against shifted bins.
    #[test]
    fn uniform_closed_forms_and_psi() {
        let n = 100_000;
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 + 0.5) / n as f32).collect();
        let spec = MonitorSpec {
            tensor: "x".into(),
            axis: None,
            features: vec![FeatureSpec {
                name: Some("u".into()),
                range: Some([0.0, 0.5]),
                bins: vec![0.25, 0.5, 0.75],
                expected: vec![0.25; 4],
            }],
        };
        let meta = TensorMeta { name: "x".into(), datatype: Datatype::F32, shape: vec![-1, 1] };
        let m =
            Monitor::new(std::slice::from_ref(&spec), std::slice::from_ref(&meta), &[]).unwrap();
        let t = Tensor { name: "x".into(), shape: vec![n, 1], data: Data::F32(xs) };
        m.observe(std::slice::from_ref(&t), &[]);
        let s = &m.inputs[0].snapshot()[0];
        assert_eq!(s.name, "u");
        assert!((s.stats.mean - 0.5).abs() < 1e-6);
        assert!((s.stats.variance() - 1.0 / 12.0).abs() < 1e-6);
        assert_eq!(s.out_of_range, (n / 2) as u64);
        assert!(s.psi.unwrap().abs() < 1e-12, "{:?}", s.psi);

        // Expected shares 0.1, 0.2, 0.3, 0.4 against an actual 0.25 each.
        let mut shifted = spec;
        shifted.features[0].expected = vec![0.1, 0.2, 0.3, 0.4];
        let m = Monitor::new(&[shifted], &[meta], &[]).unwrap();
        m.observe(&[t], &[]);
        let want: f64 = [0.1f64, 0.2, 0.3, 0.4].iter().map(|e| (0.25 - e) * (0.25 / e).ln()).sum();
        let got = m.inputs[0].snapshot()[0].psi.unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!((want - 0.2282).abs() < 1e-3, "closed form {want}");
    }

    /// Features along an axis: each column of a [N, 3] batch is its own
    /// feature; NaN is counted apart.
    #[test]
    fn features_by_axis_and_nonfinite() {
        let meta = TensorMeta { name: "x".into(), datatype: Datatype::F32, shape: vec![-1, 3] };
        let m = Monitor::new(&[], &[meta], &[]).unwrap();
        let data = vec![1.0, 10.0, 100.0, 3.0, 30.0, f32::NAN];
        m.observe(&[Tensor { name: "x".into(), shape: vec![2, 3], data: Data::F32(data) }], &[]);
        let s = m.inputs[0].snapshot();
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].stats.mean, s[1].stats.mean, s[2].stats.mean), (2.0, 20.0, 100.0));
        assert_eq!((s[0].stats.variance(), s[1].stats.variance()), (1.0, 100.0));
        assert_eq!((s[2].stats.count, s[2].nonfinite), (1, 1));
        // A request of another width is not counted against these features.
        m.observe(
            &[Tensor { name: "x".into(), shape: vec![1, 2], data: Data::F32(vec![0.0; 2]) }],
            &[],
        );
        assert_eq!(m.inputs[0].snapshot()[0].stats.count, 2);
    }

    #[test]
    fn declared_features_must_fit_the_model() {
        let meta = TensorMeta { name: "x".into(), datatype: Datatype::F32, shape: vec![-1, 3] };
        let spec = |n: usize, tensor: &str| MonitorSpec {
            tensor: tensor.into(),
            axis: None,
            features: vec![FeatureSpec::default(); n],
        };
        let e = Monitor::new(&[spec(2, "x")], std::slice::from_ref(&meta), &[]).unwrap_err();
        assert!(e.contains("lists 2 features"), "{e}");
        let e = Monitor::new(&[spec(3, "y")], &[meta], &[]).unwrap_err();
        assert!(e.contains("\"y\""), "{e}");
    }

    #[test]
    fn latency_quantiles_within_a_bucket() {
        let l = Latency::default();
        assert_eq!(l.quantile(0.99), None);
        for i in 1..=1000 {
            l.record(i as f64 * 1e-4);
        }
        let p99 = l.quantile(0.99).unwrap();
        assert!((0.099..0.099 * 1.19 + 1e-9).contains(&p99), "{p99}");
        let p50 = l.quantile(0.5).unwrap();
        assert!((0.05..0.05 * 1.19 + 1e-9).contains(&p50), "{p50}");
    }
}
