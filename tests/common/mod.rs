//! Helpers shared by the parity tests: fixtures made by `scripts/make_fixtures.py`.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use alexnet::init::{reference_pattern, Init};
use alexnet::weights::Params;
use alexnet::{AlexNet, Placement, Preset};
use candle_core::{Device, Tensor};
use rand::Rng;

/// The seed, batch and labels `scripts/make_fixtures.py` uses.
pub const SEED: u64 = 2012;
pub const LABELS: [u32; 2] = [7, 501];

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// An empty folder, `target/tmp/<name>`, for the large files all tests of one binary share.
/// Not a `TempDir` in a `static`: statics are never dropped, so that leaked a gigabyte a run;
/// this one is emptied when the next run starts instead.
pub fn shared_scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = fixture_path(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

pub fn get<'a>(f: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    f.get(key).unwrap_or_else(|| panic!("fixture has no tensor `{key}`"))
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()
}

/// Largest |a - e| divided by the largest |e|: the relative error the bounds refer to.
pub fn rel_error(actual: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let diff = actual.iter().zip(expected).fold(0f32, |m, (a, e)| m.max((a - e).abs()));
    diff / scale
}

pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, bound: f32) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let err = rel_error(&flat(actual), &flat(expected));
    eprintln!("{what:<32} rel error {err:.2e}");
    assert!(err <= bound, "{what}: relative error {err:e} > {bound:e}");
    err
}

/// Compares a whole tensor with the fixture's summary of it (`PREFIX/samples`, `PREFIX/stats`:
/// 1024 evenly spaced elements, then sum |x|, L2 norm, max |x| and the element count).
pub fn assert_matches_summary(
    what: &str,
    actual: &Tensor,
    f: &HashMap<String, Tensor>,
    prefix: &str,
    bound: f32,
) -> f32 {
    let stats: Vec<f64> = get(f, &format!("{prefix}/stats")).to_vec1().unwrap();
    let expected_samples = flat(get(f, &format!("{prefix}/samples")));
    let values = flat(actual);
    assert_eq!(values.len() as f64, stats[3], "{what}: element count");
    let n = expected_samples.len();
    let samples: Vec<f32> = (0..n).map(|i| values[i * values.len() / n]).collect();
    let max_abs = stats[2] as f32;
    let sample_err = samples.iter().zip(&expected_samples).fold(0f32, |m, (a, e)| m.max((a - e).abs()))
        / max_abs.max(f32::MIN_POSITIVE);
    let abs_sum: f64 = values.iter().map(|v| v.abs() as f64).sum();
    let l2: f64 = values.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt();
    let mine_max = values.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let stat_err = [(abs_sum, stats[0]), (l2, stats[1]), (mine_max, stats[2])]
        .iter()
        .map(|(a, e)| ((a - e).abs() / e.abs().max(f64::MIN_POSITIVE)) as f32)
        .fold(0f32, f32::max);
    let err = sample_err.max(stat_err);
    eprintln!("{what:<32} rel error {err:.2e} (samples {sample_err:.2e}, norms {stat_err:.2e})");
    assert!(err <= bound, "{what}: relative error {err:e} > {bound:e}");
    err
}

/// The model of `preset` with the fixtures' reference weights, on the CPU.
pub fn reference_model(preset: Preset, placement: &Placement) -> AlexNet {
    AlexNet::new(preset, &mut Params::Init(Init::Reference { seed: SEED }), placement).unwrap()
}

/// The fixtures' input batch for `preset`.
pub fn reference_input(preset: Preset) -> Tensor {
    let s = preset.input_size();
    let shape = (2, 3, s, s);
    Tensor::from_vec(reference_pattern("input", SEED, 2 * 3 * s * s, 2.0), shape, &Device::Cpu).unwrap()
}

/// A tensor of the reference pattern (for op-level fixtures, seed 1).
pub fn pattern(key: &str, dims: &[usize], bound: f32) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(reference_pattern(key, 1, n, bound), dims, &Device::Cpu).unwrap()
}

/// Runs the `alexnet` binary.
pub fn alexnet(args: &[&str]) -> Output {
    alexnet_env(args, &[])
}

/// Runs the `alexnet` binary with extra environment variables.
pub fn alexnet_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_alexnet"));
    cmd.args(args).env_remove("HF_HUB_OFFLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run alexnet")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail cleanly; returns its error message.
pub fn expect_error(args: &[&str]) -> String {
    expect_error_env(args, &[])
}

/// [`expect_error`] with extra environment variables.
pub fn expect_error_env(args: &[&str], env: &[(&str, &Path)]) -> String {
    let out = alexnet_env(args, env);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail");
    assert_eq!(out.status.code(), Some(1), "{args:?}: exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    err
}

/// The reference weights of `preset` in the source's names and layout.
pub fn reference_state(preset: Preset) -> Vec<(String, Tensor)> {
    reference_model(preset, &Placement::on(&Device::Cpu)).state_dict().unwrap()
}

/// A real photo from `../shared/data` (`imagenet-sample/...`, `photos/...`).
pub fn shared_data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data").join(rel)
}

/// An ImageFolder of `classes` x `per_class` real photos (ImageNet validation JPEGs), in
/// folders `class0`, `class1`, ...
pub fn image_folder(classes: usize, per_class: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut images: Vec<PathBuf> =
        std::fs::read_dir(shared_data("imagenet-sample")).unwrap().map(|e| e.unwrap().path()).collect();
    images.sort();
    for (i, path) in images.iter().take(classes * per_class).enumerate() {
        let class = dir.path().join(format!("class{}", i % classes));
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(path, class.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// `seed` with one to four random edits: bit flips, bytes set to boundary values, runs
/// inserted or deleted, chunks copied elsewhere, truncation.
pub fn mutant(seed: &[u8], rng: &mut rand_chacha::ChaCha8Rng) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if bytes.is_empty() {
            break;
        }
        let at = rng.random_range(0..bytes.len());
        let run = rng.random_range(1..=16usize).min(bytes.len() - at);
        match rng.random_range(0..6) {
            0 => bytes[at] ^= 1 << rng.random_range(0..8),
            1 => bytes[at] = [0x00, 0xff, 0x7f, 0x80][rng.random_range(0..4)],
            2 => {
                let inserted: Vec<u8> = (0..run).map(|_| rng.random()).collect();
                bytes.splice(at..at, inserted);
            }
            3 => {
                bytes.drain(at..at + run);
            }
            4 => {
                let to = rng.random_range(0..bytes.len());
                let chunk = bytes[at..at + run].to_vec();
                bytes.splice(to..to, chunk);
            }
            _ => bytes.truncate(at),
        }
    }
    bytes
}

/// How a mutant becomes the file a reader is given.
pub type AsFile<'a> = &'a dyn Fn(Vec<u8>) -> Vec<u8>;

/// Mutation fuzzing: `ALEXNET_FUZZ_MUTANTS` (else `default`) deterministic mutants of each
/// seed, each written to a file named `file_name` and given to `read` (which says whether it
/// accepted the file) inside `catch_unwind`. Panics naming the mutants that panicked, which are
/// kept for reproduction.
pub fn fuzz(seeds: &[(&str, Vec<u8>, AsFile)], default: usize, file_name: &str, read: impl Fn(&Path) -> bool) {
    use rand::SeedableRng;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let mutants: usize = std::env::var("ALEXNET_FUZZ_MUTANTS").map_or(default, |n| n.parse().expect("a count"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file_name);
    let mut panics = Vec::new();
    for (index, (what, seed, as_file)) in seeds.iter().enumerate() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(index as u64);
        let (mut accepted, start) = (0, std::time::Instant::now());
        for i in 0..mutants {
            std::fs::write(&path, as_file(mutant(seed, &mut rng))).unwrap();
            match catch_unwind(AssertUnwindSafe(|| read(&path))) {
                Ok(ok) => accepted += ok as usize,
                Err(_) => {
                    let kept = dir.path().join(format!("panic-{index}-{i}-{file_name}"));
                    std::fs::copy(&path, &kept).unwrap();
                    panics.push(format!("{what} mutant {i}"));
                }
            }
        }
        eprintln!("{what}: {mutants} mutants, {accepted} accepted, in {:.1?}", start.elapsed());
    }
    if !panics.is_empty() {
        let kept = dir.keep();
        panic!("{} mutants panicked (kept in {}): {}", panics.len(), kept.display(), panics.join(", "));
    }
}

/// Protobuf, for writing test files: a varint, a length-delimited field, a varint field.
pub fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn field(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    varint(out, number << 3 | 2);
    varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

pub fn field_varint(out: &mut Vec<u8>, number: u64, v: u64) {
    varint(out, number << 3);
    varint(out, v);
}
