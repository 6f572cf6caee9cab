//! The loading pipeline: items are decoded and transformed in parallel (rayon), a batch at a
//! time, on a producer thread that stays at most `prefetch` batches ahead of the consumer, so
//! the net rarely waits and memory stays bounded whatever the data set's size.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use rayon::prelude::*;

use super::dataset::Sample;

/// A batch of prepared items (with their positions in the sample list) and the items that
/// failed, with the reason.
pub struct Batch<T> {
    pub items: Vec<(usize, T)>,
    pub failures: Vec<(PathBuf, String)>,
}

/// Starts preparing `samples` with `prepare(position, sample)` in batches of `batch_size`.
pub fn spawn<T, F>(samples: Vec<Sample>, batch_size: usize, prefetch: usize, prepare: F) -> Receiver<Batch<T>>
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
    rx
}
