//! Building a [`Tokenizer`] from GGUF metadata (`tokenizer.ggml.*`), with llama.cpp's defaults
//! and its detection of end-of-turn and fill-in-the-middle tokens by their text.

use super::{
    bpe, byte_level, pretokenize, special_token_order, LeadingSpace, Model, TokenKind, Tokenizer,
};
use crate::gguf::{GgufHeader, MetaValue};
use crate::RuntimeError;
use std::collections::HashMap;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Tokenizer(msg.into())
}

fn string_array<'h>(h: &'h GgufHeader, key: &str) -> Result<Option<Vec<&'h str>>, RuntimeError> {
    let Some(v) = h.get(key) else { return Ok(None) };
    let arr = v.as_array().ok_or_else(|| {
        err(format!(
            "{key} is a {}, expected an array of strings",
            v.type_name()
        ))
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_str().ok_or_else(|| {
                err(format!(
                    "{key}[{i}] is a {}, expected a string",
                    x.type_name()
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn numeric_array<'h>(
    h: &'h GgufHeader,
    key: &str,
    n: usize,
) -> Result<Option<&'h [MetaValue]>, RuntimeError> {
    let Some(v) = h.get(key) else { return Ok(None) };
    let arr = v
        .as_array()
        .ok_or_else(|| err(format!("{key} is a {}, expected an array", v.type_name())))?;
    if arr.len() != n {
        return Err(err(format!(
            "{key} has {} entries but tokenizer.ggml.tokens has {n}",
            arr.len()
        )));
    }
    Ok(Some(arr))
}

fn kind_of(code: i64) -> TokenKind {
    match code {
        1 => TokenKind::Normal,
        2 => TokenKind::Unknown,
        3 => TokenKind::Control,
        4 => TokenKind::UserDefined,
        5 => TokenKind::Unused,
        6 => TokenKind::Byte,
        _ => TokenKind::Undefined,
    }
}

const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
];
/// Texts of end-of-generation tokens, as llama.cpp recognises them (shared with tokenizer.json).
pub(crate) const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
type KeysAndTexts = (&'static [&'static str], &'static [&'static str]);
const FIM_OTHER: &[KeysAndTexts] = &[
    (
        &[
            "tokenizer.ggml.fim_pre_token_id",
            "tokenizer.ggml.prefix_token_id",
        ],
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
        ],
    ),
    (
        &[
            "tokenizer.ggml.fim_suf_token_id",
            "tokenizer.ggml.suffix_token_id",
        ],
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
        ],
    ),
    (
        &[
            "tokenizer.ggml.fim_mid_token_id",
            "tokenizer.ggml.middle_token_id",
        ],
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
        ],
    ),
];

pub(crate) fn load(h: &GgufHeader) -> Result<Tokenizer, RuntimeError> {
    let model_name = h
        .get("tokenizer.ggml.model")
        .ok_or_else(|| err("the GGUF file has no tokenizer (tokenizer.ggml.model is missing)"))?;
    let model_name = model_name
        .as_str()
        .ok_or_else(|| err("tokenizer.ggml.model is not a string"))?;
    let is_bpe = match model_name {
        "gpt2" => true,
        "llama" => false,
        "bert" | "t5" | "rwkv" | "no_vocab" | "none" => {
            return Err(err(format!(
                "tokenizer model '{model_name}' is not supported; arbor reads 'gpt2' (byte-level BPE) and \
                 'llama' (SentencePiece) vocabularies"
            )))
        }
        other => return Err(err(format!("unknown tokenizer model '{other}' (tokenizer.ggml.model)"))),
    };

    let tokens = string_array(h, "tokenizer.ggml.tokens")?
        .ok_or_else(|| err("the GGUF file has no vocabulary (tokenizer.ggml.tokens is missing)"))?;
    let n = tokens.len();
    if n == 0 {
        return Err(err("tokenizer.ggml.tokens is empty"));
    }
    if n > u32::MAX as usize {
        return Err(err("tokenizer.ggml.tokens has too many entries"));
    }
    let types = numeric_array(h, "tokenizer.ggml.token_type", n)?;
    let scores = numeric_array(h, "tokenizer.ggml.scores", n)?;

    let mut texts = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut token_to_id = HashMap::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        let text = if t.is_empty() {
            format!("[EMPTY_{i}]")
        } else {
            t.to_string()
        };
        token_to_id.insert(text.clone(), i as u32);
        texts.push(text);
        let kind =
            match types {
                Some(ty) => kind_of(ty[i].as_i64().ok_or_else(|| {
                    err(format!("tokenizer.ggml.token_type[{i}] is not an integer"))
                })?),
                None => TokenKind::Normal,
            };
        kinds.push(kind);
    }

    let get_u32 = |key: &str| {
        h.get(key)
            .and_then(|v| v.as_u64())
            .filter(|&v| v < n as u64)
            .map(|v| v as u32)
    };
    let get_bool = |key: &str| h.get(key).and_then(|v| v.as_bool());

    // Algorithm and llama.cpp's defaults.
    let (model, mut bos, mut eos, mut unk, mut add_bos, leading_space) = if is_bpe {
        let merges = string_array(h, "tokenizer.ggml.merges")?.ok_or_else(|| {
            err("byte-level BPE vocabulary without merges (tokenizer.ggml.merges is missing)")
        })?;
        let pre_name = match h.get("tokenizer.ggml.pre") {
            Some(v) => v
                .as_str()
                .ok_or_else(|| err("tokenizer.ggml.pre is not a string"))?,
            None => "default",
        };
        let pre = pretokenize::PreTokenizer::for_name(pre_name)?;
        let bos = if pre.no_bos { None } else { Some(11) };
        let (ignore_merges, add_bos) = (pre.ignore_merges, pre.add_bos);
        let model = Model::Bpe {
            merges: bpe::Merges::new(merges.into_iter()),
            pre,
            ignore_merges,
        };
        // llama.cpp strips the first token's leading space on decoding whenever the vocabulary
        // says add_space_prefix, even for BPE (which never adds one).
        let lead = match get_bool("tokenizer.ggml.add_space_prefix") {
            Some(true) => LeadingSpace::StripFirstToken,
            _ => LeadingSpace::Keep,
        };
        (model, bos, Some(11), None, add_bos, lead)
    } else {
        let mut sc = Vec::with_capacity(n);
        if let Some(scores) = scores {
            for (i, s) in scores.iter().enumerate() {
                sc.push(
                    s.as_f64()
                        .ok_or_else(|| err(format!("tokenizer.ggml.scores[{i}] is not a number")))?
                        as f32,
                );
            }
        } else {
            sc.resize(n, 0.0);
        }
        let add_space_prefix = get_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let lead = if add_space_prefix {
            LeadingSpace::StripFirstToken
        } else {
            LeadingSpace::Keep
        };
        (
            Model::Spm {
                scores: sc,
                add_space_prefix,
            },
            Some(1),
            Some(2),
            Some(0),
            true,
            lead,
        )
    };
    let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
    bos = in_range(bos);
    eos = in_range(eos);
    unk = in_range(unk);
    if let Some(id) = get_u32("tokenizer.ggml.bos_token_id") {
        bos = Some(id);
    }
    if let Some(id) = get_u32("tokenizer.ggml.eos_token_id") {
        eos = Some(id);
    }
    if let Some(id) = get_u32("tokenizer.ggml.unknown_token_id") {
        unk = Some(id);
    }
    if let Some(b) = get_bool("tokenizer.ggml.add_bos_token") {
        add_bos = b;
    }

    // End-of-turn and fill-in-the-middle tokens: from their keys, else found by text (then made
    // control tokens), as llama.cpp does; then the end-of-generation set.
    let detect = |keys: &[&str], names: &[&str], kinds: &mut Vec<TokenKind>| -> Option<u32> {
        if let Some(id) = keys.iter().find_map(|k| get_u32(k)) {
            return Some(id);
        }
        let id = names
            .iter()
            .filter_map(|t| token_to_id.get(*t).copied())
            .min()?;
        kinds[id as usize] = TokenKind::Control;
        Some(id)
    };
    let eot = detect(&["tokenizer.ggml.eot_token_id"], EOT_TEXTS, &mut kinds);
    let eom = detect(
        &["tokenizer.ggml.eom_token_id"],
        &["<|eom_id|>"],
        &mut kinds,
    );
    for (keys, names) in FIM_OTHER {
        detect(keys, names, &mut kinds);
    }
    let mut eog = Vec::new();
    for (key, names) in [
        ("tokenizer.ggml.fim_pad_token_id", FIM_PAD_TEXTS),
        ("tokenizer.ggml.fim_rep_token_id", FIM_REP_TEXTS),
        ("tokenizer.ggml.fim_sep_token_id", FIM_SEP_TEXTS),
    ] {
        eog.extend(detect(&[key], names, &mut kinds));
    }
    for t in EOG_TEXTS {
        if let Some(&i) = token_to_id.get(*t) {
            eog.push(i);
            kinds[i as usize] = TokenKind::Control;
        }
    }
    eog.extend([eos, eot, eom].into_iter().flatten());
    eog.sort_unstable();
    eog.dedup();

    let spm = matches!(model, Model::Spm { .. });
    let pieces = texts
        .iter()
        .zip(&kinds)
        .map(|(text, kind)| match kind {
            TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined => {
                text.as_bytes().to_vec()
            }
            TokenKind::Normal if spm => text.replace('▁', " ").into_bytes(),
            TokenKind::Normal => byte_level::decode_str(text),
            TokenKind::Byte if spm => parse_byte_token(text).map(|b| vec![b]).unwrap_or_default(),
            _ => Vec::new(),
        })
        .collect();
    let special_tokens = special_token_order(&texts, &kinds);
    let chat_template = h
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(String::from);
    Ok(Tokenizer {
        texts,
        kinds,
        token_to_id,
        pieces,
        special_tokens,
        model,
        bos,
        eos,
        unk,
        eog,
        add_bos,
        leading_space,
        chat_template,
    })
}

/// `<0xXX>` → the byte.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}
