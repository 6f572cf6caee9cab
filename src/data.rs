//! From an image file to the net's input tensor.
//!
//! This is the simple preprocessing `classify` needs: decode, resize the shorter side to 256
//! (bilinear), centre-crop the preset's input size, and normalise the way the preset's weights
//! were trained (torchvision: RGB in [0,1] with ImageNet mean/std; caffe and paper: BGR or RGB
//! 0..255 minus the mean pixel).

use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use image::imageops::FilterType;

use crate::model::Preset;

const TORCHVISION_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const TORCHVISION_STD: [f32; 3] = [0.229, 0.224, 0.225];
/// Caffe's ImageNet mean pixel, in RGB order (Caffe lists it as B 104.00699, G 116.66877, R 122.67891).
const CAFFE_MEAN_RGB: [f32; 3] = [122.67891, 116.66877, 104.00699];

/// Decodes `path` and turns it into a `[3, S, S]` f32 tensor for `preset` (S = its input size).
pub fn load_image(path: &Path, preset: Preset) -> anyhow::Result<Tensor> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))?
        .to_rgb8();
    let size = preset.input_size() as u32;
    let (w, h) = img.dimensions();
    let scale = 256.0 / w.min(h) as f32;
    let (rw, rh) = (((w as f32 * scale) as u32).max(size), ((h as f32 * scale) as u32).max(size));
    let resized = image::imageops::resize(&img, rw, rh, FilterType::Triangle);
    let (x0, y0) = ((rw - size) / 2, (rh - size) / 2);
    let crop = image::imageops::crop_imm(&resized, x0, y0, size, size).to_image();

    let s = size as usize;
    let mut chw = vec![0f32; 3 * s * s];
    for (x, y, pixel) in crop.enumerate_pixels() {
        for c in 0..3 {
            let v = pixel[c] as f32;
            let (channel, value) = match preset {
                Preset::Torchvision => (c, (v / 255.0 - TORCHVISION_MEAN[c]) / TORCHVISION_STD[c]),
                Preset::Caffe => (2 - c, v - CAFFE_MEAN_RGB[c]), // Caffe's weights expect BGR
                Preset::Paper => (c, v - CAFFE_MEAN_RGB[c]),
            };
            chw[channel * s * s + y as usize * s + x as usize] = value;
        }
    }
    Ok(Tensor::from_vec(chw, (3, s, s), &Device::Cpu)?)
}
