//! One random operation, applied to the cache and the model and checked.

use crate::common::write_range;
use crate::model::{fail, Driver};
use crate::ops::Op;
use arbor_kernels::kv::SeqId;
use arbor_kernels::KernelError;
use proptest::prelude::*;
use proptest::sample::Index;

impl Driver {
    /// Recomputes the tokens of a preempted `seq` (its first step after preemption); false if
    /// that failed with `KvFull` and it is still pending.
    fn resume(&mut self, seq: SeqId) -> Result<bool, TestCaseError> {
        let Some(p) = self.pending.get(&seq).cloned() else {
            return Ok(true);
        };
        if !self.step(seq, &p, p.len() - 1)? {
            return Ok(false);
        }
        self.pending.remove(&seq);
        self.cov.preempt_resumes += 1;
        Ok(true)
    }

    /// A live sequence ready for a step (recomputed if it was preempted), creating one if
    /// there is none; `None` if recomputing failed.
    fn pick_ready(&mut self, i: &Index) -> Result<Option<SeqId>, TestCaseError> {
        let id = self.pick_or_new(i);
        Ok(self.resume(id)?.then_some(id))
    }

    fn new_tokens(&self, seq: SeqId, n: usize, toks: &[u32], copy: &Option<Index>) -> Vec<u32> {
        let cur = &self.seqs[&seq];
        if let Some(c) = copy {
            let sources: Vec<&Vec<u32>> = self.seqs.values().chain(&self.history).collect();
            let src = sources[c.index(sources.len())];
            if src.len() > cur.len() && src.starts_with(cur) {
                return src[cur.len()..src.len().min(cur.len() + n)].to_vec();
            }
        }
        toks[..n].to_vec()
    }

    pub fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::New => {
                self.new_seq();
            }
            Op::Append {
                seq,
                n,
                toks,
                max,
                copy,
            } => {
                let Some(id) = self.pick_ready(seq)? else {
                    return Ok(());
                };
                let new = self.new_tokens(id, *n, toks, copy);
                let max = max
                    .as_ref()
                    .map_or(new.len() - 1, |m| m.index(new.len() + 1));
                self.step(id, &new, max)?;
            }
            Op::Rollback {
                seq,
                n,
                toks,
                writes,
            } => {
                let Some(id) = self.pick_ready(seq)? else {
                    return Ok(());
                };
                let old = self.seqs[&id].clone();
                let new = &toks[..*n];
                let used = self.reuse(id, &old, new, n - 1)?;
                if self.reserve(id, n - used)? {
                    let mut all = old.clone();
                    all.extend_from_slice(new);
                    let from = old.len() + used;
                    write_range(
                        &mut self.cache,
                        id,
                        &all,
                        from,
                        from + writes.index(n - used + 1),
                    );
                }
                self.cache.truncate(id, old.len());
            }
            Op::Batch { steps, same } => {
                let mut batch: Vec<(SeqId, Vec<u32>, &[u32], usize)> = Vec::new();
                for (seq, n, toks) in steps {
                    let Some(id) = self.pick_ready(seq)? else {
                        continue;
                    };
                    if batch.iter().all(|b| b.0 != id) {
                        let new = if *same {
                            &steps[0].2[..steps[0].1]
                        } else {
                            &toks[..*n]
                        };
                        batch.push((id, self.seqs[&id].clone(), new, 0));
                    }
                }
                for (id, old, new, used) in &mut batch {
                    *used = self.reuse(*id, old, new, new.len() - 1)?;
                }
                for &(id, _, new, used) in &batch {
                    if !self.reserve(id, new.len() - used)? {
                        for (id, old, ..) in &batch {
                            self.cache.truncate(*id, old.len());
                        }
                        return Ok(());
                    }
                }
                let mut alls = Vec::new();
                for (id, old, new, used) in &batch {
                    let all: Vec<u32> = old.iter().chain(*new).copied().collect();
                    write_range(&mut self.cache, *id, &all, old.len() + used, all.len());
                    alls.push(all);
                }
                for ((id, _, new, used), all) in batch.into_iter().zip(alls) {
                    self.cache.commit(id, &new[used..]);
                    self.committed(id, all);
                }
            }
            Op::ForkMidStep {
                seq,
                n,
                toks,
                written,
            } => {
                let Some(id) = self.pick_ready(seq)? else {
                    return Ok(());
                };
                let old = self.seqs[&id].clone();
                let new = &toks[..*n];
                let used = self.reuse(id, &old, new, n - 1)?;
                if !self.reserve(id, n - used)? {
                    self.cache.truncate(id, old.len());
                    return Ok(());
                }
                let mut all = old.clone();
                all.extend_from_slice(new);
                let from = old.len() + used;
                if *written {
                    write_range(&mut self.cache, id, &all, from, all.len());
                }
                let child = self.next_id;
                self.next_id += 1;
                self.cache
                    .fork(id, child)
                    .map_err(|e| fail(e.to_string()))?;
                self.seqs.insert(child, all[..from].to_vec());
                self.cov.forks += 1;
                if !*written {
                    write_range(&mut self.cache, id, &all, from, all.len());
                }
                self.cache.commit(id, &new[used..]);
                self.committed(id, all);
            }
            Op::Abandon {
                seq,
                abandoned,
                writes,
                n,
                toks,
            } => {
                let Some(id) = self.pick_ready(seq)? else {
                    return Ok(());
                };
                if self.reserve(id, *abandoned)? {
                    // Wrong K/V: the reversed tokens.
                    let mut all = self.seqs[&id].clone();
                    let from = all.len();
                    all.extend(toks[..*abandoned].iter().rev());
                    write_range(
                        &mut self.cache,
                        id,
                        &all,
                        from,
                        from + writes.index(abandoned + 1),
                    );
                }
                self.step(id, &toks[..*n], n - 1)?;
                let len = self.seqs[&id].len();
                ensure!(
                    self.cache.table(id).unwrap().pages.len() >= len.div_ceil(self.ps),
                    "too few pages"
                );
                self.cache.truncate(id, len);
            }
            Op::Fork { seq } => {
                let Some(parent) = self.pick(seq) else {
                    return Ok(());
                };
                let child = self.next_id;
                self.next_id += 1;
                self.cache
                    .fork(parent, child)
                    .map_err(|e| fail(e.to_string()))?;
                self.seqs.insert(child, self.seqs[&parent].clone());
                if let Some(p) = self.pending.get(&parent).cloned() {
                    self.pending.insert(child, p);
                }
                self.cov.forks += 1;
                // Forking again into the now existing child, or from an unknown id, fails
                // and changes nothing.
                let before = self.snap();
                ensure!(
                    self.cache.fork(parent, child).is_err(),
                    "fork into a live sequence"
                );
                ensure!(
                    self.cache.fork(u64::MAX, self.next_id).is_err(),
                    "fork of an unknown sequence"
                );
                ensure!(
                    self.snap() == before && !self.cache.contains(self.next_id),
                    "failed fork changed the cache"
                );
            }
            Op::Free { seq } => {
                let Some(id) = self.pick(seq) else {
                    return Ok(());
                };
                self.cache.free_seq(id);
                ensure!(
                    !self.cache.contains(id),
                    "freed sequence {id} is still live"
                );
                let toks = self.seqs.remove(&id).unwrap();
                self.pending.remove(&id);
                self.history.push(toks);
            }
            Op::Truncate { seq, to } => {
                let Some(id) = self.pick(seq) else {
                    return Ok(());
                };
                let toks = self.seqs.get_mut(&id).unwrap();
                let len = to.index(toks.len() + 1);
                self.history.push(toks.clone());
                toks.truncate(len);
                self.cache.truncate(id, len);
            }
            Op::Resize { pages } => {
                let before = self.cache.stats();
                let got = self.cache.resize(*pages);
                let st = self.cache.stats();
                // Growing is exact; shrinking compacts, so it stops only at the pages held.
                let want = (*pages).max(before.pages_in_use + before.pages_cached);
                ensure!(
                    got == want,
                    "resize({pages}) of {before:?} gave {got}, not {want}"
                );
                ensure!(
                    st.pages_total == got
                        && st.pages_in_use == before.pages_in_use
                        && st.pages_cached == before.pages_cached,
                    "resize({pages}): {before:?} -> {st:?}"
                );
            }
            Op::Evict { k } => {
                let before = self.cache.stats();
                let got = self.cache.evict(*k);
                let st = self.cache.stats();
                ensure!(
                    got == (*k).min(before.pages_cached),
                    "evict({k}) gave {got} of {} cached",
                    before.pages_cached
                );
                ensure!(
                    st.pages_cached + got == before.pages_cached
                        && st.pages_free == before.pages_free + got
                        && st.pages_in_use == before.pages_in_use,
                    "evict({k}): {before:?} -> {st:?}"
                );
                self.cov.evicted += got;
            }
            Op::Preempt { seq } => {
                let Some(id) = self.pick(seq) else {
                    return Ok(());
                };
                let toks = std::mem::take(self.seqs.get_mut(&id).unwrap());
                if toks.is_empty() {
                    return Ok(());
                }
                self.cache.free_seq(id);
                self.cache.add_seq(id);
                ensure!(
                    self.cache.len(id) == 0,
                    "re-added sequence {id} is not empty"
                );
                // Live sequences with pending tokens are empty: nothing is lost.
                ensure!(!self.pending.contains_key(&id), "preempted twice");
                self.pending.insert(id, toks);
            }
            Op::Full { seq, unknown } => {
                let id = if *unknown {
                    u64::MAX - 1
                } else {
                    self.pick_or_new(seq)
                };
                let n = (self.cache.available_pages() + 2) * self.ps;
                let before = self.snap();
                let r = self.cache.reserve(id, n);
                ensure!(
                    matches!(r, Err(KernelError::KvFull { .. })),
                    "reserve of {n} positions: {r:?}"
                );
                ensure!(self.snap() == before, "failed reserve changed the cache");
                ensure!(
                    !*unknown || !self.cache.contains(id),
                    "failed reserve added a sequence"
                );
            }
        }
        Ok(())
    }
}
