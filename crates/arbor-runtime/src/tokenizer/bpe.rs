//! Byte-level BPE merging as llama.cpp does it: within each pre-tokenized word, repeatedly merge
//! the adjacent pair with the lowest merge rank (leftmost on ties) until no ranked pair is left.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// Merge ranks keyed by `"left right"` (the form merges are stored in).
pub(crate) struct Merges {
    ranks: HashMap<String, u32>,
}

impl Merges {
    /// Builds the rank table from merge lines in priority order; the first occurrence of a
    /// pair wins. A line without an inner space is the pair ("", "") as in llama.cpp.
    pub fn new<'a>(lines: impl Iterator<Item = &'a str>) -> Self {
        let mut ranks = HashMap::new();
        for (rank, line) in lines.enumerate() {
            let key = match line.bytes().skip(1).position(|b| b == b' ') {
                Some(_) => line.to_string(),
                None => " ".to_string(),
            };
            ranks.entry(key).or_insert(rank as u32);
        }
        Merges { ranks }
    }

    fn rank(&self, buf: &mut String, left: &str, right: &str) -> Option<u32> {
        buf.clear();
        buf.push_str(left);
        buf.push(' ');
        buf.push_str(right);
        self.ranks.get(buf.as_str()).copied()
    }
}

/// One piece of a word being merged: a byte range of the word, in a doubly linked list.
#[derive(Clone, Copy)]
pub(crate) struct Symbol {
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) prev: Option<usize>,
    pub(crate) next: Option<usize>,
}

/// One symbol per character of `text`, linked in order: where BPE and SPM merging start.
pub(crate) fn char_symbols(text: &str) -> Vec<Symbol> {
    let mut symbols: Vec<Symbol> = text
        .char_indices()
        .enumerate()
        .map(|(i, (start, c))| Symbol {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: Some(i + 1),
        })
        .collect();
    if let Some(last) = symbols.last_mut() {
        last.next = None;
    }
    symbols
}

/// Splits a byte-level encoded `word` into merged pieces (byte ranges of `word`), in order.
pub(crate) fn merge_word(word: &str, merges: &Merges) -> Vec<(usize, usize)> {
    let mut symbols = char_symbols(word);
    // (rank, left index, combined length): a popped entry is stale when the lengths changed.
    let mut heap: BinaryHeap<Reverse<(u32, usize, usize)>> = BinaryHeap::new();
    let mut buf = String::new();
    let text = |s: &Symbol| &word[s.start..s.start + s.len];
    let push =
        |heap: &mut BinaryHeap<_>, buf: &mut String, symbols: &[Symbol], l: usize, r: usize| {
            let (a, b) = (&symbols[l], &symbols[r]);
            if let Some(rank) = merges.rank(buf, text(a), text(b)) {
                heap.push(Reverse((rank, l, a.len + b.len)));
            }
        };
    for i in 1..symbols.len() {
        push(&mut heap, &mut buf, &symbols, i - 1, i);
    }
    while let Some(Reverse((_, l, size))) = heap.pop() {
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
            push(&mut heap, &mut buf, &symbols, p, l);
        }
        if let Some(n) = symbols[l].next {
            push(&mut heap, &mut buf, &symbols, l, n);
        }
    }
    symbols
        .iter()
        .filter(|s| s.len > 0)
        .map(|s| (s.start, s.start + s.len))
        .collect()
}
