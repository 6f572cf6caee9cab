//! What each preset is, in one table ([`PRESETS`]): its name, classes, input, weight names,
//! preprocessing, initialisation, training recipe and which net it builds. Every other module
//! reads a preset's facts from here ([`Preset::facts`]) instead of matching on the preset.
//!
//! A leaf module: besides the LRN constants of [`crate::ops`] it depends on nothing of the
//! crate, so that `model`, `init`, `weights`, `data` and `train` can all read the table without
//! importing each other. The vocabulary the table is written in lives here too ([`Naming`],
//! [`TransformKind`], [`InitScheme`], [`Recipe`], [`NetKind`], [`TowerGeometry`]); the modules
//! that act on it re-export it where it was before.

use serde::Serialize;

use crate::ops::Lrn;

/// Which AlexNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Two towers, the paper's LRN (k=2, alpha=1e-4 on the sum), 227x227 input.
    Paper,
    /// Two towers, Caffe's LRN (k=1, alpha=1e-4/n): runs `bvlc_alexnet` weights. 227x227 input.
    Caffe,
    /// torchvision's single-tower net (`alexnet-owt-7be5be79.pth`), any input >= 63x63.
    Torchvision,
    /// The paper's two towers scaled to CIFAR-10 (28x28 crops), the paper's LRN.
    CifarTowers,
    /// The four-layer net of the paper's Figure 1 (three 5x5 convs, one fc), ReLU, 32x32.
    Fig1Relu,
    /// The same with tanh units.
    Fig1Tanh,
}

/// Everything the crate knows about one preset, as plain data: one row of [`PRESETS`].
#[derive(Debug)]
pub struct PresetFacts {
    /// The preset this row is about (rows are in the enum's order, checked at compile time).
    pub preset: Preset,
    /// Its name on the command line, in metadata and in messages (the same as clap's and
    /// serde's, a test checks).
    pub name: &'static str,
    /// The number of classes of its usual data set.
    pub default_classes: usize,
    /// The input side it was trained at.
    pub input_size: usize,
    /// The side of the image its crops are taken from: the ImageNet nets' 256, CIFAR-10's 32.
    pub base_side: u32,
    /// The naming scheme of its weight keys.
    pub naming: Naming,
    /// The key of the last layer's weight, whose rows are the classes.
    pub classifier_weight: &'static str,
    /// Which net it builds.
    pub net: NetKind,
    /// The preprocessing its published weights were trained with (for the CIFAR-10 nets, which
    /// have none published, the paper's on 32x32 images).
    pub transform: TransformKind,
    /// Its own initialisation scheme (the paper's, Caffe's solver's, PyTorch's defaults).
    pub init: InitScheme,
    /// The training recipe a run from scratch takes unless told.
    pub recipe: Recipe,
    /// What (pixel - mean) is multiplied by, in training and in the paper's and Caffe's
    /// preprocessing (a CIFAR-10 net's file without a recorded pipeline takes it too): the
    /// paper's 0..255 range for its nets; about torchvision's normalisation elsewhere (whose own
    /// preprocessing divides by its std instead).
    pub train_input_scale: f32,
}

impl PresetFacts {
    /// Whether its input channels are in BGR order: Caffe's weights, and a net of Caffe's
    /// preset trained here.
    pub fn bgr(&self) -> bool {
        self.transform == TransformKind::Caffe
    }
}

/// The table: one row per preset, in the enum's order.
pub const PRESETS: [PresetFacts; 6] = [
    PresetFacts {
        preset: Preset::Paper,
        name: "paper",
        default_classes: 1000,
        input_size: 227,
        base_side: 256,
        naming: Naming::Caffe,
        classifier_weight: "fc8.weight",
        net: NetKind::Towers { geometry: &PAPER_TOWERS, lrn: LrnConstants::Paper },
        transform: TransformKind::Paper,
        init: InitScheme::Paper,
        recipe: Recipe::Paper,
        train_input_scale: 1.0,
    },
    PresetFacts {
        preset: Preset::Caffe,
        name: "caffe",
        default_classes: 1000,
        input_size: 227,
        base_side: 256,
        naming: Naming::Caffe,
        classifier_weight: "fc8.weight",
        net: NetKind::Towers { geometry: &PAPER_TOWERS, lrn: LrnConstants::Caffe },
        transform: TransformKind::Caffe,
        init: InitScheme::Caffe,
        recipe: Recipe::Paper,
        train_input_scale: 1.0,
    },
    PresetFacts {
        preset: Preset::Torchvision,
        name: "torchvision",
        default_classes: 1000,
        input_size: 224,
        base_side: 256,
        naming: Naming::Torchvision,
        classifier_weight: "classifier.6.weight",
        net: NetKind::Torchvision,
        transform: TransformKind::Torchvision,
        init: InitScheme::Torchvision,
        recipe: Recipe::Paper,
        train_input_scale: 1.0 / 57.6,
    },
    PresetFacts {
        preset: Preset::CifarTowers,
        name: "cifar-towers",
        default_classes: 10,
        input_size: 28,
        base_side: 32,
        naming: Naming::Caffe,
        classifier_weight: "fc8.weight",
        net: NetKind::Towers { geometry: &CIFAR_TOWERS, lrn: LrnConstants::Paper },
        transform: TransformKind::Paper,
        init: InitScheme::Torchvision,
        recipe: Recipe::Paper,
        train_input_scale: 1.0 / 57.6,
    },
    PresetFacts {
        preset: Preset::Fig1Relu,
        name: "fig1-relu",
        default_classes: 10,
        input_size: 32,
        base_side: 32,
        naming: Naming::Caffe,
        classifier_weight: "fc.weight",
        net: NetKind::Figure1 { tanh: false },
        transform: TransformKind::Paper,
        init: InitScheme::Torchvision,
        recipe: Recipe::Fig1,
        train_input_scale: 1.0 / 57.6,
    },
    PresetFacts {
        preset: Preset::Fig1Tanh,
        name: "fig1-tanh",
        default_classes: 10,
        input_size: 32,
        base_side: 32,
        naming: Naming::Caffe,
        classifier_weight: "fc.weight",
        net: NetKind::Figure1 { tanh: true },
        transform: TransformKind::Paper,
        init: InitScheme::Torchvision,
        recipe: Recipe::Fig1,
        train_input_scale: 1.0 / 57.6,
    },
];

// Each row sits at its preset's index, so that `facts` is one lookup.
const _: () = {
    let mut i = 0;
    while i < PRESETS.len() {
        assert!(PRESETS[i].preset as usize == i, "PRESETS must list the presets in the enum's order");
        i += 1;
    }
};

impl Preset {
    /// The preset's row of [`PRESETS`].
    pub const fn facts(self) -> &'static PresetFacts {
        &PRESETS[self as usize]
    }

    /// The preset's name on the command line and in metadata.
    pub fn name(self) -> &'static str {
        self.facts().name
    }

    /// The number of classes of the preset's usual data set.
    pub fn default_classes(self) -> usize {
        self.facts().default_classes
    }

    /// The key of the last layer's weight, whose rows are the classes.
    pub fn classifier_weight(self) -> &'static str {
        self.facts().classifier_weight
    }

    /// The input side the preset was trained at.
    pub fn input_size(self) -> usize {
        self.facts().input_size
    }
}

/// Which net a preset builds (the constructors are in `model.rs`).
#[derive(Debug, Clone, Copy)]
pub enum NetKind {
    /// Two towers of `geometry`, normalised with the LRN constants `lrn`.
    Towers { geometry: &'static TowerGeometry, lrn: LrnConstants },
    /// torchvision's single tower.
    Torchvision,
    /// The paper's Figure 1 net, with tanh units where `tanh`, else ReLU.
    Figure1 { tanh: bool },
}

/// Which LRN constants a two-tower net uses (see [`Lrn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrnConstants {
    /// The paper's: [`Lrn::paper`].
    Paper,
    /// Caffe's `bvlc_alexnet`: [`Lrn::caffe`].
    Caffe,
}

impl LrnConstants {
    /// The constants themselves.
    pub fn lrn(self) -> Lrn {
        match self {
            LrnConstants::Paper => Lrn::paper(),
            LrnConstants::Caffe => Lrn::caffe(),
        }
    }
}

/// The sizes of a two-tower net: for conv1..conv5 the whole layer's (output channels, kernel,
/// stride, padding), and the width of fc6 and fc7 (the input side is its preset's).
#[derive(Debug)]
pub struct TowerGeometry {
    pub convs: [(usize, usize, usize, usize); 5],
    pub fc: usize,
}

/// The paper's net (figure 2).
pub const PAPER_TOWERS: TowerGeometry =
    TowerGeometry { convs: [(96, 11, 4, 0), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)], fc: 4096 };

/// The same structure for 28x28 crops of CIFAR-10: conv1 5x5 stride 1 (a 32x32 image has no
/// room for 11x11 stride 4), every width divided by 1.5 to 2 (64-128-192-192-128), fc 512;
/// the 3/2 pools give 28 -> 13 -> 6 -> 2, so fc6 sees 128x2x2.
pub const CIFAR_TOWERS: TowerGeometry =
    TowerGeometry { convs: [(64, 5, 1, 2), (128, 5, 1, 2), (192, 3, 1, 1), (192, 3, 1, 1), (128, 3, 1, 1)], fc: 512 };

impl TowerGeometry {
    /// conv1's whole weight, `[out, 3, k, k]`: what tells the two-tower presets' files apart.
    pub fn first_filter_shape(&self) -> [usize; 4] {
        let (out, k, _, _) = self.convs[0];
        [out, 3, k, k]
    }

    /// Side of pool5's output for an `input` x `input` image.
    pub(crate) fn pool5_side(&self, input: usize) -> usize {
        let pool = |x: usize| (x - 3) / 2 + 1;
        let (_, k, stride, pad) = self.convs[0];
        pool(pool(pool((input + 2 * pad - k) / stride + 1)))
    }
}

/// The two naming schemes weight files come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `features.0.weight` ... `classifier.6.bias`: the `torchvision` preset.
    Torchvision,
    /// `conv1.weight` ... `fc8.bias`, grouped layout: the `paper` and `caffe` presets.
    Caffe,
}

impl Naming {
    /// The naming of `preset`'s weight keys.
    pub fn of(preset: Preset) -> Self {
        preset.facts().naming
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

    /// The presets whose files use this naming, from the table (for error messages).
    pub(crate) fn presets(self) -> String {
        let names: Vec<&str> = PRESETS.iter().filter(|f| f.naming == self).map(|f| f.name).collect();
        format!("the {} preset{}", names.join(", "), if names.len() > 1 { "s" } else { "" })
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

/// Which preprocessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransformKind {
    Torchvision,
    Caffe,
    Paper,
}

impl TransformKind {
    /// The preprocessing of `preset`'s published weights.
    pub fn for_preset(preset: Preset) -> Self {
        preset.facts().transform
    }
}

/// A preset's own initialisation scheme, without its seed ([`crate::init::Init`] has the seeded
/// schemes and draws the values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitScheme {
    /// Krizhevsky et al.'s.
    Paper,
    /// Caffe's `bvlc_alexnet` solver's.
    Caffe,
    /// PyTorch's default for `Conv2d`/`Linear`.
    Torchvision,
}

/// Training recipes: the defaults of every training setting, in one table
/// ([`crate::train::TrainConfig::recipe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Recipe {
    /// Batch 128, SGD momentum 0.9, weight decay 5e-4 (not on biases) with the paper's update,
    /// lr 0.01 divided by 10 when validation error stops improving (at most 3 times), dropout,
    /// random crops, flips, PCA colour augmentation (alpha std 0.1), 90 epochs.
    Paper,
    /// bvlc_alexnet's solver: batch 256, lr 0.01 x0.1 every 20 epochs (100,000 iterations),
    /// momentum 0.9, weight decay 5e-4 (not on biases), crops and flips, 90 epochs.
    Caffe,
    /// torchvision's reference: batch 256, lr 0.01 x0.1 every 30 epochs, PyTorch's momentum
    /// rule, weight decay 1e-4 on everything, crops and flips, 90 epochs.
    Torchvision,
    /// The paper's Figure 1: "no regularization of any kind": no weight decay, no dropout,
    /// no augmentation, constant lr.
    Fig1,
    /// Fine-tuning pretrained weights (the default with --from): batch 64, lr 0.001 (a new
    /// last layer 10x), PyTorch's momentum rule, weight decay 5e-4 (not on biases), x0.1
    /// every 4 epochs, crops and flips, dropout, 10 epochs.
    Finetune,
}

impl Recipe {
    /// The recipe a run takes unless told: fine-tuning's for pretrained weights, else the
    /// preset's own (the paper's Figure 1 for its nets, else the paper's).
    pub fn default_for(preset: Preset, fine_tuning: bool) -> Self {
        if fine_tuning {
            Recipe::Finetune
        } else {
            preset.facts().recipe
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table's names are the ones clap reads on the command line and serde writes in
    /// checkpoints, and each row is its preset's.
    #[test]
    fn names_agree_with_clap_and_serde() {
        for &preset in <Preset as clap::ValueEnum>::value_variants() {
            let facts = preset.facts();
            assert_eq!(facts.preset, preset);
            let clap_name = clap::ValueEnum::to_possible_value(&preset).expect("not hidden");
            assert_eq!(clap_name.get_name(), facts.name);
            assert_eq!(serde_json::to_string(&preset).unwrap(), format!("\"{}\"", facts.name));
        }
        assert_eq!(<Preset as clap::ValueEnum>::value_variants().len(), PRESETS.len());
    }
}
