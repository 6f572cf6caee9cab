//! The fully-connected layer's products on the CPU, each with a form for the level the CPU
//! runs at ([`crate::ops::Isa`]) and the `gemm` crate below AVX2:
//! * the forward `y += x · wᵀ` ([`matmul_wt`]): the weights read as stored, as dot products
//!   ([`dot_form`], AVX-512 below 32 images) or with the images in the lanes ([`lane_form`]);
//!   or packed once in strips for a model frozen for inference ([`matmul_wt_strips`],
//!   [`strip_form`]);
//! * the backward's `dx = dy · w` ([`matmul_rows`]) and `dw = dyᵀ · x` ([`outer_products`]),
//!   both as broadcasts times rows read as stored ([`outer_form`]).
//!
//! The `gemm` crate would copy (pack) all of fc6's 151 MB of weights on every call first.

#[cfg(target_arch = "x86_64")]
mod dot_form;
#[cfg(target_arch = "x86_64")]
mod lane_form;
#[cfg(target_arch = "x86_64")]
mod outer_form;
#[cfg(target_arch = "x86_64")]
mod strip_form;

use crate::ops::gemm::matmul;
use gemm::Parallelism;

/// From this many images on, the AVX-512 forward takes the lane form, below it the dot form.
#[cfg(target_arch = "x86_64")]
const LANE_FORM_FROM: usize = 32;

/// `y[n, o] += Σ_k x[n, k] · w[o, k]` (x `[n, k]`, w `[o, k]`, y `[n, o]`, all row-major): the
/// fully-connected layer's product. The `gemm` crate first copies (packs) all of `w`; for fc6's
/// 151 MB at small batches that copy costs more than the multiply-adds (at batch 1 it was 40%
/// of the whole forward pass). With AVX-512 the product is taken here, `w` read as stored:
/// below 32 images as dot products along k, each block of `w` streamed once against every row
/// of `x` ([`dot_form`]); from 32 on with the images side by side in the vectors ([`lane_form`]).
/// With AVX2 the lane form takes every batch size; elsewhere it goes to the `gemm` crate.
/// Weights that no longer change are read packed in strips instead ([`matmul_wt_strips`]).
pub(crate) fn matmul_wt(n: usize, o: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
    assert!(x.len() >= n * k && w.len() >= o * k && y.len() >= n * o);
    if n == 0 || o == 0 || k == 0 {
        return; // nothing to add
    }
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx512() {
        if n >= LANE_FORM_FROM {
            return lane_form::avx512::matmul_wt(n, o, k, x, w, y);
        }
        return dot_form::matmul_wt(n, o, k, x, w, y);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx2() {
        return lane_form::avx2::matmul_wt(n, o, k, x, w, y);
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
        (strip_form::avx512::LANES, strip_form::avx512::ROWS_PER_TASK)
    } else {
        (strip_form::avx2::LANES, strip_form::avx2::ROWS_PER_TASK)
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
        crate::ops::cpu::transpose::transpose(rows.len() / k, k, rows, k, strip, lanes);
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
        if crate::ops::Isa::avx512() { strip_form::avx512::strips_times_x } else { strip_form::avx2::strips_times_x };
    add_by_row_tasks(strips, o, k, strip_geometry().1, n, n, y, |strips, part| {
        // SAFETY: the level's kernel, whose features the CPU has (`strips_available`, and the
        // AVX-512 one only at that level); sizes asserted inside.
        unsafe { kernel(strips, x, n, k, part) }
    });
}

/// `c[m, n] = a[m, k] · b[k, n]`, all row-major, for few rows `m` and a large `b`: the
/// fully-connected layer's input gradient `dx = dy · w`. The `gemm` crate copies (packs) all of
/// `b` first, 151 MB of fc6's weights. With AVX-512 or AVX2 the product is taken here as
/// broadcasts of `a` times rows of `b` read as stored, in blocks of `b` that stay in L1 while
/// every row of `a` passes, the columns split over the cores so that `b` is read once
/// (AVX-512, fc6 at batch 32: 44-54 -> 21-26 ms); elsewhere it goes to the `gemm` crate.
pub(crate) fn matmul_rows(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    assert!(a.len() >= m * k && b.len() >= k * n);
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx512() {
        return outer_form::avx512::matmul_rows(m, n, k, a, b);
    } else if crate::ops::Isa::avx2() {
        return outer_form::avx2::matmul_rows(m, n, k, a, b);
    }
    let mut c = vec![0f32; m * n];
    let threads = Parallelism::Rayon(rayon::current_num_threads());
    matmul(m, n, k, &mut c, false, (a, k as isize, 1), (b, n as isize, 1), threads);
    c
}

/// `c[m, n] = Σ_j a[j, m] b[j, n]` (`a` `[k, m]`, `b` `[k, n]`, row-major): a sum of `k` outer
/// products, for few `k` and a large `c`: the fully-connected layer's weight gradient
/// `dw = dyᵀ · x`, `k` the batch. Through the `gemm` crate, `c` is zeroed first and then read
/// and written again (fc6's 151 MB). With AVX-512 or AVX2 each value of `c` is written once,
/// from registers, the rows split over the cores (`b`, the layer's input, stays in L2);
/// elsewhere it goes to the `gemm` crate.
pub(crate) fn outer_products(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    assert!(a.len() >= k * m && b.len() >= k * n);
    #[cfg(target_arch = "x86_64")]
    if k > 0 && crate::ops::Isa::avx512() {
        return outer_form::avx512::outer_products(m, n, k, a, b);
    } else if k > 0 && crate::ops::Isa::avx2() {
        return outer_form::avx2::outer_products(m, n, k, a, b);
    }
    let mut c = vec![0f32; m * n];
    let threads = Parallelism::Rayon(rayon::current_num_threads());
    matmul(m, n, k, &mut c, false, (a, 1, m as isize), (b, n as isize, 1), threads);
    c
}

/// `y[i, row] += part[row, i]` for the first `images` of each part row's `width` values: the
/// rows of `w` (`k` values each; `o` of them, or in strips, `o` rounded up to whole strips) cut
/// into tasks of `rows_per_task` spread over the cores, each computing its rows' `part`
/// (zeroed) with `product(rows, part)`, then added into `y` in order (rows past `o` dropped).
/// The forward's forms ([`dot_form`], [`lane_form`], [`strip_form`]) differ only in `product`.
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
    crate::ops::cpu::parallel::par_tasks(parts.iter_mut().zip(rows), || (), |_, (part, rows)| product(rows, part));
    for (t, part) in parts.iter().enumerate() {
        let first = t * rows_per_task;
        for (r, row) in part.chunks(width).take(o - first).enumerate() {
            for (i, &v) in row[..images].iter().enumerate() {
                y[i * o + first + r] += v;
            }
        }
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
