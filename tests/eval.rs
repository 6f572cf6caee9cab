//! Preprocessing against PIL/torchvision, 10-crop logits against PyTorch, and `alexnet eval`
//! on the same images in every layout (fixtures: scripts/make_eval_fixtures.py).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use alexnet::data::decode;
use alexnet::data::transform::{pil_resize, Transform};
use alexnet::init::reference_pattern;
use alexnet::weights::save_safetensors;
use alexnet::{Mode, Placement, Preset};
use candle_core::{Device, Tensor};
use common::*;

fn shared(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data").join(rel)
}

fn synthetic(key: &str, h: usize, w: usize) -> image::RgbImage {
    let v = reference_pattern(key, 1, h * w * 3, 1.0);
    let bytes: Vec<u8> = v.iter().map(|x| ((x + 1.0) * 128.0).floor().min(255.0) as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes).unwrap()
}

#[test]
fn pil_bilinear_resize_is_bit_exact() {
    let f = fixture("eval/resize.safetensors");
    for (name, (h, w), (oh, ow)) in
        [("down", (131, 173), (64, 85)), ("up", (37, 29), (61, 50)), ("mixed", (90, 40), (45, 71))]
    {
        let ours = pil_resize(&synthetic(&format!("resize.{name}"), h, w), ow, oh).into_raw();
        let theirs: Vec<u8> = get(&f, name).flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours, theirs, "{name}: resize differs from PIL");
    }
}

#[test]
fn torchvision_preprocessing_matches_on_real_jpegs() {
    let f = fixture("eval/torchvision_pixels.safetensors");
    let transform = Transform::for_preset(Preset::Torchvision);
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    let (mut within, mut total, mut worst) = (0usize, 0usize, 0i32);
    for (name, pixels) in &f {
        let chw =
            transform.apply(&decode(&shared(&format!("imagenet-sample/{name}"))).unwrap(), false).unwrap().remove(0);
        let theirs: Vec<u8> = pixels.flatten_all().unwrap().to_vec1().unwrap(); // HWC
        for (i, v) in chw.iter().enumerate() {
            let (c, yx) = (i / (224 * 224), i % (224 * 224));
            let ours = ((v * std[c] + mean[c]) * 255.0).round() as i32;
            let d = (ours - theirs[yx * 3 + c] as i32).abs();
            within += usize::from(d <= 1);
            worst = worst.max(d);
            total += 1;
        }
    }
    let fraction = within as f64 / total as f64;
    eprintln!(
        "{} JPEGs: {:.4}% of values within 1/255 of torchvision, largest difference {worst}/255",
        f.len(),
        100.0 * fraction
    );
    assert!(fraction >= 0.999, "only {:.4}% within 1/255", 100.0 * fraction);
}

/// The PIL-exactness tests hold with and without libjpeg-turbo's SIMD (its integer IDCT gives the
/// same pixels); this one catches a build that lost the SIMD: mozjpeg-sys falls back to plain C
/// when it finds no nasm at build time, and only warns. Where nasm is installed now (CI's
/// `scripts/setup.sh` installs it before building), an x86-64 build must have used it.
#[test]
#[cfg(target_arch = "x86_64")]
fn jpeg_decoding_uses_simd_where_nasm_is_installed() {
    if std::env::var("JSIMD_FORCENONE").is_ok_and(|v| v == "1") {
        return; // libjpeg-turbo's own switch to turn its SIMD off
    }
    let nasm = std::process::Command::new("nasm").arg("-v").output().is_ok_and(|o| o.status.success());
    eprintln!("nasm installed: {nasm}; JPEG decoding with SIMD: {}", alexnet::data::jpeg_simd());
    if nasm {
        assert!(
            alexnet::data::jpeg_simd(),
            "nasm is installed, but this build decodes JPEGs without SIMD: it was built before nasm was \
             (cargo clean -p mozjpeg-sys, then build again)"
        );
    }
}

#[test]
fn ten_crop_logits_match_pytorch() {
    let f = fixture("eval/tencrop.safetensors");
    let model = reference_model(Preset::Torchvision, &Placement::on(&Device::Cpu));
    let transform = Transform::for_preset(Preset::Torchvision);
    for name in ["chelsea.png", "coffee.png"] {
        let crops = transform.apply(&decode(&shared(&format!("photos/{name}"))).unwrap(), true).unwrap();
        let x = Tensor::from_vec(crops.concat(), (10, 3, 224, 224), &Device::Cpu).unwrap();
        let logits = model.forward(&x, Mode::Eval).unwrap();
        assert_close(&format!("{name} 10-crop logits"), &logits, get(&f, &format!("{name}/logits")), 1e-4);
        let probs = candle_nn::ops::softmax_last_dim(&logits).unwrap().mean(0).unwrap();
        assert_close(&format!("{name} 10-crop softmax mean"), &probs, get(&f, &format!("{name}/probs")), 1e-4);
    }
}

// ---- alexnet eval on the same images in every layout ---------------------------------------

const IMAGES: usize = 12;

fn sample_images() -> Vec<(PathBuf, String)> {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(shared("imagenet-sample")).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    entries
        .into_iter()
        .step_by(20)
        .take(IMAGES)
        .map(|p| {
            let wnid = p.file_name().unwrap().to_string_lossy()[..9].to_string();
            (p, wnid)
        })
        .collect()
}

/// The torchvision reference weights and the three layouts of the same images, built once.
fn layouts() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = shared_scratch_dir("eval-layouts");
        save_safetensors(&reference_state(Preset::Torchvision), &Default::default(), &root.join("tv.safetensors"))
            .unwrap();
        let images = sample_images();
        let devkit_order: Vec<String> =
            std::fs::read_to_string(fixture_path("eval/meta_order.txt")).unwrap().lines().map(String::from).collect();
        for layout in ["a", "b", "c"] {
            std::fs::create_dir_all(root.join(layout)).unwrap();
        }
        let (mut labels, mut ids) = (String::new(), String::new());
        for (i, (path, wnid)) in images.iter().enumerate() {
            let class_dir = root.join("a").join(wnid);
            std::fs::create_dir_all(&class_dir).unwrap();
            std::fs::copy(path, class_dir.join(path.file_name().unwrap())).unwrap();
            let flat = format!("ILSVRC2012_val_{:08}.JPEG", i + 1);
            std::fs::copy(path, root.join("b").join(&flat)).unwrap();
            std::fs::copy(path, root.join("c").join(&flat)).unwrap();
            labels += &format!("{wnid}\n");
            ids += &format!("{}\n", devkit_order.iter().position(|w| w == wnid).unwrap() + 1);
        }
        std::fs::write(root.join("b/val_labels.txt"), labels).unwrap();
        std::fs::write(root.join("c/ILSVRC2012_validation_ground_truth.txt"), ids).unwrap();
        std::fs::copy(fixture_path("eval/meta_compressed.mat"), root.join("c/meta.mat")).unwrap();
        root
    })
    .as_path()
}

fn eval_json(data: &Path, extra: &[&str]) -> serde_json::Value {
    let root = layouts();
    let json = data.join("report.json");
    let weights = root.join("tv.safetensors");
    let mut args = vec![
        "eval",
        "--weights",
        weights.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = alexnet(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

#[test]
fn the_three_layouts_give_identical_reports() {
    let root = layouts();
    let reports: Vec<serde_json::Value> =
        ["a", "b", "c"].iter().map(|l| eval_json(&root.join(l), &["--batch-size", "5"])).collect();
    assert_eq!(reports[0]["layout"], "image_folder");
    assert!(reports[1]["layout"]["label_file"].is_string());
    assert!(reports[2]["layout"]["devkit"]["meta"].is_string());
    for r in &reports {
        assert_eq!(r["images"], IMAGES);
        for key in
            ["top1_correct", "top5_correct", "top1_accuracy", "top5_accuracy", "weights_sha256", "crops", "transform"]
        {
            assert_eq!(r[key], reports[0][key], "{key}");
        }
    }
    // And the predictions themselves agree, image by image.
    let predictions = |l: &str| {
        let csv = root.join(l).join("predictions.csv");
        eval_json(&root.join(l), &["--predictions", csv.to_str().unwrap()]);
        let text = std::fs::read_to_string(csv).unwrap();
        text.lines().skip(1).map(|line| line.split_once(',').unwrap().1.to_string()).collect::<Vec<_>>()
    };
    assert_eq!(predictions("a"), predictions("b"));
    assert_eq!(predictions("b"), predictions("c"));
}

#[test]
fn ten_crop_eval_and_limit_run() {
    let report = eval_json(&layouts().join("a"), &["--crops", "10", "--limit", "3"]);
    assert_eq!(report["images"], 3);
    assert_eq!(report["crops"], 10);
}

#[test]
fn a_corrupt_image_is_skipped_and_counted_unless_strict() {
    let dir = tempfile::tempdir().unwrap();
    let images = sample_images();
    let class = dir.path().join(&images[0].1);
    std::fs::create_dir_all(&class).unwrap();
    std::fs::copy(&images[0].0, class.join("good.JPEG")).unwrap();
    let bytes = std::fs::read(&images[1].0).unwrap();
    std::fs::write(class.join("truncated.JPEG"), &bytes[..600]).unwrap();
    let report = eval_json(dir.path(), &[]);
    assert_eq!(report["images"], 1);
    assert_eq!(report["skipped"].as_array().unwrap().len(), 1);
    assert!(report["skipped"][0]["path"].as_str().unwrap().ends_with("truncated.JPEG"));
    let tv = layouts().join("tv.safetensors");
    let err = expect_error(&[
        "eval",
        "--weights",
        tv.to_str().unwrap(),
        "--data",
        dir.path().to_str().unwrap(),
        "--quiet",
        "--strict",
    ]);
    assert!(err.contains("truncated.JPEG") && err.contains("--strict"), "{err}");
}

#[test]
fn bad_data_folders_are_clear_errors() {
    let tv = layouts().join("tv.safetensors");
    let eval = |data: &Path| {
        expect_error(&["eval", "--weights", tv.to_str().unwrap(), "--data", data.to_str().unwrap(), "--quiet"])
    };
    let empty = tempfile::tempdir().unwrap();
    assert!(eval(empty.path()).contains("no images found"));
    // a flat folder with more images than its label file has lines
    let flat = tempfile::tempdir().unwrap();
    let images = sample_images();
    std::fs::copy(&images[0].0, flat.path().join("ILSVRC2012_val_00000001.JPEG")).unwrap();
    std::fs::copy(&images[1].0, flat.path().join("ILSVRC2012_val_00000002.JPEG")).unwrap();
    std::fs::write(flat.path().join("labels.txt"), format!("{}\n", images[0].1)).unwrap();
    let err = eval(flat.path());
    assert!(err.contains("ILSVRC2012_val_00000002.JPEG") && err.contains("no line 2"), "{err}");
    // a label that is not an ImageNet class
    std::fs::write(flat.path().join("labels.txt"), format!("{}\nn99999999\n", images[0].1)).unwrap();
    let err = eval(flat.path());
    assert!(err.contains("n99999999") && err.contains("ILSVRC2012_val_00000002.JPEG"), "{err}");
    let err = eval(Path::new("/nonexistent/val"));
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn meta_mat_maps_devkit_ids_in_both_encodings() {
    let order: Vec<String> =
        std::fs::read_to_string(fixture_path("eval/meta_order.txt")).unwrap().lines().map(String::from).collect();
    for name in ["meta.mat", "meta_compressed.mat"] {
        let dir = tempfile::tempdir().unwrap();
        let images = sample_images();
        let id = order.iter().position(|w| *w == images[0].1).unwrap() + 1;
        std::fs::copy(&images[0].0, dir.path().join("ILSVRC2012_val_00000001.JPEG")).unwrap();
        std::fs::write(dir.path().join("ILSVRC2012_validation_ground_truth.txt"), format!("{id}\n")).unwrap();
        std::fs::copy(fixture_path(&format!("eval/{name}")), dir.path().join("meta.mat")).unwrap();
        let ds = alexnet::data::dataset::Dataset::open(
            dir.path(),
            &alexnet::classes::imagenet_classes().iter().map(|c| c.0).collect::<Vec<_>>(),
            None,
            None,
        )
        .unwrap();
        let expected = alexnet::classes::imagenet_classes().iter().position(|c| c.0 == images[0].1).unwrap();
        assert_eq!(ds.samples[0].label, expected, "{name}");
    }
}
