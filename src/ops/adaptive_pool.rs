//! torchvision's `AdaptiveAvgPool2d`: output cell `i` averages input rows
//! `floor(i*H/oh) .. ceil((i+1)*H/oh)` (and likewise for columns).
//!
//! The op is linear and separable, so it is written as `P_h · X · P_wᵀ` with averaging
//! matrices: the backward then comes from matmul's, and it runs on every Candle backend.

use candle_core::{Device, Result, Tensor};

/// Adaptive average pooling of an `[N, C, H, W]` tensor to `[N, C, oh, ow]`.
pub fn adaptive_avg_pool2d(x: &Tensor, (oh, ow): (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (oh, ow) {
        return Ok(x.clone()); // every bin is one pixel: exactly the identity
    }
    let rows = averaging_matrix(oh, h, x.device())?; // [oh, h]
    let cols = averaging_matrix(ow, w, x.device())?.t()?; // [w, ow]
    rows.broadcast_matmul(&x.broadcast_matmul(&cols)?)
}

/// `[out, len]` matrix whose row `i` averages bin `i` of PyTorch's adaptive pooling.
fn averaging_matrix(out: usize, len: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; out * len];
    for i in 0..out {
        let start = i * len / out;
        let end = ((i + 1) * len).div_ceil(out);
        for j in start..end {
            m[i * len + j] = 1.0 / (end - start) as f32;
        }
    }
    Tensor::from_vec(m, (out, len), device)
}
