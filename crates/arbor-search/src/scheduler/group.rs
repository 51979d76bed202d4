//! Grouped plain requests: `n` samples of one prompt (OpenAI's `n`) that share the prompt's
//! KV pages. The prompt minus its last token is computed once by a prefill job owned by the
//! group; then each member forks that sequence (sharing every page) and feeds the last token
//! with its own seed, exactly as a search's children fork their node's anchor. Each member is
//! an ordinary plain request: its own id, progress, outcome and cancellation.

use super::job::{Job, JobKind};
use super::{GenerateRequest, Outcome, Req, RequestId, Scheduler};
use arbor_kernels::kv::SeqId;
use arbor_kernels::ops::SamplingParams;

impl Scheduler {
    /// Queues `n` samples of `r.prompt` sharing its KV pages; member `i` samples with seed
    /// `r.sampling.seed + i`. Returns the members' ids in order. With `n` ≤ 1 or a one-token
    /// prompt (nothing to share) the members are independent plain requests.
    pub fn submit_generate_n(&mut self, r: GenerateRequest, n: usize) -> Vec<RequestId> {
        let seeded = |i: usize| SamplingParams {
            seed: r.sampling.seed.wrapping_add(i as u64),
            ..r.sampling.clone()
        };
        if n <= 1 || r.prompt.len() < 2 {
            return (0..n.max(1))
                .map(|i| {
                    self.submit_generate(GenerateRequest {
                        sampling: seeded(i),
                        ..r.clone()
                    })
                })
                .collect();
        }
        let ids: Vec<RequestId> = (0..n).map(|_| self.fresh_id()).collect();
        if let Err(e) = self.check_prompt(&r.prompt) {
            for &id in &ids {
                self.done.push((id, Outcome::Generate(Err(e.clone()))));
            }
            return ids;
        }
        let last = r.prompt[r.prompt.len() - 1];
        let mut members = Vec::with_capacity(n);
        for (i, &id) in ids.iter().enumerate() {
            // The sequence is set when the member forks the group's prefill.
            let mut job = Job::new(id, SeqId::MAX, JobKind::Generate { node: None }, vec![last]);
            job.sampling = seeded(i);
            job.until = crate::Until {
                max_tokens: r.max_tokens,
                stop: r.stop.clone(),
                delimiters: vec![],
            };
            job.context = r.prompt.len();
            members.push(job);
            self.reqs.insert(
                id,
                Req::Generate {
                    prompt_tokens: r.prompt.len(),
                },
            );
        }
        let group = self.fresh_id();
        self.reqs.insert(group, Req::Group(members));
        self.jobs
            .push(Job::prefill(&mut self.engine, group, 0, &r.prompt));
        ids
    }

    /// The prefill of `group` is done (its sequence `anchor` holds the prompt minus its last
    /// token): every member still wanted forks it and starts; the anchor is freed.
    pub(super) fn start_group(&mut self, group: RequestId, anchor: SeqId) {
        if let Some(Req::Group(members)) = self.reqs.remove(&group) {
            for mut job in members {
                if !self.reqs.contains_key(&job.owner) {
                    continue; // cancelled while the prompt was computed
                }
                match self.engine.fork_seq(anchor) {
                    Ok(seq) => {
                        job.seq = seq;
                        self.jobs.push(job);
                    }
                    Err(e) => self.fail(job.owner, format!("cannot share the prompt: {e}")),
                }
            }
        }
        self.engine.free_seq(anchor);
    }

    /// Ends every member of `group` still waiting for its prompt with `why`.
    pub(super) fn fail_group(&mut self, members: Vec<Job>, why: &str) {
        for job in members {
            if self.reqs.remove(&job.owner).is_some() {
                self.done
                    .push((job.owner, Outcome::Generate(Err(why.to_string()))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Progress, Scheduler, SchedulerOptions};
    use super::*;
    use arbor_runtime::{Engine, EngineOptions};

    fn scheduler() -> Scheduler {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/qwen2");
        let loaded = arbor_runtime::load(&dir).expect("fixture");
        let opts = EngineOptions {
            kv_cache_bytes: 4 << 20,
            page_size: 8,
        };
        let engine = Engine::new(loaded.model, &opts).expect("engine");
        Scheduler::new(engine, loaded.tokenizer, SchedulerOptions::default())
    }

    fn request(seed: u64) -> GenerateRequest {
        GenerateRequest {
            prompt: (1..=41).collect(),
            sampling: SamplingParams {
                temperature: 1.0,
                seed,
                top_logprobs: 2,
                ..Default::default()
            },
            max_tokens: 12,
            stop: vec![],
        }
    }

    fn results(s: &mut Scheduler) -> Vec<(RequestId, super::super::GenerateResult)> {
        let mut v: Vec<_> = s
            .run_to_completion()
            .into_iter()
            .map(|(id, o)| match o {
                Outcome::Generate(Ok(r)) => (id, r),
                other => panic!("{other:?}"),
            })
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }

    #[test]
    fn a_group_shares_its_prompt_and_samples_as_separate_requests_would() {
        // Separately: member i is a plain request with seed 5 + i.
        let mut solo = scheduler();
        for i in 0..4 {
            solo.submit_generate(request(5 + i));
        }
        let want: Vec<_> = results(&mut solo).into_iter().map(|(_, r)| r).collect();

        let mut s = scheduler();
        s.set_progress(true);
        let ids = s.submit_generate_n(request(5), 4);
        // Step until the members have forked the prompt: the 40 shared positions (5 pages of
        // 8) are held once, not four times.
        while s.last_batch().len() < 4 {
            s.tick();
        }
        let stats = s.engine().kv_stats();
        assert!(
            stats.pages_in_use <= 5 + 4,
            "{} pages in use for a shared 41-token prompt",
            stats.pages_in_use
        );
        let got = results(&mut s);
        assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
        for ((_, g), w) in got.iter().zip(&want) {
            assert_eq!(g.tokens, w.tokens);
            assert_eq!(g.text, w.text);
        }
        assert_eq!(s.engine().kv_stats().pages_in_use, 0);

        // Progress: each member's tokens, in order, with their alternatives.
        let progress = s.take_progress();
        for (id, r) in &got {
            let toks: Vec<u32> = progress
                .iter()
                .filter(|(p, _)| p == id)
                .map(|(_, p)| match p {
                    Progress::Token(t) => {
                        assert_eq!(t.top_logprobs.len(), 2);
                        t.token
                    }
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(&toks, &r.tokens);
        }
    }

    #[test]
    fn cancelling_group_members_frees_everything() {
        let mut s = scheduler();
        let ids = s.submit_generate_n(request(1), 3);
        s.cancel(ids[0]);
        s.tick();
        s.cancel(ids[1]);
        for _ in 0..3 {
            s.tick();
        }
        s.cancel(ids[2]);
        let done = s.run_to_completion();
        assert_eq!(done.len(), 3);
        assert!(done
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Generate(Err(e)) if e == "cancelled")));
        assert_eq!(s.engine().kv_stats().pages_in_use, 0);
        assert_eq!(s.active(), 0);
    }
}
