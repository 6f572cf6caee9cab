//! 2-D convolution with bias as one op, on the CPU as im2col + packed GEMM (the `gemm` crate
//! Candle itself uses), with a backward written the same way:
//!
//! * forward: the 3x3 and 5x5 stride-1 layers (conv2-5) by Winograd's F(2x2, 3x3) and
//!   F(2x2, 5x5) once the batch gives every core enough tiles ([`cpu::winograd`]); with AVX2 or AVX-512, the
//!   rest (conv1, and 13x13 maps at batch 1-7) directly, without patches ([`cpu::direct`]); without
//!   it, as the patches of a group of images one under the other, each patch channels-last
//!   so that it is `k` contiguous runs ([`cpu::Geometry::patches`]), times the weights in the same
//!   order: `P · Wᵀ`, `[pixels, o]`, transposed into the NCHW output with the bias and ReLU
//!   ([`cpu::forward_pixel_major`]); 13x13 maps at batch 1-3, too few pixels for that orientation,
//!   as `W · cols(X)` an image at a time ([`cpu::forward_channel_major`]);
//! * weight gradient: `dW = Σ dY · P(X)` from the same channels-last patches; for the 3x3
//!   and 5x5 stride-1 layers, where the forward takes Winograd, by Winograd's algorithm read
//!   the other way round ([`cpu::winograd::weight_grad`]); for strided layers directly
//!   ([`cpu::direct::weight_grad`]); any way summed over fixed chunks of the batch in a fixed order,
//!   so the result does not depend on how many threads ran it;
//! * input gradient: `dX = col2im(Wᵀ · dY)`, or for the 3x3 and 5x5 stride-1 layers, where the
//!   batch allows, Winograd's forward of `dY` with the filters turned half a turn; skipped entirely
//!   when the input needs no gradient (the image), which Candle's own conv backward always
//!   computes, without GEMM.
//!
//! [`conv2d_prepared`] is a layer's convolution: its state ([`Prepared`]) keeps the weights as
//! the forward's kernels read them, made once for each version of the weights instead of on
//! every call.
//!
//! [`conv2d_relu`] applies the ReLU in the same pass, while the output is in cache, and masks
//! the incoming gradient by the output's sign in the backward (no separate ReLU op and its
//! gradient). Images are spread over the cores; a batch too small for that spreads the
//! patches of each image by row (the columns by channel) and its GEMM instead.
//! Other devices use Candle's `conv2d`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::backward::hand_over;
use super::gemm::{incoming_grad, relu_if, BiasGrad};
use super::Prepared;

mod cpu;

/// `x.conv2d(w) + b` for `x` `[N, C, H, W]`, `w` `[O, C, k, k]`, `b` `[O]`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    Conv2d { stride, padding, relu: false }.apply(x, w, b)
}

/// `relu(x.conv2d(w) + b)`, in one pass.
pub fn conv2d_relu(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    Conv2d { stride, padding, relu: true }.apply(x, w, b)
}

/// [`conv2d`], or [`conv2d_relu`] if `relu`, for a layer whose state `prepared` keeps `w` as the
/// kernels read it (see [`Prepared`]: the same bits, made once for each version of `w`).
pub fn conv2d_prepared(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    padding: usize,
    relu: bool,
    prepared: &Arc<Prepared>,
) -> Result<Tensor> {
    Conv2d { stride, padding, relu }.apply_prepared(x, w, b, Some(prepared.clone()))
}

#[derive(Debug, Clone, Copy)]
struct Conv2d {
    stride: usize,
    padding: usize,
    relu: bool,
}

impl Conv2d {
    fn apply(self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.apply_prepared(x, w, b, None)
    }

    fn apply_prepared(self, x: &Tensor, w: &Tensor, b: &Tensor, prepared: Option<Arc<Prepared>>) -> Result<Tensor> {
        if !x.device().is_cpu() {
            let y = x.conv2d(w, self.padding, self.stride, 1, 1)?.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
            return relu_if(y, self.relu);
        }
        x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Forward { conv: self, prepared })
    }
}

/// The forward op: the convolution, and its layer's state, if it has one.
struct Forward {
    conv: Conv2d,
    prepared: Option<Arc<Prepared>>,
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32("conv2d", xs, xl)?;
        let w = super::contiguous_f32("conv2d", ws, wl)?;
        let b = super::contiguous_f32("conv2d", bs, bl)?;
        let (y, shape) = cpu::forward(&self.conv, self.prepared.as_deref(), (x, xl), (w, wl), b)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let conv = self.conv;
        let dy = incoming_grad(dy, y, conv.relu)?;
        let db = dy.apply_op1_no_bwd(&BiasGrad)?;
        let dw = x.apply_op2_no_bwd(&dy, &WeightGrad(conv, w.dims4()?.0, w.dims4()?.2))?;
        let dx = if x.track_op() { Some(dy.apply_op2_no_bwd(w, &InputGrad(conv, x.dims4()?))?) } else { None };
        Ok((dx, hand_over(w, dw), hand_over(b, db)))
    }
}

/// `dW = Σ_n dY[n] ⋆ X[n]`, args (x, dy); carries (op, O, k).
struct WeightGrad(Conv2d, usize, usize);

impl candle_core::CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-weight-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32("conv2d weight grad", xs, xl)?;
        let dy = super::contiguous_f32("conv2d weight grad", gs, gl)?;
        let (dw, shape) = cpu::weight_grad(&self.0, (self.1, self.2), (x, xl), dy)?;
        Ok((CpuStorage::F32(dw), shape))
    }
}

/// `dX`, args (dy, w); carries (op, input dims).
struct InputGrad(Conv2d, (usize, usize, usize, usize));

impl candle_core::CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv2d-input-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = super::contiguous_f32("conv2d input grad", gs, gl)?;
        let w = super::contiguous_f32("conv2d input grad", ws, wl)?;
        let dx = cpu::input_grad(&self.0, self.1, dy, (w, wl))?;
        Ok((CpuStorage::F32(dx), Shape::from(self.1)))
    }
}
