//! `POST /v1/search`: a search strategy over the prompt; the answer, the candidates with their
//! scores, what it spent, optionally the tree; streamed as events while it runs if asked.

use crate::api::json::ApiJson;
use crate::api::search::SearchApiRequest;
use crate::error::ApiError;
use crate::sse::{self, Step};
use crate::state::{now, Shared, Slot};
use crate::worker::{Command, Update};
use arbor_search::scheduler::SearchProgress;
use arbor_search::spec::VerifierOptions;
use arbor_search::SearchResult;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

pub async fn handle(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<SearchApiRequest>,
) -> Response {
    let opts = VerifierOptions {
        command_timeout: Duration::from_secs(10),
        allow_command: state.cfg.allow_command_verifier,
        models: state.cfg.verifier_models.clone(),
    };
    let job = match req.job(&state.cfg.model_id, &opts) {
        Ok(j) => j,
        Err(e) => return e.into_response(),
    };
    let deadline = Instant::now() + state.cfg.request_timeout;
    let mut slot = match Slot::admit(&state) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let submitted = slot.submit(deadline, |ticket, tx| Command::Search {
        ticket,
        job: Box::new(job),
        tx,
    });
    let (rx, prompt_tokens) = match submitted.await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let mut s = Searching {
        id: format!("search-{:x}{:04x}", now(), slot.ticket),
        slot,
        rx,
        deadline,
        prompt_tokens: prompt_tokens.iter().sum(),
        include_tree: req.include_tree,
    };
    if !req.stream {
        loop {
            match s.next().await {
                Ok(Next::Event(_)) => {}
                Ok(Next::Result(v)) => return axum::Json(v).into_response(),
                Err(e) => return e.into_response(),
            }
        }
    }
    sse::stream(vec![], s, |mut s: Searching| async move {
        let step = match s.next().await {
            Ok(Next::Event(v)) => Step::More(vec![v]),
            Ok(Next::Result(v)) => Step::Last(vec![v]),
            Err(e) => Step::Fail(e),
        };
        (s, step)
    })
}

struct Searching {
    id: String,
    slot: Slot,
    rx: UnboundedReceiver<Update>,
    deadline: Instant,
    prompt_tokens: usize,
    include_tree: bool,
}

enum Next {
    Event(Value),
    Result(Value),
}

impl Searching {
    async fn next(&mut self) -> Result<Next, ApiError> {
        loop {
            let u = self.slot.recv_until(&mut self.rx, self.deadline).await?;
            match u {
                Update::Search(p) => return Ok(Next::Event(self.event(p))),
                Update::SearchDone(r) => {
                    self.slot.ended();
                    return match r {
                        Ok(r) => Ok(Next::Result(self.result(&r))),
                        Err(e)
                            if e == "cancelled"
                                && self.slot.state().shutting_down.load(Ordering::Relaxed) =>
                        {
                            Err(ApiError::shutting_down())
                        }
                        Err(e) => Err(ApiError::internal(format!("the search failed: {e}"))),
                    };
                }
                _ => {}
            }
        }
    }

    fn event(&self, p: SearchProgress) -> Value {
        let mut v = match p {
            SearchProgress::Expanded {
                parent,
                node,
                text,
                tokens,
                logprob,
                stop,
            } => json!({"type": "expanded", "parent": parent, "node": node, "text": text,
                        "tokens": tokens, "logprob": logprob, "stop": stop}),
            SearchProgress::ExpandedTopK { node, children } => {
                json!({"type": "expanded_top_k", "node": node, "children": children})
            }
            SearchProgress::Scored {
                node,
                verifier,
                score,
            } => json!({"type": "scored", "node": node, "verifier": verifier, "score": score}),
            SearchProgress::Pruned { node, reason } => {
                json!({"type": "pruned", "node": node, "reason": reason})
            }
        };
        v["id"] = json!(self.id);
        v["object"] = json!("search.event");
        v
    }

    fn result(&self, r: &SearchResult) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "search.result",
            "created": now(),
            "model": self.slot.state().cfg.model_id,
            "strategy": r.strategy,
            "verifiers": r.verifiers,
            "answer": r.answer_text,
            "answer_node": r.answer,
            "candidates": r.candidates,
            "accounting": r.accounting,
            "note": r.note,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "policy_tokens": r.accounting.policy_tokens,
                "verifier_tokens": r.accounting.verifier_tokens,
            },
        });
        if self.include_tree {
            v["tree"] = r.tree.to_json();
        }
        v
    }
}
