//! The `alexnet` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::bench::{self, BenchArgs};
use crate::data::augment::Stats;
use crate::data::dataset::Dataset;
use crate::data::shards::{prepare, PrepareOptions};
use crate::data::transform::{Mean, Transform, TransformKind};
use crate::device::DeviceArgs;
use crate::eval::{evaluate, EvalOptions};
use crate::figures::{self, FeatureSet, Kernels};
use crate::files::{sha256_file, write_json};
use crate::flags::{at_least_one, fraction, non_negative, positive, Workers};
use crate::init::Init;
use crate::model::{AlexNet, Layer, LrnScope, Mode, Placement, Preset};
use crate::optim::UpdateRule;
use crate::train::{
    base_side, train, Checkpoint, FineTune, Freeze, Outcome, Pretrained, Recipe, RunOptions, Schedule, TrainConfig,
};
use crate::weights::{fetch, save_safetensors, write_safetensors_streamed, Identity, Params, WeightFile};

#[derive(Parser)]
#[command(
    name = "alexnet",
    version,
    about = "AlexNet in Rust on Candle: the paper's two-tower net, \
Caffe's bvlc_alexnet and torchvision's alexnet, exact against PyTorch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the layer table: output shape, parameters, multiply-adds, and which tower sees what.
    Summary {
        #[arg(long, value_enum, default_value = "paper")]
        preset: Preset,
        /// Input side in pixels (default: the preset's, 227 or 224).
        #[arg(long)]
        input_size: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the net in eval mode on a preprocessed [N, 3, H, W] f32 tensor and write its logits.
    Infer {
        #[command(flatten)]
        model: ModelArgs,
        /// safetensors file holding the input batch.
        #[arg(long)]
        input: PathBuf,
        /// Name of the input tensor in that file.
        #[arg(long, default_value = "input")]
        input_key: String,
        /// Where to write the logits, as tensor `logits` [N, 1000] f32.
        #[arg(long)]
        output: PathBuf,
    },
    /// Print the top-5 ImageNet classes of each image.
    Classify {
        #[command(flatten)]
        model: ModelArgs,
        /// Image files (JPEG or PNG).
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// How many classes to print per image.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert weights (safetensors, .pth, .caffemodel, hf://, torchvision) to safetensors or ONNX.
    Convert {
        /// The weights to read (anything --weights takes).
        input: String,
        /// The safetensors (or, with --to onnx, ONNX) file to write (through a temporary file,
        /// then renamed).
        output: PathBuf,
        /// Target names: native (the preset's own: torchvision's or Caffe's), torchvision
        /// (loads into torchvision.models.alexnet) or caffe (conv1..fc8, grouped layout); or
        /// onnx: the whole net as an ONNX model (opset 17) for ONNX Runtime.
        #[arg(long, value_enum, default_value = "native")]
        to: Target,
        /// The preset the input is for (default: detected).
        #[arg(long, value_enum)]
        preset: Option<Preset>,
    },
    /// Show a weight file: format, preset and classes it is for, every tensor, parameter count, sha256.
    Inspect {
        /// The weights to read (anything --weights takes).
        file: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Preprocess images exactly as a preset's pipeline does and write them as tensor `input`
    /// [N, 3, S, S] (N x 10 with --crops 10), to feed `infer` or debug accuracy gaps.
    Preprocess {
        #[command(flatten)]
        transform: TransformArgs,
        /// Image files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// 1 (centre) or 10 (corners, centre and their mirrors).
        #[arg(long, default_value_t = 1, value_parser = crops_parser)]
        crops: usize,
        /// safetensors file to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Top-1 / top-5 accuracy on ILSVRC2012 val (or any labelled ImageNet-class images).
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        images: ImageSetArgs,
        /// 1 (centre crop) or 10 (corners, centre, mirrored; softmax averaged, as the paper).
        #[arg(long, default_value_t = 1, value_parser = crops_parser)]
        crops: usize,
        /// Images a batch.
        #[arg(short = 'b', long, value_parser = at_least_one, default_value_t = 64)]
        batch_size: usize,
        #[command(flatten)]
        workers: Workers,
        /// Evaluate only the first N images.
        #[arg(long, value_parser = at_least_one)]
        limit: Option<usize>,
        /// Preprocessing (default: the preset's own).
        #[arg(long, value_enum)]
        transform: Option<TransformKind>,
        /// Mean image for caffe/paper preprocessing (.binaryproto or .npy; default: mean pixel).
        #[arg(long)]
        mean: Option<PathBuf>,
        /// Also write the report as JSON (today's fields, and timm's: top1, top1_err, top5,
        /// top5_err in percent, param_count in millions, img_size, crop_pct, interpolation).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also write timm's CSV (validate.py --results-file): model, top1, top1_err, top5,
        /// top5_err, param_count, img_size, crop_pct, interpolation.
        #[arg(long)]
        results_file: Option<PathBuf>,
        /// Write each image's label and top-5 as CSV.
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Stop at the first unreadable image instead of skipping it.
        #[arg(long)]
        strict: bool,
    },
    /// The paper's preparation, done once: every image's shorter side resized to --size, the
    /// centre square kept, re-encoded as baseline JPEG into WebDataset tar shards (KEY.jpg +
    /// KEY.cls) with an index; `train` and `eval` read the folder as they read images. A rerun
    /// keeps the shards already complete.
    Prepare {
        #[command(flatten)]
        images: ImageSetArgs,
        /// Where the shards, their indexes and shards.json go (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The side of the prepared square images (the paper's 256).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65535), default_value_t = 256)]
        size: u32,
        /// JPEG quality of the prepared images, 1 to 100 (libjpeg's scale, as Pillow's).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100), default_value_t = 90)]
        quality: u8,
        /// The most bytes a shard holds (one image larger than that gets a shard of its own).
        #[arg(long, value_parser = clap::value_parser!(u64).range(4096..), default_value_t = 1 << 30)]
        shard_bytes: u64,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Write freshly initialised weights (seeded) as safetensors in the preset's names.
    Init {
        #[arg(long, value_enum)]
        preset: Preset,
        /// paper (N(0, 0.01), biases 1 in conv2/4/5, fc6/7), caffe, torchvision (PyTorch's
        /// defaults) or reference (the parity tests' pattern). Default: the preset's own.
        #[arg(long, value_enum)]
        scheme: Option<InitScheme>,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The safetensors file to write (it records the preset in its metadata).
        output: PathBuf,
    },
    /// Train on an ImageFolder (DIR/<class>/<image>) with the paper's recipe (or Caffe's,
    /// torchvision's); checkpoints, a JSON-lines log and the final weights go to --out.
    Train(Box<TrainArgs>),
    /// Compute the training set's mean image and RGB principal components (for mean
    /// subtraction and PCA colour augmentation); written next to the data.
    DataStats {
        /// Training images: DIR/<class>/<image> (the result is written to DIR).
        #[arg(long)]
        data: PathBuf,
        /// The preset decides the image size (256x256 base images, or 32x32 for CIFAR nets).
        #[arg(long, value_enum, default_value = "paper")]
        preset: Preset,
    },
    /// Draw loss, error and learning-rate curves of training logs as a PNG (several logs:
    /// one curve per run).
    Plot {
        /// The log.jsonl files training runs wrote.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        #[arg(short, long, default_value = "curves.png")]
        output: PathBuf,
    },
    /// Measure forward (or training-step) throughput on random weights.
    Bench(BenchArgs),
    /// The paper's Figure 3: conv1's kernels as a picture (tower A's above tower B's for the
    /// two-tower presets), each scaled to 0..255 by its own range, with a colour measure per tower.
    Filters {
        #[command(flatten)]
        model: ModelArgs,
        /// The PNG to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Also write each tower's colour measure (per kernel, the share of its energy off the
        /// luminance axis; their mean and median) as JSON to this file, or to stdout for `-`.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Write a layer's activations for every image as tensor `features` [N, D] of a
    /// safetensors file, with the files' names (and labels, for a labelled data set).
    Features {
        #[command(flatten)]
        model: ModelArgs,
        /// The layer whose output (after its ReLU) to keep.
        #[arg(long, value_enum, default_value = "fc7")]
        layer: Layer,
        /// Image files (unlabelled).
        #[arg(required_unless_present = "data", conflicts_with = "data")]
        images: Vec<PathBuf>,
        /// A data set instead: class folders, a flat folder with a label file, or shards (as
        /// `eval` and `train` read them); its labels are written too.
        #[arg(long)]
        data: Option<PathBuf>,
        /// The safetensors file to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Images a batch.
        #[arg(short = 'b', long, value_parser = at_least_one, default_value_t = 64)]
        batch_size: usize,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// The paper's Figure 4: each query image beside its k nearest images of a feature pool by
    /// Euclidean distance; prints their names and distances (and the kNN accuracy where both
    /// sides are labelled).
    Neighbours {
        /// The pool: a file `alexnet features` wrote.
        #[arg(long)]
        features: PathBuf,
        /// Query images; their features are computed as the pool's were (its file records the
        /// weights, preset, LRN scope and layer).
        #[arg(long, num_args = 1.., required_unless_present = "query_features", conflicts_with = "query_features")]
        query: Vec<PathBuf>,
        /// Query features instead: another file `alexnet features` wrote.
        #[arg(long)]
        query_features: Option<PathBuf>,
        /// Neighbours a query.
        #[arg(short, value_parser = at_least_one, default_value_t = 6)]
        k: usize,
        /// The PNG to write.
        #[arg(short, long)]
        output: PathBuf,
        /// The picture shows N of the queries, spread evenly over them from the first (the
        /// text, the JSON and the kNN accuracy cover all).
        #[arg(long, value_parser = at_least_one, default_value_t = 16)]
        rows: usize,
        /// The side, in pixels, of each image's centre square in the picture.
        #[arg(long, value_parser = clap::value_parser!(u32).range(8..=1024), default_value_t = 96)]
        side: u32,
        /// Write the neighbours and the kNN accuracy as JSON to this file, or to stdout for `-`
        /// (then instead of the text).
        #[arg(long)]
        json: Option<PathBuf>,
        /// Images a batch, for the queries' features.
        #[arg(short = 'b', long, value_parser = at_least_one, default_value_t = 64)]
        batch_size: usize,
        #[command(flatten)]
        device: DeviceArgs,
    },
}

#[derive(Args)]
pub struct TrainArgs {
    /// Which AlexNet (default with --from: the pretrained weights'; with --resume: the run's).
    #[arg(long, value_enum)]
    preset: Option<Preset>,
    /// Fine-tune pretrained weights (anything --weights takes: a file, hf://..., torchvision):
    /// the last layer is replaced by a new one when their classes are not the data's.
    #[arg(long, value_name = "WEIGHTS")]
    from: Option<String>,
    /// Fine-tune the preset's published weights, as PyTorch's ImageNet example's flag:
    /// torchvision's (`--from torchvision`); the other presets have none to fetch.
    #[arg(long, conflicts_with = "from")]
    pretrained: bool,
    /// The number of classes the data must have (its class folders decide it; this checks).
    #[arg(long, value_parser = at_least_one)]
    classes: Option<usize>,
    /// With --from: keep these layers as they are (not trained, no momentum): the
    /// convolutions (features), or they and fc6, or they, fc6 and fc7.
    #[arg(long, value_enum)]
    freeze: Option<Freeze>,
    /// With --from: multiplies the learning rate of a new last layer (default 10 with the
    /// finetune recipe, else 1).
    #[arg(long, value_parser = positive, allow_hyphen_values = true)]
    head_lr_mult: Option<f64>,
    /// Training images: `DIR/<class>/<image>`, any number of classes, or the shards
    /// `alexnet prepare` wrote from such a folder.
    #[arg(long)]
    data: PathBuf,
    /// Validation images, same layout and class names (or their shards).
    #[arg(long)]
    val: Option<PathBuf>,
    /// Where checkpoints, log.jsonl and final.safetensors go.
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Default for every flag below (default: finetune with --from, fig1 for the fig1
    /// presets, else paper).
    #[arg(long, value_enum)]
    recipe: Option<Recipe>,
    /// Passes over the training set (default: 90; finetune 10).
    #[arg(long, value_parser = at_least_one)]
    epochs: Option<usize>,
    /// Images a step (default: paper and fig1 128, caffe and torchvision 256, finetune 64).
    #[arg(short = 'b', long, value_parser = at_least_one)]
    batch_size: Option<usize>,
    #[command(flatten)]
    workers: Workers,
    /// Learning rate (default: 0.01; finetune 0.001).
    #[arg(long, value_parser = positive, allow_hyphen_values = true)]
    lr: Option<f64>,
    /// SGD momentum (default 0.9).
    #[arg(long, value_parser = fraction, allow_hyphen_values = true)]
    momentum: Option<f64>,
    /// Weight decay (default: 5e-4; torchvision 1e-4; fig1 0).
    #[arg(long, visible_alias = "wd", value_parser = non_negative, allow_hyphen_values = true)]
    weight_decay: Option<f64>,
    /// paper (lr inside the velocity) or pytorch.
    #[arg(long, value_enum)]
    rule: Option<UpdateRule>,
    /// plateau, step, multistep or constant.
    #[arg(long, value_enum)]
    schedule: Option<Schedule>,
    /// Plateau: epochs without improvement before dividing lr by 10 (at least 1).
    #[arg(long, value_parser = at_least_one)]
    patience: Option<usize>,
    /// Plateau: at most this many divisions; the next plateau after the last ends the run.
    #[arg(long)]
    max_drops: Option<usize>,
    /// Step: epochs between multiplications by --gamma.
    #[arg(long, value_parser = at_least_one)]
    step_epochs: Option<usize>,
    /// Multistep: the epochs after which the learning rate is multiplied by --gamma, e.g.
    /// `--milestones 40,52` (PyTorch's `MultiStepLR`); given alone, it chooses that schedule.
    #[arg(long, value_delimiter = ',', value_parser = at_least_one)]
    milestones: Vec<usize>,
    /// Step and multistep: the factor the learning rate is multiplied by (default 0.1).
    #[arg(long, value_parser = positive, allow_hyphen_values = true)]
    gamma: Option<f64>,
    /// Standard deviation of the PCA colour shift alpha (0 turns it off).
    #[arg(long, value_parser = non_negative, allow_hyphen_values = true)]
    pca_std: Option<f64>,
    /// Turn off all augmentation (random crops, flips, PCA): centre crops only.
    #[arg(long)]
    no_augment: bool,
    /// Turn off dropout.
    #[arg(long)]
    no_dropout: bool,
    /// Multiplies (pixel - mean image): 1 keeps the paper's 0..255 range (default for paper
    /// and caffe); 1/57.6 approximates torchvision's normalisation (default otherwise).
    #[arg(long)]
    input_scale: Option<f32>,
    /// Validation with 1 or 10 crops (the paper's ten patches, softmax averaged) [default: 1,
    /// or with --resume the run's]. It decides how validation is measured (and so what the
    /// plateau rule watches), not how the net trains, so a resumed run may change it; each
    /// validation line of the log records it.
    #[arg(long, value_parser = crops_parser)]
    val_crops: Option<usize>,
    /// Train on a fixed subset of N images, classes taken in turn (balanced).
    #[arg(long, value_parser = at_least_one)]
    limit: Option<usize>,
    /// Stop once an epoch's training top-1 error falls below this fraction (e.g. 0.25).
    #[arg(long, value_parser = fraction, allow_hyphen_values = true)]
    target_train_error: Option<f64>,
    /// Initialisation of a fresh run (default: the preset's own).
    #[arg(long, value_enum)]
    init: Option<InitScheme>,
    /// Seed of the initialisation, the data order, the augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from a checkpoint, or a run's folder (its newest checkpoint), exactly where it
    /// stopped, with the run's settings (with --lr: at that learning rate, as the paper divided
    /// it by hand).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Also checkpoint every N steps (always: every epoch; a resumed run keeps its own).
    #[arg(long, value_parser = at_least_one)]
    save_every: Option<usize>,
    /// Keep the newest N checkpoints.
    #[arg(long, value_parser = at_least_one, default_value_t = 3)]
    keep: usize,
    /// Log every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    #[command(flatten)]
    device: DeviceArgs,
    /// No progress bar or messages (errors still go to stderr).
    #[arg(long)]
    quiet: bool,
}

impl TrainArgs {
    /// Trains; an interrupted run exits with 130 (as a shell reports Ctrl-C), so scripts can
    /// tell it from a finished one.
    fn run(&self) -> anyhow::Result<ExitCode> {
        let resume = self.resume.as_deref().map(Checkpoint::resolve).transpose()?;
        let resumed = resume.as_deref().map(Checkpoint::load).transpose()?;
        if self.pretrained && self.preset.is_some_and(|p| p != Preset::Torchvision) {
            bail!(
                "--pretrained fetches torchvision's weights; the {} preset has none published",
                self.preset.map_or("", Preset::name)
            )
        }
        let from_spec = self.from.clone().or_else(|| self.pretrained.then(|| "torchvision".to_string()));
        if from_spec.is_none() && (self.freeze.is_some() || self.head_lr_mult.is_some()) {
            bail!("--freeze and --head-lr-mult are for fine-tuning: give the pretrained weights with --from")
        }
        // fine-tuning: the pretrained weights decide the preset (or --preset, checked)
        let pretrained = match (&resumed, &from_spec) {
            (None, Some(spec)) => Some(Pretrained::open(spec, self.preset)?),
            _ => None,
        };
        let preset = match (&resumed, &pretrained, self.preset) {
            (Some(c), _, _) => c.meta.config.preset,
            (None, Some(pretrained), _) => pretrained.identity.preset,
            (None, None, Some(preset)) => preset,
            (None, None, None) => bail!("which net? pass --preset (or --from WEIGHTS to fine-tune, or --resume RUN)"),
        };
        let recipe = self.recipe.unwrap_or(Recipe::default_for(preset, pretrained.is_some()));
        let config = match &resumed {
            // a resumed run keeps its configuration; only paths and switches may change
            Some(c) => TrainConfig {
                epochs: self.epochs.unwrap_or(c.meta.config.epochs),
                val_crops: self.val_crops.unwrap_or(c.meta.config.val_crops),
                ..c.meta.config.clone()
            },
            None => {
                // the recipe's table, and each flag given over it
                let mut c = TrainConfig::recipe(recipe, preset);
                let augment = c.random_crop && !self.no_augment;
                c.epochs = self.epochs.unwrap_or(c.epochs);
                c.batch_size = self.batch_size.unwrap_or(c.batch_size);
                c.lr = self.lr.unwrap_or(c.lr);
                c.momentum = self.momentum.unwrap_or(c.momentum);
                c.weight_decay = self.weight_decay.unwrap_or(c.weight_decay);
                c.rule = self.rule.unwrap_or(c.rule);
                c.schedule = self.schedule.unwrap_or(c.schedule);
                c.patience = self.patience.unwrap_or(c.patience);
                c.max_drops = self.max_drops.unwrap_or(c.max_drops);
                c.step_epochs = self.step_epochs.unwrap_or(c.step_epochs);
                if !self.milestones.is_empty() {
                    c.schedule = self.schedule.unwrap_or(Schedule::Multistep);
                    if c.schedule != Schedule::Multistep {
                        let other = format!("{:?}", c.schedule).to_lowercase();
                        bail!("--milestones belongs to the multistep schedule, not to --schedule {other}")
                    }
                    c.milestones = self.milestones.clone();
                    c.milestones.sort_unstable();
                    if let Some(w) = c.milestones.windows(2).find(|w| w[0] == w[1]) {
                        // PyTorch's MultiStepLR multiplies by gamma twice there; ours would once
                        bail!("--milestones lists epoch {} twice: list each epoch once", w[0])
                    }
                }
                if c.schedule == Schedule::Multistep && c.milestones.is_empty() {
                    bail!("--schedule multistep needs --milestones (the epochs after which the rate drops)")
                }
                c.gamma = self.gamma.unwrap_or(c.gamma);
                c.seed = self.seed;
                c.dropout &= !self.no_dropout;
                (c.random_crop, c.flip) = (augment, augment);
                c.pca_std = if augment { self.pca_std.unwrap_or(c.pca_std) } else { 0.0 };
                c.input_scale = self.input_scale.unwrap_or(c.input_scale);
                c.val_crops = self.val_crops.unwrap_or(1);
                c.limit = self.limit;
                c.target_train_error = self.target_train_error;
                c.finetune = pretrained.as_ref().zip(from_spec).map(|(pretrained, from)| FineTune {
                    from,
                    from_sha256: pretrained.sha256.clone(),
                    freeze: self.freeze,
                    head_lr_mult: self.head_lr_mult.unwrap_or(if recipe == Recipe::Finetune { 10.0 } else { 1.0 }),
                    new_head: false, // decided when the run starts
                });
                c
            }
        };
        let opts = RunOptions {
            data: self.data.clone(),
            val: self.val.clone(),
            out: self.out.clone(),
            init: self.init.map_or(Init::default_for(preset, self.seed), |s| s.init(self.seed)),
            expected_classes: self.classes,
            pretrained,
            lr_override: resume.as_ref().and(self.lr),
            save_every: self.save_every.or(resumed.as_ref().and_then(|c| c.meta.save_every)),
            resume: resumed,
            keep: self.keep,
            log_every: self.log_every.max(1),
            workers: self.workers.count(),
            quiet: self.quiet,
            placement: self.device.placement(LrnScope::Layer)?,
        };
        match train(config, opts)? {
            Outcome::Finished(path) => {
                eprintln!("final weights: {}", path.display());
                Ok(ExitCode::SUCCESS)
            }
            Outcome::Interrupted(_) => Ok(ExitCode::from(130)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitScheme {
    Paper,
    Caffe,
    Torchvision,
    Reference,
}

impl InitScheme {
    pub fn init(self, seed: u64) -> Init {
        match self {
            InitScheme::Paper => Init::Paper { seed },
            InitScheme::Caffe => Init::Caffe { seed },
            InitScheme::Torchvision => Init::Torchvision { seed },
            InitScheme::Reference => Init::Reference { seed },
        }
    }
}

/// A labelled set of images, as `eval` and `prepare` read them.
#[derive(Args)]
struct ImageSetArgs {
    /// The images: class folders (DIR/<class>/<image>, labelled by the folders' names), a flat
    /// folder with a label file (one WNID per line) or the devkit's
    /// ILSVRC2012_validation_ground_truth.txt and meta.mat (labelled by ImageNet's WNIDs), or
    /// the shards `alexnet prepare` wrote from any of them.
    #[arg(long)]
    data: PathBuf,
    /// Label file for a flat folder (default: found beside the images).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The devkit's meta.mat, to map ground-truth IDs to WNIDs (default: found beside them).
    #[arg(long)]
    meta: Option<PathBuf>,
}

/// Preprocessing flags.
#[derive(Args, Clone)]
pub struct TransformArgs {
    /// torchvision, caffe or paper.
    #[arg(long, value_enum)]
    pub transform: TransformKind,
    /// Crop side (default: 224 for torchvision, 227 otherwise).
    #[arg(long)]
    pub crop_size: Option<usize>,
    /// Mean image for caffe/paper (.binaryproto or .npy; default: Caffe's mean pixel).
    #[arg(long)]
    pub mean: Option<PathBuf>,
}

impl TransformArgs {
    fn build(&self) -> anyhow::Result<Transform> {
        let crop = self.crop_size.unwrap_or(if self.transform == TransformKind::Torchvision { 224 } else { 227 });
        let mean = self.mean.as_deref().map(Mean::load).transpose()?;
        Ok(Transform::new(self.transform, crop, mean))
    }
}

fn crops_parser(s: &str) -> Result<usize, String> {
    match s {
        "1" => Ok(1),
        "10" => Ok(10),
        _ => Err("crops must be 1 or 10".into()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Target {
    Native,
    Torchvision,
    Caffe,
    /// The whole net as an ONNX model, weights as initializers (src/onnx.rs).
    Onnx,
}

/// The flags every command that runs the net shares.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Which AlexNet (default: the preset the weights' metadata records, else the one their
    /// tensor names imply; Caffe's names mean caffe).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Weights: a safetensors, PyTorch .pth or Caffe .caffemodel file (format detected from its
    /// bytes), `hf://OWNER/REPO/FILE` from the Hugging Face Hub, or `torchvision` for the
    /// official alexnet-owt-7be5be79.pth (downloaded once to torchvision's cache).
    #[arg(long)]
    pub weights: String,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Two-tower presets: LRN across the whole layer (Caffe) or within each tower.
    #[arg(long, value_enum, default_value = "layer")]
    pub lrn_scope: LrnScope,
}

impl ModelArgs {
    /// The model, frozen for inference, as the file identifies it ([`AlexNet::load_as`]).
    fn load(&self) -> anyhow::Result<AlexNet> {
        AlexNet::load_as(&self.weights, self.preset, &self.device.placement(self.lrn_scope)?)
    }
}

/// Runs the command line; the exit code is 0, or 130 for a training run stopped by Ctrl-C.
pub fn run() -> anyhow::Result<ExitCode> {
    let command = Cli::parse().command;
    crate::ops::Isa::from_env()?; // a level the CPU lacks is an error, not a warning
    if let Command::Train(args) = command {
        return args.run();
    }
    run_command(command).map(|()| ExitCode::SUCCESS)
}

fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Summary { preset, input_size, json } => summary(preset, input_size, json),
        Command::Infer { model, input, input_key, output } => infer(&model, &input, &input_key, &output),
        Command::Classify { model, images, top, json } => classify(&model, &images, top, json),
        Command::Convert { input, output, to, preset } => convert(&input, &output, to, preset),
        Command::Inspect { file, json } => inspect(&file, json),
        Command::Preprocess { transform, images, crops, output } => preprocess(&transform, &images, crops, &output),
        Command::Eval {
            model,
            images: ImageSetArgs { data, labels, meta },
            crops,
            batch_size,
            workers,
            limit,
            transform,
            mean,
            json,
            results_file,
            predictions,
            quiet,
            strict,
        } => {
            let net = model.load()?;
            let preset = net.preset;
            let transform = match (transform, mean) {
                (None, None) => net.transform().clone(),
                (kind, mean) => Transform::new(
                    kind.unwrap_or(TransformKind::for_preset(preset)),
                    preset.input_size(),
                    mean.as_deref().map(Mean::load).transpose()?,
                ),
            };
            let opts = EvalOptions {
                data,
                labels,
                meta,
                ten_crop: crops == 10,
                batch_size,
                workers: workers.count(),
                limit,
                transform,
                quiet,
                strict,
            };
            let sha = sha256_file(&fetch::resolve(&model.weights)?)?;
            let report = evaluate(&net, &opts, &model.weights, sha)?;
            report.print();
            if let Some(path) = json {
                write_json(&path, &report)?;
            }
            if let Some(path) = results_file {
                report.write_timm_csv(&path)?;
            }
            if let Some(path) = predictions {
                report.write_predictions(&path, net.classes())?;
            }
            Ok(())
        }
        Command::Prepare { images: ImageSetArgs { data, labels, meta }, out, size, quality, shard_bytes, quiet } => {
            let opts = PrepareOptions { data, labels, meta, out, size, quality, shard_bytes, quiet };
            let start = std::time::Instant::now();
            let done = prepare(&opts)?;
            let mb = |bytes: u64| bytes as f64 / 1e6;
            println!(
                "{} images ({} skipped) in {} shards in {} ({} kept from an earlier run), {:.1} s",
                done.images,
                done.skipped.len(),
                done.shards,
                opts.out.display(),
                done.kept,
                start.elapsed().as_secs_f64()
            );
            println!("shards {:.1} MB; source images {:.1} MB", mb(done.shard_bytes), mb(done.source_bytes));
            for (source, reason) in &done.skipped {
                println!("skipped     {source}: {reason}");
            }
            Ok(())
        }
        Command::Init { preset, scheme, seed, output } => {
            let init = scheme.map_or(Init::default_for(preset, seed), |s| s.init(seed));
            let model = AlexNet::new(preset, &mut Params::Init(init), &Placement::on(&Device::Cpu))?;
            model.save(&output)?;
            eprintln!("wrote {} weights ({init}) to {}", preset.name(), output.display());
            Ok(())
        }
        Command::Train(_) => unreachable!("run() starts training runs"),
        Command::DataStats { data, preset } => {
            let (dataset, _) = Dataset::discover(&data)?;
            let side = base_side(preset);
            let stats = Stats::compute(
                &dataset.samples,
                side,
                &crate::eval::progress_bar(dataset.samples.len() as u64, "images", false),
            )?;
            let path = Stats::path_for(&data);
            stats.save(&path)?;
            println!("{} images at {side}x{side}: wrote {}", dataset.samples.len(), path.display());
            println!("RGB eigenvalues {:?}", stats.eigvals);
            Ok(())
        }
        Command::Plot { logs, output } => crate::plot::plot(&logs, &output),
        Command::Bench(args) => bench::run(&args),
        Command::Filters { model, output, json } => filters(&model, &output, json.as_deref()),
        Command::Features { model, layer, images, data, output, batch_size, quiet } => {
            let net = model.load()?;
            let (samples, classes) = figures::samples(&images, data.as_deref())?;
            let set = FeatureSet::extract(&net, &model.weights, layer, samples, classes, batch_size, quiet)?;
            set.save(&output)?;
            eprintln!(
                "wrote {} features [{}, {}] to {} ({} skipped)",
                layer.name(),
                set.files.len(),
                set.dim,
                output.display(),
                set.skipped.len()
            );
            Ok(())
        }
        Command::Neighbours { features, query, query_features, k, output, rows, side, json, batch_size, device } => {
            let pool = FeatureSet::load(&features)?;
            let queries = match query_features {
                Some(path) => FeatureSet::load(&path)?,
                None => {
                    let placement = device.placement(pool.lrn_scope)?;
                    let net = AlexNet::load_as(&pool.weights, Some(pool.preset), &placement)
                        .with_context(|| format!("the weights {} records", features.display()))?;
                    let (samples, _) = figures::samples(&query, None)?;
                    FeatureSet::extract(&net, &pool.weights, pool.layer, samples, None, batch_size, true)?
                }
            };
            let report = figures::neighbours(&pool, &queries, k)?;
            crate::plot::save_png(&report.grid(side, rows)?, &output)?;
            match &json {
                Some(path) => write_json(path, &report)?,
                None => report.print(),
            }
            if json.as_deref() != Some(Path::new("-")) {
                eprintln!("wrote {}", output.display());
            }
            Ok(())
        }
    }
}

fn filters(args: &ModelArgs, output: &Path, json: Option<&Path>) -> anyhow::Result<()> {
    let model = args.load()?;
    let kernels = Kernels::of(&model)?;
    crate::plot::save_png(&kernels.picture(), output)?;
    let towers = kernels.colour_report();
    for t in &towers {
        eprintln!(
            "tower {}: {} kernels, colour share mean {:.3}, median {:.3}",
            t.tower, t.kernels, t.mean_colour_share, t.median_colour_share
        );
    }
    eprintln!("wrote {} conv1 kernels ({}x{}) to {}", kernels.count, kernels.height, kernels.width, output.display());
    if let Some(path) = json {
        let report = serde_json::json!({
            "weights": args.weights, "preset": model.preset, "kernels": kernels.count,
            "kernel_size": [kernels.height, kernels.width], "towers": towers,
        });
        write_json(path, &report)?;
    }
    Ok(())
}

#[derive(Serialize)]
struct SummaryRow {
    layer: &'static str,
    sees: &'static str,
    output: Vec<usize>,
    params: usize,
    macs: u64,
}

fn summary(preset: Preset, input_size: Option<usize>, json: bool) -> anyhow::Result<()> {
    let model = AlexNet::new(preset, &mut Params::Init(Init::Zeros), &Placement::on(&Device::Cpu))?;
    let size = input_size.unwrap_or(preset.input_size());
    let (_, trace) =
        model.forward_traced(&Tensor::zeros((1, 3, size, size), candle_core::DType::F32, &Device::Cpu)?, Mode::Eval)?;
    let rows: Vec<SummaryRow> = trace
        .iter()
        .map(|s| SummaryRow {
            layer: s.name,
            sees: s.sees,
            output: s.output.dims()[1..].to_vec(),
            params: s.params,
            macs: s.macs,
        })
        .collect();
    let (params, macs) = (rows.iter().map(|r| r.params).sum::<usize>(), rows.iter().map(|r| r.macs).sum::<u64>());
    if json {
        let out = serde_json::json!({ "preset": preset, "input": [3, size, size], "layers": rows, "params": params, "macs": macs });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("AlexNet, {} preset, input 3x{size}x{size}", preset.name());
    println!("{:<8} {:<12} {:>14} {:>12} {:>15}", "layer", "sees", "output", "params", "mult-adds");
    for r in &rows {
        let shape = r.output.iter().map(usize::to_string).collect::<Vec<_>>().join("x");
        println!("{:<8} {:<12} {:>14} {:>12} {:>15}", r.layer, r.sees, shape, group(r.params as u64), group(r.macs));
    }
    println!("{:<8} {:<12} {:>14} {:>12} {:>15}", "total", "", "", group(params as u64), group(macs));
    Ok(())
}

/// 60965224 -> "60,965,224".
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn infer(args: &ModelArgs, input: &Path, key: &str, output: &Path) -> anyhow::Result<()> {
    let model = args.load()?;
    let tensors = candle_core::safetensors::load(input, &Device::Cpu)
        .with_context(|| format!("cannot read input {} as safetensors", input.display()))?;
    let Some(x) = tensors.get(key) else {
        let keys: Vec<&String> = tensors.keys().collect();
        bail!("{}: no tensor `{key}` (it holds {keys:?}); pick one with --input-key", input.display())
    };
    let logits = model.forward(&x.to_device(model.device())?, Mode::Eval)?;
    save_safetensors(&[("logits".to_string(), logits.to_device(&Device::Cpu)?)], &Default::default(), output)?;
    eprintln!("wrote logits {:?} to {}", logits.dims(), output.display());
    Ok(())
}

fn classify(args: &ModelArgs, images: &[PathBuf], top: usize, json: bool) -> anyhow::Result<()> {
    let model = args.load()?;
    let x = model.transform().batch(images, false)?.to_device(model.device())?;
    let probs = candle_nn::ops::softmax_last_dim(&model.forward(&x, Mode::Eval)?)?.to_vec2::<f32>()?;
    let mut report = Vec::new();
    for (path, p) in images.iter().zip(probs) {
        let preds = model.top_k(&p, top);
        if !json {
            println!("{}", path.display());
            for pred in &preds {
                println!("  {:6.2}%  {:>3}  {}  {}", 100.0 * pred.probability, pred.index, pred.id, pred.name);
            }
        }
        // `wnid`: the name this JSON has always given the class's ID
        let preds: Vec<serde_json::Value> = preds
            .iter()
            .map(
                |p| serde_json::json!({ "index": p.index, "wnid": p.id, "name": p.name, "probability": p.probability }),
            )
            .collect();
        report.push(serde_json::json!({ "image": path, "top": preds }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

fn convert(input: &str, output: &Path, to: Target, preset: Option<Preset>) -> anyhow::Result<()> {
    let path = fetch::resolve(input)?;
    let file = WeightFile::open(&path)?.model_weights();
    let Identity { preset, classes, transform } = file.identify(preset)?;
    match (to, preset) {
        (Target::Torchvision, p) if p != Preset::Torchvision => bail!(
            "{} holds two-tower ({}) weights; torchvision's alexnet is a different network \
             (single tower, 64-192-384-256-256), so they cannot be written in its names; use --to caffe",
            path.display(),
            preset.name()
        ),
        (Target::Caffe, Preset::Torchvision) => bail!(
            "{} holds torchvision weights; Caffe's two-tower AlexNet is a different network, \
             so they cannot be written in its names; use --to torchvision",
            path.display()
        ),
        _ => {}
    }
    let format = file.format;
    // Building the model checks every key and shape before anything is written.
    let model = AlexNet::with_classes(preset, classes.len(), &mut Params::File(file), &Placement::on(&Device::Cpu))?
        .with_outputs(classes, transform);
    // what the model is (a model `train` wrote keeps its classes and preprocessing), and whence
    let mut metadata = model.metadata()?;
    metadata.extend(
        [
            ("format", "pt".to_string()), // what safetensors.torch writes
            ("source", path.file_name().unwrap_or_default().to_string_lossy().into_owned()),
            ("source_format", format!("{format:?}").to_lowercase()),
            ("source_sha256", sha256_file(&path)?),
            ("converted_by", format!("alexnet {}", env!("CARGO_PKG_VERSION"))),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    if to == Target::Onnx {
        metadata.remove("format"); // safetensors' own
        let mut metadata: Vec<(String, String)> = metadata.into_iter().collect();
        metadata.sort(); // the same file for the same input
        crate::onnx::OnnxModel::new(&model, &metadata)?.save(output)?;
        eprintln!("wrote the {} preset as ONNX (opset {}) to {}", preset.name(), crate::onnx::OPSET, output.display());
        return Ok(());
    }
    let tensors = model.state_dict()?;
    save_safetensors(&tensors, &metadata, output)?;
    eprintln!("wrote {} tensors ({} preset) to {}", tensors.len(), preset.name(), output.display());
    Ok(())
}

fn inspect(spec: &str, json: bool) -> anyhow::Result<()> {
    let path = fetch::resolve(spec)?;
    let file = WeightFile::open(&path)?;
    let sha256 = sha256_file(&path)?;
    // what the file is for: a preset and classes, or why that cannot be told
    let identity = file.identify(None);
    let (preset, classes) = match &identity {
        Ok(id) => (Some(id.preset.name()), Some(id.classes.ids())),
        Err(_) => (None, None),
    };
    let unknown = identity.as_ref().err().map(|e| format!("unknown ({e:#})"));
    let tensors: Vec<serde_json::Value> = file
        .tensors()
        .iter()
        .map(|(k, t)| serde_json::json!({ "name": k, "shape": t.dims(), "dtype": format!("{:?}", file.stored_dtypes[k]).to_lowercase() }))
        .collect();
    let params: usize = file.tensors().values().map(|t| t.elem_count()).sum();
    if json {
        let out = serde_json::json!({
            "file": path, "format": file.format, "preset": preset, "classes": classes,
            "tensors": tensors, "params": params, "sha256": sha256,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("file     {}", path.display());
    println!("format   {:?}", file.format);
    println!("preset   {}", preset.map_or_else(|| unknown.unwrap_or_default(), str::to_string));
    if let Some(classes) = &classes {
        let shown: Vec<&str> = classes.iter().take(10).copied().collect();
        let more =
            if classes.len() > shown.len() { format!(", ... ({} in all)", classes.len()) } else { String::new() };
        println!("classes  {}{more}", shown.join(", "));
    }
    println!("sha256   {sha256}");
    println!("params   {}", group(params as u64));
    for t in &tensors {
        println!("  {:<24} {:<8} {}", t["name"].as_str().unwrap_or(""), t["dtype"].as_str().unwrap_or(""), t["shape"]);
    }
    Ok(())
}

fn preprocess(args: &TransformArgs, images: &[PathBuf], crops: usize, output: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let transform = args.build()?;
    let (n, s) = (images.len() * crops, transform.crop);
    // each batch written as it comes from the loader, the next one decoded meanwhile: the
    // memory a batch's, however many images
    let samples = images.iter().map(|p| crate::data::dataset::Sample::file(p.clone(), 0)).collect();
    let batches = transform.load(samples, 64, crops == 10, crate::data::loader::default_workers());
    let input_layer = transform.input_layer();
    let mut failed = None;
    let entry = ("input", safetensors::Dtype::F32, &[n, 3, s, s][..]);
    let written = write_safetensors_streamed(&[entry], &Default::default(), output, |out| {
        for batch in batches {
            let input = match batch.failures.first() {
                Some((path, reason)) => Err(anyhow::anyhow!("{}: {reason}", path.display())),
                None => batch.input(&input_layer, &Device::Cpu),
            };
            match input {
                Ok(x) => out.write_all(&safetensors::View::data(&x))?,
                Err(e) => {
                    failed = Some(e);
                    return Err(std::io::Error::other("an image could not be preprocessed"));
                }
            }
        }
        Ok(())
    });
    match failed {
        Some(e) => Err(e),
        None => written.inspect(|()| eprintln!("wrote input [{n}, 3, {s}, {s}] to {}", output.display())),
    }
}
