//! The pieces the GEMM-based ops (convolution, fully-connected) share: one call into the
//! `gemm` crate, and their fused ReLU, forward and backward.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// `dst[m, n] (+)= a[m, k] · b[k, n]`, each given as (pointer, row stride, column stride).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: the slices cover every element the strides address (checked by the callers'
    // geometry), and dst does not alias a or b.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.0.as_ptr(),
            a.2,
            a.1,
            b.0.as_ptr(),
            b.2,
            b.1,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `dy` where the ReLU's output `y` is positive, 0 elsewhere; args (dy, y).
struct ReluGrad;

impl candle_core::CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ys: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = super::contiguous_f32("relu grad", gs, gl)?;
        let y = super::contiguous_f32("relu grad", ys, yl)?;
        let mut out = vec![0f32; dy.len()];
        out.par_chunks_mut(4096).zip(dy.par_chunks(4096).zip(y.par_chunks(4096))).for_each(|(o, (g, y))| {
            for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                *o = if y > 0.0 { g } else { 0.0 };
            }
        });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// The fused ReLU, in place on an op's output (NaN stays NaN, as in PyTorch).
pub(crate) fn relu_in_place(y: &mut [f32]) {
    // a select rather than a conditional store, so it vectorises
    y.iter_mut().for_each(|v| *v = if *v < 0.0 { 0.0 } else { *v });
}

/// The tensor-op form for other devices: Candle's ReLU when the op fuses one.
pub(crate) fn relu_if(y: Tensor, relu: bool) -> Result<Tensor> {
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// The gradient arriving at the op's pre-activation: `dy` masked by the output's sign when the
/// op applied the ReLU, else `dy` itself.
pub(crate) fn incoming_grad(dy: &Tensor, y: &Tensor, relu: bool) -> Result<Tensor> {
    if relu {
        dy.apply_op2_no_bwd(y, &ReluGrad)
    } else {
        dy.contiguous()
    }
}
