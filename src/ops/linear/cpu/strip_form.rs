//! The strip form's kernels ([`super::matmul_wt_strips`]), written once for a vector width: AVX-512 (16 lanes) and AVX2 +
//! FMA (8 lanes). Strips are as many rows as a vector has lanes, so both sum each output in
//! order of k with fused multiply-adds: the same bits at either level.

macro_rules! strip_form {
    ($name:ident, $level:ident, $feature:literal, images: $images:literal) => {
        pub(super) mod $name {
            pub(crate) use crate::ops::cpu::simd::$level::LANES;
            use crate::ops::cpu::simd::$level::*;

            /// Strips a task takes side by side: 4 streams through w for each core, and at batch
            /// 1 as many chains of fused multiply-adds (each waits on its last) as the FMA units
            /// can overlap. (2, 6 or 8 strips of 16 at batch 1: level to 8% slower.)
            /// [`super::super::pack_strips`] pads the strips to a multiple of this.
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
            ///
            /// # Safety
            /// The CPU must have the target feature this function is compiled for; the sizes it
            /// reads and writes are asserted here or by its caller.
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
                let mut acc: [[Vector; C]; STRIPS] =
                    std::array::from_fn(|s| std::array::from_fn(|c| load(sums.as_ptr().add(s_at(s, c)))));
                for kk in ks {
                    for (s, acc_s) in acc.iter_mut().enumerate() {
                        let wv = load(w.add((s * k + kk) * LANES));
                        for (c, a) in acc_s.iter_mut().enumerate() {
                            *a = fmadd(wv, splat(*x.get_unchecked(c * k + kk)), *a);
                        }
                    }
                }
                for (s, acc_s) in acc.iter().enumerate() {
                    for (c, &a) in acc_s.iter().enumerate() {
                        store(sums.as_mut_ptr().add(s_at(s, c)), a);
                    }
                }
            }
        }
    };
}

strip_form!(avx512, avx512, "avx512f", images: 6);
strip_form!(avx2, avx2, "avx2,fma", images: 3);
