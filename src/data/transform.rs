//! Preprocessing presets: from a decoded RGB image to the net's input, exactly as the weights'
//! own pipelines did it.
//!
//! * `torchvision`: `Resize(256)` (PIL bilinear with antialiasing, in Pillow's fixed-point
//!   arithmetic, see [`pil_resize`]), `CenterCrop(224)` (or `TenCrop`), `ToTensor`,
//!   `Normalize(mean, std)`. RGB.
//! * `caffe`: squash to 256x256 (OpenCV's bilinear `cv::resize`, as `convert_imageset` did),
//!   0..255, BGR, minus the mean pixel or mean image, centre crop 227 (or 10 crops).
//! * `paper`: shorter side to 256 (PIL bilinear), centre 256x256, 0..255 RGB minus the
//!   mean image (or pixel), centre crop 227 (or 10 crops).
//!
//! EXIF orientation is ignored, as PIL's `Image.open(...).convert("RGB")` in torchvision's
//! loaders ignores it; greyscale and CMYK images become RGB as in `convert("RGB")`.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use image::RgbImage;
use serde::Serialize;

use super::dataset::Sample;
use super::loader::{self, Batches, FrameShape};
use super::Scratch;
use crate::ops::{Augment, MeanValues, Normalise, View};
use crate::preset::Preset;
pub use crate::preset::TransformKind;

const TORCHVISION_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const TORCHVISION_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Caffe's ImageNet mean pixel in RGB order (Caffe writes it B 104.00699, G 116.66877, R 122.67891).
pub const CAFFE_MEAN_RGB: [f32; 3] = [122.67891, 116.66877, 104.00699];

/// What is subtracted from 0..255 pixels (caffe and paper).
#[derive(Debug, Clone)]
pub enum Mean {
    /// Per channel, RGB order.
    Pixel([f32; 3]),
    /// `[3, side, side]`, RGB order (a Caffe `.binaryproto` is BGR and is reordered on load),
    /// `side` being the base image's (256; 32 for the CIFAR-10 nets).
    Image { side: usize, values: Vec<f32> },
}

impl Mean {
    /// Reads a mean image from Caffe's `.binaryproto` (a BlobProto, BGR) or a `.npy` (`[3, 256, 256]`, RGB).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read mean image {}", path.display()))?;
        let (values, bgr) = if bytes.starts_with(b"\x93NUMPY") {
            (read_npy(&bytes).with_context(|| format!("{}: not a float .npy", path.display()))?, false)
        } else {
            let blob = crate::weights::caffe_blob(&bytes)
                .with_context(|| format!("{}: not a Caffe mean .binaryproto", path.display()))?;
            (blob, true)
        };
        if values.len() != 3 * 256 * 256 {
            bail!("{}: a mean image must be 3x256x256, found {} values", path.display(), values.len())
        }
        let mut rgb = values;
        if bgr {
            let plane = 256 * 256;
            let (b, rest) = rgb.split_at_mut(plane);
            rest[plane..].swap_with_slice(b); // swap the B and R planes
        }
        Ok(Mean::Image { side: 256, values: rgb })
    }
}

/// A preprocessing pipeline and the crop it ends in.
#[derive(Debug, Clone)]
pub struct Transform {
    pub kind: TransformKind,
    /// The side the image is resized to before cropping: 256 for the ImageNet nets, 32 for
    /// the CIFAR-10 ones.
    pub base: u32,
    /// Side of the square crop fed to the net.
    pub crop: usize,
    pub mean: Mean,
    /// caffe and paper: multiplies (pixel - mean); 1 keeps the 0..255 range.
    pub scale: f32,
    /// caffe and paper: channels in BGR order (always for caffe; for a `caffe` preset that
    /// `train` trained with the paper's preprocessing).
    pub bgr: bool,
}

impl Preset {
    /// The preprocessing the preset's published weights were trained with (see
    /// [`Transform::for_preset`]).
    pub fn transform(self) -> Transform {
        Transform::for_preset(self)
    }
}

/// A preprocessed image: `[3, side, side]` f32, channels in the order the net expects.
pub type Chw = Vec<f32>;

impl Transform {
    /// `kind` at the ImageNet nets' base side (256) and with their 0..255 range.
    pub fn new(kind: TransformKind, crop: usize, mean: Option<Mean>) -> Self {
        let mean = mean.unwrap_or(Mean::Pixel(CAFFE_MEAN_RGB));
        Transform { kind, base: 256, crop, mean, scale: 1.0, bgr: kind == TransformKind::Caffe }
    }

    /// The preset's own preprocessing with its input size. The CIFAR-10 nets have no
    /// published pipeline: their files from `train` record the one they were trained with
    /// ([`crate::weights::WeightFile::identify`]); without it, the paper's on 32x32 images,
    /// Caffe's mean pixel and `train`'s default scale for them.
    pub fn for_preset(preset: Preset) -> Self {
        let facts = preset.facts();
        Transform {
            base: facts.base_side,
            scale: facts.train_input_scale,
            bgr: facts.bgr(),
            ..Transform::new(facts.transform, facts.input_size, None)
        }
    }

    /// The centre crop (`ten == false`) or the ten crops: four corners, centre, then the same
    /// five mirrored (torchvision's `TenCrop` order, also Caffe's `oversample`), each
    /// `[3, crop, crop]`: [`Transform::frames`] through [`Transform::input_layer`].
    pub fn apply(&self, img: &RgbImage, ten: bool) -> anyhow::Result<Vec<Chw>> {
        let shape = self.frame_shape(ten);
        let mut frames = vec![0u8; shape.bytes()];
        let views = self.frames(img, ten, &mut ResizeScratch::default(), &mut frames)?;
        let input = self.input_layer().apply_slice(&frames, shape.side, &views)?;
        Ok(input.chunks_exact(3 * self.crop * self.crop).map(<[f32]>::to_vec).collect())
    }

    /// What [`Transform::frames`] makes of each image: torchvision's crops themselves (its
    /// resized image is not square), or the square base image the other pipelines crop.
    pub fn frame_shape(&self, ten: bool) -> FrameShape {
        match (self.kind, ten) {
            // the four corners, the centre, and the centre of the mirrored image (one pixel
            // off the centre where the offsets round unevenly)
            (TransformKind::Torchvision, true) => FrameShape { side: self.crop, per_image: 6 },
            (TransformKind::Torchvision, false) => FrameShape { side: self.crop, per_image: 1 },
            (TransformKind::Caffe | TransformKind::Paper, _) => FrameShape { side: self.base as usize, per_image: 1 },
        }
    }

    /// The resize's part of the pipeline: `img`'s frames (see [`Transform::frame_shape`])
    /// written into `out`, and the views of them the net sees (one, or ten), which
    /// [`Transform::input_layer`] makes the net's input.
    pub fn frames(
        &self,
        img: &RgbImage,
        ten: bool,
        scratch: &mut ResizeScratch,
        out: &mut [u8],
    ) -> anyhow::Result<Vec<View>> {
        let s = self.crop;
        if self.kind == TransformKind::Torchvision && !ten {
            // the centre crop alone resized: the same pixels, a fraction of the work
            pil_resize_shorter_centre_into(img, self.base, s as u32, scratch, out)?;
            return Ok(vec![View::at(0, 0, 0)]);
        }
        let side = self.base as usize;
        match self.kind {
            TransformKind::Paper => centre_square_into(img, self.base, scratch, out)?,
            TransformKind::Caffe => cv_resize_into(img, self.base, self.base, out),
            TransformKind::Torchvision => {
                // the whole resized image, in the worker's buffer for it (which keeps the
                // largest size it has held, as `between` does), then its six crops
                let (w, h) = shorter_side_to(img, self.base)?;
                let mut base = std::mem::take(&mut scratch.base);
                base.resize(w as usize * h as usize * 3, 0);
                pil_resize_window(img, w, h, (0..h as usize, 0..w as usize), scratch, &mut base);
                let views = self.ten_crops(&base, (w as usize, h as usize), out);
                scratch.base = base;
                return views;
            }
        }
        if side < s {
            bail!("image is {side}x{side} after resizing, smaller than the {s}x{s} crop")
        }
        // Caffe: (side - s) / 2 in integers; Caffe's oversample: the four corners and the
        // centre, then each of them mirrored
        let (r, c) = (side - s, (side - s) / 2);
        let at = |&(y, x): &(usize, usize)| View::at(0, y, x);
        if !ten {
            return Ok(vec![at(&(c, c))]);
        }
        let five = [(0, 0), (0, r), (r, 0), (r, r), (c, c)];
        let mirrored = five.iter().map(|p| View { flip: true, ..at(p) });
        Ok(five.iter().map(at).chain(mirrored).collect())
    }

    /// torchvision's `TenCrop` of its resized image `base` (`w` x `h` RGB): the five crops,
    /// then the same five of the mirrored image, so the mirrored "top-left" is the mirror of
    /// the top-right crop.
    fn ten_crops(&self, base: &[u8], (w, h): (usize, usize), out: &mut [u8]) -> anyhow::Result<Vec<View>> {
        let s = self.crop;
        if h < s || w < s {
            bail!("image is {w}x{h} after resizing, smaller than the {s}x{s} crop")
        }
        // int(round((h - s) / 2)) with Python's round-half-to-even
        let (cy, cx) = (round_half_even(h - s), round_half_even(w - s));
        let five = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), (cy, cx)];
        let frames = five.into_iter().chain([(cy, w - s - cx)]);
        for ((y0, x0), frame) in frames.zip(out.chunks_exact_mut(s * s * 3)) {
            for (y, row) in (y0..y0 + s).zip(frame.chunks_exact_mut(s * 3)) {
                row.copy_from_slice(&base[(y * w + x0) * 3..][..s * 3]);
            }
        }
        let mirrored = [1, 0, 3, 2, 5].map(|frame| View { flip: true, ..View::at(frame, 0, 0) });
        Ok((0..5).map(|frame| View::at(frame, 0, 0)).chain(mirrored).collect())
    }

    /// The input layer that finishes the pipeline: torchvision's `ToTensor` + `Normalize`, or
    /// the mean subtracted and the scale (and Caffe's BGR order).
    pub fn input_layer(&self) -> Augment {
        let normalise = match (self.kind, &self.mean) {
            (TransformKind::Torchvision, _) => Normalise::Torchvision { mean: TORCHVISION_MEAN, std: TORCHVISION_STD },
            (_, Mean::Pixel(p)) => Normalise::Subtract { mean: MeanValues::Pixel(*p), scale: self.scale },
            (_, Mean::Image { values, .. }) => {
                Normalise::Subtract { mean: MeanValues::Image(Arc::new(values.clone())), scale: self.scale }
            }
        };
        Augment { crop: self.crop, normalise, bgr: self.bgr }
    }

    /// The pipeline as JSON for a weight file's metadata (`input`), so that a model `train`
    /// wrote runs with the preprocessing it was trained with wherever it is loaded.
    pub fn to_record(&self) -> anyhow::Result<String> {
        use base64::Engine;
        let Mean::Image { side, values } = &self.mean else { bail!("only a mean image is recorded") };
        if self.kind != TransformKind::Paper || *side != self.base as usize {
            bail!("only the paper's pipeline with a mean image of its base side is recorded")
        }
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let record = RecordedTransform {
            base: self.base,
            crop: self.crop,
            scale: self.scale,
            bgr: self.bgr,
            mean_image: base64::engine::general_purpose::STANDARD.encode(bytes),
        };
        Ok(serde_json::to_string(&record)?)
    }

    /// The pipeline a weight file's metadata records (see [`Transform::to_record`]), checked
    /// before anything is allocated from it.
    pub fn from_record(json: &str) -> anyhow::Result<Self> {
        use base64::Engine;
        let r: RecordedTransform = serde_json::from_str(json).context("not a recorded preprocessing")?;
        if !(1..=MAX_RECORDED_BASE).contains(&r.base) || r.crop == 0 || r.crop > r.base as usize {
            bail!("a recorded base side of {} and crop of {} are not a pipeline we run", r.base, r.crop)
        }
        if !r.scale.is_finite() {
            bail!("the recorded scale {} is not finite", r.scale)
        }
        let side = r.base as usize;
        let want = 3 * side * side * 4;
        if r.mean_image.len() > want.div_ceil(3) * 4 {
            bail!("the recorded mean image is larger than 3x{side}x{side} values")
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&r.mean_image)
            .context("the recorded mean image is not base64")?;
        if bytes.len() != want {
            bail!("the recorded mean image has {} bytes; 3x{side}x{side} f32 values are {want}", bytes.len())
        }
        let values = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        Ok(Transform {
            kind: TransformKind::Paper,
            base: r.base,
            crop: r.crop,
            mean: Mean::Image { side, values },
            scale: r.scale,
            bgr: r.bgr,
        })
    }

    /// `samples` through the pipeline's resize part on `workers` decoding threads, in order, in
    /// batches of `batch_size` (see [`super::loader`]); [`Transform::input_layer`] finishes them.
    pub fn load(&self, samples: Vec<Sample>, batch_size: usize, ten: bool, workers: usize) -> Batches {
        let transform = self.clone();
        loader::spawn(
            samples,
            batch_size,
            self.frame_shape(ten),
            workers,
            Scratch::default,
            move |scratch, _, sample, out| {
                let img = sample.decode_with(scratch)?;
                let views = transform.frames(&img, ten, &mut scratch.resize, out);
                scratch.recycle(img);
                views
            },
        )
    }

    /// Decodes and preprocesses `paths` into one `[N (x10), 3, crop, crop]` CPU batch, the images
    /// spread over the loader's workers; the first image that fails is the error.
    pub fn batch(&self, paths: &[std::path::PathBuf], ten: bool) -> anyhow::Result<candle_core::Tensor> {
        let samples = paths.iter().map(|p| Sample::file(p.clone(), 0)).collect();
        let input_layer = self.input_layer();
        let mut inputs = Vec::new();
        for batch in self.load(samples, paths.len(), ten, loader::default_workers()) {
            if let Some((path, reason)) = batch.failures.first() {
                bail!("{}: {reason}", path.display())
            }
            inputs.push(batch.input(&input_layer, &candle_core::Device::Cpu)?);
        }
        Ok(candle_core::Tensor::cat(&inputs, 0)?)
    }
}

/// What [`Transform::to_record`] writes: the paper's pipeline (the centre square of side
/// `base`, minus the training set's mean image, times `scale`, the centre `crop`).
#[derive(Serialize, serde::Deserialize)]
struct RecordedTransform {
    base: u32,
    crop: usize,
    scale: f32,
    bgr: bool,
    /// `[3, base, base]` f32 little-endian, base64.
    mean_image: String,
}

/// The largest base side a recorded pipeline may ask for (the paper's is 256).
const MAX_RECORDED_BASE: u32 = 1024;

/// `round(twice / 2)` with Python's round-half-to-even (torchvision's crop offsets).
fn round_half_even(twice: usize) -> usize {
    let (q, r) = (twice / 2, twice % 2);
    if r == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

/// The paper's base image: shorter side to `side`, then the central `side` x `side` square
/// (torchvision's `Resize(side)` + `CenterCrop(side)`). Already square images of that size
/// (CIFAR-10's 32x32) are returned as they are.
pub fn centre_square(img: &RgbImage, side: u32) -> anyhow::Result<RgbImage> {
    if img.dimensions() == (side, side) {
        return Ok(img.clone());
    }
    pil_resize_shorter_centre(img, side, side)
}

/// [`centre_square`] written into `out` (`side` x `side` RGB) with a worker's `scratch`.
pub fn centre_square_into(
    img: &RgbImage,
    side: u32,
    scratch: &mut ResizeScratch,
    out: &mut [u8],
) -> anyhow::Result<()> {
    if img.dimensions() == (side, side) {
        out.copy_from_slice(img.as_raw());
        return Ok(());
    }
    pil_resize_shorter_centre_into(img, side, side, scratch, out)
}

/// torchvision's `Resize(size)` then `CenterCrop(crop)`, with only the crop computed: the
/// resize's passes make the crop's pixels alone (and the horizontal pass only the input rows
/// they read), the same bits as the whole resize cropped. (Resize(256) then CenterCrop(224) of
/// a 500x375 photo computes 224x224 of its 341x256 pixels.) An error as [`pil_resize_shorter`]'s,
/// or where the crop is larger than the resized image.
pub fn pil_resize_shorter_centre(img: &RgbImage, size: u32, crop: u32) -> anyhow::Result<RgbImage> {
    let mut out = vec![0u8; crop as usize * crop as usize * 3];
    pil_resize_shorter_centre_into(img, size, crop, &mut ResizeScratch::default(), &mut out)?;
    Ok(RgbImage::from_raw(crop, crop, out).expect("buffer matches the size"))
}

/// [`pil_resize_shorter_centre`] written into `out` (`crop` x `crop` RGB), with a worker's
/// `scratch`: what the loader's workers run, allocating nothing an image once warm.
pub fn pil_resize_shorter_centre_into(
    img: &RgbImage,
    size: u32,
    crop: u32,
    scratch: &mut ResizeScratch,
    out: &mut [u8],
) -> anyhow::Result<()> {
    let (nw, nh) = shorter_side_to(img, size)?;
    if nw < crop || nh < crop {
        bail!("image is {nw}x{nh} after resizing, smaller than the {crop}x{crop} crop")
    }
    let x0 = round_half_even((nw - crop) as usize);
    let y0 = round_half_even((nh - crop) as usize);
    let window = (y0..y0 + crop as usize, x0..x0 + crop as usize);
    pil_resize_window(img, nw, nh, window, scratch, out);
    Ok(())
}

/// The most pixels a resize may make: Pillow's `MAX_IMAGE_PIXELS`. Only thin images reach it
/// (60000x1 would become 15,360,000x256, 11.8 GB): ImageNet's largest photos resize to a
/// few hundred thousand pixels.
pub const MAX_RESIZED_PIXELS: u64 = 89_478_485;

/// torchvision's `Resize(size)` on a PIL image: the shorter side becomes `size`, the longer
/// `int(size * long / short)`; an error where that would exceed [`MAX_RESIZED_PIXELS`]
/// (Pillow's resize intermediate is never larger than its input or output).
pub fn pil_resize_shorter(img: &RgbImage, size: u32) -> anyhow::Result<RgbImage> {
    let (nw, nh) = shorter_side_to(img, size)?;
    Ok(pil_resize(img, nw, nh))
}

/// The size [`pil_resize_shorter`] resizes `img` to, checked.
fn shorter_side_to(img: &RgbImage, size: u32) -> anyhow::Result<(u32, u32)> {
    let (w, h) = img.dimensions();
    let (short, long) = (w.min(h) as u64, w.max(h) as u64);
    if short == 0 {
        bail!("the image is empty ({w}x{h})")
    }
    let resized_long = size as u64 * long / short;
    if resized_long * size as u64 > MAX_RESIZED_PIXELS || resized_long > u32::MAX as u64 {
        bail!(
            "the image is {w}x{h}: resizing its shorter side to {size} would make {resized_long}x{size} pixels, \
             more than the {MAX_RESIZED_PIXELS} allowed (Pillow's MAX_IMAGE_PIXELS)"
        )
    }
    Ok(if w <= h { (size, resized_long as u32) } else { (resized_long as u32, size) })
}

/// Pillow's `Image.resize((w, h), BILINEAR)` for 8-bit RGB, step for step (Resample.c):
/// a separable triangle filter whose support grows with the downscale factor, coefficients
/// normalised, turned into 22-bit fixed point, accumulated with a rounding bias and clipped;
/// the horizontal pass is stored as 8 bits before the vertical pass.
pub fn pil_resize(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let mut out = vec![0u8; out_w as usize * out_h as usize * 3];
    pil_resize_window(
        img,
        out_w,
        out_h,
        (0..out_h as usize, 0..out_w as usize),
        &mut ResizeScratch::default(),
        &mut out,
    );
    RgbImage::from_raw(out_w, out_h, out).expect("buffer matches the size")
}

/// What a worker keeps from one resize to the next: each pass's taps for the sizes it last
/// resized between (a data set's photos come in a few sizes, and a prepared set's in one), the
/// buffer between the two passes, and the resized image ten crops are cut from.
#[derive(Default)]
pub struct ResizeScratch {
    horizontal: Option<((usize, usize), PilCoeffs)>,
    vertical: Option<((usize, usize), PilCoeffs)>,
    between: Vec<u8>,
    base: Vec<u8>,
}

/// The taps in `kept` if they are for `in_size` -> `out_size`, else made now and kept.
fn taps_for(kept: &mut Option<((usize, usize), PilCoeffs)>, in_size: usize, out_size: usize) -> &PilCoeffs {
    if kept.as_ref().is_none_or(|(sizes, _)| *sizes != (in_size, out_size)) {
        *kept = Some(((in_size, out_size), PilCoeffs::new(in_size, out_size)));
    }
    &kept.as_ref().expect("just made").1
}

/// [`pil_resize`]'s output pixels in the window `(rows, columns)` of the `out_w` x `out_h`
/// result, and only those computed: each pass makes only the window's rows or columns (the
/// horizontal pass, where it runs first, only the input rows the vertical pass reads for them),
/// each output pixel from the same taps in the same order.
fn pil_resize_window(
    img: &RgbImage,
    out_w: u32,
    out_h: u32,
    (rows, cols): (Range<usize>, Range<usize>),
    scratch: &mut ResizeScratch,
    out: &mut [u8],
) {
    let (in_w, in_h) = img.dimensions();
    let (in_w, in_h, ow, oh) = (in_w as usize, in_h as usize, out_w as usize, out_h as usize);
    let (cw, ch) = (cols.len(), rows.len());
    assert!(rows.end <= oh && cols.end <= ow && out.len() == cw * ch * 3);
    let src = img.as_raw();
    let ResizeScratch { horizontal, vertical, between, .. } = scratch;
    // a pass that leaves a side as it is keeps the window's part of it
    let crop = |pixels: &[u8], w: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]| {
        for (y, row) in rows.zip(out.chunks_exact_mut(cols.len() * 3)) {
            row.copy_from_slice(&pixels[(y * w + cols.start) * 3..(y * w + cols.end) * 3]);
        }
    };
    match (ow != in_w, oh != in_h) {
        (false, false) => crop(src, in_w, rows, cols, out),
        (true, false) => resize_rows(
            &src[rows.start * in_w * 3..rows.end * in_w * 3],
            in_w,
            taps_for(horizontal, in_w, ow),
            cols,
            out,
        ),
        (false, true) => {
            between.resize(in_h * cw * 3, 0);
            crop(src, in_w, 0..in_h, cols, between);
            resize_columns(between, cw, taps_for(vertical, in_h, oh), 0, rows, out)
        }
        // Pillow (13) runs the vertical pass first when it shrinks and the horizontal grows.
        (true, true) if ow > in_w && oh < in_h => {
            between.resize(ch * in_w * 3, 0);
            resize_columns(src, in_w, taps_for(vertical, in_h, oh), 0, rows, between);
            resize_rows(between, in_w, taps_for(horizontal, in_w, ow), cols, out)
        }
        (true, true) => {
            // only the input rows the window's output rows read
            let taps = taps_for(vertical, in_h, oh);
            let first = rows.clone().map(|y| taps.bounds[y].0).min().unwrap_or(0);
            let end = rows.clone().map(|y| taps.bounds[y].0 + taps.bounds[y].1).max().unwrap_or(0).max(first);
            between.resize((end - first) * cw * 3, 0);
            resize_rows(&src[first * in_w * 3..end * in_w * 3], in_w, taps_for(horizontal, in_w, ow), cols, between);
            resize_columns(between, cw, taps, first, rows, out)
        }
    }
}

/// Pillow's horizontal pass: every row of `src` (`in_w` RGB pixels) resampled into `out`, the
/// output columns `cols` of each. With AVX2 or AVX-512, a vector's rows at a time (see
/// [`resize_kernels`]); the same bytes at every level.
fn resize_rows(src: &[u8], in_w: usize, coeffs: &PilCoeffs, cols: Range<usize>, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::Isa::avx2() {
        let blocks = if crate::ops::Isa::avx512() { avx512::resize_rows } else { avx2::resize_rows };
        // SAFETY: the CPU has the kernel's level.
        return unsafe { blocks(src, in_w, coeffs, cols, out) };
    }
    resize_rows_one_by_one(src, in_w, coeffs, cols, out)
}

crate::ops::cpu::simd::wide_fn! {
    /// [`resize_rows`] a row at a time, a pixel at a time: without AVX2, and the reference the
    /// row blocks are tested against.
    fn resize_rows_one_by_one(src: &[u8], in_w: usize, coeffs: &PilCoeffs, cols: Range<usize>, out: &mut [u8]) {
        let ow = cols.len();
        for (row, out_row) in src.chunks_exact(in_w * 3).zip(out.chunks_exact_mut(ow * 3)) {
            for (x, px) in cols.clone().zip(out_row.chunks_exact_mut(3)) {
                let (start, k) = coeffs.taps(x);
                let mut acc = [PIL_ROUND; 3];
                for (p, &w) in row[start * 3..].chunks_exact(3).zip(k) {
                    for c in 0..3 {
                        acc[c] += p[c] as i32 * w;
                    }
                }
                px.copy_from_slice(&acc.map(pil_clip8));
            }
        }
    }
}

/// The horizontal pass a block of `LANES` rows at a time, one row to a lane, so that each
/// output pixel's taps and coefficients serve a whole vector (a pixel at a time, its 3
/// channels' taps, one byte each, 3 bytes apart, left the vector units idle). The bytes the
/// columns read go through the transpose as 4-byte words, a quarter of the values, split into
/// one i32 per byte after it (`[byte][row]`); each output byte is a sum of whole vectors, in
/// [`resize_rows_one_by_one`]'s order and i32 arithmetic (so the same bytes), clipped, and
/// packed four to a word again for the transpose back to rows. (Widened to i32 before the
/// transposes, the widening and transposes took most of the time.)
macro_rules! resize_kernels {
    ($name:ident, $level:ident, $feature:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            use super::{PilCoeffs, PIL_PRECISION_BITS, PIL_ROUND};
            use crate::ops::cpu::simd::$level::*;
            use crate::ops::cpu::transpose::transpose;
            use std::ops::Range;

            /// [`super::resize_rows`]: the rows a block of `LANES` at a time, the last block's
            /// missing rows lanes whose sums are dropped; the output columns `CHUNK` at a time,
            /// so that the scratch stays small (in L1, and a bounded size however wide the
            /// image).
            ///
            /// # Safety
            /// The CPU must have the level's feature.
            #[target_feature(enable = $feature)]
            pub(in super::super) unsafe fn resize_rows(
                src: &[u8],
                in_w: usize,
                coeffs: &PilCoeffs,
                cols: Range<usize>,
                out: &mut [u8],
            ) {
                /// Output pixels to a chunk: a multiple of 4, so that each chunk's bytes start on
                /// a word.
                const CHUNK: usize = 64;
                let ow = cols.len();
                // each chunk's input bytes, from the first to the end of the last its pixels read
                let reads = |x: usize| coeffs.bounds[x].0 * 3..(coeffs.bounds[x].0 + coeffs.bounds[x].1) * 3;
                let chunks: Vec<(Range<usize>, Range<usize>)> = (cols.start..cols.end)
                    .step_by(CHUNK)
                    .map(|x0| {
                        let chunk = x0..(x0 + CHUNK).min(cols.end);
                        let from = chunk.clone().map(|x| reads(x).start).min().unwrap_or(0);
                        let to = chunk.clone().map(|x| reads(x).end).max().unwrap_or(from);
                        (chunk, from..to)
                    })
                    .collect();
                let Some(first) = chunks.iter().map(|(_, bytes)| bytes.start).min() else { return };
                let end = chunks.iter().map(|(_, bytes)| bytes.end).max().unwrap_or(first);
                // every chunk's words, from the word its first byte is in
                let chunk_words = |bytes: &Range<usize>| (bytes.start - first) / 4..(bytes.end - first).div_ceil(4);
                let most = chunks.iter().map(|(_, bytes)| chunk_words(bytes).len()).max().unwrap_or(0);
                let words_in = (end - first).div_ceil(4);
                let mut packed = vec![0i32; LANES * words_in];
                let mut words = vec![0i32; most * LANES];
                let mut across = vec![0i32; most * 4 * LANES];
                let mut sums = vec![0i32; (CHUNK * 3).div_ceil(4) * LANES];
                let mut along = vec![0i32; LANES * (CHUNK * 3).div_ceil(4)];
                let blocks = src.chunks(LANES * in_w * 3).zip(out.chunks_mut(LANES * ow * 3));
                for (rows, out_rows) in blocks {
                    for (p, row) in packed.chunks_exact_mut(words_in).zip(rows.chunks_exact(in_w * 3)) {
                        pack_words(&row[first..end], p);
                    }
                    for (chunk, bytes) in &chunks {
                        let span = chunk_words(bytes);
                        let words = &mut words[..span.len() * LANES];
                        transpose(LANES, span.len(), &packed[span.start..], words_in, words, LANES);
                        split_words(words, &mut across);
                        sum_taps(&across, coeffs, chunk.clone(), first + 4 * span.start, &mut sums);
                        let (at, len) = ((chunk.start - cols.start) * 3, chunk.len() * 3);
                        let words_out = len.div_ceil(4);
                        transpose(words_out, LANES, &sums, LANES, &mut along, words_out);
                        for (o, a) in out_rows.chunks_exact_mut(ow * 3).zip(along.chunks_exact(words_out)) {
                            unpack_words(a, &mut o[at..at + len]);
                        }
                    }
                }
            }

            /// `bytes` as little-endian words into `words`, the last one padded with zeros.
            #[inline(always)]
            fn pack_words(bytes: &[u8], words: &mut [i32]) {
                let (whole, rest) = bytes.as_chunks::<4>();
                for (w, b) in words.iter_mut().zip(whole) {
                    *w = i32::from_le_bytes(*b);
                }
                if !rest.is_empty() {
                    let mut last = [0u8; 4];
                    last[..rest.len()].copy_from_slice(rest);
                    words[whole.len()] = i32::from_le_bytes(last);
                }
            }

            /// The bytes of little-endian `words` into `bytes`, as many as it holds.
            #[inline(always)]
            fn unpack_words(words: &[i32], bytes: &mut [u8]) {
                let (whole, rest) = bytes.as_chunks_mut::<4>();
                for (b, w) in whole.iter_mut().zip(words) {
                    *b = w.to_le_bytes();
                }
                if !rest.is_empty() {
                    let n = rest.len();
                    rest.copy_from_slice(&words[whole.len()].to_le_bytes()[..n]);
                }
            }

            /// Lane `r` of vector `4w + b` of `across`: byte `b` (little-endian) of `words`'
            /// vector `w`'s lane `r`.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn split_words(words: &[i32], across: &mut [i32]) {
                let byte = splat_i32(0xFF);
                for (w, bytes) in words.chunks_exact(LANES).zip(across.chunks_exact_mut(4 * LANES)) {
                    let w = load_i32(w.as_ptr());
                    for (b, to) in bytes.chunks_exact_mut(LANES).enumerate() {
                        store_i32(to.as_mut_ptr(), and_i32(shift_right_i32(w, 8 * b as u32), byte));
                    }
                }
            }

            /// Each output pixel of `cols` from `across` (`[byte - first][row]`), its channels
            /// clipped to 0..=255 and packed four bytes (little-endian) to an i32 into `sums`
            /// (`[word][row]`, the bytes `(x - cols.start) * 3 + channel`).
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn sum_taps(across: &[i32], coeffs: &PilCoeffs, cols: Range<usize>, first: usize, sums: &mut [i32]) {
                let (round, low, high) = (splat_i32(PIL_ROUND), splat_i32(0), splat_i32(255));
                let mut word = low;
                let mut j = 0; // the output byte
                for x in cols {
                    let (start, k) = coeffs.taps(x);
                    let taps = across[(start * 3 - first) * LANES..][..k.len() * 3 * LANES].as_ptr();
                    let mut acc = [round; 3];
                    for (i, &w) in k.iter().enumerate() {
                        let w = splat_i32(w);
                        for (c, a) in acc.iter_mut().enumerate() {
                            *a = add_i32(*a, mul_i32(load_i32(taps.add((i * 3 + c) * LANES)), w));
                        }
                    }
                    for a in acc {
                        let clipped = clamp_i32(shift_right_i32(a, PIL_PRECISION_BITS), low, high);
                        word = if j % 4 == 0 {
                            clipped
                        } else {
                            or_i32(word, shift_left_i32(clipped, 8 * (j % 4) as u32))
                        };
                        if j % 4 == 3 {
                            store_i32(sums[j / 4 * LANES..][..LANES].as_mut_ptr(), word);
                        }
                        j += 1;
                    }
                }
                if j % 4 != 0 {
                    store_i32(sums[j / 4 * LANES..][..LANES].as_mut_ptr(), word);
                }
            }
        }
    };
}

resize_kernels!(avx512, avx512, "avx512f");
resize_kernels!(avx2, avx2, "avx2,fma");

crate::ops::cpu::simd::wide_fn! {
    /// Pillow's vertical pass: rows of `w` RGB pixels (the input's from row `first_row` on),
    /// each output row of `rows` a weighted sum of input rows (whole rows at a time, so it
    /// vectorises).
    fn resize_columns(src: &[u8], w: usize, coeffs: &PilCoeffs, first_row: usize, rows: Range<usize>, out: &mut [u8]) {
        let mut acc = vec![0i32; w * 3];
        for (y, out_row) in rows.zip(out.chunks_exact_mut(w * 3)) {
            let (start, k) = coeffs.taps(y);
            let start = start - first_row;
            acc.fill(PIL_ROUND);
            for (i, &wt) in k.iter().enumerate() {
                let row = &src[(start + i) * w * 3..(start + i + 1) * w * 3];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += p as i32 * wt;
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = pil_clip8(a);
            }
        }
    }
}

const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;
const PIL_ROUND: i32 = 1 << (PIL_PRECISION_BITS - 1);

#[inline(always)]
fn pil_clip8(v: i32) -> u8 {
    (v >> PIL_PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear filter.
struct PilCoeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    k: Vec<i32>,
}

impl PilCoeffs {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = 1.0 * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut k = vec![0i32; out_size * ksize];
        let mut weights = Vec::with_capacity(ksize); // one buffer for every output's window
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize; // C casts truncate
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
            weights.clear();
            weights.extend((0..xmax).map(|x| {
                let t = ((x + xmin) as f64 - center + 0.5) * ss;
                (1.0 - t.abs()).max(0.0)
            }));
            let total: f64 = weights.iter().sum();
            for (x, w) in weights.iter().enumerate() {
                let w = if total != 0.0 { w / total } else { *w };
                let fixed = w * (1u32 << PIL_PRECISION_BITS) as f64;
                k[xx * ksize + x] = if w < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
            }
            bounds.push((xmin, xmax));
        }
        PilCoeffs { bounds, ksize, k }
    }

    #[inline(always)]
    fn taps(&self, out: usize) -> (usize, &[i32]) {
        let (start, n) = self.bounds[out];
        (start, &self.k[out * self.ksize..out * self.ksize + n])
    }
}

/// OpenCV's `cv::resize(src, dst, Size(w, h))` (INTER_LINEAR) for 8-bit images, in its
/// fixed-point form: half-pixel centres, 11-bit coefficients, no antialiasing.
pub fn cv_resize(img: &RgbImage, out_w: u32, out_h: u32) -> RgbImage {
    let mut out = RgbImage::new(out_w, out_h);
    cv_resize_into(img, out_w, out_h, &mut out);
    out
}

/// [`cv_resize`] into `out` (`out_w` x `out_h` RGB).
fn cv_resize_into(img: &RgbImage, out_w: u32, out_h: u32, out: &mut [u8]) {
    assert_eq!(out.len(), out_w as usize * out_h as usize * 3, "the frame is the resize's size");
    const SCALE: i32 = 1 << 11;
    let taps = |in_size: u32, out_size: u32| -> Vec<(usize, usize, i32, i32)> {
        let scale = in_size as f64 / out_size as f64;
        (0..out_size)
            .map(|d| {
                let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let mut s = f.floor() as i64;
                f -= s as f32;
                if s < 0 {
                    f = 0.0;
                    s = 0;
                }
                if s >= in_size as i64 - 1 {
                    f = 0.0;
                    s = in_size as i64 - 1;
                }
                let s1 = (s as usize + 1).min(in_size as usize - 1);
                let a0 = ((1.0 - f) * SCALE as f32).round() as i32;
                (s as usize, s1, a0, SCALE - a0)
            })
            .collect()
    };
    let (xt, yt) = (taps(img.width(), out_w), taps(img.height(), out_h));
    for (&(y0, y1, b0, b1), row) in yt.iter().zip(out.chunks_exact_mut(out_w as usize * 3)) {
        for (&(x0, x1, a0, a1), rgb) in xt.iter().zip(row.chunks_exact_mut(3)) {
            let px = |xx: usize, yy: usize| img.get_pixel(xx as u32, yy as u32);
            for (c, v) in rgb.iter_mut().enumerate() {
                let row0 = px(x0, y0)[c] as i32 * a0 + px(x1, y0)[c] as i32 * a1;
                let row1 = px(x0, y1)[c] as i32 * a0 + px(x1, y1)[c] as i32 * a1;
                // OpenCV's VResizeLinear fixed-point cast: ((b0*(S0>>4))>>16 + (b1*(S1>>4))>>16 + 2) >> 2
                let sum = ((b0 * (row0 >> 4)) >> 16) + ((b1 * (row1 >> 4)) >> 16) + 2;
                *v = (sum >> 2).clamp(0, 255) as u8;
            }
        }
    }
}

/// The float values of a little-endian `.npy` array (`<f4` or `<f8`).
fn read_npy(bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
    let header_len = bytes.get(8..10).context("truncated header")?;
    let header_len = u16::from_le_bytes([header_len[0], header_len[1]]) as usize;
    let header = std::str::from_utf8(bytes.get(10..10 + header_len).context("truncated header")?)?;
    let data = &bytes[10 + header_len..];
    if header.contains("'fortran_order': True") {
        bail!("Fortran-ordered arrays are not supported")
    }
    if header.contains("'<f4'") {
        Ok(data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect())
    } else if header.contains("'<f8'") {
        Ok(data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32).collect())
    } else {
        bail!("dtype must be <f4 or <f8 (header: {})", crate::files::printable(header))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pipelines as they were before the input layer ([`Augment`]) took over their
    /// per-pixel work: f32 planes normalised whole, then cropped. The reference the input
    /// layer's bits are held to.
    mod reference {
        use super::*;

        pub trait Reference {
            fn reference(&self, img: &RgbImage, ten: bool) -> anyhow::Result<Vec<Chw>>;
        }

        impl Reference for Transform {
            /// The centre crop (`ten == false`) or the ten crops: four corners, centre, then the same
            /// five mirrored (torchvision's `TenCrop` order, also Caffe's `oversample`).
            fn reference(&self, img: &RgbImage, ten: bool) -> anyhow::Result<Vec<Chw>> {
                if !ten && matches!(self.kind, TransformKind::Torchvision) {
                    // the centre crop alone resized: the same pixels, a fraction of the work
                    let crop = pil_resize_shorter_centre(img, self.base, self.crop as u32)?;
                    return Ok(vec![Planes::from_rgb(&crop, torchvision_value, false).data]);
                }
                let base = base(self, img)?;
                let (h, w, s) = (base.h, base.w, self.crop);
                if h < s || w < s {
                    bail!("image is {w}x{h} after resizing, smaller than the {s}x{s} crop")
                }
                let centre = match self.kind {
                    // torchvision: int(round((h - s) / 2)) with Python's round-half-to-even
                    TransformKind::Torchvision => (round_half_even(h - s), round_half_even(w - s)),
                    // Caffe: (h - s) / 2 in integers
                    TransformKind::Caffe | TransformKind::Paper => ((h - s) / 2, (w - s) / 2),
                };
                if !ten {
                    return Ok(vec![base.crop(centre, s, false)]);
                }
                let five = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), centre];
                let mut crops: Vec<Chw> = five.iter().map(|&at| base.crop(at, s, false)).collect();
                match self.kind {
                    // TenCrop: the same five crops of the mirrored image, so the mirrored "top-left"
                    // is the mirror of the top-right crop.
                    TransformKind::Torchvision => {
                        let (cy, cx) = centre;
                        let at = [(0, w - s), (0, 0), (h - s, w - s), (h - s, 0), (cy, w - s - cx)];
                        crops.extend(at.iter().map(|&p| base.crop(p, s, true)));
                    }
                    // Caffe's oversample: each of the five crops, mirrored.
                    TransformKind::Caffe | TransformKind::Paper => {
                        crops.extend(five.iter().map(|&p| base.crop(p, s, true)))
                    }
                }
                Ok(crops)
            }
        }

        /// The resized, normalised image before cropping.
        fn base(t: &Transform, img: &RgbImage) -> anyhow::Result<Planes> {
            Ok(match t.kind {
                TransformKind::Torchvision => {
                    let resized = pil_resize_shorter(img, t.base)?;
                    Planes::from_rgb(&resized, torchvision_value, false)
                }
                TransformKind::Caffe => {
                    let squashed = cv_resize(img, t.base, t.base);
                    Planes::from_rgb(&squashed, |c, y, x, v| (v as f32 - mean_at(&t.mean, c, y, x)) * t.scale, t.bgr)
                }
                TransformKind::Paper => {
                    let square = centre_square(img, t.base)?;
                    Planes::from_rgb(&square, |c, y, x, v| (v as f32 - mean_at(&t.mean, c, y, x)) * t.scale, t.bgr)
                }
            })
        }

        fn mean_at(mean: &Mean, c: usize, y: usize, x: usize) -> f32 {
            match mean {
                Mean::Pixel(p) => p[c],
                Mean::Image { side, values } => values[(c * side + y) * side + x],
            }
        }

        /// torchvision's `ToTensor` and `Normalize` of channel `c`'s 8-bit value `v`.
        fn torchvision_value(c: usize, _y: usize, _x: usize, v: u8) -> f32 {
            (v as f32 / 255.0 - TORCHVISION_MEAN[c]) / TORCHVISION_STD[c]
        }

        /// A float image in channel planes.
        struct Planes {
            h: usize,
            w: usize,
            data: Vec<f32>,
        }

        impl Planes {
            /// `f(rgb channel, y, x, value)`; `bgr` stores the channels in reverse order.
            fn from_rgb(img: &RgbImage, f: impl Fn(usize, usize, usize, u8) -> f32, bgr: bool) -> Self {
                let (w, h) = (img.width() as usize, img.height() as usize);
                let mut data = vec![0f32; 3 * h * w];
                for (x, y, p) in img.enumerate_pixels() {
                    let (x, y) = (x as usize, y as usize);
                    for c in 0..3 {
                        let plane = if bgr { 2 - c } else { c };
                        data[(plane * h + y) * w + x] = f(c, y, x, p[c]);
                    }
                }
                Planes { h, w, data }
            }

            fn crop(&self, (y0, x0): (usize, usize), s: usize, mirror: bool) -> Chw {
                let mut out = Vec::with_capacity(3 * s * s);
                for c in 0..3 {
                    for y in y0..y0 + s {
                        let row = &self.data[(c * self.h + y) * self.w + x0..][..s];
                        if mirror {
                            out.extend(row.iter().rev());
                        } else {
                            out.extend_from_slice(row);
                        }
                    }
                }
                out
            }
        }
    }

    /// The horizontal pass's row blocks (at this run's level: the test binary runs again at
    /// every level the CPU has) give the bytes of the pass a pixel at a time: shrinking and
    /// growing, odd widths, images and windows narrower than a vector, row counts on either
    /// side of the blocks' 8 and 16, pseudo-random images and ones of only 0s and 255s.
    #[test]
    fn the_row_blocks_give_the_pixel_at_a_time_bytes() {
        let mut state = 0x2545_f491u32;
        let mut next = move || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        };
        let row_counts = [1, 7, 8, 9, 15, 16, 17, 33, 40];
        let mut case = 0;
        for in_w in [1, 2, 3, 5, 7, 13, 31, 64, 97, 333, 500] {
            for out_w in [1, 3, 7, 16, 17, 100, 224, 341, 700] {
                let coeffs = PilCoeffs::new(in_w, out_w);
                let windows = [0..out_w, out_w / 4..out_w / 4 + out_w.div_ceil(2), out_w - 1..out_w, 0..1];
                for cols in windows {
                    case += 1;
                    let rows = row_counts[case % row_counts.len()];
                    let extremes = case % 3 == 0;
                    let src: Vec<u8> =
                        (0..rows * in_w * 3).map(|_| if extremes { (next() & 1) * 255 } else { next() }).collect();
                    let mut got = vec![0u8; rows * cols.len() * 3];
                    let mut want = got.clone();
                    resize_rows(&src, in_w, &coeffs, cols.clone(), &mut got);
                    resize_rows_one_by_one(&src, in_w, &coeffs, cols.clone(), &mut want);
                    assert_eq!(got, want, "{in_w} -> {out_w} pixels, columns {cols:?}, {rows} rows");
                }
            }
        }
    }

    /// The window's resize gives the whole resize's pixels: shrinking both sides, growing both,
    /// growing one (Pillow's vertical-first order) and leaving one as it is, portrait and
    /// landscape, odd offsets.
    #[test]
    fn the_centre_crop_alone_is_the_whole_resize_cropped() {
        for (w, h, size, crop) in
            [(500, 375, 256, 224), (375, 500, 256, 224), (97, 61, 256, 224), (300, 40, 64, 60), (256, 300, 256, 227)]
        {
            let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (y * 3) as u8]));
            let whole = pil_resize_shorter(&img, size).unwrap();
            let (nw, nh) = whole.dimensions();
            let (x0, y0) = (round_half_even((nw - crop) as usize) as u32, round_half_even((nh - crop) as usize) as u32);
            let want = image::imageops::crop_imm(&whole, x0, y0, crop, crop).to_image();
            assert_eq!(pil_resize_shorter_centre(&img, size, crop).unwrap(), want, "{w}x{h} -> {size}, crop {crop}");
        }
    }

    /// The input layer gives the bits of the pipelines it replaced, for every kind, with a mean
    /// pixel and a mean image, one crop and ten, on images whose crop offsets round unevenly.
    #[test]
    fn the_input_layer_gives_the_reference_bits() {
        use reference::Reference;
        let image_mean =
            Mean::Image { side: 256, values: (0..3 * 256 * 256).map(|i| (i % 251) as f32 * 0.5).collect() };
        let transforms = [
            Preset::Torchvision.transform(),
            Preset::Caffe.transform(),
            Preset::Paper.transform(),
            Transform { scale: 0.25, ..Transform::new(TransformKind::Paper, 227, Some(image_mean.clone())) },
            Transform::new(TransformKind::Caffe, 227, Some(image_mean)),
        ];
        for (w, h) in [(500, 375), (375, 500), (301, 257), (256, 256)] {
            let img =
                RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (y * 3 + x / 5) as u8]));
            for t in &transforms {
                for ten in [false, true] {
                    let (new, old) = (t.apply(&img, ten).unwrap(), t.reference(&img, ten).unwrap());
                    assert_eq!(new.len(), old.len());
                    for (a, b) in new.iter().zip(&old) {
                        assert!(
                            a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{:?} {w}x{h} ten {ten}",
                            t.kind
                        );
                    }
                }
            }
        }
    }
}
