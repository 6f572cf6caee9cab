//! Work on all the cores: zeroed buffers and tasks spread over rayon's pool.

use rayon::prelude::*;

/// `vec![0f32; len]` zeroed by all the cores: the ops' fresh outputs and gradients run to
/// megabytes, and `vec!` zeroes them on one core while the others wait.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut().par_chunks_mut(1 << 16).for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: every value was just written
    unsafe { v.set_len(len) };
    v
}

/// Runs `f` on every task on all the cores, each core taking the next task as it finishes one
/// (so a core slowed by other tenants takes fewer), with scratch from `init` made once per
/// core. The calling thread spins, rather than sleeps, while the others finish their last
/// tasks: a thread asleep here took 40-100 us to run again, where a task at batch 1 takes
/// 200-400 us. Tasks must not wait on one another.
pub(crate) fn par_tasks<T: Send, S>(
    tasks: impl IntoIterator<Item = T>,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, T) + Sync,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, PoisonError};
    /// Counts a task done when dropped, also if it panicked: the spin below must end.
    struct Done<'a>(&'a AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Release);
        }
    }
    let tasks: Vec<T> = tasks.into_iter().collect();
    let count = tasks.len();
    let (queue, done) = (Mutex::new(tasks.into_iter()), AtomicUsize::new(0));
    let work = || {
        let mut scratch = None;
        loop {
            let Some(task) = queue.lock().unwrap_or_else(PoisonError::into_inner).next() else { return };
            let _done = Done(&done);
            f(scratch.get_or_insert_with(&init), task);
        }
    };
    rayon::scope(|s| {
        for _ in 1..rayon::current_num_threads().min(count) {
            s.spawn(|_| work());
        }
        work();
        while done.load(Ordering::Acquire) < count {
            std::hint::spin_loop();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::par_tasks;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn par_tasks_runs_each_task_once_and_passes_on_a_panic() {
        let (sum, inits) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let init = || inits.fetch_add(1, Ordering::Relaxed);
        par_tasks(0..1000, init, |_, i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 999 * 1000 / 2);
        assert!(inits.into_inner() <= rayon::current_num_threads());
        par_tasks(Vec::<usize>::new(), || (), |_, _| unreachable!());
        // a task that panics ends the call with its panic, where the others would otherwise
        // wait for it for ever
        let panicked = std::panic::catch_unwind(|| par_tasks(0..8, || (), |_, i| assert!(i != 5, "task {i}")));
        assert!(panicked.is_err());
    }
}
