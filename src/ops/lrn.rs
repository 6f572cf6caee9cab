//! Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).
//!
//! `b_c = a_c / (k + alpha/size * sum_{j in W(c)} a_j^2)^beta` with the window
//! `W(c) = [c - size/2, c + (size-1)/2]` clipped to the valid channels (zero padding).
//! This is PyTorch's `LocalResponseNorm` and Caffe's `LRN` (ACROSS_CHANNELS): both divide alpha
//! by the window size. The paper writes the same formula with alpha *not* divided by n, so the
//! paper's constants (k=2, alpha=1e-4, n=5) are `Lrn::paper()` = PyTorch's alpha 5e-4.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// LRN constants in the PyTorch/Caffe convention (`alpha` is divided by `size`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lrn {
    pub size: usize,
    pub alpha: f32,
    pub beta: f32,
    pub k: f32,
}

impl Lrn {
    /// The paper: k=2, n=5, alpha=1e-4 multiplying the plain sum, beta=0.75.
    pub fn paper() -> Self {
        Self::from_sum_alpha(5, 1e-4, 0.75, 2.0)
    }

    /// Caffe's `bvlc_alexnet` (and PyTorch's `LocalResponseNorm(5, 1e-4, 0.75, 1.0)`):
    /// k=1, alpha=1e-4 divided by n.
    pub fn caffe() -> Self {
        Lrn { size: 5, alpha: 1e-4, beta: 0.75, k: 1.0 }
    }

    /// Constants written the paper's way, where alpha multiplies the sum of squares.
    pub fn from_sum_alpha(size: usize, alpha_on_sum: f64, beta: f32, k: f32) -> Self {
        Lrn { size, alpha: (alpha_on_sum * size as f64) as f32, beta, k }
    }

    /// Channels below and above channel `c` in its window.
    pub fn reach(&self) -> (usize, usize) {
        (self.size / 2, (self.size - 1) / 2)
    }

    /// `k + alpha * mean(a_j^2 over the window)` for every element of one image,
    /// computed the way PyTorch does (sum, divide by size, scale, add k).
    fn denominators(&self, x: &[f32], c: usize, plane: usize) -> Vec<f32> {
        let (below, above) = self.reach();
        let mut scale = vec![0f32; c * plane];
        scale.par_chunks_mut(plane).enumerate().for_each(|(ch, out)| {
            let lo = ch.saturating_sub(below);
            let hi = (ch + above).min(c - 1);
            for j in lo..=hi {
                let src = &x[j * plane..(j + 1) * plane];
                for (o, &v) in out.iter_mut().zip(src) {
                    *o += v * v;
                }
            }
            let inv = self.size as f32;
            for o in out.iter_mut() {
                *o = *o / inv * self.alpha + self.k;
            }
        });
        scale
    }
}

/// Local response normalisation of an `[N, C, H, W]` tensor, differentiable.
pub fn lrn(x: &Tensor, params: Lrn) -> Result<Tensor> {
    x.contiguous()?.apply_op1(params)
}

impl CustomOp1 for Lrn {
    fn name(&self) -> &'static str {
        "lrn"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = super::nchw("lrn", layout)?;
        let x = super::contiguous_f32("lrn", storage, layout)?;
        let plane = h * w;
        let mut y = vec![0f32; x.len()];
        for (img, out) in x.chunks(c * plane).zip(y.chunks_mut(c * plane)).take(n) {
            let scale = self.denominators(img, c, plane);
            out.par_iter_mut()
                .zip(img.par_iter().zip(scale.par_iter()))
                .for_each(|(o, (&v, &s))| *o = v / s.powf(self.beta));
        }
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let grad_x = x.apply_op2_no_bwd(&grad_y.contiguous()?, &LrnBackward(*self))?;
        Ok(Some(grad_x))
    }
}

/// dL/dx of LRN given x and dL/dy:
/// `g_j s_j^-beta - 2 beta alpha/size x_j sum_{i: j in W(i)} g_i x_i s_i^(-beta-1)`.
struct LrnBackward(Lrn);

impl CustomOp2 for LrnBackward {
    fn name(&self) -> &'static str {
        "lrn-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let (n, c, h, w) = super::nchw("lrn-backward", xl)?;
        let x = super::contiguous_f32("lrn-backward", xs, xl)?;
        let g = super::contiguous_f32("lrn-backward", gs, gl)?;
        let plane = h * w;
        let (below, above) = p.reach();
        let coeff = 2.0 * p.beta * p.alpha / p.size as f32;
        let mut grad = vec![0f32; x.len()];
        for ((img, gimg), out) in x.chunks(c * plane).zip(g.chunks(c * plane)).zip(grad.chunks_mut(c * plane)).take(n) {
            let scale = p.denominators(img, c, plane);
            // t_i = g_i x_i s_i^(-beta-1)
            let t: Vec<f32> =
                (0..c * plane).into_par_iter().map(|i| gimg[i] * img[i] * scale[i].powf(-p.beta - 1.0)).collect();
            out.par_chunks_mut(plane).enumerate().for_each(|(j, out)| {
                // channel j is in the window of channels i in [j - above, j + below]
                let lo = j.saturating_sub(above);
                let hi = (j + below).min(c - 1);
                let mut acc = vec![0f32; plane];
                for i in lo..=hi {
                    for (a, &v) in acc.iter_mut().zip(&t[i * plane..(i + 1) * plane]) {
                        *a += v;
                    }
                }
                let base = j * plane;
                for (q, o) in out.iter_mut().enumerate() {
                    let s = scale[base + q];
                    *o = gimg[base + q] / s.powf(p.beta) - coeff * img[base + q] * acc[q];
                }
            });
        }
        Ok((CpuStorage::F32(grad), xl.shape().clone()))
    }
}
