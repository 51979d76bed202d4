//! Splitting text at special tokens written in it, before ordinary tokenisation (llama.cpp's
//! `tokenizer_st_partition`): each special token, longest text first, is searched in the text
//! fragments left by the earlier ones. Without `parse_special` only user-defined tokens are
//! matched; control and unknown tokens stay plain text.

use super::{TokenKind, Tokenizer};

/// A piece of the input: plain text still to tokenise, or a special token already matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

pub(crate) fn partition<'t>(
    tok: &Tokenizer,
    text: &'t str,
    parse_special: bool,
) -> Vec<Fragment<'t>> {
    let mut frags = if text.is_empty() {
        Vec::new()
    } else {
        vec![Fragment::Text(text)]
    };
    for &id in &tok.special_tokens {
        let kind = tok.kinds[id as usize];
        if !parse_special && matches!(kind, TokenKind::Control | TokenKind::Unknown) {
            continue;
        }
        let needle = tok.texts[id as usize].as_str();
        if needle.is_empty()
            || !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(needle)))
        {
            continue;
        }
        let mut next = Vec::with_capacity(frags.len() + 2);
        for frag in frags {
            let Fragment::Text(mut rest) = frag else {
                next.push(frag);
                continue;
            };
            while let Some(at) = rest.find(needle) {
                if at > 0 {
                    next.push(Fragment::Text(&rest[..at]));
                }
                next.push(Fragment::Token(id));
                rest = &rest[at + needle.len()..];
            }
            if !rest.is_empty() {
                next.push(Fragment::Text(rest));
            }
        }
        frags = next;
    }
    frags
}
