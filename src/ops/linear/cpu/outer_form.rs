//! The fully-connected layer's backward products, `dx = dy · w` ([`super::matmul_rows`]) and
//! `dw = dyᵀ · x` ([`super::outer_products`]), as broadcasts of one operand times vectors of
//! the other read as stored: the `gemm` crate would first copy all of fc6's 151 MB of weights
//! (or its gradient). Written once for a vector width, for AVX-512 (4 rows by 6 vectors of 16:
//! 24 of the 32 registers) and AVX2 + FMA (4 rows by 3 vectors of 8: 12 of 16, with the 3
//! loads and a broadcast). Each output is summed in order from zero with fused multiply-adds,
//! in one lane: the same bits at either level.

macro_rules! outer_form {
    ($name:ident, $level:ident, $feature:literal, rows: $rows:literal, vectors: $vectors:literal) => {
        pub(super) mod $name {
            use crate::ops::cpu::simd::$level::*;
            use rayon::prelude::*;
            use std::mem::MaybeUninit;

            /// Rows of `a` and vectors of `c`'s row per register block: `ROWS x VECTORS`
            /// accumulators, `VECTORS` loads of `b` and `ROWS` broadcasts of `a` per as many
            /// multiply-adds.
            const ROWS: usize = $rows;
            const VECTORS: usize = $vectors;
            const COLUMNS: usize = LANES * VECTORS;
            /// Rows of `b` per block: 64 rows of a block of columns (24 KiB at AVX-512) stay in L1 while every
            /// row block of `a` passes them.
            const K_BLOCK: usize = 64;
            /// Rows of `b` ahead to fetch: its rows lie a page or more apart (fc6: 36 KiB), where the
            /// hardware prefetchers do not follow (fc6's `dx`, measured with the rows split over the
            /// cores: 28 -> 23 ms).
            const PREFETCH: usize = 8;

            pub(crate) fn matmul_rows(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
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
                                    // SAFETY: the CPU has the level's feature (checked by the caller); the block's
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
            pub(crate) fn outer_products(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
                if m == 0 || n == 0 {
                    return Vec::new();
                }
                let mut at = vec![0f32; m * k]; // the blocks take `a`'s columns as rows
                crate::ops::cpu::transpose::transpose(k, m, a, m, &mut at, k);
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
                            // SAFETY: the CPU has the level's feature (checked by the caller); the block's reads and
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
                ///
                /// # Safety
                /// The CPU must have the target feature this function is compiled for; the sizes it
                /// reads and writes are asserted here or by its caller.
                #[target_feature(enable = $feature)]
                unsafe fn run_rows(
                    &self,
                    rows: usize,
                    c: &mut [MaybeUninit<f32>],
                    c_ld: usize,
                    accumulate: bool,
                    copy_to: Option<&mut [f32]>,
                ) {
                    if self.cols == COLUMNS {
                        self.run_rows_of::<true>(rows, c, c_ld, accumulate, copy_to)
                    } else {
                        self.run_rows_of::<false>(rows, c, c_ld, accumulate, copy_to)
                    }
                }

                /// [`Block::run_rows`] for a block of all [`COLUMNS`] (`WHOLE`: plain loads and
                /// stores) or fewer (masked: AVX2's masked stores are slow on AMD's cores).
                ///
                /// # Safety
                /// The CPU must have the target feature this function is compiled for; the sizes it
                /// reads and writes are asserted here or by its caller.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn run_rows_of<const WHOLE: bool>(
                    &self,
                    rows: usize,
                    c: &mut [MaybeUninit<f32>],
                    c_ld: usize,
                    accumulate: bool,
                    copy_to: Option<&mut [f32]>,
                ) {
                    match rows {
                        1 => self.run::<1, WHOLE>(c, c_ld, accumulate, copy_to),
                        2 => self.run::<2, WHOLE>(c, c_ld, accumulate, copy_to),
                        3 => self.run::<3, WHOLE>(c, c_ld, accumulate, copy_to),
                        _ => self.run::<ROWS, WHOLE>(c, c_ld, accumulate, copy_to),
                    }
                }

                /// `c[r, ..cols] (+)= Σ_j a[r, j] b[j, ..cols]` for `r < R` (rows of `c` `c_ld` apart),
                /// adding to `c` if `accumulate` (else `c` may be uninitialised: it is only written).
                ///
                /// # Safety
                /// The CPU must have the target feature this function is compiled for; the sizes it
                /// reads and writes are asserted here or by its caller.
                #[inline]
                #[target_feature(enable = $feature)]
                unsafe fn run<const R: usize, const WHOLE: bool>(
                    &self,
                    c: &mut [MaybeUninit<f32>],
                    c_ld: usize,
                    accumulate: bool,
                    mut copy_to: Option<&mut [f32]>,
                ) {
                    assert!(
                        self.a.len() >= (R - 1) * self.k + self.ks
                            && self.b.len() >= (self.ks - 1) * self.n + self.cols
                    );
                    assert!(c.len() >= (R - 1) * c_ld + self.cols);
                    assert!(copy_to.as_ref().is_none_or(|copy| copy.len() >= self.ks * COLUMNS));
                    let masks: [Mask; VECTORS] = std::array::from_fn(|v| first(self.cols.saturating_sub(LANES * v)));
                    let mut acc = [[zero(); VECTORS]; R];
                    if accumulate {
                        for (r, acc_row) in acc.iter_mut().enumerate() {
                            for (v, a) in acc_row.iter_mut().enumerate() {
                                let at = c.as_ptr().add(r * c_ld + LANES * v).cast();
                                *a = if WHOLE { load(at) } else { load_masked(at, masks[v]) };
                            }
                        }
                    }
                    for j in 0..self.ks {
                        let b_row = self.b.as_ptr().add(j * self.n);
                        if j + PREFETCH < self.ks {
                            for v in 0..self.cols.div_ceil(LANES) {
                                prefetch(b_row.add(PREFETCH * self.n + LANES * v));
                            }
                        }
                        let bv: [Vector; VECTORS] = std::array::from_fn(|v| {
                            let at = b_row.add(LANES * v);
                            if WHOLE {
                                load(at)
                            } else {
                                load_masked(at, masks[v])
                            }
                        });
                        if let Some(copy) = copy_to.as_deref_mut() {
                            for (v, &bv) in bv.iter().enumerate() {
                                store(copy.as_mut_ptr().add(j * COLUMNS + LANES * v), bv);
                            }
                        }
                        for (r, acc_row) in acc.iter_mut().enumerate() {
                            let av = splat(*self.a.get_unchecked(r * self.k + j));
                            for (a, &bv) in acc_row.iter_mut().zip(&bv) {
                                *a = fmadd(av, bv, *a);
                            }
                        }
                    }
                    for (r, acc_row) in acc.iter().enumerate() {
                        for (v, &a) in acc_row.iter().enumerate() {
                            let at = c.as_mut_ptr().add(r * c_ld + LANES * v).cast();
                            if WHOLE {
                                store(at, a)
                            } else {
                                store_masked(at, a, masks[v])
                            }
                        }
                    }
                }
            }
        }
    };
}

outer_form!(avx512, avx512, "avx512f", rows: 4, vectors: 6);
outer_form!(avx2, avx2, "avx2,fma", rows: 4, vectors: 3);
