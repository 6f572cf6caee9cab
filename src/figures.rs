//! The paper's Figures 3 and 4 as tools: `alexnet filters` draws conv1's kernels (tower A's
//! above tower B's) and measures how much of each kernel is colour; `alexnet features` writes a
//! layer's activations for a set of images; `alexnet neighbours` finds each query's nearest
//! images by those features and draws them beside it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use clap::ValueEnum;
use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::data::dataset::{Dataset, Sample};
use crate::data::loader;
use crate::data::shards::ShardSet;
use crate::data::transform::centre_square;
use crate::model::{AlexNet, Layer, LrnScope, Preset};

/// Kernels a row of the filter picture: the paper's Figure 3 shows 16 of tower A's 48 a row.
const KERNELS_A_ROW: usize = 16;
/// About the side a kernel is drawn at: 11x11 kernels become 44x44, as legible as the paper's.
const KERNEL_PX: usize = 44;
/// Pixels between kernels, and between the neighbour grid's cells.
const GAP: u32 = 2;
/// Pixels between the towers' blocks (and after the query column), so the split is visible.
const BLOCK_GAP: u32 = 8;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);

/// conv1's kernels `[K, 3, h, w]` (channels in RGB order) and how many towers share them out.
pub struct Kernels {
    pub weights: Vec<f32>,
    pub count: usize,
    pub height: usize,
    pub width: usize,
    /// 2 for the two-tower presets (tower A has the first half of the kernels), else 1.
    pub towers: usize,
}

impl Kernels {
    /// The first layer's kernels of `model`, turned to RGB order where the model reads BGR
    /// (Caffe's weights), so that a kernel's colours are the colours it responds to.
    pub fn of(model: &AlexNet) -> anyhow::Result<Self> {
        let params = model.parameters();
        let conv1 = params.first().context("the model has no parameters")?;
        let weight = conv1.gather(|v| Some(v.as_tensor().clone()))?.context("conv1 has no weights")?;
        let &[count, 3, height, width] = weight.dims() else {
            bail!("{} is not a convolution over RGB images (shape {:?})", conv1.key, weight.dims())
        };
        let weight = if model.transform().bgr { weight.flip(&[1])? } else { weight };
        let weights = weight.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Kernels { weights, count, height, width, towers: conv1.parts.len() })
    }

    fn kernel(&self, i: usize) -> &[f32] {
        let size = 3 * self.height * self.width;
        &self.weights[i * size..(i + 1) * size]
    }

    /// The kernels of each tower, in order.
    fn towers(&self) -> Vec<std::ops::Range<usize>> {
        let per = self.count / self.towers;
        (0..self.towers).map(|t| t * per..(t + 1) * per).collect()
    }

    /// The paper's Figure 3: each tower's kernels in rows of 16, tower A's block above tower
    /// B's; each kernel mapped linearly to 0..255 by its own minimum and maximum (all three
    /// channels together, so that its colours keep their balance) and enlarged by a whole
    /// factor, pixels as blocks.
    pub fn picture(&self) -> RgbImage {
        let zoom = (KERNEL_PX + self.height / 2) / self.height.max(self.width);
        let zoom = zoom.max(1) as u32;
        let (cell_w, cell_h) = (self.width as u32 * zoom + GAP, self.height as u32 * zoom + GAP);
        let per_tower = self.count / self.towers;
        let cols = per_tower.min(KERNELS_A_ROW);
        let rows = per_tower.div_ceil(cols);
        let block_h = rows as u32 * cell_h;
        let width = GAP + cols as u32 * cell_w;
        let height = GAP + self.towers as u32 * block_h + (self.towers as u32 - 1) * BLOCK_GAP;
        let mut img = RgbImage::from_pixel(width, height, WHITE);
        let plane = self.height * self.width;
        for (t, range) in self.towers().into_iter().enumerate() {
            for (j, i) in range.enumerate() {
                let k = self.kernel(i);
                let (lo, hi) = k.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let scale = if hi > lo { 255.0 / (hi - lo) } else { 0.0 };
                let x0 = GAP + (j % cols) as u32 * cell_w;
                let y0 = GAP + t as u32 * (block_h + BLOCK_GAP) + (j / cols) as u32 * cell_h;
                for y in 0..self.height {
                    for x in 0..self.width {
                        let at = |c: usize| ((k[c * plane + y * self.width + x] - lo) * scale).round() as u8;
                        let colour = Rgb([at(0), at(1), at(2)]);
                        for dy in 0..zoom {
                            for dx in 0..zoom {
                                img.put_pixel(x0 + x as u32 * zoom + dx, y0 + y as u32 * zoom + dy, colour);
                            }
                        }
                    }
                }
            }
        }
        img
    }

    /// The colour measure of each tower (named A, B; `all` for a single tower).
    pub fn colour_report(&self) -> Vec<TowerColour> {
        self.towers()
            .into_iter()
            .enumerate()
            .map(|(t, range)| {
                let shares: Vec<f64> = range.map(|i| colour_share(self.kernel(i))).collect();
                let mut sorted = shares.clone();
                sorted.sort_by(f64::total_cmp);
                let n = sorted.len();
                let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
                TowerColour {
                    tower: if self.towers == 1 { "all".to_string() } else { ((b'A' + t as u8) as char).to_string() },
                    kernels: n,
                    mean_colour_share: shares.iter().sum::<f64>() / n as f64,
                    median_colour_share: median,
                    colour_share: shares,
                }
            })
            .collect()
    }
}

/// How colour-specific one tower's kernels are: the share of each kernel's energy off the
/// luminance axis ([`colour_share`]).
#[derive(Debug, Serialize)]
pub struct TowerColour {
    pub tower: String,
    pub kernels: usize,
    pub mean_colour_share: f64,
    pub median_colour_share: f64,
    pub colour_share: Vec<f64>,
}

/// The share of a kernel's energy (`[3, h, w]`, RGB planes) in its colour-opponent
/// components: with the kernel's mean removed, each pixel's RGB vector split into its part
/// along the luminance axis (1,1,1)/sqrt(3) and the rest; the rest's sum of squares over the
/// whole sum of squares. 0 for a kernel that sees only brightness (equal channels), 1 for one
/// that sees only colour (channels summing to 0 at every pixel); 0 for a constant kernel,
/// which sees neither.
pub fn colour_share(kernel: &[f32]) -> f64 {
    let plane = kernel.len() / 3;
    let mean = kernel.iter().map(|&v| v as f64).sum::<f64>() / kernel.len() as f64;
    let (mut total, mut luminance) = (0.0, 0.0);
    for p in 0..plane {
        let [r, g, b] = [0, 1, 2].map(|c| kernel[c * plane + p] as f64 - mean);
        total += r * r + g * g + b * b;
        luminance += (r + g + b) * (r + g + b) / 3.0;
    }
    if total > 0.0 {
        ((total - luminance) / total).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// A layer's activations for a set of images, as `alexnet features` writes them and
/// `alexnet neighbours` reads them: one row of `dim` values an image, the images' files, and
/// their labels where the data has them.
pub struct FeatureSet {
    pub rows: Vec<f32>,
    pub dim: usize,
    pub files: Vec<PathBuf>,
    pub labels: Option<Vec<u32>>,
    /// The label indices' class names, where the data named them.
    pub classes: Option<Vec<String>>,
    /// What the features were computed with (anything `--weights` takes), so that queries can
    /// be computed the same way.
    pub weights: String,
    /// The net those weights were run as, and where its LRN windows looked (two-tower presets).
    pub preset: Preset,
    pub lrn_scope: LrnScope,
    pub layer: Layer,
    /// The images that could not be read, with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

impl FeatureSet {
    /// The `layer` activations of `model` for `samples` (labelled by `classes` where given), in
    /// batches of `batch_size`, through the parallel loader; an unreadable image is skipped
    /// and reported, as `eval` does.
    pub fn extract(
        model: &AlexNet,
        weights: &str,
        layer: Layer,
        samples: Vec<Sample>,
        classes: Option<Vec<String>>,
        batch_size: usize,
        quiet: bool,
    ) -> anyhow::Result<Self> {
        let transform = model.transform();
        let input_layer = transform.input_layer();
        let progress = crate::eval::progress_bar(samples.len() as u64, "images", quiet);
        let all = samples.clone();
        let batches = transform.load(samples, batch_size, false, loader::default_workers());
        let (mut rows, mut files, mut labels, mut skipped, mut dim) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
        for mut batch in batches {
            for (path, reason) in std::mem::take(&mut batch.failures) {
                progress.suspend(|| eprintln!("skipping {}: {reason}", path.display()));
                skipped.push((path, reason));
                progress.inc(1);
            }
            if batch.items.is_empty() {
                continue;
            }
            let n = batch.items.len();
            let x = batch.input(&input_layer, model.device())?;
            let out = model.features(&x, layer)?.to_device(&Device::Cpu)?.flatten_from(1)?;
            dim = out.dims()[1];
            rows.extend(out.flatten_all()?.to_vec1::<f32>()?);
            for (i, _) in &batch.items {
                files.push(all[*i].path.clone());
                labels.push(all[*i].label as u32);
            }
            progress.inc(n as u64);
        }
        progress.finish_and_clear();
        if files.is_empty() {
            bail!("no image could be read ({} skipped)", skipped.len())
        }
        let labels = classes.is_some().then_some(labels);
        let lrn_scope = model.lrn().map_or(LrnScope::default(), |(_, scope)| scope);
        let weights = weights.to_string();
        Ok(FeatureSet { rows, dim, files, labels, classes, weights, preset: model.preset, lrn_scope, layer, skipped })
    }

    /// Writes tensor `features` `[N, D]` f32 (and `labels` `[N]` u32 where known) with the
    /// files, classes, weights and layer in the metadata, atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let n = self.files.len();
        let mut tensors = vec![("features".to_string(), Tensor::from_slice(&self.rows, (n, self.dim), &Device::Cpu)?)];
        if let Some(labels) = &self.labels {
            tensors.push(("labels".to_string(), Tensor::from_slice(labels, n, &Device::Cpu)?));
        }
        let mut metadata = HashMap::from([
            ("files".to_string(), serde_json::to_string(&self.files)?),
            ("weights".to_string(), self.weights.clone()),
            ("preset".to_string(), self.preset.name().to_string()),
            ("lrn_scope".to_string(), value_name(self.lrn_scope)),
            ("layer".to_string(), self.layer.name().to_string()),
        ]);
        if let Some(classes) = &self.classes {
            metadata.insert("classes".to_string(), serde_json::to_string(classes)?);
        }
        crate::weights::save_safetensors(&tensors, &metadata, path)
    }

    /// Reads what [`FeatureSet::save`] wrote, with a clear error for any other file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = path.display();
        let bytes = std::fs::read(path).with_context(|| format!("cannot read features {file}"))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{file}: invalid or truncated safetensors file"))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .with_context(|| format!("{file}: invalid or truncated safetensors file"))?;
        let features = tensors.get("features").with_context(|| format!("{file} has no tensor `features`"))?;
        let &[n, dim] = features.dims() else {
            bail!("{file}: `features` should be [N, D], not {:?}", features.dims())
        };
        let field = |key: &str| {
            metadata
                .get(key)
                .with_context(|| format!("{file} does not record `{key}` (not written by alexnet features?)"))
        };
        let files: Vec<PathBuf> =
            serde_json::from_str(field("files")?).with_context(|| format!("{file}: `files` is not a list of names"))?;
        if files.len() != n {
            bail!("{file} names {} files for {n} feature rows", files.len())
        }
        let labels = match tensors.get("labels") {
            Some(t) if t.dims() == [n] => Some(t.to_dtype(candle_core::DType::U32)?.to_vec1::<u32>()?),
            Some(t) => bail!("{file}: `labels` should be [{n}], not {:?}", t.dims()),
            None => None,
        };
        let classes = metadata
            .get("classes")
            .map(|c| serde_json::from_str(c).with_context(|| format!("{file}: `classes` is not a list of names")))
            .transpose()?;
        let layer = field("layer")?;
        let layer = Layer::from_name(layer).with_context(|| format!("{file}: unknown layer `{layer}`"))?;
        let preset = field("preset")?;
        let preset = Preset::from_str(preset, false).map_err(|e| anyhow::anyhow!("{file}: preset `{preset}`: {e}"))?;
        let scope = field("lrn_scope")?;
        let lrn_scope =
            LrnScope::from_str(scope, false).map_err(|e| anyhow::anyhow!("{file}: LRN scope `{scope}`: {e}"))?;
        Ok(FeatureSet {
            rows: features.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?,
            dim,
            files,
            labels,
            classes,
            weights: field("weights")?.clone(),
            preset,
            lrn_scope,
            layer,
            skipped: Vec::new(),
        })
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.rows[i * self.dim..(i + 1) * self.dim]
    }

    /// The `k` rows nearest to `query` by Euclidean distance, nearest first (ties by position),
    /// with their distances.
    pub fn nearest(&self, query: &[f32], k: usize) -> Vec<(usize, f64)> {
        use rayon::prelude::*;
        let mut distances: Vec<(usize, f64)> = (0..self.files.len())
            .into_par_iter()
            .map(|i| {
                let d: f64 = self.row(i).iter().zip(query).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
                (i, d.sqrt())
            })
            .collect();
        let order = |a: &(usize, f64), b: &(usize, f64)| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0));
        // the k nearest found without sorting the whole pool (50,000 CIFAR-10 images a query)
        if k < distances.len() {
            distances.select_nth_unstable_by(k, order);
            distances.truncate(k);
        }
        distances.sort_by(order);
        distances
    }

    /// The class name of row `i` (its index where the classes are not named).
    fn label_name(&self, i: usize) -> Option<String> {
        let label = *self.labels.as_ref()?.get(i)?;
        Some(self.classes.as_ref().and_then(|c| c.get(label as usize).cloned()).unwrap_or_else(|| label.to_string()))
    }
}

/// A flag's value as the command line spells it (`layer`, `tower`).
fn value_name(value: impl ValueEnum) -> String {
    value.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string())
}

/// The images an `alexnet features` run reads: files given one by one (unlabelled), or a data
/// set folder in any layout `eval` and `train` read (labelled by its classes).
pub fn samples(images: &[PathBuf], data: Option<&Path>) -> anyhow::Result<(Vec<Sample>, Option<Vec<String>>)> {
    match data {
        Some(dir) => {
            let (dataset, classes) = Dataset::discover_any(dir, None, None)?;
            Ok((dataset.samples, Some(classes)))
        }
        None => Ok((images.iter().map(|p| Sample::file(p.clone(), 0)).collect(), None)),
    }
}

/// One query's nearest images.
#[derive(Debug, Serialize)]
pub struct Neighbours {
    pub query: PathBuf,
    pub label: Option<String>,
    pub neighbours: Vec<Neighbour>,
}

#[derive(Debug, Serialize)]
pub struct Neighbour {
    pub file: PathBuf,
    pub distance: f64,
    pub label: Option<String>,
}

/// What `alexnet neighbours` reports: each query's neighbours, and the majority vote's
/// accuracy where both sides are labelled.
#[derive(Debug, Serialize)]
pub struct NeighbourReport {
    pub k: usize,
    pub queries: Vec<Neighbours>,
    pub knn_accuracy: Option<f64>,
}

/// The `k` nearest images of `pool` for each of `queries`, and the k-nearest-neighbour
/// accuracy (each query's class taken as its neighbours' most frequent one, ties to the class
/// of the nearer neighbour) where both feature sets have labels of the same classes.
pub fn neighbours(pool: &FeatureSet, queries: &FeatureSet, k: usize) -> anyhow::Result<NeighbourReport> {
    if pool.dim != queries.dim {
        bail!("the pool's features have {} values an image, the queries' {}", pool.dim, queries.dim)
    }
    let labelled = pool.labels.is_some() && queries.labels.is_some();
    if labelled && pool.classes.is_some() && queries.classes.is_some() && pool.classes != queries.classes {
        bail!("the pool's and the queries' labels name different classes; their kNN accuracy means nothing")
    }
    let mut correct = 0;
    let mut report = Vec::with_capacity(queries.files.len());
    for q in 0..queries.files.len() {
        let near = pool.nearest(queries.row(q), k);
        if let (true, Some(pool_labels), Some(query_labels)) = (labelled, &pool.labels, &queries.labels) {
            let votes: Vec<u32> = near.iter().map(|&(i, _)| pool_labels[i]).collect();
            correct += usize::from(majority(&votes) == Some(query_labels[q]));
        }
        report.push(Neighbours {
            query: queries.files[q].clone(),
            label: queries.label_name(q),
            neighbours: near
                .into_iter()
                .map(|(i, distance)| Neighbour { file: pool.files[i].clone(), distance, label: pool.label_name(i) })
                .collect(),
        });
    }
    let knn_accuracy = labelled.then(|| correct as f64 / queries.files.len() as f64);
    Ok(NeighbourReport { k, queries: report, knn_accuracy })
}

/// The most frequent of `votes` (nearest first); a tie goes to the class seen first.
fn majority(votes: &[u32]) -> Option<u32> {
    let count = |v: u32| votes.iter().filter(|&&w| w == v).count();
    votes.iter().copied().fold(None, |best: Option<u32>, v| match best {
        Some(b) if count(b) >= count(v) => Some(b),
        _ => Some(v),
    })
}

/// Where the grid's images come from: files, or members of shards, each shard folder's
/// indexes read once.
#[derive(Default)]
struct ImageSource {
    /// Each shard folder's images by the paths `features` names them with.
    shards: HashMap<PathBuf, HashMap<PathBuf, Sample>>,
}

impl ImageSource {
    fn decode(&mut self, path: &Path) -> anyhow::Result<RgbImage> {
        // a member's key may hold folders: SHARD.tar/class/KEY.jpg
        let shard = path.ancestors().skip(1).find(|p| p.extension().is_some_and(|e| e == "tar") && !p.is_dir());
        let Some(folder) = shard.and_then(Path::parent) else { return crate::data::decode(path) };
        if !self.shards.contains_key(folder) {
            let set = ShardSet::find(folder)?.with_context(|| {
                format!("{} is in a shard, but {} holds no shards.json", path.display(), folder.display())
            })?;
            let by_path = set.samples().into_iter().map(|s| (s.path.clone(), s)).collect();
            self.shards.insert(folder.to_path_buf(), by_path);
        }
        let sample =
            self.shards[folder].get(path).with_context(|| format!("no image {} in its shard", path.display()))?;
        sample.decode()
    }
}

impl NeighbourReport {
    /// The paper's Figure 4 for `rows` of the queries spread evenly over them, the first
    /// included (a picture of all of a test set's would be too large to open, and its first
    /// rows, in a folder sorted by class, would all be one class): a row a query, the query in
    /// the first column and its neighbours beside it, nearest first, each image as its centre
    /// square at `side` pixels: image files, or images inside shards (`SHARD.tar/KEY.jpg`, as
    /// `features --data SHARDS` names them). An image that cannot be read (moved since) is left
    /// grey, with a warning. A picture of more pixels than Pillow opens is refused.
    pub fn grid(&self, side: u32, rows: usize) -> anyhow::Result<RgbImage> {
        let mut images = ImageSource::default();
        let n = self.queries.len();
        let rows = rows.min(n);
        let shown: Vec<&Neighbours> = (0..rows).map(|i| &self.queries[i * n / rows]).collect();
        let columns = 1 + shown.iter().map(|q| q.neighbours.len()).max().unwrap_or(0) as u64;
        let cell = side as u64 + GAP as u64;
        let width = (GAP as u64 + BLOCK_GAP as u64).saturating_add(cell.saturating_mul(columns));
        let height = (GAP as u64).saturating_add(cell.saturating_mul(rows as u64));
        if width.saturating_mul(height) > crate::data::MAX_IMAGE_PIXELS {
            bail!("a {width}x{height} picture is too large: fewer --rows, or a smaller -k or --side")
        }
        let (cell, width, height) = (cell as u32, width as u32, height as u32);
        let mut img = RgbImage::from_pixel(width, height, WHITE);
        for (row, q) in shown.iter().enumerate() {
            let y = GAP + row as u32 * cell;
            let files = std::iter::once(&q.query).chain(q.neighbours.iter().map(|n| &n.file));
            for (col, file) in files.enumerate() {
                let x = GAP + col as u32 * cell + if col > 0 { BLOCK_GAP } else { 0 };
                let tile = images.decode(file).and_then(|i| centre_square(&i, side)).unwrap_or_else(|e| {
                    eprintln!("warning: {}: {e:#}; drawn grey", file.display());
                    RgbImage::from_pixel(side, side, Rgb([128, 128, 128]))
                });
                image::imageops::replace(&mut img, &tile, x as i64, y as i64);
            }
        }
        Ok(img)
    }

    pub fn print(&self) {
        for q in &self.queries {
            println!("{}{}", q.query.display(), q.label.as_ref().map(|l| format!("  [{l}]")).unwrap_or_default());
            for (rank, n) in q.neighbours.iter().enumerate() {
                let label = n.label.as_ref().map(|l| format!("  [{l}]")).unwrap_or_default();
                println!("  {:>2}. {:>10.4}  {}{label}", rank + 1, n.distance, n.file.display());
            }
        }
        if let Some(accuracy) = self.knn_accuracy {
            println!("kNN accuracy (k = {}, majority vote): {:.2}%", self.k, 100.0 * accuracy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_share_is_0_for_grey_kernels_and_1_for_zero_luminance_ones() {
        let plane = [0.3f32, -0.1, 0.7, 0.2];
        let grey: Vec<f32> = plane.iter().chain(&plane).chain(&plane).copied().collect();
        assert!(colour_share(&grey).abs() < 1e-12);
        // red against green, blue the negative of both: every pixel sums to 0
        let (r, g) = ([0.5f32, -0.2, 0.1, 0.9], [-0.3f32, 0.4, 0.2, -0.6]);
        let b: Vec<f32> = r.iter().zip(&g).map(|(r, g)| -r - g).collect();
        let opponent: Vec<f32> = r.iter().chain(&g).chain(&b).copied().collect();
        assert!((colour_share(&opponent) - 1.0).abs() < 1e-12);
        assert_eq!(colour_share(&[1.0; 12]), 0.0);
    }

    #[test]
    fn majority_breaks_ties_by_the_nearer_neighbour() {
        assert_eq!(majority(&[3, 1, 1, 3, 2]), Some(3));
        assert_eq!(majority(&[2, 1, 1]), Some(1));
        assert_eq!(majority(&[]), None);
    }
}
