//! Depthwise convolution with channels along the vector lanes.
//!
//! The planar kernel ([`super::depthwise_plane`]) runs one channel's plane at a time, its
//! output positions along the lanes: on MobileNet's 7x7 and 14x14 maps most of its time
//! goes to work done once per plane and to lanes past the end of a row. Here a block of as
//! many channels as a vector has lanes is laid out position by position (`[y][x][lane]`,
//! padded), so each tap of each output is one multiply-add of whole vectors, no lane is
//! wasted, and the per-block work is shared by all its channels. The sums are written
//! back channel by channel.

use super::{Activation, Finish, Geom};

/// How many channels one block holds on this CPU: a vector's lanes.
pub(super) fn lanes() -> usize {
    struct Lanes;
    impl pulp::WithSimd for Lanes {
        type Output = usize;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> usize {
            S::F32_LANES
        }
    }
    pulp::Arch::new().dispatch(Lanes)
}

/// Whether [`Block`] runs on this CPU: one with AVX-512 (blocks of 16 channels) or with
/// AVX2 and FMA (blocks of 8), whose blocks are moved in and out with transposes in
/// registers.
pub(super) fn runs_here() -> bool {
    match lanes() {
        16 => std::arch::is_x86_feature_detected!("avx512f"),
        8 => {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        _ => false,
    }
}

/// Whether [`Block`] runs this geometry on this CPU ([`runs_here`]): a kernel of at least
/// one tap, a padded plane of at most [`MAX_PADDED_POSITIONS`], and with 8 lanes an output
/// plane of at most [`MAX_OUTPUTS_8_LANES`] ([`MAX_STRIDED_OUTPUTS_8_LANES`] when the
/// window strides). Others take the planar path.
pub(super) fn supports(geo: &Geom) -> bool {
    let (hp, wp) = padded_size(geo);
    let outputs = geo.oh * geo.ow;
    let most = match geo.sh * geo.sw {
        1 => MAX_OUTPUTS_8_LANES,
        _ => MAX_STRIDED_OUTPUTS_8_LANES,
    };
    runs_here()
        && outputs > 0
        && geo.kh * geo.kw > 0
        && hp * wp <= MAX_PADDED_POSITIONS
        && (lanes() > 8 || outputs <= most)
}

/// The most output positions of a plane blocks of 8 channels (AVX2) take. Per layer at
/// one thread on an AVX2 CPU, blocks against planes: MobileNetV3's 5x5 layers on 14x14
/// and 7x7 outputs 0.043 vs 0.095, 0.073 vs 0.12 and 0.057 vs 0.13 ms; on its 28x28
/// outputs, where a plane's rows fill the 8 lanes well, about the same (0.066 vs 0.067
/// and 0.112 vs 0.119 ms, within the host's noise), so those stay planar. (With 16 lanes,
/// 7- and 14-wide rows waste more of each vector, and blocks won on all of MobileNetV3's
/// planes that fit.)
const MAX_OUTPUTS_8_LANES: usize = 16 * 16;

/// [`MAX_OUTPUTS_8_LANES`] for a window that strides: a block moves every position of
/// its input plane into vectors (four per output at stride 2) and its outputs back, where
/// the planar path writes its stride phases in one vector loop per plane. Once rows of 8
/// positions or more moved into a block row by row ([`avx2::to_positions`]), blocks won
/// on MobileNetV3's strided layers up to 28x28 outputs (one thread, AVX2, lowest of 4
/// alternations, blocks against planes): 96 channels 28x28 -> 14x14, 5x5 at stride 2,
/// 0.034 against 0.046 ms; 72 channels 56x56 -> 28x28, 3x3, 0.064 against 0.069. (When a
/// block moved 8 positions at a time across the rows' ends, it lost the first of those
/// layers, 0.051 against 0.042, and strided blocks stopped at 8x8 outputs.)
const MAX_STRIDED_OUTPUTS_8_LANES: usize = 28 * 28;

/// The most positions of a padded plane this path takes (64 x 64): each thread keeps its
/// block buffers (16 floats per position) between calls, and a larger plane would keep
/// megabytes. MobileNetV3's first depthwise layer (112 x 112, 16 channels) kept 1 MiB
/// per thread and left the server 15.1 to 15.4 MiB beyond the model at idle, where the
/// target is 15 (13.6 with this bound); the planar path runs that layer in about the same
/// time (0.09 ms).
const MAX_PADDED_POSITIONS: usize = 64 * 64;

/// The padded rows and columns of a plane: the input's with its top and left padding,
/// and as far as the last window reads.
fn padded_size(geo: &Geom) -> (usize, usize) {
    let last = |out: usize, stride: usize, k: usize, dilation: usize| {
        out.saturating_sub(1) * stride + (k - 1) * dilation + 1
    };
    (
        (geo.h + geo.pt).max(last(geo.oh, geo.sh, geo.kh, geo.dh)),
        (geo.w + geo.pl).max(last(geo.ow, geo.sw, geo.kw, geo.dw)),
    )
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// Writes `len` vectors of [`lanes`] channels, the vector of position `q` at `src[q *
/// step ..]`, as rows of positions: `rows[c * stride + q]` = lane `c` of position `q`'s
/// vector, for each of the first `channels` lanes. By the transposes that move a block
/// out.
///
/// # Safety
///
/// [`runs_here`] holds; `channels` is at most [`lanes`]; `src` is valid for reads of a
/// vector at each `q * step`, `q < len`; `rows` for writes of `channels` rows of `len`
/// floats, `stride` apart, that nothing else touches during the call.
pub(super) unsafe fn vectors_to_rows(
    src: *const f32,
    step: usize,
    len: usize,
    rows: *mut f32,
    stride: usize,
    channels: usize,
) {
    // SAFETY (both): the CPU has the instructions of the lanes it runs ([`runs_here`]),
    // and the rest is the caller's contract.
    match lanes() {
        16 => unsafe { x86::to_rows(src, step, len, rows, stride, channels) },
        8 => unsafe { avx2::to_rows(src, step, len, rows, stride, channels) },
        l => unreachable!("no moves for vectors of {l} floats"),
    }
}

/// Runs `f` with this thread's [`Scratch`], kept from call to call: a layer's padding is
/// written only when the geometry changes, and nothing is allocated once the largest
/// layer has run.
pub(super) fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with_borrow_mut(f)
}

/// One thread's buffers, kept from block to block.
#[derive(Default)]
pub(super) struct Scratch {
    /// The block's input, position-major and padded, from `padded_at` on (64-byte
    /// aligned); its padding is written only when the geometry or lane count changes.
    padded: Vec<f32>,
    padded_at: usize,
    padded_for: Option<(Geom, usize)>,
    /// A partial block's weights, tap-major (one vector per tap, zero past its channels).
    weights: Vec<f32>,
    /// The block's bias, one vector.
    bias: Vec<f32>,
    /// Where each tap reads, in positions from the window's first.
    taps: Vec<usize>,
    /// Where each output's window starts, in positions; rounded up to whole groups of
    /// [`GROUP`] by repeating the last.
    bases: Vec<usize>,
    /// The sums, position-major.
    sums: Vec<f32>,
}

/// One block of channels of a depthwise convolution: `out` (its channels' output planes,
/// `out.len() / (oh * ow)` of them, at most the lanes of a vector) from `input` (their
/// `h x w` planes) and `weights` (their `kh x kw` kernels).
pub(super) struct Block<'a> {
    pub input: &'a [f32],
    /// Packed by [`super::pack_depthwise`]: tap-major, each tap's weights for the block's
    /// channels.
    pub weights: &'a [f32],
    /// One per channel.
    pub bias: &'a [f32],
    pub geo: &'a Geom,
    pub scratch: &'a mut Scratch,
    pub out: &'a mut [f32],
    pub activation: Option<Activation>,
}

impl pulp::WithSimd for Block<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let Block { input, weights, bias, geo, scratch, out, activation } = self;
        let l = S::F32_LANES;
        let (hw, p, kk) = (geo.h * geo.w, geo.oh * geo.ow, geo.kh * geo.kw);
        let channels = out.len() / p;
        let (hp, wp) = padded_size(geo);
        let key = Some((*geo, l));
        if scratch.padded_for != key {
            let len = hp * wp * l;
            if scratch.padded.len() < len + 16 {
                scratch.padded.resize(len + 16, 0.0);
            }
            scratch.padded_at = scratch.padded.as_ptr().align_offset(64).min(16);
            let padded = &mut scratch.padded[scratch.padded_at..][..len];
            // Only the border: every position inside it is written for each block.
            for (y, row) in padded.chunks_exact_mut(wp * l).enumerate() {
                if y < geo.pt || y >= geo.pt + geo.h {
                    row.fill(0.0);
                } else {
                    row[..geo.pl * l].fill(0.0);
                    row[(geo.pl + geo.w) * l..].fill(0.0);
                }
            }
            scratch.padded_for = key;
            scratch.bases.clear();
            scratch.bases.extend(
                (0..geo.oh)
                    .flat_map(|oy| (0..geo.ow).map(move |ox| oy * geo.sh * wp + ox * geo.sw)),
            );
            let last = scratch.bases.last().copied().unwrap_or(0);
            scratch.bases.resize(p.next_multiple_of(GROUP), last);
            scratch.taps.clear();
            scratch
                .taps
                .extend((0..kk).map(|t| (t / geo.kw) * geo.dh * wp + (t % geo.kw) * geo.dw));
        }
        let padded = &mut scratch.padded[scratch.padded_at..][..hp * wp * l];
        // In: lane `c` of position (y + pt, x + pl) is channel c's (y, x). The lanes past
        // `channels` of a partial block hold zeros or what they held: their weights are
        // zero and their sums are not written out.
        let at = |q: usize| ((q / geo.w + geo.pt) * wp + geo.pl + q % geo.w) * l;
        if l == 16 {
            let interior = &mut padded[at(0)..];
            // SAFETY: 16 lanes are AVX-512's (pulp dispatched to it).
            unsafe { x86::to_positions(input, channels, hw, interior, (geo.w, wp)) };
        } else if l == 8 {
            let interior = &mut padded[at(0)..];
            // SAFETY: 8 lanes are AVX2's (pulp dispatched to it, with FMA).
            unsafe { avx2::to_positions(input, channels, hw, interior, (geo.w, wp)) };
        } else {
            for (c, plane) in input.chunks_exact(hw).take(channels).enumerate() {
                for (q, &v) in plane.iter().enumerate() {
                    padded[at(q) + c] = v;
                }
            }
        }
        // A whole block's packed weights are its vectors; a partial block's are widened.
        let w = if channels == l {
            &weights[..kk * l]
        } else {
            let w = &mut scratch.weights;
            w.clear();
            w.resize(kk * l, 0.0);
            for (dst, src) in w.chunks_exact_mut(l).zip(weights.chunks_exact(channels)) {
                dst[..channels].copy_from_slice(src);
            }
            &w[..]
        };
        scratch.bias.clear();
        scratch.bias.extend_from_slice(&bias[..channels]);
        scratch.bias.resize(l, 0.0);
        // Not cleared: every sum is written before it is read.
        let groups = scratch.bases.len();
        if scratch.sums.len() < groups * l {
            scratch.sums.resize(groups * l, 0.0);
        }
        let (wv, _) = S::as_simd_f32s(w);
        let (xs, _) = S::as_simd_f32s(padded);
        let (sums, _) = S::as_mut_simd_f32s(&mut scratch.sums[..groups * l]);
        // Every output is written below (the caller does not zero them): a kernel of no
        // taps or a plane of no outputs is not run here ([`supports`]), and the padded
        // plane holds every window ([`padded_size`]).
        let (Some(&b), Some(&last_tap), Some(&last_base)) =
            (S::as_simd_f32s(&scratch.bias).0.first(), scratch.taps.last(), scratch.bases.last())
        else {
            unreachable!("a depthwise block with no taps or no outputs");
        };
        assert!(
            last_base + last_tap < xs.len() && wv.len() >= kk,
            "a depthwise block's windows reach past its padded plane"
        );
        let taps = &scratch.taps[..kk];
        let wv = &wv[..kk];
        // GROUP outputs at a time, across rows: as many independent sums as hide the
        // multiply-add's latency, each tap's weight loaded once for all of them.
        for (bases, out) in scratch.bases.chunks_exact(GROUP).zip(sums.chunks_exact_mut(GROUP)) {
            let mut a = [b; GROUP];
            for (&tap, &w) in taps.iter().zip(wv) {
                for (a, &base) in a.iter_mut().zip(bases) {
                    // SAFETY: `base + tap <= last_base + last_tap < xs.len()` (checked
                    // above; the bases and taps grow).
                    let x = unsafe { *xs.get_unchecked(base + tap) };
                    *a = simd.mul_add_e_f32s(x, w, *a);
                }
            }
            for (o, a) in out.iter_mut().zip(a) {
                *o = a;
            }
        }
        // Out: channel by channel, then the activation over each plane.
        let sums = &scratch.sums[..p * l];
        if l == 16 {
            // SAFETY: as above.
            unsafe { x86::to_planes(sums, p, out, channels) };
        } else if l == 8 {
            // SAFETY: as above.
            unsafe { avx2::to_planes(sums, p, out, channels) };
        } else {
            for (c, plane) in out.chunks_exact_mut(p).enumerate() {
                for (dst, &v) in plane.iter_mut().zip(sums[c..].iter().step_by(l)) {
                    *dst = v;
                }
            }
        }
        if activation.is_some() {
            for plane in out.chunks_exact_mut(p) {
                let finish =
                    Finish { values: plane, from: None, add: None, bias: 0.0, act: activation };
                pulp::WithSimd::with_simd(finish, simd);
            }
        }
    }
}

/// Outputs summed together by [`Block`].
const GROUP: usize = 8;

/// The moves between planes and blocks as 8 x 8 transposes in registers, on CPUs with
/// AVX2 but not AVX-512 (where a block is 8 channels); as [`x86`]'s, which documents them.
mod avx2 {
    use std::arch::x86_64::{
        __m256, __m256i, _mm256_cmpgt_epi32, _mm256_loadu_ps, _mm256_maskload_ps,
        _mm256_maskstore_ps, _mm256_permute2f128_ps, _mm256_set1_epi32, _mm256_setr_epi32,
        _mm256_setzero_ps, _mm256_shuffle_ps, _mm256_storeu_ps, _mm256_unpackhi_ps,
        _mm256_unpacklo_ps,
    };

    /// `$body` 8 times, with `$i` a constant 0 to 7 in each.
    macro_rules! unroll8 {
        ($i:ident => $body:block) => {
            unroll8!(@ $i $body; 0 1 2 3 4 5 6 7)
        };
        (@ $i:ident $body:block; $($n:literal)*) => {
            $({
                const $i: usize = $n;
                $body
            })*
        };
    }

    /// Transposes 8 rows of 8 floats in registers: pairs of rows interleaved, then pairs
    /// of pairs, then the 128-bit halves swapped.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn transpose(r: &mut [__m256; 8]) {
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let u = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        for i in 0..4 {
            r[i] = _mm256_permute2f128_ps::<0x20>(u[i], u[i + 4]);
            r[i + 4] = _mm256_permute2f128_ps::<0x31>(u[i], u[i + 4]);
        }
    }

    /// The mask of the first `n` (at most 8) lanes.
    #[target_feature(enable = "avx2")]
    #[inline]
    fn first(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    /// Block in, 8 channels: as [`super::x86::to_positions`]. Rows of 8 positions or more
    /// move row by row ([`rows_to_positions`]), narrower ones 8 positions at a time
    /// across the rows' ends: row by row, each of a 7x7 plane's rows took a masked step
    /// of 7 (MobileNetV3's 576-channel 7x7 layer, 0.066 -> 0.069 ms).
    ///
    /// # Panics
    ///
    /// If `planes` is shorter than `channels * len`, `channels` is over 8 or a position
    /// is past the end of `dst`.
    #[target_feature(enable = "avx2")]
    pub(super) fn to_positions(
        planes: &[f32],
        channels: usize,
        len: usize,
        dst: &mut [f32],
        (width, pitch): (usize, usize),
    ) {
        assert!(channels <= 8 && planes.len() >= channels * len && width > 0);
        if width >= 8 && len.is_multiple_of(width) {
            return rows_to_positions(planes, channels, len, dst, (width, pitch));
        }
        let (mut row, mut col) = (0, 0);
        let mut q0 = 0;
        while q0 < len {
            let n = (len - q0).min(8);
            let mut rows = [_mm256_setzero_ps(); 8];
            unroll8!(C => {
                if C < channels {
                    let src = &planes[C * len + q0..][..n];
                    // SAFETY: the `n` floats of `src`; a masked move only for a partial
                    // chunk (masked moves are slow on some CPUs).
                    rows[C] = unsafe {
                        if n == 8 {
                            _mm256_loadu_ps(src.as_ptr())
                        } else {
                            _mm256_maskload_ps(src.as_ptr(), first(n))
                        }
                    };
                }
            });
            transpose(&mut rows);
            unroll8!(Q => {
                if Q < n {
                    let to = (row * pitch + col) * 8;
                    let dst = &mut dst[to..to + 8];
                    // SAFETY: 8 floats of `dst`.
                    unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), rows[Q]) };
                    col += 1;
                    if col == width {
                        (row, col) = (row + 1, 0);
                    }
                }
            });
            q0 += n;
        }
    }

    /// [`to_positions`] for whole rows of at least 8 positions: each step moves 8
    /// positions of one row to consecutive positions of `dst`, the last step of a row
    /// overlapping the one before it. Moved 8 at a time across the rows' ends, each store
    /// needed its own address and a check for the row's end, and the move took most of a
    /// block (one thread, AVX2, lowest of 4 alternations: MobileNetV3's 288 channels
    /// 14x14 -> 7x7, 5x5 at stride 2, 0.043 -> 0.033 ms; 240 channels on 14x14, 0.082 ->
    /// 0.074).
    ///
    /// # Panics
    ///
    /// If `planes` is shorter than `channels * len`, `channels` is over 8, `len` is not
    /// whole rows of `width` (at least 8) or a position is past the end of `dst`.
    #[target_feature(enable = "avx2")]
    fn rows_to_positions(
        planes: &[f32],
        channels: usize,
        len: usize,
        dst: &mut [f32],
        (width, pitch): (usize, usize),
    ) {
        assert!(channels <= 8 && planes.len() >= channels * len && width >= 8);
        assert!(len.is_multiple_of(width), "positions that are not whole rows");
        let rows = len / width;
        if rows == 0 {
            return;
        }
        assert!(((rows - 1) * pitch + width) * 8 <= dst.len(), "positions past the block");
        let (src, out) = (planes.as_ptr(), dst.as_mut_ptr());
        for row in 0..rows {
            for col in super::super::covering_steps(width, 8) {
                let mut v = [_mm256_setzero_ps(); 8];
                unroll8!(C => {
                    if C < channels {
                        // SAFETY: floats `col .. col + 8 <= width` of row `row` of plane
                        // `C`, within the `channels * len` floats of `planes` (checked
                        // above).
                        v[C] = unsafe { _mm256_loadu_ps(src.add(C * len + row * width + col)) };
                    }
                });
                transpose(&mut v);
                unroll8!(Q => {
                    // SAFETY: position `col + Q < width` of row `row`: 8 floats ending at
                    // most at `((rows - 1) * pitch + width) * 8 <= dst.len()` (checked
                    // above).
                    unsafe { _mm256_storeu_ps(out.add((row * pitch + col + Q) * 8), v[Q]) };
                });
            }
        }
    }

    /// Block out, 8 channels: as [`super::x86::to_planes`].
    ///
    /// # Panics
    ///
    /// If `src` is shorter than `len * 8`, `channels` is over 8 or `planes` is shorter
    /// than `channels * len`.
    #[target_feature(enable = "avx2")]
    pub(super) fn to_planes(src: &[f32], len: usize, planes: &mut [f32], channels: usize) {
        assert!(channels <= 8 && src.len() >= len * 8 && planes.len() >= channels * len);
        // SAFETY: `len` vectors of `src` and `channels` planes of `len` floats (checked
        // above), which the `&mut` keeps to this call.
        unsafe { to_rows(src.as_ptr(), 8, len, planes.as_mut_ptr(), len, channels) };
    }

    /// Channels out, 8 at a time: as [`super::x86::to_rows`].
    ///
    /// # Safety
    ///
    /// As for [`super::x86::to_rows`], with 8 lanes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn to_rows(
        src: *const f32,
        step: usize,
        len: usize,
        rows: *mut f32,
        stride: usize,
        channels: usize,
    ) {
        let mut q0 = 0;
        while q0 < len {
            let n = (len - q0).min(8);
            let mut v = [_mm256_setzero_ps(); 8];
            unroll8!(Q => {
                if Q < n {
                    // SAFETY: the vector of position `q0 + Q < len` (the contract).
                    v[Q] = unsafe { _mm256_loadu_ps(src.add((q0 + Q) * step)) };
                }
            });
            transpose(&mut v);
            unroll8!(C => {
                if C < channels {
                    // SAFETY: floats `q0 .. q0 + n <= len` of row `C < channels` (the
                    // contract); a masked move only for a partial chunk.
                    unsafe {
                        let to = rows.add(C * stride + q0);
                        if n == 8 {
                            _mm256_storeu_ps(to, v[C])
                        } else {
                            _mm256_maskstore_ps(to, first(n), v[C])
                        }
                    };
                }
            });
            q0 += n;
        }
    }

    #[test]
    fn blocks_round_trip_through_positions() {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY (both calls): the CPU has AVX2 (the `if`).
            super::round_trip(
                8,
                |p, c, l, d, at| unsafe { to_positions(p, c, l, d, at) },
                |s, l, p, c| unsafe { to_planes(s, l, p, c) },
            );
        }
    }

    #[test]
    fn vectors_move_to_rows_apart() {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (the `if`); `strided_rows` passes buffers that
            // hold what each call reads and writes.
            super::strided_rows(8, |s, step, l, r, stride, c| unsafe {
                to_rows(s, step, l, r, stride, c)
            });
        }
    }
}

/// The moves between planes and blocks as 16 x 16 transposes in registers, on CPUs
/// with AVX-512 (where a block is 16 channels).
mod x86 {
    use std::arch::x86_64::{
        __m512i, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps,
        _mm512_permutex2var_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };

    /// The lanes of one butterfly stage of [`transpose`]: blocks of `b` swapped across
    /// rows `b` apart. For the lower row of a pair (`low`): its own lane `k`, or lane `k -
    /// b` of the other row; for the upper: lane `k + b` of the lower row, or its own.
    const fn stage(b: usize, low: bool) -> [i32; 16] {
        let mut lanes = [0i32; 16];
        let mut k = 0;
        while k < 16 {
            let own_half = k & b == 0;
            lanes[k] = match (low, own_half) {
                (true, true) => k as i32,
                (true, false) => (16 + k - b) as i32,
                (false, true) => (k + b) as i32,
                (false, false) => (16 + k) as i32,
            };
            k += 1;
        }
        lanes
    }

    /// The lanes of each butterfly stage of [`transpose`], blocks of 8, 4, 2 and 1.
    const STAGES: [([i32; 16], [i32; 16]); 4] = [
        (stage(8, true), stage(8, false)),
        (stage(4, true), stage(4, false)),
        (stage(2, true), stage(2, false)),
        (stage(1, true), stage(1, false)),
    ];

    /// `$body` 16 times, with `$i` a constant 0 to 15 in each: so arrays indexed by it
    /// stay in registers.
    macro_rules! unroll16 {
        ($i:ident => $body:block) => {
            unroll16!(@ $i $body; 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
        };
        (@ $i:ident $body:block; $($n:literal)*) => {
            $({
                const $i: usize = $n;
                $body
            })*
        };
    }

    /// Transposes 16 rows of 16 floats (`[__m512; 16]`) in registers: four stages, each
    /// swapping the off-diagonal blocks of every 2b x 2b block. Macros, so the rows never
    /// go through memory.
    macro_rules! transpose {
        ($rows:ident) => {
            transpose!(@stage $rows, 0, 8; 0 1 2 3 4 5 6 7);
            transpose!(@stage $rows, 1, 4; 0 1 2 3 8 9 10 11);
            transpose!(@stage $rows, 2, 2; 0 1 4 5 8 9 12 13);
            transpose!(@stage $rows, 3, 1; 0 2 4 6 8 10 12 14);
        };
        (@stage $rows:ident, $s:literal, $b:literal; $($i:literal)*) => {
            let (low, high) = STAGES[$s];
            // SAFETY: 64-byte reads of 16 i32s.
            let (low, high): (__m512i, __m512i) = unsafe {
                (_mm512_loadu_si512(low.as_ptr().cast()), _mm512_loadu_si512(high.as_ptr().cast()))
            };
            $({
                let (x, y) = ($rows[$i], $rows[$i + $b]);
                $rows[$i] = _mm512_permutex2var_ps(x, low, y);
                $rows[$i + $b] = _mm512_permutex2var_ps(x, high, y);
            })*
        };
    }

    /// The mask of the first `n` (at most 16) lanes.
    fn first(n: usize) -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }

    /// Block in: for every position `q < len` of the planes, lane `c` of
    /// `dst[to(q) .. to(q) + 16]` = `planes[c * len + q]` for each of the `channels` (at
    /// most 16) planes, 0 past them, where position `q` (row `q / width`, column `q %
    /// width`) goes to `to(q) = (q / width * pitch + q % width) * 16`. Rows of
    /// [`ROW_MOVE_MIN_WIDTH`] positions or more move row by row ([`rows_to_positions`]),
    /// narrower ones 16 positions at a time across the rows' ends.
    ///
    /// # Panics
    ///
    /// If `planes` is shorter than `channels * len`, `channels` is over 16 or a position
    /// is past the end of `dst`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn to_positions(
        planes: &[f32],
        channels: usize,
        len: usize,
        dst: &mut [f32],
        (width, pitch): (usize, usize),
    ) {
        assert!(channels <= 16 && planes.len() >= channels * len && width > 0);
        if width >= ROW_MOVE_MIN_WIDTH && len.is_multiple_of(width) {
            return rows_to_positions(planes, channels, len, dst, (width, pitch));
        }
        let (mut row, mut col) = (0, 0);
        let mut q0 = 0;
        while q0 < len {
            let n = (len - q0).min(16);
            let mut rows = [_mm512_setzero_ps(); 16];
            unroll16!(C => {
                if C < channels {
                    // SAFETY: lanes `C * len + q0 .. + n` of `planes` (checked above).
                    rows[C] = unsafe {
                        _mm512_maskz_loadu_ps(first(n), planes[C * len + q0..].as_ptr())
                    };
                }
            });
            transpose!(rows);
            unroll16!(Q => {
                if Q < n {
                    let to = (row * pitch + col) * 16;
                    let dst = &mut dst[to..to + 16];
                    // SAFETY: 16 floats of `dst`.
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), rows[Q]) };
                    col += 1;
                    if col == width {
                        (row, col) = (row + 1, 0);
                    }
                }
            });
            q0 += n;
        }
    }

    /// The narrowest rows [`rows_to_positions`] moves.
    const ROW_MOVE_MIN_WIDTH: usize = 12;

    /// [`to_positions`] for whole rows of at least [`ROW_MOVE_MIN_WIDTH`] positions: each
    /// step moves up to 16 positions of one row to consecutive positions of `dst`, the
    /// last step of a row overlapping the one before it; a row narrower than 16 is one
    /// masked step. As on AVX2 ([`super::avx2::to_positions`]), moved 16 positions at a
    /// time across the rows' ends the move took most of a block: 60% of MobileNetV3's
    /// 72-channel 56x56 -> 28x28 layer (perf). Row by row (one thread, an AVX-512 CPU,
    /// lowest of 5 alternations): that layer 0.076 -> 0.056 ms, 96 channels 28x28 ->
    /// 14x14 0.033 -> 0.028, 288 channels 14x14 -> 7x7 0.026 -> 0.020, 240 channels on
    /// 14x14 0.053 -> 0.050. Rows of 7 (MobileNetV3's 7x7 planes) keep the move across
    /// the rows' ends: a masked step per row would use 7 of each transpose's 16 positions.
    ///
    /// # Panics
    ///
    /// If `planes` is shorter than `channels * len`, `channels` is over 16, `len` is not
    /// whole rows of `width` (at least [`ROW_MOVE_MIN_WIDTH`]) or a position is past the
    /// end of `dst`.
    #[target_feature(enable = "avx512f")]
    fn rows_to_positions(
        planes: &[f32],
        channels: usize,
        len: usize,
        dst: &mut [f32],
        (width, pitch): (usize, usize),
    ) {
        assert!(channels <= 16 && planes.len() >= channels * len && width >= ROW_MOVE_MIN_WIDTH);
        assert!(len.is_multiple_of(width), "positions that are not whole rows");
        let rows = len / width;
        if rows == 0 {
            return;
        }
        assert!(((rows - 1) * pitch + width) * 16 <= dst.len(), "positions past the block");
        let step = width.min(16);
        let mask = first(step);
        let (src, out) = (planes.as_ptr(), dst.as_mut_ptr());
        for row in 0..rows {
            for col in super::super::covering_steps(width, step) {
                let mut v = [_mm512_setzero_ps(); 16];
                unroll16!(C => {
                    if C < channels {
                        // SAFETY: floats `col .. col + step <= width` of row `row` of
                        // plane `C`, within the `channels * len` floats of `planes`
                        // (checked above); the lanes past `step` are not read.
                        v[C] = unsafe {
                            _mm512_maskz_loadu_ps(mask, src.add(C * len + row * width + col))
                        };
                    }
                });
                transpose!(v);
                unroll16!(Q => {
                    if Q < step {
                        // SAFETY: position `col + Q < width` of row `row`: 16 floats
                        // ending at most at `((rows - 1) * pitch + width) * 16 <=
                        // dst.len()` (checked above).
                        unsafe { _mm512_storeu_ps(out.add((row * pitch + col + Q) * 16), v[Q]) };
                    }
                });
            }
        }
    }

    /// Block out: `planes[c * len + q]` = lane `c` of `src[q * 16 .. q * 16 + 16]`, for
    /// each of the first `channels` lanes and every `q < len`.
    ///
    /// # Panics
    ///
    /// If `src` is shorter than `len * 16`, `channels` is over 16 or `planes` is shorter
    /// than `channels * len`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn to_planes(src: &[f32], len: usize, planes: &mut [f32], channels: usize) {
        assert!(channels <= 16 && src.len() >= len * 16 && planes.len() >= channels * len);
        // SAFETY: `len` vectors of `src` and `channels` planes of `len` floats (checked
        // above), which the `&mut` keeps to this call.
        unsafe { to_rows(src.as_ptr(), 16, len, planes.as_mut_ptr(), len, channels) };
    }

    /// Channels out of position-major vectors: `rows[c * stride + q]` = lane `c` of the
    /// vector at `src[q * step ..]`, for each of the first `channels` lanes and every `q <
    /// len`, 16 positions at a time by transposes in registers.
    ///
    /// # Safety
    ///
    /// `channels` is at most 16; `src` is valid for reads of a vector at each `q * step`,
    /// `q < len`; `rows` for writes of `channels` rows of `len` floats, `stride` apart,
    /// that nothing else touches during the call.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn to_rows(
        src: *const f32,
        step: usize,
        len: usize,
        rows: *mut f32,
        stride: usize,
        channels: usize,
    ) {
        let mut q0 = 0;
        while q0 < len {
            let n = (len - q0).min(16);
            let mut v = [_mm512_setzero_ps(); 16];
            unroll16!(Q => {
                if Q < n {
                    // SAFETY: the vector of position `q0 + Q < len` (the contract).
                    v[Q] = unsafe { _mm512_loadu_ps(src.add((q0 + Q) * step)) };
                }
            });
            transpose!(v);
            unroll16!(C => {
                if C < channels {
                    // SAFETY: floats `q0 .. q0 + n <= len` of row `C < channels` (the
                    // contract).
                    unsafe { _mm512_mask_storeu_ps(rows.add(C * stride + q0), first(n), v[C]) };
                }
            });
            q0 += n;
        }
    }

    #[test]
    fn blocks_round_trip_through_positions() {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY (both calls): the CPU has AVX-512 (the `if`).
            super::round_trip(
                16,
                |p, c, l, d, at| unsafe { to_positions(p, c, l, d, at) },
                |s, l, p, c| unsafe { to_planes(s, l, p, c) },
            );
        }
    }

    #[test]
    fn vectors_move_to_rows_apart() {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 (the `if`); `strided_rows` passes buffers that
            // hold what each call reads and writes.
            super::strided_rows(16, |s, step, l, r, stride, c| unsafe {
                to_rows(s, step, l, r, stride, c)
            });
        }
    }
}

/// Checks a pair of moves (`to_positions`, `to_planes`) of blocks of `lanes` channels,
/// partial and whole, 3 positions apart from position 3 on, and the way back: rows of 5
/// positions (moved across the rows' ends), of 11 (8 lanes: steps that overlap; 16:
/// across the rows' ends), of 14 (16 lanes: one masked step per row) and of 19 (steps
/// that overlap).
#[cfg(test)]
fn round_trip(
    lanes: usize,
    to_positions: impl Fn(&[f32], usize, usize, &mut [f32], (usize, usize)),
    to_planes: impl Fn(&[f32], usize, &mut [f32], usize),
) {
    for (width, channels) in [5, 11, 14, 19].into_iter().flat_map(|w| [(w, lanes - 5), (w, lanes)])
    {
        let len = 4 * width;
        let pitch = width + 3;
        let planes: Vec<f32> = (0..channels * len).map(|v| v as f32).collect();
        let at = |q: usize| (3 + q / width * pitch + q % width) * lanes;
        let mut block = vec![-1f32; at(len) + lanes];
        to_positions(&planes, channels, len, &mut block[3 * lanes..], (width, pitch));
        for q in 0..len {
            for c in 0..lanes {
                let want = if c < channels { (c * len + q) as f32 } else { 0.0 };
                assert_eq!(block[at(q) + c], want, "rows of {width}: position {q}, lane {c}");
            }
        }
        // The gaps between rows are not written.
        for (row, gap) in block[3 * lanes..].chunks(pitch * lanes).enumerate() {
            let gap = gap.get(width * lanes..).unwrap_or_default();
            assert!(gap.iter().all(|&v| v == -1.0), "rows of {width}: wrote past row {row}");
        }
        let dense: Vec<f32> = (0..len).flat_map(|q| block[at(q)..][..lanes].to_vec()).collect();
        let mut back = vec![0f32; channels * len + 5];
        to_planes(&dense, len, &mut back, channels);
        assert_eq!(&back[..channels * len], &planes[..]);
        assert!(back[channels * len..].iter().all(|&v| v == 0.0), "wrote past the planes");
    }
}

/// Checks a move of vectors to rows (`to_rows`) with the vectors further apart than
/// their lanes and the rows further apart than their length, as a lanes product's sums
/// are written out: fewer channels than lanes, a partial chunk of positions alone and
/// after whole ones, and nothing written between the rows.
#[cfg(test)]
fn strided_rows(lanes: usize, to_rows: impl Fn(*const f32, usize, usize, *mut f32, usize, usize)) {
    let (step, channels) = (lanes + 3, lanes - 3);
    for len in [lanes - 1, 2 * lanes + 5] {
        let stride = len + 2;
        let src: Vec<f32> = (0..(len - 1) * step + lanes).map(|v| v as f32).collect();
        let mut rows = vec![-1f32; channels * stride];
        to_rows(src.as_ptr(), step, len, rows.as_mut_ptr(), stride, channels);
        for c in 0..channels {
            for q in 0..stride {
                let want = if q < len { src[q * step + c] } else { -1.0 };
                assert_eq!(rows[c * stride + q], want, "{len} positions: row {c}, position {q}");
            }
        }
    }
}
