use std::process::ExitCode;

fn main() -> ExitCode {
    keep_freed_memory();
    match alexnet::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
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
