//! SentencePiece-style (llama.cpp "llama" vocabulary) tokenisation: start from UTF-8 characters,
//! repeatedly merge the adjacent pair whose concatenation is a token with the highest score
//! (leftmost on ties), then map leftovers that are not tokens to byte tokens.

use super::bpe::{char_symbols, Symbol};
use std::collections::{BinaryHeap, HashMap};

struct Candidate {
    score: f32,
    left: usize,
    size: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Higher score first; on equal scores the smaller left index first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Tokenises `text` (spaces already escaped as `▁`) and appends the ids to `out`.
/// `byte_token` maps a byte to its fallback token, if any.
pub(crate) fn tokenize(
    text: &str,
    token_to_id: &HashMap<String, u32>,
    scores: &[f32],
    byte_token: impl Fn(u8) -> Option<u32>,
    out: &mut Vec<u32>,
) {
    let mut symbols = char_symbols(text);
    let mut heap = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<Candidate>, symbols: &[Symbol], l: usize, r: usize| {
        let (a, b) = (symbols[l], symbols[r]);
        let size = a.len + b.len;
        if let Some(&id) = token_to_id.get(&text[a.start..a.start + size]) {
            if let Some(&score) = scores.get(id as usize) {
                heap.push(Candidate {
                    score,
                    left: l,
                    size,
                });
            }
        }
    };
    for i in 1..symbols.len() {
        push(&mut heap, &symbols, i - 1, i);
    }
    while let Some(Candidate { left: l, size, .. }) = heap.pop() {
        let Some(r) = symbols[l].next else { continue };
        if symbols[l].len == 0 || symbols[r].len == 0 || symbols[l].len + symbols[r].len != size {
            continue;
        }
        symbols[l].len = size;
        symbols[r].len = 0;
        symbols[l].next = symbols[r].next;
        if let Some(n) = symbols[r].next {
            symbols[n].prev = Some(l);
        }
        if let Some(p) = symbols[l].prev {
            push(&mut heap, &symbols, p, l);
        }
        if let Some(n) = symbols[l].next {
            push(&mut heap, &symbols, l, n);
        }
    }
    let mut i = if symbols.is_empty() { None } else { Some(0) };
    while let Some(k) = i {
        let s = symbols[k];
        let piece = &text[s.start..s.start + s.len];
        match token_to_id.get(piece) {
            Some(&id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(&byte_token)),
        }
        i = s.next;
    }
}
