//! A step's layout as the GPU kernels read it: flat per-row and per-sequence arrays
//! (FlashInfer style: `indptr` + `indices`), built on the host from the block tables.

use crate::model::BatchLayout;
use crate::RuntimeError;
use arbor_kernels::kv::{BlockTable, SeqId};

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
