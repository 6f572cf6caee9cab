//! Fine-tune pretrained weights on your own classes: the last layer is replaced for the class
//! folders of DATA (DATA/<class>/<image>), the convolutions kept as they are, the rest
//! trained with the fine-tuning recipe (lr 0.001, the new layer 10x).
//!
//! ```sh
//! cargo run --release --example fine_tune -- torchvision DATA runs/mine
//! ```
//! `alexnet train --from torchvision --freeze features --data DATA --out runs/mine` does the
//! same from the command line.

use alexnet::train::{train, FineTune, Freeze, Outcome, Pretrained, Recipe, RunOptions, TrainConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [weights, data, out] = args.as_slice() else { anyhow::bail!("usage: fine_tune WEIGHTS DATA OUT") };
    let pretrained = Pretrained::open(weights, None)?;
    let preset = pretrained.identity.preset;
    let mut config = TrainConfig::recipe(Recipe::Finetune, preset);
    config.epochs = 5;
    config.finetune = Some(FineTune {
        from: weights.clone(),
        from_sha256: pretrained.sha256.clone(),
        freeze: Some(Freeze::Features),
        head_lr_mult: 10.0,
        new_head: false, // decided from the classes when the run starts
    });
    let opts = RunOptions { pretrained: Some(pretrained), ..RunOptions::new(data.into(), out.into(), preset, 0) };
    match train(config, opts)? {
        Outcome::Finished(weights) => println!("fine-tuned weights: {}", weights.display()),
        Outcome::Interrupted(checkpoint) => println!("interrupted; resume from {}", checkpoint.display()),
    }
    Ok(())
}
