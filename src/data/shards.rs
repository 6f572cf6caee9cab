//! The paper's preparation of a data set, done once (`alexnet prepare`): every image's shorter
//! side resized to 256 by Pillow's exact bilinear resize, the central 256x256 square kept and
//! re-encoded as a baseline JPEG, into WebDataset tar shards (`KEY.jpg` and `KEY.cls`, the class
//! index as ASCII: the convention timm, DALI and the Hugging Face datasets read) with an index of
//! where each image lies, so that a reader seeks straight to it and decodes a small JPEG instead
//! of a large one, in the seeded order `train` draws.
//!
//! What the output folder holds, for a data folder named `train`:
//! - `train-000000.tar`, ...: plain ustar archives (Python's `tarfile` opens them) of at most
//!   `--shard-bytes` each (unless one image is larger), every member's time and owner zero, so
//!   that the same input gives the same bytes;
//! - `train-000000.json`, ...: each shard's index: the settings, the source images it took (the
//!   unreadable ones among them, with the reason they were skipped), and each `.jpg` member's
//!   key, data offset, size and label. It is written after its shard is renamed into place, so a
//!   shard whose index matches the data is complete and a rerun keeps it;
//! - `shards.json`, written last: the class names and the shards' indexes in order. A folder
//!   holding it is a data set for `eval` and `train` ([`ShardSet::find`]).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::augment::base_image;
use super::dataset::{Dataset, Layout, Sample};
use super::encode_jpeg;
use crate::files::{printable, remove_stale_temporaries, write_atomically};

/// The index of a folder of shards.
pub const SET_FILE: &str = "shards.json";

/// What `shards.json` says it is, so that another program's file of that name is not taken for one.
const FORMAT: &str = "alexnet-webdataset";

/// A tar block: every header and every member's padded data is a whole number of them.
const BLOCK: u64 = 512;

/// The longest key a member name holds: ustar's 100-byte name field less `.jpg`.
const MAX_KEY_BYTES: usize = 100 - ".jpg".len();

/// The largest member an index may claim (1 GiB), so that a corrupt index cannot make a reader
/// allocate more: a prepared image is tens of kilobytes.
const MAX_MEMBER_BYTES: u64 = 1 << 30;

/// What `prepare` does to every image; shards made with other settings are not reused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Settings {
    size: u32,
    quality: u8,
    classes: Vec<String>,
}

/// One shard's index (`NAME.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShardIndex {
    tar: String,
    /// The shard's length: another length means it was cut short or rewritten since.
    bytes: u64,
    #[serde(flatten)]
    settings: Settings,
    /// Every source image this shard took, as (path within the data folder, label), in order.
    sources: Vec<(String, usize)>,
    members: Vec<Entry>,
    skipped: Vec<SkippedImage>,
}

/// Where one image's JPEG bytes lie in its shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    key: String,
    offset: u64,
    size: u64,
    label: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SkippedImage {
    source: String,
    reason: String,
}

/// `shards.json`.
#[derive(Debug, Serialize, Deserialize)]
struct SetFile {
    format: String,
    classes: Vec<String>,
    /// The shards' index files, in order.
    shards: Vec<String>,
}

/// An open shard, shared by the samples whose bytes it holds.
#[derive(Debug)]
struct ShardFile {
    path: PathBuf,
    file: File,
}

/// Where a sample's JPEG lies in a shard: the `.jpg` member's name and its data's range.
#[derive(Debug, Clone)]
pub struct Member {
    shard: Arc<ShardFile>,
    name: String,
    offset: u64,
    size: u64,
}

impl Member {
    /// The member's bytes, read into `buffer` (reused from image to image) with its tar header,
    /// whose name and size must be the index's:
    /// a shard rewritten since it was indexed is an error, never another image. Reads by
    /// offset (`pread`), so that threads share the file: one call and one copy an image, and not
    /// a memory map, where a shard cut short while mapped would end the process with SIGBUS
    /// rather than this error.
    pub fn read_into<'a>(&self, buffer: &'a mut Vec<u8>) -> anyhow::Result<&'a [u8]> {
        let shard = self.shard.path.display();
        // `size` was checked against the shard's length and MAX_MEMBER_BYTES when it was opened
        buffer.resize((BLOCK + self.size) as usize, 0);
        let bytes = &mut buffer[..];
        if let Err(e) = self.shard.file.read_exact_at(bytes, self.offset - BLOCK) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                bail!(
                    "shard {shard} ends inside its member {} (it was cut short since it was indexed); \
                     rerun `alexnet prepare`",
                    self.name
                )
            }
            bail!("cannot read member {} of shard {shard}: {e}", self.name)
        }
        let header = &bytes[..BLOCK as usize];
        let name_field = &header[..100];
        let name = &name_field[..name_field.iter().position(|&b| b == 0).unwrap_or(100)];
        if name != self.name.as_bytes() || octal(&header[124..136]) != Some(self.size) {
            bail!(
                "shard {shard} has no member {} of {} bytes at offset {} (its index is stale); rerun `alexnet prepare`",
                self.name,
                self.size,
                self.offset
            )
        }
        Ok(&buffer[BLOCK as usize..])
    }
}

/// A tar header's octal number field, None if it is not one.
fn octal(field: &[u8]) -> Option<u64> {
    let digits = std::str::from_utf8(field).ok()?.trim_matches(|c: char| c == '\0' || c == ' ');
    u64::from_str_radix(digits, 8).ok()
}

/// A folder of shards, opened: every shard checked against its index, every member's range
/// against its shard's length.
pub struct ShardSet {
    /// Its `shards.json`.
    pub index: PathBuf,
    /// The class names the shards' labels index.
    pub classes: Vec<String>,
    samples: Vec<Sample>,
}

impl ShardSet {
    /// The shards in `dir`, or None if it holds no `shards.json`.
    pub fn find(dir: &Path) -> anyhow::Result<Option<Self>> {
        let index = dir.join(SET_FILE);
        if !index.is_file() {
            return Ok(None);
        }
        let set: SetFile = read_json(&index)?;
        if set.format != FORMAT {
            bail!("{} is not an index of shards (format `{}`)", index.display(), printable(&set.format))
        }
        let mut samples = Vec::new();
        for name in &set.shards {
            let shard_index = plain_name(dir, name, &index)?;
            let shard: ShardIndex = read_json(&shard_index).with_context(|| {
                format!(
                    "the index of a shard listed in {} is missing or unreadable; rerun `alexnet prepare`",
                    index.display()
                )
            })?;
            if shard.settings.classes != set.classes {
                bail!(
                    "{}: its classes are not those of {} (a stale index); rerun `alexnet prepare`",
                    shard_index.display(),
                    index.display()
                )
            }
            let tar = plain_name(dir, &shard.tar, &shard_index)?;
            let file = File::open(&tar).with_context(|| {
                format!("cannot open shard {} (listed in {})", tar.display(), shard_index.display())
            })?;
            let len = file.metadata().with_context(|| format!("cannot read shard {}", tar.display()))?.len();
            if len != shard.bytes {
                bail!(
                    "shard {} is {len} bytes, but its index {} says {}: it was cut short or rewritten since \
                     (a stale index); rerun `alexnet prepare`",
                    tar.display(),
                    shard_index.display(),
                    shard.bytes
                )
            }
            let file = Arc::new(ShardFile { path: tar.clone(), file });
            for e in shard.members {
                let name = format!("{}.jpg", e.key);
                let end = e.offset.checked_add(e.size);
                let fits = e.offset >= BLOCK && e.offset % BLOCK == 0 && end.is_some_and(|end| end <= len);
                if !fits || e.size > MAX_MEMBER_BYTES || e.key.len() > MAX_KEY_BYTES || e.label >= set.classes.len() {
                    bail!(
                        "{}: member {} (offset {}, {} bytes, label {}) does not fit shard {} of {len} bytes \
                         and {} classes; rerun `alexnet prepare`",
                        shard_index.display(),
                        printable(&name),
                        e.offset,
                        e.size,
                        e.label,
                        tar.display(),
                        set.classes.len()
                    )
                }
                let member = Member { shard: file.clone(), name: name.clone(), offset: e.offset, size: e.size };
                samples.push(Sample { path: tar.join(&name), label: e.label, member: Some(member) });
            }
        }
        Ok(Some(ShardSet { index, classes: set.classes, samples }))
    }

    /// The shards' images, labelled by positions in [`ShardSet::classes`].
    pub fn samples(self) -> Vec<Sample> {
        self.samples
    }

    /// The shards' images labelled by positions in `classes` (a model's, or a training set's):
    /// every class of the shards must be one of them.
    pub fn dataset(self, classes: &[&str]) -> anyhow::Result<Dataset> {
        let position: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        let labels: Vec<usize> = self
            .classes
            .iter()
            .map(|c| {
                position.get(c.as_str()).copied().with_context(|| {
                    format!(
                        "{}: class `{}` is not one of the {} classes",
                        self.index.display(),
                        printable(c),
                        classes.len()
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let samples = self.samples.into_iter().map(|s| Sample { label: labels[s.label], ..s }).collect();
        Ok(Dataset { samples, layout: Layout::Shards(self.index) })
    }
}

/// `dir/name`, where `name` comes from an index and must be a file name, not a path elsewhere.
fn plain_name(dir: &Path, name: &str, index: &Path) -> anyhow::Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("{}: `{}` is not a file name in {}", index.display(), printable(name), dir.display())
    }
    Ok(dir.join(name))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not a valid index", path.display()))
}

/// What `alexnet prepare` is asked to do.
pub struct PrepareOptions {
    pub data: PathBuf,
    pub labels: Option<PathBuf>,
    pub meta: Option<PathBuf>,
    pub out: PathBuf,
    pub size: u32,
    pub quality: u8,
    pub shard_bytes: u64,
    pub quiet: bool,
}

/// What `alexnet prepare` did.
#[derive(Debug)]
pub struct Prepared {
    /// Images in the shards.
    pub images: usize,
    /// Unreadable images: (path within the data folder, reason).
    pub skipped: Vec<(String, String)>,
    pub shards: usize,
    /// Shards an earlier run had completed, kept as they were.
    pub kept: usize,
    /// The shards' bytes, and the source images' (image files only).
    pub shard_bytes: u64,
    pub source_bytes: u64,
}

/// Prepares every image of `opts.data` (class folders, or a flat folder with its labels as
/// `eval` reads it) into shards in `opts.out`; shards complete from an earlier run with the
/// same data and settings are kept.
pub fn prepare(opts: &PrepareOptions) -> anyhow::Result<Prepared> {
    if !(1..=100).contains(&opts.quality) {
        bail!("--quality must be 1 to 100, not {}", opts.quality)
    }
    let (dataset, classes) = Dataset::discover_any(&opts.data, opts.labels.as_deref(), opts.meta.as_deref())?;
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    remove_stale_temporaries(&opts.out)?;
    let samples = dataset.samples;
    let sources: Vec<(String, usize)> = samples
        .iter()
        .map(|s| (s.path.strip_prefix(&opts.data).unwrap_or(&s.path).to_string_lossy().into_owned(), s.label))
        .collect();
    let settings = Settings { size: opts.size, quality: opts.quality, classes };
    let prefix = shard_prefix(&opts.data);
    let progress = crate::eval::progress_bar(samples.len() as u64, "images", opts.quiet);
    let mut encoder = Encoder { samples: &samples, size: opts.size, quality: opts.quality, pending: VecDeque::new() };
    let (mut indexes, mut kept, mut start) = (Vec::new(), 0, 0);
    while start < samples.len() {
        let name = format!("{prefix}-{:06}", indexes.len());
        let index = match complete_shard(&opts.out, &name, &settings, &sources[start..]) {
            Some(index) => {
                kept += 1;
                progress.inc(index.sources.len() as u64);
                index
            }
            None => {
                let mut shard = ShardWriter { settings: &settings, sources: &sources, progress: &progress };
                let index = shard.write(&opts.out, &name, start, &mut encoder, opts.shard_bytes)?;
                let json = serde_json::to_vec(&index)?;
                write_atomically(&opts.out.join(format!("{name}.json")), |out| out.write_all(&json))?;
                index
            }
        };
        start += index.sources.len();
        indexes.push((name, index));
    }
    progress.finish_and_clear();
    remove_shards_from(&opts.out, &prefix, indexes.len())?;
    let set = SetFile {
        format: FORMAT.to_string(),
        classes: settings.classes.clone(),
        shards: indexes.iter().map(|(name, _)| format!("{name}.json")).collect(),
    };
    let json = serde_json::to_vec_pretty(&set)?;
    write_atomically(&opts.out.join(SET_FILE), |out| out.write_all(&json))?;
    let source_bytes = samples
        .iter()
        .filter(|s| s.member.is_none())
        .filter_map(|s| std::fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    Ok(Prepared {
        images: indexes.iter().map(|(_, i)| i.members.len()).sum(),
        skipped: indexes.iter().flat_map(|(_, i)| &i.skipped).map(|s| (s.source.clone(), s.reason.clone())).collect(),
        shards: indexes.len(),
        kept,
        shard_bytes: indexes.iter().map(|(_, i)| i.bytes).sum(),
        source_bytes,
    })
}

/// The shards' name: the data folder's, in the characters a WebDataset URL pattern takes.
fn shard_prefix(data: &Path) -> String {
    let name = data.canonicalize().ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let name: String =
        name.unwrap_or_default().chars().filter(|c| c.is_ascii_alphanumeric() || "_-".contains(*c)).collect();
    if name.is_empty() {
        "shard".to_string()
    } else {
        name
    }
}

/// Shard `name`'s index, if an earlier run completed that shard with these settings from the
/// images that come next (`sources`), and the shard has the length it recorded.
fn complete_shard(out: &Path, name: &str, settings: &Settings, sources: &[(String, usize)]) -> Option<ShardIndex> {
    let index: ShardIndex = read_json(&out.join(format!("{name}.json"))).ok()?;
    let tar_len = std::fs::metadata(out.join(format!("{name}.tar"))).ok()?.len();
    let matches = index.tar == format!("{name}.tar")
        && index.settings == *settings
        && !index.sources.is_empty()
        && sources.starts_with(&index.sources)
        && tar_len == index.bytes;
    matches.then_some(index)
}

/// Removes the shards numbered `from` on that an earlier run over more images left, so that
/// the folder holds only what `shards.json` lists.
fn remove_shards_from(out: &Path, prefix: &str, from: usize) -> anyhow::Result<()> {
    for n in from.. {
        let mut found = false;
        for ext in ["tar", "json"] {
            let path = out.join(format!("{prefix}-{n:06}.{ext}"));
            if path.is_file() {
                std::fs::remove_file(&path).with_context(|| format!("cannot remove the old {}", path.display()))?;
                found = true;
            }
        }
        if !found {
            return Ok(());
        }
    }
    Ok(())
}

/// The prepared JPEGs of the images in order, encoded in parallel a chunk at a time; an image
/// encoded for a shard that turned out full waits for the next.
struct Encoder<'a> {
    samples: &'a [Sample],
    size: u32,
    quality: u8,
    /// (position, the JPEG or why the image was skipped), in order.
    pending: VecDeque<(usize, Result<Vec<u8>, String>)>,
}

impl Encoder<'_> {
    /// The prepared JPEG of image `i`.
    fn get(&mut self, i: usize) -> &Result<Vec<u8>, String> {
        if self.pending.front().is_none_or(|(p, _)| *p != i) {
            let end = self.samples.len().min(i + 16 * rayon::current_num_threads());
            let (size, quality) = (self.size, self.quality);
            self.pending = (i..end)
                .into_par_iter()
                .map(|p| {
                    let sample = &self.samples[p];
                    let jpeg = base_image(sample, size).and_then(|img| encode_jpeg(&img, quality));
                    (p, jpeg.map_err(|e| format!("{e:#}")))
                })
                .collect::<Vec<_>>()
                .into();
        }
        &self.pending[0].1
    }

    /// Done with the image [`Encoder::get`] gave last.
    fn advance(&mut self) {
        self.pending.pop_front();
    }
}

/// Writes one shard.
struct ShardWriter<'a> {
    settings: &'a Settings,
    sources: &'a [(String, usize)],
    progress: &'a indicatif::ProgressBar,
}

impl ShardWriter<'_> {
    /// Writes images from position `start` into `out/NAME.tar` (through a temporary file,
    /// renamed when complete) until the next would take it past `limit` bytes; its index.
    fn write(
        &mut self,
        out: &Path,
        name: &str,
        start: usize,
        encoder: &mut Encoder,
        limit: u64,
    ) -> anyhow::Result<ShardIndex> {
        let mut index = ShardIndex {
            tar: format!("{name}.tar"),
            bytes: 0,
            settings: self.settings.clone(),
            sources: Vec::new(),
            members: Vec::new(),
            skipped: Vec::new(),
        };
        write_atomically(&out.join(&index.tar), |tar| {
            let mut pos = 0;
            for i in start..self.sources.len() {
                let (source, label) = &self.sources[i];
                match encoder.get(i) {
                    // reported once, with those of shards kept from an earlier run, when all are written
                    Err(reason) => index.skipped.push(SkippedImage { source: source.clone(), reason: reason.clone() }),
                    Ok(jpeg) => {
                        let class = label.to_string();
                        let bytes = member_bytes(jpeg.len()) + member_bytes(class.len());
                        // the two zero blocks that end an archive
                        if !index.members.is_empty() && pos + bytes + 2 * BLOCK > limit {
                            break; // this image opens the next shard
                        }
                        let key = key_for(source, i);
                        write_member(tar, &format!("{key}.jpg"), jpeg)?;
                        write_member(tar, &format!("{key}.cls"), class.as_bytes())?;
                        index.members.push(Entry { key, offset: pos + BLOCK, size: jpeg.len() as u64, label: *label });
                        pos += bytes;
                    }
                }
                encoder.advance();
                index.sources.push((source.clone(), *label));
                self.progress.inc(1);
            }
            tar.write_all(&[0; 2 * BLOCK as usize])?;
            index.bytes = pos + 2 * BLOCK;
            Ok(())
        })?;
        Ok(index)
    }
}

/// The WebDataset key of the image at `source` (its path in the data folder): the path without
/// its extension, dots made underscores (a key ends at its first dot); the image's position
/// where that would not fit a ustar name.
fn key_for(source: &str, position: usize) -> String {
    let key = Path::new(source).with_extension("").to_string_lossy().replace('.', "_");
    if key.is_empty() || key.len() > MAX_KEY_BYTES || key.contains('\0') {
        format!("{position:09}")
    } else {
        key
    }
}

/// The bytes a member of `size` bytes takes: its header and its data padded to whole blocks.
fn member_bytes(size: usize) -> u64 {
    BLOCK + (size as u64).next_multiple_of(BLOCK)
}

/// One file member: a ustar header (mode 0644, owner and time zero), the data, zeros to the
/// block's end.
fn write_member(out: &mut impl Write, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; BLOCK as usize];
    header[..name.len()].copy_from_slice(name.as_bytes());
    let mut number = |range: std::ops::Range<usize>, value: u64| {
        let digits = format!("{value:0width$o}", width = range.len() - 1);
        header[range.start..range.start + digits.len()].copy_from_slice(digits.as_bytes());
    };
    number(100..108, 0o644); // mode
    number(108..116, 0); // uid
    number(116..124, 0); // gid
    number(124..136, data.len() as u64);
    number(136..148, 0); // mtime
    header[156] = b'0'; // a regular file
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    // the checksum: the header's byte sum with its own field as spaces
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.write_all(&header)?;
    out.write_all(data)?;
    let padding = (data.len() as u64).next_multiple_of(BLOCK) as usize - data.len();
    out.write_all(&[0; BLOCK as usize][..padding])
}
