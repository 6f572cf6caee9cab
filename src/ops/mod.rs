//! The layers AlexNet needs that Candle lacks, each with a forward and a backward pass.
//!
//! * [`lrn`]: local response normalisation across channels, in both the paper's and
//!   Caffe's/PyTorch's conventions.
//! * [`max_pool2d`]: max-pooling with a backward for overlapping windows (Candle's
//!   `max_pool2d_with_stride` has none when kernel != stride); ties go where PyTorch sends them.
//! * [`lrn_max_pool2d`]: LRN then max-pooling in one pass, for inference.
//! * [`adaptive_avg_pool2d`]: torchvision's `AdaptiveAvgPool2d`.
//! * [`conv2d`]: convolution + bias as im2col and packed GEMM (3x3 and 5x5 stride 1 by Winograd),
//!   forward and backward (Candle's CPU convolution backward runs without GEMM and always
//!   computes the input gradient), [`conv2d_relu`] with the ReLU fused in, and
//!   [`conv2d_prepared`] for weights that no longer change ([`Prepared`]).
//! * [`linear`], [`linear_relu`]: a fully-connected layer as one op, so its backward hands
//!   Candle each gradient once; [`linear_prepared`] for weights that no longer change.
//! * [`Isa`]: the CPU's instruction-set level, asked once; every kernel with a level-specific
//!   form asks it.
//! * [`backward`]: `loss.backward()` with the gradients of those two ops' parameters put in
//!   the store directly rather than added to zeros.
//!
//! The CPU kernels take contiguous f32 NCHW tensors; the public functions make their input
//! contiguous first, so callers never have to. On other devices (CUDA) LRN and max-pooling run
//! as compositions of Candle tensor ops (`*_tensor_ops`, tested against the same fixtures on
//! the CPU) and the convolution as Candle's `conv2d`.

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

/// The AVX-512 mask of the first `count` of 16 lanes (all 16 from 16 on): the tail of a row.
#[cfg(target_arch = "x86_64")]
pub(crate) fn first_lanes(count: usize) -> u16 {
    ((1u32 << count.min(16)) - 1) as u16
}

/// [`gemm::relu_in_place`]'s rule on 16 lanes, for kernels that apply the ReLU as their sums
/// leave the registers: `maxps(0, v)` is `v` for `v >= 0`, `-0` and NaN, else 0.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn relu_lanes(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    _mm512_max_ps(_mm512_setzero_ps(), v)
}

mod adaptive_pool;
mod backward;
mod conv;
mod gemm;
mod isa;
mod linear;
mod lrn;
mod lrn_pool;
mod max_pool;
mod simd;
mod transpose;

pub use adaptive_pool::adaptive_avg_pool2d;
pub use backward::backward;
pub use conv::{conv2d, conv2d_prepared, conv2d_relu};
pub use isa::{rerun_tests_below_the_best_level, Isa, ISA_VARIABLE};
pub use linear::{linear, linear_prepared, linear_relu};
pub use lrn::{lrn, lrn_tensor_ops, Lrn};
pub use lrn_pool::lrn_max_pool2d;
pub use max_pool::{max_pool2d, max_pool2d_tensor_ops};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{CpuStorage, Layout, Result};

/// A layer's state on the CPU: its weights as the forward's kernels read them, each form made
/// from the weights of one version and kept while they stay at it. Whoever writes the weights
/// says so with [`Prepared::weights_changed`] (the optimiser after each step; a model's
/// [`crate::AlexNet::weights_changed`] after a `Var::set`); nothing compares weights.
///
/// * Winograd's transformed kernels (conv2-5) are kept for the version they were made at: the
///   forward makes them anyway, and a second pass at that version (inference) reads them back.
/// * The direct form's packed weights (conv1) cost a copy of the weights that a training run, one
///   pass per version, would make every step for nothing: they are made on the second pass at
///   one version, or on the first once the layer is frozen for inference ([`Prepared::freeze`]).
///   Until then the kernels read the weights as stored (the same bits).
/// * The fully-connected layer's strips (fc6-8: 231 MB) sum in another order than the weights as
///   stored: made only once frozen, so that a model gives the same bits on every pass.
#[derive(Debug, Default)]
pub struct Prepared {
    version: AtomicU64,
    frozen: AtomicBool,
    #[cfg(target_arch = "x86_64")]
    direct: Kept,
    winograd: Kept,
    #[cfg(target_arch = "x86_64")]
    strips: Kept,
}

/// One form of a layer's weights, with the version it was made at.
#[derive(Debug, Default)]
struct Kept(Mutex<KeptForm>);

#[derive(Debug, Default)]
struct KeptForm {
    /// The version the passes below were counted at.
    version: u64,
    /// Passes at `version` that asked for the form.
    passes: u32,
    value: Option<Arc<Vec<f32>>>,
}

impl Prepared {
    /// The layer's weights were written: every kept form is stale.
    pub fn weights_changed(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// The weights will not change again (a model that only infers): every form is made on
    /// its first use.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::Release);
    }

    /// `form` for the weights at their current version, kept or made now: for a form the
    /// pass makes anyway.
    fn kept_or_made(&self, form: &Kept, make: impl FnOnce() -> Vec<f32>) -> Arc<Vec<f32>> {
        self.current(form).value.get_or_insert_with(|| Arc::new(make())).clone()
    }

    /// `form` for the weights at their current version if it is kept, or made now when frozen
    /// or when a pass at this version asked before; None: read the weights as stored this time.
    fn kept_once_reused(&self, form: &Kept, make: impl FnOnce() -> Vec<f32>) -> Option<Arc<Vec<f32>>> {
        let mut kept = self.current(form);
        if kept.value.is_none() && (kept.passes > 1 || self.frozen.load(Ordering::Acquire)) {
            kept.value = Some(Arc::new(make()));
        }
        kept.value.clone()
    }

    /// `form` for the weights at their current version once frozen (kept, or made now); None
    /// before.
    fn kept_once_frozen(&self, form: &Kept, make: impl FnOnce() -> Vec<f32>) -> Option<Arc<Vec<f32>>> {
        if !self.frozen.load(Ordering::Acquire) {
            return None;
        }
        Some(self.kept_or_made(form, make))
    }

    /// `form`'s entry, emptied if made at another version, with this pass counted.
    fn current<'a>(&self, form: &'a Kept) -> std::sync::MutexGuard<'a, KeptForm> {
        let version = self.version.load(Ordering::Acquire);
        let mut kept = form.0.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.version != version {
            *kept = KeptForm { version, passes: 0, value: None };
        }
        kept.passes = kept.passes.saturating_add(1);
        kept
    }
}

/// The contiguous f32 data of a CPU tensor, or an error naming the op that needed it.
pub(crate) fn contiguous_f32<'a>(op: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) if start == end => Ok(&[]), // an empty view may start past the data
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The same, writable, for in-place ops.
pub(crate) fn contiguous_f32_mut<'a>(op: &str, storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{op}: input must be contiguous"),
        _ => candle_core::bail!("{op}: expected f32 data"),
    }
}

/// `vec![0f32; len]` zeroed by all the cores: the ops' fresh outputs and gradients run to
/// megabytes, and `vec!` zeroes them on one core while the others wait.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut().par_chunks_mut(1 << 16).for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: every value was just written
    unsafe { v.set_len(len) };
    v
}

/// Runs `f` on every task on all the cores, each core taking the next task as it finishes one
/// (so a core slowed by other tenants takes fewer), with scratch from `init` made once per
/// core. The calling thread spins, rather than sleeps, while the others finish their last
/// tasks: a thread asleep here took 40-100 us to run again, where a task at batch 1 takes
/// 200-400 us. Tasks must not wait on one another.
pub(crate) fn par_tasks<T: Send, S>(
    tasks: impl IntoIterator<Item = T>,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, T) + Sync,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, PoisonError};
    /// Counts a task done when dropped, also if it panicked: the spin below must end.
    struct Done<'a>(&'a AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Release);
        }
    }
    let tasks: Vec<T> = tasks.into_iter().collect();
    let count = tasks.len();
    let (queue, done) = (Mutex::new(tasks.into_iter()), AtomicUsize::new(0));
    let work = || {
        let mut scratch = None;
        loop {
            let Some(task) = queue.lock().unwrap_or_else(PoisonError::into_inner).next() else { return };
            let _done = Done(&done);
            f(scratch.get_or_insert_with(&init), task);
        }
    };
    rayon::scope(|s| {
        for _ in 1..rayon::current_num_threads().min(count) {
            s.spawn(|_| work());
        }
        work();
        while done.load(Ordering::Acquire) < count {
            std::hint::spin_loop();
        }
    });
}

/// `(N, C, H, W)` of a rank-4 layout, or an error naming the op.
fn nchw(op: &str, layout: &Layout) -> Result<(usize, usize, usize, usize)> {
    match layout.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        dims => candle_core::bail!("{op}: expected a [N, C, H, W] tensor, got shape {dims:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::{par_tasks, Prepared};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A layer's state makes a form a pass makes anyway on the first pass at each version, a
    /// copy of the weights on the second (or the first once frozen), the strips only once
    /// frozen, and none is kept across a change of the weights.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_layers_state_keeps_forms_for_one_version() {
        let (state, made) = (Prepared::default(), AtomicUsize::new(0));
        let make = |v: f32| {
            let made = &made;
            move || {
                made.fetch_add(1, Ordering::Relaxed);
                vec![v]
            }
        };
        assert_eq!(*state.kept_or_made(&state.winograd, make(1.0)), [1.0]);
        assert_eq!(*state.kept_or_made(&state.winograd, make(2.0)), [1.0]); // kept
        assert_eq!(state.kept_once_reused(&state.direct, make(3.0)), None); // a first pass
        assert_eq!(state.kept_once_reused(&state.direct, make(4.0)).as_deref(), Some(&vec![4.0]));
        assert_eq!(state.kept_once_reused(&state.direct, make(5.0)).as_deref(), Some(&vec![4.0]));
        assert_eq!(state.kept_once_frozen(&state.strips, make(5.5)), None);
        state.weights_changed();
        assert_eq!(*state.kept_or_made(&state.winograd, make(6.0)), [6.0]);
        assert_eq!(state.kept_once_reused(&state.direct, make(7.0)), None);
        state.freeze();
        state.weights_changed();
        assert_eq!(state.kept_once_reused(&state.direct, make(8.0)).as_deref(), Some(&vec![8.0]));
        assert_eq!(state.kept_once_frozen(&state.strips, make(9.0)).as_deref(), Some(&vec![9.0]));
        assert_eq!(made.into_inner(), 5); // 1, 4, 6, 8 and 9 made; the others not
    }

    #[test]
    fn par_tasks_runs_each_task_once_and_passes_on_a_panic() {
        let (sum, inits) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let init = || inits.fetch_add(1, Ordering::Relaxed);
        par_tasks(0..1000, init, |_, i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 999 * 1000 / 2);
        assert!(inits.into_inner() <= rayon::current_num_threads());
        par_tasks(Vec::<usize>::new(), || (), |_, _| unreachable!());
        // a task that panics ends the call with its panic, where the others would otherwise
        // wait for it for ever
        let panicked = std::panic::catch_unwind(|| par_tasks(0..8, || (), |_, i| assert!(i != 5, "task {i}")));
        assert!(panicked.is_err());
    }
}
