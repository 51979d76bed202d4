//! The engine worker: one std thread owns the [`Scheduler`], takes commands over a channel,
//! ticks while there is work, and sends each request's tokens, search events and outcome back
//! on that request's own channel. HTTP handlers never touch the engine.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::prompt::{tokenize, Input};
use arbor_search::scheduler::Progress;
use arbor_search::{GenerateRequest, Outcome, RequestId, Scheduler, SearchRequest};
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc::UnboundedSender, oneshot};

mod protocol;

pub use protocol::*;

/// The handlers' side of the worker.
pub struct WorkerHandle {
    tx: Sender<Command>,
}

impl WorkerHandle {
    /// Starts the worker thread.
    pub fn spawn(sched: Scheduler, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("arbor-engine".into())
            .spawn(move || Worker::new(sched, metrics).run(rx))?;
        Ok(WorkerHandle { tx })
    }

    /// Sends a command; false when the worker has stopped.
    pub fn send(&self, c: Command) -> bool {
        self.tx.send(c).is_ok()
    }

    /// The engine's statistics, `None` if the worker has stopped.
    pub async fn stats(&self) -> Option<EngineStats> {
        let (tx, rx) = oneshot::channel();
        if !self.send(Command::Stats(tx)) {
            return None;
        }
        rx.await.ok()
    }
}

struct Entry {
    tx: UnboundedSender<Update>,
    ids: Vec<RequestId>,
    /// Scheduler ids not yet ended.
    open: usize,
    logprobs: Option<usize>,
    /// KV pages set aside for the prompt until its first token arrives.
    reserved: usize,
}

struct Worker {
    sched: Scheduler,
    metrics: Arc<Metrics>,
    tickets: HashMap<Ticket, Entry>,
    /// Scheduler id → (ticket, choice index).
    owners: HashMap<RequestId, (Ticket, usize)>,
    reserved: usize,
}

impl Worker {
    fn new(mut sched: Scheduler, metrics: Arc<Metrics>) -> Self {
        sched.set_progress(true);
        Worker {
            sched,
            metrics,
            tickets: HashMap::new(),
            owners: HashMap::new(),
            reserved: 0,
        }
    }

    fn run(mut self, rx: Receiver<Command>) {
        let mut closed = false;
        loop {
            let busy = self.sched.active() > 0;
            if !busy {
                if closed {
                    return;
                }
                // Idle: sleep until a command comes.
                match rx.recv() {
                    Ok(c) => self.command(c),
                    Err(_) => closed = true,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => self.command(c),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        if !closed {
                            // Every handler is gone: nobody waits for the work left.
                            closed = true;
                            self.cancel_all();
                        }
                        break;
                    }
                }
            }
            if self.sched.active() > 0 {
                let t0 = Instant::now();
                let stepped = self.sched.tick();
                if stepped > 0 {
                    self.metrics.observe_step(t0.elapsed(), stepped);
                }
                self.route();
                if stepped == 0 && self.sched.active() > 0 && !closed {
                    // Nothing could run (e.g. a search waits for room): do not spin.
                    match rx.recv_timeout(Duration::from_millis(2)) {
                        Ok(c) => self.command(c),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => {
                            closed = true;
                            self.cancel_all();
                        }
                    }
                }
            } else {
                self.route();
            }
            self.metrics.set_active(self.sched.active());
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Generate { ticket, job, tx } => self.generate(ticket, *job, tx),
            Command::Search { ticket, job, tx } => self.search(ticket, *job, tx),
            Command::Cancel(t) => {
                if let Some(e) = self.tickets.get(&t) {
                    self.metrics.add_cancelled();
                    for id in e.ids.clone() {
                        self.sched.cancel(id);
                    }
                }
            }
            Command::CancelAll => self.cancel_all(),
            Command::Stats(reply) => {
                let _ = reply.send(EngineStats {
                    kv: self.sched.engine().kv_stats(),
                    active: self.sched.active(),
                    ticks: self.sched.ticks(),
                    preemptions: self.sched.preemptions(),
                });
            }
        }
    }

    fn cancel_all(&mut self) {
        for _ in 0..self.tickets.len() {
            self.metrics.add_cancelled();
        }
        let ids: Vec<RequestId> = self.owners.keys().copied().collect();
        for id in ids {
            self.sched.cancel(id);
        }
    }

    /// Pages that can be had now, beside prompts accepted but not yet computed.
    fn room(&self) -> usize {
        self.sched
            .engine()
            .cache()
            .available_pages()
            .saturating_sub(self.reserved)
    }

    fn page_size(&self) -> usize {
        self.sched.engine().cache().layout().page_size
    }

    fn generate(&mut self, ticket: Ticket, job: GenJob, tx: UnboundedSender<Update>) {
        let ctx = self.sched.engine().model.cfg.max_context;
        let total = self.sched.engine().cache().allocator().num_total();
        let ps = self.page_size();
        let mut prompts = Vec::with_capacity(job.prompts.len());
        let mut need = 0;
        for (i, p) in job.prompts.iter().enumerate() {
            let param = if job.prompts.len() > 1 && job.prompt_param == "prompt" {
                format!("prompt[{i}]")
            } else {
                job.prompt_param.to_string()
            };
            let tokens = match self.check_prompt(p, &param, job.max_tokens) {
                Ok(t) => t,
                Err(e) => return drop(tx.send(Update::Rejected(e))),
            };
            // The prompt once (shared by the n choices) and a page of its own per choice.
            need += tokens.len().div_ceil(ps) + job.n;
            prompts.push(tokens);
        }
        if need > total {
            let e = ApiError::invalid(
                job.prompt_param,
                format!("the request needs {need} KV pages and the whole cache holds {total}: shorten it or lower n"),
            );
            return drop(tx.send(Update::Rejected(e)));
        }
        if need > self.room() {
            return drop(tx.send(Update::Rejected(ApiError::kv_full(format!(
                "the KV cache has no room for this request now ({need} pages needed, {} free): retry shortly",
                self.room()
            )))));
        }
        let counts: Vec<usize> = prompts.iter().map(Vec::len).collect();
        self.metrics
            .add_prompt_tokens(counts.iter().sum::<usize>() as u64);
        if tx
            .send(Update::Accepted {
                prompt_tokens: counts,
            })
            .is_err()
        {
            return; // the client left already
        }
        let mut sampling = job.sampling.clone();
        sampling.top_logprobs = job.logprobs.unwrap_or(0);
        let mut ids = Vec::new();
        for (p, tokens) in prompts.into_iter().enumerate() {
            let len = tokens.len();
            let r = GenerateRequest {
                prompt: tokens,
                sampling: sampling.clone(),
                max_tokens: job.max_tokens.unwrap_or(ctx.saturating_sub(len)),
                stop: job.stop.clone(),
            };
            for (j, id) in self
                .sched
                .submit_generate_n(r, job.n)
                .into_iter()
                .enumerate()
            {
                self.owners.insert(id, (ticket, p * job.n + j));
                ids.push(id);
            }
        }
        for &id in &ids {
            self.sched.set_sparse_budget(id, job.sparse_budget);
        }
        self.reserved += need;
        self.tickets.insert(
            ticket,
            Entry {
                tx,
                open: ids.len(),
                ids,
                logprobs: job.logprobs,
                reserved: need,
            },
        );
    }

    fn search(&mut self, ticket: Ticket, job: SearchJob, tx: UnboundedSender<Update>) {
        let tokens = match self.check_prompt(&job.input, job.prompt_param, Some(0)) {
            Ok(t) => t,
            Err(e) => return drop(tx.send(Update::Rejected(e))),
        };
        let width = job.strategy.width();
        let need = tokens.len().div_ceil(self.page_size()) + width;
        let total = self.sched.engine().cache().allocator().num_total();
        if need > total {
            let e = ApiError::invalid(
                "width",
                format!("a search of width {width} on this prompt needs {need} KV pages and the whole cache holds {total}"),
            );
            return drop(tx.send(Update::Rejected(e)));
        }
        if tx
            .send(Update::Accepted {
                prompt_tokens: vec![tokens.len()],
            })
            .is_err()
        {
            return;
        }
        self.metrics.add_prompt_tokens(tokens.len() as u64);
        // The scheduler queues a search until its width fits, so no reservation here.
        let id = self.sched.submit_search(SearchRequest {
            prompt: tokens,
            question: job.question,
            strategy: job.strategy,
            verifiers: vec![job.verifier],
            sampling: job.sampling,
            max_policy_tokens: job.max_policy_tokens,
            max_wall: job.max_wall,
        });
        self.sched.set_sparse_budget(id, job.sparse_budget);
        self.owners.insert(id, (ticket, 0));
        self.tickets.insert(
            ticket,
            Entry {
                tx,
                ids: vec![id],
                open: 1,
                logprobs: None,
                reserved: 0,
            },
        );
    }

    /// Tokenises a prompt and checks it against the context: a 400 naming `param` otherwise.
    fn check_prompt(
        &self,
        input: &Input,
        param: &str,
        max_tokens: Option<usize>,
    ) -> Result<Vec<u32>, ApiError> {
        let tok = self.sched.tokenizer();
        let cfg = &self.sched.engine().model.cfg;
        let tokens = tokenize(tok, input).map_err(|e| ApiError::invalid(param, e))?;
        if tokens.is_empty() {
            return Err(ApiError::invalid(param, "the prompt is empty"));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(ApiError::invalid(
                param,
                format!(
                    "token id {t} is outside the vocabulary of {}",
                    cfg.vocab_size
                ),
            ));
        }
        let want = tokens.len() + max_tokens.unwrap_or(1).max(1);
        if want > cfg.max_context {
            return Err(ApiError::invalid(
                if max_tokens.unwrap_or(0) > 0 { "max_tokens" } else { param },
                format!(
                    "this model's context is {} tokens; the prompt has {} and {} more were asked for",
                    cfg.max_context,
                    tokens.len(),
                    want - tokens.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Ok(tokens)
    }

    /// Hands progress and outcomes to their handlers.
    fn route(&mut self) {
        for (id, p) in self.sched.take_progress() {
            let Some(&(ticket, choice)) = self.owners.get(&id) else {
                continue;
            };
            let Some(e) = self.tickets.get_mut(&ticket) else {
                continue;
            };
            let u = match p {
                Progress::Token(t) => {
                    if e.reserved > 0 {
                        self.reserved = self.reserved.saturating_sub(e.reserved);
                        e.reserved = 0;
                    }
                    self.metrics.add_generated_tokens(1);
                    let tok = self.sched.tokenizer();
                    let lp = |id: u32, logprob: f32| {
                        let bytes = tok.token_bytes(id).to_vec();
                        TokenLogprob {
                            token: String::from_utf8_lossy(&bytes).into_owned(),
                            bytes,
                            logprob,
                        }
                    };
                    let logprob = e.logprobs.map(|k| {
                        let top = t.top_logprobs.iter().take(k);
                        (
                            lp(t.token, t.logprob),
                            top.map(|&(i, l)| lp(i, l)).collect(),
                        )
                    });
                    Update::Token {
                        choice,
                        text: t.text,
                        logprob,
                    }
                }
                Progress::Search(s) => Update::Search(s),
            };
            let _ = e.tx.send(u);
        }
        for (id, outcome) in self.sched.take_finished() {
            let Some((ticket, choice)) = self.owners.remove(&id) else {
                continue;
            };
            let Some(e) = self.tickets.get_mut(&ticket) else {
                continue;
            };
            let u = match outcome {
                Outcome::Generate(result) => Update::Done { choice, result },
                Outcome::Search(r) => Update::SearchDone(r),
            };
            let _ = e.tx.send(u);
            e.open -= 1;
            if e.open == 0 {
                self.reserved = self.reserved.saturating_sub(e.reserved);
                self.tickets.remove(&ticket);
            }
        }
    }
}
