//! arbor-runtime: models. Configuration, weight loading (GGUF, safetensors), tokenizers and
//! chat templates, the transformer, and [`engine::Engine::step`], the only way a model runs.

pub mod config;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod model;
pub mod safetensors;
pub mod tokenizer;

pub use config::{Arch, ModelConfig};
pub use engine::{Engine, EngineOptions, ForwardBatch, LogitsMode, SeqOutput, SeqStep};
pub use error::RuntimeError;
pub use model::Model;
pub use tokenizer::{ChatMessage, ChatTemplate, IncrementalDecoder, TokenKind, Tokenizer};
