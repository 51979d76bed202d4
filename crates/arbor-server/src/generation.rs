//! Running a completion or chat request on the worker and following its choices: stop strings
//! are cut across token boundaries (nothing of a stop string reaches the client), each choice
//! ends with a finish reason, and the whole request with usage. [`respond`] answers with one
//! JSON body or an SSE stream.

use crate::error::ApiError;
use crate::format::{self, Flavor, Meta};
use crate::sse::{self, Step};
use crate::state::{now, Shared, Slot};
use crate::worker::{Command, GenJob, TokenLogprob, Update};
use arbor_runtime::stop::StopMatcher;
use arbor_search::StopReason;
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;

/// A token's logprob and its alternatives.
pub type Logprob = (TokenLogprob, Vec<TokenLogprob>);

/// What a choice gained from one update.
pub struct Piece {
    pub choice: usize,
    pub text: String,
    pub logprobs: Vec<Logprob>,
    pub finish: Option<&'static str>,
}

/// One choice as it advances.
pub struct Choice {
    stop: StopMatcher,
    /// Bytes of generated text seen (before stop cutting).
    raw_len: usize,
    stopped: bool,
    pub text: String,
    pub logprobs: Vec<Logprob>,
    pub finish: Option<&'static str>,
    pub completion_tokens: usize,
}

/// An accepted request being followed.
pub struct Run {
    slot: Slot,
    rx: UnboundedReceiver<Update>,
    pub choices: Vec<Choice>,
    open: usize,
    deadline: Instant,
    pub prompt_tokens: usize,
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Length | StopReason::Context => "length",
        _ => "stop",
    }
}

impl Run {
    /// The pieces of the next update; `Ok(None)` once every choice has finished.
    pub async fn next(&mut self) -> Result<Option<Vec<Piece>>, ApiError> {
        if self.open == 0 {
            self.slot.ended();
            return Ok(None);
        }
        let u = self.slot.recv_until(&mut self.rx, self.deadline).await?;
        let shutting = self
            .slot
            .state()
            .shutting_down
            .load(std::sync::atomic::Ordering::Relaxed);
        let (choice, c) = match &u {
            Update::Token { choice, .. } | Update::Done { choice, .. } => {
                match self.choices.get_mut(*choice) {
                    Some(c) => (*choice, c),
                    None => return Ok(Some(vec![])),
                }
            }
            _ => return Ok(Some(vec![])),
        };
        let mut piece = Piece {
            choice,
            text: String::new(),
            logprobs: vec![],
            finish: None,
        };
        match u {
            Update::Token { text, logprob, .. } => {
                c.completion_tokens += 1;
                c.raw_len += text.len();
                if !c.stopped {
                    let (out, hit) = c.stop.push(&text);
                    c.stopped = hit;
                    piece.text = out;
                    // The token that completes a stop string is not part of the answer.
                    if let (false, Some(lp)) = (hit, logprob) {
                        piece.logprobs.push(lp);
                    }
                }
            }
            Update::Done { result, .. } => {
                let r = match result {
                    Ok(r) => r,
                    Err(e) if e == "cancelled" && shutting => return Err(ApiError::shutting_down()),
                    Err(e) => return Err(ApiError::internal(format!("generation failed: {e}"))),
                };
                // What the decoder still held at the end (an incomplete character).
                let tail = r.text.get(c.raw_len..).unwrap_or_default();
                if !c.stopped {
                    let (out, hit) = c.stop.push(tail);
                    c.stopped = hit;
                    piece.text = out;
                    if !hit {
                        piece.text.push_str(&c.stop.finish());
                    }
                }
                c.completion_tokens = r.tokens.len();
                piece.finish = Some(if c.stopped {
                    "stop"
                } else {
                    finish_reason(r.stop)
                });
                c.finish = piece.finish;
                self.open -= 1;
            }
            _ => {}
        }
        c.text.push_str(&piece.text);
        c.logprobs.extend(piece.logprobs.iter().cloned());
        Ok(Some(vec![piece]))
    }

    /// Tokens generated over all choices.
    pub fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.completion_tokens).sum()
    }
}

/// Answers a completion or chat request: admission (429), the worker's checks (400/503),
/// then the result as JSON or, with `stream`, as server-sent events.
pub async fn respond(
    state: Shared,
    job: GenJob,
    flavor: Flavor,
    stream: bool,
    include_usage: bool,
) -> Response {
    let deadline = Instant::now() + state.cfg.request_timeout;
    let mut slot = match Slot::admit(&state) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let count = job.prompts.len() * job.n;
    let stops = job.stop.clone();
    let logprobs = job.logprobs.is_some();
    let submitted = slot.submit(deadline, |ticket, tx| Command::Generate {
        ticket,
        job: Box::new(job),
        tx,
    });
    let (rx, prompt_tokens) = match submitted.await {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let meta = Meta {
        id: format!("{}-{:x}{:04x}", flavor.id_prefix(), now(), slot.ticket),
        created: now(),
        model: state.cfg.model_id.clone(),
        flavor,
        logprobs,
    };
    let run = Run {
        slot,
        rx,
        choices: (0..count)
            .map(|_| Choice {
                stop: StopMatcher::new(&stops),
                raw_len: 0,
                stopped: false,
                text: String::new(),
                logprobs: vec![],
                finish: None,
                completion_tokens: 0,
            })
            .collect(),
        open: count,
        deadline,
        prompt_tokens: prompt_tokens.iter().sum(),
    };
    if stream {
        stream_run(run, meta, include_usage)
    } else {
        collect(run, meta).await
    }
}

async fn collect(mut run: Run, meta: Meta) -> Response {
    loop {
        match run.next().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => return e.into_response(),
        }
    }
    axum::Json(format::full(&meta, &run)).into_response()
}

fn stream_run(run: Run, meta: Meta, include_usage: bool) -> Response {
    let mut initial = Vec::new();
    if meta.flavor == Flavor::Chat {
        for i in 0..run.choices.len() {
            initial.push(format::role_chunk(&meta, i, include_usage));
        }
    }
    struct St {
        run: Run,
        meta: Meta,
        include_usage: bool,
        /// Bytes of text sent per choice (completions' `text_offset`).
        offsets: Vec<usize>,
    }
    let st = St {
        offsets: vec![0; run.choices.len()],
        run,
        meta,
        include_usage,
    };
    sse::stream(initial, st, |mut st: St| async move {
        let step = match st.run.next().await {
            Ok(Some(pieces)) => {
                let mut out = Vec::new();
                for p in pieces {
                    if p.text.is_empty() && p.logprobs.is_empty() && p.finish.is_none() {
                        continue;
                    }
                    let off = &mut st.offsets[p.choice];
                    out.push(format::chunk(&st.meta, &p, *off, st.include_usage));
                    *off += p.text.len();
                }
                Step::More(out)
            }
            Ok(None) if st.include_usage => {
                Step::Last(vec![format::usage_chunk(&st.meta, &st.run)])
            }
            Ok(None) => Step::Last(vec![]),
            Err(e) => Step::Fail(e),
        };
        (st, step)
    })
}
