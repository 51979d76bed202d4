//! What every handler shares, and [`Slot`]: one admitted request's place in the queue, which
//! cancels the request's work in the engine when dropped (client gone, handler ended early).

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::worker::{Command, Ticket, Update, WorkerHandle};
use crate::ServerConfig;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub struct AppState {
    pub cfg: ServerConfig,
    pub worker: WorkerHandle,
    pub metrics: Arc<Metrics>,
    next_ticket: AtomicU64,
    /// Unix seconds the server started (the model's `created`).
    pub created: u64,
    pub shutting_down: AtomicBool,
}

pub type Shared = Arc<AppState>;

impl AppState {
    pub fn new(cfg: ServerConfig, worker: WorkerHandle, metrics: Arc<Metrics>) -> Self {
        AppState {
            cfg,
            worker,
            metrics,
            next_ticket: AtomicU64::new(1),
            created: now(),
            shutting_down: AtomicBool::new(false),
        }
    }
}

/// Unix time in seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An admitted request.
pub struct Slot {
    state: Shared,
    pub ticket: Ticket,
    /// Set once the worker has ended the ticket's work, so that dropping sends no cancel.
    ended: bool,
}

impl Slot {
    /// Takes a place in the queue: 429 when --max-queue requests are already held, 503 while
    /// shutting down.
    pub fn admit(state: &Shared) -> Result<Slot, ApiError> {
        if state.shutting_down.load(Ordering::Relaxed) {
            return Err(ApiError::shutting_down());
        }
        let max = state.cfg.max_queue;
        let held = state.metrics.in_flight.fetch_add(1, Ordering::AcqRel);
        // The slot exists from here on, so an early return releases it on drop.
        let slot = Slot {
            state: state.clone(),
            ticket: state.next_ticket.fetch_add(1, Ordering::Relaxed),
            ended: true,
        };
        if held >= max {
            return Err(ApiError::queue_full(max));
        }
        Ok(slot)
    }

    /// Sends the command `make` builds for this ticket and waits for the worker's answer:
    /// the receiver of the request's updates and the prompt token counts, the rejection, or
    /// a timeout error once `deadline` passes.
    pub async fn submit(
        &mut self,
        deadline: tokio::time::Instant,
        make: impl FnOnce(Ticket, tokio::sync::mpsc::UnboundedSender<Update>) -> Command,
    ) -> Result<(UnboundedReceiver<Update>, Vec<usize>), ApiError> {
        let timeout_s = self.state.cfg.request_timeout.as_secs_f64();
        tokio::time::timeout_at(deadline, self.accepted(make))
            .await
            .unwrap_or_else(|_| Err(ApiError::timeout(timeout_s)))
    }

    /// Sends the command and waits for the worker to accept or reject it.
    async fn accepted(
        &mut self,
        make: impl FnOnce(Ticket, tokio::sync::mpsc::UnboundedSender<Update>) -> Command,
    ) -> Result<(UnboundedReceiver<Update>, Vec<usize>), ApiError> {
        let (tx, mut rx) = unbounded_channel();
        if !self.state.worker.send(make(self.ticket, tx)) {
            return Err(ApiError::internal("the engine worker has stopped"));
        }
        self.ended = false;
        match rx.recv().await {
            Some(Update::Accepted { prompt_tokens }) => Ok((rx, prompt_tokens)),
            Some(Update::Rejected(e)) => {
                self.ended = true;
                Err(e)
            }
            _ => Err(ApiError::internal(
                "the engine worker stopped before answering",
            )),
        }
    }

    /// The request's next update, or a timeout error once `deadline` has passed. The clock
    /// is read first: `timeout_at` polls the receiver before the clock, so a fast engine's
    /// buffered updates would otherwise carry a request past its deadline.
    pub async fn recv_until(
        &self,
        rx: &mut UnboundedReceiver<Update>,
        deadline: tokio::time::Instant,
    ) -> Result<Update, ApiError> {
        let late = tokio::time::Instant::now() >= deadline;
        let got = if late {
            None
        } else {
            tokio::time::timeout_at(deadline, rx.recv()).await.ok()
        };
        match got {
            None => Err(ApiError::timeout(
                self.state.cfg.request_timeout.as_secs_f64(),
            )),
            Some(None) => Err(ApiError::internal("the engine worker stopped")),
            Some(Some(u)) => Ok(u),
        }
    }

    /// The worker has ended all of this ticket's work.
    pub fn ended(&mut self) {
        self.ended = true;
    }

    pub fn state(&self) -> &Shared {
        &self.state
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.ended {
            self.state.worker.send(Command::Cancel(self.ticket));
        }
        self.state.metrics.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}
