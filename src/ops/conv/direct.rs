//! Direct convolution with AVX-512, no patch matrix: the strided layer (conv1), and the
//! stride-1 layers Winograd leaves (13x13 maps at batch 1-7). A register block holds `V`
//! vectors of 16 output channels at `P` output pixels side by side in a row; each step of the
//! kernel loads the `V` weight vectors of one `(ci, ky, kx)` and broadcasts the `P` pixels'
//! input values against them, from the [`Geometry::split`] image, where those values lie side
//! by side too (one address and constant offsets: no pointer per pixel). A row is cut into
//! pieces of at most [`PIECE`] pixels, as even as can be. The sums, with the bias and ReLU, are
//! stored channels-last for a few rows, then transposed into the NCHW planes. The images go
//! over the cores; a single image is cut into tasks of a block of channels and a band of rows
//! ([`TASKS_PER_CORE`]). The weight gradient ([`weight_grad`]) is the same loop turned round:
//! taps in place of pixels.
//!
//! Each output is summed in `(ci, ky, kx)` order from zero and the bias added last, whatever
//! the block's shape: the same bits as the first direct kernel (below) gave.
//!
//! Against the pixel-major GEMM, the first direct kernel (pixels in the vectors, weights
//! broadcast) took torchvision's conv1 at batch 1 from 1.7-2.4 to 1.1-1.8 ms and at batch 64
//! from 73-83 to 64-75 ms. Channels in the vectors (loads that never cross a cache line) took
//! it a further 5-10% (conv1 alone, fastest of alternated runs: batch 1 0.72 -> 0.67 ms, batch
//! 16 10.0-10.3 -> 9.0-9.6 ms; paper's 48 channels at batch 32 16.2-20.2 -> 13.4-17.9 ms),
//! with the same sums. Blocks along rows read the image from one address, where a block of
//! pixels anywhere in the map needed a pointer per pixel, recomputed for every kernel row: for
//! 3x3 kernels that overhead kept the direct form behind the GEMM (conv4 at batch 1: 1.5-1.8
//! against 1.3-1.4 ms); along rows, with each block's weights packed side by side and the
//! input channels taken a run at a time (their weights stay in L1), torchvision's conv3-5 at
//! batch 1 take 1.40 / 2.06 / 1.24 -> 1.39 / 1.84 / 1.21 ms (medians of 6 alternated runs on a
//! loaded machine), and its forward at batch 1 52.0 -> 56.0 images/s (8 alternated runs).
//! conv1 stays level (same bits).

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::relu_lanes;
use super::super::transpose::transpose;
use super::{for_each_chunk, for_each_task, pieces_by_index, sum_over_chunks, with_scratch, Geometry};
use rayon::prelude::*;

const LANES: usize = 16;
/// The least common multiple of the weight gradient's register blocks' tap counts (16, 12, 8).
const BLOCK_LCM: usize = 48;
/// Pixels (whole output rows, at least one) the forward stages channels-last before they are
/// transposed into the planes.
const STAGED_PIXELS: usize = 240;

/// Tasks per core that the forward cuts an image into (a batch too small to give every core
/// images of its own): the two cores of this machine run at unequal speeds when other tenants'
/// work shares one, and the faster then takes the slower's tasks. With a share for each core
/// the layer waited on the slower: torchvision's conv3-5 at batch 1, medians of 100 passes
/// alternated in one process, 1.50 / 1.94 / 1.27 -> 1.38 / 1.67 / 1.14 ms.
const TASKS_PER_CORE: usize = 4;

/// Whether the kernels can run here (AVX-512): the forward then takes every convolution that
/// Winograd does not (conv1, and 13x13 maps at batch 1-7).
pub(super) fn available() -> bool {
    crate::ops::Isa::avx512()
}

/// Whether the direct weight gradient takes this convolution: a stride above 1, and AVX-512.
pub(super) fn applies(g: &Geometry) -> bool {
    g.stride > 1 && available()
}

/// The plain zero-padded image the weight gradient reads, `[c, h + 2p, w + 2p]`: the split of
/// the layer at stride 1 (no phases). With its row and plane lengths.
fn padded_image(g: &Geometry) -> (Geometry, usize, usize) {
    let row_len = g.w + 2 * g.pad;
    (Geometry { stride: 1, ..*g }, row_len, (g.h + 2 * g.pad) * row_len)
}

/// `relu?(conv(x, w) + b)` for a batch, NCHW in and out, from the [`Geometry::split`] image
/// (for stride 1 the zero-padded image), with the weights `w` as [`pack_weights`] packs them
/// if `packed` has them.
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], packed: Option<&[f32]>, b: &[f32], relu: bool) -> Vec<f32> {
    let (ckk, ohw, chw) = (g.ckk(), g.ohw(), g.c * g.h * g.w);
    let vectors = g.o.div_ceil(LANES);
    // images over the cores, the weights packed once for all of them; a batch too small for
    // that cuts each image into tasks (below), and unless the weights come packed each task
    // packs its block just before it runs it (its one read of them), so that they stay in L2
    let spread = g.n < rayon::current_num_threads();
    let packed_here;
    let packed = match packed {
        None if !spread => {
            packed_here = pack_weights(g, w);
            Some(packed_here.as_slice())
        }
        packed => packed,
    };
    let mut bias = b.to_vec();
    bias.resize(vectors * LANES, 0.0);
    let kernel = Kernel::new(g, relu);
    let rows = (STAGED_PIXELS / g.ow).clamp(1, g.oh); // output rows staged at a time
    let stage_len = rows * g.ow * 3 * LANES;
    // a task's sums, a stage of rows at a time (`stage[pixel, v * 16 + lane]`), into its planes
    let run = |image: &[f32], weights: &[f32], task: Task, stage: &mut [f32], turned: &mut [f32]| {
        let Task { first, v, rows: oys, mut planes } = task;
        for oy in oys.clone().step_by(rows) {
            let stage_rows = oy..(oy + rows).min(oys.end);
            let pixels = stage_rows.len() * g.ow;
            let stage = &mut stage[..pixels * v * LANES];
            let bias = &bias[first * LANES..][..v * LANES];
            // SAFETY: AVX-512F is present (`available`); `run` checks its reads.
            unsafe { kernel.run(v, image, stage_rows, weights, bias, stage) };
            match &mut planes {
                Planes::Whole(planes) => {
                    transpose(pixels, planes.len() / ohw, stage, v * LANES, &mut planes[oy * g.ow..], ohw)
                }
                Planes::Band(planes) => {
                    // turned channels-first here, then copied into each channel's band
                    transpose(pixels, planes.len(), stage, v * LANES, turned, pixels);
                    for (plane, channel) in planes.iter_mut().zip(turned.chunks(pixels)) {
                        plane[(oy - oys.start) * g.ow..][..pixels].copy_from_slice(channel);
                    }
                }
            }
        }
    };
    let mut y = super::super::zeros(g.n * g.o * ohw);
    for_each_chunk(&mut y, g.o * ohw, !spread, |i, y| {
        with_scratch(g.split_len(), |image| {
            g.split(&x[i * chw..][..chw], image, spread);
            let image = &*image;
            let blocks = vector_blocks(y, vectors, |v| v * LANES * ohw);
            // a batch that fills the cores: one task a block, on this core. Else tasks of a block
            // and a band of its rows, `TASKS_PER_CORE` for each core; a band no narrower than a
            // stage of rows (13x13 maps: whole blocks), where each band packs its block's weights
            // again (the paper's conv3-5 at batch 1, 4 alternated runs: 2.08 / 1.50 / 1.06 ->
            // 1.90 / 1.42 / 1.01 ms)
            let wanted =
                if spread { (TASKS_PER_CORE * rayon::current_num_threads()).div_ceil(blocks.len()) } else { 1 };
            let band_rows = g.oh.div_ceil(wanted).max(rows);
            let bands = g.oh.div_ceil(band_rows);
            let tasks: Vec<Task> = blocks
                .into_iter()
                .flat_map(|(first, v, planes)| {
                    if bands == 1 {
                        return vec![Task { first, v, rows: 0..g.oh, planes: Planes::Whole(planes) }];
                    }
                    let band_at = |band: usize| band * band_rows..((band + 1) * band_rows).min(g.oh);
                    let by_band = pieces_by_index(planes.chunks_mut(ohw), band_rows * g.ow, bands);
                    let tasks = by_band.into_iter().enumerate();
                    tasks
                        .map(|(band, planes)| Task { first, v, rows: band_at(band), planes: Planes::Band(planes) })
                        .collect()
                })
                .collect();
            let scratch = || (vec![0f32; stage_len], vec![0f32; stage_len], Vec::new());
            let pack_and_run = |(stage, turned, weights): &mut (Vec<f32>, Vec<f32>, Vec<f32>), task: Task| {
                if let Some(packed) = packed {
                    let weights = &packed[task.first * LANES * ckk..][..task.v * LANES * ckk];
                    return run(image, weights, task, stage, turned);
                }
                weights.clear();
                weights.resize(task.v * LANES * ckk, 0.0);
                pack_block(g, w, task.first, task.v, weights);
                run(image, weights, task, stage, turned);
            };
            for_each_task(tasks, spread, scratch, pack_and_run);
        })
    });
    y
}

/// A piece of the forward's work: the block of `v` channel vectors from vector `first`, at the
/// output rows `rows`, its sums going to `planes`.
struct Task<'a> {
    first: usize,
    v: usize,
    rows: Range<usize>,
    planes: Planes<'a>,
}

/// Where a [`Task`]'s sums go: its channels' planes whole (one slice, `[channel, pixel]`), or
/// the band of rows of each (a slice each: a band is not one slice of the output).
enum Planes<'a> {
    Whole(&'a mut [f32]),
    Band(Vec<&'a mut [f32]>),
}

/// `dW[o, ci, ky, kx] = Σ_n Σ_pixels dY[n, o, pixel] · x[n, ci, window(pixel) + (ky, kx)]` for
/// a batch, in [`sum_over_chunks`]' fixed order: a register block holds `V` vectors of 16
/// output channels at `E` taps `(ci, ky, kx)`, and each pixel loads its `V` vectors of the
/// output gradient (turned channels-last) and broadcasts the `E` taps' inputs against them.
/// The GEMM form built 4.4 MB of patches an image for conv1, which the GEMM then packed again
/// (conv1's backward alone at batch 32, its weight and bias gradients and the ReLU mask, 5
/// alternated runs: median 62 -> 53 ms, fastest 50 -> 42 ms).
pub(super) fn weight_grad(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (ckk, ohw, chw) = (g.ckk(), g.ohw(), g.c * g.h * g.w);
    let vectors = g.o.div_ceil(LANES);
    let o_padded = vectors * LANES;
    let (padded, row_len, plane_len) = padded_image(g);
    // each tap's place relative to a window's start; a last block's unused taps repeat the last
    let taps_len = ckk.next_multiple_of(BLOCK_LCM);
    let taps: Vec<usize> = (0..taps_len)
        .map(|e| e.min(ckk - 1))
        .map(|e| (e / (g.k * g.k)) * plane_len + (e % (g.k * g.k) / g.k) * row_len + e % g.k)
        .collect();
    let kernel = TapKernel { taps: &taps, ckk, oh: g.oh, ow: g.ow, stride: g.stride, row_len };
    // sums[vector, tap, lane]
    let sums = sum_over_chunks(g.n, vectors * taps_len * LANES, |images, spread, sums| {
        // each vector block's sums, spread over the cores when the chunks are too few
        let mut parts = vector_blocks(sums, vectors, |v| v * taps_len * LANES);
        with_scratch(padded.split_len() + ohw * o_padded, |scratch| {
            let (image, dy_t) = scratch.split_at_mut(padded.split_len());
            for i in images {
                padded.split(&x[i * chw..][..chw], image, spread);
                // each block's channels turned channels-last on their own, `[pixel, v * 16]`, so
                // that its pass reads one unbroken stream
                let dy_i = &dy[i * g.o * ohw..][..g.o * ohw];
                for &(first, v, _) in &parts {
                    let channels = (v * LANES).min(g.o - first * LANES);
                    let block = &mut dy_t[first * LANES * ohw..][..v * LANES * ohw];
                    transpose(channels, ohw, &dy_i[first * LANES * ohw..], ohw, block, v * LANES);
                }
                let (image, dy_t) = (&*image, &*dy_t);
                let work = |(first, v, part): &mut (usize, usize, &mut [f32])| {
                    let block = &dy_t[*first * LANES * ohw..][..*v * LANES * ohw];
                    // SAFETY: AVX-512F is present (`applies`); `run` checks its reads.
                    unsafe { kernel.run(*v, image, block, part) }
                };
                if spread {
                    parts.par_iter_mut().for_each(work);
                } else {
                    parts.iter_mut().for_each(work);
                }
            }
        })
    });
    let mut dw = vec![0f32; g.o * ckk];
    for (v, sums) in sums.chunks(taps_len * LANES).enumerate() {
        let lanes = LANES.min(g.o - v * LANES);
        transpose(ckk, lanes, sums, LANES, &mut dw[v * LANES * ckk..], ckk);
    }
    dw
}

/// The channel vectors of each register block, for `vectors` of them: pairs, and an odd one
/// joins the last pair (measured with the first kernels, 2 x 12 and 3 x 8 pixels: conv1 of 96
/// channels at batch 16: 14.4-14.8 ms, against 15.2-15.8 as 4 + 4 + 2 vectors; of 48 at batch
/// 32: 13.8-14.7, against 16.5-17.7 as 2 + 1).
fn block_vectors(vectors: usize) -> impl Iterator<Item = usize> {
    let pairs = vectors / 2;
    (0..pairs.max(1)).map(move |i| if i + 1 == pairs.max(1) { vectors - 2 * i } else { 2 })
}

/// `data` cut into the blocks of [`block_vectors`] for `vectors` channel vectors, `len(v)` values
/// for a block of `v` (the last no longer than what is left): `(first vector, v, block)`.
fn vector_blocks(data: &mut [f32], vectors: usize, len: impl Fn(usize) -> usize) -> Vec<(usize, usize, &mut [f32])> {
    let (mut rest, mut first) = (data, 0);
    let mut blocks = Vec::new();
    for v in block_vectors(vectors) {
        let size = len(v).min(rest.len());
        let (block, after) = std::mem::take(&mut rest).split_at_mut(size);
        blocks.push((first, v, block));
        (rest, first) = (after, first + v);
    }
    blocks
}

/// The weights as the register blocks of [`forward`] read them, for all its blocks (the
/// channel vectors cut by [`block_vectors`]): the block of `v` vectors from vector `first` at
/// `first * 16 * ckk`, as [`pack_block`] packs it.
pub(super) fn pack_weights(g: &Geometry, w: &[f32]) -> Vec<f32> {
    let ckk = g.ckk();
    let mut packed = vec![0f32; g.o.div_ceil(LANES) * LANES * ckk];
    let blocks = vector_blocks(&mut packed, g.o.div_ceil(LANES), |v| v * LANES * ckk);
    blocks.into_par_iter().for_each(|(first, v, block)| pack_block(g, w, first, v, block));
    packed
}

/// Into the zeroed `block`, the weights of the block of `v` channel vectors from vector `first`,
/// `[(ci, ky, kx), v * 16]` (0 past the last channel), so that the block's steps read one
/// unbroken stream.
fn pack_block(g: &Geometry, w: &[f32], first: usize, v: usize, block: &mut [f32]) {
    let channels = (v * LANES).min(g.o - first * LANES);
    transpose(channels, g.ckk(), &w[first * LANES * g.ckk()..], g.ckk(), block, v * LANES);
}

/// What [`forward`]'s register blocks need to know of a layer.
struct Kernel {
    c: usize,
    /// Where each tap `(ci, ky, kx)`'s input lies from a window's start in the split image: a
    /// block's pixels, side by side in an output row, then read side by side too.
    taps: Vec<usize>,
    /// Values of the split image per output row.
    row_step: usize,
    ow: usize,
    relu: bool,
}

/// The widest piece of a row a register block of `V` channel vectors takes: `V x P`
/// accumulators, `V` weight vectors and one broadcast in the 32 registers.
const PIECE: [usize; 3] = [16, 14, 9];

impl Kernel {
    fn new(g: &Geometry, relu: bool) -> Self {
        let (s, pl) = (g.stride, g.phase_len());
        let (row, plane) = (s * pl, (g.h + 2 * g.pad) * s * pl);
        // padded column `ox * s + kx` is phase `kx % s`, index `ox + kx / s` (`Geometry::split`)
        // a channel's taps, then the same shifted by a plane per channel (no division per
        // tap: for conv4's 3456 taps those took 15-20 us a call)
        let channel: Vec<usize> =
            (0..g.k).flat_map(|ky| (0..g.k).map(move |kx| ky * row + (kx % s) * pl + kx / s)).collect();
        let taps = (0..g.c).flat_map(|ci| channel.iter().map(move |t| ci * plane + t)).collect();
        Kernel { c: g.c, taps, row_step: s * row, ow: g.ow, relu }
    }

    /// `stage[p, v * 16 + lane]` for a block of `vectors` channel vectors (`weights` and `bias`
    /// its own, [`pack_weights`]) at the pixels of the output rows `oys`, with the bias and ReLU.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(
        &self,
        vectors: usize,
        image: &[f32],
        oys: Range<usize>,
        weights: &[f32],
        bias: &[f32],
        stage: &mut [f32],
    ) {
        let furthest = (oys.end.max(1) - 1) * self.row_step + self.ow - 1 + self.taps.iter().max().unwrap_or(&0);
        assert!((1..=3).contains(&vectors) && furthest < image.len() && bias.len() == vectors * LANES);
        assert!(
            weights.len() == self.taps.len() * vectors * LANES && stage.len() >= oys.len() * self.ow * vectors * LANES
        );
        // each output row in pieces as even as can be, of two widths at most
        let pieces = self.ow.div_ceil(PIECE[vectors - 1]);
        let (wide, narrow) = (self.ow.div_ceil(pieces), self.ow / pieces);
        let wide_count = self.ow - narrow * pieces;
        let starts: Vec<usize> = (0..pieces).map(|i| i * narrow + i.min(wide_count)).collect();
        let (wide_starts, narrow_starts) = starts.split_at(wide_count);
        macro_rules! dispatch {
            ($width:expr, $starts:expr, $v:literal, [$($p:literal)*]) => {
                match $width {
                    $($p => self.pieces::<$v, $p>(image, oys.clone(), $starts, weights, bias, stage),)*
                    _ => unreachable!("pieces are at most PIECE wide"),
                }
            };
        }
        for (width, starts) in [(wide, wide_starts), (narrow, narrow_starts)] {
            if starts.is_empty() {
                continue;
            }
            match vectors {
                1 => dispatch!(width, starts, 1, [1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16]),
                2 => dispatch!(width, starts, 2, [1 2 3 4 5 6 7 8 9 10 11 12 13 14]),
                _ => dispatch!(width, starts, 3, [1 2 3 4 5 6 7 8 9]),
            }
        }
    }

    /// The pieces of width `P` that start at the columns `starts` of each row of `oys`, for a
    /// run of input channels at a time ([`WEIGHTS_IN_L1`]), each piece's sums kept in `stage`
    /// from one run to the next: the same additions in the same order as one pass over all
    /// the channels.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pieces<const V: usize, const P: usize>(
        &self,
        image: &[f32],
        oys: Range<usize>,
        starts: &[usize],
        weights: &[f32],
        bias: &[f32],
        stage: &mut [f32],
    ) {
        let taps_per_channel = self.taps.len() / self.c;
        let run = (WEIGHTS_IN_L1 / (taps_per_channel * V * LANES * 4)).max(1) * taps_per_channel;
        for (r, taps) in self.taps.chunks(run).enumerate() {
            let (first, last) = (r == 0, (r + 1) * run >= self.taps.len());
            let w = weights.as_ptr().add(r * run * V * LANES);
            for (row, oy) in oys.clone().enumerate() {
                for &ox in starts {
                    let at = image.as_ptr().add(oy * self.row_step + ox);
                    let out = stage.as_mut_ptr().add((row * self.ow + ox) * V * LANES);
                    self.block::<V, P>(at, taps, w, bias.as_ptr(), out, first, last);
                }
            }
        }
    }

    /// One register block: `V` channel vectors at the `P` pixels side by side whose first
    /// window starts at `at`, over `taps`: from zero if `first`, else from the sums in `out`;
    /// if `last`, with the bias and ReLU.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const V: usize, const P: usize>(
        &self,
        at: *const f32,
        taps: &[usize],
        mut w: *const f32,
        bias: *const f32,
        out: *mut f32,
        first: bool,
        last: bool,
    ) {
        let out_at = |p: usize, v: usize| out.add((p * V + v) * LANES);
        let mut acc = [[_mm512_setzero_ps(); V]; P];
        if !first {
            acc = std::array::from_fn(|p| std::array::from_fn(|v| _mm512_loadu_ps(out_at(p, v))));
        }
        for &tap in taps {
            let wv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(w.add(v * LANES)));
            let x = at.add(tap);
            for (p, acc_p) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(p));
                for (a, &wv) in acc_p.iter_mut().zip(&wv) {
                    *a = _mm512_fmadd_ps(wv, xv, *a);
                }
            }
            w = w.add(V * LANES);
        }
        for (p, acc_p) in acc.iter().enumerate() {
            for (v, &a) in acc_p.iter().enumerate() {
                let mut value = a;
                if last {
                    value = _mm512_add_ps(value, _mm512_loadu_ps(bias.add(v * LANES)));
                    if self.relu {
                        value = relu_lanes(value);
                    }
                }
                _mm512_storeu_ps(out_at(p, v), value);
            }
        }
    }
}

/// Bytes of weights a run of input channels reads: they stay in L1 while every piece of the
/// staged rows reuses them.
const WEIGHTS_IN_L1: usize = 24 << 10;

/// The sizes [`weight_grad`]'s register blocks work with.
struct TapKernel<'a> {
    /// Where each tap's input lies from a window's start in a padded image, padded to a
    /// multiple of [`BLOCK_LCM`].
    taps: &'a [usize],
    ckk: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    row_len: usize,
}

impl TapKernel<'_> {
    /// Adds to `sums[v, tap, lane]` (`vectors` channel vectors) one image's products, `dy_t`
    /// the output gradient of those channels, channels-last.
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, vectors: usize, image: &[f32], dy_t: &[f32], sums: &mut [f32]) {
        let furthest =
            self.taps.iter().max().map_or(0, |&t| t + ((self.oh - 1) * self.row_len + self.ow - 1) * self.stride);
        assert!(
            (1..=3).contains(&vectors) && furthest < image.len() && sums.len() == vectors * self.taps.len() * LANES
        );
        assert!(self.taps.len().is_multiple_of(BLOCK_LCM) && dy_t.len() == self.oh * self.ow * vectors * LANES);
        match vectors {
            1 => self.blocks::<1, 16>(image, dy_t, sums),
            2 => self.blocks::<2, 12>(image, dy_t, sums),
            _ => self.blocks::<3, 8>(image, dy_t, sums),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn blocks<const V: usize, const E: usize>(&self, image: &[f32], dy_t: &[f32], sums: &mut [f32]) {
        let (taps_len, sums) = (self.taps.len(), sums.as_mut_ptr());
        for (block, taps) in self.taps.chunks_exact(E).take(self.ckk.div_ceil(E)).enumerate() {
            let at: [*const f32; E] = std::array::from_fn(|j| image.as_ptr().add(taps[j]));
            let sum_at = |j: usize, v: usize| sums.add((v * taps_len + block * E + j) * LANES);
            let mut acc: [[__m512; V]; E] =
                std::array::from_fn(|j| std::array::from_fn(|v| _mm512_loadu_ps(sum_at(j, v))));
            let mut dy = dy_t.as_ptr();
            for oy in 0..self.oh {
                let mut window = oy * self.stride * self.row_len;
                for _ in 0..self.ow {
                    let g: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(dy.add(v * LANES)));
                    for (acc_j, &x) in acc.iter_mut().zip(&at) {
                        let xv = _mm512_set1_ps(*x.add(window));
                        for (a, &g) in acc_j.iter_mut().zip(&g) {
                            *a = _mm512_fmadd_ps(g, xv, *a);
                        }
                    }
                    (dy, window) = (dy.add(V * LANES), window + self.stride);
                }
            }
            for (j, acc_j) in acc.iter().enumerate() {
                for (v, &a) in acc_j.iter().enumerate() {
                    _mm512_storeu_ps(sum_at(j, v), a);
                }
            }
        }
    }
}
