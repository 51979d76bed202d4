//! GGML block formats: what each stored tensor type looks like, how to turn its blocks back
//! into f32, and the block dot products the quantised matmul is built from.
//!
//! One file per format family: `legacy.rs` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1),
//! `kquants.rs` (Q2_K..Q6_K, Q8_K), `float.rs` (F32, F16, BF16). `activation.rs` holds the
//! 8-bit activation blocks, `tile.rs` the quantised matmul kernels (portable, and AVX2 in
//! `avx2_legacy.rs` / `avx2_kquants.rs`; `avx2_activation.rs` quantises activations) that [`matmul()`](crate::ops::matmul::matmul) drives;
//! `interleave.rs` the CPU's own layout of Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights,
//! eight rows interleaved block by block, with its kernels (`avx2_interleave.rs`).

pub mod activation;
#[cfg(target_arch = "x86_64")]
mod avx2_activation;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_float;
#[cfg(target_arch = "x86_64")]
mod avx2_interleave;
#[cfg(target_arch = "x86_64")]
mod avx2_kquants;
#[cfg(target_arch = "x86_64")]
mod avx2_legacy;
pub(crate) mod float;
pub mod interleave;
mod kquants;
mod legacy;
pub mod tile;

#[cfg(test)]
mod fixture_tests;

pub use activation::{quantize_row_q8, quantize_row_q8k, BlockQ8, BlockQ8K};
pub use tile::{dot_tile, dot_tile_interleaved, ActBlocks, Isa, QuantizedActs};

use crate::KernelError;
use std::fmt;

/// A GGML tensor type, numbered as in the GGUF file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    BF16,
}

impl GgmlType {
    /// Maps a GGUF type id. `Err` names the id (and the type, when it is a known GGML type
    /// that arbor does not read) so the user knows which tensor type to avoid.
    pub fn from_id(id: u32) -> Result<Self, KernelError> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            30 => GgmlType::BF16,
            other => {
                let name = match other {
                    16..=23 | 29 => "an IQ (importance) quant",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    34 | 35 => "a ternary TQ quant",
                    _ => "unknown",
                };
                return Err(KernelError::UnsupportedType(format!(
                    "GGML type id {other} ({name})"
                )));
            }
        })
    }

    /// The GGUF type id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => 32,
            GgmlType::Q8_0 | GgmlType::Q8_1 => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
            GgmlType::Q8K => 292,
        }
    }

    /// Bytes taken by `n` elements; an error if `n` is not a whole number of blocks.
    #[allow(clippy::manual_is_multiple_of)] // the workspace's MSRV (1.85) predates it
    pub fn bytes_for(self, n: usize) -> Result<usize, KernelError> {
        let bs = self.block_size();
        if n % bs != 0 {
            return Err(KernelError::Invalid(format!(
                "{self} stores elements in blocks of {bs}, but a row has {n} elements"
            )));
        }
        (n / bs)
            .checked_mul(self.type_size())
            .ok_or_else(|| KernelError::Invalid(format!("{n} elements of {self} overflow")))
    }

    /// True for the block-quantised types (not F32/F16/BF16).
    pub fn is_quantized(self) -> bool {
        !matches!(self, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    }

    /// The name ggml and GGUF tools print (`Q4_K`, not `Q4K`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::Q8K => "Q8_K",
            GgmlType::BF16 => "BF16",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantises `data` (whole blocks of `ty`) into `out`; `out.len()` elements are produced.
///
/// Errors (never panics) when `out.len()` is not a whole number of blocks or `data` is not
/// exactly the bytes those blocks take. Values match ggml's reference dequantisation bit for
/// bit (same f32 operations in the same order).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    let expected = ty.bytes_for(out.len())?;
    if data.len() != expected {
        return Err(KernelError::DataSize {
            ty: ty.to_string(),
            got: data.len(),
            expected,
        });
    }
    match ty {
        GgmlType::F32 => float::dequantize_f32(data, out),
        GgmlType::F16 => float::dequantize_f16(data, out),
        GgmlType::BF16 => float::dequantize_bf16(data, out),
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::Q8_1 => legacy::dequantize(ty, data, out),
        GgmlType::Q2K
        | GgmlType::Q3K
        | GgmlType::Q4K
        | GgmlType::Q5K
        | GgmlType::Q6K
        | GgmlType::Q8K => kquants::dequantize(ty, data, out),
    }
    Ok(())
}
