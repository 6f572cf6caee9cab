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

/// Whether JPEGs decode with libjpeg-turbo's SIMD code on this machine. False where the build
/// found no nasm (mozjpeg-sys then compiles its `jsimd_none.c`, whose every answer is "no";
/// decoding is about a third slower, with the same pixels), where the CPU lacks SSE2, or where
/// libjpeg-turbo's `JSIMD_FORCENONE=1` is set in the environment.
pub fn jpeg_simd() -> bool {
    extern "C" {
        // libjpeg-turbo's own question before its integer IDCT (jsimd.c or jsimd_none.c)
        fn jsimd_can_idct_islow() -> std::ffi::c_int;
    }
    // SAFETY: takes nothing, reads the CPU's features once, returns 0 or 1
    unsafe { jsimd_can_idct_islow() != 0 }
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
            Jpeg::TooLarge(w, h) => return Err(too_large(path, w, h)),
            Jpeg::Failed(e) => anyhow::bail!("cannot decode image {}: {e}", path.display()),
            Jpeg::NotRgb => {}
        }
    }
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()?
        .into_dimensions()
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    if w as u64 * h as u64 > MAX_IMAGE_PIXELS {
        return Err(too_large(path, w, h));
    }
    let img = image::load_from_memory(bytes).with_context(|| format!("cannot decode image {}", path.display()))?;
    Ok(img.to_rgb8())
}

/// The error for an image over the pixel limit, found from its header.
fn too_large(path: &Path, w: u32, h: u32) -> anyhow::Error {
    anyhow::anyhow!(
        "image {} is {w}x{h}, more than the {MAX_IMAGE_PIXELS} pixels allowed (Pillow's limit)",
        path.display()
    )
}

enum Jpeg {
    Decoded(RgbImage),
    /// Its header's size, over [`MAX_IMAGE_PIXELS`]: nothing was decoded.
    TooLarge(u32, u32),
    /// CMYK or YCCK, which libjpeg does not turn into RGB: for the `image` crate's decoder.
    NotRgb,
    /// libjpeg's error, which PIL, reading through the same library, stops at too (the
    /// `image` crate's more lenient decoder is not asked).
    Failed(String),
}

/// A JPEG through libjpeg (mozjpeg's build of libjpeg-turbo), RGB or greyscale into `pixels`.
fn decode_jpeg(bytes: &[u8], mut pixels: Vec<u8>) -> Jpeg {
    use mozjpeg::ColorSpace::{JCS_CMYK, JCS_YCCK};
    silence_libjpeg_panics();
    // mozjpeg reports libjpeg errors by unwinding, or as I/O errors; both end here
    let decoded = std::panic::catch_unwind(move || -> std::io::Result<Jpeg> {
        let decompress = mozjpeg::Decompress::new_mem(bytes)?;
        let (w, h) = (decompress.width() as u32, decompress.height() as u32);
        if w as u64 * h as u64 > MAX_IMAGE_PIXELS {
            return Ok(Jpeg::TooLarge(w, h));
        }
        if matches!(decompress.color_space(), JCS_CMYK | JCS_YCCK) {
            return Ok(Jpeg::NotRgb);
        }
        let mut started = decompress.rgb()?;
        pixels.resize(w as usize * h as usize * 3, 0);
        started.read_scanlines_into::<u8>(&mut pixels)?;
        started.finish()?;
        Ok(RgbImage::from_raw(w, h, pixels).map_or_else(|| Jpeg::Failed("a short pixel buffer".into()), Jpeg::Decoded))
    });
    match decoded {
        Ok(Ok(jpeg)) => jpeg,
        Ok(Err(e)) => Jpeg::Failed(e.to_string()),
        Err(panic) => Jpeg::Failed(panic.downcast_ref::<String>().cloned().unwrap_or_else(|| "libjpeg failed".into())),
    }
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

/// Whether a JPEG's markers, walked from its start, reach the end-of-image marker before its
/// bytes run out: what PIL checks by letting libjpeg read to the end. It refuses a file cut
/// short ("image file is truncated") and ignores whatever follows the end-of-image marker (such
/// as the video a phone's motion photo appends, which may hold any bytes). Each segment is
/// skipped by its length (so an EXIF thumbnail's markers are not taken for the image's), each
/// scan's entropy-coded data up to the next marker: the first FF followed by neither 00 (a
/// stuffed FF) nor a restart marker. Like libjpeg, stray bytes before a marker and fill bytes
/// (FF) within one are skipped. One pass, bounded by the file's length.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let next_ff = |at: usize| bytes.get(at..).and_then(|rest| memchr::memchr(0xFF, rest)).map(|i| at + i);
    let mut at = 2; // after the start-of-image marker
    loop {
        let Some(ff) = next_ff(at) else { return false };
        at = ff;
        while bytes.get(at) == Some(&0xFF) {
            at += 1;
        }
        let Some(&code) = bytes.get(at) else { return false };
        at += 1;
        match code {
            0xD9 => return true,
            // no length: a stray stuffed FF, TEM, a restart marker, a second start of image
            0x00 | 0x01 | 0xD0..=0xD8 => {}
            _ => {
                let Some(&[hi, lo]) = bytes.get(at..at + 2) else { return false };
                let length = u16::from_be_bytes([hi, lo]) as usize;
                if length < 2 {
                    return false; // libjpeg: "bogus marker length"
                }
                at += length; // the length counts its own two bytes
                if code == 0xDA {
                    loop {
                        let Some(ff) = next_ff(at) else { return false };
                        match bytes.get(ff + 1) {
                            Some(0x00 | 0xD0..=0xD7) => at = ff + 2,
                            Some(_) => {
                                at = ff;
                                break;
                            }
                            None => return false,
                        }
                    }
                }
            }
        }
    }
}
