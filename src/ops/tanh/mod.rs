//! tanh, the unit of the paper's Figure 1 baseline, as one op: Candle's CPU `tanh` calls the C
//! library's scalar `tanhf` an element at a time (a third of a `fig1-tanh` training step) and
//! differentiates through three more tensor ops. Here the forward is one vectorised pass whose
//! values are tanh correctly rounded to f32 (at worst 1 ulp off; see `cpu`), the same bits at
//! every instruction-set level, and the backward is `g * (1 - y * y)`: Candle's and PyTorch's
//! formula, in one pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

pub(super) mod cpu;

/// `tanh(x)`, differentiable: the CPU kernels on the CPU, Candle's `tanh` on other devices.
pub fn tanh(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.tanh();
    }
    x.contiguous()?.apply_op1(Tanh)
}

struct Tanh;

impl CustomOp1 for Tanh {
    fn name(&self) -> &'static str {
        "tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32("tanh", storage, layout)?;
        Ok((CpuStorage::F32(cpu::forward(x)), layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&grad_y.contiguous()?, &TanhBackward)?))
    }
}

/// dL/dx of tanh given its output `y` and dL/dy `g`: `g * (1 - y * y)`.
struct TanhBackward;

impl CustomOp2 for TanhBackward {
    fn name(&self) -> &'static str {
        "tanh-backward"
    }

    fn cpu_fwd(&self, ys: &CpuStorage, yl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = super::contiguous_f32("tanh-backward", ys, yl)?;
        let g = super::contiguous_f32("tanh-backward", gs, gl)?;
        if y.len() != g.len() {
            candle_core::bail!("tanh-backward: {} outputs but {} gradients", y.len(), g.len())
        }
        Ok((CpuStorage::F32(cpu::backward(y, g)), yl.shape().clone()))
    }
}
