//! The forward pass of a stride-1 convolution by Winograd's minimal filtering (Lavin & Gray
//! 2016): each MxM block of outputs comes from an AxA patch of input (`A = M + R - 1` for an
//! RxR kernel) with `A²` multiplies per channel pair instead of `M²R²`:
//!
//! * weights: `U = G g Gᵀ` for each kernel `g`, `A²` values `U[ξ, c, o]`;
//! * input: `V = Bᵀ d B` for each patch `d` (patches every M pixels), `V[ξ, tile, c]`;
//! * `A²` GEMMs, one per position ξ: `M[ξ] = V[ξ] · U[ξ]`, `[tiles, C] · [C, O]`;
//! * output: `Y = Aᵀ M A`, the MxM block, plus bias (and the ReLU).
//!
//! Two algorithms, one code: F(2x2, 3x3) for conv3-5 (13x13 maps, 2.25 times fewer
//! multiply-adds; its transforms only add, subtract and halve) and F(2x2, 5x5) for conv2
//! (27x27 maps, 2.6 times fewer). F(2x2, 5x5) interpolates at 0, 1, -1, 2 and -1/2: of the
//! small point sets, the one with the smallest rounding error in float32 (1.4e-6 of the
//! largest output for a conv2-like layer, against 3.6e-6 for the usual 0, ±1, ±2, and 2e-7 for
//! a direct sum: `scripts/winograd_matrices.py`). The backward pass reuses the forward for the
//! input gradient (`input_grad_winograd` in conv/cpu/mod.rs), and [`weight_grad`] runs the same algorithm the other way round.

use std::marker::PhantomData;
use std::sync::Arc;

use rayon::prelude::*;

use gemm::Parallelism;

use super::{
    for_each_chunk, for_each_plane_share, for_each_task, images_per_gemm, parallelism, pieces_by_index,
    sum_over_chunks, with_scratch, Geometry, CHUNK,
};
use crate::ops::cpu::transpose::transpose;
use crate::ops::gemm::matmul;

/// Winograd's F(MxM, RxR) on tiles of `A = M + R - 1`: `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`.
/// The transforms are constants, so once inlined only their nonzero entries cost anything.
trait Minimal<const M: usize, const R: usize, const A: usize> {
    const BT: [[f32; A]; A];
    const G: [[f32; R]; A];
    const AT: [[f32; A]; M];
}

/// A constant matrix as a type, so that a transform by it is compiled for its entries (zeros
/// skipped, ±1 as additions and subtractions) even inside the AVX-512 functions, which take no
/// constants from their callers.
trait Matrix<const ROWS: usize, const COLS: usize> {
    const K: [[f32; COLS]; ROWS];
}

/// `Bᵀ` of `F`: the input's patches.
struct InputT<F, const M: usize, const R: usize, const A: usize>(PhantomData<F>);
/// `Aᵀ` of `F`: a tile's outputs.
struct OutputT<F, const M: usize, const R: usize, const A: usize>(PhantomData<F>);
/// `A` (`Aᵀ` transposed): the output gradient's blocks, for the weight gradient.
struct OutputGrad<F, const M: usize, const R: usize, const A: usize>(PhantomData<F>);
/// `Gᵀ`: the weight gradient of a kernel from its `A²` sums.
struct KernelGrad<F, const M: usize, const R: usize, const A: usize>(PhantomData<F>);

impl<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize> Matrix<A, A> for InputT<F, M, R, A> {
    const K: [[f32; A]; A] = F::BT;
}
impl<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize> Matrix<M, A> for OutputT<F, M, R, A> {
    const K: [[f32; A]; M] = F::AT;
}
impl<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize> Matrix<A, M> for OutputGrad<F, M, R, A> {
    const K: [[f32; M]; A] = transposed(F::AT);
}
impl<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize> Matrix<R, A> for KernelGrad<F, M, R, A> {
    const K: [[f32; A]; R] = transposed(F::G);
}

const fn transposed<const ROWS: usize, const COLS: usize>(m: [[f32; COLS]; ROWS]) -> [[f32; ROWS]; COLS] {
    let mut t = [[0.0; ROWS]; COLS];
    let mut i = 0;
    while i < ROWS {
        let mut j = 0;
        while j < COLS {
            t[j][i] = m[i][j];
            j += 1;
        }
        i += 1;
    }
    t
}

/// F(2x2, 3x3) at 0, 1, -1: Lavin & Gray's matrices (the script's, up to the signs of two
/// rows of `Bᵀ` and their partners in `G` and `Aᵀ`).
struct F2x3;

impl Minimal<2, 3, 4> for F2x3 {
    const BT: [[f32; 4]; 4] = [[1., 0., -1., 0.], [0., 1., 1., 0.], [0., -1., 1., 0.], [0., 1., 0., -1.]];
    const G: [[f32; 3]; 4] = [[1., 0., 0.], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0., 0., 1.]];
    const AT: [[f32; 4]; 2] = [[1., 1., 1., 0.], [0., 1., -1., -1.]];
}

/// F(2x2, 5x5) at 0, 1, -1, 2, -1/2 (rows of `Bᵀ` and columns of `Aᵀ` scaled to integers, the
/// scales moved into `G`; scripts/winograd_matrices.py derives them).
struct F2x5;

impl Minimal<2, 5, 6> for F2x5 {
    const BT: [[f32; 6]; 6] = [
        [2., 3., -4., -3., 2., 0.],
        [0., -2., -5., -1., 2., 0.],
        [0., 2., 1., -5., 2., 0.],
        [0., -1., -2., 1., 2., 0.],
        [0., 2., -1., -2., 1., 0.],
        [0., 2., 3., -4., -3., 2.],
    ];
    const G: [[f32; 5]; 6] = [
        [1. / 2., 0., 0., 0., 0.],
        [-1. / 6., -1. / 6., -1. / 6., -1. / 6., -1. / 6.],
        [1. / 6., -1. / 6., 1. / 6., -1. / 6., 1. / 6.],
        [1. / 30., 1. / 15., 2. / 15., 4. / 15., 8. / 15.],
        [-8. / 15., 4. / 15., -2. / 15., 1. / 15., -1. / 30.],
        [0., 0., 0., 0., 1. / 2.],
    ];
    const AT: [[f32; 6]; 2] = [[1., 1., 1., 1., 2., 0.], [0., 1., -1., 2., -1., 1.]];
}

/// Whether [`forward`] computes this convolution: 3x3 or 5x5, stride 1, and GEMMs of at
/// least [`GEMM_TILES`] tiles with enough of them for the cores: a 27x27 map (196 tiles)
/// fills one, its GEMMs then spread over the cores; 13x13 maps (49 tiles) need four images a
/// core.
pub(super) fn applies(g: &Geometry) -> bool {
    let tiles = g.oh.div_ceil(2) * g.ow.div_ceil(2); // both algorithms have M = 2
    let enough = tiles >= GEMM_TILES || g.n * tiles >= GEMM_TILES * rayon::current_num_threads();
    matches!(g.k, 3 | 5) && g.stride == 1 && enough
}

/// With fewer tiles a GEMM is too small to run at speed. Measured on 2 cores (with the products
/// the other way round, `U · V`):
/// torchvision's conv3-5 at batch 1 3.3 / 4.2 / 2.5 ms against im2col's 1.7 / 2.6 / 1.6, at
/// batch 4 about level (5.3 / 7.2 / 4.6 against 5.0 / 6.8 / 4.5), ahead from batch 8; its
/// conv2 at batch 1 3.2 against 3.5-3.7 ms. Checked again after the change to `V · U`: 49 tiles
/// (Winograd from batch 1) was mixed (paper at batch 4 faster, torchvision at 1 and 4 slower).
const GEMM_TILES: usize = 196;

/// Where the forward's `U` comes from.
pub(super) enum Kernels<'a> {
    /// Computed from the weights: the input gradient's turned filters, new every time.
    Fresh,
    /// Kept in the layer's state for the weights' version ([`super::Prepared`]): made by the
    /// first pass at a version, read back by the next (computing `U` for conv2-5 takes 4-6 ms a
    /// forward pass, 5% of torchvision's at batch 16).
    Layer(&'a crate::ops::Prepared),
}

/// `y = conv(x, w) + b` (then the ReLU if `relu`), `[N, O, OH, OW]`, for a `g` that
/// [`applies`], with `U` from `kernels`.
pub(super) fn forward(g: &Geometry, x: &[f32], w: &[f32], b: &[f32], relu: bool, kernels: Kernels) -> Vec<f32> {
    match g.k {
        3 => forward_by::<F2x3, 2, 3, 4>(g, x, &transformed::<F2x3, 2, 3, 4>(g, w, kernels), b, relu),
        5 => forward_by::<F2x5, 2, 5, 6>(g, x, &transformed::<F2x5, 2, 5, 6>(g, w, kernels), b, relu),
        k => unreachable!("no Winograd algorithm for {k}x{k} kernels: `applies` rules them out"),
    }
}

/// `U` for the weights `w`, from where `kernels` says.
fn transformed<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
    g: &Geometry,
    w: &[f32],
    kernels: Kernels,
) -> Arc<Vec<f32>> {
    let compute = || transform_weights::<F, M, R, A>(w, g.o, g.c);
    match kernels {
        Kernels::Fresh => Arc::new(compute()),
        Kernels::Layer(prepared) => prepared.kept_or_made(&prepared.winograd, compute),
    }
}

/// Bytes of `V` and `M` one group of images may take: the GEMMs then find them in cache.
/// Measured at batch 64 (torchvision's conv3-5): groups of 4 images (6.4 MB for conv4) 142 ms,
/// of 16 images (the im2col path's grouping, 25 MB) 220 ms.
const GROUP_BYTES: usize = 8 << 20;

/// [`forward`] by the algorithm `F`, on groups of images whose `V` and `M` fit in
/// [`GROUP_BYTES`], the groups spread over the cores.
fn forward_by<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
    g: &Geometry,
    x: &[f32],
    u: &[f32],
    b: &[f32],
    relu: bool,
) -> Vec<f32> {
    let (c, o) = (g.c, g.o);
    let tiling = Tiling::input::<M, A>(g);
    let tiles = tiling.tiles();
    let per_image = A * A * tiles * (c + o) * std::mem::size_of::<f32>(); // of V and M
    let group = images_per_gemm(g.n, tiles, (GROUP_BYTES / per_image).max(1));
    // too few groups of images for the cores (small batches): each group's GEMMs (one per ξ)
    // and its output channels are spread over the cores instead
    let spread = !matches!(parallelism(g.n.div_ceil(group)), Parallelism::None);
    let (chw, ohw) = (c * g.h * g.w, g.ohw());
    let mut y = crate::ops::cpu::parallel::zeros(g.n * o * ohw);
    y.par_chunks_mut(group * o * ohw).zip(x.par_chunks(group * chw)).for_each(|(out, images)| {
        let ld = images.len() / chw * tiles; // the group's tiles side by side
        with_scratch(A * A * (c + o) * ld + tiling.work(), |scratch| {
            let (v, rest) = scratch.split_at_mut(A * A * c * ld);
            let (m, work) = rest.split_at_mut(A * A * o * ld);
            for (i, image) in images.chunks(chw).enumerate() {
                tiling.transform::<InputT<F, M, R, A>, A, A>(image, v, ld, i * tiles, work, spread);
            }
            let v = &*v;
            for_each_chunk(m, o * ld, spread, |xi, m_xi| {
                let (u_xi, v_xi) = (&u[xi * o * c..][..o * c], &v[xi * c * ld..][..c * ld]);
                // M[ξ][tile, o] = V[ξ][tile, c] · U[ξ][c, o]: the `gemm` crate then runs its
                // register blocks down the channels, whose counts are multiples of 64, and
                // reads V as it lies. The other way round, down the tiles, a group's 196 tiles
                // left a block of 4 rows that cost what 37 rows do, and V was packed for every
                // GEMM. Medians of 5 alternated runs, in three sets: conv4's forward at batch
                // 16 15.8-19.0 -> 11.5-15.9 ms; conv2's 18.4-23.0 -> 17.2-22.0 ms (its output
                // transform, 192 channels, gives back most of the gain); conv2's input gradient
                // at batch 32 51.5-54.5 -> 40.5-41.9 ms
                matmul(ld, o, c, m_xi, false, (v_xi, c as isize, 1), (u_xi, o as isize, 1), Parallelism::None);
            });
            let m = &*m;
            for (i, y_image) in out.chunks_mut(o * ohw).enumerate() {
                for_each_plane_share(y_image, ohw, spread, |first, y_part| {
                    let bias = &b[first..][..y_part.len() / ohw];
                    transform_output::<F, M, R, A>(g, &m[first..], ld, i * tiles, bias, relu, y_part);
                });
            }
        })
    });
    y
}

/// `dW = Σ_n dY[n] ⋆ X[n]` (`[O, C, R, R]`) for a `g` that [`applies`], by the same algorithm
/// read the other way round. Over one MxM block of outputs, `dW[k] = Σ_i dY[i] d[i + k]` is
/// a correlation of the input patch `d` with the block `dY` as the filter, R outputs: the
/// bilinear form behind F(M, R) is symmetric in the output and the filter, so F(R, M) is F(M, R)
/// with `Aᵀ` and `G` swapping roles, `dW = Gᵀ [(A dY Aᵀ) ⊙ (Bᵀ d B)] G`. The sums over
/// the blocks and images go inside the brackets: one GEMM per position ξ,
/// `S[ξ] = Σ_blocks (A dY Aᵀ)[ξ] · V[ξ]`, `[O, blocks] · [blocks, C]`, with `V` the forward's
/// own input transform, then one output transform per kernel. Multiply-adds: 2.25 (3x3) and
/// 2.6 (5x5) times fewer than `dY · P(X)`.
pub(super) fn weight_grad(g: &Geometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    match g.k {
        3 => weight_grad_by::<F2x3, 2, 3, 4>(g, x, dy),
        5 => weight_grad_by::<F2x5, 2, 5, 6>(g, x, dy),
        k => unreachable!("no Winograd algorithm for {k}x{k} kernels: `applies` rules them out"),
    }
}

/// [`weight_grad`] by the algorithm `F`: `S` by [`sum_over_chunks`], each chunk in groups of
/// images whose transforms fit [`GROUP_BYTES`].
fn weight_grad_by<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
    g: &Geometry,
    x: &[f32],
    dy: &[f32],
) -> Vec<f32> {
    let (c, o) = (g.c, g.o);
    let (input, output_grad) = (Tiling::input::<M, A>(g), Tiling::output_grad::<M>(g));
    let tiles = input.tiles();
    let (chw, ohw) = (c * g.h * g.w, g.ohw());
    let per_image = A * A * tiles * (c + o) * std::mem::size_of::<f32>(); // of V and dY's transform
    let group = (GROUP_BYTES / per_image).clamp(1, CHUNK);
    // S[ξ, o, c]; with fewer chunks than cores, each chunk's GEMMs are spread over the cores
    let sums = sum_over_chunks(g.n, A * A * o * c, |images, spread, sums| {
        for first in images.clone().step_by(group) {
            let count = group.min(images.end - first);
            let ld = count * tiles;
            with_scratch(A * A * (c + o) * ld + input.work().max(output_grad.work()), |scratch| {
                let (v, rest) = scratch.split_at_mut(A * A * c * ld);
                let (dy_t, work) = rest.split_at_mut(A * A * o * ld);
                for i in 0..count {
                    let image = first + i;
                    let (x_image, dy_image) = (&x[image * chw..][..chw], &dy[image * o * ohw..][..o * ohw]);
                    input.transform::<InputT<F, M, R, A>, A, A>(x_image, v, ld, i * tiles, work, spread);
                    output_grad.transform::<OutputGrad<F, M, R, A>, A, M>(dy_image, dy_t, ld, i * tiles, work, spread);
                }
                let (v, dy_t) = (&*v, &*dy_t);
                for_each_chunk(sums, o * c, spread, |xi, s_xi| {
                    let (dy_xi, v_xi) = (&dy_t[xi * o * ld..][..o * ld], &v[xi * c * ld..][..c * ld]);
                    // S[ξ][o, c] += (A dY Aᵀ)[ξ][o, blocks] · V[ξ][blocks, c]; both are stored
                    // block-major, channels last
                    matmul(o, c, ld, s_xi, true, (dy_xi, 1, o as isize), (v_xi, c as isize, 1), Parallelism::None);
                });
            })
        }
    });
    kernel_grads::<F, M, R, A>(&sums, o * c)
}

/// `dW[pair] = Gᵀ S[·, pair] G` for each of the `pairs` kernels (`S[ξ, pair]`), `[pair, r, s]`:
/// 16 kernels at a time with AVX-512, tap-major, then turned kernel-major.
fn kernel_grads<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
    sums: &[f32],
    pairs: usize,
) -> Vec<f32> {
    let mut taps = vec![0f32; R * R * pairs]; // taps[(r, s), pair]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // set by the x86 kernels
    let mut first = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx512() {
        first = pairs / avx512::WIDTH * avx512::WIDTH;
        // SAFETY: AVX-512F is present (the level is AVX-512).
        unsafe { avx512::kernel_grads::<F, M, R, A>(sums, &mut taps, first) };
    } else if crate::ops::Isa::avx2() {
        first = pairs / avx2::WIDTH * avx2::WIDTH;
        // SAFETY: AVX2 and FMA are present (the level is at least AVX2).
        unsafe { avx2::kernel_grads::<F, M, R, A>(sums, &mut taps, first) };
    }
    for pair in first..pairs {
        let block = transform_tile::<f32, KernelGrad<F, M, R, A>, R, A>(|xi| sums[xi * pairs + pair]);
        for (r, row) in block.iter().enumerate() {
            for (s, &value) in row.iter().enumerate() {
                taps[(r * R + s) * pairs + pair] = value;
            }
        }
    }
    let mut dw = vec![0f32; pairs * R * R];
    transpose(R * R, pairs, &taps, pairs, &mut dw, R * R);
    dw
}

/// `U[ξ, c, o] = (G g Gᵀ)[ξ]` for each kernel `g`, from the weights turned tap-major so that
/// the kernels lie side by side (16 at a time with AVX-512); a row of ξ (the `A` positions
/// `(i, ·)`, which share `(G g)[i]`) to a task.
fn transform_weights<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
    w: &[f32],
    o: usize,
    c: usize,
) -> Vec<f32> {
    let pairs = o * c;
    // taps[ci, (r, s), oc] = w[oc, ci, r, s], each input channel's block turned on its own core,
    // and both buffers zeroed on all cores: in a training step, where the weights change every
    // time, `U` of conv3 / conv4 / conv5 took 2.5 / 3.2 / 2.2 ms with one transpose of all the
    // weights on one core, 1.6 / 2.5 / 1.4 ms so (means of 8 steps alternated in one process)
    let mut taps = crate::ops::cpu::parallel::zeros(R * R * pairs);
    taps.par_chunks_mut(R * R * o).enumerate().for_each(|(ci, block)| {
        transpose(o, R * R, &w[ci * R * R..], c * R * R, block, o);
    });
    #[cfg(target_arch = "x86_64")]
    let (avx512, avx2) = (crate::ops::Isa::avx512(), crate::ops::Isa::avx2());
    let mut u = crate::ops::cpu::parallel::zeros(A * A * pairs);
    u.par_chunks_mut(A * pairs).enumerate().for_each(|(i, u_row)| {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // set by the x86 kernels
        let mut first = 0;
        // a vector of kernels at a time, all of one input channel
        #[cfg(target_arch = "x86_64")]
        if avx512 && o.is_multiple_of(avx512::WIDTH) {
            first = pairs;
            // SAFETY: AVX-512F is present (the level is AVX-512).
            unsafe { avx512::transform_kernels::<F, M, R, A>(i, &taps, o, u_row) };
        } else if avx2 && o.is_multiple_of(avx2::WIDTH) {
            first = pairs;
            // SAFETY: AVX2 and FMA are present (the level is at least AVX2).
            unsafe { avx2::transform_kernels::<F, M, R, A>(i, &taps, o, u_row) };
        }
        for pair in first..pairs {
            let (ci, oc) = (pair / o, pair % o);
            let g = |r: usize, s: usize| taps[(ci * R * R + r * R + s) * o + oc];
            transform_kernel::<f32, F, M, R, A>(i, g, |j, value| u_row[j * pairs + pair] = value);
        }
    });
    u
}

/// The arithmetic of the transforms, on one value (the portable path) or on a vector of 16
/// (AVX-512): the same operations in the same order, so both give the same bits.
trait Lanes: Copy + Default {
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn scale(self, factor: f32) -> Self;
}

impl Lanes for f32 {
    #[inline(always)]
    fn add(self, other: f32) -> f32 {
        self + other
    }
    #[inline(always)]
    fn sub(self, other: f32) -> f32 {
        self - other
    }
    #[inline(always)]
    fn scale(self, factor: f32) -> f32 {
        self * factor
    }
}

// The helpers below are written with plain loops, not `std::array::from_fn`, which the compiler
// does not inline: they must melt into their AVX-512 caller for the intrinsics to inline too.

/// `Σ_j row[j] x(j)` for a constant `row`: its zeros skipped (`x(j)` not even loaded), its
/// ±1 as additions and subtractions, the rest multiplied; inlined, the tests on the entries
/// fold away.
#[inline(always)]
fn combine<T: Lanes, const COLS: usize>(row: &[f32; COLS], x: impl Fn(usize) -> T) -> T {
    let mut sum: Option<T> = None;
    for (j, &factor) in row.iter().enumerate() {
        sum = match sum {
            _ if factor == 0.0 => sum,
            None if factor == 1.0 => Some(x(j)),
            None => Some(x(j).scale(factor)),
            Some(s) if factor == 1.0 => Some(s.add(x(j))),
            Some(s) if factor == -1.0 => Some(s.sub(x(j))),
            Some(s) => Some(s.add(x(j).scale(factor))),
        };
    }
    sum.unwrap_or_default() // a transform has no zero row
}

/// `matrix · v` for a constant `matrix`.
#[inline(always)]
fn times<T: Lanes, const ROWS: usize, const COLS: usize>(matrix: &[[f32; COLS]; ROWS], v: &[T; COLS]) -> [T; ROWS] {
    let mut out = [T::default(); ROWS];
    for (value, row) in out.iter_mut().zip(matrix) {
        *value = combine(row, |j| v[j]);
    }
    out
}

/// `(K d Kᵀ)[ξ]` of one patch `d` (`COLS`x`COLS`, loaded as `d(r, s)`) for a constant `K`
/// (`Bᵀ` for the input's patches, `A` for the output gradient's blocks), each of the `ROWS²`
/// values handed to `store(ξ, value)`: a row of `K d` at a time, so that only `ROWS + COLS`
/// values are live.
#[inline(always)]
fn transform_patch<T: Lanes, K: Matrix<ROWS, COLS>, const ROWS: usize, const COLS: usize>(
    d: impl Fn(usize, usize) -> T,
    mut store: impl FnMut(usize, T),
) {
    for (r, k_row) in K::K.iter().enumerate() {
        let mut k_d = [T::default(); COLS];
        for (s, value) in k_d.iter_mut().enumerate() {
            *value = combine(k_row, |i| d(i, s));
        }
        for (t, value) in times(&K::K, &k_d).into_iter().enumerate() {
            store(r * ROWS + t, value);
        }
    }
}

/// `K m Kᵀ` for a constant `K` (`Aᵀ`: a tile's MxM outputs; `Gᵀ`: a kernel's RxR weight
/// gradient), `m[ξ]` (`COLS`x`COLS`) loaded as `m(ξ)`: a column of `m` at a time.
#[inline(always)]
fn transform_tile<T: Lanes, K: Matrix<ROWS, COLS>, const ROWS: usize, const COLS: usize>(
    m: impl Fn(usize) -> T,
) -> [[T; ROWS]; ROWS] {
    let mut k_m = [[T::default(); COLS]; ROWS]; // K m
    for s in 0..COLS {
        let mut column = [T::default(); COLS];
        for (i, value) in column.iter_mut().enumerate() {
            *value = m(i * COLS + s);
        }
        for (row, value) in k_m.iter_mut().zip(times(&K::K, &column)) {
            row[s] = value;
        }
    }
    let mut block = [[T::default(); ROWS]; ROWS];
    for (out, k_m_row) in block.iter_mut().zip(&k_m) {
        *out = times(&K::K, k_m_row);
    }
    block
}

/// Row `i` of `G g Gᵀ` for one kernel `g`, loaded as `g(r, s)`, each of the `A` values handed
/// to `store(j, value)`.
#[inline(always)]
fn transform_kernel<T: Lanes, F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
    i: usize,
    g: impl Fn(usize, usize) -> T,
    mut store: impl FnMut(usize, T),
) {
    let mut g_g = [T::default(); R]; // (G g)[i]
    for (s, value) in g_g.iter_mut().enumerate() {
        *value = combine(&F::G[i], |r| g(r, s));
    }
    for (j, value) in times(&F::G, &g_g).into_iter().enumerate() {
        store(j, value);
    }
}

/// Channels the input transform works on at once: one vector of them.
const LANES: usize = 16;

/// Where the patches of a transform lie: `channels` planes of `h`x`w`, zero-padded by `pad`,
/// a `size`x`size` patch every `step` pixels, `tiles_y` by `tiles_x` of them.
struct Tiling {
    channels: usize,
    h: usize,
    w: usize,
    pad: usize,
    step: usize,
    size: usize,
    tiles_y: usize,
    tiles_x: usize,
}

impl Tiling {
    /// The input's AxA patches, one for each MxM block of outputs.
    fn input<const M: usize, const A: usize>(g: &Geometry) -> Tiling {
        let (tiles_y, tiles_x) = (g.oh.div_ceil(M), g.ow.div_ceil(M));
        Tiling { channels: g.c, h: g.h, w: g.w, pad: g.pad, step: M, size: A, tiles_y, tiles_x }
    }

    /// The output gradient's MxM blocks (zero past the map's edge).
    fn output_grad<const M: usize>(g: &Geometry) -> Tiling {
        let (tiles_y, tiles_x) = (g.oh.div_ceil(M), g.ow.div_ceil(M));
        Tiling { channels: g.o, h: g.oh, w: g.ow, pad: 0, step: M, size: M, tiles_y, tiles_x }
    }

    /// Patches (tiles) an image has.
    fn tiles(&self) -> usize {
        self.tiles_y * self.tiles_x
    }

    /// Width of a padded plane, every patch inside.
    fn padded_width(&self) -> usize {
        self.step * self.tiles_x + self.size - self.step
    }

    /// Values per pixel of [`Tiling::transform`]'s padded image: the channels, rounded up to
    /// whole vectors.
    fn pixel_len(&self) -> usize {
        self.channels.next_multiple_of(LANES)
    }

    /// Scratch values [`Tiling::transform`] needs: the padded image, channels-last.
    fn work(&self) -> usize {
        (self.step * self.tiles_y + self.size - self.step) * self.padded_width() * self.pixel_len()
    }

    /// `out[ξ, first + tile, c] = (K d Kᵀ)[ξ]` for every patch `d` of one image's planes
    /// (patch `(ty, tx)` starting at pixel `(step ty - pad, step tx - pad)`, zero outside),
    /// positions ξ `ld * channels` apart. The image goes channels-last into `work` (zero-padded),
    /// so that with AVX-512 every operation works on a vector of 16 channels; a tile's channels
    /// are then transformed one vector after the other, so that each position's values are
    /// written in one unbroken stream. (A vector of channels at a time over all tiles, each
    /// line of `out` was written in 16-value parts far apart in time, and read for each part.)
    /// With `spread`, the rows of `work` and then the rows of tiles are spread over the cores
    /// (conv2 at batch 1, three runs alternated in one process: 1.93-1.98 -> 1.73-1.77 ms).
    #[allow(clippy::too_many_arguments)]
    fn transform<K: Matrix<ROWS, COLS>, const ROWS: usize, const COLS: usize>(
        &self,
        planes: &[f32],
        out: &mut [f32],
        ld: usize,
        first: usize,
        work: &mut [f32],
        spread: bool,
    ) {
        assert_eq!(self.size, COLS);
        let (pw, cp) = (self.padded_width(), self.pixel_len());
        let plane = self.h * self.w;
        let work = &mut work[..self.work()];
        for_each_chunk(work, pw * cp, spread, |r, row| {
            if r < self.pad || r >= self.pad + self.h {
                return row.fill(0.0);
            }
            if cp == self.channels {
                // the transpose below writes every value inside the padding
                row[..self.pad * cp].fill(0.0);
                row[(self.pad + self.w) * cp..].fill(0.0);
            } else {
                row.fill(0.0); // and the lanes past the last channel
            }
            let from = &planes[(r - self.pad) * self.w..];
            transpose(self.channels, self.w, from, plane, &mut row[self.pad * cp..], cp);
        });
        let work = &*work;
        // each position ξ's part of `out` cut into the image's rows of tiles: `rows[ty][ξ]`
        let (row_len, image_len) = (self.tiles_x * self.channels, self.tiles() * self.channels);
        let positions = out.chunks_mut(ld * self.channels).take(ROWS * ROWS);
        let rows =
            pieces_by_index(positions.map(|p| &mut p[first * self.channels..][..image_len]), row_len, self.tiles_y);
        #[cfg(target_arch = "x86_64")]
        let (avx512, avx2) = (crate::ops::Isa::avx512(), crate::ops::Isa::avx2());
        let row_of_tiles = |ty: usize, out: &mut [&mut [f32]]| {
            assert!(out.len() == ROWS * ROWS && out.iter().all(|part| part.len() == row_len));
            for tx in 0..self.tiles_x {
                let at = self.step * (ty * pw + tx);
                for c0 in (0..self.channels).step_by(LANES) {
                    let lanes = LANES.min(self.channels - c0);
                    let patch = &work[at * cp + c0..][..((COLS - 1) * pw + COLS - 1) * cp + LANES];
                    let to = tx * self.channels + c0; // in each position's part
                    #[cfg(target_arch = "x86_64")]
                    if avx512 && lanes == LANES {
                        // SAFETY: AVX-512F is present (the level is AVX-512); each part holds the
                        // row's tiles (asserted above), `to + 16` values.
                        unsafe { avx512::transform_patch::<K, ROWS, COLS>(patch, pw * cp, cp, out, to) };
                        continue;
                    }
                    #[cfg(target_arch = "x86_64")]
                    if avx2 && lanes == LANES {
                        for half in [0, avx2::WIDTH] {
                            // SAFETY: AVX2 and FMA are present (the level is at least AVX2); the
                            // patch and each part hold the channels' values (asserted inside).
                            unsafe {
                                avx2::transform_patch::<K, ROWS, COLS>(&patch[half..], pw * cp, cp, out, to + half)
                            };
                        }
                        continue;
                    }
                    for l in 0..lanes {
                        let d = |r: usize, s: usize| patch[r * pw * cp + s * cp + l];
                        transform_patch::<f32, K, ROWS, COLS>(d, |xi, value| out[xi][to + l] = value);
                    }
                }
            }
        };
        for_each_task(rows.into_iter().enumerate(), spread, || (), |_, (ty, mut out)| row_of_tiles(ty, &mut out));
    }
}

/// One image's output from `M` (`[ξ, tile, o]`, the image's tiles from `first` on): each
/// tile's MxM block `Aᵀ m A` plus the bias (and the ReLU), cropped to the output's size, for
/// the output channels of `b` (`m` and `y` start at the first of them).
fn transform_output<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
    g: &Geometry,
    m: &[f32],
    ld: usize,
    first: usize,
    b: &[f32],
    relu: bool,
    y: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx512() {
        // SAFETY: AVX-512F is present (the level is AVX-512).
        return unsafe { avx512::transform_output::<F, M, R, A>(g, m, ld, first, b, relu, y) };
    }
    // AVX2 takes the channels in groups of 8, the portable path any last few
    #[allow(unused_mut)]
    let mut vectors = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx2() {
        vectors = b.len() / avx2::WIDTH * avx2::WIDTH;
        // SAFETY: AVX2 and FMA are present (the level is at least AVX2); sizes asserted inside.
        unsafe {
            avx2::transform_output::<F, M, R, A>(g, m, ld, first, &b[..vectors], relu, &mut y[..vectors * g.ohw()])
        };
    }
    let (m, b, y) = (&m[vectors..], &b[vectors..], &mut y[vectors * g.ohw()..]);
    let tiles_x = g.ow.div_ceil(M);
    let plane = g.o * ld; // between the positions ξ in `m`
    for (oc, (y_plane, &bias)) in y.chunks_mut(g.ohw()).zip(b).enumerate() {
        for tile in 0..g.oh.div_ceil(M) * tiles_x {
            let at = (first + tile) * g.o + oc;
            let block = transform_tile::<f32, OutputT<F, M, R, A>, M, A>(|xi| m[xi * plane + at]);
            let (oy, ox) = (M * (tile / tiles_x), M * (tile % tiles_x));
            for (r, row) in block.iter().enumerate().take(g.oh - oy) {
                for (s, &value) in row.iter().enumerate().take(g.ow - ox) {
                    let value = value + bias;
                    y_plane[(oy + r) * g.ow + ox + s] = if relu && value < 0.0 { 0.0 } else { value };
                }
            }
        }
    }
}

/// The transforms on vectors of `$width` channels: the same operations in the same order as
/// on one value ([`Lanes`]), for each level's module below.
#[cfg(target_arch = "x86_64")]
macro_rules! vector_transforms {
    ($level:ident, $feature:literal) => {
        /// A vector of channels. Values of this type exist only inside the functions below,
        /// which run where the CPU has the module's target feature.
        #[derive(Clone, Copy)]
        struct Vector(crate::ops::cpu::simd::$level::Vector);

        /// Channels to a vector.
        pub(super) const WIDTH: usize = crate::ops::cpu::simd::$level::LANES;

        impl Default for Vector {
            #[inline(always)]
            fn default() -> Vector {
                // SAFETY: see `Vector`.
                Vector(unsafe { crate::ops::cpu::simd::$level::zero() })
            }
        }

        impl Lanes for Vector {
            #[inline(always)]
            fn add(self, other: Vector) -> Vector {
                // SAFETY: see `Vector`.
                Vector(unsafe { crate::ops::cpu::simd::$level::add(self.0, other.0) })
            }
            #[inline(always)]
            fn sub(self, other: Vector) -> Vector {
                // SAFETY: see `Vector`.
                Vector(unsafe { crate::ops::cpu::simd::$level::sub(self.0, other.0) })
            }
            #[inline(always)]
            fn scale(self, factor: f32) -> Vector {
                // SAFETY: see `Vector`.
                Vector(unsafe {
                    crate::ops::cpu::simd::$level::mul(self.0, crate::ops::cpu::simd::$level::splat(factor))
                })
            }
        }

        /// [`super::transform_kernel`] of all the kernels, `WIDTH` at a time: `taps[ci, (r, s),
        /// oc]` for `o` output channels (a multiple of `WIDTH`), row `i` of `U` stored at
        /// `u_row[j * pairs + pair]`.
        ///
        /// # Safety
        /// The CPU must have the module's target feature.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn transform_kernels<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
            i: usize,
            taps: &[f32],
            o: usize,
            u_row: &mut [f32],
        ) {
            let pairs = taps.len() / (R * R);
            assert!(o.is_multiple_of(WIDTH) && pairs.is_multiple_of(o) && u_row.len() == A * pairs);
            for first in (0..pairs).step_by(WIDTH) {
                let block = &taps[first / o * R * R * o + first % o..];
                let g = |r: usize, s: usize| {
                    Vector(crate::ops::cpu::simd::$level::load(block[(r * R + s) * o..][..WIDTH].as_ptr()))
                };
                let store = |j: usize, value: Vector| {
                    crate::ops::cpu::simd::$level::store(u_row.as_mut_ptr().add(j * pairs + first), value.0)
                };
                super::transform_kernel::<Vector, F, M, R, A>(i, g, store);
            }
        }

        /// [`super::kernel_grads`] of the first `count` kernels (a multiple of `WIDTH`), `WIDTH`
        /// at a time.
        ///
        /// # Safety
        /// The CPU must have the module's target feature.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn kernel_grads<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
            sums: &[f32],
            taps: &mut [f32],
            count: usize,
        ) {
            let pairs = taps.len() / (R * R);
            assert!(count.is_multiple_of(WIDTH) && count <= pairs && sums.len() == A * A * pairs);
            for first in (0..count).step_by(WIDTH) {
                let s = |xi: usize| Vector(crate::ops::cpu::simd::$level::load(sums.as_ptr().add(xi * pairs + first)));
                let block = transform_tile::<Vector, KernelGrad<F, M, R, A>, R, A>(s);
                for (r, row) in block.iter().enumerate() {
                    for (t, value) in row.iter().enumerate() {
                        crate::ops::cpu::simd::$level::store(
                            taps.as_mut_ptr().add((r * R + t) * pairs + first),
                            value.0,
                        );
                    }
                }
            }
        }

        /// [`super::transform_patch`] of one patch of `WIDTH` channels: `d(r, s)` at `patch[r *
        /// row + s * pixel..]`, value ξ stored at `out[ξ][at..]`, where the caller makes sure
        /// that every `out[ξ]` holds `at + WIDTH` values.
        ///
        /// # Safety
        /// The CPU must have the module's target feature.
        #[target_feature(enable = $feature)]
        pub(super) unsafe fn transform_patch<K: Matrix<ROWS, COLS>, const ROWS: usize, const COLS: usize>(
            patch: &[f32],
            row: usize,
            pixel: usize,
            out: &mut [&mut [f32]],
            at: usize,
        ) {
            assert!(patch.len() >= (COLS - 1) * (row + pixel) + WIDTH && out.len() == ROWS * ROWS);
            assert!(out.iter().all(|part| part.len() >= at + WIDTH));
            let d = |r: usize, s: usize| {
                Vector(crate::ops::cpu::simd::$level::load(patch.as_ptr().add(r * row + s * pixel)))
            };
            let store =
                |xi: usize, value: Vector| crate::ops::cpu::simd::$level::store(out[xi].as_mut_ptr().add(at), value.0);
            super::transform_patch::<Vector, K, ROWS, COLS>(d, store);
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{transform_tile, Geometry, KernelGrad, Lanes, Matrix, Minimal, OutputT};
    use crate::ops::cpu::simd::avx512 as level;
    use std::arch::x86_64::*;

    vector_transforms!(avx512, "avx512f");

    /// [`super::transform_output`] with 16 output channels to a vector (they lie side by side
    /// in each row of `M`), each output of a tile scattered to its place in the 16 planes.
    /// (Staged channels-last and transposed into the planes instead, it took as long.)
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transform_output<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
        g: &Geometry,
        m: &[f32],
        ld: usize,
        first: usize,
        b: &[f32],
        relu: bool,
        y: &mut [f32],
    ) {
        let (tiles_x, ohw) = (g.ow.div_ceil(M), g.ohw());
        let tiles = g.oh.div_ceil(M) * tiles_x;
        let plane = g.o * ld; // between the positions ξ in `m`
        assert!(b.len() <= g.o && m.len() >= (A * A - 1) * plane + (first + tiles - 1) * g.o + b.len());
        assert!(y.len() == b.len() * ohw && y.len() < 1 << 31);
        // lane l of a vector goes to plane l
        let planes = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(ohw as i32),
        );
        for tile in 0..tiles {
            let (oy, ox) = (M * (tile / tiles_x), M * (tile % tiles_x));
            for c0 in (0..b.len()).step_by(16) {
                let lanes = level::first(b.len() - c0);
                let bias = _mm512_maskz_loadu_ps(lanes, b.as_ptr().add(c0));
                let at = (first + tile) * g.o + c0;
                let m = |xi: usize| Vector(_mm512_maskz_loadu_ps(lanes, m.as_ptr().add(xi * plane + at)));
                let block = transform_tile::<Vector, OutputT<F, M, R, A>, M, A>(m);
                for (r, row) in block.iter().enumerate().take(g.oh - oy) {
                    for (s, value) in row.iter().enumerate().take(g.ow - ox) {
                        let mut value = _mm512_add_ps(value.0, bias);
                        if relu {
                            value = level::relu(value);
                        }
                        let pixel = _mm512_set1_epi32(((oy + r) * g.ow + ox + s) as i32);
                        let index = _mm512_add_epi32(planes, pixel);
                        _mm512_mask_i32scatter_ps::<4>(y.as_mut_ptr().add(c0 * ohw).cast(), lanes, index, value);
                    }
                }
            }
        }
    }
}

/// The same with AVX2: 8 channels to a vector; the output transform stores each lane to its
/// plane (AVX2 has no scatter).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{transform_tile, Geometry, KernelGrad, Lanes, Matrix, Minimal, OutputT};
    use std::arch::x86_64::*;

    vector_transforms!(avx2, "avx2,fma");

    /// [`super::transform_output`] for the output channels `b` from the first on in groups of
    /// 8 (the caller takes any last few): each output of a tile, bias added (and the ReLU),
    /// stored lane by lane to its place in the 8 planes.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_output<F: Minimal<M, R, A>, const M: usize, const R: usize, const A: usize>(
        g: &Geometry,
        m: &[f32],
        ld: usize,
        first: usize,
        b: &[f32],
        relu: bool,
        y: &mut [f32],
    ) {
        let (tiles_x, ohw) = (g.ow.div_ceil(M), g.ohw());
        let tiles = g.oh.div_ceil(M) * tiles_x;
        let plane = g.o * ld; // between the positions ξ in `m`
        let whole = b.len() / WIDTH * WIDTH;
        assert!(b.len() <= g.o && m.len() >= (A * A - 1) * plane + (first + tiles - 1) * g.o + b.len());
        assert!(y.len() == b.len() * ohw);
        for tile in 0..tiles {
            let (oy, ox) = (M * (tile / tiles_x), M * (tile % tiles_x));
            for c0 in (0..whole).step_by(WIDTH) {
                let bias = _mm256_loadu_ps(b.as_ptr().add(c0));
                let at = (first + tile) * g.o + c0;
                let m = |xi: usize| Vector(_mm256_loadu_ps(m.as_ptr().add(xi * plane + at)));
                let block = transform_tile::<Vector, OutputT<F, M, R, A>, M, A>(m);
                for (r, row) in block.iter().enumerate().take(g.oh - oy) {
                    for (s, value) in row.iter().enumerate().take(g.ow - ox) {
                        let mut value = _mm256_add_ps(value.0, bias);
                        if relu {
                            value = crate::ops::cpu::simd::avx2::relu(value);
                        }
                        let mut lanes = [0f32; WIDTH];
                        _mm256_storeu_ps(lanes.as_mut_ptr(), value);
                        let pixel = (oy + r) * g.ow + ox + s;
                        for (l, &v) in lanes.iter().enumerate() {
                            y[(c0 + l) * ohw + pixel] = v;
                        }
                    }
                }
            }
        }
    }
}
