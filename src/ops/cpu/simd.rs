//! A vector of f32 lanes (and one of i32) at each x86-64 level, under the same names: the kernels that have a
//! form for each level are written once, in a macro that stamps out a module per level, and that
//! module `use`s one of these (`use crate::ops::cpu::simd::avx2::*`). Every function carries its
//! level's target feature and is `#[inline]`, so it melts into a kernel built for that feature
//! (and only there: calling one elsewhere is what `unsafe` guards).
//!
//! The two levels compute the same thing lane by lane: a kernel that sums each output in one
//! lane, in a fixed order, gives the same bits at either width.

/// Defines a function whose body is compiled three times, for baseline x86-64 (what the crate
/// is built for), AVX2 + FMA and AVX-512, the one for [`Isa::current`] run: for the elementwise
/// kernels, whose loops the compiler then vectorises 8 or 16 lanes wide. Without FMA
/// contraction or fast-math all three give the same bits.
macro_rules! wide_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            if crate::ops::Isa::avx512() {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                // SAFETY: the CPU has AVX-512F (the level is AVX-512).
                return unsafe { avx512($($arg),*) };
            }
            #[cfg(target_arch = "x86_64")]
            if crate::ops::Isa::avx2() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                // SAFETY: the CPU has AVX2 and FMA (the level is at least AVX2).
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
pub(crate) use wide_fn;

/// Generates a level's module: `$vector` of `$lanes` f32, its intrinsics, and its way of
/// loading and storing only the first lanes of a vector (a row's tail); `$integers`, the same
/// lanes as i32, and the few integer intrinsics the exact kernels use.
macro_rules! level {
    ($(#[$meta:meta])* $name:ident, $feature:literal, $vector:ty, $lanes:literal,
     zero: $zero:ident, splat: $splat:ident, load: $load:ident, store: $store:ident,
     fmadd: $fmadd:ident, add: $add:ident, sub: $sub:ident, mul: $mul:ident, div: $div:ident,
     max: $max:ident, masked: $masked:ident,
     integers: $integers:ty, splat_i32: $splat_i32:ident, load_i32: $load_i32:ident, store_i32: $store_i32:ident,
     add_i32: $add_i32:ident, mul_i32: $mul_i32:ident, shift_right_i32: $sra_i32:ident,
     shift_left_i32: $sll_i32:ident, and_i32: $and_i32:ident, or_i32: $or_i32:ident,
     min_i32: $min_i32:ident, max_i32: $max_i32:ident) => {
        $(#[$meta])*
        #[cfg(target_arch = "x86_64")]
        #[allow(dead_code)] // each kernel uses what it needs
        pub(crate) mod $name {
            use super::$masked as masked;
            pub(crate) use masked::Mask;
            use std::arch::x86_64::*;

            /// The target feature this level's kernels are built for.
            pub(crate) const FEATURE: &str = $feature;
            pub(crate) const LANES: usize = $lanes;
            pub(crate) type Vector = $vector;
            /// `LANES` i32, for the kernels that compute in integers (exact at every level).
            pub(crate) type Integers = $integers;

            /// # Safety (every function here)
            /// The CPU must have this level's target feature; pointers must be valid for the
            /// lanes read or written.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn zero() -> Vector {
                $zero()
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn splat(value: f32) -> Vector {
                $splat(value)
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn load(from: *const f32) -> Vector {
                $load(from)
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn store(to: *mut f32, v: Vector) {
                $store(to, v)
            }

            /// `a * b + c`, rounded once.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn fmadd(a: Vector, b: Vector, c: Vector) -> Vector {
                $fmadd(a, b, c)
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn add(a: Vector, b: Vector) -> Vector {
                $add(a, b)
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn sub(a: Vector, b: Vector) -> Vector {
                $sub(a, b)
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn mul(a: Vector, b: Vector) -> Vector {
                $mul(a, b)
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn div(a: Vector, b: Vector) -> Vector {
                $div(a, b)
            }

            /// [`crate::ops::gemm::relu_in_place`]'s rule, for kernels that apply the ReLU as
            /// their sums leave the registers: `maxps(0, v)` is `v` for `v >= 0`, `-0` and NaN,
            /// else 0.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn relu(v: Vector) -> Vector {
                $max($zero(), v)
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn splat_i32(value: i32) -> Integers {
                $splat_i32(value)
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn load_i32(from: *const i32) -> Integers {
                $load_i32(from.cast())
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn store_i32(to: *mut i32, v: Integers) {
                $store_i32(to.cast(), v)
            }

            /// Lane by lane, wrapping.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn add_i32(a: Integers, b: Integers) -> Integers {
                $add_i32(a, b)
            }

            /// The low 32 bits of each lane's product.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn mul_i32(a: Integers, b: Integers) -> Integers {
                $mul_i32(a, b)
            }

            /// Each lane shifted right by `bits`, the sign bit shifted in (Rust's `>>` on i32).
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn shift_right_i32(v: Integers, bits: u32) -> Integers {
                $sra_i32(v, _mm_cvtsi32_si128(bits as i32))
            }

            /// Each lane shifted left by `bits`.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn shift_left_i32(v: Integers, bits: u32) -> Integers {
                $sll_i32(v, _mm_cvtsi32_si128(bits as i32))
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn and_i32(a: Integers, b: Integers) -> Integers {
                $and_i32(a, b)
            }

            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn or_i32(a: Integers, b: Integers) -> Integers {
                $or_i32(a, b)
            }

            /// Each lane clamped to `low..=high`.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn clamp_i32(v: Integers, low: Integers, high: Integers) -> Integers {
                $min_i32($max_i32(v, low), high)
            }

            /// Asks for the cache line at `at` to be brought into L1.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn prefetch(at: *const f32) {
                _mm_prefetch::<_MM_HINT_T0>(at.cast())
            }

            /// The mask of the first `count` lanes (all from `LANES` on), made once for a
            /// row's tail and used by [`load_masked`] and [`store_masked`].
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn first(count: usize) -> masked::Mask {
                masked::first(count)
            }

            /// The lanes of `mask` from `from`, the others 0; memory past them is not touched.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn load_masked(from: *const f32, mask: masked::Mask) -> Vector {
                masked::load(from, mask)
            }

            /// The lanes of `mask` of `v` to `to`; memory past them is not touched.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn store_masked(to: *mut f32, v: Vector, mask: masked::Mask) {
                masked::store(to, v, mask)
            }

            /// The first `count` lanes from `from` (all from `LANES` on), the others 0; memory
            /// past them is not touched.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn load_first(from: *const f32, count: usize) -> Vector {
                if count >= LANES {
                    return $load(from);
                }
                masked::load(from, masked::first(count))
            }

            /// The first `count` lanes of `v` to `to` (all from `LANES` on); memory past them
            /// is not touched.
            #[inline]
            #[target_feature(enable = $feature)]
            pub(crate) unsafe fn store_first(to: *mut f32, v: Vector, count: usize) {
                if count >= LANES {
                    return $store(to, v);
                }
                masked::store(to, v, masked::first(count))
            }
        }
    };
}

level!(
    /// AVX-512F: 16 lanes, tails by mask registers.
    avx512, "avx512f", __m512, 16,
    zero: _mm512_setzero_ps, splat: _mm512_set1_ps, load: _mm512_loadu_ps, store: _mm512_storeu_ps,
    fmadd: _mm512_fmadd_ps, add: _mm512_add_ps, sub: _mm512_sub_ps, mul: _mm512_mul_ps, div: _mm512_div_ps,
    max: _mm512_max_ps, masked: masked_avx512,
    integers: __m512i, splat_i32: _mm512_set1_epi32, load_i32: _mm512_loadu_si512, store_i32: _mm512_storeu_si512,
    add_i32: _mm512_add_epi32, mul_i32: _mm512_mullo_epi32, shift_right_i32: _mm512_sra_epi32,
    shift_left_i32: _mm512_sll_epi32, and_i32: _mm512_and_si512, or_i32: _mm512_or_si512,
    min_i32: _mm512_min_epi32, max_i32: _mm512_max_epi32
);

level!(
    /// AVX2 with FMA: 8 lanes, tails by `vmaskmovps`.
    avx2, "avx2,fma", __m256, 8,
    zero: _mm256_setzero_ps, splat: _mm256_set1_ps, load: _mm256_loadu_ps, store: _mm256_storeu_ps,
    fmadd: _mm256_fmadd_ps, add: _mm256_add_ps, sub: _mm256_sub_ps, mul: _mm256_mul_ps, div: _mm256_div_ps,
    max: _mm256_max_ps, masked: masked_avx2,
    integers: __m256i, splat_i32: _mm256_set1_epi32, load_i32: _mm256_loadu_si256, store_i32: _mm256_storeu_si256,
    add_i32: _mm256_add_epi32, mul_i32: _mm256_mullo_epi32, shift_right_i32: _mm256_sra_epi32,
    shift_left_i32: _mm256_sll_epi32, and_i32: _mm256_and_si256, or_i32: _mm256_or_si256,
    min_i32: _mm256_min_epi32, max_i32: _mm256_max_epi32
);

/// The masked loads and stores of each level.
#[cfg(target_arch = "x86_64")]
mod masked_avx512 {
    use std::arch::x86_64::*;

    pub(crate) type Mask = __mmask16;

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn first(count: usize) -> Mask {
        ((1u32 << count.min(16)) - 1) as u16
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn load(from: *const f32, mask: Mask) -> __m512 {
        _mm512_maskz_loadu_ps(mask, from)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn store(to: *mut f32, v: __m512, mask: Mask) {
        _mm512_mask_storeu_ps(to, mask, v)
    }
}

#[cfg(target_arch = "x86_64")]
mod masked_avx2 {
    use std::arch::x86_64::*;

    /// Lanes below the count all ones (their sign bit set), the rest 0.
    pub(crate) type Mask = __m256i;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn first(count: usize) -> Mask {
        let count = count.min(8) as i32;
        _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn load(from: *const f32, mask: Mask) -> __m256 {
        _mm256_maskload_ps(from, mask)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn store(to: *mut f32, v: __m256, mask: Mask) {
        _mm256_maskstore_ps(to, mask, v)
    }
}
