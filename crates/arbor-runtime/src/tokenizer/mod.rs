//! Tokenizers, incremental detokenisation and chat templates.
//!
//! One [`Tokenizer`] type serves every source: a GGUF file's embedded vocabulary (byte-level BPE
//! with llama.cpp's pre-tokenizers, or SentencePiece-style), reproducing llama.cpp's
//! tokenisation, or a Hugging Face `tokenizer.json` through the `tokenizers` crate.
//! [`IncrementalDecoder`] turns a stream of ids into text without splitting characters, and
//! [`ChatTemplate`] renders a model's Jinja chat template.

mod bpe;
mod byte_level;
mod chat_template;
mod from_gguf;
mod from_hf;
mod incremental;
mod pretokenize;
mod special;
mod spm;
mod unicode_class;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use incremental::{DetachedDecoder, IncrementalDecoder};

use crate::gguf::GgufFile;
use crate::RuntimeError;
use std::collections::HashMap;
use std::path::Path;

/// What a vocabulary entry is (GGUF `tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenKind {
    /// Ordinary text.
    Normal,
    /// The unknown-token placeholder.
    Unknown,
    /// A control token (BOS, EOS, chat markers): not text.
    Control,
    /// A token added by the model's authors that is matched in text before splitting.
    UserDefined,
    /// Reserved and never produced.
    Unused,
    /// A raw byte, `<0xXX>` (SentencePiece byte fallback).
    Byte,
    /// A token of no stated type.
    Undefined,
}

impl TokenKind {
    /// Control or unknown: not shown when decoding with `skip_special`.
    pub fn is_special(self) -> bool {
        matches!(self, TokenKind::Control | TokenKind::Unknown)
    }
}

/// How the first token's leading space is handled when decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LeadingSpace {
    /// Keep it.
    Keep,
    /// Strip one space from the first token of the sequence, whatever it is (llama.cpp, SPM).
    StripFirstToken,
    /// Strip one space from the first text that is emitted (HF `Strip`/`Metaspace` decoders).
    StripFirstEmitted,
}

/// The tokenisation algorithm.
enum Model {
    /// Byte-level BPE from GGUF.
    Bpe {
        merges: bpe::Merges,
        pre: pretokenize::PreTokenizer,
        ignore_merges: bool,
    },
    /// SentencePiece-style from GGUF.
    Spm {
        scores: Vec<f32>,
        add_space_prefix: bool,
    },
    /// A `tokenizer.json`.
    Hf(Box<from_hf::HfModel>),
}

/// A tokenizer: text ↔ token ids, special tokens and the chat template.
pub struct Tokenizer {
    texts: Vec<String>,
    kinds: Vec<TokenKind>,
    token_to_id: HashMap<String, u32>,
    /// The bytes each token stands for when special tokens are shown.
    pieces: Vec<Vec<u8>>,
    /// Control, user-defined and unknown tokens, longest text first (matched in text first).
    special_tokens: Vec<u32>,
    model: Model,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    leading_space: LeadingSpace,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.model {
            Model::Bpe { .. } => "bpe",
            Model::Spm { .. } => "spm",
            Model::Hf(_) => "tokenizer.json",
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eog)
            .finish()
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`; a `tokenizer_config.json` (and
    /// `generation_config.json`, `chat_template.jinja`) beside it supply BOS/EOS, whether BOS is
    /// added, and the chat template.
    pub fn from_file(path: &Path) -> Result<Self, RuntimeError> {
        from_hf::load(path)
    }

    /// Builds the tokenizer embedded in a GGUF file's metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, RuntimeError> {
        from_gguf::load(&file.header)
    }

    /// Builds the tokenizer from parsed GGUF metadata.
    pub fn from_gguf_header(header: &crate::gguf::GgufHeader) -> Result<Self, RuntimeError> {
        from_gguf::load(header)
    }

    /// Encodes `text`. `add_bos` prepends the BOS token (if the vocabulary has one);
    /// `parse_special` turns control tokens written in the text (e.g. `<|im_start|>`) into their
    /// ids, otherwise they are tokenised as plain text.
    pub fn encode(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, RuntimeError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            if let Some(bos) = self.bos {
                out.push(bos);
            }
        }
        match &self.model {
            Model::Hf(hf) => hf.encode(text, parse_special, &mut out)?,
            Model::Bpe {
                merges,
                pre,
                ignore_merges,
            } => {
                let mut word_buf = String::new();
                for frag in special::partition(self, text, parse_special) {
                    match frag {
                        special::Fragment::Token(id) => out.push(id),
                        special::Fragment::Text(t) => {
                            for word in pre.split(t)? {
                                word_buf.clear();
                                byte_level::encode_str(word, &mut word_buf);
                                self.bpe_word(&word_buf, merges, *ignore_merges, &mut out);
                            }
                        }
                    }
                }
            }
            Model::Spm {
                scores,
                add_space_prefix,
            } => {
                let mut prev_special = true;
                let mut buf = String::new();
                for frag in special::partition(self, text, parse_special) {
                    match frag {
                        special::Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        special::Fragment::Text(t) => {
                            buf.clear();
                            if *add_space_prefix && prev_special {
                                buf.push('▁');
                            }
                            for c in t.chars() {
                                buf.push(if c == ' ' { '▁' } else { c });
                            }
                            spm::tokenize(
                                &buf,
                                &self.token_to_id,
                                scores,
                                |b| self.byte_token(b),
                                &mut out,
                            );
                            prev_special = false;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn bpe_word(&self, word: &str, merges: &bpe::Merges, ignore_merges: bool, out: &mut Vec<u32>) {
        if ignore_merges {
            if let Some(&id) = self.token_to_id.get(word) {
                out.push(id);
                return;
            }
        }
        for (s, e) in bpe::merge_word(word, merges) {
            let piece = &word[s..e];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    // Not a token: fall back to the piece's single characters (bytes), dropping
                    // any that are not tokens either.
                    let mut tmp = [0u8; 4];
                    for c in piece.chars() {
                        if let Some(&id) = self.token_to_id.get(&*c.encode_utf8(&mut tmp)) {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    /// The token for a raw byte in a SentencePiece vocabulary: `<0xXX>`, else the byte itself as
    /// a one-character token, else the unknown token.
    fn byte_token(&self, b: u8) -> Option<u32> {
        let hex = format!("<0x{b:02X}>");
        self.token_to_id
            .get(&hex)
            .or_else(|| {
                std::str::from_utf8(&[b])
                    .ok()
                    .and_then(|s| self.token_to_id.get(s))
            })
            .copied()
            .or(self.unk)
    }

    /// Decodes ids to text. `skip_special` leaves out control and unknown tokens. Bytes that do
    /// not form valid UTF-8 become U+FFFD. Unknown ids are ignored.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        let mut state = DecodeState::default();
        for &id in ids {
            self.append_piece(id, skip_special, &mut state, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Appends the bytes of one token as [`Tokenizer::decode`] shows them.
    pub(crate) fn append_piece(
        &self,
        id: u32,
        skip_special: bool,
        state: &mut DecodeState,
        out: &mut Vec<u8>,
    ) {
        let first = !state.started;
        state.started = true;
        let Some(piece) = self.pieces.get(id as usize) else {
            return;
        };
        if skip_special && self.kinds[id as usize].is_special() {
            return;
        }
        let strip = match self.leading_space {
            LeadingSpace::Keep => false,
            LeadingSpace::StripFirstToken => first,
            LeadingSpace::StripFirstEmitted => !state.emitted && !piece.is_empty(),
        };
        if !piece.is_empty() {
            state.emitted = true;
        }
        let piece = if strip {
            piece.strip_prefix(b" ").unwrap_or(piece)
        } else {
            piece
        };
        out.extend_from_slice(piece);
    }

    /// The bytes token `id` stands for (its text for special tokens); empty for an unknown id.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces
            .get(id as usize)
            .map(|p| p.as_slice())
            .unwrap_or(&[])
    }

    /// The vocabulary's own text for `id` (e.g. `Ġthe`, `▁the`, `<0x0A>`, `<|im_end|>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.texts.get(id as usize).map(|s| s.as_str())
    }

    /// The kind of token `id`.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// The id of the token whose vocabulary text is exactly `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Number of ids (one more than the largest id).
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token itself.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Every token that ends generation: EOS plus end-of-turn tokens (`<|im_end|>`,
    /// `<|eot_id|>`, `<|endoftext|>`, ...), sorted.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eog
    }

    /// Whether `id` ends generation.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// Whether the model expects BOS to be added to a prompt.
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// The chat template source (GGUF `tokenizer.chat_template` or `tokenizer_config.json`).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Tokenises a prompt: as one user turn through the chat template when `chat` (an error
    /// if the model has none), else as plain text with the model's default BOS.
    pub fn encode_prompt(&self, text: &str, chat: bool) -> Result<Vec<u32>, RuntimeError> {
        if chat {
            let rendered = self.apply_chat_template(&[ChatMessage::new("user", text)], true)?;
            // The template writes BOS itself where the model wants one.
            self.encode(&rendered, false, true)
        } else {
            self.encode(text, self.add_bos_default(), false)
        }
    }

    /// Renders the tokenizer's own chat template with its BOS/EOS texts.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, RuntimeError> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or_else(|| RuntimeError::ChatTemplate("the model has no chat template".into()))?;
        let text = |id: Option<u32>| id.and_then(|i| self.token_text(i)).unwrap_or("");
        ChatTemplate::new(source)?.render(
            messages,
            add_generation_prompt,
            text(self.bos),
            text(self.eos),
        )
    }
}

/// Per-sequence state of decoding (leading-space handling).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DecodeState {
    started: bool,
    emitted: bool,
}

/// Control, user-defined and unknown token ids, longest text first (ties by id): the order in
/// which special tokens are searched for in text.
pub(crate) fn special_token_order(texts: &[String], kinds: &[TokenKind]) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..texts.len() as u32)
        .filter(|&i| {
            matches!(
                kinds[i as usize],
                TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
            )
        })
        .collect();
    ids.sort_by(|&a, &b| {
        texts[b as usize]
            .len()
            .cmp(&texts[a as usize].len())
            .then(a.cmp(&b))
    });
    ids
}
