//! arbor-runtime: models. Configuration, weight loading (GGUF, safetensors), tokenizers and
//! chat templates, the transformer, and [`engine::Engine::step`], the only way a model runs.

mod backend;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dummy;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod loader;
pub mod model;
mod moe_config;
pub mod reward;
pub mod safetensors;
pub mod stop;
pub mod tokenizer;

pub use config::{Arch, ModelConfig, MoeConfig};
pub use engine::{Engine, EngineOptions, ForwardBatch, LogitsMode, SeqOutput, SeqStep};
pub use error::RuntimeError;
pub use generate::{generate, FinishReason, GenerateOptions, GenerationStats};
pub use loader::{load, LoadedModel};
pub use model::Model;
pub use reward::{RewardHead, RewardKind};
pub use tokenizer::{
    ChatMessage, ChatTemplate, DetachedDecoder, IncrementalDecoder, TokenKind, Tokenizer,
};
