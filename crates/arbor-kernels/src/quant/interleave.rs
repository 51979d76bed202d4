//! Weight rows interleaved in groups of eight, the CPU matmul's own layout for Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0, Q4_K, Q5_K and Q6_K (made once at load; files keep ggml's row-major blocks).
//!
//! Row-major blocks make a kernel reduce the eight 32-bit lanes of each block's dot product
//! to one number per weight row. Here block `b` of rows `8g..8g+8` is stored together, its
//! quant bytes transposed so that 32-bit lane `r` of every 32-byte chunk belongs to row `r`:
//! one `vpdpbusd` of a chunk with four activation bytes broadcast to every lane advances the
//! dot products of all eight rows at once, and a block ends with the eight rows' sums in one
//! register, ready to scale by the rows' eight `d` loaded as one vector. No horizontal sums.
//!
//! Layout of one group block (`8 · SIZE` bytes for the 32-element types, so a group of rows
//! keeps its byte count; Q4_K's six-bit scales are stored unpacked, 1184 bytes for 1152):
//!
//! | type | bytes | fields                                                              |
//! |------|-------|---------------------------------------------------------------------|
//! | Q4_0 | 144   | f16 d[8], then 4 chunks of 32 bytes                                 |
//! | Q4_1 | 160   | f16 d[8], f16 m[8], then 4 chunks of 32 bytes                       |
//! | Q5_0 | 176   | f16 d[8], u32 qh[8], then 4 chunks of 32 bytes                      |
//! | Q5_1 | 192   | f16 d[8], f16 m[8], u32 qh[8], then 4 chunks of 32 bytes            |
//! | Q8_0 | 272   | f16 d[8], then 8 chunks of 32 bytes                                 |
//! | Q4_K | 1184  | f16 d[8], f16 dmin[8], u8 sc[8][8], u8 mn[8][8], 32 chunks of 32 bytes |
//! | Q5_K | 1440  | a Q4_K group block, then `qh` in 8 chunks of 32 bytes                 |
//! | Q6_K | 1680  | f16 d[8], i8 sc[16][8], `ql` in 32 chunks, `qh` in 16 chunks          |
//!
//! Chunk `c`, lane `r` (bytes `4r..4r+4`) holds bytes `4c..4c+4` of row `r`'s `qs`: for the
//! 4-bit types, elements `4c..4c+4` in the low nibbles and `16+4c..16+4c+4` in the high ones;
//! for Q8_0, elements `4c..4c+4`. Q4_K's chunk `8s + c` holds bytes `32s + 4c..` of each
//! row's `qs`: sub-block `2s` elements `4c..` in the low nibbles, sub-block `2s + 1` in the high.
//!
//! Every kernel computes each row's result the same way, whatever the instruction set or the
//! number of activation rows: per block, the exact integer dot product, times `d·d_x` in f32,
//! accumulated by an FMA (`acc = isum·(d·d_x) + acc`); the minimum term likewise
//! (`mins = m·s_x + mins`); the result is `acc + mins` (the K-quants: [`tile_scalar_q4k`],
//! [`tile_scalar_q6k`]). So the portable, AVX2 and VNNI kernels agree bit for bit, and a
//! row's result does not depend on its batch.

use super::activation::{BlockQ8, BlockQ8K};
use super::float::f16_le;
use super::kquants::{k4_scales_mins, six_bit};
use super::GgmlType;
use rayon::prelude::*;

/// Rows per group.
pub const GROUP: usize = 8;

/// The types with an interleaved form.
pub fn supports(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
}

/// The types the engine interleaves: every type with a form except Q6_K, whose one-row
/// (decode) kernel streams a large matrix from memory at a third of the row-major kernel's
/// speed (35840×1536: 4.0 vs 1.4 ms), while its batched gain is only 1.1–1.3×.
pub fn preferred(ty: GgmlType) -> bool {
    supports(ty) && ty != GgmlType::Q6K
}

/// Bytes of one group block (block `b` of eight rows).
fn group_block_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4K => Q4K_GROUP_BLOCK,
        GgmlType::Q5K => Q5K_GROUP_BLOCK,
        _ => GROUP * ty.type_size(),
    }
}

/// A Q4_K group block: f16 d[8], f16 dmin[8], u8 sc[8 sub-blocks][8 rows], u8 mn[8][8], then
/// 4 segments × 8 chunks of 32 bytes (1152 bytes as rows: the six-bit scales are unpacked).
pub(crate) const Q4K_GROUP_BLOCK: usize = 32 + 128 + 1024;
/// Offsets in a Q4_K group block.
pub(crate) const Q4K_SC: usize = 32;
pub(crate) const Q4K_MN: usize = 96;
pub(crate) const Q4K_QS: usize = 160;
/// A Q5_K group block: a Q4_K one, then the rows' `qh` as 8 chunks of 32 bytes (chunk `c`,
/// lane `r`: bytes `4c..4c+4` of row `r`'s `qh`; bit `2s` / `2s + 1` of byte `l` is the
/// fifth bit of element `l` of sub-block `2s` / `2s + 1`). 1440 bytes for 1408.
pub(crate) const Q5K_GROUP_BLOCK: usize = Q4K_GROUP_BLOCK + 256;
pub(crate) const Q5K_QH: usize = Q4K_GROUP_BLOCK;

/// Offsets in a Q6_K group block (1680 bytes, eight rows' 210): f16 d[8], i8 sc[16 sub-blocks]
/// [8 rows], then `ql` as 32 chunks of 32 bytes and `qh` as 16 chunks.
pub(crate) const Q6K_SC: usize = 16;
pub(crate) const Q6K_QL: usize = 144;
pub(crate) const Q6K_QH: usize = 144 + 1024;

/// Bytes per row of a `cols`-wide matrix of `ty` in the interleaved layout (a group of eight
/// rows takes eight times this): ggml's row bytes, except Q4_K and Q5_K (scales unpacked:
/// 148 and 180 per 256 elements, not 144 and 176).
pub fn row_bytes(ty: GgmlType, cols: usize) -> Result<usize, crate::KernelError> {
    let blocks = ty.bytes_for(cols)? / ty.type_size();
    Ok(blocks * group_block_bytes(ty) / GROUP)
}

/// Bytes of `qs` per row block, and where they start in a ggml block (legacy types).
fn qs_span(ty: GgmlType) -> (usize, usize) {
    match ty {
        GgmlType::Q4_0 => (16, 2),
        GgmlType::Q4_1 => (16, 4),
        GgmlType::Q5_0 => (16, 6),
        GgmlType::Q5_1 => (16, 8),
        _ => (32, 2),
    }
}

/// Whether a legacy type carries `m` (f16, after `d`) in its blocks.
fn has_m(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1)
}

/// Where the rows' `qh` (u32 each) sit in a Q5 group block: after `d` (and `m`).
pub(crate) fn qh_at(ty: GgmlType) -> usize {
    if has_m(ty) {
        4 * GROUP
    } else {
        2 * GROUP
    }
}

/// Bytes before the quants of a legacy group block: `d`, `m` (Q4_1, Q5_1), `qh` (Q5).
fn head_bytes(ty: GgmlType) -> usize {
    let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
    qh_at(ty) + if five { 4 * GROUP } else { 0 }
}

/// Stores row `r`'s ggml block `blk` into the group block `gb`.
fn put(ty: GgmlType, blk: &[u8], r: usize, gb: &mut [u8]) {
    if ty == GgmlType::Q6K {
        gb[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
        for k in 0..16 {
            gb[Q6K_SC + 8 * k + r] = blk[192 + k];
        }
        for (i, q) in blk[..128].chunks_exact(4).enumerate() {
            gb[Q6K_QL + 32 * i + 4 * r..][..4].copy_from_slice(q);
        }
        for (i, q) in blk[128..192].chunks_exact(4).enumerate() {
            gb[Q6K_QH + 32 * i + 4 * r..][..4].copy_from_slice(q);
        }
        return;
    }
    gb[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
    if matches!(ty, GgmlType::Q4K | GgmlType::Q5K) {
        gb[16 + 2 * r..][..2].copy_from_slice(&blk[2..4]);
        let (sc, mn) = k4_scales_mins(&blk[4..16]);
        for k in 0..8 {
            gb[Q4K_SC + 8 * k + r] = sc[k];
            gb[Q4K_MN + 8 * k + r] = mn[k];
        }
        let qs = if ty == GgmlType::Q5K { 48 } else { 16 };
        for (i, q) in blk[qs..qs + 128].chunks_exact(4).enumerate() {
            gb[Q4K_QS + 32 * i + 4 * r..][..4].copy_from_slice(q);
        }
        if ty == GgmlType::Q5K {
            for (i, q) in blk[16..48].chunks_exact(4).enumerate() {
                gb[Q5K_QH + 32 * i + 4 * r..][..4].copy_from_slice(q);
            }
        }
        return;
    }
    if has_m(ty) {
        gb[2 * GROUP + 2 * r..][..2].copy_from_slice(&blk[2..4]);
    }
    let ((qn, qoff), head) = (qs_span(ty), head_bytes(ty));
    if head > qh_at(ty) {
        gb[qh_at(ty) + 4 * r..][..4].copy_from_slice(&blk[qoff - 4..qoff]);
    }
    for c in 0..qn / 4 {
        let at = head + c * 4 * GROUP + 4 * r;
        gb[at..at + 4].copy_from_slice(&blk[qoff + 4 * c..][..4]);
    }
}

/// Reads row `r`'s ggml block back out of the group block `gb` into `blk` (the inverse of
/// [`put`]).
fn get(ty: GgmlType, gb: &[u8], r: usize, blk: &mut [u8]) {
    if ty == GgmlType::Q6K {
        blk[208..210].copy_from_slice(&gb[2 * r..2 * r + 2]);
        for k in 0..16 {
            blk[192 + k] = gb[Q6K_SC + 8 * k + r];
        }
        for (i, q) in blk[..128].chunks_exact_mut(4).enumerate() {
            q.copy_from_slice(&gb[Q6K_QL + 32 * i + 4 * r..][..4]);
        }
        for (i, q) in blk[128..192].chunks_exact_mut(4).enumerate() {
            q.copy_from_slice(&gb[Q6K_QH + 32 * i + 4 * r..][..4]);
        }
        return;
    }
    blk[..2].copy_from_slice(&gb[2 * r..2 * r + 2]);
    if matches!(ty, GgmlType::Q4K | GgmlType::Q5K) {
        blk[2..4].copy_from_slice(&gb[16 + 2 * r..][..2]);
        let sc: [u8; 8] = std::array::from_fn(|k| gb[Q4K_SC + 8 * k + r]);
        let mn: [u8; 8] = std::array::from_fn(|k| gb[Q4K_MN + 8 * k + r]);
        blk[4..16].copy_from_slice(&k4_pack(&sc, &mn));
        let qs = if ty == GgmlType::Q5K { 48 } else { 16 };
        for (i, q) in blk[qs..qs + 128].chunks_exact_mut(4).enumerate() {
            q.copy_from_slice(&gb[Q4K_QS + 32 * i + 4 * r..][..4]);
        }
        if ty == GgmlType::Q5K {
            for (i, q) in blk[16..48].chunks_exact_mut(4).enumerate() {
                q.copy_from_slice(&gb[Q5K_QH + 32 * i + 4 * r..][..4]);
            }
        }
        return;
    }
    if has_m(ty) {
        blk[2..4].copy_from_slice(&gb[2 * GROUP + 2 * r..][..2]);
    }
    let ((qn, qoff), head) = (qs_span(ty), head_bytes(ty));
    if head > qh_at(ty) {
        blk[qoff - 4..qoff].copy_from_slice(&gb[qh_at(ty) + 4 * r..][..4]);
    }
    for c in 0..qn / 4 {
        let at = head + c * 4 * GROUP + 4 * r;
        blk[qoff + 4 * c..][..4].copy_from_slice(&gb[at..at + 4]);
    }
}

/// The inverse of [`k4_scales_mins`] (six-bit values; every bit of the 12 bytes is used, so
/// a block's bytes come back exactly).
fn k4_pack(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
    }
    s
}

/// Interleaves whole groups of row-major rows of `raw_row_bytes` of a type that [`supports`]
/// (`rows × row_bytes(ty, cols)` bytes out).
pub fn interleave(ty: GgmlType, raw: &[u8], raw_row_bytes: usize) -> Vec<u8> {
    debug_assert!(supports(ty) && raw.len().is_multiple_of(GROUP * raw_row_bytes));
    let (size, gbb) = (ty.type_size(), group_block_bytes(ty));
    let nb = raw_row_bytes / size;
    let groups = raw.len() / (GROUP * raw_row_bytes);
    let mut out = vec![0u8; groups * nb * gbb];
    // Group by group on every thread: a model's weights are interleaved as it loads, and the
    // first touch of each fresh output page (the kernel zeroing it) costs as much as the
    // shuffling itself.
    out.par_chunks_mut(nb * gbb)
        .enumerate()
        .for_each(|(g, group)| {
            for (b, gb) in group.chunks_exact_mut(gbb).enumerate() {
                for r in 0..GROUP {
                    put(
                        ty,
                        &raw[(GROUP * g + r) * raw_row_bytes + b * size..][..size],
                        r,
                        gb,
                    );
                }
            }
        });
    out
}

/// Row `r` of interleaved weights, back in ggml's row-major block layout (`out` is one row of
/// `raw_row_bytes`).
pub fn raw_row(ty: GgmlType, data: &[u8], raw_row_bytes: usize, r: usize, out: &mut [u8]) {
    let (size, gbb) = (ty.type_size(), group_block_bytes(ty));
    let nb = raw_row_bytes / size;
    let group = &data[(r / GROUP) * nb * gbb..][..nb * gbb];
    for (gb, blk) in group.chunks_exact(gbb).zip(out.chunks_exact_mut(size)) {
        get(ty, gb, r % GROUP, blk);
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
                            // Q5: bit j of the row's qh is element j's fifth bit (value 16).
                            let qh = match head > qh_at(ty) {
                                true => u32::from_le_bytes(
                                    gb[qh_at(ty) + 4 * r..][..4].try_into().expect("4 bytes"),
                                ),
                                false => 0,
                            };
                            let fifth = |j: usize| (((qh >> j) & 1) << 4) as i32;
                            for c in 0..4 {
                                for k in 0..4 {
                                    let byte = gb[head + c * 32 + 4 * r + k];
                                    let (lo, hi) = (4 * c + k, 16 + 4 * c + k);
                                    isum += ((byte & 0x0F) as i32 | fifth(lo)) * xb.qs[lo] as i32;
                                    isum += ((byte >> 4) as i32 | fifth(hi)) * xb.qs[hi] as i32;
                                }
                            }
                        }
                    }
                    acc[r] = (isum as f32).mul_add(d * xb.d, acc[r]);
                    let min = match ty {
                        GgmlType::Q4_0 => d * -8.0,
                        GgmlType::Q5_0 => d * -16.0,
                        GgmlType::Q4_1 | GgmlType::Q5_1 => f16_le(&gb[2 * GROUP + 2 * r..]),
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

/// The portable Q4_K kernel (see [`tile_scalar`]): per super-block and row, the sub-blocks'
/// exact sums weighted by their scales (`Σ sc·isum`) and the mins by the activation sums
/// (`Σ mn·ysum`), each once in f32: `acc = Σsc·isum·(d·d_x) + acc`,
/// `mins = Σmn·ysum·(dmin·d_x) + mins`, result `acc − mins`.
/// Q5_K likewise, with each quant's fifth bit from `qh`.
pub(crate) fn tile_scalar_q4k(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ8K],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    let (gbb, five) = (group_block_bytes(ty), ty == GgmlType::Q5K);
    let nb = GROUP * row_bytes / gbb;
    for (g, group) in w.chunks_exact(GROUP * row_bytes).enumerate() {
        for i in 0..m {
            let mut acc = [0.0f32; GROUP];
            let mut mins = [0.0f32; GROUP];
            for (b, gb) in group.chunks_exact(gbb).enumerate() {
                let xb = &x[i * nb + b];
                let ysum: [i32; 8] =
                    std::array::from_fn(|k| xb.bsums[2 * k] as i32 + xb.bsums[2 * k + 1] as i32);
                for r in 0..GROUP {
                    let (mut isc, mut imn) = (0i32, 0i32);
                    for k in 0..8 {
                        let (s, half) = (k / 2, k % 2);
                        let mut isum = 0i32;
                        for c in 0..8 {
                            for e in 0..4 {
                                let byte = gb[Q4K_QS + 32 * (8 * s + c) + 4 * r + e];
                                let mut q = if half == 0 { byte & 0x0F } else { byte >> 4 };
                                if five {
                                    let qh = gb[Q5K_QH + 32 * c + 4 * r + e];
                                    q |= ((qh >> (2 * s + half)) & 1) << 4;
                                }
                                isum += q as i32 * xb.qs[64 * s + 32 * half + 4 * c + e] as i32;
                            }
                        }
                        isc += gb[Q4K_SC + 8 * k + r] as i32 * isum;
                        imn += gb[Q4K_MN + 8 * k + r] as i32 * ysum[k];
                    }
                    let (d, dmin) = (f16_le(&gb[2 * r..]), f16_le(&gb[16 + 2 * r..]));
                    acc[r] = (isc as f32).mul_add(d * xb.d, acc[r]);
                    mins[r] = (imn as f32).mul_add(dmin * xb.d, mins[r]);
                }
            }
            for r in 0..GROUP {
                out[i * ld + g * GROUP + r] = acc[r] - mins[r];
            }
        }
    }
}

/// The portable Q6_K kernel (see [`tile_scalar`]): per super-block and row,
/// `isc = Σ over sub-blocks of sc·(Σ q·y − 32·Σ y)` exactly, then `acc = isc·(d·d_x) + acc`.
pub(crate) fn tile_scalar_q6k(
    w: &[u8],
    row_bytes: usize,
    x: &[BlockQ8K],
    m: usize,
    out: &mut [f32],
    ld: usize,
) {
    let gbb = group_block_bytes(GgmlType::Q6K);
    let nb = GROUP * row_bytes / gbb;
    let mut blk = [0u8; 210];
    for (g, group) in w.chunks_exact(GROUP * row_bytes).enumerate() {
        for i in 0..m {
            let mut acc = [0.0f32; GROUP];
            for (b, gb) in group.chunks_exact(gbb).enumerate() {
                let xb = &x[i * nb + b];
                for (r, a) in acc.iter_mut().enumerate() {
                    get(GgmlType::Q6K, gb, r, &mut blk);
                    let (ql, qh) = (&blk[..128], &blk[128..192]);
                    let mut sums = [0i32; 16];
                    for h in 0..2 {
                        for l in 0..32 {
                            for k in 0..4 {
                                let e = 128 * h + 32 * k + l;
                                let q = six_bit(ql, qh, h, l, k) as i32;
                                sums[e / 16] += q * xb.qs[e] as i32;
                            }
                        }
                    }
                    let isc: i32 = (0..16)
                        .map(|k| blk[192 + k] as i8 as i32 * (sums[k] - 32 * xb.bsums[k] as i32))
                        .sum();
                    *a = (isc as f32).mul_add(f16_le(&blk[208..]) * xb.d, *a);
                }
            }
            for r in 0..GROUP {
                out[i * ld + g * GROUP + r] = acc[r];
            }
        }
    }
}
