//! The loading pipeline: decoding workers, threads of their own apart from the compute pool,
//! each taking the next image as soon as it finishes one, and writing its frames (8-bit RGB,
//! decoded and resized) into a buffer recycled from batch to batch. The images are put back in
//! order as batches, at most two batches ahead of the consumer, so memory stays bounded
//! whatever the data set's size; the consumer turns a batch into the net's input with the
//! input layer ([`crate::ops::Augment`]) where the net runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use candle_core::{Device, Tensor};

use super::dataset::Sample;
use crate::ops::{Augment, View};

/// What one image becomes: `per_image` frames of `side` x `side` RGB bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameShape {
    pub side: usize,
    pub per_image: usize,
}

impl FrameShape {
    /// Bytes of one image's frames.
    pub fn bytes(&self) -> usize {
        self.per_image * self.side * self.side * 3
    }
}

/// How many decoding workers a loader starts by default: one a core, as the compute pool has.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A batch of loaded images in order: each one's position in the sample list, its views of
/// its frames, and the images that failed with the reason. Its frame buffers go back to the
/// loader when it is dropped.
pub struct Batch {
    pub items: Vec<(usize, Vec<View>)>,
    pub failures: Vec<(PathBuf, String)>,
    frames: Vec<Vec<u8>>,
    shape: FrameShape,
    pool: Arc<Shared>,
}

impl Batch {
    /// The net's input for the batch, `[views, 3, crop, crop]` f32 on `device`: `augment` reads
    /// the frames where the workers wrote them. (Until the input layer has its CUDA kernel, its
    /// output goes to another device as f32, one transfer; then the u8 frames will.)
    pub fn input(&self, augment: &Augment, device: &Device) -> anyhow::Result<Tensor> {
        let FrameShape { side, per_image } = self.shape;
        let views: Vec<View> = (self.items.iter().enumerate())
            .flat_map(|(i, (_, views))| views.iter().map(move |v| View { frame: i * per_image + v.frame, ..*v }))
            .collect();
        let frames: Vec<&[u8]> = self.frames.iter().flat_map(|f| f.chunks_exact(side * side * 3)).collect();
        let input = augment.apply_frames(&frames, side, &views)?;
        let s = augment.crop;
        Ok(Tensor::from_vec(input, (views.len(), 3, s, s), &Device::Cpu)?.to_device(device)?)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.pool.lock().buffers.append(&mut self.frames);
    }
}

/// Starts loading `samples` in batches of `batch_size` on `workers` threads: each image's
/// frames (`shape`) written by `prepare(scratch, position, sample, frames)` into its buffer,
/// which returns the image's views of them; `scratch` is the worker's own, made by `init`.
pub fn spawn<S, I, F>(
    samples: Vec<Sample>,
    batch_size: usize,
    shape: FrameShape,
    workers: usize,
    init: I,
    prepare: F,
) -> Batches
where
    I: Fn() -> S + Send + Sync + 'static,
    F: Fn(&mut S, usize, &Sample, &mut [u8]) -> anyhow::Result<Vec<View>> + Send + Sync + 'static,
{
    const PREFETCH: usize = 2;
    let batch_size = batch_size.max(1);
    let batches = samples.len().div_ceil(batch_size);
    let shared = Arc::new(Shared {
        images: samples.len(),
        batch_size,
        state: Mutex::new(State {
            next: 0,
            consumed: 0,
            pending: BTreeMap::new(),
            buffers: Vec::new(),
            stopped: false,
        }),
        ready: Condvar::new(),
        space: Condvar::new(),
    });
    let work = Arc::new((samples, init, prepare));
    for _ in 0..workers.max(1).min(work.0.len()) {
        let (shared, work) = (shared.clone(), work.clone());
        std::thread::spawn(move || {
            let (samples, init, prepare) = &*work;
            let mut scratch = init();
            while let Some((position, mut buffer)) = shared.next_image(PREFETCH) {
                buffer.resize(shape.bytes(), 0); // a recycled buffer keeps its length: no zeroing
                let sample = &samples[position];
                // a panic would leave its batch incomplete and the consumer waiting: an error
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    prepare(&mut scratch, position, sample, &mut buffer)
                }))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("loading the image panicked")))
                .map_err(|e| (sample.path.clone(), format!("{e:#}")));
                shared.finish(position, buffer, result);
            }
        });
    }
    Batches { shared, batches, shape }
}

/// The loaded batches, in order.
pub struct Batches {
    shared: Arc<Shared>,
    batches: usize,
    shape: FrameShape,
}

impl Iterator for Batches {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let mut state = self.shared.lock();
        if state.consumed == self.batches {
            return None;
        }
        loop {
            let index = state.consumed;
            if state.pending.get(&index).is_some_and(|b| b.remaining == 0) {
                let done = state.pending.remove(&index).expect("present");
                state.consumed += 1;
                self.shared.space.notify_all();
                drop(state);
                let mut batch = Batch {
                    items: Vec::with_capacity(done.slots.len()),
                    failures: Vec::new(),
                    frames: Vec::with_capacity(done.slots.len()),
                    shape: self.shape,
                    pool: self.shared.clone(),
                };
                for (i, slot) in done.slots.into_iter().enumerate() {
                    let (buffer, result) = slot.expect("every image of a finished batch is in");
                    match result {
                        Ok(views) => {
                            batch.items.push((index * self.shared.batch_size + i, views));
                            batch.frames.push(buffer);
                        }
                        Err(failure) => {
                            batch.failures.push(failure);
                            self.shared.lock().buffers.push(buffer);
                        }
                    }
                }
                return Some(batch);
            }
            state = self.shared.ready.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for Batches {
    /// The workers stop after the image each is on.
    fn drop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.space.notify_all();
    }
}

/// The state the workers and the consumer share.
struct Shared {
    /// How many images there are, in batches of `batch_size`.
    images: usize,
    batch_size: usize,
    state: Mutex<State>,
    /// A batch is complete.
    ready: Condvar,
    /// The consumer took a batch: the workers may go further ahead.
    space: Condvar,
}

type Loaded = Result<Vec<View>, (PathBuf, String)>;

struct State {
    /// The next position to hand out.
    next: usize,
    /// Batches the consumer has taken.
    consumed: usize,
    /// Batches being loaded, by index.
    pending: BTreeMap<usize, Pending>,
    /// Frame buffers to reuse.
    buffers: Vec<Vec<u8>>,
    stopped: bool,
}

struct Pending {
    slots: Vec<Option<(Vec<u8>, Loaded)>>,
    remaining: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next image's position and a buffer for its frames, once its batch is within
    /// `prefetch` of the consumer's; None when every image is handed out or the consumer stopped.
    fn next_image(&self, prefetch: usize) -> Option<(usize, Vec<u8>)> {
        let mut state = self.lock();
        loop {
            if state.stopped || state.next >= self.images {
                return None;
            }
            if state.next / self.batch_size < state.consumed + prefetch {
                let position = state.next;
                state.next += 1;
                let buffer = state.buffers.pop().unwrap_or_default();
                return Some((position, buffer));
            }
            state = self.space.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Puts the image at `position` into its batch, and wakes the consumer when that completes.
    fn finish(&self, position: usize, buffer: Vec<u8>, result: Loaded) {
        let mut state = self.lock();
        let index = position / self.batch_size;
        let images = self.batch_size.min(self.images - index * self.batch_size);
        let batch = state
            .pending
            .entry(index)
            .or_insert_with(|| Pending { slots: (0..images).map(|_| None).collect(), remaining: images });
        batch.slots[position - index * self.batch_size] = Some((buffer, result));
        batch.remaining -= 1;
        if batch.remaining == 0 {
            self.ready.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn samples(n: usize) -> Vec<Sample> {
        (0..n).map(|i| Sample::file(PathBuf::from(format!("image-{i}")), i % 3)).collect()
    }

    /// An image's frame holds its position, so that a batch shows where each image landed.
    fn one_byte_frames(n: usize, batch: usize, workers: usize, fail: fn(usize) -> bool) -> Batches {
        let shape = FrameShape { side: 1, per_image: 1 };
        spawn(
            samples(n),
            batch,
            shape,
            workers,
            || (),
            move |_, i, _, out| {
                if i % 7 == 3 {
                    std::thread::sleep(Duration::from_millis(2)); // images finish out of order
                }
                if fail(i) {
                    anyhow::bail!("image {i} is unreadable")
                }
                out.fill(i as u8);
                Ok(vec![View::at(0, 0, 0)])
            },
        )
    }

    /// With several workers finishing out of order, every image arrives once, in order, in
    /// batches of the asked size (the last one shorter), its frame its own; failures are
    /// reported in their batch with the image's path, and the buffers are recycled.
    #[test]
    fn images_come_back_in_order_whatever_order_the_workers_finish_in() {
        let (n, batch) = (103, 10);
        let mut next = 0;
        for (b, got) in one_byte_frames(n, batch, 4, |i| i % 25 == 24).enumerate() {
            let expected: Vec<usize> = (b * batch..((b + 1) * batch).min(n)).collect();
            let loaded: Vec<usize> = got.items.iter().map(|(i, _)| *i).collect();
            let failed: Vec<String> = got.failures.iter().map(|(p, _)| p.display().to_string()).collect();
            assert_eq!(loaded.len() + failed.len(), expected.len());
            for &i in &expected {
                assert_eq!(loaded.contains(&i), i % 25 != 24, "image {i}");
            }
            assert!(loaded.windows(2).all(|w| w[0] < w[1]));
            let should_fail: Vec<String> =
                expected.iter().filter(|&&i| i % 25 == 24).map(|i| format!("image-{i}")).collect();
            assert_eq!(failed, should_fail);
            for ((i, _), frame) in got.items.iter().zip(&got.frames) {
                assert_eq!(frame, &[*i as u8; 3]);
            }
            next += expected.len();
        }
        assert_eq!(next, n);
    }

    /// The workers go at most two batches ahead of the consumer, whatever the data set's size.
    #[test]
    fn the_workers_stay_two_batches_ahead() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let started = Arc::new(AtomicUsize::new(0));
        let counted = started.clone();
        let shape = FrameShape { side: 1, per_image: 1 };
        let mut batches = spawn(
            samples(1000),
            10,
            shape,
            3,
            || (),
            move |_, _, _, _| {
                counted.fetch_add(1, Ordering::Relaxed);
                Ok(vec![View::at(0, 0, 0)])
            },
        );
        // however long the workers get, they stop at the two batches' images
        let settled = |want: usize| {
            let start = std::time::Instant::now();
            while started.load(Ordering::Relaxed) < want && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(50));
            started.load(Ordering::Relaxed)
        };
        assert_eq!(settled(20), 20);
        batches.next();
        assert_eq!(settled(30), 30);
    }

    /// A consumer that stops early does not wait for the rest, and a worker that panics is an
    /// error for that image, not a consumer waiting forever.
    #[test]
    fn stopping_early_and_panics_end_cleanly() {
        let mut batches = one_byte_frames(1000, 8, 2, |_| false);
        assert_eq!(batches.next().map(|b| b.items.len()), Some(8));
        drop(batches); // the workers stop after their current image
        let shape = FrameShape { side: 1, per_image: 1 };
        let panicking = spawn(
            samples(5),
            2,
            shape,
            2,
            || (),
            |_, i, _, _| {
                if i == 2 {
                    panic!("a bug");
                }
                Ok(vec![View::at(0, 0, 0)])
            },
        );
        let failures: Vec<usize> = panicking.map(|b| b.failures.len()).collect();
        assert_eq!(failures, [0, 1, 0]);
    }
}
