//! 2-D convolution with bias as one op, on the CPU as im2col + packed GEMM (the `gemm` crate
//! Candle itself uses), with a backward written the same way:
//!
//! * forward, per image: `Y = W · cols(X) + b`;
//! * weight gradient: `dW = Σ dY · cols(X)ᵀ`, summed over fixed chunks of the batch in a fixed
//!   order, so the result does not depend on how many threads ran it;
//! * input gradient: `dX = col2im(Wᵀ · dY)`, skipped entirely when the input needs no gradient
//!   (the image), which Candle's own conv backward always computes, without GEMM.
//!
//! Images are spread over the cores; a single image spreads its GEMM instead. Other devices
//! use Candle's `conv2d`.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

/// `x.conv2d(w) + b` for `x` `[N, C, H, W]`, `w` `[O, C, k, k]`, `b` `[O]`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.conv2d(w, padding, stride, 1, 1)?.broadcast_add(&b.reshape((1, (), 1, 1))?);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2d { stride, padding })
}

#[derive(Debug, Clone, Copy)]
struct Conv2d {
    stride: usize,
    padding: usize,
}

/// The sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn new(op: &Conv2d, x: &Layout, w: &Layout) -> Result<Self> {
        let (n, c, h, wd) = super::nchw("conv2d", x)?;
        let (o, wc, k, k2) = super::nchw("conv2d weight", w)?;
        if wc != c || k != k2 {
            candle_core::bail!("conv2d: weight {:?} does not fit input {:?}", w.dims(), x.dims())
        }
        if h + 2 * op.padding < k || wd + 2 * op.padding < k {
            candle_core::bail!("conv2d: input {h}x{wd} is smaller than the {k}x{k} kernel")
        }
        let oh = (h + 2 * op.padding - k) / op.stride + 1;
        let ow = (wd + 2 * op.padding - k) / op.stride + 1;
        Ok(Geometry { n, c, h, w: wd, o, k, oh, ow, stride: op.stride, pad: op.padding })
    }

    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }

    fn ohw(&self) -> usize {
        self.oh * self.ow
    }

    /// `cols[(ci, ky, kx), (oy, ox)] = x[ci, oy*s + ky - p, ox*s + kx - p]` (0 outside).
    fn im2col(&self, x: &[f32], cols: &mut [f32]) {
        let (k, s, p) = (self.k, self.stride, self.pad as isize);
        for ci in 0..self.c {
            let plane = &x[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut cols[((ci * k + ky) * k + kx) * self.ohw()..][..self.ohw()];
                    for oy in 0..self.oh {
                        let iy = (oy * s + ky) as isize - p;
                        let out = &mut row[oy * self.ow..(oy + 1) * self.ow];
                        if iy < 0 || iy >= self.h as isize {
                            out.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        for (ox, o) in out.iter_mut().enumerate() {
                            let ix = (ox * s + kx) as isize - p;
                            *o = if ix < 0 || ix >= self.w as isize { 0.0 } else { src[ix as usize] };
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of [`Geometry::im2col`]: adds each column entry back to its input pixel.
    fn col2im(&self, cols: &[f32], x: &mut [f32]) {
        let (k, s, p) = (self.k, self.stride, self.pad as isize);
        x.fill(0.0);
        for ci in 0..self.c {
            let plane = &mut x[ci * self.h * self.w..(ci + 1) * self.h * self.w];
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((ci * k + ky) * k + kx) * self.ohw()..][..self.ohw()];
                    for oy in 0..self.oh {
                        let iy = (oy * s + ky) as isize - p;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let dst = &mut plane[iy as usize * self.w..(iy as usize + 1) * self.w];
                        for (ox, &v) in row[oy * self.ow..(oy + 1) * self.ow].iter().enumerate() {
                            let ix = (ox * s + kx) as isize - p;
                            if ix >= 0 && ix < self.w as isize {
                                dst[ix as usize] += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dst[m, n] (+)= a[m, k] · b[k, n]`, each given as (pointer, row stride, column stride).
#[allow(clippy::too_many_arguments)]
fn matmul(
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

/// Images per partial weight gradient: fixed, so the summation order is too.
const CHUNK: usize = 8;

fn parallelism(images: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if images >= threads {
        Parallelism::None // the images are spread over the threads instead
    } else {
        Parallelism::Rayon(threads)
    }
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
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
        let g = Geometry::new(self, xl, wl)?;
        let x = super::contiguous_f32("conv2d", xs, xl)?;
        let w = super::contiguous_f32("conv2d", ws, wl)?;
        let b = super::contiguous_f32("conv2d", bs, bl)?;
        let (ckk, ohw) = (g.ckk(), g.ohw());
        let par = parallelism(g.n);
        let mut y = vec![0f32; g.n * g.o * ohw];
        y.par_chunks_mut(g.o * ohw).zip(x.par_chunks(g.c * g.h * g.w)).for_each_init(
            || vec![0f32; ckk * ohw],
            |cols, (out, img)| {
                g.im2col(img, cols);
                for (row, &bias) in out.chunks_mut(ohw).zip(b) {
                    row.fill(bias);
                }
                matmul(g.o, ohw, ckk, out, true, (w, ckk as isize, 1), (cols, ohw as isize, 1), par);
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((g.n, g.o, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let db = dy.sum((0, 2, 3))?;
        let dw = x.apply_op2_no_bwd(&dy, &WeightGrad(*self, w.dims4()?.0, w.dims4()?.2))?;
        let dx = if x.track_op() { Some(dy.apply_op2_no_bwd(w, &InputGrad(*self, x.dims4()?))?) } else { None };
        Ok((dx, Some(dw), Some(db)))
    }
}

/// `dW = Σ_n dY[n] · cols(X[n])ᵀ`, args (x, dy); carries (op, O, k).
struct WeightGrad(Conv2d, usize, usize);

impl candle_core::CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-weight-grad"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, _, _) = super::nchw("conv2d weight grad", xl)?;
        let (o, k) = (self.1, self.2);
        let wl = Layout::contiguous((o, c, k, k));
        let g = Geometry::new(&self.0, xl, &wl)?;
        let x = super::contiguous_f32("conv2d weight grad", xs, xl)?;
        let dy = super::contiguous_f32("conv2d weight grad", gs, gl)?;
        let (ckk, ohw) = (g.ckk(), g.ohw());
        let chunks: Vec<usize> = (0..n.div_ceil(CHUNK)).collect();
        let partials: Vec<Vec<f32>> = chunks
            .par_iter()
            .map(|&chunk| {
                let mut acc = vec![0f32; o * ckk];
                let mut cols = vec![0f32; ckk * ohw];
                for i in chunk * CHUNK..((chunk + 1) * CHUNK).min(n) {
                    g.im2col(&x[i * c * g.h * g.w..(i + 1) * c * g.h * g.w], &mut cols);
                    let dyi = &dy[i * o * ohw..(i + 1) * o * ohw];
                    // acc[o, ckk] += dY[o, ohw] · colsᵀ[ohw, ckk]
                    matmul(
                        o,
                        ckk,
                        ohw,
                        &mut acc,
                        true,
                        (dyi, ohw as isize, 1),
                        (&cols, 1, ohw as isize),
                        parallelism(chunks.len()),
                    );
                }
                acc
            })
            .collect();
        let mut dw = vec![0f32; o * ckk];
        for p in partials {
            dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(dw), Shape::from((o, c, k, k))))
    }
}

/// `dX[n] = col2im(Wᵀ · dY[n])`, args (dy, w); carries (op, input dims).
struct InputGrad(Conv2d, (usize, usize, usize, usize));

impl candle_core::CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-input-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ws: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let xl = Layout::contiguous(self.1);
        let g = Geometry::new(&self.0, &xl, wl)?;
        let dy = super::contiguous_f32("conv2d input grad", gs, gl)?;
        let w = super::contiguous_f32("conv2d input grad", ws, wl)?;
        let (ckk, ohw, o) = (g.ckk(), g.ohw(), g.o);
        let par = parallelism(g.n);
        let mut dx = vec![0f32; g.n * g.c * g.h * g.w];
        dx.par_chunks_mut(g.c * g.h * g.w).zip(dy.par_chunks(o * ohw)).for_each_init(
            || vec![0f32; ckk * ohw],
            |cols, (dxi, dyi)| {
                // cols[ckk, ohw] = Wᵀ[ckk, o] · dY[o, ohw]
                matmul(ckk, ohw, o, cols, false, (w, 1, ckk as isize), (dyi, ohw as isize, 1), par);
                g.col2im(cols, dxi);
            },
        );
        Ok((CpuStorage::F32(dx), Shape::from(self.1)))
    }
}
