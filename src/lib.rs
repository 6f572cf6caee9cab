//! AlexNet (Krizhevsky, Sutskever, Hinton 2012) on Candle, exact against PyTorch and Caffe.
//!
//! Follow an image from JPEG to logits: [`data::decode`] reads it, [`data::transform`]
//! preprocesses it exactly as the weights' own pipeline did,
//! [`model::AlexNet::forward`] runs the net (its architecture is all in `model.rs`), and
//! [`classes`] names the result. Parameters come from [`weights`] (files) or [`init`] (fresh).

pub mod bench;
pub mod classes;
pub mod cli;
pub mod data;
pub mod device;
pub mod eval;
pub mod init;
pub mod model;
pub mod onnx;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod train;
pub mod weights;

pub use model::{AlexNet, LrnScope, Mode, Placement, Preset};
