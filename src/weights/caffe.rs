//! Caffe `.caffemodel` files: a protobuf `NetParameter`, decoded by hand (no protoc needed).
//!
//! Both layer forms are read: the current `layer` (field 100, `LayerParameter`: name 1,
//! blobs 7) and the V1 `layers` (field 2, `V1LayerParameter`: name 4, blobs 6). A `BlobProto`
//! gives its shape either as `BlobShape` (field 7, packed or unpacked int64 dims) or in the
//! legacy num/channels/height/width fields 1-4; its values as float `data` (5, packed or not)
//! or `double_data` (8). Each conv/fc layer `L` becomes `L.weight` and `L.bias`; legacy fc
//! blobs stored as `(1, 1, out, in)` and biases as `(1, 1, 1, out)` are squeezed.
//!
//! Nothing a file claims is allocated before it is checked: values are read from bytes the
//! file holds, a blob's dims multiply with checked arithmetic and must match its values, and
//! names from the file appear in errors only through [`printable`].

use anyhow::{anyhow, bail, Context};
use candle_core::{Device, Tensor};

use crate::files::{element_count, printable};

/// The most dims a blob may have (Caffe's `kMaxBlobAxes`).
const MAX_BLOB_DIMS: usize = 32;

/// The named tensors of a caffemodel.
pub fn load(bytes: &[u8]) -> anyhow::Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::new();
    for field in Fields::new(bytes) {
        let field = field.context("malformed NetParameter")?;
        let layer = match field {
            (2, Wire::Bytes(b)) => read_layer(b, 4, 6, 1).context("malformed V1 layer")?,
            (100, Wire::Bytes(b)) => read_layer(b, 1, 7, 0).context("malformed layer")?,
            _ => continue,
        };
        let (name, blobs) = layer;
        if blobs.is_empty() {
            continue;
        }
        if blobs.len() > 2 {
            bail!("layer `{}` has {} blobs; a conv or fc layer has a weight and a bias", printable(&name), blobs.len())
        }
        for (blob, suffix) in blobs.into_iter().zip(["weight", "bias"]) {
            let key = format!("{name}.{suffix}");
            let tensor = blob.into_tensor(suffix == "bias").with_context(|| format!("blob `{}`", printable(&key)))?;
            tensors.push((key, tensor));
        }
    }
    if tensors.is_empty() {
        bail!("no layers with weights found (is this a caffemodel?)")
    }
    Ok(tensors)
}

/// The values of a single serialized `BlobProto` (e.g. Caffe's mean image `.binaryproto`).
pub fn read_blob(bytes: &[u8]) -> anyhow::Result<Vec<f32>> {
    let blob = Blob::read(bytes)?;
    if blob.data.is_empty() {
        bail!("the blob holds no values")
    }
    Ok(blob.data)
}

/// `(name, blobs)` of a layer message whose name and blobs have the given field numbers.
/// `v0_field` is the V1 layer's nested pre-2014 `V0LayerParameter`, which we do not read.
fn read_layer(bytes: &[u8], name_field: u32, blobs_field: u32, v0_field: u32) -> anyhow::Result<(String, Vec<Blob>)> {
    let mut name = String::new();
    let mut blobs = Vec::new();
    for field in Fields::new(bytes) {
        match field? {
            (f, Wire::Bytes(b)) if f == name_field => name = String::from_utf8_lossy(b).into_owned(),
            (f, Wire::Bytes(b)) if f == blobs_field => blobs.push(Blob::read(b)?),
            (f, Wire::Bytes(_)) if v0_field != 0 && f == v0_field => {
                bail!("this caffemodel uses Caffe's V0 layer format (before 2014); upgrade it with Caffe's upgrade_net_proto_binary")
            }
            _ => {}
        }
    }
    Ok((name, blobs))
}

#[derive(Default)]
struct Blob {
    legacy: [Option<u64>; 4],
    shape: Option<Vec<usize>>,
    data: Vec<f32>,
}

impl Blob {
    fn read(bytes: &[u8]) -> anyhow::Result<Self> {
        let mut blob = Blob::default();
        for field in Fields::new(bytes) {
            match field? {
                (n @ 1..=4, Wire::Varint(v)) => blob.legacy[n as usize - 1] = Some(v),
                (5, Wire::Bytes(b)) => {
                    blob.data.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))))
                }
                (5, Wire::Fixed32(v)) => blob.data.push(f32::from_bits(v)),
                (8, Wire::Bytes(b)) => {
                    blob.data.extend(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32))
                }
                (8, Wire::Fixed64(v)) => blob.data.push(f64::from_bits(v) as f32),
                (7, Wire::Bytes(b)) => blob.shape = Some(read_shape(b)?),
                _ => {}
            }
        }
        Ok(blob)
    }

    fn into_tensor(self, is_bias: bool) -> anyhow::Result<Tensor> {
        let [num, channels, height, width] = self.legacy.map(|d| dim(d.unwrap_or(1)));
        let shape: Vec<usize> = match (self.shape, [num?, channels?, height?, width?]) {
            (Some(dims), _) => dims,
            (None, [_, _, _, out]) if is_bias => vec![out], // legacy bias: (1, 1, 1, out)
            (None, [1, 1, out, inp]) => vec![out, inp],     // legacy fc weight: (1, 1, out, in)
            (None, nchw) => nchw.to_vec(),
        };
        if shape.len() > MAX_BLOB_DIMS {
            bail!("the blob has {} dims; Caffe allows at most {MAX_BLOB_DIMS}", shape.len())
        }
        let numel = element_count(&shape).ok_or_else(|| anyhow!("shape {shape:?} overflows: not a real blob"))?;
        if numel != self.data.len() {
            bail!("shape {shape:?} needs {numel} values but the blob holds {} (file truncated?)", self.data.len())
        }
        Ok(Tensor::from_vec(self.data, shape, &Device::Cpu)?)
    }
}

fn read_shape(bytes: &[u8]) -> anyhow::Result<Vec<usize>> {
    let mut dims = Vec::new();
    for field in Fields::new(bytes) {
        match field? {
            (1, Wire::Varint(v)) => dims.push(dim(v)?),
            (1, Wire::Bytes(packed)) => {
                let mut pos = 0;
                while pos < packed.len() {
                    dims.push(dim(varint(packed, &mut pos)?)?);
                }
            }
            _ => {}
        }
    }
    Ok(dims)
}

/// A blob dim as the file stores it (an int64), as a size.
fn dim(v: u64) -> anyhow::Result<usize> {
    usize::try_from(v).map_err(|_| anyhow!("blob dim {v} is too large"))
}

/// A protobuf field's payload.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Iterator over the `(field number, payload)` pairs of one protobuf message.
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Fields { bytes, pos: 0 }
    }

    fn take(&mut self, n: usize, field: u32) -> anyhow::Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| anyhow!("truncated: field {field} needs {n} bytes at offset {}", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn next_field(&mut self) -> anyhow::Result<(u32, Wire<'a>)> {
        let key = varint(self.bytes, &mut self.pos)?;
        let (field, wire) = ((key >> 3) as u32, key & 7);
        let payload = match wire {
            0 => Wire::Varint(varint(self.bytes, &mut self.pos)?),
            1 => Wire::Fixed64(u64::from_le_bytes(self.take(8, field)?.try_into().expect("8"))),
            2 => {
                let n = varint(self.bytes, &mut self.pos)? as usize;
                Wire::Bytes(self.take(n, field)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4, field)?.try_into().expect("4"))),
            w => bail!("unsupported protobuf wire type {w} (field {field}): not a caffemodel"),
        };
        Ok((field, payload))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = anyhow::Result<(u32, Wire<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.bytes.len() {
            return None;
        }
        let item = self.next_field();
        if item.is_err() {
            self.pos = self.bytes.len(); // stop after the first error
        }
        Some(item)
    }
}

fn varint(bytes: &[u8], pos: &mut usize) -> anyhow::Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*pos).ok_or_else(|| anyhow!("truncated varint at offset {}", *pos))?;
        *pos += 1;
        value |= ((b & 0x7f) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!("malformed varint at offset {}", *pos)
}

/// Whether `bytes` plausibly starts a caffemodel: a NetParameter's first field is its name (1),
/// V1 layers (2), or new layers (100), all length-delimited.
pub fn looks_like_caffemodel(bytes: &[u8]) -> bool {
    let mut pos = 0;
    matches!(varint(bytes, &mut pos), Ok(key) if key & 7 == 2 && matches!(key >> 3, 1 | 2 | 3 | 100))
}
