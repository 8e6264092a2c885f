//! Convolution and pooling on f32 slices, where candle-core has no kernel of its own.
//!
//! General convolution unfolds the input (im2col, read from stride phases) and multiplies
//! in our products ([`TileProduct`], [`lanes`]) or the gemm crate's; depthwise convolution
//! and pooling are direct loops over the same phases, split over output planes across the
//! engine's threads ([`Team`]).

use candle_core::{CpuStorage, Device, Storage, Tensor};

use super::ops::{OpError, R};
use super::panels::{self, Dst, ListedRows, Operands};
use super::team::Team;

#[cfg(target_arch = "x86_64")]
mod blocked;
mod lanes;
#[cfg(target_arch = "x86_64")]
mod maxpool;

/// How padding is chosen (`auto_pad`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AutoPad {
    /// Explicit `pads`.
    NotSet,
    /// Output size `ceil(in / stride)`, extra padding at the end.
    SameUpper,
    /// Output size `ceil(in / stride)`, extra padding at the start.
    SameLower,
    /// No padding.
    Valid,
}

/// Attributes shared by Conv, MaxPool and AveragePool.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub auto_pad: AutoPad,
    pub kernel_shape: Option<Vec<usize>>,
    pub strides: Option<Vec<usize>>,
    pub dilations: Option<Vec<usize>>,
    /// `[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`.
    pub pads: Option<Vec<usize>>,
    pub ceil_mode: bool,
}

/// Conv attributes.
#[derive(Debug, Clone)]
pub(crate) struct ConvAttrs {
    pub window: Window,
    pub group: usize,
    /// An activation fused in at load time, applied in the same pass as the bias.
    pub activation: Option<Activation>,
}

/// Elementwise activations that can run inside a Conv's output pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Activation {
    Relu,
    HardSwish,
    HardSigmoid { alpha: f32, beta: f32 },
    Clip { min: f32, max: f32 },
}

impl Activation {
    #[inline]
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Relu => v.max(0.0),
            Activation::HardSwish => v * (v / 6.0 + 0.5).clamp(0.0, 1.0),
            Activation::HardSigmoid { alpha, beta } => (alpha * v + beta).clamp(0.0, 1.0),
            Activation::Clip { min, max } => v.max(min).min(max),
        }
    }
}

/// An activation on each lane of a vector, with the same result to the bit as
/// [`Activation::apply`] (a NaN as `apply` gives it too: Relu and Clip take their bound,
/// the others keep the NaN). One type per activation, so a loop over vectors is compiled
/// once for each and chooses none per vector (a `match` there was a jump per vector).
/// No closures inside: they would not be compiled for the CPU's vector extension.
trait Lanewise: Copy {
    fn vector<S: pulp::Simd>(self, simd: S, v: S::f32s) -> S::f32s;
}

/// No activation.
#[derive(Clone, Copy)]
struct Linear;

impl Lanewise for Linear {
    #[inline(always)]
    fn vector<S: pulp::Simd>(self, _: S, v: S::f32s) -> S::f32s {
        v
    }
}

/// [`Activation::Relu`].
#[derive(Clone, Copy)]
struct Relu;

impl Lanewise for Relu {
    #[inline(always)]
    fn vector<S: pulp::Simd>(self, simd: S, v: S::f32s) -> S::f32s {
        at_least(simd, v, 0.0)
    }
}

/// [`Activation::HardSwish`].
#[derive(Clone, Copy)]
struct HardSwish;

impl Lanewise for HardSwish {
    #[inline(always)]
    fn vector<S: pulp::Simd>(self, simd: S, v: S::f32s) -> S::f32s {
        let gate = simd.add_f32s(simd.div_f32s(v, simd.splat_f32s(6.0)), simd.splat_f32s(0.5));
        simd.mul_f32s(v, clamp_unit(simd, gate))
    }
}

/// [`Activation::HardSigmoid`].
#[derive(Clone, Copy)]
struct HardSigmoid {
    alpha: f32,
    beta: f32,
}

impl Lanewise for HardSigmoid {
    #[inline(always)]
    fn vector<S: pulp::Simd>(self, simd: S, v: S::f32s) -> S::f32s {
        let x = simd.mul_f32s(simd.splat_f32s(self.alpha), v);
        clamp_unit(simd, simd.add_f32s(x, simd.splat_f32s(self.beta)))
    }
}

/// [`Activation::Clip`].
#[derive(Clone, Copy)]
struct Clip {
    min: f32,
    max: f32,
}

impl Lanewise for Clip {
    #[inline(always)]
    fn vector<S: pulp::Simd>(self, simd: S, v: S::f32s) -> S::f32s {
        simd.min_f32s(at_least(simd, v, self.min), simd.splat_f32s(self.max))
    }
}

/// `x.clamp(0.0, 1.0)` on each lane: a NaN stays NaN. The x86 `max` and `min` give their
/// second operand when either is NaN, so there `x` goes second; elsewhere (where what a
/// vector `max` does with a NaN varies) by compares.
#[inline(always)]
fn clamp_unit<S: pulp::Simd>(simd: S, x: S::f32s) -> S::f32s {
    let (zero, one) = (simd.splat_f32s(0.0), simd.splat_f32s(1.0));
    if cfg!(target_arch = "x86_64") {
        simd.min_f32s(one, simd.max_f32s(zero, x))
    } else {
        let x = simd.select_f32s(simd.less_than_f32s(x, zero), zero, x);
        simd.select_f32s(simd.greater_than_f32s(x, one), one, x)
    }
}

/// `x.max(min)` on each lane: a NaN becomes `min`. On x86 one `max` (`min` is its second
/// operand, as above): a compare and a select were three instructions, and a finishing
/// pass over a plane in L2 ran a quarter slower for them.
#[inline(always)]
fn at_least<S: pulp::Simd>(simd: S, x: S::f32s, min: f32) -> S::f32s {
    let min = simd.splat_f32s(min);
    if cfg!(target_arch = "x86_64") {
        simd.max_f32s(x, min)
    } else {
        simd.select_f32s(simd.greater_than_f32s(x, min), x, min)
    }
}

/// MaxPool / AveragePool attributes.
#[derive(Debug, Clone)]
pub(crate) struct PoolAttrs {
    pub window: Window,
    pub count_include_pad: bool,
}

/// Resolved 2-D geometry (1-D windows use height 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    pub(crate) pt: usize,
    pub(crate) pl: usize,
    pb: usize,
    pr: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
}

fn err(msg: impl Into<String>) -> OpError {
    OpError(msg.into())
}

/// Output length and pads of one spatial axis.
fn axis_geometry(
    input: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    pads: (usize, usize),
    auto_pad: AutoPad,
    ceil_mode: bool,
) -> R<(usize, usize, usize)> {
    if kernel == 0 || stride == 0 || dilation == 0 {
        return Err(err("kernel, strides and dilations must be positive"));
    }
    let eff = (kernel - 1)
        .checked_mul(dilation)
        .and_then(|v| v.checked_add(1))
        .ok_or_else(|| err("kernel size times dilation overflows"))?;
    let (begin, end) = match auto_pad {
        AutoPad::NotSet => pads,
        AutoPad::Valid => (0, 0),
        AutoPad::SameUpper | AutoPad::SameLower => {
            let out = input.div_ceil(stride);
            let total = (out.saturating_sub(1) * stride + eff).saturating_sub(input);
            let small = total / 2;
            if auto_pad == AutoPad::SameUpper {
                (small, total - small)
            } else {
                (total - small, small)
            }
        }
    };
    let padded = input
        .checked_add(begin)
        .and_then(|v| v.checked_add(end))
        .ok_or_else(|| err("pads overflow"))?;
    let Some(span) = padded.checked_sub(eff) else {
        return Err(err(format!(
            "the input length {input} plus pads ({begin}, {end}) is smaller than the kernel \
             extent {eff}"
        )));
    };
    let mut out = if ceil_mode { span.div_ceil(stride) + 1 } else { span / stride + 1 };
    // A window that would start in the end padding is dropped (ceil_mode only).
    if ceil_mode && out > 1 && (out - 1) * stride >= input + begin {
        out -= 1;
    }
    Ok((out, begin, end))
}

pub(crate) fn geometry(spatial: &[usize], kernel: &[usize], window: &Window) -> R<Geom> {
    let rank = spatial.len();
    if kernel.len() != rank {
        return Err(err(format!(
            "the kernel has {} spatial dimensions but the input has {rank}",
            kernel.len()
        )));
    }
    let list = |v: &Option<Vec<usize>>, what: &str, len: usize| -> R<Vec<usize>> {
        match v {
            None => Ok(vec![if what == "pads" { 0 } else { 1 }; len]),
            Some(v) if v.len() == len => Ok(v.clone()),
            Some(v) => Err(err(format!("{what} has {} values, expected {len}", v.len()))),
        }
    };
    let strides = list(&window.strides, "strides", rank)?;
    let dilations = list(&window.dilations, "dilations", rank)?;
    let pads = list(&window.pads, "pads", 2 * rank)?;
    let mut axes = Vec::with_capacity(2);
    for i in 0..rank {
        let at = |v: &[usize], j: usize| v.get(j).copied().unwrap_or(0);
        axes.push(axis_geometry(
            at(spatial, i),
            at(kernel, i),
            at(&strides, i),
            at(&dilations, i),
            (at(&pads, i), at(&pads, i + rank)),
            window.auto_pad,
            window.ceil_mode,
        )?);
    }
    let at = |v: &[usize], j: usize| v.get(j).copied().unwrap_or(1);
    match rank {
        1 => {
            let (ow, pl, pr) = axes.first().copied().unwrap_or((1, 0, 0));
            Ok(Geom {
                h: 1,
                w: at(spatial, 0),
                kh: 1,
                kw: at(kernel, 0),
                sh: 1,
                sw: at(&strides, 0),
                dh: 1,
                dw: at(&dilations, 0),
                pt: 0,
                pl,
                pb: 0,
                pr,
                oh: 1,
                ow,
            })
        }
        2 => {
            let (oh, pt, pb) = axes.first().copied().unwrap_or((1, 0, 0));
            let (ow, pl, pr) = axes.get(1).copied().unwrap_or((1, 0, 0));
            Ok(Geom {
                h: at(spatial, 0),
                w: at(spatial, 1),
                kh: at(kernel, 0),
                kw: at(kernel, 1),
                sh: at(&strides, 0),
                sw: at(&strides, 1),
                dh: at(&dilations, 0),
                dw: at(&dilations, 1),
                pt,
                pl,
                pb,
                pr,
                oh,
                ow,
            })
        }
        _ => Err(err(format!("{rank}-D windows are not supported; use 1-D or 2-D"))),
    }
}

/// Below this many multiply-adds (or elements) a loop runs on the calling thread alone:
/// handing part of it to another thread costs more than it saves.
pub(crate) const PARALLEL_MIN_WORK: usize = 1 << 15;

/// Whether a loop of `work` multiply-adds (or elements) should be split across threads
/// (see [`Team::worth_splitting`]). At one thread every loop runs on the calling thread.
pub(crate) fn parallel(work: usize) -> bool {
    Team::current(|team| team.worth_splitting(work, PARALLEL_MIN_WORK))
}

/// Runs `f` on each `chunk`-sized piece of `out` with its index and a scratch state of
/// its thread (made by `init`), across threads when `work` is large enough.
pub(crate) fn for_each_chunk<T: Send, S>(
    out: &mut [T],
    chunk: usize,
    work: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync,
) {
    if chunk == 0 {
        return;
    }
    if parallel(work) {
        Team::current(|team| team.chunks_init(out, chunk, init, f));
    } else {
        let mut scratch = init();
        out.chunks_mut(chunk).enumerate().for_each(|(i, piece)| f(&mut scratch, i, piece));
    }
}

/// Runs `f` on the contiguous f32 data of `t`.
pub(crate) fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> R<T>) -> R<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (start, end) =
        layout.contiguous_offsets().ok_or_else(|| err("tensor is not contiguous"))?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(data)) => f(data
            .get(start..end)
            .ok_or_else(|| err("tensor storage is shorter than its shape"))?),
        _ => Err(err(format!("expected an f32 tensor on the CPU, got {:?}", t.dtype()))),
    }
}

fn check_f32(t: &Tensor, what: &str) -> R<()> {
    if t.dtype() == candle_core::DType::F32 {
        Ok(())
    } else {
        Err(err(format!("{what} must be FLOAT, got {:?}", t.dtype())))
    }
}

/// `N x C x spatial` split into `(n, c, spatial)`.
fn split_nc(dims: &[usize], what: &str) -> R<(usize, usize, Vec<usize>)> {
    match dims {
        [n, c, rest @ ..] if !rest.is_empty() && rest.len() <= 2 => Ok((*n, *c, rest.to_vec())),
        _ => Err(err(format!("{what} must be N x C x W or N x C x H x W, got shape {dims:?}"))),
    }
}

/// The output dimensions of a convolution of `x` (dimensions `N x C x spatial`) by `m`
/// filters of `kernel` (spatial dimensions) over `window`.
pub(crate) fn conv_output_dims(
    x: &[usize],
    m: usize,
    kernel: &[usize],
    window: &Window,
) -> R<Vec<usize>> {
    let (n, _, spatial) = split_nc(x, "Conv input X")?;
    let geo = geometry(&spatial, kernel, window)?;
    Ok(output_dims(n, m, spatial.len(), &geo))
}

/// `N x M x` the output's spatial dimensions (one or two).
fn output_dims(n: usize, m: usize, spatial: usize, geo: &Geom) -> Vec<usize> {
    if spatial == 1 {
        vec![n, m, geo.ow]
    } else {
        vec![n, m, geo.oh, geo.ow]
    }
}

/// ONNX Conv (1-D or 2-D, any groups).
///
/// `packed`: the weight's data was laid out at load time by [`pack_weights`] (its shape is
/// still the original's), and the products run in our own loop ([`TileProduct`]);
/// otherwise they run in the gemm crate's.
///
/// `residual`: the other operand of an Add fused into the Conv at load time (see
/// `docs/decisions.md`), with the output's shape; it is added to each output after the
/// bias and before the activation, in the tiles' finishing pass (depthwise: in a second
/// pass).
pub(crate) fn conv(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    attrs: &ConvAttrs,
    packed: bool,
    residual: Option<&[f32]>,
) -> R<Tensor> {
    check_f32(x, "Conv input X")?;
    check_f32(w, "Conv weight W")?;
    let (n, c, spatial) = split_nc(x.dims(), "Conv input X")?;
    let (m, cg, kernel) = match w.dims() {
        [m, cg, k @ ..] if k.len() == spatial.len() => (*m, *cg, k.to_vec()),
        d => {
            return Err(err(format!(
                "weight W has shape {d:?}; expected M x C/group x {} kernel dimensions",
                spatial.len()
            )))
        }
    };
    if let Some(ks) = &attrs.window.kernel_shape {
        if *ks != kernel {
            return Err(err(format!("kernel_shape {ks:?} does not match the weight {kernel:?}")));
        }
    }
    let g = attrs.group;
    if g == 0 || cg.checked_mul(g) != Some(c) || m % g != 0 {
        return Err(err(format!(
            "group {g} does not fit {c} input channels, weight {:?}",
            w.dims()
        )));
    }
    if let Some(b) = b {
        check_f32(b, "Conv bias B")?;
        if b.dims() != [m] {
            return Err(err(format!("bias B has shape {:?}, expected [{m}]", b.dims())));
        }
    }
    let geo = geometry(&spatial, &kernel, &attrs.window)?;
    let out_dims = output_dims(n, m, spatial.len(), &geo);
    let p = geo.oh * geo.ow;
    let total = n
        .checked_mul(m)
        .and_then(|v| v.checked_mul(p))
        .filter(|&t| t <= super::load::MAX_ELEMENTS)
        .ok_or_else(|| err(format!("output shape {out_dims:?} is too large")))?;
    if residual.is_some_and(|r| r.len() != total) {
        return Err(err(format!("the residual added to the output {out_dims:?} has another size")));
    }
    if g == c && cg == 1 {
        // The depthwise kernels take no residual: it is added in a second pass.
        let act = if residual.is_some() { None } else { attrs.activation };
        let mut out = depthwise(x, w, b, (n, c, m), geo, act, packed)?;
        if let Some(residual) = residual {
            add_residual(&mut out, residual, attrs.activation);
        }
        return Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?);
    }
    let bias: Option<Vec<f32>> = b.map(|b| b.to_vec1()).transpose()?;
    let conv = GroupedConv {
        n,
        c,
        m,
        g,
        geo,
        bias: bias.as_deref(),
        activation: attrs.activation,
        packed,
        lanes: packed && lanes::fits(cg * kernel.iter().product::<usize>(), m / g),
        residual,
    };
    let out = with_f32(w, |ws| with_f32(x, |xs| conv.run(xs, ws, total)))?;
    Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
}

/// A Conv weight (`M x C/group x kernel`) laid out for the kernel that runs it, in the
/// same shape and the same number of floats:
/// - for [`GroupedConv`], each group's weights in panels of output channels, so the
///   product streams through them in order: of [`lanes::panel`] channels where
///   [`lanes::fits`], else of [`panels::ROWS`]; `None` for a 1x1 kernel, one deeper than
///   [`PACKED_MAX_DEPTH`] that is not for lanes, or one that does not fit the attributes;
/// - for a depthwise convolution of one output channel per group, blocks of channels
///   with their taps in order ([`pack_depthwise`]), on CPUs where blocks run; `None`
///   elsewhere and for other depthwise weights, which run as they are.
pub(crate) fn pack_weights(w: &Tensor, attrs: &ConvAttrs) -> R<Option<Tensor>> {
    let (m, cg) = match w.dims() {
        [m, cg, _, ..] => (*m, *cg),
        _ => return Ok(None),
    };
    let g = attrs.group;
    if w.dtype() != candle_core::DType::F32 || g == 0 || m % g != 0 {
        return Ok(None);
    }
    // One input channel per group runs as a depthwise convolution (see [`conv`]).
    if cg == 1 {
        let Some(block) = depthwise_block().filter(|_| m == g) else {
            return Ok(None);
        };
        let kk = w.elem_count() / m.max(1);
        let packed = with_f32(w, |ws| Ok(pack_depthwise(ws, m, kk, block)))?;
        return Ok(Some(Tensor::from_vec(packed, w.dims(), &Device::Cpu)?));
    }
    let k = w.elem_count() / m.max(1);
    let width = if k == cg {
        return Ok(None);
    } else if lanes::fits(k, m / g) {
        lanes::panel()
    } else if k > PACKED_MAX_DEPTH {
        return Ok(None);
    } else {
        panels::ROWS
    };
    let packed = with_f32(w, |ws| Ok(pack_groups(ws, g, m / g, k, width)))?;
    Ok(Some(Tensor::from_vec(packed, w.dims(), &Device::Cpu)?))
}

/// The deepest products (input channels per group times kernel size) that run on packed
/// weights in [`TileProduct`], output positions along the lanes. Deeper ones, ResNet's
/// 256- and 512-channel 3x3 layers, ran faster in the gemm crate's (its products of 7x7
/// and 14x14 maps: 2.0 against 2.9 ms for 512 channels, one thread), and so did 1x1
/// kernels (which it reads in place); kernels of several taps up to this depth ran faster
/// in ours (ResNet's stride-2 3x3 layers 1.43 -> 1.26 and 1.49 -> 1.30 ms, cnn 0.080 ->
/// 0.073 ms in all). Those that [`lanes::fits`] (deep enough, with whole panels of
/// output channels) run as lanes products instead, at any depth; the gemm crate keeps the
/// deeper ones without whole panels.
const PACKED_MAX_DEPTH: usize = 1152;

/// How many channels a block of a depthwise convolution holds when blocks run on this
/// CPU ([`blocked::Block`]: a vector's lanes), so its weights are packed at load time in
/// blocks of that many ([`pack_depthwise`]); `None` where blocks do not run.
fn depthwise_block() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        blocked::runs_here().then(blocked::lanes)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The `kk`-tap kernels of `m` depthwise channels (`ws`, channel-major) laid out as
/// [`blocked::Block`] reads them: per block of `block` channels (the last may hold fewer,
/// `n`), each tap's `n` weights in turn. The same number of floats.
fn pack_depthwise(ws: &[f32], m: usize, kk: usize, block: usize) -> Vec<f32> {
    let mut packed = vec![0f32; ws.len()];
    for (at, (c, t)) in depthwise_places(m, kk, block) {
        packed[at] = ws[c * kk + t];
    }
    packed
}

/// The channel-major kernels of weights packed by [`pack_depthwise`].
fn unpack_depthwise(packed: &[f32], m: usize, kk: usize, block: usize) -> Vec<f32> {
    let mut ws = vec![0f32; packed.len()];
    for (at, (c, t)) in depthwise_places(m, kk, block) {
        ws[c * kk + t] = packed[at];
    }
    ws
}

/// Where [`pack_depthwise`] puts each channel `c`'s tap `t`, for every one of them.
fn depthwise_places(
    m: usize,
    kk: usize,
    block: usize,
) -> impl Iterator<Item = (usize, (usize, usize))> {
    (0..m).flat_map(move |c| {
        let first = c / block * block;
        let n = (m - first).min(block);
        (0..kk).map(move |t| (first * kk + t * n + c - first, (c, t)))
    })
}

/// `g` groups of `mg x k` weights, each laid out in panels of `width` channels.
fn pack_groups(ws: &[f32], g: usize, mg: usize, k: usize, width: usize) -> Vec<f32> {
    let group_len = (mg * k).max(1);
    ws.chunks(group_len).take(g).flat_map(|group| panels::pack(group, mg, k, width)).collect()
}

/// A convolution that is not depthwise, as products of each group's weights (`m / g x
/// k`, `k = c / g * kh * kw`) and its unfolded input (`k x` output positions).
///
/// The output is cut into tiles of output channels and output rows, each worked on by one
/// thread from start to end: it unfolds the tile's columns of the input (or reads them in
/// place when the kernel is 1x1), multiplies, and writes the tile's outputs with bias and
/// activation added. So every pass runs on all threads, and each tile's product is still
/// in cache when its outputs are written.
struct GroupedConv<'a> {
    n: usize,
    c: usize,
    m: usize,
    g: usize,
    geo: Geom,
    bias: Option<&'a [f32]>,
    activation: Option<Activation>,
    /// Whether the weights are in panels (see [`pack_weights`]).
    packed: bool,
    /// Whether those panels are for lanes products ([`lanes::fits`], as `pack_weights`
    /// decided), decided once for all the tiles.
    lanes: bool,
    /// Added to the outputs before the activation (the output's shape).
    residual: Option<&'a [f32]>,
}

/// About how many products one tile of a [`GroupedConv`] holds: its product and unfolded
/// input stay in the L2 cache. 4x the first choice (1 << 14): fewer, larger calls into
/// the products ran MobileNetV3's 1x1 layers on 7x7 and 14x14 maps faster (the model
/// 2.62 -> 2.49 ms at one thread, the same at two); 1 << 18 gained nothing more.
const TILE_ELEMENTS: usize = 1 << 16;

/// The fewest product columns a tile of a [`GroupedConv`] has when the output has that
/// many: narrower products run gemm's kernels poorly, so such tiles are cut by channels.
const TILE_MIN_COLUMNS: usize = 128;

/// The fewest output channels a 1x1 [`GroupedConv`] has for its tiles to split only
/// channels across threads. In MobileNetV3 at two threads, its 1x1 layers of 88 to 288
/// channels ran 20-30% faster split by channels; those of 16 and 40 channels (tiles of
/// 12 and 4, or 24 and 16 channels) 15-25% slower.
const SPLIT_CHANNELS_MIN: usize = 64;

/// How many pieces to cut `len` rows into, `pieces` or up to twice as many, when the
/// work is split across `threads`: the count whose longest share of rows for one thread
/// is shortest (the fewest pieces among equals), among those whose pieces of `len /
/// pieces` rows are still `wide_enough`. 1 when no count splits the rows at all (the
/// work is then split some other way). The count is one that pieces of
/// `len.div_ceil(count)` rows give exactly.
///
/// Each thread starts on its own contiguous share of the pieces, and one done early
/// takes from the other's: with two threads, 7 blocks of 4 rows (ResNet's 56x56 Winograd
/// layers) or tiles of 8 and 6 rows (its 14x14 ones) left one thread waiting for the
/// other's last piece.
pub(crate) fn even_shares(
    len: usize,
    pieces: usize,
    threads: usize,
    wide_enough: impl Fn(usize) -> bool,
) -> usize {
    let pieces = pieces.clamp(1, len.max(1));
    if threads <= 1 || len <= 1 {
        return len.max(1).div_ceil(len.max(1).div_ceil(pieces));
    }
    let longest = |rows| longest_share(len, rows, threads);
    let best = (pieces..=(2 * pieces).min(len))
        .filter(|&p| p == pieces || wide_enough(len.div_ceil(p)))
        .min_by_key(|&p| (longest(len.div_ceil(p)), p))
        .unwrap_or(pieces);
    let rows = len.div_ceil(best);
    if longest(rows) == len {
        1
    } else {
        len.div_ceil(rows)
    }
}

/// The rows of the longest share of one thread when `len` rows in pieces of `rows`
/// (`rows` > 0) go to `threads` threads as [`Team::for_each_init`] hands them out: thread
/// `t` gets the `t`-th contiguous `1 / threads` of the pieces.
fn longest_share(len: usize, rows: usize, threads: usize) -> usize {
    let tasks = len.div_ceil(rows);
    (0..threads)
        .map(|t| {
            let (first, end) = (tasks * t / threads, tasks * (t + 1) / threads);
            (end * rows).min(len) - (first * rows).min(len)
        })
        .max()
        .unwrap_or(len)
}

/// Which channels and output rows of which image and group one tile covers.
#[derive(Debug, Clone, Copy)]
struct Tile {
    image: usize,
    group: usize,
    /// Output channels of the group: `channels .. channels + channel_count`.
    channels: usize,
    channel_count: usize,
    /// Output rows `rows .. rows + row_count`.
    rows: usize,
    row_count: usize,
}

/// A thread's buffers for the tiles of a [`GroupedConv`].
#[derive(Default)]
struct TileScratch {
    /// The unfolded input of the last tile, and which image, group and rows it was for
    /// (or, with `None`, a lanes product's last pass).
    unfolded: Vec<f32>,
    unfolded_for: Option<(usize, usize, usize)>,
    /// The product of the tile, before its extra columns are dropped. Only its capacity
    /// is used, through a pointer: the product fills it.
    product: Vec<f32>,
    /// Where each row of the tile's unfolded input starts in the phases (our products read
    /// them there instead of unfolding).
    rows: Vec<usize>,
    /// A lanes product (see [`lanes`]), before it is written into the output.
    lanes: Vec<f32>,
}

impl GroupedConv<'_> {
    fn run(&self, xs: &[f32], ws: &[f32], total: usize) -> R<Vec<f32>> {
        let geo = &self.geo;
        let (cg, mg) = (self.c / self.g, self.m / self.g);
        let k = cg * geo.kh * geo.kw;
        let plane_in = geo.h * geo.w;
        if xs.len() < self.n * self.c * plane_in || ws.len() < self.m * k {
            return Err(err("Conv input or weight is shorter than its shape"));
        }
        if self.bias.is_some_and(|b| b.len() < self.m) {
            return Err(err("Conv bias is shorter than its shape"));
        }
        if k == 0 {
            // No input channels: every output is the bias, activated.
            let p = geo.oh * geo.ow;
            let mut out = vec![0f32; total];
            for (plane, values) in out.chunks_mut(p.max(1)).enumerate() {
                let bias = self.bias.and_then(|b| b.get(plane % self.m)).copied();
                pulp::Arch::new().dispatch(Finish {
                    values,
                    from: None,
                    add: self.residual.and_then(|r| r.get(plane * p..(plane + 1) * p)),
                    bias: bias.unwrap_or(0.0),
                    act: self.activation,
                });
            }
            return Ok(out);
        }
        if total == 0 {
            return Ok(Vec::new());
        }
        // A 1x1, stride-1, unpadded convolution reads the input planes as they are;
        // any other reads them from their stride phases (see [`pad_phases`]).
        let pointwise = geo.kh == 1
            && geo.kw == 1
            && geo.sh == 1
            && geo.sw == 1
            && geo.pt + geo.pb + geo.pl + geo.pr == 0;
        let (shape, taps) =
            if pointwise { (PhaseShape { h: geo.h, w: geo.w }, vec![0]) } else { phase_taps(geo) };
        let phases = if pointwise {
            Vec::new()
        } else {
            let phase_len = geo.sh * geo.sw * shape.h * shape.w;
            // Slack after the last plane: our products read whole vectors past a row's end.
            let mut phases = vec![0f32; self.n * self.c * phase_len + PHASE_SLACK];
            let (planes, _) = phases.split_at_mut(self.n * self.c * phase_len);
            let work = planes.len();
            for_each_chunk(
                planes,
                phase_len,
                work,
                || (),
                |_, plane, dst| {
                    if let Some(input) = xs.get(plane * plane_in..(plane + 1) * plane_in) {
                        write_phases(input, geo, shape, dst);
                    }
                },
            );
            phases
        };
        let source = Source {
            planes: if pointwise { xs } else { &phases },
            plane_len: if pointwise { plane_in } else { geo.sh * geo.sw * shape.h * shape.w },
            taps: &taps,
            phase_width: shape.w,
        };
        // Tiles: blocks of output rows (at least TILE_MIN_COLUMNS product columns where
        // the output has them), then blocks of output channels (whole weight panels), so each
        // tile holds about TILE_ELEMENTS products and, when the work is split, each thread
        // gets at least one tile. (Two per thread split ResNet's 512-channel 7x7 layers into
        // four products of 128 channels, each packing the same unfolded input again in the
        // gemm crate: resnet18 at two threads ran 23.3 -> 19.6 ms (best of 6) with one,
        // mobilenetv3 1.97 -> 1.88, cnn 0.099 -> 0.066.)
        let work = total.saturating_mul(k);
        let min_tiles = if parallel(work) { Team::current(Team::threads) } else { 1 };
        let row_width = shape.w;
        let narrowest = TILE_MIN_COLUMNS.div_ceil(row_width.max(1));
        let rows_per_tile =
            (TILE_ELEMENTS / (mg * row_width).max(1)).max(narrowest).clamp(1, geo.oh);
        // Split across threads, a 1x1 convolution of enough output channels with fewer
        // than two row tiles per thread cuts only its channels for them, not its rows: cut
        // by rows, its short products (as deep as its input channels) ran slower on two
        // threads than on one (MobileNetV3's 40 -> 240 channels on 14x14: 0.053 ms on one,
        // 0.093 on two in tiles of 7 rows, 0.028 in tiles of 120 channels). Fewer channels
        // than [`SPLIT_CHANNELS_MIN`] keep the rows' split, whose tiles are more even.
        let row_tiles = geo.oh.div_ceil(rows_per_tile);
        let row_threads = if pointwise && mg >= SPLIT_CHANNELS_MIN && row_tiles < 2 * min_tiles {
            1
        } else {
            min_tiles
        };
        let row_tiles = even_shares(geo.oh, row_tiles, row_threads, |rows| {
            rows * row_width >= TILE_MIN_COLUMNS / 2
        });
        let rows_per_tile = geo.oh.div_ceil(row_tiles);
        let tile_products = mg * rows_per_tile * row_width;
        let mut channel_tiles = tile_products.div_ceil(TILE_ELEMENTS);
        channel_tiles = channel_tiles.max(min_tiles.div_ceil(row_tiles));
        let panel = if self.lanes { lanes::panel() } else { panels::ROWS };
        let channels_per_tile = mg.div_ceil(channel_tiles.max(1)).next_multiple_of(panel).min(mg);
        let channel_tiles = mg.div_ceil(channels_per_tile.max(1));
        let per_group = row_tiles * channel_tiles;
        let tiles = self.n * self.g * per_group;
        let tile = |i: usize| {
            let (image_group, rest) = (i / per_group, i % per_group);
            let (row_tile, channel_tile) = (rest / channel_tiles, rest % channel_tiles);
            let channels = channel_tile * channels_per_tile;
            let rows = row_tile * rows_per_tile;
            Tile {
                image: image_group / self.g,
                group: image_group % self.g,
                channels,
                channel_count: channels_per_tile.min(mg - channels),
                rows,
                row_count: rows_per_tile.min(geo.oh - rows),
            }
        };
        let mut out: Vec<f32> = Vec::with_capacity(total);
        let out_addr = out.as_mut_ptr() as usize;
        let run_tile = |scratch: &mut TileScratch, i: usize| {
            // SAFETY: the tiles partition the output, so each writes its own elements of
            // `out` (allocated for `total`), and `tile_into` writes every one of them.
            unsafe { self.tile_into(tile(i), &source, ws, k, scratch, out_addr as *mut f32) }
        };
        if parallel(work) && tiles > 1 {
            Team::current(|team| team.for_each_init(tiles, TileScratch::default, run_tile));
        } else {
            let mut scratch = TileScratch::default();
            (0..tiles).for_each(|i| run_tile(&mut scratch, i));
        }
        // SAFETY: every tile wrote all its outputs, and the tiles cover all `total`.
        unsafe { out.set_len(total) };
        Ok(out)
    }

    /// Computes one tile and writes its outputs, every one of them, into `out`.
    ///
    /// # Safety
    ///
    /// `out` points to the `n x m x oh x ow` output, of which no other thread touches
    /// this tile's elements during the call.
    unsafe fn tile_into(
        &self,
        tile: Tile,
        source: &Source<'_>,
        ws: &[f32],
        k: usize,
        scratch: &mut TileScratch,
        out: *mut f32,
    ) {
        let geo = &self.geo;
        let (cg, mg) = (self.c / self.g, self.m / self.g);
        let p = geo.oh * geo.ow;
        let pw = source.phase_width;
        // The tile's columns of the product: output row r starts at column r * pw, and
        // the last `pw - ow` columns of each row are read by no output.
        let first = tile.rows * pw;
        let width = (tile.row_count - 1) * pw + geo.ow;
        let first_plane = tile.image * self.c + tile.group * cg;
        let first_channel = tile.group * mg + tile.channels;
        let out_plane = tile.image * self.m + first_channel;
        // SAFETY: within the output, by the contract above.
        let direct_at = unsafe { out.add(out_plane * p + first) };
        let lanes = self.lanes;
        let direct = pw == geo.ow
            && (!self.packed
                || (p.is_multiple_of(ALIGN_FLOATS)
                    && width.is_multiple_of(ALIGN_FLOATS)
                    && direct_at.align_offset(64) == 0));
        let (dst, dst_stride) = if lanes {
            // Written by `lanes::to_rows`, a channel's rows with no gaps, as the output's.
            // SAFETY: within the output, by the contract above.
            (unsafe { out.add(out_plane * p + tile.rows * geo.ow) }, p)
        } else if direct {
            // Rows as wide as the output's (and aligned, for ours): the product goes
            // straight into it.
            (direct_at, p)
        } else {
            // Not zeroed: the product writes every element before any is read.
            let row_stride = width.next_multiple_of(ALIGN_FLOATS);
            scratch.product.clear();
            scratch.product.reserve(tile.channel_count * row_stride + ALIGN_FLOATS);
            let start = scratch.product.as_ptr().align_offset(64).min(ALIGN_FLOATS);
            // SAFETY: `start` floats into the capacity reserved above.
            (unsafe { scratch.product.as_mut_ptr().add(start) }, row_stride)
        };
        if lanes {
            // Channels along the lanes: the product is blocks of `positions x` a panel's
            // channels, written into the output as its channels' rows.
            let positions = tile.row_count * geo.ow;
            let len = positions * tile.channel_count;
            scratch.unfolded_for = None;
            let mut product = std::mem::take(&mut scratch.lanes);
            product.clear();
            product.reserve(len);
            pulp::Arch::new().dispatch(lanes::LanesProduct {
                source,
                first_plane,
                first_row: tile.rows,
                rows: tile.row_count,
                width: geo.ow,
                weights: &ws[tile.group * mg * k..][..mg * k],
                mg,
                k,
                first: tile.channels,
                dst: &mut product.spare_capacity_mut()[..len],
                unfolded: &mut scratch.unfolded,
            });
            // SAFETY: the product wrote all `len` floats.
            unsafe { product.set_len(len) };
            // SAFETY: `dst` is the tile's outputs of its first channel, and its other
            // channels' `p` apart (the contract above).
            unsafe { lanes::to_rows(&product, positions, dst, dst_stride) };
            scratch.lanes = product;
        } else if self.packed {
            // Our products read each row where it lies in the phases (1x1 kernels, the
            // only ones read in place, are not packed).
            scratch.rows.clear();
            for plane in first_plane..first_plane + cg {
                let base = plane * source.plane_len + first;
                scratch.rows.extend(source.taps.iter().map(|&tap| base + tap));
            }
            let product = TileProduct {
                x: source.planes,
                rows: &scratch.rows,
                width,
                weights: &ws[tile.group * mg * k..][..mg * k],
                mg,
                k,
                first: tile.channels,
                channels: tile.channel_count,
                dst: Dst { ptr: dst, stride: dst_stride, accumulate: false },
            };
            // SAFETY: `dst` holds a `channel_count x width` block with rows `dst_stride`
            // apart, in the output (whole vectors wide) or in `product` (rows padded to
            // whole vectors), that only this call touches; `rhs` is the phases, with slack
            // after them for the whole vectors read past a row's end.
            unsafe { product.run() };
        } else {
            let rhs = match source.in_place(first_plane, cg, first, width) {
                Some(rhs) => rhs,
                None => {
                    let key = Some((tile.image, tile.group, tile.rows));
                    if scratch.unfolded_for != key {
                        source.unfold(first_plane, cg, first, width, &mut scratch.unfolded);
                        scratch.unfolded_for = key;
                    }
                    Operand { data: &scratch.unfolded, row_stride: width }
                }
            };
            let lhs = ws[first_channel * k..].as_ptr();
            // SAFETY: `lhs` holds `channel_count x k` weights from `first_channel` on
            // (checked in `run`), `rhs` a `k x width` operand (checked by `in_place` or made
            // by `unfold`), and `dst` is as above.
            unsafe {
                gemm_rows(
                    (tile.channel_count, width, k),
                    (dst, dst_stride),
                    false,
                    (lhs, k),
                    (rhs.data.as_ptr(), rhs.row_stride),
                )
            };
        }
        let finish = FinishTile {
            // SAFETY: the output plane of the tile's first channel (the contract above).
            out: unsafe { out.add(out_plane * p) },
            plane: p,
            first_row: tile.rows,
            width: geo.ow,
            from: (!direct && !lanes).then_some((dst, dst_stride, pw)),
            rows: tile.row_count,
            channels: tile.channel_count,
            bias: self.bias.and_then(|b| b.get(first_channel..first_channel + tile.channel_count)),
            // The residual has the output's layout (checked in `conv`).
            residual: self.residual.map(|r| r[out_plane * p..].as_ptr()),
            act: self.activation,
        };
        // SAFETY: the product wrote `dst` (in the output when `direct`); the tile's outputs
        // are this call's alone.
        unsafe { finish.run() };
    }
}

/// Adds the bias and applies the activation to one tile's outputs of a [`GroupedConv`]:
/// in place when its product went straight into the output, else copied from the
/// product's rows. One dispatch for the whole tile, so a 7x7 map's short rows do not
/// each pay for one.
struct FinishTile<'a> {
    /// The output plane of the tile's first channel; each channel's `plane` floats apart.
    out: *mut f32,
    plane: usize,
    /// The tile's first output row, and how many it has of `width` outputs each.
    first_row: usize,
    rows: usize,
    width: usize,
    /// The product when it is not in the output: its first element, the distance
    /// between channels, and between output rows (the phase width).
    from: Option<(*const f32, usize, usize)>,
    channels: usize,
    /// One per channel of the tile, or none.
    bias: Option<&'a [f32]>,
    /// Laid out as `out`: the residual of the tile's first channel's plane.
    residual: Option<*const f32>,
    act: Option<Activation>,
}

impl FinishTile<'_> {
    /// # Safety
    ///
    /// `out` must be valid for the tile's outputs (`channels` planes, rows `first_row ..
    /// first_row + rows`), which nothing else touches during the call; `from`, when
    /// given, valid for reads of every product element that becomes an output, and
    /// `residual` for reads of the elements at the tile's outputs' places.
    unsafe fn run(self) {
        pulp::Arch::new().dispatch(self);
    }
}

impl pulp::WithSimd for FinishTile<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let span = self.rows * self.width;
        for ch in 0..self.channels {
            let bias = self.bias.and_then(|b| b.get(ch)).copied().unwrap_or(0.0);
            // SAFETY: this channel's rows of the tile (the contract of `run`).
            let offset = ch * self.plane + self.first_row * self.width;
            // SAFETY: as above.
            let at = unsafe { self.out.add(offset) };
            // SAFETY: this channel's rows of the tile in the residual (the contract).
            let add = |from: usize, len: usize| {
                self.residual
                    .map(|r| unsafe { std::slice::from_raw_parts(r.add(offset + from), len) })
            };
            let finish = |values, from, add| Finish { values, from, add, bias, act: self.act };
            match self.from {
                None => {
                    // SAFETY: as above; the product left the tile's outputs here.
                    let values = unsafe { std::slice::from_raw_parts_mut(at, span) };
                    pulp::WithSimd::with_simd(finish(values, None, add(0, span)), simd);
                }
                Some((from, stride, pitch)) => {
                    // Rows of the product as wide as the output's follow one another, so
                    // the channel's rows move in one run.
                    let (row_len, count, step) = if pitch == self.width {
                        (span, 1, 0)
                    } else {
                        (self.width, self.rows, pitch)
                    };
                    for r in 0..count {
                        // SAFETY: row `r` of the channel, in the product and in the output
                        // (the contract of `run`).
                        let (src, dst) = unsafe {
                            (
                                std::slice::from_raw_parts(
                                    from.add(ch * stride + r * step),
                                    row_len,
                                ),
                                std::slice::from_raw_parts_mut(at.add(r * self.width), row_len),
                            )
                        };
                        let add = add(r * self.width, row_len);
                        pulp::WithSimd::with_simd(finish(dst, Some(src), add), simd);
                    }
                }
            }
        }
    }
}

/// Where the columns of a convolution's unfolded input are read from: the input planes
/// themselves (1x1 kernels) or their stride phases.
struct Source<'a> {
    planes: &'a [f32],
    plane_len: usize,
    /// Where each kernel tap starts reading in a plane.
    taps: &'a [usize],
    phase_width: usize,
}

/// A matrix operand: its elements from the first on, and the distance between its rows.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    row_stride: usize,
}

impl Source<'_> {
    /// With one tap, the unfolded input is the planes themselves, read in place.
    fn in_place(
        &self,
        first_plane: usize,
        planes: usize,
        first: usize,
        width: usize,
    ) -> Option<Operand<'_>> {
        let &[tap] = self.taps else { return None };
        let start = first_plane * self.plane_len + tap + first;
        let last_row = start + planes.checked_sub(1)? * self.plane_len;
        let data = self.planes.get(start..last_row + width)?;
        Some(Operand { data, row_stride: self.plane_len })
    }

    /// Columns `first .. first + width` of the unfolded input of `planes` planes from
    /// `first_plane` on, into `into` (`planes * taps` rows of `width`).
    fn unfold(
        &self,
        first_plane: usize,
        planes: usize,
        first: usize,
        width: usize,
        into: &mut Vec<f32>,
    ) {
        let total = planes * self.taps.len() * width;
        into.clear();
        into.reserve(total);
        let dst = into.spare_capacity_mut().as_mut_ptr().cast::<f32>();
        let mut at = 0;
        for plane in first_plane..first_plane + planes {
            let base = plane * self.plane_len + first;
            for &tap in self.taps {
                // SAFETY: rows `at .. at + width` are within the `total` reserved above.
                let row = unsafe { dst.add(at) };
                match self.planes.get(base + tap..base + tap + width) {
                    // SAFETY: as above; `into`'s buffer is not `self.planes`.
                    Some(run) => unsafe { copy_to(row, run) },
                    // Not reached for a geometry from `phase_taps`; keeps the rows aligned.
                    // SAFETY: as above.
                    None => (0..width).for_each(|i| unsafe { row.add(i).write(0.0) }),
                }
                at += width;
            }
        }
        // SAFETY: every one of the `total` floats was written above.
        unsafe { into.set_len(total) };
    }
}

/// Floats in 64 bytes: the rows of our products' output start this far apart (or a
/// multiple of it) on a 64-byte boundary, so a vector store never straddles two cache
/// lines, and whole vectors past a row's end land in its padding.
const ALIGN_FLOATS: usize = 16;

/// Rows of the operands summed per pass over a tile's product: 64 columns of that many
/// input rows are 32 KiB and stay in L1 while every panel of weights is applied to them.
const DEPTH_BLOCK: usize = 128;

/// One tile's product: `dst` (`channels x width`) = the weights of `channels` output
/// channels of a group, from its channel `first` on (the group's `mg x k` weights in
/// panels, see [`pack_weights`]), times the tile's unfolded input (`k x width`), whose
/// rows are read where they lie in the stride phases, not copied out first.
///
/// Output positions run along the vector lanes: 4 (where [`panels::four_wide`]), 2 and 1
/// vectors at a time, the last reaching into the rows' padding; each panel of weights
/// gives a block's rows. The sum over `k` is cut into [`DEPTH_BLOCK`]s, each added to the
/// last, so a block of the input stays in L1.
struct TileProduct<'a> {
    /// The phases: row `r` of the unfolded input starts at `x[rows[r]]`.
    x: &'a [f32],
    rows: &'a [usize],
    width: usize,
    weights: &'a [f32],
    mg: usize,
    k: usize,
    first: usize,
    channels: usize,
    dst: Dst,
}

impl TileProduct<'_> {
    /// # Safety
    ///
    /// `dst` must be valid for writes of `channels` rows of `width` floats rounded up to
    /// whole vectors of 16, rows `dst.stride` apart, which nothing else touches during the
    /// call. (Each row of `x` is read as far: past its end when `width` is not whole
    /// vectors, and those sums land in `dst`'s padding; a read past the end of `x`
    /// panics.)
    unsafe fn run(self) {
        pulp::Arch::new().dispatch(self);
    }

    /// Columns `i .. i + MR * lanes` of every channel, for the operands' rows `k0 .. k0 +
    /// depth`: that block of the input stays in L1 while every panel of weights is applied
    /// to it.
    #[inline(always)]
    fn columns<S: pulp::Simd, const MR: usize>(
        &self,
        simd: S,
        (k0, depth): (usize, usize),
        i: usize,
        reach: usize,
    ) {
        let end = self.first + self.channels;
        for start in (self.first..end).step_by(panels::ROWS) {
            let panel_width = panels::ROWS.min(self.mg - start);
            let ops = Operands {
                a: self.x,
                a_stride: 0,
                a_rows: Some(ListedRows { starts: &self.rows[k0..k0 + depth], reach }),
                b: &self.weights[start * self.k + k0 * panel_width..],
                b_stride: panel_width,
                b_step: 1,
                depth,
            };
            let dst = Dst {
                // SAFETY: row `start - first` of the caller's block (see `run`).
                ptr: unsafe { self.dst.ptr.add((start - self.first) * self.dst.stride) },
                stride: self.dst.stride,
                accumulate: k0 > 0,
            };
            let rows = panel_width.min(end - start);
            // SAFETY: the block lies within the rows and columns `run` was given, and
            // when `k0 > 0` the pass over the earlier rows wrote it; `reach` is the
            // largest of all the rows.
            unsafe { panels::block_rows::<S, MR>(simd, ops, (i, 0), rows, dst) };
        }
    }
}

impl pulp::WithSimd for TileProduct<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        let reach = self.rows.iter().copied().max().unwrap_or(0);
        let passes = self.k.div_ceil(DEPTH_BLOCK);
        let mut k0 = 0;
        while k0 < self.k {
            let rows = (k0, self.k.div_ceil(passes).min(self.k - k0));
            let mut i = 0;
            while panels::four_wide::<S>() && i + 4 * lanes <= self.width {
                self.columns::<S, 4>(simd, rows, i, reach);
                i += 4 * lanes;
            }
            while i + 2 * lanes <= self.width {
                self.columns::<S, 2>(simd, rows, i, reach);
                i += 2 * lanes;
            }
            // The last vector may reach into the rows' padding (see `run`).
            while i < self.width {
                self.columns::<S, 1>(simd, rows, i, reach);
                i += lanes;
            }
            k0 += rows.1;
        }
    }
}

/// Adds a bias (and a residual) to a run of outputs and applies the activation, compiled
/// for the CPU's vector width: in place, or read from `from` (a product row) as it writes
/// `values`, so a row is moved and finished in one pass.
struct Finish<'a> {
    values: &'a mut [f32],
    from: Option<&'a [f32]>,
    /// Added after the bias, before the activation: as long as `values`.
    add: Option<&'a [f32]>,
    bias: f32,
    act: Option<Activation>,
}

impl Finish<'_> {
    /// The outputs of the vector at `i`: `x + bias (+ r)`, as the scalar pass adds, then
    /// the activation. `ADD` says whether there is a residual `r` at `add`.
    ///
    /// # Safety
    ///
    /// `src`, and with `ADD` `add`, are valid for reads of the vector at `i`.
    #[inline(always)]
    unsafe fn vector<S: pulp::Simd, const ADD: bool>(
        simd: S,
        (src, add): (*const f32, *const f32),
        i: usize,
        bias: S::f32s,
        act: impl Lanewise,
    ) -> S::f32s {
        // SAFETY: the contract.
        let x = simd.add_f32s(unsafe { src.add(i).cast::<S::f32s>().read_unaligned() }, bias);
        let x = match ADD {
            // SAFETY: the contract.
            true => simd.add_f32s(x, unsafe { add.add(i).cast::<S::f32s>().read_unaligned() }),
            false => x,
        };
        act.vector(simd, x)
    }

    /// The whole vectors of a pass over `len >= lanes` outputs at `out`, two at a time:
    /// with one branch per vector chosen in the loop (the residual, or the activation),
    /// the loop took two taken jumps per vector and ran at half the speed of stores.
    ///
    /// # Safety
    ///
    /// `out` is valid for writes of `len` floats, and `reads` as for [`Finish::vector`]
    /// for each vector of them; `len` is at least one vector.
    #[inline(always)]
    unsafe fn vectors<S: pulp::Simd, const ADD: bool>(
        simd: S,
        out: *mut f32,
        reads: (*const f32, *const f32),
        len: usize,
        bias: S::f32s,
        act: impl Lanewise,
    ) {
        let lanes = S::F32_LANES;
        // A run that is not whole vectors ends with a vector that overlaps the one before
        // it. It is computed first, from the values as they were, so finishing in place
        // does not finish its overlap twice: rows of 7, 14 or 28 stay in whole vectors.
        // SAFETY (all): `i + lanes <= len`, within `out` and `reads` (the contract).
        unsafe {
            let last = Self::vector::<S, ADD>(simd, reads, len - lanes, bias, act);
            let mut i = 0;
            while i + 2 * lanes <= len {
                let a = Self::vector::<S, ADD>(simd, reads, i, bias, act);
                let b = Self::vector::<S, ADD>(simd, reads, i + lanes, bias, act);
                out.add(i).cast::<S::f32s>().write_unaligned(a);
                out.add(i + lanes).cast::<S::f32s>().write_unaligned(b);
                i += 2 * lanes;
            }
            if i + lanes <= len {
                let a = Self::vector::<S, ADD>(simd, reads, i, bias, act);
                out.add(i).cast::<S::f32s>().write_unaligned(a);
            }
            out.add(len - lanes).cast::<S::f32s>().write_unaligned(last);
        }
    }

    /// The pass, with the activation `vector` on whole vectors.
    #[inline(always)]
    fn run<S: pulp::Simd>(self, simd: S, vector: impl Lanewise) {
        let Finish { values, from, add, bias, act } = self;
        let len = values.len().min(from.map_or(usize::MAX, <[f32]>::len));
        let len = len.min(add.map_or(usize::MAX, <[f32]>::len));
        if len < S::F32_LANES {
            for i in 0..len {
                // Not `map_or(values[i], ..)`: with `from`, `values` may not be written yet.
                let x = match from {
                    Some(f) => f[i],
                    None => values[i],
                } + bias;
                let x = add.map_or(x, |a| x + a[i]);
                values[i] = act.map_or(x, |act| act.apply(x));
            }
            return;
        }
        let out = values.as_mut_ptr();
        let src = from.map_or(out.cast_const(), <[f32]>::as_ptr);
        let bias = simd.splat_f32s(bias);
        // SAFETY: `len` floats of `values`, `from` and `add`, and at least one vector.
        unsafe {
            match add {
                Some(add) => {
                    Self::vectors::<S, true>(simd, out, (src, add.as_ptr()), len, bias, vector)
                }
                None => Self::vectors::<S, false>(simd, out, (src, src), len, bias, vector),
            }
        }
    }
}

impl pulp::WithSimd for Finish<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        match self.act {
            None => self.run(simd, Linear),
            Some(Activation::Relu) => self.run(simd, Relu),
            Some(Activation::HardSwish) => self.run(simd, HardSwish),
            Some(Activation::HardSigmoid { alpha, beta }) => {
                self.run(simd, HardSigmoid { alpha, beta })
            }
            Some(Activation::Clip { min, max }) => self.run(simd, Clip { min, max }),
        }
    }
}

/// Adds `residual` to `out` (as long) and applies `act`, across the engine's threads: the
/// second pass of a fused residual Add on a kernel that does not take it in its own.
pub(crate) fn add_residual(out: &mut [f32], residual: &[f32], act: Option<Activation>) {
    const CHUNK: usize = 1 << 14;
    let len = out.len();
    for_each_chunk(
        out,
        CHUNK,
        len,
        || (),
        |_, index, values| {
            let add = residual.get(index * CHUNK..index * CHUNK + values.len());
            pulp::Arch::new().dispatch(Finish { values, from: None, add, bias: 0.0, act });
        },
    );
}

/// Below this many multiply-adds a matmul runs on the calling thread: splitting it costs
/// more than it saves.
const GEMM_PARALLEL_MIN_WORK: usize = 1 << 18;

/// `c = a b`, or `c += a b` when `accumulate`, for row-major `a` (`m x k`), `b` (`k x n`)
/// and `c` (`m x n`), with the gemm kernels candle-core itself uses. Unlike candle's
/// matmul it writes into a buffer the caller owns, so a convolution's output needs no
/// second pass to add its bias.
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    accumulate: bool,
) -> R<()> {
    let size = |x: usize, y: usize| x.checked_mul(y).ok_or_else(|| err("matmul size overflows"));
    let (a_len, b_len, c_len) = (size(m, k)?, size(k, n)?, size(m, n)?);
    if a.len() < a_len || b.len() < b_len || c.len() < c_len {
        return Err(err(format!(
            "matmul of {m}x{k} by {k}x{n} got buffers of {}, {} and {} elements",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.iter_mut().take(c_len).for_each(|v| *v = 0.0);
        }
        return Ok(());
    }
    let threads = Team::current(Team::threads);
    let work = c_len.saturating_mul(k);
    let whole = Block { rows: 0, row_count: m, cols: 0, col_count: n };
    if !Team::current(|team| team.worth_splitting(work, GEMM_PARALLEL_MIN_WORK)) {
        // SAFETY: the block is all of `c`, which the caller lent out mutably.
        unsafe { gemm_block(m, n, k, a, b, c.as_mut_ptr(), whole, accumulate) };
        return Ok(());
    }
    // Each thread computes its own block of `c`: of columns when there are enough (a
    // convolution's product), else of rows (output channels).
    let blocks: Vec<Block> = if n >= COLUMN_SPLIT_MIN * threads {
        let width = n.div_ceil(threads).next_multiple_of(16);
        (0..n)
            .step_by(width)
            .map(|cols| Block { cols, col_count: width.min(n - cols), ..whole })
            .collect()
    } else {
        let height = m.div_ceil(threads).next_multiple_of(8);
        (0..m)
            .step_by(height)
            .map(|rows| Block { rows, row_count: height.min(m - rows), ..whole })
            .collect()
    };
    let c_addr = c.as_mut_ptr() as usize;
    Team::current(|team| {
        team.for_each_init(
            blocks.len(),
            || (),
            |_, i| {
                if let Some(&block) = blocks.get(i) {
                    // SAFETY: the blocks are disjoint and within `c`, so no two threads write
                    // the same element of `c`, which the caller lent out mutably.
                    unsafe { gemm_block(m, n, k, a, b, c_addr as *mut f32, block, accumulate) };
                }
            },
        )
    });
    Ok(())
}

/// Below this many columns per thread, [`sgemm`] splits a product by rows.
const COLUMN_SPLIT_MIN: usize = 64;

/// Rows `rows .. rows + row_count` and columns `cols .. cols + col_count` of a product.
#[derive(Debug, Clone, Copy)]
struct Block {
    rows: usize,
    row_count: usize,
    cols: usize,
    col_count: usize,
}

/// One block of `c = a b` (or `c += a b`), for row-major `a` (`m x k`), `b` (`k x n`)
/// and `c` (`m x n`), with the gemm kernels candle-core itself uses, on this thread.
///
/// # Safety
///
/// `a` and `b` hold at least `m*k` and `k*n` elements, `c` points to `m*n` elements of
/// which nothing else reads or writes the block's during the call, and the block lies
/// within `m x n`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    block: Block,
    accumulate: bool,
) {
    debug_assert!(block.rows + block.row_count <= m && block.cols + block.col_count <= n);
    // SAFETY: by the contract above, the strides address row-major matrices of exactly
    // those shapes, offset to the block's first row and column, so every access is in
    // bounds.
    unsafe {
        gemm_rows(
            (block.row_count, block.col_count, k),
            (c.add(block.rows * n + block.cols), n),
            accumulate,
            (a.as_ptr().add(block.rows * k), k),
            (b.as_ptr().add(block.cols), n),
        )
    }
}

/// `dst = lhs rhs`, or `dst += lhs rhs` when `accumulate`, on this thread with the gemm
/// kernels candle-core itself uses, for `(m, n, k)` row-major operands each given as its
/// first element and the distance between its rows.
///
/// # Safety
///
/// `lhs` addresses `m` rows of `k` elements, `rhs` `k` rows of `n` and `dst` `m` rows of
/// `n`, each at its row distance, and nothing else reads or writes `dst`'s elements
/// during the call.
unsafe fn gemm_rows(
    (m, n, k): (usize, usize, usize),
    (dst, dst_stride): (*mut f32, usize),
    accumulate: bool,
    (lhs, lhs_stride): (*const f32, usize),
    (rhs, rhs_stride): (*const f32, usize),
) {
    // SAFETY: by the contract above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            accumulate,
            lhs,
            1,
            lhs_stride as isize,
            rhs,
            1,
            rhs_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Depthwise convolution: each output channel reads one input channel. `packed`: the
/// weights were laid out by [`pack_depthwise`] at load time.
///
/// Where [`blocked::supports`] the geometry, blocks of channels run at once, each tap of
/// each output one multiply-add of whole vectors. Elsewhere each input plane is first
/// copied, zero-padded, into `sh x sw` phases (phase `(ry, rx)` holds the padded rows
/// `ry + i sh` and columns `rx + j sw`). In those, every kernel tap reads one contiguous
/// run for the whole plane, at any stride, computed on rows as wide as a phase (the few
/// extra columns are dropped at the end): one long multiply-add per tap, which vectorizes
/// even on 7x7 planes where a per-row loop would not.
fn depthwise(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    (n, c, m): (usize, usize, usize),
    geo: Geom,
    activation: Option<Activation>,
    packed: bool,
) -> R<Vec<f32>> {
    let mult = m / c.max(1);
    let plane_in = geo.h * geo.w;
    let p = geo.oh * geo.ow;
    let kk = geo.kh * geo.kw;
    let bias: Vec<f32> = match b {
        Some(b) => b.to_vec1()?,
        None => vec![0.0; m],
    };
    let arch = pulp::Arch::new();
    #[cfg(target_arch = "x86_64")]
    if mult == 1 && blocked::supports(&geo) {
        let total = n * m * p;
        // Not zeroed: the blocks write every output (a pass of its own over the output
        // took 5% of MobileNetV3's 72-channel 56x56 -> 28x28 layer).
        let mut out: Vec<f32> = Vec::with_capacity(total);
        // SAFETY: the output's capacity, of which every float is written (each block's
        // planes by `blocked::Block`) before it is read or the length is set.
        let planes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr(), total) };
        let block = blocked::lanes();
        with_f32(w, |weights| {
            with_f32(x, |xs| {
                let (Some(xs), Some(weights)) = (xs.get(..n * c * plane_in), weights.get(..c * kk))
                else {
                    return Err(err("Conv input or weight is shorter than its shape"));
                };
                // Weights that are not constants are laid out here, on every call.
                let weights = match packed {
                    true => std::borrow::Cow::Borrowed(weights),
                    false => std::borrow::Cow::Owned(pack_depthwise(weights, c, kk, block)),
                };
                for (image, out) in planes.chunks_exact_mut(m * p).enumerate() {
                    let xs = &xs[image * c * plane_in..][..c * plane_in];
                    let run = |_: &mut (), index: usize, out: &mut [f32]| {
                        let first = index * block;
                        let channels = out.len() / p;
                        blocked::with_scratch(|scratch| {
                            arch.dispatch(blocked::Block {
                                input: &xs[first * plane_in..][..channels * plane_in],
                                weights: &weights[first * kk..][..channels * kk],
                                bias: &bias[first..first + channels],
                                geo: &geo,
                                scratch,
                                out,
                                activation,
                            })
                        });
                    };
                    for_each_chunk(out, block * p, m * p * kk, || (), run);
                }
                Ok(())
            })
        })?;
        // SAFETY: every block was written (above).
        unsafe { out.set_len(total) };
        return Ok(out);
    }
    let (shape, taps) = phase_taps(&geo);
    let total = n * m * p;
    // Not zeroed: every plane is written whole below (a pass of its own over the output,
    // on one thread, which took a tenth of MobileNetV3's 88-channel 28x28 layer).
    let mut out: Vec<f32> = Vec::with_capacity(total);
    with_f32(w, |weights| {
        with_f32(x, |xs| {
            let (Some(xs), Some(weights)) = (xs.get(..n * c * plane_in), weights.get(..m * kk))
            else {
                return Err(err("Conv input or weight is shorter than its shape"));
            };
            // Packed weights on a plane too large for blocks: back to one kernel per
            // channel, once per call (a few hundred floats beside a plane of thousands).
            let weights = match (packed, depthwise_block()) {
                (false, _) => std::borrow::Cow::Borrowed(weights),
                (true, Some(block)) => {
                    std::borrow::Cow::Owned(unpack_depthwise(weights, m, kk, block))
                }
                (true, None) => return Err(err("depthwise weights packed for another CPU")),
            };
            let plane = |scratch: &mut (Phases, Vec<f32>), index: usize, out: &mut [f32]| {
                let (ni, mi) = (index / m, index % m);
                // Within `xs` and `weights` (their lengths checked above): `ni < n`, `mi <
                // m` and `mi / mult < c`.
                let base = (ni * c + mi / mult.max(1)) * plane_in;
                arch.dispatch(DepthwisePlane {
                    input: &xs[base..base + plane_in],
                    weights: &weights[mi * kk..(mi + 1) * kk],
                    taps: &taps,
                    bias: bias.get(mi).copied().unwrap_or(0.0),
                    geo: &geo,
                    shape,
                    scratch,
                    out,
                    activation,
                });
            };
            // SAFETY: the output's capacity, of which every float is written (each plane by
            // `depthwise_plane`, which finishes every row of it from the taps' sums)
            // before it is read or the length is set.
            let planes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr(), total) };
            for_each_chunk(planes, p, n * m * p * kk, Default::default, plane);
            Ok(())
        })
    })?;
    // SAFETY: every plane was written (above).
    unsafe { out.set_len(total) };
    Ok(out)
}

/// The phase shape of `geo`'s windows, and where each kernel tap starts reading in the
/// phases (see [`pad_phases`]).
fn phase_taps(geo: &Geom) -> (PhaseShape, Vec<usize>) {
    let shape = PhaseShape {
        h: geo.oh + ((geo.kh - 1) * geo.dh) / geo.sh,
        w: geo.ow + ((geo.kw - 1) * geo.dw) / geo.sw,
    };
    let taps = (0..geo.kh * geo.kw)
        .map(|t| {
            let (row, col) = ((t / geo.kw) * geo.dh, (t % geo.kw) * geo.dw);
            let phase = (row % geo.sh) * geo.sw + col % geo.sw;
            phase * shape.h * shape.w + (row / geo.sh) * shape.w + col / geo.sw
        })
        .collect();
    (shape, taps)
}

/// True for the most common downsampling window: 2x2, stride 2, no padding, no
/// dilation, and no partial window at the edges.
fn is_plain_2x2(geo: &Geom) -> bool {
    (geo.kh, geo.kw, geo.sh, geo.sw, geo.dh, geo.dw) == (2, 2, 2, 2, 1, 1)
        && geo.pt + geo.pb + geo.pl + geo.pr == 0
        && (1..=geo.h / 2).contains(&geo.oh)
        && (1..=geo.w / 2).contains(&geo.ow)
}

/// One output plane of a 2x2, stride-2 MaxPool ([`is_plain_2x2`]) straight from the input
/// rows, without the stride phases: each output is the largest of its four inputs, or NaN
/// if one is NaN ([`max_or_nan`]).
fn max_pool_2x2(input: &[f32], geo: &Geom, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        if unsafe { max_pool_2x2_avx2(input, geo, out) } {
            return;
        }
    }
    for (oy, row) in out.chunks_exact_mut(geo.ow).enumerate() {
        let (Some(top), Some(bottom)) = (
            input.get(2 * oy * geo.w..2 * oy * geo.w + 2 * geo.ow),
            input.get((2 * oy + 1) * geo.w..(2 * oy + 1) * geo.w + 2 * geo.ow),
        ) else {
            return;
        };
        for ((o, t), b) in row.iter_mut().zip(top.chunks_exact(2)).zip(bottom.chunks_exact(2)) {
            *o = max_or_nan(max_or_nan(max_or_nan(t[0], t[1]), b[0]), b[1]);
        }
    }
}

/// [`max_pool_2x2`] on AVX2, 8 outputs at a time: the larger of the two rows' 16
/// floats, split into their even and odd columns (as [`write_phases_avx2`] splits them),
/// and the larger of those. `false`, having written nothing, on rows of fewer than 8
/// outputs. The cnn's two pools (16 planes of 32x32, 32 of 16x16; one thread, lowest of
/// 4 alternating profiles): 3.1 -> 1.9 and 2.0 -> 1.4 µs, against the scalar loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn max_pool_2x2_avx2(input: &[f32], geo: &Geom, out: &mut [f32]) -> bool {
    use std::arch::x86_64::{
        __m256, _mm256_blendv_ps, _mm256_castpd_ps, _mm256_castps_pd, _mm256_cmp_ps,
        _mm256_loadu_ps, _mm256_or_ps, _mm256_permute4x64_pd, _mm256_shuffle_ps, _mm256_storeu_ps,
        _CMP_GT_OQ, _CMP_UNORD_Q,
    };
    let ow = geo.ow;
    if ow < 8 {
        return false;
    }
    // [`max_or_nan`], lane by lane.
    let fold = |acc: __m256, v: __m256| {
        let take =
            _mm256_or_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(v, acc), _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        _mm256_blendv_ps(acc, v, take)
    };
    let order = |v| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
    for (oy, row) in out.chunks_exact_mut(ow).enumerate() {
        let (Some(top), Some(bottom)) = (
            input.get(2 * oy * geo.w..2 * oy * geo.w + 2 * ow),
            input.get((2 * oy + 1) * geo.w..(2 * oy + 1) * geo.w + 2 * ow),
        ) else {
            return true;
        };
        for j in covering_steps(ow, 8) {
            // SAFETY: floats `2j .. 2j + 16 <= 2 ow` of `top` and `bottom`, outputs `j ..
            // j + 8 <= ow` of `row`; AVX2 is enabled.
            unsafe {
                let load = |s: &[f32], at: usize| _mm256_loadu_ps(s.as_ptr().add(at));
                let a = fold(load(top, 2 * j), load(bottom, 2 * j));
                let b = fold(load(top, 2 * j + 8), load(bottom, 2 * j + 8));
                // Even and odd columns, as in `write_phases_avx2`.
                let (e, o) = (_mm256_shuffle_ps::<0x88>(a, b), _mm256_shuffle_ps::<0xDD>(a, b));
                _mm256_storeu_ps(row.as_mut_ptr().add(j), fold(order(e), order(o)));
            }
        }
    }
    true
}

/// One output plane of a MaxPool, on the stride phases like [`depthwise_plane`].
struct MaxPoolPlane<'a> {
    input: &'a [f32],
    taps: &'a [usize],
    /// One unused parameter per tap, for [`over_taps`].
    zeros: &'a [f32],
    geo: &'a Geom,
    shape: PhaseShape,
    scratch: &'a mut (Phases, Vec<f32>),
    out: &'a mut [f32],
}

impl pulp::WithSimd for MaxPoolPlane<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let MaxPoolPlane { input, taps, zeros, geo, shape, scratch, out } = self;
        let (phases, acc) = scratch;
        // Padding never wins; a NaN in the window does (docs/decisions.md, MaxPool).
        pad_phases(simd, input, geo, shape, phases, f32::NEG_INFINITY);
        let len = (geo.oh - 1) * shape.w + geo.ow;
        acc.resize(len.next_multiple_of(S::F32_LANES), 0.0);
        over_taps(simd, phases, taps, zeros, acc, f32::NEG_INFINITY, MaxOrNan);
        for (dst, src) in out.chunks_exact_mut(geo.ow).zip(acc.chunks(shape.w)) {
            copy_row_in(simd, dst, src);
        }
    }
}

/// Rows and columns of one stride phase of a padded plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PhaseShape {
    h: usize,
    w: usize,
}

/// One output plane of [`depthwise`]; `scratch` holds the phases and the wide accumulator.
struct DepthwisePlane<'a> {
    input: &'a [f32],
    weights: &'a [f32],
    taps: &'a [usize],
    bias: f32,
    geo: &'a Geom,
    shape: PhaseShape,
    scratch: &'a mut (Phases, Vec<f32>),
    out: &'a mut [f32],
    activation: Option<Activation>,
}

impl pulp::WithSimd for DepthwisePlane<'_> {
    type Output = ();

    // Inlined into pulp's per-ISA entry points, so the loops compile for the vector width
    // of the CPU it runs on (a closure would not be inlined there).
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        depthwise_plane(simd, self)
    }
}

#[inline(always)]
fn depthwise_plane<S: pulp::Simd>(simd: S, job: DepthwisePlane<'_>) {
    let DepthwisePlane { input, weights, taps, bias, geo, shape, scratch, out, activation } = job;
    let (phases, acc) = scratch;
    pad_phases(simd, input, geo, shape, phases, 0.0);
    let len = (geo.oh - 1) * shape.w + geo.ow;
    acc.resize(len.next_multiple_of(S::F32_LANES), 0.0);
    over_taps(simd, phases, taps, weights, acc, bias, MulAdd);
    // The activation chosen once per row, not per element, so each row's loop vectorizes.
    for (values, from) in out.chunks_exact_mut(geo.ow).zip(acc.chunks(shape.w)) {
        let from = Some(&from[..geo.ow]);
        pulp::WithSimd::with_simd(
            Finish { values, from, add: None, bias: 0.0, act: activation },
            simd,
        );
    }
}

/// One step of [`over_taps`]: folds a tap's value `v` into the running `acc`, given the
/// tap's parameter.
trait TapFold: Copy {
    fn vector<S: pulp::Simd>(self, simd: S, acc: S::f32s, param: S::f32s, v: S::f32s) -> S::f32s;
}

/// `acc + param * v`: a depthwise convolution's taps.
#[derive(Clone, Copy)]
struct MulAdd;

impl TapFold for MulAdd {
    #[inline(always)]
    fn vector<S: pulp::Simd>(self, simd: S, acc: S::f32s, param: S::f32s, v: S::f32s) -> S::f32s {
        simd.mul_add_e_f32s(param, v, acc)
    }
}

/// The larger of `acc` and `v`, and `v` when it is NaN (as onnxruntime's MaxPool).
#[derive(Clone, Copy)]
struct MaxOrNan;

/// `v` if it is larger than `acc` or NaN, else `acc`: [`MaxOrNan`] on one float.
fn max_or_nan(acc: f32, v: f32) -> f32 {
    if v > acc || v.is_nan() {
        v
    } else {
        acc
    }
}

impl TapFold for MaxOrNan {
    #[inline(always)]
    fn vector<S: pulp::Simd>(self, simd: S, acc: S::f32s, _: S::f32s, v: S::f32s) -> S::f32s {
        let take =
            simd.or_m32s(simd.greater_than_f32s(v, acc), simd.not_m32s(simd.equal_f32s(v, v)));
        simd.select_f32s(take, v, acc)
    }
}

/// Folds every tap's run of `phases` into `acc`: `acc[o] = fold(.. fold(fold(init,
/// params[0], phases[taps[0] + o]), params[1], phases[taps[1] + o]) ..)`. Outputs are taken
/// eight vectors at a time ([`tap_block`]), then four, then one at a time. `acc` is whole
/// vectors long, and `phases` must have [`PHASE_SLACK`] floats after the last tap's run.
///
/// # Panics
///
/// If a tap's run reaches past `phases`, `acc` is not whole vectors long, or there is not
/// one parameter per tap.
#[inline(always)]
fn over_taps<S: pulp::Simd>(
    simd: S,
    phases: &[f32],
    taps: &[usize],
    params: &[f32],
    acc: &mut [f32],
    init: f32,
    fold: impl TapFold,
) {
    let lanes = S::F32_LANES;
    let len = acc.len();
    let start_value = simd.splat_f32s(init);
    // Every read is checked once, here, and the steps run on pointers: with a check on
    // each tap's run, the loop spent more instructions on them than on the sums.
    let reach = taps.iter().max().map_or(0, |&start| start + len);
    assert!(
        reach <= phases.len() && len.is_multiple_of(lanes) && params.len() == taps.len(),
        "the taps read past the phases, or the sums are not whole vectors"
    );
    let (src, dst) = (phases.as_ptr(), acc.as_mut_ptr());
    // Every block below reads `start + o + V lanes <= reach <= phases.len()` floats for
    // each tap and writes `o + V lanes <= len`, within `acc`.
    let mut o = 0;
    while o + 8 * lanes <= len {
        // SAFETY: as above.
        unsafe { tap_block::<S, 8>(simd, src, dst, o, taps, params, start_value, fold) };
        o += 8 * lanes;
    }
    if o + 4 * lanes <= len {
        // SAFETY: as above.
        unsafe { tap_block::<S, 4>(simd, src, dst, o, taps, params, start_value, fold) };
        o += 4 * lanes;
    }
    // The rest one vector at a time, whole vectors even past `len`: `acc` is rounded up to
    // whole vectors and the phases have slack after them, so the few extra sums are read
    // from the padding and never copied out (pulp's partial loads are calls, one per
    // vector, and cost small planes most of their time).
    while o < len {
        // SAFETY: as above.
        unsafe { tap_block::<S, 1>(simd, src, dst, o, taps, params, start_value, fold) };
        o += lanes;
    }
}

/// The sums of [`over_taps`] for the `V` vectors of outputs from `o`, held in registers
/// across all taps, so each tap costs one load per vector and no store. Eight vectors
/// keep more multiply-adds in flight than four did (one thread, AVX2, best of 3
/// alternations: a 56x56 plane's 3x3 taps at stride 2, 0.47 against 0.52 us; a 112x112
/// plane's, 1.16 against 1.27; a 28x28 plane's at stride 1, 0.26 against 0.32). Their
/// loads, one per multiply-add, bound them more than the wait did.
///
/// # Safety
///
/// `src` is valid for reads of `start + o + V * lanes` floats for every tap's `start`,
/// and `dst` for writes of `o + V * lanes` floats.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tap_block<S: pulp::Simd, const V: usize>(
    simd: S,
    src: *const f32,
    dst: *mut f32,
    o: usize,
    taps: &[usize],
    params: &[f32],
    start_value: S::f32s,
    fold: impl TapFold,
) {
    let lanes = S::F32_LANES;
    let mut sums = [start_value; V];
    for (&start, &param) in taps.iter().zip(params) {
        let param = simd.splat_f32s(param);
        for (v, sum) in sums.iter_mut().enumerate() {
            // SAFETY: the contract.
            let x = unsafe { src.add(start + o + v * lanes).cast::<S::f32s>().read_unaligned() };
            *sum = fold.vector(simd, *sum, param, x);
        }
    }
    for (v, &sum) in sums.iter().enumerate() {
        // SAFETY: the contract.
        unsafe { dst.add(o + v * lanes).cast::<S::f32s>().write_unaligned(sum) };
    }
}

/// Floats after the stride phases of [`pad_phases`] (the widest vector's lanes), so the
/// last taps of [`over_taps`] read whole vectors.
const PHASE_SLACK: usize = 16;

/// The stride phases of one plane (see [`pad_phases`]), kept between the planes of one
/// operator: their padding is the same for every plane, so it is written once.
#[derive(Debug, Default)]
struct Phases {
    data: Vec<f32>,
    /// The geometry and fill the padding in `data` was written for.
    padded_for: Option<(Geom, PhaseShape, u32)>,
}

impl std::ops::Deref for Phases {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.data
    }
}

/// Copies `input` (one `h x w` plane) into the `sh x sw` stride phases of `shape` each,
/// padded with `fill`, one after the other in `phases`: phase `(ry, rx)` holds the padded
/// plane's rows `ry + i sh` and columns `rx + j sw`. One pass over the input; stride 1 is a
/// row copy and stride 2 a de-interleave, both vectorized. The padding is written only
/// when `phases` last held another geometry or fill: every other element is written here
/// for each plane.
#[inline(always)]
fn pad_phases<S: pulp::Simd>(
    simd: S,
    input: &[f32],
    geo: &Geom,
    shape: PhaseShape,
    phases: &mut Phases,
    fill: f32,
) {
    let phase_len = shape.h * shape.w;
    let key = Some((*geo, shape, fill.to_bits()));
    if phases.padded_for != key {
        phases.data.clear();
        // Slack after the last phase: [`over_taps`] reads whole vectors past the end of
        // its outputs.
        phases.data.resize(geo.sh * geo.sw * phase_len + PHASE_SLACK, fill);
        phases.padded_for = key;
    }
    write_phases_in(simd, input, geo, shape, &mut phases.data);
}

/// The data part of [`pad_phases`]: writes every element of the phases `dst` that holds
/// an input element, and leaves the padding as it is.
fn write_phases(input: &[f32], geo: &Geom, shape: PhaseShape, phases: &mut [f32]) {
    pulp::Arch::new().dispatch(WritePhases { input, geo, shape, phases });
}

/// [`write_phases`], compiled for the CPU's vector width, so its row copies run inline
/// (one dispatch per plane, not one per row).
struct WritePhases<'a> {
    input: &'a [f32],
    geo: &'a Geom,
    shape: PhaseShape,
    phases: &'a mut [f32],
}

impl pulp::WithSimd for WritePhases<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let WritePhases { input, geo, shape, phases } = self;
        write_phases_in(simd, input, geo, shape, phases);
    }
}

/// [`write_phases`] within code already compiled for the CPU's vector width (`S`), with
/// no dispatch per row.
#[inline(always)]
fn write_phases_in<S: pulp::Simd>(
    simd: S,
    input: &[f32],
    geo: &Geom,
    shape: PhaseShape,
    phases: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if S::F32_LANES >= 8 && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (pulp's x86 levels of 8 lanes or more need it anyway;
        // the check, a cached flag, keeps this sound for any `S`).
        if unsafe { write_phases_avx2(input, geo, shape, phases) } {
            return;
        }
    }
    write_phases_rows(simd, input, geo, shape, phases);
}

/// [`write_phases_in`] for any stride and width, row by row: each row copied (stride 1),
/// split in pairs (stride 2) or spread float by float (wider strides).
#[inline(always)]
fn write_phases_rows<S: pulp::Simd>(
    simd: S,
    input: &[f32],
    geo: &Geom,
    shape: PhaseShape,
    phases: &mut [f32],
) {
    let phase_len = shape.h * shape.w;
    // Padded row py = iy + pt is row i = py / sh of the phases in row ry = py % sh: both
    // counted along the rows, not divided on each.
    let sh = geo.sh.max(1);
    let mut next = (geo.pt % sh, geo.pt / sh);
    for src in input.chunks_exact(geo.w.max(1)).take(geo.h) {
        let (ry, i) = next;
        next = if ry + 1 == sh { (0, i + 1) } else { (ry + 1, i) };
        if i >= shape.h {
            continue;
        }
        let row = |rx: usize| (ry * geo.sw + rx) * phase_len + i * shape.w;
        match geo.sw {
            1 => {
                let (lo, base) = (geo.pl, row(0));
                let n = src.len().min(shape.w.saturating_sub(lo));
                if let (Some(dst), Some(src)) =
                    (phases.get_mut(base + lo..base + lo + n), src.get(..n))
                {
                    copy_row_in(simd, dst, src);
                }
            }
            2 => {
                // Input column ix is padded column ix + pl: phase (ix + pl) % 2, column
                // (ix + pl) / 2. An odd pl puts column 0 alone at the start of phase 1.
                let skip = geo.pl % 2;
                if skip == 1 {
                    let j = geo.pl / 2;
                    if let (true, Some(&v)) = (j < shape.w, src.first()) {
                        if let Some(d) = phases.get_mut(row(1) + j) {
                            *d = v;
                        }
                    }
                }
                let j0 = (geo.pl + skip) / 2;
                let rest = src.get(skip..).unwrap_or_default();
                let pairs = (rest.len() / 2).min(shape.w.saturating_sub(j0));
                let (r0, r1) = (row(0) + j0, row(1) + j0);
                let (head, tail) = phases.split_at_mut(r1);
                if let (Some(even), Some(odd), Some(rest)) =
                    (head.get_mut(r0..r0 + pairs), tail.get_mut(..pairs), rest.get(..2 * pairs))
                {
                    split_pairs_in(simd, rest, even, odd);
                }
                // An odd count leaves one last column, an even padded one, for phase 0.
                let last = skip + 2 * pairs;
                if j0 + pairs < shape.w {
                    if let (Some(&v), Some(d)) = (src.get(last), phases.get_mut(r0 + pairs)) {
                        *d = v;
                    }
                }
            }
            sw => {
                for (ix, &v) in src.iter().enumerate() {
                    let px = ix + geo.pl;
                    let j = px / sw;
                    if j < shape.w {
                        if let Some(d) = phases.get_mut(row(px % sw) + j) {
                            *d = v;
                        }
                    }
                }
            }
        }
    }
}

/// [`write_phases_in`] for strides of 1 and 2 across, in one loop per plane of AVX2 moves
/// (stride 1) or of AVX2 de-interleaves of 8 pairs (stride 2: two loads of 8 floats give
/// the 4 even and 4 odd floats of each 128-bit half by `shuffle_ps`, and a swap of the
/// middle 64-bit quarters puts them in order), with no per-row calls or checks of the CPU.
/// The last group of a row overlaps the one before it and writes the same floats again.
/// Returns false, having written nothing, for other strides, and for rows of fewer than 8
/// floats (or pairs) to move, which the general path takes. Measured on one 56x56 plane
/// of a 3x3, stride-2 window (AVX2, one thread, best of 4 alternations): 0.72 against
/// 1.35 us for the general path's rows; a 112x112 plane, 1.51 against 2.08; a 28x28 plane
/// at stride 1, 0.12 against 0.23.
///
/// Each input row `iy` is padded row `py = iy + pt`, row `py / sh` of the phases of row
/// phase `py % sh`; its column `ix` is padded column `px = ix + pl`, column `px / sw` of
/// column phase `px % sw`. At stride 2, pair `j` (columns `2j` and `2j + 1`) goes to
/// column `j + pl / 2` of phase `pl % 2` and `j + (pl + 1) / 2` of the other.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn write_phases_avx2(input: &[f32], geo: &Geom, shape: PhaseShape, phases: &mut [f32]) -> bool {
    use std::arch::x86_64::{
        _mm256_castpd_ps, _mm256_castps_pd, _mm256_loadu_ps, _mm256_permute4x64_pd,
        _mm256_shuffle_ps, _mm256_storeu_ps,
    };
    let (w, sh, sw, pl) = (geo.w, geo.sh.max(1), geo.sw, geo.pl);
    let phase_len = shape.h * shape.w;
    // Floats (stride 1) or pairs (stride 2) of a row that land in the phases as vectors:
    // every one of them is inside its phase row.
    let moved = match sw {
        1 => w.min(shape.w.saturating_sub(pl)),
        2 => (w / 2).min(shape.w.saturating_sub(pl.div_ceil(2))),
        _ => return false,
    };
    if moved < 8 || input.len() < geo.h * w || phases.len() < sh * sw * phase_len {
        return false;
    }
    let dst = phases.as_mut_ptr();
    // Counted along the rows, not divided on each (as in the general path).
    let mut next = (geo.pt % sh, geo.pt / sh);
    for src in input.chunks_exact(w).take(geo.h) {
        let (ry, i) = next;
        next = if ry + 1 == sh { (0, i + 1) } else { (ry + 1, i) };
        if i >= shape.h {
            break;
        }
        let row = |rx: usize| (ry * sw + rx) * phase_len + i * shape.w;
        if sw == 1 {
            // SAFETY: `moved <= w` floats of `src`; `pl + moved <= shape.w`, so the copy
            // stays in this phase row, inside `phases` (checked above); AVX2 is enabled.
            unsafe {
                copy_vectors::<std::arch::x86_64::__m256>(dst.add(row(0) + pl), src.as_ptr(), moved)
            };
            continue;
        }
        let (even, odd) = (row(pl % 2) + pl / 2, row(1 - pl % 2) + pl.div_ceil(2));
        for j in covering_steps(moved, 8) {
            // SAFETY: floats `2j .. 2j + 16 <= 2 moved <= w` of `src`; `j + 8 <= moved`
            // floats from `pl / 2` and `pl.div_ceil(2)` of the two phase rows, both
            // within their row of `shape.w` (checked above).
            unsafe {
                let a = _mm256_loadu_ps(src.as_ptr().add(2 * j));
                let b = _mm256_loadu_ps(src.as_ptr().add(2 * j + 8));
                // [a0 a2 b0 b2 | a4 a6 b4 b6] and [a1 a3 b1 b3 | a5 a7 b5 b7], then
                // quarters 0 2 1 3: [a0 a2 a4 a6 | b0 b2 b4 b6].
                let (e, o) = (_mm256_shuffle_ps::<0x88>(a, b), _mm256_shuffle_ps::<0xDD>(a, b));
                let order =
                    |v| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
                _mm256_storeu_ps(dst.add(even + j), order(e));
                _mm256_storeu_ps(dst.add(odd + j), order(o));
            }
        }
        // The columns past the last pair: an odd row's last, and a first phase's one more.
        for (ix, &v) in src.iter().enumerate().skip(2 * moved) {
            let px = ix + pl;
            if px / 2 < shape.w {
                // SAFETY: column `px / 2` of a phase row, inside `phases` (checked above).
                unsafe { dst.add(row(px % 2) + px / 2).write(v) };
            }
        }
    }
    true
}

/// Splits `src` into its even and its odd elements, as many pairs as `even` and `odd`
/// hold (both as long, `src` twice that): the de-interleave of a stride-2 row into its
/// two phases, one pair at a time. With AVX2, every row of 8 pairs or more is split in
/// [`write_phases_avx2`] instead, so this takes only short rows and other CPUs.
#[inline(always)]
fn split_pairs_in<S: pulp::Simd>(_simd: S, src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    for ((pair, e), o) in src.chunks_exact(2).zip(even).zip(odd) {
        (*e, *o) = (pair[0], pair[1]);
    }
}

/// Where the `width`-wide steps over `0..len` (`len >= width > 0`) start: whole steps
/// from 0, then, when `len` is not a multiple of `width`, one that ends at `len` and
/// overlaps the one before it. For passes that may write an element twice with the same
/// value (copies, splits), so a row needs no scalar tail. A plain iterator, each step
/// from the one before: over a chain of two iterators, the row moves of
/// [`write_phases_avx2`] ran slower.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn covering_steps(len: usize, width: usize) -> impl Iterator<Item = usize> {
    let first = (len >= width && width > 0).then_some(0);
    std::iter::successors(first, move |&j| (j + width < len).then(|| (j + width).min(len - width)))
}

/// Copies `src` to `dst` with vector moves of the CPU's width, for the many short rows
/// (a few dozen floats) the engine copies: a convolution's unfolded input, a plane's rows
/// into its stride phases, a MaxPool row. The static device binary links musl's memcpy
/// (`rep movsq`, tens of cycles to start). Measured in the musl build at one thread: a
/// first version, which moved pulp's `f32s` (structs of floats, so one float at a time),
/// took mobilenetv3 from 4.2 to 3.7 ms; true vector moves ([`copy_vectors`]) together
/// with moving conv product rows in their finishing pass took cnn from 0.15 to 0.10 ms
/// and resnet18 from 47 to 40 ms.
///
/// # Safety
///
/// `dst` is valid for writes of `src.len()` floats and does not overlap `src`.
unsafe fn copy_to(dst: *mut f32, src: &[f32]) {
    pulp::Arch::new().dispatch(CopyRow { dst, src });
}

/// [`copy_row`] within code already compiled for the CPU's vector width (`S`).
#[inline(always)]
fn copy_row_in<S: pulp::Simd>(simd: S, dst: &mut [f32], src: &[f32]) {
    let src = &src[..dst.len()];
    // A `&mut` does not overlap a `&`, and `dst` holds `src.len()` floats.
    pulp::WithSimd::with_simd(CopyRow { dst: dst.as_mut_ptr(), src }, simd);
}

/// [`copy_to`] between two slices of the same length.
pub(crate) fn copy_row(dst: &mut [f32], src: &[f32]) {
    let src = &src[..dst.len()];
    // SAFETY: `dst` holds `src.len()` floats, and a `&mut` does not overlap a `&`.
    unsafe { copy_to(dst.as_mut_ptr(), src) }
}

/// [`copy_to`], compiled for the CPU's vector width.
struct CopyRow<'a> {
    dst: *mut f32,
    src: &'a [f32],
}

impl pulp::WithSimd for CopyRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (len, src, dst) = (self.src.len(), self.src.as_ptr(), self.dst);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{__m256, __m512};
            // SAFETY: the caller's contract on `dst`; the vector type is the width of the
            // instruction set this instance is compiled for (`S`).
            let done = unsafe {
                match std::mem::size_of::<S::f32s>() {
                    64 => copy_vectors::<__m512>(dst, src, len),
                    32 => copy_vectors::<__m256>(dst, src, len),
                    _ => 0,
                }
            };
            for i in done..len {
                // SAFETY: `i < len`, as above. Volatile, so the loop stays a loop.
                unsafe {
                    std::ptr::write_volatile(dst.add(i), std::ptr::read_volatile(src.add(i)))
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        // SAFETY: the caller's contract on `dst`.
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, len)
        };
    }
}

/// Copies `src` to `dst` in vectors of `V` and returns how many floats that was: all of
/// them when there is at least one whole vector (the last vector overlaps the one before
/// it and writes the same floats again), else none. Each store is one instruction written
/// out ([`store_vector`]): as plain loads and stores the compiler turns the loop back into
/// a memcpy call, and as volatile stores of a vector it moved each one through the stack.
///
/// # Safety
///
/// `src` and `dst` are valid for `len` floats and do not overlap; `V` is `__m256` or
/// `__m512`, and the running CPU supports it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn copy_vectors<V: Copy>(dst: *mut f32, src: *const f32, len: usize) -> usize {
    let lanes = std::mem::size_of::<V>() / std::mem::size_of::<f32>();
    if len < lanes {
        return 0;
    }
    for i in covering_steps(len, lanes) {
        // SAFETY: `i + lanes <= len`, the contract above.
        unsafe { store_vector(dst.add(i), std::ptr::read_unaligned(src.add(i).cast::<V>())) };
    }
    len
}

/// Stores the vector `v` (`__m256` or `__m512`) at `dst`, at any alignment, by one
/// `vmovups` the compiler cannot merge into a memcpy call.
///
/// # Safety
///
/// `dst` is valid for writes of `v`'s floats; the running CPU supports `V`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_vector<V: Copy>(dst: *mut f32, v: V) {
    use std::arch::x86_64::{__m256, __m512};
    // SAFETY: the contract; the sizes say which of the two types `V` is.
    unsafe {
        match std::mem::size_of::<V>() {
            32 => store_256(dst, std::mem::transmute_copy::<V, __m256>(&v)),
            64 => store_512(dst, std::mem::transmute_copy::<V, __m512>(&v)),
            _ => unreachable!("a vector of 8 or 16 floats"),
        }
    }
}

/// [`store_vector`] of 8 floats.
///
/// # Safety
///
/// `dst` is valid for writes of 8 floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn store_256(dst: *mut f32, v: std::arch::x86_64::__m256) {
    // SAFETY: the contract.
    unsafe {
        std::arch::asm!("vmovups [{dst}], {v}", dst = in(reg) dst, v = in(ymm_reg) v,
            options(nostack, preserves_flags))
    };
}

/// [`store_vector`] of 16 floats.
///
/// # Safety
///
/// `dst` is valid for writes of 16 floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_512(dst: *mut f32, v: std::arch::x86_64::__m512) {
    // SAFETY: the contract.
    unsafe {
        std::arch::asm!("vmovups [{dst}], {v}", dst = in(reg) dst, v = in(zmm_reg) v,
            options(nostack, preserves_flags))
    };
}

/// Which pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PoolKind {
    Max,
    Average,
}

/// ONNX MaxPool / AveragePool (1-D or 2-D).
pub(crate) fn pool(x: &Tensor, kind: PoolKind, attrs: &PoolAttrs) -> R<Tensor> {
    check_f32(x, "pool input X")?;
    let (n, c, spatial) = split_nc(x.dims(), "pool input X")?;
    let kernel = attrs.window.kernel_shape.clone().ok_or_else(|| err("kernel_shape is missing"))?;
    let geo = geometry(&spatial, &kernel, &attrs.window)?;
    let out_dims: Vec<usize> =
        if spatial.len() == 1 { vec![n, c, geo.ow] } else { vec![n, c, geo.oh, geo.ow] };
    let plane_in = geo.h * geo.w;
    let p = geo.oh * geo.ow;
    let mut out = vec![0f32; n * c * p];
    let include_pad = attrs.count_include_pad;
    // Plain 2x2 windows run their own loop ([`max_pool_2x2`]): on the cnn's 16x16 and
    // 32x32 planes it took 3.3 and 5.5 µs against 7.5 and 8.5 µs by rows.
    #[cfg(target_arch = "x86_64")]
    if kind == PoolKind::Max && maxpool::supports(&geo) && !is_plain_2x2(&geo) {
        with_f32(x, |xs| {
            let work = n * c * p * geo.kh * geo.kw;
            for_each_chunk(&mut out, p, work, Vec::new, |scratch, index, out| {
                if let Some(input) = xs.get(index * plane_in..(index + 1) * plane_in) {
                    maxpool::plane(input, &geo, scratch, out);
                }
            });
            Ok(())
        })?;
        return Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?);
    }
    if kind == PoolKind::Max && is_plain_2x2(&geo) {
        with_f32(x, |xs| {
            let work = n * c * p * 4;
            for_each_chunk(
                &mut out,
                p.max(1),
                work,
                || (),
                |_, index, out| {
                    if let Some(input) = xs.get(index * plane_in..(index + 1) * plane_in) {
                        max_pool_2x2(input, &geo, out);
                    }
                },
            );
            Ok(())
        })?;
        return Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?);
    }
    if kind == PoolKind::Max {
        let (shape, taps) = phase_taps(&geo);
        let zeros = vec![0f32; taps.len()];
        let arch = pulp::Arch::new();
        with_f32(x, |xs| {
            if p == 0 {
                return Ok(());
            }
            let plane = |scratch: &mut (Phases, Vec<f32>), index: usize, out: &mut [f32]| {
                let Some(input) = xs.get(index * plane_in..(index + 1) * plane_in) else {
                    return;
                };
                arch.dispatch(MaxPoolPlane {
                    input,
                    taps: &taps,
                    zeros: &zeros,
                    geo: &geo,
                    shape,
                    scratch,
                    out,
                });
            };
            let work = n * c * p * geo.kh * geo.kw;
            for_each_chunk(&mut out, p, work, Default::default, plane);
            Ok(())
        })?;
        return Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?);
    }
    with_f32(x, |xs| {
        if p == 0 {
            return Ok(());
        }
        let work = n * c * p * geo.kh * geo.kw;
        for_each_chunk(
            &mut out,
            p,
            work,
            || (),
            |_, plane_index, out| {
                let Some(plane) = xs.get(plane_index * plane_in..(plane_index + 1) * plane_in)
                else {
                    return;
                };
                for oy in 0..geo.oh {
                    let hs = (oy * geo.sh) as isize - geo.pt as isize;
                    for ox in 0..geo.ow {
                        let ws = (ox * geo.sw) as isize - geo.pl as isize;
                        let value = match kind {
                            PoolKind::Max => {
                                let mut best = f32::NEG_INFINITY;
                                for ky in 0..geo.kh {
                                    let iy = hs + (ky * geo.dh) as isize;
                                    if iy < 0 || iy >= geo.h as isize {
                                        continue;
                                    }
                                    for kx in 0..geo.kw {
                                        let ix = ws + (kx * geo.dw) as isize;
                                        if ix < 0 || ix >= geo.w as isize {
                                            continue;
                                        }
                                        if let Some(&v) =
                                            plane.get(iy as usize * geo.w + ix as usize)
                                        {
                                            best = max_or_nan(best, v);
                                        }
                                    }
                                }
                                best
                            }
                            PoolKind::Average => {
                                let he = (hs + geo.kh as isize).min((geo.h + geo.pb) as isize);
                                let we = (ws + geo.kw as isize).min((geo.w + geo.pr) as isize);
                                let padded = (he - hs) * (we - ws);
                                let (y0, y1) = (hs.max(0), he.min(geo.h as isize));
                                let (x0, x1) = (ws.max(0), we.min(geo.w as isize));
                                let mut sum = 0f32;
                                for iy in y0..y1 {
                                    let row = iy as usize * geo.w;
                                    if let Some(r) =
                                        plane.get(row + x0 as usize..row + x1.max(x0) as usize)
                                    {
                                        sum += r.iter().sum::<f32>();
                                    }
                                }
                                let count = if include_pad {
                                    padded
                                } else {
                                    (y1 - y0).max(0) * (x1 - x0).max(0)
                                };
                                if count > 0 {
                                    sum / count as f32
                                } else {
                                    0.0
                                }
                            }
                        };
                        if let Some(o) = out.get_mut(oy * geo.ow + ox) {
                            *o = value;
                        }
                    }
                }
            },
        );
        Ok(())
    })?;
    Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
}

/// ConvTranspose attributes.
#[derive(Debug, Clone)]
pub(crate) struct ConvTransposeAttrs {
    pub window: Window,
    pub group: usize,
    pub output_padding: Option<Vec<usize>>,
    pub output_shape: Option<Vec<usize>>,
}

/// Output length and begin pad of one ConvTranspose axis.
#[allow(clippy::too_many_arguments)]
fn transpose_axis(
    input: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    output_padding: usize,
    pads: (usize, usize),
    output_shape: Option<usize>,
    auto_pad: AutoPad,
) -> R<(usize, usize)> {
    if kernel == 0 || stride == 0 || dilation == 0 || input == 0 {
        return Err(err("kernel, strides, dilations and the input must be positive"));
    }
    let full = stride
        .checked_mul(input - 1)
        .and_then(|v| v.checked_add(output_padding))
        .and_then(|v| v.checked_add((kernel - 1).checked_mul(dilation)? + 1))
        .ok_or_else(|| err("output size overflows"))?;
    let split = |total: usize| {
        if auto_pad == AutoPad::SameUpper {
            total / 2
        } else {
            total - total / 2
        }
    };
    match (output_shape, auto_pad) {
        (Some(out), _) => {
            let total = full.checked_sub(out).ok_or_else(|| {
                err(format!("output_shape {out} is larger than the full output {full}"))
            })?;
            Ok((out, split(total)))
        }
        (None, AutoPad::SameUpper | AutoPad::SameLower) => {
            let out = input * stride;
            Ok((out, split(full.saturating_sub(out))))
        }
        (None, AutoPad::Valid) => Ok((full, 0)),
        (None, AutoPad::NotSet) => {
            let out = full
                .checked_sub(pads.0 + pads.1)
                .filter(|&o| o > 0)
                .ok_or_else(|| err(format!("pads {pads:?} remove the whole output of {full}")))?;
            Ok((out, pads.0))
        }
    }
}

/// ONNX ConvTranspose (1-D or 2-D, any groups): matmul, then col2im.
pub(crate) fn conv_transpose(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    attrs: &ConvTransposeAttrs,
) -> R<Tensor> {
    check_f32(x, "ConvTranspose input X")?;
    check_f32(w, "ConvTranspose weight W")?;
    let (n, c, spatial) = split_nc(x.dims(), "ConvTranspose input X")?;
    let rank = spatial.len();
    let (wc, mg, kernel) = match w.dims() {
        [wc, mg, k @ ..] if k.len() == rank => (*wc, *mg, k.to_vec()),
        d => return Err(err(format!("weight W has shape {d:?}; expected C x M/group x kernel"))),
    };
    let g = attrs.group;
    if g == 0 || wc != c || c % g != 0 {
        return Err(err(format!(
            "group {g} does not fit {c} input channels, weight {:?}",
            w.dims()
        )));
    }
    let m = mg * g;
    let cg = c / g;
    let list = |v: &Option<Vec<usize>>, default: usize, len: usize, what: &str| -> R<Vec<usize>> {
        match v {
            None => Ok(vec![default; len]),
            Some(v) if v.len() == len => Ok(v.clone()),
            Some(v) => Err(err(format!("{what} has {} values, expected {len}", v.len()))),
        }
    };
    let win = &attrs.window;
    let strides = list(&win.strides, 1, rank, "strides")?;
    let dilations = list(&win.dilations, 1, rank, "dilations")?;
    let pads = list(&win.pads, 0, 2 * rank, "pads")?;
    let out_pad = list(&attrs.output_padding, 0, rank, "output_padding")?;
    let out_shape = match &attrs.output_shape {
        Some(s) if s.len() == rank => Some(s.clone()),
        // output_shape may include N and C.
        Some(s) if s.len() == rank + 2 => Some(s.get(2..).unwrap_or_default().to_vec()),
        Some(s) => return Err(err(format!("output_shape {s:?} does not fit the input rank"))),
        None => None,
    };
    let at = |v: &[usize], i: usize, d: usize| v.get(i).copied().unwrap_or(d);
    let mut axes = Vec::with_capacity(2);
    for i in 0..rank {
        axes.push(transpose_axis(
            at(&spatial, i, 1),
            at(&kernel, i, 1),
            at(&strides, i, 1),
            at(&dilations, i, 1),
            at(&out_pad, i, 0),
            (at(&pads, i, 0), at(&pads, i + rank, 0)),
            out_shape.as_ref().map(|s| at(s, i, 0)),
            win.auto_pad,
        )?);
    }
    // 1-D is 2-D with height 1.
    let (h, wd, kh, kw, sh, sw, dh, dw, (oh, pt), (ow, pl)) = if rank == 1 {
        let a = axes.first().copied().unwrap_or((1, 0));
        (
            1,
            at(&spatial, 0, 1),
            1,
            at(&kernel, 0, 1),
            1,
            at(&strides, 0, 1),
            1,
            at(&dilations, 0, 1),
            (1, 0),
            a,
        )
    } else {
        (
            at(&spatial, 0, 1),
            at(&spatial, 1, 1),
            at(&kernel, 0, 1),
            at(&kernel, 1, 1),
            at(&strides, 0, 1),
            at(&strides, 1, 1),
            at(&dilations, 0, 1),
            at(&dilations, 1, 1),
            axes.first().copied().unwrap_or((1, 0)),
            axes.get(1).copied().unwrap_or((1, 0)),
        )
    };
    let mut out_dims = vec![n, m];
    if rank == 2 {
        out_dims.push(oh);
    }
    out_dims.push(ow);
    let plane_out = oh * ow;
    let hw = h * wd;
    let kk = kh * kw;
    let total: usize = out_dims.iter().product();
    if total > super::load::MAX_ELEMENTS {
        return Err(err(format!("output shape {out_dims:?} is too large")));
    }
    let bias: Vec<f32> = match b {
        Some(b) if b.dims() == [m] => b.to_vec1()?,
        Some(b) => return Err(err(format!("bias B has shape {:?}, expected [{m}]", b.dims()))),
        None => vec![0.0; m],
    };
    let mut out = vec![0f32; total];
    let wmat = w.reshape((c, mg * kk))?;
    for ni in 0..n {
        for gi in 0..g {
            let xg = x.narrow(0, ni, 1)?.narrow(1, gi * cg, cg)?.reshape((cg, hw))?;
            let wg = wmat.narrow(0, gi * cg, cg)?;
            let col = wg.t()?.matmul(&xg)?;
            let start = (ni * m + gi * mg) * plane_out;
            let Some(planes) = out.get_mut(start..start + mg * plane_out) else {
                return Err(err("output shorter than its shape"));
            };
            with_f32(&col, |col| {
                if plane_out == 0 {
                    return Ok(());
                }
                let work = mg * kk * hw;
                for_each_chunk(
                    planes,
                    plane_out,
                    work,
                    || (),
                    |_, mi, plane| {
                        plane.fill(bias.get(gi * mg + mi).copied().unwrap_or(0.0));
                        for ky in 0..kh {
                            let y_off = (ky * dh) as isize - pt as isize;
                            for kx in 0..kw {
                                let x_off = (kx * dw) as isize - pl as isize;
                                let row = (mi * kk + ky * kw + kx) * hw;
                                let Some(src) = col.get(row..row + hw) else { continue };
                                for iy in 0..h {
                                    let oy = (iy * sh) as isize + y_off;
                                    if oy < 0 || oy >= oh as isize {
                                        continue;
                                    }
                                    let in_row =
                                        src.get(iy * wd..(iy + 1) * wd).unwrap_or_default();
                                    let base = oy as usize * ow;
                                    for (ix, v) in in_row.iter().enumerate() {
                                        let ox = (ix * sw) as isize + x_off;
                                        if ox >= 0 && ox < ow as isize {
                                            if let Some(o) = plane.get_mut(base + ox as usize) {
                                                *o += v;
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    },
                );
                Ok(())
            })?;
        }
    }
    Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows cut for two threads go in equal shares where the pieces can be; one thread
    /// keeps the count as it was; too few rows to share are left whole.
    #[test]
    fn rows_are_cut_in_equal_shares_for_the_threads() {
        let any = |_: usize| true;
        // 7 blocks of 4 rows: shares of 3 and 4 blocks. 14 blocks of 2: 7 each.
        assert_eq!(even_shares(28, 7, 2, any), 14);
        // One tile of 14 rows becomes two of 7 when 7 rows are wide enough ...
        assert_eq!(even_shares(14, 1, 2, |rows| rows * 16 >= 64), 2);
        // ... and stays whole when 4 of 7 rows are not: the channels are cut instead.
        assert_eq!(even_shares(7, 1, 2, |rows| rows * 9 >= 64), 1);
        // Already even, or one thread: unchanged.
        assert_eq!(even_shares(28, 2, 2, any), 2);
        assert_eq!(even_shares(28, 7, 1, any), 7);
        assert_eq!(even_shares(0, 1, 2, any), 1);
        assert_eq!(even_shares(1, 1, 2, any), 1);
        // Shares as the team hands them out: 7 pieces of 4 rows on two threads are 3
        // and 4 pieces; 10 of 3 rows (the last of 1) are 5 and 5, or 15 and 13 rows.
        assert_eq!(longest_share(28, 4, 2), 16);
        assert_eq!(longest_share(28, 3, 2), 15);
        assert_eq!(longest_share(28, 2, 2), 14);
        // Never a longer share than the count asked for, and never more pieces than rows.
        for len in 1usize..60 {
            for pieces in 1..=len {
                for threads in 1..4 {
                    let longest = |p: usize| longest_share(len, len.div_ceil(p), threads);
                    let got = even_shares(len, pieces, threads, any);
                    assert!(got >= 1 && got <= len, "{len} rows, {pieces} pieces: {got}");
                    assert!(
                        got == 1 || longest(got) <= longest(pieces),
                        "{len} rows, {pieces} pieces, {threads} threads: {got}"
                    );
                }
            }
        }
    }

    /// A stride-2 row split into its phases on the row path: every even float to one,
    /// every odd float to the other, for rows of 0 to 40 pairs and an odd float after.
    #[test]
    fn stride_two_rows_split_into_their_phases() {
        struct Split<'a>(&'a [f32], &'a mut [f32], &'a mut [f32]);
        impl pulp::WithSimd for Split<'_> {
            type Output = ();
            fn with_simd<S: pulp::Simd>(self, simd: S) {
                split_pairs_in(simd, self.0, self.1, self.2)
            }
        }
        for pairs in 0..41 {
            let src: Vec<f32> = (0..2 * pairs + 1).map(|v| v as f32).collect();
            let (mut even, mut odd) = (vec![-1.0; pairs], vec![-1.0; pairs]);
            pulp::Arch::new().dispatch(Split(&src, &mut even, &mut odd));
            let every = |from: usize| (0..pairs).map(|j| (2 * j + from) as f32).collect::<Vec<_>>();
            assert_eq!((even, odd), (every(0), every(1)), "{pairs} pairs");
        }
    }

    /// A plane written into its stride phases puts each input float where the phases'
    /// definition says and touches no padding, on the vector path (AVX2, strides 1 and 2
    /// across) and the row path alike: for every stride up to 3, pads up to 3, kernels of
    /// 1, 3 and 5 taps, and widths from below a vector to several.
    #[test]
    fn planes_are_written_into_their_phases_on_every_path() {
        struct Rows<'a>(&'a [f32], &'a Geom, PhaseShape, &'a mut [f32]);
        impl pulp::WithSimd for Rows<'_> {
            type Output = ();
            fn with_simd<S: pulp::Simd>(self, simd: S) {
                write_phases_rows(simd, self.0, self.1, self.2, self.3)
            }
        }
        const UNTOUCHED: f32 = -7.5;
        let mut checked = 0;
        for (h, w) in (1..=40).map(|w| (w % 9 + 1, w)) {
            for (s, pad, k) in
                (1..=3).flat_map(|s| (0..=3).flat_map(move |p| [1, 3, 5].map(|k| (s, p, k))))
            {
                for (sh, sw) in [(s, s), (1, s), (s, 1)] {
                    if pad >= k || h + 2 * pad < k || w + 2 * pad < k {
                        continue;
                    }
                    let window = Window {
                        auto_pad: AutoPad::NotSet,
                        kernel_shape: Some(vec![k, k]),
                        strides: Some(vec![sh, sw]),
                        dilations: None,
                        pads: Some(vec![pad, pad + 1, pad, pad.saturating_sub(1)]),
                        ceil_mode: false,
                    };
                    let Ok(geo) = geometry(&[h, w], &[k, k], &window) else { continue };
                    let (shape, _) = phase_taps(&geo);
                    let phase_len = shape.h * shape.w;
                    let input: Vec<f32> = (0..h * w).map(|v| v as f32).collect();
                    let mut expected = vec![UNTOUCHED; sh * sw * phase_len];
                    for (iy, ix) in (0..h).flat_map(|iy| (0..w).map(move |ix| (iy, ix))) {
                        let (py, px) = (iy + geo.pt, ix + geo.pl);
                        if py / sh < shape.h && px / sw < shape.w {
                            let phase = (py % sh) * sw + px % sw;
                            expected[phase * phase_len + (py / sh) * shape.w + px / sw] =
                                input[iy * w + ix];
                        }
                    }
                    let (mut rows, mut any) = (expected.clone(), expected.clone());
                    rows.fill(UNTOUCHED);
                    any.fill(UNTOUCHED);
                    pulp::Arch::new().dispatch(Rows(&input, &geo, shape, &mut rows));
                    write_phases(&input, &geo, shape, &mut any);
                    let case = format!("{h}x{w} k{k} strides {sh},{sw} pads {:?}", window.pads);
                    assert_eq!(rows, expected, "rows: {case}");
                    assert_eq!(any, expected, "dispatched: {case}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000, "{checked} cases");
    }

    /// The finishing pass in vectors gives what the scalar activations give, to the bit
    /// and for NaN and infinities too, in place and from a product row, with a residual
    /// and without, on runs shorter than a vector, of whole vectors and between.
    #[test]
    fn finishing_in_vectors_matches_the_scalar_activations() {
        let acts = [
            None,
            Some(Activation::Relu),
            Some(Activation::HardSwish),
            Some(Activation::HardSigmoid { alpha: 0.2, beta: 0.5 }),
            Some(Activation::Clip { min: -1.5, max: 6.0 }),
        ];
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 3.0, -3.0];
        let value = |i: usize| match special.get(i % 11) {
            Some(&v) => v,
            None => (i as f32 * 0.37).sin() * 8.0,
        };
        for act in acts {
            for len in 0..45 {
                let from: Vec<f32> = (0..len).map(value).collect();
                let add: Vec<f32> = (0..len).map(|i| value(i + 5)).collect();
                for (use_from, use_add) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    let mut values: Vec<f32> = (0..len).map(|i| value(i + 3)).collect();
                    let want: Vec<u32> = (0..len)
                        .map(|i| {
                            let x = if use_from { from[i] } else { values[i] } + 0.25;
                            let x = if use_add { x + add[i] } else { x };
                            act.map_or(x, |a| a.apply(x)).to_bits()
                        })
                        .collect();
                    pulp::Arch::new().dispatch(Finish {
                        values: &mut values,
                        from: use_from.then_some(&from[..]),
                        add: use_add.then_some(&add[..]),
                        bias: 0.25,
                        act,
                    });
                    let got: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{act:?}, {len} values, from {use_from}, add {use_add}");
                }
            }
        }
    }

    /// A product large enough to split, on two threads: by column blocks (with a last,
    /// narrower block) and, with few columns, by row blocks; accumulating onto `c`.
    #[test]
    fn sgemm_split_across_threads_matches_a_direct_product() {
        let team = Team::new(2);
        let _hot = team.hot();
        for (m, n, k) in [(5, 300, 1500), (40, 100, 600), (45, 60, 900)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let mut want = vec![1f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] += (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum::<f32>();
                }
            }
            let mut c = vec![1f32; m * n];
            team.install(|| sgemm(m, n, k, &a, &b, &mut c, true)).unwrap();
            assert_eq!(c, want, "{m}x{k} by {k}x{n}");
        }
    }

    /// Every length around the vector widths (4, 8, 16 floats) and unaligned starts: each
    /// float lands where it belongs and nothing past the row is touched.
    #[test]
    fn copy_row_copies_exactly_the_row() {
        // Through the dispatch, and through each instruction set this CPU has, so the
        // 256-bit moves are tested on a CPU that would dispatch to 512-bit ones.
        type Copier = Box<dyn Fn(&mut [f32], &[f32])>;
        // `dst` is a whole slice and `src` is cut to its length, as `copy_row` does.
        #[cfg(target_arch = "x86_64")]
        fn through<S: pulp::Simd>(simd: S) -> Copier {
            Box::new(move |d: &mut [f32], s: &[f32]| {
                simd.vectorize(CopyRow { dst: d.as_mut_ptr(), src: &s[..d.len()] })
            })
        }
        let mut copiers: Vec<(&str, Copier)> = vec![("dispatch", Box::new(copy_row))];
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(v3) = pulp::x86::V3::try_new() {
                copiers.push(("v3", through(v3)));
            }
            if let Some(v4) = pulp::x86::V4::try_new() {
                copiers.push(("v4", through(v4)));
            }
        }
        let src: Vec<f32> = (0..200).map(|i| i as f32 * 0.5 - 7.0).collect();
        for (name, copy) in &copiers {
            for len in 0..70 {
                for offset in 0..3 {
                    let mut dst = vec![-1f32; len + 8];
                    let from = &src[offset + 1..offset + 1 + len];
                    copy(&mut dst[offset..offset + len], from);
                    let at = format!("{name}: {len} at {offset}");
                    assert!(dst[..offset].iter().all(|&v| v == -1.0), "{at}");
                    assert_eq!(&dst[offset..offset + len], from, "{at}");
                    assert!(dst[offset + len..].iter().all(|&v| v == -1.0), "{at}");
                }
            }
        }
    }

    #[test]
    fn same_upper_and_lower_split_odd_padding() {
        // in 4, kernel 2, stride 1: out 4, total pad 1.
        assert_eq!(
            axis_geometry(4, 2, 1, 1, (0, 0), AutoPad::SameUpper, false).ok(),
            Some((4, 0, 1))
        );
        assert_eq!(
            axis_geometry(4, 2, 1, 1, (0, 0), AutoPad::SameLower, false).ok(),
            Some((4, 1, 0))
        );
    }

    #[test]
    fn ceil_mode_adds_a_partial_window() {
        // in 5, kernel 2, stride 2: floor gives 2, ceil gives 3.
        assert_eq!(axis_geometry(5, 2, 2, 1, (0, 0), AutoPad::NotSet, false).ok(), Some((2, 0, 0)));
        assert_eq!(axis_geometry(5, 2, 2, 1, (0, 0), AutoPad::NotSet, true).ok(), Some((3, 0, 0)));
    }

    #[test]
    fn kernel_larger_than_input_is_an_error() {
        assert!(axis_geometry(2, 3, 1, 1, (0, 0), AutoPad::NotSet, false).is_err());
    }
}

/// Timing of the hand-written loops on one and on all threads. Run with
/// `cargo test --release -p basalt-runtime thread_scaling -- --ignored --nocapture`.
#[cfg(test)]
pub(crate) mod scaling {
    use std::time::{Duration, Instant};

    use super::*;

    /// The median of as many runs of `f` as fit in a quarter second (at least 7).
    pub(crate) fn median_time(f: impl Fn()) -> Duration {
        let started = Instant::now();
        let mut v = Vec::new();
        while v.len() < 7 || started.elapsed() < Duration::from_millis(250) {
            let t = Instant::now();
            f();
            v.push(t.elapsed());
        }
        v.sort();
        v[v.len() / 2]
    }

    #[test]
    #[ignore = "timing, not a check"]
    fn thread_scaling() {
        let window = |k: usize, s: usize, p: usize| Window {
            auto_pad: AutoPad::NotSet,
            kernel_shape: Some(vec![k, k]),
            strides: Some(vec![s, s]),
            dilations: None,
            pads: Some(vec![p; 4]),
            ceil_mode: false,
        };
        let x = Tensor::ones((1, 96, 56, 56), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones((96, 1, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let dw = ConvAttrs { window: window(5, 1, 2), group: 96, activation: None };
        let mp = PoolAttrs { window: window(3, 2, 1), count_include_pad: false };
        let one = Team::new(1);
        let _hot = Team::current(Team::hot);
        let x64 = Tensor::ones((1, 64, 56, 56), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w64 = Tensor::ones((64, 64, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let c64 = ConvAttrs { window: window(3, 1, 1), group: 1, activation: None };
        let full = || drop(conv(&x64, &w64, None, &c64, false, None).unwrap());
        let xs = Tensor::ones((1, 3, 224, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
        let ws = Tensor::ones((16, 3, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let cs = ConvAttrs { window: window(3, 2, 1), group: 1, activation: None };
        let stem = || drop(conv(&xs, &ws, None, &cs, false, None).unwrap());
        let xp = Tensor::ones((1, 96, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let wp = Tensor::ones((576, 96, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let bp = Tensor::ones(576, candle_core::DType::F32, &Device::Cpu).unwrap();
        let cp = ConvAttrs { window: window(1, 1, 0), group: 1, activation: None };
        let pw = || drop(conv(&xp, &wp, Some(&bp), &cp, false, None).unwrap());
        let xq = Tensor::ones((1, 16, 56, 56), candle_core::DType::F32, &Device::Cpu).unwrap();
        let wq = Tensor::ones((72, 16, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let bq = Tensor::ones(72, candle_core::DType::F32, &Device::Cpu).unwrap();
        let relu = ConvAttrs { activation: Some(Activation::Relu), ..cp.clone() };
        let pw56 = || drop(conv(&xq, &wq, Some(&bq), &relu, false, None).unwrap());
        let xr = Tensor::ones((1, 40, 14, 14), candle_core::DType::F32, &Device::Cpu).unwrap();
        let wr = Tensor::ones((240, 40, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let br = Tensor::ones(240, candle_core::DType::F32, &Device::Cpu).unwrap();
        let pw14 = || drop(conv(&xr, &wr, Some(&br), &relu, false, None).unwrap());
        let x512 = Tensor::ones((1, 512, 7, 7), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w512 = Tensor::ones((512, 512, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let deep = || drop(conv(&x512, &w512, None, &c64, false, None).unwrap());
        let x256 = Tensor::ones((1, 256, 14, 14), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w256 = Tensor::ones((256, 256, 3, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mid = || drop(conv(&x256, &w256, None, &c64, false, None).unwrap());
        let depthwise = || drop(conv(&x, &w, None, &dw, false, None).unwrap());
        let maxpool = || drop(pool(&x, PoolKind::Max, &mp).unwrap());
        let cases: [(&str, &(dyn Fn() + Sync)); 9] = [
            ("pointwise 96->576 on 7x7", &pw),
            ("pointwise 40->240 on 14x14 with Relu", &pw14),
            ("conv 3x3 512->512 on 7x7", &deep),
            ("conv 3x3 256->256 on 14x14", &mid),
            ("pointwise 16->72 on 56x56 with Relu", &pw56),
            ("conv 3x3 64->64 on 56x56", &full),
            ("conv 3x3/2 3->16 on 224x224", &stem),
            ("depthwise 5x5 on 1x96x56x56", &depthwise),
            ("maxpool 3x3/2 on 1x96x56x56", &maxpool),
        ];
        for (name, f) in cases {
            let single = one.install(|| median_time(f));
            let all = median_time(f);
            println!(
                "{name}: 1 thread {:.3} ms, {} threads {:.3} ms",
                single.as_secs_f64() * 1e3,
                Team::current(Team::threads),
                all.as_secs_f64() * 1e3
            );
        }
    }
}

/// The products on packed weights against the gemm crate's, which `ops_tests` checks
/// against a direct convolution.
#[cfg(test)]
mod packed_tests {
    use super::*;

    fn attrs(
        k: usize,
        stride: usize,
        dilation: usize,
        pads: [usize; 4],
        group: usize,
    ) -> ConvAttrs {
        ConvAttrs {
            window: Window {
                auto_pad: AutoPad::NotSet,
                kernel_shape: Some(vec![k, k]),
                strides: Some(vec![stride, stride]),
                dilations: Some(vec![dilation, dilation]),
                pads: Some(pads.to_vec()),
                ceil_mode: false,
            },
            group,
            activation: None,
        }
    }

    fn seq(n: usize, salt: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + salt * 11) % 23) as f32 - 11.0) / 13.0).collect()
    }

    #[test]
    fn packed_products_match_the_gemm_crates() {
        // (n, c, h, w, m, k, stride, dilation, pads, group): channel counts that are not
        // multiples of a panel, widths whose last vector reaches into the padding, depths
        // over one pass (3 * 7 * 7 and 80 * 9 > DEPTH_BLOCK), groups, stride 2, dilation,
        // asymmetric pads, batch 2. The last four are deeper than PACKED_MAX_DEPTH, with
        // whole panels of channels, and run as lanes products: passes of unequal depth, a
        // 7x7 map (steps of 5 and 6 positions), a tile of more than one group of
        // positions, stride 2 with asymmetric pads, batch 2 and groups.
        let cases = [
            (1, 3, 32, 32, 16, 3, 1, 1, [1; 4], 1),
            (1, 3, 40, 38, 13, 7, 2, 1, [3; 4], 1),
            (2, 80, 9, 11, 70, 3, 1, 1, [1, 0, 2, 1], 1),
            (1, 8, 15, 17, 10, 3, 2, 2, [2; 4], 2),
            (1, 16, 23, 23, 64, 3, 2, 1, [1; 4], 1),
            (1, 136, 7, 7, 128, 3, 1, 1, [1; 4], 1),
            (1, 130, 20, 19, 64, 3, 1, 1, [1; 4], 1),
            (2, 130, 10, 9, 64, 3, 2, 1, [1, 0, 2, 1], 1),
            (1, 264, 6, 5, 128, 3, 1, 1, [1; 4], 2),
        ];
        for (i, (n, c, h, w, m, k, stride, dilation, pads, group)) in cases.into_iter().enumerate()
        {
            let dev = &Device::Cpu;
            let x = Tensor::from_vec(seq(n * c * h * w, i), (n, c, h, w), dev).unwrap();
            let wt = Tensor::from_vec(seq(m * c / group * k * k, i + 1), (m, c / group, k, k), dev)
                .unwrap();
            let b = Tensor::from_vec(seq(m, i + 2), m, dev).unwrap();
            let mut attrs = attrs(k, stride, dilation, pads, group);
            let packed = pack_weights(&wt, &attrs).unwrap().expect("packed");
            for threads in [1, 2] {
                let team =
                    if threads == 1 { Team::new(1) } else { Team::new(2).splitting_everything() };
                attrs.activation = (threads == 2).then_some(Activation::Relu);
                let (want, got) = team.install(|| {
                    (
                        conv(&x, &wt, Some(&b), &attrs, false, None).unwrap(),
                        conv(&x, &packed, Some(&b), &attrs, true, None).unwrap(),
                    )
                });
                assert_eq!(want.dims(), got.dims());
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (j, (g, w)) in flat(&got).iter().zip(flat(&want)).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "case {i}, {threads} threads, output {j}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn kernels_of_several_taps_are_packed_if_shallow_or_whole_panels() {
        let ones = |d: &[usize]| Tensor::ones(d, candle_core::DType::F32, &Device::Cpu).unwrap();
        let plain = attrs(3, 1, 1, [1; 4], 1);
        assert!(pack_weights(&ones(&[64, 128, 3, 3]), &plain).unwrap().is_some());
        // Deeper than PACKED_MAX_DEPTH: for lanes products with whole panels of channels,
        // else not.
        assert!(pack_weights(&ones(&[64, 256, 3, 3]), &plain).unwrap().is_some());
        assert!(pack_weights(&ones(&[40, 256, 3, 3]), &plain).unwrap().is_none());
        // A 1x1 kernel, depthwise.
        assert!(pack_weights(&ones(&[64, 32, 1, 1]), &attrs(1, 1, 1, [0; 4], 1))
            .unwrap()
            .is_none());
        // Depthwise weights are packed where blocks of channels run.
        let depthwise = pack_weights(&ones(&[32, 1, 3, 3]), &attrs(3, 1, 1, [1; 4], 32)).unwrap();
        assert_eq!(depthwise.is_some(), depthwise_block().is_some());
        // Not with a channel multiplier (two outputs per input channel).
        assert!(pack_weights(&ones(&[64, 1, 3, 3]), &attrs(3, 1, 1, [1; 4], 32))
            .unwrap()
            .is_none());
    }

    #[test]
    fn depthwise_weights_unpack_to_what_was_packed() {
        // 20 channels: a partial last block at both widths.
        let (m, kk) = (20, 9);
        let ws = seq(m * kk, 0);
        for block in [8, 16] {
            let packed = pack_depthwise(&ws, m, kk, block);
            assert_eq!(packed.len(), ws.len());
            // Channel 17's tap 4: in the block from 16 on, of 4 (block 16) or 8 channels.
            let n = (m - 16).min(block);
            assert_eq!(packed[16 * kk + 4 * n + 1], ws[17 * kk + 4], "block {block}");
            assert_eq!(unpack_depthwise(&packed, m, kk, block), ws, "block {block}");
        }
    }

    /// Depthwise convolutions on packed weights give the same outputs, to the bit, as on
    /// the weights as they are: in blocks of channels (a partial one too) and, on a plane
    /// too large for blocks, planar.
    #[test]
    fn packed_depthwise_weights_give_the_same_outputs() {
        // (c, h, w, k, stride, pads)
        let cases = [
            (20, 9, 11, 3, 1, [1; 4]),
            (24, 14, 14, 5, 2, [2; 4]),
            (16, 70, 70, 3, 2, [1, 0, 1, 0]),
        ];
        for (i, (c, h, w, k, stride, pads)) in cases.into_iter().enumerate() {
            let dev = &Device::Cpu;
            let x = Tensor::from_vec(seq(c * h * w, i), (1, c, h, w), dev).unwrap();
            let wt = Tensor::from_vec(seq(c * k * k, i + 1), (c, 1, k, k), dev).unwrap();
            let b = Tensor::from_vec(seq(c, i + 2), c, dev).unwrap();
            let mut attrs = attrs(k, stride, 1, pads, c);
            attrs.activation = Some(Activation::Relu);
            let Some(packed) = pack_weights(&wt, &attrs).unwrap() else {
                assert!(depthwise_block().is_none(), "case {i}: not packed where blocks run");
                continue;
            };
            for threads in [1, 2] {
                let team =
                    if threads == 1 { Team::new(1) } else { Team::new(2).splitting_everything() };
                let (want, got) = team.install(|| {
                    (
                        conv(&x, &wt, Some(&b), &attrs, false, None).unwrap(),
                        conv(&x, &packed, Some(&b), &attrs, true, None).unwrap(),
                    )
                });
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(flat(&got), flat(&want), "case {i}, {threads} threads");
            }
        }
    }
}

/// Per-layer timing of the convolutions, on one thread: the unfolded convolution's two
/// product loops, ours on packed weights and the gemm crate's (what [`PACKED_MAX_DEPTH`]
/// was chosen by), and MobileNetV3's depthwise layers:
/// `cargo test --release -p basalt-runtime --lib _layers -- --ignored --nocapture`.
#[cfg(test)]
mod layer_timing {
    use super::*;

    /// A square `k x k` window of stride `s`, padded by `k / 2` on every side.
    fn square(k: usize, s: usize, group: usize, activation: Option<Activation>) -> ConvAttrs {
        ConvAttrs {
            window: Window {
                auto_pad: AutoPad::NotSet,
                kernel_shape: Some(vec![k, k]),
                strides: Some(vec![s, s]),
                dilations: None,
                pads: Some(vec![k / 2; 4]),
                ceil_mode: false,
            },
            group,
            activation,
        }
    }

    /// The median time of `conv` on one thread and its rate for `macs` multiply-adds.
    fn timed(one: &Team, macs: usize, conv: impl Fn() -> Tensor) -> String {
        let t = scaling::median_time(|| drop(one.install(&conv)));
        format!(
            "{:.4} ms ({:.1} GMAC/s)",
            t.as_secs_f64() * 1e3,
            macs as f64 / t.as_secs_f64() / 1e9
        )
    }

    #[test]
    #[ignore = "timing, not a check"]
    fn conv_layers() {
        let one = Team::new(1);
        // (input channels, output channels, size, kernel, stride)
        let layers = [
            (3, 64, 224, 7, 2),
            (64, 128, 56, 3, 2),
            (256, 256, 14, 3, 1),
            (256, 512, 14, 3, 2),
            (512, 512, 7, 3, 1),
            (16, 32, 16, 3, 1),
            (3, 16, 32, 3, 1),
        ];
        for (c, m, hw, k, s) in layers {
            let attrs = square(k, s, 1, None);
            let x = Tensor::ones((1, c, hw, hw), candle_core::DType::F32, &Device::Cpu).unwrap();
            let w = Tensor::ones((m, c, k, k), candle_core::DType::F32, &Device::Cpu).unwrap();
            let packed = pack_weights(&w, &attrs).unwrap().unwrap();
            let macs = m * c * k * k * (hw / s) * (hw / s);
            let time = |w: &Tensor, packed: bool| {
                timed(&one, macs, || conv(&x, w, None, &attrs, packed, None).unwrap())
            };
            println!(
                "{c}->{m} {hw}x{hw} k{k} s{s}: packed {}, gemm crate {}",
                time(&packed, true),
                time(&w, false)
            );
        }
    }

    #[test]
    #[ignore = "timing, not a check"]
    fn max_pool_layers() {
        let one = Team::new(1);
        // (channels, input size, kernel, stride, padding): ResNet's and the cnn's.
        let layers = [(64, 112, 3, 2, 1), (16, 32, 2, 2, 0), (32, 16, 2, 2, 0)];
        for (c, hw, k, s, pad) in layers {
            let attrs = PoolAttrs {
                window: Window { pads: Some(vec![pad; 4]), ..square(k, s, 1, None).window },
                count_include_pad: false,
            };
            let x = Tensor::ones((1, c, hw, hw), candle_core::DType::F32, &Device::Cpu).unwrap();
            let out = (hw + 2 * pad - k) / s + 1;
            let time =
                timed(&one, c * k * k * out * out, || pool(&x, PoolKind::Max, &attrs).unwrap());
            println!("max pool {c} {hw}x{hw} k{k} s{s} p{pad}: {time}");
        }
    }

    #[test]
    #[ignore = "timing, not a check"]
    fn depthwise_layers() {
        let one = Team::new(1);
        // (channels, input size, kernel, stride)
        let layers = [
            (16, 112, 3, 2),
            (72, 56, 3, 2),
            (88, 28, 3, 1),
            (96, 28, 5, 2),
            (240, 14, 5, 1),
            (288, 14, 5, 2),
            (576, 7, 5, 1),
        ];
        for (c, hw, k, s) in layers {
            let attrs = square(k, s, c, Some(Activation::Relu));
            let x = Tensor::ones((1, c, hw, hw), candle_core::DType::F32, &Device::Cpu).unwrap();
            let w = Tensor::ones((c, 1, k, k), candle_core::DType::F32, &Device::Cpu).unwrap();
            let out = hw.div_ceil(s);
            let time = timed(&one, c * k * k * out * out, || {
                conv(&x, &w, None, &attrs, false, None).unwrap()
            });
            println!("depthwise {c} {hw}x{hw} k{k} s{s}: {time}");
        }
    }
}
