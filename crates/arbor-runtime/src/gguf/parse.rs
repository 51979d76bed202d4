//! Parsing the GGUF header from bytes. Every read is bounds checked; errors are strings that
//! say what is wrong and where, wrapped by the caller with the file's path.

use super::MetaValue;
use arbor_kernels::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Deepest array nesting accepted (real files use 1).
const MAX_DEPTH: usize = 4;

/// Name, shape, type and location of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Bytes of data.
    pub nbytes: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// Everything before the tensor data.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: usize,
}

impl GgufHeader {
    /// Metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "file ends inside {what} at byte {} (needs {n} more bytes, file has {})",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "{what}: string length {len} exceeds the {} bytes left",
                self.remaining()
            ));
        }
        let bytes = self.take(len as usize, what)?;
        // llama.cpp writes some vocabularies with invalid UTF-8; keep them readable.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8(what)?),
            1 => MetaValue::I8(self.u8(what)? as i8),
            2 => MetaValue::U16(self.u16(what)?),
            3 => MetaValue::I16(self.u16(what)? as i16),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(self.u32(what)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.u8(what)? {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(format!("{what}: bool byte {b} is neither 0 nor 1")),
            },
            8 => MetaValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let elem_ty = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element takes at least one byte: a count beyond that is corrupt, and
                // checking it first keeps a garbage count from allocating gigabytes.
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    t => return Err(format!("{what}: unknown array element type {t}")),
                };
                if count
                    .checked_mul(min_size)
                    .is_none_or(|n| n > self.remaining() as u64)
                {
                    return Err(format!(
                        "{what}: array of {count} elements exceeds the {} bytes left",
                        self.remaining()
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, what, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(self.u64(what)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(format!("{what}: unknown metadata value type {t}")),
        })
    }
}

/// Parses a GGUF header (v2 or v3) and checks that every tensor's data lies inside `buf`.
pub fn parse(buf: &[u8]) -> Result<GgufHeader, String> {
    let mut c = Cursor { buf, pos: 0 };
    let magic = c
        .take(4, "the magic number")
        .map_err(|_| "file is too short to be GGUF".to_string())?;
    if magic != MAGIC {
        return Err(format!(
            "not a GGUF file: it starts with {magic:02x?}, not \"GGUF\""
        ));
    }
    let version = c.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(
                "GGUF version 1 is not supported: convert the model again with a current llama.cpp"
                    .into(),
            )
        }
        v if v.swap_bytes() <= 3 => return Err("big-endian GGUF files are not supported".into()),
        v => {
            return Err(format!(
                "unknown GGUF version {v}: arbor reads versions 2 and 3"
            ))
        }
    }
    let n_tensors = c.u64("the tensor count")?;
    let n_kv = c.u64("the metadata count")?;
    // Each key/value takes at least 12 bytes and each tensor info at least 24.
    if n_kv.saturating_mul(12) > c.remaining() as u64
        || n_tensors.saturating_mul(24) > c.remaining() as u64
    {
        return Err(format!("header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file holds"));
    }

    let mut metadata = Vec::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = c.string(&format!("metadata key #{i}"))?;
        let ty = c.u32(&format!("the type of metadata '{key}'"))?;
        let value = c.value(ty, &format!("metadata '{key}'"), 0)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => return Err(format!("general.alignment must be a power of two, got {v}")),
        },
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&format!("the name of tensor #{i}"))?;
        let what = format!("tensor '{name}'");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(format!(
                "{what} has {n_dims} dimensions; GGUF tensors have 1 to 4"
            ));
        }
        let dims = (0..n_dims)
            .map(|_| c.u64(&what))
            .collect::<Result<Vec<_>, _>>()?;
        let ty_id = c.u32(&what)?;
        let ty = GgmlType::from_id(ty_id).map_err(|e| format!("{what}: {e}"))?;
        let offset = c.u64(&what)?;
        let numel = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 40);
        let numel = numel.ok_or_else(|| format!("{what} has an impossible shape {dims:?}"))?;
        if dims[0] % ty.block_size() as u64 != 0 {
            return Err(format!(
                "{what}: rows of {} elements are not whole {ty} blocks of {}",
                dims[0],
                ty.block_size()
            ));
        }
        let nbytes = numel / ty.block_size() as u64 * ty.type_size() as u64;
        if offset % alignment != 0 {
            return Err(format!(
                "{what}: data offset {offset} is not aligned to {alignment}"
            ));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            nbytes: nbytes as usize,
        });
    }

    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.nbytes as u64));
        if end.is_none_or(|e| e > buf.len() as u64) {
            return Err(format!(
                "tensor '{}' ({} bytes at offset {}) runs past the end of the file ({} bytes): the file is truncated",
                t.name,
                t.nbytes,
                t.offset,
                buf.len()
            ));
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset: data_offset as usize,
    })
}
