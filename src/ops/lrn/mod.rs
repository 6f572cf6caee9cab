//! Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).
//!
//! `b_c = a_c / (k + alpha/size * sum_{j in W(c)} a_j^2)^beta` with the window
//! `W(c) = [c - size/2, c + (size-1)/2]` clipped to the valid channels (zero padding).
//! This is PyTorch's `LocalResponseNorm` and Caffe's `LRN` (ACROSS_CHANNELS): both divide alpha
//! by the window size. The paper writes the same formula with alpha *not* divided by n, so the
//! paper's constants (k=2, alpha=1e-4, n=5) are `Lrn::paper()` = PyTorch's alpha 5e-4.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

pub(super) mod cpu;

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
}

/// Local response normalisation of an `[N, C, H, W]` tensor, differentiable: the CPU kernels
/// (its `cpu` module) on the CPU, [`lrn_tensor_ops`] on other devices.
pub fn lrn(x: &Tensor, params: Lrn) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return lrn_tensor_ops(x, params);
    }
    x.contiguous()?.apply_op1(params)
}

/// The same formula as Candle tensor ops, so it runs (and differentiates) on every backend:
/// the squares padded with zero channels, the window as `size` shifted slices summed.
pub fn lrn_tensor_ops(x: &Tensor, p: Lrn) -> Result<Tensor> {
    let (below, above) = p.reach();
    let c = x.dim(1)?;
    let squares = x.sqr()?.pad_with_zeros(1, below, above)?;
    let mut sum = squares.narrow(1, 0, c)?;
    for j in 1..p.size {
        sum = (sum + squares.narrow(1, j, c)?)?;
    }
    let scale = ((sum / p.size as f64)? * p.alpha as f64)? + p.k as f64;
    x * scale?.powf(-p.beta as f64)?
}

impl CustomOp1 for Lrn {
    fn name(&self) -> &'static str {
        "lrn"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = super::nchw("lrn", layout)?;
        let x = super::contiguous_f32("lrn", storage, layout)?;
        let y = cpu::forward(self, (n, c, h, w), x);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, grad_y)?))
    }
}

impl Lrn {
    /// The input gradient given the input `x` and the output gradient.
    pub(super) fn backward(&self, x: &Tensor, grad_y: &Tensor) -> Result<Tensor> {
        x.apply_op2_no_bwd(&grad_y.contiguous()?, &LrnBackward(*self))
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
        let dims = super::nchw("lrn-backward", xl)?;
        let x = super::contiguous_f32("lrn-backward", xs, xl)?;
        let g = super::contiguous_f32("lrn-backward", gs, gl)?;
        let grad = cpu::backward(&self.0, dims, x, g);
        Ok((CpuStorage::F32(grad), xl.shape().clone()))
    }
}
