//! What `train` writes runs everywhere as the model it is (its preset, classes and
//! preprocessing recorded in the file), and a run behaves as scripts expect: `--resume DIR`,
//! Ctrl-C, stale temporary files, bad flags, the umask.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use alexnet::weights::save_safetensors;
use candle_core::{DType, Device, Tensor};
use common::*;

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `alexnet train --preset PRESET --data DATA --out OUT --quiet` with a small batch and `extra`.
fn train(preset: &str, data: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--preset", preset, "--data", path_str(data), "--out", path_str(out)];
    args.extend_from_slice(&["--batch-size", "4", "--seed", "3", "--quiet", "--no-augment"]);
    args.extend_from_slice(extra);
    alexnet(&args)
}

fn ok(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

fn json_file(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The images of an ImageFolder, sorted.
fn images_in(data: &Path) -> Vec<PathBuf> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(data)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .flat_map(|class| std::fs::read_dir(class).unwrap().map(|e| e.unwrap().path()))
        .collect();
    images.sort();
    images
}

/// Issue 22, case 1: a two-tower CIFAR net trained on two classes runs in classify, eval,
/// infer, inspect and convert without `--preset` or a class count, with the preprocessing it
/// was trained with (eval's accuracy is the run's own validation accuracy).
#[test]
fn a_cifar_model_with_its_own_classes_runs_in_every_command() {
    let data = image_folder(2, 4);
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("run");
    ok(train("cifar-towers", data.path(), &run, &["--epochs", "1", "--val", path_str(data.path())]), "train");
    let weights = run.join("final.safetensors");
    let checkpoint = run.join("checkpoint-0000002.safetensors");

    // inspect: the preset and classes the file records
    let info = json(&ok(alexnet(&["inspect", "--json", path_str(&weights)]), "inspect"));
    assert_eq!(info["preset"], "cifar-towers");
    assert_eq!(info["classes"], serde_json::json!(["class0", "class1"]));

    // classify (the final weights and a checkpoint): the classes by their folder names
    let images = images_in(data.path());
    for file in [&weights, &checkpoint] {
        let args = ["classify", "--weights", path_str(file), "--json", path_str(&images[0]), path_str(&images[5])];
        let top = json(&ok(alexnet(&args), "classify"));
        let names: Vec<&str> = top[0]["top"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        assert_eq!(names.len(), 2, "two classes: {top}");
        assert!(names.contains(&"class0") && names.contains(&"class1"), "{top}");
    }

    // eval: the images that validated the run, with the same result
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let report = runs.path().join("eval.json");
    let eval = |file: &Path| {
        let args = ["eval", "--weights", path_str(file), "--data", path_str(data.path()), "--quiet"];
        ok(alexnet(&[&args[..], &["--json", path_str(&report)]].concat()), "eval");
        json_file(&report)
    };
    let evaluated = eval(&weights);
    assert_eq!(evaluated["images"], 8);
    assert_eq!(evaluated["preset"], "cifar-towers");
    // timm's names and units beside ours (issue 27), and its results file
    let percent = |f: f64| (f * 100.0 * 1e4).round() / 1e4;
    assert_eq!(evaluated["top1_err"].as_f64(), evaluated["top1_error"].as_f64().map(percent));
    assert_eq!(evaluated["top5"].as_f64(), evaluated["top5_accuracy"].as_f64().map(percent));
    assert_eq!((&evaluated["img_size"], &evaluated["crop_pct"]), (&serde_json::json!(28), &serde_json::json!(0.875)));
    assert_eq!(
        (&evaluated["model"], &evaluated["interpolation"]),
        (&serde_json::json!("cifar-towers"), &serde_json::json!("bilinear"))
    );
    assert!(evaluated["param_count"].as_f64().unwrap() > 0.1);
    let csv = runs.path().join("results.csv");
    let args = ["eval", "--weights", path_str(&weights), "--data", path_str(data.path()), "--quiet"];
    ok(alexnet(&[&args[..], &["--results-file", path_str(&csv)]].concat()), "eval --results-file");
    let csv = std::fs::read_to_string(&csv).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("model,top1,top1_err,top5,top5_err,param_count,img_size,crop_pct,interpolation"));
    assert!(lines.next().unwrap().starts_with("cifar-towers,"), "{csv}");
    assert_eq!(
        evaluated["top1_error"].as_f64(),
        last["val_top1_error"].as_f64(),
        "eval against the run's own validation"
    );

    // convert keeps what the file records; the copy evaluates the same
    let converted = runs.path().join("converted.safetensors");
    ok(alexnet(&["convert", path_str(&weights), path_str(&converted)]), "convert");
    let info = json(&ok(alexnet(&["inspect", "--json", path_str(&converted)]), "inspect converted"));
    assert_eq!(
        (&info["preset"], &info["classes"]),
        (&serde_json::json!("cifar-towers"), &serde_json::json!(["class0", "class1"]))
    );
    assert_eq!(eval(&converted)["top1_error"], evaluated["top1_error"]);

    // infer: two logits an image
    let input = runs.path().join("input.safetensors");
    let x = Tensor::zeros((3, 3, 28, 28), DType::F32, &Device::Cpu).unwrap();
    save_safetensors(&[("input".into(), x)], &Default::default(), &input).unwrap();
    let logits = runs.path().join("logits.safetensors");
    let args = ["infer", "--weights", path_str(&weights), "--input", path_str(&input), "--output", path_str(&logits)];
    ok(alexnet(&args), "infer");
    let out = candle_core::safetensors::load(&logits, &Device::Cpu).unwrap();
    assert_eq!(out["logits"].dims(), [3, 2]);
}

/// Issue 22, case 2: weights `train --preset paper` wrote run as `paper` (the paper's LRN)
/// without `--preset`, not as `caffe`, whose tensor names they share.
#[test]
fn weights_trained_as_paper_run_as_paper() {
    let data = image_folder(2, 2); // one step
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("run");
    ok(train("paper", data.path(), &run, &["--epochs", "1"]), "train");
    let weights = run.join("final.safetensors");
    assert_eq!(json(&ok(alexnet(&["inspect", "--json", path_str(&weights)]), "inspect"))["preset"], "paper");

    let input = runs.path().join("input.safetensors");
    let x = pattern("input", &[1, 3, 227, 227], 100.0);
    save_safetensors(&[("input".into(), x)], &Default::default(), &input).unwrap();
    let logits = |preset: &[&str]| {
        let out = runs.path().join("logits.safetensors");
        let args = ["infer", "--weights", path_str(&weights), "--input", path_str(&input), "--output", path_str(&out)];
        ok(alexnet(&[&args[..], preset].concat()), "infer");
        flat(&candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["logits"])
    };
    let (detected, paper, caffe) = (logits(&[]), logits(&["--preset", "paper"]), logits(&["--preset", "caffe"]));
    assert_eq!(detected, paper, "without --preset the file runs as the preset it records");
    assert_ne!(detected, caffe, "the caffe preset's LRN gives other logits");
}

/// Issue 22, case 13: `--resume DIR` continues from the run's newest checkpoint with the run's
/// settings, `--save-every` among them; case 9: temporary files a killed writer left are removed.
/// Issue 26: `--val-crops` may change on resume, and each validation line says which it was.
#[test]
fn resuming_a_run_folder_takes_its_newest_checkpoint_and_settings() {
    let data = image_folder(2, 4); // 2 steps an epoch
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("run");
    let val = ["--val", path_str(data.path())];
    ok(
        train("cifar-towers", data.path(), &run, &[&["--epochs", "1", "--save-every", "1"][..], &val].concat()),
        "first epoch",
    );
    // what a writer killed mid-write leaves: a temporary file of a process that has ended
    let mut gone = Command::new("true").spawn().unwrap();
    let dead_pid = gone.id();
    gone.wait().unwrap();
    let stale = run.join(format!(".checkpoint-0000009.safetensors.tmp{dead_pid}"));
    std::fs::write(&stale, vec![0u8; 4096]).unwrap();

    let resume = ["--epochs", "2", "--resume", path_str(&run), "--val-crops", "10"];
    ok(train("cifar-towers", data.path(), &run, &[&resume[..], &val].concat()), "resume");
    assert!(!stale.exists(), "the stale temporary file is removed when a run starts");
    // the resumed run kept --save-every 1: a checkpoint after step 3, inside the second epoch
    assert!(run.join("checkpoint-0000003.safetensors").exists(), "--save-every kept on resume");
    assert!(run.join("final.safetensors").exists());
    let log = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
    let validated: Vec<(f64, u64)> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| !l["val_top1_error"].is_null())
        .map(|l| (l["epoch"].as_f64().unwrap(), l["val_crops"].as_u64().unwrap()))
        .collect();
    assert_eq!(validated, [(1.0, 1), (2.0, 10)], "the first epoch validated on one crop, the resumed one on ten");

    let empty = runs.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = train("cifar-towers", data.path(), &run, &["--resume", path_str(&empty)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("holds no checkpoint"), "{err}");
}

/// Issue 22, case 11: Ctrl-C saves a checkpoint and exits with 130, not 0, and writes no
/// "final" weights.
#[test]
fn an_interrupted_run_saves_and_exits_130() {
    let data = image_folder(2, 4);
    let runs = tempfile::tempdir().unwrap();
    let run = runs.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(["train", "--preset", "fig1-relu", "--data", path_str(data.path()), "--out", path_str(&run)])
        .args(["--batch-size", "4", "--epochs", "100000", "--save-every", "1", "--quiet"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    // any checkpoint: the run keeps only its last few, so the first may be gone between polls
    let checkpointed = || {
        std::fs::read_dir(&run).into_iter().flatten().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("checkpoint-") && name.ends_with(".safetensors")
        })
    };
    while !checkpointed() {
        assert!(started.elapsed().as_secs() < 120, "no checkpoint after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: sends SIGINT to the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step") && !err.contains("final weights"), "{err}");
    assert!(!run.join("final.safetensors").exists());
}

/// Issue 22, case 10: rates that would train NaN or nothing, no epochs, and a single class are
/// refused before anything runs.
#[test]
fn bad_training_settings_are_refused() {
    let data = image_folder(2, 1);
    let out_dir = tempfile::tempdir().unwrap();
    for (flag, value) in [
        ("--lr", "NaN"),
        ("--lr", "-1"),
        ("--lr", "0"),
        ("--lr", "inf"),
        ("--epochs", "0"),
        ("--patience", "0"),
        ("--momentum", "1.5"),
        ("--weight-decay", "-1e-4"),
    ] {
        let out = train("fig1-relu", data.path(), out_dir.path(), &[flag, value]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {err}");
        assert!(err.contains(&format!("invalid value '{value}' for '{flag}")), "{flag} {value}: {err}");
    }
    let one_class = image_folder(1, 2);
    let out = train("fig1-relu", one_class.path(), out_dir.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("a classifier needs at least 2") && !err.contains("panicked"), "{err}");
}

/// Issue 22, case 12: files are created with the umask's mode, as any program creates them.
#[test]
fn files_are_written_with_the_umask_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    for (umask, mode) in [("022", 0o644), ("027", 0o640)] {
        let file = dir.path().join(format!("init-{umask}.safetensors"));
        let script = format!("umask {umask}; exec \"$0\" init --preset fig1-relu \"$1\"");
        let out =
            Command::new("sh").args(["-c", &script, env!("CARGO_BIN_EXE_alexnet"), path_str(&file)]).output().unwrap();
        let out = ok(out, "init");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("(PyTorch's default initialisation, seed 0)"),
            "init says what it wrote in words: {said}"
        );
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, mode, "umask {umask}");
    }
}

/// Issue 27: `train --from` starts from a model's weights, gives it a new last layer for
/// other classes (three: an odd count, split unevenly between the towers), keeps the layers
/// `--freeze` names as they were, and records where it came from.
#[test]
fn fine_tuning_replaces_the_head_and_keeps_frozen_layers() {
    let runs = tempfile::tempdir().unwrap();
    let pretrained = runs.path().join("pretrained");
    ok(train("cifar-towers", image_folder(2, 4).path(), &pretrained, &["--epochs", "1"]), "pretraining");
    let from = pretrained.join("final.safetensors");

    let tuned = runs.path().join("tuned");
    let data = image_folder(3, 2);
    let args = ["--from", path_str(&from), "--freeze", "features", "--epochs", "1", "--classes", "3"];
    ok(train("cifar-towers", data.path(), &tuned, &args), "fine-tuning");
    let file = alexnet::weights::WeightFile::open(&tuned.join("final.safetensors")).unwrap();
    let before = alexnet::weights::WeightFile::open(&from).unwrap();
    let tensor = |f: &alexnet::weights::WeightFile, k: &str| flat(&f.tensors()[k]);
    for layer in ["conv1", "conv2", "conv3", "conv4", "conv5"] {
        for part in ["weight", "bias"] {
            let key = format!("{layer}.{part}");
            assert_eq!(tensor(&file, &key), tensor(&before, &key), "{key} is frozen");
        }
    }
    assert_ne!(tensor(&file, "fc6.weight"), tensor(&before, "fc6.weight"), "fc6 trains");
    assert_eq!(file.tensors()["fc8.weight"].dims(), [3, 512], "a new head for the three classes");
    let origin: serde_json::Value = serde_json::from_str(&file.metadata["fine_tuned_from"]).unwrap();
    assert_eq!(origin["weights"], path_str(&from));
    assert_eq!(origin["freeze"], "features");
    let sha = sha2_hex(&std::fs::read(&from).unwrap());
    assert_eq!(origin["sha256"], sha);
    let identity = file.identify(None).unwrap();
    assert_eq!(identity.classes.ids(), ["class0", "class1", "class2"]);

    // its checkpoint resumes (the frozen layers have no momentum buffers)
    let more = ["--resume", path_str(&tuned), "--epochs", "2"];
    ok(train("cifar-towers", data.path(), &tuned, &more), "resuming the fine-tuning run");

    // what only fine-tuning takes, and a class count the data does not have, are refused
    let out = train("cifar-towers", data.path(), &runs.path().join("x"), &["--freeze", "fc6"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--freeze and --head-lr-mult are for fine-tuning"));
    let out = train("cifar-towers", data.path(), &runs.path().join("x"), &["--classes", "5"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the 5 of --classes"));
}

fn sha2_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Metadata that names no preset we know is a clear error, and no obstacle once `--preset`
/// says what the weights are.
#[test]
fn unreadable_metadata_gives_way_to_preset() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("odd.safetensors");
    let state = reference_state(alexnet::Preset::Fig1Relu);
    let metadata = [("preset".to_string(), "resnet50\u{1b}[31m".to_string())].into();
    save_safetensors(&state, &metadata, &weights).unwrap();
    let image = shared_data("photos/chelsea.png");
    let err = expect_error(&["classify", "--weights", path_str(&weights), path_str(&image)]);
    assert!(err.contains("pass --preset") && err.contains("`resnet50\\u{1b}[31m`"), "{err}");
    let args = ["classify", "--preset", "fig1-relu", "--weights", path_str(&weights), path_str(&image)];
    let out = ok(alexnet(&args), "classify with --preset");
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignored, as --preset is given"));
}
