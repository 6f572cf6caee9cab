//! LRN then max-pooling as one op, for inference (the paper's norm1 + pool1 and norm2 +
//! pool2): each normalised plane is pooled while it is still in cache, so the normalised layer
//! is never written out and read back. The same kernels as [`lrn`](super::lrn) and
//! [`max_pool2d`], so the same numbers.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::lrn::cpu::normalise_plane;
use super::max_pool::MaxPool2d;
use super::{lrn, max_pool2d, Lrn};

/// `max_pool2d(lrn(x, params), kernel, stride)` in one pass on the CPU, the two ops elsewhere.
/// Differentiable: the backward computes the normalised layer again (the forward kept none of
/// it), so while training the two ops, which keep it, are the faster choice.
pub fn lrn_max_pool2d(x: &Tensor, params: Lrn, kernel: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if !x.device().is_cpu() || h < kernel || w < kernel {
        return max_pool2d(&lrn(x, params)?, kernel, stride); // which names a bad size
    }
    x.contiguous()?.apply_op1(LrnMaxPool { lrn: params, pool: MaxPool2d { kernel, stride } })
}

#[derive(Debug, Clone, Copy)]
struct LrnMaxPool {
    lrn: Lrn,
    pool: MaxPool2d,
}

impl CustomOp1 for LrnMaxPool {
    fn name(&self) -> &'static str {
        "lrn-max-pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = super::nchw("lrn-max-pool2d", layout)?;
        let x = super::contiguous_f32("lrn-max-pool2d", storage, layout)?;
        let (oh, ow) = self.pool.out_size(h, w);
        let plane = h * w;
        let mut y = super::cpu::parallel::zeros(n * c * oh * ow);
        // one task per (image, channel) plane, as in LRN alone
        y.par_chunks_mut(oh * ow).enumerate().for_each_init(
            || (vec![0f32; plane], vec![0f32; plane], self.pool.columns(w)),
            |(scale, normed, columns), (i, out)| {
                normalise_plane(&self.lrn, &x[(i / c) * c * plane..][..c * plane], i % c, scale, normed);
                self.pool.pool_plane(normed, w, columns, out);
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let normed = x.apply_op1_no_bwd(&self.lrn)?;
        Ok(Some(self.lrn.backward(x, &self.pool.backward(&normed, grad_y)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The same numbers as the two ops, forward and backward, bit for bit, in both LRN
    /// conventions.
    #[test]
    fn matches_lrn_then_max_pool() {
        let values: Vec<f32> = (0..2 * 7 * 11 * 9).map(|i| ((i * 7919) % 2003) as f32 / 50.0 - 20.0).collect();
        let x = Var::from_vec(values, (2, 7, 11, 9), &Device::Cpu).unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for params in [Lrn::paper(), Lrn::caffe()] {
            let fused = lrn_max_pool2d(&x, params, 3, 2).unwrap();
            let apart = max_pool2d(&lrn(&x, params).unwrap(), 3, 2).unwrap();
            assert_eq!(bits(&fused), bits(&apart));
            let weights =
                Tensor::arange(0f32, fused.elem_count() as f32, &Device::Cpu).unwrap().reshape(fused.shape()).unwrap();
            let grad =
                |y: Tensor| (y * &weights).unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().clone();
            assert_eq!(bits(&grad(fused)), bits(&grad(apart)));
        }
    }
}
