//! Building a [`Tokenizer`] from a Hugging Face `tokenizer.json` (encoding through the
//! `tokenizers` crate) and the `tokenizer_config.json` / `generation_config.json` /
//! `chat_template.jinja` files beside it.

use super::{byte_level, special_token_order, LeadingSpace, Model, TokenKind, Tokenizer};
use crate::RuntimeError;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

/// The `tokenizers` model plus a copy that leaves special tokens in the text unparsed.
pub(crate) struct HfModel {
    parsing: tokenizers::Tokenizer,
    literal: OnceLock<tokenizers::Tokenizer>,
}

impl HfModel {
    pub fn encode(
        &self,
        text: &str,
        parse_special: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), RuntimeError> {
        let tok = if parse_special {
            &self.parsing
        } else {
            self.literal.get_or_init(|| {
                let mut t = self.parsing.clone();
                t.set_encode_special_tokens(true);
                t
            })
        };
        let enc = tok
            .encode_fast(text, false)
            .map_err(|e| RuntimeError::Tokenizer(format!("encode: {e}")))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, RuntimeError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(RuntimeError::Io {
            path: path.into(),
            source,
        }),
    }
}

/// A token given in `tokenizer_config.json` as a string or as `{"content": ...}`.
fn token_content(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
        _ => None,
    }
}

/// How the decoder turns vocabulary text into bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PieceStyle {
    ByteLevel,
    Metaspace,
    Plain,
}

fn json_mentions(v: &Value, ty: &str) -> bool {
    match v {
        Value::Object(o) => {
            o.get("type").and_then(|t| t.as_str()) == Some(ty)
                || o.values().any(|x| json_mentions(x, ty))
        }
        Value::Array(a) => a.iter().any(|x| json_mentions(x, ty)),
        _ => false,
    }
}

/// Whether the decoder strips one leading space (`Strip` with start ≥ 1, or a `Metaspace`
/// decoder that prepends a space).
fn strips_leading_space(decoder: &Value) -> bool {
    match decoder {
        Value::Object(o) => {
            let ty = o.get("type").and_then(|t| t.as_str());
            let strip =
                ty == Some("Strip") && o.get("start").and_then(|s| s.as_u64()).unwrap_or(0) >= 1;
            let meta = ty == Some("Metaspace")
                && (o
                    .get("prepend_scheme")
                    .and_then(|s| s.as_str())
                    .is_some_and(|s| s != "never")
                    || o.get("add_prefix_space").and_then(|s| s.as_bool()) == Some(true));
            strip || meta || o.values().any(strips_leading_space)
        }
        Value::Array(a) => a.iter().any(strips_leading_space),
        _ => false,
    }
}

pub(crate) fn load(path: &Path) -> Result<Tokenizer, RuntimeError> {
    let bytes = std::fs::read(path).map_err(|source| RuntimeError::Io {
        path: path.into(),
        source,
    })?;
    let raw: Value = serde_json::from_slice(&bytes)
        .map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", path.display())))?;
    let hf = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let generation = read_json(&dir.join("generation_config.json"))?.unwrap_or(Value::Null);

    // Vocabulary, with added tokens.
    let vocab = hf.get_vocab(true);
    let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
    let mut texts = vec![String::new(); n];
    for (text, &id) in &vocab {
        texts[id as usize] = text.clone();
    }
    let mut kinds = vec![TokenKind::Normal; n];
    for (id, t) in hf.get_added_tokens_decoder() {
        if let Some(k) = kinds.get_mut(id as usize) {
            *k = if t.special {
                TokenKind::Control
            } else {
                TokenKind::UserDefined
            };
        }
    }
    let decoder = raw.get("decoder").unwrap_or(&Value::Null);
    let style = if json_mentions(decoder, "ByteLevel") {
        PieceStyle::ByteLevel
    } else if json_mentions(decoder, "Metaspace")
        || json_mentions(decoder, "ByteFallback")
        || json_mentions(decoder, "Replace")
    {
        PieceStyle::Metaspace
    } else {
        PieceStyle::Plain
    };
    let byte_fallback = json_mentions(decoder, "ByteFallback");
    let pieces: Vec<Vec<u8>> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            if kinds[i] != TokenKind::Normal {
                return text.as_bytes().to_vec();
            }
            match style {
                PieceStyle::ByteLevel => byte_level::decode_str(text),
                PieceStyle::Metaspace => {
                    if byte_fallback {
                        if let Some(b) = text
                            .strip_prefix("<0x")
                            .and_then(|h| h.strip_suffix('>'))
                            .and_then(|h| u8::from_str_radix(h, 16).ok())
                        {
                            kinds[i] = TokenKind::Byte;
                            return vec![b];
                        }
                    }
                    text.replace('▁', " ").into_bytes()
                }
                PieceStyle::Plain => text.as_bytes().to_vec(),
            }
        })
        .collect();
    let token_to_id: HashMap<String, u32> = vocab;

    // Special tokens.
    let id_of = |v: Option<&Value>| token_content(v).and_then(|t| token_to_id.get(t).copied());
    // Without a config, BOS is the control token the post-processor puts first, if any.
    let first_added = || {
        let with = hf.encode_fast("a", true).ok()?.get_ids().first().copied()?;
        let without = hf.encode_fast("a", false).ok()?.get_ids().first().copied();
        (Some(with) != without && kinds.get(with as usize) == Some(&TokenKind::Control))
            .then_some(with)
    };
    let bos = id_of(config.get("bos_token")).or_else(|| {
        if config.is_null() {
            first_added()
        } else {
            None
        }
    });
    let eos = id_of(config.get("eos_token"));
    let unk = id_of(config.get("unk_token"));
    let add_bos = match config.get("add_bos_token").and_then(|v| v.as_bool()) {
        Some(b) => b,
        None => {
            // No setting: BOS is added when the post-processor puts it first.
            let with = hf
                .encode_fast("a", true)
                .map(|e| e.get_ids().first().copied())
                .ok()
                .flatten();
            bos.is_some() && with == bos
        }
    };
    let mut eog: Vec<u32> = eos.into_iter().collect();
    match generation.get("eos_token_id") {
        Some(Value::Number(x)) => eog.extend(x.as_u64().map(|v| v as u32)),
        Some(Value::Array(a)) => eog.extend(a.iter().filter_map(|x| x.as_u64()).map(|v| v as u32)),
        _ => {}
    }
    for &t in super::from_gguf::EOG_TEXTS {
        if let Some(&id) = token_to_id.get(t) {
            if kinds[id as usize] == TokenKind::Control {
                eog.push(id);
            }
        }
    }
    eog.retain(|&i| (i as usize) < n);
    eog.sort_unstable();
    eog.dedup();

    // Chat template: chat_template.jinja, else tokenizer_config.json (a string, or a list of
    // named templates of which "default" is used).
    let chat_template = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
        Ok(s) => Some(s),
        Err(_) => match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(String::from),
            _ => None,
        },
    };

    let leading_space = if strips_leading_space(decoder) {
        LeadingSpace::StripFirstEmitted
    } else {
        LeadingSpace::Keep
    };
    let special_tokens = special_token_order(&texts, &kinds);
    Ok(Tokenizer {
        texts,
        kinds,
        token_to_id,
        pieces,
        special_tokens,
        model: Model::Hf(Box::new(HfModel {
            parsing: hf,
            literal: OnceLock::new(),
        })),
        bos,
        eos,
        unk,
        eog,
        add_bos,
        leading_space,
        chat_template,
    })
}
