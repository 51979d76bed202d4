//! Paged attention against dense f64 attention over contiguous K/V.

use crate::common::Rng;
use arbor_kernels::kv::{KvCache, KvDtype, KvLayout, SeqId};
use arbor_kernels::ops::{paged_attention, AttentionParams};

const SEQ: SeqId = 1;
const LAYER: usize = 1;

/// One attention problem: a cached sequence of `len` positions and query rows at `positions`.
#[derive(Debug)]
struct Case {
    page_size: usize,
    n_kv_heads: usize,
    group: usize,
    head_dim: usize,
    len: usize,
    positions: Vec<usize>,
    window: Option<usize>,
    /// Scale of q (larger → peakier softmax, more online rescaling).
    q_scale: f32,
}

/// A cache of `num_pages` pages whose sequence `seq` holds pages for `len` positions in a
/// random order of the pool: fillers take every page, then are freed in a random order with
/// the sequence taking each freed page in turn (pages are handed out lowest first, so only
/// this interleaving scrambles its table).
fn scrambled_cache(
    layout: KvLayout,
    num_pages: usize,
    seq: SeqId,
    len: usize,
    rng: &mut Rng,
    dtype: KvDtype,
) -> KvCache {
    let mut cache = KvCache::with_dtype(layout, num_pages, 0, dtype);
    for i in 0..num_pages {
        let filler = 1000 + i as SeqId;
        cache.add_seq(filler);
        cache.reserve(filler, 1).expect("a page per filler");
    }
    cache.add_seq(seq);
    let ps = layout.page_size;
    let mut order = rng.permutation(num_pages).into_iter();
    for k in 1..=len.div_ceil(ps) {
        let i = order.next().expect("a page per position block");
        cache.free_seq(1000 + i as SeqId);
        cache
            .reserve(seq, (k * ps).min(len))
            .expect("the freed page");
    }
    for i in order {
        cache.free_seq(1000 + i as SeqId);
    }
    cache
}

/// Dense causal attention in f64: `k`, `v` are `len × n_kv_heads × head_dim`.
fn reference(c: &Case, q: &[f32], k: &[f32], v: &[f32], scale: f64) -> Vec<f64> {
    let (hd, nkv) = (c.head_dim, c.n_kv_heads);
    let nh = nkv * c.group;
    let mut out = vec![0.0f64; c.positions.len() * nh * hd];
    for (row, &pos) in c.positions.iter().enumerate() {
        let start = c.window.map_or(0, |w| (pos + 1).saturating_sub(w.max(1)));
        for h in 0..nh {
            let kvh = h / c.group;
            let qv = &q[(row * nh + h) * hd..][..hd];
            let scores: Vec<f64> = (start..=pos)
                .map(|t| {
                    let kt = &k[(t * nkv + kvh) * hd..][..hd];
                    qv.iter()
                        .zip(kt)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            let o = &mut out[(row * nh + h) * hd..][..hd];
            for (t, wt) in (start..=pos).zip(&w) {
                let vt = &v[(t * nkv + kvh) * hd..][..hd];
                for (oi, &vi) in o.iter_mut().zip(vt) {
                    *oi += wt / z * vi as f64;
                }
            }
        }
    }
    out
}

fn check(c: &Case, rng: &mut Rng) {
    check_stored_as(c, rng, KvDtype::F32);
}

/// [`check`] on a pool storing `dtype`, against dense attention over the K/V as stored.
fn check_stored_as(c: &Case, rng: &mut Rng, dtype: KvDtype) {
    let (hd, nkv) = (c.head_dim, c.n_kv_heads);
    let nh = nkv * c.group;
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: nkv,
        head_dim: hd,
        page_size: c.page_size,
    };
    let pages = c.len.div_ceil(c.page_size) + 3;
    let mut cache = scrambled_cache(layout, pages, SEQ, c.len, rng, dtype);
    let k = rng.normals(c.len * nkv * hd, 1.0);
    let v = rng.normals(c.len * nkv * hd, 1.0);
    for pos in 0..c.len {
        let row = pos * nkv * hd..(pos + 1) * nkv * hd;
        cache.write(LAYER, SEQ, pos, &k[row.clone()], &v[row.clone()]);
        // The other layer holds different data that must not leak in.
        let junk = vec![100.0; nkv * hd];
        cache.write(0, SEQ, pos, &junk, &junk);
    }
    let table = cache.table(SEQ).expect("live sequence");
    if table.pages.len() >= 5 {
        assert!(
            table.pages.windows(2).any(|w| w[1] != w[0] + 1),
            "pages should be scrambled"
        );
    }
    let q = rng.normals(c.positions.len() * nh * hd, c.q_scale);
    let scale = 1.0 / (hd as f32).sqrt();
    let params = AttentionParams {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        scale,
        sliding_window: c.window,
    };
    let mut out = vec![f32::NAN; q.len()];
    paged_attention(
        &q,
        &c.positions,
        &cache.pool,
        LAYER,
        table,
        &params,
        &mut out,
    );
    // Each row alone (one head or one KV head's heads per task) gives, bit for bit, what it
    // gave inside the batch (whatever block of rows and heads it was stepped in).
    let row_len = nh * hd;
    for (r, &pos) in c.positions.iter().enumerate() {
        let mut alone = vec![f32::NAN; row_len];
        let qr = &q[r * row_len..(r + 1) * row_len];
        paged_attention(qr, &[pos], &cache.pool, LAYER, table, &params, &mut alone);
        let bits = |x: &[f32]| x.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&alone),
            bits(&out[r * row_len..(r + 1) * row_len]),
            "row {r} (position {pos}) alone differs from the batch: {c:?}"
        );
    }
    let stored = |x: &[f32]| -> Vec<f32> {
        match dtype {
            KvDtype::F32 => x.to_vec(),
            KvDtype::F16 => x.iter().map(|&a| half::f16::from_f32(a).to_f32()).collect(),
        }
    };
    let want = reference(c, &q, &stored(&k), &stored(&v), scale as f64);
    for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= 2e-5 + 1e-4 * w.abs(),
            "page {} kv {nkv} group {} hd {hd} len {} window {:?} rows {:?}: out[{i}] = {g}, want {w}",
            c.page_size,
            c.group,
            c.len,
            c.window,
            c.positions
        );
    }
}

#[test]
fn matches_dense_attention_across_page_sizes_gqa_and_windows() {
    let mut rng = Rng::new(11);
    let mut cases = 0;
    for (pi, &page_size) in [8, 16, 32].iter().enumerate() {
        for (gi, &group) in [1, 3, 4, 7, 8].iter().enumerate() {
            for (li, &len) in [1, 7, 37, 100].iter().enumerate() {
                let i = pi + gi + li;
                let window = [None, Some(5), None, Some(16), Some(1000)][i % 5];
                let head_dim = [64, 32, 20][i % 3];
                let n_kv_heads = 1 + (i % 2);
                let q_scale = [1.0, 4.0][i % 2];
                // A decode row, and a prompt chunk of consecutive positions ending at the end.
                let chunk = len.min(6);
                for positions in [vec![len - 1], (len - chunk..len).collect()] {
                    let c = Case {
                        page_size,
                        n_kv_heads,
                        group,
                        head_dim,
                        len,
                        positions,
                        window,
                        q_scale,
                    };
                    check(&c, &mut rng);
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 120);
}

/// f16 pages (`--kv-dtype f16`): paged attention reads what was stored, rounded, and nothing
/// else; the other layer's junk (100.0, exact in f16) must not leak in either.
#[test]
fn f16_pages_match_dense_attention_over_the_rounded_kv() {
    let mut rng = Rng::new(12);
    for (i, &(page_size, group, len, window)) in [
        (16, 3, 100, None),
        (8, 1, 37, Some(16)),
        (32, 8, 75, None),
        (16, 4, 7, Some(5)),
    ]
    .iter()
    .enumerate()
    {
        for positions in [vec![len - 1], (len - len.min(6)..len).collect()] {
            let c = Case {
                page_size,
                n_kv_heads: 1 + i % 2,
                group,
                head_dim: [64, 32][i % 2],
                len,
                positions,
                window,
                q_scale: [1.0, 4.0][i % 2],
            };
            check_stored_as(&c, &mut rng, KvDtype::F16);
        }
    }
}

#[test]
fn prompt_chunk_from_the_start_is_causal() {
    // Rows 0..len of a whole prompt: row i must ignore positions after i.
    let mut rng = Rng::new(12);
    for (page_size, window) in [(8, None), (16, Some(4)), (32, None)] {
        let c = Case {
            page_size,
            n_kv_heads: 2,
            group: 4,
            head_dim: 64,
            len: 45,
            positions: (0..45).collect(),
            window,
            q_scale: 2.0,
        };
        check(&c, &mut rng);
    }
}

#[test]
fn long_prompt_in_blocks_of_rows() {
    // Enough rows that tasks take several rows × all heads (on one thread from 32 rows, on
    // two from 64): a whole prompt, a chunk starting mid-page, windows, f16 pages.
    let mut rng = Rng::new(15);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        for (len, start, window, dtype) in [
            (150, 0, None, KvDtype::F32),
            (230, 37, Some(50), KvDtype::F32),
            (200, 5, None, KvDtype::F16),
        ] {
            let c = Case {
                page_size: 16,
                n_kv_heads: 2,
                group: 3,
                head_dim: 64,
                len,
                positions: (start..len).collect(),
                window,
                q_scale: 2.0,
            };
            pool.install(|| check_stored_as(&c, &mut rng, dtype));
        }
    }
}

#[test]
fn rows_at_scattered_positions() {
    // Rows need not be consecutive or ordered (e.g. a verifier scoring chosen positions).
    let mut rng = Rng::new(13);
    let c = Case {
        page_size: 16,
        n_kv_heads: 3,
        group: 3,
        head_dim: 64,
        len: 300,
        positions: vec![299, 0, 15, 16, 17, 150, 31, 32],
        window: None,
        q_scale: 1.0,
    };
    check(&c, &mut rng);
}

#[test]
fn long_context_with_peaky_scores() {
    let mut rng = Rng::new(14);
    for window in [None, Some(128)] {
        let c = Case {
            page_size: 16,
            n_kv_heads: 3,
            group: 3,
            head_dim: 64,
            len: 1000,
            positions: vec![999, 998],
            window,
            q_scale: 8.0,
        };
        check(&c, &mut rng);
    }
}
