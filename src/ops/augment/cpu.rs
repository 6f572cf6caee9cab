//! The input layer on the CPU: one view per task, row by row: the row's pixels split into
//! their three channels as f32, then each channel's values computed over the whole row (loops
//! the compiler vectorises), each value as the pipelines it replaces computed it.

use rayon::prelude::*;

use super::{Augment, MeanValues, Normalise, View};

/// `views` of `frames` (each `side` x `side` RGB; the views checked to lie inside them) as
/// `[V, 3, crop, crop]`.
pub(super) fn forward(a: &Augment, frames: &[&[u8]], side: usize, views: &[View]) -> Vec<f32> {
    let s = a.crop;
    let mut out = Vec::with_capacity(views.len() * 3 * s * s);
    // every value is written below: no zeroing of tens of megabytes first
    out.spare_capacity_mut().par_chunks_mut(3 * s * s).zip(views).for_each(|(out, v)| {
        let frame = frames[v.frame];
        let mut channels = vec![0f32; 3 * s];
        for y in 0..s {
            let at = (v.y0 + y) * side + v.x0;
            // the row's pixels as three rows of values
            let (r, gb) = channels.split_at_mut(s);
            let (g, b) = gb.split_at_mut(s);
            for (((p, r), g), b) in frame[at * 3..][..s * 3].chunks_exact(3).zip(r).zip(g).zip(b.iter_mut()) {
                (*r, *g, *b) = (p[0] as f32, p[1] as f32, p[2] as f32);
            }
            for (c, values) in channels.chunks_exact(s).enumerate() {
                let plane = if a.bgr { 2 - c } else { c };
                let row = &mut out[(plane * s + y) * s..][..s];
                match &a.normalise {
                    Normalise::Torchvision { mean, std } => {
                        for (o, &p) in row.iter_mut().zip(values) {
                            o.write((p / 255.0 - mean[c]) / std[c]);
                        }
                    }
                    Normalise::Subtract { mean: MeanValues::Pixel(mean), scale } => {
                        for (o, &p) in row.iter_mut().zip(values) {
                            o.write((p + v.shift[c] - mean[c]) * scale);
                        }
                    }
                    Normalise::Subtract { mean: MeanValues::Image(mean), scale } => {
                        let mean = &mean[c * side * side + at..][..s];
                        for ((o, &p), &m) in row.iter_mut().zip(values).zip(mean) {
                            o.write((p + v.shift[c] - m) * scale);
                        }
                    }
                }
                if v.flip {
                    row.reverse();
                }
            }
        }
    });
    // SAFETY: every view's three planes were written, row by row
    unsafe { out.set_len(views.len() * 3 * s * s) };
    out
}
