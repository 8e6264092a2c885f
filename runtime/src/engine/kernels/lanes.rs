//! The products of deep convolutions, output channels along the vector lanes.
//!
//! ResNet's 256- and 512-channel 3x3 layers sum 2304 or 4608 inputs for each output, on
//! maps of 14x14 and 7x7. Output positions along the lanes ([`super::TileProduct`]) waste
//! lanes on such maps: a 7x7 map read from its padded phases has rows 9 apart, 61
//! columns computed in 4 vectors of 16 for 49 outputs. Output channels along the lanes
//! waste none (these layers have whole panels of them), and each step broadcasts 5 or 6
//! positions, unfolded with no gaps between rows. The gemm crate ran these layers before
//! (one thread, AVX2, lowest of 15 alternations): 512 channels on 7x7 3.37 -> 2.86 ms,
//! 256 on 14x14 2.75 -> 2.51, 256 -> 512 at stride 2 1.72 -> 1.38.
//!
//! A tile's product runs in passes of [`DEPTH`] rows of its unfolded input: each pass
//! unfolds those rows for the tile's positions, and each panel of weights goes over them
//! in groups of at most [`POSITIONS`] positions, the first pass writing the sums and the
//! others adding to them. The sums of a panel lie together, `positions x panel`: with
//! each position's row of all the tile's channels (512 floats, 2 KiB apart), a block's 6
//! rows fell in two cache sets and the 7x7 layer took 3.3 ms. [`to_rows`] then writes
//! them as the output's rows.

use std::mem::MaybeUninit;

use pulp::Simd;

use super::super::panels::{self, Dst, Operands};
use super::Source;

/// Output channels per panel of the weights these products read: one block's channels
/// (4 vectors where [`panels::four_wide`], else 2), so a pass reads a block's weights as
/// one run. Laid out as 4 vectors of 64 channels, each row of a panel 256 bytes apart, a
/// block's reads missed the caches: ResNet's 512-channel 7x7 layer took 3.3 ms (at one
/// thread, on AVX2), against 2.7 in panels of 16.
pub(super) fn panel() -> usize {
    struct Width;
    impl pulp::WithSimd for Width {
        type Output = usize;
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) -> usize {
            panel_in::<S>()
        }
    }
    pulp::Arch::new().dispatch(Width)
}

/// [`panel`] within code compiled for `S`.
#[inline(always)]
fn panel_in<S: Simd>() -> usize {
    S::F32_LANES * if panels::four_wide::<S>() { 4 } else { 2 }
}

/// Input rows per pass: 96 rows of a 7x7 map are 18 KiB, and stay in L1 beside a
/// block's weights (6 KiB on AVX2). Passes of 64 rows ran ResNet's 512-channel 7x7 layer
/// in 2.80 ms, of 128 in 2.90, of 96 in 2.68-2.86 (lowest of 15 alternations; 256 -> 256
/// channels on 14x14: 2.59, 2.64, 2.53).
const DEPTH: usize = 96;

/// The most positions of one group of a pass, so a pass's rows of a group stay in L2
/// (96 KiB). ResNet's maps have fewer: groups of 48 ran its layers no faster.
const POSITIONS: usize = 256;

/// The most positions one step of a product broadcasts (its block's rows).
const STEP: usize = panels::ROWS;

/// The shallowest products (inputs summed for each output) that run here. Alternating
/// with output positions along the lanes ([`super::TileProduct`]) on one thread, lowest
/// of 15: 3 -> 64 channels 7x7/2 on 224x224 (147 deep) 3.55 against 2.91 ms, 16 -> 32 on
/// 16x16 (144) 0.036 against 0.034; 32 -> 64 on 8x8 (288) 0.033 against 0.037, ResNet's
/// 64 -> 128 3x3/2 (576) 1.38 against 1.44 and 128 -> 256 (1152) 1.34 against 1.45.
const MIN_DEPTH: usize = 256;

/// Whether a convolution of `mg` output channels per group summing `k` inputs for each
/// output, with a kernel of several taps, runs here: one deeper than [`MIN_DEPTH`] with
/// whole panels of output channels.
pub(super) fn fits(k: usize, mg: usize) -> bool {
    k > MIN_DEPTH && mg.is_multiple_of(panel())
}

/// `n` split into the fewest nearly equal parts of at most `most`: the start and length
/// of each, in order.
fn even_parts(n: usize, most: usize) -> impl Iterator<Item = (usize, usize)> {
    let parts = n.div_ceil(most.max(1)).max(1);
    (0..parts).map(move |i| {
        let start = n * i / parts;
        (start, n * (i + 1) / parts - start)
    })
}

/// One tile's product, from its unfolded input to `dst`.
pub(super) struct LanesProduct<'a> {
    /// Where the tile's input is unfolded from.
    pub source: &'a Source<'a>,
    /// The tile's first input plane (of its image and group).
    pub first_plane: usize,
    /// The tile's first output row, how many it has, and outputs per row.
    pub first_row: usize,
    pub rows: usize,
    pub width: usize,
    /// The group's weights: `k` rows of its `mg` channels, in panels of [`panel`]
    /// channels (see [`super::pack_weights`]).
    pub weights: &'a [f32],
    pub mg: usize,
    pub k: usize,
    /// The tile's channels of the group: `first ..`, a multiple of [`panel`], as many as
    /// `dst` has columns.
    pub first: usize,
    /// The tile's channels in blocks of a panel, each `rows * width` positions by the
    /// panel's channels: all written.
    pub dst: &'a mut [MaybeUninit<f32>],
    /// One pass's unfolded input.
    pub unfolded: &'a mut Vec<f32>,
}

impl pulp::WithSimd for LanesProduct<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(mut self, simd: S) {
        let positions = self.rows * self.width;
        let channels = self.dst.len() / positions.max(1);
        let panel = panel_in::<S>();
        assert!(
            self.first.is_multiple_of(panel)
                && channels.is_multiple_of(panel)
                && self.first + channels <= self.mg
                && self.mg.is_multiple_of(panel)
                && self.weights.len() >= self.mg * self.k,
            "a lanes product's channels are not whole panels of its weights"
        );
        let dst = self.dst.as_mut_ptr().cast::<f32>();
        for (k0, depth) in even_parts(self.k, DEPTH) {
            self.unfold::<S>(k0, depth);
            for (p0, group) in even_parts(positions, POSITIONS) {
                for start in (self.first..self.first + channels).step_by(panel) {
                    let ops = Operands {
                        a: &self.weights[start * self.k + k0 * panel..][..depth * panel],
                        a_stride: panel,
                        a_rows: None,
                        b: &self.unfolded[p0..],
                        b_stride: positions,
                        b_step: 1,
                        depth,
                    };
                    let block = Dst {
                        // SAFETY: position `p0` of the panel's `positions x panel` block of
                        // `dst`, within it.
                        ptr: unsafe { dst.add((start - self.first) * positions + p0 * panel) },
                        stride: panel,
                        accumulate: k0 > 0,
                    };
                    if panels::four_wide::<S>() {
                        steps::<S, 4>(simd, ops, group, block);
                    } else {
                        steps::<S, 2>(simd, ops, group, block);
                    }
                }
            }
        }
    }
}

impl LanesProduct<'_> {
    /// Rows `k0 .. k0 + depth` of the tile's unfolded input, positions in order with no
    /// gaps, into `unfolded`. Each output row's run is moved in whole vectors, the last
    /// reaching past it (into the next run, written after it, or the slack kept after the
    /// last): a copy call per run of 7 floats took a quarter of the time of ResNet's
    /// 512-channel layers.
    #[inline(always)]
    fn unfold<S: Simd>(&mut self, k0: usize, depth: usize) {
        let (lanes, source) = (S::F32_LANES, self.source);
        let (pw, taps) = (source.phase_width, source.taps.len());
        let vectors = self.width.div_ceil(lanes);
        let len = depth * self.rows * self.width;
        self.unfolded.clear();
        self.unfolded.reserve(len + lanes);
        let row_start = |r: usize| {
            let plane = self.first_plane + r / taps;
            plane * source.plane_len + self.first_row * pw + source.taps[r % taps]
        };
        // Every read below is from a run's start to at most `vectors * lanes` floats on.
        let last = row_start(k0 + depth - 1) + (self.rows - 1) * pw + vectors * lanes;
        assert!(last <= source.planes.len(), "a lanes product unfolds past its input");
        let (src, dst) = (source.planes.as_ptr(), self.unfolded.as_mut_ptr());
        let mut at = 0;
        for r in k0..k0 + depth {
            let base = row_start(r);
            for row in 0..self.rows {
                let from = base + row * pw;
                for v in 0..vectors {
                    // SAFETY: `from + (v + 1) * lanes <= last <= planes.len()` (checked
                    // above), and `at + (v + 1) * lanes <= len + lanes`, the capacity.
                    unsafe {
                        let x = src.add(from + v * lanes).cast::<S::f32s>().read_unaligned();
                        dst.add(at + v * lanes).cast::<S::f32s>().write_unaligned(x);
                    }
                }
                at += self.width;
            }
        }
        // SAFETY: the runs wrote every one of the `len` floats.
        unsafe { self.unfolded.set_len(len) };
    }
}

/// A panel's channels (`MR` vectors), for a group's `positions`, in nearly equal steps
/// of at most [`STEP`].
#[inline(always)]
fn steps<S: Simd, const MR: usize>(simd: S, ops: Operands<'_>, positions: usize, dst: Dst) {
    for (p, nr) in even_parts(positions, STEP) {
        // SAFETY: `dst` is the group's first position in its panel's `positions x panel`
        // block of the tile's product, which this call borrows mutably; the block's rows
        // are the group's positions and its columns the panel's channels. When
        // `accumulate`, the pass before wrote them.
        unsafe { panels::block_rows::<S, MR>(simd, ops, (0, p), nr, dst) };
    }
}

/// Writes a lanes product (`channels / panel` blocks of `positions x panel`, see
/// [`LanesProduct`]) as `channels` rows of `positions`, `stride` apart, from `rows` on.
///
/// # Safety
///
/// `rows` must be valid for writes of `channels` rows of `positions` floats, `stride`
/// apart, that nothing else touches during the call.
pub(super) unsafe fn to_rows(product: &[f32], positions: usize, rows: *mut f32, stride: usize) {
    let panel = panel();
    #[cfg(target_arch = "x86_64")]
    if super::blocked::runs_here() {
        // A vector's channels at a time by transposes (a panel is whole vectors): one
        // float at a time, this move took 1.6% of resnet18 at one thread on an AVX-512 CPU.
        let lanes = super::blocked::lanes();
        for (first, block) in product.chunks_exact(positions * panel).enumerate() {
            for group in (0..panel).step_by(lanes) {
                // SAFETY: the blocks run here; `block` holds `positions` vectors of the
                // panel's channels, `panel` apart, of which these are lanes `group ..
                // group + lanes` (a panel is whole vectors); rows `first * panel + group`
                // on are the caller's (the contract).
                unsafe {
                    super::blocked::vectors_to_rows(
                        block[group..].as_ptr(),
                        panel,
                        positions,
                        rows.add((first * panel + group) * stride),
                        stride,
                        lanes,
                    )
                };
            }
        }
        return;
    }
    for (first, block) in product.chunks_exact(positions * panel).enumerate() {
        for (p, values) in block.chunks_exact(panel).enumerate() {
            for (c, &v) in values.iter().enumerate() {
                // SAFETY: row `first * panel + c < channels`, column `p < positions`.
                unsafe { rows.add((first * panel + c) * stride + p).write(v) };
            }
        }
    }
}
