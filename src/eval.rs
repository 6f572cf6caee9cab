//! `alexnet eval`: top-1 / top-5 on a labelled image set (ILSVRC2012 val in any layout),
//! with 1 or 10 crops, through the parallel loading pipeline.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::bail;
use candle_core::{Device, Tensor};
use serde::Serialize;

pub use crate::classes::top_k;
use crate::classes::Classes;
use crate::data::dataset::{Dataset, Layout};
use crate::data::transform::Transform;
use crate::model::{AlexNet, Mode};

/// What `eval` needs beyond the model.
pub struct EvalOptions {
    pub data: PathBuf,
    pub labels: Option<PathBuf>,
    pub meta: Option<PathBuf>,
    pub ten_crop: bool,
    pub batch_size: usize,
    /// Decoding workers (see [`crate::data::loader`]).
    pub workers: usize,
    pub limit: Option<usize>,
    pub transform: Transform,
    pub quiet: bool,
    pub strict: bool,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Prediction {
    pub path: PathBuf,
    pub label: usize,
    pub top5: Vec<usize>,
}

/// What timm's `validate.py` reports (and writes with `--results-file`): accuracies and
/// errors in percent (rounded to 4 places), parameters in millions (2 places), the crop side,
/// its fraction of the resized side, and the resize's interpolation.
#[derive(Debug, Serialize)]
pub struct TimmResults {
    pub model: String,
    pub top1: f64,
    pub top1_err: f64,
    pub top5: f64,
    pub top5_err: f64,
    pub param_count: f64,
    pub img_size: usize,
    pub crop_pct: f64,
    pub interpolation: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub preset: &'static str,
    pub transform: String,
    pub crops: usize,
    pub weights: String,
    pub weights_sha256: String,
    pub layout: Layout,
    pub images: usize,
    pub top1_correct: usize,
    pub top5_correct: usize,
    pub top1_accuracy: f64,
    pub top5_accuracy: f64,
    pub top1_error: f64,
    pub top5_error: f64,
    pub skipped: Vec<Skipped>,
    pub seconds: f64,
    pub images_per_second: f64,
    /// The same results in timm's `validate.py` names and units.
    #[serde(flatten)]
    pub timm: TimmResults,
    #[serde(skip)]
    pub predictions: Vec<Prediction>,
}

/// Evaluates `model` on `opts.data`, labelled by the IDs of the model's classes. `weights` and
/// `sha256` only label the report.
pub fn evaluate(model: &AlexNet, opts: &EvalOptions, weights: &str, sha256: String) -> anyhow::Result<Report> {
    let ids = model.classes().ids();
    let mut dataset = Dataset::open(&opts.data, &ids, opts.labels.as_deref(), opts.meta.as_deref())?;
    if let Some(limit) = opts.limit {
        dataset.samples.truncate(limit);
    }
    let samples = dataset.samples.clone();
    let crops = if opts.ten_crop { 10 } else { 1 };
    let batches = opts.transform.load(dataset.samples, opts.batch_size, opts.ten_crop, opts.workers);
    let input_layer = opts.transform.input_layer();

    let progress = progress_bar(samples.len() as u64, "images", opts.quiet);
    let start = Instant::now();
    let mut hits = Hits::default();
    let mut skipped = Vec::new();
    let mut predictions = Vec::with_capacity(samples.len());
    for mut batch in batches {
        for (path, reason) in std::mem::take(&mut batch.failures) {
            if opts.strict {
                bail!("{}: {reason} (--strict)", path.display())
            }
            progress.suspend(|| eprintln!("skipping {}: {reason}", path.display()));
            skipped.push(Skipped { path, reason });
            progress.inc(1);
        }
        if batch.items.is_empty() {
            continue;
        }
        let n = batch.items.len();
        let x = batch.input(&input_layer, model.device())?;
        for ((i, _), p) in batch.items.iter().zip(predict(model, &x, n, crops)?) {
            let label = samples[*i].label;
            let top5 = hits.add(&p, label);
            predictions.push(Prediction { path: samples[*i].path.clone(), label, top5 });
        }
        progress.inc(n as u64);
        let (top1, top5) = hits.accuracy();
        progress.set_message(format!("top-1 {:.2}%  top-5 {:.2}%", 100.0 * top1, 100.0 * top5));
    }
    progress.finish_and_clear();
    let (seen, top1, top5) = (hits.seen, hits.top1, hits.top5);
    if seen == 0 {
        bail!("no image of {} could be evaluated ({} skipped)", opts.data.display(), skipped.len())
    }
    let seconds = start.elapsed().as_secs_f64();
    let acc = |c: usize| c as f64 / seen as f64;
    let percent = |fraction: f64| (fraction * 100.0 * 1e4).round() / 1e4;
    let params: usize = model.parameters().iter().flat_map(|p| &p.parts).map(|v| v.elem_count()).sum();
    let timm = TimmResults {
        model: model.preset.name().to_string(),
        top1: percent(acc(top1)),
        top1_err: percent(1.0 - acc(top1)),
        top5: percent(acc(top5)),
        top5_err: percent(1.0 - acc(top5)),
        param_count: (params as f64 / 1e6 * 100.0).round() / 100.0,
        img_size: opts.transform.crop,
        crop_pct: opts.transform.crop as f64 / opts.transform.base as f64,
        interpolation: "bilinear", // every pipeline's resize (PIL's, or OpenCV's for caffe)
    };
    Ok(Report {
        preset: model.preset.name(),
        transform: format!("{:?}", opts.transform.kind).to_lowercase(),
        crops,
        weights: weights.to_string(),
        weights_sha256: sha256,
        layout: dataset.layout,
        images: seen,
        top1_correct: top1,
        top5_correct: top5,
        top1_accuracy: acc(top1),
        top5_accuracy: acc(top5),
        top1_error: 1.0 - acc(top1),
        top5_error: 1.0 - acc(top5),
        skipped,
        seconds,
        images_per_second: seen as f64 / seconds,
        timm,
        predictions,
    })
}

/// The paper's prediction for `n` images of `crops` views each (`views`: their pixels one view
/// after another): the softmax averaged over each image's views, as rows on the CPU.
pub fn predict(model: &AlexNet, x: &Tensor, n: usize, crops: usize) -> anyhow::Result<Vec<Vec<f32>>> {
    let probs = candle_nn::ops::softmax_last_dim(&model.forward(x, Mode::Eval)?)?;
    Ok(probs.reshape((n, crops, ()))?.mean(1)?.to_device(&Device::Cpu)?.to_vec2::<f32>()?)
}

/// Top-1 and top-5 hits, counted as predictions come in.
#[derive(Debug, Default, Clone, Copy)]
pub struct Hits {
    pub top1: usize,
    pub top5: usize,
    pub seen: usize,
}

impl Hits {
    /// Counts one prediction (scores of every class) of an image of class `label`; returns its top 5.
    pub fn add(&mut self, scores: &[f32], label: usize) -> Vec<usize> {
        let top = top_k(scores, 5);
        self.top1 += usize::from(top[0] == label);
        self.top5 += usize::from(top.contains(&label));
        self.seen += 1;
        top
    }

    /// Top-1 and top-5 accuracy so far.
    pub fn accuracy(&self) -> (f64, f64) {
        let n = self.seen.max(1) as f64;
        (self.top1 as f64 / n, self.top5 as f64 / n)
    }
}

pub fn progress_bar(len: u64, unit: &str, quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    let template = format!("{{bar:30}} {{pos}}/{{len}} {unit}  {{per_sec}}  eta {{eta}}  {{msg}}");
    let style = indicatif::ProgressStyle::with_template(&template).expect("valid template");
    bar.set_style(style);
    bar
}

impl Report {
    pub fn print(&self) {
        println!(
            "preset      {}  (transform {}, {} crop{})",
            self.preset,
            self.transform,
            self.crops,
            if self.crops > 1 { "s" } else { "" }
        );
        println!("weights     {}  sha256 {}", self.weights, self.weights_sha256);
        println!("images      {}  ({} skipped)", self.images, self.skipped.len());
        println!("top-1       {:.3}% accuracy  {:.3}% error", 100.0 * self.top1_accuracy, 100.0 * self.top1_error);
        println!("top-5       {:.3}% accuracy  {:.3}% error", 100.0 * self.top5_accuracy, 100.0 * self.top5_error);
        println!("throughput  {:.1} images/s  ({:.1} s)", self.images_per_second, self.seconds);
        for s in &self.skipped {
            println!("skipped     {}: {}", s.path.display(), s.reason);
        }
    }

    /// timm's `--results-file`: a header and one row, in its column order.
    pub fn write_timm_csv(&self, path: &Path) -> anyhow::Result<()> {
        let t = &self.timm;
        crate::files::write_atomically(path, |out| {
            writeln!(out, "model,top1,top1_err,top5,top5_err,param_count,img_size,crop_pct,interpolation")?;
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{}",
                t.model, t.top1, t.top1_err, t.top5, t.top5_err, t.param_count, t.img_size, t.crop_pct, t.interpolation
            )
        })
    }

    /// `path,label,top1,...,top5` with the classes' IDs (WNIDs for ImageNet's).
    pub fn write_predictions(&self, path: &Path, classes: &Classes) -> anyhow::Result<()> {
        crate::files::write_atomically(path, |out| {
            writeln!(out, "path,label,top1,top2,top3,top4,top5")?;
            for p in &self.predictions {
                let top: Vec<&str> = p.top5.iter().map(|&i| classes.id(i)).collect();
                writeln!(out, "{},{},{}", p.path.display(), classes.id(p.label), top.join(","))?;
            }
            Ok(())
        })
    }
}
