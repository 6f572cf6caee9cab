//! ONNX export: an [`AlexNet`] as an ONNX `ModelProto` (IR version 8, opset 17), its weights
//! as initializers, encoded by a small protobuf writer (varints and length-delimited fields,
//! the counterpart of the hand-written reader in `weights/caffe.rs`; no protoc, no new crate).
//!
//! Here rather than in `weights/`: an ONNX file is the network, not a weight file, and writing
//! it needs the architecture (which layers are grouped, the LRN constants and scope, the pools).
//!
//! The graph is the model's eval-mode forward pass ([`AlexNet::forward`]), op for op:
//! * `paper`, `caffe`, `cifar-towers`: the two towers as one net with grouped convolutions
//!   (`group: 2` on conv2, conv4 and conv5: Caffe's layout, the one the weights are in; a group
//!   sees only its own tower's half of the input, as a tower does), then ReLU, LRN and the
//!   3/2 max-pool after conv1 and conv2, in that order. LRN is ONNX's `LRN` over the whole
//!   layer, the model's default [`LrnScope::Layer`]; [`LrnScope::Tower`] has no ONNX op and is
//!   refused. ONNX's LRN divides alpha by the size, as [`Lrn`] stores it, so the model's
//!   constants go over unchanged: Caffe's `bias 1, alpha 1e-4`, the paper's `bias 2,
//!   alpha 5e-4` (its 1e-4 multiplies the plain sum).
//! * `torchvision`: its single tower, for a fixed 224x224 input: pool5 is then 6x6, where
//!   `AdaptiveAvgPool2d((6, 6))` is the identity, so it is left out (an input of another size
//!   would need it; ONNX Runtime refuses one, since the input's height and width are fixed).
//! * `fig1-relu`, `fig1-tanh`: three 5x5 convolutions, each with its ReLU or tanh and a 3/2
//!   max-pool, then the fully-connected layer.
//!
//! Max-pools are floor mode without padding, as [`crate::ops::max_pool2d`]; dropout is the
//! identity at inference and left out. The fully-connected layers are `Gemm` with `transB = 1`
//! (the weights stay `[out, in]`); `Flatten` keeps Caffe's and PyTorch's (channel, row, column)
//! order. The input `input` is `[N, 3, S, S]` f32 with a symbolic batch `N` and the preset's
//! side `S` (its fc layers are sized for it); the output is `logits` `[N, classes]`.
//! Initializers keep the weights' own names (`conv2.weight`, `features.3.weight`, ...).

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::Tensor;

use crate::files::write_atomically;
use crate::model::{AlexNet, LrnScope};
use crate::ops::Lrn;
use crate::preset::{NetKind, TowerGeometry};

/// The ONNX IR version written (ONNX 1.10 and later read it).
pub const IR_VERSION: i64 = 8;
/// The default-domain opset the graph uses.
pub const OPSET: i64 = 17;

/// A model encoded but for its weights' bytes, which [`OnnxModel::write`] streams from the
/// tensors, so the 244 MB of the large presets are never copied into one buffer.
pub struct OnnxModel {
    /// The `ModelProto` fields before the graph, and the graph's key and length.
    head: Vec<u8>,
    /// The graph's nodes, name, input and output.
    graph: Vec<u8>,
    /// Each initializer: its field key, length and fields up to the raw data's length, then
    /// the tensor whose bytes follow.
    initializers: Vec<(Vec<u8>, Tensor)>,
}

impl OnnxModel {
    /// The ONNX form of `model`, with `metadata` as the model's metadata properties.
    pub fn new(model: &AlexNet, metadata: &[(String, String)]) -> anyhow::Result<Self> {
        let preset = model.preset;
        let weights = model.state_dict()?;
        let shape = |key: &str| -> anyhow::Result<Vec<usize>> {
            let (_, t) = weights.iter().find(|(k, _)| k == key).with_context(|| format!("no tensor `{key}`"))?;
            Ok(t.dims().to_vec())
        };
        let classes = shape(preset.classifier_weight())?[0];
        let side = preset.input_size();

        let mut graph = Message::default();
        let mut previous = "input".to_string();
        let layers = layers(model)?;
        for (i, (name, layer)) in layers.iter().enumerate() {
            let output = if i + 1 == layers.len() { "logits".to_string() } else { name.clone() };
            graph.message(1, &layer.node(name, &previous, &output, &shape)?);
            previous = output;
        }
        graph.string(2, &format!("alexnet-{}", preset.name()));
        let batch = [Dim::Named("N"), Dim::Fixed(3), Dim::Fixed(side), Dim::Fixed(side)];
        graph.message(11, &value_info("input", &batch));
        graph.message(12, &value_info("logits", &[Dim::Named("N"), Dim::Fixed(classes)]));

        let mut initializers = Vec::with_capacity(weights.len());
        let mut graph_len = graph.0.len();
        for (key, tensor) in weights {
            let mut fields = Message::default();
            for &d in tensor.dims() {
                fields.int(1, d as i64);
            }
            fields.int(2, FLOAT);
            fields.string(8, &key);
            let data_len = tensor.elem_count() * 4;
            fields.key(9, LEN);
            fields.varint(data_len as u64);
            let mut prefix = Message::default();
            prefix.key(5, LEN);
            prefix.varint((fields.0.len() + data_len) as u64);
            prefix.0.extend(fields.0);
            graph_len += prefix.0.len() + data_len;
            initializers.push((prefix.0, tensor));
        }

        let mut head = Message::default();
        head.int(1, IR_VERSION);
        let mut opset = Message::default();
        opset.int(2, OPSET); // the default domain: `domain` (1) left empty
        head.message(8, &opset);
        head.string(2, "alexnet");
        head.string(3, env!("CARGO_PKG_VERSION"));
        head.string(6, &format!("AlexNet, the {} preset, in eval mode", preset.name()));
        for (key, value) in metadata {
            let mut entry = Message::default();
            entry.string(1, key);
            entry.string(2, value);
            head.message(14, &entry);
        }
        head.key(7, LEN);
        head.varint(graph_len as u64);
        Ok(OnnxModel { head: head.0, graph: graph.0, initializers })
    }

    /// The encoded model, streamed to `out`: weights as little-endian f32.
    pub fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&self.head)?;
        out.write_all(&self.graph)?;
        for (prefix, tensor) in &self.initializers {
            out.write_all(prefix)?;
            // the tensor's bytes as safetensors writes them (little-endian f32, a CPU tensor's
            // own storage borrowed where it is contiguous)
            out.write_all(&safetensors::View::data(tensor))?;
        }
        Ok(())
    }

    /// Writes the model to `path` atomically ([`write_atomically`]).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        write_atomically(path, |out| self.write(out))
    }
}

/// One op of the graph; the weights it takes are named by their key prefix.
enum Layer {
    Conv { key: &'static str, stride: usize, pad: usize, group: usize },
    Relu,
    Tanh,
    Lrn(Lrn),
    MaxPool,
    Flatten,
    Gemm { key: &'static str },
}

/// The graph of `model`: `(node name, op)` in order, the names Caffe's blobs (`conv1`, `norm1`, ...).
fn layers(model: &AlexNet) -> anyhow::Result<Vec<(String, Layer)>> {
    use Layer::*;
    let conv = |key, stride, pad| Conv { key, stride, pad, group: 1 };
    let named = |layers: Vec<(&str, Layer)>| layers.into_iter().map(|(n, l)| (n.to_string(), l)).collect();
    let two_towers = |g: &TowerGeometry| -> anyhow::Result<Vec<(String, Layer)>> {
        let Some((lrn, scope)) = model.lrn() else { bail!("the two-tower net has no LRN") };
        if scope == LrnScope::Tower {
            bail!(
                "ONNX's LRN cannot stop at the tower boundary: export the model with the default \
                 LRN scope (layer), not tower"
            )
        }
        // ONNX centres an even window one channel higher than the model does; the presets' is 5.
        if lrn.size % 2 == 0 {
            bail!("an LRN window of even size ({}) has no exact ONNX form", lrn.size)
        }
        let grouped = |i: usize, key, group| {
            let (_, _, stride, pad) = g.convs[i];
            Conv { key, stride, pad, group }
        };
        Ok(named(vec![
            ("conv1", grouped(0, "conv1", 1)),
            ("relu1", Relu),
            ("norm1", Lrn(lrn)),
            ("pool1", MaxPool),
            ("conv2", grouped(1, "conv2", 2)),
            ("relu2", Relu),
            ("norm2", Lrn(lrn)),
            ("pool2", MaxPool),
            ("conv3", grouped(2, "conv3", 1)),
            ("relu3", Relu),
            ("conv4", grouped(3, "conv4", 2)),
            ("relu4", Relu),
            ("conv5", grouped(4, "conv5", 2)),
            ("relu5", Relu),
            ("pool5", MaxPool),
            ("flatten", Flatten),
            ("fc6", Gemm { key: "fc6" }),
            ("relu6", Relu),
            ("fc7", Gemm { key: "fc7" }),
            ("relu7", Relu),
            ("fc8", Gemm { key: "fc8" }),
        ]))
    };
    Ok(match model.preset.facts().net {
        NetKind::Towers { geometry, .. } => two_towers(geometry)?,
        NetKind::Torchvision => named(vec![
            ("conv1", conv("features.0", 4, 2)),
            ("relu1", Relu),
            ("pool1", MaxPool),
            ("conv2", conv("features.3", 1, 2)),
            ("relu2", Relu),
            ("pool2", MaxPool),
            ("conv3", conv("features.6", 1, 1)),
            ("relu3", Relu),
            ("conv4", conv("features.8", 1, 1)),
            ("relu4", Relu),
            ("conv5", conv("features.10", 1, 1)),
            ("relu5", Relu),
            ("pool5", MaxPool), // then the adaptive pool, the identity at 224x224 (module docs)
            ("flatten", Flatten),
            ("fc6", Gemm { key: "classifier.1" }),
            ("relu6", Relu),
            ("fc7", Gemm { key: "classifier.4" }),
            ("relu7", Relu),
            ("fc8", Gemm { key: "classifier.6" }),
        ]),
        NetKind::Figure1 { tanh } => {
            let act = || if tanh { Tanh } else { Relu };
            named(vec![
                ("conv1", conv("conv1", 1, 2)),
                ("act1", act()),
                ("pool1", MaxPool),
                ("conv2", conv("conv2", 1, 2)),
                ("act2", act()),
                ("pool2", MaxPool),
                ("conv3", conv("conv3", 1, 2)),
                ("act3", act()),
                ("pool3", MaxPool),
                ("flatten", Flatten),
                ("fc", Gemm { key: "fc" }),
            ])
        }
    })
}

impl Layer {
    /// The `NodeProto` of this op, from `input` to `output`; `shape` gives a weight's dims.
    fn node(
        &self,
        name: &str,
        input: &str,
        output: &str,
        shape: &dyn Fn(&str) -> anyhow::Result<Vec<usize>>,
    ) -> anyhow::Result<Message> {
        let weighted = |key: &str| [input.to_string(), format!("{key}.weight"), format!("{key}.bias")];
        let (op, inputs, attributes) = match *self {
            Layer::Conv { key, stride, pad, group } => {
                let dims = shape(&format!("{key}.weight"))?;
                let (kh, kw) = (dims[2] as i64, dims[3] as i64);
                let (s, p) = (stride as i64, pad as i64);
                let mut attributes =
                    vec![ints("kernel_shape", &[kh, kw]), ints("strides", &[s, s]), ints("pads", &[p, p, p, p])];
                if group > 1 {
                    attributes.push(int("group", group as i64));
                }
                ("Conv", weighted(key).to_vec(), attributes)
            }
            Layer::Relu => ("Relu", vec![input.to_string()], vec![]),
            Layer::Tanh => ("Tanh", vec![input.to_string()], vec![]),
            Layer::Lrn(lrn) => {
                let attributes = vec![
                    int("size", lrn.size as i64),
                    float("alpha", lrn.alpha),
                    float("beta", lrn.beta),
                    float("bias", lrn.k),
                ];
                ("LRN", vec![input.to_string()], attributes)
            }
            Layer::MaxPool => {
                let attributes = vec![ints("kernel_shape", &[3, 3]), ints("strides", &[2, 2]), int("ceil_mode", 0)];
                ("MaxPool", vec![input.to_string()], attributes)
            }
            Layer::Flatten => ("Flatten", vec![input.to_string()], vec![int("axis", 1)]),
            Layer::Gemm { key } => ("Gemm", weighted(key).to_vec(), vec![int("transB", 1)]),
        };
        let mut node = Message::default();
        for i in &inputs {
            node.string(1, i);
        }
        node.string(2, output);
        node.string(3, name);
        node.string(4, op);
        for a in &attributes {
            node.message(5, a);
        }
        Ok(node)
    }
}

/// `TensorProto.DataType.FLOAT`.
const FLOAT: i64 = 1;
/// The length-delimited wire type (strings, bytes, messages).
const LEN: u8 = 2;

/// An `AttributeProto` of type INT (2).
fn int(name: &str, value: i64) -> Message {
    let mut a = Message::default();
    a.string(1, name);
    a.int(20, 2);
    a.int(3, value);
    a
}

/// An `AttributeProto` of type FLOAT (1).
fn float(name: &str, value: f32) -> Message {
    let mut a = Message::default();
    a.string(1, name);
    a.int(20, 1);
    a.key(2, 5);
    a.0.extend(value.to_le_bytes());
    a
}

/// An `AttributeProto` of type INTS (7).
fn ints(name: &str, values: &[i64]) -> Message {
    let mut a = Message::default();
    a.string(1, name);
    a.int(20, 7);
    for &v in values {
        a.int(8, v);
    }
    a
}

enum Dim<'a> {
    Fixed(usize),
    Named(&'a str),
}

/// A `ValueInfoProto`: an f32 tensor named `name` of shape `dims`.
fn value_info(name: &str, dims: &[Dim]) -> Message {
    let mut shape = Message::default();
    for d in dims {
        let mut dim = Message::default();
        match d {
            Dim::Fixed(v) => dim.int(1, *v as i64),
            Dim::Named(p) => dim.string(2, p),
        }
        shape.message(1, &dim);
    }
    let mut tensor = Message::default();
    tensor.int(1, FLOAT);
    tensor.message(2, &shape);
    let mut ty = Message::default();
    ty.message(1, &tensor);
    let mut info = Message::default();
    info.string(1, name);
    info.message(2, &ty);
    info
}

/// A protobuf message being encoded: its fields' bytes, in the order added.
#[derive(Default)]
struct Message(Vec<u8>);

impl Message {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u8) {
        self.varint(u64::from(field) << 3 | u64::from(wire));
    }

    /// An int32, int64 or enum field (negative values as their 64-bit two's complement).
    fn int(&mut self, field: u32, v: i64) {
        self.key(field, 0);
        self.varint(v as u64);
    }

    fn string(&mut self, field: u32, s: &str) {
        self.key(field, LEN);
        self.varint(s.len() as u64);
        self.0.extend(s.as_bytes());
    }

    fn message(&mut self, field: u32, m: &Message) {
        self.key(field, LEN);
        self.varint(m.0.len() as u64);
        self.0.extend(&m.0);
    }
}
