//! How a step's rows are laid out: each sequence's new tokens are a contiguous run of rows.

use arbor_kernels::kv::SeqId;
use std::ops::Range;

/// One sequence's rows in the batch.
#[derive(Clone, Debug)]
pub struct SeqRows {
    pub seq: SeqId,
    /// First row of this sequence in the batch.
    pub start: usize,
    /// Number of new tokens (rows).
    pub len: usize,
}

impl SeqRows {
    pub fn rows(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// Row layout of a step: sequences and the absolute position of every row.
#[derive(Clone, Debug, Default)]
pub struct BatchLayout {
    pub seqs: Vec<SeqRows>,
    pub positions: Vec<usize>,
}

impl BatchLayout {
    /// Adds a sequence whose `len` new tokens start at position `pos0`.
    pub fn push(&mut self, seq: SeqId, pos0: usize, len: usize) {
        let start = self.positions.len();
        self.positions.extend(pos0..pos0 + len);
        self.seqs.push(SeqRows { seq, start, len });
    }
    pub fn rows(&self) -> usize {
        self.positions.len()
    }
}
