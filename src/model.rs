//! The AlexNet architecture: all three presets, in one file.
//!
//! * `paper` and `caffe`: the two-tower net of Krizhevsky et al. (2012), figure 2. Each tower
//!   owns half of every layer; conv2, conv4 and conv5 see only their own tower, conv3 and the
//!   fully-connected layers see both (the "cross-talk" links, `TwoTowers::exchange`).
//!   The presets differ only in their LRN constants (see [`crate::ops::Lrn`]).
//! * `torchvision`: the single-tower net of `torchvision.models.alexnet` ("one weird trick").
//! * CIFAR-10 scale, for the paper's experiments on small images: `cifar-towers`, the same
//!   two towers with every layer scaled to 28x28 crops of 32x32 images ([`CIFAR_TOWERS`]), and
//!   `fig1-relu` / `fig1-tanh`, the four-layer net of the paper's Figure 1 (`SmallNet`).
//!
//! Which net a preset builds, with which sizes and LRN constants, is a row of the presets'
//! table ([`crate::preset::PRESETS`]); the constructors here build it.
//!
//! Weight keys are the source's own names, so the constructors below *are* the weight map:
//! Caffe's `conv1` ... `fc8` (grouped layout: conv2 is `[256, 48, 5, 5]`, the first half of
//! the output channels being tower A's) and torchvision's `features.0` ... `classifier.6`.
//!
//! Where LRN looks (an explicit choice, [`LrnScope`]): by default it sums over neighbouring
//! channels of the *whole layer*, across the tower boundary, which is what Caffe computes and
//! what its weights need, and what a grouped-convolution model does. The towers then exchange
//! only the `size/2` channels next to the boundary. `LrnScope::Tower` instead normalises each
//! tower on its own, as two GPUs that never talk between conv1 and conv3 would.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Result as CandleResult, Tensor, Var};
use serde::Serialize;

use crate::classes::Classes;
use crate::data::transform::Transform;
use crate::init::Init;
use crate::ops::{
    adaptive_avg_pool2d, conv2d_prepared, linear_prepared, lrn, lrn_max_pool2d, max_pool2d, Lrn, Prepared,
};
use crate::preset::NetKind;
use crate::weights::{Identity, Params, WeightFile};

pub use crate::preset::{Preset, TowerGeometry, CIFAR_TOWERS, PAPER_TOWERS};

/// Eval, or training with dropout masks drawn from `seed` (so a step is reproducible).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train { seed: u64 },
}

/// Which channels an LRN window may reach in the two-tower presets (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LrnScope {
    /// All channels of the layer, across the tower boundary (Caffe; needed for its weights).
    #[default]
    Layer,
    /// Only the tower's own channels.
    Tower,
}

/// Where the net lives: one device per tower (the torchvision net uses tower A's).
#[derive(Debug, Clone)]
pub struct Placement {
    pub towers: [Device; 2],
    pub lrn_scope: LrnScope,
}

impl Placement {
    pub fn on(device: &Device) -> Self {
        Placement { towers: [device.clone(), device.clone()], lrn_scope: LrnScope::Layer }
    }
}

/// One row of the layer table: a layer's output, recorded as the forward pass runs.
#[derive(Debug, Clone)]
pub struct Step {
    /// Caffe's blob name (`conv1`, `norm1`, `pool1`, ..., `fc8`), also used for torchvision.
    pub name: &'static str,
    /// What the layer sees: `image`, `own tower`, `both towers`, or `-` for the single tower.
    pub sees: &'static str,
    /// The layer's output (both towers concatenated along the channel axis, on tower A's device).
    pub output: Tensor,
    pub params: usize,
    pub macs: u64,
    /// Seconds from the previous layer's output to this one's (the trace's own copies left
    /// out; on the CPU, where ops finish before they return).
    pub seconds: f64,
}

/// A forward pass that records every layer's output and time, for `summary`, `bench --layers`
/// and the parity tests.
struct Trace {
    steps: Vec<Step>,
    /// Only this layer's step is kept ([`AlexNet::features`]): the others' outputs are not
    /// made (for the two-tower nets each is both towers joined, a copy).
    keep: Option<&'static str>,
    /// When the previous layer's output was recorded (or the pass began).
    since: Instant,
}

/// A conv or linear layer's parameter, in the source's layout, possibly split across towers.
pub struct Param {
    /// Source key, e.g. `conv2.weight` or `features.3.weight`.
    pub key: String,
    /// The tower halves (split along the output axis), or the single tensor.
    pub parts: Vec<Var>,
    /// The states of the layers that keep forms of it (a weight's; a bias is read as it is, so
    /// none): whoever writes `parts` calls
    /// [`Prepared::weights_changed`] on each (as [`crate::optim::Sgd`] does).
    pub states: Vec<Arc<Prepared>>,
}

impl Param {
    /// The whole parameter on the CPU, `f` applied to each part (the part itself, its gradient...).
    pub fn gather(&self, f: impl Fn(&Var) -> Option<Tensor>) -> CandleResult<Option<Tensor>> {
        let mut parts = Vec::with_capacity(self.parts.len());
        for var in &self.parts {
            match f(var) {
                Some(t) => parts.push(t.to_device(&Device::Cpu)?),
                None => return Ok(None),
            }
        }
        Tensor::cat(&parts, 0).map(Some)
    }
}

/// An AlexNet: the net of a preset, what its outputs are called and the preprocessing its
/// images need.
///
/// ```
/// # fn main() -> anyhow::Result<()> {
/// use alexnet::{AlexNet, Preset};
/// # let dir = tempfile::tempdir()?;
/// # let weights = dir.path().join("fig1.safetensors");
/// # AlexNet::init(Preset::Fig1Relu, 0)?.save(&weights)?;
/// // a weight file (safetensors, .pth, .caffemodel), `hf://OWNER/REPO/FILE` or `torchvision`
/// let model = AlexNet::load(weights.to_str().unwrap(), &candle_core::Device::Cpu)?;
/// let image = alexnet::data::decode("../shared/data/photos/chelsea.png".as_ref())?;
/// for p in model.classify(&image, 3)? {
///     println!("{:5.1}%  {}", 100.0 * p.probability, p.name);
/// }
/// # Ok(())
/// # }
/// ```
pub struct AlexNet {
    pub preset: Preset,
    net: Net,
    classes: Classes,
    transform: Transform,
}

/// A layer whose output [`AlexNet::features`] returns (after its ReLU, as the forward pass
/// computes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layer {
    Conv1,
    Conv2,
    Conv3,
    Conv4,
    Conv5,
    /// The last convolution's pooled maps: `[N, 256, 6, 6]` in the ImageNet nets.
    Pool5,
    Fc6,
    /// The penultimate layer: the 4096 features transfer learning usually takes.
    Fc7,
    /// The last layer, before the softmax.
    Logits,
}

impl Layer {
    /// The layer's name in the forward pass's trace and on the command line (`fc7`), which
    /// feature files record.
    pub fn name(self) -> &'static str {
        match self {
            Layer::Conv1 => "conv1",
            Layer::Conv2 => "conv2",
            Layer::Conv3 => "conv3",
            Layer::Conv4 => "conv4",
            Layer::Conv5 => "conv5",
            Layer::Pool5 => "pool5",
            Layer::Fc6 => "fc6",
            Layer::Fc7 => "fc7",
            Layer::Logits => "logits",
        }
    }

    /// The layer [`Layer::name`] names.
    pub fn from_name(name: &str) -> Option<Self> {
        <Self as clap::ValueEnum>::from_str(name, false).ok()
    }
}

/// A class and its probability, as [`AlexNet::classify`] gives it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The output's index.
    pub index: usize,
    /// The class's ID: an ImageNet WNID, or the folder `train` learned it from.
    pub id: String,
    pub name: String,
    pub probability: f32,
}

#[allow(clippy::large_enum_variant)] // one per model: boxing the largest would buy nothing
enum Net {
    Towers(TwoTowers),
    Single(Torchvision),
    Small(SmallNet),
}

impl AlexNet {
    /// Builds the net of `preset` for its usual classes, with parameters from `params`
    /// (a weight file or an initialisation).
    pub fn new(preset: Preset, params: &mut Params, placement: &Placement) -> anyhow::Result<Self> {
        Self::with_classes(preset, preset.default_classes(), params, placement)
    }

    /// Builds the net of `preset` with `classes` outputs.
    pub fn with_classes(
        preset: Preset,
        classes: usize,
        params: &mut Params,
        placement: &Placement,
    ) -> anyhow::Result<Self> {
        params.expect_naming(preset)?;
        let net = match preset.facts().net {
            NetKind::Towers { geometry, lrn } => {
                Net::Towers(TwoTowers::new(params, placement, geometry, preset.input_size(), classes, lrn.lrn())?)
            }
            NetKind::Torchvision => Net::Single(Torchvision::new(params, &placement.towers[0], classes)?),
            NetKind::Figure1 { tanh } => Net::Small(SmallNet::new(params, &placement.towers[0], classes, tanh)?),
        };
        params.finish(preset)?;
        Ok(AlexNet { preset, net, classes: Classes::unnamed(classes), transform: Transform::for_preset(preset) })
    }

    /// A freshly initialised net of `preset` (its own initialisation scheme, [`Init::default_for`]).
    pub fn init(preset: Preset, seed: u64) -> anyhow::Result<Self> {
        Self::new(preset, &mut Params::Init(Init::default_for(preset, seed)), &Placement::on(&Device::Cpu))
    }

    /// The model a weight file holds (anything `--weights` takes: a safetensors, `.pth` or
    /// `.caffemodel` file, `hf://OWNER/REPO/FILE`, `torchvision`), as the file identifies it
    /// ([`crate::weights::WeightFile::identify`]: preset, classes, preprocessing), on `device`,
    /// frozen for inference ([`AlexNet::freeze`]).
    pub fn load(weights: &str, device: &Device) -> anyhow::Result<Self> {
        Self::load_as(weights, None, &Placement::on(device))
    }

    /// [`AlexNet::load`] with the preset given (checked against the file) and the towers placed.
    pub fn load_as(weights: &str, preset: Option<Preset>, placement: &Placement) -> anyhow::Result<Self> {
        let path = crate::weights::fetch::resolve(weights)?;
        let file = WeightFile::open(&path)?.model_weights();
        let Identity { preset, classes, transform } = file.identify(preset)?;
        let mut model = Self::with_classes(preset, classes.len(), &mut Params::File(file), placement)?
            .with_outputs(classes, transform);
        model.freeze();
        Ok(model)
    }

    /// The same net with its outputs named `classes` (as many as it has) and its images
    /// prepared by `transform`: what a weight file or a training run says the model is.
    pub fn with_outputs(self, classes: Classes, transform: Transform) -> Self {
        assert_eq!(classes.len(), self.classes.len(), "a name for each output");
        AlexNet { classes, transform, ..self }
    }

    /// What a weight file records of the model, so that [`AlexNet::load`] gives it back as it
    /// is (see [`crate::weights::WeightFile::identify`]): its preset, its class names unless
    /// they are the default ones, and its preprocessing where it is a trained one.
    pub fn metadata(&self) -> anyhow::Result<std::collections::HashMap<String, String>> {
        let mut metadata = std::collections::HashMap::new();
        metadata.insert("preset".to_string(), self.preset.name().to_string());
        if self.classes != Classes::unnamed(self.classes.len()) {
            metadata.insert("classes".to_string(), serde_json::to_string(&self.classes.ids())?);
        }
        // only the paper's pipeline with a mean image of its own has a record (what `train` uses)
        if let Ok(record) = self.transform.to_record() {
            metadata.insert("input".to_string(), record);
        }
        Ok(metadata)
    }

    /// Writes the weights as safetensors in the preset's names, with [`AlexNet::metadata`].
    pub fn save(&self, path: &std::path::Path) -> anyhow::Result<()> {
        crate::weights::save_safetensors(&self.state_dict()?, &self.metadata()?, path)
    }

    /// What the outputs are called.
    pub fn classes(&self) -> &Classes {
        &self.classes
    }

    /// The preprocessing the model's images need: the one it was trained with where its file
    /// records it, else the preset's ([`Preset::transform`]).
    pub fn transform(&self) -> &Transform {
        &self.transform
    }

    /// The `k` most probable classes of an image, most probable first.
    pub fn classify(&self, image: &image::RgbImage, k: usize) -> anyhow::Result<Vec<Prediction>> {
        let crop = self.transform.apply(image, false)?.remove(0);
        let side = self.transform.crop;
        let x = Tensor::from_vec(crop, (1, 3, side, side), &Device::Cpu)?.to_device(self.device())?;
        let logits = self.forward(&x, Mode::Eval)?;
        let probabilities = candle_nn::ops::softmax_last_dim(&logits)?.to_device(&Device::Cpu)?.get(0)?.to_vec1()?;
        Ok(self.top_k(&probabilities, k))
    }

    /// The `k` largest of `probabilities` (one per class) as named predictions.
    pub fn top_k(&self, probabilities: &[f32], k: usize) -> Vec<Prediction> {
        crate::classes::top_k(probabilities, k)
            .into_iter()
            .map(|i| Prediction {
                index: i,
                id: self.classes.id(i).to_string(),
                name: self.classes.name(i).to_string(),
                probability: probabilities[i],
            })
            .collect()
    }

    /// The output of `layer` for a preprocessed `[N, 3, H, W]` batch (for transfer learning:
    /// [`Layer::Fc7`]'s 4096 values an image), on the model's device.
    pub fn features(&self, batch: &Tensor, layer: Layer) -> anyhow::Result<Tensor> {
        if layer == Layer::Logits {
            return self.forward(batch, Mode::Eval);
        }
        let name = layer.name();
        self.check_input(batch)?;
        let mut trace = Some(Trace { steps: Vec::new(), keep: Some(name), since: Instant::now() });
        self.run(batch, Mode::Eval, &mut trace)?;
        let step = trace.into_iter().flat_map(|t| t.steps).find(|s| s.name == name);
        step.map(|s| s.output).ok_or_else(|| anyhow::anyhow!("the {} preset has no layer {name}", self.preset.name()))
    }

    /// Logits `[N, classes]` of an `[N, 3, H, W]` f32 batch.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> anyhow::Result<Tensor> {
        self.check_input(x)?;
        Ok(self.run(x, mode, &mut None)?)
    }

    /// Like [`AlexNet::forward`], also returning every layer's output.
    pub fn forward_traced(&self, x: &Tensor, mode: Mode) -> anyhow::Result<(Tensor, Vec<Step>)> {
        self.check_input(x)?;
        let mut trace = Some(Trace { steps: Vec::new(), keep: None, since: Instant::now() });
        let logits = self.run(x, mode, &mut trace)?;
        Ok((logits, trace.map(|t| t.steps).unwrap_or_default()))
    }

    fn run(&self, x: &Tensor, mode: Mode, trace: &mut Option<Trace>) -> CandleResult<Tensor> {
        match &self.net {
            Net::Towers(net) => net.forward(x, mode, trace),
            Net::Single(net) => net.forward(x, mode, trace),
            Net::Small(net) => net.forward(x, trace),
        }
    }

    /// Freezes the weights for inference: each layer makes its weights ready for the kernels
    /// on their first use and keeps them (as ONNX Runtime does when it loads a model), where
    /// otherwise the packed forms wait for a second pass with the same weights ([`Prepared`]):
    /// the fully-connected layers then read a copy of their weights in strips of rows
    /// ([`crate::ops::linear_prepared`]: torchvision's pass 5-10% faster at batch 1-31, level
    /// from 32, for 231 MB more memory and 25-35 ms more in its first pass). For models that only
    /// infer; an optimiser step still makes every form again.
    pub fn freeze(&mut self) {
        self.states().iter().for_each(|state| state.freeze());
    }

    /// Says that the weights were written other than by [`crate::optim::Sgd`] (`Var::set` on a
    /// part from [`AlexNet::parameters`]): every layer makes its kernels' forms again.
    pub fn weights_changed(&self) {
        self.states().iter().for_each(|state| state.weights_changed());
    }

    /// Every layer's state.
    fn states(&self) -> Vec<Arc<Prepared>> {
        let mut states: Vec<Arc<Prepared>> = self.parameters().into_iter().flat_map(|p| p.states).collect();
        states.sort_by_key(Arc::as_ptr);
        states.dedup_by_key(|state| Arc::as_ptr(state));
        states
    }

    /// The LRN of the two-tower presets (after conv1 and conv2) and where its windows look;
    /// None for the nets without LRN. What an exporter needs to write the same normalisation.
    pub fn lrn(&self) -> Option<(Lrn, LrnScope)> {
        match &self.net {
            Net::Towers(net) => Some((net.lrn, net.lrn_scope)),
            Net::Single(_) | Net::Small(_) => None,
        }
    }

    /// Every parameter in the source's order and layout.
    pub fn parameters(&self) -> Vec<Param> {
        match &self.net {
            Net::Towers(net) => net.parameters(),
            Net::Single(net) => net.parameters(),
            Net::Small(net) => net.parameters(),
        }
    }

    /// Every parameter's values, whole (tower halves joined), on the CPU, in the source's names.
    pub fn state_dict(&self) -> CandleResult<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for p in self.parameters() {
            let t = p.gather(|v| Some(v.as_tensor().clone()))?.expect("a parameter always has values");
            out.push((p.key, t));
        }
        Ok(out)
    }

    /// The device the logits come out on.
    pub fn device(&self) -> &Device {
        match &self.net {
            Net::Towers(net) => &net.towers[0].device,
            Net::Single(net) => &net.0.device,
            Net::Small(net) => &net.device,
        }
    }

    /// A clear error for input the net cannot take.
    pub fn check_input(&self, x: &Tensor) -> anyhow::Result<()> {
        let preset = self.preset.name();
        let dims = x.dims();
        let &[n, c, h, w] = dims else {
            anyhow::bail!("the {preset} preset takes a [N, 3, H, W] batch, got a tensor of shape {dims:?}")
        };
        if n == 0 {
            anyhow::bail!("the batch is empty (shape {dims:?}): nothing to run the {preset} preset on")
        }
        if c != 3 {
            anyhow::bail!("the {preset} preset takes 3-channel images, got {c} channels (shape {dims:?})")
        }
        if x.dtype() != DType::F32 {
            anyhow::bail!("the {preset} preset takes f32 input, got {:?}", x.dtype())
        }
        let side = self.preset.input_size();
        match self.net {
            Net::Single(_) if h < 63 || w < 63 => {
                anyhow::bail!("the {preset} preset needs images of at least 63x63, got {h}x{w}")
            }
            Net::Towers(_) | Net::Small(_) if (h, w) != (side, side) => {
                anyhow::bail!(
                    "the {preset} preset takes {side}x{side} images (its fc layers are sized for them), got {h}x{w}"
                )
            }
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layers

struct Conv {
    weight: Var,
    bias: Var,
    stride: usize,
    padding: usize,
    /// The weights made ready for the kernels, for their current version.
    prepared: Arc<Prepared>,
}

impl Conv {
    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        self.apply(x, false)
    }

    /// `relu(conv(x))` in one pass.
    fn forward_relu(&self, x: &Tensor) -> CandleResult<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, relu: bool) -> CandleResult<Tensor> {
        let (w, b, s, p) = (&self.weight, &self.bias, self.stride, self.padding);
        conv2d_prepared(x, w, b, s, p, relu, &self.prepared)
    }
}

struct Linear {
    weight: Var,
    bias: Var,
    /// The weights made ready for the kernels, for their current version.
    prepared: Arc<Prepared>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> CandleResult<Tensor> {
        self.apply(x, false)
    }

    /// `relu(linear(x))` in one pass.
    fn forward_relu(&self, x: &Tensor) -> CandleResult<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, relu: bool) -> CandleResult<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        linear_prepared(x, w, b, relu, &self.prepared)
    }
}

/// A layer with parameters: its weight and bias, its state, and its cost.
trait Parametric {
    fn vars(&self) -> [&Var; 2];
    /// Its state ([`Prepared`]): what the optimiser tells when it writes the weights.
    fn state(&self) -> &Arc<Prepared>;
    /// Parameters and multiply-adds of the layer, given what it produced (`out`).
    fn cost(&self, out: &Tensor) -> (usize, u64) {
        let [w, b] = self.vars();
        let per_output: usize = w.dims()[1..].iter().product();
        (w.elem_count() + b.elem_count(), (out.elem_count() * per_output) as u64)
    }
}

impl Parametric for Conv {
    fn vars(&self) -> [&Var; 2] {
        [&self.weight, &self.bias]
    }
    fn state(&self) -> &Arc<Prepared> {
        &self.prepared
    }
}

impl Parametric for Linear {
    fn vars(&self) -> [&Var; 2] {
        [&self.weight, &self.bias]
    }
    fn state(&self) -> &Arc<Prepared> {
        &self.prepared
    }
}

/// Loads layer `prefix` (weight of `shape`) and splits it along the output axis into
/// `devices.len()` parts (equal, but for an odd count), one per tower, each on its tower's device.
fn split_layer(
    params: &mut Params,
    prefix: &str,
    shape: &[usize],
    devices: &[Device],
) -> anyhow::Result<Vec<(Var, Var)>> {
    let (weight, bias) = params.layer(prefix, shape)?;
    let mut parts = Vec::with_capacity(devices.len());
    let mut first = 0;
    for (i, device) in devices.iter().enumerate() {
        // an odd count (fc8 of 5 classes) gives the first tower the extra row
        let rows = shape[0] / devices.len() + usize::from(i < shape[0] % devices.len());
        let w = weight.narrow(0, first, rows)?.to_device(device)?.contiguous()?;
        let b = bias.narrow(0, first, rows)?.to_device(device)?.contiguous()?;
        // `copy` gives each part its own storage, so the whole-layer tensor can be freed.
        parts.push((Var::from_tensor(&w.copy()?)?, Var::from_tensor(&b.copy()?)?));
        first += rows;
    }
    Ok(parts)
}

fn conv_layer(
    params: &mut Params,
    prefix: &str,
    shape: [usize; 4],
    stride: usize,
    padding: usize,
    devices: &[Device],
) -> anyhow::Result<Vec<Conv>> {
    let parts = split_layer(params, prefix, &shape, devices)?;
    Ok(parts
        .into_iter()
        .map(|(weight, bias)| Conv { weight, bias, stride, padding, prepared: Arc::default() })
        .collect())
}

fn linear_layer(
    params: &mut Params,
    prefix: &str,
    shape: [usize; 2],
    devices: &[Device],
) -> anyhow::Result<Vec<Linear>> {
    let parts = split_layer(params, prefix, &shape, devices)?;
    Ok(parts.into_iter().map(|(weight, bias)| Linear { weight, bias, prepared: Arc::default() }).collect())
}

/// Inverted dropout with p = 0.5 (outputs doubled while training, untouched at test time,
/// equivalent to the paper's halving at test time). The mask comes from the training step's
/// seed and the `site` (which layer, which tower), so a step can be replayed exactly.
fn dropout(x: Tensor, mode: Mode, site: u64) -> CandleResult<Tensor> {
    let Mode::Train { seed } = mode else { return Ok(x) };
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ site.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.random::<bool>() { 2.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?.to_device(x.device())?;
    x * mask
}

/// Records a layer in `trace` (if tracing): its time so far, then its `output` (made only now,
/// so that joining the towers is not counted as the layer's time).
fn record(
    trace: &mut Option<Trace>,
    name: &'static str,
    sees: &'static str,
    output: impl FnOnce() -> CandleResult<Tensor>,
    cost: (usize, u64),
) -> CandleResult<()> {
    if let Some(trace) = trace.as_mut().filter(|t| t.keep.is_none_or(|keep| keep == name)) {
        let seconds = trace.since.elapsed().as_secs_f64();
        trace.steps.push(Step { name, sees, output: output()?, params: cost.0, macs: cost.1, seconds });
        trace.since = Instant::now();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// paper / caffe: two towers

/// One tower: its half of every layer, on its own device.
struct Tower {
    device: Device,
    conv1: Conv,
    conv2: Conv,
    conv3: Conv,
    conv4: Conv,
    conv5: Conv,
    fc6: Linear,
    fc7: Linear,
    fc8: Linear,
}

struct TwoTowers {
    towers: [Tower; 2],
    lrn: Lrn,
    lrn_scope: LrnScope,
    /// The state of both towers' conv1 run as one layer ([`TwoTowers::conv1`]).
    conv1_prepared: Arc<Prepared>,
}

const LAYER_NAMES: [&str; 8] = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"];

impl TwoTowers {
    fn new(
        params: &mut Params,
        placement: &Placement,
        g: &TowerGeometry,
        input: usize,
        classes: usize,
        lrn: Lrn,
    ) -> anyhow::Result<Self> {
        let d = &placement.towers;
        let [c1, c2, c3, c4, c5] = g.convs.map(|(out, ..)| out);
        let conv = |p: &mut Params, i: usize, name, inputs| {
            let (out, k, stride, pad) = g.convs[i];
            conv_layer(p, name, [out, inputs, k, k], stride, pad, d).map(Vec::into_iter)
        };
        // Caffe's names and grouped shapes; each layer's output axis is split between towers.
        let mut conv1 = conv(params, 0, "conv1", 3)?; // each tower sees the whole image
        let mut conv2 = conv(params, 1, "conv2", c1 / 2)?; // own tower
        let mut conv3 = conv(params, 2, "conv3", c2)?; // both towers
        let mut conv4 = conv(params, 3, "conv4", c3 / 2)?;
        let mut conv5 = conv(params, 4, "conv5", c4 / 2)?;
        let mut fc6 = linear_layer(params, "fc6", [g.fc, c5 * g.pool5_side(input).pow(2)], d)?.into_iter();
        let mut fc7 = linear_layer(params, "fc7", [g.fc, g.fc], d)?.into_iter();
        let mut fc8 = linear_layer(params, "fc8", [classes, g.fc], d)?.into_iter();
        let mut tower = |device: &Device| -> Option<Tower> {
            Some(Tower {
                device: device.clone(),
                conv1: conv1.next()?,
                conv2: conv2.next()?,
                conv3: conv3.next()?,
                conv4: conv4.next()?,
                conv5: conv5.next()?,
                fc6: fc6.next()?,
                fc7: fc7.next()?,
                fc8: fc8.next()?,
            })
        };
        let (a, b) = (tower(&d[0]), tower(&d[1]));
        let towers = [a.expect("two parts per layer"), b.expect("two parts per layer")];
        Ok(TwoTowers { towers, lrn, lrn_scope: placement.lrn_scope, conv1_prepared: Arc::default() })
    }

    fn forward(&self, x: &Tensor, mode: Mode, trace: &mut Option<Trace>) -> CandleResult<Tensor> {
        // conv1: each tower's kernels see the whole image.
        let h = self.conv1(x, mode)?;
        self.record(trace, "conv1", "image", &h, |t| &t.conv1)?;
        let h = self.norm_pool(&h, mode, trace, ["norm1", "pool1"])?;

        let h = self.each(&h, |t, x| t.conv2.forward_relu(x))?;
        self.record(trace, "conv2", "own tower", &h, |t| &t.conv2)?;
        let h = self.norm_pool(&h, mode, trace, ["norm2", "pool2"])?;

        let h = self.exchange(&h)?; // cross-talk: conv3 sees both towers
        let h = self.each(&h, |t, x| t.conv3.forward_relu(x))?;
        self.record(trace, "conv3", "both towers", &h, |t| &t.conv3)?;
        let h = self.each(&h, |t, x| t.conv4.forward_relu(x))?;
        self.record(trace, "conv4", "own tower", &h, |t| &t.conv4)?;
        let h = self.each(&h, |t, x| t.conv5.forward_relu(x))?;
        self.record(trace, "conv5", "own tower", &h, |t| &t.conv5)?;
        let h = self.each(&h, |_, x| max_pool2d(x, 3, 2)?.flatten_from(1))?;
        self.record_plain(trace, "pool5", &h)?;

        // fc6 sees both towers' maps, flattened in Caffe's (channel, row, column) order.
        let h = self.exchange(&h)?;
        let [ha, hb] = self.each(&h, |t, x| t.fc6.forward_relu(x))?;
        let h = [dropout(ha, mode, 60)?, dropout(hb, mode, 61)?];
        self.record(trace, "fc6", "both towers", &h, |t| &t.fc6)?;
        let h = self.exchange(&h)?;
        let [ha, hb] = self.each(&h, |t, x| t.fc7.forward_relu(x))?;
        let h = [dropout(ha, mode, 70)?, dropout(hb, mode, 71)?];
        self.record(trace, "fc7", "both towers", &h, |t| &t.fc7)?;
        let h = self.exchange(&h)?;
        let h = self.each(&h, |t, x| t.fc8.forward(x))?;
        self.record(trace, "fc8", "both towers", &h, |t| &t.fc8)?;
        self.join(&h)
    }

    /// conv1 of both towers. For inference on one device as one convolution with both towers'
    /// kernels (the image's columns built once, not once per tower; paper at batch 64: 167 ->
    /// 106 ms), split after; the outputs are the same either way. Not while training: there
    /// Candle's backward of the split pads each tower's gradient with zeros to the whole layer,
    /// which costs more than the second im2col saves (measured 22.0 -> 20.7 images/s).
    fn conv1(&self, x: &Tensor, mode: Mode) -> CandleResult<[Tensor; 2]> {
        let [a, b] = &self.towers;
        if mode != Mode::Eval || !a.device.same_device(&b.device) {
            return self.each(&[x.to_device(&a.device)?, x.to_device(&b.device)?], |t, x| t.conv1.forward_relu(x));
        }
        let (ca, cb) = (&a.conv1, &b.conv1);
        let weight = Tensor::cat(&[ca.weight.as_tensor(), cb.weight.as_tensor()], 0)?;
        let bias = Tensor::cat(&[ca.bias.as_tensor(), cb.bias.as_tensor()], 0)?;
        let x = x.to_device(&a.device)?;
        let y = conv2d_prepared(&x, &weight, &bias, ca.stride, ca.padding, true, &self.conv1_prepared)?;
        let split = ca.weight.dim(0)?;
        Ok([y.narrow(1, 0, split)?, y.narrow(1, split, cb.weight.dim(0)?)?])
    }

    /// Applies `f` to each tower's half. On the CPU the two towers run side by side, as on the
    /// paper's two GPUs, each op spreading over the cores the other leaves idle (measured,
    /// paper preset on 2 cores: 38 -> 53 images/s at batch 1, 72 -> 85 at 16, the same at 64;
    /// a training step at batch 32 21 -> 23).
    fn each(
        &self,
        h: &[Tensor; 2],
        f: impl Fn(&Tower, &Tensor) -> CandleResult<Tensor> + Sync,
    ) -> CandleResult<[Tensor; 2]> {
        let [a, b] = &self.towers;
        if a.device.is_cpu() && b.device.is_cpu() {
            let (ya, yb) = rayon::join(|| f(a, &h[0]), || f(b, &h[1]));
            return Ok([ya?, yb?]);
        }
        Ok([f(a, &h[0])?, f(b, &h[1])?])
    }

    /// Both towers' outputs concatenated along axis 1, on tower A's device.
    fn join(&self, h: &[Tensor; 2]) -> CandleResult<Tensor> {
        Tensor::cat(&[h[0].clone(), h[1].to_device(&self.towers[0].device)?], 1)
    }

    /// The cross-tower link: each tower receives the other's half and sees the whole layer.
    fn exchange(&self, h: &[Tensor; 2]) -> CandleResult<[Tensor; 2]> {
        let whole = self.join(h)?;
        let on_b = whole.to_device(&self.towers[1].device)?; // free when on one device
        Ok([whole, on_b])
    }

    /// LRN, then max-pooling, of both towers, recorded under `names`. With `LrnScope::Layer` and
    /// both towers on one device, each runs once over the whole layer: the same numbers (the
    /// windows are the same, and pooling is per channel), without the copies of the per-tower
    /// path (each tower's borrowed boundary channels joined on, its output narrowed off and made
    /// contiguous again for pooling: paper at batch 64, norm1 + pool1 + norm2 + pool2 135 -> 75 ms).
    /// For inference the two are one op that never writes the normalised layer out (paper at
    /// batch 64, alternated: 102-115 -> 104-118 images/s); training keeps it for the backward,
    /// and tracing records it.
    fn norm_pool(
        &self,
        h: &[Tensor; 2],
        mode: Mode,
        trace: &mut Option<Trace>,
        names: [&'static str; 2],
    ) -> CandleResult<[Tensor; 2]> {
        let [a, b] = &self.towers;
        if self.lrn_scope == LrnScope::Layer && a.device.same_device(&b.device) {
            let whole = self.join(h)?;
            let pooled = if mode == Mode::Eval && trace.is_none() {
                lrn_max_pool2d(&whole, self.lrn, 3, 2)?
            } else {
                let normed = lrn(&whole, self.lrn)?;
                record(trace, names[0], "whole layer", || Ok(normed.clone()), (0, 0))?;
                let pooled = max_pool2d(&normed, 3, 2)?;
                record(trace, names[1], "own tower", || Ok(pooled.clone()), (0, 0))?;
                pooled
            };
            let split = h[0].dim(1)?;
            return Ok([pooled.narrow(1, 0, split)?, pooled.narrow(1, split, h[1].dim(1)?)?]);
        }
        let h = self.norm(h)?;
        self.record_plain(trace, names[0], &h)?;
        let h = self.each(&h, |_, x| max_pool2d(x, 3, 2))?;
        self.record_plain(trace, names[1], &h)?;
        Ok(h)
    }

    /// LRN over each tower. With `LrnScope::Layer` a window near the tower boundary reaches
    /// into the other tower, so each tower borrows the few boundary channels it needs.
    fn norm(&self, h: &[Tensor; 2]) -> CandleResult<[Tensor; 2]> {
        if self.lrn_scope == LrnScope::Tower {
            return self.each(h, |_, x| lrn(x, self.lrn));
        }
        let (below, above) = self.lrn.reach();
        let (ca, cb) = (h[0].dim(1)?, h[1].dim(1)?);
        let [a, b] = &self.towers;
        let a_plus = Tensor::cat(&[h[0].clone(), h[1].narrow(1, 0, above)?.to_device(&a.device)?], 1)?;
        let b_plus = Tensor::cat(&[h[0].narrow(1, ca - below, below)?.to_device(&b.device)?, h[1].clone()], 1)?;
        Ok([lrn(&a_plus, self.lrn)?.narrow(1, 0, ca)?, lrn(&b_plus, self.lrn)?.narrow(1, below, cb)?])
    }

    fn record(
        &self,
        trace: &mut Option<Trace>,
        name: &'static str,
        sees: &'static str,
        h: &[Tensor; 2],
        layer: impl Fn(&Tower) -> &dyn Parametric,
    ) -> CandleResult<()> {
        if trace.is_some() {
            let (pa, ma) = layer(&self.towers[0]).cost(&h[0]);
            let (pb, mb) = layer(&self.towers[1]).cost(&h[1]);
            record(trace, name, sees, || self.join(h), (pa + pb, ma + mb))?;
        }
        Ok(())
    }

    fn record_plain(&self, trace: &mut Option<Trace>, name: &'static str, h: &[Tensor; 2]) -> CandleResult<()> {
        if trace.is_some() {
            let sees = match (name, self.lrn_scope) {
                ("norm1" | "norm2", LrnScope::Layer) => "whole layer",
                _ => "own tower",
            };
            record(trace, name, sees, || self.join(h), (0, 0))?;
        }
        Ok(())
    }

    fn parameters(&self) -> Vec<Param> {
        let [a, b] = &self.towers;
        let (la, lb) = (a.layers(), b.layers());
        let mut params = Vec::new();
        for (i, name) in LAYER_NAMES.iter().enumerate() {
            let ([wa, ba], [wb, bb]) = (la[i].vars(), lb[i].vars());
            let mut states = vec![la[i].state().clone(), lb[i].state().clone()];
            if i == 0 {
                states.push(self.conv1_prepared.clone()); // both towers' conv1 as one layer
            }
            params.push(Param { key: format!("{name}.weight"), parts: vec![wa.clone(), wb.clone()], states });
            params.push(Param { key: format!("{name}.bias"), parts: vec![ba.clone(), bb.clone()], states: vec![] });
        }
        params
    }
}

impl Tower {
    fn layers(&self) -> [&dyn Parametric; 8] {
        [&self.conv1, &self.conv2, &self.conv3, &self.conv4, &self.conv5, &self.fc6, &self.fc7, &self.fc8]
    }
}

// ---------------------------------------------------------------------------------------------
// torchvision: one tower

/// `torchvision.models.alexnet`, with its module names as weight keys: one tower holding
/// all of every layer.
struct Torchvision(Tower);

const TORCHVISION_KEYS: [&str; 8] = [
    "features.0",
    "features.3",
    "features.6",
    "features.8",
    "features.10",
    "classifier.1",
    "classifier.4",
    "classifier.6",
];

impl Torchvision {
    fn new(params: &mut Params, device: &Device, classes: usize) -> anyhow::Result<Self> {
        let d = std::slice::from_ref(device);
        let one_conv = |p: &mut Params, key, shape, stride, pad| -> anyhow::Result<Conv> {
            Ok(conv_layer(p, key, shape, stride, pad, d)?.remove(0))
        };
        let one_linear =
            |p: &mut Params, key, shape| -> anyhow::Result<Linear> { Ok(linear_layer(p, key, shape, d)?.remove(0)) };
        Ok(Torchvision(Tower {
            device: device.clone(),
            conv1: one_conv(params, "features.0", [64, 3, 11, 11], 4, 2)?,
            conv2: one_conv(params, "features.3", [192, 64, 5, 5], 1, 2)?,
            conv3: one_conv(params, "features.6", [384, 192, 3, 3], 1, 1)?,
            conv4: one_conv(params, "features.8", [256, 384, 3, 3], 1, 1)?,
            conv5: one_conv(params, "features.10", [256, 256, 3, 3], 1, 1)?,
            fc6: one_linear(params, "classifier.1", [4096, 9216])?,
            fc7: one_linear(params, "classifier.4", [4096, 4096])?,
            fc8: one_linear(params, "classifier.6", [classes, 4096])?,
        }))
    }

    fn forward(&self, x: &Tensor, mode: Mode, trace: &mut Option<Trace>) -> CandleResult<Tensor> {
        let t = &self.0;
        let x = x.to_device(&t.device)?;
        let h = t.conv1.forward_relu(&x)?;
        record(trace, "conv1", "-", || Ok(h.clone()), t.conv1.cost(&h))?;
        let h = max_pool2d(&h, 3, 2)?;
        record(trace, "pool1", "-", || Ok(h.clone()), (0, 0))?;
        let h = t.conv2.forward_relu(&h)?;
        record(trace, "conv2", "-", || Ok(h.clone()), t.conv2.cost(&h))?;
        let h = max_pool2d(&h, 3, 2)?;
        record(trace, "pool2", "-", || Ok(h.clone()), (0, 0))?;
        let h = t.conv3.forward_relu(&h)?;
        record(trace, "conv3", "-", || Ok(h.clone()), t.conv3.cost(&h))?;
        let h = t.conv4.forward_relu(&h)?;
        record(trace, "conv4", "-", || Ok(h.clone()), t.conv4.cost(&h))?;
        let h = t.conv5.forward_relu(&h)?;
        record(trace, "conv5", "-", || Ok(h.clone()), t.conv5.cost(&h))?;
        let h = max_pool2d(&h, 3, 2)?;
        record(trace, "pool5", "-", || Ok(h.clone()), (0, 0))?;
        let h = adaptive_avg_pool2d(&h, (6, 6))?.flatten_from(1)?;
        record(trace, "avgpool", "-", || Ok(h.clone()), (0, 0))?;
        let h = t.fc6.forward_relu(&dropout(h, mode, 60)?)?;
        record(trace, "fc6", "-", || Ok(h.clone()), t.fc6.cost(&h))?;
        let h = t.fc7.forward_relu(&dropout(h, mode, 70)?)?;
        record(trace, "fc7", "-", || Ok(h.clone()), t.fc7.cost(&h))?;
        let h = t.fc8.forward(&h)?;
        record(trace, "fc8", "-", || Ok(h.clone()), t.fc8.cost(&h))?;
        Ok(h)
    }

    fn parameters(&self) -> Vec<Param> {
        let named: Vec<(&str, &dyn Parametric)> = TORCHVISION_KEYS.iter().copied().zip(self.0.layers()).collect();
        single_tower_parameters(&named)
    }
}

// ---------------------------------------------------------------------------------------------
// fig1-relu / fig1-tanh: the paper's Figure 1 net

/// "A four-layer convolutional neural network" (Figure 1): three 5x5 convolutions (32, 32, 64
/// maps, each followed by its nonlinearity and a 3/2 max-pool) and one fully-connected layer,
/// the layout of cuda-convnet's CIFAR-10 nets. No LRN, no dropout: "no regularization of any kind".
struct SmallNet {
    device: Device,
    tanh: bool,
    conv1: Conv,
    conv2: Conv,
    conv3: Conv,
    fc: Linear,
}

impl SmallNet {
    fn new(params: &mut Params, device: &Device, classes: usize, tanh: bool) -> anyhow::Result<Self> {
        let d = std::slice::from_ref(device);
        let conv = |p: &mut Params, key, inputs, out| -> anyhow::Result<Conv> {
            Ok(conv_layer(p, key, [out, inputs, 5, 5], 1, 2, d)?.remove(0))
        };
        Ok(SmallNet {
            device: device.clone(),
            tanh,
            conv1: conv(params, "conv1", 3, 32)?,
            conv2: conv(params, "conv2", 32, 32)?,
            conv3: conv(params, "conv3", 32, 64)?,
            fc: linear_layer(params, "fc", [classes, 64 * 3 * 3], d)?.remove(0),
        })
    }

    fn forward(&self, x: &Tensor, trace: &mut Option<Trace>) -> CandleResult<Tensor> {
        let act = |conv: &Conv, h: &Tensor| {
            if self.tanh {
                crate::ops::tanh(&conv.forward(h)?)
            } else {
                conv.forward_relu(h)
            }
        };
        let mut h = x.to_device(&self.device)?;
        for (conv, name, pool) in
            [(&self.conv1, "conv1", "pool1"), (&self.conv2, "conv2", "pool2"), (&self.conv3, "conv3", "pool3")]
        {
            h = act(conv, &h)?;
            record(trace, name, "-", || Ok(h.clone()), conv.cost(&h))?;
            h = max_pool2d(&h, 3, 2)?;
            record(trace, pool, "-", || Ok(h.clone()), (0, 0))?;
        }
        let h = self.fc.forward(&h.flatten_from(1)?)?;
        record(trace, "fc", "-", || Ok(h.clone()), self.fc.cost(&h))?;
        Ok(h)
    }

    fn parameters(&self) -> Vec<Param> {
        let layers: [(&str, &dyn Parametric); 4] =
            [("conv1", &self.conv1), ("conv2", &self.conv2), ("conv3", &self.conv3), ("fc", &self.fc)];
        single_tower_parameters(&layers)
    }
}

/// Parameters of a single-tower net, `(key prefix, layer)` in order.
fn single_tower_parameters(layers: &[(&str, &dyn Parametric)]) -> Vec<Param> {
    let mut params = Vec::new();
    for (key, layer) in layers {
        let [w, b] = layer.vars();
        params.push(Param {
            key: format!("{key}.weight"),
            parts: vec![w.clone()],
            states: vec![layer.state().clone()],
        });
        params.push(Param { key: format!("{key}.bias"), parts: vec![b.clone()], states: vec![] });
    }
    params
}
