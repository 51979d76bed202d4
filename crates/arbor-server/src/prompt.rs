//! Prompts as requests give them, and their tokenisation on the engine thread (which owns
//! the tokenizer).

use arbor_runtime::{ChatMessage, Tokenizer};

/// A prompt before tokenisation.
#[derive(Clone, Debug)]
pub enum Input {
    /// Plain text, tokenised as is (with the model's default BOS; special tokens written in
    /// the text are parsed, as completion endpoints do).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
    /// One user turn, as `arbor search` sends its question: through the chat template, or as
    /// plain text with BOS for a model without one.
    UserTurn(String),
    /// A conversation, rendered through the model's chat template with the assistant's turn
    /// opened. A model without a template gets `role: content` lines and `assistant:`.
    Chat(Vec<ChatMessage>),
}

/// The token ids of `input`, or why it cannot be tokenised.
pub fn tokenize(tok: &Tokenizer, input: &Input) -> Result<Vec<u32>, String> {
    match input {
        Input::Text(t) => tok
            .encode(t, tok.add_bos_default(), true)
            .map_err(|e| e.to_string()),
        Input::Tokens(t) => Ok(t.clone()),
        Input::UserTurn(t) => tok
            .encode_prompt(t, tok.chat_template().is_some())
            .map_err(|e| e.to_string()),
        Input::Chat(m) if tok.chat_template().is_some() => {
            let rendered = tok
                .apply_chat_template(m, true)
                .map_err(|e| format!("the chat template rejected the messages: {e}"))?;
            // The template writes BOS itself where the model wants one.
            tok.encode(&rendered, false, true)
                .map_err(|e| e.to_string())
        }
        Input::Chat(m) => {
            let mut text: String = m
                .iter()
                .map(|m| format!("{}: {}\n", m.role, m.content))
                .collect();
            text.push_str("assistant:");
            tok.encode(&text, tok.add_bos_default(), false)
                .map_err(|e| e.to_string())
        }
    }
}
