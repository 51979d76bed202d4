//! KV memory that follows demand between the policy engine and its verifier models.
//!
//! Each engine has its own pool (`--kv-cache-gb`, `--verifier-kv-gb`), and together they are
//! one byte budget. Scoring comes in bursts (a search's candidates at once) while generation
//! runs in between, so after every tick pages move to the side that waits for them:
//! - a verifier model whose queued candidates do not fit borrows the policy's *spare* pages
//!   (free beyond what the policy's runnable work and next queued search need), and gives
//!   them back as soon as it is idle;
//! - an idle verifier model lends its pool to a policy that is short of pages, and takes it
//!   back as soon as candidates wait: the policy then makes room by dropping its prefix cache
//!   and preempting idle sequences (free and recompute, as when its own pages run out), and
//!   compacts its pool ([`arbor_runtime::Engine::resize_kv`]) so the top can go.
//!
//! So a verifier model can always get back to its configured size and the policy only lends
//! what it does not need now: no request waits on memory the other side sits on. Moves are at
//! least a sixteenth of the lender's configured pool, so that a burst costs a few resizes,
//! not one per tick (a resize copies the pool: its layout is layer-major).

use super::Scheduler;
use std::collections::HashSet;

/// What moved between the policy and one verifier model.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Loan {
    /// The lane's configured pages.
    pub base: usize,
    /// Policy pages the lane borrowed, and the lane pages it grew by for them.
    pub from_policy: usize,
    pub lane_grew: usize,
    /// Lane pages the policy borrowed, and the policy pages it grew by for them.
    pub to_policy: usize,
    pub policy_grew: usize,
}

impl Scheduler {
    /// Moves KV pages between the policy and the verifier models as described above.
    pub(super) fn rebalance_kv(&mut self) {
        for l in 0..self.lanes.len() {
            if self.lanes[l].pending() == 0 {
                self.repay(l);
                let short = self.policy_short();
                if short > 0 {
                    self.lend_to_policy(l, short);
                }
            } else {
                self.reclaim(l);
                let short = self.lanes[l].pages_short();
                if short > 0 {
                    self.lend_to_lane(l, short);
                }
            }
        }
    }

    /// Pages the policy's runnable work needs this tick, plus the next queued search's.
    fn policy_need(&self) -> usize {
        let (mut tokens, mut pages) = (0, 0);
        for j in self
            .jobs
            .iter()
            .filter(|j| j.done.is_none() && !j.feed.is_empty())
        {
            if tokens >= self.opts.max_batch_tokens {
                break;
            }
            let n = j.feed.len().min(self.opts.max_batch_tokens - tokens);
            tokens += n;
            pages += self.engine.pages_needed(j.seq, n);
        }
        pages + self.admit_queue.front().map_or(0, |&(_, need)| need)
    }

    fn policy_short(&self) -> usize {
        self.policy_need()
            .saturating_sub(self.engine.cache().available_pages())
    }

    fn policy_pages(&self) -> usize {
        self.engine.kv_stats().pages_total
    }

    /// Bytes of a policy page and of lane `l`'s.
    fn page_bytes(&self, l: usize) -> (usize, usize) {
        let pb = self.engine.kv_stats().page_bytes.max(1);
        (pb, self.lanes[l].page_bytes())
    }

    /// Lends lane `l`, short of `short` of its own pages, what the policy can spare.
    fn lend_to_lane(&mut self, l: usize, short: usize) {
        let spare = self
            .engine
            .cache()
            .available_pages()
            .saturating_sub(self.policy_need());
        let (pb, lb) = self.page_bytes(l);
        let take = (short * lb)
            .div_ceil(pb)
            .max(self.kv_policy_base / 16)
            .min(spare);
        if take == 0 {
            return;
        }
        let total = self.policy_pages();
        let Ok(now) = self.engine.resize_kv(total - take) else {
            return;
        };
        let lent = total - now;
        let grow = lent * pb / lb;
        if grow == 0 {
            let _ = self.engine.resize_kv(total);
            return;
        }
        let lane_total = self.lanes[l].engine().kv_stats().pages_total;
        match self.lanes[l].resize_kv(lane_total + grow) {
            Ok(_) => {
                self.loans[l].from_policy += lent;
                self.loans[l].lane_grew += grow;
                self.kv_moves += 1;
            }
            // The lane could not grow (out of device memory): the policy takes its pages back.
            Err(_) => {
                let _ = self.engine.resize_kv(total);
            }
        }
    }

    /// Gives back what idle lane `l` borrowed from the policy.
    fn repay(&mut self, l: usize) {
        let loan = self.loans[l];
        if loan.from_policy == 0 {
            return;
        }
        let lane_total = self.lanes[l].engine().kv_stats().pages_total;
        let Ok(now) = self.lanes[l].resize_kv(lane_total - loan.lane_grew) else {
            return;
        };
        if now != lane_total - loan.lane_grew {
            // Cannot happen with no sequences (everything is free); try again next tick.
            let _ = self.lanes[l].resize_kv(lane_total);
            return;
        }
        let total = self.policy_pages();
        if self.engine.resize_kv(total + loan.from_policy).is_ok() {
            self.loans[l].from_policy = 0;
            self.loans[l].lane_grew = 0;
            self.kv_moves += 1;
        }
    }

    /// Lends the policy, short of `short` pages, idle lane `l`'s pool.
    fn lend_to_policy(&mut self, l: usize, short: usize) {
        let (pb, lb) = self.page_bytes(l);
        let lane_total = self.lanes[l].engine().kv_stats().pages_total;
        let want = (short * pb)
            .div_ceil(lb)
            .max(self.loans[l].base / 16)
            .min(lane_total);
        if want == 0 {
            return;
        }
        let Ok(now) = self.lanes[l].resize_kv(lane_total - want) else {
            return;
        };
        let lent = lane_total - now;
        let grow = lent * lb / pb;
        if grow == 0 {
            let _ = self.lanes[l].resize_kv(lane_total);
            return;
        }
        let total = self.policy_pages();
        match self.engine.resize_kv(total + grow) {
            Ok(_) => {
                self.loans[l].to_policy += lent;
                self.loans[l].policy_grew += grow;
                self.kv_moves += 1;
            }
            Err(_) => {
                let _ = self.lanes[l].resize_kv(lane_total);
            }
        }
    }

    /// Takes back what the policy borrowed from lane `l`, which now has candidates waiting:
    /// the policy drops its prefix cache and preempts idle sequences until it has the pages
    /// free, then shrinks (compacting what it keeps).
    fn reclaim(&mut self, l: usize) {
        let owe = self.loans[l].policy_grew;
        if owe == 0 {
            return;
        }
        while self.engine.kv_stats().pages_free < owe {
            if self.engine.kv_stats().pages_cached > 0 {
                self.engine.clear_prefix_cache();
            } else if !self.preempt_one(&HashSet::new()) {
                break;
            }
        }
        let total = self.policy_pages();
        let Ok(now) = self.engine.resize_kv(total - owe) else {
            return;
        };
        let given = total - now;
        if given == 0 {
            return;
        }
        let loan = self.loans[l];
        let back = if given == owe {
            loan.to_policy
        } else {
            let (pb, lb) = self.page_bytes(l);
            (given * pb / lb).min(loan.to_policy)
        };
        let lane_total = self.lanes[l].engine().kv_stats().pages_total;
        if self.lanes[l].resize_kv(lane_total + back).is_ok() {
            self.loans[l].policy_grew -= given;
            self.loans[l].to_policy -= back;
            self.kv_moves += 1;
        } else {
            let _ = self.engine.resize_kv(total);
        }
    }

    /// Times KV pages moved between the policy and a verifier model (either way, or back).
    pub fn kv_moves(&self) -> u64 {
        self.kv_moves
    }
}
