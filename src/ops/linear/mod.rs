//! A fully-connected layer, `x · wᵀ + b` (optionally with the ReLU), as one op.
//!
//! As Candle tensor ops the layer is `matmul`, `t()` and `broadcast_add`, and Candle's backward
//! accumulates the weight's gradient twice (once through `t()`) as zeros + add: for fc6's 38 M
//! weights that is most of the layer's backward time. Here the backward hands Candle `dx`,
//! `dw` and `db` directly, each from one GEMM (or one pass for `db`). Other devices use the
//! tensor ops. [`linear_prepared`], a layer's product, reads a copy of the weights packed in
//! strips of rows once the layer is frozen ([`Prepared`]).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::backward::hand_over;
use super::gemm::{incoming_grad, relu_if, relu_in_place, BiasGrad};
use super::Prepared;
use cpu::{matmul_rows, matmul_wt, outer_products};

mod cpu;

/// `x · wᵀ + b` for `x` `[N, K]`, `w` `[O, K]`, `b` `[O]`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Linear { relu: false, prepared: None }.apply(x, w, b)
}

/// `relu(x · wᵀ + b)`, in one pass.
pub fn linear_relu(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Linear { relu: true, prepared: None }.apply(x, w, b)
}

/// [`linear`], or [`linear_relu`] if `relu`, for a layer with state `prepared`: with AVX-512 or
/// AVX2, once the layer is frozen (see [`Prepared`]), `w` is read in strips of a vector's rows
/// (16 or 8, packed on the first pass and kept): with AVX-512 a model's whole pass 3-10% faster
/// than with `w` as stored below 32 images, level from 32. Each output is then summed in order
/// of k (the same bits at either level), so its last bits may differ from [`linear`]'s.
pub fn linear_prepared(x: &Tensor, w: &Tensor, b: &Tensor, relu: bool, prepared: &Arc<Prepared>) -> Result<Tensor> {
    Linear { relu, prepared: Some(prepared.clone()) }.apply(x, w, b)
}

#[derive(Debug, Clone)]
struct Linear {
    relu: bool,
    /// The layer's state, if it has one: where the weights' strips are kept.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // the strips are x86's
    prepared: Option<Arc<Prepared>>,
}

impl Linear {
    fn apply(self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return relu_if(x.matmul(&w.t()?)?.broadcast_add(b)?, self.relu);
        }
        x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, self)
    }
}

/// `(N, K)` and `O` of a linear layer's input and weight, or an error naming both shapes.
fn sizes(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize)> {
    match (xl.dims(), wl.dims()) {
        (&[n, k], &[o, wk]) if wk == k => Ok((n, k, o)),
        (x, w) => candle_core::bail!("linear: weight {w:?} does not fit input {x:?} (expected [N, K] and [O, K])"),
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
        let (n, k, o) = sizes(xl, wl)?;
        let x = super::contiguous_f32("linear", xs, xl)?;
        let w = super::contiguous_f32("linear", ws, wl)?;
        let b = super::contiguous_f32("linear", bs, bl)?;
        let mut y = Vec::with_capacity(n * o);
        for _ in 0..n {
            y.extend_from_slice(b);
        }
        #[cfg(target_arch = "x86_64")]
        let strips = match &self.prepared {
            Some(p) if cpu::strips_available() => p.kept_once_frozen(&p.strips, || cpu::pack_strips(w, o, k)),
            _ => None,
        };
        #[cfg(not(target_arch = "x86_64"))]
        let strips: Option<Arc<Vec<f32>>> = None;
        match strips {
            #[cfg(target_arch = "x86_64")]
            Some(strips) => cpu::matmul_wt_strips(n, o, k, x, &strips, &mut y),
            _ => matmul_wt(n, o, k, x, w, &mut y),
        }
        if self.relu {
            relu_in_place(&mut y);
        }
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = incoming_grad(dy, y, self.relu)?;
        let dw = dy.apply_op2_no_bwd(x, &WeightGrad)?;
        let db = dy.apply_op1_no_bwd(&BiasGrad)?;
        let dx = if x.track_op() { Some(dy.apply_op2_no_bwd(w, &InputGrad)?) } else { None };
        Ok((dx, hand_over(w, dw), hand_over(b, db)))
    }
}

/// `dw[o, k] = dyᵀ[o, n] · x[n, k]`; args (dy, x).
struct WeightGrad;

impl candle_core::CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "linear-weight-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (&[n, o], &[_, k]) = (gl.dims(), xl.dims()) else { candle_core::bail!("linear weight grad: shapes") };
        let dy = super::contiguous_f32("linear weight grad", gs, gl)?;
        let x = super::contiguous_f32("linear weight grad", xs, xl)?;
        Ok((CpuStorage::F32(outer_products(o, k, n, dy, x)), Shape::from((o, k))))
    }
}

/// `dx[n, k] = dy[n, o] · w[o, k]`; args (dy, w).
struct InputGrad;

impl candle_core::CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "linear-input-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (&[n, o], &[_, k]) = (gl.dims(), wl.dims()) else { candle_core::bail!("linear input grad: shapes") };
        let dy = super::contiguous_f32("linear input grad", gs, gl)?;
        let w = super::contiguous_f32("linear input grad", ws, wl)?;
        Ok((CpuStorage::F32(matmul_rows(n, k, o, dy, w)), Shape::from((n, k))))
    }
}
