//! Weight files: every source format (detected from the bytes, not the extension), in the
//! source's own tensor names, with every key and shape checked; and safetensors written safely
//! (temporary file, then rename).
//!
//! * safetensors (ours, torchvision's or Caffe's names);
//! * PyTorch `.pth`/`.pt` ([`pth`]: zip or legacy `torch.save`, read without running code);
//! * Caffe `.caffemodel` ([`caffe`]: protobuf, V1 and current layers, both blob shape forms).
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
use sha2::{Digest, Sha256};

use crate::init::Init;
use serde::Serialize;

use crate::model::Preset;

/// The two naming schemes weight files come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `features.0.weight` ... `classifier.6.bias`: the `torchvision` preset.
    Torchvision,
    /// `conv1.weight` ... `fc8.bias`, grouped layout: the `paper` and `caffe` presets.
    Caffe,
}

impl Naming {
    pub fn of(preset: Preset) -> Self {
        match preset {
            Preset::Torchvision => Naming::Torchvision,
            _ => Naming::Caffe,
        }
    }

    /// The naming a set of keys uses, if it is one of ours.
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let keys: Vec<&str> = keys.into_iter().collect();
        if keys.iter().any(|k| k.starts_with("features.") || k.starts_with("classifier.")) {
            Some(Naming::Torchvision)
        } else if keys.iter().any(|k| k.starts_with("conv") || k.starts_with("fc")) {
            Some(Naming::Caffe)
        } else {
            None
        }
    }

    fn presets(self) -> &'static str {
        match self {
            Naming::Torchvision => "the torchvision preset",
            Naming::Caffe => "the paper and caffe presets",
        }
    }
}

/// The Caffe layer name of a torchvision or Caffe key or prefix:
/// `features.3.weight` -> `conv2`, `fc6.bias` -> `fc6`.
pub fn caffe_layer_name(key: &str) -> &str {
    let prefix = key.strip_suffix(".weight").or_else(|| key.strip_suffix(".bias")).unwrap_or(key);
    match prefix {
        "features.0" => "conv1",
        "features.3" => "conv2",
        "features.6" => "conv3",
        "features.8" => "conv4",
        "features.10" => "conv5",
        "classifier.1" => "fc6",
        "classifier.4" => "fc7",
        "classifier.6" => "fc8",
        other => other,
    }
}

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
        let tensors: Vec<(String, Tensor)> = match format {
            Format::Safetensors => candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
                .with_context(|| format!("{file}: invalid or truncated safetensors file"))?
                .into_iter()
                .collect(),
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
        Ok(WeightFile { path: path.to_path_buf(), format, stored_dtypes, tensors: converted, used: BTreeSet::new() })
    }

    /// The preset these tensors are for, from their names: torchvision's names mean
    /// `torchvision`; Caffe's mean `caffe` (the `paper` preset shares them).
    pub fn detect_preset(&self) -> Option<Preset> {
        match Naming::detect(self.keys())? {
            Naming::Torchvision => Some(Preset::Torchvision),
            Naming::Caffe => Some(Preset::Caffe),
        }
    }

    /// The same file without the tensors whose names start with `prefix` (a checkpoint's
    /// `momentum/` buffers, when only its weights are wanted).
    pub fn without_prefix(mut self, prefix: &str) -> Self {
        self.tensors.retain(|k, _| !k.starts_with(prefix));
        self
    }

    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    fn take(&mut self, key: &str, shape: &[usize], preset: &str) -> anyhow::Result<Tensor> {
        let file = self.path.display();
        let Some(tensor) = self.tensors.get(key) else {
            bail!("{file}: tensor `{key}` (shape {shape:?}) is missing; the {preset} preset needs it")
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
            bail!("{file}: tensor `{key}` has shape {found:?}, but the {preset} preset expects {shape:?}{why}")
        }
        self.used.insert(key.to_string());
        Ok(tensor.clone())
    }
}

/// Where a model's parameters come from.
pub enum Params {
    File(WeightFile),
    Init(Init),
}

impl Params {
    /// Weight (of `shape`) and bias of layer `prefix`, as whole-layer f32 CPU tensors.
    pub fn layer(&mut self, prefix: &str, shape: &[usize]) -> anyhow::Result<(Tensor, Tensor)> {
        match self {
            Params::Init(init) => Ok(init.layer(prefix, shape)?),
            Params::File(file) => {
                let preset = file_preset_hint(prefix);
                let weight = file.take(&format!("{prefix}.weight"), shape, preset)?;
                let bias = file.take(&format!("{prefix}.bias"), &shape[..1], preset)?;
                Ok((weight, bias))
            }
        }
    }

    /// Refuses a file whose names belong to another preset, before any shape is checked.
    pub fn expect_naming(&self, preset: Preset) -> anyhow::Result<()> {
        let Params::File(file) = self else { return Ok(()) };
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
        let Params::File(file) = self else { return Ok(()) };
        let extra: Vec<String> = file
            .tensors
            .iter()
            .filter(|(k, _)| !file.used.contains(*k))
            .map(|(k, t)| format!("`{k}` {:?}", t.dims()))
            .collect();
        if !extra.is_empty() {
            bail!(
                "{}: unexpected tensor(s) not used by the {} preset: {}",
                file.path.display(),
                preset.name(),
                extra.join(", ")
            )
        }
        Ok(())
    }
}

/// Which presets use a key's naming, for error messages.
fn file_preset_hint(prefix: &str) -> &'static str {
    if prefix.starts_with("features.") || prefix.starts_with("classifier.") {
        "torchvision"
    } else {
        "paper/caffe"
    }
}

/// Writes `tensors` (and string `metadata`) as safetensors to `path` through a temporary file in the same folder,
/// renamed into place, so a crash never leaves a half-written file under the final name.
pub fn save_safetensors(
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
    path: &Path,
) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let metadata = (!metadata.is_empty()).then(|| metadata.clone());
    let written = safetensors::serialize_to_file(tensors.iter().map(|(k, t)| (k.as_str(), t)), metadata, &tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", tmp.display())
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
