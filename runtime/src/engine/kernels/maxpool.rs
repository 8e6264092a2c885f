//! MaxPool with a column stride of 2 on AVX-512, a row of outputs at a time.
//!
//! The general path ([`super::MaxPoolPlane`]) splits the whole plane into its four stride
//! phases and folds each tap over them: on ResNet's 3x3/2 pooling of 112x112 planes most
//! of its time goes to the phases. Here each output row is the largest of its window's
//! input rows (whole vectors, straight from the input), into one padded row; that row is
//! split into its even and odd columns by two lane permutations per 32 floats, and each
//! output is the largest of its window's columns, which are whole vectors of those two.

use std::arch::x86_64::*;

use super::Geom;

/// Whether [`plane`] runs this geometry on this CPU: one with AVX-512, a column stride
/// of 2, no dilation, and at least one output.
pub(super) fn supports(geo: &Geom) -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && geo.sw == 2
        && (geo.dh, geo.dw) == (1, 1)
        && geo.oh > 0
        && geo.ow > 0
}

/// Floats of one vector.
const LANES: usize = 16;

/// The floats of a padded row that [`plane`] works on: every padded column a window
/// reads, rounded up to whole pairs of vectors, with a vector's slack for the last
/// window's loads from the even and odd columns.
fn row_len(geo: &Geom) -> usize {
    (2 * geo.ow + geo.kw + 2 * LANES).next_multiple_of(2 * LANES)
}

/// One output plane (`oh x ow`) of a MaxPool of `input` (one `h x w` plane) that
/// [`supports`] takes: each output is the largest of its window, or NaN if one is NaN
/// (as the general path), and padding never wins. `scratch` is reused from plane to plane
/// of one MaxPool: its padding, written at the first plane, stays `-inf` (the planes write
/// only the data columns of the padded row, and the whole of its even and odd columns).
pub(super) fn plane(input: &[f32], geo: &Geom, scratch: &mut Vec<f32>, out: &mut [f32]) {
    let len = row_len(geo);
    if scratch.len() != 2 * len {
        scratch.clear();
        scratch.resize(2 * len, f32::NEG_INFINITY);
    }
    if input.len() < geo.h * geo.w || out.len() < geo.oh * geo.ow {
        return;
    }
    assert!(std::arch::is_x86_feature_detected!("avx512f"));
    // SAFETY: the CPU has AVX-512 (checked above).
    unsafe { plane_avx512(input, geo, scratch, out) }
}

/// The larger of `acc` and `v` lane by lane, and `v` where it is NaN.
#[inline]
#[target_feature(enable = "avx512f")]
fn fold(acc: __m512, v: __m512) -> __m512 {
    let take = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, acc) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_blend_ps(take, acc, v)
}

/// Lanes `0 .. n` (at most 16) of a vector.
#[inline]
fn mask(n: usize) -> __mmask16 {
    if n >= LANES {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

/// [`plane`] on a CPU with AVX-512. `scratch` holds two rows of [`row_len`]: the padded
/// row (its padding already `-inf`) and its even and odd columns.
#[target_feature(enable = "avx512f")]
fn plane_avx512(input: &[f32], geo: &Geom, scratch: &mut [f32], out: &mut [f32]) {
    let len = row_len(geo);
    let (row, halves) = scratch.split_at_mut(len);
    // Input columns that some window reads land at `pl ..`; any past the row are read by
    // no window.
    let cols = geo.w.min(len.saturating_sub(geo.pl));
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let lowest = _mm512_set1_ps(f32::NEG_INFINITY);
    let half = len / 2;
    for (oy, out_row) in out.chunks_exact_mut(geo.ow).take(geo.oh).enumerate() {
        // The window's input rows, without the padding ones.
        let top = (oy * geo.sh) as isize - geo.pt as isize;
        let first = top.max(0) as usize;
        let last = ((top + geo.kh as isize).max(0) as usize).min(geo.h);
        // A vector of columns at a time, folded over the window's rows in a register and
        // stored once. (Folding row by row into the padded row in place let the compiler
        // store only the lanes that changed, and a masked store is not forwarded to the
        // next row's load: slower than the stride phases.)
        let data = &mut row[geo.pl..geo.pl + cols];
        let whole = cols / LANES * LANES;
        let mut x = 0;
        while x < cols {
            let m = mask(cols - x);
            let mut acc = lowest;
            for iy in first..last {
                let src = &input[iy * geo.w + x..][..(cols - x).min(LANES)];
                // SAFETY: a whole vector within `src` below `whole`, else the mask reads
                // only the lanes within it.
                let v = unsafe {
                    if x < whole {
                        _mm512_loadu_ps(src.as_ptr())
                    } else {
                        _mm512_mask_loadu_ps(lowest, m, src.as_ptr())
                    }
                };
                acc = fold(acc, v);
            }
            let dst = &mut data[x..][..(cols - x).min(LANES)];
            // SAFETY: as for the loads.
            unsafe {
                if x < whole {
                    _mm512_storeu_ps(dst.as_mut_ptr(), acc)
                } else {
                    _mm512_mask_storeu_ps(dst.as_mut_ptr(), m, acc)
                }
            };
            x += LANES;
        }
        // Even columns into the first half of `halves`, odd ones into the second.
        let (even, odd) = halves.split_at_mut(half);
        for ((pair, e), o) in row
            .chunks_exact(2 * LANES)
            .zip(even.chunks_exact_mut(LANES))
            .zip(odd.chunks_exact_mut(LANES))
        {
            // SAFETY: `pair` holds two vectors, `e` and `o` one each.
            unsafe {
                let (a, b) =
                    (_mm512_loadu_ps(pair.as_ptr()), _mm512_loadu_ps(pair[LANES..].as_ptr()));
                _mm512_storeu_ps(e.as_mut_ptr(), _mm512_permutex2var_ps(a, evens, b));
                _mm512_storeu_ps(o.as_mut_ptr(), _mm512_permutex2var_ps(a, odds, b));
            }
        }
        // Output ox reads padded columns 2 ox + dx: even ones at even[ox + dx / 2], odd
        // ones at odd[ox + dx / 2].
        let mut ox = 0;
        while ox < geo.ow {
            let mut acc = lowest;
            for dx in 0..geo.kw {
                let from = if dx % 2 == 0 { &even[..] } else { &odd[..] };
                let src = &from[ox + dx / 2..][..LANES];
                // SAFETY: `src` holds a whole vector ([`row_len`] leaves the slack).
                acc = fold(acc, unsafe { _mm512_loadu_ps(src.as_ptr()) });
            }
            let n = (geo.ow - ox).min(LANES);
            // SAFETY: the mask writes only the lanes within the row.
            unsafe { _mm512_mask_storeu_ps(out_row[ox..][..n].as_mut_ptr(), mask(n), acc) };
            ox += LANES;
        }
    }
}
