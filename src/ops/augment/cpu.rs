//! The input layer on the CPU: one view per task, plane by plane and row by row, each value
//! computed as the pipelines it replaces computed it.

use rayon::prelude::*;

use super::{Augment, MeanValues, Normalise, View};

/// `views` of `frames` (checked to lie inside them) as `[V, 3, crop, crop]`.
pub(super) fn forward(a: &Augment, frames: &[u8], side: usize, views: &[View]) -> Vec<f32> {
    let s = a.crop;
    let mut out = vec![0f32; views.len() * 3 * s * s];
    out.par_chunks_mut(3 * s * s).zip(views).for_each(|(out, v)| {
        let frame = &frames[v.frame * side * side * 3..][..side * side * 3];
        view(a, frame, side, v, out)
    });
    out
}

fn view(a: &Augment, frame: &[u8], side: usize, v: &View, out: &mut [f32]) {
    let s = a.crop;
    for c in 0..3 {
        let plane = if a.bgr { 2 - c } else { c };
        for (y, out_row) in (v.y0..v.y0 + s).zip(out[plane * s * s..][..s * s].chunks_exact_mut(s)) {
            let row = &frame[y * side * 3..][..side * 3];
            // the frame's columns in the order the output row takes them
            let columns = (0..s).map(|x| if v.flip { v.x0 + s - 1 - x } else { v.x0 + x });
            match &a.normalise {
                Normalise::Torchvision { mean, std } => {
                    for (o, sx) in out_row.iter_mut().zip(columns) {
                        *o = (row[sx * 3 + c] as f32 / 255.0 - mean[c]) / std[c];
                    }
                }
                Normalise::Subtract { mean: MeanValues::Pixel(mean), scale } => {
                    for (o, sx) in out_row.iter_mut().zip(columns) {
                        *o = (row[sx * 3 + c] as f32 + v.shift[c] - mean[c]) * scale;
                    }
                }
                Normalise::Subtract { mean: MeanValues::Image(mean), scale } => {
                    let mean_row = &mean[(c * side + y) * side..][..side];
                    for (o, sx) in out_row.iter_mut().zip(columns) {
                        *o = (row[sx * 3 + c] as f32 + v.shift[c] - mean_row[sx]) * scale;
                    }
                }
            }
        }
    }
}
