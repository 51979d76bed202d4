//! A step's layout as the GPU kernels read it: flat per-row and per-sequence arrays
//! (FlashInfer style: `indptr` + `indices`), built on the host from the block tables, and
//! packed with the step's tokens and wanted rows into one `u32` buffer ([`StepMeta::pack`]) so
//! that a step uploads its metadata with one copy.

use crate::model::BatchLayout;
use crate::RuntimeError;
use arbor_kernels::kv::{BlockTable, SeqId};
use std::ops::Range;

/// The slot mapping of a padding row: beyond any pool, so its K/V is not stored.
pub const PAD_SLOT: u32 = u32::MAX;
/// The sequence index of a padding row: beyond every step's sequences, so attention writes
/// zeros for it and reads no page.
pub const PAD_SEQ: u32 = u32::MAX;

/// Everything the kernels need to know about one step's rows and pages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepMeta {
    /// Absolute position of each row.
    pub positions: Vec<u32>,
    /// Where each row's K/V goes: `page * page_size + slot`.
    pub slot_mapping: Vec<u32>,
    /// Index (in the batch) of each row's sequence.
    pub row_seq: Vec<u32>,
    /// Rows of sequence `i`: `seq_row_indptr[i]..seq_row_indptr[i+1]`.
    pub seq_row_indptr: Vec<u32>,
    /// Pages of sequence `i`: `page_indices[page_indptr[i]..page_indptr[i+1]]`, covering
    /// positions up to its last row.
    pub page_indptr: Vec<u32>,
    pub page_indices: Vec<u32>,
    /// Most rows any one sequence has in the step.
    pub max_rows_per_seq: usize,
    /// Longest context any row attends over (its position + 1).
    pub max_context: usize,
}

impl StepMeta {
    /// The layout of `batch`, whose sequences' pages are in `table(seq)` (reserved for the
    /// step's positions already).
    pub fn build<'a>(
        batch: &BatchLayout,
        table: impl Fn(SeqId) -> Option<&'a BlockTable>,
        page_size: usize,
    ) -> Result<Self, RuntimeError> {
        let rows = batch.rows();
        let mut m = StepMeta {
            positions: Vec::with_capacity(rows),
            slot_mapping: Vec::with_capacity(rows),
            row_seq: Vec::with_capacity(rows),
            seq_row_indptr: vec![0],
            page_indptr: vec![0],
            ..Default::default()
        };
        for (i, s) in batch.seqs.iter().enumerate() {
            let t = table(s.seq).ok_or_else(|| {
                RuntimeError::Request(format!("sequence {} has no KV cache", s.seq))
            })?;
            let mut last = 0;
            for r in s.rows() {
                let pos = batch.positions[r];
                let page = t.pages.get(pos / page_size).ok_or_else(|| {
                    RuntimeError::Request(format!(
                        "sequence {}: position {pos} has no reserved KV page",
                        s.seq
                    ))
                })?;
                m.positions.push(to_u32(pos)?);
                m.slot_mapping
                    .push(to_u32(*page as usize * page_size + pos % page_size)?);
                m.row_seq.push(to_u32(i)?);
                last = last.max(pos);
            }
            let pages = BlockTable::pages_for(last + 1, page_size);
            m.page_indices.extend_from_slice(&t.pages[..pages]);
            m.page_indptr.push(to_u32(m.page_indices.len())?);
            m.seq_row_indptr.push(to_u32(m.positions.len())?);
            m.max_rows_per_seq = m.max_rows_per_seq.max(s.len);
            m.max_context = m.max_context.max(last + 1);
        }
        Ok(m)
    }
}

/// One array's place in a packed buffer: `len` values from `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub len: usize,
}

impl Span {
    /// The span as an index range.
    pub fn range(self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// Where [`StepMeta::pack`] put each array. Rows and sequences count padding: `rows` rows of
/// which `real_rows` are the step's, `seqs` sequences of which `real_seqs` are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedLayout {
    pub rows: usize,
    pub seqs: usize,
    pub real_rows: usize,
    pub real_seqs: usize,
    /// Token of each row (`rows`).
    pub tokens: Span,
    /// Position of each row (`rows`).
    pub positions: Span,
    /// Slot mapping of each row (`rows`).
    pub slots: Span,
    /// Sequence of each row (`rows`).
    pub row_seq: Span,
    /// `seqs + 1` row offsets.
    pub seq_row_indptr: Span,
    /// `seqs + 1` offsets into the page indices.
    pub page_indptr: Span,
    /// Page ids of every sequence, concatenated.
    pub page_indices: Span,
    /// Rows whose logits are wanted.
    pub logit_rows: Span,
    /// Rows whose hidden states are wanted.
    pub hidden_rows: Span,
}

/// A step's metadata in one buffer, ready for one host-to-device copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Packed {
    pub data: Vec<u32>,
    pub layout: PackedLayout,
}

impl StepMeta {
    /// Packs the layout with the step's `tokens`, `logit_rows` and `hidden_rows`, in this
    /// order: tokens, positions, slots, row_seq (each `rows` long), seq_row_indptr,
    /// page_indptr (each `seqs + 1`), page_indices, logit_rows, hidden_rows.
    ///
    /// With `pad_to = Some(n)` (a CUDA graph's batch size) the step is padded to `n` rows and
    /// `n` sequences, so every array but the last three sits at an offset fixed by `n`: padding
    /// rows have token 0, position 0, slot [`PAD_SLOT`] and sequence [`PAD_SEQ`]; padding
    /// sequences own no rows and no pages. Errors: `tokens` not one per row, a row index or
    /// count beyond 32 bits, or more rows or sequences than `n`.
    pub fn pack(
        &self,
        tokens: &[u32],
        logit_rows: &[usize],
        hidden_rows: &[usize],
        pad_to: Option<usize>,
    ) -> Result<Packed, RuntimeError> {
        let real_rows = self.positions.len();
        let real_seqs = self.seq_row_indptr.len().saturating_sub(1);
        if tokens.len() != real_rows {
            return Err(RuntimeError::Request(format!(
                "{} tokens for a step of {real_rows} rows",
                tokens.len()
            )));
        }
        let (rows, seqs) = match pad_to {
            None => (real_rows, real_seqs),
            Some(n) if n >= real_rows && n >= real_seqs => (n, n),
            Some(n) => {
                return Err(RuntimeError::Request(format!(
                    "{real_rows} rows of {real_seqs} sequences do not fit a graph of {n} rows"
                )))
            }
        };
        let mut data = Vec::with_capacity(
            4 * rows
                + 2 * (seqs + 1)
                + self.page_indices.len()
                + logit_rows.len()
                + hidden_rows.len(),
        );
        let mut put = |vals: &mut dyn Iterator<Item = u32>| -> Span {
            let start = data.len();
            data.extend(vals);
            Span {
                start,
                len: data.len() - start,
            }
        };
        let pad_rows = rows - real_rows;
        let pad_seqs = seqs - real_seqs;
        let last = |v: &[u32]| v.last().copied().unwrap_or(0);
        let repeat = |v: u32, n: usize| std::iter::repeat_n(v, n);
        let tokens_s = put(&mut tokens.iter().copied().chain(repeat(0, pad_rows)));
        let positions = put(&mut self.positions.iter().copied().chain(repeat(0, pad_rows)));
        let slots = put(&mut self
            .slot_mapping
            .iter()
            .copied()
            .chain(repeat(PAD_SLOT, pad_rows)));
        let row_seq = put(&mut self
            .row_seq
            .iter()
            .copied()
            .chain(repeat(PAD_SEQ, pad_rows)));
        let rp = last(&self.seq_row_indptr);
        let seq_row_indptr = put(&mut self
            .seq_row_indptr
            .iter()
            .copied()
            .chain(repeat(rp, pad_seqs)));
        let pp = last(&self.page_indptr);
        let page_indptr = put(&mut self.page_indptr.iter().copied().chain(repeat(pp, pad_seqs)));
        let page_indices = put(&mut self.page_indices.iter().copied());
        let idx = |v: &[usize]| {
            v.iter()
                .map(|&r| to_u32(r))
                .collect::<Result<Vec<u32>, _>>()
        };
        let logit_rows = put(&mut idx(logit_rows)?.into_iter());
        let hidden_rows = put(&mut idx(hidden_rows)?.into_iter());
        to_u32(data.len())?;
        Ok(Packed {
            data,
            layout: PackedLayout {
                rows,
                seqs,
                real_rows,
                real_seqs,
                tokens: tokens_s,
                positions,
                slots,
                row_seq,
                seq_row_indptr,
                page_indptr,
                page_indices,
                logit_rows,
                hidden_rows,
            },
        })
    }
}

fn to_u32(x: usize) -> Result<u32, RuntimeError> {
    u32::try_from(x)
        .map_err(|_| RuntimeError::Request(format!("{x} does not fit the GPU's 32-bit indices")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_pages_and_slots_follow_the_tables() {
        let mut b = BatchLayout::default();
        b.push(7, 5, 3); // positions 5, 6, 7 of sequence 7
        b.push(9, 16, 1); // position 16 of sequence 9
        let t7 = BlockTable {
            pages: vec![3, 4],
            len: 5,
        };
        let t9 = BlockTable {
            pages: vec![3, 1, 2, 8, 6],
            len: 16,
        };
        let m = StepMeta::build(&b, |s| if s == 7 { Some(&t7) } else { Some(&t9) }, 4)
            .expect("valid layout");
        assert_eq!(m.positions, vec![5, 6, 7, 16]);
        // Position 5 is slot 1 of t7's second page (4); 16 is slot 0 of t9's fifth page (6).
        assert_eq!(m.slot_mapping, vec![17, 18, 19, 24]);
        assert_eq!(m.row_seq, vec![0, 0, 0, 1]);
        assert_eq!(m.seq_row_indptr, vec![0, 3, 4]);
        assert_eq!(m.page_indptr, vec![0, 2, 7]);
        assert_eq!(m.page_indices, vec![3, 4, 3, 1, 2, 8, 6]);
        assert_eq!(m.max_rows_per_seq, 3);
        assert_eq!(m.max_context, 17);
    }

    fn two_seqs() -> StepMeta {
        let mut b = BatchLayout::default();
        b.push(7, 5, 1);
        b.push(9, 16, 1);
        let t7 = BlockTable {
            pages: vec![3, 4],
            len: 5,
        };
        let t9 = BlockTable {
            pages: vec![2, 1],
            len: 16,
        };
        StepMeta::build(&b, |s| if s == 7 { Some(&t7) } else { Some(&t9) }, 16)
            .expect("valid layout")
    }

    #[test]
    fn packing_puts_every_array_after_the_last() {
        let m = two_seqs();
        let p = m.pack(&[11, 12], &[0, 1], &[1], None).expect("pack");
        let l = p.layout;
        assert_eq!((l.rows, l.seqs, l.real_rows, l.real_seqs), (2, 2, 2, 2));
        let spans = [
            l.tokens,
            l.positions,
            l.slots,
            l.row_seq,
            l.seq_row_indptr,
            l.page_indptr,
            l.page_indices,
            l.logit_rows,
            l.hidden_rows,
        ];
        let mut at = 0;
        for s in spans {
            assert_eq!(s.start, at, "{spans:?}");
            at += s.len;
        }
        assert_eq!(at, p.data.len());
        let get = |s: Span| p.data[s.range()].to_vec();
        assert_eq!(get(l.tokens), vec![11, 12]);
        assert_eq!(get(l.positions), m.positions);
        assert_eq!(get(l.slots), m.slot_mapping);
        assert_eq!(get(l.row_seq), m.row_seq);
        assert_eq!(get(l.seq_row_indptr), m.seq_row_indptr);
        assert_eq!(get(l.page_indptr), m.page_indptr);
        assert_eq!(get(l.page_indices), vec![3, 2, 1]);
        assert_eq!(get(l.logit_rows), vec![0, 1]);
        assert_eq!(get(l.hidden_rows), vec![1]);
    }

    #[test]
    fn padding_rows_store_nothing_and_attend_nothing() {
        let m = two_seqs();
        let p = m.pack(&[11, 12], &[], &[0], Some(4)).expect("pack");
        let l = p.layout;
        assert_eq!((l.rows, l.seqs, l.real_rows, l.real_seqs), (4, 4, 2, 2));
        let get = |s: Span| p.data[s.range()].to_vec();
        assert_eq!(get(l.tokens), vec![11, 12, 0, 0]);
        assert_eq!(get(l.positions), vec![5, 16, 0, 0]);
        assert_eq!(&get(l.slots)[2..], &[PAD_SLOT, PAD_SLOT]);
        assert_eq!(get(l.row_seq), vec![0, 1, PAD_SEQ, PAD_SEQ]);
        // Padding sequences own no rows and no pages.
        assert_eq!(get(l.seq_row_indptr), vec![0, 1, 2, 2, 2]);
        assert_eq!(get(l.page_indptr), vec![0, 1, 3, 3, 3]);
        assert_eq!(get(l.hidden_rows), vec![0]);
        // Offsets up to the page indices depend on the padded size alone.
        assert_eq!(l.page_indices.start, 4 * 4 + 2 * 5);
        let longer = StepMeta {
            page_indices: vec![9; 40],
            ..m.clone()
        };
        let q = longer.pack(&[1, 2], &[0, 1], &[], Some(4)).expect("pack");
        assert_eq!(q.layout.page_indices.start, l.page_indices.start);
        assert_eq!(q.layout.seq_row_indptr, l.seq_row_indptr);
    }

    #[test]
    fn packing_checks_its_inputs() {
        let m = two_seqs();
        assert!(m.pack(&[1], &[], &[], None).is_err(), "one token per row");
        assert!(
            m.pack(&[1, 2], &[], &[], Some(1)).is_err(),
            "two rows in a graph of one"
        );
        assert!(
            m.pack(&[1, 2], &[1 << 32], &[], None).is_err(),
            "row index beyond u32"
        );
        let p = m
            .pack(&[1, 2], &[], &[], Some(2))
            .expect("an exact fit needs no padding");
        assert_eq!(p, m.pack(&[1, 2], &[], &[], None).expect("pack"));
    }

    #[test]
    fn a_position_without_a_page_is_an_error() {
        let mut b = BatchLayout::default();
        b.push(1, 8, 1);
        let t = BlockTable {
            pages: vec![0, 1],
            len: 8,
        };
        let e = StepMeta::build(&b, |_| Some(&t), 4).expect_err("page 2 is missing");
        assert!(e.to_string().contains("no reserved KV page"), "{e}");
        assert!(StepMeta::build(&b, |_| None, 4).is_err());
    }
}
