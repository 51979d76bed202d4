//! `POST /v1/chat/completions`.

use crate::api::chat::ChatRequest;
use crate::api::json::ApiJson;
use crate::format::Flavor;
use crate::generation::respond;
use crate::state::Shared;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

pub async fn handle(State(state): State<Shared>, ApiJson(req): ApiJson<ChatRequest>) -> Response {
    match req.job(&state.cfg.model_id) {
        Ok(job) => {
            let (stream, usage) = (req.stream, req.include_usage());
            respond(state, job, Flavor::Chat, stream, usage).await
        }
        Err(e) => e.into_response(),
    }
}
