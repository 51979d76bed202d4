//! What the random tests draw: a tiny cache shape, and operations on the cache whose
//! sequences are picked by index among the live ones.

use arbor_kernels::kv::KvLayout;
use proptest::prelude::*;
use proptest::sample::Index;

/// Tokens are drawn from `0..ALPHABET` so that page-sized chunks repeat.
pub const ALPHABET: u32 = 3;
/// Tokens drawn per operation (the most any step appends).
pub const MAX_NEW: usize = 20;

/// Shape and pool size of one test case.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub page_size: usize,
    pub pages: usize,
}

impl Config {
    pub fn layout(&self) -> KvLayout {
        crate::common::layout(self.layers, self.heads, self.head_dim, self.page_size)
    }
}

pub fn config() -> impl Strategy<Value = Config> {
    (
        1..=2usize,
        1..=2usize,
        prop::sample::select(vec![1usize, 2, 4]),
        prop::sample::select(vec![1usize, 2, 3, 4, 4, 8, 8]),
        1..=40usize,
    )
        .prop_map(|(layers, heads, head_dim, page_size, pages)| Config {
            layers,
            heads,
            head_dim,
            page_size,
            pages,
        })
}

#[derive(Clone, Debug)]
pub enum Op {
    /// A new empty sequence.
    New,
    /// A full step appending `toks[..n]` (or a continuation of another sequence's tokens
    /// when `copy` picks one that extends this one), reusing at most `max` (n − 1 if `None`).
    Append {
        seq: Index,
        n: usize,
        toks: Vec<u32>,
        max: Option<Index>,
        copy: Option<Index>,
    },
    /// A step rolled back by `truncate` after its reserve succeeded and `writes` positions
    /// were written.
    Rollback {
        seq: Index,
        n: usize,
        toks: Vec<u32>,
        writes: Index,
    },
    /// A step during which the sequence is forked after reserve (and `written` or not), then
    /// committed.
    ForkMidStep {
        seq: Index,
        n: usize,
        toks: Vec<u32>,
        written: bool,
    },
    /// A step abandoned after its reserve (`abandoned` positions, some written with wrong
    /// K/V) and not rolled back: the next full step appending `toks[..n]` must drop or use the
    /// reservation; what is left of it is dropped by `truncate` to the length.
    Abandon {
        seq: Index,
        abandoned: usize,
        writes: Index,
        n: usize,
        toks: Vec<u32>,
    },
    /// One engine-style step of several sequences at once: every reuse, then every reserve
    /// (a `KvFull` rolls them all back by `truncate`), then every write, then every commit.
    /// Each appends its own `toks[..n]`, or all the first one's when `same`.
    Batch {
        steps: Vec<(Index, usize, Vec<u32>)>,
        same: bool,
    },
    Fork {
        seq: Index,
    },
    Free {
        seq: Index,
    },
    Truncate {
        seq: Index,
        to: Index,
    },
    Evict {
        k: usize,
    },
    /// `resize` towards `pages` (grows, or shrinks over the free pages at the top).
    Resize {
        pages: usize,
    },
    /// `free_seq` then `add_seq` of the same id; its next step first recomputes its tokens.
    Preempt {
        seq: Index,
    },
    /// A reserve too large for the pool (on a live or an unknown sequence): `KvFull`, nothing
    /// changed.
    Full {
        seq: Index,
        unknown: bool,
    },
}

pub fn op() -> impl Strategy<Value = Op> {
    let toks = || prop::collection::vec(0..ALPHABET, MAX_NEW);
    let n = || 1..=MAX_NEW;
    prop_oneof![
        3 => Just(Op::New),
        12 => (any::<Index>(), n(), toks(), prop::option::of(any::<Index>()), prop::option::weighted(0.4, any::<Index>()))
            .prop_map(|(seq, n, toks, max, copy)| Op::Append { seq, n, toks, max, copy }),
        2 => (any::<Index>(), n(), toks(), any::<Index>())
            .prop_map(|(seq, n, toks, writes)| Op::Rollback { seq, n, toks, writes }),
        1 => (any::<Index>(), n(), toks(), any::<bool>())
            .prop_map(|(seq, n, toks, written)| Op::ForkMidStep { seq, n, toks, written }),
        1 => (any::<Index>(), n(), any::<Index>(), n(), toks())
            .prop_map(|(seq, abandoned, writes, n, toks)| Op::Abandon { seq, abandoned, writes, n, toks }),
        3 => (prop::collection::vec((any::<Index>(), n(), toks()), 2..=4), any::<bool>())
            .prop_map(|(steps, same)| Op::Batch { steps, same }),
        3 => any::<Index>().prop_map(|seq| Op::Fork { seq }),
        5 => any::<Index>().prop_map(|seq| Op::Free { seq }),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(seq, to)| Op::Truncate { seq, to }),
        1 => prop::sample::select(vec![0usize, 1, 2, 3, usize::MAX]).prop_map(|k| Op::Evict { k }),
        2 => any::<Index>().prop_map(|seq| Op::Preempt { seq }),
        2 => (0..=48usize).prop_map(|pages| Op::Resize { pages }),
        1 => (any::<Index>(), any::<bool>()).prop_map(|(seq, unknown)| Op::Full { seq, unknown }),
    ]
}
