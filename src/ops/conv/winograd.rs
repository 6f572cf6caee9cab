//! The forward pass of a 3x3, stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin & Gray 2016): each 2x2 block of outputs comes from a 4x4 patch of input with 16
//! multiplies per channel pair instead of 36. AlexNet's conv3, conv4 and conv5 (13x13 maps,
//! half of the net's multiply-adds) need about half the multiply-adds this way:
//!
//! * weights: `U = G g Gᵀ` for each 3x3 kernel `g`, 16 values `U[ξ, o, c]`;
//! * input: `V = Bᵀ d B` for each 4x4 patch `d` (patches every 2 pixels), `V[ξ, tile, c]`;
//! * 16 GEMMs, one per position ξ: `M[ξ] = U[ξ] · V[ξ]`, `[O, C] · [C, tiles]`;
//! * output: `Y = Aᵀ M A`, the 2x2 block, plus bias (and the ReLU).
//!
//! The transforms only add, subtract and halve, so the result differs from the direct sum by
//! rounding alone (the parity tests hold it to PyTorch's numbers like the im2col path).
//! The backward pass stays with im2col: it is the same function.

use rayon::prelude::*;

use super::{images_per_gemm, parallelism, with_scratch, Geometry};
use crate::ops::gemm::matmul;
use crate::ops::transpose::transpose;

/// Whether [`forward`] computes this convolution: 3x3 stride 1, and at least four images per
/// core. With fewer, each of the 16 GEMMs has too few columns (49 tiles an image at 13x13) to
/// run at speed: measured for torchvision's conv3-5 on 2 cores, 8.6-11.2 ms against im2col's
/// 4.5-6.0 at batch 1, 18-20 against 14-15 at batch 4, 25-32 against 31-43 at batch 8.
pub(super) fn applies(g: &Geometry) -> bool {
    g.k == 3 && g.stride == 1 && g.n >= 4 * rayon::current_num_threads()
}

/// Bytes of `V` and `M` one group of images may take: the GEMMs then find them in cache.
/// Measured at batch 64 (torchvision's conv3-5): groups of 4 images (6.4 MB for conv4) 142 ms,
/// of 16 images (the im2col path's grouping, 25 MB) 220 ms.
const GROUP_BYTES: usize = 8 << 20;

/// `y = conv(x, w) + b` (then the ReLU if `relu`), `[N, O, OH, OW]`, for a 3x3 stride-1 `g`.
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], b: &[f32], relu: bool) -> Vec<f32> {
    let (c, o) = (g.c, g.o);
    let (tiles_y, tiles_x) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
    let tiles = tiles_y * tiles_x;
    let u = transform_weights(w, o, c);
    let per_image = 16 * tiles * (c + o) * std::mem::size_of::<f32>(); // of V and M
    let group = images_per_gemm(g.n, tiles).min((GROUP_BYTES / per_image).max(1));
    let par = parallelism(g.n.div_ceil(group));
    let (chw, ohw) = (c * g.h * g.w, g.ohw());
    let mut y = vec![0f32; g.n * o * ohw];
    y.par_chunks_mut(group * o * ohw).zip(x.par_chunks(group * chw)).for_each(|(out, images)| {
        let ld = images.len() / chw * tiles; // the group's tiles side by side
        with_scratch(16 * c * ld + 16 * o * ld + input_work(g), |scratch| {
            let (v, rest) = scratch.split_at_mut(16 * c * ld);
            let (m, work) = rest.split_at_mut(16 * o * ld);
            for (i, image) in images.chunks(chw).enumerate() {
                transform_input(g, image, v, ld, i * tiles, work);
            }
            for (m_xi, (u_xi, v_xi)) in m.chunks_mut(o * ld).zip(u.chunks(o * c).zip(v.chunks(c * ld))) {
                matmul(o, ld, c, m_xi, false, (u_xi, c as isize, 1), (v_xi, 1, c as isize), par);
            }
            for (i, y_image) in out.chunks_mut(o * ohw).enumerate() {
                transform_output(g, m, ld, i * tiles, b, relu, y_image);
            }
        })
    });
    y
}

/// `U[ξ, o, c] = (G g Gᵀ)[ξ]` with `G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1]`.
fn transform_weights(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    #[inline(always)]
    fn g_times(a: f32, b: f32, e: f32) -> [f32; 4] {
        [a, (a + b + e) * 0.5, (a - b + e) * 0.5, e]
    }
    let mut u = vec![0f32; 16 * o * c];
    for (pair, g) in w.chunks_exact(9).enumerate() {
        let gg = [g_times(g[0], g[3], g[6]), g_times(g[1], g[4], g[7]), g_times(g[2], g[5], g[8])]; // (G g) by column
        for r in 0..4 {
            let row = g_times(gg[0][r], gg[1][r], gg[2][r]);
            for (s, v) in row.into_iter().enumerate() {
                u[(4 * r + s) * o * c + pair] = v;
            }
        }
    }
    u
}

/// Channels the input transform works on at once: one vector of them.
const LANES: usize = 16;

/// Scratch values [`transform_input`] needs: a block of channels' padded planes.
fn input_work(g: &Geometry) -> usize {
    (2 * g.oh.div_ceil(2) + 2) * (2 * g.ow.div_ceil(2) + 2) * LANES
}

wide_fn! {
    /// `V[ξ, first + tile, c] = (Bᵀ d B)[ξ]` for every 4x4 patch `d` of one image (patch
    /// `(ty, tx)` starting at input pixel `(2ty - p, 2tx - p)`, zero outside), `Bᵀ = [1 0 -1 0;
    /// 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`. `LANES` channels at a time, interleaved in `work`
    /// (zero-padded), so every add works on a vector of channels and every store of `V` is
    /// contiguous.
    fn transform_input(g: &Geometry, image: &[f32], v: &mut [f32], ld: usize, first: usize, work: &mut [f32]) {
        let (tiles_y, tiles_x) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
        let pw = 2 * tiles_x + 2; // padded width: every patch inside
        let plane = g.h * g.w;
        for c0 in (0..g.c).step_by(LANES) {
            let lanes = LANES.min(g.c - c0);
            work.fill(0.0);
            for y in 0..g.h {
                let row = &image[c0 * plane + y * g.w..];
                transpose(lanes, g.w, row, plane, &mut work[((y + g.pad) * pw + g.pad) * LANES..], LANES);
            }
            #[cfg(target_arch = "x86_64")]
            if lanes == LANES && std::arch::is_x86_feature_detected!("avx512f") {
                for ty in 0..tiles_y {
                    for tx in 0..tiles_x {
                        let patch = &work[(2 * ty * pw + 2 * tx) * LANES..][..(3 * pw + 4) * LANES];
                        let out = &mut v[(first + ty * tiles_x + tx) * g.c + c0..][..15 * ld * g.c + LANES];
                        // SAFETY: AVX-512F is present.
                        unsafe { avx512::transform_patch(patch, pw, out, ld * g.c) };
                    }
                }
                continue;
            }
            for ty in 0..tiles_y {
                for tx in 0..tiles_x {
                    let d = |r: usize, s: usize| -> [f32; LANES] {
                        let at = ((2 * ty + r) * pw + 2 * tx + s) * LANES;
                        work[at..at + LANES].try_into().expect("LANES values")
                    };
                    // Bᵀ d, column by column: bdt[s][r]
                    let mut bdt = [[[0f32; LANES]; 4]; 4];
                    for (s, column) in bdt.iter_mut().enumerate() {
                        let (a, b, c, e) = (d(0, s), d(1, s), d(2, s), d(3, s));
                        for l in 0..LANES {
                            column[0][l] = a[l] - c[l];
                            column[1][l] = b[l] + c[l];
                            column[2][l] = c[l] - b[l];
                            column[3][l] = b[l] - e[l];
                        }
                    }
                    // (Bᵀ d) B, row by row, stored
                    let col = first + ty * tiles_x + tx;
                    for r in 0..4 {
                        let [a, b, c, e] = [&bdt[0][r], &bdt[1][r], &bdt[2][r], &bdt[3][r]];
                        let mut out = [[0f32; LANES]; 4];
                        for l in 0..LANES {
                            out[0][l] = a[l] - c[l];
                            out[1][l] = b[l] + c[l];
                            out[2][l] = c[l] - b[l];
                            out[3][l] = b[l] - e[l];
                        }
                        for (s, values) in out.iter().enumerate() {
                            let dst = &mut v[((4 * r + s) * ld + col) * g.c + c0..];
                            if lanes == LANES {
                                dst[..LANES].copy_from_slice(values); // a fixed size: one vector store
                            } else {
                                dst[..lanes].copy_from_slice(&values[..lanes]);
                            }
                        }
                    }
                }
            }
        }
    }
}

wide_fn! {
    /// One image's output from `M`: each tile's 2x2 block `Aᵀ m A` (`Aᵀ = [1 1 1 0; 0 1 -1 -1]`)
    /// plus the bias (and the ReLU), cropped to the output's size; a row of tiles at a time.
    fn transform_output(g: &Geometry, m: &[f32], ld: usize, first: usize, b: &[f32], relu: bool, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present.
            return unsafe { avx512::transform_output(g, m, ld, first, b, relu, y) };
        }
        let (tiles_y, tiles_x) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
        for (oc, (plane, &bias)) in y.chunks_mut(g.ohw()).zip(b).enumerate() {
            for ty in 0..tiles_y {
                let mm: [&[f32]; 16] =
                    std::array::from_fn(|xi| &m[(xi * g.o + oc) * ld + first + ty * tiles_x..][..tiles_x]);
                for r in 0..2.min(g.oh - 2 * ty) {
                    let out = &mut plane[(2 * ty + r) * g.ow..][..g.ow];
                    for tx in 0..tiles_x {
                        // (Aᵀ m)[r][s], then the row's two outputs
                        let am = |s: usize| {
                            if r == 0 {
                                mm[s][tx] + mm[4 + s][tx] + mm[8 + s][tx]
                            } else {
                                mm[4 + s][tx] - mm[8 + s][tx] - mm[12 + s][tx]
                            }
                        };
                        let (a, b_, c, e) = (am(0), am(1), am(2), am(3));
                        let act = |v: f32| if relu && v < 0.0 { 0.0 } else { v };
                        out[2 * tx] = act(a + b_ + c + bias);
                        if 2 * tx + 1 < g.ow {
                            out[2 * tx + 1] = act(b_ - c - e + bias);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Geometry;
    use crate::ops::{first_lanes, relu_lanes};
    use std::arch::x86_64::*;

    /// [`super::transform_input`] of one patch `d` of 16 channels, in registers (the generic
    /// code's arrays of lanes go through the stack): `d(r, s)` at `patch[(r * pw + s) * 16..]`,
    /// `V[ξ]` stored at `out[ξ * stride..]`, the same additions in the same order.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_patch(patch: &[f32], pw: usize, out: &mut [f32], stride: usize) {
        assert!(patch.len() >= (3 * pw + 4) * 16 && out.len() >= 15 * stride + 16);
        let d = |r: usize, s: usize| _mm512_loadu_ps(patch.as_ptr().add((r * pw + s) * 16));
        // Bᵀ applied to a column (a, b, c, e) of four values
        let bt = |a, b, c, e| [_mm512_sub_ps(a, c), _mm512_add_ps(b, c), _mm512_sub_ps(c, b), _mm512_sub_ps(b, e)];
        let columns: [[__m512; 4]; 4] = std::array::from_fn(|s| bt(d(0, s), d(1, s), d(2, s), d(3, s)));
        for r in 0..4 {
            let row = bt(columns[0][r], columns[1][r], columns[2][r], columns[3][r]);
            for (s, value) in row.into_iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add((4 * r + s) * stride), value);
            }
        }
    }

    /// [`super::transform_output`] with 16 tiles to a vector (an image's tiles lie side by side
    /// in each row of `M`): the same additions in the same order, each of the four outputs of
    /// a tile scattered to its place in the plane.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_output(
        g: &Geometry,
        m: &[f32],
        ld: usize,
        first: usize,
        b: &[f32],
        relu: bool,
        y: &mut [f32],
    ) {
        let (tiles_y, tiles_x) = (g.oh.div_ceil(2), g.ow.div_ceil(2));
        let tiles = tiles_y * tiles_x;
        assert!(m.len() >= (15 * g.o + g.o - 1) * ld + first + tiles && y.len() == g.o * g.ohw() && b.len() == g.o);
        // for each vector of tiles and output (r, s) of a tile: where it goes, and whether it is
        // inside the map (the last tiles' second row and column may not be)
        let places: Vec<[(__m512i, __mmask16); 4]> = (0..tiles)
            .step_by(16)
            .map(|t0| {
                std::array::from_fn(|rs| {
                    let (r, s) = (rs / 2, rs % 2);
                    let mut index = [0i32; 16];
                    let mut inside = 0u16;
                    for (lane, slot) in index.iter_mut().enumerate().take(tiles - t0) {
                        let t = t0 + lane;
                        let (oy, ox) = (2 * (t / tiles_x) + r, 2 * (t % tiles_x) + s);
                        if oy < g.oh && ox < g.ow {
                            *slot = (oy * g.ow + ox) as i32;
                            inside |= 1 << lane;
                        }
                    }
                    (_mm512_loadu_si512(index.as_ptr().cast()), inside)
                })
            })
            .collect();
        for (oc, (plane, &bias)) in y.chunks_mut(g.ohw()).zip(b).enumerate() {
            let bias = _mm512_set1_ps(bias);
            for (j, places) in places.iter().enumerate() {
                let t0 = 16 * j;
                let lanes = first_lanes(tiles - t0);
                let mm: [__m512; 16] = std::array::from_fn(|xi| {
                    _mm512_maskz_loadu_ps(lanes, m.as_ptr().add((xi * g.o + oc) * ld + first + t0))
                });
                for (r, pair) in places.chunks(2).enumerate() {
                    // (Aᵀ m)[r][s], then the row's two outputs
                    let am = |s: usize| {
                        if r == 0 {
                            _mm512_add_ps(_mm512_add_ps(mm[s], mm[4 + s]), mm[8 + s])
                        } else {
                            _mm512_sub_ps(_mm512_sub_ps(mm[4 + s], mm[8 + s]), mm[12 + s])
                        }
                    };
                    let (a, b_, c, e) = (am(0), am(1), am(2), am(3));
                    let outputs = [
                        _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a, b_), c), bias),
                        _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(b_, c), e), bias),
                    ];
                    for (&(index, inside), mut value) in pair.iter().zip(outputs) {
                        if relu {
                            value = relu_lanes(value);
                        }
                        _mm512_mask_i32scatter_ps::<4>(plane.as_mut_ptr().cast(), inside, index, value);
                    }
                }
            }
        }
    }
}
