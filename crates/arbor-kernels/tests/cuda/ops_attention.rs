//! Paged attention against `ops::paged_attention`, one CPU call per sequence, one GPU call
//! per batch: the shared harness, decode batches and argument checks (prefill, extend and
//! mixed batches are in `ops_attention_batch`). Host and device pools hold the same bf16-rounded K/V (`random_pools`), pages
//! are handed out in shuffled order (so no sequence's pages are contiguous) and layer 1 of 2
//! is read. Each sequence is checked on its own (`check_bf16`: the output is bf16).

use crate::common::{self, random};
use crate::ops_common::*;
use arbor_kernels::cuda::ops::attention::{attention, AttentionBatch, PREFILL_MIN_ROWS};
use arbor_kernels::cuda::Gpu;
use arbor_kernels::kv::{BlockTable, KvLayout, PageId};
use arbor_kernels::ops::{paged_attention, AttentionParams};

const LAYER: usize = 1;

/// Bound against the bf16-rounded reference: score and softmax sums over thousands of keys
/// differ from the CPU's by up to ~1e-5 relative (summation order, exp2 vs exp), which flips
/// up to ~1% of the roundings by one ulp (2⁻⁸ relative): NMSE ≤ ~1e-7 (1e-9 typical).
const ATTENTION_ROUNDED: f64 = 1e-6;

/// One sequence of a batch: its pages and the positions of its query rows.
pub struct Seq {
    pub pages: Vec<PageId>,
    pub positions: Vec<usize>,
}

#[derive(Clone, Copy)]
pub struct Shape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
    pub window: Option<usize>,
    pub q_scale: f32,
}

pub fn shape(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Shape {
    Shape {
        n_heads,
        n_kv_heads,
        head_dim,
        page_size: 16,
        window: None,
        q_scale: 1.0,
    }
}

/// Hands out page ids in a shuffled order.
pub struct Pages(Vec<PageId>);

impl Pages {
    pub fn new(n: usize, seed: u64) -> Self {
        let mut ids: Vec<PageId> = (0..n as PageId).collect();
        let r = random_indices(n, n, seed);
        for i in (1..n).rev() {
            ids.swap(i, r[i] as usize % (i + 1));
        }
        Pages(ids)
    }
    pub fn take(&mut self, n: usize) -> Vec<PageId> {
        assert!(n <= self.0.len(), "the test pool is too small");
        self.0.split_off(self.0.len() - n)
    }
    /// A sequence whose `rows` query rows follow `cached` positions already in the cache.
    pub fn seq(&mut self, cached: usize, rows: usize, page_size: usize) -> Seq {
        Seq {
            pages: self.take((cached + rows).div_ceil(page_size)),
            positions: (cached..cached + rows).collect(),
        }
    }
    /// A decode row at the end of a context of `len` positions.
    pub fn decode(&mut self, len: usize, page_size: usize) -> Seq {
        self.seq(len - 1, 1, page_size)
    }
}

/// Host-side size hints; `None` takes the exact values.
#[derive(Clone, Copy, Default)]
pub struct Hints {
    pub max_rows_per_seq: Option<usize>,
    pub max_context: Option<usize>,
}

pub fn run(name: &str, sh: Shape, num_pages: usize, seqs: &[Seq], hints: Hints) {
    let Some(gpu) = common::gpu() else { return };
    run_on(&gpu, name, sh, num_pages, seqs, hints);
}

fn run_on(gpu: &Gpu, name: &str, sh: Shape, num_pages: usize, seqs: &[Seq], hints: Hints) {
    let hd = sh.head_dim;
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: sh.n_kv_heads,
        head_dim: hd,
        page_size: sh.page_size,
    };
    let seed = (sh.n_heads * 1000 + hd * 10 + seqs.len()) as u64;
    let (host, pool) = random_pools(gpu, layout, num_pages, seed);
    let p = AttentionParams {
        n_heads: sh.n_heads,
        n_kv_heads: sh.n_kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f32).sqrt(),
        sliding_window: sh.window,
    };
    let row_len = sh.n_heads * hd;
    let rows: usize = seqs.iter().map(|s| s.positions.len()).sum();
    let q = random(rows * row_len, seed + 1, sh.q_scale);

    // CPU, one sequence at a time.
    let mut want = vec![0.0; rows * row_len];
    let mut r0 = 0;
    for s in seqs {
        let n = s.positions.len();
        let table = BlockTable {
            pages: s.pages.clone(),
            len: s.positions.iter().max().map_or(0, |m| m + 1),
        };
        let (a, b) = (r0 * row_len, (r0 + n) * row_len);
        paged_attention(
            &q[a..b],
            &s.positions,
            &host,
            LAYER,
            &table,
            &p,
            &mut want[a..b],
        );
        r0 += n;
    }

    // GPU, the whole batch.
    let (mut positions, mut row_seq, mut row_ptr, mut page_ptr, mut page_ids) =
        (vec![], vec![], vec![0u32], vec![0u32], vec![]);
    for (i, s) in seqs.iter().enumerate() {
        positions.extend(s.positions.iter().map(|&p| p as u32));
        row_seq.extend(std::iter::repeat_n(i as u32, s.positions.len()));
        row_ptr.push(positions.len() as u32);
        page_ids.extend_from_slice(&s.pages);
        page_ptr.push(page_ids.len() as u32);
    }
    let max_rows = seqs.iter().map(|s| s.positions.len()).max().unwrap_or(0);
    let max_ctx = positions.iter().max().map_or(0, |&p| p as usize + 1);
    let (dpos, dseq, drow, dpp, dpi) = (
        up(gpu, &positions),
        up(gpu, &row_seq),
        up(gpu, &row_ptr),
        up(gpu, &page_ptr),
        up(gpu, &page_ids),
    );
    let batch = AttentionBatch {
        positions: &dpos,
        row_seq: &dseq,
        seq_row_indptr: &drow,
        page_indptr: &dpp,
        page_indices: &dpi,
        seqs: seqs.len(),
        max_rows_per_seq: hints.max_rows_per_seq.unwrap_or(max_rows),
        max_context: hints.max_context.unwrap_or(max_ctx),
    };
    let mut out = zeros(gpu, rows * row_len + 7);
    attention(gpu, &up(gpu, &q), rows, &batch, &pool, LAYER, &p, &mut out).expect("attention");
    let got = down_bf16(gpu, &out, rows * row_len);

    let head = format!(
        "{name}: {}/{} heads × {hd}, page {}, window {:?}",
        sh.n_heads, sh.n_kv_heads, sh.page_size, sh.window
    );
    let mut r0 = 0;
    for (i, s) in seqs.iter().enumerate() {
        let n = s.positions.len();
        let (a, b) = (r0 * row_len, (r0 + n) * row_len);
        let kernel = if n >= PREFILL_MIN_ROWS && batch.max_rows_per_seq >= PREFILL_MIN_ROWS {
            "prefill"
        } else {
            "decode"
        };
        let what = format!(
            "{head}: seq {i} ({n} rows at {}..={}, {kernel})",
            s.positions[0],
            s.positions[n - 1]
        );
        check_bf16_with(&what, &got[a..b], &want[a..b], ATTENTION_ROUNDED);
        r0 += n;
    }
}

#[test]
fn attention_decode_gqa_hd64() {
    for (nh, nkv) in [(8, 8), (9, 3), (16, 4), (14, 2), (32, 4)] {
        let mut pg = Pages::new(64, 1);
        let seqs: Vec<Seq> = [1, 5, 16, 17, 100, 333]
            .iter()
            .map(|&l| pg.decode(l, 16))
            .collect();
        run("decode", shape(nh, nkv, 64), 64, &seqs, Hints::default());
    }
}

#[test]
fn attention_decode_gqa_hd128() {
    for (nh, nkv) in [(8, 8), (24, 8), (32, 8), (28, 4), (64, 8)] {
        let mut pg = Pages::new(64, 2);
        let seqs: Vec<Seq> = [1, 5, 16, 17, 100, 333]
            .iter()
            .map(|&l| pg.decode(l, 16))
            .collect();
        run("decode", shape(nh, nkv, 128), 64, &seqs, Hints::default());
    }
}

#[test]
fn attention_decode_other_head_dims() {
    // 16: the tiny test fixtures' head dim (lanes beyond 16 hold no value dims).
    for hd in [16, 32, 96, 256] {
        for (nh, nkv) in [(4, 1), (14, 2)] {
            let mut pg = Pages::new(32, 3);
            let seqs: Vec<Seq> = [3, 31, 70].iter().map(|&l| pg.decode(l, 16)).collect();
            run("decode", shape(nh, nkv, hd), 32, &seqs, Hints::default());
            let seqs = vec![pg.seq(20, 33, 16)];
            run("prefill", shape(nh, nkv, hd), 32, &seqs, Hints::default());
        }
    }
}

#[test]
fn attention_decode_large_groups() {
    // Groups above 8 take several blocks per (row, KV head).
    for (nh, nkv, hd) in [(12, 1, 64), (32, 2, 128), (40, 2, 64)] {
        let mut pg = Pages::new(32, 4);
        let seqs: Vec<Seq> = [9, 130].iter().map(|&l| pg.decode(l, 16)).collect();
        run("decode", shape(nh, nkv, hd), 32, &seqs, Hints::default());
        let seqs = vec![pg.seq(20, 33, 16)];
        run("prefill", shape(nh, nkv, hd), 32, &seqs, Hints::default());
    }
}

#[test]
fn attention_decode_long_context() {
    for (hd, q_scale) in [(64, 1.0), (128, 3.0)] {
        let mut pg = Pages::new(700, 5);
        let seqs: Vec<Seq> = [2000, 4097, 257]
            .iter()
            .map(|&l| pg.decode(l, 16))
            .collect();
        let sh = Shape {
            q_scale,
            ..shape(32, 8, hd)
        };
        run("long decode", sh, 700, &seqs, Hints::default());
    }
}

#[test]
fn attention_rejects_bad_shapes() {
    let Some(gpu) = common::gpu() else { return };
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
    };
    let (_, pool) = random_pools(&gpu, layout, 2, 1);
    let u = up(&gpu, &[0u32, 1, 2]);
    let batch = AttentionBatch {
        positions: &u,
        row_seq: &u,
        seq_row_indptr: &u,
        page_indptr: &u,
        page_indices: &u,
        seqs: 1,
        max_rows_per_seq: 1,
        max_context: 1,
    };
    let q = zeros::<f32>(&gpu, 4 * 64);
    let mut out = zeros(&gpu, 4 * 64);
    let ok = AttentionParams {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        scale: 0.125,
        sliding_window: None,
    };
    attention(&gpu, &q, 0, &batch, &pool, LAYER, &ok, &mut out).expect("no rows is fine");
    let bad = [
        (
            AttentionParams { n_heads: 5, ..ok },
            1,
            LAYER,
            "cannot share",
        ),
        (
            AttentionParams { head_dim: 80, ..ok },
            1,
            LAYER,
            "head_dim 80",
        ),
        (
            AttentionParams {
                n_kv_heads: 4,
                n_heads: 8,
                ..ok
            },
            1,
            LAYER,
            "pool",
        ),
        (ok, 1, 2, "layer"),
        (ok, 2, LAYER, "q holds"),
    ];
    for (p, rows, layer, why) in bad {
        let e = attention(&gpu, &q, rows, &batch, &pool, layer, &p, &mut out).expect_err(why);
        println!("{why}: {e}");
        assert!(
            e.to_string().contains("attention") && e.to_string().contains(why),
            "{e}"
        );
    }
}

/// What CUDA graphs of decode steps rely on: the most warps per block (`max_context =
/// usize::MAX`), padding rows and sequences, and arrays that are views of one packed buffer
/// with a longer page list give bit for bit the output of the exact launch, and zeros for the
/// padding rows.
#[test]
fn decode_is_the_same_with_most_warps_padding_and_views() {
    let Some(gpu) = common::gpu() else { return };
    let (nh, nkv, hd) = (16, 4, 128);
    let row_len = nh * hd;
    for window in [None, Some(40)] {
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: nkv,
            head_dim: hd,
            page_size: 16,
        };
        let (_, pool) = random_pools(&gpu, layout, 64, 11);
        let mut pg = Pages::new(64, 11);
        // Contexts up to 100: the exact launch takes 4 warps, the graph's 8.
        let seqs: Vec<Seq> = [1, 5, 33, 64, 100]
            .iter()
            .map(|&l| pg.decode(l, 16))
            .collect();
        let (n, pad) = (seqs.len(), 8);
        let p = AttentionParams {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            sliding_window: window,
        };
        let (mut positions, mut row_ptr, mut page_ptr, mut page_ids) =
            (vec![], vec![0u32], vec![0u32], vec![]);
        for s in &seqs {
            positions.push(s.positions[0] as u32);
            row_ptr.push(positions.len() as u32);
            page_ids.extend_from_slice(&s.pages);
            page_ptr.push(page_ids.len() as u32);
        }
        let row_seq: Vec<u32> = (0..n as u32).collect();
        let q = up(&gpu, &random(pad * row_len, 5, 1.0));

        let (dpos, dseq, drow, dpp, dpi) = (
            up(&gpu, &positions),
            up(&gpu, &row_seq),
            up(&gpu, &row_ptr),
            up(&gpu, &page_ptr),
            up(&gpu, &page_ids),
        );
        let exact = AttentionBatch {
            positions: &dpos,
            row_seq: &dseq,
            seq_row_indptr: &drow,
            page_indptr: &dpp,
            page_indices: &dpi,
            seqs: n,
            max_rows_per_seq: 1,
            max_context: 100,
        };
        let mut out = zeros(&gpu, n * row_len);
        attention(&gpu, &q, n, &exact, &pool, LAYER, &p, &mut out).expect("attention");
        let want = down_bf16(&gpu, &out, n * row_len);

        // Padded to `pad` rows and sequences, packed, page list followed by junk.
        let padded = |v: &[u32], len: usize, fill: u32| {
            let mut v = v.to_vec();
            v.resize(len, fill);
            v
        };
        let parts = [
            padded(&positions, pad, 0),
            padded(&row_seq, pad, u32::MAX),
            padded(&row_ptr, pad + 1, n as u32),
            padded(&page_ptr, pad + 1, page_ids.len() as u32),
            page_ids.iter().copied().chain([7; 100]).collect(),
        ];
        let packed: Vec<u32> = parts.concat();
        let dev = up(&gpu, &packed);
        let mut at = 0;
        let mut views = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let end = if i == parts.len() - 1 {
                packed.len()
            } else {
                at + part.len()
            };
            views.push(dev.slice(at..end));
            at += part.len();
        }
        let graph = AttentionBatch {
            positions: &views[0],
            row_seq: &views[1],
            seq_row_indptr: &views[2],
            page_indptr: &views[3],
            page_indices: &views[4],
            seqs: pad,
            max_rows_per_seq: 1,
            max_context: usize::MAX,
        };
        let mut out = zeros(&gpu, pad * row_len);
        attention(&gpu, &q, pad, &graph, &pool, LAYER, &p, &mut out).expect("attention");
        let got = down_bf16(&gpu, &out, pad * row_len);
        let what = format!("window {window:?}");
        check_exact(&format!("{what}: real rows"), &got[..n * row_len], &want);
        assert!(
            got[n * row_len..].iter().all(|&x| x == 0.0),
            "{what}: padding rows are not zero"
        );
    }
}
