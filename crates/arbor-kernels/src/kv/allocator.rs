//! Reference-counted page allocation.

use crate::KernelError;

/// Index of a page in the pool.
pub type PageId = u32;

/// Hands out pages and counts who holds each. A page with refcount 0 is free.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    refcount: Vec<u32>,
    free: Vec<PageId>,
}

impl BlockAllocator {
    pub fn new(num_pages: usize) -> Self {
        BlockAllocator {
            refcount: vec![0; num_pages],
            free: (0..num_pages as PageId).rev().collect(),
        }
    }

    /// Takes a free page with refcount 1.
    pub fn allocate(&mut self) -> Result<PageId, KernelError> {
        let p = self.free.pop().ok_or(KernelError::KvFull {
            needed: 1,
            free: 0,
            total: self.refcount.len(),
        })?;
        self.refcount[p as usize] = 1;
        Ok(p)
    }

    /// One more holder of `page` (a fork).
    pub fn retain(&mut self, page: PageId) {
        debug_assert!(self.refcount[page as usize] > 0, "retain of a free page");
        self.refcount[page as usize] += 1;
    }

    /// One holder fewer; returns true when the page became free.
    pub fn release(&mut self, page: PageId) -> bool {
        let rc = &mut self.refcount[page as usize];
        assert!(
            *rc > 0,
            "release of free page {page}: refcount would go negative"
        );
        *rc -= 1;
        if *rc == 0 {
            self.free.push(page);
            true
        } else {
            false
        }
    }

    pub fn refcount(&self, page: PageId) -> u32 {
        self.refcount[page as usize]
    }
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    pub fn num_total(&self) -> usize {
        self.refcount.len()
    }
    pub fn num_used(&self) -> usize {
        self.num_total() - self.num_free()
    }
}
