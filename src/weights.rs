//! Weight files: reading safetensors in the source's own names, checking every key and shape,
//! and writing safetensors safely (temporary file, then rename).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use crate::init::Init;
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
            Preset::Paper | Preset::Caffe => Naming::Caffe,
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

/// A safetensors weight file, read into f32 CPU tensors.
pub struct WeightFile {
    pub path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    used: BTreeSet<String>,
}

impl WeightFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            bail!("weights file {} does not exist", path.display())
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read {} as safetensors", path.display()))?;
        let mut converted = BTreeMap::new();
        for (key, tensor) in tensors {
            let tensor = tensor
                .to_dtype(DType::F32)
                .with_context(|| format!("{}: tensor `{key}` cannot be converted to f32", path.display()))?;
            converted.insert(key, tensor);
        }
        Ok(WeightFile { path: path.to_path_buf(), tensors: converted, used: BTreeSet::new() })
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
            bail!(
                "{file}: tensor `{key}` has shape {:?}, but the {preset} preset expects {shape:?}",
                tensor.dims()
            )
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

/// Writes `tensors` as safetensors to `path` through a temporary file in the same folder,
/// renamed into place, so a crash never leaves a half-written file under the final name.
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let map: std::collections::HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}
