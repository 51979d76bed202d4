//! Packing a step: which jobs run, how many tokens each feeds, who is preempted when pages
//! run short, and what each sequence asks of the engine.

use super::job::JobKind;
use super::{Req, Scheduler};
use arbor_kernels::kv::SeqId;
use arbor_kernels::ops::SamplingParams;
use arbor_runtime::{LogitsMode, SeqStep};
use std::collections::HashSet;

impl Scheduler {
    /// Chooses jobs for this step: `(job index, tokens to feed)`.
    pub(super) fn pack(&mut self) -> Vec<(usize, usize)> {
        let mut picked = Vec::new();
        let mut tokens = 0;
        let mut pages = 0;
        let mut in_batch: HashSet<SeqId> = HashSet::new();
        for i in 0..self.jobs.len() {
            if picked.len() >= self.opts.max_seqs || tokens >= self.opts.max_batch_tokens {
                break;
            }
            let j = &self.jobs[i];
            if j.done.is_some() || j.feed.is_empty() {
                continue;
            }
            let n = j.feed.len().min(self.opts.max_batch_tokens - tokens);
            let need = self.engine.pages_needed(j.seq, n);
            in_batch.insert(j.seq);
            while pages + need > self.engine.cache().available_pages() {
                if !self.preempt_one(&in_batch) {
                    break;
                }
            }
            if pages + need > self.engine.cache().available_pages() {
                in_batch.remove(&self.jobs[i].seq);
                continue;
            }
            pages += need;
            tokens += n;
            picked.push((i, n));
        }
        picked
    }

    /// Drops the pages of the idle or waiting sequence (not in `keep`) whose dropping frees
    /// the most; false when none frees anything.
    pub(super) fn preempt_one(&mut self, keep: &HashSet<SeqId>) -> bool {
        let mut cands: Vec<SeqId> = self
            .jobs
            .iter()
            .map(|j| j.seq)
            .filter(|s| !keep.contains(s))
            .collect();
        for r in self.reqs.values() {
            if let Req::Search(s) = r {
                cands.extend(s.anchors.seqs());
            }
        }
        let best = cands
            .into_iter()
            .map(|s| (self.engine.kv_usage(&[s]).freeable_pages, s))
            .max();
        match best {
            Some((freed, s)) if freed > 0 => {
                self.preemptions += 1;
                self.engine.preempt(s).is_ok()
            }
            _ => false,
        }
    }

    pub(super) fn step_for(&self, i: usize, n: &usize) -> SeqStep {
        let j = &self.jobs[i];
        let last = *n == j.feed.len();
        let mut s = SeqStep {
            seq: j.seq,
            tokens: j.feed[..*n].to_vec(),
            sparse_budget: self.sparse_budget_of(j.owner),
            ..Default::default()
        };
        if !last {
            return s; // a prompt chunk
        }
        match &j.kind {
            JobKind::Prefill { .. } => {}
            JobKind::Generate { node } => {
                s.sample = Some(j.sampling.clone());
                s.hidden = node.is_some()
                    && matches!(self.reqs.get(&j.owner), Some(Req::Search(r)) if r.strategy.wants_hidden());
            }
            JobKind::TopK { k, .. } => {
                s.sample = Some(SamplingParams {
                    top_logprobs: *k,
                    ..Default::default()
                })
            }
            JobKind::Judge { yes, no, .. } => {
                s.logits = LogitsMode::None;
                s.score = vec![(*n - 1, *yes), (*n - 1, *no)];
            }
        }
        s
    }
}
