//! `POST /v1/completions`.

use crate::api::completions::CompletionRequest;
use crate::api::json::ApiJson;
use crate::format::Flavor;
use crate::generation::respond;
use crate::state::Shared;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

pub async fn handle(
    State(state): State<Shared>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Response {
    match req.job(&state.cfg.model_id) {
        Ok(job) => {
            let (stream, usage) = (req.stream, req.include_usage());
            respond(state, job, Flavor::Completion, stream, usage).await
        }
        Err(e) => e.into_response(),
    }
}
