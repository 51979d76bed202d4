//! Entry points of the quantised matmul kernels: activation quantisation for a weight type,
//! and a checked "tile" call that multiplies a run of weight rows with every activation row.
//!
//! [`crate::ops::matmul`] splits the weight rows into chunks, one rayon task each, and calls
//! [`dot_tile`] per chunk. Inside a tile the kernels take the activation rows four at a time and,
//! for each weight row, unpack each weight block once for all four, so a chunk's weights are
//! read from memory once and from cache once per four activation rows.

use rayon::prelude::*;

use super::activation::{quantize_row_q8, quantize_row_q8k, BlockQ8, BlockQ8K, QK8, QK_K};
use super::{kquants, legacy, GgmlType};
use crate::KernelError;

/// The instruction set the quantised kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust (what every other path is tested against).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
}

impl Isa {
    /// The fastest instruction set this CPU supports (detected at run time).
    pub fn detect() -> Isa {
        if Isa::Avx2.is_available() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Whether this CPU can run kernels for `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 => false,
        }
    }
}

/// Activation rows quantised to 8 bits for one weight type: 32-blocks for the legacy types,
/// 256-blocks (Q8_K layout) for the K-quants. Rows are stored one after another.
#[derive(Clone, Debug)]
pub enum QuantizedActs {
    /// For Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 weights.
    Q8(Vec<BlockQ8>),
    /// For Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K weights.
    Q8K(Vec<BlockQ8K>),
}

/// Rows of at least this many elements in total are quantised in parallel.
const PAR_QUANTIZE_MIN: usize = 1 << 16;

impl QuantizedActs {
    /// Quantises `m` rows of `cols` activations (`x.len() == m·cols`) for dot products with
    /// weights of block-quantised type `ty`. Errors if `ty` is not block-quantised, `cols` is
    /// not a whole number of its blocks, or `x` has the wrong length.
    pub fn new(ty: GgmlType, x: &[f32], m: usize, cols: usize) -> Result<Self, KernelError> {
        if !ty.is_quantized() {
            return Err(KernelError::Invalid(format!("{ty} weights are not block-quantised")));
        }
        ty.bytes_for(cols)?;
        if m.checked_mul(cols) != Some(x.len()) {
            return Err(KernelError::Shape {
                op: "QuantizedActs::new",
                detail: format!("{} values for {m} rows of {cols}", x.len()),
            });
        }
        let parallel = x.len() >= PAR_QUANTIZE_MIN && m > 1;
        if ty.block_size() == QK_K {
            let nb = cols / QK_K;
            let mut out = vec![BlockQ8K::ZERO; m * nb];
            if cols > 0 {
                if parallel {
                    out.par_chunks_mut(nb).zip(x.par_chunks(cols)).for_each(|(o, xr)| quantize_row_q8k(xr, o));
                } else {
                    out.chunks_mut(nb).zip(x.chunks(cols)).for_each(|(o, xr)| quantize_row_q8k(xr, o));
                }
            }
            Ok(QuantizedActs::Q8K(out))
        } else {
            let nb = cols / QK8;
            let mut out = vec![BlockQ8::ZERO; m * nb];
            if cols > 0 {
                if parallel {
                    out.par_chunks_mut(nb).zip(x.par_chunks(cols)).for_each(|(o, xr)| quantize_row_q8(xr, o));
                } else {
                    out.chunks_mut(nb).zip(x.chunks(cols)).for_each(|(o, xr)| quantize_row_q8(xr, o));
                }
            }
            Ok(QuantizedActs::Q8(out))
        }
    }

    /// Number of blocks held (rows × blocks per row).
    pub fn blocks(&self) -> usize {
        match self {
            QuantizedActs::Q8(v) => v.len(),
            QuantizedActs::Q8K(v) => v.len(),
        }
    }
}

/// Multiplies a run of weight rows with `m` quantised activation rows:
/// `out_t[r·m + i] = Σ_k W[r][k] · x[i][k]` for every row `r` of `w` and `i < m` (the output
/// is *transposed*: weight-row major).
///
/// `w` holds whole rows of `row_bytes` bytes of `ty`; `acts` must have been made by
/// [`QuantizedActs::new`] for `ty` with `cols = row_bytes / type_size · block_size` and `m`
/// rows. Errors (no panic) on any mismatch, or if `isa` is not available on this CPU.
pub fn dot_tile(
    ty: GgmlType,
    isa: Isa,
    w: &[u8],
    row_bytes: usize,
    acts: &QuantizedActs,
    m: usize,
    out_t: &mut [f32],
) -> Result<(), KernelError> {
    let bad = |detail: String| Err(KernelError::Shape { op: "dot_tile", detail });
    if !ty.is_quantized() {
        return Err(KernelError::Invalid(format!("dot_tile needs a block-quantised type, got {ty}")));
    }
    if !isa.is_available() {
        return Err(KernelError::Invalid(format!("{isa:?} kernels are not supported by this CPU")));
    }
    let size = ty.type_size();
    if row_bytes == 0 || row_bytes % size != 0 || w.len() % row_bytes != 0 {
        return bad(format!("{} bytes are not whole rows of {row_bytes} bytes of {ty}", w.len()));
    }
    let nb = row_bytes / size;
    let nrows = w.len() / row_bytes;
    if acts.blocks() != m * nb || out_t.len() != nrows * m {
        return bad(format!(
            "{nrows} rows of {nb} blocks, {} activation blocks for m = {m}, out {}",
            acts.blocks(),
            out_t.len()
        ));
    }
    match acts {
        QuantizedActs::Q8(x) => {
            if ty.block_size() != QK8 {
                return Err(KernelError::Invalid(format!("{ty} weights need 256-element activation blocks")));
            }
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx2 {
                // SAFETY: the CPU has AVX2/FMA/F16C (checked above) and every length was checked.
                unsafe { super::avx2_legacy::tile(ty, w, row_bytes, x, m, out_t) };
                return Ok(());
            }
            legacy_scalar(ty, w, row_bytes, x, m, out_t);
        }
        QuantizedActs::Q8K(x) => {
            if ty.block_size() != QK_K {
                return Err(KernelError::Invalid(format!("{ty} weights need 32-element activation blocks")));
            }
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx2 && ty != GgmlType::Q8K {
                // SAFETY: the CPU has AVX2/FMA/F16C (checked above) and every length was checked.
                unsafe { super::avx2_kquants::tile(ty, w, row_bytes, x, m, out_t) };
                return Ok(());
            }
            kquants::tile_scalar(ty, w, row_bytes, x, m, out_t);
        }
    }
    Ok(())
}

fn legacy_scalar(ty: GgmlType, w: &[u8], row_bytes: usize, x: &[BlockQ8], m: usize, out_t: &mut [f32]) {
    use legacy::tile_scalar as t;
    match ty {
        GgmlType::Q4_0 => t::<legacy::Q4_0>(w, row_bytes, x, m, out_t),
        GgmlType::Q4_1 => t::<legacy::Q4_1>(w, row_bytes, x, m, out_t),
        GgmlType::Q5_0 => t::<legacy::Q5_0>(w, row_bytes, x, m, out_t),
        GgmlType::Q5_1 => t::<legacy::Q5_1>(w, row_bytes, x, m, out_t),
        GgmlType::Q8_0 => t::<legacy::Q8_0>(w, row_bytes, x, m, out_t),
        GgmlType::Q8_1 => t::<legacy::Q8_1>(w, row_bytes, x, m, out_t),
        _ => unreachable!("legacy_scalar called with {ty}"),
    }
}
