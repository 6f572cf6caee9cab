//! Value parsers for command-line flags, shared by `cli` and `bench`: a number that is out of
//! range is refused when the flags are read, not discovered as a crash or a NaN later.
//!
//! Both command modules use it, so neither imports the other.

/// For counts that must be positive (batch sizes, image limits, step intervals): 0 is refused
/// when the flags are read, not discovered as a crash later.
pub(crate) fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// For rates and factors (`--lr`, `--gamma`): NaN, infinities, 0 and negative values are
/// refused, as they would train NaN or nothing at all.
pub(crate) fn positive(s: &str) -> Result<f64, String> {
    number_where(s, |v| v.is_finite() && v > 0.0, "a finite number above 0")
}

/// For penalties and spreads (`--weight-decay`, `--pca-std`): finite and at least 0.
pub(crate) fn non_negative(s: &str) -> Result<f64, String> {
    number_where(s, |v| v.is_finite() && v >= 0.0, "a finite number of at least 0")
}

/// For `--momentum` and error fractions: in [0, 1).
pub(crate) fn fraction(s: &str) -> Result<f64, String> {
    number_where(s, |v| (0.0..1.0).contains(&v), "at least 0 and below 1")
}

/// `s` as a number that passes `ok`, else an error saying it must be `what`.
fn number_where(s: &str, ok: impl Fn(f64) -> bool, what: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if ok(v) => Ok(v),
        Ok(v) => Err(format!("must be {what}, not {v}")),
        Err(e) => Err(e.to_string()),
    }
}

/// `-j, --workers`: the loader's decoding threads, as PyTorch's ImageNet example names them.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Workers {
    /// Decoding workers: threads of their own beside the compute threads, each decoding and
    /// resizing the next image (default: one a core).
    #[arg(short = 'j', long = "workers", value_parser = at_least_one)]
    workers: Option<usize>,
}

impl Workers {
    /// The number asked for, or one a core.
    pub fn count(&self) -> usize {
        self.workers.unwrap_or_else(crate::data::loader::default_workers)
    }
}
