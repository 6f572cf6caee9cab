//! The `alexnet` binary: summary totals, `infer` against PyTorch's logits, `bench --layers`,
//! and clear errors (never a panic) for bad weights and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use alexnet::weights::save_safetensors;
use alexnet::Preset;
use candle_core::{Device, Tensor};
use common::*;

/// A temporary folder holding the reference torchvision weights (in torchvision's names) and
/// the fixtures' input batch, written once for all tests of this file.
fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = shared_scratch_dir("cli");
        let state = reference_state(Preset::Torchvision);
        save_safetensors(&state, &Default::default(), &dir.join("tv.safetensors")).unwrap();
        let input = reference_input(Preset::Torchvision);
        save_safetensors(&[("input".into(), input.clone())], &Default::default(), &dir.join("input.safetensors"))
            .unwrap();
        let small = Tensor::zeros((1, 3, 60, 60), candle_core::DType::F32, &Device::Cpu).unwrap();
        let rank3 = input.get(0).unwrap();
        let empty = Tensor::zeros((0, 3, 224, 224), candle_core::DType::F32, &Device::Cpu).unwrap();
        save_safetensors(
            &[("input".into(), small), ("rank3".into(), rank3), ("empty".into(), empty)],
            &Default::default(),
            &dir.join("bad-input.safetensors"),
        )
        .unwrap();
        // The same weights, then with one tensor mis-shaped, one missing, one extra.
        let mut misshaped = state.clone();
        misshaped[0].1 = misshaped[0].1.narrow(3, 0, 10).unwrap();
        save_safetensors(&misshaped, &Default::default(), &dir.join("misshaped.safetensors")).unwrap();
        save_safetensors(&state[..15], &Default::default(), &dir.join("missing.safetensors")).unwrap();
        let mut extra = state.clone();
        extra.push((
            "classifier.7.weight".into(),
            Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
        ));
        save_safetensors(&extra, &Default::default(), &dir.join("extra.safetensors")).unwrap();
        dir
    })
    .as_path()
}

fn file(name: &str) -> String {
    workdir().join(name).to_string_lossy().into_owned()
}

#[test]
fn summary_prints_the_parameter_totals() {
    for (preset, total) in [("paper", "60,965,224"), ("caffe", "60,965,224"), ("torchvision", "61,100,840")] {
        let out = alexnet(&["summary", "--preset", preset]);
        assert!(out.status.success());
        let text = stdout(&out);
        let last = text.lines().last().unwrap();
        assert!(last.starts_with("total") && last.contains(total), "{preset}: {last}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&alexnet(&["summary", "--preset", "paper", "--json"]).stdout).unwrap();
    assert_eq!(json["params"], 60_965_224);
}

#[test]
fn infer_on_torchvision_named_weights_reproduces_pytorch_logits() {
    let output: PathBuf = workdir().join("logits.safetensors");
    let out = alexnet(&[
        "infer",
        "--preset",
        "torchvision",
        "--weights",
        &file("tv.safetensors"),
        "--input",
        &file("input.safetensors"),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let logits = candle_core::safetensors::load(&output, &Device::Cpu).unwrap();
    let expected = fixture("torchvision.safetensors");
    assert_close("alexnet infer (torchvision)", &logits["logits"], get(&expected, "logits"), 1e-4);
}

#[test]
fn classify_prints_top5_as_json() {
    let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos/chelsea.png");
    let out = alexnet(&[
        "classify",
        "--preset",
        "torchvision",
        "--weights",
        &file("tv.safetensors"),
        "--json",
        photo.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["top"].as_array().unwrap().len(), 5);
    let p: f64 = json[0]["top"].as_array().unwrap().iter().map(|t| t["probability"].as_f64().unwrap()).sum();
    assert!(p > 0.0 && p <= 1.0 + 1e-6);
}

/// `bench` on the small Figure 1 net at batch 2, one run, no warm-up, with `flags`: its JSON.
fn bench_fig1(flags: &[&str], json_name: &str) -> serde_json::Value {
    let json = workdir().join(json_name);
    let mut args = vec!["bench", "--preset", "fig1-relu", "--batch-sizes", "2", "--runs", "1", "--warmup", "0"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--json", json.to_str().unwrap()]);
    let out = alexnet(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

/// `bench --layers` reports every layer of the pass, in order, with a time and the images/s.
#[test]
fn bench_layers_reports_every_layer() {
    let results = bench_fig1(&["--layers"], "bench.json");
    let layers: Vec<&str> =
        results[0]["layers"].as_array().unwrap().iter().map(|l| l["layer"].as_str().unwrap()).collect();
    assert_eq!(layers, ["conv1", "pool1", "conv2", "pool2", "conv3", "pool3", "fc"]);
    assert!(results[0]["layers"].as_array().unwrap().iter().all(|l| l["median_s"].as_f64().unwrap() >= 0.0));
    assert!(results[0]["images_per_s"].as_f64().unwrap() > 0.0);
}

/// `bench --train --layers` times the layers of a training step's forward pass and reports the
/// whole step.
#[test]
fn bench_layers_of_a_training_step() {
    let results = bench_fig1(&["--train", "--layers"], "bench-train.json");
    assert_eq!(results[0]["mode"], "train");
    assert_eq!(results[0]["layers"].as_array().unwrap().len(), 7);
    assert!(results[0]["images_per_s"].as_f64().unwrap() > 0.0);
}

/// `bench --data` times both input pipelines over every image of a folder; an empty folder is a
/// clear error.
#[test]
fn bench_data_times_the_input_pipelines() {
    let data = image_folder(2, 2);
    let results = bench_fig1(&["--data", data.path().to_str().unwrap()], "bench-data.json");
    let modes: Vec<&str> = results.as_array().unwrap().iter().map(|m| m["mode"].as_str().unwrap()).collect();
    assert_eq!(modes, ["data-eval", "data-train"]);
    assert!(results.as_array().unwrap().iter().all(|m| m["images_per_s"].as_f64().unwrap() > 0.0));
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir(empty.path().join("class0")).unwrap();
    let out = alexnet(&["bench", "--data", empty.path().to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no images"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bad_weights_are_clear_errors() {
    let infer = |preset: &str, weights: &str| {
        expect_error(&[
            "infer",
            "--preset",
            preset,
            "--weights",
            weights,
            "--input",
            &file("input.safetensors"),
            "--output",
            &file("out.safetensors"),
        ])
    };
    let err = infer("torchvision", "/nonexistent/alexnet.safetensors");
    assert!(err.contains("/nonexistent/alexnet.safetensors") && err.contains("does not exist"), "{err}");

    let err = infer("paper", &file("tv.safetensors"));
    assert!(err.contains("Torchvision-named") && err.contains("--preset torchvision"), "{err}");

    let err = infer("torchvision", &file("misshaped.safetensors"));
    assert!(
        err.contains("`features.0.weight`") && err.contains("[64, 3, 11, 10]") && err.contains("[64, 3, 11, 11]"),
        "{err}"
    );

    let err = infer("torchvision", &file("missing.safetensors"));
    assert!(err.contains("`classifier.6.bias`") && err.contains("missing"), "{err}");

    let err = infer("torchvision", &file("extra.safetensors"));
    assert!(err.contains("`classifier.7.weight` [2, 2]") && err.contains("unexpected"), "{err}");

    let err = infer("torchvision", &file("input.safetensors"));
    assert!(err.contains("no AlexNet weights"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let infer = |key: &str| {
        expect_error(&[
            "infer",
            "--preset",
            "torchvision",
            "--weights",
            &file("tv.safetensors"),
            "--input",
            &file("bad-input.safetensors"),
            "--input-key",
            key,
            "--output",
            &file("out2.safetensors"),
        ])
    };
    let err = infer("input");
    assert!(err.contains("at least 63x63") && err.contains("60x60"), "{err}");
    let err = infer("rank3");
    assert!(err.contains("[N, 3, H, W]") && err.contains("[3, 224, 224]"), "{err}");
    let err = infer("nope");
    assert!(err.contains("no tensor `nope`"), "{err}");
    let err = infer("empty");
    assert!(err.contains("the batch is empty"), "{err}");
}

#[test]
fn cuda_without_cuda_support_is_a_clear_error() {
    if candle_core::utils::cuda_is_available() {
        return;
    }
    let err = expect_error(&[
        "classify",
        "--preset",
        "torchvision",
        "--weights",
        &file("tv.safetensors"),
        "--device",
        "cuda:0",
        "x.png",
    ]);
    assert!(err.contains("without CUDA support"), "{err}");
    let weights = file("tv.safetensors");
    let with_towers =
        |towers: &str| expect_error(&["classify", "--weights", &weights, "--tower-devices", towers, "x.png"]);
    let err = with_towers("cuda:0,cuda:1");
    assert!(err.contains("without CUDA support"), "{err}");
    let err = with_towers("cpu");
    assert!(err.contains("--tower-devices takes two devices"), "{err}");
}
