//! Training-time data: the base image (the paper's 256x256; CIFAR-10's own 32x32), the
//! training set's mean image and RGB principal components (`alexnet data-stats`), and the
//! paper's augmentation: random crops, horizontal flips and PCA colour shifts.
//!
//! Every random choice for an image comes from a generator seeded by (run seed, epoch,
//! position in the epoch), so the same seed gives the same batches and augmentations, and a
//! resumed run continues exactly.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use super::dataset::Sample;
use super::loader::{self, Batches, FrameShape};
use super::transform::{centre_square, centre_square_into, Chw, Mean, Transform, TransformKind};
use super::Scratch;
use crate::ops::{Augment, MeanValues, Normalise, View};

/// The image every crop is taken from (see [`centre_square`]); an image `alexnet prepare`
/// already made `side` x `side` is taken as it is.
pub fn base_image(sample: &Sample, side: u32) -> anyhow::Result<RgbImage> {
    let img = sample.decode()?;
    if img.dimensions() == (side, side) {
        return Ok(img); // not through `centre_square`, which would copy it
    }
    centre_square(&img, side).with_context(|| format!("image {}", sample.path.display()))
}

/// What `alexnet data-stats` computes over the training images' base images (0..255 RGB).
#[derive(Debug, Clone)]
pub struct Stats {
    pub side: usize,
    /// `[3, side, side]`, RGB.
    pub mean_image: Vec<f32>,
    /// Eigenvectors of the 3x3 RGB covariance as columns (`eigvecs[row][col]`), largest first.
    pub eigvecs: [[f64; 3]; 3],
    pub eigvals: [f64; 3],
}

pub const STATS_FILE: &str = "alexnet-stats.safetensors";

/// Pixel sums (`[3, side, side]`), sums of the RGB values and of their products, and the pixel
/// count: of one image, or added over many.
type ImageMoments = (Vec<f64>, [f64; 3], [[f64; 3]; 3], usize);

impl Stats {
    /// Mean image and RGB covariance eigen-decomposition over `samples` (in parallel).
    pub fn compute(samples: &[Sample], side: u32, progress: &indicatif::ProgressBar) -> anyhow::Result<Self> {
        let n_px = (side * side) as usize;
        // per image: sum of pixels (as [3, side, side]) and RGB first and second moments
        let partial = samples
            .par_iter()
            .map(|s| -> anyhow::Result<ImageMoments> {
                let img = base_image(s, side)?;
                let mut sum = vec![0f64; 3 * n_px];
                let (mut m1, mut m2) = ([0f64; 3], [[0f64; 3]; 3]);
                for (i, p) in img.pixels().enumerate() {
                    let v = [p[0] as f64, p[1] as f64, p[2] as f64];
                    for c in 0..3 {
                        sum[c * n_px + i] = v[c];
                        m1[c] += v[c];
                        for d in 0..3 {
                            m2[c][d] += v[c] * v[d];
                        }
                    }
                }
                progress.inc(1);
                Ok((sum, m1, m2, n_px))
            })
            .try_reduce(
                || (vec![0f64; 3 * n_px], [0f64; 3], [[0f64; 3]; 3], 0),
                |mut a, b| {
                    a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
                    for c in 0..3 {
                        a.1[c] += b.1[c];
                        for d in 0..3 {
                            a.2[c][d] += b.2[c][d];
                        }
                    }
                    a.3 += b.3;
                    Ok(a)
                },
            )?;
        let (sum, m1, m2, count) = partial;
        if count == 0 {
            bail!("no images to compute statistics from")
        }
        let images = samples.len() as f64;
        let mean_image = sum.iter().map(|v| (v / images) as f32).collect();
        let n = count as f64;
        let mut cov = [[0f64; 3]; 3];
        for c in 0..3 {
            for d in 0..3 {
                cov[c][d] = (m2[c][d] - m1[c] * m1[d] / n) / (n - 1.0);
            }
        }
        let (eigvals, eigvecs) = symmetric_eigen(cov);
        Ok(Stats { side: side as usize, mean_image, eigvecs, eigvals })
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let s = self.side;
        let vecs: Vec<f32> = self.eigvecs.iter().flatten().map(|&v| v as f32).collect();
        let tensors = vec![
            ("mean_image".to_string(), Tensor::from_vec(self.mean_image.clone(), (3, s, s), &Device::Cpu)?),
            ("pca_eigvecs".to_string(), Tensor::from_vec(vecs, (3, 3), &Device::Cpu)?),
            ("pca_eigvals".to_string(), Tensor::from_vec(self.eigvals.map(|v| v as f32).to_vec(), 3, &Device::Cpu)?),
        ];
        crate::weights::save_safetensors(&tensors, &Default::default(), path)
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let t = candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("cannot read statistics {}", path.display()))?;
        let get = |k: &str| t.get(k).with_context(|| format!("{}: no tensor `{k}`", path.display()));
        let mean = get("mean_image")?;
        let side = mean.dim(1)?;
        let vecs: Vec<f32> = get("pca_eigvecs")?.flatten_all()?.to_vec1()?;
        let vals: Vec<f32> = get("pca_eigvals")?.to_vec1()?;
        let eigvecs = std::array::from_fn(|r| std::array::from_fn(|c| vecs[r * 3 + c] as f64));
        Ok(Stats {
            side,
            mean_image: mean.flatten_all()?.to_vec1()?,
            eigvecs,
            eigvals: std::array::from_fn(|i| vals[i] as f64),
        })
    }

    /// `DIR/alexnet-stats.safetensors`, where `data-stats` writes and `train` looks.
    pub fn path_for(data: &Path) -> PathBuf {
        data.join(STATS_FILE)
    }
}

/// Eigenvalues (descending) and eigenvectors (columns) of a symmetric 3x3 matrix, by Jacobi
/// rotations.
pub fn symmetric_eigen(mut a: [[f64; 3]; 3]) -> ([f64; 3], [[f64; 3]; 3]) {
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for _ in 0..100 {
        let off = a[0][1].abs() + a[0][2].abs() + a[1][2].abs();
        if off < 1e-12 * (a[0][0].abs() + a[1][1].abs() + a[2][2].abs()).max(1e-300) {
            break;
        }
        for (p, q) in [(0, 1), (0, 2), (1, 2)] {
            if a[p][q] == 0.0 {
                continue;
            }
            let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
            let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
            let t = if theta == 0.0 { 1.0 } else { t };
            let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
            for row in a.iter_mut() {
                let (akp, akq) = (row[p], row[q]);
                row[p] = c * akp - s * akq;
                row[q] = s * akp + c * akq;
            }
            let (ap, aq) = (a[p], a[q]);
            a[p] = std::array::from_fn(|k| c * ap[k] - s * aq[k]);
            a[q] = std::array::from_fn(|k| s * ap[k] + c * aq[k]);
            for row in v.iter_mut() {
                let (vp, vq) = (row[p], row[q]);
                row[p] = c * vp - s * vq;
                row[q] = s * vp + c * vq;
            }
        }
    }
    let mut order = [0, 1, 2];
    order.sort_by(|&i, &j| a[j][j].total_cmp(&a[i][i]));
    let vals = order.map(|i| a[i][i]);
    let vecs = std::array::from_fn(|r| order.map(|i| v[r][i]));
    (vals, vecs)
}

/// How training and validation images become net inputs.
#[derive(Debug, Clone)]
pub struct TrainTransform {
    pub base: u32,
    pub crop: usize,
    /// Multiplies (pixel - mean): 1 for the paper's 0..255 inputs.
    pub scale: f32,
    pub bgr: bool,
    pub flip: bool,
    /// PCA colour augmentation with alpha ~ N(0, pca_std); 0 turns it off.
    pub pca_std: f64,
    /// Random crops (else the centre crop).
    pub random_crop: bool,
    pub stats: std::sync::Arc<Stats>,
}

impl TrainTransform {
    /// The validation view's pipeline as an inference [`Transform`] (the same bits as the
    /// centre view of [`TrainTransform::val_views`]), which `train` records in the weights it
    /// writes.
    pub fn inference(&self) -> Transform {
        Transform {
            kind: TransformKind::Paper,
            base: self.base,
            crop: self.crop,
            mean: Mean::Image { side: self.base as usize, values: self.stats.mean_image.clone() },
            scale: self.scale,
            bgr: self.bgr,
        }
    }

    /// What the loader makes of each image: its base image, which the views crop.
    pub fn frame_shape(&self) -> FrameShape {
        FrameShape { side: self.base as usize, per_image: 1 }
    }

    /// `sample`'s base image written into `out`, through a worker's `scratch`.
    pub fn frame(&self, sample: &Sample, scratch: &mut Scratch, out: &mut [u8]) -> anyhow::Result<()> {
        let img = sample.decode_with(scratch)?;
        centre_square_into(&img, self.base, &mut scratch.resize, out)
            .with_context(|| format!("image {}", sample.path.display()))?;
        scratch.recycle(img);
        Ok(())
    }

    /// The training view of the image at `position` of `epoch`'s order: its random crop, flip
    /// and colour shift.
    pub fn train_view(&self, seed: u64, epoch: usize, position: usize) -> View {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64) << 40 ^ position as u64 ^ 0xA1E7_0000_0000_0000);
        let range = self.base as usize - self.crop;
        let (y0, x0) = if self.random_crop {
            (rng.random_range(0..=range), rng.random_range(0..=range))
        } else {
            (range / 2, range / 2)
        };
        let flip = self.flip && rng.random::<bool>();
        let shift = if self.pca_std > 0.0 {
            // The paper: add [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T to every pixel. The formula is not
            // scale-free (l is a variance); like the common implementations it is applied to
            // pixels in [0, 1], so in our 0..255 units the shift is sum(p a l) / 255.
            let normal = Normal::new(0.0, self.pca_std).expect("std > 0");
            let alpha: [f64; 3] = std::array::from_fn(|_| normal.sample(&mut rng));
            let eig = &self.stats;
            std::array::from_fn(|c| {
                ((0..3).map(|i| eig.eigvecs[c][i] * alpha[i] * eig.eigvals[i]).sum::<f64>() / 255.0) as f32
            })
        } else {
            [0f32; 3]
        };
        View { frame: 0, y0, x0, flip, shift }
    }

    /// The validation views: the centre crop, or the paper's ten patches (the four corners and
    /// the centre, then the same mirrored).
    pub fn val_views(&self, ten: bool) -> Vec<View> {
        let r = self.base as usize - self.crop;
        let centre = View::at(0, r / 2, r / 2);
        if !ten {
            return vec![centre];
        }
        let five = [View::at(0, 0, 0), View::at(0, 0, r), View::at(0, r, 0), View::at(0, r, r), centre];
        five.iter().copied().chain(five.iter().map(|v| View { flip: true, ..*v })).collect()
    }

    /// The input layer that makes the views the net's input: the training set's mean image
    /// subtracted, the scale, the channel order.
    pub fn input_layer(&self) -> Augment {
        let mean = MeanValues::Image(Arc::new(self.stats.mean_image.clone()));
        Augment { crop: self.crop, normalise: Normalise::Subtract { mean, scale: self.scale }, bgr: self.bgr }
    }

    /// The training images `samples`, the first at `first` of `epoch`'s order, as batches of
    /// base images with each one's training view, on `workers` decoding threads.
    pub fn load_train(
        &self,
        samples: Vec<Sample>,
        batch_size: usize,
        seed: u64,
        epoch: usize,
        first: usize,
        workers: usize,
    ) -> Batches {
        self.load(samples, batch_size, workers, move |t, i| vec![t.train_view(seed, epoch, first + i)])
    }

    /// The validation images `samples` as batches of base images with their validation views
    /// (the centre crop, or the ten patches).
    pub fn load_val(&self, samples: Vec<Sample>, batch_size: usize, ten: bool, workers: usize) -> Batches {
        self.load(samples, batch_size, workers, move |t, _| t.val_views(ten))
    }

    /// `samples` as batches of base images, with `views(self, position)` of each.
    fn load(
        &self,
        samples: Vec<Sample>,
        batch_size: usize,
        workers: usize,
        views: impl Fn(&Self, usize) -> Vec<View> + Send + Sync + 'static,
    ) -> Batches {
        let t = self.clone();
        let prepare = move |scratch: &mut Scratch, i, sample: &Sample, out: &mut [u8]| {
            t.frame(sample, scratch, out)?;
            Ok(views(&t, i))
        };
        loader::spawn(samples, batch_size, self.frame_shape(), workers, Scratch::default, prepare)
    }

    /// One image's training view as the net's input (what the loader and the input layer make
    /// of it in a batch).
    pub fn train(&self, sample: &Sample, seed: u64, epoch: usize, position: usize) -> anyhow::Result<Chw> {
        let mut frame = vec![0u8; self.frame_shape().bytes()];
        self.frame(sample, &mut Scratch::default(), &mut frame)?;
        let view = self.train_view(seed, epoch, position);
        Ok(self.input_layer().apply_slice(&frame, self.base as usize, &[view])?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The render before the input layer took it over: the reference its bits are held to.
    fn reference(t: &TrainTransform, img: &RgbImage, (y0, x0): (usize, usize), flip: bool, shift: [f32; 3]) -> Chw {
        let (s, b) = (t.crop, t.base as usize);
        let mean = &t.stats.mean_image;
        let mut out = vec![0f32; 3 * s * s];
        for y in 0..s {
            for x in 0..s {
                let sx = if flip { x0 + s - 1 - x } else { x0 + x };
                let p = img.get_pixel(sx as u32, (y0 + y) as u32);
                for c in 0..3 {
                    let plane = if t.bgr { 2 - c } else { c };
                    let v = p[c] as f32 + shift[c] - mean[(c * b + y0 + y) * b + sx];
                    out[(plane * s + y) * s + x] = v * t.scale;
                }
            }
        }
        out
    }

    /// Training and validation views through the input layer give the reference's bits: random
    /// crops, flips and colour shifts, RGB and BGR, the ten patches.
    #[test]
    fn views_give_the_reference_bits() {
        let base = 40u32;
        let img = RgbImage::from_fn(base, base, |x, y| image::Rgb([(x * 5 + y) as u8, (x * y) as u8, (200 - y) as u8]));
        let stats = Stats {
            side: base as usize,
            mean_image: (0..3 * 40 * 40).map(|i| (i % 97) as f32 * 1.25).collect(),
            eigvecs: [[0.58, -0.7, 0.4], [0.57, 0.01, -0.8], [0.58, 0.7, 0.4]],
            eigvals: [0.2, 0.02, 0.005].map(|v| v * 255.0 * 255.0),
        };
        for bgr in [false, true] {
            let t = TrainTransform {
                base,
                crop: 32,
                scale: 1.0 / 57.6,
                bgr,
                flip: true,
                pca_std: 0.1,
                random_crop: true,
                stats: Arc::new(stats.clone()),
            };
            let layer = t.input_layer();
            let mut views: Vec<View> = (0..40).map(|position| t.train_view(3, 1, position)).collect();
            views.extend(t.val_views(true));
            assert!(views.iter().any(|v| v.flip) && views.iter().any(|v| v.shift != [0.0; 3]));
            for v in views {
                let want = reference(&t, &img, (v.y0, v.x0), v.flip, v.shift);
                let got = layer.apply_slice(img.as_raw(), base as usize, &[v]).unwrap();
                assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{v:?}");
            }
        }
    }
}
