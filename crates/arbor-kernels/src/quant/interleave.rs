//! Weight rows interleaved in groups of eight, the CPU matmul's own layout for Q4_0, Q4_1 and
//! Q8_0 (made once at load; files keep ggml's row-major blocks).
//!
//! Row-major blocks make a kernel reduce the eight 32-bit lanes of each block's dot product
//! to one number per weight row. Here block `b` of rows `8g..8g+8` is stored together, its
//! quant bytes transposed so that 32-bit lane `r` of every 32-byte chunk belongs to row `r`:
//! one `vpdpbusd` of a chunk with four activation bytes broadcast to every lane advances the
//! dot products of all eight rows at once, and a block ends with the eight rows' sums in one
//! register, ready to scale by the rows' eight `d` loaded as one vector. No horizontal sums.
//!
//! Layout of one group block (`8 · SIZE` bytes, so a group of rows keeps its byte count):
//!
//! | type | bytes | fields                                                              |
//! |------|-------|---------------------------------------------------------------------|
//! | Q4_0 | 144   | f16 d[8], then 4 chunks of 32 bytes                                 |
//! | Q4_1 | 160   | f16 d[8], f16 m[8], then 4 chunks of 32 bytes                       |
//! | Q8_0 | 272   | f16 d[8], then 8 chunks of 32 bytes                                 |
//!
//! Chunk `c`, lane `r` (bytes `4r..4r+4`) holds bytes `4c..4c+4` of row `r`'s `qs`: for the
//! 4-bit types, elements `4c..4c+4` in the low nibbles and `16+4c..16+4c+4` in the high ones;
//! for Q8_0, elements `4c..4c+4`.
//!
//! Every kernel computes each row's result the same way, whatever the instruction set or the
//! number of activation rows: per block, the exact integer dot product, times `d·d_x` in f32,
//! accumulated by an FMA (`acc = isum·(d·d_x) + acc`); the minimum term likewise
//! (`mins = m·s_x + mins`); the result is `acc + mins`. So the portable, AVX2 and VNNI
//! kernels agree bit for bit, and a row's result does not depend on its batch.

use super::activation::BlockQ8;
use super::float::f16_le;
use super::GgmlType;

/// Rows per group.
pub const GROUP: usize = 8;

/// The types with an interleaved form.
pub fn supports(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// Bytes of `qs` per row block, and where they start in a ggml block.
fn qs_span(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q4_0 => (16, 2),
        GgmlType::Q4_1 => (16, 4),
        _ => (32, 2),
    }
}

/// Bytes of scales (`d`, and `m` for Q4_1) at the head of a group block.
fn head_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_1 => 4 * GROUP,
        _ => 2 * GROUP,
    }
}

/// Interleaves `rows` (a multiple of [`GROUP`]) row-major rows of `row_bytes` of a type that
/// [`supports`]; the result has the same length.
pub fn interleave(ty: GgmlType, raw: &[u8], row_bytes: usize) -> Vec<u8> {
    debug_assert!(supports(ty) && raw.len().is_multiple_of(GROUP * row_bytes));
    let size = ty.type_size();
    let (qn, qoff) = qs_span(ty);
    let head = head_bytes(ty);
    let mut out = vec![0u8; raw.len()];
    for (src, dst) in raw
        .chunks_exact(GROUP * row_bytes)
        .zip(out.chunks_exact_mut(GROUP * row_bytes))
    {
        for (b, gb) in dst.chunks_exact_mut(GROUP * size).enumerate() {
            for r in 0..GROUP {
                let blk = &src[r * row_bytes + b * size..][..size];
                gb[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                if ty == GgmlType::Q4_1 {
                    gb[2 * GROUP + 2 * r..][..2].copy_from_slice(&blk[2..4]);
                }
                for c in 0..qn / 4 {
                    let at = head + c * 4 * GROUP + 4 * r;
                    gb[at..at + 4].copy_from_slice(&blk[qoff + 4 * c..][..4]);
                }
            }
        }
    }
    out
}

/// Row `r` of interleaved weights, back in ggml's row-major block layout (`out` is one row of
/// `row_bytes`).
pub fn raw_row(ty: GgmlType, data: &[u8], row_bytes: usize, r: usize, out: &mut [u8]) {
    let size = ty.type_size();
    let (qn, qoff) = qs_span(ty);
    let head = head_bytes(ty);
    let (g, lane) = (r / GROUP, r % GROUP);
    let group = &data[g * GROUP * row_bytes..][..GROUP * row_bytes];
    for (gb, blk) in group
        .chunks_exact(GROUP * size)
        .zip(out.chunks_exact_mut(size))
    {
        blk[..2].copy_from_slice(&gb[2 * lane..2 * lane + 2]);
        if ty == GgmlType::Q4_1 {
            blk[2..4].copy_from_slice(&gb[2 * GROUP + 2 * lane..][..2]);
        }
        for c in 0..qn / 4 {
            let at = head + c * 4 * GROUP + 4 * lane;
            blk[qoff + 4 * c..][..4].copy_from_slice(&gb[at..at + 4]);
        }
    }
}

/// The portable kernel: `out[i·ld + r] = dot(weight row r, activation row i)` for the
/// `w.len() / row_bytes` interleaved rows of `w` and the `m` rows of `x` (`nb` blocks each).
pub(crate) fn tile_scalar(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ8],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    let size = ty.type_size();
    let nb = row_bytes / size;
    let head = head_bytes(ty);
    for (g, group) in w.chunks_exact(GROUP * row_bytes).enumerate() {
        for i in 0..m {
            let mut acc = [0.0f32; GROUP];
            let mut mins = [0.0f32; GROUP];
            for (b, gb) in group.chunks_exact(GROUP * size).enumerate() {
                let xb = &x[i * nb + b];
                for r in 0..GROUP {
                    let d = f16_le(&gb[2 * r..]);
                    let mut isum = 0i32;
                    match ty {
                        GgmlType::Q8_0 => {
                            for c in 0..8 {
                                for k in 0..4 {
                                    let q = gb[head + c * 32 + 4 * r + k] as i8 as i32;
                                    isum += q * xb.qs[4 * c + k] as i32;
                                }
                            }
                        }
                        _ => {
                            for c in 0..4 {
                                for k in 0..4 {
                                    let byte = gb[head + c * 32 + 4 * r + k];
                                    isum += (byte & 0x0F) as i32 * xb.qs[4 * c + k] as i32;
                                    isum += (byte >> 4) as i32 * xb.qs[16 + 4 * c + k] as i32;
                                }
                            }
                        }
                    }
                    acc[r] = (isum as f32).mul_add(d * xb.d, acc[r]);
                    let min = match ty {
                        GgmlType::Q4_0 => d * -8.0,
                        GgmlType::Q4_1 => f16_le(&gb[2 * GROUP + 2 * r..]),
                        _ => continue,
                    };
                    mins[r] = min.mul_add(xb.s, mins[r]);
                }
            }
            for r in 0..GROUP {
                out[i * ld + g * GROUP + r] = acc[r] + mins[r];
            }
        }
    }
}
