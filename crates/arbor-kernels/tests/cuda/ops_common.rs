//! Helpers of the op tests (`ops_*`): bf16 conversion, device transfers, NMSE checks.
//!
//! Tolerances (NMSE = Σ(got − want)² / Σwant²):
//! - f32 outputs ([`NMSE_F32`] = 1e-10): the GPU does the CPU's f32 arithmetic up to
//!   summation order, fused multiply-adds and an f32 (not f64) mean square, i.e. ~1e-7
//!   relative per element, NMSE ~1e-14. Gathers and casts are checked for exact equality.
//! - bf16 outputs against the f32 reference ([`NMSE_BF16`] = 2e-5): round-to-nearest-even
//!   to 8 significant bits errs by at most 2⁻⁸ relative per element, so rounding alone gives
//!   NMSE ≤ 2⁻¹⁶ ≈ 1.5e-5 (≈ 2e-6 typically); a real bug (a wrong pair, head, page or mask)
//!   gives 1e-3 to 1.
//! - bf16 outputs against the bf16-rounded reference ([`NMSE_BF16_ROUNDED`] = 1e-7): only
//!   elements whose f32 values straddle a rounding midpoint differ (by one bf16 ulp); with
//!   ~1e-7 relative f32 differences that is a fraction ~1e-4 of the elements, NMSE ~1e-9.
//!   This catches a wrong rounding mode (NMSE ~1e-6), which the bound above would not.
#![allow(dead_code)]

use crate::common;
use arbor_kernels::cuda::kv::summary_elems_per_page;
use arbor_kernels::cuda::{Gpu, GpuKvPool};
use arbor_kernels::kv::{KvLayout, KvPool, PageId};
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::bf16;

pub const NMSE_F32: f64 = 1e-10;
pub const NMSE_BF16: f64 = 2e-5;
pub const NMSE_BF16_ROUNDED: f64 = 1e-7;

/// Rounds each value to bf16 (nearest even) and back.
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

pub fn from_bf16(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn up<T: DeviceRepr>(gpu: &Gpu, v: &[T]) -> CudaSlice<T> {
    gpu.upload(v, "a test input").expect("upload")
}

pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(gpu: &Gpu, n: usize) -> CudaSlice<T> {
    gpu.zeros(n, "a test output").expect("allocation")
}

/// The first `n` elements of a device buffer.
pub fn down<T: DeviceRepr + Default + Clone>(gpu: &Gpu, d: &CudaSlice<T>, n: usize) -> Vec<T> {
    let mut v = gpu.download(d, "a test output").expect("download");
    v.truncate(n);
    v
}

/// The first `n` elements of a bf16 device buffer, as f32.
pub fn down_bf16(gpu: &Gpu, d: &CudaSlice<bf16>, n: usize) -> Vec<f32> {
    from_bf16(&down(gpu, d, n))
}

/// Prints and checks the NMSE of `got` against `want`; every value must be finite.
pub fn check(what: &str, got: &[f32], want: &[f32], bound: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {} (want {})", got[i], want[i]);
    }
    let e = common::nmse(got, want);
    println!("{what}: nmse {e:.3e} (bound {bound:.0e})");
    assert!(e <= bound, "{what}: nmse {e:.3e} exceeds {bound:.0e}");
    e
}

/// [`check`] of a bf16 output against its f32 reference and against the reference rounded
/// to bf16.
pub fn check_bf16(what: &str, got: &[f32], want: &[f32]) {
    check_bf16_with(what, got, want, NMSE_BF16_ROUNDED);
}

/// [`check_bf16`] with another bound against the rounded reference (for long reductions,
/// whose larger f32 differences flip more roundings).
pub fn check_bf16_with(what: &str, got: &[f32], want: &[f32], rounded_bound: f64) {
    check(&format!("{what} (vs f32)"), got, want, NMSE_BF16);
    check(
        &format!("{what} (vs bf16(ref))"),
        got,
        &round_bf16(want),
        rounded_bound,
    );
}

/// Checks exact equality (bit patterns of f32, so NaN = NaN), printing the NMSE.
pub fn check_exact(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i} is {} (want {})", got[i], want[i]);
    }
    let finite: (Vec<f32>, Vec<f32>) = got
        .iter()
        .zip(want)
        .filter(|(g, _)| g.is_finite())
        .map(|(g, w)| (*g, *w))
        .unzip();
    println!(
        "{what}: exact ({} values, nmse {:.1e})",
        got.len(),
        common::nmse(&finite.0, &finite.1)
    );
}

/// Deterministic pseudo-random indices below `n`.
pub fn random_indices(count: usize, n: usize, seed: u64) -> Vec<u32> {
    common::random(count, seed, 1.0)
        .into_iter()
        .map(|x| (((x + 1.0) * 0.5 * n as f32) as usize).min(n - 1) as u32)
        .collect()
}

/// A host pool (f32) and a GPU pool (bf16) holding the same random K/V, rounded to bf16, in
/// every slot of every page of every layer, so the CPU reference reads what the GPU reads.
pub fn random_pools(
    gpu: &Gpu,
    layout: KvLayout,
    num_pages: usize,
    seed: u64,
) -> (KvPool, GpuKvPool) {
    let mut host = KvPool::new(layout, num_pages);
    let width = layout.num_kv_heads * layout.head_dim;
    for layer in 0..layout.num_layers {
        for page in 0..num_pages {
            for slot in 0..layout.page_size {
                let s = seed ^ ((layer * num_pages + page) * layout.page_size + slot) as u64;
                let k = round_bf16(&common::random(width, s.wrapping_mul(3), 1.0));
                let v = round_bf16(&common::random(width, s.wrapping_mul(5) + 1, 1.0));
                host.write(layer, page as PageId, slot, &k, &v);
            }
        }
    }
    let summaries =
        vec![bf16::ZERO; layout.num_layers * num_pages * summary_elems_per_page(&layout)];
    let dev = GpuKvPool {
        layout,
        num_pages,
        data: up(gpu, &to_bf16(&flat_pool(&host))),
        summaries: up(gpu, &summaries),
    };
    (host, dev)
}

/// The host pool's values in the device layout `[layer][page][k|v][kv_head][slot][head_dim]`.
pub fn flat_pool(pool: &KvPool) -> Vec<f32> {
    let l = pool.layout;
    let mut out = Vec::with_capacity(l.num_layers * pool.num_pages * l.page_elems_per_layer());
    for layer in 0..l.num_layers {
        for page in 0..pool.num_pages as PageId {
            for h in 0..l.num_kv_heads {
                out.extend_from_slice(pool.keys(layer, page, h));
            }
            for h in 0..l.num_kv_heads {
                out.extend_from_slice(pool.values(layer, page, h));
            }
        }
    }
    out
}
