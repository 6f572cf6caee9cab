//! `alexnet prepare`: real ImageNet JPEGs into WebDataset shards; the tars as any tar reader
//! sees them, a rerun that changes nothing, `eval` on the shards against `eval` on the same
//! JPEGs as files, and damaged shards and indexes as clear errors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alexnet::data::dataset::Dataset;
use alexnet::weights::save_safetensors;
use alexnet::Preset;
use common::*;

/// Six sample photos in their WNID folders, one of them twice, plus a corrupt JPEG.
fn wnid_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut images: Vec<PathBuf> =
        std::fs::read_dir(shared_data("imagenet-sample")).unwrap().map(|e| e.unwrap().path()).collect();
    images.sort();
    for path in images.iter().step_by(40).take(6) {
        let class = dir.path().join(&path.file_name().unwrap().to_string_lossy()[..9]);
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(path, class.join(path.file_name().unwrap())).unwrap();
    }
    let first = dir.path().join(&images[0].file_name().unwrap().to_string_lossy()[..9]);
    std::fs::copy(&images[0], first.join("again.v2.JPEG")).unwrap(); // a dot in the key
    std::fs::write(first.join("broken.JPEG"), b"\xFF\xD8\xFF\xE0 not a JPEG").unwrap();
    dir
}

fn prepare(data: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["prepare", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    let output = alexnet(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    stdout(&output)
}

/// Every member of a ustar file as (name, data), each header's checksum checked: what Python's
/// `tarfile` reads.
fn tar_members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len() % 512, 0);
    let (mut members, mut pos) = (Vec::new(), 0);
    while pos + 512 <= bytes.len() && bytes[pos..pos + 512].iter().any(|&b| b != 0) {
        let h = &bytes[pos..pos + 512];
        let field = |r: std::ops::Range<usize>| String::from_utf8(h[r].to_vec()).unwrap();
        let number = |r| u64::from_str_radix(field(r).trim_matches(|c| c == '\0' || c == ' '), 8).unwrap();
        let sum: u64 = h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { b as u64 }).sum();
        assert_eq!(number(148..156), sum, "header checksum");
        assert_eq!(&h[257..263], b"ustar\0");
        assert_eq!(h[156], b'0');
        let name = field(0..100).trim_end_matches('\0').to_string();
        let size = number(124..136) as usize;
        members.push((name, bytes[pos + 512..pos + 512 + size].to_vec()));
        pos += 512 + size.next_multiple_of(512);
    }
    assert_eq!(bytes.len() - pos, 1024, "two zero blocks end the archive");
    members
}

/// The first shard in `dir` and its index (named after the data folder, which a test's is not).
fn first_shard(dir: &Path) -> (PathBuf, PathBuf) {
    let tar = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with("-000000.tar"))
        .expect("a first shard");
    let index = tar.with_extension("json");
    (tar, index)
}

fn folder_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn prepare_writes_tar_shards_that_a_rerun_keeps_byte_for_byte() {
    let data = wnid_folder();
    let out = tempfile::tempdir().unwrap();
    let shards = out.path().join("shards");
    let report = prepare(data.path(), &shards, &["--shard-bytes", "60000"]);
    assert!(report.contains("7 images (1 skipped)"), "{report}");
    assert!(report.contains("broken.JPEG"), "{report}");
    let files = folder_bytes(&shards);
    let tars: Vec<&String> = files.keys().filter(|n| n.ends_with(".tar")).collect();
    assert!(tars.len() >= 3, "60 kB shards hold two or three images each: {tars:?}");
    let prefix = data.path().file_name().unwrap().to_string_lossy().trim_start_matches('.').to_string();
    assert_eq!(tars[0], &format!("{prefix}-000000.tar"));
    let (mut jpgs, mut keys) = (0, Vec::new());
    for tar in &tars {
        assert!(files[*tar].len() <= 60000 || tar_members(&shards.join(tar)).len() == 2, "{tar} is too large");
        for pair in tar_members(&shards.join(tar)).chunks(2) {
            let [(jpg, jpeg), (cls, class)] = pair else { panic!("{tar}: a member without its pair") };
            let key = jpg.strip_suffix(".jpg").unwrap();
            assert_eq!(cls, &format!("{key}.cls"));
            assert!(!key.contains('.'), "{key}: a WebDataset key has no dot");
            assert!(jpeg.starts_with(&[0xFF, 0xD8]) && jpeg.ends_with(&[0xFF, 0xD9]));
            // baseline: a start-of-frame 0 (FF C0), no progressive one (FF C2)
            assert!(jpeg.windows(2).any(|w| w == [0xFF, 0xC0]) && !jpeg.windows(2).any(|w| w == [0xFF, 0xC2]));
            assert!(std::str::from_utf8(class).unwrap().parse::<usize>().is_ok());
            jpgs += 1;
            keys.push(key.to_string());
        }
    }
    assert_eq!(jpgs, 7);
    assert!(keys.iter().any(|k| k.ends_with("/again_v2")), "{keys:?}");

    // a rerun is a no-op; a shard lost is written again, the same bytes
    let again = prepare(data.path(), &shards, &["--shard-bytes", "60000"]);
    assert!(again.contains(&format!("({} kept from an earlier run)", tars.len())), "{again}");
    assert_eq!(folder_bytes(&shards), files);
    std::fs::remove_file(shards.join(tars[1])).unwrap();
    let redone = prepare(data.path(), &shards, &["--shard-bytes", "60000"]);
    assert!(redone.contains(&format!("({} kept from an earlier run)", tars.len() - 1)), "{redone}");
    assert_eq!(folder_bytes(&shards), files);
    // another quality makes other shards
    prepare(data.path(), &shards, &["--shard-bytes", "60000", "--quality", "50"]);
    assert_ne!(folder_bytes(&shards)[tars[0].as_str()], files[tars[0].as_str()]);
}

#[test]
fn shard_images_are_the_prepared_size_and_keep_their_labels() {
    let data = image_folder(3, 2); // class0..class2: not ImageNet's names
    let out = tempfile::tempdir().unwrap();
    prepare(data.path(), out.path(), &["--size", "96"]);
    let (original, original_classes) = Dataset::discover(data.path()).unwrap();
    let (sharded, classes) = Dataset::discover(out.path()).unwrap();
    assert_eq!(classes, original_classes);
    assert_eq!(sharded.samples.len(), original.samples.len());
    for (s, o) in sharded.samples.iter().zip(&original.samples) {
        assert_eq!(s.label, o.label, "{}", s.path.display());
        assert_eq!(s.decode().unwrap().dimensions(), (96, 96), "{}", s.path.display());
        assert!(s.path.to_string_lossy().contains(".tar/"), "{}: names its shard", s.path.display());
    }
}

#[test]
fn eval_on_shards_matches_eval_on_the_same_jpegs_as_files() {
    let data = wnid_folder();
    let out = tempfile::tempdir().unwrap();
    let shards = out.path().join("shards");
    prepare(data.path(), &shards, &[]);
    // the shard's JPEGs as files in class folders
    let files = out.path().join("files");
    for (name, bytes) in tar_members(&first_shard(&shards).0) {
        if let Some(key) = name.strip_suffix(".jpg") {
            let path = files.join(format!("{key}.jpg"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }
    let weights = out.path().join("tv.safetensors");
    save_safetensors(&reference_state(Preset::Torchvision), &Default::default(), &weights).unwrap();
    let eval = |dir: &Path| {
        let (json, csv) = (out.path().join("r.json"), out.path().join("p.csv"));
        let output = alexnet(&[
            "eval",
            "--weights",
            weights.to_str().unwrap(),
            "--data",
            dir.to_str().unwrap(),
            "--quiet",
            "--batch-size",
            "4",
            "--json",
            json.to_str().unwrap(),
            "--predictions",
            csv.to_str().unwrap(),
        ]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        // label and top-5 of each image, without its path
        let rows: Vec<String> = std::fs::read_to_string(csv)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split_once(',').unwrap().1.to_string())
            .collect();
        (report, rows)
    };
    let (on_shards, shard_rows) = eval(&shards);
    let (on_files, file_rows) = eval(&files);
    assert!(on_shards["layout"]["shards"].is_string());
    assert_eq!(on_shards["images"], 7);
    assert_eq!(shard_rows, file_rows);
    for key in ["top1_correct", "top5_correct"] {
        assert_eq!(on_shards[key], on_files[key], "{key}");
    }
}

#[test]
fn damaged_shards_and_indexes_are_clear_errors() {
    let data = wnid_folder();
    let out = tempfile::tempdir().unwrap();
    let weights = out.path().join("tv.safetensors");
    save_safetensors(&reference_state(Preset::Torchvision), &Default::default(), &weights).unwrap();
    let shards = out.path().join("shards");
    prepare(data.path(), &shards, &[]);
    let (tar, index) = first_shard(&shards);
    let tar_name = tar.file_name().unwrap().to_string_lossy().into_owned();
    let pristine = std::fs::read(&tar).unwrap();
    let entry: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    let member = &entry["members"][2];
    let (key, offset) = (member["key"].as_str().unwrap().to_string(), member["offset"].as_u64().unwrap() as usize);
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "--weights", weights.to_str().unwrap(), "--data", shards.to_str().unwrap()];
        args.extend_from_slice(&["--quiet"]);
        args.extend_from_slice(extra);
        alexnet(&args)
    };

    // a truncated shard
    std::fs::write(&tar, &pristine[..pristine.len() / 2]).unwrap();
    let err = expect_error(&["eval", "--weights", weights.to_str().unwrap(), "--data", shards.to_str().unwrap()]);
    assert!(err.contains(&tar_name) && err.contains("stale index"), "{err}");

    // a corrupt JPEG inside a shard: skipped and reported, or with --strict an error naming it
    let mut corrupt = pristine.clone();
    corrupt[offset..offset + 4].copy_from_slice(b"junk");
    std::fs::write(&tar, &corrupt).unwrap();
    let output = eval(&[]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = stdout(&output);
    assert!(report.contains("(1 skipped)") && report.contains(&format!("-000000.tar/{key}.jpg")), "{report}");
    let err =
        expect_error(&["eval", "--weights", weights.to_str().unwrap(), "--data", shards.to_str().unwrap(), "--strict"]);
    assert!(err.contains(&format!("-000000.tar/{key}.jpg")), "{err}");

    // a member renamed in the tar (the same length): the index is stale
    let mut renamed = pristine.clone();
    renamed[offset - 512] ^= 0x20;
    std::fs::write(&tar, &renamed).unwrap();
    let err =
        expect_error(&["eval", "--weights", weights.to_str().unwrap(), "--data", shards.to_str().unwrap(), "--strict"]);
    assert!(err.contains(&tar_name) && err.contains(&key) && err.contains("stale"), "{err}");

    // an index whose member lies past the shard's end: refused before anything is read
    std::fs::write(&tar, &pristine).unwrap();
    let mut lying = entry.clone();
    lying["members"][2]["size"] = serde_json::json!(u64::MAX - 100);
    std::fs::write(&index, serde_json::to_vec(&lying).unwrap()).unwrap();
    let err = expect_error(&["eval", "--weights", weights.to_str().unwrap(), "--data", shards.to_str().unwrap()]);
    assert!(err.contains(&key) && err.contains("does not fit"), "{err}");

    // a missing index
    std::fs::remove_file(&index).unwrap();
    let err = expect_error(&["eval", "--weights", weights.to_str().unwrap(), "--data", shards.to_str().unwrap()]);
    assert!(err.contains("missing or unreadable") && err.contains("rerun `alexnet prepare`"), "{err}");
}
