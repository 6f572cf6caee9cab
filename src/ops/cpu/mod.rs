//! What the CPU kernels of every op share: the instruction-set level, asked once ([`isa`]); a
//! vector of f32 at each x86 level under the same names ([`simd`]); running tasks on all the
//! cores ([`parallel`]); and the transposes between the layouts the ops use ([`transpose`]).

pub mod isa;
pub(crate) mod parallel;
pub(crate) mod simd;
pub(crate) mod transpose;
