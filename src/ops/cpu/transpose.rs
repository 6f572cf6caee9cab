//! Matrix transposition between the layouts the convolution uses: the image into channels-last
//! rows for its patches, and the GEMM's `[pixel, channel]` product back into channels-first
//! planes. With AVX-512, 16 x 16 blocks go through registers (16 loads, 64 shuffles, 16
//! stores) instead of 256 strided loads, the edges as blocks with masked loads and stores;
//! with AVX2, 8 x 8 blocks (8 loads, 24 shuffles, 8 stores); other CPUs take the plain loop.

/// The step every block transpose here starts with: in each 128-bit lane, each block of four
/// rows `r[4g..4g + 4]` transposed (`groups` of them), through the scratch `t`. Afterwards lane
/// `l` of `r[4g + q]` holds column `4l + q` of those rows.
#[cfg(target_arch = "x86_64")]
macro_rules! transpose_4x4_in_lanes {
    ($r:ident, $t:ident, $groups:literal, $unpacklo:ident, $unpackhi:ident, $shuffle:ident) => {
        for i in 0..2 * $groups {
            $t[2 * i] = $unpacklo($r[2 * i], $r[2 * i + 1]);
            $t[2 * i + 1] = $unpackhi($r[2 * i], $r[2 * i + 1]);
        }
        for g in 0..$groups {
            $r[4 * g] = $shuffle::<0x44>($t[4 * g], $t[4 * g + 2]);
            $r[4 * g + 1] = $shuffle::<0xEE>($t[4 * g], $t[4 * g + 2]);
            $r[4 * g + 2] = $shuffle::<0x44>($t[4 * g + 1], $t[4 * g + 3]);
            $r[4 * g + 3] = $shuffle::<0xEE>($t[4 * g + 1], $t[4 * g + 3]);
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use transpose_4x4_in_lanes;

/// A 32-bit value [`transpose`] moves: the blocks load, shuffle and store f32 lanes, which
/// only move bits, so i32 values (the resize's exact sums) go through them unchanged.
pub(crate) trait Word: Copy {}
impl Word for f32 {}
impl Word for i32 {}

/// `dst[j * dst_ld + i] = src[i * src_ld + j]` for `i < rows`, `j < cols`.
pub(crate) fn transpose<T: Word>(rows: usize, cols: usize, src: &[T], src_ld: usize, dst: &mut [T], dst_ld: usize) {
    const { assert!(std::mem::size_of::<T>() == 4) };
    if rows == 0 || cols == 0 {
        return;
    }
    assert!((rows - 1) * src_ld + cols <= src.len() && (cols - 1) * dst_ld + rows <= dst.len());
    // below 8 rows a block would be mostly masked off: the image's 3 colour channels
    // interleave faster value by value (conv1 alone at batch 64, `perf`: 24% of its time in
    // such blocks, 8% in the plain loop)
    #[cfg(target_arch = "x86_64")]
    if rows >= 8 && crate::ops::Isa::avx2() {
        type Block = unsafe fn(*const f32, usize, *mut f32, usize, usize, usize);
        let (size, block): (usize, Block) =
            if crate::ops::Isa::avx512() { (16, avx512::block) } else { (8, avx2::block) };
        for i in (0..rows).step_by(size) {
            for j in (0..cols).step_by(size) {
                let (height, width) = (size.min(rows - i), size.min(cols - j));
                // SAFETY: the CPU has the block's level; the block reads `height` rows of
                // `width` values inside `src` and writes `width` rows of `height` values inside
                // `dst` (asserted above), the rest masked off; a `T` is 4 bytes (asserted), moved
                // as an f32's bits.
                unsafe {
                    let (from, to) = (src[i * src_ld + j..].as_ptr(), dst[j * dst_ld + i..].as_mut_ptr());
                    let (from, to) = (from.cast::<f32>(), to.cast::<f32>());
                    block(from, src_ld, to, dst_ld, height, width)
                }
            }
        }
        return;
    }
    for i in 0..rows {
        for j in 0..cols {
            dst[j * dst_ld + i] = src[i * src_ld + j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// One block of up to 16 x 16: `height` rows of `width` values (masked loads, zeros
    /// below), transposed into `width` rows of `height` (masked stores). After the unpacks and
    /// in-lane shuffles, lane `l` of `r[4g + q]` holds column `4l + q` of rows `4g..4g + 4`;
    /// the two 128-bit lane shuffles then gather each column's four lanes into one register.
    ///
    /// # Safety
    /// The CPU must have the target feature this function is compiled for; the sizes it
    /// reads and writes are asserted here or by its caller.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(
        src: *const f32,
        src_ld: usize,
        dst: *mut f32,
        dst_ld: usize,
        height: usize,
        width: usize,
    ) {
        let (columns, rows) =
            (crate::ops::cpu::simd::avx512::first(width), crate::ops::cpu::simd::avx512::first(height));
        // every row and column takes the same instructions, the missing ones masked off (a
        // mask of 0 touches no memory): no branches in the block
        let mut r: [__m512; 16] = std::array::from_fn(|i| {
            let mask = if i < height { columns } else { 0 };
            _mm512_maskz_loadu_ps(mask, src.wrapping_add(i * src_ld))
        });
        let mut t = [_mm512_setzero_ps(); 16];
        transpose_4x4_in_lanes!(r, t, 4, _mm512_unpacklo_ps, _mm512_unpackhi_ps, _mm512_shuffle_ps);
        for q in 0..4 {
            t[q] = _mm512_shuffle_f32x4::<0x88>(r[q], r[q + 4]);
            t[q + 4] = _mm512_shuffle_f32x4::<0xDD>(r[q], r[q + 4]);
            t[q + 8] = _mm512_shuffle_f32x4::<0x88>(r[q + 8], r[q + 12]);
            t[q + 12] = _mm512_shuffle_f32x4::<0xDD>(r[q + 8], r[q + 12]);
        }
        for j in 0..8 {
            r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[j + 8]);
            r[j + 8] = _mm512_shuffle_f32x4::<0xDD>(t[j], t[j + 8]);
        }
        for (j, column) in r.iter().enumerate() {
            let mask = if j < width { rows } else { 0 };
            _mm512_mask_storeu_ps(dst.wrapping_add(j * dst_ld), mask, *column);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::ops::cpu::simd::avx2::*;
    use std::arch::x86_64::*;

    /// One block of up to 8 x 8, as [`super::avx512::block`] does 16 x 16: after the unpacks
    /// and in-lane shuffles, the low 128 bits of `r[q]` hold column `q` of rows 0-3 and its
    /// high bits column `q + 4`, the same of rows 4-7 in `r[q + 4]`; one shuffle of 128-bit
    /// halves then joins each column's two halves. A whole block loads and stores plainly,
    /// an edge block with masks (`vmaskmovps` stores are slow on AMD's cores).
    ///
    /// # Safety
    /// The CPU must have AVX2; `src` must hold `height` rows (`src_ld` apart) of `width`
    /// values, `dst` `width` rows (`dst_ld` apart) of `height`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(
        src: *const f32,
        src_ld: usize,
        dst: *mut f32,
        dst_ld: usize,
        height: usize,
        width: usize,
    ) {
        let whole = height == LANES && width == LANES;
        let (columns, rows) = (first(width), first(height));
        let mut r = [zero(); 8];
        for (i, row) in r.iter_mut().enumerate().take(height) {
            let from = src.add(i * src_ld);
            *row = if whole { load(from) } else { load_masked(from, columns) };
        }
        let mut t = [zero(); 8];
        transpose_4x4_in_lanes!(r, t, 2, _mm256_unpacklo_ps, _mm256_unpackhi_ps, _mm256_shuffle_ps);
        for q in 0..4 {
            t[q] = _mm256_permute2f128_ps::<0x20>(r[q], r[q + 4]);
            t[q + 4] = _mm256_permute2f128_ps::<0x31>(r[q], r[q + 4]);
        }
        for (j, column) in t.iter().enumerate().take(width) {
            let to = dst.add(j * dst_ld);
            if whole {
                store(to, *column);
            } else {
                store_masked(to, *column, rows);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn transposes_every_block_and_edge() {
        for (rows, cols) in [(1, 1), (16, 16), (35, 50), (3, 40), (40, 3), (169, 64), (27, 17), (8, 8), (12, 9)] {
            let (src_ld, dst_ld) = (cols + 3, rows + 5);
            let src: Vec<f32> = (0..rows * src_ld).map(|v| v as f32).collect();
            let mut dst = vec![-1f32; cols * dst_ld];
            transpose(rows, cols, &src, src_ld, &mut dst, dst_ld);
            for j in 0..cols {
                for i in 0..dst_ld {
                    let want = if i < rows { src[i * src_ld + j] } else { -1.0 };
                    assert_eq!(dst[j * dst_ld + i], want, "{rows}x{cols} at ({i}, {j})");
                }
            }
        }
    }
}
