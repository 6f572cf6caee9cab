//! Max-pooling with a backward for overlapping windows (AlexNet's 3x3 stride 2).
//!
//! Floor mode, no padding, as PyTorch's `MaxPool2d(3, 2)`. For AlexNet's sizes
//! (55 -> 27 -> 13 -> 6) Caffe's ceil mode gives the same shapes.
//! Ties: PyTorch's CPU kernel scans each window row by row and keeps the first maximum
//! (`val > max || isnan(val)`), so the gradient goes to the first maximal element; so does ours.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

pub(super) mod cpu;

#[derive(Debug, Clone, Copy)]
pub(super) struct MaxPool2d {
    pub(super) kernel: usize,
    pub(super) stride: usize,
}

/// Max-pooling of an `[N, C, H, W]` tensor with a square `kernel` and `stride`, differentiable:
/// the CPU kernels (its `cpu` module) on the CPU, [`max_pool2d_tensor_ops`] on other devices.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < kernel || w < kernel {
        candle_core::bail!("max_pool2d: input {h}x{w} is smaller than the {kernel}x{kernel} window")
    }
    if !x.device().is_cpu() {
        return max_pool2d_tensor_ops(x, kernel, stride);
    }
    x.contiguous()?.apply_op1(MaxPool2d { kernel, stride })
}

/// The same pooling as Candle tensor ops, for every backend: the elementwise maximum of the
/// `kernel²` strided views of the input (each an `index_select` of rows, then of columns).
/// Gradients come from Candle's `maximum`, which splits a tie evenly between the tied inputs
/// where PyTorch gives it all to the first; the two agree whenever a window's maximum is unique.
pub fn max_pool2d_tensor_ops(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let pool = MaxPool2d { kernel, stride };
    let (oh, ow) = pool.out_size(h, w);
    let picks = |offset: usize, count: usize| {
        let index: Vec<u32> = (0..count).map(|i| (offset + i * stride) as u32).collect();
        Tensor::new(index, x.device())
    };
    let mut out: Option<Tensor> = None;
    for dy in 0..kernel {
        let rows = x.index_select(&picks(dy, oh)?, 2)?;
        for dx in 0..kernel {
            let view = rows.index_select(&picks(dx, ow)?, 3)?;
            out = Some(match out {
                None => view,
                Some(m) => m.maximum(&view)?,
            });
        }
    }
    Ok(out.expect("a window has at least one element"))
}

impl MaxPool2d {
    pub(super) fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        ((h - self.kernel) / self.stride + 1, (w - self.kernel) / self.stride + 1)
    }

    /// The input gradient given the input `x` and the output gradient.
    pub(super) fn backward(&self, x: &Tensor, grad_y: &Tensor) -> Result<Tensor> {
        x.apply_op2_no_bwd(&grad_y.contiguous()?, &MaxPool2dBackward(*self))
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = super::nchw("max-pool2d", layout)?;
        let x = super::contiguous_f32("max-pool2d", storage, layout)?;
        let (oh, ow) = self.out_size(h, w);
        let y = cpu::forward(self, (n, c, h, w), x);
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, grad_y)?))
    }
}

/// Scatters each output gradient to its window's first maximum; overlapping windows add up.
struct MaxPool2dBackward(MaxPool2d);

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max-pool2d-backward"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, _, h, w) = super::nchw("max-pool2d-backward", xl)?;
        let x = super::contiguous_f32("max-pool2d-backward", xs, xl)?;
        let g = super::contiguous_f32("max-pool2d-backward", gs, gl)?;
        let grad = cpu::backward(&self.0, (h, w), x, g);
        Ok((CpuStorage::F32(grad), xl.shape().clone()))
    }
}
