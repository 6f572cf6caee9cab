//! What `--weights` may name besides a local file:
//!
//! * `hf://OWNER/REPO/FILE`: a file of a Hugging Face Hub model repo, through hf-hub and its
//!   cache (`HF_HOME`; `HF_HUB_OFFLINE=1` uses only the cache);
//! * `torchvision`: the official `alexnet-owt-7be5be79.pth` from torchvision's own URL, cached
//!   where torchvision caches it (`$TORCH_HOME/hub/checkpoints`, by default
//!   `~/.cache/torch/hub/checkpoints`), so a copy torchvision already downloaded is reused.
//!   Its sha256 must start with the `7be5be79` in its name.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::files::sha256_file;

pub const TORCHVISION_FILE: &str = "alexnet-owt-7be5be79.pth";
pub const TORCHVISION_URL: &str = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth";

/// The local path of the weights `spec` names, downloading them first if need be.
pub fn resolve(spec: &str) -> anyhow::Result<PathBuf> {
    if let Some(rest) = spec.strip_prefix("hf://") {
        return hub(rest);
    }
    if spec == "torchvision" {
        return torchvision();
    }
    Ok(PathBuf::from(spec))
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn hub(spec: &str) -> anyhow::Result<PathBuf> {
    let mut parts = spec.splitn(3, '/');
    let (Some(owner), Some(repo), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("`hf://{spec}`: expected hf://OWNER/REPO/FILE")
    };
    let repo_id = format!("{owner}/{repo}");
    let cache = hf_hub::Cache::from_env();
    if let Some(path) = cache.repo(hf_hub::Repo::model(repo_id.clone())).get(file) {
        return Ok(path);
    }
    let cache_dir = cache.path().display().to_string();
    if offline() {
        bail!(
            "hf://{spec} is not in the Hugging Face cache ({cache_dir}) and HF_HUB_OFFLINE is set; \
             download it once with network access, or unset HF_HUB_OFFLINE"
        )
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build()?;
    api.model(repo_id).get(file).with_context(|| {
        format!("cannot download hf://{spec} (no network?); it is looked for in the Hugging Face cache {cache_dir}")
    })
}

/// torchvision's checkpoint folder: `$TORCH_HOME/hub/checkpoints`, by default under
/// `$XDG_CACHE_HOME/torch` or `~/.cache/torch`.
pub fn torchvision_cache_dir() -> PathBuf {
    let env = |k| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let torch_home = env("TORCH_HOME").unwrap_or_else(|| {
        let cache = env("XDG_CACHE_HOME").unwrap_or_else(|| env("HOME").unwrap_or_default().join(".cache"));
        cache.join("torch")
    });
    torch_home.join("hub").join("checkpoints")
}

fn torchvision() -> anyhow::Result<PathBuf> {
    let dir = torchvision_cache_dir();
    let path = dir.join(TORCHVISION_FILE);
    if !path.exists() {
        if offline() {
            bail!(
                "{} is not there and HF_HUB_OFFLINE is set; put {TORCHVISION_FILE} there (from {TORCHVISION_URL})",
                path.display()
            )
        }
        download(TORCHVISION_URL, &path).with_context(|| {
            format!("cannot download {TORCHVISION_URL} (no network?); put {TORCHVISION_FILE} at {}", path.display())
        })?;
    }
    check_hash_prefix(&path)?;
    Ok(path)
}

/// torchvision names its files after the first hex digits of their sha256.
fn check_hash_prefix(path: &Path) -> anyhow::Result<()> {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let Some(prefix) = stem.rsplit('-').next().filter(|p| p.len() >= 8) else { return Ok(()) };
    let sha = sha256_file(path)?;
    if !sha.starts_with(prefix) {
        bail!(
            "{} has sha256 {sha}, which does not start with {prefix}: the file is damaged; delete it and retry",
            path.display()
        )
    }
    Ok(())
}

/// Downloads `url` to `path` through a temporary file, with a progress line on stderr.
fn download(url: &str, path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().context("download path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let response = ureq::get(url).call()?;
    let total: Option<u64> = response.header("Content-Length").and_then(|v| v.parse().ok());
    let tmp = path.with_extension("partial");
    let mut out = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    let mut reader = response.into_reader();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut out, &buf[..n])?;
        done += n as u64;
        match total {
            Some(t) => eprint!("\rdownloading {url}: {} / {} MB", done >> 20, t >> 20),
            None => eprint!("\rdownloading {url}: {} MB", done >> 20),
        }
    }
    eprintln!();
    std::fs::rename(&tmp, path)?;
    Ok(())
}
