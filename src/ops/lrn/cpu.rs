//! LRN on the CPU: a pass over each (image, channel) plane, the denominators summed in
//! PyTorch's order, and for beta = 0.75 (AlexNet's) kernels at AVX-512 and AVX2 + FMA.

use rayon::prelude::*;

use super::Lrn;
use crate::ops::cpu::parallel::zeros;

impl Lrn {
    /// `k + alpha * mean(a_j^2 over the window)` for one channel `ch` of an image `img`
    /// (`c` planes of `plane` values), computed the way PyTorch does (sum, divide by size,
    /// scale, add k), written to `out`.
    #[inline(always)]
    fn denominators(&self, img: &[f32], ch: usize, c: usize, plane: usize, out: &mut [f32]) {
        let (below, above) = self.reach();
        out.fill(0.0);
        for j in ch.saturating_sub(below)..=(ch + above).min(c - 1) {
            for (o, &v) in out.iter_mut().zip(&img[j * plane..(j + 1) * plane]) {
                *o += v * v;
            }
        }
        let inv = self.size as f32;
        for o in out.iter_mut() {
            *o = *o / inv * self.alpha + self.k;
        }
    }

    /// `s^-beta`; for the usual beta = 0.75 as `1 / (sqrt(s) sqrt(sqrt(s)))`, several times
    /// faster than `powf` and within an ulp or two of it.
    #[inline(always)]
    fn pow_neg_beta(&self, s: f32) -> f32 {
        if self.beta == 0.75 {
            let r = s.sqrt();
            1.0 / (r * r.sqrt())
        } else {
            s.powf(-self.beta)
        }
    }
}

/// `y = x · s^-beta` for `[n, c, h, w]` values `x`: one task per (image, channel) plane,
/// enough work for every core at any batch size.
pub(super) fn forward(p: &Lrn, (n, c, h, w): (usize, usize, usize, usize), x: &[f32]) -> Vec<f32> {
    let plane = h * w;
    let mut y = zeros(x.len());
    y.par_chunks_mut(plane).enumerate().take(n * c).for_each_init(
        || vec![0f32; plane],
        |scale, (i, out)| normalise_plane(p, &x[(i / c) * c * plane..][..c * plane], i % c, scale, out),
    );
    y
}

/// dL/dx given `x` and dL/dy `g`, both `[n, c, h, w]`.
pub(super) fn backward(p: &Lrn, (n, c, h, w): (usize, usize, usize, usize), x: &[f32], g: &[f32]) -> Vec<f32> {
    let plane = h * w;
    let (below, above) = p.reach();
    let coeff = 2.0 * p.beta * p.alpha / p.size as f32;
    // Pass 1, per plane: s^-beta and t_i = g_i x_i s_i^(-beta-1).
    let mut pow = zeros(x.len());
    let mut t = zeros(x.len());
    pow.par_chunks_mut(plane).zip(t.par_chunks_mut(plane)).enumerate().take(n * c).for_each_init(
        || vec![0f32; plane],
        |scale, (i, (pow, t))| {
            let at = i * plane..(i + 1) * plane;
            let img = &x[(i / c) * c * plane..][..c * plane];
            backward_factors(p, img, i % c, &g[at], scale, pow, t)
        },
    );
    // Pass 2, per plane: channel j is in the window of channels i in [j - above, j + below].
    let mut grad = zeros(x.len());
    grad.par_chunks_mut(plane).enumerate().take(n * c).for_each_init(
        || vec![0f32; plane],
        |acc, (i, out)| {
            let (img, j) = (i / c, i % c);
            acc.fill(0.0);
            for ci in j.saturating_sub(above)..=(j + below).min(c - 1) {
                let src = &t[(img * c + ci) * plane..][..plane];
                for (a, &v) in acc.iter_mut().zip(src) {
                    *a += v;
                }
            }
            let at = i * plane..(i + 1) * plane;
            for (q, o) in out.iter_mut().enumerate() {
                let k = at.start + q;
                *o = g[k] * pow[k] - coeff * x[k] * acc[q];
            }
        },
    );
    grad
}

crate::ops::cpu::simd::wide_fn! {
    /// Channel `ch` of one image (`img`, its planes one after another) normalised into `out`.
    pub(in crate::ops) fn normalise_plane(p: &Lrn, img: &[f32], ch: usize, scale: &mut [f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if p.beta == 0.75 && crate::ops::Isa::avx2() {
            let normalise = if crate::ops::Isa::avx512() { avx512::normalise } else { avx2::normalise };
            // SAFETY: the CPU has the kernel's level.
            return unsafe { normalise(p, img, ch, out) };
        }
        let plane = out.len();
        p.denominators(img, ch, img.len() / plane, plane, scale);
        let x = &img[ch * plane..(ch + 1) * plane];
        for ((o, &v), &s) in out.iter_mut().zip(x).zip(scale.iter()) {
            *o = v * p.pow_neg_beta(s);
        }
    }
}

crate::ops::cpu::simd::wide_fn! {
    /// For channel `ch` of one image (`img`) with output gradient `g`: `s^-beta` into `pow` and
    /// `g x s^(-beta-1)` into `t`.
    fn backward_factors(p: &Lrn, img: &[f32], ch: usize, g: &[f32], scale: &mut [f32], pow: &mut [f32], t: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if p.beta == 0.75 && crate::ops::Isa::avx2() {
            let factors = if crate::ops::Isa::avx512() { avx512::backward_factors } else { avx2::backward_factors };
            // SAFETY: the CPU has the kernel's level.
            return unsafe { factors(p, img, ch, g, pow, t) };
        }
        let plane = g.len();
        p.denominators(img, ch, img.len() / plane, plane, scale);
        let x = &img[ch * plane..(ch + 1) * plane];
        for (((p_, t), &s), (&xv, &gv)) in pow.iter_mut().zip(t.iter_mut()).zip(scale.iter()).zip(x.iter().zip(g)) {
            *p_ = p.pow_neg_beta(s);
            *t = gv * xv * (*p_ / s);
        }
    }
}

/// The kernels for beta = 0.75, a vector at a time, written once for a vector width (AVX-512:
/// 16 values, AVX2 + FMA: 8): the denominators in registers (the scalar path's order of
/// operations), and no divider: two square roots and a division per value kept it busy (2.7
/// cycles a value, most of LRN's time). `s^-1/2 = r`, `s^-3/4 = r² · r^-1/2`, `1/s = r²`, with
/// `r` from the level's reciprocal square root estimate refined by Newton's steps
/// ([`avx512_steps::rsqrt`], [`avx2_steps::rsqrt`]): within a few ulp of the correctly rounded
/// root, so the levels' last bits may differ.
macro_rules! lrn_kernels {
    ($name:ident, $level:ident, $steps:ident, $feature:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            use super::$steps::rsqrt;
            use super::Lrn;
            use crate::ops::cpu::simd::$level::*;

            /// For every vector of channel `ch`'s plane (the last one part): `f(count, offset,
            /// s)`, `s` the denominators of [`Lrn::denominators`] for the first `count` lanes.
            ///
            /// # Safety
            /// The CPU must have the target feature this function is compiled for; the sizes it
            /// reads and writes are asserted here or by its caller.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn each_vector(
                p: &Lrn,
                img: &[f32],
                ch: usize,
                plane: usize,
                mut f: impl FnMut(usize, usize, Vector),
            ) {
                let c = img.len() / plane;
                let (below, above) = p.reach();
                let window = ch.saturating_sub(below)..=(ch + above).min(c - 1);
                assert!(ch < c && img.len() == c * plane);
                let (size, alpha, k) = (splat(p.size as f32), splat(p.alpha), splat(p.k));
                for at in (0..plane).step_by(LANES) {
                    let count = plane - at;
                    let mut sum = zero();
                    for j in window.clone() {
                        let v = load_first(img.as_ptr().add(j * plane + at), count);
                        sum = add(sum, mul(v, v));
                    }
                    f(count, at, add(mul(div(sum, size), alpha), k));
                }
            }

            /// `out = x · s^-3/4` for channel `ch` of one image.
            ///
            /// # Safety
            /// The CPU must have the level's feature.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn normalise(p: &Lrn, img: &[f32], ch: usize, out: &mut [f32]) {
                let plane = out.len();
                let x = &img[ch * plane..][..plane];
                each_vector(p, img, ch, plane, |count, at, s| {
                    let r = rsqrt(s);
                    let pow = mul(mul(r, r), rsqrt(r));
                    let y = mul(load_first(x.as_ptr().add(at), count), pow);
                    store_first(out.as_mut_ptr().add(at), y, count);
                });
            }

            /// `pow = s^-3/4`, `t = g · x · s^-7/4` for channel `ch` of one image.
            ///
            /// # Safety
            /// The CPU must have the level's feature.
            #[target_feature(enable = $feature)]
            pub(super) unsafe fn backward_factors(
                p: &Lrn,
                img: &[f32],
                ch: usize,
                g: &[f32],
                pow: &mut [f32],
                t: &mut [f32],
            ) {
                let plane = g.len();
                assert!(pow.len() == plane && t.len() == plane);
                let x = &img[ch * plane..][..plane];
                each_vector(p, img, ch, plane, |count, at, s| {
                    let r = rsqrt(s);
                    let inv_s = mul(r, r);
                    let p = mul(inv_s, rsqrt(r));
                    let gx = mul(load_first(g.as_ptr().add(at), count), load_first(x.as_ptr().add(at), count));
                    store_first(pow.as_mut_ptr().add(at), p, count);
                    store_first(t.as_mut_ptr().add(at), mul(gx, mul(p, inv_s)), count);
                });
            }
        }
    };
}

lrn_kernels!(avx512, avx512, avx512_steps, "avx512f");
lrn_kernels!(avx2, avx2, avx2_steps, "avx2,fma");

/// The steps [`lrn_kernels`] takes at AVX-512: `rsqrt14` (14 bits) and one Newton step. Each
/// function's `unsafe`: the CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
mod avx512_steps {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rsqrt(x: __m512) -> __m512 {
        let y = _mm512_rsqrt14_ps(x);
        let half_x = _mm512_mul_ps(x, _mm512_set1_ps(0.5));
        _mm512_mul_ps(y, _mm512_fnmadd_ps(half_x, _mm512_mul_ps(y, y), _mm512_set1_ps(1.5)))
    }
}

/// The same at AVX2: `rsqrtps` (12 bits) and two Newton steps, as close as AVX-512's one. Each
/// function's `unsafe`: the CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
mod avx2_steps {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn rsqrt(x: __m256) -> __m256 {
        let half_x = _mm256_mul_ps(x, _mm256_set1_ps(0.5));
        let newton = |y: __m256| _mm256_mul_ps(y, _mm256_fnmadd_ps(half_x, _mm256_mul_ps(y, y), _mm256_set1_ps(1.5)));
        newton(newton(_mm256_rsqrt_ps(x)))
    }
}
