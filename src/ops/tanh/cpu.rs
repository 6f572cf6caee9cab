//! tanh on the CPU. Each value is computed in f64 from one exponential and rounded once to
//! f32: `tanh(a) = m / (m + 2)` with `m = e^(2a) - 1`, and `e^(2a) = 2^k e^r` (`|r| <= ln 2 / 2`,
//! `e^r - 1` by its Taylor series to the 12th power). The f64 result is within about 1e-15 of
//! the exact value, so the f32 is the correctly rounded tanh unless the exact value lies within
//! that of halfway between two floats, and then 1 ulp off at most (`tests`: equal to Rust's f64
//! `tanh` rounded to f32 at each of 156 million floats in [0, 10]). Only `+ - * /`, conversions
//! and bit operations, no branches: the loop vectorises at every level, with the same bits.

use rayon::prelude::*;

/// Values a task: large enough to amortise the handing out, small enough for 2+ cores.
const CHUNK: usize = 1 << 14;

/// `tanh` of every value.
pub(super) fn forward(x: &[f32]) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len());
    y.spare_capacity_mut()[..x.len()].par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| tanh_into(x, y));
    // SAFETY: tanh_into wrote every value
    unsafe { y.set_len(x.len()) };
    y
}

/// `g * (1 - y * y)`, in that order (Candle's and PyTorch's bits).
pub(super) fn backward(y: &[f32], g: &[f32]) -> Vec<f32> {
    assert_eq!(y.len(), g.len(), "tanh's output and its gradient differ in length");
    let mut out = Vec::with_capacity(y.len());
    out.spare_capacity_mut()[..y.len()]
        .par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
        .for_each(|(out, (y, g))| backward_into(y, g, out));
    // SAFETY: backward_into wrote every value
    unsafe { out.set_len(y.len()) };
    out
}

crate::ops::cpu::simd::wide_fn! {
    fn tanh_into(x: &[f32], y: &mut [std::mem::MaybeUninit<f32>]) {
        for (y, &x) in y.iter_mut().zip(x) {
            y.write(tanh(x));
        }
    }
}

crate::ops::cpu::simd::wide_fn! {
    fn backward_into(y: &[f32], g: &[f32], out: &mut [std::mem::MaybeUninit<f32>]) {
        for ((o, &y), &g) in out.iter_mut().zip(y).zip(g) {
            o.write(g * (1.0 - y * y));
        }
    }
}

/// tanh(x) rounded to f32 (see the module's note); NaN for NaN, ±1 for ±inf, -0 for -0.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    // From 10 on, tanh is 1 - 4.1e-9 or nearer: 1 in f32. (`a > 10` is false for NaN, which
    // passes through.)
    let a = x.abs() as f64;
    let a = if a > 10.0 { 10.0 } else { a };
    let y = 2.0 * a;
    // k = round(y / ln 2), from the low bits of y / ln 2 + 1.5 * 2^52 (exact: 0 <= k <= 29)
    const ROUNDER: f64 = 6755399441055744.0;
    let shifted = y * std::f64::consts::LOG2_E + ROUNDER;
    let k = shifted - ROUNDER;
    let two_k = f64::from_bits((shifted.to_bits().wrapping_sub(ROUNDER.to_bits()).wrapping_add(1023)) << 52);
    // r = y - k ln 2 with ln 2 in two parts (fdlibm's): k * LN2_HI is exact
    const LN2_HI: f64 = f64::from_bits(0x3FE6_2E42_FEE0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3DEA_39EF_3579_3C76);
    let r = (y - k * LN2_HI) - k * LN2_LO;
    // e^r - 1 = r (1 + r/2! + ... + r^11/12!), |r| <= 0.347: the first term left out is
    // below 5e-16 of the sum
    const C: [f64; 12] = [
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
        1.0 / 40320.0,
        1.0 / 362880.0,
        1.0 / 3628800.0,
        1.0 / 39916800.0,
        1.0 / 479001600.0,
    ];
    let mut p = C[11];
    for c in C[..11].iter().rev() {
        p = p * r + c;
    }
    let em1_r = p * r;
    // e^y - 1 = 2^k (e^r - 1) + (2^k - 1), no cancellation worth a bit for k >= 1
    let m = two_k * em1_r + (two_k - 1.0);
    ((m / (m + 2.0)) as f32).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 7th float from 0 to 10 (156 million of the 1.09 billion) and beyond: equal to
    /// f64 tanh rounded to f32 (the f64 result would have to lie within ~1e-15 of halfway
    /// between two floats to round otherwise, and none of these does), and odd. Also counts
    /// where the C library's `tanhf` (what Candle's CPU `tanh` calls) gives other bits.
    #[test]
    fn tanh_is_f64_tanh_rounded_to_f32() {
        if std::env::var_os(crate::ops::ISA_VARIABLE).is_some() {
            return; // the scalar function, the same at every level: once is enough
        }
        let (mut n, mut libm_off) = (0u64, 0u64);
        let end = 10f32.to_bits();
        for bits in (0..=end).step_by(7).chain([end, (end + 1), 20f32.to_bits(), f32::MAX.to_bits()]) {
            let x = f32::from_bits(bits);
            let (ours, exact) = (tanh(x), (x as f64).tanh() as f32);
            assert_eq!(ours.to_bits(), exact.to_bits(), "tanh({x:e}) = {ours:e}, f64 tanh rounded {exact:e}");
            assert_eq!(tanh(-x).to_bits(), (-ours).to_bits(), "odd at {x:e}");
            libm_off += (x.tanh() != ours) as u64;
            n += 1;
        }
        eprintln!("{n} values; the C library's tanhf differs at {libm_off}");
    }

    #[test]
    fn tanh_of_special_values() {
        assert!(tanh(f32::NAN).is_nan());
        assert_eq!(tanh(f32::INFINITY), 1.0);
        assert_eq!(tanh(f32::NEG_INFINITY), -1.0);
        assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(tanh(f32::MIN_POSITIVE / 4.0), f32::MIN_POSITIVE / 4.0); // subnormal
    }

    /// The kernels give the scalar function's bits (at every level: `cpu::isa`'s tests run
    /// these again at each level below the best).
    #[test]
    fn forward_and_backward_are_the_scalar_function() {
        let x: Vec<f32> = (0..100_003).map(|i| ((i as f32) * 0.37).sin() * 12.0).collect();
        let y = forward(&x);
        for (&x, &y) in x.iter().zip(&y) {
            assert_eq!(y.to_bits(), tanh(x).to_bits());
        }
        let g: Vec<f32> = x.iter().map(|x| x.cos()).collect();
        for ((o, &y), &g) in backward(&y, &g).iter().zip(&y).zip(&g) {
            assert_eq!(o.to_bits(), (g * (1.0 - y * y)).to_bits());
        }
    }
}
