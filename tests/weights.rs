//! Weight interop: .pth (zip and legacy), .caffemodel (V1 and V2), safetensors, convert,
//! inspect, the Hub cache and torchvision's cache, and bad files of every kind.
//! Fixtures: scripts/make_interop_fixtures.py (torch and protobuf).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use alexnet::weights::{save_safetensors, Format, Params, WeightFile};
use alexnet::{AlexNet, Mode, Placement, Preset};
use candle_core::{DType, Device, Tensor};
use common::*;
use sha2::{Digest, Sha256};

fn interop(name: &str) -> PathBuf {
    fixture_path("interop").join(name)
}

fn assert_same_tensors(file: &WeightFile, expected: &HashMap<String, Tensor>) {
    let got = file.tensors();
    let mut keys: Vec<&String> = got.keys().collect();
    let mut want: Vec<&String> = expected.keys().collect();
    keys.sort();
    want.sort();
    assert_eq!(keys, want, "{}: key set", file.path.display());
    for (k, e) in expected {
        let g = &got[k];
        assert_eq!(g.dims(), e.dims(), "{k}");
        let as_f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(as_f64(g), as_f64(e), "{}: tensor `{k}`", file.path.display());
    }
}

#[test]
fn pth_zip_and_legacy_load_the_same_tensors_torch_saved() {
    let expected = fixture("interop/pth_expected.safetensors");
    for name in ["state.pth", "legacy.pth"] {
        let file = WeightFile::open(&interop(name)).unwrap();
        assert_eq!(file.format, Format::PyTorch);
        assert_same_tensors(&file, &expected);
        assert_eq!(file.stored_dtypes["half"], DType::F16);
        assert_eq!(file.stored_dtypes["steps"], DType::I64);
    }
}

#[test]
fn small_caffemodels_in_every_form_load() {
    let expected = fixture("interop/mini_expected.safetensors");
    for name in ["mini_v1.caffemodel", "mini_v2.caffemodel", "mini_double.caffemodel"] {
        let file = WeightFile::open(&interop(name)).unwrap();
        assert_eq!(file.format, Format::Caffe, "{name}");
        assert_same_tensors(&file, &expected);
    }
}

// ---- full-size caffemodels, re-encoded here and checked against protobuf's bytes ----------

/// A BlobProto as protobuf serialises it: legacy (num, channels, height, width) or BlobShape.
fn blob(t: &Tensor, legacy: bool) -> Vec<u8> {
    let mut b = Vec::new();
    let dims = t.dims();
    if legacy {
        let mut nchw = vec![1usize; 4 - dims.len()];
        nchw.extend_from_slice(dims);
        for (i, d) in nchw.iter().enumerate() {
            field_varint(&mut b, i as u64 + 1, *d as u64);
        }
    }
    let data: Vec<u8> = flat(t).iter().flat_map(|v| v.to_le_bytes()).collect();
    field(&mut b, 5, &data);
    if !legacy {
        let mut packed = Vec::new();
        for d in dims {
            varint(&mut packed, *d as u64);
        }
        let mut shape = Vec::new();
        field(&mut shape, 1, &packed);
        field(&mut b, 7, &shape);
    }
    b
}

/// The NetParameter scripts/make_interop_fixtures.py writes, for the given layers.
fn caffemodel(state: &[(String, Tensor)], legacy: bool) -> Vec<u8> {
    let mut net = Vec::new();
    field(&mut net, 1, b"AlexNet");
    let layer_field = if legacy { 2 } else { 100 };
    let layer = |net: &mut Vec<u8>, name: &str, kind_v1: u64, kind: &str, blobs: &[&Tensor]| {
        let mut l = Vec::new();
        if legacy {
            field(&mut l, 4, name.as_bytes());
            field_varint(&mut l, 5, kind_v1);
            for t in blobs {
                field(&mut l, 6, &blob(t, true));
            }
        } else {
            field(&mut l, 1, name.as_bytes());
            field(&mut l, 2, kind.as_bytes());
            for t in blobs {
                field(&mut l, 7, &blob(t, false));
            }
        }
        field(net, layer_field, &l);
    };
    for (i, pair) in state.chunks(2).enumerate() {
        let name = pair[0].0.trim_end_matches(".weight");
        let conv = pair[0].1.rank() == 4;
        let (v1, v2) = if conv { (4, "Convolution") } else { (14, "InnerProduct") };
        layer(&mut net, name, v1, v2, &[&pair[0].1, &pair[1].1]);
        if i == 0 {
            layer(&mut net, "relu1", 18, "ReLU", &[]);
        }
    }
    net
}

/// Full-size caffemodels (V1, V2) with the reference weights, byte-identical to what protobuf
/// wrote in scripts/make_interop_fixtures.py, plus one from a net without groups.
fn caffe_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = shared_scratch_dir("caffemodels");
        let state = reference_state(Preset::Caffe);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(interop("caffemodels.json")).unwrap()).unwrap();
        for (form, legacy) in [("v1", true), ("v2", false)] {
            let bytes = caffemodel(&state, legacy);
            let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(sha, json[form]["sha256"].as_str().unwrap(), "{form}: our bytes differ from protobuf's");
            std::fs::write(dir.join(format!("{form}.caffemodel")), bytes).unwrap();
        }
        let mut ungrouped = state.clone();
        ungrouped[2].1 = Tensor::zeros((256, 96, 5, 5), DType::F32, &Device::Cpu).unwrap();
        std::fs::write(dir.join("ungrouped.caffemodel"), caffemodel(&ungrouped, false)).unwrap();
        dir
    })
    .as_path()
}

#[test]
fn caffemodels_v1_and_v2_reproduce_the_reference_logits() {
    let expected = fixture("caffe.safetensors");
    for form in ["v1", "v2"] {
        let file = WeightFile::open(&caffe_dir().join(format!("{form}.caffemodel"))).unwrap();
        assert_eq!(file.identify(None).unwrap().preset, Preset::Caffe);
        let model = AlexNet::new(Preset::Caffe, &mut Params::File(file), &Placement::on(&Device::Cpu)).unwrap();
        let logits = model.forward(&reference_input(Preset::Caffe), Mode::Eval).unwrap();
        assert_close(&format!("caffemodel {form} logits"), &logits, get(&expected, "logits"), 1e-4);
    }
}

#[test]
fn a_caffemodel_without_groups_is_refused_for_the_caffe_preset() {
    let path = caffe_dir().join("ungrouped.caffemodel");
    let out = alexnet(&["inspect", path.to_str().unwrap()]);
    assert!(out.status.success(), "inspect reads any well-formed file");
    let err = expect_error(&["convert", path.to_str().unwrap(), "/tmp/never-written.safetensors"]);
    assert!(
        err.contains("`conv2.weight`") && err.contains("[256, 96, 5, 5]") && err.contains("without groups"),
        "{err}"
    );
    assert!(!Path::new("/tmp/never-written.safetensors").exists());
}

// ---- convert, inspect ----------------------------------------------------------------------

fn tv_file(dir: &Path) -> PathBuf {
    let path = dir.join("tv.safetensors");
    if !path.exists() {
        save_safetensors(&reference_state(Preset::Torchvision), &Default::default(), &path).unwrap();
    }
    path
}

const TORCHVISION_STATE_DICT: [(&str, &[usize]); 16] = [
    ("features.0.weight", &[64, 3, 11, 11]),
    ("features.0.bias", &[64]),
    ("features.3.weight", &[192, 64, 5, 5]),
    ("features.3.bias", &[192]),
    ("features.6.weight", &[384, 192, 3, 3]),
    ("features.6.bias", &[384]),
    ("features.8.weight", &[256, 384, 3, 3]),
    ("features.8.bias", &[256]),
    ("features.10.weight", &[256, 256, 3, 3]),
    ("features.10.bias", &[256]),
    ("classifier.1.weight", &[4096, 9216]),
    ("classifier.1.bias", &[4096]),
    ("classifier.4.weight", &[4096, 4096]),
    ("classifier.4.bias", &[4096]),
    ("classifier.6.weight", &[1000, 4096]),
    ("classifier.6.bias", &[1000]),
];

#[test]
fn convert_to_torchvision_is_torchvisions_state_dict_and_reimports_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let src = tv_file(dir.path());
    let out = dir.path().join("out.safetensors");
    let run = alexnet(&["convert", src.to_str().unwrap(), out.to_str().unwrap(), "--to", "torchvision"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let written = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = written.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    let mut want: Vec<(String, Vec<usize>)> =
        TORCHVISION_STATE_DICT.iter().map(|(k, s)| (k.to_string(), s.to_vec())).collect();
    shapes.sort();
    want.sort();
    assert_eq!(shapes, want);
    let original = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    for (k, t) in &original {
        assert_eq!(flat(t), flat(&written[k]), "`{k}` changed in the round trip");
    }
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["preset"], "torchvision");
    assert_eq!(meta["source_sha256"], alexnet::files::sha256_file(&src).unwrap());
    assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp")));

    let err = expect_error(&["convert", src.to_str().unwrap(), out.to_str().unwrap(), "--to", "caffe"]);
    assert!(err.contains("different network"), "{err}");
}

#[test]
fn caffemodel_converts_to_safetensors_and_back_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("caffe.safetensors");
    let src = caffe_dir().join("v1.caffemodel");
    let run = alexnet(&["convert", src.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let original = WeightFile::open(&src).unwrap();
    let written = WeightFile::open(&out).unwrap();
    assert_same_tensors(&written, &original.tensors().clone().into_iter().collect());
    assert_eq!(written.tensors()["conv2.weight"].dims(), &[256, 48, 5, 5]);
}

#[test]
fn inspect_reports_format_preset_tensors_params_and_sha256() {
    let out = alexnet(&["inspect", "--json", interop("mini_v2.caffemodel").to_str().unwrap()]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["format"], "caffe");
    assert_eq!(json["preset"], "caffe");
    assert_eq!(json["params"], 4 * 27 + 4 + 5 * 16 + 5);
    assert_eq!(json["tensors"][0]["name"], "conv1.bias");
    assert_eq!(json["sha256"].as_str().unwrap().len(), 64);
    let text = stdout(&alexnet(&["inspect", interop("legacy.pth").to_str().unwrap()]));
    assert!(text.contains("PyTorch") && text.contains("half") && text.contains("f16"), "{text}");
}

#[test]
fn the_preset_is_detected_and_a_mismatch_is_an_error() {
    let v2 = caffe_dir().join("v2.caffemodel");
    let input = tempfile::tempdir().unwrap();
    let x = input.path().join("x.safetensors");
    save_safetensors(&[("input".into(), reference_input(Preset::Caffe))], &Default::default(), &x).unwrap();
    let y = input.path().join("y.safetensors");
    let run = alexnet(&[
        "infer",
        "--weights",
        v2.to_str().unwrap(),
        "--input",
        x.to_str().unwrap(),
        "--output",
        y.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let logits = candle_core::safetensors::load(&y, &Device::Cpu).unwrap();
    assert_close(
        "infer, preset detected from caffemodel",
        &logits["logits"],
        get(&fixture("caffe.safetensors"), "logits"),
        1e-4,
    );
    let err = expect_error(&[
        "infer",
        "--preset",
        "torchvision",
        "--weights",
        v2.to_str().unwrap(),
        "--input",
        x.to_str().unwrap(),
        "--output",
        y.to_str().unwrap(),
    ]);
    assert!(err.contains("Caffe-named") && err.contains("not the torchvision preset"), "{err}");
}

// ---- downloads, offline ---------------------------------------------------------------------

#[test]
fn hf_weights_come_from_a_prepopulated_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--someone--alexnet");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::copy(interop("mini_v2.caffemodel"), snapshot.join("mini.caffemodel")).unwrap();
    let env = [("HF_HOME", home.path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    let out = alexnet_env(&["inspect", "--json", "hf://someone/alexnet/mini.caffemodel"], &env);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = expect_error_env(&["inspect", "hf://someone/alexnet/other.safetensors"], &env);
    assert!(err.contains("not in the Hugging Face cache") && err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn torchvision_weights_offline_say_where_to_put_the_file_and_check_its_hash() {
    let home = tempfile::tempdir().unwrap();
    let env = [("TORCH_HOME", home.path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    let err = expect_error_env(&["inspect", "torchvision"], &env);
    let expected_path = home.path().join("hub/checkpoints/alexnet-owt-7be5be79.pth");
    assert!(err.contains(expected_path.to_str().unwrap()) && err.contains("download.pytorch.org"), "{err}");
    std::fs::create_dir_all(expected_path.parent().unwrap()).unwrap();
    std::fs::copy(interop("state.pth"), &expected_path).unwrap();
    let err = expect_error_env(&["inspect", "torchvision"], &env);
    assert!(err.contains("does not start with 7be5be79") && err.contains("damaged"), "{err}");
}

// ---- bad files: clear errors, exit code 1, no panic -----------------------------------------

fn truncated(src: &Path, keep: usize, dir: &Path) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let path = dir.join(format!("truncated-{}", src.file_name().unwrap().to_string_lossy()));
    std::fs::write(&path, &bytes[..keep.min(bytes.len() - 1)]).unwrap();
    path
}

#[test]
fn truncated_files_of_every_format_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tv = tv_file(dir.path());
    let cases = [
        (tv.clone(), 1 << 20, "safetensors"),
        (interop("state.pth"), 2000, "zip"),
        (interop("legacy.pth"), 1000, "truncated"),
        (interop("mini_v2.caffemodel"), 500, "truncated"),
    ];
    for (src, keep, says) in cases {
        let path = truncated(&src, keep, dir.path());
        let err = expect_error(&["inspect", path.to_str().unwrap()]);
        assert!(err.contains(path.to_str().unwrap()) && err.contains(says), "{}: {err}", src.display());
    }
}

#[test]
fn a_safetensors_header_claiming_a_huge_tensor_is_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let header =
        r#"{"features.0.weight":{"dtype":"F32","shape":[1099511627776,1024],"data_offsets":[0,4503599627370496]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    let path = dir.path().join("huge.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let err = expect_error(&["inspect", path.to_str().unwrap()]);
    assert!(err.contains("invalid or truncated safetensors"), "{err}");
}

/// A legacy-format .pth whose object pickle calls `module.name("touch MARKER")`.
fn malicious_pth(dir: &Path, module: &str, name: &str, marker: &Path) -> PathBuf {
    let mut bytes = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec(); // magic
    bytes.extend(b"\x80\x02M\xe9\x03."); // protocol 1001
    bytes.extend(b"\x80\x02}."); // system info
    bytes.extend(b"\x80\x02c"); // the object: GLOBAL module.name, its argument, TUPLE1, REDUCE
    bytes.extend(format!("{module}\n{name}\n").as_bytes());
    let command = format!("touch {}", marker.display());
    bytes.push(b'X');
    bytes.extend((command.len() as u32).to_le_bytes());
    bytes.extend(command.as_bytes());
    bytes.extend(b"\x85R.");
    bytes.extend(b"\x80\x02]."); // storage keys
    let path = dir.join(format!("{module}-{name}.pth"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn a_pickle_calling_any_global_is_refused_and_nothing_runs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    for (module, name) in [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "call")] {
        let path = malicious_pth(dir.path(), module, name, &marker);
        let err = expect_error(&["inspect", path.to_str().unwrap()]);
        assert!(err.contains(&format!("`{module}.{name}`")) && err.contains("nothing was executed"), "{err}");
    }
    assert!(!marker.exists(), "a pickle ran code");
}

#[test]
fn an_unknown_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "hello, these are not weights").unwrap();
    let err = expect_error(&["inspect", path.to_str().unwrap()]);
    assert!(err.contains("not a weight file we can read"), "{err}");
}
