//! Top-1 / top-5 accuracy of any weights on a labelled folder (ImageNet's validation set in
//! any layout, or the class folders a model was trained on).
//!
//! ```sh
//! cargo run --release --example evaluate -- torchvision /data/imagenet/val
//! ```

use alexnet::eval::{evaluate, EvalOptions};
use alexnet::AlexNet;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [weights, data] = args.as_slice() else { anyhow::bail!("usage: evaluate WEIGHTS DATA") };
    let model = AlexNet::load(weights, &candle_core::Device::Cpu)?;
    let opts = EvalOptions {
        data: data.into(),
        labels: None, // found beside a flat folder, if it is one
        meta: None,
        ten_crop: false,
        batch_size: 64,
        workers: alexnet::data::loader::default_workers(), // decoding threads beside the compute ones
        limit: None,
        transform: model.transform().clone(),
        quiet: false,
        strict: false,
    };
    let report = evaluate(&model, &opts, weights, String::new())?;
    println!("top-1 {:.2}%  top-5 {:.2}%  ({} images)", report.timm.top1, report.timm.top5, report.images);
    Ok(())
}
