//! Images in, tensors out: decoding ([`decode`]), the exact preprocessing of each preset
//! ([`transform`]), labelled image sets in every ImageNet layout ([`dataset`]) and the
//! parallel, bounded loading pipeline that feeds the net ([`loader`]), and the paper's
//! 256x256 images prepared once into WebDataset shards ([`shards`]).

pub mod augment;
pub mod dataset;
pub mod loader;
mod matfile;
pub mod shards;
pub mod transform;

use std::path::Path;

use anyhow::Context;
use image::RgbImage;

/// The most pixels an image may have: where Pillow stops with a `DecompressionBombError`
/// (twice its `MAX_IMAGE_PIXELS`), checked from the header before anything is decoded.
pub const MAX_IMAGE_PIXELS: u64 = 2 * transform::MAX_RESIZED_PIXELS;

/// Decodes an image file to 8-bit RGB the way PIL's `Image.open(path).convert("RGB")` does:
/// greyscale is replicated, alpha dropped, EXIF orientation ignored. The format is taken from
/// the file's bytes, not its extension. JPEGs go through libjpeg-turbo's decoder (as in PIL:
/// integer IDCT, fancy upsampling), so the pixels are PIL's, not merely close to them.
pub fn decode(path: &Path) -> anyhow::Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_bytes(&bytes, path)
}

/// [`decode`] for an image already read (a member of a shard): `path` names it in errors.
pub fn decode_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<RgbImage> {
    decode_bytes_into(bytes, path, Vec::new())
}

/// A loader worker's buffers, reused image after image: for the file's bytes and the decoded
/// pixels (see [`dataset::Sample::decode_with`]), and the resize's.
#[derive(Default)]
pub struct Scratch {
    bytes: Vec<u8>,
    pixels: Vec<u8>,
    pub resize: transform::ResizeScratch,
}

impl Scratch {
    /// Takes back the pixels of an image [`dataset::Sample::decode_with`] decoded, for the next.
    pub fn recycle(&mut self, img: RgbImage) {
        self.pixels = img.into_raw();
    }
}

/// [`decode_bytes`] into `pixels` (a buffer to reuse; JPEGs are decoded into it).
fn decode_bytes_into(bytes: &[u8], path: &Path, pixels: Vec<u8>) -> anyhow::Result<RgbImage> {
    if bytes.starts_with(&[0xFF, 0xD8]) {
        if !jpeg_is_complete(bytes) {
            // PIL refuses these ("image file is truncated"); Rust's decoder would fill in grey.
            anyhow::bail!("image {} is truncated (its JPEG data has no end-of-image marker)", path.display())
        }
        match decode_jpeg(bytes, pixels) {
            Jpeg::Decoded(img) => return Ok(img),
            Jpeg::TooLarge(w, h) => bail_too_large(path, w, h)?,
            Jpeg::NotHandled => {}
        }
    }
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()?
        .into_dimensions()
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    bail_too_large(path, w, h)?;
    let img = image::load_from_memory(bytes).with_context(|| format!("cannot decode image {}", path.display()))?;
    Ok(img.to_rgb8())
}

/// The pixel limit, checked from the header before anything is decoded.
fn bail_too_large(path: &Path, w: u32, h: u32) -> anyhow::Result<()> {
    if w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        anyhow::bail!(
            "image {} is {w}x{h}, more than the {MAX_IMAGE_PIXELS} pixels allowed (Pillow's limit)",
            path.display()
        )
    }
    Ok(())
}

enum Jpeg {
    Decoded(RgbImage),
    /// Its header's size, over [`MAX_IMAGE_PIXELS`]: nothing was decoded.
    TooLarge(u32, u32),
    /// What libjpeg cannot turn into RGB (CMYK) or rejects: for the `image` crate's decoder.
    NotHandled,
}

/// RGB or greyscale JPEG through libjpeg (mozjpeg's build of libjpeg-turbo), into `pixels`.
fn decode_jpeg(bytes: &[u8], mut pixels: Vec<u8>) -> Jpeg {
    silence_libjpeg_panics();
    // mozjpeg reports libjpeg errors by unwinding; catch them here.
    std::panic::catch_unwind(move || -> Option<Jpeg> {
        let decompress = mozjpeg::Decompress::new_mem(bytes).ok()?;
        let (w, h) = (decompress.width() as u32, decompress.height() as u32);
        if w as u64 * h as u64 > MAX_IMAGE_PIXELS {
            return Some(Jpeg::TooLarge(w, h));
        }
        let mut started = decompress.rgb().ok()?;
        pixels.resize(w as usize * h as usize * 3, 0);
        started.read_scanlines_into::<u8>(&mut pixels).ok()?;
        started.finish().ok()?;
        RgbImage::from_raw(w, h, pixels).map(Jpeg::Decoded)
    })
    .ok()
    .flatten()
    .unwrap_or(Jpeg::NotHandled)
}

/// `img` as a baseline JPEG at `quality` (1-100) through mozjpeg's libjpeg-turbo profile
/// (`JCP_FASTEST`: libjpeg's standard tables, no trellis or progressive scans, which decode
/// slower): the same bytes every time, a file every JPEG reader opens.
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> anyhow::Result<Vec<u8>> {
    silence_libjpeg_panics();
    std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        compress.set_fastest_defaults();
        compress.set_quality(quality as f32);
        compress.set_size(img.width() as usize, img.height() as usize);
        let mut started = compress.start_compress(Vec::new())?;
        started.write_scanlines(img.as_raw())?;
        started.finish()
    })
    .map_err(|_| anyhow::anyhow!("libjpeg could not encode a {}x{} image", img.width(), img.height()))?
    .context("cannot encode JPEG")
}

/// libjpeg errors arrive as panics inside mozjpeg; they are handled, so keep them off stderr.
fn silence_libjpeg_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|l| l.file().contains("mozjpeg")) {
                default(info)
            }
        }));
    });
}

/// Whether a JPEG's last scan is followed by an end-of-image marker (FF D9): whether, searching
/// from the end, an FF D9 comes before any start-of-scan (FF DA). Inside entropy-coded data a
/// 0xFF is always followed by 0x00 or a restart marker, so neither marker occurs there by
/// chance; a complete file ends in FF D9, so the search usually stops at once.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_marker = bytes.windows(2).rev().find_map(|w| match w {
        [0xFF, m @ (0xD9 | 0xDA)] => Some(*m),
        _ => None,
    });
    last_marker == Some(0xD9)
}
