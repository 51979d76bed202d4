//! GGUF reader: header, every metadata value type, tensor infos, alignment, tensor data.
//!
//! [`parse`] works on a byte slice (so the fuzzer can drive it); [`GgufFile::open`] maps a
//! file and parses it. All offsets and counts are checked against the file's size before use.

mod parse;
mod value;
mod write;

pub use parse::{parse, GgufHeader, TensorInfo};
pub use value::MetaValue;
pub use write::GgufWriter;

use crate::RuntimeError;
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// A memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: GgufHeader,
    mmap: Mmap,
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self, RuntimeError> {
        let file = std::fs::File::open(path).map_err(|source| RuntimeError::Io {
            path: path.into(),
            source,
        })?;
        // SAFETY: the map is read-only; arbor never writes model files while they are loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| RuntimeError::Io {
            path: path.into(),
            source,
        })?;
        let header = parse(&mmap).map_err(|detail| RuntimeError::Gguf {
            path: path.to_path_buf(),
            detail,
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            header,
            mmap,
        })
    }

    /// Metadata value by key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.header.get(key)
    }

    /// Tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor (bounds were checked when the header was parsed).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let start = self.header.data_offset + info.offset as usize;
        &self.mmap[start..start + info.nbytes]
    }
}
