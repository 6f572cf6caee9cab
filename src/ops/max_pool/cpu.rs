//! Max-pooling on the CPU: each window's maximum as a maximum of column maxima, and for the
//! 3/2 windows AlexNet pools with, kernels at AVX-512 and AVX2 + FMA; the backward sends each
//! gradient to its window's first maximum.

use rayon::prelude::*;

use super::MaxPool2d;
use crate::ops::cpu::parallel::zeros;

/// The pooled `[n, c, oh, ow]` output of `[n, c, h, w]` values `x`, a plane to a task.
pub(super) fn forward(pool: &MaxPool2d, (n, c, h, w): (usize, usize, usize, usize), x: &[f32]) -> Vec<f32> {
    let (oh, ow) = pool.out_size(h, w);
    let mut y = zeros(n * c * oh * ow);
    y.par_chunks_mut(oh * ow)
        .zip(x.par_chunks(h * w))
        .for_each_init(|| pool.columns(w), |columns, (out, plane)| pool.pool_plane(plane, w, columns, out));
    y
}

/// The input gradient (`[.., h, w]`, as `x`) from the output gradient `g`: each output's
/// gradient added to its window's first maximum, a plane to a task.
pub(super) fn backward(pool: &MaxPool2d, (h, w): (usize, usize), x: &[f32], g: &[f32]) -> Vec<f32> {
    let (oh, ow) = pool.out_size(h, w);
    let mut grad = zeros(x.len());
    grad.par_chunks_mut(h * w).zip(x.par_chunks(h * w).zip(g.par_chunks(oh * ow))).for_each_init(
        || vec![0u32; ow],
        |at, (out, (plane, gplane))| {
            for (oy, grow) in gplane.chunks(ow).enumerate() {
                pool.row_argmax(plane, w, oy, at);
                for (&i, &gv) in at.iter().zip(grow) {
                    out[i as usize] += gv;
                }
            }
        },
    );
    grad
}

impl MaxPool2d {
    /// Scratch for [`MaxPool2d::pool_plane`] on rows of `w` values.
    pub(in crate::ops) fn columns(&self, w: usize) -> Vec<f32> {
        vec![0f32; w]
    }

    /// One plane (rows of `w` values) pooled into `out`. The window's maximum as a maximum of
    /// column maxima: the rows combine elementwise (vectorised), then each output takes
    /// `kernel` neighbours of that row.
    pub(in crate::ops) fn pool_plane(&self, plane: &[f32], w: usize, columns: &mut [f32], out: &mut [f32]) {
        let ow = self.out_size(plane.len() / w, w).1;
        for (oy, out_row) in out.chunks_mut(ow).enumerate() {
            let rows = &plane[oy * self.stride * w..][..self.kernel * w];
            #[cfg(target_arch = "x86_64")]
            if (self.kernel, self.stride) == (3, 2) && crate::ops::Isa::avx2() {
                assert!(2 * out_row.len() < w);
                let row_3_2 = if crate::ops::Isa::avx512() { avx512::row_3_2 } else { avx2::row_3_2 };
                // SAFETY: the CPU has the kernel's level; the windows lie inside `rows`
                // (asserted), the loads past them are masked off.
                unsafe { row_3_2(rows, w, out_row) };
                continue;
            }
            column_maxima(rows, &mut columns[..w]);
            self.window_maxima(columns, out_row);
        }
    }

    /// `out[ox]`: the maximum of `columns[ox * stride..][..kernel]`, folded left to right.
    fn window_maxima(&self, columns: &[f32], out: &mut [f32]) {
        for (ox, o) in out.iter_mut().enumerate() {
            let window = &columns[ox * self.stride..ox * self.stride + self.kernel];
            *o = window[1..].iter().fold(window[0], |m, &v| nan_max(m, v));
        }
    }

    /// Index within the plane of the first maximal element of the window at (oy, ox).
    #[inline]
    fn argmax(&self, plane: &[f32], w: usize, oy: usize, ox: usize) -> usize {
        let (y0, x0) = (oy * self.stride, ox * self.stride);
        let mut best = y0 * w + x0;
        let mut max = plane[best];
        if max.is_nan() {
            return best;
        }
        for y in y0..y0 + self.kernel {
            let row = y * w + x0;
            for (dx, &v) in plane[row..row + self.kernel].iter().enumerate() {
                // PyTorch's rule: the first maximum, and a NaN wins
                if v > max || v.is_nan() {
                    max = v;
                    best = row + dx;
                    if v.is_nan() {
                        return best;
                    }
                }
            }
        }
        best
    }

    /// [`MaxPool2d::argmax`] for every window of output row `oy` into `at`.
    fn row_argmax(&self, plane: &[f32], w: usize, oy: usize, at: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if (self.kernel, self.stride) == (3, 2) && crate::ops::Isa::avx2() {
            assert!((2 * oy + 3) * w <= plane.len() && 2 * at.len() < w && plane.len() < 1 << 31);
            let row_argmax = if crate::ops::Isa::avx512() { avx512::row_argmax_3_2 } else { avx2::row_argmax_3_2 };
            // SAFETY: the CPU has the kernel's level; the windows lie inside `plane`
            // (asserted), the loads past them are masked off.
            return unsafe { row_argmax(plane, w, oy, at) };
        }
        for (ox, a) in at.iter_mut().enumerate() {
            *a = self.argmax(plane, w, oy, ox) as u32;
        }
    }
}

/// The larger of `m` and `v`, NaN winning (PyTorch's rule: the maximum of a window holding a NaN
/// is NaN).
#[inline]
fn nan_max(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}

/// `columns[j]`: the maximum of column `j` over the window's rows (`rows`, one after another,
/// each `columns.len()` long).
fn column_maxima(rows: &[f32], columns: &mut [f32]) {
    let w = columns.len();
    assert!(rows.len() >= w);
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx2() {
        let kernel = if crate::ops::Isa::avx512() { avx512::column_maxima } else { avx2::column_maxima };
        // SAFETY: the CPU has the kernel's level; every row read lies inside `rows` (asserted).
        return unsafe { kernel(&rows[..rows.len() / w * w], columns) };
    }
    columns.copy_from_slice(&rows[..w]);
    for row in rows[w..].chunks(w) {
        columns.iter_mut().zip(row).for_each(|(m, &v)| *m = nan_max(*m, v));
    }
}

/// The 3/2 pooling's kernels (the paper's and torchvision's pools), written once for a vector
/// width: AVX-512 (16 windows at a time) and AVX2 + FMA (8), from [`crate::ops::cpu::simd`] and the
/// few steps the two levels take differently ([`avx512_steps`], [`avx2_steps`]). Both keep the
/// scalar rule's order and choices bit for bit.
macro_rules! pool_kernels {
    ($name:ident, $level:ident, $steps:ident, $feature:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            use super::$steps::*;
            use crate::ops::cpu::simd::$level::*;

            /// [`super::column_maxima`], a vector of columns at a time (the last ones masked).
            ///
            /// # Safety
            /// The CPU must have the level's feature; `rows` must hold whole rows of
            /// `columns.len()` values.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn column_maxima(rows: &[f32], columns: &mut [f32]) {
                let w = columns.len();
                assert!(rows.len().is_multiple_of(w));
                for j in (0..w).step_by(LANES) {
                    let mut max = load_first(rows.as_ptr().add(j), w - j);
                    for row in (w..rows.len()).step_by(w) {
                        max = nan_max(max, load_first(rows.as_ptr().add(row + j), w - j));
                    }
                    store_first(columns.as_mut_ptr().add(j), max, w - j);
                }
            }

            /// [`super::MaxPool2d::argmax`] of a vector of windows at a time, in its order (rows,
            /// then columns in each row) and by its rule: a value replaces the maximum when
            /// larger, or when it is the first NaN.
            ///
            /// # Safety
            /// The CPU must have the level's feature; the windows of output row `oy` must lie
            /// inside `plane` (rows of `w`), `at` hold no more outputs than the row has.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn row_argmax_3_2(plane: &[f32], w: usize, oy: usize, at: &mut [u32]) {
                for ox in (0..at.len()).step_by(LANES) {
                    let (mut max, mut arg) = (zero(), zero_indices());
                    for dy in 0..3 {
                        let row = (2 * oy + dy) * w;
                        let col = 2 * ox; // the first window's first column
                        let values = window_columns(|i| {
                            let from = col + i;
                            load_first(plane.as_ptr().wrapping_add(row + from), w.saturating_sub(from))
                        });
                        for (dx, &v) in values.iter().enumerate() {
                            let index = even_indices(row + col + dx);
                            if dy == 0 && dx == 0 {
                                (max, arg) = (v, index);
                                continue;
                            }
                            take_larger(&mut max, &mut arg, v, index);
                        }
                    }
                    store_indices(at.as_mut_ptr().add(ox), arg, at.len() - ox);
                }
            }

            /// [`super::MaxPool2d::pool_plane`]'s output row from its 3 input rows (`rows`, `w`
            /// values each), a vector of windows at a time: the columns' maxima over the rows, in
            /// its order, gathered into the windows' columns by `window_columns` in registers
            /// (stored and loaded back across the stores, they stalled: AVX-512, pool1 alone at
            /// batch 16, 9 alternated runs, fastest 0.68 -> 0.61 ms, median 0.92 -> 0.83 ms).
            ///
            /// # Safety
            /// The CPU must have the level's feature; `rows` must hold 3 rows of `w`, and `out`
            /// no more outputs than the row has.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn row_3_2(rows: &[f32], w: usize, out: &mut [f32]) {
                for ox in (0..out.len()).step_by(LANES) {
                    let column_maxima = |i: usize| {
                        let from = 2 * ox + i;
                        let count = w.saturating_sub(from);
                        let load = |row: usize| load_first(rows.as_ptr().wrapping_add(row * w + from), count);
                        nan_max(nan_max(load(0), load(1)), load(2))
                    };
                    let [left, middle, right] = window_columns(column_maxima);
                    let max = nan_max(nan_max(left, middle), right);
                    store_first(out.as_mut_ptr().add(ox), max, out.len() - ox);
                }
            }
        }
    };
}

pool_kernels!(avx512, avx512, avx512_steps, "avx512f");
pool_kernels!(avx2, avx2, avx2_steps, "avx2,fma");

/// The steps [`pool_kernels`] takes differently with AVX-512: comparisons into mask registers,
/// windows' columns gathered by one two-vector permute. Each function's `unsafe`: the CPU must
/// have AVX-512F (and the pointers hold the lanes they touch).
#[cfg(target_arch = "x86_64")]
mod avx512_steps {
    use std::arch::x86_64::*;

    pub(super) type Indices = __m512i;

    /// [`super::nan_max`] in 16 lanes: `maxps(v, m)` is `v > m ? v : m`, which keeps a NaN in
    /// `m`; a NaN in `v` is put back in by the blend.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn nan_max(m: __m512, v: __m512) -> __m512 {
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v), _mm512_max_ps(v, m), v)
    }

    /// 0, 2, ..., 30.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn even() -> __m512i {
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn zero_indices() -> Indices {
        _mm512_setzero_si512()
    }

    /// `base, base + 2, ..., base + 30`: where 16 neighbouring windows' same tap lies.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn even_indices(base: usize) -> Indices {
        _mm512_add_epi32(even(), _mm512_set1_epi32(base as i32))
    }

    /// The first, second and third columns of 16 neighbouring 3/2 windows, `load(i)` being the
    /// 16 values from the first window's column `i` on: of the 34 columns the windows cover,
    /// the even ones, the odd ones and the even ones two further on, each gathered from two
    /// vectors by one permute.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn window_columns(load: impl Fn(usize) -> __m512) -> [__m512; 3] {
        let odd = _mm512_add_epi32(even(), _mm512_set1_epi32(1));
        let (lo, hi, lo2, hi2) = (load(0), load(16), load(2), load(18));
        [
            _mm512_permutex2var_ps(lo, even(), hi),
            _mm512_permutex2var_ps(lo, odd, hi),
            _mm512_permutex2var_ps(lo2, even(), hi2),
        ]
    }

    /// `(max, arg)` becomes `(v, index)` in the lanes where `v` is larger or the first NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn take_larger(max: &mut __m512, arg: &mut Indices, v: __m512, index: Indices) {
        let larger = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, *max);
        let first_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) & !_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(*max, *max);
        let take = larger | first_nan;
        *max = _mm512_mask_blend_ps(take, *max, v);
        *arg = _mm512_mask_blend_epi32(take, *arg, index);
    }

    /// The first `count` of the 16 indices to `to`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn store_indices(to: *mut u32, arg: Indices, count: usize) {
        _mm512_mask_storeu_epi32(to.cast(), crate::ops::cpu::simd::avx512::first(count), arg)
    }
}

/// The same steps with AVX2: comparisons into vectors of all-ones lanes and `blendv`; the
/// windows' columns by an in-lane shuffle and a cross-lane permute of 64-bit pairs. Each
/// function's `unsafe`: the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
mod avx2_steps {
    use std::arch::x86_64::*;

    pub(super) type Indices = __m256i;

    /// [`super::nan_max`] in 8 lanes, as [`super::avx512_steps::nan_max`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nan_max(m: __m256, v: __m256) -> __m256 {
        _mm256_blendv_ps(_mm256_max_ps(v, m), v, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn zero_indices() -> Indices {
        _mm256_setzero_si256()
    }

    /// `base, base + 2, ..., base + 14`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn even_indices(base: usize) -> Indices {
        _mm256_add_epi32(_mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14), _mm256_set1_epi32(base as i32))
    }

    /// The even values of `lo` then `hi` (`ODD` = false) or the odd ones: `shufps` picks them
    /// within each 128-bit half (`lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6`), then the 64-bit pairs
    /// are put in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn deinterleave<const ODD: bool>(lo: __m256, hi: __m256) -> __m256 {
        let picked = if ODD { _mm256_shuffle_ps::<0xDD>(lo, hi) } else { _mm256_shuffle_ps::<0x88>(lo, hi) };
        _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(picked)))
    }

    /// [`super::avx512_steps::window_columns`] for 8 windows (18 columns).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn window_columns(load: impl Fn(usize) -> __m256) -> [__m256; 3] {
        let (lo, hi, lo2, hi2) = (load(0), load(8), load(2), load(10));
        [deinterleave::<false>(lo, hi), deinterleave::<true>(lo, hi), deinterleave::<false>(lo2, hi2)]
    }

    /// As [`super::avx512_steps::take_larger`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn take_larger(max: &mut __m256, arg: &mut Indices, v: __m256, index: Indices) {
        let larger = _mm256_cmp_ps::<_CMP_GT_OQ>(v, *max);
        let nan = |x: __m256| _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let take = _mm256_or_ps(larger, _mm256_andnot_ps(nan(*max), nan(v)));
        *max = _mm256_blendv_ps(*max, v, take);
        *arg = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(*arg), _mm256_castsi256_ps(index), take));
    }

    /// The first `count` of the 8 indices to `to`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn store_indices(to: *mut u32, arg: Indices, count: usize) {
        if count >= 8 {
            return _mm256_storeu_si256(to.cast(), arg);
        }
        _mm256_maskstore_epi32(to.cast(), crate::ops::cpu::simd::avx2::first(count), arg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_pool2d;
    use candle_core::Device;
    use candle_core::Tensor;

    /// The vector kernels against the rule written out once per output (rows folded per column,
    /// then the columns left to right), bit for bit, on values full of ties, signed zeros and
    /// NaNs, at widths with every remainder of 16.
    #[test]
    fn vector_kernels_agree_with_the_scalar_rule() {
        let values = [1.0, -0.0, 0.0, f32::NAN, -2.0, 1.0, 0.0, 3.0, -0.0, 1.0, 2.0];
        for w in [3, 7, 13, 16, 17, 27, 33, 55, 64] {
            let h = 5;
            let x: Vec<f32> = (0..2 * h * w).map(|i| values[(i * 7 + i / 5) % values.len()]).collect();
            let input = Tensor::from_vec(x.clone(), (1, 2, h, w), &Device::Cpu).unwrap();
            let got: Vec<f32> = max_pool2d(&input, 3, 2).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let pool = MaxPool2d { kernel: 3, stride: 2 };
            let (oh, ow) = pool.out_size(h, w);
            let mut want = vec![];
            for plane in x.chunks(h * w) {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let column = |j: usize| {
                            (1..3).fold(plane[2 * oy * w + j], |m, dy| nan_max(m, plane[(2 * oy + dy) * w + j]))
                        };
                        want.push((1..3).fold(column(2 * ox), |m, dx| nan_max(m, column(2 * ox + dx))));
                    }
                }
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "width {w}");
            // the backward's windows: each output's first maximum, NaN first
            for plane in x.chunks(h * w) {
                for oy in 0..oh {
                    let mut at = vec![0u32; ow];
                    pool.row_argmax(plane, w, oy, &mut at);
                    let want: Vec<u32> = (0..ow).map(|ox| pool.argmax(plane, w, oy, ox) as u32).collect();
                    assert_eq!(at, want, "width {w}, row {oy}");
                }
            }
        }
    }
}
