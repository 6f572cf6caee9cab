//! Weight files: every source format (detected from the bytes, not the extension), in the
//! source's own tensor names, with every key and shape checked; and safetensors written safely
//! (temporary file, then rename).
//!
//! * safetensors (ours, torchvision's or Caffe's names);
//! * PyTorch `.pth`/`.pt` (`pth`: zip or legacy `torch.save`, read without running code);
//! * Caffe `.caffemodel` (`caffe`: protobuf, V1 and current layers, both blob shape forms).
//!
//! `--weights` also takes `hf://OWNER/REPO/FILE` and `torchvision` ([`fetch`]).

mod caffe;
pub mod fetch;
mod pth;

pub use caffe::read_blob as caffe_blob;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use crate::classes::Classes;
use crate::data::transform::Transform;
use crate::files::{printable, write_atomically};
use crate::init::Init;
use crate::preset::{Preset, CIFAR_TOWERS};
use serde::Serialize;

pub use crate::preset::{caffe_layer_name, Naming};

/// Where a training checkpoint keeps the optimiser's momentum buffers: `momentum/<key>`.
pub const MOMENTUM_PREFIX: &str = "momentum/";

/// The formats a weight file can be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Safetensors,
    PyTorch,
    Caffe,
}

impl Format {
    /// Recognises a file by its first bytes.
    pub fn detect(bytes: &[u8]) -> Option<Self> {
        let header_len = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if matches!(header_len, Some(n) if n > 1 && bytes.get(8) == Some(&b'{')) {
            Some(Format::Safetensors)
        } else if bytes.starts_with(b"PK\x03\x04")
            || bytes.starts_with(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19")
        {
            Some(Format::PyTorch) // a zip archive, or a legacy pickle starting with torch's magic number
        } else if caffe::looks_like_caffemodel(bytes) {
            Some(Format::Caffe)
        } else {
            None
        }
    }
}

/// A weight file of any supported format, read into CPU tensors (floats as f32).
pub struct WeightFile {
    pub path: PathBuf,
    pub format: Format,
    /// Each tensor's dtype as stored in the file.
    pub stored_dtypes: BTreeMap<String, DType>,
    /// The safetensors header's string metadata (empty for other formats): what `train`,
    /// `convert` and checkpoints record about the weights.
    pub metadata: BTreeMap<String, String>,
    tensors: BTreeMap<String, Tensor>,
    used: BTreeSet<String>,
}

impl WeightFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = path.display();
        if !path.exists() {
            bail!("weights file {file} does not exist")
        }
        let bytes = std::fs::read(path).with_context(|| format!("cannot read weights file {file}"))?;
        let format = Format::detect(&bytes).with_context(|| {
            format!("{file} is not a weight file we can read (safetensors, PyTorch .pth, or Caffe .caffemodel)")
        })?;
        let mut metadata = BTreeMap::new();
        let tensors: Vec<(String, Tensor)> = match format {
            Format::Safetensors => {
                use candle_core::safetensors::Load;
                let invalid = || format!("{file}: invalid or truncated safetensors file");
                // the header parsed (and its offsets checked against the data) once
                let (header_len, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(invalid)?;
                metadata.extend(header.metadata().clone().unwrap_or_default());
                let data = &bytes[8 + header_len..];
                let mut tensors = Vec::with_capacity(header.tensors().len());
                for (name, info) in header.tensors() {
                    let (start, end) = info.data_offsets;
                    let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), &data[start..end])
                        .with_context(invalid)?;
                    tensors.push((name, view.load(&Device::Cpu).with_context(invalid)?));
                }
                tensors
            }
            Format::PyTorch => pth::load(path, &bytes)?,
            Format::Caffe => caffe::load(&bytes).with_context(|| format!("{file}: invalid or truncated caffemodel"))?,
        };
        let mut stored_dtypes = BTreeMap::new();
        let mut converted = BTreeMap::new();
        for (key, tensor) in tensors {
            stored_dtypes.insert(key.clone(), tensor.dtype());
            let tensor = if tensor.dtype().is_float() { tensor.to_dtype(DType::F32)? } else { tensor };
            converted.insert(key, tensor);
        }
        Ok(WeightFile {
            path: path.to_path_buf(),
            format,
            stored_dtypes,
            metadata,
            tensors: converted,
            used: BTreeSet::new(),
        })
    }

    /// What the file's metadata records: the preset and the class names, from a final model
    /// or `convert`'s output (`preset`, `classes`) or a checkpoint's run state (`alexnet`).
    pub fn recorded(&self) -> anyhow::Result<Recorded> {
        let file = self.path.display();
        let mut recorded = Recorded::default();
        if let Some(run) = self.metadata.get("alexnet") {
            #[derive(serde::Deserialize)]
            struct Run {
                config: RunPreset,
                classes: Vec<String>,
            }
            #[derive(serde::Deserialize)]
            struct RunPreset {
                preset: Preset,
            }
            let run: Run = serde_json::from_str(run)
                .with_context(|| format!("{file}: its `alexnet` metadata is not a training checkpoint's run state"))?;
            recorded.preset = Some(run.config.preset);
            recorded.classes = Some(run.classes);
        }
        if let Some(name) = self.metadata.get("preset") {
            let preset = <Preset as clap::ValueEnum>::from_str(name, false).map_err(|_| {
                anyhow::anyhow!("{file}: its metadata names preset `{}`, which is not one we know", printable(name))
            })?;
            recorded.preset = Some(preset);
        }
        if let Some(classes) = self.metadata.get("classes") {
            let names = serde_json::from_str(classes)
                .with_context(|| format!("{file}: its `classes` metadata is not a JSON list of names"))?;
            recorded.classes = Some(names);
        }
        if let Some(input) = self.metadata.get("input") {
            let transform = Transform::from_record(input)
                .with_context(|| format!("{file}: its `input` metadata (the preprocessing it was trained with)"))?;
            recorded.transform = Some(transform);
        }
        Ok(recorded)
    }

    /// The preset these tensors are for, from their names and the first layer's shape:
    /// torchvision's names mean `torchvision`; Caffe's mean `caffe` (the `paper` preset shares
    /// them, so only metadata can tell the two apart) or `cifar-towers` (5x5 first filters);
    /// `fc` without `fc8` is the Figure 1 net, whose ReLU and tanh forms have the same tensors
    /// (None: only metadata or `--preset` can say which).
    pub fn preset_from_names(&self) -> Option<Preset> {
        match Naming::detect(self.keys())? {
            Naming::Torchvision => Some(Preset::Torchvision),
            // the Figure 1 nets' last layer: ReLU or tanh, which the names cannot tell
            Naming::Caffe if self.tensors.contains_key(Preset::Fig1Relu.classifier_weight()) => None,
            Naming::Caffe => match self.tensors.get("conv1.weight").map(Tensor::dims) {
                Some(dims) if dims == CIFAR_TOWERS.first_filter_shape() => Some(Preset::CifarTowers),
                _ => Some(Preset::Caffe),
            },
        }
    }

    /// Which net these weights are for and how many classes it has: `--preset` (`flag`) where
    /// given, else the preset the metadata records, else the one the tensor names imply; the
    /// classes from the metadata's names, else the rows of the last layer's weight. The
    /// weights' shapes are checked when the model is built from them.
    pub fn identify(&self, flag: Option<Preset>) -> anyhow::Result<Identity> {
        let recorded = match self.recorded() {
            Ok(recorded) => recorded,
            // metadata we cannot read does not stand in the way of a preset the user names
            Err(e) if flag.is_some() => {
                eprintln!("note: {e:#}; ignored, as --preset is given");
                Recorded::default()
            }
            Err(e) => return Err(e.context("cannot tell what the weights are (pass --preset to run them anyway)")),
        };
        let preset = match (flag, recorded.preset, self.preset_from_names()) {
            (Some(flag), Some(recorded), _) if flag != recorded => {
                eprintln!(
                    "note: {} records the {} preset; running it as {} (--preset)",
                    self.path.display(),
                    recorded.name(),
                    flag.name()
                );
                flag
            }
            (Some(p), _, _) | (None, Some(p), _) | (None, None, Some(p)) => p,
            (None, None, None) => bail!(
                "cannot tell which preset {} is for (its metadata records none{}); pass --preset",
                self.path.display(),
                if self.tensors.contains_key("fc.weight") {
                    ", and the Figure 1 net's tensors are the same with ReLU or tanh: fig1-relu or fig1-tanh"
                } else {
                    ", and it has no torchvision or Caffe tensor names"
                }
            ),
        };
        let outputs = self.tensors.get(preset.classifier_weight()).and_then(|w| w.dims().first().copied());
        let classes = match (recorded.classes, outputs) {
            (Some(names), Some(rows)) if names.len() != rows => bail!(
                "{}: its metadata names {} classes, but `{}` has {rows} rows",
                self.path.display(),
                names.len(),
                preset.classifier_weight()
            ),
            (Some(names), _) => Classes::folders(&names),
            (None, Some(rows)) => Classes::unnamed(rows),
            (None, None) => Classes::unnamed(preset.default_classes()),
        };
        let transform = recorded.transform.unwrap_or_else(|| Transform::for_preset(preset));
        Ok(Identity { preset, classes, transform })
    }

    /// The model's weights alone: a checkpoint's momentum buffers ([`MOMENTUM_PREFIX`]) left out.
    pub fn model_weights(mut self) -> Self {
        self.take_momentum();
        self
    }

    /// A checkpoint's momentum buffers (`momentum/<name>`), taken out of the file's tensors.
    pub fn take_momentum(&mut self) -> BTreeMap<String, Tensor> {
        let (momentum, weights) =
            std::mem::take(&mut self.tensors).into_iter().partition(|(k, _)| k.starts_with(MOMENTUM_PREFIX));
        self.tensors = weights;
        momentum
    }

    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    fn take(&mut self, key: &str, shape: &[usize], presets: &str) -> anyhow::Result<Tensor> {
        let file = self.path.display();
        let Some(tensor) = self.tensors.get(key) else {
            bail!("{file}: tensor `{key}` (shape {shape:?}) is missing; {presets} need it")
        };
        if tensor.dims() != shape {
            let found = tensor.dims();
            let ungrouped = ["conv2.weight", "conv4.weight", "conv5.weight"].contains(&key)
                && found.len() == 4
                && found[1] == 2 * shape[1];
            let why = if ungrouped {
                " (a net without groups: the two-tower presets need Caffe's `group: 2` layout)"
            } else {
                ""
            };
            bail!("{file}: tensor `{key}` has shape {found:?}, but {presets} expect {shape:?}{why}")
        }
        self.used.insert(key.to_string());
        Ok(tensor.clone())
    }
}

/// What a weight file's metadata records about the model it holds.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    pub preset: Option<Preset>,
    /// The class names, in output order.
    pub classes: Option<Vec<String>>,
    /// The preprocessing it was trained with (files `train` wrote).
    pub transform: Option<Transform>,
}

/// The net a weight file is for: its preset, its output classes and its preprocessing.
#[derive(Debug, Clone)]
pub struct Identity {
    pub preset: Preset,
    pub classes: Classes,
    /// The recorded preprocessing, else the preset's own.
    pub transform: Transform,
}

/// Where a model's parameters come from.
pub enum Params {
    File(WeightFile),
    Init(Init),
    /// A weight file's layers but one, `fresh` (a key prefix such as `fc8`), which `init`
    /// makes: a pretrained net given a new head for other classes.
    FileWithFreshLayer {
        file: WeightFile,
        fresh: String,
        init: Init,
    },
}

impl Params {
    /// `file`'s layers, but `fresh` (its tensors dropped) made by `init`.
    pub fn with_fresh_layer(mut file: WeightFile, fresh: &str, init: Init) -> Self {
        let prefix = format!("{fresh}.");
        file.tensors.retain(|k, _| !k.starts_with(&prefix));
        Params::FileWithFreshLayer { file, fresh: fresh.to_string(), init }
    }

    /// The weight file the parameters come from, if any.
    fn file(&self) -> Option<&WeightFile> {
        match self {
            Params::File(file) | Params::FileWithFreshLayer { file, .. } => Some(file),
            Params::Init(_) => None,
        }
    }

    /// Weight (of `shape`) and bias of layer `prefix`, as whole-layer f32 CPU tensors.
    pub fn layer(&mut self, prefix: &str, shape: &[usize]) -> anyhow::Result<(Tensor, Tensor)> {
        match self {
            Params::Init(init) => Ok(init.layer(prefix, shape)?),
            Params::FileWithFreshLayer { fresh, init, .. } if fresh == prefix => Ok(init.layer(prefix, shape)?),
            Params::File(file) | Params::FileWithFreshLayer { file, .. } => {
                let presets = Naming::detect([prefix]).unwrap_or(Naming::Caffe).presets();
                let weight = file.take(&format!("{prefix}.weight"), shape, &presets)?;
                let bias = file.take(&format!("{prefix}.bias"), &shape[..1], &presets)?;
                Ok((weight, bias))
            }
        }
    }

    /// Refuses a file whose names belong to another preset, before any shape is checked.
    pub fn expect_naming(&self, preset: Preset) -> anyhow::Result<()> {
        let Some(file) = self.file() else { return Ok(()) };
        let wanted = Naming::of(preset);
        match Naming::detect(file.keys()) {
            Some(found) if found == wanted => Ok(()),
            Some(found) => bail!(
                "{} holds {:?}-named weights, which are for {}, not the {} preset; pass --preset {}",
                file.path.display(),
                found,
                found.presets(),
                preset.name(),
                if found == Naming::Torchvision { "torchvision" } else { "caffe (or paper)" },
            ),
            None => bail!(
                "{} holds no AlexNet weights that we recognise (expected {} keys such as `{}`)",
                file.path.display(),
                wanted.presets(),
                if wanted == Naming::Torchvision { "features.0.weight" } else { "conv1.weight" },
            ),
        }
    }

    /// After the model took its layers: any tensor it did not take is an error.
    pub fn finish(&self, preset: Preset) -> anyhow::Result<()> {
        let Some(file) = self.file() else { return Ok(()) };
        let extra: Vec<String> = file
            .tensors
            .iter()
            .filter(|(k, _)| !file.used.contains(*k))
            .map(|(k, t)| format!("`{}` {:?}", printable(k), t.dims()))
            .collect();
        if !extra.is_empty() {
            let more = if extra.len() > 10 { format!(" and {} more", extra.len() - 10) } else { String::new() };
            bail!(
                "{}: unexpected tensor(s) not used by the {} preset: {}{more}",
                file.path.display(),
                preset.name(),
                extra[..extra.len().min(10)].join(", ")
            )
        }
        Ok(())
    }
}

/// Writes `tensors` (and string `metadata`) as safetensors to `path`, atomically
/// ([`write_atomically`]); the tensors stream to it one by one, no second copy of them in memory.
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
    path: &Path,
) -> anyhow::Result<()> {
    use safetensors::View;
    use std::io::Write;
    let entries: Vec<(&str, safetensors::Dtype, &[usize])> =
        tensors.iter().map(|(name, t)| (name.as_str(), View::dtype(t), t.dims())).collect();
    write_safetensors_streamed(&entries, metadata, path, |out| {
        for (_, tensor) in tensors {
            out.write_all(&tensor.data())?;
        }
        Ok(())
    })
}

/// Writes safetensors whose tensors (`entries`: name, dtype, shape) `data` writes, their bytes
/// one after another in order, atomically: for tensors made while they are written, never all
/// in memory at once (`preprocess`). Writing fewer or more bytes than the shapes say is an error.
pub fn write_safetensors_streamed(
    entries: &[(&str, safetensors::Dtype, &[usize])],
    metadata: &HashMap<String, String>,
    path: &Path,
    data: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    use std::io::Write;
    // The header: each tensor's dtype, shape and byte range, in the order written.
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".to_string(), serde_json::to_value(metadata)?);
    }
    let mut offset = 0usize;
    for &(name, dtype, shape) in entries {
        if name == "__metadata__" || header.contains_key(name) {
            bail!("cannot write tensor `{name}` to {}: the name is taken", path.display())
        }
        let bits = shape.iter().try_fold(dtype.bitsize(), |n, &d| n.checked_mul(d));
        let bytes = bits.map(|b| b.div_ceil(8));
        let end = bytes.and_then(|b| offset.checked_add(b)).context("a tensor's size overflows")?;
        let entry = serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, end] });
        header.insert(name.to_string(), entry);
        offset = end;
    }
    let mut header = serde_json::to_vec(&header)?;
    header.resize(header.len().next_multiple_of(8), b' '); // the data starts 8-byte aligned
    let total = 8 + header.len() as u64 + offset as u64;
    write_atomically(path, |out| {
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        data(out)?;
        out.flush()?;
        let written = out.get_ref().metadata()?.len();
        if written != total {
            return Err(std::io::Error::other(format!("{written} bytes written where the header says {total}")));
        }
        Ok(())
    })
}
