//! The input layer: 8-bit frames (decoded and resized images, `[F, side, side, 3]` u8) to the
//! net's input (`[V, 3, crop, crop]` f32), each view's crop, mirror, PCA colour shift, mean and
//! scale in one pass. The loader hands over u8 frames, a quarter of f32's bytes, and everything
//! per-pixel after the resize runs here, where the net runs.
//!
//! The arithmetic is that of the pipelines it replaces, operation for operation, so the numbers
//! are the same bits: torchvision's `ToTensor` + `Normalize` (`(v / 255 - mean) / std`) and the
//! paper's and Caffe's `(v + shift - mean) * scale`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

mod cpu;

/// How a pixel's 8-bit value becomes the net's input.
#[derive(Debug, Clone)]
pub enum Normalise {
    /// torchvision's `ToTensor` then `Normalize(mean, std)`, per RGB channel.
    Torchvision { mean: [f32; 3], std: [f32; 3] },
    /// The paper's and Caffe's `(v + shift - mean) * scale`: the view's colour shift added, the
    /// mean subtracted, on the 0..255 scale.
    Subtract { mean: MeanValues, scale: f32 },
}

/// What [`Normalise::Subtract`] subtracts.
#[derive(Debug, Clone)]
pub enum MeanValues {
    /// Per RGB channel.
    Pixel([f32; 3]),
    /// `[3, side, side]` RGB, `side` the frames' side: the mean at the frame pixel a view
    /// reads (mirrored with it).
    Image(Arc<Vec<f32>>),
}

/// One input of the net: a `crop` x `crop` window of a frame at (`y0`, `x0`), mirrored
/// left-right if `flip` (the window's columns read right to left), `shift` added to its RGB
/// values (the paper's PCA colour augmentation; zeros otherwise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    pub frame: usize,
    pub y0: usize,
    pub x0: usize,
    pub flip: bool,
    pub shift: [f32; 3],
}

impl View {
    /// The window at (`y0`, `x0`) of `frame`, as it is.
    pub fn at(frame: usize, y0: usize, x0: usize) -> Self {
        View { frame, y0, x0, flip: false, shift: [0.0; 3] }
    }
}

/// The input layer's constants: the crop side, the normalisation, and whether the planes go
/// in BGR order (Caffe's).
#[derive(Debug, Clone)]
pub struct Augment {
    pub crop: usize,
    pub normalise: Normalise,
    pub bgr: bool,
}

impl Augment {
    /// `views` of `frames` (`[F, side, side, 3]` u8) as `[V, 3, crop, crop]` f32: the CPU
    /// kernel on the CPU. On other devices the frames are brought to the CPU and the result
    /// sent back, until the op has its CUDA kernel.
    pub fn apply(&self, frames: &Tensor, views: &[View]) -> Result<Tensor> {
        let device = frames.device().clone();
        let frames = frames.to_device(&candle_core::Device::Cpu)?.contiguous()?;
        let out = frames.apply_op1_no_bwd(&Call { augment: self, views })?;
        out.to_device(&device)
    }

    /// [`Augment::apply`] on frames in memory, each `side` x `side` RGB bytes, wherever they
    /// lie: a batch's images in the loader's buffers, without copying them into a tensor.
    pub fn apply_frames(&self, frames: &[&[u8]], side: usize, views: &[View]) -> Result<Vec<f32>> {
        if let Some(f) = frames.iter().find(|f| f.len() != side * side * 3) {
            candle_core::bail!("augment: a frame of {} bytes is not {side}x{side} RGB", f.len())
        }
        self.check(frames.len(), side, views)?;
        Ok(cpu::forward(self, frames, side, views))
    }

    /// [`Augment::apply_frames`] on frames one after another in `frames`.
    pub fn apply_slice(&self, frames: &[u8], side: usize, views: &[View]) -> Result<Vec<f32>> {
        if side == 0 || !frames.len().is_multiple_of(side * side * 3) {
            candle_core::bail!("augment: {} bytes are not whole {side}x{side} RGB frames", frames.len())
        }
        self.apply_frames(&frames.chunks_exact(side * side * 3).collect::<Vec<_>>(), side, views)
    }

    /// The views lie inside the `frames` frames, and a mean image has their side.
    fn check(&self, frames: usize, side: usize, views: &[View]) -> Result<()> {
        if let Normalise::Subtract { mean: MeanValues::Image(m), .. } = &self.normalise {
            if m.len() != 3 * side * side {
                candle_core::bail!("augment: the mean image has {} values, not 3x{side}x{side}", m.len())
            }
        }
        for v in views {
            if v.frame >= frames || v.y0 + self.crop > side || v.x0 + self.crop > side {
                candle_core::bail!(
                    "augment: view {v:?} of a {}x{} crop lies outside the {frames} frames of side {side}",
                    self.crop,
                    self.crop
                )
            }
        }
        Ok(())
    }
}

/// One application: the op with this batch's views.
struct Call<'a> {
    augment: &'a Augment,
    views: &'a [View],
}

impl CustomOp1 for Call<'_> {
    fn name(&self) -> &'static str {
        "augment"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (side, side_w) = match layout.dims() {
            &[_, h, w, 3] => (h, w),
            dims => candle_core::bail!("augment: expected [F, side, side, 3] frames, got shape {dims:?}"),
        };
        if side != side_w {
            candle_core::bail!("augment: frames must be square, got {side}x{side_w}")
        }
        let CpuStorage::U8(data) = storage else { candle_core::bail!("augment: expected u8 frames") };
        let frames = match layout.contiguous_offsets() {
            Some((start, end)) => &data[start..end],
            None => candle_core::bail!("augment: frames must be contiguous"),
        };
        let s = self.augment.crop;
        let out = self.augment.apply_slice(frames, side, self.views)?;
        Ok((CpuStorage::F32(out), Shape::from((self.views.len(), 3, s, s))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The op on a u8 tensor gives what the frames read in place give, and views outside the
    /// frames are errors.
    #[test]
    fn the_tensor_op_is_the_in_place_kernel() {
        let (side, crop) = (9, 5);
        let frames: Vec<u8> = (0..2 * side * side * 3).map(|i| (i * 31 % 256) as u8).collect();
        let mean = MeanValues::Image(Arc::new((0..3 * side * side).map(|i| i as f32 * 0.1).collect()));
        let layer = Augment { crop, normalise: Normalise::Subtract { mean, scale: 0.5 }, bgr: true };
        let views = [View::at(1, 4, 0), View { flip: true, shift: [1.0, -2.0, 0.5], ..View::at(0, 2, 3) }];
        let tensor = Tensor::from_slice(&frames, (2, side, side, 3), &candle_core::Device::Cpu).unwrap();
        let got = layer.apply(&tensor, &views).unwrap();
        assert_eq!(got.dims(), [2, 3, crop, crop]);
        let want = layer.apply_slice(&frames, side, &views).unwrap();
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        assert!(layer.apply(&tensor, &[View::at(2, 0, 0)]).is_err());
        assert!(layer.apply(&tensor, &[View::at(0, 5, 0)]).is_err());
    }
}
