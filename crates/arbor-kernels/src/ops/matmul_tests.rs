//! Tests of the CPU matmul against the f64 reference, across types, ISAs and shapes.

use super::*;
use crate::quant::activation::{QK8, QK_K};
use crate::quant::GgmlType;
use half::{bf16, f16};
use std::time::Instant;

/// xorshift64*: deterministic test data without a dependency.
pub(super) struct Rng(pub u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub(super) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

const QUANT_TYPES: [GgmlType; 12] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2K,
    GgmlType::Q3K,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
    GgmlType::Q8K,
];

/// Byte offsets of the f16 scales inside one block of `ty`.
fn f16_scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q2K => &[80, 82],
        GgmlType::Q3K => &[108],
        GgmlType::Q6K => &[208],
        _ => &[],
    }
}

/// A `rows × cols` weight of `ty`: random quant bits with small random scales (every bit
/// pattern occurs), or random values for the float types.
pub(super) fn random_weight(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Weight {
    match ty {
        GgmlType::F32 => Weight::from_f32(rows, cols, rng.vec(rows * cols, 1.0)).unwrap(),
        GgmlType::F16 | GgmlType::BF16 => {
            let bytes = rng
                .vec(rows * cols, 1.0)
                .iter()
                .flat_map(|&v| match ty {
                    GgmlType::F16 => f16::from_f32(v).to_le_bytes(),
                    _ => bf16::from_f32(v).to_le_bytes(),
                })
                .collect();
            Weight::from_raw(rows, cols, ty, bytes).unwrap()
        }
        _ => {
            let n = ty.bytes_for(cols).unwrap() * rows;
            let mut bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            for block in bytes.chunks_exact_mut(ty.type_size()) {
                for &off in f16_scale_offsets(ty) {
                    let v = f16::from_f32(rng.uniform() * 0.05);
                    block[off..off + 2].copy_from_slice(&v.to_le_bytes());
                }
                if ty == GgmlType::Q8K {
                    block[0..4].copy_from_slice(&(rng.uniform() * 0.01).to_le_bytes());
                }
            }
            Weight::from_raw(rows, cols, ty, bytes).unwrap()
        }
    }
}

pub(super) fn isas() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx2Vnni]
        .into_iter()
        .filter(|i| i.is_available())
        .collect()
}

/// Checks `got` against the f64-accumulated reference: each element may differ by the
/// activation rounding (`Σ_k |w_rk| · amax(x block of k) / 254` for quantised weights, 0
/// otherwise) plus `rel · Σ_k |w_rk · x_ik|` for f32 rounding.
pub(super) fn check_against_reference(
    ty: GgmlType,
    w: &Weight,
    x: &[f32],
    m: usize,
    got: &[f32],
    rel: f64,
    what: &str,
) {
    let (rows, cols) = (w.rows, w.cols);
    let wf = w.to_f32().unwrap();
    let mut want = vec![0.0f32; m * rows];
    matmul_reference(x, m, w, &mut want).unwrap();
    let qblock = if ty.block_size() == QK_K { QK_K } else { QK8 };
    for i in 0..m {
        let xi = &x[i * cols..(i + 1) * cols];
        let step: Vec<f64> = xi
            .chunks(qblock)
            .flat_map(|b| {
                let amax = b.iter().fold(0.0f32, |a, v| a.max(v.abs())) as f64;
                std::iter::repeat_n(amax / 254.0, b.len())
            })
            .collect();
        for r in 0..rows {
            let wr = &wf[r * cols..(r + 1) * cols];
            let act: f64 = if ty.is_quantized() {
                wr.iter().zip(&step).map(|(a, s)| a.abs() as f64 * s).sum()
            } else {
                0.0
            };
            let mag: f64 = wr
                .iter()
                .zip(xi)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let tol = act * 1.001 + rel * mag + 1e-6;
            let (g, e) = (got[i * rows + r] as f64, want[i * rows + r] as f64);
            assert!(
                (g - e).abs() <= tol,
                "{what}: {ty} {rows}x{cols}, m={m}, out[{i}][{r}] = {g}, reference {e}, tolerance {tol}"
            );
        }
    }
}

#[test]
fn quantised_matmul_matches_reference_for_every_type_and_isa() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for ty in QUANT_TYPES {
        let bs = ty.block_size();
        // Row counts not divisible by the chunk or tile sizes; 1001 rows make several
        // tasks even for m = 1.
        for (rows, nblocks) in [
            (1, 1),
            (7, 3),
            (67, 2),
            (1001, if bs == QK_K { 2 } else { 10 }),
        ] {
            let cols = nblocks * bs;
            let w = random_weight(ty, rows, cols, &mut rng);
            for m in [1, 3, 17] {
                let x = rng.vec(m * cols, 2.0);
                for isa in isas() {
                    let mut out = vec![f32::NAN; m * rows];
                    matmul_with(isa, &x, m, &w, &mut out).unwrap();
                    check_against_reference(ty, &w, &x, m, &out, 1e-5, &format!("{isa:?}"));
                }
            }
        }
    }
}

/// The dequantised path has no activation rounding: it must match the f64 reference to
/// f32 accuracy, far tighter than the quantised kernels' bound.
#[test]
fn dequantized_matmul_matches_reference_without_activation_rounding() {
    let mut rng = Rng(21);
    for ty in QUANT_TYPES
        .into_iter()
        .chain([GgmlType::F16, GgmlType::F32])
    {
        let cols = 2 * ty.block_size().max(32);
        let w = random_weight(ty, 301, cols, &mut rng);
        for m in [1, 5] {
            let x = rng.vec(m * cols, 2.0);
            let mut out = vec![f32::NAN; m * 301];
            matmul_dequantized(&x, m, &w, &mut out).unwrap();
            // ty F32 → no activation term in the bound, only f32 rounding.
            check_against_reference(GgmlType::F32, &w, &x, m, &out, 1e-5, "dequantized");
        }
    }
}

#[test]
fn vnni_kernels_equal_the_avx2_kernels_bit_for_bit() {
    if !Isa::Avx2Vnni.is_available() {
        eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
        return;
    }
    let mut rng = Rng(43);
    for ty in QUANT_TYPES {
        let cols = 3 * ty.block_size().max(QK8) * if ty.block_size() == QK_K { 1 } else { 4 };
        let w = random_weight(ty, 37, cols, &mut rng);
        // 1 (decode: two weight rows per pass), 2-4 and more (tiles of activation rows).
        for m in [1, 2, 3, 4, 5, 17] {
            let x = rng.vec(m * cols, 3.0);
            let (mut v, mut a) = (vec![0.0f32; m * 37], vec![0.0f32; m * 37]);
            matmul_with(Isa::Avx2Vnni, &x, m, &w, &mut v).unwrap();
            matmul_with(Isa::Avx2, &x, m, &w, &mut a).unwrap();
            let bits = |o: &[f32]| o.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&v), bits(&a), "{ty}, m = {m}");
        }
    }
}

#[test]
fn avx2_kernels_match_the_scalar_kernels() {
    if !Isa::Avx2.is_available() {
        eprintln!("no AVX2 on this CPU: nothing to compare");
        return;
    }
    let mut rng = Rng(42);
    for ty in QUANT_TYPES {
        let (rows, cols) = (
            37,
            3 * ty.block_size().max(QK8) * if ty.block_size() == QK_K { 1 } else { 4 },
        );
        let w = random_weight(ty, rows, cols, &mut rng);
        let wf = w.to_f32().unwrap();
        for m in [1, 2, 3, 4, 5, 17] {
            let x = rng.vec(m * cols, 3.0);
            let (mut a, mut s) = (vec![0.0f32; m * rows], vec![0.0f32; m * rows]);
            matmul_with(Isa::Avx2, &x, m, &w, &mut a).unwrap();
            matmul_with(Isa::Scalar, &x, m, &w, &mut s).unwrap();
            for i in 0..m {
                for r in 0..rows {
                    let mag: f32 = (0..cols)
                        .map(|k| (wf[r * cols + k] * x[i * cols + k]).abs())
                        .sum();
                    let (g, e) = (a[i * rows + r], s[i * rows + r]);
                    assert!(
                        (g - e).abs() <= 2e-6 * mag + 1e-7,
                        "{ty} m={m} [{i}][{r}]: avx2 {g}, scalar {e}"
                    );
                }
            }
        }
    }
}

/// A row's result must not depend on which other rows share the batch (search branches
/// decode in batches of varying size and must stay reproducible).
#[test]
fn quantised_results_do_not_depend_on_batch_size() {
    // Tiles of four activation rows, the rest one by one, decode's two weight rows per pass:
    // a row's result is bit for bit the same whichever it went through, every type and ISA.
    let mut rng = Rng(7);
    for ty in QUANT_TYPES {
        let (rows, cols) = (130, 512);
        let w = random_weight(ty, rows, cols, &mut rng);
        let m = 17;
        let x = rng.vec(m * cols, 1.0);
        for isa in isas() {
            let mut all = vec![0.0f32; m * rows];
            matmul_with(isa, &x, m, &w, &mut all).unwrap();
            for i in 0..m {
                let mut one = vec![0.0f32; rows];
                matmul_with(isa, &x[i * cols..(i + 1) * cols], 1, &w, &mut one).unwrap();
                let bits = |o: &[f32]| o.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let got = bits(&all[i * rows..(i + 1) * rows]);
                assert_eq!(bits(&one), got, "{ty} {isa:?} row {i}");
            }
        }
    }
}

/// The same for float weights on AVX2 CPUs (the tiles; elsewhere sgemm takes over from four
/// rows): odd row and column counts exercise the tile and element tails.
#[test]
fn float_results_do_not_depend_on_batch_size() {
    if !Isa::Avx2.is_available() {
        eprintln!("no AVX2 on this CPU: float weights are not batch-invariant there");
        return;
    }
    let mut rng = Rng(8);
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let (rows, cols, m) = (131, 517, 11);
        let w = random_weight(ty, rows, cols, &mut rng);
        let x = rng.vec(m * cols, 1.0);
        for isa in [Isa::Avx2, Isa::Avx2Vnni]
            .into_iter()
            .filter(|i| i.is_available())
        {
            let mut all = vec![0.0f32; m * rows];
            matmul_with(isa, &x, m, &w, &mut all).unwrap();
            check_against_reference(ty, &w, &x, m, &all, 1e-5, &format!("{isa:?}"));
            for i in 0..m {
                let mut one = vec![0.0f32; rows];
                matmul_with(isa, &x[i * cols..(i + 1) * cols], 1, &w, &mut one).unwrap();
                let bits = |o: &[f32]| o.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&one),
                    bits(&all[i * rows..(i + 1) * rows]),
                    "{ty} {isa:?} row {i}"
                );
            }
        }
    }
}

#[test]
fn chunks_cover_every_row_and_are_assembled_in_place() {
    for (rows, m, chunk) in [(10, 1, 3), (10, 2, 3), (10, 5, 4), (7, 3, 7), (7, 3, 100)] {
        let mut out = vec![f32::NAN; m * rows];
        run_chunks(m, rows, chunk, &mut out, |r0, nr, block, ld| {
            for i in 0..m {
                for r in 0..nr {
                    block[i * ld + r] = (i * 1000 + r0 + r) as f32;
                }
            }
            Ok(())
        })
        .unwrap();
        let want: Vec<f32> = (0..m * rows)
            .map(|k| ((k / rows) * 1000 + k % rows) as f32)
            .collect();
        assert_eq!(out, want, "rows {rows}, m {m}, chunk {chunk}");
    }
    // Task sizes: small products stay on one task; big ones split evenly.
    assert_eq!(chunk_rows(192, 1, 576, usize::MAX), 192);
    let threads = rayon::current_num_threads();
    let c = chunk_rows(49152, 1, 576, usize::MAX);
    assert!(
        c <= 49152usize.div_ceil(threads) && c >= 49152 / (4 * threads),
        "chunk {c}"
    );
    assert!(chunk_rows(1536, 64, 576, 50) <= 50);
}

#[test]
fn float_weights_match_reference() {
    let mut rng = Rng(3);
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        for (rows, cols) in [(1, 1), (5, 33), (67, 100), (300, 256)] {
            let w = random_weight(ty, rows, cols, &mut rng);
            for m in [1, 3, 4, 17] {
                let x = rng.vec(m * cols, 1.0);
                for isa in isas() {
                    let mut out = vec![f32::NAN; m * rows];
                    matmul_with(isa, &x, m, &w, &mut out).unwrap();
                    check_against_reference(ty, &w, &x, m, &out, 1e-5, &format!("{isa:?}"));
                }
            }
        }
    }
    // F32 bytes in a hand-built Raw weight (from_raw would have converted them).
    let vals = rng.vec(6 * 40, 1.0);
    let bytes = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let raw = Weight {
        rows: 6,
        cols: 40,
        data: WeightData::Raw {
            ty: GgmlType::F32,
            bytes,
        },
    };
    let x = rng.vec(2 * 40, 1.0);
    let mut out = vec![0.0f32; 12];
    matmul(&x, 2, &raw, &mut out).unwrap();
    check_against_reference(GgmlType::F32, &raw, &x, 2, &out, 1e-5, "raw f32");
}

#[test]
fn bad_shapes_and_storage_are_errors_not_panics() {
    let mut rng = Rng(5);
    let w = random_weight(GgmlType::Q4_1, 4, 64, &mut rng);
    let x = vec![0.5f32; 2 * 64];
    let mut out = vec![0.0f32; 2 * 4];
    assert!(matmul(&x[..127], 2, &w, &mut out).is_err(), "short x");
    assert!(matmul(&x, 2, &w, &mut out[..7]).is_err(), "short out");
    assert!(matmul(&x, 3, &w, &mut out).is_err(), "wrong m");
    assert!(
        matmul(&x, usize::MAX, &w, &mut out).is_err(),
        "overflowing m"
    );
    // Fields are public: a weight whose bytes do not match its shape.
    let mut bad = w.clone();
    if let WeightData::Raw { bytes, .. } = &mut bad.data {
        bytes.pop();
    }
    assert!(
        matmul(&x, 2, &bad, &mut out).is_err(),
        "truncated weight bytes"
    );
    let mut row = vec![0.0f32; 64];
    assert!(
        bad.row_to_f32(3, &mut row).is_err(),
        "row past truncated bytes"
    );
    assert!(
        bad.row_to_f32(2, &mut row).is_ok(),
        "rows before the truncation"
    );
    assert!(
        matmul_reference(&x, 2, &bad, &mut out).is_err(),
        "truncated weight bytes (reference)"
    );
    let partial = Weight {
        rows: 4,
        cols: 60,
        data: w.data.clone(),
    };
    assert!(
        matmul(&x[..120], 2, &partial, &mut out).is_err(),
        "cols not a whole number of blocks"
    );
    let short_f32 = Weight {
        rows: 4,
        cols: 64,
        data: WeightData::F32(vec![0.0; 255]),
    };
    assert!(
        matmul(&x, 2, &short_f32, &mut out).is_err(),
        "short f32 weight"
    );
    // Degenerate but valid shapes.
    assert!(matmul(&[], 0, &w, &mut []).is_ok());
    let empty = Weight::from_f32(3, 0, vec![]).unwrap();
    let mut o = vec![1.0f32; 6];
    matmul(&[], 2, &empty, &mut o).unwrap();
    assert_eq!(o, vec![0.0; 6]);
}

#[test]
fn dot_tile_rejects_mismatched_inputs() {
    let mut rng = Rng(11);
    let w = random_weight(GgmlType::Q4K, 3, 256, &mut rng);
    let WeightData::Raw { bytes, .. } = &w.data else {
        unreachable!()
    };
    let x = rng.vec(512, 1.0);
    let acts = QuantizedActs::new(GgmlType::Q4K, &x[..256], 1, 256).unwrap();
    let acts2 = QuantizedActs::new(GgmlType::Q4K, &x, 2, 256).unwrap();
    let mut out = vec![0.0f32; 6];
    let isa = Isa::Scalar;
    assert!(dot_tile(isa, bytes, &acts, &mut out[..3], 3).is_ok());
    assert!(
        dot_tile(isa, &bytes[1..], &acts, &mut out[..3], 3).is_err(),
        "ragged bytes"
    );
    assert!(
        dot_tile(isa, &[], &acts, &mut out[..3], 3).is_ok(),
        "no rows"
    );
    assert!(
        dot_tile(isa, bytes, &acts, &mut out[..2], 3).is_err(),
        "short out"
    );
    assert!(
        dot_tile(isa, bytes, &acts, &mut out[..3], 2).is_err(),
        "stride < rows"
    );
    assert!(
        dot_tile(isa, bytes, &acts2, &mut out[..5], 3).is_err(),
        "short for 2 rows"
    );
    assert!(dot_tile(isa, bytes, &acts2, &mut out, 3).is_ok(), "2 rows");
    assert!(
        QuantizedActs::new(GgmlType::Q4K, &x[..128], 1, 128).is_err(),
        "partial block"
    );
    assert!(
        QuantizedActs::new(GgmlType::Q4K, &x, 1, 256).is_err(),
        "wrong x length"
    );
    assert!(
        QuantizedActs::new(GgmlType::F32, &x[..256], 1, 256).is_err(),
        "float type"
    );
}

/// CPU seconds used by this process so far (all threads, ns resolution), so kernel costs
/// can be read on a busy machine where wall time includes waiting for a core.
fn process_cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec (two longs on x86-64 Linux) into `ts`.
    if unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0.0;
    }
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// Timings for the SmolLM2-135M decode shapes; printed, not asserted:
/// `cargo test --release -p arbor-kernels --lib timing_matmul -- --ignored --nocapture`
/// (with `RAYON_NUM_THREADS=1`, the CPU column is the single-core cost of the kernels).
#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn timing_matmul() {
    let cases = [
        (GgmlType::Q8_0, 49152, 576, 1),
        (GgmlType::Q4_1, 1536, 576, 1),
        (GgmlType::Q4_1, 576, 1536, 1),
        (GgmlType::Q4_1, 576, 576, 1),
        (GgmlType::Q4_1, 192, 576, 1),
        (GgmlType::Q4K, 1536, 768, 1),
        (GgmlType::Q6K, 1536, 768, 1),
        (GgmlType::Q4_1, 1536, 576, 4),
        (GgmlType::Q4_1, 1536, 576, 128),
        (GgmlType::F32, 1536, 576, 1),
        (GgmlType::F16, 1536, 576, 1),
        (GgmlType::BF16, 1536, 576, 1),
        (GgmlType::F16, 1536, 576, 64),
    ];
    let only_avx2 = std::env::var("ARBOR_TIMING_SCALAR").is_err();
    // ARBOR_TIMING_IN_POOL=1: call from a rayon worker, as an engine step running inside
    // the pool would, instead of from a thread outside it.
    if std::env::var("ARBOR_TIMING_IN_POOL").is_ok() {
        rayon::scope(|_| timing_cases(&cases, only_avx2));
    } else {
        timing_cases(&cases, only_avx2);
    }
}

fn timing_cases(cases: &[(GgmlType, usize, usize, usize)], only_avx2: bool) {
    let mut rng = Rng(1);
    for &(ty, rows, cols, m) in cases {
        let w = random_weight(ty, rows, cols, &mut rng);
        let x = rng.vec(m * cols, 1.0);
        let mut out = vec![0.0f32; m * rows];
        for isa in isas() {
            if only_avx2 && isa == Isa::Scalar && Isa::Avx2.is_available() {
                continue;
            }
            let iters = (300_000_000 / (w.nbytes() * m.min(8)).max(1)).clamp(3, 2000);
            matmul_with(isa, &x, m, &w, &mut out).unwrap();
            // Best of five rounds, for wall and CPU time separately.
            let (mut s, mut cpu) = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                let (t, c) = (Instant::now(), process_cpu_seconds());
                for _ in 0..iters {
                    matmul_with(isa, &x, m, &w, &mut out).unwrap();
                }
                s = s.min(t.elapsed().as_secs_f64() / iters as f64);
                cpu = cpu.min((process_cpu_seconds() - c) / iters as f64);
            }
            println!(
                "{ty} {rows}x{cols} m={m} {isa:?}: {:.1} µs wall ({:.2} GB/s of weights, \
                 {:.1} GMAC/s), {:.1} µs CPU, {:.2} ns CPU per 32 MACs",
                s * 1e6,
                w.nbytes() as f64 / s / 1e9,
                (rows * cols * m) as f64 / s / 1e9,
                cpu * 1e6,
                cpu * 1e9 * 32.0 / (rows * cols * m) as f64
            );
        }
    }
}
