//! The reference K/V of a token sequence, one full step of the cache's life, and the checks
//! every test runs after each operation.
//!
//! The K/V a test writes at position `p` of a sequence is a function of (hash of
//! `tokens[..=p]`, `p`, layer, head, dim, K or V) only: a page that holds position `p` of
//! two sequences must hold the same values when their tokens up to `p` agree, so any page
//! that is shared, copied, reused from the prefix index or deduplicated can be checked
//! against the sequence's own tokens alone.

use arbor_kernels::kv::{BlockTable, KvCache, KvLayout, KvStats, SeqId};
use arbor_kernels::KernelError;
use std::collections::{BTreeMap, BTreeSet};

/// A tiny model shape.
pub fn layout(
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    page_size: usize,
) -> KvLayout {
    KvLayout {
        num_layers,
        num_kv_heads,
        head_dim,
        page_size,
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `h[p]` is a hash of `tokens[..=p]`.
pub fn prefix_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut h = 0x5EED_u64;
    tokens
        .iter()
        .map(|&t| {
            h = mix(h ^ u64::from(t).wrapping_mul(0x100_0000_01B3));
            h
        })
        .collect()
}

/// The K (`kv == 0`) or V (`kv == 1`) vector of every head, `num_kv_heads × head_dim`, at
/// position `pos` of `layer` for a prefix whose hash is `h`. Exact in f32 and never 0 (the
/// value of an unwritten slot).
pub fn kv_vec(l: &KvLayout, h: u64, pos: usize, layer: usize, kv: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(l.num_kv_heads * l.head_dim);
    for head in 0..l.num_kv_heads {
        for d in 0..l.head_dim {
            let key = ((pos as u64) << 24) ^ ((layer as u64) << 16) ^ ((head as u64) << 8);
            let z = mix(h ^ mix(key ^ ((d as u64) << 1) ^ kv as u64));
            out.push(((z & 0xFF_FFFF) | 1) as f32);
        }
    }
    out
}

/// Writes the reference K/V of positions `from..to` of `tokens` (the sequence's whole token
/// list, committed and new) into `seq`, every layer.
pub fn write_range(cache: &mut KvCache, seq: SeqId, tokens: &[u32], from: usize, to: usize) {
    let l = cache.layout();
    let h = prefix_hashes(&tokens[..to]);
    for (pos, &hp) in h.iter().enumerate().take(to).skip(from) {
        for layer in 0..l.num_layers {
            let k = kv_vec(&l, hp, pos, layer, 0);
            let v = kv_vec(&l, hp, pos, layer, 1);
            cache.write(layer, seq, pos, &k, &v);
        }
    }
}

/// The K and V `cache` holds for position `pos` of `seq` in `layer`, read through its block
/// table and the pool.
pub fn read_kv(cache: &KvCache, seq: SeqId, pos: usize, layer: usize) -> (Vec<f32>, Vec<f32>) {
    let l = cache.layout();
    let table = cache.table(seq).expect("live sequence");
    let (page, slot) = table.locate(pos, l.page_size);
    let (mut k, mut v) = (Vec::new(), Vec::new());
    let hd = l.head_dim;
    for head in 0..l.num_kv_heads {
        k.extend_from_slice(&cache.pool.keys(layer, page, head)[slot * hd..(slot + 1) * hd]);
        v.extend_from_slice(&cache.pool.values(layer, page, head)[slot * hd..(slot + 1) * hd]);
    }
    (k, v)
}

/// Every committed position of `seq` holds the reference K/V of `tokens`.
pub fn check_content(cache: &KvCache, seq: SeqId, tokens: &[u32]) -> Result<(), String> {
    let l = cache.layout();
    for (pos, &h) in prefix_hashes(tokens).iter().enumerate() {
        for layer in 0..l.num_layers {
            let (k, v) = read_kv(cache, seq, pos, layer);
            if k != kv_vec(&l, h, pos, layer, 0) || v != kv_vec(&l, h, pos, layer, 1) {
                let page = cache.table(seq).unwrap().locate(pos, l.page_size).0;
                return Err(format!(
                    "sequence {seq}: wrong K/V at position {pos} (page {page}) of layer {layer}"
                ));
            }
        }
    }
    Ok(())
}

/// Everything observable about the bookkeeping of `ids`: stats, and each one's table and
/// tokens (`None` when not live). Equal snapshots mean an operation changed nothing.
#[derive(Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub stats: KvStats,
    pub available: usize,
    pub seqs: BTreeMap<SeqId, Option<(BlockTable, Vec<u32>)>>,
}

pub fn snapshot(cache: &KvCache, ids: impl IntoIterator<Item = SeqId>) -> Snapshot {
    Snapshot {
        stats: cache.stats(),
        available: cache.available_pages(),
        seqs: ids
            .into_iter()
            .map(|id| {
                let s = cache
                    .table(id)
                    .cloned()
                    .zip(cache.tokens(id).map(<[u32]>::to_vec));
                (id, s)
            })
            .collect(),
    }
}

/// Every check that holds between operations (no step in progress), given the live
/// sequences and their tokens.
pub fn check_all(cache: &KvCache, live: &BTreeMap<SeqId, Vec<u32>>) -> Result<(), String> {
    cache.check()?;
    let st = cache.stats();
    let ps = st.page_size;
    let ensure = |ok: bool, what: String| if ok { Ok(()) } else { Err(what) };
    ensure(
        st.pages_in_use + st.pages_cached + st.pages_free == st.pages_total,
        format!("stats do not add up: {st:?}"),
    )?;
    ensure(
        st.pages_total == cache.pool.num_pages,
        format!("pages_total {st:?}"),
    )?;
    ensure(
        cache.available_pages() == st.pages_free + st.pages_cached,
        "available_pages != free + cached".into(),
    )?;
    ensure(
        st.seqs == live.len() && cache.num_seqs() == live.len(),
        format!("{} live sequences, stats say {}", live.len(), st.seqs),
    )?;
    let held: usize = live.values().map(Vec::len).sum();
    ensure(
        st.tokens_held == held,
        format!("tokens_held {} != {held}", st.tokens_held),
    )?;
    ensure(
        st.unique_tokens <= st.tokens_held,
        "unique_tokens > tokens_held".into(),
    )?;

    let mut all_pages = BTreeSet::new();
    for (&id, tokens) in live {
        ensure(cache.contains(id), format!("sequence {id} is not live"))?;
        ensure(
            cache.tokens(id) == Some(tokens.as_slice()),
            format!("sequence {id}: tokens {:?} != {tokens:?}", cache.tokens(id)),
        )?;
        ensure(cache.len(id) == tokens.len(), format!("sequence {id}: len"))?;
        let table = cache.table(id).unwrap();
        ensure(
            table.len == tokens.len(),
            format!("sequence {id}: table.len"),
        )?;
        ensure(
            table.pages.len() == BlockTable::pages_for(tokens.len(), ps),
            format!(
                "sequence {id}: {} pages for {} tokens",
                table.pages.len(),
                tokens.len()
            ),
        )?;
        check_content(cache, id, tokens)?;

        let mine: BTreeSet<_> = table.pages.iter().copied().collect();
        ensure(
            mine.len() == table.pages.len(),
            format!("sequence {id} holds a page twice"),
        )?;
        let u = cache.usage(&[id]);
        ensure(
            u.pages == mine.len(),
            format!("sequence {id}: usage.pages {u:?}"),
        )?;
        ensure(
            u.unique_tokens == tokens.len(),
            format!("sequence {id}: usage {u:?}"),
        )?;
        let private = mine
            .iter()
            .filter(|&&p| cache.allocator().refcount(p) == 1)
            .count();
        ensure(
            u.freeable_pages == private,
            format!(
                "sequence {id}: freeable {} but {private} private pages",
                u.freeable_pages
            ),
        )?;
        all_pages.extend(mine);
    }
    let ids: Vec<SeqId> = live.keys().copied().collect();
    let u = cache.usage(&ids);
    ensure(
        u.pages == all_pages.len() && u.pages == st.pages_in_use,
        format!(
            "usage of all {u:?}, {} distinct pages, stats {st:?}",
            all_pages.len()
        ),
    )?;
    ensure(u.freeable_pages == u.pages, format!("usage of all: {u:?}"))?;
    ensure(
        u.unique_tokens == st.unique_tokens,
        format!("usage of all: {u:?}"),
    )?;
    Ok(())
}

/// One full step for `seq` (committed tokens `old`, which must be live with them): reuse up to
/// `max` of `new`, reserve the rest, write it, commit it. Returns the positions reused, or
/// the reserve error after rolling the step back with `truncate`.
pub fn step(
    cache: &mut KvCache,
    seq: SeqId,
    old: &[u32],
    new: &[u32],
    max: usize,
) -> Result<usize, KernelError> {
    let used = cache.reuse_prefix(seq, new, max);
    if let Err(e) = cache.reserve(seq, new.len() - used) {
        cache.truncate(seq, old.len());
        return Err(e);
    }
    let all: Vec<u32> = old.iter().chain(new).copied().collect();
    write_range(cache, seq, &all, old.len() + used, all.len());
    cache.commit(seq, &new[used..]);
    Ok(used)
}
