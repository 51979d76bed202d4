//! Eviction of cached prefixes: least recently used first, leaves before their parents, held
//! pages never.

use crate::common::write_range;
use crate::targeted::{toks, Fixture};

/// Positions of `tokens` the prefix index still holds (probing touches what it finds, so
/// probe only at the end of a test).
fn cached(f: &mut Fixture, tokens: &[u32]) -> usize {
    let probe = 999;
    f.cache.add_seq(probe);
    let n = f.cache.reuse_prefix(probe, tokens, tokens.len());
    f.cache.free_seq(probe);
    f.check();
    n
}

/// A pool of 4 pages of 4 positions holding two cached 2-page prefixes, `x` older than `y`.
fn two_cached_prefixes() -> (Fixture, Vec<u32>, Vec<u32>) {
    let mut f = Fixture::new(4, 4);
    let (x, y) = (toks(0, 8), toks(100, 8));
    f.append(1, &x).unwrap();
    f.free(1);
    f.append(2, &y).unwrap();
    f.free(2);
    let st = f.cache.stats();
    assert_eq!((st.pages_cached, st.pages_free), (4, 0));
    (f, x, y)
}

#[test]
fn the_least_recently_used_prefix_is_evicted_first() {
    let (mut f, x, y) = two_cached_prefixes();
    f.append(3, &toks(200, 8)).unwrap();
    assert_eq!(cached(&mut f, &x), 0);
    assert_eq!(cached(&mut f, &y), 8);
}

#[test]
fn reusing_a_prefix_protects_it() {
    let (mut f, x, y) = two_cached_prefixes();
    // Reuses both pages of x and takes the last free page by evicting y's leaf.
    let mut longer = x.clone();
    longer.push(7);
    assert_eq!(f.append(4, &longer).unwrap(), 8);
    let st = f.cache.stats();
    assert_eq!(
        (st.pages_in_use, st.pages_cached),
        (3, 1),
        "y's first page is left"
    );
    f.free(4);
    // Two more pages: the one freed by sequence 4 and y's first page (older than x's).
    f.append(3, &toks(200, 8)).unwrap();
    assert_eq!(cached(&mut f, &x), 8);
    assert_eq!(cached(&mut f, &y), 0);
}

#[test]
fn a_prefix_computed_again_and_deduplicated_counts_as_used() {
    let mut f = Fixture::new(4, 6);
    let (x, y) = (toks(0, 8), toks(100, 8));
    for (seq, t) in [(1, &x), (2, &y)] {
        f.append(seq, t).unwrap();
        f.free(seq);
    }
    // Sequence 3 computes x without reusing it; its pages are swapped for the cached ones.
    f.cache.add_seq(3);
    assert_eq!(f.cache.reuse_prefix(3, &x, 0), 0);
    f.cache.reserve(3, 8).unwrap();
    write_range(&mut f.cache, 3, &x, 0, 8);
    f.cache.commit(3, &x);
    f.cache.free_seq(3);
    let st = f.cache.stats();
    assert_eq!((st.pages_cached, st.pages_free), (4, 2));
    f.append(4, &toks(200, 16)).unwrap(); // two free pages, two evicted
    assert_eq!(cached(&mut f, &x), 8);
    assert_eq!(cached(&mut f, &y), 0);
}

#[test]
fn leaves_are_evicted_before_their_parents() {
    let mut f = Fixture::new(4, 3);
    let x = toks(0, 8);
    f.append(1, &x).unwrap();
    f.free(1);
    f.append(2, &toks(100, 8)).unwrap(); // one free page, one evicted
    assert_eq!(cached(&mut f, &x), 4);

    let (mut f, x, y) = two_cached_prefixes();
    assert_eq!(f.cache.evict(1), 1);
    f.check();
    assert_eq!(f.cache.evict(1), 1);
    f.check();
    assert_eq!(f.cache.stats().pages_free, 2);
    assert_eq!(cached(&mut f, &y), 8);
    assert_eq!(cached(&mut f, &x), 0);
    assert_eq!(f.cache.evict(10), 2);
}

#[test]
fn held_pages_are_never_evicted() {
    let mut f = Fixture::new(4, 4);
    let x = toks(0, 8);
    f.append(1, &x).unwrap();
    f.append(2, &toks(100, 8)).unwrap();
    f.free(2);
    f.append(3, &toks(200, 8)).unwrap();
    assert_eq!(f.cache.stats().pages_cached, 0);
    assert!(f.append(4, &toks(300, 1)).is_err());
    assert_eq!(f.cache.evict(usize::MAX), 0);
    f.check();
}

/// Recency counts from the last attach (insert, reuse or dedup), not from the release: a
/// prefix held until just now by a long-running sequence goes before one released long ago.
#[test]
fn a_prefix_released_later_outlives_one_released_earlier() {
    let mut f = Fixture::new(4, 4);
    let (x, y) = (toks(0, 8), toks(100, 8));
    f.append(1, &x).unwrap(); // held throughout
    f.append(2, &y).unwrap();
    f.free(2); // y released first
    f.free(1); // x released last: the most recently used
    f.append(3, &toks(200, 8)).unwrap();
    assert_eq!(cached(&mut f, &x), 8, "x, released last, was evicted");
    assert_eq!(cached(&mut f, &y), 0);
}
