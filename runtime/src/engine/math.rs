//! `exp` and `erf` for the engine's elementwise loops, written without branches or calls
//! so a loop over a slice compiles to vector instructions (the C library's `expf` and
//! `erff` are one call per element: 30 % of the transformer's time went to them).
//!
//! Accuracy, checked against `f64` in the tests: `exp` within 2e-7 relative (and 0
//! below 2.2e-38), `erf` within 3e-7 absolute and 6e-7 relative (a Taylor series below
//! 0.5, where the relative error of the other formula would grow).

use std::f32::consts::LOG2_E;

/// Above this `exp` is infinite in `f32`.
const EXP_MAX: f32 = 88.722_83;
/// Below this `exp` gives 0: `2^n` is built for normal exponents only (true results
/// there are below 2.2e-38).
const EXP_MIN: f32 = -86.6;

/// `e^x`: `2^n e^r` with `n = round(x log2 e)` and Cephes' polynomial for `e^r`.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // Rounds to the nearest integer by adding and taking off 1.5 * 2^23. A NaN stays NaN
    // through `clamp` and the polynomial (and `as` turns it into 0, not undefined).
    let v = x.clamp(EXP_MIN, EXP_MAX);
    let shifted = v * LOG2_E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    // ln 2 in two parts, so `r` keeps its low bits.
    let r = v - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n as 2^(n - 1) * 2, so n = 128 (x near EXP_MAX) stays finite. The integer n is
    // in the low bits of `shifted` (1.5 * 2^23 + n): integer arithmetic on its bits, not
    // a float-to-int conversion, which does not vectorize. With `v` clamped, n + 126 is
    // 1 to 254, a normal exponent (a NaN gives some finite scale; `y` keeps it NaN).
    let n_plus_126 = shifted.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(126);
    let scale = f32::from_bits(n_plus_126 << 23);
    let e = y * scale * 2.0;
    if x > EXP_MAX {
        f32::INFINITY
    } else if x < EXP_MIN {
        0.0
    } else {
        e
    }
}

/// The error function. Below 0.5 in magnitude its Taylor series to `x^11` (error below
/// 2e-8); above, Abramowitz and Stegun's 7.1.26 (error below 1.5e-7).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let x2 = x * x;
    let series = -8.548_327e-4;
    let series = series * x2 + 5.223_977_6e-3;
    let series = series * x2 - 2.686_617e-2;
    let series = series * x2 + 1.128_379_2e-1;
    let series = series * x2 - 3.761_263_9e-1;
    let series = series * x2 + std::f32::consts::FRAC_2_SQRT_PI;
    let small = x * series;
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let q = 1.061_405_4;
    let q = q * t - 1.453_152;
    let q = q * t + 1.421_413_8;
    let q = q * t - 2.844_967_4e-1;
    let q = q * t + 2.548_296e-1;
    let large = (1.0 - q * t * exp(-x2)).copysign(x);
    if a < 0.5 {
        small
    } else {
        large
    }
}

/// An elementwise function [`map`] applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Func {
    Exp,
    Erf,
    Sigmoid,
    /// `x / 2 (1 + erf(x / sqrt 2))`.
    Gelu,
}

/// `out[i] = func(from[i])` over the shorter of the two, compiled for the CPU's vector
/// width.
pub(crate) fn map(func: Func, out: &mut [f32], from: &[f32]) {
    pulp::Arch::new().dispatch(Map { func, out, from });
}

struct Map<'a> {
    func: Func,
    out: &'a mut [f32],
    from: &'a [f32],
}

impl pulp::WithSimd for Map<'_> {
    type Output = ();

    // Inlined into pulp's per-ISA entry points, the function chosen outside the loop so
    // each loop vectorizes.
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let pairs = self.out.iter_mut().zip(self.from);
        match self.func {
            Func::Exp => pairs.for_each(|(o, &v)| *o = exp(v)),
            Func::Erf => pairs.for_each(|(o, &v)| *o = erf(v)),
            Func::Sigmoid => pairs.for_each(|(o, &v)| *o = 1.0 / (1.0 + exp(-v))),
            Func::Gelu => pairs.for_each(|(o, &v)| {
                *o = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2))
            }),
        }
    }
}

/// Softmax (or log-softmax when `log`) of each run of `len` values in `values`, in place:
/// all rows in one pass compiled for the CPU's vector width.
pub(crate) fn softmax_rows(values: &mut [f32], len: usize, log: bool) {
    pulp::Arch::new().dispatch(SoftmaxRows { values, len, log });
}

struct SoftmaxRows<'a> {
    values: &'a mut [f32],
    len: usize,
    log: bool,
}

impl pulp::WithSimd for SoftmaxRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let SoftmaxRows { values, len, log } = self;
        for row in values.chunks_exact_mut(len.max(1)) {
            let max = lane_max(row);
            if log {
                // The sum of the exponentials without keeping them.
                let sum = lane_sum_of(row, |v| exp(v - max));
                let shift = max + sum.ln();
                row.iter_mut().for_each(|v| *v -= shift);
            } else {
                row.iter_mut().for_each(|v| *v = exp(*v - max));
                let sum = lane_sum_of(row, |v| v);
                row.iter_mut().for_each(|v| *v /= sum);
            }
        }
    }
}

/// Layer normalization of each run of `gamma.len()` values in `values`, in place: `(v -
/// mean) / sqrt(var + epsilon) * gamma + beta`. Returns each row's mean and inverse
/// standard deviation. All rows in one pass compiled for the CPU's vector width.
pub(crate) fn layer_norm_rows(
    values: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
) -> (Vec<f32>, Vec<f32>) {
    pulp::Arch::new().dispatch(LayerNormRows { values, gamma, beta, epsilon })
}

struct LayerNormRows<'a> {
    values: &'a mut [f32],
    gamma: &'a [f32],
    beta: &'a [f32],
    epsilon: f32,
}

impl pulp::WithSimd for LayerNormRows<'_> {
    type Output = (Vec<f32>, Vec<f32>);

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Self::Output {
        let LayerNormRows { values, gamma, beta, epsilon } = self;
        let len = gamma.len().max(1);
        let rows = values.len() / len;
        let (mut means, mut invs) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for row in values.chunks_exact_mut(len) {
            let mean = lane_sum_of(row, |v| v) / len as f32;
            let var = lane_sum_of(row, |v| (v - mean) * (v - mean)) / len as f32;
            let inv = 1.0 / (var + epsilon).sqrt();
            for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *v = (*v - mean) * inv * g + b;
            }
            means.push(mean);
            invs.push(inv);
        }
        (means, invs)
    }
}

/// The largest of `values` (NaNs ignored, as `f32::max` does; -inf when empty), in
/// sixteen lanes so the comparisons vectorize.
#[inline(always)]
fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        lanes.iter_mut().zip(chunk).for_each(|(m, &v)| *m = m.max(v));
    }
    let rest = chunks.remainder().iter().copied();
    lanes.into_iter().chain(rest).fold(f32::NEG_INFINITY, f32::max)
}

/// The sum of `f(v)` over `values`, in sixteen running sums so the additions vectorize
/// (their order differs from a plain left-to-right sum only by rounding).
#[inline(always)]
fn lane_sum_of(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut sums = [0f32; 16];
    let mut chunks = values.chunks_exact(16);
    for chunk in &mut chunks {
        sums.iter_mut().zip(chunk).for_each(|(s, &v)| *s += f(v));
    }
    sums.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> impl Iterator<Item = f32> {
        (-200_000..=200_000).map(|i| i as f32 * 5e-4)
    }

    #[test]
    fn exp_is_within_2e_7_relative() {
        let mut worst = 0f64;
        for x in inputs().map(|x| x * 8.0).filter(|x| (EXP_MIN..=EXP_MAX).contains(x)) {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
    }

    #[test]
    fn exp_at_the_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(88.7).is_finite() && exp(88.7) > 3.3e38);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(-86.5) > 2e-38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_3e_7_absolute_and_6e_7_relative() {
        let (mut abs, mut rel) = (0f64, 0f64);
        for x in inputs().map(|x| x / 10.0) {
            let want = libm::erf(x as f64);
            let err = (erf(x) as f64 - want).abs();
            abs = abs.max(err);
            if want != 0.0 {
                rel = rel.max(err / want.abs());
            }
        }
        assert!(abs < 3e-7 && rel < 6e-7, "worst errors: absolute {abs:e}, relative {rel:e}");
    }

    #[test]
    fn erf_at_the_edges() {
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
        assert_eq!(erf(1e-30), std::f32::consts::FRAC_2_SQRT_PI * 1e-30);
    }

    #[test]
    fn map_and_the_softmax_sum_agree_with_scalar_code() {
        let from: Vec<f32> = (0..37).map(|i| i as f32 * 0.37 - 6.0).collect();
        let mut out = vec![0f32; from.len()];
        for (func, want) in [
            (Func::Exp, (|v: f32| exp(v)) as fn(f32) -> f32),
            (Func::Erf, erf),
            (Func::Sigmoid, |v| 1.0 / (1.0 + (-v).exp())),
            (Func::Gelu, |v| 0.5 * v * (1.0 + libm::erff(v / 2f32.sqrt()))),
        ] {
            map(func, &mut out, &from);
            for (o, &v) in out.iter().zip(&from) {
                assert!((o - want(v)).abs() <= 1e-6 * (1.0 + want(v).abs()), "{func:?}({v})");
            }
        }
    }

    #[test]
    fn softmax_rows_match_f64() {
        // Rows of 37: two vectors of lanes and a remainder.
        let len = 37;
        let from: Vec<f32> = (0..3 * len).map(|i| ((i * 29) % 41) as f32 * 0.37 - 6.0).collect();
        for log in [false, true] {
            let mut got = from.clone();
            softmax_rows(&mut got, len, log);
            for (row, want_row) in got.chunks(len).zip(from.chunks(len)) {
                let max = want_row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let sum: f64 = want_row.iter().map(|&v| (v as f64 - max).exp()).sum();
                for (&g, &v) in row.iter().zip(want_row) {
                    let want =
                        if log { v as f64 - max - sum.ln() } else { (v as f64 - max).exp() / sum };
                    assert!((g as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{g} vs {want}");
                }
            }
        }
    }
}
