//! The pieces the GEMM-based ops (convolution, fully-connected) share: one call into the
//! `gemm` crate, their fused ReLU, forward and backward, and their bias gradient.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// `dst[m, n] (+)= a[m, k] · b[k, n]`, each given as (pointer, row stride, column stride).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: the slices cover every element the strides address (checked by the callers'
    // geometry), and dst does not alias a or b.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.0.as_ptr(),
            a.2,
            a.1,
            b.0.as_ptr(),
            b.2,
            b.1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `y[n, o] += Σ_k x[n, k] · w[o, k]` (x `[n, k]`, w `[o, k]`, y `[n, o]`, all row-major): the
/// fully-connected layer's product. The `gemm` crate first copies (packs) all of `w`; for fc6's
/// 151 MB at small batches that copy costs more than the multiply-adds (at batch 1 it was 40%
/// of the whole forward pass). With AVX-512 the product is taken here, `w` read as stored:
/// below 32 images as dot products along k, each block of `w` streamed once against every row
/// of `x` ([`dot_form`]); from 32 on with the images side by side in the vectors ([`lane_form`]);
/// elsewhere it goes to the `gemm` crate. Weights that no longer change are read packed in
/// strips instead ([`matmul_wt_strips`]).
pub(crate) fn matmul_wt(n: usize, o: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    assert!(x.len() >= n * k && w.len() >= o * k && y.len() >= n * o);
    if n == 0 || o == 0 || k == 0 {
        return; // nothing to add
    }
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx512() {
        if n >= lane_form::GROUP {
            return lane_form::matmul_wt(n, o, k, x, w, y);
        }
        return dot_form::matmul_wt(n, o, k, x, w, y);
    }
    let threads = Parallelism::Rayon(rayon::current_num_threads());
    matmul(n, o, k, y, true, (x, k as isize, 1), (w, 1, k as isize), threads);
}

/// Whether [`matmul_wt_strips`] can run here (AVX2 or AVX-512).
#[cfg(target_arch = "x86_64")]
pub(crate) fn strips_available() -> bool {
    crate::ops::Isa::avx2()
}

/// Rows per strip and rows per task of the strip form at this level (16 and 64 with AVX-512,
/// 8 and 32 with AVX2): strips are as wide as the vectors.
#[cfg(target_arch = "x86_64")]
fn strip_geometry() -> (usize, usize) {
    if crate::ops::Isa::avx512() {
        (strip_form_avx512::LANES, strip_form_avx512::ROWS_PER_TASK)
    } else {
        (strip_form_avx2::LANES, strip_form_avx2::ROWS_PER_TASK)
    }
}

/// `w` `[o, k]` as [`matmul_wt_strips`] reads it: strips of a vector's lanes of rows, each
/// stored k-major (`strips[s, kk, lane] = w[lanes s + lane, kk]`), rows past `o` 0 up to a
/// whole task's strips.
#[cfg(target_arch = "x86_64")]
pub(crate) fn pack_strips(w: &[f32], o: usize, k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let (lanes, _) = strip_geometry();
    let mut strips = vec![0f32; strips_len(o, k)];
    if k == 0 {
        return strips;
    }
    strips.par_chunks_mut(k * lanes).zip(w[..o * k].par_chunks(lanes * k)).for_each(|(strip, rows)| {
        super::transpose::transpose(rows.len() / k, k, rows, k, strip, lanes);
    });
    strips
}

/// The length of [`pack_strips`]'s output.
#[cfg(target_arch = "x86_64")]
fn strips_len(o: usize, k: usize) -> usize {
    o.next_multiple_of(strip_geometry().1) * k
}

/// [`matmul_wt`] from `w` packed by [`pack_strips`] ([`strips_available`]): the rows of `w`
/// in the lanes and `x` broadcast, each task 4 strips (64 rows; 32 with AVX2) in blocks of k, every block of
/// 6 images passing a block of the strips while it stays in L2. Against `w` as stored (the dot
/// form below 32 images, the lane form from 32), in a model frozen for inference (torchvision,
/// alternated in one process):
/// * batch 1: each core streams through `w` in 4 strips at a time (4 streams), where the dot
///   form reads 8 rows side by side (8 streams) and sums each row's lanes at its end; this
///   CPU's memory (AMD EPYC, Zen 4) serves fewer streams faster: 12.20 -> 11.62, 12.63 ->
///   11.67, 12.32 -> 11.56 ms a pass (fc6-8 alone: 7.08 -> 6.58 and 5.43 -> 4.01 ms in two
///   minutes of different load);
/// * batch 4 / 8 / 16 / 24 / 31: 30.7 -> 27.6, 46.0 -> 41.6, 90.0 -> 83.6, 130.6 -> 122.6,
///   157.4 -> 146.9 ms (the dot form waited on `w` between its register blocks);
/// * batch 32 and 64 level (154.0 / 152.1 ms; 64: 318.0 / 301.7, 312.8 / 315.2, 305.2 / 307.5
///   ms; the paper's net at 64: 348.8 / 347.0 ms). The paper's net at batch 1 / 16: 13.68 ->
///   13.35, 99.1 -> 95.6 ms.
///
/// (In 2 MB pages, asked of Linux with `madvise`, batch 1 was another 1% faster; dropped: the
/// first pass then stalled up to 0.5 s while the kernel compacted memory for them.) Each output
/// is `x[i, 0] w[r, 0] + x[i, 1] w[r, 1] + ...` summed in order of k with fused multiply-adds.
#[cfg(target_arch = "x86_64")]
pub(crate) fn matmul_wt_strips(n: usize, o: usize, k: usize, x: &[f32], strips: &[f32], y: &mut [f32]) {
    assert!(strips_available() && x.len() >= n * k && strips.len() == strips_len(o, k) && y.len() >= n * o);
    if n == 0 || o == 0 || k == 0 {
        return; // nothing to add
    }
    type Kernel = unsafe fn(&[f32], &[f32], usize, usize, &mut [f32]);
    let kernel: Kernel =
        if crate::ops::Isa::avx512() { strip_form_avx512::strips_times_x } else { strip_form_avx2::strips_times_x };
    add_by_row_tasks(strips, o, k, strip_geometry().1, n, n, y, |strips, part| {
        // SAFETY: the level's kernel, whose features the CPU has (`strips_available`, and the
        // AVX-512 one only at that level); sizes asserted inside.
        unsafe { kernel(strips, x, n, k, part) }
    });
}

/// `c[m, n] = a[m, k] · b[k, n]`, all row-major, for few rows `m` and a large `b`: the
/// fully-connected layer's input gradient `dx = dy · w`. The `gemm` crate copies (packs) all of
/// `b` first, 151 MB of fc6's weights. With AVX-512 the product is taken here as broadcasts of
/// `a` times rows of `b` read as stored, in blocks of `b` that stay in L1 while every row of
/// `a` passes, the columns split over the cores so that `b` is read once (fc6 at batch 32: 44-54
/// -> 21-26 ms); elsewhere it goes to the `gemm` crate.
pub(crate) fn matmul_rows(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    assert!(a.len() >= m * k && b.len() >= k * n);
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx512() {
        return outer_form::matmul_rows(m, n, k, a, b);
    }
    let mut c = vec![0f32; m * n];
    let threads = Parallelism::Rayon(rayon::current_num_threads());
    matmul(m, n, k, &mut c, false, (a, k as isize, 1), (b, n as isize, 1), threads);
    c
}

/// `c[m, n] = Σ_j a[j, m] b[j, n]` (`a` `[k, m]`, `b` `[k, n]`, row-major): a sum of `k` outer
/// products, for few `k` and a large `c`: the fully-connected layer's weight gradient
/// `dw = dyᵀ · x`, `k` the batch. Through the `gemm` crate, `c` is zeroed first and then read
/// and written again (fc6's 151 MB). With AVX-512 each value of `c` is written once, from
/// registers, the rows split over the cores (`b`, the layer's input, stays in L2); elsewhere it
/// goes to the `gemm` crate.
pub(crate) fn outer_products(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    assert!(a.len() >= k * m && b.len() >= k * n);
    #[cfg(target_arch = "x86_64")]
    if k > 0 && crate::ops::Isa::avx512() {
        return outer_form::outer_products(m, n, k, a, b);
    }
    let mut c = vec![0f32; m * n];
    let threads = Parallelism::Rayon(rayon::current_num_threads());
    matmul(m, n, k, &mut c, false, (a, 1, m as isize), (b, n as isize, 1), threads);
    c
}

#[cfg(target_arch = "x86_64")]
mod outer_form {
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// Rows of `a` and vectors of `c`'s row per register block: 24 accumulators, 6 loads of `b`
    /// and 4 broadcasts of `a` per 24 multiply-adds.
    const ROWS: usize = 4;
    const VECTORS: usize = 6;
    const COLUMNS: usize = 16 * VECTORS;
    /// Rows of `b` per block: 64 rows of a block of columns (24 KiB) stay in L1 while every
    /// row block of `a` passes them.
    const K_BLOCK: usize = 64;
    /// Rows of `b` ahead to fetch: its rows lie a page or more apart (fc6: 36 KiB), where the
    /// hardware prefetchers do not follow (fc6's `dx`, measured with the rows split over the
    /// cores: 28 -> 23 ms).
    const PREFETCH: usize = 8;

    pub(super) fn matmul_rows(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        if m == 0 || n == 0 || k == 0 {
            return vec![0f32; m * n]; // nothing, or empty sums
        }
        // the columns split over the cores, so that `b` is read once (split by rows, every core
        // would read all of it); each task writes its columns to a part of its own
        let width = n.div_ceil(rayon::current_num_threads()).next_multiple_of(COLUMNS);
        let parts: Vec<Vec<f32>> = (0..n.div_ceil(width))
            .into_par_iter()
            .map(|t| {
                let (first, width) = (t * width, width.min(n - t * width));
                let mut part = Vec::with_capacity(m * width);
                let uninit = &mut part.spare_capacity_mut()[..m * width];
                let mut copy = vec![0f32; K_BLOCK * COLUMNS];
                for k0 in (0..k).step_by(K_BLOCK) {
                    let ks = K_BLOCK.min(k - k0);
                    for c0 in (0..width).step_by(COLUMNS) {
                        let cols = COLUMNS.min(width - c0);
                        for r in (0..m).step_by(ROWS) {
                            // the first rows read the block of b where it lies and copy it side
                            // by side; the others read the copy: b's rows lie a multiple of
                            // 4 KiB apart (fc6-8), all in the same L1 sets, and evicted each
                            // other before the next rows came
                            let (a, c, c_ld) = (&a[r * k + k0..], &mut uninit[r * width + c0..], width);
                            // SAFETY: AVX-512F is present (checked by the caller); the block's
                            // reads and writes stay inside `a`, `b`, `copy` and `part` (asserted
                            // in `run`).
                            if r == 0 {
                                let block = Block { a, k, b: &b[k0 * n + first + c0..], n, ks, cols };
                                unsafe { block.run_rows(m - r, c, c_ld, k0 > 0, Some(&mut copy)) }
                            } else {
                                let block = Block { a, k, b: &copy, n: COLUMNS, ks, cols };
                                unsafe { block.run_rows(m - r, c, c_ld, k0 > 0, None) }
                            }
                        }
                    }
                }
                // SAFETY: the first block of `k` (not accumulating) wrote every row and column
                unsafe { part.set_len(m * width) };
                part
            })
            .collect();
        // each row of `c` from the parts' rows in turn, written once
        let mut c = Vec::with_capacity(m * n);
        for row in 0..m {
            for part in &parts {
                let part_width = part.len() / m;
                c.extend_from_slice(&part[row * part_width..][..part_width]);
            }
        }
        c
    }

    /// [`super::outer_products`]: blocks of rows of `c` to each task, written block by block
    /// along the rows, never read.
    pub(super) fn outer_products(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        if m == 0 || n == 0 {
            return Vec::new();
        }
        let mut at = vec![0f32; m * k]; // the blocks take `a`'s columns as rows
        super::super::transpose::transpose(k, m, a, m, &mut at, k);
        // `b`'s blocks of columns each copied side by side, `[block][j][COLUMNS]`: where it
        // lies, its rows are a multiple of 4 KiB apart (fc6-8), all in the same L1 sets
        let mut panels = vec![0f32; n.div_ceil(COLUMNS) * k * COLUMNS];
        for (c0, panel) in (0..n).step_by(COLUMNS).zip(panels.chunks_mut(k * COLUMNS)) {
            let cols = COLUMNS.min(n - c0);
            for (dst, src) in panel.chunks_mut(COLUMNS).zip(b.chunks(n)) {
                dst[..cols].copy_from_slice(&src[c0..c0 + cols]);
            }
        }
        let rows_per_task = m.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(ROWS);
        let mut c = Vec::with_capacity(m * n);
        c.spare_capacity_mut()[..m * n].par_chunks_mut(rows_per_task * n).enumerate().for_each(|(t, part)| {
            let rows = part.len() / n;
            for r in (0..rows).step_by(ROWS) {
                let a = &at[(t * rows_per_task + r) * k..];
                for (c0, b) in (0..n).step_by(COLUMNS).zip(panels.chunks(k * COLUMNS)) {
                    let block = Block { a, k, b, n: COLUMNS, ks: k, cols: COLUMNS.min(n - c0) };
                    let c = &mut part[r * n + c0..];
                    // SAFETY: AVX-512F is present (checked by the caller); the block's reads and
                    // writes stay inside `at`, `panels` and `part` (asserted in `run`).
                    unsafe { block.run_rows(rows - r, c, n, false, None) }
                }
            }
        });
        // SAFETY: the blocks above wrote every row of every part, all `n` columns of each
        unsafe { c.set_len(m * n) };
        c
    }

    /// `R` rows of `a` from `a` (rows `k` apart), `ks` values each, times `ks` rows of `b` (`n`
    /// apart), `cols` columns of them.
    struct Block<'a> {
        a: &'a [f32],
        k: usize,
        b: &'a [f32],
        n: usize,
        ks: usize,
        cols: usize,
    }

    impl Block<'_> {
        /// [`Block::run`] on the first `min(rows, ROWS)` rows: the register block, or the rows
        /// left at the end of `a`.
        #[target_feature(enable = "avx512f")]
        unsafe fn run_rows(
            &self,
            rows: usize,
            c: &mut [MaybeUninit<f32>],
            c_ld: usize,
            accumulate: bool,
            copy_to: Option<&mut [f32]>,
        ) {
            match rows {
                1 => self.run::<1>(c, c_ld, accumulate, copy_to),
                2 => self.run::<2>(c, c_ld, accumulate, copy_to),
                3 => self.run::<3>(c, c_ld, accumulate, copy_to),
                _ => self.run::<ROWS>(c, c_ld, accumulate, copy_to),
            }
        }

        /// `c[r, ..cols] (+)= Σ_j a[r, j] b[j, ..cols]` for `r < R` (rows of `c` `c_ld` apart),
        /// adding to `c` if `accumulate` (else `c` may be uninitialised: it is only written).
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn run<const R: usize>(
            &self,
            c: &mut [MaybeUninit<f32>],
            c_ld: usize,
            accumulate: bool,
            mut copy_to: Option<&mut [f32]>,
        ) {
            assert!(self.a.len() >= (R - 1) * self.k + self.ks && self.b.len() >= (self.ks - 1) * self.n + self.cols);
            assert!(c.len() >= (R - 1) * c_ld + self.cols);
            assert!(copy_to.as_ref().is_none_or(|copy| copy.len() >= self.ks * COLUMNS));
            let masks: [__mmask16; VECTORS] =
                std::array::from_fn(|v| crate::ops::first_lanes(self.cols.saturating_sub(16 * v)));
            let mut acc = [[_mm512_setzero_ps(); VECTORS]; R];
            if accumulate {
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    for (v, a) in acc_row.iter_mut().enumerate() {
                        *a = _mm512_maskz_loadu_ps(masks[v], c.as_ptr().add(r * c_ld + 16 * v).cast());
                    }
                }
            }
            for j in 0..self.ks {
                let b_row = self.b.as_ptr().add(j * self.n);
                if j + PREFETCH < self.ks {
                    for v in 0..self.cols.div_ceil(16) {
                        _mm_prefetch::<_MM_HINT_T0>(b_row.add(PREFETCH * self.n + 16 * v).cast());
                    }
                }
                let bv: [__m512; VECTORS] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], b_row.add(16 * v)));
                if let Some(copy) = copy_to.as_deref_mut() {
                    for (v, &bv) in bv.iter().enumerate() {
                        _mm512_storeu_ps(copy.as_mut_ptr().add(j * COLUMNS + 16 * v), bv);
                    }
                }
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*self.a.get_unchecked(r * self.k + j));
                    for (a, &bv) in acc_row.iter_mut().zip(&bv) {
                        *a = _mm512_fmadd_ps(av, bv, *a);
                    }
                }
            }
            for (r, acc_row) in acc.iter().enumerate() {
                for (v, &a) in acc_row.iter().enumerate() {
                    _mm512_mask_storeu_ps(c.as_mut_ptr().add(r * c_ld + 16 * v).cast(), masks[v], a);
                }
            }
        }
    }
}

/// `y[i, row] += part[row, i]` for the first `images` of each part row's `width` values: the
/// rows of `w` (`k` values each; `o` of them, or in strips, `o` rounded up to whole strips) cut
/// into tasks of `rows_per_task` spread over the cores, each computing its rows' `part`
/// (zeroed) with `product(rows, part)`, then added into `y` in order (rows past `o` dropped).
/// The fc forward's forms ([`dot_form`], [`lane_form`], [`strip_form`]) differ only in `product`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn add_by_row_tasks(
    w: &[f32],
    o: usize,
    k: usize,
    rows_per_task: usize,
    width: usize,
    images: usize,
    y: &mut [f32],
    product: impl Fn(&[f32], &mut [f32]) + Sync,
) {
    let rows = w.chunks(rows_per_task * k);
    let mut parts: Vec<Vec<f32>> = rows.clone().map(|rows| vec![0f32; rows.len() / k * width]).collect();
    super::par_tasks(parts.iter_mut().zip(rows), || (), |_, (part, rows)| product(rows, part));
    for (t, part) in parts.iter().enumerate() {
        let first = t * rows_per_task;
        for (r, row) in part.chunks(width).take(o - first).enumerate() {
            for (i, &v) in row[..images].iter().enumerate() {
                y[i * o + first + r] += v;
            }
        }
    }
}

/// `y += x · wᵀ` with the images side by side in the vectors, from 32 images on: each value of
/// `w` broadcast and multiplied into 16 images at once, `w` read as it lies, once per group of
/// images, and no sums across lanes. The dot form ([`dot_form`]) loads a vector of `w` for every
/// 3 images and sums 24 vectors across their lanes for every block of `w`; here the products
/// alone keep the loads busy (fc6 alone, medians of 5 alternated runs: batch 32 15.9 -> 10.9
/// ms, batch 64 29.9 -> 23.0 ms). Below 32 images, with fewer images than lanes to share each
/// broadcast, the dot form stays.
#[cfg(target_arch = "x86_64")]
mod lane_form {
    use std::arch::x86_64::*;

    const LANES: usize = 16;
    /// Most images per pass over `w`: their `xᵀ` (fc6: 32 x 9216, 1.2 MB) stays in L2.
    pub(super) const GROUP: usize = 32;
    /// Rows of `w` per task: a multiple of the register blocks' rows.
    const ROWS_PER_TASK: usize = 48;
    /// Values of k summed from zero before they are added to the output: partial sums of this
    /// many terms round about as the dot form's lanes do.
    const K_BLOCK: usize = 1024;

    pub(super) fn matmul_wt(n: usize, o: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
        // groups as even as can be (64 images: 32 + 32; 48: 24 + 24)
        let group = n.div_ceil(n.div_ceil(GROUP));
        for g0 in (0..n).step_by(group) {
            let images = group.min(n - g0);
            let width = images.next_multiple_of(LANES);
            // xᵀ[kk, image], the lanes past the last image 0
            let mut xt = vec![0f32; k * width];
            crate::ops::transpose::transpose(images, k, &x[g0 * k..], k, &mut xt, width);
            super::add_by_row_tasks(&w[..o * k], o, k, ROWS_PER_TASK, width, images, &mut y[g0 * o..], |rows, part| {
                // SAFETY: AVX-512F is present (checked by the caller); sizes asserted inside.
                unsafe { rows_times_xt(rows, &xt, width, k, part) }
            });
        }
    }

    /// `part[r, image] = Σ_k rows[r, k] · xt[k, image]`.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_times_xt(rows: &[f32], xt: &[f32], width: usize, k: usize, part: &mut [f32]) {
        let m = rows.len() / k;
        assert!(xt.len() == k * width && part.len() == m * width && width.is_multiple_of(LANES) && width <= 2 * LANES);
        let mut r = 0;
        macro_rules! blocks {
            ($v:literal, $($rows:literal)*) => {{$(
                while m - r >= $rows {
                    block::<$v, $rows>(rows, xt, k, r, part);
                    r += $rows;
                }
            )*}};
        }
        match width / LANES {
            1 => blocks!(1, 24 4 1),
            _ => blocks!(2, 12 4 1),
        }
    }

    /// Adds to `part[r.., ..]` rows `r..r + R` of `w` against the `V` vectors of images, each
    /// [`K_BLOCK`] of k summed from zero in order.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const V: usize, const R: usize>(rows: &[f32], xt: &[f32], k: usize, r: usize, part: &mut [f32]) {
        // one register per row: told the rows' spacing, the compiler walks from row to row with
        // an add before every broadcast
        let w: [*const f32; R] = std::hint::black_box(std::array::from_fn(|row| rows.as_ptr().add((r + row) * k)));
        for k0 in (0..k).step_by(K_BLOCK) {
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            for kk in k0..(k0 + K_BLOCK).min(k) {
                let xv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(xt.as_ptr().add((kk * V + v) * LANES)));
                for (row, acc_row) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_ps(*w[row].add(kk));
                    for (a, &xv) in acc_row.iter_mut().zip(&xv) {
                        *a = _mm512_fmadd_ps(wv, xv, *a);
                    }
                }
            }
            for (row, acc_row) in acc.iter().enumerate() {
                for (v, &a) in acc_row.iter().enumerate() {
                    let at = part.as_mut_ptr().add(((r + row) * V + v) * LANES);
                    _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), a));
                }
            }
        }
    }
}

/// The strip form's kernels, written once for a vector width: AVX-512 (16 lanes) and AVX2 +
/// FMA (8 lanes). Strips are as many rows as a vector has lanes, so both sum each output in
/// order of k with fused multiply-adds: the same bits at either level.
macro_rules! strip_form {
    ($name:ident, $feature:literal, $vector:ty, $lanes:literal, $images:literal,
     $load:ident, $store:ident, $fmadd:ident, $set1:ident) => {
        #[cfg(target_arch = "x86_64")]
        pub(super) mod $name {
            use std::arch::x86_64::*;

            pub(crate) const LANES: usize = $lanes;
            /// Strips a task takes side by side: 4 streams through w for each core, and at batch
            /// 1 as many chains of fused multiply-adds (each waits on its last) as the FMA units
            /// can overlap. (2, 6 or 8 strips of 16 at batch 1: level to 8% slower.)
            /// [`super::pack_strips`] pads the strips to a multiple of this.
            pub(crate) const STRIPS: usize = 4;
            pub(crate) const ROWS_PER_TASK: usize = STRIPS * LANES;
            /// Images per register block: 4 x 6 accumulators of 16 lanes (4 or 8 images:
            /// torchvision's pass at batch 16 78.3 -> 79.4 / 80.6 ms, at 64 306 -> 312 / 330);
            /// 4 x 3 of 8 lanes, which with a vector of w and a broadcast fill AVX2's 16
            /// registers.
            const IMAGES: usize = $images;
            /// Values of k per block: the task's strips' block (256 KB at 16 lanes) stays in L2
            /// while every block of images passes it. (512 or 2048: level at batch 1, 16, 64.)
            const K_BLOCK: usize = 1024;

            /// `part[r, i] = Σ_k w[r, k] · x[i, k]` for the rows of a task's strips, each sum in
            /// order of k (a block of k goes on from the last block's sums).
            ///
            /// # Safety
            /// The CPU must have the target feature this module is built for.
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn strips_times_x(strips: &[f32], x: &[f32], n: usize, k: usize, part: &mut [f32]) {
                assert!(strips.len() == STRIPS * k * LANES && x.len() >= n * k && part.len() == ROWS_PER_TASK * n);
                let mut sums = vec![0f32; n * ROWS_PER_TASK]; // [image, row]
                for k0 in (0..k).step_by(K_BLOCK) {
                    let ks = k0..(k0 + K_BLOCK).min(k);
                    // blocks as even as can be (16 images: 6 + 5 + 5)
                    let blocks = n.div_ceil(IMAGES);
                    let mut i = 0;
                    for b in 0..blocks {
                        let c = (n - i) / (blocks - b);
                        let sums = &mut sums[i * ROWS_PER_TASK..][..c * ROWS_PER_TASK];
                        let x = &x[i * k..];
                        match c {
                            1 => block::<1>(strips, x, k, ks.clone(), sums),
                            2 => block::<2>(strips, x, k, ks.clone(), sums),
                            3 => block::<3>(strips, x, k, ks.clone(), sums),
                            4 => block::<4>(strips, x, k, ks.clone(), sums),
                            5 => block::<5>(strips, x, k, ks.clone(), sums),
                            _ => block::<IMAGES>(strips, x, k, ks.clone(), sums),
                        }
                        i += c;
                    }
                }
                for (i, row_sums) in sums.chunks(ROWS_PER_TASK).enumerate() {
                    for (r, &v) in row_sums.iter().enumerate() {
                        part[r * n + i] = v;
                    }
                }
            }

            /// The strips against `C` images over the values `ks` of k: for each k, a vector of
            /// rows of each strip times each image's value broadcast, one accumulator per strip
            /// and image, taken from `sums` (`[image, row]`) and put back.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn block<const C: usize>(
                strips: &[f32],
                x: &[f32],
                k: usize,
                ks: std::ops::Range<usize>,
                sums: &mut [f32],
            ) {
                assert!(ks.end <= k && x.len() >= (C - 1) * k + ks.end && sums.len() == C * ROWS_PER_TASK);
                let (w, s_at) = (strips.as_ptr(), |s: usize, c: usize| (c * STRIPS + s) * LANES);
                let mut acc: [[$vector; C]; STRIPS] =
                    std::array::from_fn(|s| std::array::from_fn(|c| $load(sums.as_ptr().add(s_at(s, c)))));
                for kk in ks {
                    for (s, acc_s) in acc.iter_mut().enumerate() {
                        let wv = $load(w.add((s * k + kk) * LANES));
                        for (c, a) in acc_s.iter_mut().enumerate() {
                            *a = $fmadd(wv, $set1(*x.get_unchecked(c * k + kk)), *a);
                        }
                    }
                }
                for (s, acc_s) in acc.iter().enumerate() {
                    for (c, &a) in acc_s.iter().enumerate() {
                        $store(sums.as_mut_ptr().add(s_at(s, c)), a);
                    }
                }
            }
        }
    };
}

strip_form!(
    strip_form_avx512,
    "avx512f",
    __m512,
    16,
    6,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_fmadd_ps,
    _mm512_set1_ps
);
strip_form!(
    strip_form_avx2,
    "avx2,fma",
    __m256,
    8,
    3,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_fmadd_ps,
    _mm256_set1_ps
);

#[cfg(target_arch = "x86_64")]
mod dot_form {
    use std::arch::x86_64::*;

    /// Rows of `w` per task: enough tasks for every core at fc8's 1000 rows, few enough that
    /// each task's share of `y` is worth its own buffer.
    const ROWS_PER_TASK: usize = 32;
    /// Values of k per block once the batch fills a register block: a register block's rows
    /// of w (32 KiB) stay in L1 while every image passes them, x's block (n rows) in L2. Below
    /// that each value of w is used once, and the block is a whole row: one unbroken stream
    /// through `w`, which the prefetchers follow best (batch 1: fc6 4.3 against 6.3 ms).
    const K_BLOCK: usize = 1024;

    pub(super) fn matmul_wt(n: usize, o: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
        // x's rows one cache line further apart than k: fc6-8's k is a multiple of 1024, so
        // as stored, the same column of every row of x and of w falls into one L1 set, more
        // lines than its 12 ways once several images pass a block of w
        let x_ld = k + 16;
        let mut skewed = vec![0f32; n * x_ld + LANES];
        // and placed at the same offset from a cache line as w's rows (when k is a multiple of
        // 16 they all share one), so that where `block` loads w's vectors from whole lines,
        // x's are whole lines too
        let offset = (w.as_ptr() as usize).wrapping_sub(skewed.as_ptr() as usize) % LINE / 4;
        for (dst, src) in skewed[offset..].chunks_mut(x_ld).zip(x.chunks(k)) {
            dst[..k].copy_from_slice(src);
        }
        let x = &skewed[offset..];
        super::add_by_row_tasks(&w[..o * k], o, k, ROWS_PER_TASK, n, n, y, |rows, part| {
            // SAFETY: AVX-512F is present (checked by the caller); the blocks index within
            // `rows`, `x` and `part` (sizes asserted by the caller).
            unsafe { rows_times_x(rows, x, x_ld, n, k, part) }
        });
    }

    /// `part[r, i] = Σ_k rows[r, k] · x[i, k]`, in register blocks of rows by images.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_times_x(rows: &[f32], x: &[f32], x_ld: usize, n: usize, k: usize, part: &mut [f32]) {
        let m = rows.len() / k;
        let k_block = if n < IMAGES { k } else { K_BLOCK };
        for k0 in (0..k).step_by(k_block) {
            let slab = Slab { rows, x, x_ld, n, k, k0, len: k_block.min(k - k0) };
            let mut r = 0;
            while r < m {
                if r + ROWS <= m {
                    images::<ROWS>(slab, r, part);
                    r += ROWS;
                } else {
                    images::<1>(slab, r, part);
                    r += 1;
                }
            }
        }
    }

    const LANES: usize = 16;
    /// Bytes of a cache line: a vector of 16 lanes loaded from one line rather than across two
    /// (fc6 alone with its weights aligned to lines, against 16 bytes past: batch 16 14.5 ->
    /// 12.8 ms, batch 64 41.7 -> 33.4 ms, medians of interleaved runs).
    const LINE: usize = 64;

    /// Rows of w and images per register block: 8 x 3 accumulators (24 of the 32 registers)
    /// use each loaded vector of x 8 times, so x streams from L2 at a rate it can sustain.
    const ROWS: usize = 8;
    const IMAGES: usize = 3;

    /// One block of k: the values `k0..k0 + len` of every row of w (`rows`) and of x (`n`
    /// rows), rows `k` values apart.
    #[derive(Clone, Copy)]
    struct Slab<'a> {
        rows: &'a [f32],
        x: &'a [f32],
        x_ld: usize,
        n: usize,
        k: usize,
        k0: usize,
        len: usize,
    }

    /// Rows `r..r + R` of w against every image.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn images<const R: usize>(s: Slab, r: usize, part: &mut [f32]) {
        // blocks of 3 images, the rest as blocks of 2 (a lone image would load a vector of w
        // for every multiply-add): 16 = 4 x 3 + 2 x 2
        let mut i = 0;
        while s.n - i >= IMAGES && s.n - i != 4 {
            block::<R, IMAGES>(s, r, i, part);
            i += IMAGES;
        }
        while s.n - i >= 2 {
            block::<R, 2>(s, r, i, part);
            i += 2;
        }
        if i < s.n {
            block::<R, 1>(s, r, i, part);
        }
    }

    /// Adds to `part[r.., i..]` (R rows by C images) the dot products over the slab's block
    /// of k, 16 lanes at a time (the tail masked), each lane summed at the end.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize, const C: usize>(s: Slab, r: usize, i: usize, part: &mut [f32]) {
        let (k, k0, len, n) = (s.k, s.k0, s.len, s.n);
        let w_at = |row: usize, at: usize| s.rows.as_ptr().add((r + row) * k + k0 + at);
        let x_at = |img: usize, at: usize| s.x.as_ptr().add((i + img) * s.x_ld + k0 + at);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        // The values up to w's next line boundary, the whole lines, then the rest. Value `t` of
        // the block goes to lane `t - lead` (mod 16) wherever the lines fall, and the lanes are
        // turned back before they are summed: each lane sums the values `t ≡ lane` in order, as
        // if the loads started at 0, so the result does not depend on w's address.
        let lead = (LINE - w_at(0, 0) as usize % LINE) % LINE / 4;
        if lead > 0 {
            let mask = crate::ops::first_lanes(lead.min(len)) << (LANES - lead);
            let back = |p: *const f32| p.wrapping_sub(LANES - lead); // only lanes of `mask` are read
            partial(&mut acc, mask, |row| back(w_at(row, 0)), |c| back(x_at(c, 0)));
        }
        let mut at = lead;
        while at + LANES <= len {
            let mut xv = [_mm512_setzero_ps(); C];
            for (c, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(x_at(c, at));
            }
            for (row, acc_row) in acc.iter_mut().enumerate() {
                let wv = _mm512_loadu_ps(w_at(row, at));
                for (a, &xc) in acc_row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(wv, xc, *a);
                }
            }
            at += LANES;
        }
        if at < len {
            partial(&mut acc, crate::ops::first_lanes(len - at), |row| w_at(row, at), |c| x_at(c, at));
        }
        let turn: [i32; LANES] = std::array::from_fn(|lane| ((lane + LANES - lead) % LANES) as i32);
        let turn = _mm512_loadu_si512(turn.as_ptr().cast());
        for (row, acc_row) in acc.iter().enumerate() {
            for (c, &a) in acc_row.iter().enumerate() {
                part[(r + row) * n + i + c] += _mm512_reduce_add_ps(_mm512_permutexvar_ps(turn, a));
            }
        }
    }

    /// Adds to `acc` the products of the lanes of `mask` of the vectors at `w(row)` and `x(c)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn partial<const R: usize, const C: usize>(
        acc: &mut [[__m512; C]; R],
        mask: __mmask16,
        w: impl Fn(usize) -> *const f32,
        x: impl Fn(usize) -> *const f32,
    ) {
        for (row, acc_row) in acc.iter_mut().enumerate() {
            let wv = _mm512_maskz_loadu_ps(mask, w(row));
            for (c, a) in acc_row.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x(c)), *a);
            }
        }
    }
}

/// The bias gradient of a convolution (`dY` `[N, O, H, W]`) or a fully-connected layer (`[N,
/// O]`): `db[o] = Σ_n Σ_pixels dY[n, o, ..]`, one task per channel, images summed in order.
/// (Candle's `sum(0)` took 0.6 ms for fc6's 32 x 4096 gradient.)
pub(crate) struct BiasGrad;

impl candle_core::CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "bias-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[n, o, ..] = gl.dims() else {
            candle_core::bail!("bias grad: expected an [N, O, ..] gradient, got shape {:?}", gl.dims())
        };
        let dy = super::contiguous_f32("bias grad", gs, gl)?;
        let plane = gl.dims()[2..].iter().product::<usize>();
        let db = (0..o)
            .into_par_iter()
            .map(|c| (0..n).map(|i| lane_sum(&dy[(i * o + c) * plane..][..plane])).sum())
            .collect();
        Ok((CpuStorage::F32(db), Shape::from(o)))
    }
}

/// `Σ values` as 16 running sums, one per lane, then added: the compiler vectorises it (a single
/// running sum is a chain of dependent adds, conv1's bias gradient at batch 32 alone 6 M of
/// them), and the order is fixed whatever the machine.
fn lane_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = values.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(sum, &v)| *sum += v);
    }
    lanes.iter().sum::<f32>() + tail
}

/// `dy` where the ReLU's output `y` is positive, 0 elsewhere; args (dy, y).
struct ReluGrad;

impl candle_core::CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ys: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = super::contiguous_f32("relu grad", gs, gl)?;
        let y = super::contiguous_f32("relu grad", ys, yl)?;
        // written once, never zeroed first
        let mut out = Vec::with_capacity(dy.len());
        let chunks = out.spare_capacity_mut()[..dy.len()].par_chunks_mut(4096);
        chunks.zip(dy.par_chunks(4096).zip(y.par_chunks(4096))).for_each(|(o, (g, y))| {
            for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                o.write(if y > 0.0 { g } else { 0.0 });
            }
        });
        // SAFETY: the chunks above wrote every value
        unsafe { out.set_len(dy.len()) };
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

wide_fn! {
    /// The fused ReLU, in place on an op's output (NaN stays NaN, as in PyTorch).
    pub(crate) fn relu_in_place(y: &mut [f32]) {
        // a select rather than a conditional store, so it vectorises
        y.iter_mut().for_each(|v| *v = if *v < 0.0 { 0.0 } else { *v });
    }
}

/// The tensor-op form for other devices: Candle's ReLU when the op fuses one.
pub(crate) fn relu_if(y: Tensor, relu: bool) -> Result<Tensor> {
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// The gradient arriving at the op's pre-activation: `dy` masked by the output's sign when the
/// op applied the ReLU, else `dy` itself.
pub(crate) fn incoming_grad(dy: &Tensor, y: &Tensor, relu: bool) -> Result<Tensor> {
    if relu {
        dy.apply_op2_no_bwd(y, &ReluGrad)
    } else {
        dy.contiguous()
    }
}

#[cfg(test)]
mod tests {
    /// `len` values in [-0.5, 0.5) from a pattern (`step` and `modulus` make each operand's own).
    fn pattern(len: usize, step: usize, modulus: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * step) % modulus) as f32 / modulus as f32 - 0.5).collect()
    }

    /// `got` within rounding of the f64 sum `want`.
    fn assert_near(got: f32, want: f64, at: &str) {
        let got = got as f64;
        assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "{at}: {got} vs {want}");
    }

    /// The outer products against plain f64 sums: rows past the register block and a task's
    /// share, columns past the 16 lanes and the column block, batches past 64, empty shapes.
    #[test]
    fn outer_products_match_plain_sums() {
        for (m, n, k) in
            [(1, 5, 7), (37, 100, 32), (5, 97, 65), (70, 16, 1), (130, 200, 3), (4, 0, 3), (0, 4, 5), (2, 3, 0)]
        {
            let (a, b) = (pattern(k * m, 7919, 23), pattern(k * n, 104_729, 31));
            let c = super::outer_products(m, n, k, &a, &b);
            assert_eq!(c.len(), m * n);
            for i in 0..m {
                for j in 0..n {
                    let want = (0..k).map(|l| a[l * m + i] as f64 * b[l * n + j] as f64).sum();
                    assert_near(c[i * n + j], want, &format!("{m}x{n}x{k} [{i}, {j}]"));
                }
            }
        }
    }

    /// The broadcast form against plain f64 sums, at sizes that leave every remainder (rows
    /// past the register block, columns past the 16 lanes and the column block, k past the k
    /// block).
    #[test]
    fn matmul_rows_matches_plain_sums() {
        for (m, n, k) in
            [(1, 5, 7), (32, 100, 130), (5, 97, 64), (70, 16, 33), (3, 200, 1), (4, 0, 3), (0, 4, 5), (2, 3, 0)]
        {
            let (a, b) = (pattern(m * k, 7919, 23), pattern(k * n, 104_729, 31));
            let c = super::matmul_rows(m, n, k, &a, &b);
            assert_eq!(c.len(), m * n);
            for i in 0..m {
                for j in 0..n {
                    let want = (0..k).map(|l| a[i * k + l] as f64 * b[l * n + j] as f64).sum();
                    assert_near(c[i * n + j], want, &format!("{m}x{n}x{k} [{i}, {j}]"));
                }
            }
        }
    }

    /// The product gives the same bits wherever w lies in memory (the dot form's loads follow
    /// w's cache lines, so each offset from a line takes a different first step).
    #[test]
    fn matmul_wt_does_not_depend_on_addresses() {
        for (n, o, k) in [(5, 9, 100), (4, 3, 1040), (1, 2, 37), (33, 5, 100)] {
            // magnitudes from 1e-3 to 1e3, so that sums in another order round differently
            let spread = |v: Vec<f32>| -> Vec<f32> {
                v.iter().enumerate().map(|(i, &v)| v * 10f32.powi((i % 7) as i32 - 3)).collect()
            };
            let (x, w) = (spread(pattern(n * k, 7919, 23)), spread(pattern(o * k, 104_729, 31)));
            let mut first: Option<Vec<u32>> = None;
            for shift in 0..16 {
                let mut moved = vec![0f32; o * k + 16];
                moved[shift..][..o * k].copy_from_slice(&w);
                let mut y = vec![0f32; n * o];
                super::matmul_wt(n, o, k, &x, &moved[shift..][..o * k], &mut y);
                let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                match &first {
                    None => first = Some(bits),
                    Some(want) => assert_eq!(want, &bits, "{n}x{o}x{k}, w moved by {shift}"),
                }
            }
        }
    }

    /// The strips' product sums each output in order of k with fused multiply-adds: the bits
    /// of that scalar loop, at sizes that leave a part strip, a task of fewer strips, k past
    /// the k block, images past the register blocks.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn matmul_wt_strips_sums_in_order_of_k() {
        if !super::strips_available() {
            return; // no AVX2 here
        }
        let sizes =
            [(1, 1, 7), (2, 37, 100), (1, 100, 1030), (2, 16, 16), (1, 64, 5), (2, 65, 3), (1, 4, 0), (0, 3, 5)];
        for (n, o, k) in sizes.into_iter().chain([(7, 70, 2081), (16, 17, 1024), (13, 129, 30), (33, 5, 9)]) {
            let (x, w) = (pattern(n * k, 7919, 23), pattern(o * k, 104_729, 31));
            let mut y = vec![1f32; n * o];
            super::matmul_wt_strips(n, o, k, &x, &super::pack_strips(&w, o, k), &mut y);
            for i in 0..n {
                for r in 0..o {
                    let sum = (0..k).fold(0f32, |acc, j| w[r * k + j].mul_add(x[i * k + j], acc));
                    assert_eq!(y[i * o + r].to_bits(), (1.0 + sum).to_bits(), "{n}x{o}x{k} [{i}, {r}]");
                }
            }
        }
    }

    /// The dot-form and lane-form products against plain f64 sums, at sizes that leave every
    /// remainder (rows of w past the register blocks, images past them or past the lanes, k past
    /// the 16 lanes and the k block).
    #[test]
    fn matmul_wt_matches_plain_sums() {
        for (n, o, k) in
            [(1, 5, 7), (4, 37, 1030), (5, 9, 40), (7, 70, 2081), (16, 17, 1024), (3, 8, 16), (2, 3, 0), (0, 4, 5)]
                .into_iter()
                .chain([(32, 53, 1030), (37, 29, 2050), (70, 100, 33)])
        {
            let (x, w) = (pattern(n * k, 7919, 23), pattern(o * k, 104_729, 31));
            let mut y = vec![1f32; n * o];
            super::matmul_wt(n, o, k, &x, &w, &mut y);
            for i in 0..n {
                for r in 0..o {
                    let want = 1.0 + (0..k).map(|j| x[i * k + j] as f64 * w[r * k + j] as f64).sum::<f64>();
                    assert_near(y[i * o + r], want, &format!("{n}x{o}x{k} [{i}, {r}]"));
                }
            }
        }
    }
}
