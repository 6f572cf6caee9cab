//! The loading pipeline: items are decoded and transformed in parallel (rayon), a batch at a
//! time, on a producer thread that stays at most `prefetch` batches ahead of the consumer, so
//! the net rarely waits and memory stays bounded whatever the data set's size.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use rayon::prelude::*;

use super::dataset::Sample;

/// A batch of prepared items (with their positions in the sample list) and the items that
/// failed, with the reason.
pub struct Batch<T> {
    pub items: Vec<(usize, T)>,
    pub failures: Vec<(PathBuf, String)>,
}

/// Starts preparing `samples` with `prepare(position, sample)` in batches of `batch_size`.
pub fn spawn<T, F>(samples: Vec<Sample>, batch_size: usize, prefetch: usize, prepare: F) -> Batches<T>
where
    T: Send + 'static,
    F: Fn(usize, &Sample) -> anyhow::Result<T> + Send + Sync + 'static,
{
    let (tx, rx) = sync_channel(prefetch.max(1));
    let prepare = Arc::new(prepare);
    std::thread::spawn(move || {
        let positions: Vec<usize> = (0..samples.len()).collect();
        for chunk in positions.chunks(batch_size.max(1)) {
            let results: Vec<(usize, anyhow::Result<T>)> =
                chunk.par_iter().map(|&i| (i, prepare(i, &samples[i]))).collect();
            let mut batch = Batch { items: Vec::with_capacity(chunk.len()), failures: Vec::new() };
            for (i, result) in results {
                match result {
                    Ok(item) => batch.items.push((i, item)),
                    Err(e) => batch.failures.push((samples[i].path.clone(), format!("{e:#}"))),
                }
            }
            if tx.send(batch).is_err() {
                return; // the consumer stopped
            }
        }
    });
    Batches(rx)
}

/// The prepared batches, in order. A thread of rayon's pool (the binary's main thread is one)
/// waiting for the next batch runs the pool's pending jobs meanwhile, the batches' own preparing
/// among them: blocked, it would leave that work to the pool's other threads alone.
pub struct Batches<T>(Receiver<Batch<T>>);

impl<T> Iterator for Batches<T> {
    type Item = Batch<T>;

    fn next(&mut self) -> Option<Batch<T>> {
        if rayon::current_thread_index().is_none() {
            return self.0.recv().ok();
        }
        loop {
            match self.0.try_recv() {
                Ok(batch) => return Some(batch),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            if rayon::yield_now() != Some(rayon::Yield::Executed) {
                // nothing to run: wait a little for the batch instead
                match self.0.recv_timeout(Duration::from_micros(200)) {
                    Ok(batch) => return Some(batch),
                    Err(RecvTimeoutError::Disconnected) => return None,
                    Err(RecvTimeoutError::Timeout) => {}
                }
            }
        }
    }
}
