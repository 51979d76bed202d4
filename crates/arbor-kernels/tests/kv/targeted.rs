//! Targeted tests: copy-on-write, prefix reuse, deduplication, usage of a forked group and
//! `KvFull`, each checked against the reference K/V.

use crate::common::{check_all, check_content, layout, snapshot, step};
use arbor_kernels::kv::{KvCache, SeqId};
use arbor_kernels::KernelError;
use std::collections::BTreeMap;

/// `n` tokens that start at `from` and never repeat a page.
pub fn toks(from: u32, n: usize) -> Vec<u32> {
    (from..from + n as u32).collect()
}

/// A cache and the tokens of its live sequences, advanced one full step at a time.
pub struct Fixture {
    pub cache: KvCache,
    pub live: BTreeMap<SeqId, Vec<u32>>,
}

impl Fixture {
    pub fn new(page_size: usize, pages: usize) -> Self {
        Fixture {
            cache: KvCache::new(layout(2, 2, 4, page_size), pages),
            live: BTreeMap::new(),
        }
    }

    /// Appends `new` to `seq` (created if needed) reusing at most `new.len() - 1`; returns
    /// the positions reused.
    pub fn append(&mut self, seq: SeqId, new: &[u32]) -> Result<usize, KernelError> {
        self.cache.add_seq(seq);
        let old = self.live.entry(seq).or_default().clone();
        let used = step(&mut self.cache, seq, &old, new, new.len() - 1)?;
        self.live.get_mut(&seq).unwrap().extend_from_slice(new);
        self.check();
        Ok(used)
    }

    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        self.cache.fork(parent, child).unwrap();
        self.live.insert(child, self.live[&parent].clone());
        self.check();
    }

    pub fn free(&mut self, seq: SeqId) {
        self.cache.free_seq(seq);
        self.live.remove(&seq);
        self.check();
    }

    pub fn check(&self) {
        check_all(&self.cache, &self.live).unwrap();
    }

    pub fn pages(&self, seq: SeqId) -> Vec<u32> {
        self.cache.table(seq).unwrap().pages.clone()
    }

    pub fn refcount(&self, page: u32) -> u32 {
        self.cache.allocator().refcount(page)
    }
}

#[test]
fn fork_of_partial_last_page_copies_on_write() {
    let mut f = Fixture::new(8, 16);
    f.append(1, &toks(0, 12)).unwrap();
    f.fork(1, 2);
    let shared = f.pages(1);
    assert_eq!(f.pages(2), shared);
    assert!(shared.iter().all(|&p| f.refcount(p) == 2));

    f.append(1, &[100, 101, 102]).unwrap();
    f.append(2, &[200, 201]).unwrap();
    let (p, c) = (f.pages(1), f.pages(2));
    assert_eq!(p[0], shared[0], "the full page stays shared");
    assert_eq!(c[0], shared[0]);
    assert_eq!(f.refcount(shared[0]), 2);
    assert_ne!(
        p[1], c[1],
        "the partial page was copied by the first writer"
    );
    assert!(f.refcount(p[1]) == 1 && f.refcount(c[1]) == 1);

    // Fill the child's page past the boundary, then a grandchild of the parent writes too.
    f.append(2, &toks(300, 10)).unwrap();
    f.fork(1, 3);
    f.append(3, &[400]).unwrap();
    f.append(1, &[500, 501]).unwrap();
    for (seq, want) in [(1, 17), (2, 24), (3, 16)] {
        assert_eq!(f.cache.len(seq), want);
    }
    assert_ne!(f.pages(1)[1], f.pages(3)[1]);
}

#[test]
fn freed_full_pages_are_reused_and_the_rest_computed() {
    let mut f = Fixture::new(8, 16);
    let t = toks(0, 29); // 3 full pages + 5
    assert_eq!(f.append(1, &t).unwrap(), 0);
    let pages = f.pages(1);
    f.free(1);
    let st = f.cache.stats();
    assert_eq!(
        (st.pages_cached, st.pages_free, st.pages_in_use),
        (3, 13, 0)
    );

    f.cache.add_seq(2);
    f.live.insert(2, Vec::new());
    assert_eq!(f.cache.reuse_prefix(2, &t, t.len() - 1), 24);
    assert_eq!(f.pages(2), pages[..3]);
    assert_eq!(f.cache.pages_needed(2, 5), 1);
    f.cache.reserve(2, 5).unwrap();
    crate::common::write_range(&mut f.cache, 2, &t, 24, 29);
    f.cache.commit(2, &t[24..]);
    f.live.insert(2, t.clone());
    f.check();

    // `max` bounds the reuse to whole pages within it; a different token stops it.
    for (max, want) in [(24, 24), (23, 16), (8, 8), (7, 0), (100, 24)] {
        assert_eq!(f.cache.reuse_prefix(3, &t, max), 0, "unknown sequence");
        f.cache.add_seq(3);
        assert_eq!(f.cache.reuse_prefix(3, &t, max), want, "max {max}");
        f.cache.free_seq(3);
    }
    let mut other = t.clone();
    other[10] = 99;
    f.cache.add_seq(3);
    assert_eq!(f.cache.reuse_prefix(3, &other, 28), 8);
    // Mid-page nothing is reused, even when the continuation is cached.
    f.cache.truncate(3, 5);
    assert_eq!(f.cache.reuse_prefix(3, &t[5..], 20), 0);
    f.cache.free_seq(3);
    f.check();
}

#[test]
fn pages_computed_twice_in_one_step_are_deduplicated() {
    let mut f = Fixture::new(4, 8);
    let t = toks(0, 8);
    for seq in [1, 2] {
        f.cache.add_seq(seq);
        assert_eq!(f.cache.reuse_prefix(seq, &t, 7), 0);
        f.cache.reserve(seq, 8).unwrap();
        crate::common::write_range(&mut f.cache, seq, &t, 0, 8);
    }
    assert_eq!(f.cache.stats().pages_in_use, 4);
    for seq in [1, 2] {
        f.cache.commit(seq, &t);
        f.live.insert(seq, t.clone());
    }
    f.check();
    assert_eq!(f.pages(1), f.pages(2));
    let st = f.cache.stats();
    assert_eq!((st.pages_in_use, st.pages_free), (2, 6));
}

#[test]
fn truncating_into_an_indexed_page_copies_it_before_writing() {
    let mut f = Fixture::new(4, 8);
    let t = toks(0, 8);
    f.append(1, &t).unwrap();
    let pages = f.pages(1);
    f.cache.truncate(1, 6);
    f.live.get_mut(&1).unwrap().truncate(6);
    f.check();
    assert_eq!(f.pages(1), pages, "the partial page is kept");
    assert_eq!(
        f.cache.pages_needed(1, 1),
        1,
        "an indexed page is copied before a write"
    );
    f.append(1, &[90, 91, 92]).unwrap();
    assert_ne!(f.pages(1)[1], pages[1]);
    // The indexed page still holds the original tokens' K/V.
    assert_eq!(f.append(2, &t).unwrap(), 4);
    f.cache.add_seq(3);
    assert_eq!(f.cache.reuse_prefix(3, &t, 8), 8);
    assert_eq!(f.pages(3), pages);
    check_content(&f.cache, 3, &t).unwrap();
}

#[test]
fn usage_of_a_forked_group() {
    let mut f = Fixture::new(4, 32);
    f.append(1, &toks(0, 10)).unwrap(); // 2 full pages + 2
    f.fork(1, 2);
    f.fork(1, 3);
    let all = [1, 2, 3];
    let u = f.cache.usage(&[1]);
    assert_eq!((u.pages, u.unique_tokens, u.freeable_pages), (3, 10, 0));
    let u = f.cache.usage(&all);
    assert_eq!((u.pages, u.unique_tokens, u.freeable_pages), (3, 10, 3));

    f.append(2, &toks(100, 6)).unwrap(); // copies the partial page, adds one
    f.append(3, &toks(200, 6)).unwrap();
    let u = f.cache.usage(&[1]);
    assert_eq!(
        (u.pages, u.freeable_pages),
        (3, 1),
        "only its partial page is private"
    );
    assert_eq!(f.cache.usage(&[2]).freeable_pages, 2);
    assert_eq!(f.cache.usage(&[2, 3]).freeable_pages, 4);
    let u = f.cache.usage(&all);
    assert_eq!((u.pages, u.freeable_pages), (7, 7));
    assert_eq!(u.pages, f.cache.stats().pages_in_use);
    // Positions 8 and 9 count once per copy of their page: 8 + 2 + 2 × 8.
    assert_eq!(u.unique_tokens, 26);
    assert_eq!(f.cache.usage(&[2, 2, 77]), f.cache.usage(&[2]));
    assert_eq!(f.cache.usage(&[]), Default::default());

    let before = f.cache.stats();
    f.free(2);
    let st = f.cache.stats();
    assert_eq!(st.pages_in_use, before.pages_in_use - 2);
    assert_eq!(
        st.pages_cached,
        before.pages_cached + 2,
        "its full pages stay cached"
    );
}

#[test]
fn kv_full_is_reported_and_changes_nothing() {
    let mut f = Fixture::new(4, 6);
    f.append(1, &toks(0, 17)).unwrap(); // 5 pages, the last partial
    f.fork(1, 2);
    assert_eq!(f.cache.available_pages(), 1);
    assert_eq!(
        f.cache.pages_needed(1, 1),
        1,
        "copy of the shared partial page"
    );
    assert_eq!(f.cache.pages_needed(1, 4), 2);
    assert_eq!(
        f.cache.pages_needed(9, 5),
        2,
        "an unknown sequence needs pages for all"
    );

    let ids = [1, 2, 9];
    let before = snapshot(&f.cache, ids);
    let e = f.cache.reserve(1, 4).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::KvFull {
                needed: 2,
                free: 1,
                total: 6
            }
        ),
        "{e:?}"
    );
    assert!(f.cache.reserve(9, 5).is_err());
    assert_eq!(snapshot(&f.cache, ids), before);
    assert!(f.append(2, &toks(50, 4)).is_err(), "a full step fails too");
    assert_eq!(snapshot(&f.cache, ids), before);
    f.check();

    // One page does fit: the copy.
    f.append(2, &[60]).unwrap();
    assert_eq!(f.cache.available_pages(), 0);
    let before = snapshot(&f.cache, ids);
    assert_eq!(
        f.cache.pages_needed(1, 1),
        0,
        "its partial page is now private"
    );
    assert!(f.cache.reserve(1, 4).is_err());
    assert_eq!(snapshot(&f.cache, ids), before);
    f.check();
}

#[test]
fn everything_freed_and_evicted_leaves_the_pool_empty() {
    let mut f = Fixture::new(4, 12);
    f.append(1, &toks(0, 9)).unwrap();
    f.fork(1, 2);
    f.append(2, &toks(20, 7)).unwrap();
    f.cache.add_seq(2); // no-op on a live sequence
    f.check();
    f.free(1);
    f.free(2);
    let st = f.cache.stats();
    assert_eq!((st.pages_in_use, st.pages_cached, st.seqs), (0, 4, 0));
    assert_eq!(f.cache.evict(usize::MAX), 4);
    let st = f.cache.stats();
    assert_eq!(st.pages_free, st.pages_total);
    f.check();
}

#[test]
fn a_cache_reports_its_model_and_shape() {
    let l = layout(2, 1, 2, 8);
    let cache = KvCache::for_model(l, 5, 0xABCD);
    assert_eq!(cache.model_key(), 0xABCD);
    assert_eq!(KvCache::new(l, 5).model_key(), 0);
    assert_eq!(cache.layout(), l);
    let st = cache.stats();
    assert_eq!((st.pages_total, st.pages_free, st.page_size), (5, 5, 8));
    // K and V × 2 layers × 1 head × head_dim 2 × 8 slots × 4 bytes.
    assert_eq!(st.page_bytes, 256);
    assert_eq!(st.bytes_per_unique_token(), None);
    cache.check().unwrap();
}

/// A detached cache (pages in device memory) keeps the same bookkeeping, holds no K/V on the
/// host, and records the copy-on-write copy of a shared partial page for the device.
#[test]
fn detached_cache_records_copy_on_write() {
    let mut c = KvCache::detached(layout(2, 2, 4, 4), 8, 7);
    assert!(c.pool.is_detached());
    assert_eq!(c.pool.nbytes(), 0, "no host K/V");
    c.add_seq(0);
    c.reserve(0, 6).expect("room");
    c.write(0, 0, 5, &[1.0; 8], &[2.0; 8]); // ignored: the device writes K/V
    c.commit(0, &toks(0, 6));
    c.fork(0, 1).expect("fork");
    assert!(c.pool.take_copies().is_empty(), "a fork copies nothing");
    c.reserve(1, 1).expect("room");
    let copies = c.pool.take_copies();
    assert_eq!(
        copies.len(),
        1,
        "the shared partial page is copied once: {copies:?}"
    );
    let (src, dst, slots) = copies[0];
    assert_eq!(slots, 2, "positions 4 and 5 of the partial page");
    assert_eq!(c.table(0).map(|t| t.pages[1]), Some(src));
    assert_eq!(c.table(1).map(|t| t.pages[1]), Some(dst));
    assert!(c.pool.take_copies().is_empty(), "taken once");
}

/// Compaction moves every slot of a prefix-index page that a truncated sequence still holds in
/// part (the index's copy is full), so a later prefix hit reads the right K/V. (Found by the
/// random operations test: the slots to move came from the table's length alone.)
#[test]
fn compaction_moves_whole_indexed_pages_a_truncated_sequence_shares() {
    let mut f = Fixture::new(4, 16);
    // A filler takes the low pages, so that the next sequence's pages sit above the target.
    f.append(9, &toks(1000, 32)).unwrap();
    f.append(1, &toks(0, 12)).unwrap();
    assert!(f.pages(1).iter().all(|&p| p >= 8));
    f.free(9);
    f.cache.evict(usize::MAX);
    // Sequence 1 keeps one slot of its second page, which the index holds whole.
    f.cache.truncate(1, 5);
    f.live.get_mut(&1).unwrap().truncate(5);
    f.check();
    assert_eq!(f.cache.resize(8), 8);
    assert!(
        f.pages(1).iter().all(|&p| p < 8),
        "compaction moved the pages"
    );
    f.check();
    assert_eq!(
        f.append(2, &toks(0, 13)).unwrap(),
        12,
        "the whole prefix is reused"
    );
}
