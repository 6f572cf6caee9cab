//! ONNX export (`convert --to onnx`, `alexnet::onnx`), checked without Python: each preset's
//! model with the reference weights is encoded and decoded again by the minimal protobuf
//! reader below: the IR version and opset, the ops in order and their attributes (groups, LRN
//! constants, pools), the input and output shapes, and every initializer bit for bit.
//! `scripts/check_onnx.py` runs the files in ONNX Runtime against `alexnet infer`.

mod common;

use alexnet::onnx::{OnnxModel, IR_VERSION, OPSET};
use alexnet::{LrnScope, Placement, Preset};
use candle_core::{Device, Tensor};
use common::*;

/// A protobuf field's payload.
#[derive(Clone, Copy)]
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

fn varint(b: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0;
    for shift in (0..64).step_by(7) {
        let byte = b[*pos];
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
    }
    panic!("malformed varint")
}

/// Every `(field, payload)` of one message, in order.
fn fields(b: &[u8]) -> Vec<(u32, Value<'_>)> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < b.len() {
        let key = varint(b, &mut pos);
        let value = match key & 7 {
            0 => Value::Varint(varint(b, &mut pos)),
            2 => {
                let n = varint(b, &mut pos) as usize;
                pos += n;
                Value::Bytes(&b[pos - n..pos])
            }
            5 => {
                pos += 4;
                Value::Fixed32(u32::from_le_bytes(b[pos - 4..pos].try_into().unwrap()))
            }
            w => panic!("wire type {w}: the exporter writes none"),
        };
        out.push(((key >> 3) as u32, value));
    }
    assert_eq!(pos, b.len(), "a field runs past its message");
    out
}

fn all(b: &[u8], field: u32) -> Vec<Value<'_>> {
    fields(b).into_iter().filter(|&(f, _)| f == field).map(|(_, v)| v).collect()
}

fn messages(b: &[u8], field: u32) -> Vec<&[u8]> {
    all(b, field).into_iter().map(|v| if let Value::Bytes(m) = v { m } else { panic!("field {field}") }).collect()
}

fn message(b: &[u8], field: u32) -> &[u8] {
    let m = messages(b, field);
    assert_eq!(m.len(), 1, "field {field}");
    m[0]
}

fn string(b: &[u8], field: u32) -> &str {
    std::str::from_utf8(message(b, field)).unwrap()
}

fn ints(b: &[u8], field: u32) -> Vec<i64> {
    all(b, field)
        .into_iter()
        .map(|v| if let Value::Varint(i) = v { i as i64 } else { panic!("field {field}") })
        .collect()
}

fn int(b: &[u8], field: u32) -> i64 {
    let i = ints(b, field);
    assert_eq!(i.len(), 1, "field {field}");
    i[0]
}

/// A node's attribute `name` as its int, float or ints value, in text (`2`, `0.0005`, `[3, 3]`).
fn attribute(node: &[u8], name: &str) -> Option<String> {
    let a = messages(node, 5).into_iter().find(|a| string(a, 1) == name)?;
    Some(match int(a, 20) {
        1 => match all(a, 2)[..] {
            [Value::Fixed32(bits)] => format!("{}", f32::from_bits(bits)),
            _ => panic!("float attribute {name}"),
        },
        2 => format!("{}", int(a, 3)),
        7 => format!("{:?}", ints(a, 8)),
        t => panic!("attribute type {t}"),
    })
}

/// A `ValueInfoProto`'s name and dims (`N` for the symbolic one).
fn value_info(v: &[u8]) -> (String, Vec<String>) {
    let tensor = message(message(v, 2), 1);
    assert_eq!(int(tensor, 1), 1, "f32");
    let dims = messages(message(tensor, 2), 1)
        .into_iter()
        .map(|d| match fields(d)[..] {
            [(1, Value::Varint(n))] => n.to_string(),
            [(2, Value::Bytes(p))] => String::from_utf8(p.to_vec()).unwrap(),
            _ => panic!("a dim is a value or a name"),
        })
        .collect();
    (string(v, 1).to_string(), dims)
}

/// An ONNX file and the weights it holds.
type Encoded = (Vec<u8>, Vec<(String, Tensor)>);

/// The ONNX file of `preset` with the reference weights, and those weights.
fn encode(preset: Preset, scope: LrnScope) -> anyhow::Result<Encoded> {
    let placement = Placement { lrn_scope: scope, ..Placement::on(&Device::Cpu) };
    let model = reference_model(preset, &placement);
    let metadata = [("preset".to_string(), preset.name().to_string())];
    let mut bytes = Vec::new();
    OnnxModel::new(&model, &metadata)?.write(&mut bytes)?;
    Ok((bytes, model.state_dict()?))
}

/// The ops of the two-tower presets, in order.
const TOWER_OPS: &str = "Conv Relu LRN MaxPool Conv Relu LRN MaxPool Conv Relu Conv Relu Conv Relu MaxPool \
                         Flatten Gemm Relu Gemm Relu Gemm";

#[test]
fn every_preset_encodes_its_forward_pass() {
    use Preset::*;
    for preset in [Paper, Caffe, Torchvision, CifarTowers, Fig1Relu, Fig1Tanh] {
        let (bytes, state) = encode(preset, LrnScope::Layer).unwrap();
        let what = preset.name();
        assert_eq!(int(&bytes, 1), IR_VERSION, "{what}: ir_version");
        let opset = message(&bytes, 8);
        assert!(all(opset, 1).is_empty(), "{what}: the default domain");
        assert_eq!(int(opset, 2), OPSET, "{what}: opset");
        let entry = message(&bytes, 14);
        assert_eq!((string(entry, 1), string(entry, 2)), ("preset", what), "{what}: metadata");

        let graph = message(&bytes, 7);
        let nodes = messages(graph, 1);
        let ops: Vec<&str> = nodes.iter().map(|n| string(n, 4)).collect();
        let want = match preset {
            Paper | Caffe | CifarTowers => TOWER_OPS.to_string(),
            Torchvision => "Conv Relu MaxPool Conv Relu MaxPool Conv Relu Conv Relu Conv Relu MaxPool \
                            Flatten Gemm Relu Gemm Relu Gemm"
                .to_string(),
            Fig1Relu | Fig1Tanh => {
                let act = if preset == Fig1Tanh { "Tanh" } else { "Relu" };
                format!("Conv {act} MaxPool Conv {act} MaxPool Conv {act} MaxPool Flatten Gemm")
            }
        };
        assert_eq!(ops.join(" "), want.split_whitespace().collect::<Vec<_>>().join(" "), "{what}: ops");

        // each node reads the previous one's output; the last writes `logits`
        let mut previous = "input".to_string();
        for n in &nodes {
            let inputs: Vec<&str> = messages(n, 1).iter().map(|i| std::str::from_utf8(i).unwrap()).collect();
            assert_eq!(inputs[0], previous, "{what}: {}", string(n, 3));
            previous = string(n, 2).to_string();
        }
        assert_eq!(previous, "logits", "{what}");

        let attrs = |op: &str, name: &str| -> Vec<Option<String>> {
            nodes.iter().filter(|n| string(n, 4) == op).map(|n| attribute(n, name)).collect()
        };
        let groups = attrs("Conv", "group");
        let towers = matches!(preset, Paper | Caffe | CifarTowers);
        let two = Some("2".to_string());
        let want_groups =
            if towers { vec![None, two.clone(), None, two.clone(), two] } else { vec![None; groups.len()] };
        assert_eq!(groups, want_groups, "{what}: grouped convolutions");
        for pool in nodes.iter().filter(|n| string(n, 4) == "MaxPool") {
            assert_eq!(attribute(pool, "kernel_shape").as_deref(), Some("[3, 3]"), "{what}");
            assert_eq!(attribute(pool, "strides").as_deref(), Some("[2, 2]"), "{what}");
            assert_eq!(attribute(pool, "ceil_mode").as_deref(), Some("0"), "{what}: floor mode");
            assert_eq!(attribute(pool, "pads"), None, "{what}: no padding");
        }
        let conv1 = nodes[0];
        let (stride, pad) = match preset {
            Paper | Caffe => ("[4, 4]", "[0, 0, 0, 0]"),
            Torchvision => ("[4, 4]", "[2, 2, 2, 2]"),
            _ => ("[1, 1]", "[2, 2, 2, 2]"),
        };
        assert_eq!(attribute(conv1, "strides").as_deref(), Some(stride), "{what}: conv1");
        assert_eq!(attribute(conv1, "pads").as_deref(), Some(pad), "{what}: conv1");
        // ONNX's LRN: x / (bias + alpha/size * sum x^2)^beta; the paper's alpha 1e-4 is on the sum
        let lrn = match preset {
            Caffe => vec![("5", "0.0001", "0.75", "1"); 2],
            Paper | CifarTowers => vec![("5", "0.0005", "0.75", "2"); 2],
            _ => vec![],
        };
        for (i, name) in ["size", "alpha", "beta", "bias"].into_iter().enumerate() {
            let want: Vec<Option<String>> = lrn.iter().map(|c| Some([c.0, c.1, c.2, c.3][i].to_string())).collect();
            assert_eq!(attrs("LRN", name), want, "{what}: LRN {name}");
        }
        for gemm in nodes.iter().filter(|n| string(n, 4) == "Gemm") {
            assert_eq!(attribute(gemm, "transB").as_deref(), Some("1"), "{what}: Gemm takes [out, in] weights");
        }

        let side = preset.input_size().to_string();
        let classes = preset.default_classes().to_string();
        let io = |field| messages(graph, field).into_iter().map(value_info).collect::<Vec<_>>();
        assert_eq!(io(11), [("input".to_string(), vec!["N".to_string(), "3".into(), side.clone(), side])], "{what}");
        assert_eq!(io(12), [("logits".to_string(), vec!["N".to_string(), classes])], "{what}");

        let initializers = messages(graph, 5);
        assert_eq!(initializers.len(), state.len(), "{what}: one initializer per tensor");
        for (init, (key, tensor)) in initializers.iter().zip(&state) {
            assert_eq!(string(init, 8), key, "{what}: initializer names are the weights' keys");
            let dims: Vec<i64> = tensor.dims().iter().map(|&d| d as i64).collect();
            assert_eq!(ints(init, 1), dims, "{what}: {key}");
            assert_eq!(int(init, 2), 1, "{what}: {key} is FLOAT");
            let raw: Vec<u8> =
                tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(message(init, 9) == raw, "{what}: {key}: raw_data is the tensor, little-endian");
        }
        eprintln!("{what:<13} {} bytes, {} nodes, {} initializers", bytes.len(), nodes.len(), initializers.len());
    }
}

#[test]
fn tower_scoped_lrn_is_refused() {
    let err = encode(Preset::CifarTowers, LrnScope::Tower).expect_err("refused").to_string();
    assert!(err.contains("tower boundary"), "{err}");
}

#[test]
fn convert_writes_an_onnx_file() {
    let dir = tempfile::tempdir().unwrap();
    let (weights, onnx) = (dir.path().join("w.safetensors"), dir.path().join("m.onnx"));
    let (w, o) = (weights.to_str().unwrap(), onnx.to_str().unwrap());
    let out = alexnet(&["init", "--preset", "fig1-tanh", "--scheme", "reference", w]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = alexnet(&["convert", w, o, "--to", "onnx"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&onnx).unwrap();
    let props: Vec<(&str, &str)> = messages(&bytes, 14).into_iter().map(|e| (string(e, 1), string(e, 2))).collect();
    assert!(props.contains(&("preset", "fig1-tanh")), "{props:?}");
    assert!(props.iter().any(|(k, _)| *k == "source_sha256"), "{props:?}");
    let ops: Vec<&str> = messages(message(&bytes, 7), 1).iter().map(|n| string(n, 4)).collect();
    assert_eq!(ops.iter().filter(|&&op| op == "Tanh").count(), 3, "{ops:?}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "no temporary file left: {leftovers:?}");
}
