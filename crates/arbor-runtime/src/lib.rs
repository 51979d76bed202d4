//! arbor-runtime: models. Configuration, weight loading (GGUF, safetensors), tokenizers and
//! chat templates, the transformer, and [`engine::Engine::step`], the only way a model runs.

pub mod error;
pub mod gguf;

pub use error::RuntimeError;
