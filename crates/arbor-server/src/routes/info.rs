//! `GET /v1/models`, `/v1/models/{id}`, `/health` and `/metrics`.

use crate::error::ApiError;
use crate::state::Shared;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::atomic::Ordering;

fn model_json(state: &Shared) -> serde_json::Value {
    json!({
        "id": state.cfg.model_id,
        "object": "model",
        "created": state.created,
        "owned_by": "arbor",
        "max_model_len": state.cfg.max_context,
    })
}

pub async fn models(State(state): State<Shared>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [model_json(&state)]}))
}

pub async fn model(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    if id == state.cfg.model_id {
        Json(model_json(&state)).into_response()
    } else {
        ApiError::unknown_model(&id, &state.cfg.model_id).into_response()
    }
}

/// 200 while the engine runs and the server accepts work; 503 otherwise.
pub async fn health(State(state): State<Shared>) -> Response {
    if state.shutting_down.load(Ordering::Relaxed) {
        return ApiError::shutting_down().into_response();
    }
    match state.worker.stats().await {
        Some(s) => Json(json!({"status": "ok", "model": state.cfg.model_id, "active": s.active}))
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(ApiError::internal("the engine worker has stopped").body()),
        )
            .into_response(),
    }
}

pub async fn metrics(State(state): State<Shared>) -> Response {
    let engine = state.worker.stats().await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(engine.as_ref()),
    )
        .into_response()
}
