//! Matrix transposition between the layouts the convolution uses: the image into channels-last
//! rows for its patches, and the GEMM's `[pixel, channel]` product back into channels-first
//! planes. With AVX-512, 16 x 16 blocks go through registers (16 loads, 64 shuffles, 16
//! stores) instead of 256 strided loads; the edges and other CPUs take the plain loop.

/// `dst[j * dst_ld + i] = src[i * src_ld + j]` for `i < rows`, `j < cols`.
pub(crate) fn transpose(rows: usize, cols: usize, src: &[f32], src_ld: usize, dst: &mut [f32], dst_ld: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!((rows - 1) * src_ld + cols <= src.len() && (cols - 1) * dst_ld + rows <= dst.len());
    let mut done = 0; // rows (of src) transposed by whole blocks, in every column up to `blocked`
    let mut blocked = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        (done, blocked) = (rows / 16 * 16, cols / 16 * 16);
        for i in (0..done).step_by(16) {
            for j in (0..blocked).step_by(16) {
                // SAFETY: AVX-512F is present; the block's 16 rows of 16 values lie inside
                // `src` and `dst` (asserted above, since i + 16 <= rows and j + 16 <= cols).
                unsafe {
                    avx512::block(src[i * src_ld + j..].as_ptr(), src_ld, dst[j * dst_ld + i..].as_mut_ptr(), dst_ld)
                }
            }
        }
    }
    let mut plain = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
        for i in rows {
            for j in cols.clone() {
                dst[j * dst_ld + i] = src[i * src_ld + j];
            }
        }
    };
    plain(0..done, blocked..cols);
    plain(done..rows, 0..cols);
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// One 16 x 16 block. After the unpacks and in-lane shuffles, lane `l` of `r[4g + q]`
    /// holds column `4l + q` of rows `4g..4g + 4`; the two 128-bit lane shuffles then gather
    /// each column's four lanes into one register.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(src: *const f32, src_ld: usize, dst: *mut f32, dst_ld: usize) {
        let mut r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * src_ld)));
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for g in 0..4 {
            r[4 * g] = _mm512_shuffle_ps::<0x44>(t[4 * g], t[4 * g + 2]);
            r[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * g], t[4 * g + 2]);
            r[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[4 * g + 1], t[4 * g + 3]);
            r[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * g + 1], t[4 * g + 3]);
        }
        for q in 0..4 {
            t[q] = _mm512_shuffle_f32x4::<0x88>(r[q], r[q + 4]);
            t[q + 4] = _mm512_shuffle_f32x4::<0xDD>(r[q], r[q + 4]);
            t[q + 8] = _mm512_shuffle_f32x4::<0x88>(r[q + 8], r[q + 12]);
            t[q + 12] = _mm512_shuffle_f32x4::<0xDD>(r[q + 8], r[q + 12]);
        }
        for j in 0..8 {
            _mm512_storeu_ps(dst.add(j * dst_ld), _mm512_shuffle_f32x4::<0x88>(t[j], t[j + 8]));
            _mm512_storeu_ps(dst.add((j + 8) * dst_ld), _mm512_shuffle_f32x4::<0xDD>(t[j], t[j + 8]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::transpose;

    #[test]
    fn transposes_every_block_and_edge() {
        for (rows, cols) in [(1, 1), (16, 16), (35, 50), (3, 40), (40, 3), (169, 64)] {
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
