//! Criterion benches of the hot CPU ops at SmolLM2-135M / Qwen2.5-0.5B shapes:
//! quantised matmul (m = 1 and m = 16), paged attention decode, RMSNorm and sampling.
//!
//! `cargo bench --bench ops` (add `-- matmul` to filter). `cargo test` does not build it.

use arbor_kernels::kv::{BlockTable, KvLayout, KvPool};
use arbor_kernels::ops::{self, AttentionParams, SamplingParams};
use arbor_kernels::quant::GgmlType;
use arbor_kernels::Weight;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

/// xorshift64: deterministic data without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

/// A `rows × cols` weight of `ty` with random quants and a small scale in every block.
fn weight(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Weight {
    let n = ty.bytes_for(cols).expect("whole blocks") * rows;
    let mut bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    for b in bytes.chunks_exact_mut(ty.type_size()) {
        b[..2].copy_from_slice(&scale);
        if ty == GgmlType::Q4_1 {
            b[2..4].copy_from_slice(&scale);
        }
    }
    Weight::from_raw(rows, cols, ty, bytes).expect("consistent weight")
}

fn matmul(c: &mut Criterion) {
    let mut rng = Rng(1);
    // (name, type, rows = out, cols = in): SmolLM2 FFN, Qwen2.5-0.5B FFN.
    let shapes = [
        ("smollm2_ffn_up_q4_1", GgmlType::Q4_1, 1536, 576),
        ("qwen05_ffn_up_q4_0", GgmlType::Q4_0, 4864, 896),
        ("qwen05_ffn_up_q8_0", GgmlType::Q8_0, 4864, 896),
    ];
    let mut g = c.benchmark_group("matmul");
    for (name, ty, rows, cols) in shapes {
        let w = weight(ty, rows, cols, &mut rng);
        for m in [1usize, 16] {
            let x = rng.vec(m * cols);
            let mut out = vec![0.0f32; m * rows];
            g.throughput(Throughput::Bytes(w.nbytes() as u64));
            g.bench_with_input(BenchmarkId::new(name, format!("m{m}")), &m, |b, &m| {
                b.iter(|| ops::matmul(black_box(&x), m, &w, &mut out).expect("matmul"))
            });
        }
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let mut rng = Rng(2);
    // SmolLM2: 9 query heads over 3 KV heads of 64 dims; one decode row per sequence.
    let (heads, kv_heads, hd, ps) = (9, 3, 64, 16);
    let mut g = c.benchmark_group("paged_attention_decode");
    for ctx in [512usize, 4096] {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: kv_heads,
            head_dim: hd,
            page_size: ps,
        };
        let pages = ctx.div_ceil(ps);
        let mut pool = KvPool::new(layout, pages);
        for p in 0..pages {
            for slot in 0..ps {
                let (k, v) = (rng.vec(kv_heads * hd), rng.vec(kv_heads * hd));
                pool.write(0, p as u32, slot, &k, &v);
            }
        }
        let table = BlockTable {
            pages: (0..pages as u32).collect(),
            len: ctx,
        };
        let params = AttentionParams {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            sliding_window: None,
        };
        let q = rng.vec(heads * hd);
        let mut out = vec![0.0f32; heads * hd];
        g.throughput(Throughput::Elements(ctx as u64));
        g.bench_function(BenchmarkId::from_parameter(format!("ctx{ctx}")), |b| {
            b.iter(|| {
                ops::paged_attention(
                    black_box(&q),
                    &[ctx - 1],
                    &pool,
                    0,
                    &table,
                    &params,
                    &mut out,
                )
            })
        });
    }
    g.finish();
}

/// B branches sharing a P-token prefix (page-aligned), each with a private 64-token suffix, one
/// decode row each, SmolLM2 shapes: per-row paged attention (what the engine ran before cascade
/// attention) against cascade attention in both modes, over one layer.
fn cascade(c: &mut Criterion) {
    use ops::cascade::{cascade_attention, chain_attention, CascadePlan, PlanOptions, PlanSeq};
    let mut rng = Rng(4);
    let (heads, kv_heads, hd, ps, suffix) = (9, 3, 64, 16, 64);
    let params = AttentionParams {
        n_heads: heads,
        n_kv_heads: kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: None,
    };
    let mut g = c.benchmark_group("cascade_decode");
    g.sample_size(20);
    for (b, prefix) in [(16usize, 1024usize), (16, 4096), (64, 1024), (64, 4096)] {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: kv_heads,
            head_dim: hd,
            page_size: ps,
        };
        let (shared, own) = (prefix / ps, suffix / ps);
        let pages = shared + b * own;
        let mut pool = KvPool::new(layout, pages);
        for p in 0..pages {
            for slot in 0..ps {
                let (k, v) = (rng.vec(kv_heads * hd), rng.vec(kv_heads * hd));
                pool.write(0, p as u32, slot, &k, &v);
            }
        }
        let len = prefix + suffix;
        let tables: Vec<BlockTable> = (0..b)
            .map(|i| BlockTable {
                pages: (0..shared as u32)
                    .chain((shared + i * own) as u32..(shared + (i + 1) * own) as u32)
                    .collect(),
                len,
            })
            .collect();
        let positions = vec![len - 1; b];
        let seqs: Vec<PlanSeq> = tables
            .iter()
            .enumerate()
            .map(|(i, t)| PlanSeq {
                pages: &t.pages,
                rows: i..i + 1,
                sparse_budget: None,
            })
            .collect();
        let plan =
            CascadePlan::build(&seqs, &positions, ps, &PlanOptions::default()).expect("plan");
        let q = rng.vec(b * heads * hd);
        let mut out = vec![0.0f32; q.len()];
        let w = heads * hd;
        let id = |name: &str| BenchmarkId::new(name, format!("b{b}_p{prefix}"));
        g.bench_function(id("per_row"), |bench| {
            bench.iter(|| {
                for (i, t) in tables.iter().enumerate() {
                    let r = i * w..(i + 1) * w;
                    let o = &mut out[r.clone()];
                    ops::paged_attention(&q[r], &[len - 1], &pool, 0, t, &params, o);
                }
            })
        });
        g.bench_function(id("chain"), |bench| {
            bench.iter(|| chain_attention(black_box(&q), &plan, &pool, 0, &params, None, &mut out))
        });
        g.bench_function(id("merge"), |bench| {
            bench
                .iter(|| cascade_attention(black_box(&q), &plan, &pool, 0, &params, None, &mut out))
        });
        g.bench_function(id("plan_build"), |bench| {
            bench.iter(|| {
                CascadePlan::build(black_box(&seqs), &positions, ps, &PlanOptions::default())
            })
        });
    }
    g.finish();
}

fn norm_and_sampling(c: &mut Criterion) {
    let mut rng = Rng(3);
    let (x, w) = (rng.vec(896), rng.vec(896));
    let mut out = vec![0.0f32; 896];
    c.bench_function("rms_norm_896", |b| {
        b.iter(|| ops::rms_norm(black_box(&x), &w, 1e-6, &mut out))
    });
    let logits: Vec<f32> = rng.vec(49152).iter().map(|x| x * 8.0).collect();
    let history: Vec<u32> = (0..256).collect();
    let mut g = c.benchmark_group("sample_49152");
    for (name, p) in [
        ("greedy", SamplingParams::default()),
        (
            "t0.8_top_p0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: 7,
                ..Default::default()
            },
        ),
        (
            "top_logprobs16",
            SamplingParams {
                top_logprobs: 16,
                ..Default::default()
            },
        ),
    ] {
        g.bench_function(name, |b| {
            let mut step = 0;
            b.iter(|| {
                step += 1;
                ops::sample(black_box(&logits), &p, &history, step)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, matmul, attention, cascade, norm_and_sampling);
criterion_main!(benches);
