//! Entry points of the quantised matmul kernels: activation quantisation for a weight type,
//! and a checked "tile" call that multiplies a run of weight rows with every activation row.
//!
//! [`matmul()`](crate::ops::matmul::matmul) splits the weight rows into chunks, one rayon task each, and calls
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
    /// [`Isa::Avx2`] plus AVX-512 VNNI and VL: the 8-bit dot products of the 32-element block
    /// types in one instruction (`vpdpbusd` on 256-bit registers); bitwise the same results.
    Avx2Vnni,
}

impl Isa {
    /// The fastest instruction set this CPU supports (detected at run time).
    pub fn detect() -> Isa {
        [Isa::Avx2Vnni, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// Whether this CPU can run kernels for `self`.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Vnni => {
                Isa::Avx2.is_available()
                    && is_x86_feature_detected!("avx512vnni")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx2Vnni => false,
        }
    }

    /// Whether `self` includes AVX2, FMA and F16C (every kernel without a VNNI form uses them).
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx2Vnni)
    }
}

/// Activation rows quantised to 8 bits for one weight type: 32-blocks for the legacy types,
/// 256-blocks (Q8_K layout) for the K-quants. Made once per matmul, shared by every task.
#[derive(Clone, Debug)]
pub struct QuantizedActs {
    ty: GgmlType,
    m: usize,
    cols: usize,
    blocks: ActBlocks,
}

/// The blocks of [`QuantizedActs`], rows one after another.
#[derive(Clone, Debug)]
pub enum ActBlocks {
    /// For Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 weights.
    Q8(Vec<BlockQ8>),
    /// For Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K weights.
    Q8K(Vec<BlockQ8K>),
}

/// Rows of at least this many elements in total are quantised in parallel.
const PAR_QUANTIZE_MIN: usize = 1 << 16;

/// Quantises each `cols`-row of `x` into `nb` blocks of `out` with `f`.
fn quantize_rows<B: Send>(
    x: &[f32],
    cols: usize,
    nb: usize,
    out: &mut [B],
    f: fn(&[f32], &mut [B]),
) {
    if cols == 0 {
        return;
    }
    if x.len() >= PAR_QUANTIZE_MIN && x.len() > cols {
        out.par_chunks_mut(nb)
            .zip(x.par_chunks(cols))
            .for_each(|(o, xr)| f(xr, o));
    } else {
        out.chunks_mut(nb)
            .zip(x.chunks(cols))
            .for_each(|(o, xr)| f(xr, o));
    }
}

impl QuantizedActs {
    /// Quantises `m` rows of `cols` activations (`x.len() == m·cols`) for dot products with
    /// weights of block-quantised type `ty`. Errors if `ty` is not block-quantised, `cols` is
    /// not a whole number of its blocks, or `x` has the wrong length.
    pub fn new(ty: GgmlType, x: &[f32], m: usize, cols: usize) -> Result<Self, KernelError> {
        if !ty.is_quantized() {
            return Err(KernelError::Invalid(format!(
                "{ty} weights are not block-quantised"
            )));
        }
        ty.bytes_for(cols)?;
        if m.checked_mul(cols) != Some(x.len()) {
            return Err(KernelError::Shape {
                op: "QuantizedActs::new",
                detail: format!("{} values for {m} rows of {cols}", x.len()),
            });
        }
        let blocks = if ty.block_size() == QK_K {
            let nb = cols / QK_K;
            let mut out = vec![BlockQ8K::ZERO; m * nb];
            quantize_rows(x, cols, nb, &mut out, quantize_row_q8k);
            ActBlocks::Q8K(out)
        } else {
            let nb = cols / QK8;
            let mut out = vec![BlockQ8::ZERO; m * nb];
            quantize_rows(x, cols, nb, &mut out, quantize_row_q8);
            ActBlocks::Q8(out)
        };
        Ok(QuantizedActs {
            ty,
            m,
            cols,
            blocks,
        })
    }

    /// The weight type these activations were quantised for.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Number of activation rows.
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Elements per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The quantised blocks.
    pub fn blocks(&self) -> &ActBlocks {
        &self.blocks
    }
}

/// Multiplies a run of weight rows of `acts.ty()` with the `m = acts.rows()` activation rows:
/// `out[i·ld + r] = Σ_k W[r][k] · x[i][k]` for every row `r` of `w` and `i < m`, i.e. an
/// `m × rows` block of an output with row stride `ld` (`ld ≥ rows`).
///
/// `w` holds whole weight rows of `acts.cols()` elements. Errors (no panic) on any size
/// mismatch, or if `isa` is not available on this CPU.
pub fn dot_tile(
    isa: Isa,
    w: &[u8],
    acts: &QuantizedActs,
    out: &mut [f32],
    ld: usize,
) -> Result<(), KernelError> {
    let (ty, m) = (acts.ty, acts.m);
    let row_bytes = ty.bytes_for(acts.cols)?;
    check_tile("dot_tile", isa, row_bytes, w.len(), 1, acts, out.len(), ld)?;
    // SAFETY (every call below): the CPU has the instruction set's features (checked above);
    // `w` is whole rows, `x` has m rows of row_bytes / type_size blocks and `out` (m−1)·ld +
    // nrows values.
    match &acts.blocks {
        ActBlocks::Q8(x) => {
            #[cfg(target_arch = "x86_64")]
            if isa.has_avx2() {
                let a = TileArgs::new(w, row_bytes, x, m, out, ld);
                // SAFETY: as above.
                unsafe {
                    run_simd(
                        isa,
                        ty,
                        a,
                        super::avx2_legacy::tile,
                        super::avx2_legacy::tile_vnni,
                    )
                };
                return Ok(());
            }
            legacy_scalar(ty, w, row_bytes, x, m, out, ld);
        }
        ActBlocks::Q8K(x) => {
            #[cfg(target_arch = "x86_64")]
            if isa.has_avx2() && ty != GgmlType::Q8K {
                let a = TileArgs::new(w, row_bytes, x, m, out, ld);
                // SAFETY: as above.
                unsafe {
                    run_simd(
                        isa,
                        ty,
                        a,
                        super::avx2_kquants::tile,
                        super::avx2_kquants::tile_vnni,
                    )
                };
                return Ok(());
            }
            kquants::tile_scalar(ty, w, row_bytes, x, m, out, ld);
        }
    }
    Ok(())
}

/// [`dot_tile`] for weights interleaved in groups of eight rows (see [`super::interleave`]):
/// `w` holds whole groups of `acts.ty()` (Q4_0, Q4_1 or Q8_0). Errors (no panic) on any size
/// mismatch, another type, or an `isa` this CPU lacks.
pub fn dot_tile_interleaved(
    isa: Isa,
    w: &[u8],
    acts: &QuantizedActs,
    out: &mut [f32],
    ld: usize,
) -> Result<(), KernelError> {
    let (ty, m) = (acts.ty, acts.m);
    if !super::interleave::supports(ty) {
        return Err(KernelError::Invalid(format!(
            "{ty} has no interleaved form"
        )));
    }
    let group = super::interleave::GROUP;
    let row_bytes = super::interleave::row_bytes(ty, acts.cols)?;
    let op = "dot_tile_interleaved";
    check_tile(op, isa, row_bytes, w.len(), group, acts, out.len(), ld)?;
    // SAFETY (every call below): the CPU has the instruction set's features, `w` is whole
    // groups, `x` has m rows of the type's blocks (`QuantizedActs::new` made them for `ty`
    // and `acts.cols`) and `out` (m−1)·ld + rows values (all checked above).
    match &acts.blocks {
        ActBlocks::Q8(x) => {
            #[cfg(target_arch = "x86_64")]
            if isa.has_avx2() {
                let a = TileArgs::new(w, row_bytes, x, m, out, ld);
                let (avx2, vnni) = (
                    super::avx2_interleave::tile,
                    super::avx2_interleave::tile_vnni,
                );
                unsafe { run_simd(isa, ty, a, avx2, vnni) };
                return Ok(());
            }
            super::interleave::tile_scalar(ty, w, row_bytes, x, m, out, ld);
        }
        ActBlocks::Q8K(x) => {
            #[cfg(target_arch = "x86_64")]
            if isa.has_avx2() {
                let a = TileArgs::new(w, row_bytes, x, m, out, ld);
                let avx2 = super::avx2_interleave::tile_kquant;
                let vnni = super::avx2_interleave::tile_kquant_vnni;
                unsafe { run_simd(isa, ty, a, avx2, vnni) };
                return Ok(());
            }
            match ty {
                GgmlType::Q4K | GgmlType::Q5K => {
                    super::interleave::tile_scalar_q4k(ty, w, row_bytes, x, m, out, ld)
                }
                _ => super::interleave::tile_scalar_q6k(w, row_bytes, x, m, out, ld),
            }
        }
    }
    Ok(())
}

/// Calls the VNNI entry point `vnni` on a VNNI CPU, else the AVX2 one `avx2`.
///
/// # Safety
/// The CPU must have `isa`'s features (AVX2 at least) and `a` must satisfy the entry points'
/// conditions (see [`check_tile`]).
#[cfg(target_arch = "x86_64")]
unsafe fn run_simd<X>(
    isa: Isa,
    ty: GgmlType,
    a: TileArgs<X>,
    avx2: unsafe fn(GgmlType, TileArgs<X>),
    vnni: unsafe fn(GgmlType, TileArgs<X>),
) {
    match isa {
        Isa::Avx2Vnni => vnni(ty, a),
        _ => avx2(ty, a),
    }
}

/// Checks a tile call: `isa` available, `w_len` bytes of whole units of `rows_per_unit` rows
/// of `row_bytes`, and an `m × rows` output with row stride `ld` inside `out_len` values.
#[allow(clippy::too_many_arguments)]
fn check_tile(
    op: &'static str,
    isa: Isa,
    row_bytes: usize,
    w_len: usize,
    rows_per_unit: usize,
    acts: &QuantizedActs,
    out_len: usize,
    ld: usize,
) -> Result<(), KernelError> {
    let (ty, m) = (acts.ty, acts.m);
    if !isa.is_available() {
        return Err(KernelError::Invalid(format!(
            "{isa:?} kernels are not supported by this CPU"
        )));
    }
    let unit = row_bytes * rows_per_unit;
    let nrows = w_len.checked_div(row_bytes).unwrap_or(0);
    let out_ok = m == 0
        || (ld >= nrows
            && (m - 1).checked_mul(ld).and_then(|v| v.checked_add(nrows)) <= Some(out_len));
    if unit == 0 || !w_len.is_multiple_of(unit) || !out_ok {
        return Err(KernelError::Shape {
            op,
            detail: format!(
                "{w_len} bytes of {ty} weights in units of {rows_per_unit} rows of {row_bytes} bytes, \
                 m = {m}, out {out_len} with stride {ld}"
            ),
        });
    }
    Ok(())
}

/// The operands of one SIMD kernel call (see [`dot_tile`]): whole weight rows `w` of
/// `row_bytes`, `m` activation rows of blocks `x`, and the `m × rows` output block `out` with
/// row stride `ld`.
#[cfg(target_arch = "x86_64")]
pub(crate) struct TileArgs<'a, X> {
    pub w: &'a [u8],
    pub row_bytes: usize,
    pub x: &'a [X],
    pub m: usize,
    pub out: &'a mut [f32],
    pub ld: usize,
}

#[cfg(target_arch = "x86_64")]
impl<'a, X> TileArgs<'a, X> {
    pub(crate) fn new(
        w: &'a [u8],
        row_bytes: usize,
        x: &'a [X],
        m: usize,
        out: &'a mut [f32],
        ld: usize,
    ) -> Self {
        TileArgs {
            w,
            row_bytes,
            x,
            m,
            out,
            ld,
        }
    }
}

fn legacy_scalar(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ8],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    use legacy::tile_scalar as t;
    match ty {
        GgmlType::Q4_0 => t::<legacy::Q4_0>(w, row_bytes, x, m, out, ld),
        GgmlType::Q4_1 => t::<legacy::Q4_1>(w, row_bytes, x, m, out, ld),
        GgmlType::Q5_0 => t::<legacy::Q5_0>(w, row_bytes, x, m, out, ld),
        GgmlType::Q5_1 => t::<legacy::Q5_1>(w, row_bytes, x, m, out, ld),
        GgmlType::Q8_0 => t::<legacy::Q8_0>(w, row_bytes, x, m, out, ld),
        GgmlType::Q8_1 => t::<legacy::Q8_1>(w, row_bytes, x, m, out, ld),
        _ => unreachable!("legacy_scalar called with {ty}"),
    }
}
