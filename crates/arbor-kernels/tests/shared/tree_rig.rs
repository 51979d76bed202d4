//! Random trees of sequences grown in a real `KvCache` (fork / reserve / write / commit, so
//! shared prefixes end mid-page and are copied on write as in the engine), shared by the CPU
//! and GPU cascade tests (included with `#[path]`; needs `crate::common::Rng`).
#![allow(dead_code)]

use crate::common::Rng;
use arbor_kernels::kv::{KvCache, KvDtype, KvLayout, SeqId};
use arbor_kernels::ops::cascade::{CascadePlan, PlanOptions, PlanSeq};
use std::ops::Range;

/// A KV cache being grown into trees, with random K/V and tokens.
pub struct Rig {
    pub cache: KvCache,
    pub rng: Rng,
    next: SeqId,
    width: usize,
    /// K/V values rounded to bf16 (what a GPU pool holds), so a device copy is exact.
    bf16: bool,
}

impl Rig {
    pub fn new(layout: KvLayout, num_pages: usize, seed: u64) -> Self {
        Self::with_dtype(layout, num_pages, seed, KvDtype::F32)
    }

    /// A rig whose pool stores K and V as `dtype`.
    pub fn with_dtype(layout: KvLayout, num_pages: usize, seed: u64, dtype: KvDtype) -> Self {
        Rig {
            width: layout.num_kv_heads * layout.head_dim,
            cache: KvCache::with_dtype(layout, num_pages, 0, dtype),
            rng: Rng::new(seed),
            next: 1,
            bf16: false,
        }
    }

    /// [`Rig::new`] whose K/V values are rounded to bf16.
    pub fn bf16(layout: KvLayout, num_pages: usize, seed: u64) -> Self {
        Rig {
            bf16: true,
            ..Self::new(layout, num_pages, seed)
        }
    }

    fn values(&mut self) -> Vec<f32> {
        let mut v = self.rng.normals(self.width, 1.0);
        if self.bf16 {
            v.iter_mut()
                .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
        }
        v
    }

    pub fn new_seq(&mut self) -> SeqId {
        self.next += 1;
        self.cache.add_seq(self.next);
        self.next
    }

    pub fn fork(&mut self, parent: SeqId) -> SeqId {
        self.next += 1;
        self.cache.fork(parent, self.next).expect("fork");
        self.next
    }

    /// Reserves and writes `n` positions of `seq` in every layer; returns them (uncommitted).
    pub fn write(&mut self, seq: SeqId, n: usize) -> Range<usize> {
        let pos0 = self.cache.len(seq);
        self.cache.reserve(seq, n).expect("pages");
        for pos in pos0..pos0 + n {
            for layer in 0..self.cache.layout().num_layers {
                let k = self.values();
                let v = self.values();
                self.cache.write(layer, seq, pos, &k, &v);
            }
        }
        pos0..pos0 + n
    }

    /// Appends `tokens` to `seq` (written and committed).
    pub fn append(&mut self, seq: SeqId, tokens: &[u32]) {
        self.write(seq, tokens.len());
        self.cache.commit(seq, tokens);
    }

    pub fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.rng.below(50_000) as u32).collect()
    }
}

/// One step's batch: sequences and the positions of their query rows.
#[derive(Default)]
pub struct Batch {
    pub seqs: Vec<(SeqId, Range<usize>)>,
    pub positions: Vec<usize>,
}

impl Batch {
    /// Writes `n` new positions of `seq` (reserve + write, as the engine's step does) and adds
    /// them as query rows.
    pub fn add(&mut self, rig: &mut Rig, seq: SeqId, n: usize) {
        let start = self.positions.len();
        self.positions.extend(rig.write(seq, n));
        self.seqs.push((seq, start..start + n));
    }

    pub fn plan(&self, cache: &KvCache, budget: Option<usize>, opts: &PlanOptions) -> CascadePlan {
        let seqs: Vec<PlanSeq> = self
            .seqs
            .iter()
            .map(|(s, rows)| PlanSeq {
                pages: &cache.table(*s).expect("live").pages,
                rows: rows.clone(),
                sparse_budget: budget,
            })
            .collect();
        CascadePlan::build(&seqs, &self.positions, cache.layout().page_size, opts).expect("plan")
    }
}

/// A random tree under a fresh root: `depth` levels of forks (1..=`width` children each,
/// uneven, the frontier capped at `width`), each child appending 0..`grow` tokens. Siblings
/// sometimes append identical tokens, so the prefix index deduplicates their full pages and
/// they share again below a fork. Returns every sequence of the tree, root first, and how
/// many of the last ones are leaves.
pub fn tree(
    rig: &mut Rig,
    root_len: usize,
    depth: usize,
    width: usize,
    grow: usize,
) -> (Vec<SeqId>, usize) {
    let root = rig.new_seq();
    let toks = rig.tokens(root_len);
    rig.append(root, &toks);
    let mut all = vec![root];
    let mut frontier = vec![root];
    for _ in 0..depth {
        let mut next = Vec::new();
        for &parent in &frontier {
            let room = width.saturating_sub(next.len()).max(1);
            let kids = 1 + rig.rng.below(width.min(room));
            let mut prev: Option<Vec<u32>> = None;
            for _ in 0..kids {
                let c = rig.fork(parent);
                let toks = match (&prev, rig.rng.below(4)) {
                    (Some(t), 0) => t.clone(),
                    _ => {
                        let n = rig.rng.below(grow + 1);
                        rig.tokens(n)
                    }
                };
                rig.append(c, &toks);
                prev = Some(toks);
                next.push(c);
            }
            if next.len() >= width {
                break;
            }
        }
        all.extend(&next);
        frontier = next;
    }
    (all, frontier.len())
}
