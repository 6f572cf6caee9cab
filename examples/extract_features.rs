//! fc7 features (after its ReLU: 4096 values an image in the ImageNet nets) for transfer learning, written as
//! tensor `features` `[N, 4096]` of a safetensors file.
//!
//! ```sh
//! cargo run --release --example extract_features -- torchvision features.safetensors IMAGE...
//! ```

use alexnet::{AlexNet, Layer};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [weights, output, images @ ..] = args.as_slice() else {
        anyhow::bail!("usage: extract_features WEIGHTS OUTPUT.safetensors IMAGE...")
    };
    anyhow::ensure!(!images.is_empty(), "no images");
    let model = AlexNet::load(weights, &candle_core::Device::Cpu)?;
    let paths: Vec<std::path::PathBuf> = images.iter().map(Into::into).collect();
    // each image as the model's own pipeline prepares it, in batches of 32
    let mut features = Vec::new();
    for chunk in paths.chunks(32) {
        let batch = model.transform().batch(chunk, false)?.to_device(model.device())?;
        features.push(model.features(&batch, Layer::Fc7)?.to_device(&candle_core::Device::Cpu)?);
    }
    let features = candle_core::Tensor::cat(&features, 0)?;
    println!("fc7 features {:?} -> {output}", features.dims());
    alexnet::weights::save_safetensors(&[("features".into(), features)], &Default::default(), output.as_ref())
}
