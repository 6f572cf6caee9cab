//! Just enough of MATLAB's level-5 MAT-file format to read the ILSVRC2012 devkit's `meta.mat`:
//! the struct array `synsets` with its `ILSVRC2012_ID` (number) and `WNID` (string) fields.
//! Compressed (`miCOMPRESSED`, MATLAB's default since v7) and plain elements are both read.
//!
//! Bounded whatever the file holds: every slice is checked, a compressed element inflates to
//! at most [`MAX_INFLATED`] bytes, structs nest at most [`MAX_NESTING`] deep, and a struct
//! array has no more elements than its bytes can describe.

use std::collections::HashMap;
use std::io::Read;

use anyhow::{anyhow, bail, Context};

/// `ILSVRC2012_ID -> WNID` from a devkit `meta.mat`.
pub fn ilsvrc_ids(bytes: &[u8]) -> anyhow::Result<HashMap<usize, String>> {
    if bytes.len() < 128 || &bytes[126..128] != b"IM" {
        bail!("not a little-endian level-5 MAT-file")
    }
    let mut pos = 128;
    while pos < bytes.len() {
        let (kind, data, next) = element(bytes, pos)?;
        pos = next;
        let matrix = match kind {
            MI_COMPRESSED => {
                let mut plain = Vec::new();
                flate2::read::ZlibDecoder::new(data)
                    .take(MAX_INFLATED + 1)
                    .read_to_end(&mut plain)
                    .context("corrupt compressed element")?;
                if plain.len() as u64 > MAX_INFLATED {
                    bail!("a compressed element inflates to more than {MAX_INFLATED} bytes: not a devkit meta.mat")
                }
                let (kind, data, _) = element(&plain, 0)?;
                if kind != MI_MATRIX {
                    continue;
                }
                Matrix::parse(data, 0)?
            }
            MI_MATRIX => Matrix::parse(data, 0)?,
            _ => continue,
        };
        if matrix.name == "synsets" {
            return synset_ids(&matrix);
        }
    }
    bail!("no `synsets` variable in the file")
}

const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;

/// The most bytes a compressed element may inflate to (the devkit's `synsets` take 1.3 MB).
const MAX_INFLATED: u64 = 64 << 20;
/// How deep structs may hold structs (the devkit's go one level down).
const MAX_NESTING: usize = 4;

/// `(type, payload, offset of the next element)` of the element at `pos`.
fn element(bytes: &[u8], pos: usize) -> anyhow::Result<(u32, &[u8], usize)> {
    let word = |at: usize| -> anyhow::Result<u32> {
        let b = bytes.get(at..at + 4).ok_or_else(|| anyhow!("truncated MAT-file"))?;
        Ok(u32::from_le_bytes(b.try_into().expect("4")))
    };
    let first = word(pos)?;
    if first >> 16 != 0 {
        // small data element: type and size share the first word, data fits in the second
        let (kind, size) = (first & 0xffff, (first >> 16) as usize);
        let data = bytes.get(pos + 4..pos + 4 + size.min(4)).ok_or_else(|| anyhow!("truncated MAT-file"))?;
        return Ok((kind, data, pos + 8));
    }
    let size = word(pos + 4)? as usize;
    let data = bytes.get(pos + 8..pos + 8 + size).ok_or_else(|| anyhow!("truncated MAT-file"))?;
    let padded = if first == MI_COMPRESSED { size } else { size.div_ceil(8) * 8 };
    Ok((first, data, pos + 8 + padded))
}

enum Value {
    Number(f64),
    Text(String),
    Other,
}

struct Matrix {
    name: String,
    /// For a struct array: each element's fields, in order.
    elements: Vec<HashMap<String, Value>>,
    value: Value,
}

impl Matrix {
    /// The matrix in `data`, `depth` structs down.
    fn parse(data: &[u8], depth: usize) -> anyhow::Result<Self> {
        if depth > MAX_NESTING {
            bail!("structs nested more than {MAX_NESTING} deep: not a devkit meta.mat")
        }
        let (_, flags, pos) = element(data, 0)?;
        let class = flags.first().copied().unwrap_or(0);
        let (_, dims, pos) = element(data, pos)?;
        let count = dims
            .chunks_exact(4)
            .try_fold(1usize, |n, c| n.checked_mul(i32::from_le_bytes(c.try_into().expect("4")).max(0) as usize))
            .ok_or_else(|| anyhow!("a matrix's dimensions overflow"))?;
        let (_, name, mut pos) = element(data, pos)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let mut m = Matrix { name, elements: Vec::new(), value: Value::Other };
        match class {
            2 => {
                // struct: field name length, field names, then one matrix per field per element
                let (_, len, p) = element(data, pos)?;
                let len = u32::from_le_bytes(len.get(..4).context("bad struct")?.try_into().expect("4")) as usize;
                let (_, names, p) = element(data, p)?;
                pos = p;
                let names: Vec<String> = names
                    .chunks(len.max(1))
                    .map(|n| String::from_utf8_lossy(n).trim_end_matches('\0').to_string())
                    .collect();
                // each field of each element takes at least 8 bytes
                if names.is_empty() || count > data.len() / (8 * names.len()) {
                    bail!(
                        "a struct array of {count} elements and {} fields cannot fit in {} bytes",
                        names.len(),
                        data.len()
                    )
                }
                for _ in 0..count {
                    let mut fields = HashMap::new();
                    for field in &names {
                        let (kind, sub, next) = element(data, pos)?;
                        pos = next;
                        let v = if kind == MI_MATRIX && !sub.is_empty() {
                            Matrix::parse(sub, depth + 1)?.value
                        } else {
                            Value::Other
                        };
                        fields.insert(field.clone(), v);
                    }
                    m.elements.push(fields);
                }
            }
            4 => {
                let (kind, chars, _) = element(data, pos)?;
                let text = match kind {
                    4 => chars
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .map(|u| char::from_u32(u as u32).unwrap_or('?'))
                        .collect(),
                    _ => String::from_utf8_lossy(chars).into_owned(),
                };
                m.value = Value::Text(text);
            }
            6..=15 => {
                let (kind, real, _) = element(data, pos)?;
                m.value = first_number(kind, real).map_or(Value::Other, Value::Number);
            }
            _ => {}
        }
        Ok(m)
    }
}

/// The first value of a numeric element of MAT type `kind`.
fn first_number(kind: u32, b: &[u8]) -> Option<f64> {
    Some(match kind {
        1 => *b.first()? as i8 as f64,
        2 => *b.first()? as f64,
        3 => i16::from_le_bytes(b.get(..2)?.try_into().ok()?) as f64,
        4 => u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as f64,
        5 => i32::from_le_bytes(b.get(..4)?.try_into().ok()?) as f64,
        6 => u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as f64,
        7 => f32::from_le_bytes(b.get(..4)?.try_into().ok()?) as f64,
        9 => f64::from_le_bytes(b.get(..8)?.try_into().ok()?),
        12 => i64::from_le_bytes(b.get(..8)?.try_into().ok()?) as f64,
        13 => u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as f64,
        _ => return None,
    })
}

fn synset_ids(synsets: &Matrix) -> anyhow::Result<HashMap<usize, String>> {
    let mut ids = HashMap::new();
    for s in &synsets.elements {
        if let (Some(Value::Number(id)), Some(Value::Text(wnid))) = (s.get("ILSVRC2012_ID"), s.get("WNID")) {
            ids.insert(*id as usize, wnid.clone());
        }
    }
    if ids.is_empty() {
        bail!("`synsets` has no ILSVRC2012_ID / WNID fields")
    }
    Ok(ids)
}
