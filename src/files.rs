//! Files in and out, so that nothing is lost and nothing untrusted is believed: every file
//! the crate writes goes to a temporary beside it, synced, then renamed (a crash or a full disk
//! never leaves half a file under the final name), and the readers of untrusted bytes share the
//! checks here (sizes multiplied with overflow checked, strings shown escaped and cut short).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// `value` as pretty JSON to `path`, atomically, or to stdout where `path` is `-`.
pub fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    if path == Path::new("-") {
        println!("{json}");
        return Ok(());
    }
    write_atomically(path, |out| std::io::Write::write_all(out, json.as_bytes()))
}

/// Writes a file through a temporary file in the same folder (`.NAME.tmpPID`), synced and
/// renamed into place, so that a crash or a full disk never leaves a half-written file under
/// the final name. The file is created as any other (mode 0666 less the umask).
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    use std::io::Write;
    if path.file_name().is_none() {
        bail!("output path {} has no file name", path.display())
    }
    let tmp = temporary_path(path);
    let written = || -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
        write(&mut out)?;
        out.flush()?;
        drop(out);
        file.sync_all()
    };
    if let Err(e) = written() {
        let _ = std::fs::remove_file(&tmp);
        bail!("cannot write {}: {e}", tmp.display())
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// Where [`write_atomically`] writes `path` before renaming it: `.NAME.tmpPID` beside it.
fn temporary_path(path: &Path) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    dir.join(format!(".{name}.tmp{}", std::process::id()))
}

/// Removes the temporary files that writers killed mid-write left in `dir` (see
/// `.NAME.tmpPID`; those of a process still running are kept) and returns how many.
pub fn remove_stale_temporaries(dir: &Path) -> anyhow::Result<usize> {
    let mut removed = 0;
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((_, pid)) = name.strip_prefix('.').and_then(|rest| rest.rsplit_once(".tmp")) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove the stale {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The most characters of a file-derived string an error message shows.
const MAX_PRINTED_CHARS: usize = 64;

/// A string from the file as an error message may show it: control characters escaped (a
/// corrupt file must not write escape sequences to the terminal), cut to
/// [`MAX_PRINTED_CHARS`] characters. Every reader of untrusted files shows their strings through it.
pub(crate) fn printable(s: &str) -> String {
    let mut chars = s.escape_debug();
    let mut shown: String = chars.by_ref().take(MAX_PRINTED_CHARS).collect();
    if chars.next().is_some() {
        shown.push_str("...");
    }
    shown
}

/// The element count of a tensor of shape `dims`, or `None` if the product of its nonzero
/// dims overflows: Candle multiplies all dims (zeros last) to make a contiguous tensor's
/// strides, so a zero dim cannot excuse huge others.
pub(crate) fn element_count(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d.max(1)))?;
    Some(dims.iter().product())
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
