//! Direct convolution with AVX-512, for the strided layer (conv1): no patch matrix. A register
//! block holds `V` vectors of 16 output channels at `P` output pixels; each step of the kernel
//! loads the `V` weight vectors of one `(ci, ky, kx)` and broadcasts the `P` pixels' input
//! values against them, from the zero-padded image. The sums, with the bias and ReLU, are
//! stored channels-last for a chunk of pixels, then transposed into the NCHW planes. The
//! weight gradient ([`weight_grad`]) is the same loop turned round: taps in place of pixels.
//!
//! Each output is summed in `(ci, ky, kx)` order from zero and the bias added last, whatever
//! the block's shape: the same bits as the first direct kernel (below) gave.
//!
//! Against the pixel-major GEMM, the first direct kernel (pixels in the vectors, weights
//! broadcast) took torchvision's conv1 at batch 1 from 1.7-2.4 to 1.1-1.8 ms and at batch 64
//! from 73-83 to 64-75 ms. This one, channels in the vectors (its loads never cross a cache
//! line), takes it a further 5-10% (conv1 alone, fastest of alternated runs: batch 1 0.72 ->
//! 0.67 ms, batch 16 10.0-10.3 -> 9.0-9.6 ms; paper's 48 channels at batch 32 16.2-20.2 ->
//! 13.4-17.9 ms), with the same sums. For stride 1 the direct form was no faster than the GEMM
//! at 27x27 and twice as slow as Winograd at 13x13, so those layers stay where they were.

use std::arch::x86_64::*;

use super::super::relu_lanes;
use super::super::transpose::transpose;
use super::{for_each_chunk, sum_over_chunks, with_scratch, Geometry};
use rayon::prelude::*;

const LANES: usize = 16;
/// The least common multiple of the register blocks' pixel and tap counts (16, 12, 8).
const BLOCK_LCM: usize = 48;
/// Pixels staged channels-last before they are transposed into the planes.
const CHUNK: usize = 5 * BLOCK_LCM;

/// Whether the direct form takes this convolution: a stride above 1, and AVX-512.
pub(super) fn applies(g: &Geometry) -> bool {
    g.stride > 1 && std::arch::is_x86_feature_detected!("avx512f")
}

/// The plain zero-padded image both kernels read, `[c, h + 2p, w + 2p]`: the split of the
/// layer at stride 1 (no phases). With its row and plane lengths.
fn padded_image(g: &Geometry) -> (Geometry, usize, usize) {
    let row_len = g.w + 2 * g.pad;
    (Geometry { stride: 1, ..*g }, row_len, (g.h + 2 * g.pad) * row_len)
}

/// `relu?(conv(x, w) + b)` for a batch, NCHW in and out.
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], b: &[f32], relu: bool) -> Vec<f32> {
    let o_padded = g.o.next_multiple_of(LANES);
    let weights = pack_weights(g, w, o_padded);
    let mut bias = b.to_vec();
    bias.resize(o_padded, 0.0);
    let (padded, row_len, plane_len) = padded_image(g);
    // where each output pixel's window starts in a padded plane; the pixels past the last
    // (a last block's unused places) repeat it, so that they read inside the image
    let mut windows: Vec<usize> =
        (0..g.ohw()).map(|p| (p / g.ow) * g.stride * row_len + (p % g.ow) * g.stride).collect();
    windows.resize(g.ohw().next_multiple_of(CHUNK), windows.last().copied().unwrap_or(0));
    let kernel = Kernel { c: g.c, k: g.k, row_len, plane_len, o_padded, relu };
    // images over the cores; a batch too small for that shares each image's channel vectors out
    let spread = g.n < rayon::current_num_threads();
    let vectors = o_padded / LANES;
    let share = if spread { vectors.div_ceil(rayon::current_num_threads()) } else { vectors } * LANES;
    let mut y = super::super::zeros(g.n * g.o * g.ohw());
    for_each_chunk(&mut y, g.o * g.ohw(), !spread, |i, y| {
        with_scratch(padded.split_len(), |image| {
            padded.split(&x[i * g.c * g.h * g.w..][..g.c * g.h * g.w], image);
            let image = &*image;
            for_each_chunk(y, share * g.ohw(), spread, |part, planes| {
                let mut stage = vec![0f32; CHUNK * 3 * LANES];
                let vectors = (planes.len() / g.ohw()).div_ceil(LANES);
                for (v0, vectors, block) in vector_blocks(planes, vectors, |v| v * LANES * g.ohw()) {
                    let (first, channels) = (part * share + v0 * LANES, block.len() / g.ohw());
                    for (chunk, windows) in windows.chunks(CHUNK).enumerate() {
                        let pixels = CHUNK.min(g.ohw() - chunk * CHUNK);
                        // SAFETY: AVX-512F is present (`applies`); `run` checks its reads.
                        unsafe { kernel.run(vectors, image, windows, &weights, &bias, first, &mut stage) };
                        transpose(pixels, channels, &stage, vectors * LANES, &mut block[chunk * CHUNK..], g.ohw());
                    }
                }
            });
        })
    });
    y
}

/// `dW[o, ci, ky, kx] = Σ_n Σ_pixels dY[n, o, pixel] · x[n, ci, window(pixel) + (ky, kx)]` for
/// a batch, in [`sum_over_chunks`]' fixed order: a register block holds `V` vectors of 16
/// output channels at `E` taps `(ci, ky, kx)`, and each pixel loads its `V` vectors of the
/// output gradient (turned channels-last) and broadcasts the `E` taps' inputs against them.
/// The GEMM form built 4.4 MB of patches an image for conv1, which the GEMM then packed again
/// (conv1's backward alone at batch 32, its weight and bias gradients and the ReLU mask, 5
/// alternated runs: median 62 -> 53 ms, fastest 50 -> 42 ms).
pub(super) fn weight_grad(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (ckk, ohw, chw) = (g.ckk(), g.ohw(), g.c * g.h * g.w);
    let vectors = g.o.div_ceil(LANES);
    let o_padded = vectors * LANES;
    let (padded, row_len, plane_len) = padded_image(g);
    // each tap's place relative to a window's start; a last block's unused taps repeat the last
    let taps_len = ckk.next_multiple_of(BLOCK_LCM);
    let taps: Vec<usize> = (0..taps_len)
        .map(|e| e.min(ckk - 1))
        .map(|e| (e / (g.k * g.k)) * plane_len + (e % (g.k * g.k) / g.k) * row_len + e % g.k)
        .collect();
    let kernel = TapKernel { taps: &taps, ckk, oh: g.oh, ow: g.ow, stride: g.stride, row_len };
    // sums[vector, tap, lane]
    let sums = sum_over_chunks(g.n, vectors * taps_len * LANES, |images, spread, sums| {
        // each vector block's sums, spread over the cores when the chunks are too few
        let mut parts = vector_blocks(sums, vectors, |v| v * taps_len * LANES);
        with_scratch(padded.split_len() + ohw * o_padded, |scratch| {
            let (image, dy_t) = scratch.split_at_mut(padded.split_len());
            for i in images {
                padded.split(&x[i * chw..][..chw], image);
                // each block's channels turned channels-last on their own, `[pixel, v * 16]`, so
                // that its pass reads one unbroken stream
                let dy_i = &dy[i * g.o * ohw..][..g.o * ohw];
                for &(first, v, _) in &parts {
                    let channels = (v * LANES).min(g.o - first * LANES);
                    let block = &mut dy_t[first * LANES * ohw..][..v * LANES * ohw];
                    transpose(channels, ohw, &dy_i[first * LANES * ohw..], ohw, block, v * LANES);
                }
                let (image, dy_t) = (&*image, &*dy_t);
                let work = |(first, v, part): &mut (usize, usize, &mut [f32])| {
                    let block = &dy_t[*first * LANES * ohw..][..*v * LANES * ohw];
                    // SAFETY: AVX-512F is present (`applies`); `run` checks its reads.
                    unsafe { kernel.run(*v, image, block, part) }
                };
                if spread {
                    parts.par_iter_mut().for_each(work);
                } else {
                    parts.iter_mut().for_each(work);
                }
            }
        })
    });
    let mut dw = vec![0f32; g.o * ckk];
    for (v, sums) in sums.chunks(taps_len * LANES).enumerate() {
        let lanes = LANES.min(g.o - v * LANES);
        transpose(ckk, lanes, sums, LANES, &mut dw[v * LANES * ckk..], ckk);
    }
    dw
}

/// The channel vectors of each register block, for `vectors` of them: pairs (2 x 12 pixels;
/// the weights, 46 KB for conv1, stay in L1), and an odd one joins the last pair, as 3 x 8
/// (conv1 of 96 channels at batch 16: 14.4-14.8 ms, against 15.2-15.8 as 4 + 4 + 2 vectors; of
/// 48 at batch 32: 13.8-14.7, against 16.5-17.7 as 2 + 1).
fn block_vectors(vectors: usize) -> impl Iterator<Item = usize> {
    let pairs = vectors / 2;
    (0..pairs.max(1)).map(move |i| if i + 1 == pairs.max(1) { vectors - 2 * i } else { 2 })
}

/// `data` cut into the blocks of [`block_vectors`] for `vectors` channel vectors, `len(v)` values
/// for a block of `v` (the last no longer than what is left): `(first vector, v, block)`.
fn vector_blocks(data: &mut [f32], vectors: usize, len: impl Fn(usize) -> usize) -> Vec<(usize, usize, &mut [f32])> {
    let (mut rest, mut first) = (data, 0);
    let mut blocks = Vec::new();
    for v in block_vectors(vectors) {
        let size = len(v).min(rest.len());
        let (block, after) = std::mem::take(&mut rest).split_at_mut(size);
        blocks.push((first, v, block));
        (rest, first) = (after, first + v);
    }
    blocks
}

/// `packed[(ci, ky, kx), oc] = w[oc, ci, ky, kx]`, 0 past the last channel: the weights one
/// step of the kernel loads lie side by side, a vector to 16 channels.
fn pack_weights(g: &Geometry, w: &[f32], o_padded: usize) -> Vec<f32> {
    let mut packed = vec![0f32; g.ckk() * o_padded];
    transpose(g.o, g.ckk(), w, g.ckk(), &mut packed, o_padded);
    packed
}

/// The sizes a register block works with.
struct Kernel {
    c: usize,
    k: usize,
    /// Values per row and per channel plane of the padded image.
    row_len: usize,
    plane_len: usize,
    /// Channels per row of the packed weights and the bias.
    o_padded: usize,
    relu: bool,
}

impl Kernel {
    /// `stage[p, v * 16 + lane]` for the `vectors` channel vectors from `first` at the pixels
    /// whose windows start at `windows` (a chunk), with the bias and ReLU.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        vectors: usize,
        image: &[f32],
        windows: &[usize],
        weights: &[f32],
        bias: &[f32],
        first: usize,
        stage: &mut [f32],
    ) {
        let furthest =
            windows.iter().max().map_or(0, |&w| w + (self.c - 1) * self.plane_len + (self.k - 1) * (self.row_len + 1));
        assert!(
            (1..=3).contains(&vectors)
                && windows.len() == CHUNK
                && furthest < image.len()
                && first + vectors * LANES <= self.o_padded
        );
        assert!(weights.len() == self.c * self.k * self.k * self.o_padded && stage.len() >= CHUNK * vectors * LANES);
        let (weights, bias) = (&weights[first..], &bias[first..]);
        match vectors {
            1 => self.blocks::<1, 16>(image, windows, weights, bias, stage),
            2 => self.blocks::<2, 12>(image, windows, weights, bias, stage),
            _ => self.blocks::<3, 8>(image, windows, weights, bias, stage),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn blocks<const V: usize, const P: usize>(
        &self,
        image: &[f32],
        windows: &[usize],
        weights: &[f32],
        bias: &[f32],
        stage: &mut [f32],
    ) {
        for (block, windows) in windows.chunks_exact(P).enumerate() {
            let at: [*const f32; P] = std::array::from_fn(|p| image.as_ptr().add(windows[p]));
            let out = stage.as_mut_ptr().add(block * P * V * LANES);
            self.block::<V, P>(at, weights.as_ptr(), bias.as_ptr(), out);
        }
    }

    /// One register block: `V` channel vectors at the `P` pixels whose windows start at `at`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const V: usize, const P: usize>(
        &self,
        at: [*const f32; P],
        mut w: *const f32,
        bias: *const f32,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; P];
        for ci in 0..self.c {
            for ky in 0..self.k {
                let row = ci * self.plane_len + ky * self.row_len;
                let rows: [*const f32; P] = std::array::from_fn(|p| at[p].add(row));
                for kx in 0..self.k {
                    let wv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(w.add(v * LANES)));
                    for (acc_p, &x) in acc.iter_mut().zip(&rows) {
                        let xv = _mm512_set1_ps(*x.add(kx));
                        for (a, &wv) in acc_p.iter_mut().zip(&wv) {
                            *a = _mm512_fmadd_ps(wv, xv, *a);
                        }
                    }
                    w = w.add(self.o_padded);
                }
            }
        }
        for (p, acc_p) in acc.iter().enumerate() {
            for (v, &a) in acc_p.iter().enumerate() {
                let mut value = _mm512_add_ps(a, _mm512_loadu_ps(bias.add(v * LANES)));
                if self.relu {
                    value = relu_lanes(value);
                }
                _mm512_storeu_ps(out.add((p * V + v) * LANES), value);
            }
        }
    }
}

/// The sizes [`weight_grad`]'s register blocks work with.
struct TapKernel<'a> {
    /// Where each tap's input lies from a window's start in a padded image, padded to a
    /// multiple of [`BLOCK_LCM`].
    taps: &'a [usize],
    ckk: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    row_len: usize,
}

impl TapKernel<'_> {
    /// Adds to `sums[v, tap, lane]` (`vectors` channel vectors) one image's products, `dy_t`
    /// the output gradient of those channels, channels-last.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, vectors: usize, image: &[f32], dy_t: &[f32], sums: &mut [f32]) {
        let furthest =
            self.taps.iter().max().map_or(0, |&t| t + ((self.oh - 1) * self.row_len + self.ow - 1) * self.stride);
        assert!(
            (1..=3).contains(&vectors) && furthest < image.len() && sums.len() == vectors * self.taps.len() * LANES
        );
        assert!(self.taps.len().is_multiple_of(BLOCK_LCM) && dy_t.len() == self.oh * self.ow * vectors * LANES);
        match vectors {
            1 => self.blocks::<1, 16>(image, dy_t, sums),
            2 => self.blocks::<2, 12>(image, dy_t, sums),
            _ => self.blocks::<3, 8>(image, dy_t, sums),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn blocks<const V: usize, const E: usize>(&self, image: &[f32], dy_t: &[f32], sums: &mut [f32]) {
        let (taps_len, sums) = (self.taps.len(), sums.as_mut_ptr());
        for (block, taps) in self.taps.chunks_exact(E).take(self.ckk.div_ceil(E)).enumerate() {
            let at: [*const f32; E] = std::array::from_fn(|j| image.as_ptr().add(taps[j]));
            let sum_at = |j: usize, v: usize| sums.add((v * taps_len + block * E + j) * LANES);
            let mut acc: [[__m512; V]; E] =
                std::array::from_fn(|j| std::array::from_fn(|v| _mm512_loadu_ps(sum_at(j, v))));
            let mut dy = dy_t.as_ptr();
            for oy in 0..self.oh {
                let mut window = oy * self.stride * self.row_len;
                for _ in 0..self.ow {
                    let g: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(dy.add(v * LANES)));
                    for (acc_j, &x) in acc.iter_mut().zip(&at) {
                        let xv = _mm512_set1_ps(*x.add(window));
                        for (a, &g) in acc_j.iter_mut().zip(&g) {
                            *a = _mm512_fmadd_ps(g, xv, *a);
                        }
                    }
                    (dy, window) = (dy.add(V * LANES), window + self.stride);
                }
            }
            for (j, acc_j) in acc.iter().enumerate() {
                for (v, &a) in acc_j.iter().enumerate() {
                    _mm512_storeu_ps(sum_at(j, v), a);
                }
            }
        }
    }
}
