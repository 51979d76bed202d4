//! y = x · Wᵀ for a weight in any stored format.
//!
//! - Block-quantised weights (Q4_0 … Q8_0, Q2_K … Q8_K): the `m` activation rows are quantised
//!   once to 8-bit blocks ([`QuantizedActs`]), then integer block dot products run over the
//!   stored blocks (AVX2 where the CPU has it, portable Rust otherwise; see `quant::tile`).
//! - F32 weights: `matrixmultiply`'s sgemm for `m ≥ 4`, AVX2/FMA dot products below that.
//! - F16/BF16 weights: for `m ≥ 4` each task converts its rows to f32 and runs sgemm; below
//!   that they are converted inside the dot product (F16C `vcvtph2ps`, bf16 by a shift).
//!
//! The weight rows are split into chunks, one rayon task each, so even `m = 1` (decode) uses
//! every core and each task streams a contiguous run of weight bytes. With `m > 1` each task
//! computes an `m × chunk` block of the output (reading its weights once from memory, then
//! from cache once per four activation rows) and the blocks are copied into place.
//!
//! Every row's result is independent of `m` and of the chunking (bit for bit on the quantised
//! path), so a search branch decodes the same whichever batch it is in.

use rayon::prelude::*;

pub use crate::quant::tile::Isa;
use crate::quant::tile::{dot_tile, QuantizedActs};
use crate::weight::WeightData;
use crate::{KernelError, Weight};

/// A task should have at least this many multiply-adds (about 5 µs of Q4_1 work on one
/// core), or waking another thread costs more than it saves.
const MIN_TASK_MACS: usize = 1 << 17;
/// With several activation rows, a quantised task's weights stay under this many bytes so
/// they are re-read from L1/L2 for each group of four rows.
const TILE_WEIGHT_BYTES: usize = 32 << 10;

/// `x` is `m × w.cols` (row-major), `out` is `m × w.rows`: `out[i][r] = Σ_k x[i][k] · W[r][k]`.
///
/// Uses the fastest kernels this CPU supports. Quantised weights multiply 8-bit-quantised
/// activations, so results differ from [`matmul_reference`] by the activation rounding
/// (at most half a quantisation step, `max|x_block| / 254`, per element).
pub fn matmul(x: &[f32], m: usize, w: &Weight, out: &mut [f32]) -> Result<(), KernelError> {
    matmul_with(Isa::detect(), x, m, w, out)
}

/// [`matmul`] with the quantised kernels of a given instruction set (tests and benchmarks
/// compare them); errors if the CPU does not support `isa`.
pub fn matmul_with(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &Weight,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let (rows, cols) = (w.rows, w.cols);
    check_shapes(x, m, w, out)?;
    if m == 0 || rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        out.fill(0.0);
        return Ok(());
    }
    match &w.data {
        WeightData::Stacked(parts) => {
            stacked(parts, m, rows, out, |p, o| matmul_with(isa, x, m, p, o))
        }
        WeightData::F32(v) => {
            let chunk = chunk_rows(rows, m, cols, usize::MAX);
            run_chunks(m, rows, chunk, out, |r0, nr, o, ld| {
                f32_block(isa, x, m, cols, &v[r0 * cols..(r0 + nr) * cols], o, ld);
                Ok(())
            })
        }
        WeightData::Raw { ty, bytes } if !ty.is_quantized() => {
            if ty == &crate::quant::GgmlType::F32 {
                // Only reachable by building a Weight by hand (from_raw converts F32 bytes).
                let w32 = Weight::from_raw(rows, cols, *ty, bytes.clone())?;
                return matmul_with(isa, x, m, &w32, out);
            }
            let (ty, row_bytes) = (*ty, ty.bytes_for(cols)?);
            let chunk = chunk_rows(rows, m, cols, usize::MAX);
            run_chunks(m, rows, chunk, out, |r0, nr, o, ld| {
                let wb = &bytes[r0 * row_bytes..(r0 + nr) * row_bytes];
                if float_tile(isa, ty, wb, nr, cols, x, m, o, ld) {
                    // Done by the batch-invariant AVX2 tiles.
                } else if m >= 4 {
                    // Convert the chunk once, then sgemm.
                    let mut wf = vec![0.0f32; nr * cols];
                    crate::quant::dequantize(ty, wb, &mut wf)?;
                    f32_block(isa, x, m, cols, &wf, o, ld);
                } else {
                    // Convert while multiplying (F16C/AVX2 where available).
                    for (r, rb) in wb.chunks_exact(row_bytes).enumerate() {
                        for i in 0..m {
                            let xi = &x[i * cols..(i + 1) * cols];
                            o[i * ld + r] = crate::quant::float::dot_half_row(ty, rb, xi);
                        }
                    }
                }
                Ok(())
            })
        }
        WeightData::Raw { ty, bytes } => {
            let (ty, row_bytes) = (*ty, ty.bytes_for(cols)?);
            let acts = QuantizedActs::new(ty, x, m, cols)?;
            let max_rows = if m > 1 {
                (TILE_WEIGHT_BYTES / row_bytes).max(4)
            } else {
                usize::MAX
            };
            let chunk = chunk_rows(rows, m, cols, max_rows);
            run_chunks(m, rows, chunk, out, |r0, nr, o, ld| {
                dot_tile(
                    isa,
                    &bytes[r0 * row_bytes..(r0 + nr) * row_bytes],
                    &acts,
                    o,
                    ld,
                )
            })
        }
        WeightData::Interleaved { ty, bytes } => {
            let (ty, row_bytes) = (*ty, crate::quant::interleave::row_bytes(*ty, cols)?);
            let acts = QuantizedActs::new(ty, x, m, cols)?;
            let max_rows = if m > 1 {
                TILE_WEIGHT_BYTES / row_bytes
            } else {
                usize::MAX
            };
            // Chunks of whole groups of rows.
            let group = crate::quant::interleave::GROUP;
            let chunk = chunk_rows(rows, m, cols, max_rows).next_multiple_of(group);
            run_chunks(m, rows, chunk, out, |r0, nr, o, ld| {
                crate::quant::dot_tile_interleaved(
                    isa,
                    &bytes[r0 * row_bytes..(r0 + nr) * row_bytes],
                    &acts,
                    o,
                    ld,
                )
            })
        }
    }
}

/// The oracle: dequantises each weight row to f32 and accumulates each dot product in f64.
/// Slow; tests and the CUDA path compare against it.
pub fn matmul_reference(
    x: &[f32],
    m: usize,
    w: &Weight,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let (rows, cols) = (w.rows, w.cols);
    if m.checked_mul(cols) != Some(x.len()) || m.checked_mul(rows) != Some(out.len()) {
        return Err(KernelError::Shape {
            op: "matmul_reference",
            detail: format!("x {} (m={m}), W {rows}x{cols}, out {}", x.len(), out.len()),
        });
    }
    check_storage(w)?;
    let mut row = vec![0.0f32; cols];
    for r in 0..rows {
        w.row_to_f32(r, &mut row)?;
        for i in 0..m {
            let xi = &x[i * cols..(i + 1) * cols];
            out[i * rows + r] = xi
                .iter()
                .zip(&row)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>() as f32;
        }
    }
    Ok(())
}

/// Like [`matmul`], but without 8-bit activations: quantised weights are dequantised chunk by
/// chunk and multiplied with the f32 activations, which is what a framework computes on a
/// dequantised model. Several times slower; arbor's `--exact` mode and validation use it.
pub fn matmul_dequantized(
    x: &[f32],
    m: usize,
    w: &Weight,
    out: &mut [f32],
) -> Result<(), KernelError> {
    let ty = match &w.data {
        WeightData::Raw { ty, .. } | WeightData::Interleaved { ty, .. } if ty.is_quantized() => *ty,
        WeightData::Stacked(parts) => {
            check_shapes(x, m, w, out)?;
            return stacked(parts, m, w.rows, out, |p, o| matmul_dequantized(x, m, p, o));
        }
        _ => return matmul(x, m, w, out),
    };
    check_shapes(x, m, w, out)?;
    let (rows, cols) = (w.rows, w.cols);
    if m == 0 || rows == 0 || cols == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let (isa, row_bytes) = (Isa::detect(), ty.bytes_for(cols)?);
    let chunk = chunk_rows(rows, m, cols, usize::MAX);
    run_chunks(m, rows, chunk, out, |r0, nr, o, ld| {
        let mut copy = Vec::new();
        let raw = match &w.data {
            WeightData::Raw { bytes, .. } => &bytes[r0 * row_bytes..(r0 + nr) * row_bytes],
            _ => {
                // Interleaved rows, back in ggml's layout.
                copy.resize(nr * row_bytes, 0u8);
                w.raw_rows(r0, nr, &mut copy)?;
                &copy
            }
        };
        let mut wf = vec![0.0f32; nr * cols];
        crate::quant::dequantize(ty, raw, &mut wf)?;
        f32_block(isa, x, m, cols, &wf, o, ld);
        Ok(())
    })
}

/// Runs `f(part, part_out)` for each stacked part and places each part's `m × part.rows`
/// result in its columns of `out` (`m × rows`).
fn stacked(
    parts: &[Weight],
    m: usize,
    rows: usize,
    out: &mut [f32],
    f: impl Fn(&Weight, &mut [f32]) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    let mut col = 0;
    for p in parts {
        let mut o = vec![0.0f32; m * p.rows];
        f(p, &mut o)?;
        for i in 0..m {
            out[i * rows + col..i * rows + col + p.rows]
                .copy_from_slice(&o[i * p.rows..(i + 1) * p.rows]);
        }
        col += p.rows;
    }
    Ok(())
}

/// Checks that `x`, `out` and the weight's storage fit the weight's shape.
fn check_shapes(x: &[f32], m: usize, w: &Weight, out: &[f32]) -> Result<(), KernelError> {
    let (rows, cols) = (w.rows, w.cols);
    if m.checked_mul(cols) != Some(x.len()) || m.checked_mul(rows) != Some(out.len()) {
        return Err(KernelError::Shape {
            op: "matmul",
            detail: format!("x {} (m={m}), W {rows}x{cols}, out {}", x.len(), out.len()),
        });
    }
    check_storage(w)
}

/// `Weight`'s fields are public, so its storage may not match its shape: check before any
/// kernel slices it.
fn check_storage(w: &Weight) -> Result<(), KernelError> {
    let (rows, cols) = (w.rows, w.cols);
    let (got, expected) = match &w.data {
        WeightData::Stacked(parts) => {
            for p in parts {
                if p.cols != cols {
                    return Err(KernelError::Shape {
                        op: "matmul",
                        detail: format!("a stacked part is {} wide, not {cols}", p.cols),
                    });
                }
                check_storage(p)?;
            }
            (parts.iter().map(|p| p.rows).sum(), Some(rows))
        }
        WeightData::F32(v) => (v.len(), rows.checked_mul(cols)),
        WeightData::Raw { ty, bytes } => (bytes.len(), ty.bytes_for(cols)?.checked_mul(rows)),
        WeightData::Interleaved { ty, bytes } => {
            let whole_groups = rows % crate::quant::interleave::GROUP == 0;
            let expected = crate::quant::interleave::row_bytes(*ty, cols)?.checked_mul(rows);
            let ok = crate::quant::interleave::supports(*ty) && whole_groups;
            (bytes.len(), expected.filter(|_| ok))
        }
    };
    match expected {
        Some(e) if e == got => Ok(()),
        _ => Err(KernelError::Shape {
            op: "matmul",
            detail: format!(
                "a {rows}x{cols} {} weight holds {got} elements/bytes",
                w.ty()
            ),
        }),
    }
}

/// Weight rows per task: up to four tasks per thread, a multiple of the thread count when
/// there are more tasks than threads (so no thread gets a lone extra round), none with fewer
/// than [`MIN_TASK_MACS`] multiply-adds (below that one task runs on the calling thread and
/// no thread is woken), none longer than `max_rows`.
fn chunk_rows(rows: usize, m: usize, cols: usize, max_rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let macs = rows.saturating_mul(m).saturating_mul(cols);
    let mut tasks = (threads * 4).min(macs / MIN_TASK_MACS).max(1);
    if tasks > threads {
        tasks -= tasks % threads;
    }
    rows.div_ceil(tasks).min(max_rows).max(1)
}

/// Runs `f(r0, nr, block, ld)` for each chunk of weight rows `r0..r0 + nr`, in parallel;
/// `f` writes the `m × nr` output block `block[i·ld + r]`. Assembles `out` (`m × rows`).
fn run_chunks<F>(
    m: usize,
    rows: usize,
    chunk: usize,
    out: &mut [f32],
    f: F,
) -> Result<(), KernelError>
where
    F: Fn(usize, usize, &mut [f32], usize) -> Result<(), KernelError> + Sync,
{
    if chunk >= rows {
        return f(0, rows, out, rows);
    }
    if m == 1 {
        // The output row is contiguous: tasks write straight into it.
        return out
            .par_chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(c, o)| f(c * chunk, o.len(), o, o.len()));
    }
    let blocks: Vec<Vec<f32>> = (0..rows.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let (r0, nr) = (c * chunk, chunk.min(rows - c * chunk));
            let mut block = vec![0.0f32; m * nr];
            f(r0, nr, &mut block, nr)?;
            Ok(block)
        })
        .collect::<Result<_, KernelError>>()?;
    out.par_chunks_mut(rows).enumerate().for_each(|(i, orow)| {
        for (c, block) in blocks.iter().enumerate() {
            let nr = block.len() / m;
            orow[c * chunk..c * chunk + nr].copy_from_slice(&block[i * nr..(i + 1) * nr]);
        }
    });
    Ok(())
}

/// `out[i·ld + r] = x_i · w_r` for f32 weight rows `w` (`nr × cols`).
fn f32_block(isa: Isa, x: &[f32], m: usize, cols: usize, w: &[f32], out: &mut [f32], ld: usize) {
    let nr = w.len() / cols;
    // SAFETY: the bytes of a live &[f32] (u8 has alignment 1 and every f32 byte is
    // initialised); the tiles read them back as f32.
    let wb =
        unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), std::mem::size_of_val(w)) };
    if float_tile(
        isa,
        crate::quant::GgmlType::F32,
        wb,
        nr,
        cols,
        x,
        m,
        out,
        ld,
    ) {
        return;
    }
    if m >= 4 {
        // SAFETY: A = x is m × cols (row stride cols), B = wᵀ is cols × nr (element (k, r) at
        // w[r·cols + k]), C is m × nr with row stride ld ≥ nr inside `out`, which holds
        // (m − 1)·ld + nr elements; all three are live slices of at least those lengths.
        debug_assert!(out.len() >= (m - 1) * ld + nr && x.len() >= m * cols);
        unsafe {
            matrixmultiply::sgemm(
                m,
                cols,
                nr,
                1.0,
                x.as_ptr(),
                cols as isize,
                1,
                w.as_ptr(),
                1,
                cols as isize,
                0.0,
                out.as_mut_ptr(),
                ld as isize,
                1,
            );
        }
        return;
    }
    for (r, wr) in w.chunks_exact(cols).enumerate() {
        for i in 0..m {
            out[i * ld + r] = crate::quant::float::dot_f32_row(&x[i * cols..(i + 1) * cols], wr);
        }
    }
}

/// Whether float weights (F32, F16, BF16) go through the AVX2 tiles, whose per-row
/// arithmetic does not depend on the batch (elsewhere: sgemm from 4 rows, dot products below).
fn float_tiles_available(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && isa.has_avx2() && isa.is_available()
}

/// `out[i·ld + r] = x_i · w_r` through the AVX2 float tiles, for `nr` rows of `cols` elements
/// of `ty` (F32, F16 or BF16) in `w`; false (nothing done) where this CPU lacks them.
#[allow(clippy::too_many_arguments)]
fn float_tile(
    isa: Isa,
    ty: crate::quant::GgmlType,
    w: &[u8],
    nr: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    ld: usize,
) -> bool {
    if !float_tiles_available(isa) {
        return false;
    }
    let esize = if ty == crate::quant::GgmlType::F32 {
        4
    } else {
        2
    };
    assert!(
        w.len() == nr * cols * esize
            && x.len() >= m * cols
            && (m == 0 || (ld >= nr && out.len() >= (m - 1) * ld + nr)),
        "float_tile: operand sizes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA/F16C are available (checked above); the sizes were just checked.
    unsafe {
        crate::quant::avx2_float::tile_float(ty, w.as_ptr(), nr, cols, x, m, out, ld)
    };
    true
}

#[cfg(test)]
#[path = "matmul_tests.rs"]
mod matmul_tests;

#[cfg(test)]
#[path = "matmul_interleave_tests.rs"]
mod matmul_interleave_tests;
