//! Hostile weight files: each defect a security review found, crafted here byte by byte, must
//! be a clear error or the right result (never a panic, stack overflow or abort); and a
//! mutation fuzzer over real .pth, caffemodel and safetensors files finds no panics.
//! `ALEXNET_FUZZ_MUTANTS` sets the fuzzer's mutants per seed file.

mod common;

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alexnet::weights::WeightFile;
use common::{field, field_varint, fuzz, varint, AsFile};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

// ---- pickles and files, written by hand ---------------------------------------------------

/// BINUNICODE `s`.
fn unicode(s: &[u8]) -> Vec<u8> {
    let mut p = vec![b'X'];
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s);
    p
}

/// LONG1 `v` (nine bytes, so that it is never negative).
fn int(v: u64) -> Vec<u8> {
    let mut p = vec![0x8a, 9];
    p.extend(v.to_le_bytes());
    p.push(0);
    p
}

/// MARK, the ints, TUPLE.
fn int_tuple(values: &[u64]) -> Vec<u8> {
    let mut p = vec![b'('];
    values.iter().for_each(|&v| p.extend(int(v)));
    p.push(b't');
    p
}

/// The key and value a state_dict pickle pushes before SETITEM for a float tensor `name`
/// viewing storage `key` as `torch._utils._rebuild_tensor_v2` does.
fn tensor_item(name: &str, key: &str, offset: u64, size: &[u64], stride: &[u64]) -> Vec<u8> {
    let mut p = unicode(name.as_bytes());
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.push(b'('); // the persistent id: ('storage', FloatStorage, key, 'cpu', numel)
    p.extend(unicode(b"storage"));
    p.extend(b"ctorch\nFloatStorage\n");
    p.extend(unicode(key.as_bytes()));
    p.extend(unicode(b"cpu"));
    p.extend(int(1));
    p.extend(b"tQ");
    p.extend(int(offset));
    p.extend(int_tuple(size));
    p.extend(int_tuple(stride));
    p.extend(b"\x89ccollections\nOrderedDict\n)R"); // requires_grad, backward hooks
    p.extend(b"tR");
    p
}

/// A protocol 2 pickle of `{name: tensor}`, as [`tensor_item`] describes the tensor.
fn tensor_dict(name: &str, key: &str, offset: u64, size: &[u64], stride: &[u64]) -> Vec<u8> {
    let mut p = b"\x80\x02}".to_vec();
    p.extend(tensor_item(name, key, offset, size, stride));
    p.extend(b"s.");
    p
}

/// A legacy-format .pth (as `torch.save(..., _use_new_zipfile_serialization=False)` writes
/// it): magic number, protocol and system info pickles, the `object` pickle, its storage keys,
/// then each storage as an element count and its float values.
fn legacy_pth(object: &[u8], storages: &[(&str, &[f32])]) -> Vec<u8> {
    let mut bytes = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.".to_vec(); // magic number
    bytes.extend(b"\x80\x02M\xe9\x03."); // protocol 1001
    bytes.extend(b"\x80\x02}."); // system info
    bytes.extend(object);
    bytes.extend(b"\x80\x02(");
    storages.iter().for_each(|(key, _)| bytes.extend(unicode(key.as_bytes())));
    bytes.extend(b"l.");
    for (_, values) in storages {
        bytes.extend((values.len() as u64).to_le_bytes());
        values.iter().for_each(|v| bytes.extend(v.to_le_bytes()));
    }
    bytes
}

/// A caffemodel of one (current-form) layer `name` with the given BlobProtos.
fn caffemodel(name: &[u8], blobs: &[Vec<u8>]) -> Vec<u8> {
    let mut layer = Vec::new();
    field(&mut layer, 1, name);
    blobs.iter().for_each(|b| field(&mut layer, 7, b));
    let mut net = Vec::new();
    field(&mut net, 1, b"hostile");
    field(&mut net, 100, &layer);
    net
}

/// Writes `bytes` as `name` in `dir` and opens it, timing the call.
fn open(dir: &Path, name: &str, bytes: &[u8]) -> (anyhow::Result<WeightFile>, Duration) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let start = Instant::now();
    let result = WeightFile::open(&path);
    (result, start.elapsed())
}

/// The whole error chain, as the CLI prints it.
fn error(result: anyhow::Result<WeightFile>) -> String {
    match result {
        Ok(file) => panic!("expected an error, loaded {:?}", file.keys().collect::<Vec<_>>()),
        Err(e) => format!("{e:#}"),
    }
}

// ---- one test per defect ------------------------------------------------------------------

#[test]
fn a_list_nested_100000_deep_loads_without_overflowing_the_stack() {
    // {'deep': [[[...]]] (100,000 lists, each memoised), 'w': tensor}: Python reads it fine
    let depth = 100_000;
    let mut p = b"\x80\x02}".to_vec();
    p.extend(unicode(b"deep"));
    for i in 0..depth {
        p.extend([b']', b'q', i as u8]); // EMPTY_LIST, BINPUT
    }
    p.extend(std::iter::repeat_n(b'a', depth - 1)); // each APPENDs the top list to the one below
    p.push(b's');
    p.extend(tensor_item("w", "0", 0, &[2], &[1]));
    p.extend(b"s.");
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = open(dir.path(), "deep.pth", &legacy_pth(&p, &[("0", &[1.0, 2.0])]));
    let file = file.unwrap();
    assert_eq!(file.keys().collect::<Vec<_>>(), ["w"]);
}

#[test]
fn memoised_lists_reused_a_billion_times_load_at_once_as_shared_objects() {
    // {'laughs': [l0, ..., l40], 'w': tensor} where l0 = [] and l(n+1) = [ln] * 16 (BINGET ln
    // sixteen times): 16^40 elements as deep copies
    let mut p = b"\x80\x02}".to_vec();
    p.extend(unicode(b"laughs"));
    p.extend(b"(]q\x00");
    for level in 1..=40u8 {
        p.push(b'(');
        (0..16).for_each(|_| p.extend([b'h', level - 1]));
        p.extend([b'l', b'q', level]);
    }
    p.extend(b"ls");
    p.extend(tensor_item("w", "0", 0, &[1], &[1]));
    p.extend(b"s.");
    assert!(p.len() < 2000, "{}", p.len());
    let dir = tempfile::tempdir().unwrap();
    let (file, took) = open(dir.path(), "laughs.pth", &legacy_pth(&p, &[("0", &[3.0])]));
    assert_eq!(file.unwrap().keys().collect::<Vec<_>>(), ["w"]);
    assert!(took < Duration::from_millis(500), "{took:?}");
}

#[test]
fn a_zero_stride_view_is_materialised_only_within_the_files_budget() {
    let dir = tempfile::tempdir().unwrap();
    // torch.ones(1).expand(2**40): 4 TiB from one float
    let huge = legacy_pth(&tensor_dict("ones", "0", 0, &[1 << 40], &[0]), &[("0", &[1.0])]);
    let (result, took) = open(dir.path(), "huge.pth", &huge);
    let err = error(result);
    assert!(err.contains("`ones`") && err.contains("stride [0]") && err.contains("past the file's limit"), "{err}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // torch.ones(1).expand(1000), and a transposed 2x3 view: copied element by element
    let small = legacy_pth(&tensor_dict("ones", "0", 0, &[1000], &[0]), &[("0", &[1.0])]);
    let (file, _) = open(dir.path(), "small.pth", &small);
    let ones = file.unwrap().tensors()["ones"].to_vec1::<f32>().unwrap();
    assert_eq!(ones, vec![1.0; 1000]);
    let values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
    let transposed = legacy_pth(&tensor_dict("t", "0", 0, &[3, 2], &[1, 3]), &[("0", &values)]);
    let (file, _) = open(dir.path(), "transposed.pth", &transposed);
    let t = file.unwrap().tensors()["t"].to_vec2::<f32>().unwrap();
    assert_eq!(t, [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]);
}

#[test]
fn sizes_and_offsets_that_overflow_are_errors_not_empty_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("wrapping-dims.pth", tensor_dict("w", "0", 0, &[1 << 32, 1 << 32], &[1 << 32, 1])),
        ("zero-and-huge-dims.pth", tensor_dict("w", "0", 0, &[0, 1 << 40, 1 << 40], &[0, 1 << 40, 1])),
        ("huge-offset.pth", tensor_dict("w", "0", 1 << 62, &[1], &[1])),
    ];
    for (name, pickle) in cases {
        let (result, _) = open(dir.path(), name, &legacy_pth(&pickle, &[("0", &[])]));
        let err = error(result);
        assert!(err.contains("tensor `w`") && err.contains("overflow"), "{name}: {err}");
    }
    let mut shape = Vec::new();
    let mut packed = Vec::new();
    [1u64 << 32, 1 << 32].iter().for_each(|&d| varint(&mut packed, d));
    field(&mut shape, 1, &packed);
    let mut blob_shape = Vec::new();
    field(&mut blob_shape, 7, &shape);
    let mut blob_legacy = Vec::new();
    [1u64 << 32, 1, 1 << 32, 1].iter().enumerate().for_each(|(i, &d)| field_varint(&mut blob_legacy, i as u64 + 1, d));
    for (name, blob) in [("shape.caffemodel", blob_shape), ("legacy.caffemodel", blob_legacy)] {
        let (result, _) = open(dir.path(), name, &caffemodel(b"fc6", &[blob]));
        let err = error(result);
        assert!(err.contains("blob `fc6.weight`") && err.contains("overflows"), "{name}: {err}");
    }
}

#[test]
fn errors_show_strings_from_the_file_escaped_and_shortened() {
    let dir = tempfile::tempdir().unwrap();
    let no_control = |err: &str| !err.chars().any(char::is_control);
    // a global with control bytes (clearing the screen), then one 10,000 characters long
    let mut pickle = b"\x80\x02ccollections.Order\x00\x00\x1b[2J\x07\nOrderedDict\x01\n)R.".to_vec();
    let (result, _) = open(dir.path(), "control.pth", &legacy_pth(&pickle, &[]));
    let err = error(result);
    assert!(err.contains("refusing to load") && err.contains(r"collections.Order\0\0\u{1b}[2J"), "{err}");
    assert!(no_control(&err), "{err:?}");
    pickle = b"\x80\x02c".to_vec();
    pickle.extend(vec![b'A'; 10_000]);
    pickle.extend(b"\nsystem\n)R.");
    let (result, _) = open(dir.path(), "long.pth", &legacy_pth(&pickle, &[]));
    let err = error(result);
    assert!(err.contains("refusing to load") && err.len() < 500, "{err}");
    // a caffemodel layer with a control-laden name and three blobs
    let (result, _) = open(dir.path(), "layer.caffemodel", &caffemodel(b"fc\x1b[2J\x00", &[vec![], vec![], vec![]]));
    let err = error(result);
    assert!(err.contains(r"fc\u{1b}[2J\0") && err.contains("3 blobs"), "{err}");
    assert!(no_control(&err), "{err:?}");
}

#[test]
fn a_dict_or_list_that_contains_itself_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    // d = {}; d['state_dict'] = d  /  d['model'] = d  /  l = []; l.append(l)
    let cases: [(&str, &[u8], &str); 3] = [
        ("state_dict.pth", b"\x80\x02}q\x00X\x0a\x00\x00\x00state_dicth\x00s.", "nested more than"),
        ("model.pth", b"\x80\x02}q\x00X\x05\x00\x00\x00modelh\x00s.", "nested more than"),
        ("list.pth", b"\x80\x02]q\x00h\x00a.", "holds no state_dict"),
    ];
    for (name, pickle, says) in cases {
        let (result, took) = open(dir.path(), name, &legacy_pth(pickle, &[]));
        let err = error(result);
        assert!(err.contains(says), "{name}: {err}");
        assert!(took < Duration::from_secs(1), "{name}: {took:?}");
    }
}

#[test]
fn pickles_past_the_object_or_element_budget_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // [None] * 3,000,000, each None its own object; then one list BINGET 5,000,000 times
    let mut objects = b"\x80\x02(".to_vec();
    objects.extend(vec![b'N'; 3_000_000]);
    objects.extend(b"l.");
    let mut elements = b"\x80\x02]q\x00(".to_vec();
    (0..5_000_000).for_each(|_| elements.extend(b"h\x00"));
    elements.extend(b"l.");
    for (name, pickle, says) in [("objects.pth", objects, "objects"), ("elements.pth", elements, "elements")] {
        let (result, _) = open(dir.path(), name, &legacy_pth(&pickle, &[]));
        let err = error(result);
        assert!(err.contains("refusing to load") && err.contains("more than") && err.contains(says), "{err}");
    }
}

// ---- the mutation fuzzer ------------------------------------------------------------------

fn interop(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop").join(name)
}

/// A zip-format .pth with `pickle` as its data.pkl and the other entries of `original`,
/// stored as `torch.save` stores them: the zip's checksums hold, so a mutated pickle reaches
/// the unpickler.
fn zip_with_pickle(original: &[u8], pickle: &[u8]) -> Vec<u8> {
    let mut archive = ZipArchive::new(Cursor::new(original)).unwrap();
    let mut out = ZipWriter::new(Cursor::new(Vec::new()));
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().unwrap().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.start_file(name.as_str(), stored).unwrap();
        out.write_all(if name.ends_with("data.pkl") { pickle } else { &data }).unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// The data.pkl of a zip-format .pth.
fn data_pkl(zip: &[u8]) -> Vec<u8> {
    let mut archive = ZipArchive::new(Cursor::new(zip)).unwrap();
    let name = archive.file_names().filter_map(Result::ok).find(|n| n.ends_with("data.pkl")).unwrap().into_owned();
    let mut pickle = Vec::new();
    archive.by_name(&name).unwrap().read_to_end(&mut pickle).unwrap();
    pickle
}

#[test]
fn a_mutation_fuzzer_finds_no_panics() {
    let read = |name: &str| std::fs::read(interop(name)).unwrap();
    let state = read("state.pth");
    let state_pickle = data_pkl(&state);
    let strided = legacy_pth(&tensor_dict("t", "0", 1, &[3, 2, 2], &[1, 4, 0]), &[("0", &[0.5; 12])]);
    let seeds: [(&str, Vec<u8>, AsFile); 7] = [
        ("state.pth", state.clone(), &|m| m),
        ("state.pth's data.pkl", state_pickle, &|m| zip_with_pickle(&state, &m)),
        ("legacy.pth", read("legacy.pth"), &|m| m),
        ("a legacy .pth of a strided view", strided, &|m| m),
        ("mini_v1.caffemodel", read("mini_v1.caffemodel"), &|m| m),
        ("mini_v2.caffemodel", read("mini_v2.caffemodel"), &|m| m),
        ("mini_expected.safetensors", read("mini_expected.safetensors"), &|m| m),
    ];
    fuzz(&seeds, 3000, "mutant", |path| WeightFile::open(path).is_ok());
}
