//! The layers AlexNet needs that Candle lacks, each with a forward and a backward pass.
//!
//! * [`lrn`]: local response normalisation across channels, in both the paper's and
//!   Caffe's/PyTorch's conventions.
//! * [`max_pool2d`]: max-pooling with a backward for overlapping windows (Candle's
//!   `max_pool2d_with_stride` has none when kernel != stride); ties go where PyTorch sends them.
//! * [`lrn_max_pool2d`]: LRN then max-pooling in one pass, for inference.
//! * [`adaptive_avg_pool2d`]: torchvision's `AdaptiveAvgPool2d`.
//! * [`Augment`]: the input layer, 8-bit frames to the net's input (crop, mirror, colour
//!   shift, mean, scale), so batches stay u8 until the device.
//! * [`conv2d`]: convolution + bias as im2col and packed GEMM (3x3 and 5x5 stride 1 by Winograd),
//!   forward and backward (Candle's CPU convolution backward runs without GEMM and always
//!   computes the input gradient), [`conv2d_relu`] with the ReLU fused in, and
//!   [`conv2d_prepared`] for a layer that keeps its state ([`Prepared`]).
//! * [`linear`], [`linear_relu`]: a fully-connected layer as one op, so its backward hands
//!   Candle each gradient once; [`linear_prepared`] for a layer that keeps its state.
//! * [`tanh`]: tanh vectorised (Candle's calls the C library's `tanhf` a value at a time),
//!   the same bits at every level, within 1 ulp of the exact value.
//! * [`Isa`]: the CPU's instruction-set level, asked once; every kernel with a level-specific
//!   form asks it.
//! * [`backward`]: `loss.backward()` with the gradients of those two ops' parameters put in
//!   the store directly rather than added to zeros.
//!
//! Each op is a module: `mod.rs` holds its API and its Candle custom ops, whose `cpu_fwd` hands
//! contiguous f32 data to the op's `cpu` module (`conv/cpu/{mod.rs: im2col and the choice of
//! form, direct.rs, winograd.rs}`, `linear/cpu/{dot,lane,strip,outer}_form.rs`, `lrn/cpu.rs`,
//! `max_pool/cpu.rs`, `tanh/cpu.rs`). Kernels with a form per instruction-set level are written
//! once, in a macro stamped out for AVX-512 and for AVX2 + FMA from `cpu::simd`'s vectors, beside
//! the portable loop; what they share is in `ops/cpu`. The public functions make their input
//! contiguous first, so callers never have to. On other devices (CUDA) LRN and max-pooling run
//! as compositions of Candle tensor ops (`*_tensor_ops`, tested against the same fixtures on
//! the CPU) and the convolution as Candle's `conv2d`, until the ops get their `cuda_fwd`.

mod adaptive_pool;
mod augment;
mod backward;
mod conv;
pub(crate) mod cpu;
mod gemm;
mod linear;
mod lrn;
mod lrn_pool;
mod max_pool;
mod tanh;

pub use adaptive_pool::adaptive_avg_pool2d;
pub use augment::{Augment, MeanValues, Normalise, View};
pub use backward::backward;
pub use conv::{conv2d, conv2d_prepared, conv2d_relu};
pub use cpu::isa::{rerun_tests_below_the_best_level, Isa, ISA_VARIABLE};
pub use linear::{linear, linear_prepared, linear_relu};
pub use lrn::{lrn, lrn_tensor_ops, Lrn};
pub use lrn_pool::lrn_max_pool2d;
pub use max_pool::{max_pool2d, max_pool2d_tensor_ops};
pub use tanh::tanh;

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
    #[cfg(target_arch = "x86_64")]
    fn kept_once_reused(&self, form: &Kept, make: impl FnOnce() -> Vec<f32>) -> Option<Arc<Vec<f32>>> {
        let mut kept = self.current(form);
        if kept.value.is_none() && (kept.passes > 1 || self.frozen.load(Ordering::Acquire)) {
            kept.value = Some(Arc::new(make()));
        }
        kept.value.clone()
    }

    /// `form` for the weights at their current version once frozen (kept, or made now); None
    /// before.
    #[cfg(target_arch = "x86_64")]
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

/// `(N, C, H, W)` of a rank-4 layout, or an error naming the op.
fn nchw(op: &str, layout: &Layout) -> Result<(usize, usize, usize, usize)> {
    match layout.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        dims => candle_core::bail!("{op}: expected a [N, C, H, W] tensor, got shape {dims:?}"),
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::Prepared;
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
}
