//! `alexnet train`: the paper's recipe (and Caffe's and torchvision's), read top to bottom:
//! data and statistics, model and optimiser, then for each epoch: shuffle, load batches in
//! the background, forward, loss, backward, SGD step, log, checkpoint; validate; adjust lr.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::classes::Classes;
use crate::data::augment::{Stats, TrainTransform};
use crate::data::dataset::{Dataset, Sample};
use crate::eval::{predict, progress_bar, Hits};
use crate::files::{remove_stale_temporaries, write_atomically};
use crate::init::Init;
use crate::model::{AlexNet, Mode, Placement, Preset};
use crate::optim::{Sgd, SgdConfig, UpdateRule};
pub use crate::preset::Recipe;
use crate::weights::{save_safetensors, Identity, Params, WeightFile, MOMENTUM_PREFIX};

/// How the learning rate changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Divide by 10 when the validation error has not improved for `patience` epochs
    /// (the paper), at most `max_drops` times; after the last, the next such plateau ends the
    /// run (the paper's rate "was reduced three times prior to termination").
    Plateau,
    /// Multiply by `gamma` every `step_epochs` epochs (Caffe, torchvision).
    Step,
    /// Multiply by `gamma` after each of the `milestones` epochs (PyTorch's `MultiStepLR`).
    Multistep,
    /// Keep it constant.
    Constant,
}

/// Everything that defines a run; saved in every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub preset: Preset,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub rule: UpdateRule,
    pub decay_biases: bool,
    pub schedule: Schedule,
    pub patience: usize,
    pub max_drops: usize,
    pub step_epochs: usize,
    /// Multistep: the epochs after which the rate is multiplied by `gamma`.
    #[serde(default)]
    pub milestones: Vec<usize>,
    pub gamma: f64,
    pub seed: u64,
    pub dropout: bool,
    pub random_crop: bool,
    pub flip: bool,
    pub pca_std: f64,
    /// Multiplies (pixel - mean image).
    pub input_scale: f32,
    pub val_crops: usize,
    pub limit: Option<usize>,
    /// Stop once an epoch's training top-1 error is below this (the paper's Figure 1 measure).
    #[serde(default)]
    pub target_train_error: Option<f64>,
    /// Start from pretrained weights (fine-tuning), else from an initialisation.
    #[serde(default)]
    pub finetune: Option<FineTune>,
}

/// Where a fine-tuning run starts and what it trains.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FineTune {
    /// The pretrained weights (anything `--weights` takes) and their sha256.
    pub from: String,
    pub from_sha256: String,
    /// The layers kept as they are (not trained, no momentum).
    pub freeze: Option<Freeze>,
    /// Multiplies the learning rate of the last layer when it is new (PyTorch users' usual 10).
    pub head_lr_mult: f64,
    /// Whether the last layer was replaced (the pretrained net's classes are not the data's);
    /// decided when the run starts.
    #[serde(default)]
    pub new_head: bool,
}

/// The weights a fine-tuning run starts from, opened once: the file (its checkpoint momentum
/// left out), what it holds (preset, classes), and its sha256 (which the weights the run
/// writes record).
pub struct Pretrained {
    pub file: WeightFile,
    pub identity: Identity,
    pub sha256: String,
}

impl Pretrained {
    /// Opens what `spec` names (anything `--weights` takes) for a run of `preset` (checked
    /// against the file; default: the file's own).
    pub fn open(spec: &str, preset: Option<Preset>) -> anyhow::Result<Self> {
        let path = crate::weights::fetch::resolve(spec)?;
        let file = WeightFile::open(&path)?.model_weights();
        let identity = file.identify(preset)?;
        Ok(Pretrained { file, identity, sha256: crate::files::sha256_file(&path)? })
    }
}

/// How much of a pretrained net a fine-tuning run keeps fixed: the convolutions (`features`,
/// torchvision's name for them), or they and the fully-connected layers up to fc6 or fc7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Freeze {
    Features,
    Fc6,
    Fc7,
}

impl Freeze {
    /// Whether the layer of parameter `key` (either naming) is kept fixed.
    pub fn covers(self, key: &str) -> bool {
        let depth = |layer: &str| match layer {
            l if l.starts_with("conv") => 0,
            "fc6" => 1,
            "fc7" => 2,
            _ => 3, // the last layer, fc8 (fc in the Figure 1 net), always trains
        };
        depth(crate::preset::caffe_layer_name(key)) <= self as usize
    }
}

impl TrainConfig {
    /// Every setting as `recipe` has it for `preset` (seed 0, the whole data set, from scratch).
    /// The training transform this run's augmentation asks for, from the data's `stats`.
    pub fn transform(&self, stats: Stats) -> TrainTransform {
        TrainTransform {
            base: base_side(self.preset),
            crop: self.preset.input_size(),
            scale: self.input_scale,
            bgr: self.preset.facts().bgr(),
            flip: self.flip,
            pca_std: self.pca_std,
            random_crop: self.random_crop,
            stats: Arc::new(stats),
        }
    }

    pub fn recipe(recipe: Recipe, preset: Preset) -> Self {
        let (batch_size, lr, weight_decay, rule, decay_biases, schedule, step_epochs, augment) = match recipe {
            Recipe::Paper => (128, 0.01, 5e-4, UpdateRule::Paper, false, Schedule::Plateau, 30, true),
            Recipe::Caffe => (256, 0.01, 5e-4, UpdateRule::Paper, false, Schedule::Step, 20, true),
            Recipe::Torchvision => (256, 0.01, 1e-4, UpdateRule::Pytorch, true, Schedule::Step, 30, true),
            Recipe::Fig1 => (128, 0.01, 0.0, UpdateRule::Paper, false, Schedule::Constant, 30, false),
            Recipe::Finetune => (64, 0.001, 5e-4, UpdateRule::Pytorch, false, Schedule::Step, 4, true),
        };
        TrainConfig {
            preset,
            epochs: if recipe == Recipe::Finetune { 10 } else { 90 },
            batch_size,
            lr,
            momentum: 0.9,
            weight_decay,
            rule,
            decay_biases,
            schedule,
            patience: 1,
            max_drops: 3,
            step_epochs,
            milestones: Vec::new(),
            gamma: 0.1,
            seed: 0,
            dropout: recipe != Recipe::Fig1,
            random_crop: augment,
            flip: augment,
            pca_std: if augment && recipe == Recipe::Paper { 0.1 } else { 0.0 },
            input_scale: preset.facts().train_input_scale,
            val_crops: 1,
            limit: None,
            target_train_error: None,
            finetune: None,
        }
    }
}

/// Where the schedule stands; saved in every checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleState {
    pub lr: f64,
    pub best_val_error: Option<f64>,
    pub epochs_without_improvement: usize,
    pub drops: usize,
}

/// Paths and switches that do not change the result.
pub struct RunOptions {
    pub data: PathBuf,
    pub val: Option<PathBuf>,
    pub out: PathBuf,
    pub init: Init,
    /// `--classes`: the number of class folders the data must have.
    pub expected_classes: Option<usize>,
    /// A fine-tuning run's pretrained weights ([`Pretrained::open`]; `config.finetune` says
    /// which and how), unless it resumes.
    pub pretrained: Option<Pretrained>,
    /// The checkpoint to continue from ([`Checkpoint::load`]).
    pub resume: Option<Checkpoint>,
    /// On resume: continue with this learning rate (the paper's manual division by 10).
    pub lr_override: Option<f64>,
    pub save_every: Option<usize>,
    pub keep: usize,
    pub log_every: usize,
    /// Decoding workers (see [`crate::data::loader`]).
    pub workers: usize,
    pub quiet: bool,
    /// Where the towers run; logits, labels and the loss live on tower A's device.
    pub placement: Placement,
}

impl RunOptions {
    /// A run of `preset` on the class folders in `data`, writing to `out`, on the CPU: the
    /// preset's own initialisation seeded with `seed`, no validation set, the newest 3
    /// checkpoints kept, a log line every 10 steps, a progress bar.
    pub fn new(data: PathBuf, out: PathBuf, preset: Preset, seed: u64) -> Self {
        RunOptions {
            data,
            val: None,
            out,
            init: Init::default_for(preset, seed),
            expected_classes: None,
            pretrained: None,
            resume: None,
            lr_override: None,
            save_every: None,
            keep: 3,
            log_every: 10,
            workers: crate::data::loader::default_workers(),
            quiet: false,
            placement: Placement::on(&Device::Cpu),
        }
    }
}

/// One line of the JSON-lines log.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct LogLine {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub train_top1_error: Option<f64>,
    pub train_top5_error: Option<f64>,
    pub val_top1_error: Option<f64>,
    pub val_top5_error: Option<f64>,
    pub images_per_s: Option<f64>,
    /// On end-of-epoch lines: the training error over the whole epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_train_top1_error: Option<f64>,
    /// On validation lines: the views an image's prediction averaged (1, or the ten patches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_crops: Option<usize>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every epoch done (or the target error reached): the final weights.
    Finished(PathBuf),
    /// Stopped by Ctrl-C: the checkpoint saved at that step.
    Interrupted(PathBuf),
}

/// Trains until the last epoch or Ctrl-C.
pub fn train(mut config: TrainConfig, mut opts: RunOptions) -> anyhow::Result<Outcome> {
    // ---- data: the training images, their classes and statistics ------------------------
    let (mut dataset, classes) = Dataset::discover(&opts.data)?;
    if let Some(expected) = opts.expected_classes.filter(|&n| n != classes.len()) {
        bail!("{} has {} class folders, not the {expected} of --classes", opts.data.display(), classes.len())
    }
    if classes.len() < 2 {
        bail!(
            "{} has {} class folder{}; a classifier needs at least 2 (DIR/<class>/<image>)",
            opts.data.display(),
            classes.len(),
            if classes.len() == 1 { "" } else { "s" }
        )
    }
    if let Some(limit) = config.limit {
        dataset.samples = balanced_subset(dataset.samples, limit);
    }
    let val_samples = match &opts.val {
        Some(dir) => {
            let names: Vec<&str> = classes.iter().map(String::as_str).collect();
            Some(
                Dataset::image_folder(dir, &names)
                    .with_context(|| format!("validation set {}", dir.display()))?
                    .samples,
            )
        }
        None => None,
    };
    let stats = load_or_compute_stats(&opts.data, &dataset.samples, base_side(config.preset), opts.quiet)?;
    let transform = config.transform(stats);
    let input_layer = transform.input_layer();

    // ---- model and optimiser (fresh, or from a checkpoint) -------------------------------
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let stale = remove_stale_temporaries(&opts.out)?;
    if stale > 0 && !opts.quiet {
        eprintln!("removed {stale} temporary file(s) that an interrupted write left in {}", opts.out.display());
    }
    let placement = &opts.placement;
    let device = &placement.towers[0];
    let checkpoint = opts.resume.take();
    // the checkpoint's file read once: its weights for the model, its momentum for the optimiser
    let mut momentum = BTreeMap::new();
    let head = config.preset.classifier_weight().trim_end_matches(".weight");
    let mut params = match (&checkpoint, &mut config.finetune) {
        (Some(c), _) => {
            let mut file = WeightFile::open(&c.path)?;
            momentum = file.take_momentum();
            Params::File(file)
        }
        (None, Some(ft)) => {
            let Pretrained { file, identity: pretrained, .. } =
                opts.pretrained.take().context("a fine-tuning run needs its weights (Pretrained::open)")?;
            // the last layer is kept only where it predicts the same classes
            ft.new_head = pretrained.classes.ids() != classes.iter().map(String::as_str).collect::<Vec<_>>();
            if !opts.quiet {
                eprintln!(
                    "fine-tuning {} ({} preset, {} classes): {}",
                    ft.from,
                    pretrained.preset.name(),
                    pretrained.classes.len(),
                    if ft.new_head {
                        format!("its {head} replaced by a new one for the {} classes of the data", classes.len())
                    } else {
                        "its classes are the data's; every layer kept".to_string()
                    }
                );
            }
            if ft.new_head {
                Params::with_fresh_layer(file, head, opts.init)
            } else {
                Params::File(file)
            }
        }
        (None, None) => Params::Init(opts.init),
    };
    let model = AlexNet::with_classes(config.preset, classes.len(), &mut params, placement)?
        .with_outputs(Classes::folders(&classes), transform.inference());
    // what every file the run writes records, so it loads anywhere as the model it is, and
    // where a fine-tuned one came from
    let mut described = model.metadata()?;
    if let Some(ft) = &config.finetune {
        let origin = serde_json::json!({ "weights": ft.from, "sha256": ft.from_sha256, "freeze": ft.freeze });
        described.insert("fine_tuned_from".to_string(), origin.to_string());
    }
    let sgd_config = SgdConfig {
        momentum: config.momentum,
        weight_decay: config.weight_decay,
        rule: config.rule,
        decay_biases: config.decay_biases,
    };
    // frozen layers get no slot: no update, no momentum
    let freeze = config.finetune.as_ref().and_then(|ft| ft.freeze);
    let trained = model.parameters().into_iter().filter(|p| !freeze.is_some_and(|f| f.covers(&p.key)));
    let trained: Vec<crate::model::Param> = trained.collect();
    let head_vars: Vec<_> = trained
        .iter()
        .filter(|p| p.key.starts_with(&format!("{head}.")))
        .flat_map(|p| p.parts.iter().map(|v| v.id()))
        .collect();
    let mut sgd = Sgd::for_params(sgd_config, trained)?;
    // a new head learns faster
    if let Some(ft) = config.finetune.as_ref().filter(|ft| ft.new_head) {
        for slot in sgd.slots.iter_mut().filter(|s| head_vars.contains(&s.var.id())) {
            slot.lr_mult = ft.head_lr_mult;
        }
    }
    let (mut epoch, mut step, mut sched) = match &checkpoint {
        Some(c) => {
            c.restore_momentum(&momentum, &model, &mut sgd)?;
            let mut sched = c.meta.schedule.clone();
            if let Some(lr) = opts.lr_override {
                // a new phase, as the paper's manual divisions: the plateau count starts again
                (sched.lr, sched.epochs_without_improvement) = (lr, 0);
            }
            (c.meta.epoch, c.meta.step, sched)
        }
        None => (0, 0, ScheduleState { lr: config.lr, best_val_error: None, epochs_without_improvement: 0, drops: 0 }),
    };
    let steps_per_epoch = dataset.samples.len().div_ceil(config.batch_size);

    let stop = Arc::new(AtomicBool::new(false));
    let handler_stop = stop.clone();
    // A second Ctrl-C while saving still kills the process the usual way.
    let _ = ctrlc::set_handler(move || handler_stop.store(true, Ordering::SeqCst));
    let log_path = opts.out.join("log.jsonl");
    if let Some(c) = &checkpoint {
        let removed = purge_log_after(&log_path, c.meta.step)?;
        if removed > 0 && !opts.quiet {
            eprintln!(
                "removed {removed} line(s) after step {} from {}: this run writes those steps again",
                c.meta.step,
                log_path.display()
            );
        }
    }
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let save =
        |model: &AlexNet, sgd: &Sgd, epoch: usize, step: usize, sched: &ScheduleState| -> anyhow::Result<PathBuf> {
            let meta = CheckpointMeta {
                config: config.clone(),
                classes: classes.clone(),
                epoch,
                step,
                schedule: sched.clone(),
                save_every: opts.save_every,
            };
            Checkpoint::save(&opts.out, model, sgd, &meta, &described, opts.keep)
        };

    // ---- the epochs ------------------------------------------------------------------------
    // (a run resumed from the checkpoint at its end goes straight to its final weights)
    while epoch < config.epochs && !sched.finished(&config) {
        // This epoch's order; a resumed run skips the batches it already did.
        let order = epoch_order(dataset.samples.len(), config.seed, epoch);
        let done = step - epoch * steps_per_epoch;
        let first = done * config.batch_size;
        let todo: Vec<Sample> = order[first.min(order.len())..].iter().map(|&i| dataset.samples[i].clone()).collect();
        let todo_labels: Vec<usize> = todo.iter().map(|s| s.label).collect();
        let batches = transform.load_train(todo, config.batch_size, config.seed, epoch, first, opts.workers);
        let progress = progress_bar((steps_per_epoch - done) as u64, "batches", opts.quiet);
        let (mut window_loss, mut window_n, mut window_top1, mut window_top5, mut window_images) =
            (0.0, 0usize, 0usize, 0usize, 0usize);
        let mut window_start = Instant::now();
        let (mut epoch_top1, mut epoch_n, mut epoch_loss) = (0usize, 0usize, 0.0);
        for batch in batches {
            if let Some((path, reason)) = batch.failures.first() {
                bail!("cannot load training image {}: {reason}", path.display())
            }
            let n = batch.items.len();
            let x = batch.input(&input_layer, device)?;
            let labels: Vec<u32> = batch.items.iter().map(|(i, _)| todo_labels[*i] as u32).collect();
            let labels = Tensor::from_vec(labels, n, device)?;
            let mode = if config.dropout {
                Mode::Train { seed: config.seed ^ (step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03) }
            } else {
                Mode::Eval
            };
            let logits = model.forward(&x, mode)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                let kept = match Checkpoint::latest_in(&opts.out)? {
                    Some(path) => format!("the last checkpoint, {}, is intact", path.display()),
                    None => format!("no checkpoint had been written to {} yet", opts.out.display()),
                };
                bail!(
                    "the loss became {loss_value} at step {} (epoch {}); stopping without saving: {kept}; \
                     try a lower --lr",
                    step + 1,
                    epoch + 1
                )
            }
            let grads = crate::ops::backward(&loss)?;
            sgd.step(&grads, sched.lr)?;
            step += 1;

            let mut hits = Hits::default();
            for (row, (i, _)) in logits.to_device(&Device::Cpu)?.to_vec2::<f32>()?.iter().zip(&batch.items) {
                hits.add(row, todo_labels[*i]);
            }
            let (top1, top5) = (hits.top1, hits.top5);
            (epoch_top1, epoch_n, epoch_loss) = (epoch_top1 + top1, epoch_n + n, epoch_loss + loss_value * n as f64);
            window_loss += loss_value * n as f64;
            window_n += n;
            window_top1 += top1;
            window_top5 += top5;
            window_images += n;
            progress.inc(1);
            progress.set_message(format!("epoch {} loss {:.4} lr {:.0e}", epoch + 1, loss_value, sched.lr));
            if step % opts.log_every == 0 || step % steps_per_epoch == 0 {
                let line = LogLine {
                    step,
                    epoch: step as f64 / steps_per_epoch as f64,
                    loss: window_loss / window_n as f64,
                    lr: sched.lr,
                    train_top1_error: Some(1.0 - window_top1 as f64 / window_n as f64),
                    train_top5_error: Some(1.0 - window_top5 as f64 / window_n as f64),
                    images_per_s: Some(window_images as f64 / window_start.elapsed().as_secs_f64()),
                    ..Default::default()
                };
                writeln!(log, "{}", serde_json::to_string(&line)?)?;
                (window_loss, window_n, window_top1, window_top5, window_images) = (0.0, 0, 0, 0, 0);
                window_start = Instant::now();
            }
            if opts.save_every.is_some_and(|every| step % every == 0) {
                save(&model, &sgd, epoch, step, &sched)?;
            }
            if stop.load(Ordering::SeqCst) {
                progress.finish_and_clear();
                let path = save(&model, &sgd, epoch, step, &sched)?;
                eprintln!(
                    "interrupted at step {step}: saved {}; continue with --resume {}",
                    path.display(),
                    opts.out.display()
                );
                return Ok(Outcome::Interrupted(path));
            }
        }
        progress.finish_and_clear();
        epoch += 1;

        // ---- end of epoch: validate, adjust the learning rate, checkpoint -------------------
        // The epoch's line: its mean loss and training error (over the images this process
        // trained on in the epoch, with dropout and augmentation as they were), and validation.
        let train_error = (epoch_n > 0).then(|| 1.0 - epoch_top1 as f64 / epoch_n as f64);
        let mut line = LogLine {
            step,
            epoch: epoch as f64,
            lr: sched.lr,
            loss: if epoch_n > 0 { epoch_loss / epoch_n as f64 } else { 0.0 },
            epoch_train_top1_error: train_error,
            ..Default::default()
        };
        if let Some(val) = &val_samples {
            let (top1, top5) = validate(&model, val, &transform, config.val_crops, config.batch_size, opts.workers)?;
            (line.val_top1_error, line.val_top5_error) = (Some(1.0 - top1), Some(1.0 - top5));
            line.val_crops = Some(config.val_crops);
            if !opts.quiet {
                eprintln!(
                    "epoch {epoch}: val top-1 error {:.2}%, top-5 error {:.2}%",
                    100.0 * (1.0 - top1),
                    100.0 * (1.0 - top5)
                );
            }
        }
        writeln!(log, "{}", serde_json::to_string(&line)?)?;
        sched.advance(&config, epoch, line.val_top1_error);
        save(&model, &sgd, epoch, step, &sched)?;
        if sched.finished(&config) {
            eprintln!(
                "epoch {epoch}: no better validation error for {} epochs after the last of {} drops; stopping",
                config.patience, config.max_drops
            );
            break;
        }
        if let (Some(target), Some(err)) = (config.target_train_error, train_error) {
            if err < target {
                eprintln!(
                    "epoch {epoch}: training error {:.2}% is below the target {:.2}%; stopping",
                    100.0 * err,
                    100.0 * target
                );
                break;
            }
        }
    }
    let final_path = opts.out.join("final.safetensors");
    save_safetensors(&model.state_dict()?, &described, &final_path)?;
    Ok(Outcome::Finished(final_path))
}

/// A resumed run's log keeps what was written up to its checkpoint's step: the lines after it
/// (written before a crash or a kill, and about to be written again) are removed, as
/// TensorBoard's `purge_step` does, so that each step appears once; so is a last line cut short
/// by a kill. Returns how many lines were removed.
fn purge_log_after(path: &Path, step: usize) -> anyhow::Result<usize> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().collect();
    let kept: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|&(i, line)| match serde_json::from_str::<LogLine>(line) {
            Ok(l) => l.step <= step,
            // not a line of ours: kept, unless it is the last and unfinished
            Err(_) => i + 1 < lines.len() || text.ends_with('\n'),
        })
        .map(|(_, line)| *line)
        .collect();
    let removed = lines.len() - kept.len();
    if removed > 0 {
        write_atomically(path, |out| kept.iter().try_for_each(|line| writeln!(out, "{line}")))?;
    }
    Ok(removed)
}

impl ScheduleState {
    /// The rate for the next epoch, from the epoch just ended.
    fn advance(&mut self, config: &TrainConfig, epoch: usize, val_error: Option<f64>) {
        match config.schedule {
            Schedule::Constant => {}
            Schedule::Step => {
                if epoch.is_multiple_of(config.step_epochs.max(1)) {
                    self.lr *= config.gamma;
                }
            }
            Schedule::Multistep => {
                if config.milestones.contains(&epoch) {
                    self.lr *= config.gamma;
                }
            }
            Schedule::Plateau => {
                let Some(err) = val_error else { return };
                if self.best_val_error.is_none_or(|best| err < best) {
                    self.best_val_error = Some(err);
                    self.epochs_without_improvement = 0;
                    return;
                }
                self.epochs_without_improvement += 1;
                if self.epochs_without_improvement >= config.patience && self.drops < config.max_drops {
                    self.lr /= 10.0;
                    self.drops += 1;
                    self.epochs_without_improvement = 0;
                }
            }
        }
    }

    /// Whether the plateau rule has ended the run: no improvement for `patience` epochs after
    /// its last drop.
    fn finished(&self, config: &TrainConfig) -> bool {
        config.schedule == Schedule::Plateau
            && self.drops >= config.max_drops
            && self.epochs_without_improvement >= config.patience
    }
}

/// The side of the image crops are taken from: the paper's 256, or CIFAR-10's 32.
pub fn base_side(preset: Preset) -> u32 {
    preset.facts().base_side
}

/// The statistics file next to the data, computed first if it is not there yet.
fn load_or_compute_stats(data: &Path, samples: &[Sample], base: u32, quiet: bool) -> anyhow::Result<Stats> {
    let path = Stats::path_for(data);
    if path.exists() {
        let stats = Stats::load(&path)?;
        if stats.side == base as usize {
            return Ok(stats);
        }
        bail!(
            "{} was computed for {}x{} images, but this preset needs {base}x{base}; rerun `alexnet data-stats`",
            path.display(),
            stats.side,
            stats.side
        )
    }
    if !quiet {
        eprintln!(
            "computing the mean image and RGB principal components of {} images (once; saved to {})",
            samples.len(),
            path.display()
        );
    }
    Stats::compute(samples, base, &progress_bar(samples.len() as u64, "images", quiet))?.save(&path)?;
    // use what was stored (f32), so this run and any resumed one see the same numbers
    Stats::load(&path)
}

/// The permutation of the training set for `epoch`.
fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
        seed.wrapping_add(epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    ));
    order
}

/// The first `limit` images taking classes in turn (the first image of every class, then the
/// second of every class, ...): a fixed subset with the classes balanced.
fn balanced_subset(samples: Vec<Sample>, limit: usize) -> Vec<Sample> {
    let mut rank_in_class = HashMap::new();
    let mut ranked: Vec<(usize, Sample)> = samples
        .into_iter()
        .map(|s| {
            let rank = rank_in_class.entry(s.label).or_insert(0usize);
            *rank += 1;
            (*rank, s)
        })
        .collect();
    ranked.sort_by_key(|(rank, s)| (*rank, s.label));
    ranked.into_iter().take(limit).map(|(_, s)| s).collect()
}

/// Top-1 and top-5 accuracy on the validation images (centre crop, or the ten crops).
fn validate(
    model: &AlexNet,
    samples: &[Sample],
    t: &TrainTransform,
    crops: usize,
    batch: usize,
    workers: usize,
) -> anyhow::Result<(f64, f64)> {
    let input_layer = t.input_layer();
    let mut hits = Hits::default();
    for b in t.load_val(samples.to_vec(), batch, crops == 10, workers) {
        if let Some((path, reason)) = b.failures.first() {
            bail!("cannot load validation image {}: {reason}", path.display())
        }
        let x = b.input(&input_layer, model.device())?;
        for (p, (i, _)) in predict(model, &x, b.items.len(), crops)?.iter().zip(&b.items) {
            hits.add(p, samples[*i].label);
        }
    }
    Ok(hits.accuracy())
}

// ---- checkpoints -----------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub config: TrainConfig,
    pub classes: Vec<String>,
    /// Completed epochs.
    pub epoch: usize,
    /// Completed steps.
    pub step: usize,
    pub schedule: ScheduleState,
    /// `--save-every` of the run, which a resumed run keeps unless given again.
    #[serde(default)]
    pub save_every: Option<usize>,
}

/// A checkpoint: the weights in the preset's names, `momentum/<name>` for each momentum
/// buffer, and the run's state as JSON metadata (`alexnet`) beside what every file of the run
/// records (preset, classes, preprocessing). The data order, augmentation and dropout are all
/// derived from (seed, epoch, step), so no generator state is needed.
pub struct Checkpoint {
    pub path: PathBuf,
    pub meta: CheckpointMeta,
}

impl Checkpoint {
    fn save(
        dir: &Path,
        model: &AlexNet,
        sgd: &Sgd,
        meta: &CheckpointMeta,
        described: &HashMap<String, String>,
        keep: usize,
    ) -> anyhow::Result<PathBuf> {
        let mut tensors = model.state_dict()?;
        let velocity: HashMap<_, _> = sgd.slots.iter().map(|s| (s.var.id(), s.velocity.clone())).collect();
        // every trained parameter's (a frozen one has none)
        for p in model.parameters() {
            if let Some(v) = p.gather(|var| velocity.get(&var.id()).cloned())? {
                tensors.push((format!("{MOMENTUM_PREFIX}{}", p.key), v));
            }
        }
        let mut metadata = described.clone();
        metadata.insert("alexnet".to_string(), serde_json::to_string(meta)?);
        let path = dir.join(format!("checkpoint-{:07}.safetensors", meta.step));
        save_safetensors(&tensors, &metadata, &path)?;
        // keep the newest `keep`
        let old = Self::all_in(dir)?;
        for p in old.iter().take(old.len().saturating_sub(keep.max(1))) {
            let _ = std::fs::remove_file(p);
        }
        Ok(path)
    }

    /// The checkpoints in a run's folder, oldest first (their names sort by step).
    fn all_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with("checkpoint-") && n.ends_with(".safetensors")
                })
            })
            .collect();
        found.sort();
        Ok(found)
    }

    /// The newest checkpoint in a run's folder, if any.
    pub fn latest_in(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
        Ok(Self::all_in(dir)?.pop())
    }

    /// `--resume`'s argument: a checkpoint, or a run's folder (its newest checkpoint).
    pub fn resolve(path: &Path) -> anyhow::Result<PathBuf> {
        if !path.is_dir() {
            return Ok(path.to_path_buf());
        }
        Self::latest_in(path)?
            .with_context(|| format!("{} holds no checkpoint-*.safetensors to resume", path.display()))
    }

    /// The run state of the checkpoint at `path`, read from its header alone (the weights are
    /// read where they are needed).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use std::io::Read;
        let not_ours = || format!("{} is not a safetensors checkpoint", path.display());
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).with_context(not_ours)?;
        // safetensors' own bound on a header
        let len = u64::from_le_bytes(len).min(100 << 20) as usize;
        let mut header = vec![0u8; len];
        file.read_exact(&mut header).with_context(not_ours)?;
        let header: serde_json::Value = serde_json::from_slice(&header).with_context(not_ours)?;
        let json = header["__metadata__"]["alexnet"].as_str().with_context(|| {
            format!("{} is a weight file, not a training checkpoint (no run state)", path.display())
        })?;
        Ok(Checkpoint { path: path.to_path_buf(), meta: serde_json::from_str(json)? })
    }

    /// The optimiser's velocities from the checkpoint's `momentum/<name>` tensors.
    fn restore_momentum(
        &self,
        tensors: &BTreeMap<String, Tensor>,
        model: &AlexNet,
        sgd: &mut Sgd,
    ) -> anyhow::Result<()> {
        let index: HashMap<_, _> = sgd.slots.iter().enumerate().map(|(i, s)| (s.var.id(), i)).collect();
        // every trained parameter's (a frozen one has no slot)
        for p in model.parameters().into_iter().filter(|p| p.parts.iter().all(|v| index.contains_key(&v.id()))) {
            let key = format!("{MOMENTUM_PREFIX}{}", p.key);
            let whole = tensors.get(&key).with_context(|| format!("{}: no `{key}`", self.path.display()))?;
            let mut row = 0;
            for var in &p.parts {
                let rows = var.dim(0)?;
                let slot = &mut sgd.slots[index[&var.id()]];
                slot.velocity = whole.narrow(0, row, rows)?.to_device(var.device())?.contiguous()?;
                row += rows;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's rule: divide by 10 after `patience` epochs without a better validation
    /// error, at most `max_drops` times, and stop at the plateau after the last.
    #[test]
    fn the_plateau_rule_drops_three_times_then_stops() {
        let config = TrainConfig { patience: 2, ..TrainConfig::recipe(Recipe::Paper, Preset::CifarTowers) };
        let mut s = ScheduleState { lr: 0.01, best_val_error: None, epochs_without_improvement: 0, drops: 0 };
        let errors = [0.5, 0.4, 0.41, 0.42, 0.3, 0.3, 0.31, 0.2, 0.25, 0.21, 0.22, 0.23, 0.24, 0.25];
        let mut lrs = vec![];
        for (epoch, &err) in errors.iter().enumerate() {
            s.advance(&config, epoch + 1, Some(err));
            lrs.push(s.lr);
            if s.finished(&config) {
                break;
            }
        }
        let expected = [1e-2, 1e-2, 1e-2, 1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5];
        assert_eq!(lrs.len(), expected.len(), "{lrs:?}");
        for (lr, e) in lrs.iter().zip(expected) {
            assert!((lr / e - 1.0).abs() < 1e-12, "{lrs:?}");
        }
        assert_eq!(s.drops, 3); // and stopped at the 12th epoch: its second without a better error since the third
    }

    /// PyTorch's `MultiStepLR(milestones=[2, 4], gamma=0.1)`: epochs 1-2 at the rate, 3-4 at a
    /// tenth, then a hundredth.
    #[test]
    fn multistep_multiplies_after_each_milestone() {
        let config = TrainConfig {
            schedule: Schedule::Multistep,
            milestones: vec![2, 4],
            ..TrainConfig::recipe(Recipe::Paper, Preset::CifarTowers)
        };
        let mut s = ScheduleState { lr: 0.01, best_val_error: None, epochs_without_improvement: 0, drops: 0 };
        let mut lrs = vec![s.lr];
        for epoch in 1..6 {
            s.advance(&config, epoch, Some(0.5));
            lrs.push(s.lr);
        }
        let expected = [1e-2, 1e-2, 1e-3, 1e-3, 1e-4, 1e-4];
        for (lr, e) in lrs.iter().zip(expected) {
            assert!((lr / e - 1.0).abs() < 1e-12, "{lrs:?}");
        }
        assert!(!s.finished(&config));
    }
}
