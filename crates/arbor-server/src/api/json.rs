//! [`ApiJson`]: like `axum::Json`, but a missing content type, a body over the limit, bad
//! syntax, invalid UTF-8 or a field of the wrong type come back as OpenAI-style errors that
//! name the field.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

/// A JSON body of type `T`.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim().to_ascii_lowercase();
                v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
            });
        if !json {
            return Err(ApiError::bad_request(
                "the body must be JSON, sent with 'Content-Type: application/json'",
            )
            .with_code("invalid_content_type"));
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(usize::MAX, |l| l.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request(format!("cannot read the body: {}", e.body_text()))
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// The body limit, put in each request's extensions so that the 413 can name it.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// Parses `bytes` as `T`; errors name the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Serde would read a struct from an array too; requests are objects.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            ApiError::bad_request("the body must be a JSON object").with_code("invalid_json")
        );
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let v: T = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || inner.is_io() {
            return ApiError::bad_request(format!("the body is not valid JSON: {inner}"))
                .with_code("invalid_json");
        }
        let msg = inner.to_string();
        // A missing field is reported at its parent; name the field itself.
        let param = match msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            Some(f) if path == "." => f.to_string(),
            Some(f) => format!("{path}.{f}"),
            None if path == "." => String::new(),
            None => path,
        };
        let msg = if param.is_empty() {
            format!("invalid request body: {msg}")
        } else {
            format!("invalid value for '{param}': {msg}")
        };
        let e = ApiError::bad_request(msg);
        if param.is_empty() {
            e
        } else {
            e.with_param(param)
        }
    })?;
    de.end().map_err(|e| {
        ApiError::bad_request(format!("the body is not valid JSON: {e}")).with_code("invalid_json")
    })?;
    Ok(v)
}
