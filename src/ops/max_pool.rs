//! Max-pooling with a backward for overlapping windows (AlexNet's 3x3 stride 2).
//!
//! Floor mode, no padding, as PyTorch's `MaxPool2d(3, 2)`. For AlexNet's sizes
//! (55 -> 27 -> 13 -> 6) Caffe's ceil mode gives the same shapes.
//! Ties: PyTorch's CPU kernel scans each window row by row and keeps the first maximum
//! (`val > max || isnan(val)`), so the gradient goes to the first maximal element; so does ours.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy)]
pub(super) struct MaxPool2d {
    pub(super) kernel: usize,
    pub(super) stride: usize,
}

/// Max-pooling of an `[N, C, H, W]` tensor with a square `kernel` and `stride`, differentiable:
/// the CPU kernel below on the CPU, [`max_pool2d_tensor_ops`] on other devices.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < kernel || w < kernel {
        candle_core::bail!("max_pool2d: input {h}x{w} is smaller than the {kernel}x{kernel} window")
    }
    if !x.device().is_cpu() {
        return max_pool2d_tensor_ops(x, kernel, stride);
    }
    x.contiguous()?.apply_op1(MaxPool2d { kernel, stride })
}

/// The same pooling as Candle tensor ops, for every backend: the elementwise maximum of the
/// `kernel²` strided views of the input (each an `index_select` of rows, then of columns).
/// Gradients come from Candle's `maximum`, which splits a tie evenly between the tied inputs
/// where PyTorch gives it all to the first; the two agree whenever a window's maximum is unique.
pub fn max_pool2d_tensor_ops(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pool = MaxPool2d { kernel, stride };
    let (oh, ow) = pool.out_size(h, w);
    let picks = |offset: usize, count: usize| {
        let index: Vec<u32> = (0..count).map(|i| (offset + i * stride) as u32).collect();
        Tensor::new(index, x.device())
    };
    let mut out: Option<Tensor> = None;
    for dy in 0..kernel {
        let rows = x.index_select(&picks(dy, oh)?, 2)?;
        for dx in 0..kernel {
            let view = rows.index_select(&picks(dx, ow)?, 3)?;
            out = Some(match out {
                None => view,
                Some(m) => m.maximum(&view)?,
            });
        }
    }
    Ok(out.expect("a window has at least one element"))
}

impl MaxPool2d {
    pub(super) fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        ((h - self.kernel) / self.stride + 1, (w - self.kernel) / self.stride + 1)
    }

    /// Scratch for [`MaxPool2d::pool_plane`] on rows of `w` values.
    pub(super) fn columns(&self, w: usize) -> Vec<f32> {
        vec![0f32; w]
    }

    /// One plane (rows of `w` values) pooled into `out`. The window's maximum as a maximum of
    /// column maxima: the rows combine elementwise (vectorised), then each output takes
    /// `kernel` neighbours of that row.
    pub(super) fn pool_plane(&self, plane: &[f32], w: usize, columns: &mut [f32], out: &mut [f32]) {
        let ow = self.out_size(plane.len() / w, w).1;
        for (oy, out_row) in out.chunks_mut(ow).enumerate() {
            let rows = &plane[oy * self.stride * w..][..self.kernel * w];
            #[cfg(target_arch = "x86_64")]
            if (self.kernel, self.stride) == (3, 2) && crate::ops::Isa::avx512() {
                assert!(2 * out_row.len() < w);
                // SAFETY: AVX-512F is present; the windows lie inside `rows` (asserted), the
                // loads past them are masked off.
                unsafe { avx512::row_3_2(rows, w, out_row) };
                continue;
            }
            column_maxima(rows, &mut columns[..w]);
            self.window_maxima(columns, out_row);
        }
    }

    /// The input gradient given the input `x` and the output gradient.
    pub(super) fn backward(&self, x: &Tensor, grad_y: &Tensor) -> Result<Tensor> {
        x.apply_op2_no_bwd(&grad_y.contiguous()?, &MaxPool2dBackward(*self))
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
        if (self.kernel, self.stride) == (3, 2) && crate::ops::Isa::avx512() {
            assert!((2 * oy + 3) * w <= plane.len() && 2 * at.len() < w && plane.len() < 1 << 31);
            // SAFETY: AVX-512F is present; the windows lie inside `plane` (asserted), the
            // loads past them are masked off.
            return unsafe { avx512::row_argmax_3_2(plane, w, oy, at) };
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
    if crate::ops::Isa::avx512() {
        // SAFETY: AVX-512F is present; every row read lies inside `rows` (asserted).
        return unsafe { avx512::column_maxima(rows, columns) };
    }
    columns.copy_from_slice(&rows[..w]);
    for row in rows[w..].chunks(w) {
        columns.iter_mut().zip(row).for_each(|(m, &v)| *m = nan_max(*m, v));
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::first_lanes;
    use std::arch::x86_64::*;

    /// [`super::nan_max`] in 16 lanes: `maxps(v, m)` is `v > m ? v : m`, which keeps a NaN in
    /// `m`; a NaN in `v` is put back in by the blend.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn nan_max(m: __m512, v: __m512) -> __m512 {
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v), _mm512_max_ps(v, m), v)
    }

    /// 0, 2, ..., 30.
    #[inline(always)]
    unsafe fn even() -> __m512i {
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
    }

    /// The first, second and third columns of 16 neighbouring 3/2 windows, `load(i)` being the
    /// 16 values from the first window's column `i` on: of the 34 columns the windows cover,
    /// the even ones, the odd ones and the even ones two further on, each gathered from two
    /// vectors by one permute.
    #[inline(always)]
    unsafe fn window_columns(load: impl Fn(usize) -> __m512) -> [__m512; 3] {
        let odd = _mm512_add_epi32(even(), _mm512_set1_epi32(1));
        let (lo, hi, lo2, hi2) = (load(0), load(16), load(2), load(18));
        [
            _mm512_permutex2var_ps(lo, even(), hi),
            _mm512_permutex2var_ps(lo, odd, hi),
            _mm512_permutex2var_ps(lo2, even(), hi2),
        ]
    }

    /// [`super::column_maxima`], 16 columns at a time (the last ones masked).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn column_maxima(rows: &[f32], columns: &mut [f32]) {
        let w = columns.len();
        for j in (0..w).step_by(16) {
            let mask = first_lanes(w - j);
            let mut max = _mm512_maskz_loadu_ps(mask, rows.as_ptr().add(j));
            for row in (w..rows.len()).step_by(w) {
                max = nan_max(max, _mm512_maskz_loadu_ps(mask, rows.as_ptr().add(row + j)));
            }
            _mm512_mask_storeu_ps(columns.as_mut_ptr().add(j), mask, max);
        }
    }

    /// [`super::MaxPool2d::argmax`] of 16 windows at a time, in its order (rows, then columns
    /// in each row) and by its rule: a value replaces the maximum when larger, or when it is
    /// the first NaN.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_argmax_3_2(plane: &[f32], w: usize, oy: usize, at: &mut [u32]) {
        for ox in (0..at.len()).step_by(16) {
            let mut max = _mm512_setzero_ps();
            let mut arg = _mm512_setzero_si512();
            for dy in 0..3 {
                let row = (2 * oy + dy) * w;
                let col = 2 * ox; // the first window's first column
                let values = window_columns(|i| {
                    let from = col + i;
                    _mm512_maskz_loadu_ps(first_lanes(w.saturating_sub(from)), plane.as_ptr().add(row + from))
                });
                for (dx, &v) in values.iter().enumerate() {
                    let index = _mm512_add_epi32(even(), _mm512_set1_epi32((row + col + dx) as i32));
                    if dy == 0 && dx == 0 {
                        (max, arg) = (v, index);
                        continue;
                    }
                    let larger = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, max);
                    let first_nan =
                        _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v) & !_mm512_cmp_ps_mask::<_CMP_UNORD_Q>(max, max);
                    let take = larger | first_nan;
                    max = _mm512_mask_blend_ps(take, max, v);
                    arg = _mm512_mask_blend_epi32(take, arg, index);
                }
            }
            _mm512_mask_storeu_epi32(at.as_mut_ptr().add(ox) as *mut i32, first_lanes(at.len() - ox), arg);
        }
    }

    /// [`super::MaxPool2d::pool_plane`]'s output row from its 3 input rows (`rows`, `w` values
    /// each), 16 windows at a time: the columns' maxima over the rows, in its order, gathered
    /// into the windows' columns by [`window_columns`] in registers (stored and loaded back
    /// across the stores, they stalled: pool1 alone at batch 16, 9 alternated runs, fastest
    /// 0.68 -> 0.61 ms, median 0.92 -> 0.83 ms).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_3_2(rows: &[f32], w: usize, out: &mut [f32]) {
        for ox in (0..out.len()).step_by(16) {
            let column_maxima = |i: usize| {
                let from = 2 * ox + i;
                let mask = first_lanes(w.saturating_sub(from));
                let load = |row: usize| _mm512_maskz_loadu_ps(mask, rows.as_ptr().wrapping_add(row * w + from));
                nan_max(nan_max(load(0), load(1)), load(2))
            };
            let [first, second, third] = window_columns(column_maxima);
            let max = nan_max(nan_max(first, second), third);
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(ox), first_lanes(out.len() - ox), max);
        }
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = super::nchw("max-pool2d", layout)?;
        let x = super::contiguous_f32("max-pool2d", storage, layout)?;
        let (oh, ow) = self.out_size(h, w);
        let mut y = super::zeros(n * c * oh * ow);
        y.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each_init(|| self.columns(w), |columns, (out, plane)| self.pool_plane(plane, w, columns, out));
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, grad_y)?))
    }
}

/// Scatters each output gradient to its window's first maximum; overlapping windows add up.
struct MaxPool2dBackward(MaxPool2d);

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max-pool2d-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let pool = self.0;
        let (_, _, h, w) = super::nchw("max-pool2d-backward", xl)?;
        let x = super::contiguous_f32("max-pool2d-backward", xs, xl)?;
        let g = super::contiguous_f32("max-pool2d-backward", gs, gl)?;
        let (oh, ow) = pool.out_size(h, w);
        let mut grad = super::zeros(x.len());
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
        Ok((CpuStorage::F32(grad), xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
