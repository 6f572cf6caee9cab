//! `alexnet bench`: forward (or training-step) throughput in images/s and peak memory,
//! median of repeated runs after warm-up, on reference-pattern weights; `--layers` adds each
//! layer's time (of the forward pass, also within a training step); `--data DIR` times the input
//! pipeline alone instead. Peers are compared by `scripts/bench_peers.py` and
//! `scripts/bench_data_peers.py`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use clap::Args;
use serde::Serialize;

use crate::device::DeviceArgs;
use crate::flags::{at_least_one, Workers};
use crate::init::Init;
use crate::model::{AlexNet, LrnScope, Mode, Preset};
use crate::optim::{Sgd, SgdConfig, UpdateRule};
use crate::weights::Params;

#[derive(Args)]
pub struct BenchArgs {
    /// Which AlexNet(s), comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "paper,caffe,torchvision")]
    preset: Vec<Preset>,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = at_least_one)]
    batch_sizes: Vec<usize>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 7, value_parser = at_least_one)]
    runs: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[command(flatten)]
    device: DeviceArgs,
    /// Time a training step (forward, backward, SGD with momentum) instead of a forward pass.
    #[arg(long)]
    train: bool,
    /// Also time each layer of the forward pass (median per layer; two-tower layers are both
    /// towers together; LRN and pooling, otherwise one op, run as two so that each is timed),
    /// to see where the time goes. With `--train`, the layers of the step's forward pass (in
    /// training mode: dropout, and right after the last step's update).
    #[arg(long)]
    layers: bool,
    /// Time the input pipeline alone on the images in this folder (any layout `eval` and
    /// `train` read, shards included) instead of the network: decoding and the `--pipeline`
    /// transforms (the loader's workers) and the input layer that makes each batch the net's
    /// f32 input (on rayon's threads, as the net), images/s over the whole folder at each batch
    /// size, the inputs dropped. `--workers` sets the decoding workers.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// With `--data`: `eval` (the preset's inference transform: resize, centre crop, mean) and
    /// `train` (the paper's: a random crop of the 256x256 base image, a flip and the PCA colour
    /// shift; the mean image and components computed from the folder, not saved into it),
    /// comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "eval,train")]
    pipeline: Vec<Pipeline>,
    #[command(flatten)]
    workers: Workers,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// An input pipeline `--data` times.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pipeline {
    Eval,
    Train,
}

#[derive(Serialize)]
struct Measurement {
    preset: Preset,
    mode: &'static str,
    batch: usize,
    median_s: f64,
    images_per_s: f64,
    peak_rss_mib: f64,
    /// With `--data`: the loader's decoding workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<usize>,
    /// With `--data`: whether JPEGs decoded with libjpeg-turbo's SIMD code.
    #[serde(skip_serializing_if = "Option::is_none")]
    jpeg_simd: Option<bool>,
    /// With `--layers`: each layer's median time.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    layers: Vec<LayerTime>,
}

#[derive(Serialize)]
struct LayerTime {
    layer: &'static str,
    median_s: f64,
    gflop_per_s: f64,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(data) = &args.data {
        return run_data(args, data);
    }
    let placement = args.device.placement(LrnScope::Layer)?;
    let device = placement.towers[0].clone();
    let mut results = Vec::new();
    println!("{:<12} {:>6} {:>12} {:>10} {:>14}", "preset", "batch", "median ms", "images/s", "peak RSS MiB");
    for &preset in &args.preset {
        let mut model = AlexNet::new(preset, &mut Params::Init(Init::Reference { seed: 0 }), &placement)?;
        if !args.train {
            model.freeze(); // as for inference (`classify`, `eval`)
        }
        let side = preset.input_size();
        for &batch in &args.batch_sizes {
            let x = Tensor::rand(-1f32, 1f32, (batch, 3, side, side), &device)?.to_dtype(DType::F32)?;
            // a training step's labels and optimiser (its velocities: as much memory as the
            // weights); a forward pass needs neither
            let mut training = if args.train {
                let classes = preset.default_classes() as u32;
                let labels = (0..batch as u32).map(|i| i % classes).collect::<Vec<_>>();
                let config =
                    SgdConfig { momentum: 0.9, weight_decay: 5e-4, rule: UpdateRule::Pytorch, decay_biases: true };
                Some((Tensor::from_vec(labels, batch, &device)?, Sgd::for_params(config, model.parameters())?))
            } else {
                None
            };
            let mut times = Vec::with_capacity(args.runs);
            let mut layer_runs: Vec<Vec<(&'static str, u64, f64)>> = Vec::new(); // name, macs, seconds
            for i in 0..args.warmup + args.runs {
                let start = Instant::now();
                let mode = if args.train { Mode::Train { seed: i as u64 } } else { Mode::Eval };
                let logits = if args.layers {
                    let (logits, steps) = model.forward_traced(&x, mode)?;
                    if i >= args.warmup {
                        // the times only: keeping every run's activations would grow the heap
                        layer_runs.push(steps.iter().map(|s| (s.name, s.macs, s.seconds)).collect());
                    }
                    logits
                } else {
                    model.forward(&x, mode)?
                };
                if let Some((labels, sgd)) = &mut training {
                    let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
                    sgd.step(&crate::ops::backward(&loss)?, 1e-6)?;
                }
                drop(logits);
                for tower in &placement.towers {
                    tower.synchronize()?;
                }
                if i >= args.warmup {
                    times.push(start.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let median_s = times[times.len() / 2];
            let mode = if args.train { "train" } else { "forward" };
            let m = Measurement {
                preset,
                mode,
                batch,
                median_s,
                images_per_s: batch as f64 / median_s,
                peak_rss_mib: peak_rss_mib(),
                workers: None,
                jpeg_simd: None,
                layers: layer_medians(&layer_runs),
            };
            println!(
                "{:<12} {:>6} {:>12.1} {:>10.1} {:>14.0}",
                preset.name(),
                batch,
                1e3 * median_s,
                m.images_per_s,
                m.peak_rss_mib
            );
            for l in &m.layers {
                let share = 100.0 * l.median_s / m.layers.iter().map(|l| l.median_s).sum::<f64>();
                println!(
                    "  {:<10} {:>9.2} ms {:>5.1}% {:>8.1} GFLOP/s",
                    l.layer,
                    1e3 * l.median_s,
                    share,
                    l.gflop_per_s
                );
            }
            results.push(m);
        }
    }
    write_json(args, &results)
}

/// `--json`: the measurements, written atomically.
fn write_json(args: &BenchArgs, results: &[Measurement]) -> anyhow::Result<()> {
    match &args.json {
        Some(path) => crate::files::write_json(path, &results),
        None => Ok(()),
    }
}

/// `--data`: each pipeline over every image of `data` per run, through the loader `eval` and
/// `train` use, for each preset and batch size; images/s from the median run.
fn run_data(args: &BenchArgs, data: &Path) -> anyhow::Result<()> {
    use crate::data::augment::Stats;
    use crate::data::dataset::Dataset;
    use crate::data::loader::Batches;
    use crate::ops::Augment;
    use crate::train::base_side;

    let (dataset, _) = Dataset::discover_any(data, None, None)?;
    let images = dataset.samples.len();
    anyhow::ensure!(images > 0, "{} holds no images", data.display());
    let workers = args.workers.count();
    println!("{images} images, {workers} decoding workers, {} compute threads", rayon::current_num_threads());
    let jpeg_simd = crate::data::jpeg_simd();
    if !jpeg_simd {
        eprintln!("warning: JPEG decoding without SIMD (this build found no nasm: run scripts/setup.sh and rebuild mozjpeg-sys)");
    }
    println!("{:<12} {:<10} {:>6} {:>12} {:>10}", "preset", "pipeline", "batch", "median s", "images/s");
    let mut results = Vec::new();
    for &preset in &args.preset {
        for &pipeline in &args.pipeline {
            // a pass: the loader's batches for a batch size, and the input layer that finishes them
            let pass: Box<dyn Fn(usize) -> (Batches, Augment)> = match pipeline {
                Pipeline::Eval => {
                    let transform = preset.transform();
                    let samples = dataset.samples.clone();
                    Box::new(move |batch| {
                        (transform.load(samples.clone(), batch, false, workers), transform.input_layer())
                    })
                }
                Pipeline::Train => {
                    // the paper's recipe's transform; the data's statistics computed here, not
                    // saved into the folder being measured
                    let config = crate::train::TrainConfig::recipe(crate::train::Recipe::Paper, preset);
                    let hidden = indicatif::ProgressBar::hidden();
                    let transform = config.transform(Stats::compute(&dataset.samples, base_side(preset), &hidden)?);
                    let samples = dataset.samples.clone();
                    Box::new(move |batch| {
                        (transform.load_train(samples.clone(), batch, 0, 0, 0, workers), transform.input_layer())
                    })
                }
            };
            let name = match pipeline {
                Pipeline::Eval => "data-eval",
                Pipeline::Train => "data-train",
            };
            for &batch in &args.batch_sizes {
                let mut times = Vec::with_capacity(args.runs);
                for i in 0..args.warmup + args.runs {
                    let start = Instant::now();
                    let (batches, input_layer) = pass(batch);
                    for b in batches {
                        if let Some((path, reason)) = b.failures.first() {
                            anyhow::bail!("cannot load {}: {reason}", path.display())
                        }
                        b.input(&input_layer, &candle_core::Device::Cpu)?;
                    }
                    if i >= args.warmup {
                        times.push(start.elapsed().as_secs_f64());
                    }
                }
                times.sort_by(f64::total_cmp);
                let median_s = times[times.len() / 2];
                let m = Measurement {
                    preset,
                    mode: name,
                    batch,
                    median_s,
                    images_per_s: images as f64 / median_s,
                    peak_rss_mib: peak_rss_mib(),
                    workers: Some(workers),
                    jpeg_simd: Some(jpeg_simd),
                    layers: Vec::new(),
                };
                println!("{:<12} {:<10} {:>6} {:>12.3} {:>10.1}", preset.name(), name, batch, median_s, m.images_per_s);
                results.push(m);
            }
        }
    }
    write_json(args, &results)
}

/// Each layer's median time over the traced runs (`(name, macs, seconds)` per layer), and its
/// multiply-adds' rate.
fn layer_medians(runs: &[Vec<(&'static str, u64, f64)>]) -> Vec<LayerTime> {
    let Some(first) = runs.first() else { return Vec::new() };
    first
        .iter()
        .enumerate()
        .map(|(i, &(layer, macs, _))| {
            let mut times: Vec<f64> = runs.iter().map(|r| r[i].2).collect();
            times.sort_by(f64::total_cmp);
            let median_s = times[times.len() / 2];
            LayerTime { layer, median_s, gflop_per_s: 2.0 * macs as f64 / median_s / 1e9 }
        })
        .collect()
}

/// The process's peak resident memory so far (Linux `VmHWM`), 0 where unknown.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
