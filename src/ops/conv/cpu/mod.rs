//! The convolution on the CPU: its geometry, the im2col + GEMM forms, and for each pass the
//! choice among them, the direct form ([`direct`], AVX2 and AVX-512) and Winograd's
//! ([`winograd`]). The custom ops in the parent module hand their contiguous data here.

use std::ops::Range;

use candle_core::{Layout, Result, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

use super::Conv2d;
use crate::ops::cpu::transpose::transpose;
use crate::ops::gemm::{matmul, relu_in_place};
use crate::ops::Prepared;

#[cfg(target_arch = "x86_64")]
mod direct;
mod winograd;

/// `relu?(conv(x, w) + b)` (the ReLU if `conv.relu`), `[N, O, OH, OW]`: by Winograd where it
/// applies (3x3 and 5x5 at stride 1 on large enough batches), else the direct form (AVX2 or
/// AVX-512), else im2col and the GEMM. `prepared`: the layer's state, which keeps Winograd's
/// kernels and the direct form's packed weights for the weights' version.
pub(super) fn forward(
    conv: &Conv2d,
    prepared: Option<&Prepared>,
    (x, xl): (&[f32], &Layout),
    (w, wl): (&[f32], &Layout),
    b: &[f32],
) -> Result<(Vec<f32>, Shape)> {
    let g = Geometry::new(conv, xl, wl)?;
    let shape = Shape::from((g.n, g.o, g.oh, g.ow));
    // Winograd's products are one GEMM per position with the input channels as its depth: with
    // the 3 channels of an image that GEMM runs at a fraction of speed, and the direct kernel
    // is 3-6x faster (5x5 conv1 of fig1 and cifar-towers at batch 128: 26.6 -> 4.6 ms and
    // 28.9 -> 8.9 ms)
    if winograd::applies(&g) && g.c >= MIN_WINOGRAD_CHANNELS {
        let kernels = match prepared {
            Some(p) => winograd::Kernels::Layer(p),
            None => winograd::Kernels::Fresh,
        };
        return Ok((winograd::forward(&g, x, w, b, conv.relu, kernels), shape));
    }
    #[cfg(target_arch = "x86_64")]
    if direct::available() {
        let packed = prepared.and_then(|p| p.kept_once_reused(&p.direct, || direct::pack_weights(&g, w)));
        return Ok((direct::forward(&g, x, w, packed.as_deref().map(Vec::as_slice), b, conv.relu), shape));
    }
    let group = images_per_gemm(g.n, g.ohw(), usize::MAX);
    let y = if group * g.ohw() >= PIXEL_MAJOR_ROWS {
        forward_pixel_major(&g, x, w, b, conv.relu, group)
    } else {
        forward_channel_major(&g, x, w, b, conv.relu)
    };
    Ok((y, shape))
}

/// The fewest input channels Winograd's algorithm is taken for (see [`forward`] and
/// [`weight_grad`]).
const MIN_WINOGRAD_CHANNELS: usize = 16;

/// `dW = Σ_n dY[n] ⋆ X[n]` for `o` filters of `k`x`k`: the direct form for strides above 1 and
/// for an image's 3 channels (as the forward; fig1's training step at batch 128 1141/1310 ->
/// 1493/1537 images/s, cifar-towers' 381/406 -> 464/446), Winograd's where it applies, else the
/// GEMM.
pub(super) fn weight_grad(
    conv: &Conv2d,
    (o, k): (usize, usize),
    (x, xl): (&[f32], &Layout),
    dy: &[f32],
) -> Result<(Vec<f32>, Shape)> {
    let (_, c, _, _) = crate::ops::nchw("conv2d weight grad", xl)?;
    let g = Geometry::new(conv, xl, &Layout::contiguous((o, c, k, k)))?;
    let shape = Shape::from((o, c, k, k));
    #[cfg(target_arch = "x86_64")]
    if direct::applies(&g) || (g.c < MIN_WINOGRAD_CHANNELS && direct::available()) {
        return Ok((direct::weight_grad(&g, x, dy), shape));
    }
    let dw = if winograd::applies(&g) { winograd::weight_grad(&g, x, dy) } else { weight_grad_gemm(&g, x, dy) };
    Ok((dw, shape))
}

/// `dX` for an input of `x_dims`: Winograd's forward of `dY` where the transposed convolution
/// allows it, else `col2im(Wᵀ · dY)`.
pub(super) fn input_grad(
    conv: &Conv2d,
    x_dims: (usize, usize, usize, usize),
    dy: &[f32],
    (w, wl): (&[f32], &Layout),
) -> Result<Vec<f32>> {
    let g = Geometry::new(conv, &Layout::contiguous(x_dims), wl)?;
    Ok(match g.transposed() {
        Some(t) if winograd::applies(&t) => input_grad_winograd(&g, &t, dy, w),
        _ => input_grad_col2im(&g, dy, w),
    })
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
        let (n, c, h, wd) = crate::ops::nchw("conv2d", x)?;
        let (o, wc, k, k2) = crate::ops::nchw("conv2d weight", w)?;
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

    /// Length of [`Geometry::pad_channels_last`]'s output.
    fn padded_len(&self) -> usize {
        (self.h + 2 * self.pad) * (self.w + 2 * self.pad) * self.c
    }

    /// The image zero-padded and channels last, `padded[r, col, ci] = x[ci, r - p, col - p]`
    /// (0 outside), so that one row of a patch (k pixels, every channel) is one contiguous run.
    /// The rows are spread over the cores when `spread`.
    fn pad_channels_last(&self, x: &[f32], padded: &mut [f32], spread: bool) {
        let (c, p, plane) = (self.c, self.pad, self.h * self.w);
        let row_len = (self.w + 2 * p) * c;
        for_each_chunk(padded, row_len, spread, |r, row| {
            if r < p || r >= p + self.h {
                return row.fill(0.0);
            }
            let y = r - p;
            row[..p * c].fill(0.0);
            row[(p + self.w) * c..].fill(0.0);
            transpose(c, self.w, &x[y * self.w..], plane, &mut row[p * c..], c);
        });
    }

    /// `patches[(oy, ox), (ky, kx, ci)] = padded[oy*s + ky, ox*s + kx, ci]` from the
    /// [`Geometry::pad_channels_last`] image: each output pixel's patch is k contiguous runs of
    /// `k * c` values. The output rows are spread over the cores when `spread`.
    fn patches(&self, padded: &[f32], patches: &mut [f32], spread: bool) {
        let (k, s, c, ckk) = (self.k, self.stride, self.c, self.ckk());
        let (run, row_len) = (k * c, (self.w + 2 * self.pad) * c);
        for_each_chunk(patches, self.ow * ckk, spread, |oy, rows| {
            for (ox, patch) in rows.chunks_mut(ckk).enumerate() {
                for (ky, dst) in patch.chunks_mut(run).enumerate() {
                    dst.copy_from_slice(&padded[(oy * s + ky) * row_len + ox * s * c..][..run]);
                }
            }
        });
    }

    /// The weights in the patches' order, `[o, ky, kx, ci]` from `[o, ci, ky, kx]`.
    fn channels_last_weights(&self, w: &[f32]) -> Vec<f32> {
        transpose_filters(w, self.c, self.k * self.k)
    }

    /// The inverse of [`Geometry::channels_last_weights`]: `[o, ci, ky, kx]` from `[o, ky, kx, ci]`.
    fn channels_first_weights(&self, w: &[f32]) -> Vec<f32> {
        transpose_filters(w, self.k * self.k, self.c)
    }

    /// For a stride-1 convolution, the one that maps `dY` to `dX`: the same kernel size over
    /// the output, `o` channels in and `c` out, padded by `k - 1 - pad` so that it gives back
    /// the input's size.
    fn transposed(&self) -> Option<Geometry> {
        (self.stride == 1 && self.pad < self.k).then_some(Geometry {
            c: self.o,
            h: self.oh,
            w: self.ow,
            o: self.c,
            oh: self.h,
            ow: self.w,
            pad: self.k - 1 - self.pad,
            ..*self
        })
    }

    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }

    fn ohw(&self) -> usize {
        self.oh * self.ow
    }

    /// Values per channel row of the split image: `stride` phases of `phase_len` values.
    fn phase_len(&self) -> usize {
        (self.w + 2 * self.pad).div_ceil(self.stride)
    }

    /// Length of [`Geometry::split`]'s output.
    fn split_len(&self) -> usize {
        self.c * (self.h + 2 * self.pad) * self.stride * self.phase_len()
    }

    /// The image zero-padded, each padded row cut into `stride` phases (the columns `q, q+s,
    /// q+2s, ...` for phase `q`): `split[ci, r, q, j] = x[ci, r - p, q + s*j - p]`, 0 outside.
    /// Every row of `cols` is then a set of contiguous copies: output column `ox` of kernel
    /// column `kx` reads padded column `ox*s + kx`, which is phase `kx % s`, index `ox + kx/s`.
    /// The rows are spread over the cores when `spread`.
    fn split(&self, x: &[f32], split: &mut [f32], spread: bool) {
        let (s, p, pl) = (self.stride, self.pad, self.phase_len());
        let padded_rows = self.h + 2 * p;
        let row_len = s * pl;
        // rows in chunks of about 16 KB: one a task was all overhead (a 13x13 layer's split of
        // 384 channels took 80-90 us on two cores)
        let chunk_rows = (SPLIT_CHUNK / row_len).max(1);
        for_each_chunk(split, chunk_rows * row_len, spread, |chunk, rows| {
            let first = chunk * chunk_rows;
            let (mut ci, mut r) = (first / padded_rows, first % padded_rows);
            for row in rows.chunks_mut(row_len) {
                self.split_row(x, ci, r, row);
                r += 1;
                if r == padded_rows {
                    (ci, r) = (ci + 1, 0);
                }
            }
        });
    }

    /// Row `r` of channel `ci` of [`Geometry::split`]'s output.
    fn split_row(&self, x: &[f32], ci: usize, r: usize, row: &mut [f32]) {
        let (s, p, pl) = (self.stride, self.pad, self.phase_len());
        if r < p || r >= p + self.h {
            return row.fill(0.0);
        }
        let src = &x[(ci * self.h + r - p) * self.w..][..self.w];
        if s == 1 {
            row[..p].fill(0.0);
            row[p..p + self.w].copy_from_slice(src);
            row[p + self.w..].fill(0.0);
            return;
        }
        // stride 4 (conv1) with AVX-512 or AVX2: the values j where every phase lies inside the
        // image (0 <= 4j - p, 4j + 3 - p < w), a vector of each phase at a time from four of the
        // row; value by value, conv1's split took 130 us an image, a fifth of the time beside
        // its kernel
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // set by the x86 kernels
        let mut together = 0..0;
        #[cfg(target_arch = "x86_64")]
        if s == 4 && crate::ops::Isa::avx2() {
            type Deinterleave = unsafe fn(&[f32], &mut [f32], usize, Range<usize>);
            let (lanes, deinterleave): (usize, Deinterleave) =
                if crate::ops::Isa::avx512() { (16, deinterleave4_avx512) } else { (8, deinterleave4_avx2) };
            let (from, to) = (p.div_ceil(4), ((self.w + p) / 4).min(pl));
            together = from..from + to.saturating_sub(from) / lanes * lanes;
            // SAFETY: the CPU has the function's level; the reads lie inside `src` and the
            // writes inside `row` (asserted inside).
            unsafe { deinterleave(&src[(4 * together.start).saturating_sub(p)..], row, pl, together.clone()) };
        }
        for (q, phase) in row.chunks_mut(pl).enumerate() {
            // phase q's values j in [first, end) are inside the image (q + s*j - p < w),
            // the rest padding: no test per value (conv1's split was 9% of its time)
            let first = p.saturating_sub(q).div_ceil(s);
            let end = (self.w + p).saturating_sub(q).div_ceil(s).min(pl);
            phase[..first].fill(0.0);
            phase[end.max(first)..].fill(0.0);
            let mut copy = |values: Range<usize>| {
                if values.start < values.end {
                    let columns = src[q + s * values.start - p..].iter().step_by(s);
                    phase[values].iter_mut().zip(columns).for_each(|(v, &x)| *v = x);
                }
            };
            if together.is_empty() {
                copy(first..end);
            } else {
                copy(first..together.start);
                copy(together.end..end);
            }
        }
    }

    /// `cols[(ci, ky, kx), (oy, ox)] = x[ci, oy*s + ky - p, ox*s + kx - p]` (0 outside), from
    /// the [`Geometry::split`] image.
    fn im2col(&self, split: &[f32], cols: &mut [f32]) {
        let (k, s, pl, ohw) = (self.k, self.stride, self.phase_len(), self.ohw());
        let padded_rows = self.h + 2 * self.pad;
        for (ci, channel) in split.chunks(padded_rows * s * pl).enumerate() {
            for ky in 0..k {
                for kx in 0..k {
                    let row = &mut cols[((ci * k + ky) * k + kx) * ohw..][..ohw];
                    let from = (kx % s) * pl + kx / s;
                    for (oy, out) in row.chunks_mut(self.ow).enumerate() {
                        out.copy_from_slice(&channel[(oy * s + ky) * s * pl + from..][..self.ow]);
                    }
                }
            }
        }
    }

    /// [`Geometry::split`] then [`Geometry::im2col`] of one image, a channel at a time, the
    /// channels spread over the cores when `spread` (a batch too small to give every core
    /// images of its own).
    fn columns(&self, image: &[f32], split: &mut [f32], cols: &mut [f32], spread: bool) {
        let one = Geometry { c: 1, ..*self };
        let rows = self.k * self.k * self.ohw(); // a channel's rows of `cols`
        let work = |((plane, split), cols): ((&[f32], &mut [f32]), &mut [f32])| {
            one.split(plane, split, false);
            one.im2col(split, cols);
        };
        let planes = self.h * self.w;
        if spread {
            let split = split.par_chunks_mut(one.split_len());
            image.par_chunks(planes).zip(split).zip(cols.par_chunks_mut(rows)).for_each(work);
        } else {
            image.chunks(planes).zip(split.chunks_mut(one.split_len())).zip(cols.chunks_mut(rows)).for_each(work);
        }
    }

    /// The adjoint of [`Geometry::im2col`]: adds each column entry back to its place in the
    /// split image (zeroed first), then [`Geometry::unsplit`] takes the image out of it.
    fn col2im(&self, cols: &[f32], split: &mut [f32], x: &mut [f32]) {
        add_columns(self, cols, split);
        self.unsplit(split, x);
    }

    /// The adjoint of [`Geometry::split`] restricted to the image: `x[ci, y, c] = split[ci,
    /// y + p, (c + p) % s, (c + p) / s]` (the padding's gradient is dropped).
    fn unsplit(&self, split: &[f32], x: &mut [f32]) {
        let (s, p, pl) = (self.stride, self.pad, self.phase_len());
        for (ci, channel) in x.chunks_mut(self.h * self.w).enumerate() {
            for (y, row) in channel.chunks_mut(self.w).enumerate() {
                let padded = &split[((ci * (self.h + 2 * p)) + y + p) * s * pl..][..s * pl];
                for (col, v) in row.iter_mut().enumerate() {
                    let c = col + p;
                    *v = padded[(c % s) * pl + c / s];
                }
            }
        }
    }
}

/// Each filter (`rows * cols` values of `w`) transposed.
fn transpose_filters(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for (filter, dst) in w.chunks(rows * cols).zip(out.chunks_mut(rows * cols)) {
        transpose(rows, cols, filter, cols, dst, rows);
    }
    out
}

crate::ops::cpu::simd::wide_fn! {
    /// The sums of [`Geometry::col2im`]: every entry of `cols` added to its place in `split`.
    fn add_columns(g: &Geometry, cols: &[f32], split: &mut [f32]) {
        let (k, s, pl, ohw) = (g.k, g.stride, g.phase_len(), g.ohw());
        split.fill(0.0);
        for (ci, channel) in split.chunks_mut((g.h + 2 * g.pad) * s * pl).enumerate() {
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((ci * k + ky) * k + kx) * ohw..][..ohw];
                    let from = (kx % s) * pl + kx / s;
                    for (oy, src) in row.chunks(g.ow).enumerate() {
                        let dst = &mut channel[(oy * s + ky) * s * pl + from..][..g.ow];
                        dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
                    }
                }
            }
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` on this thread's scratch buffer of `len` values (im2col columns and GEMM outputs),
/// reused from call to call instead of allocating and zeroing megabytes each time. Its contents
/// are stale: `f` must write before it reads. A nested call (rayon may run another task here
/// while this one waits) finds the buffer taken and gets a fresh one.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.take();
    if buf.len() < len {
        buf = vec![0f32; len];
    }
    let result = f(&mut buf[..len]);
    SCRATCH.set(buf);
    result
}

/// The forward by `P · Wᵀ`: the patches of `group` images one under the other, `P [m, ckk]`
/// in [`Geometry::patches`]' order, times the weights in the same order, gives `[m, o]`, which
/// [`channels_first`] turns into each image's output with the bias and ReLU.
fn forward_pixel_major(g: &Geometry, x: &[f32], w: &[f32], b: &[f32], relu: bool, group: usize) -> Vec<f32> {
    let (ckk, ohw, chw, o) = (g.ckk(), g.ohw(), g.c * g.h * g.w, g.o);
    let w = g.channels_last_weights(w);
    let par = parallelism(g.n.div_ceil(group));
    let spread = !matches!(par, Parallelism::None);
    let mut y = crate::ops::cpu::parallel::zeros(g.n * o * ohw);
    y.par_chunks_mut(group * o * ohw).zip(x.par_chunks(group * chw)).for_each(|(out, images)| {
        let m = images.len() / chw * ohw;
        with_scratch(g.padded_len() + m * ckk + m * o, |scratch| {
            let (padded, scratch) = scratch.split_at_mut(g.padded_len());
            let (patches, product) = scratch.split_at_mut(m * ckk);
            for (image, patches) in images.chunks(chw).zip(patches.chunks_mut(ohw * ckk)) {
                g.pad_channels_last(image, padded, spread);
                g.patches(padded, patches, spread);
            }
            matmul(m, o, ckk, product, false, (patches, ckk as isize, 1), (&w, 1, ckk as isize), par);
            for (y_image, product) in out.chunks_mut(o * ohw).zip(product.chunks(ohw * o)) {
                channels_first(product, b, relu, y_image, spread);
            }
        })
    });
    y
}

/// The forward by `W · cols`, an image at a time, written straight into its output: for maps
/// too small to fill [`PIXEL_MAJOR_ROWS`] (13x13 at batch 1-3), where this orientation of the
/// GEMM is faster.
fn forward_channel_major(g: &Geometry, x: &[f32], w: &[f32], b: &[f32], relu: bool) -> Vec<f32> {
    let (ckk, ohw, chw, o) = (g.ckk(), g.ohw(), g.c * g.h * g.w, g.o);
    let spread = !matches!(parallelism(g.n), Parallelism::None);
    let mut y = crate::ops::cpu::parallel::zeros(g.n * o * ohw);
    y.par_chunks_mut(o * ohw).zip(x.par_chunks(chw)).for_each(|(out, image)| {
        with_scratch(g.split_len() + ckk * ohw, |scratch| {
            let (split, cols) = scratch.split_at_mut(g.split_len());
            g.columns(image, split, cols, spread);
            let cols = &*cols;
            // a batch too small for the cores: each takes a share of the output channels, a GEMM
            // of its own (torchvision's conv3-5 at batch 1: 2.0 / 3.0 / 1.9 -> 1.5 / 2.1 / 1.5 ms
            // against one GEMM split by the `gemm` crate)
            for_each_plane_share(out, ohw, spread, |first, out| {
                let (w, b) = (&w[first * ckk..], &b[first..]);
                let rows = out.len() / ohw;
                for (plane, &bias) in out.chunks_mut(ohw).zip(b) {
                    plane.fill(bias);
                }
                matmul(rows, ohw, ckk, out, true, (w, ckk as isize, 1), (cols, ohw as isize, 1), Parallelism::None);
                if relu {
                    relu_in_place(out);
                }
            });
        })
    });
    y
}

/// One image's output from the GEMM's `[pixel, o]` product: `y[oc, p] = product[p, oc] +
/// b[oc]`, then the ReLU if `relu`; the channels spread over the cores when `spread`.
fn channels_first(product: &[f32], b: &[f32], relu: bool, y: &mut [f32], spread: bool) {
    let o = b.len();
    let ohw = y.len() / o;
    for_each_plane_share(y, ohw, spread, |first, y| {
        transpose(ohw, y.len() / ohw, &product[first..], o, y, ohw);
        for (plane, &bias) in y.chunks_mut(ohw).zip(&b[first..]) {
            add_bias(plane, bias);
            if relu {
                relu_in_place(plane);
            }
        }
    });
}

crate::ops::cpu::simd::wide_fn! {
    /// `plane += bias`.
    fn add_bias(plane: &mut [f32], bias: f32) {
        plane.iter_mut().for_each(|v| *v += bias);
    }
}

/// `f(first, planes)` for the planes of `y` (`plane` values each, output channels) all at
/// once, or a share of them for each core when `spread`; `first` is the share's first plane.
/// (Winograd's output transform, whose tasks read `M` a column of channels each, ran slower
/// in shares of a quarter: conv2 at batch 1 2.08 -> 2.27 ms; cf. `direct::TASKS_PER_CORE`.)
fn for_each_plane_share(y: &mut [f32], plane: usize, spread: bool, f: impl Fn(usize, &mut [f32]) + Sync) {
    let planes = y.len() / plane.max(1);
    let share = if spread { planes.div_ceil(rayon::current_num_threads()) } else { planes }.max(1);
    for_each_chunk(y, share * plane.max(1), spread, |part, planes| f(part * share, planes));
}

/// `f(scratch, task)` for each task in turn on this core with one `init()`, or spread over the
/// cores when `spread` (a batch too small to give every core images of its own: [`par_tasks`]).
///
/// [`par_tasks`]: crate::ops::cpu::parallel::par_tasks
fn for_each_task<T: Send, S>(
    tasks: impl IntoIterator<Item = T>,
    spread: bool,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, T) + Sync,
) {
    if spread {
        crate::ops::cpu::parallel::par_tasks(tasks, init, f);
    } else {
        let mut scratch = init();
        tasks.into_iter().for_each(|task| f(&mut scratch, task));
    }
}

/// `f(i, chunk)` for each `len`-value chunk of `data`, as [`for_each_task`] runs them.
fn for_each_chunk(data: &mut [f32], len: usize, spread: bool, f: impl Fn(usize, &mut [f32]) + Sync) {
    for_each_task(data.chunks_mut(len).enumerate(), spread, || (), |_, (i, chunk)| f(i, chunk));
}

/// Each of `parts` cut into pieces of `len` values, regrouped by piece: `result[j]` holds every
/// part's piece `j` (of `count`). A task over the same rows of many planes (or of many positions
/// ξ) then owns its slices, though together they are not one slice.
fn pieces_by_index<'a>(
    parts: impl Iterator<Item = &'a mut [f32]>,
    len: usize,
    count: usize,
) -> Vec<Vec<&'a mut [f32]>> {
    let mut by_index: Vec<Vec<&mut [f32]>> = (0..count).map(|_| Vec::new()).collect();
    for part in parts {
        part.chunks_mut(len).zip(&mut by_index).for_each(|(piece, group)| group.push(piece));
    }
    by_index
}

/// `row[q * pl + j] = src[4 (j - js.start) + q]` for the four phases `q` and `j` in `js` (a
/// multiple of 16 long): each 64 values of `src` deinterleaved in registers, 16 of each phase.
///
/// # Safety
/// The CPU must have the target feature this function is compiled for; the sizes it
/// reads and writes are asserted here or by its caller.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn deinterleave4_avx512(src: &[f32], row: &mut [f32], pl: usize, js: Range<usize>) {
    use std::arch::x86_64::*;
    assert!(js.len().is_multiple_of(16) && src.len() >= 4 * js.len() && row.len() >= 3 * pl + js.end);
    for (block, j) in js.step_by(16).enumerate() {
        let at = src.as_ptr().add(64 * block);
        let [a, b, c, d] = [0, 16, 32, 48].map(|i| _mm512_loadu_ps(at.add(i)));
        for q in 0..4 {
            // lane i < 8: value 4i + q of the pair of vectors (bit 4 picks the second)
            let index = _mm512_add_epi32(
                _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0),
                _mm512_set1_epi32(q as i32),
            );
            let (first, second) = (_mm512_permutex2var_ps(a, index, b), _mm512_permutex2var_ps(c, index, d));
            let phase = _mm512_shuffle_f32x4::<0x44>(first, second);
            _mm512_storeu_ps(row.as_mut_ptr().add(q * pl + j), phase);
        }
    }
}

/// [`deinterleave4_avx512`] with AVX2, 8 of each phase from each 32 values: a 4 x 4 transpose in
/// each 128-bit half leaves phase `q` of the groups of four 0, 2, 4, 6 in the low half of
/// `phases[q]` and of 1, 3, 5, 7 in its high half, which one permute puts in order.
///
/// # Safety
/// The CPU must have AVX2; the sizes are asserted here.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn deinterleave4_avx2(src: &[f32], row: &mut [f32], pl: usize, js: Range<usize>) {
    use std::arch::x86_64::*;
    assert!(js.len().is_multiple_of(8) && src.len() >= 4 * js.len() && row.len() >= 3 * pl + js.end);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (block, j) in js.step_by(8).enumerate() {
        let at = src.as_ptr().add(32 * block);
        let mut phases = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(at.add(i)));
        let mut scratch = [_mm256_setzero_ps(); 4];
        crate::ops::cpu::transpose::transpose_4x4_in_lanes!(
            phases,
            scratch,
            1,
            _mm256_unpacklo_ps,
            _mm256_unpackhi_ps,
            _mm256_shuffle_ps
        );
        for (q, phase) in phases.into_iter().enumerate() {
            _mm256_storeu_ps(row.as_mut_ptr().add(q * pl + j), _mm256_permutevar8x32_ps(phase, order));
        }
    }
}

/// Values of [`Geometry::split`]'s output per task.
const SPLIT_CHUNK: usize = 4096;

/// Images per partial weight gradient: fixed, so the summation order is too.
const CHUNK: usize = 8;

/// A weight gradient (`len` values) as the sum of partial sums over fixed chunks of [`CHUNK`]
/// of the `n` images: `f(images, spread, partial)` adds a chunk's share to its zeroed
/// `partial`; the chunks run on the cores and their partials are added in order, so the result
/// does not depend on how many threads ran it. `spread`: fewer chunks than cores, so `f` should
/// spread its own work.
fn sum_over_chunks(n: usize, len: usize, f: impl Fn(std::ops::Range<usize>, bool, &mut [f32]) + Sync) -> Vec<f32> {
    let chunks: Vec<usize> = (0..n.div_ceil(CHUNK)).collect();
    let spread = chunks.len() < rayon::current_num_threads();
    let partials: Vec<Vec<f32>> = chunks
        .par_iter()
        .map(|&chunk| {
            let mut partial = crate::ops::cpu::parallel::zeros(len);
            f(chunk * CHUNK..((chunk + 1) * CHUNK).min(n), spread, &mut partial);
            partial
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut sum = partials.next().unwrap_or_else(|| vec![0f32; len]); // no images: zero
    for partial in partials {
        sum.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
    }
    sum
}

/// Pixels (or Winograd tiles) a forward GEMM should have at least: below that, packing the
/// weights (once per GEMM) costs more than it should against the multiply-adds.
const GEMM_COLUMNS: usize = 1024;

/// Pixels per GEMM from which the forward is taken pixel-major ([`forward_pixel_major`]),
/// which the `gemm` crate runs faster (conv1's shape in isolation: 150-170 against 125 GFLOP/s
/// a core); below it (13x13 maps at batch 1-3) `W · cols` is (conv3 at batch 1: 1.3-1.5
/// against 2.3-2.8 ms).
const PIXEL_MAJOR_ROWS: usize = 512;

/// Images per forward GEMM: small maps (13x13 has 169 pixels, 49 Winograd tiles) share one
/// GEMM, so the weights are packed once per group instead of once per image; at most `most`
/// (a cache budget). The groups are evened out over the cores: as many groups as a multiple of
/// the cores, each as large as the others. (Capped after evening out, conv5's Winograd groups
/// of 5 split a batch of 16 into 5 + 5 + 5 + 1 images; in groups of 4 its forward took 11.4 ->
/// 9.8 ms, medians of 5 alternated runs.)
fn images_per_gemm(n: usize, ohw: usize, most: usize) -> usize {
    let threads = rayon::current_num_threads();
    let tasks = n.div_ceil(GEMM_COLUMNS.div_ceil(ohw)).max(n.div_ceil(most)).next_multiple_of(threads).min(n).max(1);
    let mut group = n.div_ceil(tasks).max(1); // at least 1: an empty batch still needs a chunk size
    while group > 1 && !n.div_ceil(group).is_multiple_of(threads) {
        group -= 1; // 64 images in groups of 5 are 13 groups; in groups of 4, 16
    }
    group
}

fn parallelism(images: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if images >= threads {
        Parallelism::None // the images are spread over the threads instead
    } else {
        Parallelism::Rayon(threads)
    }
}

/// `dW = Σ_n dY[n] · P(X[n])`, [`sum_over_chunks`].
fn weight_grad_gemm(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (c, o) = (g.c, g.o);
    let (ckk, ohw) = (g.ckk(), g.ohw());
    let dw = sum_over_chunks(g.n, o * ckk, |images, spread, acc| {
        with_scratch(g.padded_len() + ohw * ckk, |scratch| {
            let (padded, patches) = scratch.split_at_mut(g.padded_len());
            let par = if spread { Parallelism::Rayon(rayon::current_num_threads()) } else { Parallelism::None };
            for i in images {
                g.pad_channels_last(&x[i * c * g.h * g.w..(i + 1) * c * g.h * g.w], padded, spread);
                g.patches(padded, patches, spread);
                let dyi = &dy[i * o * ohw..(i + 1) * o * ohw];
                // acc[o, ckk] += dY[o, ohw] · P[ohw, ckk], both row-major (conv1's shapes: 127
                // against 106 GFLOP/s a core with the channel-major columns)
                matmul(o, ckk, ohw, acc, true, (dyi, ohw as isize, 1), (patches, ckk as isize, 1), par);
            }
        })
    });
    g.channels_first_weights(&dw)
}

/// `dX = col2im(Wᵀ · dY)`, an image at a time.
fn input_grad_col2im(g: &Geometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let (ckk, ohw, o) = (g.ckk(), g.ohw(), g.o);
    let par = parallelism(g.n);
    let mut dx = crate::ops::cpu::parallel::zeros(g.n * g.c * g.h * g.w);
    dx.par_chunks_mut(g.c * g.h * g.w).zip(dy.par_chunks(o * ohw)).for_each(|(dxi, dyi)| {
        with_scratch(g.split_len() + ckk * ohw, |scratch| {
            let (split, cols) = scratch.split_at_mut(g.split_len());
            // cols[ckk, ohw] = Wᵀ[ckk, o] · dY[o, ohw] (overwritten, not accumulated)
            matmul(ckk, ohw, o, cols, false, (w, 1, ckk as isize), (dyi, ohw as isize, 1), par);
            g.col2im(cols, split, dxi);
        })
    });
    dx
}

/// `dX` as the convolution `t` ([`Geometry::transposed`]) of `dY` with each filter turned
/// half a turn and its channels swapped, `w'[ci, o, ky, kx] = w[o, ci, k-1-ky, k-1-kx]`, by
/// Winograd's forward (conv2-5 while training: 2.25 and 2.6 times fewer multiply-adds than
/// the GEMM).
fn input_grad_winograd(g: &Geometry, t: &Geometry, dy: &[f32], w: &[f32]) -> Vec<f32> {
    let kk = g.k * g.k;
    let mut turned = vec![0f32; w.len()];
    for (oc, filters) in w.chunks(g.ckk()).enumerate() {
        for (ci, filter) in filters.chunks(kk).enumerate() {
            let dst = &mut turned[(ci * g.o + oc) * kk..][..kk];
            dst.iter_mut().zip(filter.iter().rev()).for_each(|(d, &v)| *d = v);
        }
    }
    winograd::forward(t, dy, &turned, &vec![0f32; g.c], false, winograd::Kernels::Fresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes of a convolution of `n` `c`x`h`x`w` images by `o` `k`x`k` filters.
    #[allow(clippy::too_many_arguments)]
    fn geometry(n: usize, c: usize, h: usize, w: usize, o: usize, k: usize, stride: usize, pad: usize) -> Geometry {
        let op = Conv2d { stride, padding: pad, relu: false };
        Geometry::new(&op, &Layout::contiguous((n, c, h, w)), &Layout::contiguous((o, c, k, k))).unwrap()
    }

    /// `len` values in [-1, 1] from a pattern (`seed` makes each operand's own).
    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0 - 1.0).collect()
    }

    /// The largest difference from `want`, relative to `want`'s largest value: sums of up to
    /// 363 products in different orders differ by rounding, relative to their sizes.
    fn relative_difference(got: &[f32], want: &[f32]) -> f32 {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale
    }

    /// A convolution's `(n, c, h, w, o, k, stride, pad)`.
    type Sizes = (usize, usize, usize, usize, usize, usize, usize, usize);

    /// The convolutions the paths are compared on: 3x3 and 5x5 at stride 1 with padding 1, 0
    /// and 2 and partial Winograd tiles, strided 11x11 and 3x3; one, two and three vectors of
    /// output channels (the direct form's blocks) and counts off the 16 lanes; single images,
    /// batches that fill a chunk of images spread over the cores and batches of several chunks.
    const SHAPES: [Sizes; 21] = [
        (3, 5, 13, 13, 16, 3, 1, 1),
        (2, 3, 16, 15, 32, 5, 1, 2), // an image's 3 channels at stride 1: the direct form's
        (4, 6, 10, 9, 17, 3, 1, 0),
        (5, 4, 9, 9, 20, 5, 1, 2),
        (2, 20, 9, 11, 8, 3, 1, 1),
        (2, 48, 14, 13, 24, 5, 1, 2),
        (3, 17, 8, 10, 5, 5, 1, 0),
        (3, 20, 9, 11, 8, 3, 1, 1),
        (2, 5, 10, 9, 17, 3, 1, 0),
        (1, 16, 13, 13, 16, 3, 1, 1),
        (11, 16, 13, 13, 16, 3, 1, 1),
        (2, 24, 14, 13, 48, 5, 1, 2),
        (1, 6, 9, 8, 5, 5, 1, 0),
        (9, 6, 9, 8, 5, 5, 1, 0),
        (2, 3, 35, 31, 7, 11, 4, 2),
        (1, 3, 35, 31, 7, 11, 4, 2),
        (9, 3, 35, 31, 48, 11, 4, 2),
        (3, 8, 21, 41, 10, 3, 2, 1),
        (3, 8, 21, 41, 40, 3, 2, 1),
        (1, 3, 27, 27, 64, 11, 4, 2),
        (1, 3, 15, 150, 16, 11, 4, 2), // rows wide enough for the split's 16 values at a time
    ];

    /// Every forward path (pixel-major at every grouping, spread over the cores or not;
    /// channel-major; Winograd; direct) gives the same numbers; the PyTorch fixtures pin one of
    /// them per shape (tests/ops.rs, tests/model.rs).
    #[test]
    fn forward_paths_agree() {
        for (n, c, h, w, o, k, stride, pad) in SHAPES {
            let g = geometry(n, c, h, w, o, k, stride, pad);
            let (x, wt, b) = (values(n * c * h * w, 1), values(o * c * k * k, 2), values(o, 3));
            for relu in [false, true] {
                let want = forward_channel_major(&g, &x, &wt, &b, relu);
                let mut got: Vec<(String, Vec<f32>)> = (1..=n)
                    .map(|group| {
                        (format!("pixel-major, {group} a GEMM"), forward_pixel_major(&g, &x, &wt, &b, relu, group))
                    })
                    .collect();
                if matches!(k, 3 | 5) && stride == 1 {
                    got.push(("winograd".into(), winograd::forward(&g, &x, &wt, &b, relu, winograd::Kernels::Fresh)));
                }
                #[cfg(target_arch = "x86_64")]
                if direct::available() {
                    got.push(("direct".into(), direct::forward(&g, &x, &wt, None, &b, relu)));
                }
                for (path, y) in got {
                    let worst = relative_difference(&y, &want);
                    assert!(worst < 4e-6, "{path}, {n}x{c}x{h}x{w} * {o}x{k}x{k}, relu {relu}: differs by {worst:e}");
                }
            }
        }
    }

    /// Weights made ready once and kept in a layer's state ([`Prepared`]) give the same bits as
    /// weights packed or transformed on every call, for every path that takes them.
    #[test]
    fn prepared_weights_give_the_same_bits() {
        for (n, c, h, w, o, k, stride, pad) in SHAPES {
            let g = geometry(n, c, h, w, o, k, stride, pad);
            let (x, wt, b) = (values(n * c * h * w, 1), values(o * c * k * k, 2), values(o, 3));
            if winograd::applies(&g) {
                let (fresh, state) =
                    (winograd::forward(&g, &x, &wt, &b, true, winograd::Kernels::Fresh), Prepared::default());
                for pass in ["first", "second"] {
                    let prepared = winograd::forward(&g, &x, &wt, &b, true, winograd::Kernels::Layer(&state));
                    assert!(prepared == fresh, "winograd, {n}x{c}x{h}x{w} * {o}x{k}x{k}, {pass} pass");
                }
            }
            #[cfg(target_arch = "x86_64")]
            if direct::available() {
                let packed = direct::pack_weights(&g, &wt);
                let prepared = direct::forward(&g, &x, &wt, Some(&packed), &b, true);
                assert!(
                    prepared == direct::forward(&g, &x, &wt, None, &b, true),
                    "direct, {n}x{c}x{h}x{w} * {o}x{k}x{k}"
                );
            }
        }
    }

    /// The direct kernels give the same bits at every level this CPU has (each output summed
    /// in one lane, in the same order, whatever the vectors' width and the register blocks):
    /// the forward with and without the ReLU and with packed weights, and the weight gradient
    /// (which strides above 1 and an image's 3 channels take; here every shape's). On
    /// [`SHAPES`] and a few more with channel counts off 8 and 16:
    /// conv1's 11x11 at stride 4, and 3x3 on 13x13 maps at stride 1.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn direct_levels_give_the_same_bits() {
        let levels: Vec<direct::Level> = direct::Level::ALL.into_iter().filter(|l| l.on_this_cpu()).collect();
        let more: [Sizes; 5] = [
            (2, 3, 67, 59, 37, 11, 4, 2),
            (1, 3, 51, 51, 96, 11, 4, 2),
            (1, 19, 13, 13, 45, 3, 1, 1),
            (3, 13, 13, 13, 71, 3, 1, 1),
            (4, 5, 17, 19, 23, 5, 2, 2),
        ];
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
        for (n, c, h, w, o, k, stride, pad) in SHAPES.into_iter().chain(more) {
            let g = geometry(n, c, h, w, o, k, stride, pad);
            let (x, wt, b) = (values(n * c * h * w, 11), values(o * c * k * k, 12), values(o, 13));
            let dy = values(n * o * g.ohw(), 14);
            let shape = format!("{n}x{c}x{h}x{w} * {o}x{k}x{k}, stride {stride}");
            let at = |level: direct::Level| {
                let packed = direct::pack_weights_at(level, &g, &wt);
                vec![
                    bits(direct::forward_at(level, &g, &x, &wt, None, &b, false)),
                    bits(direct::forward_at(level, &g, &x, &wt, None, &b, true)),
                    bits(direct::forward_at(level, &g, &x, &wt, Some(&packed), &b, true)),
                    bits(direct::weight_grad_at(level, &g, &x, &dy)),
                ]
            };
            let want = at(levels[0]);
            for &level in &levels[1..] {
                for (what, (got, want)) in ["forward", "forward, relu", "forward, packed", "weight grad"]
                    .into_iter()
                    .zip(at(level).iter().zip(&want))
                {
                    assert!(got == want, "{what} at {level:?} against {:?}: {shape}", levels[0]);
                }
            }
        }
    }

    /// A layer's kept Winograd kernels give what fresh ones give, and follow its weights when
    /// they change in place (as SGD changes them, telling the state) or to one bit.
    #[test]
    fn kept_winograd_kernels_follow_the_weights() {
        let state = Prepared::default();
        let g = geometry(4, 6, 13, 13, 8, 3, 1, 1);
        let (x, b) = (values(4 * 6 * 13 * 13, 8), values(8, 9));
        let mut wt = values(8 * 6 * 9, 10);
        // unchanged, a step, the last bit, the sign, unchanged
        for (step, flip) in [0u32, 0, 1, 1 << 31, 0].into_iter().enumerate() {
            if step == 1 {
                wt[17] += 0.5;
            }
            wt[17] = f32::from_bits(wt[17].to_bits() ^ flip);
            if step > 0 {
                state.weights_changed();
            }
            let kept = winograd::forward(&g, &x, &wt, &b, true, winograd::Kernels::Layer(&state));
            let fresh = winograd::forward(&g, &x, &wt, &b, true, winograd::Kernels::Fresh);
            assert_eq!(kept, fresh, "step {step}");
        }
    }

    /// The gradients' fast paths against the GEMM forms: for stride 1, both by Winograd (the
    /// input gradient, `dX` as a convolution of `dY`, against `col2im(Wᵀ · dY)`, the weight
    /// gradient against `Σ dY · P(X)`); the direct weight gradient (blocks of 16, 12 and 8 taps,
    /// the last partly unused), which strides above 1 and an image's 3 channels take, against
    /// `Σ dY · P(X)` at every shape.
    #[test]
    fn gradient_paths_agree() {
        for (n, c, h, w, o, k, stride, pad) in SHAPES {
            let g = geometry(n, c, h, w, o, k, stride, pad);
            let (x, dy, wt) = (values(n * c * h * w, 6), values(n * o * g.ohw(), 4), values(o * c * k * k, 5));
            let mut paths = vec![];
            if stride == 1 {
                let t = g.transposed().unwrap();
                paths.push(("input", input_grad_col2im(&g, &dy, &wt), input_grad_winograd(&g, &t, &dy, &wt)));
                paths.push(("weight", weight_grad_gemm(&g, &x, &dy), winograd::weight_grad(&g, &x, &dy)));
            }
            #[cfg(target_arch = "x86_64")]
            if direct::available() {
                paths.push(("direct weight", weight_grad_gemm(&g, &x, &dy), direct::weight_grad(&g, &x, &dy)));
            }
            for (what, want, got) in paths {
                let worst = relative_difference(&got, &want);
                let shape = format!("{n}x{c}x{h}x{w}, {o} {k}x{k} filters, stride {stride}, pad {pad}");
                assert!(worst < 4e-6, "{what}: {shape}: differs by {worst:e}");
            }
        }
    }
}
