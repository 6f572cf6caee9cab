use std::process::ExitCode;

fn main() -> ExitCode {
    die_quietly_on_a_closed_pipe();
    keep_freed_memory();
    join_the_pool();
    match alexnet::cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `alexnet inspect --json FILE | head -1`: once the reader has gone, a write to stdout
/// ends the process as it ends `cat` or `grep` (SIGPIPE, exit status 141 in a shell), where
/// Rust's default (the signal ignored) makes `println!` panic. Sockets are unaffected: the
/// standard library sends with `MSG_NOSIGNAL`.
fn die_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Every forward and backward pass allocates and frees the same large buffers. glibc serves
/// each one above 32 MiB with a fresh `mmap` and returns it with `munmap`, so every pass pays
/// page faults and TLB shootdowns again (about a tenth of a training step in profiles).
/// Keeping freed memory in the heap lets the next pass reuse it; the peak stays the same.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Makes this thread one of rayon's (its size stays `RAYON_NUM_THREADS` or the cores, this
/// thread counted in): a parallel loop then starts here at once and the pool's other threads
/// join in as they wake, where from outside the pool this thread would hand the whole loop over
/// and sleep until a woken thread had finished it. Waking a thread takes 30-150 us on this
/// machine, and a forward pass runs some 30 parallel loops. Measured in alternated runs:
/// torchvision's forward at batch 16 163-172 -> 168-208 images/s (6 pairs, all ahead), at batch
/// 1 every layer 0.1-0.3 ms faster (3 pairs); training level. While this thread waits for a
/// batch of data it runs the pool's jobs ([`alexnet::data::loader`]): `eval` end to end stays
/// level (`scripts/bench_eval.sh 64`, 3 pairs).
fn join_the_pool() {
    // fails only if a pool exists already, which then stays as it is
    let _ = rayon::ThreadPoolBuilder::new().use_current_thread().build_global();
}
