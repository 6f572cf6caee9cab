//! Labelled image sets in every layout people keep ImageNet's validation set in.
//!
//! (a) one folder per class (`val/n01440764/*.JPEG`, as torchvision's `ImageFolder`);
//! (b) a flat folder plus a label file, one WNID per line in file order
//!     (line i is `ILSVRC2012_val_<i>.JPEG`);
//! (c) a flat folder plus the devkit's `ILSVRC2012_validation_ground_truth.txt`, whose numbers
//!     are ILSVRC2012_IDs in the devkit's `meta.mat` order (not sorted WNID order), mapped
//!     to WNIDs through `meta.mat`.
//!
//! (d) a folder of WebDataset shards that `alexnet prepare` wrote from any of these (its
//!     `shards.json`; see [`super::shards`]).
//!
//! The layout is detected; `--labels` (and `--meta`) override. Class indices are positions in
//! the model's class list (for ImageNet, sorted WNIDs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image::RgbImage;
use serde::Serialize;

use super::shards::{self, Member};

/// One image and its class index.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The image file; for an image in a shard `SHARD.tar/KEY.jpg`, so that every message
    /// about it (skipped, predicted) names the shard and the member.
    pub path: PathBuf,
    pub label: usize,
    /// Where the image's bytes lie in its shard; None for an image file.
    pub member: Option<Member>,
}

impl Sample {
    /// An image file of class `label`.
    pub fn file(path: PathBuf, label: usize) -> Self {
        Sample { path, label, member: None }
    }

    /// The image as 8-bit RGB, from its file or its shard, through the one decoder
    /// ([`super::decode_bytes`]), so that both give the same pixels.
    pub fn decode(&self) -> anyhow::Result<RgbImage> {
        self.decode_with(&mut super::Scratch::default())
    }

    /// [`Sample::decode`] through a worker's buffers (give the pixels back with
    /// [`super::Scratch::recycle`]).
    pub fn decode_with(&self, scratch: &mut super::Scratch) -> anyhow::Result<RgbImage> {
        let super::Scratch { bytes, pixels, .. } = scratch;
        bytes.clear();
        let bytes = match &self.member {
            None => {
                let read = std::fs::File::open(&self.path).and_then(|mut f| std::io::Read::read_to_end(&mut f, bytes));
                read.with_context(|| format!("cannot read image {}", self.path.display()))?;
                &bytes[..]
            }
            Some(member) => member.read_into(bytes)?,
        };
        super::decode_bytes_into(bytes, &self.path, std::mem::take(pixels))
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    ImageFolder,
    LabelFile(PathBuf),
    Devkit {
        ground_truth: PathBuf,
        meta: PathBuf,
    },
    /// Shards and the index `alexnet prepare` wrote (the index's path).
    Shards(PathBuf),
}

pub struct Dataset {
    pub samples: Vec<Sample>,
    pub layout: Layout,
}

/// What a data set's image files are named: every format PIL opens that a data set holds,
/// so that one we do not decode (only JPEG and PNG are) is counted as skipped, never ignored.
const IMAGE_EXTENSIONS: [&str; 9] = ["jpg", "jpeg", "png", "ppm", "bmp", "webp", "gif", "tif", "tiff"];

fn is_image(path: &Path) -> bool {
    path.extension().is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries)
}

fn looks_like_wnid(s: &str) -> bool {
    s.len() == 9 && s.starts_with('n') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

impl Dataset {
    /// Opens `dir` in whichever layout it is in. `classes` are the model's class names
    /// (WNIDs for ImageNet) in index order.
    pub fn open(dir: &Path, classes: &[&str], labels: Option<&Path>, meta: Option<&Path>) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!("data folder {} does not exist", dir.display())
        }
        if let Some(set) = shards::ShardSet::find(dir)? {
            if labels.is_some() || meta.is_some() {
                bail!(
                    "{} holds shards, which carry their labels; --labels and --meta are for flat folders",
                    dir.display()
                )
            }
            return set.dataset(classes);
        }
        let dataset = match labels.map(Path::to_path_buf).or_else(|| find_label_file(dir)) {
            Some(labels) => Self::flat(dir, &labels, classes, meta)?,
            None => Self::image_folder(dir, classes)?,
        };
        if dataset.samples.is_empty() {
            bail!("no images found in {} ({:?} layout)", dir.display(), dataset.layout)
        }
        Ok(dataset)
    }

    /// Class folders with whatever names they have (sorted, as torchvision's ImageFolder):
    /// the data set and its class names.
    pub fn discover(dir: &Path) -> anyhow::Result<(Self, Vec<String>)> {
        if !dir.is_dir() {
            bail!("data folder {} does not exist", dir.display())
        }
        if let Some(set) = shards::ShardSet::find(dir)? {
            let classes = set.classes.clone();
            let names: Vec<&str> = classes.iter().map(String::as_str).collect();
            return Ok((set.dataset(&names)?, classes));
        }
        let classes: Vec<String> = sorted_entries(dir)?
            .into_iter()
            .filter(|p| p.is_dir())
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect();
        if classes.is_empty() {
            bail!("{} has no class folders (expected DIR/<class>/<image>)", dir.display())
        }
        let names: Vec<&str> = classes.iter().map(String::as_str).collect();
        let dataset = Self::image_folder(dir, &names)?;
        if dataset.samples.is_empty() {
            bail!("no images found in the class folders of {}", dir.display())
        }
        Ok((dataset, classes))
    }

    /// Any data set of named classes, as `alexnet prepare` reads it: a flat folder with a label
    /// file (or `labels`, `meta`) is labelled by ImageNet's WNIDs, class folders by their
    /// names ([`Dataset::discover`]). The data set and its class names.
    pub fn discover_any(dir: &Path, labels: Option<&Path>, meta: Option<&Path>) -> anyhow::Result<(Self, Vec<String>)> {
        // the label file looked for once, and handed on
        let labels = labels.map(Path::to_path_buf).or_else(|| if dir.is_dir() { find_label_file(dir) } else { None });
        if labels.is_none() && meta.is_none() {
            return Self::discover(dir);
        }
        let wnids: Vec<&str> = crate::classes::imagenet_classes().into_iter().map(|(wnid, _)| wnid).collect();
        let dataset = Self::open(dir, &wnids, labels.as_deref(), meta)?;
        Ok((dataset, wnids.into_iter().map(String::from).collect()))
    }

    /// Layout (a): class folders; a folder whose name is not a known class is an error.
    /// Shards (d) of such folders are read as well.
    pub fn image_folder(dir: &Path, classes: &[&str]) -> anyhow::Result<Self> {
        if let Some(set) = shards::ShardSet::find(dir)? {
            return set.dataset(classes);
        }
        let index: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let mut samples = Vec::new();
        for class_dir in sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()) {
            let name = class_dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let Some(&label) = index.get(name.as_str()) else {
                bail!(
                    "folder {} is not one of the {} classes (expected names like `{}`)",
                    class_dir.display(),
                    classes.len(),
                    classes[0]
                )
            };
            for path in sorted_entries(&class_dir)?.into_iter().filter(|p| is_image(p)) {
                samples.push(Sample::file(path, label));
            }
        }
        Ok(Dataset { samples, layout: Layout::ImageFolder })
    }

    /// Layouts (b) and (c): a flat folder of images plus a label file.
    fn flat(dir: &Path, labels: &Path, classes: &[&str], meta: Option<&Path>) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(labels).with_context(|| format!("cannot read label file {}", labels.display()))?;
        let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let devkit = lines.first().is_some_and(|l| l.parse::<usize>().is_ok());
        let (wnids, layout): (Vec<String>, Layout) = if devkit {
            let meta = meta.map(Path::to_path_buf).or_else(|| find_meta(dir, labels)).with_context(|| {
                format!("{} holds devkit class IDs; they need the devkit's meta.mat (pass --meta)", labels.display())
            })?;
            let bytes = std::fs::read(&meta).with_context(|| format!("cannot read {}", meta.display()))?;
            let ids = super::matfile::ilsvrc_ids(&bytes)
                .with_context(|| format!("{}: cannot read synsets", meta.display()))?;
            let wnids = lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let id: usize = l
                        .parse()
                        .with_context(|| format!("{} line {}: `{l}` is not a class ID", labels.display(), i + 1))?;
                    ids.get(&id).cloned().with_context(|| {
                        format!("{} line {}: ID {id} is not in {}", labels.display(), i + 1, meta.display())
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            (wnids, Layout::Devkit { ground_truth: labels.to_path_buf(), meta })
        } else {
            (
                lines.iter().map(|l| l.split_whitespace().next().unwrap_or("").to_string()).collect(),
                Layout::LabelFile(labels.to_path_buf()),
            )
        };
        let index: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let images: Vec<PathBuf> = sorted_entries(dir)?.into_iter().filter(|p| p.is_file() && is_image(p)).collect();
        let mut samples = Vec::with_capacity(images.len());
        for (position, path) in images.into_iter().enumerate() {
            // ILSVRC2012_val_00000042.JPEG is line 42 whatever else is in the folder.
            let line = val_number(&path).map_or(position, |n| n - 1);
            let Some(wnid) = wnids.get(line) else {
                bail!("{}: the label file {} has no line {} for it", path.display(), labels.display(), line + 1)
            };
            let Some(&label) = index.get(wnid.as_str()) else {
                bail!(
                    "{}: its class `{wnid}` ({} line {}) is not one of the model's classes",
                    path.display(),
                    labels.display(),
                    line + 1
                )
            };
            samples.push(Sample::file(path, label));
        }
        Ok(Dataset { samples, layout })
    }
}

/// `n` of `ILSVRC2012_val_<n>.JPEG`.
fn val_number(path: &Path) -> Option<usize> {
    let stem = path.file_stem()?.to_string_lossy();
    stem.strip_prefix("ILSVRC2012_val_")?.parse().ok()
}

/// A label file next to a flat folder (in it or beside it): the devkit's ground truth, or a
/// text file whose first line is a WNID. None when the folder has class subfolders.
fn find_label_file(dir: &Path) -> Option<PathBuf> {
    let entries = sorted_entries(dir).ok()?;
    if entries.iter().any(|p| p.is_dir() && looks_like_wnid(&p.file_name().unwrap_or_default().to_string_lossy())) {
        return None;
    }
    let mut places = vec![dir.to_path_buf()];
    places.extend(dir.parent().map(Path::to_path_buf));
    for place in &places {
        let gt = place.join("ILSVRC2012_validation_ground_truth.txt");
        if gt.is_file() {
            return Some(gt);
        }
    }
    for place in &places {
        for path in sorted_entries(place).ok()?.into_iter().filter(|p| p.extension().is_some_and(|e| e == "txt")) {
            let first = std::fs::read_to_string(&path).ok()?.lines().next().map(|l| l.trim().to_string());
            if first.is_some_and(|l| looks_like_wnid(l.split_whitespace().next().unwrap_or(""))) {
                return Some(path);
            }
        }
    }
    None
}

/// `meta.mat` beside the ground-truth file or the images.
fn find_meta(dir: &Path, labels: &Path) -> Option<PathBuf> {
    [labels.parent(), Some(dir), dir.parent()].into_iter().flatten().map(|p| p.join("meta.mat")).find(|p| p.is_file())
}
