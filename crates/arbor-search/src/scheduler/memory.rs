//! KV memory that follows demand between the policy engine and its verifier models.
//!
//! Each engine has its own pool (`--kv-cache-gb`, `--verifier-kv-gb`). A verifier model's
//! scoring comes in bursts (the candidates of a search at once) while the policy's pages are
//! often partly idle, so before each tick a verifier model whose queued candidates do not fit
//! borrows the policy's spare pages: free pages beyond what the policy's own runnable work
//! needs this tick and what the next queued search needs to start. The policy's pool shrinks
//! over its free top pages (pages are handed out lowest first, so the top tends to be free)
//! and the lane's grows by the same bytes. A lane gives everything back as soon as it is
//! idle. Lanes never go below their configured size, so a candidate that fits a lane's own
//! pool always runs, and the policy only lends what it does not need now: no new way to stall.
//!
//! Moves are at least a sixteenth of the policy's configured pool, so that a burst costs a
//! few resizes, not one per tick (a resize copies the pool: layer-major layout).

use super::Scheduler;

/// What a lane holds beyond its configured pool.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Loan {
    /// The lane's configured pages.
    pub base: usize,
    /// Policy pages lent to the lane (what the policy gets back).
    pub policy_pages: usize,
}

impl Scheduler {
    /// Moves KV pages between the policy and the verifier models as described above.
    pub(super) fn rebalance_kv(&mut self) {
        for l in 0..self.lanes.len() {
            if self.lanes[l].pending() == 0 {
                self.repay(l);
            } else {
                let short = self.lanes[l].pages_short();
                if short > 0 {
                    self.lend(l, short);
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

    /// Lends lane `l`, short of `short` of its own pages, what the policy can spare.
    fn lend(&mut self, l: usize, short: usize) {
        let spare = self
            .engine
            .cache()
            .available_pages()
            .saturating_sub(self.policy_need());
        let (pb, lb) = (self.policy_page_bytes(), self.lanes[l].page_bytes());
        let want = (short * lb).div_ceil(pb).max(self.kv_policy_base / 16);
        let take = want.min(spare);
        if take == 0 {
            return;
        }
        let total = self.engine.kv_stats().pages_total;
        let Ok(now) = self.engine.resize_kv(total - take) else {
            return;
        };
        let lent = total - now;
        if lent == 0 {
            return;
        }
        let lane_total = self.lanes[l].engine().kv_stats().pages_total;
        match self.lanes[l].resize_kv(lane_total + lent * pb / lb) {
            Ok(_) => {
                self.loans[l].policy_pages += lent;
                self.kv_moves += 1;
            }
            // The lane could not grow (out of device memory): the policy takes its pages back.
            Err(_) => {
                let _ = self.engine.resize_kv(total);
            }
        }
    }

    /// Gives back what idle lane `l` borrowed.
    fn repay(&mut self, l: usize) {
        let loan = self.loans[l];
        if loan.policy_pages == 0 {
            return;
        }
        let Ok(now) = self.lanes[l].resize_kv(loan.base) else {
            return;
        };
        if now != loan.base {
            // Pages still held at the top (cannot happen with no sequences): try next tick.
            return;
        }
        let total = self.engine.kv_stats().pages_total;
        if self.engine.resize_kv(total + loan.policy_pages).is_ok() {
            self.loans[l].policy_pages = 0;
            self.kv_moves += 1;
        }
    }

    fn policy_page_bytes(&self) -> usize {
        self.engine.kv_stats().page_bytes.max(1)
    }

    /// Times KV pages moved between the policy and a verifier model (lent or given back).
    pub fn kv_moves(&self) -> u64 {
        self.kv_moves
    }
}
