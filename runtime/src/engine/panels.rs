//! Register-blocked matrix products for the convolutions, on operands laid out for them.
//!
//! A product `dst[j][i] = Σ_r a[r][i] · b[r][j]` is computed in blocks of `MR` vectors of
//! columns `i` by `NR` rows `j`: up to 24 accumulators stay in registers through the sum
//! over `r`, and each step loads `MR` vectors of a row of `a` and broadcasts `NR` values of
//! a row of `b`. Both operands are read as they lie, so whoever calls lays them out for
//! this once: weights at load time, in panels ([`pack`]), inputs as they are unfolded or
//! transformed.
//!
//! - The unfolded convolution (`kernels.rs`) runs output positions along the lanes: `a` is
//!   the unfolded input, `b` the weights in panels of [`ROWS`] output channels, and each
//!   row of `dst` is a row of an output plane.
//! - The lanes products of deep convolutions (`kernels/lanes.rs`) run output channels
//!   along the lanes: `a` is the weights in panels of one block's channels, `b` the
//!   unfolded input, and each row of `dst` one position's sums for a panel.
//! - The Winograd products (`winograd.rs`) run output channels along the lanes: `a` is the
//!   transformed weights in panels of 64 channels, `b` the transformed input.

use pulp::Simd;

/// The most rows of `dst` one block computes: with 4 vectors of columns, 24 accumulators
/// of the 32 vector registers AVX-512 has.
pub(crate) const ROWS: usize = 6;

/// Whether blocks of 4 vectors of columns fit the CPU's registers: their 24 accumulators
/// need the 32 vector registers of AVX-512 and of aarch64. x86 without AVX-512 has 16, and
/// there a block is at most 2 vectors wide (12 accumulators, [`ROWS`] rows of 2): blocks
/// 4 wide spilled accumulators to the stack on every step, and the cnn's 16 -> 32 channel
/// 3x3 layer ran at 15 GMAC/s on an AVX2 CPU.
#[inline(always)]
pub(crate) fn four_wide<S: Simd>() -> bool {
    !cfg!(target_arch = "x86_64") || S::F32_LANES >= 16
}

/// Where element (`row`, `col`) of a `depth x cols` matrix sits when it is laid out in
/// panels of `width` columns: each panel is `depth` rows of its width (the last may be
/// narrower), one panel after the other.
pub(crate) fn panel_index(
    row: usize,
    col: usize,
    depth: usize,
    cols: usize,
    width: usize,
) -> usize {
    let start = col / width * width;
    let panel_width = width.min(cols - start);
    start * depth + row * panel_width + (col - start)
}

/// Lays out `weights` (`cols` rows of `depth`: one row per output channel, as ONNX
/// stores a group's convolution weights) as the panels of their transpose, `width`
/// columns (output channels) each: the `b` operand of a product whose rows are channels.
pub(crate) fn pack(weights: &[f32], cols: usize, depth: usize, width: usize) -> Vec<f32> {
    let mut packed = vec![0f32; cols * depth];
    for (col, row) in weights.chunks_exact(depth.max(1)).take(cols).enumerate() {
        for (r, &v) in row.iter().enumerate() {
            packed[panel_index(r, col, depth, cols, width)] = v;
        }
    }
    packed
}

/// The operands of a product, from its first row on.
#[derive(Clone, Copy)]
pub(crate) struct Operands<'a> {
    /// Element (`r`, `i`) at `a[r * a_stride + i]`, or at `a[a_rows.starts[r] + i]` when
    /// the rows are listed (a convolution's input rows, read where they lie in the input).
    pub a: &'a [f32],
    pub a_stride: usize,
    pub a_rows: Option<ListedRows<'a>>,
    /// Element (`r`, `j`) at `b[r * b_stride + j * b_step]`.
    pub b: &'a [f32],
    pub b_stride: usize,
    pub b_step: usize,
    /// Rows summed over.
    pub depth: usize,
}

/// Where the rows of a product's `a` start, when they are listed.
#[derive(Clone, Copy)]
pub(crate) struct ListedRows<'a> {
    pub starts: &'a [usize],
    /// The largest of `starts` (or more), so [`block`] checks its reads once, not on
    /// every row.
    pub reach: usize,
}

/// Where a product's sums go: element (`j`, `i`) at `ptr + j * stride + i`, added to
/// what is there when `accumulate`.
#[derive(Clone, Copy)]
pub(crate) struct Dst {
    pub ptr: *mut f32,
    pub stride: usize,
    pub accumulate: bool,
}

/// The block of `dst` at columns `i .. i + MR * lanes` and rows `j .. j + NR`, summed
/// over all `depth` rows of the operands.
///
/// # Panics
///
/// If the block reaches past the end of `a` or `b`.
///
/// # Safety
///
/// `dst` must be valid for the block's elements, which nothing else touches during the
/// call; when `accumulate`, they must have been written. With `a_rows`, none of the
/// first `depth` starts may be over its `reach`.
#[inline(always)]
pub(crate) unsafe fn block<S: Simd, const MR: usize, const NR: usize>(
    simd: S,
    ops: Operands<'_>,
    (i, j): (usize, usize),
    dst: Dst,
) {
    let lanes = S::F32_LANES;
    let width = MR * lanes;
    let mut acc = [[simd.splat_f32s(0.0); MR]; NR];
    if dst.accumulate {
        for (row, acc) in acc.iter_mut().enumerate() {
            // SAFETY: the block's elements of `dst` are valid and written (the contract).
            let at = unsafe { dst.ptr.add((j + row) * dst.stride + i) };
            for (v, a) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                *a = unsafe { at.add(v * lanes).cast::<S::f32s>().read_unaligned() };
            }
        }
    }
    // Every read of the operands is checked once, here, and the steps run on pointers:
    // with bounds checks in each step, AVX2's 12 multiply-adds were about a third of the
    // step's instructions.
    let b_first = j * ops.b_step;
    let b_span = (NR - 1) * ops.b_step + 1;
    if ops.depth == 0 {
        // Nothing to sum: the block is stored as it is.
    } else {
        let b_end = b_first + (ops.depth - 1) * ops.b_stride + b_span;
        let a_reach = match ops.a_rows {
            Some(rows) => rows.reach,
            None => (ops.depth - 1) * ops.a_stride,
        };
        assert!(
            b_end <= ops.b.len() && a_reach + i + width <= ops.a.len(),
            "a block reaches past its operands"
        );
    }
    let (a, b) = (ops.a.as_ptr(), ops.b[b_first.min(ops.b.len())..].as_ptr());
    match ops.a_rows {
        Some(rows) => {
            for (r, &at) in rows.starts[..ops.depth].iter().enumerate() {
                // SAFETY: `at <= reach`, so `at + i + width <= a.len()`, and `r * b_stride
                // + b_span <= b.len() - b_first` (checked above; `reach` by the contract).
                unsafe { step(simd, &mut acc, a.add(at + i), b.add(r * ops.b_stride), ops.b_step) };
            }
        }
        None => {
            for r in 0..ops.depth {
                let (a_at, b_at) = (r * ops.a_stride + i, r * ops.b_stride);
                // SAFETY: `a_at + width <= a.len()` and `b_at + b_span <= b.len() -
                // b_first` (checked above).
                unsafe { step(simd, &mut acc, a.add(a_at), b.add(b_at), ops.b_step) };
            }
        }
    }
    for (row, acc) in acc.iter().enumerate() {
        // SAFETY: the block's elements of `dst` are valid for writes (the contract).
        let at = unsafe { dst.ptr.add((j + row) * dst.stride + i) };
        for (v, a) in acc.iter().enumerate() {
            // SAFETY: as above.
            unsafe { at.add(v * lanes).cast::<S::f32s>().write_unaligned(*a) };
        }
    }
}

/// One step of [`block`]'s sum: `MR` vectors from `a`, times each of `NR` values from
/// `b` (`b_step` apart), added to the accumulators.
///
/// A function, not a closure: a closure is compiled without the target features of the
/// SIMD function it sits in unless it is inlined, and when it was not (in the library's
/// test build), every multiply-add became a call and the products ran 20 times slower.
///
/// # Safety
///
/// `a` must be valid for `MR` vectors' reads, and `b` for `(NR - 1) * b_step + 1` floats.
#[inline(always)]
unsafe fn step<S: Simd, const MR: usize, const NR: usize>(
    simd: S,
    acc: &mut [[S::f32s; MR]; NR],
    a: *const f32,
    b: *const f32,
    b_step: usize,
) {
    let mut vectors = [simd.splat_f32s(0.0); MR];
    for (v, x) in vectors.iter_mut().enumerate() {
        // SAFETY: within `a`'s `MR` vectors (the contract).
        *x = unsafe { a.add(v * S::F32_LANES).cast::<S::f32s>().read_unaligned() };
    }
    for (row, acc) in acc.iter_mut().enumerate() {
        // SAFETY: within `b`'s floats (the contract).
        let x = simd.splat_f32s(unsafe { *b.add(row * b_step) });
        for (a, &v) in acc.iter_mut().zip(&vectors) {
            *a = simd.mul_add_e_f32s(v, x, *a);
        }
    }
}

/// [`block`] with `nr` (1 to [`ROWS`]) rows chosen at run time.
///
/// # Safety
///
/// As for [`block`].
#[inline(always)]
pub(crate) unsafe fn block_rows<S: Simd, const MR: usize>(
    simd: S,
    ops: Operands<'_>,
    at: (usize, usize),
    nr: usize,
    dst: Dst,
) {
    // SAFETY: passed on from the caller.
    unsafe {
        match nr {
            6 => block::<S, MR, 6>(simd, ops, at, dst),
            5 => block::<S, MR, 5>(simd, ops, at, dst),
            4 => block::<S, MR, 4>(simd, ops, at, dst),
            3 => block::<S, MR, 3>(simd, ops, at, dst),
            2 => block::<S, MR, 2>(simd, ops, at, dst),
            1 => block::<S, MR, 1>(simd, ops, at, dst),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulp::WithSimd;

    #[test]
    fn panels_hold_every_element_once() {
        let (depth, cols, width) = (5, 14, 6);
        let mut seen = vec![false; depth * cols];
        for r in 0..depth {
            for c in 0..cols {
                let at = panel_index(r, c, depth, cols, width);
                assert!(!seen[at], "({r}, {c}) lands on a taken slot");
                seen[at] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        // The last panel is 2 wide: row 1 of it starts 2 after row 0.
        assert_eq!(
            panel_index(1, 12, depth, cols, width) - panel_index(0, 12, depth, cols, width),
            2
        );
    }

    /// Every block shape, plain and accumulating, against a scalar sum.
    #[test]
    fn blocks_match_the_scalar_product() {
        struct Run;
        impl pulp::WithSimd for Run {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: Simd>(self, simd: S) {
                let lanes = S::F32_LANES;
                let (depth, cols, rows) = (7, 7 * lanes, ROWS);
                let a: Vec<f32> = (0..depth * cols).map(|v| ((v * 7) % 13) as f32 - 6.0).collect();
                // `b` read with a step of 2, as the Winograd products read their input.
                let b_stride = 2 * rows + 1;
                let b: Vec<f32> =
                    (0..depth * b_stride).map(|v| ((v * 5) % 11) as f32 * 0.5).collect();
                let ops = Operands {
                    a: &a,
                    a_stride: cols,
                    a_rows: None,
                    b: &b,
                    b_stride,
                    b_step: 2,
                    depth,
                };
                let want = |j: usize, i: usize| -> f32 {
                    (0..depth).map(|r| a[r * cols + i] * b[r * b_stride + 2 * j]).sum()
                };
                for accumulate in [false, true] {
                    let mut dst = vec![1f32; rows * cols];
                    let d = Dst { ptr: dst.as_mut_ptr(), stride: cols, accumulate };
                    // SAFETY: `dst` holds `rows x cols` written floats, and the blocks
                    // below cover each of them once.
                    unsafe {
                        block_rows::<S, 4>(simd, ops, (0, 0), rows, d);
                        block_rows::<S, 2>(simd, ops, (4 * lanes, 0), rows, d);
                        block_rows::<S, 1>(simd, ops, (6 * lanes, 0), 3, d);
                        block_rows::<S, 1>(simd, ops, (6 * lanes, 3), 3, d);
                    }
                    let base = if accumulate { 1.0 } else { 0.0 };
                    for j in 0..rows {
                        for i in 0..cols {
                            let (got, want) = (dst[j * cols + i], base + want(j, i));
                            assert_eq!(got, want, "row {j}, column {i}, accumulate {accumulate}");
                        }
                    }
                }
            }
        }
        pulp::Arch::new().dispatch(Run);
        Run.with_simd(pulp::Scalar::new());
    }
}
