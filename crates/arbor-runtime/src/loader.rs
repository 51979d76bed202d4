//! Opening a model and its tokenizer from a path (a GGUF file or an HF model directory).

use crate::model::{Model, TensorSource};
use crate::tokenizer::Tokenizer;
use crate::RuntimeError;
use std::path::Path;
use std::time::Instant;

/// A model ready to run, with its tokenizer.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// Seconds spent loading.
    pub load_secs: f64,
}

/// Loads the model at `path` and the tokenizer that comes with it.
pub fn load(path: &Path) -> Result<LoadedModel, RuntimeError> {
    let t0 = Instant::now();
    if !path.exists() {
        return Err(RuntimeError::Io {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        });
    }
    let (cfg, src) = Model::open_source(path)?;
    let tokenizer = match &src {
        TensorSource::Gguf(f) => Tokenizer::from_gguf(f)?,
        TensorSource::Safetensors(_) => {
            let tj = path.join("tokenizer.json");
            if !tj.is_file() {
                return Err(RuntimeError::Tokenizer(format!(
                    "{} has no tokenizer.json: copy the model's tokenizer.json into the directory",
                    path.display()
                )));
            }
            Tokenizer::from_file(&tj)?
        }
        TensorSource::Memory(_) => unreachable!("open_source reads files"),
    };
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(RuntimeError::Tokenizer(format!(
            "the tokenizer has {} tokens but the model only {}: they do not belong together",
            tokenizer.vocab_size(),
            cfg.vocab_size
        )));
    }
    let model = Model::from_source(cfg, &src)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        load_secs: t0.elapsed().as_secs_f64(),
    })
}
