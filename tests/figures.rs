//! `alexnet filters`, `features` and `neighbours` (the paper's Figures 3 and 4) on
//! reference-initialised weights and the sample photos: the picture's layout, the features'
//! shape and order, the query found first among its own neighbours, and clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use alexnet::figures::FeatureSet;
use common::*;

/// Reference-initialised weights of the paper's two towers and of torchvision's single tower,
/// written once for all tests of this file.
fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = shared_scratch_dir("figures");
        for preset in ["paper", "torchvision"] {
            let path = dir.join(format!("{preset}.safetensors"));
            let out = alexnet(&["init", "--preset", preset, "--scheme", "reference", path.to_str().unwrap()]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        dir
    })
}

fn path(name: &str) -> String {
    workdir().join(name).to_str().unwrap().to_string()
}

/// The first `n` sample photos, sorted.
fn photos(n: usize) -> Vec<String> {
    let mut all: Vec<PathBuf> =
        std::fs::read_dir(shared_data("imagenet-sample")).unwrap().map(|e| e.unwrap().path()).collect();
    all.sort();
    all.into_iter().take(n).map(|p| p.to_str().unwrap().to_string()).collect()
}

/// `alexnet features` of `images` with the torchvision weights, to `out`.
fn features_of(images: &[String], out: &str) {
    let weights = path("torchvision.safetensors");
    let mut args = vec!["features", "--weights", &weights, "-o", out, "--quiet"];
    args.extend(images.iter().map(String::as_str));
    run_ok(&args);
}

fn run_ok(args: &[&str]) -> String {
    let out = alexnet(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    stdout(&out)
}

#[test]
fn filters_draw_tower_a_above_tower_b_with_a_colour_measure_per_tower() {
    let png = path("conv1.png");
    let json = run_ok(&["filters", "--weights", &path("paper.safetensors"), "-o", &png, "--json", "-"]);
    // 16 kernels a row, each 11 x 4 = 44 px and a 2 px gap; 3 rows a tower, 8 px between towers
    assert_eq!(image::image_dimensions(&png).unwrap(), (2 + 16 * 46, 2 + 6 * 46 + 8));
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let towers = report["towers"].as_array().unwrap();
    assert_eq!(towers.len(), 2);
    for (tower, name) in towers.iter().zip(["A", "B"]) {
        assert_eq!(tower["tower"], name);
        let shares = tower["colour_share"].as_array().unwrap();
        assert_eq!(shares.len(), 48);
        assert!(shares.iter().all(|s| (0.0..=1.0).contains(&s.as_f64().unwrap())));
    }

    // a single tower: all 64 kernels in one block of 4 rows
    let png = path("conv1-tv.png");
    run_ok(&["filters", "--weights", &path("torchvision.safetensors"), "-o", &png]);
    assert_eq!(image::image_dimensions(&png).unwrap(), (2 + 16 * 46, 2 + 4 * 46));
}

#[test]
fn features_keep_the_images_order_and_a_data_sets_labels_for_the_knn_accuracy() {
    let images = photos(4);
    let out = path("four.safetensors");
    features_of(&images, &out);
    let set = FeatureSet::load(out.as_ref()).unwrap();
    assert_eq!((set.files.len(), set.dim), (4, 4096));
    assert_eq!(set.files, images.iter().map(PathBuf::from).collect::<Vec<_>>());
    assert!(set.labels.is_none());

    let folder = image_folder(2, 2);
    let out = path("folder.safetensors");
    let data = folder.path().to_str().unwrap();
    run_ok(&["features", "--weights", &path("torchvision.safetensors"), "--data", data, "-o", &out, "--quiet"]);
    let set = FeatureSet::load(out.as_ref()).unwrap();
    assert_eq!(set.labels, Some(vec![0, 0, 1, 1]));
    assert_eq!(set.classes, Some(vec!["class0".to_string(), "class1".to_string()]));

    // labelled on both sides: each image its own nearest neighbour, so the 1-NN vote is right
    let json = run_ok(&[
        "neighbours",
        "--features",
        &out,
        "--query-features",
        &out,
        "-k",
        "1",
        "-o",
        &path("self.png"),
        "--json",
        "-",
    ]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["knn_accuracy"], 1.0);
    assert_eq!(report["queries"][3]["label"], "class1");
}

#[test]
fn neighbours_rank_a_pooled_query_first_at_distance_0() {
    let images = photos(5);
    let pool = path("pool.safetensors");
    features_of(&images, &pool);
    let grid = path("grid.png");
    let json =
        run_ok(&["neighbours", "--features", &pool, "--query", &images[2], "-k", "3", "-o", &grid, "--json", "-"]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let near = report["queries"][0]["neighbours"].as_array().unwrap();
    assert_eq!(near.len(), 3);
    assert_eq!(near[0]["file"], images[2].as_str());
    assert_eq!(near[0]["distance"], 0.0);
    assert!(near[1]["distance"].as_f64().unwrap() > 0.0);
    assert!(report["knn_accuracy"].is_null(), "no labels, no accuracy");
    // the query, a gap, then 3 neighbours: 96 px squares 2 px apart
    assert_eq!(image::image_dimensions(&grid).unwrap(), (2 + 4 * 98 + 8, 2 + 98));
}

/// Features of images inside shards name them `SHARD.tar/KEY.jpg`; the grid draws them from
/// their shards, not grey.
#[test]
fn the_grid_draws_images_from_shards() {
    let folder = image_folder(2, 2);
    let shards = path("shards");
    run_ok(&["prepare", "--data", folder.path().to_str().unwrap(), "--out", &shards, "--quiet"]);
    let out = path("shards.safetensors");
    run_ok(&["features", "--weights", &path("torchvision.safetensors"), "--data", &shards, "-o", &out, "--quiet"]);
    let in_a_shard = |f: &PathBuf| f.ancestors().any(|a| a.extension().is_some_and(|e| e == "tar"));
    assert!(FeatureSet::load(out.as_ref()).unwrap().files.iter().all(in_a_shard));
    let grid = path("shards.png");
    let args = ["neighbours", "--features", &out, "--query-features", &out, "-k", "2", "-o", &grid];
    let result = alexnet(&args);
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success() && !err.contains("grey"), "{err}");
    // each query's first neighbour is itself: the same tile, not grey
    let img = image::open(&grid).unwrap().to_rgb8();
    let tile =
        |col: u32| image::imageops::crop_imm(&img, 2 + col * 98 + if col > 0 { 8 } else { 0 }, 2, 96, 96).to_image();
    assert_eq!(tile(0), tile(1));
    assert!(tile(0).pixels().any(|p| p.0 != [128, 128, 128]));
}

#[test]
fn bad_input_is_a_clear_error() {
    let weights = path("torchvision.safetensors");
    let err = expect_error(&["neighbours", "--features", &weights, "--query", "x.jpg", "-o", &path("x.png")]);
    assert!(err.contains("no tensor `features`"), "{err}");
    // the unreadable image is reported as skipped, then the run fails for want of any image
    let out = alexnet(&["features", "--weights", &weights, "missing.jpg", "-o", &path("x.safetensors")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("skipping missing.jpg"), "{err}");
    assert!(err.contains("no image could be read (1 skipped)"), "{err}");
}
