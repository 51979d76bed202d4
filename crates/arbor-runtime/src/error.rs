//! Errors raised while loading or running a model.

use arbor_kernels::KernelError;
use std::path::PathBuf;

/// A runtime error. Messages name the problem and, where possible, what to do.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed GGUF file {path}: {detail}")]
    Gguf { path: PathBuf, detail: String },
    #[error("malformed safetensors file {path}: {detail}")]
    Safetensors { path: PathBuf, detail: String },
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("unsupported architecture '{0}': arbor runs llama, mistral, qwen2, qwen3, mixtral, qwen2_moe and qwen3_moe")]
    UnknownArchitecture(String),
    #[error("tensor {name}: {detail}")]
    Tensor { name: String, detail: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("prompt of {tokens} tokens does not fit the context of {context} tokens")]
    ContextOverflow { tokens: usize, context: usize },
    #[error("{0}")]
    Request(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}
