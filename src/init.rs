//! Where a fresh network's parameters come from: the paper's, Caffe's and torchvision's
//! initialisations (seeded, reproducible), and the reference pattern the parity fixtures use.
//!
//! Every tensor draws from its own generator, seeded from the run's seed and the tensor's key,
//! so a tensor's values do not depend on the order in which layers are built or on the tower
//! layout.

use candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::preset::{caffe_layer_name, InitScheme, Preset};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Krizhevsky et al.: weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.
    Paper { seed: u64 },
    /// Caffe's `bvlc_alexnet` solver: weights N(0, 0.01) (fc6, fc7: 0.005);
    /// biases 0.1 in conv2, conv4, conv5, fc6, fc7, else 0.
    Caffe { seed: u64 },
    /// PyTorch's default for `Conv2d`/`Linear` (what torchvision's AlexNet uses): weights and
    /// biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    Torchvision { seed: u64 },
    /// The fixture pattern shared with `scripts/reference_pattern.py`: see [`reference_pattern`].
    Reference { seed: u64 },
    /// All zeros (for shape-only work such as `summary`).
    Zeros,
}

impl std::fmt::Display for Init {
    /// What `init` and `train` print: the scheme in words.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Init::Paper { seed } => write!(f, "the paper's initialisation, seed {seed}"),
            Init::Caffe { seed } => write!(f, "Caffe's bvlc_alexnet initialisation, seed {seed}"),
            Init::Torchvision { seed } => write!(f, "PyTorch's default initialisation, seed {seed}"),
            Init::Reference { seed } => write!(f, "the parity tests' reference pattern, seed {seed}"),
            Init::Zeros => write!(f, "zeros"),
        }
    }
}

impl Init {
    /// The preset's own initialisation ([`crate::preset::PresetFacts::init`]): the paper's for
    /// `paper`, Caffe's solver's for `caffe`, PyTorch's defaults for `torchvision` and the
    /// CIFAR-10 nets.
    pub fn default_for(preset: Preset, seed: u64) -> Self {
        match preset.facts().init {
            InitScheme::Paper => Init::Paper { seed },
            InitScheme::Caffe => Init::Caffe { seed },
            InitScheme::Torchvision => Init::Torchvision { seed },
        }
    }

    /// Weight and bias of the conv or linear layer `prefix` (e.g. `conv2` or `features.3`),
    /// whose weight has `weight_shape` (`[out, in/groups, kh, kw]` or `[out, in]`).
    pub fn layer(&self, prefix: &str, weight_shape: &[usize]) -> Result<(Tensor, Tensor)> {
        let out = weight_shape[0];
        let fan_in: usize = weight_shape[1..].iter().product();
        let (wkey, bkey) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        let layer = caffe_layer_name(prefix);
        let bias_one = ["conv2", "conv4", "conv5", "fc6", "fc7"].contains(&layer);
        let (weight, bias) = match *self {
            Init::Zeros => (vec![0f32; out * fan_in], vec![0f32; out]),
            Init::Reference { seed } => (
                reference_pattern(&wkey, seed, out * fan_in, (6.0 / fan_in as f64).sqrt() as f32),
                reference_pattern(&bkey, seed, out, 0.1),
            ),
            Init::Paper { seed } => {
                (normal(&wkey, seed, out * fan_in, 0.01), vec![if bias_one { 1.0 } else { 0.0 }; out])
            }
            Init::Caffe { seed } => {
                let std = if ["fc6", "fc7"].contains(&layer) { 0.005 } else { 0.01 };
                (normal(&wkey, seed, out * fan_in, std), vec![if bias_one { 0.1 } else { 0.0 }; out])
            }
            Init::Torchvision { seed } => {
                // kaiming_uniform_(a=sqrt(5)) and PyTorch's bias rule both give 1/sqrt(fan_in).
                let bound = 1.0 / (fan_in as f32).sqrt();
                (uniform(&wkey, seed, out * fan_in, bound), uniform(&bkey, seed, out, bound))
            }
        };
        Ok((Tensor::from_vec(weight, weight_shape, &Device::Cpu)?, Tensor::from_vec(bias, out, &Device::Cpu)?))
    }
}

fn rng(key: &str, seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ fnv1a64(key))
}

fn uniform(key: &str, seed: u64, numel: usize, bound: f32) -> Vec<f32> {
    let dist = Uniform::new(-bound, bound).expect("bound > 0");
    let mut rng = rng(key, seed);
    (0..numel).map(|_| dist.sample(&mut rng)).collect()
}

fn normal(key: &str, seed: u64, numel: usize, std: f32) -> Vec<f32> {
    let dist = Normal::new(0.0, std).expect("std > 0");
    let mut rng = rng(key, seed);
    (0..numel).map(|_| dist.sample(&mut rng)).collect()
}

/// 64-bit FNV-1a hash of a tensor key (the per-tensor part of every seed).
pub fn fnv1a64(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The reference pattern, defined identically in `scripts/reference_pattern.py`, so that
/// full-size weights and inputs for parity tests never need to be committed.
///
/// Element `i` of tensor `key` is `(m - 2^23) * bound * 2^-23` in f32, where `m` is the top
/// 24 bits of `splitmix64(seed ^ fnv1a64(key), i)`: uniform in `[-bound, bound)`, and every
/// step is exact or a single IEEE rounding, so Python and Rust agree bit for bit.
pub fn reference_pattern(key: &str, seed: u64, numel: usize, bound: f32) -> Vec<f32> {
    let base = seed ^ fnv1a64(key);
    (0..numel as u64)
        .map(|i| {
            let mut z = base.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let m = (z >> 40) as i64 - (1 << 23);
            (m as f32) * bound * (1.0 / 8_388_608.0)
        })
        .collect()
}
