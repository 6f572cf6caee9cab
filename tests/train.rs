//! Training: gradients and SGD steps against PyTorch, the paper's update rule, exact resume,
//! data statistics against numpy, NaN handling and the plot (fixtures: scripts/make_train_fixtures.py).

mod common;

use std::io::Write;
use std::path::Path;

use alexnet::data::augment::Stats;
use alexnet::data::dataset::Sample;
use alexnet::init::{reference_pattern, Init};
use alexnet::optim::{Sgd, SgdConfig, UpdateRule};
use alexnet::weights::Params;
use alexnet::{AlexNet, Mode, Placement, Preset};
use candle_core::{Device, Tensor, Var};
use common::*;

#[test]
fn gradients_and_two_sgd_steps_match_pytorch() {
    let f = fixture("train/sgd.safetensors");
    let model = AlexNet::new(
        Preset::CifarTowers,
        &mut Params::Init(Init::Reference { seed: SEED }),
        &Placement::on(&Device::Cpu),
    )
    .unwrap();
    let x =
        Tensor::from_vec(reference_pattern("train.input", SEED, 4 * 3 * 28 * 28, 2.0), (4, 3, 28, 28), &Device::Cpu)
            .unwrap();
    let labels = Tensor::new(&[1u32, 5, 9, 0], &Device::Cpu).unwrap();
    let config = SgdConfig { momentum: 0.9, weight_decay: 5e-4, rule: UpdateRule::Pytorch, decay_biases: true };
    // every parameter decays (`decay_biases`), as PyTorch's SGD decays everything it is given
    let mut sgd = Sgd::for_params(config, model.parameters()).unwrap();
    for step in 1..=2 {
        let loss = candle_nn::loss::cross_entropy(&model.forward(&x, Mode::Eval).unwrap(), &labels).unwrap();
        assert_close(
            &format!("loss before step {step}"),
            &loss.reshape(1).unwrap(),
            get(&f, &format!("loss{step}")),
            1e-5,
        );
        let grads = alexnet::ops::backward(&loss).unwrap();
        if step == 1 {
            for p in model.parameters() {
                let g = p.gather(|v| grads.get(v).cloned()).unwrap().unwrap();
                assert_matches_summary(&format!("grad {}", p.key), &g, &f, &format!("grad1/{}", p.key), 1e-4);
            }
        }
        sgd.step(&grads, 0.01).unwrap();
        for (key, w) in model.state_dict().unwrap() {
            assert_matches_summary(&format!("after step {step}: {key}"), &w, &f, &format!("step{step}/{key}"), 1e-5);
        }
    }
}

#[test]
fn the_paper_rule_follows_its_formula_when_the_learning_rate_changes() {
    let w0 = [0.5f64, -1.0, 2.0];
    let var = Var::new(&w0.map(|v| v as f32), &Device::Cpu).unwrap();
    let config = SgdConfig { momentum: 0.9, weight_decay: 0.0005, rule: UpdateRule::Paper, decay_biases: false };
    let mut sgd = Sgd::new(config, vec![(var.clone(), false)]).unwrap();
    let (mut w, mut v) = (w0, [0f64; 3]);
    for lr in [0.01, 0.001, 0.001] {
        // loss = sum(w^3) / 3, so dL/dw = w^2
        let loss = var.as_tensor().powf(3.0).unwrap().sum_all().unwrap().affine(1.0 / 3.0, 0.0).unwrap();
        sgd.step(&alexnet::ops::backward(&loss).unwrap(), lr).unwrap();
        for i in 0..3 {
            v[i] = 0.9 * v[i] - 0.0005 * lr * w[i] - lr * w[i] * w[i];
            w[i] += v[i];
        }
        let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        for i in 0..3 {
            assert!((got[i] as f64 - w[i]).abs() < 1e-6, "lr {lr}: w[{i}] = {} but the formula gives {}", got[i], w[i]);
        }
    }
    // PyTorch's rule differs right after the drop: it rescales the whole velocity at once.
    let var2 = Var::new(&w0.map(|v| v as f32), &Device::Cpu).unwrap();
    let mut torch_rule =
        Sgd::new(SgdConfig { rule: UpdateRule::Pytorch, ..config }, vec![(var2.clone(), false)]).unwrap();
    for lr in [0.01, 0.001] {
        let loss = var2.as_tensor().powf(3.0).unwrap().sum_all().unwrap().affine(1.0 / 3.0, 0.0).unwrap();
        torch_rule.step(&alexnet::ops::backward(&loss).unwrap(), lr).unwrap();
    }
    let (a, b): (Vec<f32>, Vec<f32>) = (var.as_tensor().to_vec1().unwrap(), var2.as_tensor().to_vec1().unwrap());
    assert_ne!(a, b);
}

#[test]
fn pca_statistics_match_numpy() {
    let f = fixture("train/stats.safetensors");
    let names = std::fs::read_to_string(fixture_path("train/stats_images.txt")).unwrap();
    let samples: Vec<Sample> =
        names.lines().map(|n| Sample::file(shared_data(&format!("imagenet-sample/{n}")), 0)).collect();
    let stats = Stats::compute(&samples, 256, &indicatif::ProgressBar::hidden()).unwrap();
    let mean = Tensor::from_vec(stats.mean_image.clone(), (3, 256, 256), &Device::Cpu).unwrap();
    assert_matches_summary("mean image", &mean, &f, "mean_image", 1e-6);
    let vals: Vec<f64> = get(&f, "eigvals").to_vec1().unwrap();
    let vecs: Vec<Vec<f64>> = get(&f, "eigvecs").to_vec2().unwrap();
    for i in 0..3 {
        assert!(
            (stats.eigvals[i] - vals[i]).abs() / vals[i] < 1e-9,
            "eigenvalue {i}: {} vs numpy {}",
            stats.eigvals[i],
            vals[i]
        );
        let dot: f64 = (0..3).map(|r| stats.eigvecs[r][i] * vecs[r][i]).sum();
        assert!((dot.abs() - 1.0).abs() < 1e-9, "eigenvector {i} differs from numpy's (|dot| = {})", dot.abs());
    }
    eprintln!("eigenvalues {:?} (numpy {vals:?})", stats.eigvals);
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--preset",
        "cifar-towers",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch-size",
        "8",
        "--seed",
        "7",
        "--quiet",
        "--keep",
        "20",
    ];
    args.extend_from_slice(extra);
    alexnet(&args)
}

fn final_weights(out: &Path) -> Vec<(String, Vec<f32>)> {
    let mut t: Vec<(String, Vec<f32>)> = candle_core::safetensors::load(out.join("final.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, flat(&v)))
        .collect();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

/// Each log line's step, in order.
fn logged_steps(out: &Path) -> Vec<u64> {
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
}

/// A run resumed from a checkpoint before its end, as after a crash, writes the steps after the
/// checkpoint again: its log drops what it held past the checkpoint (and a line a kill cut short)
/// so that each step appears once.
#[test]
fn a_resumed_run_rewrites_its_log_after_the_checkpoint() {
    let data = image_folder(4, 8); // 4 steps an epoch: lines at steps 4 and 8, a step's and an epoch's
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("run");
    let o = train(data.path(), &out, &["--epochs", "2", "--save-every", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let straight = logged_steps(&out);
    assert_eq!(straight, [4, 4, 8, 8]);
    // what a kill during a write leaves at the end
    std::fs::OpenOptions::new()
        .append(true)
        .open(out.join("log.jsonl"))
        .unwrap()
        .write_all(b"{\"step\":9,\"ep")
        .unwrap();
    let ckpt = out.join("checkpoint-0000003.safetensors");
    let o = train(data.path(), &out, &["--epochs", "2", "--resume", ckpt.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(logged_steps(&out), straight, "each step once after resuming from step 3");
}

#[test]
fn resuming_is_bit_identical_to_training_straight_through() {
    let data = image_folder(4, 8);
    let runs = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let out = runs.path().join(name);
        let o = train(data.path(), &out, extra);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        out
    };
    // two epochs (4 steps each) straight, with dropout, crops, flips and PCA on
    let straight = run("straight", &["--epochs", "2", "--save-every", "3"]);
    // one epoch, then resume for the second
    let first = run("first", &["--epochs", "1"]);
    let ckpt = first.join("checkpoint-0000004.safetensors");
    let resumed = run("first", &["--epochs", "2", "--resume", ckpt.to_str().unwrap()]);
    assert_eq!(final_weights(&straight), final_weights(&resumed), "epoch-boundary resume differs");
    // resume in the middle of the first epoch, from the step-3 checkpoint of the straight run
    let mid = straight.join("checkpoint-0000003.safetensors");
    let from_mid = run("mid", &["--epochs", "2", "--resume", mid.to_str().unwrap()]);
    assert_eq!(final_weights(&straight), final_weights(&from_mid), "mid-epoch resume differs");

    // the log has steps and epochs, and plots
    let log = std::fs::read_to_string(straight.join("log.jsonl")).unwrap();
    assert!(log.lines().count() >= 3);
    let png = runs.path().join("curves.png");
    let o = alexnet(&["plot", straight.join("log.jsonl").to_str().unwrap(), "-o", png.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(image::image_dimensions(&png).unwrap(), (900, 780));
}

#[test]
fn milestones_that_would_be_ignored_or_counted_once_are_refused() {
    let data = image_folder(4, 8);
    let out = tempfile::tempdir().unwrap();
    for (flags, says) in [
        (&["--milestones", "2", "--schedule", "step"][..], "not to --schedule step"),
        (&["--milestones", "2,1,2"][..], "lists epoch 2 twice"),
    ] {
        let o = train(data.path(), out.path(), flags);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(says), "{err}");
    }
}

#[test]
fn a_diverging_loss_stops_with_a_message_and_keeps_the_last_checkpoint() {
    let data = image_folder(4, 8);
    let out = tempfile::tempdir().unwrap();
    let o = train(data.path(), out.path(), &["--epochs", "3", "--lr", "1e12", "--no-augment", "--log-every", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the loss became") && !err.contains("panicked"), "{err}");
    // the step named is the one whose loss diverged: the one after the last step logged
    let log = std::fs::read_to_string(out.path().join("log.jsonl")).unwrap_or_default();
    let last_logged =
        log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64()).max();
    let step = last_logged.unwrap_or(0) + 1;
    assert!(err.contains(&format!("at step {step} ")), "the diverging step is {step}: {err}");
    let mut checkpoints = Vec::new();
    for entry in std::fs::read_dir(out.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("checkpoint-") {
            alexnet::train::Checkpoint::load(&path).expect("every checkpoint left behind is complete");
            checkpoints.push(path);
        }
    }
    // it says which checkpoint is intact, or that there is none yet
    match checkpoints.iter().max() {
        Some(last) => assert!(err.contains(&last.display().to_string()), "{err}"),
        None => assert!(err.contains("no checkpoint had been written"), "{err}"),
    }
}

#[test]
fn pca_colour_shift_is_sized_for_pixels_in_0_1() {
    use alexnet::data::augment::TrainTransform;
    // one principal component along grey with the variance of 0..255 pixels (~3 x 64^2)
    let g = 1.0 / 3f64.sqrt();
    let stats = Stats {
        side: 32,
        mean_image: vec![0.0; 3 * 32 * 32],
        eigvecs: [[g, 0.0, 0.0], [g, 0.0, 0.0], [g, 0.0, 0.0]],
        eigvals: [12288.0, 0.0, 0.0],
    };
    let base = TrainTransform {
        base: 32,
        crop: 32,
        scale: 1.0,
        bgr: false,
        flip: false,
        pca_std: 0.0,
        random_crop: false,
        stats: std::sync::Arc::new(stats),
    };
    let pca = TrainTransform { pca_std: 0.1, ..base.clone() };
    let sample = Sample::file(shared_data("photos/chelsea.png"), 0);
    let largest = (0..20)
        .map(|pos| {
            let (a, b) = (base.train(&sample, 1, 0, pos).unwrap(), pca.train(&sample, 1, 0, pos).unwrap());
            (a[0] - b[0]).abs()
        })
        .fold(0f32, f32::max);
    // alpha ~ N(0, 0.1): |shift| = |alpha| * 12288 / 255 * g, below 4 sigma = 11.1 pixel levels
    assert!(largest > 0.0 && largest < 11.2, "largest colour shift {largest} pixel levels");
}
