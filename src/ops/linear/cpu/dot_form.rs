//! `y += x · wᵀ` as dot products along k, below 32 images, with AVX-512: each block of `w`
//! streamed once against every row of `x`, 16 values of k to a vector, each lane summed at the
//! end. (AVX2 takes the lane form at every batch size: see [`super::matmul_wt`].)

use std::arch::x86_64::*;

/// Rows of `w` per task: enough tasks for every core at fc8's 1000 rows, few enough that
/// each task's share of `y` is worth its own buffer.
const ROWS_PER_TASK: usize = 32;
/// Values of k per block once the batch fills a register block: a register block's rows
/// of w (32 KiB) stay in L1 while every image passes them, x's block (n rows) in L2. Below
/// that each value of w is used once, and the block is a whole row: one unbroken stream
/// through `w`, which the prefetchers follow best (batch 1: fc6 4.3 against 6.3 ms).
const K_BLOCK: usize = 1024;

pub(crate) fn matmul_wt(n: usize, o: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
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
///
/// # Safety
/// The CPU must have the target feature this function is compiled for; the sizes it
/// reads and writes are asserted here or by its caller.
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
///
/// # Safety
/// The CPU must have the target feature this function is compiled for; the sizes it
/// reads and writes are asserted here or by its caller.
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
///
/// # Safety
/// The CPU must have the target feature this function is compiled for; the sizes it
/// reads and writes are asserted here or by its caller.
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
        let mask = crate::ops::cpu::simd::avx512::first(lead.min(len)) << (LANES - lead);
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
        partial(&mut acc, crate::ops::cpu::simd::avx512::first(len - at), |row| w_at(row, at), |c| x_at(c, at));
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
///
/// # Safety
/// The CPU must have the target feature this function is compiled for; the sizes it
/// reads and writes are asserted here or by its caller.
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
