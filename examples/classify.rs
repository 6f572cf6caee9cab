//! Classify images with any AlexNet weights.
//!
//! ```sh
//! cargo run --release --example classify -- ../shared/data/photos/chelsea.png
//! cargo run --release --example classify -- --weights runs/x/final.safetensors IMAGE...
//! ```
//! The weights default to torchvision's (fetched once to torchvision's cache); anything
//! `alexnet --weights` takes works, and a model `alexnet train` wrote names its own classes.

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let weights = match args.iter().position(|a| a == "--weights") {
        Some(i) if i + 1 < args.len() => args.drain(i..=i + 1).nth(1).unwrap_or_default(),
        _ => "torchvision".to_string(),
    };
    anyhow::ensure!(!args.is_empty(), "usage: classify [--weights W] IMAGE...");
    let model = alexnet::AlexNet::load(&weights, &candle_core::Device::Cpu)?;
    for path in &args {
        let image = alexnet::data::decode(path.as_ref())?;
        println!("{path}");
        for p in model.classify(&image, 5)? {
            println!("  {:6.2}%  {:>4}  {}", 100.0 * p.probability, p.index, p.name);
        }
    }
    Ok(())
}
