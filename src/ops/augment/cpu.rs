//! The input layer on the CPU: one view per task, row by row, each value as the pipelines it
//! replaces computed it. torchvision's normalisation, a function of the 8-bit value alone, is a
//! table of its 256 values a channel made with the same arithmetic; the paper's and Caffe's
//! split the row's pixels into their three channels as f32, then compute each channel's values
//! over the whole row (loops the compiler vectorises).

use rayon::prelude::*;

use super::{Augment, MeanValues, Normalise, View};

/// How a row's values are made.
enum Values<'a> {
    /// Each channel's value for each 8-bit value.
    Table(Box<[[f32; 256]; 3]>),
    /// `(v + shift - mean) * scale`.
    Subtract { mean: &'a MeanValues, scale: f32 },
}

/// `views` of `frames` (each `side` x `side` RGB; the views checked to lie inside them) as
/// `[V, 3, crop, crop]`.
pub(super) fn forward(a: &Augment, frames: &[&[u8]], side: usize, views: &[View]) -> Vec<f32> {
    let s = a.crop;
    let values = match &a.normalise {
        Normalise::Torchvision { mean, std } => Values::Table(Box::new(std::array::from_fn(|c| {
            std::array::from_fn(|v| (v as f32 / 255.0 - mean[c]) / std[c])
        }))),
        Normalise::Subtract { mean, scale } => Values::Subtract { mean, scale: *scale },
    };
    let mut out = Vec::with_capacity(views.len() * 3 * s * s);
    // every value is written below: no zeroing of tens of megabytes first
    out.spare_capacity_mut().par_chunks_mut(3 * s * s).zip(views).for_each(|(out, v)| {
        let frame = frames[v.frame];
        let mut channels = vec![0f32; 3 * s];
        for y in 0..s {
            let at = (v.y0 + y) * side + v.x0;
            let pixels = &frame[at * 3..][..s * 3];
            if let Values::Subtract { .. } = values {
                // the row's pixels as three rows of values
                let (r, gb) = channels.split_at_mut(s);
                let (g, b) = gb.split_at_mut(s);
                for (((p, r), g), b) in pixels.chunks_exact(3).zip(r).zip(g).zip(b.iter_mut()) {
                    (*r, *g, *b) = (p[0] as f32, p[1] as f32, p[2] as f32);
                }
            }
            for c in 0..3 {
                let plane = if a.bgr { 2 - c } else { c };
                let row = &mut out[(plane * s + y) * s..][..s];
                let channel = &channels[c * s..][..s];
                match values {
                    Values::Table(ref table) => {
                        for (o, p) in row.iter_mut().zip(pixels.chunks_exact(3)) {
                            o.write(table[c][p[c] as usize]);
                        }
                    }
                    Values::Subtract { mean: MeanValues::Pixel(mean), scale } => {
                        for (o, &p) in row.iter_mut().zip(channel) {
                            o.write((p + v.shift[c] - mean[c]) * scale);
                        }
                    }
                    Values::Subtract { mean: MeanValues::Image(mean), scale } => {
                        let mean = &mean[c * side * side + at..][..s];
                        for ((o, &p), &m) in row.iter_mut().zip(channel).zip(mean) {
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
