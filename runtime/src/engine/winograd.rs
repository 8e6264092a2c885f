//! 3x3 stride-1 convolutions by Winograd's minimal filtering, F(2x2, 3x3).
//!
//! Each 2x2 block of outputs ("tile") is computed from the 4x4 input patch under it as
//! `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`: 16 multiplies per input channel where the direct
//! convolution needs 36, so the 16 products, one per point of the transformed 4x4, are
//! 16 matrix products of (tiles x input channels) by (input channels x output channels)
//! with 2.25 times fewer multiply-adds than the unfolded convolution's one product.
//!
//! The weights are transformed once, at load time ([`transform_weights`]); the Conv
//! keeps only the transformed ones, which are 16/9 the size of the originals. The input
//! is transformed per request, a block of tile rows at a time so a block's transformed
//! input and products stay in the caches; each block's outputs are written with bias and
//! activation in the same pass as the output transform.
//!
//! All the transform coefficients are 0, ±1 and ±½, so the transforms round no more
//! than additions do: the results stay within the reference tests' 1e-4 of the direct
//! convolution (see `docs/decisions.md`, Winograd).

use std::mem::MaybeUninit;

use candle_core::{Device, Tensor};

use super::kernels::{self, Activation, ConvAttrs};
use super::ops::{OpError, R};
use super::panels;
use super::team::Team;

/// Points of the transformed 4x4 patch: one matrix product each.
const POINTS: usize = 16;

/// The fewest input and output channels a convolution needs for this path: with fewer,
/// the 16 products are too small for the transforms to pay off (cnn's 16 -> 32 channels
/// at 16x16 took 35 µs against 31 unfolded; its 32 -> 64 at 8x8, 22 against 31).
const MIN_CHANNELS: usize = 32;

/// The most input times output channels a convolution may have for this path. Its
/// transformed weights stay in memory at 16/9 the size of the originals. Allowing 256 x
/// 256 channels (ResNet's third stage too) left resnet18 as fast (1.30x onnxruntime's
/// time at one thread, 1.31x with this bound) but 18.8 MiB beyond the model at idle,
/// where the target is 15 (14.0 with this bound); at 512 x 512 (its last stage, 7x7
/// maps) the layer ran barely faster (1.8 against 2.0 ms) for 22 MiB more. Transforming
/// those weights per block instead of keeping them would lift this bound.
const MAX_CHANNEL_PAIRS: usize = 128 * 128;

/// About how many floats one block's transformed input and products take together, so
/// both stay in a core's L2 cache.
const BLOCK_FLOATS: usize = 1 << 18;

fn err(msg: impl Into<String>) -> OpError {
    OpError(msg.into())
}

/// Whether a Conv with these attributes and weight shape (`M x C x kh x kw`) runs here:
/// a 3x3 kernel, stride 1, no dilation, one group, and enough channels but not too many.
pub(crate) fn eligible(attrs: &ConvAttrs, weight_dims: &[usize]) -> bool {
    let ones = |v: &Option<Vec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&x| x == 1));
    matches!(weight_dims, &[m, c, 3, 3]
        if m >= MIN_CHANNELS && c >= MIN_CHANNELS && m * c <= MAX_CHANNEL_PAIRS)
        && attrs.group == 1
        && ones(&attrs.window.strides)
        && ones(&attrs.window.dilations)
        && attrs.window.kernel_shape.as_ref().is_none_or(|k| k == &[3, 3])
}

/// The transformed weights `U = G g Gᵀ` of an `M x C x 3 x 3` weight, as `16 x C x M`
/// floats: point `4 r + s` of every (input, output) channel pair, each point's `C x M`
/// matrix cut into panels of [`PANEL`] output channels (the last may be narrower), each
/// panel `C` rows of its width, one after the other. So a point's product streams
/// through each panel's weights in order.
pub(crate) fn transform_weights(w: &Tensor) -> R<Tensor> {
    let &[m, c, 3, 3] = w.dims() else {
        return Err(err(format!("expected a M x C x 3 x 3 weight, got {:?}", w.dims())));
    };
    let pairs = m * c;
    let mut u = vec![0f32; POINTS * pairs];
    kernels::with_f32(w, |ws| {
        for (pair, g) in ws.chunks_exact(9).enumerate().take(pairs) {
            // G g: the rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2.
            let row = |i: usize| [g[3 * i], g[3 * i + 1], g[3 * i + 2]];
            let (g0, g1, g2) = (row(0), row(1), row(2));
            let gg: [[f32; 3]; 4] = [
                g0,
                std::array::from_fn(|j| (g0[j] + g1[j] + g2[j]) * 0.5),
                std::array::from_fn(|j| (g0[j] - g1[j] + g2[j]) * 0.5),
                g2,
            ];
            // (G g) Gᵀ: the same combination of each row's three values.
            for (r, [a, b, z]) in gg.into_iter().enumerate() {
                let points = [a, (a + b + z) * 0.5, (a - b + z) * 0.5, z];
                for (s, v) in points.into_iter().enumerate() {
                    let (out_channel, in_channel) = (pair / c, pair % c);
                    u[(4 * r + s) * c * m + panel_index(out_channel, in_channel, c, m)] = v;
                }
            }
        }
        Ok(())
    })?;
    Ok(Tensor::from_vec(u, (POINTS, c, m), &Device::Cpu)?)
}

/// Output channels per panel of the transformed weights.
const PANEL: usize = 64;

/// Where the weight of (`out_channel`, `in_channel`) sits within one point's panels.
fn panel_index(out_channel: usize, in_channel: usize, c: usize, m: usize) -> usize {
    let start = out_channel / PANEL * PANEL;
    let width = PANEL.min(m - start);
    start * c + in_channel * width + (out_channel - start)
}

/// The convolution of `x` (`N x C x H x W`) with weights transformed by
/// [`transform_weights`] (`16 x C x M`), bias `b` (`M`) and the Conv's attributes; a
/// `residual` (a fused Add, see [`kernels::conv`]) is added before the activation, in a
/// second pass over the output. (Added in the output transform, which writes each
/// output channel by channel, its reads a plane apart made ResNet's 64-channel layers
/// 0.4-0.5 ms slower, where the pass takes 0.1.)
pub(crate) fn conv(
    x: &Tensor,
    u: &Tensor,
    b: Option<&Tensor>,
    attrs: &ConvAttrs,
    residual: Option<&[f32]>,
) -> R<Tensor> {
    let &[n, c, h, w] = x.dims() else {
        return Err(err(format!("Conv input X has shape {:?}; expected N x C x H x W", x.dims())));
    };
    let &[POINTS, uc, m] = u.dims() else {
        return Err(err(format!("transformed Conv weight has shape {:?}", u.dims())));
    };
    if uc != c {
        return Err(err(format!("Conv input X has {c} channels; the weight expects {uc}")));
    }
    let geo = kernels::geometry(&[h, w], &[3, 3], &attrs.window)?;
    let bias: Option<Vec<f32>> = match b {
        Some(b) if b.dims() != [m] => {
            return Err(err(format!("bias B has shape {:?}, expected [{m}]", b.dims())))
        }
        Some(b) => Some(b.to_vec1()?),
        None => None,
    };
    let out_dims = [n, m, geo.oh, geo.ow];
    let total = out_dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&t| t <= super::load::MAX_ELEMENTS)
        .ok_or_else(|| err(format!("output shape {out_dims:?} is too large")))?;
    if residual.is_some_and(|r| r.len() != total) {
        return Err(err(format!("the residual added to the output {out_dims:?} has another size")));
    }
    let plan = Plan::new(n, c, m, h, w, geo);
    let act = if residual.is_some() { None } else { attrs.activation };
    let mut out = kernels::with_f32(u, |us| {
        kernels::with_f32(x, |xs| Ok(plan.run(xs, us, bias.as_deref(), act, total)))
    })?;
    if let Some(residual) = residual {
        kernels::add_residual(&mut out, residual, attrs.activation);
    }
    Ok(Tensor::from_vec(out, out_dims.to_vec(), &Device::Cpu)?)
}

/// How one convolution is cut into blocks of work.
struct Plan {
    n: usize,
    c: usize,
    m: usize,
    h: usize,
    w: usize,
    /// Output size and the padding before the first row and column.
    oh: usize,
    ow: usize,
    pt: usize,
    pl: usize,
    /// Tile rows and columns (each tile is 2x2 outputs).
    th: usize,
    tw: usize,
    /// Tile rows per block, and blocks of tile rows per image.
    rows_per_block: usize,
    row_blocks: usize,
    /// Output channels per block, and blocks of channels.
    channels_per_block: usize,
    channel_blocks: usize,
}

impl Plan {
    fn new(n: usize, c: usize, m: usize, h: usize, w: usize, geo: kernels::Geom) -> Plan {
        let (th, tw) = (geo.oh.div_ceil(2), geo.ow.div_ceil(2));
        let tiles_per_block = (BLOCK_FLOATS / (POINTS * (c + m))).max(1);
        let rows_per_block = (tiles_per_block / tw.max(1)).clamp(1, th.max(1));
        let work = n * m * c * th * tw * POINTS;
        let threads = if kernels::parallel(work) { Team::current(Team::threads) } else { 1 };
        // One image's tile rows in equal shares for the threads, where each block holds
        // at least one full step of the products. (Asking two full steps left the cnn's
        // 32 -> 64 channels on 8x8, 4 tile rows of 4 tiles, on one thread at two: 0.031
        // ms, against 0.016 in two blocks of 8 tiles; 128 -> 128 channels on 7x7, 0.108
        // against 0.093.)
        let row_blocks = th.div_ceil(rows_per_block);
        let row_blocks = if n == 1 {
            kernels::even_shares(th, row_blocks, threads, |rows| rows * tw >= TILES_PER_STEP)
        } else {
            row_blocks
        };
        let rows_per_block = th.div_ceil(row_blocks.max(1)).max(1);
        // With too few blocks to keep every thread busy, cut the output channels too.
        let wanted = if threads > 1 { 2 * threads } else { 1 };
        let channel_blocks = wanted.div_ceil(n * row_blocks).max(1);
        // Blocks of whole panels of the weights.
        let channels_per_block = m.div_ceil(channel_blocks).next_multiple_of(PANEL).min(m);
        let channel_blocks = m.div_ceil(channels_per_block.max(1));
        Plan {
            n,
            c,
            m,
            h,
            w,
            oh: geo.oh,
            ow: geo.ow,
            pt: geo.pt,
            pl: geo.pl,
            th,
            tw,
            rows_per_block,
            row_blocks,
            channels_per_block,
            channel_blocks,
        }
    }

    fn run(
        &self,
        xs: &[f32],
        us: &[f32],
        bias: Option<&[f32]>,
        act: Option<Activation>,
        total: usize,
    ) -> Vec<f32> {
        let mut out: Vec<f32> = Vec::with_capacity(total);
        if total == 0 {
            return out;
        }
        let blocks = self.n * self.row_blocks * self.channel_blocks;
        let out_addr = out.as_mut_ptr() as usize;
        let block = |scratch: &mut Scratch, i: usize| {
            let (image_rows, channels) = (i / self.channel_blocks, i % self.channel_blocks);
            let job = Block {
                image: image_rows / self.row_blocks,
                rows: (image_rows % self.row_blocks) * self.rows_per_block,
                channels: channels * self.channels_per_block,
            };
            // SAFETY: the blocks partition the output, so each writes its own elements of
            // `out` (allocated for `total`), and `block_into` writes every one of them.
            unsafe { self.block_into(job, xs, us, bias, act, scratch, out_addr as *mut f32) }
        };
        if blocks > 1 && kernels::parallel(self.n * self.m * self.c * self.th * self.tw) {
            Team::current(|team| team.for_each_init(blocks, Scratch::default, block));
        } else {
            let mut scratch = Scratch::default();
            (0..blocks).for_each(|i| block(&mut scratch, i));
        }
        // SAFETY: every block wrote all its outputs, and the blocks cover all `total`.
        unsafe { out.set_len(total) };
        out
    }

    /// Transforms the block's input (unless this thread's last block had the same
    /// image and rows), multiplies, and writes the block's outputs into `out`.
    ///
    /// # Safety
    ///
    /// `out` points to the `n x m x oh x ow` output, of which no other thread touches
    /// this block's elements during the call.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_into(
        &self,
        job: Block,
        xs: &[f32],
        us: &[f32],
        bias: Option<&[f32]>,
        act: Option<Activation>,
        scratch: &mut Scratch,
        out: *mut f32,
    ) {
        let (c, m) = (self.c, self.m);
        let rows = self.rows_per_block.min(self.th - job.rows);
        let tiles = rows * self.tw;
        let channels = self.channels_per_block.min(m - job.channels);
        let key = Some((job.image, job.rows));
        if scratch.input_for != key {
            let len = INPUT_ARRAYS * c * 2 * tiles;
            scratch.input.clear();
            scratch.input.reserve(len);
            let plane = self.h * self.w;
            let image = &xs[job.image * c * plane..(job.image + 1) * c * plane];
            pulp::Arch::new().dispatch(InputTransform {
                plan: self,
                image,
                first_row: job.rows,
                rows,
                into: &mut scratch.input.spare_capacity_mut()[..len],
                rows_scratch: &mut scratch.rows,
            });
            // SAFETY: the transform wrote all `len` floats (every array, channel, tile row
            // and column of its output).
            unsafe { scratch.input.set_len(len) };
            scratch.input_for = key;
        }
        let len = POINTS * channels * tiles;
        scratch.product.clear();
        scratch.product.reserve(len);
        let arch = pulp::Arch::new();
        let products = &mut scratch.product.spare_capacity_mut()[..len];
        for (point, dst) in products.chunks_exact_mut(channels * tiles).enumerate() {
            let (array, offset) = input_of(point);
            let len = c * 2 * tiles;
            arch.dispatch(PointProduct {
                v: &scratch.input[array * len..][..len],
                offset,
                u: &us[point * c * m..][..c * m],
                first_channel: job.channels,
                tiles,
                dst,
            });
        }
        // SAFETY: each point's product wrote all its `channels x tiles` floats (every
        // panel's channels, every tile).
        unsafe { scratch.product.set_len(len) };
        let product = &scratch.product[..];
        pulp::Arch::new().dispatch(OutputTransform {
            plan: self,
            job,
            rows,
            channels,
            product,
            bias,
            act,
            scratch: &mut scratch.outputs,
            out,
        });
    }
}

/// One point's product for a block: `dst = vᵀ u'`, where `v` is the block's transformed
/// input (`c x tiles`), `u'` the block's columns of the point's transformed weights (the
/// panels from `first_channel` on, as many channels as `dst` has columns) and `dst` is
/// `tiles x channels`.
///
/// The output channels run along the vector lanes (4 vectors at a time, then 2, then
/// 1), 6 tiles at a time, with up to 24 accumulators held in registers through the whole sum over `c`: each
/// step loads 4 vectors of weights and broadcasts 6 inputs. Both operands are read as
/// they lie: the weights were laid out in panels for this at load time, the inputs by
/// the transform.
struct PointProduct<'a> {
    v: &'a [f32],
    /// Tile `t` of an input row is at `offset + 2 t`.
    offset: usize,
    u: &'a [f32],
    first_channel: usize,
    tiles: usize,
    dst: &'a mut [MaybeUninit<f32>],
}

/// Tiles per step of [`PointProduct`].
const TILES_PER_STEP: usize = 6;

impl pulp::WithSimd for PointProduct<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let PointProduct { v, offset, u, first_channel, tiles, dst } = self;
        let (lanes, c) = (S::F32_LANES, v.len() / (2 * tiles).max(1));
        if tiles == 0 || c == 0 {
            return;
        }
        let (m, channels) = (u.len() / c, dst.len() / tiles);
        let mut panel = 0;
        while panel < channels {
            let start = first_channel + panel;
            let width = PANEL.min(m - start);
            let job =
                Panel { v, offset, u: &u[start * c..][..c * width], tiles, channels, first: panel };
            let mut ch = 0;
            while panels::four_wide::<S>() && ch + 4 * lanes <= width {
                panel_tiles::<S, 4>(simd, job, ch, dst);
                ch += 4 * lanes;
            }
            while ch + 2 * lanes <= width {
                panel_tiles::<S, 2>(simd, job, ch, dst);
                ch += 2 * lanes;
            }
            while ch + lanes <= width {
                panel_tiles::<S, 1>(simd, job, ch, dst);
                ch += lanes;
            }
            // Fewer channels than one vector: a scalar sum each.
            for k in ch..width {
                for t in 0..tiles {
                    let sum = (0..c)
                        .map(|i| v[i * 2 * tiles + offset + 2 * t] * u[start * c + i * width + k])
                        .sum();
                    dst[t * channels + panel + k] = MaybeUninit::new(sum);
                }
            }
            panel += width;
        }
    }
}

/// The operands of a [`PointProduct`] for one panel of weights (`c` rows of its width),
/// and where the panel's first channel is among the block's.
#[derive(Clone, Copy)]
struct Panel<'a> {
    v: &'a [f32],
    offset: usize,
    u: &'a [f32],
    tiles: usize,
    channels: usize,
    first: usize,
}

/// `MR` vectors of a panel's channels from `ch` on, for every tile: full steps of
/// [`TILES_PER_STEP`] tiles, then the rest.
#[inline(always)]
fn panel_tiles<S: pulp::Simd, const MR: usize>(
    simd: S,
    p: Panel<'_>,
    ch: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    let mut t = 0;
    while t + TILES_PER_STEP <= p.tiles {
        step::<S, MR, TILES_PER_STEP>(simd, p, ch, t, dst);
        t += TILES_PER_STEP;
    }
    match p.tiles - t {
        1 => step::<S, MR, 1>(simd, p, ch, t, dst),
        2 => step::<S, MR, 2>(simd, p, ch, t, dst),
        3 => step::<S, MR, 3>(simd, p, ch, t, dst),
        4 => step::<S, MR, 4>(simd, p, ch, t, dst),
        5 => step::<S, MR, 5>(simd, p, ch, t, dst),
        _ => {}
    }
}

/// `MR` vectors of channels by `NR` tiles from tile `t` on, summed over all input
/// channels in registers ([`panels::block`]), then stored.
#[inline(always)]
fn step<S: pulp::Simd, const MR: usize, const NR: usize>(
    simd: S,
    p: Panel<'_>,
    ch: usize,
    t: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    let c = p.v.len() / (2 * p.tiles);
    let width = p.u.len() / c;
    let ops = panels::Operands {
        a: p.u,
        a_stride: width,
        a_rows: None,
        b: &p.v[p.offset..],
        b_stride: 2 * p.tiles,
        b_step: 2,
        depth: c,
    };
    // The block's rows are tiles `t .. t + NR`, `channels` apart in `dst`; its columns
    // the panel's channels `ch ..`, counted from the panel's first.
    let lanes = S::F32_LANES;
    let last = (t + NR - 1) * p.channels + p.first + ch + MR * lanes;
    assert!(last <= dst.len(), "a Winograd block reaches past its product");
    let dst = panels::Dst {
        ptr: dst[p.first..].as_mut_ptr().cast::<f32>(),
        stride: p.channels,
        accumulate: false,
    };
    // SAFETY: the block's elements lie within `dst` (the assertion above), which this
    // call borrows mutably; they are written, not read.
    unsafe { panels::block::<S, MR, NR>(simd, ops, (ch, t), dst) };
}

/// Which image, first tile row and first output channel one block covers.
#[derive(Debug, Clone, Copy)]
struct Block {
    image: usize,
    rows: usize,
    channels: usize,
}

/// A thread's buffers for the blocks of a [`Plan`].
#[derive(Default)]
struct Scratch {
    /// The transformed input of the last block (16 `c x tiles` matrices), and which
    /// image and first tile row it was for.
    input: Vec<f32>,
    input_for: Option<(usize, usize)>,
    /// The block's 16 products (`tiles x channels` each).
    product: Vec<f32>,
    /// Four padded input rows and their combinations.
    rows: Vec<f32>,
    /// One tile's outputs, before they are written to the output planes.
    outputs: Vec<f32>,
}

/// `Bᵀ d B` for every tile of a block and every input channel, written as 16
/// `c x tiles` matrices.
struct InputTransform<'a> {
    plan: &'a Plan,
    image: &'a [f32],
    first_row: usize,
    rows: usize,
    into: &'a mut [MaybeUninit<f32>],
    rows_scratch: &'a mut Vec<f32>,
}

impl pulp::WithSimd for InputTransform<'_> {
    type Output = ();

    // Inlined into pulp's per-ISA entry points, so the loops compile for the vector width
    // of the CPU it runs on.
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let InputTransform { plan, image, first_row, rows, into, rows_scratch } = self;
        let (tw, w) = (plan.tw, plan.w);
        let tiles = rows * tw;
        // A padded input row: 2 tw + 2 columns, the input's from column `pl` on.
        let width = 2 * tw + 2;
        // Four padded rows, a row of zeros (padding rows) and the four combinations. Only
        // the middle of a padded row is written below: its padding stays zero.
        rows_scratch.clear();
        rows_scratch.resize(9 * width, 0.0);
        let (padded, rest) = rows_scratch.split_at_mut(4 * width);
        let (zeros, combos) = rest.split_at_mut(width);
        let array_len = into.len() / INPUT_ARRAYS;
        let (copied, left) = (w.min(width.saturating_sub(plan.pl)), plan.pl.min(width));
        for channel in 0..plan.c {
            let plane = &image[channel * plan.h * w..(channel + 1) * plan.h * w];
            for r in 0..rows {
                let tile_row = first_row + r;
                // The four input rows under this tile row, or zeros above and below.
                let mut valid = [false; 4];
                for (a, row) in padded.chunks_exact_mut(width).enumerate() {
                    let y = (2 * tile_row + a).checked_sub(plan.pt).filter(|&y| y < plan.h);
                    if let Some(y) = y {
                        kernels::copy_row(&mut row[left..left + copied], &plane[y * w..][..copied]);
                        valid[a] = true;
                    }
                }
                let d = |a: usize| if valid[a] { &padded[a * width..][..width] } else { &*zeros };
                // Bᵀ d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3.
                let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                let (s0, rest) = combos.split_at_mut(width);
                let (s1, rest) = rest.split_at_mut(width);
                let (s2, s3) = rest.split_at_mut(width);
                for x in 0..width {
                    s0[x] = d0[x] - d2[x];
                    s1[x] = d1[x] + d2[x];
                    s2[x] = d2[x] - d1[x];
                    s3[x] = d1[x] - d3[x];
                }
                // (Bᵀ d) B: columns x0 - x2, x1 + x2, x2 - x1, x1 - x3 of each tile, whose
                // columns are 2j .. 2j + 4 of the padded rows: at full resolution
                // x - (x + 2), (x + 1) + x and x - (x + 1), read by [`input_of`] at even or
                // odd columns.
                let at = channel * 2 * tiles + r * 2 * tw;
                for (a, s) in combos.chunks_exact(width).enumerate() {
                    let arrays = &mut into[3 * a * array_len..(3 * a + 3) * array_len];
                    let (f0, rest) = arrays.split_at_mut(array_len);
                    let (f1, f2) = rest.split_at_mut(array_len);
                    let (f0, f1) = (&mut f0[at..at + 2 * tw], &mut f1[at..at + 2 * tw]);
                    let f2 = &mut f2[at..at + 2 * tw];
                    let (s0, s1, s2) = (&s[..2 * tw], &s[1..2 * tw + 1], &s[2..2 * tw + 2]);
                    for x in 0..2 * tw {
                        f0[x] = MaybeUninit::new(s0[x] - s2[x]);
                        f1[x] = MaybeUninit::new(s1[x] + s0[x]);
                        f2[x] = MaybeUninit::new(s1[x] - s0[x]);
                    }
                }
            }
        }
    }
}

/// Arrays the input transform writes per row combination of `Bᵀ d`.
const INPUT_ARRAYS: usize = 12;

/// Which of the input transform's arrays holds point `4 a + s` of `Bᵀ d B`, and at which
/// parity of column: `x0 - x2` is array 0 at even columns, `x1 - x3` array 0 at odd ones,
/// `x1 + x2` array 1 and `x2 - x1` array 2 at odd ones.
fn input_of(point: usize) -> (usize, usize) {
    let (a, s) = (point / 4, point % 4);
    let (array, offset) = [(0, 0), (1, 1), (2, 1), (0, 1)][s];
    (3 * a + array, offset)
}

/// `Aᵀ m A` for every tile and output channel of a block, plus bias and activation,
/// written to the output.
struct OutputTransform<'a> {
    plan: &'a Plan,
    job: Block,
    rows: usize,
    channels: usize,
    product: &'a [f32],
    bias: Option<&'a [f32]>,
    act: Option<Activation>,
    scratch: &'a mut Vec<f32>,
    out: *mut f32,
}

impl pulp::WithSimd for OutputTransform<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let OutputTransform { plan, job, rows, channels, product, bias, act, scratch, out } = self;
        let (tw, oh, ow) = (plan.tw, plan.oh, plan.ow);
        let point_len = channels * rows * tw;
        let plane = oh * ow;
        let first = (job.image * plan.m + job.channels) * plane;
        let bias = bias.map(|b| &b[job.channels..job.channels + channels]);
        // One tile's outputs, by channel: the four corners.
        let [top_left, top_right, bottom_left, bottom_right] = four_rows(scratch, channels);
        for r in 0..rows {
            let y = 2 * (job.rows + r);
            for j in 0..tw {
                let at = (r * tw + j) * channels;
                let m = |point: usize| &product[point * point_len + at..][..channels];
                // Per row a of the 4x4: p = m0 + m1 + m2, q = m1 - m2 - m3; the corners
                // are p0 + p1 + p2, q0 + q1 + q2, p1 - p2 - p3 and q1 - q2 - q3.
                for a in 0..4 {
                    let (m0, m1, m2, m3) = (m(4 * a), m(4 * a + 1), m(4 * a + 2), m(4 * a + 3));
                    let (p, q) =
                        (|i: usize| m0[i] + m1[i] + m2[i], |i: usize| m1[i] - m2[i] - m3[i]);
                    match a {
                        0 => (0..channels).for_each(|i| (top_left[i], top_right[i]) = (p(i), q(i))),
                        1 => (0..channels).for_each(|i| {
                            let (p, q) = (p(i), q(i));
                            (top_left[i], top_right[i]) = (top_left[i] + p, top_right[i] + q);
                            (bottom_left[i], bottom_right[i]) = (p, q);
                        }),
                        2 => (0..channels).for_each(|i| {
                            let (p, q) = (p(i), q(i));
                            (top_left[i], top_right[i]) = (top_left[i] + p, top_right[i] + q);
                            (bottom_left[i], bottom_right[i]) =
                                (bottom_left[i] - p, bottom_right[i] - q);
                        }),
                        _ => (0..channels).for_each(|i| {
                            (bottom_left[i], bottom_right[i]) =
                                (bottom_left[i] - p(i), bottom_right[i] - q(i));
                        }),
                    }
                }
                let x = 2 * j;
                let corners = [
                    (y, x, &mut *top_left),
                    (y, x + 1, &mut *top_right),
                    (y + 1, x, &mut *bottom_left),
                    (y + 1, x + 1, &mut *bottom_right),
                ];
                for (oy, ox, values) in corners {
                    if oy >= oh || ox >= ow {
                        continue;
                    }
                    finish(values, bias, act);
                    for (ch, &v) in values.iter().enumerate() {
                        // SAFETY: output (oy, ox) of one of this block's channels, which
                        // the caller of `block_into` lent to this block alone.
                        unsafe { out.add(first + ch * plane + oy * ow + ox).write(v) };
                    }
                }
            }
        }
    }
}

/// Adds each channel's bias and applies the activation, with the activation chosen
/// outside the loop so each loop vectorizes.
#[inline(always)]
fn finish(values: &mut [f32], bias: Option<&[f32]>, act: Option<Activation>) {
    if let Some(bias) = bias {
        values.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
    match act {
        None => {}
        Some(Activation::Relu) => values.iter_mut().for_each(|v| *v = v.max(0.0)),
        Some(act @ Activation::HardSwish) => values.iter_mut().for_each(|v| *v = act.apply(*v)),
        Some(act @ Activation::HardSigmoid { .. }) => {
            values.iter_mut().for_each(|v| *v = act.apply(*v))
        }
        Some(act @ Activation::Clip { .. }) => values.iter_mut().for_each(|v| *v = act.apply(*v)),
    }
}

/// Four rows of `len` floats in `scratch`.
fn four_rows(scratch: &mut Vec<f32>, len: usize) -> [&mut [f32]; 4] {
    scratch.clear();
    scratch.resize(4 * len, 0.0);
    let (a, rest) = scratch.split_at_mut(len);
    let (b, rest) = rest.split_at_mut(len);
    let (c, d) = rest.split_at_mut(len);
    [a, b, c, d]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::{AutoPad, Window};

    fn window(pads: [usize; 4], auto_pad: AutoPad) -> Window {
        Window {
            auto_pad,
            kernel_shape: Some(vec![3, 3]),
            strides: None,
            dilations: Some(vec![1, 1]),
            pads: Some(pads.to_vec()),
            ceil_mode: false,
        }
    }

    /// Values in [-1, 1) from a fixed sequence, so every run sees the same data.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Against the unfolded convolution: odd and even sizes (partial tiles at the
    /// bottom and right), asymmetric and automatic padding, no padding, a batch of two,
    /// bias and activation, on one thread and on two with every loop split.
    #[test]
    fn matches_the_direct_convolution() {
        let cases: [(usize, usize, usize, usize, usize, Window); 6] = [
            (1, 16, 16, 8, 8, window([1, 1, 1, 1], AutoPad::NotSet)),
            (2, 24, 40, 7, 9, window([1, 1, 1, 1], AutoPad::NotSet)),
            (1, 16, 32, 5, 6, window([0, 0, 0, 0], AutoPad::NotSet)),
            (1, 32, 16, 6, 11, window([2, 0, 1, 1], AutoPad::NotSet)),
            (1, 16, 16, 9, 4, window([0; 4], AutoPad::SameUpper)),
            (1, 64, 80, 30, 29, window([1, 1, 1, 1], AutoPad::NotSet)),
        ];
        for threads in [1, 2] {
            let team =
                if threads == 1 { Team::new(1) } else { Team::new(2).splitting_everything() };
            let _hot = team.hot();
            for (i, (n, c, m, h, w, window)) in cases.iter().cloned().enumerate() {
                let x =
                    Tensor::from_vec(values(n * c * h * w, i as u64), (n, c, h, w), &Device::Cpu)
                        .unwrap();
                let wt =
                    Tensor::from_vec(values(m * c * 9, 100 + i as u64), (m, c, 3, 3), &Device::Cpu)
                        .unwrap();
                let b = Tensor::from_vec(values(m, 200 + i as u64), m, &Device::Cpu).unwrap();
                let activation = (i % 2 == 1).then_some(Activation::Relu);
                let attrs = ConvAttrs { window, group: 1, activation };
                let u = transform_weights(&wt).unwrap();
                let (want, got) = team.install(|| {
                    (
                        kernels::conv(&x, &wt, Some(&b), &attrs, false, None).unwrap(),
                        conv(&x, &u, Some(&b), &attrs, None).unwrap(),
                    )
                });
                assert_eq!(got.dims(), want.dims(), "case {i}");
                let (want, got) = (
                    want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()) * c as f32,
                        "case {i} on {threads} threads, output {j}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn only_3x3_stride_1_single_group_convolutions_are_eligible() {
        let plain =
            ConvAttrs { window: window([1; 4], AutoPad::NotSet), group: 1, activation: None };
        assert!(eligible(&plain, &[32, 32, 3, 3]));
        assert!(!eligible(&plain, &[32, 16, 3, 3]), "too few input channels");
        assert!(!eligible(&plain, &[16, 32, 3, 3]), "too few output channels");
        assert!(!eligible(&plain, &[32, 32, 5, 5]), "5x5 kernel");
        assert!(eligible(&plain, &[128, 128, 3, 3]));
        assert!(!eligible(&plain, &[256, 128, 3, 3]), "weights too large");
        assert!(!eligible(&plain, &[32, 32, 3]), "1-D");
        let strided = Window { strides: Some(vec![2, 2]), ..plain.window.clone() };
        assert!(!eligible(&ConvAttrs { window: strided, ..plain.clone() }, &[32, 32, 3, 3]));
        let dilated = Window { dilations: Some(vec![1, 2]), ..plain.window.clone() };
        assert!(!eligible(&ConvAttrs { window: dilated, ..plain.clone() }, &[32, 32, 3, 3]));
        assert!(!eligible(&ConvAttrs { group: 2, ..plain }, &[32, 16, 3, 3]));
    }

    #[test]
    fn input_channels_must_match_the_weight() {
        let attrs =
            ConvAttrs { window: window([1; 4], AutoPad::NotSet), group: 1, activation: None };
        let u = transform_weights(
            &Tensor::zeros((16, 16, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let x = Tensor::zeros((1, 8, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = conv(&x, &u, None, &attrs, None).unwrap_err();
        assert!(e.0.contains("8 channels"), "{}", e.0);
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::engine::kernels::scaling::median_time as median;
    use crate::engine::kernels::{AutoPad, Window};

    /// Direct against Winograd on the shapes of the reference models' 3x3 convolutions.
    #[test]
    #[ignore = "timing, not a check"]
    fn against_the_direct_convolution() {
        let window = Window {
            auto_pad: AutoPad::NotSet,
            kernel_shape: Some(vec![3, 3]),
            strides: None,
            dilations: None,
            pads: Some(vec![1; 4]),
            ceil_mode: false,
        };
        let attrs = ConvAttrs { window, group: 1, activation: Some(Activation::Relu) };
        let team = Team::new(1);
        let _hot = team.hot();
        for (c, m, hw) in
            [(64, 64, 56), (128, 128, 28), (256, 256, 14), (512, 512, 7), (16, 32, 16), (32, 64, 8)]
        {
            let x = Tensor::ones((1, c, hw, hw), candle_core::DType::F32, &Device::Cpu).unwrap();
            let w = Tensor::ones((m, c, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
            let u = transform_weights(&w).unwrap();
            let direct = median(|| {
                drop(team.install(|| kernels::conv(&x, &w, None, &attrs, false, None).unwrap()))
            });
            let wino = median(|| drop(team.install(|| conv(&x, &u, None, &attrs, None).unwrap())));
            let packed = match kernels::pack_weights(&w, &attrs).unwrap() {
                Some(p) => {
                    let t =
                        median(|| {
                            drop(team.install(|| {
                                kernels::conv(&x, &p, None, &attrs, true, None).unwrap()
                            }))
                        });
                    format!("{t:?}")
                }
                None => "-".into(),
            };
            println!(
                "{c}->{m} {hw}x{hw}: gemm crate {direct:?}, packed {packed}, winograd {wino:?}"
            );
        }
    }
}
