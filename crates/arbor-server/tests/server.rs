//! The HTTP server in-process on the tiny qwen2 fixture (127.0.0.1, port 0): bad input, the
//! OpenAI shapes, streaming, search, load, disconnects, timeouts, shutdown, and the official
//! `openai` Python client.

#[path = "server/api.rs"]
mod api;
#[path = "server/bad_input.rs"]
mod bad_input;
#[path = "server/common.rs"]
mod common;
#[path = "server/lifecycle.rs"]
mod lifecycle;
#[path = "server/load.rs"]
mod load;
#[path = "server/openai_py.rs"]
mod openai_py;
#[path = "server/sparse.rs"]
mod sparse;
