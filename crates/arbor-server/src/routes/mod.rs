//! The router: endpoints, API-key check, request counting, body limit, and JSON answers for
//! unknown routes and wrong methods.

mod chat;
mod completions;
mod info;
mod search;

use crate::api::json::BodyLimit;
use crate::error::ApiError;
use crate::state::Shared;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};

/// Every route of the server.
pub fn router(state: Shared) -> Router {
    let limit = state.cfg.max_body_bytes;
    let api = Router::new()
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/search", post(search::handle))
        .route("/v1/models", get(info::models))
        .route("/v1/models/{id}", get(info::model))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(api)
        .route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(limit))
        .layer(Extension(BodyLimit(limit)))
        .with_state(state)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// Compares without an early exit, so response times do not reveal the key.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Requires `Authorization: Bearer KEY` when the server has a key.
async fn auth(State(state): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Counts each exchange by route and status for `/metrics`.
async fn count(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let r = next.run(req).await;
    state.metrics.count_request(&endpoint, r.status().as_u16());
    r
}
