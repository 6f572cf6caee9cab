//! Direct convolution with AVX-512, for the strided layer (conv1): no patch matrix and no
//! transposition. Output pixels, 16 to a vector, accumulate `w[o, ci, ky, kx] · x[ci, oy*s +
//! ky, ox*s + kx]` over the kernel, the inputs loaded as whole vectors from the
//! [`Geometry::split`] image (where columns one stride apart are consecutive) and each weight
//! broadcast, for [`R`] output channels at once; the bias and ReLU are applied as the sums
//! leave the registers, straight into the NCHW output.
//!
//! Measured against the pixel-major GEMM (torchvision conv1 alone, alternated runs): batch 1
//! 1.7-2.4 -> 1.1-1.8 ms, batch 64 73-83 -> 64-75 ms. For stride 1 it was no faster than the
//! GEMM at 27x27 and twice as slow as Winograd at 13x13 (a 13-pixel row wastes 3 of 16 lanes),
//! so those layers stay where they were.

use std::arch::x86_64::*;

use super::super::transpose::transpose;
use super::super::{first_lanes, relu_lanes};
use super::{for_each_chunk, with_scratch, Geometry};

/// Output channels (broadcast weights) and pixel vectors a register block holds: 24
/// accumulators, 6 input vectors and a broadcast use 31 of the 32 registers. Of the shapes
/// that fit, fewer broadcasts were faster (conv1: 4 x 6 and 6 x 4 against 12 x 2 at half the
/// speed).
const R: usize = 4;
const C: usize = 6;

/// Whether the direct form takes this convolution: a stride above 1, and AVX-512.
pub(super) fn applies(g: &Geometry) -> bool {
    g.stride > 1 && std::arch::is_x86_feature_detected!("avx512f")
}

/// `relu?(conv(x, w) + b)` for a batch, NCHW in and out.
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], b: &[f32], relu: bool) -> Vec<f32> {
    let weights = pack_weights(g, w);
    // kernel column kx reads phase kx % s at index kx / s (no division in the kernel's loop)
    let from: Vec<usize> = (0..g.k).map(|kx| (kx % g.stride) * g.phase_len() + kx / g.stride).collect();
    let mut y = vec![0f32; g.n * g.o * g.ohw()];
    // the output pixels in vectors of 16: (row, first column, lanes inside the row)
    let vectors: Vec<(usize, usize, u16)> =
        (0..g.oh).flat_map(|oy| (0..g.ow).step_by(16).map(move |ox| (oy, ox, first_lanes(g.ow - ox)))).collect();
    // the unmasked loads of a row's last vector read up to 15 values past the image (stale
    // values, into lanes that are never stored): the furthest read, checked once here
    let split_len = g.split_len() + 16;
    let (padded_rows, pl) = (g.h + 2 * g.pad, g.phase_len());
    let furthest = (g.c.saturating_sub(1) * padded_rows + (g.oh - 1) * g.stride + g.k - 1) * g.stride * pl;
    assert!(g.n == 0 || furthest + vectors.last().map_or(0, |v| v.1) + from.iter().max().unwrap() + 15 < split_len);
    // images over the cores; a batch too small for that spreads each image's channel blocks
    let spread_blocks = g.n < rayon::current_num_threads();
    for_each_chunk(&mut y, g.o * g.ohw(), !spread_blocks, |i, y| {
        with_scratch(split_len, |split| {
            g.split(&x[i * g.c * g.h * g.w..][..g.c * g.h * g.w], &mut split[..g.split_len()]);
            for_each_chunk(y, R * g.ohw(), spread_blocks, |ob, planes| {
                let w = &weights[ob * g.ckk() * R..][..g.ckk() * R];
                let bias = &b[ob * R..(ob * R + R).min(g.o)];
                for chunk in vectors.chunks(C) {
                    let at = std::array::from_fn(|v| match chunk.get(v) {
                        Some(&vector) => vector,
                        None => (chunk[0].0, chunk[0].1, 0), // stores nothing; reads a valid row
                    });
                    // SAFETY: AVX-512F is present (`applies`); the reads stay in `split` (asserted
                    // above) and `w` (checked in `run`), the masked writes in `planes`, one per
                    // channel of `bias`.
                    unsafe { Block { g, split, from: &from, w, bias, relu, at }.run(planes) }
                }
            });
        })
    });
    y
}

/// `packed[block, (ci, ky, kx), r] = w[block * R + r, ci, ky, kx]`, 0 past the last channel:
/// the `R` weights one step of the kernel broadcasts lie side by side.
fn pack_weights(g: &Geometry, w: &[f32]) -> Vec<f32> {
    let ckk = g.ckk();
    let mut packed = vec![0f32; g.o.div_ceil(R) * ckk * R];
    for (filters, dst) in w.chunks(R * ckk).zip(packed.chunks_mut(R * ckk)) {
        transpose(filters.len() / ckk, ckk, filters, ckk, dst, R);
    }
    packed
}

/// One register block: the output channels of `bias` at the pixel vectors `at`.
struct Block<'a> {
    g: &'a Geometry,
    split: &'a [f32],
    /// Where kernel column kx reads in a padded row of the split image.
    from: &'a [usize],
    w: &'a [f32],
    bias: &'a [f32],
    relu: bool,
    at: [(usize, usize, u16); C],
}

impl Block<'_> {
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, planes: &mut [f32]) {
        let g = self.g;
        let (k, s, pl, ohw) = (g.k, g.stride, g.phase_len(), g.ohw());
        let padded_rows = g.h + 2 * g.pad;
        assert!(self.w.len() == g.ckk() * R && planes.len() >= self.bias.len() * ohw);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut w = self.w.as_ptr();
        for ci in 0..g.c {
            for ky in 0..k {
                // padded row oy*s + ky of channel ci; output column ox starts at index ox
                let rows: [*const f32; C] = std::array::from_fn(|v| {
                    let (oy, ox, _) = self.at[v];
                    self.split.as_ptr().add((ci * padded_rows + oy * s + ky) * s * pl + ox)
                });
                for &from in self.from {
                    let xv: [__m512; C] = std::array::from_fn(|v| _mm512_loadu_ps(rows[v].add(from)));
                    for (i, acc_row) in acc.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(*w.add(i));
                        for (a, &xc) in acc_row.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(wv, xc, *a);
                        }
                    }
                    w = w.add(R);
                }
            }
        }
        for (i, (acc_row, &bias)) in acc.iter().zip(self.bias).enumerate() {
            for (&a, &(oy, ox, mask)) in acc_row.iter().zip(&self.at) {
                let mut value = _mm512_add_ps(a, _mm512_set1_ps(bias));
                if self.relu {
                    value = relu_lanes(value);
                }
                _mm512_mask_storeu_ps(planes.as_mut_ptr().add(i * ohw + oy * g.ow + ox), mask, value);
            }
        }
    }
}
