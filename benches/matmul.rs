//! Quantised matmul speed against the machine's memory bandwidth.
//!
//! `cargo bench --bench matmul` prints, for the shapes that dominate SmolLM2-135M decode
//! (m = 1: the 49152×576 Q8_0 token-embedding/LM head and the 1536×576 Q4_1 FFN weights,
//! plus the other layer shapes and a few prompt-sized batches), the time per call, the
//! weight bytes read per second, and — as the physical limit — how fast a plain loop reads
//! memory on this machine (one thread and all threads). Decode reads every weight once per
//! token, so weight GB/s close to the memory-read GB/s means the kernel is memory-bound.
//!
//! No criterion: this is a plain timing program (harness = false), so it builds fast.

use arbor_kernels::ops::matmul::{matmul_with, Isa};
use arbor_kernels::quant::activation::{
    quantize_row_q8, quantize_row_q8k, BlockQ8, BlockQ8K, QK8, QK_K,
};
use arbor_kernels::quant::GgmlType;
use arbor_kernels::{Weight, WeightData};
use std::hint::black_box;
use std::time::Instant;

/// xorshift64*: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Random quant bits with a small f16 scale (and min) in every block.
fn random_weight(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Weight {
    let n = ty.bytes_for(cols).expect("whole blocks") * rows;
    let mut bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    let scales: &[usize] = match ty {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => &[0],
    };
    for block in bytes.chunks_exact_mut(ty.type_size()) {
        for &off in scales {
            // An f16 of either sign with magnitude in [2^-10, 2^-5).
            let r = rng.next();
            let bits = ((r & 1) << 15) as u16
                | (((5 + (r >> 1) % 5) as u16) << 10)
                | ((r >> 8) as u16 & 0x3FF);
            block[off..off + 2].copy_from_slice(&bits.to_le_bytes());
        }
    }
    Weight::from_raw(rows, cols, ty, bytes).expect("consistent weight")
}

/// Median seconds per call of `f`, over calls filling about `budget` seconds.
fn time(budget: f64, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    f();
    let once = t.elapsed().as_secs_f64().max(1e-7);
    let iters = ((budget / once) as usize).clamp(5, 20_000);
    let mut samples: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[iters / 2]
}

/// Sum of a u64 slice with eight independent accumulators (vectorised, memory-bound).
fn read_sum(v: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in v.chunks_exact(8) {
        for k in 0..8 {
            acc[k] = acc[k].wrapping_add(c[k]);
        }
    }
    acc.iter().fold(0, |a, b| a.wrapping_add(*b))
}

/// GB/s of a plain read of a buffer far larger than the caches, with `threads` threads.
fn memory_read_gbps(buf: &[u64], threads: usize) -> f64 {
    let part = buf.len().div_ceil(threads);
    let s = time(2.0, || {
        std::thread::scope(|sc| {
            for chunk in buf.chunks(part) {
                sc.spawn(move || black_box(read_sum(chunk)));
            }
        })
    });
    (buf.len() * 8) as f64 / s / 1e9
}

fn main() {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let isa = Isa::detect();
    println!("{threads} threads, kernels: {isa:?}");

    let buf: Vec<u64> = (0..(256usize << 20) / 8).map(|i| i as u64).collect();
    println!(
        "memory read, 256 MiB, 1 thread:  {:6.2} GB/s",
        memory_read_gbps(&buf, 1)
    );
    println!(
        "memory read, 256 MiB, {threads} threads: {:6.2} GB/s",
        memory_read_gbps(&buf, threads)
    );
    drop(buf);

    // Quantising the activations, which every quantised matmul does to its input rows first:
    // 64 rows of 1536 (a wide decode step's ffn_down input) into 32- and 256-blocks.
    let (m, cols) = (64, 1536);
    let mut rng = Rng(0x5EED);
    let x: Vec<f32> = (0..m * cols).map(|_| rng.uniform()).collect();
    let mut q8 = vec![BlockQ8::ZERO; m * cols / QK8];
    let mut q8k = vec![BlockQ8K::ZERO; m * cols / QK_K];
    let s8 = time(1.0, || quantize_row_q8(black_box(&x), &mut q8));
    let s8k = time(1.0, || quantize_row_q8k(black_box(&x), &mut q8k));
    println!(
        "activations {m}x{cols} -> 8 bits: {:.1} µs in 32-blocks, {:.1} µs in 256-blocks ({:.2} / {:.2} ns per value)",
        s8 * 1e6,
        s8k * 1e6,
        s8 * 1e9 / (m * cols) as f64,
        s8k * 1e9 / (m * cols) as f64
    );

    let mut rng = Rng(0x5EED);
    let cases = [
        (GgmlType::Q8_0, 49152, 576, 1, "LM head / token_embd"),
        (GgmlType::Q4_1, 1536, 576, 1, "ffn_gate, ffn_up"),
        (GgmlType::Q4_1, 576, 1536, 1, "ffn_down"),
        (GgmlType::Q4_1, 576, 576, 1, "attn_q, attn_output"),
        (GgmlType::Q4_1, 192, 576, 1, "attn_k, attn_v"),
        (GgmlType::Q5_0, 1536, 576, 1, "a Q5_0 weight"),
        (GgmlType::Q5_0, 1536, 576, 16, "a Q5_0 weight, 16 branches"),
        (GgmlType::Q5_0, 1536, 576, 64, "a Q5_0 weight, prompt chunk"),
        (GgmlType::Q4K, 1536, 768, 1, "a Q4_K weight"),
        (GgmlType::Q4K, 1536, 768, 16, "a Q4_K weight, 16 branches"),
        (GgmlType::Q4K, 1536, 768, 64, "a Q4_K weight, prompt chunk"),
        (GgmlType::Q5K, 1536, 768, 1, "a Q5_K weight"),
        (GgmlType::Q5K, 1536, 768, 16, "a Q5_K weight, 16 branches"),
        (GgmlType::Q5K, 1536, 768, 64, "a Q5_K weight, prompt chunk"),
        (GgmlType::Q6K, 1536, 768, 1, "a Q6_K weight"),
        (GgmlType::Q6K, 1536, 768, 16, "a Q6_K weight, 16 branches"),
        (GgmlType::Q6K, 1536, 768, 64, "a Q6_K weight, prompt chunk"),
        (GgmlType::BF16, 1536, 576, 1, "a bf16 weight (safetensors)"),
        (GgmlType::BF16, 1536, 576, 16, "a bf16 weight, 16 branches"),
        (GgmlType::BF16, 1536, 576, 64, "a bf16 weight, prompt chunk"),
        (
            GgmlType::BF16,
            1536,
            576,
            512,
            "a bf16 weight, prompt chunk",
        ),
        (GgmlType::Q4_1, 1536, 576, 4, "4 branches"),
        (GgmlType::Q4_1, 1536, 576, 16, "16 branches"),
        (GgmlType::Q4_1, 1536, 576, 64, "prompt chunk"),
        (GgmlType::Q4_1, 1536, 576, 512, "prompt chunk"),
    ];
    for (ty, rows, cols, m, what) in cases {
        let raw = random_weight(ty, rows, cols, &mut rng);
        let x: Vec<f32> = (0..m * cols).map(|_| rng.uniform()).collect();
        let mut out = vec![0.0f32; m * rows];
        // Row-major ggml blocks, then the CPU's interleaved layout where the type has one.
        let layouts = [(raw.clone(), "rows"), (raw.interleaved(), "interleaved")];
        for (w, layout) in layouts {
            if layout == "interleaved" && !matches!(w.data, WeightData::Interleaved { .. }) {
                continue;
            }
            let s = time(1.0, || {
                matmul_with(isa, &x, m, &w, &mut out).expect("matmul")
            });
            println!(
                "{ty:5} {rows:5}x{cols:<4} m={m:<3} {:9.1} µs  {:6.2} GB/s weights  {:7.1} GMAC/s  ({what}; {layout})",
                s * 1e6,
                w.nbytes() as f64 / s / 1e9,
                (rows * cols * m) as f64 / s / 1e9
            );
        }
    }

    // Every matmul of one SmolLM2-135M decode step, in model order, with weights of the real
    // sizes (96 MB, far more than the caches): 30 layers of Q4_1 weights stacked as
    // arbor-runtime stacks them (q+k+v 960x576, o 576x576, gate+up 3072x576, down 576x1536)
    // and the 49152x576 Q8_0 LM head. The time bounds decode tok/s from above.
    let layer: [(usize, usize); 4] = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
    let mut weights: Vec<Weight> = (0..30)
        .flat_map(|_| layer.iter().map(|&(r, c)| (r, c)).collect::<Vec<_>>())
        .map(|(r, c)| random_weight(GgmlType::Q4_1, r, c, &mut rng))
        .collect();
    weights.push(random_weight(GgmlType::Q8_0, 49152, 576, &mut rng));
    let bytes: usize = weights.iter().map(|w| w.nbytes()).sum();
    let x: Vec<f32> = (0..1536).map(|_| rng.uniform()).collect();
    let mut out = vec![0.0f32; 49152];
    // Weights still in cache from the cases above would flatter the first step.
    let _ = black_box(read_sum(&vec![1u64; (64usize << 20) / 8]));
    for layout in ["rows", "interleaved"] {
        if layout == "interleaved" {
            weights = weights.into_iter().map(Weight::interleaved).collect();
        }
        let s = time(3.0, || {
            for w in &weights {
                let (xr, o) = (&x[..w.cols], &mut out[..w.rows]);
                matmul_with(isa, xr, 1, w, o).expect("matmul");
            }
        });
        println!(
            "SmolLM2-135M decode step ({layout}), all {} matmuls: {:.2} ms, {:.2} GB/s of weights \
             ({:.1} MB) -> at most {:.0} tok/s from matmuls",
            weights.len(),
            s * 1e3,
            bytes as f64 / s / 1e9,
            bytes as f64 / 1e6,
            1.0 / s
        );
    }
}
