//! Direct convolution with AVX-512 or AVX2 + FMA, no patch matrix: the strided layer (conv1),
//! and the stride-1 layers Winograd leaves (13x13 maps at batch 1-7). A register block holds
//! `V` vectors of [`Level::lanes`] output channels (16 or 8) at `P` output pixels side by side
//! in a row; each step of the kernel loads the `V` weight vectors of one `(ci, ky, kx)` and
//! broadcasts the `P` pixels' input values against them, from the [`Geometry::split`] image,
//! where those values lie side by side too (one address and constant offsets: no pointer per
//! pixel). A row is cut into pieces of at most the level's `PIECE` pixels, as even as can be.
//! The sums, with the bias and ReLU, are stored channels-last for a few rows, then transposed
//! into the NCHW planes. The images go
//! over the cores; a single image is cut into tasks of a block of channels and a band of rows
//! ([`TASKS_PER_CORE`]). The weight gradient ([`weight_grad`]) is the same loop turned round:
//! taps in place of pixels.
//!
//! Each output is summed in `(ci, ky, kx)` order from zero and the bias added last, whatever
//! the block's shape: the same bits as the first direct kernel (below) gave, at either level.
//! The kernels are written once ([`level_kernels!`]) and stamped out for each level, with the
//! register blocks each level's registers hold (32 zmm, 16 ymm).
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

use std::ops::Range;

use super::{for_each_chunk, for_each_task, pieces_by_index, sum_over_chunks, with_scratch, Geometry};
use crate::ops::cpu::transpose::transpose;
use rayon::prelude::*;

/// Pixels (whole output rows, at least one) the forward stages channels-last before they are
/// transposed into the planes.
const STAGED_PIXELS: usize = 240;

/// Tasks per core that the forward cuts an image into (a batch too small to give every core
/// images of its own): the two cores of this machine run at unequal speeds when other tenants'
/// work shares one, and the faster then takes the slower's tasks. With a share for each core
/// the layer waited on the slower: torchvision's conv3-5 at batch 1, medians of 100 passes
/// alternated in one process, 1.50 / 1.94 / 1.27 -> 1.38 / 1.67 / 1.14 ms.
const TASKS_PER_CORE: usize = 4;

/// Whether the kernels can run here (AVX2 + FMA or AVX-512): the forward then takes every
/// convolution that Winograd does not (conv1, and 13x13 maps at batch 1-7).
pub(super) fn available() -> bool {
    crate::ops::Isa::avx2()
}

/// Whether the direct weight gradient takes this convolution: a stride above 1, and a level
/// the kernels have a form for.
pub(super) fn applies(g: &Geometry) -> bool {
    g.stride > 1 && available()
}

/// A level the kernels have a form for: its vectors' lanes decide the layouts (weights packed
/// and sums staged in vectors of `lanes` channels), its registers the register blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Level {
    Avx512,
    Avx2,
}

impl Level {
    #[cfg(test)]
    pub(super) const ALL: [Level; 2] = [Level::Avx512, Level::Avx2];

    /// The level the process runs at ([`crate::ops::Isa::current`]).
    fn current() -> Level {
        assert!(available(), "the direct convolution needs AVX2 + FMA");
        if crate::ops::Isa::avx512() {
            Level::Avx512
        } else {
            Level::Avx2
        }
    }

    /// Whether this CPU has the level (tests run a level below the process's too).
    pub(super) fn on_this_cpu(self) -> bool {
        let isa = match self {
            Level::Avx512 => crate::ops::Isa::Avx512,
            Level::Avx2 => crate::ops::Isa::Avx2,
        };
        isa <= crate::ops::Isa::detected()
    }

    /// Channels to a vector.
    fn lanes(self) -> usize {
        match self {
            Level::Avx512 => crate::ops::cpu::simd::avx512::LANES,
            Level::Avx2 => crate::ops::cpu::simd::avx2::LANES,
        }
    }

    /// The least common multiple of the weight gradient's register blocks' tap counts.
    fn block_lcm(self) -> usize {
        match self {
            Level::Avx512 => avx512::BLOCK_LCM,
            Level::Avx2 => avx2::BLOCK_LCM,
        }
    }
}

/// The plain zero-padded image the weight gradient reads, `[c, h + 2p, w + 2p]`: the split of
/// the layer at stride 1 (no phases). With its row and plane lengths.
fn padded_image(g: &Geometry) -> (Geometry, usize, usize) {
    let row_len = g.w + 2 * g.pad;
    (Geometry { stride: 1, ..*g }, row_len, (g.h + 2 * g.pad) * row_len)
}

/// `relu?(conv(x, w) + b)` for a batch, NCHW in and out, from the [`Geometry::split`] image
/// (for stride 1 the zero-padded image), with the weights `w` as [`pack_weights`] packs them
/// if `packed` has them. At the process's level.
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], packed: Option<&[f32]>, b: &[f32], relu: bool) -> Vec<f32> {
    forward_at(Level::current(), g, x, w, packed, b, relu)
}

/// [`forward`] at `level` (`packed` as [`pack_weights_at`] packs them for it).
pub(super) fn forward_at(
    level: Level,
    g: &Geometry,
    x: &[f32],
    w: &[f32],
    packed: Option<&[f32]>,
    b: &[f32],
    relu: bool,
) -> Vec<f32> {
    assert!(level.on_this_cpu(), "{level:?} is not on this CPU");
    let (ckk, ohw, chw) = (g.ckk(), g.ohw(), g.c * g.h * g.w);
    let lanes = level.lanes();
    let vectors = g.o.div_ceil(lanes);
    // images over the cores, the weights packed once for all of them; a batch too small for
    // that cuts each image into tasks (below), and unless the weights come packed each task
    // packs its block just before it runs it (its one read of them), so that they stay in L2
    let spread = g.n < rayon::current_num_threads();
    let packed_here;
    let packed = match packed {
        None if !spread => {
            packed_here = pack_weights_at(level, g, w);
            Some(packed_here.as_slice())
        }
        packed => packed,
    };
    let mut bias = b.to_vec();
    bias.resize(vectors * lanes, 0.0);
    let kernel = Kernel::new(g, relu);
    let rows = (STAGED_PIXELS / g.ow).clamp(1, g.oh); // output rows staged at a time
    let stage_len = rows * g.ow * 3 * lanes;
    // a task's sums, a stage of rows at a time (`stage[pixel, v * lanes + lane]`), into its planes
    let run = |image: &[f32], weights: &[f32], task: Task, stage: &mut [f32], turned: &mut [f32]| {
        let Task { first, v, rows: oys, mut planes } = task;
        for oy in oys.clone().step_by(rows) {
            let stage_rows = oy..(oy + rows).min(oys.end);
            let pixels = stage_rows.len() * g.ow;
            let stage = &mut stage[..pixels * v * lanes];
            let bias = &bias[first * lanes..][..v * lanes];
            // SAFETY: the CPU has the level (asserted above); `run` checks its reads.
            unsafe { kernel.run(level, v, image, stage_rows, weights, bias, stage) };
            match &mut planes {
                Planes::Whole(planes) => {
                    transpose(pixels, planes.len() / ohw, stage, v * lanes, &mut planes[oy * g.ow..], ohw)
                }
                Planes::Band(planes) => {
                    // turned channels-first here, then copied into each channel's band
                    transpose(pixels, planes.len(), stage, v * lanes, turned, pixels);
                    for (plane, channel) in planes.iter_mut().zip(turned.chunks(pixels)) {
                        plane[(oy - oys.start) * g.ow..][..pixels].copy_from_slice(channel);
                    }
                }
            }
        }
    };
    let mut y = crate::ops::cpu::parallel::zeros(g.n * g.o * ohw);
    for_each_chunk(&mut y, g.o * ohw, !spread, |i, y| {
        with_scratch(g.split_len(), |image| {
            g.split(&x[i * chw..][..chw], image, spread);
            let image = &*image;
            let blocks = vector_blocks(y, vectors, |v| v * lanes * ohw);
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
                    let weights = &packed[task.first * lanes * ckk..][..task.v * lanes * ckk];
                    return run(image, weights, task, stage, turned);
                }
                weights.clear();
                weights.resize(task.v * lanes * ckk, 0.0);
                pack_block(g, w, lanes, task.first, task.v, weights);
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
/// a batch, in [`sum_over_chunks`]' fixed order: a register block holds `V` vectors of
/// [`Level::lanes`] output channels at `E` taps `(ci, ky, kx)`, and each pixel loads its `V` vectors of the
/// output gradient (turned channels-last) and broadcasts the `E` taps' inputs against them.
/// The GEMM form built 4.4 MB of patches an image for conv1, which the GEMM then packed again
/// (conv1's backward alone at batch 32, its weight and bias gradients and the ReLU mask, 5
/// alternated runs: median 62 -> 53 ms, fastest 50 -> 42 ms).
pub(super) fn weight_grad(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    weight_grad_at(Level::current(), g, x, dy)
}

/// [`weight_grad`] at `level`.
pub(super) fn weight_grad_at(level: Level, g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    assert!(level.on_this_cpu(), "{level:?} is not on this CPU");
    let (ckk, ohw, chw) = (g.ckk(), g.ohw(), g.c * g.h * g.w);
    let lanes = level.lanes();
    let vectors = g.o.div_ceil(lanes);
    let o_padded = vectors * lanes;
    let (padded, row_len, plane_len) = padded_image(g);
    // each tap's place relative to a window's start; a last block's unused taps repeat the last
    let taps_len = ckk.next_multiple_of(level.block_lcm());
    let taps: Vec<usize> = (0..taps_len)
        .map(|e| e.min(ckk - 1))
        .map(|e| (e / (g.k * g.k)) * plane_len + (e % (g.k * g.k) / g.k) * row_len + e % g.k)
        .collect();
    let kernel = TapKernel { taps: &taps, ckk, oh: g.oh, ow: g.ow, stride: g.stride, row_len };
    // sums[vector, tap, lane]
    let sums = sum_over_chunks(g.n, vectors * taps_len * lanes, |images, spread, sums| {
        // each vector block's sums, spread over the cores when the chunks are too few
        let mut parts = vector_blocks(sums, vectors, |v| v * taps_len * lanes);
        with_scratch(padded.split_len() + ohw * o_padded, |scratch| {
            let (image, dy_t) = scratch.split_at_mut(padded.split_len());
            for i in images {
                padded.split(&x[i * chw..][..chw], image, spread);
                // each block's channels turned channels-last on their own, `[pixel, v * lanes]`,
                // so that its pass reads one unbroken stream
                let dy_i = &dy[i * g.o * ohw..][..g.o * ohw];
                for &(first, v, _) in &parts {
                    let channels = (v * lanes).min(g.o - first * lanes);
                    let block = &mut dy_t[first * lanes * ohw..][..v * lanes * ohw];
                    transpose(channels, ohw, &dy_i[first * lanes * ohw..], ohw, block, v * lanes);
                }
                let (image, dy_t) = (&*image, &*dy_t);
                let work = |(first, v, part): &mut (usize, usize, &mut [f32])| {
                    let block = &dy_t[*first * lanes * ohw..][..*v * lanes * ohw];
                    // SAFETY: the CPU has the level (asserted above); `run` checks its reads.
                    unsafe { kernel.run(level, *v, image, block, part) }
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
    for (v, sums) in sums.chunks(taps_len * lanes).enumerate() {
        let used = lanes.min(g.o - v * lanes);
        transpose(ckk, used, sums, lanes, &mut dw[v * lanes * ckk..], ckk);
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

/// The weights as the register blocks of [`forward`] read them at the process's level, for
/// all its blocks (the channel vectors cut by [`block_vectors`]): the block of `v` vectors
/// from vector `first` at `first * lanes * ckk`, as [`pack_block`] packs it.
pub(super) fn pack_weights(g: &Geometry, w: &[f32]) -> Vec<f32> {
    pack_weights_at(Level::current(), g, w)
}

/// [`pack_weights`] for `level`'s vectors.
pub(super) fn pack_weights_at(level: Level, g: &Geometry, w: &[f32]) -> Vec<f32> {
    let (ckk, lanes) = (g.ckk(), level.lanes());
    let mut packed = vec![0f32; g.o.div_ceil(lanes) * lanes * ckk];
    let blocks = vector_blocks(&mut packed, g.o.div_ceil(lanes), |v| v * lanes * ckk);
    blocks.into_par_iter().for_each(|(first, v, block)| pack_block(g, w, lanes, first, v, block));
    packed
}

/// Into the zeroed `block`, the weights of the block of `v` vectors of `lanes` channels from
/// vector `first`, `[(ci, ky, kx), v * lanes]` (0 past the last channel), so that the block's
/// steps read one unbroken stream.
fn pack_block(g: &Geometry, w: &[f32], lanes: usize, first: usize, v: usize, block: &mut [f32]) {
    let channels = (v * lanes).min(g.o - first * lanes);
    transpose(channels, g.ckk(), &w[first * lanes * g.ckk()..], g.ckk(), block, v * lanes);
}

/// What [`forward`]'s register blocks need to know of a layer.
struct Kernel {
    c: usize,
    /// Where each tap `(ci, ky, kx)`'s input lies from a window's start in the split image: a
    /// block's pixels, side by side in an output row, then read side by side too.
    taps: Vec<usize>,
    /// The largest of `taps`: how far past a window's start the kernel reads.
    reach: usize,
    /// Values of the split image per output row.
    row_step: usize,
    ow: usize,
    relu: bool,
}

impl Kernel {
    fn new(g: &Geometry, relu: bool) -> Self {
        let (s, pl) = (g.stride, g.phase_len());
        let (row, plane) = (s * pl, (g.h + 2 * g.pad) * s * pl);
        // padded column `ox * s + kx` is phase `kx % s`, index `ox + kx / s` (`Geometry::split`)
        // a channel's taps, then the same shifted by a plane per channel (no division per
        // tap: for conv4's 3456 taps those took 15-20 us a call)
        let channel: Vec<usize> =
            (0..g.k).flat_map(|ky| (0..g.k).map(move |kx| ky * row + (kx % s) * pl + kx / s)).collect();
        let taps: Vec<usize> = (0..g.c).flat_map(|ci| channel.iter().map(move |t| ci * plane + t)).collect();
        let reach = taps.iter().copied().max().unwrap_or(0);
        Kernel { c: g.c, taps, reach, row_step: s * row, ow: g.ow, relu }
    }

    /// `stage[p, v * lanes + lane]` for a block of `vectors` channel vectors (`weights` and
    /// `bias` its own, [`pack_weights_at`]) at the pixels of the output rows `oys`, with the
    /// bias and ReLU: `level`'s [`level_kernels!`] `run`.
    ///
    /// # Safety
    /// The CPU must have `level`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        level: Level,
        vectors: usize,
        image: &[f32],
        oys: Range<usize>,
        weights: &[f32],
        bias: &[f32],
        stage: &mut [f32],
    ) {
        match level {
            Level::Avx512 => avx512::run(self, vectors, image, oys, weights, bias, stage),
            Level::Avx2 => avx2::run(self, vectors, image, oys, weights, bias, stage),
        }
    }
}

/// Bytes of weights a run of input channels reads: they stay in L1 while every piece of the
/// staged rows reuses them.
const WEIGHTS_IN_L1: usize = 24 << 10;

/// The sizes [`weight_grad`]'s register blocks work with.
struct TapKernel<'a> {
    /// Where each tap's input lies from a window's start in a padded image, padded to a
    /// multiple of the level's `BLOCK_LCM`.
    taps: &'a [usize],
    ckk: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    row_len: usize,
}

impl TapKernel<'_> {
    /// Adds to `sums[v, tap, lane]` (`vectors` channel vectors) one image's products, `dy_t`
    /// the output gradient of those channels, channels-last: `level`'s [`level_kernels!`]
    /// `run_taps`.
    ///
    /// # Safety
    /// The CPU must have `level`.
    unsafe fn run(&self, level: Level, vectors: usize, image: &[f32], dy_t: &[f32], sums: &mut [f32]) {
        match level {
            Level::Avx512 => avx512::run_taps(self, vectors, image, dy_t, sums),
            Level::Avx2 => avx2::run_taps(self, vectors, image, dy_t, sums),
        }
    }
}

/// The least common multiple of `a` and `b`.
const fn lcm(a: usize, b: usize) -> usize {
    let (mut x, mut y) = (a, b);
    while y != 0 {
        (x, y) = (y, x % y);
    }
    a / x * b
}

/// The register blocks of [`forward`] and [`weight_grad`], written once, for a level's module
/// of [`crate::ops::cpu::simd`] (`$name`, its vectors and intrinsics) and its target feature:
/// - `pieces`: for 1, 2 and 3 channel vectors, the widths a piece of a row may take, `1..=P`
///   (`PIECE`, the widest, is the last): `V x P` accumulators, `V` weight vectors and one
///   broadcast in the level's registers;
/// - `taps`: the weight gradient's taps per block for 1, 2 and 3 channel vectors (`V x E`
///   accumulators, `V` vectors of the gradient and one broadcast).
macro_rules! level_kernels {
    ($(#[$meta:meta])* $name:ident, $feature:literal,
     pieces: [$($p1:literal)*], [$($p2:literal)*], [$($p3:literal)*],
     taps: [$e1:literal, $e2:literal, $e3:literal]) => {
        $(#[$meta])*
        mod $name {
            use super::{Kernel, TapKernel, WEIGHTS_IN_L1};
            use crate::ops::cpu::simd::$name::*;
            use std::ops::Range;

            /// The widest piece of a row a register block of `V` channel vectors takes.
            const PIECE: [usize; 3] = [[$($p1),*].len(), [$($p2),*].len(), [$($p3),*].len()];
            /// The least common multiple of the weight gradient's register blocks' tap counts.
            pub(super) const BLOCK_LCM: usize = super::lcm(super::lcm($e1, $e2), $e3);

            /// [`Kernel::run`].
            ///
            /// # Safety
            /// The CPU must have the target feature.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn run(
                kernel: &Kernel,
                vectors: usize,
                image: &[f32],
                oys: Range<usize>,
                weights: &[f32],
                bias: &[f32],
                stage: &mut [f32],
            ) {
                let ow = kernel.ow;
                let furthest = (oys.end.max(1) - 1) * kernel.row_step + ow - 1 + kernel.reach;
                assert!((1..=3).contains(&vectors) && furthest < image.len() && bias.len() == vectors * LANES);
                assert!(
                    weights.len() == kernel.taps.len() * vectors * LANES
                        && stage.len() >= oys.len() * ow * vectors * LANES
                );
                // each output row in pieces as even as can be, of two widths at most
                let count = ow.div_ceil(PIECE[vectors - 1]);
                let (wide, narrow) = (ow.div_ceil(count), ow / count);
                let wide_count = ow - narrow * count;
                let starts: Vec<usize> = (0..count).map(|i| i * narrow + i.min(wide_count)).collect();
                let (wide_starts, narrow_starts) = starts.split_at(wide_count);
                for (width, starts) in [(wide, wide_starts), (narrow, narrow_starts)] {
                    if starts.is_empty() {
                        continue;
                    }
                    let oys = oys.clone();
                    match (vectors, width) {
                        $((1, $p1) => pieces::<1, $p1>(kernel, image, oys, starts, weights, bias, stage),)*
                        $((2, $p2) => pieces::<2, $p2>(kernel, image, oys, starts, weights, bias, stage),)*
                        $((3, $p3) => pieces::<3, $p3>(kernel, image, oys, starts, weights, bias, stage),)*
                        _ => unreachable!("pieces are at most PIECE wide"),
                    }
                }
            }

            /// The pieces of width `P` that start at the columns `starts` of each row of `oys`,
            /// for a run of input channels at a time ([`WEIGHTS_IN_L1`]), each piece's sums kept
            /// in `stage` from one run to the next: the same additions in the same order as one
            /// pass over all the channels.
            ///
            /// # Safety
            /// The CPU must have the target feature this function is compiled for; the sizes it
            /// reads and writes are asserted here or by its caller.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn pieces<const V: usize, const P: usize>(
                kernel: &Kernel,
                image: &[f32],
                oys: Range<usize>,
                starts: &[usize],
                weights: &[f32],
                bias: &[f32],
                stage: &mut [f32],
            ) {
                let taps_per_channel = kernel.taps.len() / kernel.c;
                let run = (WEIGHTS_IN_L1 / (taps_per_channel * V * LANES * 4)).max(1) * taps_per_channel;
                for (r, taps) in kernel.taps.chunks(run).enumerate() {
                    let (first, last) = (r == 0, (r + 1) * run >= kernel.taps.len());
                    let w = weights.as_ptr().add(r * run * V * LANES);
                    for (row, oy) in oys.clone().enumerate() {
                        for &ox in starts {
                            let at = image.as_ptr().add(oy * kernel.row_step + ox);
                            let out = stage.as_mut_ptr().add((row * kernel.ow + ox) * V * LANES);
                            block::<V, P>(kernel.relu, at, taps, w, bias.as_ptr(), out, first, last);
                        }
                    }
                }
            }

            /// One register block: `V` channel vectors at the `P` pixels side by side whose
            /// first window starts at `at`, over `taps`: from zero if `first`, else from the
            /// sums in `out`; if `last`, with the bias (and the ReLU if `relu`).
            ///
            /// # Safety
            /// The CPU must have the target feature this function is compiled for; the sizes it
            /// reads and writes are asserted here or by its caller.
            #[inline]
            #[target_feature(enable = $feature)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn block<const V: usize, const P: usize>(
                relu_too: bool,
                at: *const f32,
                taps: &[usize],
                mut w: *const f32,
                bias: *const f32,
                out: *mut f32,
                first: bool,
                last: bool,
            ) {
                let out_at = |p: usize, v: usize| out.add((p * V + v) * LANES);
                let mut acc = [[zero(); V]; P];
                if !first {
                    acc = std::array::from_fn(|p| std::array::from_fn(|v| load(out_at(p, v))));
                }
                for &tap in taps {
                    let wv: [Vector; V] = std::array::from_fn(|v| load(w.add(v * LANES)));
                    let x = at.add(tap);
                    for (p, acc_p) in acc.iter_mut().enumerate() {
                        let xv = splat(*x.add(p));
                        for (a, &wv) in acc_p.iter_mut().zip(&wv) {
                            *a = fmadd(wv, xv, *a);
                        }
                    }
                    w = w.add(V * LANES);
                }
                for (p, acc_p) in acc.iter().enumerate() {
                    for (v, &a) in acc_p.iter().enumerate() {
                        let mut value = a;
                        if last {
                            value = add(value, load(bias.add(v * LANES)));
                            if relu_too {
                                value = relu(value);
                            }
                        }
                        store(out_at(p, v), value);
                    }
                }
            }

            /// [`TapKernel::run`].
            ///
            /// # Safety
            /// The CPU must have the target feature.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn run_taps(
                kernel: &TapKernel,
                vectors: usize,
                image: &[f32],
                dy_t: &[f32],
                sums: &mut [f32],
            ) {
                let (oh, ow) = (kernel.oh, kernel.ow);
                let furthest =
                    // the taps rise with their index: the last lies furthest
                    kernel.taps.last().map_or(0, |&t| t + ((oh - 1) * kernel.row_len + ow - 1) * kernel.stride);
                assert!(
                    (1..=3).contains(&vectors)
                        && furthest < image.len()
                        && sums.len() == vectors * kernel.taps.len() * LANES
                );
                assert!(kernel.taps.len().is_multiple_of(BLOCK_LCM) && dy_t.len() == oh * ow * vectors * LANES);
                match vectors {
                    1 => tap_blocks::<1, $e1>(kernel, image, dy_t, sums),
                    2 => tap_blocks::<2, $e2>(kernel, image, dy_t, sums),
                    _ => tap_blocks::<3, $e3>(kernel, image, dy_t, sums),
                }
            }

            /// # Safety
            /// The CPU must have the target feature this function is compiled for; the sizes it
            /// reads and writes are asserted here or by its caller.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn tap_blocks<const V: usize, const E: usize>(
                kernel: &TapKernel,
                image: &[f32],
                dy_t: &[f32],
                sums: &mut [f32],
            ) {
                let (taps_len, sums) = (kernel.taps.len(), sums.as_mut_ptr());
                for (block, taps) in kernel.taps.chunks_exact(E).take(kernel.ckk.div_ceil(E)).enumerate() {
                    let at: [*const f32; E] = std::array::from_fn(|j| image.as_ptr().add(taps[j]));
                    let sum_at = |j: usize, v: usize| sums.add((v * taps_len + block * E + j) * LANES);
                    let mut acc: [[Vector; V]; E] =
                        std::array::from_fn(|j| std::array::from_fn(|v| load(sum_at(j, v))));
                    let mut dy = dy_t.as_ptr();
                    for oy in 0..kernel.oh {
                        let mut window = oy * kernel.stride * kernel.row_len;
                        for _ in 0..kernel.ow {
                            let g: [Vector; V] = std::array::from_fn(|v| load(dy.add(v * LANES)));
                            for (acc_j, &x) in acc.iter_mut().zip(&at) {
                                let xv = splat(*x.add(window));
                                for (a, &g) in acc_j.iter_mut().zip(&g) {
                                    *a = fmadd(g, xv, *a);
                                }
                            }
                            (dy, window) = (dy.add(V * LANES), window + kernel.stride);
                        }
                    }
                    for (j, acc_j) in acc.iter().enumerate() {
                        for (v, &a) in acc_j.iter().enumerate() {
                            store(sum_at(j, v), a);
                        }
                    }
                }
            }
        }
    };
}

level_kernels!(
    /// AVX-512: 16 lanes, 32 registers. Weight gradient: 16 x 1, 12 x 2 and 8 x 3 taps x
    /// vectors.
    avx512, "avx512f",
    pieces: [1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16], [1 2 3 4 5 6 7 8 9 10 11 12 13 14], [1 2 3 4 5 6 7 8 9],
    taps: [16, 12, 8]
);

level_kernels!(
    /// AVX2 + FMA: 8 lanes, 16 registers: `V x P + V + 1` at most 15 (3 x 4, at 16, ran at
    /// half speed: spilled, it seems; 1 x 13 and 3 x 3 are not measured on AlexNet's
    /// layers, whose vector counts are even). Measured on Zen 4 (ALEXNET_ISA=avx2, the paper's conv1,
    /// 96 channels, alternated runs): pairs of vectors at 6 pixels 73-74 ms at batch 64, 1.24-1.35
    /// ms at batch 1; at 7 pixels (17 registers) 127-130 ms; blocks of 3 vectors at 4 pixels
    /// (16) 147-150 ms, at 3 pixels 78-79 ms. So pairs (as at AVX-512), and 3 x 3 for an odd
    /// vector's block, 13 pixels for a lone vector; the weight gradient's blocks alike (12, 6
    /// and 3 taps).
    avx2, "avx2,fma",
    pieces: [1 2 3 4 5 6 7 8 9 10 11 12 13], [1 2 3 4 5 6], [1 2 3],
    taps: [12, 6, 3]
);
