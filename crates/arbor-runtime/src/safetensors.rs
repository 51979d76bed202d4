//! safetensors loading by mmap: one file, or shards listed by `model.safetensors.index.json`.

use crate::RuntimeError;
use arbor_kernels::quant::GgmlType;
use memmap2::Mmap;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One tensor's place in a mapped file.
#[derive(Clone, Debug)]
pub struct StTensor {
    pub dtype: GgmlType,
    pub shape: Vec<usize>,
    file: usize,
    start: usize,
    end: usize,
}

/// All tensors of a model's safetensors file(s).
pub struct SafeTensors {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, StTensor>,
}

fn err(path: &Path, detail: impl Into<String>) -> RuntimeError {
    RuntimeError::Safetensors {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// One tensor of a safetensors header.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: GgmlType,
    pub shape: Vec<usize>,
    /// Absolute byte range of the tensor's data in the file.
    pub start: usize,
    pub end: usize,
}

/// Parses a safetensors header from `buf`, checking every tensor's byte range.
pub fn parse_header(buf: &[u8]) -> Result<Vec<HeaderEntry>, String> {
    if buf.len() < 8 {
        return Err("file is shorter than the 8-byte header length".into());
    }
    let n = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
    if n > (buf.len() - 8) as u64 {
        return Err(format!(
            "header length {n} exceeds the file ({} bytes): truncated or not safetensors",
            buf.len()
        ));
    }
    let header: Value = serde_json::from_slice(&buf[8..8 + n as usize])
        .map_err(|e| format!("header is not JSON: {e}"))?;
    let obj = header.as_object().ok_or("header is not a JSON object")?;
    let data_start = 8 + n as usize;
    let data_len = buf.len() - data_start;
    let mut out = Vec::new();
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = info
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or(format!("tensor '{name}' has no dtype"))?;
        let dtype = match dtype_name {
            "F32" => GgmlType::F32,
            "F16" => GgmlType::F16,
            "BF16" => GgmlType::BF16,
            other => {
                return Err(format!(
                    "tensor '{name}' has dtype {other}; arbor reads F32, F16 and BF16"
                ))
            }
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .ok_or(format!("tensor '{name}' has no shape"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or(format!("tensor '{name}' has a non-integer dimension"))?;
        let offs = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .ok_or(format!("tensor '{name}' has no data_offsets"))?;
        let (s, e) = match offs.as_slice() {
            [s, e] => (
                s.as_u64().unwrap_or(u64::MAX) as usize,
                e.as_u64().unwrap_or(0) as usize,
            ),
            _ => {
                return Err(format!(
                    "tensor '{name}': data_offsets must be [start, end]"
                ))
            }
        };
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or(format!("tensor '{name}' shape overflows"))?;
        if s > e || e > data_len || e - s != numel.saturating_mul(dtype.type_size()) {
            return Err(format!(
                "tensor '{name}' {dtype_name}{shape:?}: bytes {s}..{e} do not match its shape or lie outside the {data_len}-byte data section"
            ));
        }
        out.push(HeaderEntry {
            name: name.clone(),
            dtype,
            shape,
            start: data_start + s,
            end: data_start + e,
        });
    }
    Ok(out)
}

impl SafeTensors {
    /// Opens `model.safetensors`, or the shards named by `model.safetensors.index.json`, in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, RuntimeError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| RuntimeError::Io {
                path: index.clone(),
                source,
            })?;
            let v: Value =
                serde_json::from_str(&text).map_err(|e| err(&index, format!("not JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| err(&index, "no weight_map"))?;
            let mut names: Vec<&str> = map.values().filter_map(Value::as_str).collect();
            names.sort();
            names.dedup();
            if names.iter().any(|n| n.contains('/') || n.contains("..")) {
                return Err(err(&index, "shard names must be plain file names"));
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        Self::open_files(&files)
    }

    /// Maps the given files and indexes their tensors.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, RuntimeError> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|source| RuntimeError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: read-only map of a model file arbor does not modify.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| RuntimeError::Io {
                path: path.clone(),
                source,
            })?;
            for HeaderEntry {
                name,
                dtype,
                shape,
                start,
                end,
            } in parse_header(&mmap).map_err(|d| err(path, d))?
            {
                if tensors
                    .insert(
                        name.clone(),
                        StTensor {
                            dtype,
                            shape,
                            file: i,
                            start,
                            end,
                        },
                    )
                    .is_some()
                {
                    return Err(err(
                        path,
                        format!("tensor '{name}' appears in more than one shard"),
                    ));
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(SafeTensors { files, tensors })
    }

    pub fn get(&self, name: &str) -> Option<&StTensor> {
        self.tensors.get(name)
    }

    /// Raw little-endian bytes of a tensor.
    pub fn data(&self, t: &StTensor) -> &[u8] {
        &self.files[t.file].1[t.start..t.end]
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}
