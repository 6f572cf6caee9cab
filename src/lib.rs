//! AlexNet (Krizhevsky, Sutskever, Hinton 2012) on Candle, exact against PyTorch and Caffe.
//!
//! Follow an image from JPEG to logits: [`data::decode`] reads it, [`data::transform`]
//! preprocesses it exactly as the weights' own pipeline did,
//! [`model::AlexNet::forward`] runs the net (its architecture is all in `model.rs`), and
//! [`classes`] names the result. Parameters come from [`weights`] (files) or [`init`] (fresh).
//! What each preset is (its input, weight names, preprocessing, initialisation, recipe and
//! net) is one table, [`preset::PRESETS`].
//!
//! The short way, with any weights `alexnet` reads (a file, `hf://OWNER/REPO/FILE`, or
//! `torchvision` for the official file, fetched once):
//!
//! ```
//! # fn main() -> anyhow::Result<()> {
//! use alexnet::{AlexNet, Layer, Preset};
//! use candle_core::Device;
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("weights.safetensors");
//! # AlexNet::init(Preset::Fig1Relu, 0)?.save(&path)?;
//! # let weights = path.to_str().unwrap();
//! let model = AlexNet::load(weights, &Device::Cpu)?; // e.g. "torchvision"
//! let image = alexnet::data::decode("../shared/data/photos/chelsea.png".as_ref())?;
//! let top5 = model.classify(&image, 5)?; // classes by name, most probable first
//! assert!(top5[0].probability >= top5[1].probability);
//!
//! // a batch as the net takes it, and a layer's output for it
//! let batch = model.transform().batch(&["../shared/data/photos/coffee.png".into()], false)?;
//! let conv3 = model.features(&batch, Layer::Conv3)?;
//! assert_eq!(conv3.dims()[0], 1);
//! # Ok(())
//! # }
//! ```
//!
//! `examples/` has whole programs: classify, evaluate, fine-tune and extract features.

pub mod bench;
pub mod classes;
pub mod cli;
pub mod data;
pub mod device;
pub mod eval;
pub mod figures;
pub mod files;
mod flags;
pub mod init;
pub mod model;
pub mod onnx;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod preset;
pub mod train;
pub mod weights;

pub use model::{AlexNet, Layer, LrnScope, Mode, Placement, Prediction, Preset};
