//! Request types of the endpoints (OpenAI shapes, plus arbor's search), their checks, and the
//! JSON extractor that answers every rejection in the OpenAI error shape.

pub mod chat;
pub mod common;
pub mod completions;
pub mod json;
pub mod search;
