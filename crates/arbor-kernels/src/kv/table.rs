//! A sequence's block table: which page holds which run of its positions.

use super::PageId;

/// Pages of one sequence in position order; position `p` lives in `pages[p / page_size]`
/// at slot `p % page_size`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub pages: Vec<PageId>,
    /// Token positions written so far.
    pub len: usize,
}

impl BlockTable {
    /// (page, slot) of position `pos`.
    pub fn locate(&self, pos: usize, page_size: usize) -> (PageId, usize) {
        (self.pages[pos / page_size], pos % page_size)
    }
    /// Pages needed to hold `len` positions.
    pub fn pages_for(len: usize, page_size: usize) -> usize {
        len.div_ceil(page_size)
    }
}
