//! A step's outputs: each job takes its tokens, logits or scores; finished jobs are reaped
//! (results for plain requests, events and anchors for searches); searches react.

use super::job::JobKind;
use super::{GenerateResult, Outcome, Req, RequestId, Scheduler};
use crate::strategy::TopToken;
use crate::tree::{NodeId, StopReason};
use arbor_kernels::kv::SeqId;
use std::collections::HashSet;

impl Scheduler {
    /// Hands job `i` its output of a step that fed `n` of its tokens.
    pub(super) fn absorb(&mut self, i: usize, n: usize, out: arbor_runtime::SeqOutput) {
        let owner = self.jobs[i].owner;
        let verifier = matches!(self.jobs[i].kind, JobKind::Judge { .. });
        if let Some(Req::Search(s)) = self.reqs.get_mut(&owner) {
            s.account(out.computed_tokens, verifier, self.ticks);
        }
        self.jobs[i].feed.drain(..n);
        if !self.jobs[i].feed.is_empty() {
            return; // more prompt to feed
        }
        let max_context = self.engine.model.cfg.max_context;
        let kind = self.jobs[i].kind.clone();
        match kind {
            JobKind::Prefill { node } => {
                self.jobs[i].done = Some(StopReason::Length);
                if let Some(Req::Search(s)) = self.reqs.get_mut(&owner) {
                    s.prefilling.remove(&node);
                    s.anchors.set(&mut self.engine, node, self.jobs[i].seq);
                    s.anchored(node);
                }
            }
            JobKind::Generate { node } => {
                let Some(sample) = out.sample else { return };
                let job = &mut self.jobs[i];
                let (news, stop) = job.take_token(
                    &self.tokenizer,
                    sample.token,
                    sample.logprob,
                    sample.entropy,
                    max_context,
                    self.ignore_eos,
                );
                let mut stop = stop;
                if let Some(news) = &news {
                    job.feed = vec![news.token];
                    if node.is_none() {
                        self.progress.token(owner, news, &sample.top_logprobs);
                    }
                }
                if let (Some(node), Some(Req::Search(s))) = (node, self.reqs.get_mut(&owner)) {
                    if let Some(news) = &news {
                        if !out.hidden.is_empty() {
                            s.tree.set_hidden(node, out.hidden);
                        }
                        s.tree
                            .push_token(node, news.token, &news.text, news.logprob, news.entropy);
                        if stop.is_none() && !s.strategy.on_token(&s.tree, node) {
                            stop = Some(StopReason::Cut);
                        }
                    }
                }
                if let Some(reason) = stop {
                    self.jobs[i].done = Some(reason);
                }
            }
            JobKind::TopK { node, k } => {
                self.jobs[i].done = Some(StopReason::Length);
                let seq = self.jobs[i].seq;
                let Some(Req::Search(s)) = self.reqs.get_mut(&owner) else {
                    return;
                };
                let tops = out.sample.map(|x| x.top_logprobs).unwrap_or_default();
                let options: Vec<TopToken> = tops
                    .iter()
                    .take(k)
                    .map(|&(token, logprob)| TopToken {
                        token,
                        logprob,
                        eos: !self.ignore_eos && self.tokenizer.is_eog(token),
                    })
                    .collect();
                // The job's sequence now holds the offer (see anchors.rs).
                s.anchors
                    .offer(&mut self.engine, node, seq, options.clone());
                self.jobs[i].seq = SeqId::MAX;
                s.events.push_back(crate::Event::TopK { node, options });
            }
            JobKind::Judge { node, verifier, .. } => {
                self.jobs[i].done = Some(StopReason::Length);
                if let Some(Req::Search(s)) = self.reqs.get_mut(&owner) {
                    let (ly, ln) = (out.scores[0] as f64, out.scores[1] as f64);
                    s.scored(node, verifier, crate::verifier::Judge::probability(ly, ln));
                }
            }
        }
    }

    /// Removes finished jobs: results for plain requests, events and anchors for searches.
    pub(super) fn reap(&mut self) {
        let mut i = 0;
        while i < self.jobs.len() {
            let Some(reason) = self.jobs[i].done else {
                i += 1;
                continue;
            };
            let job = self.jobs.remove(i);
            match (&job.kind, self.reqs.get_mut(&job.owner)) {
                (JobKind::Generate { node: None }, Some(Req::Generate { prompt_tokens })) => {
                    let mut job = job;
                    let tail = job.decoder.finish();
                    job.text.push_str(&tail);
                    let r = GenerateResult {
                        tokens: job.generated,
                        text: job.text,
                        stop: reason,
                        prompt_tokens: *prompt_tokens,
                    };
                    self.engine.free_seq(job.seq);
                    self.reqs.remove(&job.owner);
                    self.done.push((job.owner, Outcome::Generate(Ok(r))));
                }
                (JobKind::Generate { node: Some(node) }, Some(Req::Search(s))) => {
                    let node = *node;
                    s.child_stopped(&mut self.engine, node, job.seq, reason);
                }
                (JobKind::Prefill { .. }, Some(Req::Group(_))) => {
                    self.start_group(job.owner, job.seq)
                }
                (JobKind::Prefill { .. }, _) => {} // the sequence became an anchor
                _ => {
                    if job.seq != SeqId::MAX {
                        self.engine.free_seq(job.seq);
                    }
                }
            }
        }
    }

    /// Lets every search react to its events, turning actions into jobs; ends finished ones.
    pub(super) fn react(&mut self) {
        let ids: Vec<RequestId> = self.reqs.keys().copied().collect();
        for id in ids {
            let Some(Req::Search(s)) = self.reqs.get_mut(&id) else {
                continue;
            };
            let mut new_jobs = Vec::new();
            let r = s.react(&mut self.engine, &self.tokenizer, id, &mut new_jobs);
            self.progress.search(id, s);
            let killed: HashSet<NodeId> = s.killed.drain(..).collect();
            self.jobs.extend(new_jobs);
            for j in &mut self.jobs {
                if let (true, JobKind::Generate { node: Some(n) }) = (j.owner == id, &j.kind) {
                    if killed.contains(n) {
                        j.done = Some(StopReason::Cut);
                    }
                }
            }
            if let Err(e) = r.and_then(|_| self.send_to_lanes(id)) {
                self.fail(id, e);
                continue;
            }
            let Some(Req::Search(s)) = self.reqs.get_mut(&id) else {
                continue;
            };
            if let Some(over) = s.budget_exceeded() {
                s.finish_best(over);
            }
            if s.outcome.is_some() {
                let Some(Req::Search(mut s)) = self.reqs.remove(&id) else {
                    unreachable!()
                };
                for j in self.jobs.iter().filter(|j| j.owner == id) {
                    self.engine.free_seq(j.seq);
                }
                self.jobs.retain(|j| j.owner != id);
                let result = s.result(&mut self.engine);
                self.done.push((id, Outcome::Search(Ok(Box::new(result)))));
            }
        }
    }
}
