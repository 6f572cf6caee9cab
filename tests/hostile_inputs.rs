//! Images and pipes that used to end the process (issue 22, cases 7, 8 and 14): thin images
//! whose resize would take gigabytes, headers that promise more pixels than Pillow opens,
//! formats we do not decode, and a reader that goes away. Each is a clear error, or an image
//! counted as skipped, never an abort or a panic. And a mutation fuzzer over the readers of
//! images, mean images and the devkit's meta.mat (`ALEXNET_FUZZ_MUTANTS` mutants a seed file).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use alexnet::Preset;
use common::*;

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The CRC-32 of a PNG chunk (its type and data).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// A PNG whose header claims `w` x `h` RGB pixels and whose data is a few bytes: a
/// decompression bomb's first bytes.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        let typed = [kind, data].concat();
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(&typed);
        png.extend(crc32(&typed).to_be_bytes());
    };
    // 8 bits, RGB, deflate, no filter, no interlace
    chunk(b"IHDR", &[&w.to_be_bytes()[..], &h.to_be_bytes(), &[8, 2, 0, 0, 0]].concat());
    chunk(b"IDAT", b"\x78\x9c\x03\x00\x00\x00\x00\x01"); // an empty zlib stream
    chunk(b"IEND", b"");
    png
}

/// A folder of the test's images: a good photo (class n01440764), a 60000x1 PNG, an
/// 8000x1 PNG, a header claiming 30000x30000 pixels and a GIF; and torchvision-named
/// reference weights.
fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = shared_scratch_dir("hostile-inputs");
        let class = dir.join("val/n01440764");
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(shared_data("imagenet-sample/n01440764_tench.JPEG"), class.join("good.JPEG")).unwrap();
        image::RgbImage::new(60000, 1).save(class.join("thin-60000x1.png")).unwrap();
        image::RgbImage::new(1, 8000).save(class.join("thin-1x8000.png")).unwrap();
        std::fs::write(class.join("bomb.png"), png_header_only(30000, 30000)).unwrap();
        std::fs::write(class.join("animated.gif"), b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
        let state = reference_state(Preset::Torchvision);
        alexnet::weights::save_safetensors(&state, &Default::default(), &dir.join("tv.safetensors")).unwrap();
        dir
    })
}

fn image(name: &str) -> String {
    workdir().join("val/n01440764").join(name).to_string_lossy().into_owned()
}

fn weights() -> String {
    workdir().join("tv.safetensors").to_string_lossy().into_owned()
}

#[test]
fn thin_images_and_pixel_bombs_are_clear_errors_in_classify_and_preprocess() {
    let output = workdir().join("x.safetensors");
    for (name, says) in
        [("thin-60000x1.png", "15360000x256"), ("thin-1x8000.png", "2048000x256"), ("bomb.png", "30000x30000")]
    {
        let err = expect_error(&["classify", "--weights", &weights(), &image(name)]);
        assert!(err.contains(says) && err.contains("allowed"), "{name}: {err}");
        for transform in ["torchvision", "paper"] {
            let args = ["preprocess", "--transform", transform, &image(name), "--output", path_str(&output)];
            let err = expect_error(&args);
            assert!(err.contains(says) && err.contains("allowed"), "{name} ({transform}): {err}");
        }
    }
}

#[test]
fn eval_counts_thin_images_bombs_and_gifs_as_skipped() {
    let report = workdir().join("eval.json");
    let data = workdir().join("val");
    let args = ["eval", "--weights", &weights(), "--data", path_str(&data), "--quiet", "--json", path_str(&report)];
    let out = alexnet(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["images"], 1);
    let mut skipped: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Path::new(s["path"].as_str().unwrap()).file_name().unwrap().to_str().unwrap())
        .collect();
    skipped.sort();
    assert_eq!(skipped, ["animated.gif", "bomb.png", "thin-1x8000.png", "thin-60000x1.png"]);
}

/// `alexnet inspect --json FILE | head -1`: the reader gone, the process ends as `cat` would
/// (SIGPIPE), without a panic.
#[test]
fn a_closed_pipe_ends_the_process_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(["inspect", "--json", &weights()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader closes the pipe before anything is written
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {err}", out.status);
}

/// A small image encoded as `format`: a gradient, so every block has detail to mutate.
fn small_image(format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(48, 40, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

/// `png` with each chunk's CRC recomputed (as far as its chunk lengths hold), so that a
/// mutant reaches the decoder instead of failing its checksum.
fn with_png_crcs(mut png: Vec<u8>) -> Vec<u8> {
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&end| end + 4 <= png.len()) else { break };
        let crc = crc32(&png[at + 4..end]);
        png[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
    png
}

/// A float32 `.npy` holding `values`.
fn npy(values: &[f32]) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}", values.len()).into_bytes();
    header.resize(118, b' ');
    header.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header);
    out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    out
}

/// The readers of images and of the files beside them (a mean image as .npy or Caffe's
/// .binaryproto, the devkit's meta.mat) take mutants of real files without a panic.
#[test]
fn a_mutation_fuzzer_finds_no_panics_in_images_means_and_devkit_files() {
    use alexnet::data::transform::{Mean, Transform};
    let transforms = [Transform::for_preset(Preset::Torchvision), Transform::for_preset(Preset::Paper)];
    let images: [(&str, Vec<u8>, AsFile); 3] = [
        ("a JPEG", small_image(image::ImageFormat::Jpeg), &|m| m),
        ("a PNG", small_image(image::ImageFormat::Png), &|m| m),
        ("a PNG, its checksums made right", small_image(image::ImageFormat::Png), &|m| with_png_crcs(m)),
    ];
    fuzz(&images, 1000, "image", |path| {
        alexnet::data::decode(path).is_ok_and(|img| transforms.iter().all(|t| t.apply(&img, true).is_ok()))
    });

    // a mean image of 3 x 256 x 256 values: in a .npy, and as a BlobProto (fields 1-4: num,
    // channels, height, width; 5: packed float data)
    let values: Vec<f32> = (0..3 * 256 * 256).map(|i| (i % 251) as f32).collect();
    let mut blob = Vec::new();
    for (number, value) in [(1, 1), (2, 3), (3, 256), (4, 256)] {
        field_varint(&mut blob, number, value);
    }
    field(&mut blob, 5, &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    let means: [(&str, Vec<u8>, AsFile); 2] =
        [("a mean .npy", npy(&values), &|m| m), ("a mean .binaryproto", blob, &|m| m)];
    fuzz(&means, 300, "mean", |path| Mean::load(path).is_ok());

    // the devkit's meta.mat, read when a flat folder's ground truth holds devkit IDs
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ILSVRC2012_validation_ground_truth.txt"), "490\n").unwrap();
    std::fs::copy(shared_data("imagenet-sample/n01440764_tench.JPEG"), dir.path().join("ILSVRC2012_val_00000001.JPEG"))
        .unwrap();
    let classes = alexnet::classes::Classes::imagenet();
    let read_meta = |name: &str| std::fs::read(fixture_path("eval").join(name)).unwrap();
    let metas: [(&str, Vec<u8>, AsFile); 2] = [
        ("meta.mat", read_meta("meta.mat"), &|m| m),
        ("meta.mat, compressed", read_meta("meta_compressed.mat"), &|m| m),
    ];
    let labels = dir.path().join("ILSVRC2012_validation_ground_truth.txt");
    fuzz(&metas, 1000, "meta.mat", |path| {
        alexnet::data::dataset::Dataset::open(dir.path(), &classes.ids(), Some(&labels), Some(path)).is_ok()
    });
}

/// A JPEG whose header claims more pixels than Pillow opens is refused from its header (libjpeg
/// reads it, nothing is decoded), and one cut short is refused as PIL refuses it, however its
/// last bytes look; bytes after a whole JPEG's end are ignored, as PIL ignores them.
#[test]
fn jpeg_bombs_and_truncated_jpegs_are_clear_errors() {
    let photo = std::fs::read(shared_data("imagenet-sample/n01440764_tench.JPEG")).unwrap();
    let path = Path::new("x.jpg");
    // the baseline frame header: FF C0, length (2), precision (1), height (2), width (2)
    let sof = photo.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a baseline JPEG");
    let mut bomb = photo.clone();
    bomb[sof + 5..sof + 9].copy_from_slice(&[0x4E, 0x20, 0x4E, 0x20]); // 20000 x 20000
    let err = alexnet::data::decode_bytes(&bomb, path).unwrap_err().to_string();
    assert!(err.contains("20000x20000, more than the"), "{err}");
    let err = alexnet::data::decode_bytes(&photo[..photo.len() / 2], path).unwrap_err().to_string();
    assert!(err.contains("is truncated"), "{err}");
    // cut short, then a comment holding an end-of-image marker: still cut short
    let fake_end = [&photo[..photo.len() / 2], b"\xFF\xFE\x00\x04\xFF\xD9"].concat();
    let err = alexnet::data::decode_bytes(&fake_end, path).unwrap_err().to_string();
    assert!(err.contains("is truncated"), "{err}");
    // whole, with bytes after its end (as a motion photo's video), markers among them: opens
    let motion = [&photo[..], b"\x00\x00\xFF\xDA\x00\x08ftypmp42\xFF\xDA"].concat();
    let (whole, with_video) = (alexnet::data::decode_bytes(&photo, path), alexnet::data::decode_bytes(&motion, path));
    assert_eq!(whole.unwrap(), with_video.unwrap());
}
