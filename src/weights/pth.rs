//! PyTorch `.pth` / `.pt` files, read without Python and without executing anything.
//!
//! `torch.save` writes a pickle whose tensors point at raw storages: in a zip archive
//! (`*/data.pkl` plus `*/data/<key>`, PyTorch >= 1.6) or, in the legacy format that
//! `alexnet-owt-7be5be79.pth` predates, as five pickles followed by the raw storages.
//! The unpickler below implements only the opcodes a state_dict uses and resolves only the
//! globals a state_dict needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, `torch.*Storage`). Any other global (`os.system`,
//! `builtins.eval`, ...) is refused: nothing is ever called.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Device, Tensor};

/// The tensors of a `.pth` state_dict (top level, or nested under `state_dict` or `model`).
pub fn load(path: &Path, bytes: &[u8]) -> anyhow::Result<Vec<(String, Tensor)>> {
    let file = path.display();
    let (object, storages) = if bytes.starts_with(b"PK\x03\x04") {
        read_zip(bytes).with_context(|| format!("{file}: not a readable PyTorch zip archive"))?
    } else {
        read_legacy(bytes).with_context(|| format!("{file}: not a readable PyTorch (legacy) file"))?
    };
    let dict = state_dict(&object).ok_or_else(|| {
        anyhow!("{file}: the pickle holds no state_dict (a dict of tensors, possibly under `state_dict` or `model`)")
    })?;
    let mut tensors = Vec::new();
    for (key, value) in dict {
        if let (Value::Str(key), Value::Tensor(t)) = (key, value) {
            let tensor = t.materialise(&storages).with_context(|| format!("{file}: tensor `{key}`"))?;
            tensors.push((key.clone(), tensor));
        }
    }
    Ok(tensors)
}

/// The dict of tensors inside a loaded object.
fn state_dict(object: &Value) -> Option<&Vec<(Value, Value)>> {
    let Value::Dict(items) = object else { return None };
    for nested in ["state_dict", "model"] {
        if let Some((_, v @ Value::Dict(_))) = items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == nested)) {
            return state_dict(v);
        }
    }
    Some(items)
}

/// Storage key -> raw little-endian bytes.
type Storages = HashMap<String, Vec<u8>>;

fn read_zip(bytes: &[u8]) -> anyhow::Result<(Value, Storages)> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))?;
    let pkl_name = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| anyhow!("no data.pkl in the archive"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut order) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut s = String::new();
        order.read_to_string(&mut s)?;
        if s.trim() != "little" {
            bail!("byte order `{}` is not supported", s.trim())
        }
    }
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?.read_to_end(&mut pkl)?;
    let mut unpickler = Unpickler::new(&pkl);
    let object = unpickler.load()?;
    let mut storages = Storages::new();
    for key in unpickler.storage_keys() {
        let mut data = Vec::new();
        zip.by_name(&format!("{prefix}data/{key}"))
            .with_context(|| format!("storage `{key}` is missing from the archive"))?
            .read_to_end(&mut data)?;
        storages.insert(key, data);
    }
    Ok((object, storages))
}

fn read_legacy(bytes: &[u8]) -> anyhow::Result<(Value, Storages)> {
    let mut pos = 0;
    let mut next = |what: &str| -> anyhow::Result<(Value, Unpickler)> {
        let mut u = Unpickler::new(&bytes[pos..]);
        let v = u.load().with_context(|| format!("reading the {what}"))?;
        pos += u.pos;
        Ok((v, u))
    };
    let (magic, _) = next("magic number")?;
    if !matches!(magic, Value::Int(0x1950a86a20f9469cfc6c_i128)) {
        bail!("not a PyTorch file (no torch.save magic number)")
    }
    next("protocol version")?;
    next("system info")?;
    let (object, unpickler) = next("object")?;
    let (keys, _) = next("storage keys")?;
    let Value::List(keys) = keys else { bail!("malformed storage key list") };
    let dtypes = unpickler.storage_dtypes;
    let mut storages = Storages::new();
    for key in keys {
        let Value::Str(key) = key else { bail!("malformed storage key") };
        let dtype = dtypes.get(&key).ok_or_else(|| anyhow!("storage `{key}` is not referenced"))?;
        let header = bytes.get(pos..pos + 8).ok_or_else(|| anyhow!("file ends before storage `{key}`"))?;
        let numel = u64::from_le_bytes(header.try_into().expect("8 bytes")) as usize;
        let len = numel.checked_mul(dtype.size_in_bytes()).ok_or_else(|| anyhow!("storage `{key}` is too large"))?;
        pos += 8;
        let data = bytes
            .get(pos..pos.saturating_add(len))
            .ok_or_else(|| anyhow!("file is truncated: storage `{key}` needs {len} bytes"))?;
        storages.insert(key, data.to_vec());
        pos += len;
    }
    Ok((object, storages))
}

/// A pickled value, restricted to what a state_dict contains.
#[derive(Debug, Clone)]
enum Value {
    Mark,
    None,
    /// A bool or float: state_dicts carry them only as unused flags (`requires_grad`).
    Scalar,
    Int(i128),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage {
        key: String,
        dtype: DType,
    },
    Tensor(TensorRef),
}

/// The only callables a state_dict's pickle may name.
#[derive(Debug, Clone, Copy)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    StorageType(DType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> anyhow::Result<Self> {
        let storage = |dtype| Ok(Global::StorageType(dtype));
        match (module, name) {
            ("collections", "OrderedDict") => Ok(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensor),
            ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
            ("torch", "FloatStorage") => storage(DType::F32),
            ("torch", "HalfStorage") => storage(DType::F16),
            ("torch", "BFloat16Storage") => storage(DType::BF16),
            ("torch", "DoubleStorage") => storage(DType::F64),
            ("torch", "LongStorage") => storage(DType::I64),
            ("torch", "ByteStorage") => storage(DType::U8),
            _ => bail!(
                "refusing to load: the pickle asks for `{module}.{name}`, which a state_dict never \
                 needs (only tensors, OrderedDict and storages are allowed); nothing was executed"
            ),
        }
    }
}

#[derive(Debug, Clone)]
struct TensorRef {
    key: String,
    dtype: DType,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    /// Copies the (possibly strided, offset) view out of its storage into a contiguous tensor.
    fn materialise(&self, storages: &Storages) -> anyhow::Result<Tensor> {
        let raw = storages.get(&self.key).ok_or_else(|| anyhow!("storage `{}` is missing", self.key))?;
        let elem = self.dtype.size_in_bytes();
        let numel: usize = self.size.iter().product();
        let last = self.size.iter().zip(&self.stride).map(|(s, st)| s.saturating_sub(1) * st).sum::<usize>();
        if numel > 0 && (self.offset + last + 1) * elem > raw.len() {
            bail!(
                "storage `{}` holds {} bytes, too few for shape {:?} (file truncated?)",
                self.key,
                raw.len(),
                self.size
            )
        }
        let mut out = Vec::with_capacity(numel * elem);
        let mut index = vec![0usize; self.size.len()];
        for _ in 0..numel {
            let at = self.offset + index.iter().zip(&self.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&raw[at * elem..(at + 1) * elem]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < self.size[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(Tensor::from_raw_buffer(&out, self.dtype, &self.size, &Device::Cpu)?)
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    storage_dtypes: HashMap<String, DType>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), storage_dtypes: HashMap::new() }
    }

    fn storage_keys(&self) -> Vec<String> {
        self.storage_dtypes.keys().cloned().collect()
    }

    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| anyhow!("pickle is truncated at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> anyhow::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> anyhow::Result<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow!("pickle is truncated"))?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> anyhow::Result<Value> {
        Ok(Value::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
    }

    fn pop(&mut self) -> anyhow::Result<Value> {
        self.stack.pop().ok_or_else(|| anyhow!("malformed pickle: stack underflow at byte {}", self.pos))
    }

    fn pop_mark(&mut self) -> anyhow::Result<Vec<Value>> {
        let at = self.stack.iter().rposition(|v| matches!(v, Value::Mark));
        let at = at.ok_or_else(|| anyhow!("malformed pickle: no mark at byte {}", self.pos))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn top(&mut self) -> anyhow::Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| anyhow!("malformed pickle: empty stack"))
    }

    fn load(&mut self) -> anyhow::Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 | 0x89 => self.stack.push(Value::Scalar), // NEWTRUE, NEWFALSE
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.stack.push(Value::Int(v as i128))
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.stack.push(Value::Int(v as i128))
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.stack.push(Value::Int(v as i128))
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n <= 16 bytes
                    let n = self.u8()? as usize;
                    if n > 16 {
                        bail!("integer too large in pickle at byte {at}")
                    }
                    let b = self.take(n)?;
                    let mut v = b.iter().rev().fold(0i128, |acc, &x| (acc << 8) | x as i128);
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n);
                    }
                    self.stack.push(Value::Int(v))
                }
                b'G' => {
                    self.take(8)?; // BINFLOAT
                    self.stack.push(Value::Scalar)
                }
                b'X' => {
                    let n = self.uint(4)? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                0x8c | b'U' => {
                    let n = self.uint(1)? as usize; // SHORT_BINUNICODE, SHORT_BINSTRING
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'T' => {
                    let n = self.uint(4)? as usize; // BINSTRING
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize; // TUPLE1..3
                    if self.stack.len() < n {
                        bail!("malformed pickle at byte {at}")
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => bail!("malformed pickle: APPEND to a non-list at byte {at}"),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => bail!("malformed pickle: APPENDS to a non-list at byte {at}"),
                    }
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    if items.len() % 2 != 0 {
                        bail!("malformed pickle: odd SETITEMS at byte {at}")
                    }
                    let Value::Dict(d) = self.top()? else {
                        bail!("malformed pickle: SETITEM on a non-dict at byte {at}")
                    };
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
                b'q' => {
                    let i = self.uint(1)? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.uint(4)? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32; // MEMOIZE
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' { self.uint(1)? } else { self.uint(4)? } as u32;
                    let v = self.memo.get(&i).cloned().ok_or_else(|| anyhow!("malformed pickle: memo {i} unset"))?;
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(Global::resolve(&module, &name)?))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        bail!("malformed pickle: STACK_GLOBAL at byte {at}")
                    };
                    self.stack.push(Value::Global(Global::resolve(&module, &name)?))
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = self.persistent_load(pid)?;
                    self.stack.push(storage)
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v)
                }
                b'b' => {
                    self.pop()?; // BUILD: object state such as a state_dict's `_metadata`; unused
                }
                _ => bail!("unsupported pickle opcode 0x{op:02x} at byte {at}: not a plain state_dict"),
            }
        }
    }

    /// `('storage', StorageType, key, location, numel[, view_metadata])`.
    fn persistent_load(&mut self, pid: Value) -> anyhow::Result<Value> {
        let Value::Tuple(items) = pid else { bail!("malformed persistent id") };
        match items.as_slice() {
            [Value::Str(tag), Value::Global(Global::StorageType(dtype)), Value::Str(key), ..] if tag == "storage" => {
                self.storage_dtypes.insert(key.clone(), *dtype);
                Ok(Value::Storage { key: key.clone(), dtype: *dtype })
            }
            _ => bail!("unsupported persistent id {items:?}"),
        }
    }

    fn reduce(&mut self, callable: Value, args: Value) -> anyhow::Result<Value> {
        let Value::Tuple(args) = args else { bail!("malformed pickle: REDUCE without an argument tuple") };
        let Value::Global(global) = callable else { bail!("malformed pickle: REDUCE on a non-callable") };
        let dims = |v: &Value| -> anyhow::Result<Vec<usize>> {
            match v {
                Value::Tuple(items) => items
                    .iter()
                    .map(|i| match i {
                        Value::Int(n) if *n >= 0 => Ok(*n as usize),
                        _ => bail!("malformed tensor size or stride"),
                    })
                    .collect(),
                _ => bail!("malformed tensor size or stride"),
            }
        };
        match (global, args.as_slice()) {
            (Global::OrderedDict, []) => Ok(Value::Dict(Vec::new())),
            (Global::RebuildTensor, [Value::Storage { key, dtype }, Value::Int(offset), size, stride, ..]) => {
                Ok(Value::Tensor(TensorRef {
                    key: key.clone(),
                    dtype: *dtype,
                    offset: usize::try_from(*offset)?,
                    size: dims(size)?,
                    stride: dims(stride)?,
                }))
            }
            (Global::RebuildParameter, [tensor @ Value::Tensor(_), ..]) => Ok(tensor.clone()),
            (g, _) => bail!("unsupported call of {g:?} in the pickle"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pickle_that_calls_os_system_is_refused_without_running() {
        // protocol 2: GLOBAL 'os system', SHORT_BINUNICODE 'echo pwned', TUPLE1, REDUCE, STOP
        let mut p = b"\x80\x02cos\nsystem\n".to_vec();
        p.extend(b"\x8c\x0aecho pwned\x85R.");
        let err = Unpickler::new(&p).load().unwrap_err().to_string();
        assert!(err.contains("`os.system`") && err.contains("nothing was executed"), "{err}");
    }
}
