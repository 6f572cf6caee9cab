//! PyTorch `.pth` / `.pt` files, read without Python and without executing anything.
//!
//! `torch.save` writes a pickle whose tensors point at raw storages: in a zip archive
//! (`*/data.pkl` plus `*/data/<key>`, PyTorch >= 1.6) or, in the legacy format that
//! `alexnet-owt-7be5be79.pth` predates, as five pickles followed by the raw storages.
//! The unpickler below implements only the opcodes a state_dict uses and resolves only the
//! globals a state_dict needs (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, `torch.*Storage`). Any other global (`os.system`,
//! `builtins.eval`, ...) is refused: nothing is ever called.
//!
//! The reader is bounded by design, whatever the file holds:
//! * the unpickler builds objects in an arena (`Vec<Object>`) whose containers hold
//!   [`Handle`]s, and its stack and memo hold handles too. A memo get shares the object, as
//!   Python does, so re-using memoised containers cannot multiply memory; and no object owns
//!   another, so nothing clones, drops, prints or walks objects recursively, and nesting
//!   depth cannot overflow the stack;
//! * a budget caps the objects ([`MAX_OBJECTS`]) and container elements ([`MAX_ELEMENTS`])
//!   one pickle builds;
//! * the state_dict is looked up without recursion, at most [`MAX_STATE_DICT_NESTING`]
//!   levels down (a dict may contain itself);
//! * sizes, strides, offsets and byte counts are checked arithmetic, and every view is
//!   checked against its storage's length. Views that repeat elements (zero or overlapping
//!   strides, as `expand()` makes; or many tensors viewing one storage) may materialise at
//!   most [`MAX_REPEATED_BYTES`] more than the file's storages hold, all tensors together;
//! * strings from the file appear in error messages only through [`printable`].

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Device, Tensor};

use crate::files::{element_count, printable};

/// The most objects one pickle may build; a state_dict takes about fifteen per tensor.
const MAX_OBJECTS: usize = 1 << 21;
/// The most elements one pickle's tuples, lists and dicts may hold, all together.
const MAX_ELEMENTS: usize = 1 << 22;
/// The most dims a tensor may have (more than PyTorch's kernels take).
const MAX_DIMS: usize = 64;
/// How many levels of `state_dict` / `model` keys are followed to the dict of tensors.
const MAX_STATE_DICT_NESTING: usize = 8;
/// How many bytes a file's tensors may materialise beyond what its storages hold.
const MAX_REPEATED_BYTES: usize = 1 << 30;

/// The tensors of a `.pth` state_dict (top level, or nested under `state_dict` or `model`).
pub fn load(path: &Path, bytes: &[u8]) -> anyhow::Result<Vec<(String, Tensor)>> {
    let file = path.display();
    let (pickle, storages) = if bytes.starts_with(b"PK\x03\x04") {
        read_zip(bytes).with_context(|| format!("{file}: not a readable PyTorch zip archive"))?
    } else {
        read_legacy(bytes).with_context(|| format!("{file}: not a readable PyTorch (legacy) file"))?
    };
    let entries = pickle.state_dict().with_context(|| file.to_string())?;
    let mut bytes_left = storages.values().fold(MAX_REPEATED_BYTES, |sum, data| sum.saturating_add(data.len()));
    let mut tensors = Vec::new();
    for &(key, value) in entries {
        if let (Object::Str(key), Object::Tensor(t)) = (pickle.objects.get(key), pickle.objects.get(value)) {
            let tensor = t
                .materialise(&storages, &mut bytes_left)
                .with_context(|| format!("{file}: tensor `{}`", printable(key)))?;
            tensors.push((key.clone(), tensor));
        }
    }
    Ok(tensors)
}

/// Storage key -> raw little-endian bytes.
type Storages = HashMap<String, Vec<u8>>;

fn read_zip(bytes: &[u8]) -> anyhow::Result<(Pickle, Storages)> {
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
            bail!("byte order `{}` is not supported", printable(s.trim()))
        }
    }
    let mut pkl = Vec::new();
    zip.by_name(&pkl_name)?.read_to_end(&mut pkl)?;
    let pickle = Unpickler::new(&pkl).load()?;
    let mut storages = Storages::new();
    for key in pickle.storage_dtypes.keys() {
        let mut data = Vec::new();
        zip.by_name(&format!("{prefix}data/{key}"))
            .with_context(|| format!("storage `{}` is missing from the archive", printable(key)))?
            .read_to_end(&mut data)?;
        storages.insert(key.clone(), data);
    }
    Ok((pickle, storages))
}

fn read_legacy(bytes: &[u8]) -> anyhow::Result<(Pickle, Storages)> {
    let mut pos = 0;
    let mut next = |what: &str| -> anyhow::Result<Pickle> {
        let pickle = Unpickler::new(&bytes[pos..]).load().with_context(|| format!("reading the {what}"))?;
        pos += pickle.len;
        Ok(pickle)
    };
    let magic = next("magic number")?;
    if !matches!(magic.root(), Object::Int(0x1950a86a20f9469cfc6c_i128)) {
        bail!("not a PyTorch file (no torch.save magic number)")
    }
    next("protocol version")?;
    next("system info")?;
    let object = next("object")?;
    let keys = next("storage keys")?;
    let Object::List(key_handles) = keys.root() else { bail!("malformed storage key list") };
    let mut storages = Storages::new();
    for &key in key_handles {
        let Object::Str(key) = keys.objects.get(key) else { bail!("malformed storage key") };
        let shown = printable(key);
        let dtype = object.storage_dtypes.get(key).ok_or_else(|| anyhow!("storage `{shown}` is not referenced"))?;
        let header_end = pos.checked_add(8).filter(|&end| end <= bytes.len());
        let header_end = header_end.ok_or_else(|| anyhow!("file is truncated: it ends before storage `{shown}`"))?;
        let numel = u64::from_le_bytes(bytes[pos..header_end].try_into().expect("8 bytes"));
        let len = usize::try_from(numel).ok().and_then(|n| n.checked_mul(dtype.size_in_bytes()));
        let len = len.ok_or_else(|| anyhow!("storage `{shown}` claims {numel} elements, too many to address"))?;
        pos = header_end;
        let end = pos.checked_add(len).filter(|&end| end <= bytes.len());
        let end = end.ok_or_else(|| anyhow!("file is truncated: storage `{shown}` needs {len} bytes"))?;
        storages.insert(key.clone(), bytes[pos..end].to_vec());
        pos = end;
    }
    Ok((object, storages))
}

/// An object in a [`Pickle`]'s arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Handle(u32);

/// A pickled object, restricted to what a state_dict contains. Containers hold handles, so no
/// object owns another.
enum Object {
    None,
    /// A bool or float: state_dicts carry them only as unused flags (`requires_grad`).
    Scalar,
    Int(i128),
    Str(String),
    Tuple(Vec<Handle>),
    List(Vec<Handle>),
    Dict(Vec<(Handle, Handle)>),
    Global(Global),
    Storage {
        key: String,
        dtype: DType,
    },
    Tensor(Box<TensorRef>),
}

/// The arena one pickle's objects live in.
#[derive(Default)]
struct Objects(Vec<Object>);

impl Objects {
    fn get(&self, handle: Handle) -> &Object {
        &self.0[handle.0 as usize]
    }

    fn get_mut(&mut self, handle: Handle) -> &mut Object {
        &mut self.0[handle.0 as usize]
    }

    /// Adds an object, within the budget of [`MAX_OBJECTS`].
    fn add(&mut self, object: Object) -> anyhow::Result<Handle> {
        if self.0.len() >= MAX_OBJECTS {
            bail!("refusing to load: the pickle builds more than {MAX_OBJECTS} objects, far more than a state_dict")
        }
        self.0.push(object);
        Ok(Handle(self.0.len() as u32 - 1))
    }

    fn dict(&self, handle: Handle) -> Option<&[(Handle, Handle)]> {
        match self.get(handle) {
            Object::Dict(items) => Some(items),
            _ => None,
        }
    }

    /// An object in a few words, for error messages: a string or int's value, else its kind.
    fn describe(&self, handle: Handle) -> String {
        match self.get(handle) {
            Object::Str(s) => format!("'{}'", printable(s)),
            Object::Int(n) => n.to_string(),
            Object::None => "None".into(),
            Object::Scalar => "a bool or float".into(),
            Object::Tuple(items) => format!("a tuple of {}", items.len()),
            Object::List(items) => format!("a list of {}", items.len()),
            Object::Dict(items) => format!("a dict of {}", items.len()),
            Object::Global(g) => format!("{g:?}"),
            Object::Storage { .. } => "a storage".into(),
            Object::Tensor(_) => "a tensor".into(),
        }
    }
}

/// The objects one pickle built, and the one it returned.
struct Pickle {
    objects: Objects,
    root: Handle,
    /// The storages its tensors view, and their element types.
    storage_dtypes: HashMap<String, DType>,
    /// How many bytes of the input the pickle took (up to and including STOP).
    len: usize,
}

impl Pickle {
    /// The object the pickle returned.
    fn root(&self) -> &Object {
        self.objects.get(self.root)
    }

    /// The dict of tensors: the returned dict, or the dict under its `state_dict` (else
    /// `model`) key, followed down at most [`MAX_STATE_DICT_NESTING`] levels.
    fn state_dict(&self) -> anyhow::Result<&[(Handle, Handle)]> {
        let mut items = self.objects.dict(self.root).ok_or_else(|| {
            anyhow!("the pickle holds no state_dict (a dict of tensors, possibly under `state_dict` or `model`)")
        })?;
        for _ in 0..MAX_STATE_DICT_NESTING {
            let nested = ["state_dict", "model"].into_iter().find_map(|name| {
                let (_, value) =
                    items.iter().find(|(k, _)| matches!(self.objects.get(*k), Object::Str(s) if s == name))?;
                self.objects.dict(*value)
            });
            match nested {
                Some(dict) => items = dict,
                None => return Ok(items),
            }
        }
        bail!(
            "the state_dict is nested more than {MAX_STATE_DICT_NESTING} levels deep under `state_dict` or `model` \
             keys (a dict that contains itself?)"
        )
    }
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
                "refusing to load: the pickle asks for `{}.{}`, which a state_dict never needs (only \
                 tensors, OrderedDict and storages are allowed); nothing was executed",
                printable(module),
                printable(name)
            ),
        }
    }
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view into a storage, in elements.
struct TensorRef {
    key: String,
    dtype: DType,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRef {
    /// Copies the (possibly strided, offset) view out of its storage into a contiguous tensor,
    /// taking the bytes it makes from `bytes_left`, the file's budget.
    fn materialise(&self, storages: &Storages, bytes_left: &mut usize) -> anyhow::Result<Tensor> {
        let (key, size, stride, offset) = (printable(&self.key), &self.size, &self.stride, self.offset);
        let raw = storages.get(&self.key).ok_or_else(|| anyhow!("storage `{key}` is missing"))?;
        let elem = self.dtype.size_in_bytes();
        let too_large = || anyhow!("size {size:?}, stride {stride:?} and offset {offset} overflow: not a real tensor");
        let numel = element_count(size).ok_or_else(too_large)?;
        let len = numel.checked_mul(elem).ok_or_else(too_large)?;
        if numel > 0 {
            // numel > 0: every size is at least 1
            let last = size.iter().zip(stride).try_fold(offset, |at, (&n, &s)| at.checked_add((n - 1).checked_mul(s)?));
            let end = last.and_then(|last| last.checked_add(1)?.checked_mul(elem)).ok_or_else(too_large)?;
            if end > raw.len() {
                bail!(
                    "storage `{key}` holds {} bytes, too few for shape {size:?} (stride {stride:?}, offset {offset}; \
                     file truncated?)",
                    raw.len()
                )
            }
        }
        *bytes_left = bytes_left.checked_sub(len).ok_or_else(|| {
            anyhow!(
                "size {size:?} with stride {stride:?} makes {len} bytes, past the file's limit (its storages' \
                 bytes plus {} GiB for views that repeat elements, such as `expand()` makes)",
                MAX_REPEATED_BYTES >> 30
            )
        })?;
        let data = self.gather(raw, numel, elem);
        Ok(Tensor::from_raw_buffer(&data, self.dtype, size, &Device::Cpu)?)
    }

    /// The view's `numel` elements in order, from a storage checked to hold them all. The
    /// innermost dims that lie contiguously in the storage are copied as one run.
    fn gather(&self, raw: &[u8], numel: usize, elem: usize) -> Vec<u8> {
        // dims of size 1 move nothing (and their strides can be anything)
        let dims: Vec<(usize, usize)> =
            self.size.iter().copied().zip(self.stride.iter().copied()).filter(|&(n, _)| n > 1).collect();
        let mut run = 1;
        let mut outer = dims.len();
        while outer > 0 && dims[outer - 1].1 == run {
            outer -= 1;
            run *= dims[outer].0;
        }
        let dims = &dims[..outer];
        let mut data = Vec::with_capacity(numel * elem);
        let mut index = vec![0usize; dims.len()];
        let mut at = self.offset;
        for _ in 0..numel / run {
            data.extend_from_slice(&raw[at * elem..(at + run) * elem]);
            // the next run: an odometer over the outer dims, moving `at` by their strides
            for (i, &(n, s)) in index.iter_mut().zip(dims).rev() {
                if *i + 1 < n {
                    *i += 1;
                    at += s;
                    break;
                }
                at -= *i * s;
                *i = 0;
            }
        }
        data
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    objects: Objects,
    /// The elements all containers hold so far, for the budget.
    elements: usize,
    stack: Vec<Handle>,
    /// The stack's length at each MARK not yet consumed (Python's metastack).
    marks: Vec<usize>,
    memo: HashMap<u32, Handle>,
    storage_dtypes: HashMap<String, DType>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            objects: Objects::default(),
            elements: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storage_dtypes: HashMap::new(),
        }
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

    fn string(&mut self, n: usize) -> anyhow::Result<Object> {
        Ok(Object::Str(String::from_utf8_lossy(self.take(n)?).into_owned()))
    }

    fn push_new(&mut self, object: Object) -> anyhow::Result<()> {
        let handle = self.objects.add(object)?;
        self.stack.push(handle);
        Ok(())
    }

    /// Counts `n` more elements put into containers, within the budget.
    fn add_elements(&mut self, n: usize) -> anyhow::Result<()> {
        self.elements = self.elements.saturating_add(n);
        if self.elements > MAX_ELEMENTS {
            bail!(
                "refusing to load: the pickle puts more than {MAX_ELEMENTS} elements in tuples, lists and dicts, \
                 far more than a state_dict"
            )
        }
        Ok(())
    }

    /// The top of the stack above the last mark, as Python sees its stack.
    fn top(&self) -> anyhow::Result<Handle> {
        match self.stack.last() {
            Some(&handle) if self.stack.len() > self.marks.last().copied().unwrap_or(0) => Ok(handle),
            _ => bail!("malformed pickle: stack underflow at byte {}", self.pos),
        }
    }

    fn pop(&mut self) -> anyhow::Result<Handle> {
        let handle = self.top()?;
        self.stack.pop();
        Ok(handle)
    }

    fn pop_mark(&mut self) -> anyhow::Result<Vec<Handle>> {
        let at = self.marks.pop().ok_or_else(|| anyhow!("malformed pickle: no mark at byte {}", self.pos))?;
        // pops never go below the last mark, so `at <= stack.len()`
        Ok(self.stack.split_off(at))
    }

    /// The container on top of the stack, for APPEND(S) and SETITEM(S).
    fn top_object(&mut self) -> anyhow::Result<&mut Object> {
        let handle = self.top()?;
        Ok(self.objects.get_mut(handle))
    }

    fn memo_put(&mut self, index: u32) -> anyhow::Result<()> {
        let handle = self.top()?;
        self.memo.insert(index, handle);
        Ok(())
    }

    fn load(mut self) -> anyhow::Result<Pickle> {
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
                b'.' => {
                    // STOP
                    let root = self.pop()?;
                    let Unpickler { objects, storage_dtypes, pos, .. } = self;
                    return Ok(Pickle { objects, root, storage_dtypes, len: pos });
                }
                b'(' => self.marks.push(self.stack.len()),
                b'N' => self.push_new(Object::None)?,
                0x88 | 0x89 => self.push_new(Object::Scalar)?, // NEWTRUE, NEWFALSE
                b'J' => {
                    let v = self.uint(4)? as u32 as i32;
                    self.push_new(Object::Int(v as i128))?
                }
                b'K' => {
                    let v = self.uint(1)?;
                    self.push_new(Object::Int(v as i128))?
                }
                b'M' => {
                    let v = self.uint(2)?;
                    self.push_new(Object::Int(v as i128))?
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
                    self.push_new(Object::Int(v))?
                }
                b'G' => {
                    self.take(8)?; // BINFLOAT
                    self.push_new(Object::Scalar)?
                }
                b'X' | b'T' => {
                    let n = self.uint(4)? as usize; // BINUNICODE, BINSTRING
                    let v = self.string(n)?;
                    self.push_new(v)?
                }
                0x8c | b'U' => {
                    let n = self.uint(1)? as usize; // SHORT_BINUNICODE, SHORT_BINSTRING
                    let v = self.string(n)?;
                    self.push_new(v)?
                }
                b')' => self.push_new(Object::Tuple(Vec::new()))?,
                b']' => self.push_new(Object::List(Vec::new()))?,
                b'}' => self.push_new(Object::Dict(Vec::new()))?,
                b't' | b'l' => {
                    let items = self.pop_mark()?; // TUPLE, LIST
                    self.add_elements(items.len())?;
                    self.push_new(if op == b't' { Object::Tuple(items) } else { Object::List(items) })?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize; // TUPLE1..3
                    let mut items = (0..n).map(|_| self.pop()).collect::<anyhow::Result<Vec<_>>>()?;
                    items.reverse();
                    self.add_elements(n)?;
                    self.push_new(Object::Tuple(items))?
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? }; // APPEND(S)
                    self.add_elements(items.len())?;
                    match self.top_object()? {
                        Object::List(l) => l.extend(items),
                        _ => bail!("malformed pickle: APPEND to a non-list at byte {at}"),
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
                    self.add_elements(items.len())?;
                    let Object::Dict(d) = self.top_object()? else {
                        bail!("malformed pickle: SETITEM on a non-dict at byte {at}")
                    };
                    d.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                }
                b'q' => {
                    let i = self.uint(1)? as u32; // BINPUT
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.uint(4)? as u32; // LONG_BINPUT
                    self.memo_put(i)?
                }
                0x94 => self.memo_put(self.memo.len() as u32)?, // MEMOIZE
                b'h' | b'j' => {
                    let i = if op == b'h' { self.uint(1)? } else { self.uint(4)? } as u32; // BINGET, LONG_BINGET
                    let handle = *self.memo.get(&i).ok_or_else(|| anyhow!("malformed pickle: memo {i} unset"))?;
                    self.stack.push(handle)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_new(Object::Global(Global::resolve(&module, &name)?))?
                }
                0x93 => {
                    let name = self.pop()?; // STACK_GLOBAL
                    let module = self.pop()?;
                    let (Object::Str(module), Object::Str(name)) = (self.objects.get(module), self.objects.get(name))
                    else {
                        bail!("malformed pickle: STACK_GLOBAL at byte {at}")
                    };
                    let global = Global::resolve(module, name)?;
                    self.push_new(Object::Global(global))?
                }
                b'Q' => {
                    let pid = self.pop()?; // BINPERSID
                    let storage = self.persistent_load(pid)?;
                    self.push_new(storage)?
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
    fn persistent_load(&mut self, pid: Handle) -> anyhow::Result<Object> {
        let Object::Tuple(items) = self.objects.get(pid) else {
            bail!("malformed persistent id: {} instead of a tuple", self.objects.describe(pid))
        };
        if let [tag, storage_type, key, ..] = items[..] {
            if let (Object::Str(tag), Object::Global(Global::StorageType(dtype)), Object::Str(key)) =
                (self.objects.get(tag), self.objects.get(storage_type), self.objects.get(key))
            {
                if tag == "storage" {
                    let (key, dtype) = (key.clone(), *dtype);
                    self.storage_dtypes.insert(key.clone(), dtype);
                    return Ok(Object::Storage { key, dtype });
                }
            }
        }
        let shown: Vec<String> = items.iter().take(6).map(|&item| self.objects.describe(item)).collect();
        bail!("unsupported persistent id ({}{})", shown.join(", "), if items.len() > 6 { ", ..." } else { "" })
    }

    /// Calls one of the allowed globals; `_rebuild_parameter` returns its tensor itself.
    fn reduce(&mut self, callable: Handle, args: Handle) -> anyhow::Result<Handle> {
        let Object::Tuple(args) = self.objects.get(args) else {
            bail!("malformed pickle: REDUCE without an argument tuple")
        };
        let &Object::Global(global) = self.objects.get(callable) else {
            bail!("malformed pickle: REDUCE on {}, not a callable", self.objects.describe(callable))
        };
        let object = match (global, &args[..]) {
            (Global::OrderedDict, []) => Object::Dict(Vec::new()),
            (Global::RebuildTensor, &[storage, offset, size, stride, ..]) => {
                Object::Tensor(Box::new(self.tensor_ref(storage, offset, size, stride)?))
            }
            (Global::RebuildParameter, &[tensor, ..]) if matches!(self.objects.get(tensor), Object::Tensor(_)) => {
                return Ok(tensor)
            }
            (g, _) => bail!("unsupported call of {g:?} in the pickle"),
        };
        self.objects.add(object)
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, ...)`'s tensor.
    fn tensor_ref(&self, storage: Handle, offset: Handle, size: Handle, stride: Handle) -> anyhow::Result<TensorRef> {
        let Object::Storage { key, dtype } = self.objects.get(storage) else {
            bail!("malformed tensor: its storage is {}", self.objects.describe(storage))
        };
        let offset = match self.objects.get(offset) {
            &Object::Int(n) => usize::try_from(n).map_err(|_| anyhow!("malformed tensor: storage offset {n}"))?,
            _ => bail!("malformed tensor: its storage offset is {}", self.objects.describe(offset)),
        };
        let dims = |handle: Handle, what: &str| -> anyhow::Result<Vec<usize>> {
            let Object::Tuple(items) = self.objects.get(handle) else {
                bail!("malformed tensor: its {what} is {}", self.objects.describe(handle))
            };
            let dim = |&item: &Handle| match self.objects.get(item) {
                &Object::Int(n) => usize::try_from(n).ok(),
                _ => None,
            };
            let dims = items.iter().map(dim).collect::<Option<Vec<_>>>();
            dims.ok_or_else(|| anyhow!("malformed tensor {what}: not a tuple of sizes"))
        };
        let (size, stride) = (dims(size, "size")?, dims(stride, "stride")?);
        if size.len() > MAX_DIMS {
            bail!("malformed tensor: {} dims, more than {MAX_DIMS}", size.len())
        }
        if size.len() != stride.len() {
            bail!("malformed tensor: size {size:?} and stride {stride:?} differ in length")
        }
        Ok(TensorRef { key: key.clone(), dtype: *dtype, offset, size, stride })
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
        let err = Unpickler::new(&p).load().err().expect("refused").to_string();
        assert!(err.contains("`os.system`") && err.contains("nothing was executed"), "{err}");
    }
}
