//! The naive model beside the cache: each live sequence is its token list. The driver's
//! helpers run one part of a step (reuse, reserve, the whole step) on the cache and check it
//! against the model; `apply` (in `apply.rs`) runs one operation.

use crate::common::{check_all, snapshot, write_range, Snapshot};
use crate::ops::Config;
use arbor_kernels::kv::{KvCache, SeqId};
use arbor_kernels::KernelError;
use proptest::prelude::*;
use proptest::sample::Index;
use std::collections::{BTreeMap, HashMap};

/// How often the interesting paths were taken (to show the random tests are not vacuous).
#[derive(Clone, Copy, Debug, Default)]
pub struct Coverage {
    pub steps: usize,
    pub reused_pages: usize,
    pub kv_full: usize,
    /// Pages evicted so far; also the driver's eviction clock (see `Driver::known`).
    pub evicted: usize,
    pub copies: usize,
    pub forks: usize,
    pub preempt_resumes: usize,
}

/// The cache under test and the naive model beside it.
pub struct Driver {
    pub cache: KvCache,
    pub ps: usize,
    /// Live sequences and their committed tokens (a preempted one is live and empty).
    pub seqs: BTreeMap<SeqId, Vec<u32>>,
    /// Tokens of preempted sequences, recomputed by their next append.
    pub pending: BTreeMap<SeqId, Vec<u32>>,
    /// Token lists of freed or truncated sequences, for new ones to copy.
    pub history: Vec<Vec<u32>>,
    /// Every page-aligned token prefix ever committed (the most reuse can find), with the
    /// number of evictions seen when it was last known to be indexed: while no eviction has
    /// happened since, reuse must find it.
    pub known: HashMap<Vec<u32>, usize>,
    pub next_id: SeqId,
    pub cov: Coverage,
}

pub fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

impl Driver {
    pub fn new(c: Config) -> Self {
        Driver {
            cache: KvCache::new(c.layout(), c.pages),
            ps: c.page_size,
            seqs: BTreeMap::new(),
            pending: BTreeMap::new(),
            history: Vec::new(),
            known: HashMap::new(),
            next_id: 1,
            cov: Coverage::default(),
        }
    }

    pub fn check(&self) -> Result<(), TestCaseError> {
        check_all(&self.cache, &self.seqs).map_err(fail)
    }

    pub fn snap(&self) -> Snapshot {
        snapshot(&self.cache, self.seqs.keys().copied())
    }

    pub fn pick(&self, i: &Index) -> Option<SeqId> {
        (!self.seqs.is_empty()).then(|| *self.seqs.keys().nth(i.index(self.seqs.len())).unwrap())
    }

    pub fn new_seq(&mut self) -> SeqId {
        let id = self.next_id;
        self.next_id += 1;
        self.cache.add_seq(id);
        self.seqs.insert(id, Vec::new());
        id
    }

    /// Picks a live sequence, creating one if there is none.
    pub fn pick_or_new(&mut self, i: &Index) -> SeqId {
        self.pick(i).unwrap_or_else(|| self.new_seq())
    }

    /// Reuse for `seq` (committed tokens `old`) of at most `max` of `new`, with its checks.
    pub fn reuse(
        &mut self,
        seq: SeqId,
        old: &[u32],
        new: &[u32],
        max: usize,
    ) -> Result<usize, TestCaseError> {
        let ps = self.ps;
        let used = self.cache.reuse_prefix(seq, new, max);
        let cap = max.min(new.len());
        ensure!(
            used <= cap && used.is_multiple_of(ps),
            "reuse_prefix gave {used} (max {max}, page size {ps})"
        );
        ensure!(
            used == 0 || old.len().is_multiple_of(ps),
            "reuse_prefix gave {used} mid-page"
        );
        let mut want = old.to_vec();
        want.extend_from_slice(&new[..used]);
        ensure!(
            self.cache.tokens(seq) == Some(&want[..]),
            "tokens after reuse_prefix"
        );
        if old.len().is_multiple_of(ps) {
            // At least what a live sequence holds (its full pages are indexed and cannot be
            // evicted) and what was indexed after the last eviction; at most what was ever
            // committed.
            let mut target = old.to_vec();
            target.extend_from_slice(&new[..cap]);
            let (mut lb, mut ub) = (0, 0);
            while ub + ps <= cap {
                match self.known.get(&target[..old.len() + ub + ps]) {
                    Some(&at) if at == self.cov.evicted && lb == ub => lb += ps,
                    Some(_) => {}
                    None => break,
                }
                ub += ps;
            }
            ensure!(
                used >= lb,
                "reuse_prefix gave {used}, {lb} are indexed for sure"
            );
            ensure!(
                used <= ub,
                "reuse_prefix gave {used}, only {ub} were ever committed"
            );
            for (&other, toks) in &self.seqs {
                let common = toks.iter().zip(&target).take_while(|(a, b)| a == b).count();
                if other != seq && common >= old.len() {
                    let lb = common / ps * ps - old.len();
                    ensure!(
                        used >= lb,
                        "reuse_prefix gave {used}, sequence {other} holds {lb}"
                    );
                }
            }
            for end in (old.len() + ps..=old.len() + used).step_by(ps) {
                self.known.insert(target[..end].to_vec(), self.cov.evicted);
            }
        }
        self.cov.reused_pages += used / ps;
        Ok(used)
    }

    /// Reserve of `n` more positions, checked against `pages_needed` and `available_pages`;
    /// on failure checks nothing changed.
    pub fn reserve(&mut self, seq: SeqId, n: usize) -> Result<bool, TestCaseError> {
        let needed = self.cache.pages_needed(seq, n);
        let avail = self.cache.available_pages();
        let before = self.snap();
        let grow =
            (self.cache.len(seq) + n).div_ceil(self.ps) - self.cache.len(seq).div_ceil(self.ps);
        match self.cache.reserve(seq, n) {
            Ok(()) => {
                ensure!(
                    needed <= avail,
                    "reserve of {needed} pages succeeded with {avail} available"
                );
                let st = self.cache.stats();
                let got = before.available - self.cache.available_pages();
                ensure!(got <= needed, "reserve took {got} pages, needed {needed}");
                ensure!(
                    st.pages_in_use >= before.stats.pages_in_use,
                    "reserve lowered pages in use"
                );
                // Each page allocated when the free list was empty evicted one (a copied
                // page is still held or stays cached, never freed).
                self.cov.evicted += st.pages_free + needed - before.stats.pages_free;
                // A copy-on-write of the partial last page is the one page beyond the growth.
                self.cov.copies += needed.saturating_sub(grow);
                Ok(true)
            }
            Err(KernelError::KvFull {
                needed: nd, total, ..
            }) => {
                ensure!(
                    needed > avail,
                    "KvFull with {needed} needed of {avail} available"
                );
                ensure!(
                    nd == needed && total == before.stats.pages_total,
                    "KvFull fields"
                );
                ensure!(self.snap() == before, "failed reserve changed the cache");
                self.cov.kv_full += 1;
                Ok(false)
            }
            Err(e) => Err(fail(format!("reserve: {e}"))),
        }
    }

    /// A full step appending `new` to `seq`; false (and nothing changed) on `KvFull`.
    pub fn step(&mut self, seq: SeqId, new: &[u32], max: usize) -> Result<bool, TestCaseError> {
        let old = self.seqs[&seq].clone();
        let before = self.snap();
        let reserved = self.cache.table(seq).unwrap().pages.len() > old.len().div_ceil(self.ps);
        let used = self.reuse(seq, &old, new, max)?;
        if !self.reserve(seq, new.len() - used)? {
            self.cache.truncate(seq, old.len());
            ensure!(
                reserved || self.snap() == before,
                "step rolled back after KvFull changed the cache"
            );
            return Ok(false);
        }
        let mut all = old;
        all.extend_from_slice(new);
        write_range(
            &mut self.cache,
            seq,
            &all,
            all.len() - new.len() + used,
            all.len(),
        );
        self.cache.commit(seq, &new[used..]);
        self.committed(seq, all);
        Ok(true)
    }

    pub fn committed(&mut self, seq: SeqId, all: Vec<u32>) {
        for end in (self.ps..=all.len()).step_by(self.ps) {
            self.known.insert(all[..end].to_vec(), self.cov.evicted);
        }
        self.seqs.insert(seq, all);
        self.cov.steps += 1;
    }

    /// Frees every sequence: nothing may stay in use, and evicting everything empties the
    /// pool.
    pub fn finish(&mut self) -> Result<(), TestCaseError> {
        for id in std::mem::take(&mut self.seqs).into_keys() {
            self.cache.free_seq(id);
        }
        self.check()?;
        let st = self.cache.stats();
        ensure!(
            st.pages_in_use == 0 && st.tokens_held == 0 && st.seqs == 0,
            "all freed: {st:?}"
        );
        let got = self.cache.evict(usize::MAX);
        ensure!(
            got == st.pages_cached,
            "evict(MAX) gave {got} of {} cached",
            st.pages_cached
        );
        let st = self.cache.stats();
        ensure!(
            st.pages_free == st.pages_total && st.pages_cached == 0,
            "all evicted: {st:?}"
        );
        self.cache.check().map_err(fail)
    }
}
