//! `y += x · wᵀ` with the images side by side in the vectors, from 32 images on: each value of
//! `w` broadcast and multiplied into a vector of images at once, `w` read as it lies, once per
//! group of images, and no sums across lanes. The dot form ([`super::dot_form`]) loads a vector
//! of `w` for every 3 images and sums 24 vectors across their lanes for every block of `w`;
//! here the products alone keep the loads busy (AVX-512, fc6 alone, medians of 5 alternated
//! runs: batch 32 15.9 -> 10.9 ms, batch 64 29.9 -> 23.0 ms). Below 32 images, with fewer
//! images than lanes to share each broadcast, the dot form stays.
//!
//! Written once for a vector width, with each level's register blocks (`V` vectors of images
//! by `R` rows of `w`: `V x R` accumulators, `V` loads and a broadcast in the registers). Each
//! output sums each block of k from zero in order in one lane, then adds it to the output:
//! the same bits at either level.

macro_rules! lane_form {
    ($name:ident, $level:ident, $feature:literal, group: $group:literal,
     blocks: [$($v:literal => [$($rows:literal)*]),*]) => {
        pub(super) mod $name {
            use crate::ops::cpu::simd::$level::*;

            /// Most images per pass over `w`: their `xᵀ` (fc6: 32 x 9216, 1.2 MB) stays in L2;
            /// as many vectors of them as the register blocks below take.
            const GROUP: usize = $group;
            /// Rows of `w` per task: a multiple of the register blocks' rows.
            const ROWS_PER_TASK: usize = 48;
            /// Values of k summed from zero before they are added to the output: partial sums
            /// of this many terms round about as the dot form's lanes do.
            const K_BLOCK: usize = 1024;

            pub(crate) fn matmul_wt(n: usize, o: usize, k: usize, x: &[f32], w: &[f32], y: &mut [f32]) {
                // groups as even as can be (64 images in groups of at most 32: 32 + 32; 48: 24 + 24)
                let group = n.div_ceil(n.div_ceil(GROUP));
                for g0 in (0..n).step_by(group) {
                    let images = group.min(n - g0);
                    let width = images.next_multiple_of(LANES);
                    // xᵀ[kk, image], the lanes past the last image 0
                    let mut xt = vec![0f32; k * width];
                    crate::ops::cpu::transpose::transpose(images, k, &x[g0 * k..], k, &mut xt, width);
                    let y = &mut y[g0 * o..];
                    super::super::add_by_row_tasks(&w[..o * k], o, k, ROWS_PER_TASK, width, images, y, |rows, part| {
                        // SAFETY: the CPU has the level's feature (checked by the caller); sizes
                        // asserted inside.
                        unsafe { rows_times_xt(rows, &xt, width, k, part) }
                    });
                }
            }

            /// `part[r, image] = Σ_k rows[r, k] · xt[k, image]`.
            ///
            /// # Safety
            /// The CPU must have the target feature this function is compiled for; the sizes it
            /// reads and writes are asserted here or by its caller.
            #[target_feature(enable = $feature)]
            unsafe fn rows_times_xt(rows: &[f32], xt: &[f32], width: usize, k: usize, part: &mut [f32]) {
                let m = rows.len() / k;
                assert!(xt.len() == k * width && part.len() == m * width && width.is_multiple_of(LANES));
                assert!(width <= GROUP.next_multiple_of(LANES));
                let mut r = 0;
                match width / LANES {
                    $($v => {$(
                        while m - r >= $rows {
                            block::<$v, $rows>(rows, xt, k, r, part);
                            r += $rows;
                        }
                    )*})*
                    _ => unreachable!("more vectors of images than a group"),
                }
            }

            /// Adds to `part[r.., ..]` rows `r..r + R` of `w` against the `V` vectors of images,
            /// each [`K_BLOCK`] of k summed from zero in order.
            ///
            /// # Safety
            /// The CPU must have the target feature this function is compiled for; the sizes it
            /// reads and writes are asserted here or by its caller.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn block<const V: usize, const R: usize>(
                rows: &[f32],
                xt: &[f32],
                k: usize,
                r: usize,
                part: &mut [f32],
            ) {
                // one register per row: told the rows' spacing, the compiler walks from row to row
                // with an add before every broadcast
                let w: [*const f32; R] =
                    std::hint::black_box(std::array::from_fn(|row| rows.as_ptr().add((r + row) * k)));
                for k0 in (0..k).step_by(K_BLOCK) {
                    let mut acc = [[zero(); V]; R];
                    for kk in k0..(k0 + K_BLOCK).min(k) {
                        let xv: [Vector; V] = std::array::from_fn(|v| load(xt.as_ptr().add((kk * V + v) * LANES)));
                        for (row, acc_row) in acc.iter_mut().enumerate() {
                            let wv = splat(*w[row].add(kk));
                            for (a, &xv) in acc_row.iter_mut().zip(&xv) {
                                *a = fmadd(wv, xv, *a);
                            }
                        }
                    }
                    for (row, acc_row) in acc.iter().enumerate() {
                        for (v, &a) in acc_row.iter().enumerate() {
                            let at = part.as_mut_ptr().add(((r + row) * V + v) * LANES);
                            store(at, add(load(at), a));
                        }
                    }
                }
            }
        }
    };
}

lane_form!(avx512, avx512, "avx512f", group: 32, blocks: [1 => [24 4 1], 2 => [12 4 1]]);
lane_form!(avx2, avx2, "avx2,fma", group: 24, blocks: [1 => [12 4 1], 2 => [6 2 1], 3 => [4 2 1]]);
