//! Streaming detokenisation: text comes out as soon as it is complete UTF-8.

use super::{DecodeState, Tokenizer};

/// Turns a stream of token ids into text, returning from each [`push`](Self::push) only the
/// newly completed text. A multi-byte character split over several byte tokens comes out whole
/// once its last byte arrives; bytes that can never form valid UTF-8 come out as U+FFFD, as in
/// [`Tokenizer::decode`]. The concatenation of every `push` and [`finish`](Self::finish) equals
/// `decode` of all the ids.
pub struct IncrementalDecoder<'a> {
    tok: &'a Tokenizer,
    inner: DetachedDecoder,
}

impl<'a> IncrementalDecoder<'a> {
    /// A decoder that leaves out control tokens (as generated text is shown).
    pub fn new(tok: &'a Tokenizer) -> Self {
        Self::with_special(tok, true)
    }

    /// A decoder that shows control tokens' text unless `skip_special`.
    pub fn with_special(tok: &'a Tokenizer, skip_special: bool) -> Self {
        IncrementalDecoder {
            tok,
            inner: DetachedDecoder::new(skip_special),
        }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.inner.push(self.tok, id)
    }

    /// Ends the stream: whatever bytes are left (an incomplete character) as U+FFFD.
    pub fn finish(&mut self) -> String {
        self.inner.finish()
    }

    /// Whether bytes of an incomplete character are waiting.
    pub fn has_pending(&self) -> bool {
        self.inner.has_pending()
    }
}

/// The state of an [`IncrementalDecoder`] without the borrow of its tokenizer, for holders
/// that keep many streams beside one tokenizer (the scheduler): pass the tokenizer to each
/// call.
#[derive(Debug, Default)]
pub struct DetachedDecoder {
    skip_special: bool,
    state: DecodeState,
    pending: Vec<u8>,
}

impl DetachedDecoder {
    /// A decoder that leaves out control tokens if `skip_special`.
    pub fn new(skip_special: bool) -> Self {
        DetachedDecoder {
            skip_special,
            state: DecodeState::default(),
            pending: Vec::new(),
        }
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        tok.append_piece(id, self.skip_special, &mut self.state, &mut self.pending);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The prefix up to `valid` was just checked to be UTF-8.
                    out.push_str(&String::from_utf8_lossy(
                        &self.pending[start..start + valid],
                    ));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            start += valid + bad;
                        }
                        None => {
                            start += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Ends the stream: whatever bytes are left (an incomplete character) as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// Whether bytes of an incomplete character are waiting.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}
