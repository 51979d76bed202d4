//! Server-sent event streams: JSON `data:` events, an OpenAI-style error event if the work
//! fails midway, and `data: [DONE]` at the end. The stream owns the request's state, so a
//! client that disconnects drops it, and with it the request's [`crate::state::Slot`], which
//! cancels the work and frees its KV pages.

use crate::error::ApiError;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::Value;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

/// What one step of a stream produced.
pub enum Step {
    /// Events; more may follow.
    More(Vec<Value>),
    /// The last events (then `[DONE]`).
    Last(Vec<Value>),
    /// The work failed: an error event, then `[DONE]`.
    Fail(ApiError),
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// An SSE response: `initial` events, then those of each `step` until the last.
pub fn stream<S, F, Fut>(initial: Vec<Value>, st: S, step: F) -> Response
where
    S: Send + 'static,
    F: Fn(S) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (S, Step)> + Send,
{
    struct Inner<S, F> {
        st: Option<S>,
        step: F,
        queue: VecDeque<Event>,
    }
    let inner = Inner {
        st: Some(st),
        step,
        queue: initial.iter().map(data).collect(),
    };
    let s = stream::unfold(inner, |mut inner| async move {
        loop {
            if let Some(e) = inner.queue.pop_front() {
                return Some((Ok::<_, Infallible>(e), inner));
            }
            let st = inner.st.take()?;
            let (st, step) = (inner.step.clone())(st).await;
            match step {
                Step::More(v) => {
                    inner.queue.extend(v.iter().map(data));
                    inner.st = Some(st);
                }
                Step::Last(v) => {
                    inner.queue.extend(v.iter().map(data));
                    inner.queue.push_back(Event::default().data("[DONE]"));
                }
                Step::Fail(e) => {
                    inner.queue.push_back(data(&e.body()));
                    inner.queue.push_back(Event::default().data("[DONE]"));
                }
            }
        }
    });
    Sse::new(s)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(5)))
        .into_response()
}
