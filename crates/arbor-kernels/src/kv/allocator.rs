//! Reference-counted page allocation.
//!
//! A page is in one of three states: *in use* (refcount ≥ 1: some sequence's block table
//! holds it), *cached* (refcount 0 but kept by the prefix index for reuse) or *free*. The
//! allocator owns the refcounts and the free list; which refcount-0 pages are cached rather
//! than free is the prefix index's business (see [`super::KvCache`]).
//!
//! Free pages are handed out lowest id first, so that the top of the pool tends to be free
//! and [`BlockAllocator::resize`] can give it back when memory moves to another pool.

use crate::KernelError;
use std::collections::BTreeSet;

/// Index of a page in the pool.
pub type PageId = u32;

/// Hands out pages and counts who holds each.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    refcount: Vec<u32>,
    free: BTreeSet<PageId>,
    in_use: usize,
}

impl BlockAllocator {
    /// `num_pages` pages, all free.
    pub fn new(num_pages: usize) -> Self {
        BlockAllocator {
            refcount: vec![0; num_pages],
            free: (0..num_pages as PageId).collect(),
            in_use: 0,
        }
    }

    /// Takes a free page with refcount 1.
    pub fn allocate(&mut self) -> Result<PageId, KernelError> {
        let p = self.free.pop_first().ok_or(KernelError::KvFull {
            needed: 1,
            free: 0,
            total: self.refcount.len(),
        })?;
        self.refcount[p as usize] = 1;
        self.in_use += 1;
        Ok(p)
    }

    /// One more holder of `page`: a fork, or a cached page taken back into use. The page must
    /// not be on the free list.
    pub fn retain(&mut self, page: PageId) {
        let rc = &mut self.refcount[page as usize];
        if *rc == 0 {
            debug_assert!(!self.free.contains(&page), "retain of free page {page}");
            self.in_use += 1;
        }
        *rc += 1;
    }

    /// One holder fewer; returns true when nobody holds the page any more. The caller then
    /// either caches it or hands it to [`BlockAllocator::put_free`].
    ///
    /// # Panics
    /// When the page has no holder (the refcount would go negative): a bookkeeping bug.
    pub fn release(&mut self, page: PageId) -> bool {
        let rc = &mut self.refcount[page as usize];
        assert!(
            *rc > 0,
            "release of unheld page {page}: refcount would go negative"
        );
        *rc -= 1;
        if *rc == 0 {
            self.in_use -= 1;
            true
        } else {
            false
        }
    }

    /// Returns an unheld page to the free list.
    pub fn put_free(&mut self, page: PageId) {
        debug_assert_eq!(self.refcount[page as usize], 0, "freeing held page {page}");
        let fresh = self.free.insert(page);
        debug_assert!(fresh, "page {page} freed twice");
    }

    /// Whether `page` is on the free list.
    pub fn is_free(&self, page: PageId) -> bool {
        self.free.contains(&page)
    }

    /// The lowest free page, if any.
    pub fn lowest_free(&self) -> Option<PageId> {
        self.free.first().copied()
    }

    /// Moves the holders of `from` (in use or cached) to the free page `to`: `to` takes
    /// `from`'s refcount and leaves the free list, `from` joins it. The caller moves the K/V
    /// and every reference to the page.
    pub fn move_page(&mut self, from: PageId, to: PageId) {
        let taken = self.free.remove(&to);
        debug_assert!(
            taken,
            "moving page {from} onto page {to}, which is not free"
        );
        debug_assert!(!self.free.contains(&from), "moving free page {from}");
        self.refcount[to as usize] = std::mem::take(&mut self.refcount[from as usize]);
        self.free.insert(from);
    }

    /// Grows the pool to `target` pages (new pages free), or shrinks it towards `target` as far
    /// as the pages at the top are free; returns the pages the pool now has.
    pub fn resize(&mut self, target: usize) -> usize {
        let total = self.refcount.len();
        if target >= total {
            self.refcount.resize(target, 0);
            self.free.extend(total as PageId..target as PageId);
            return target;
        }
        let mut n = total;
        while n > target && self.free.contains(&(n as PageId - 1)) {
            n -= 1;
        }
        let _ = self.free.split_off(&(n as PageId));
        self.refcount.truncate(n);
        n
    }

    /// Holders of `page`.
    pub fn refcount(&self, page: PageId) -> u32 {
        self.refcount[page as usize]
    }
    /// Pages on the free list.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    /// Pages in the pool.
    pub fn num_total(&self) -> usize {
        self.refcount.len()
    }
    /// Pages with at least one holder.
    pub fn num_in_use(&self) -> usize {
        self.in_use
    }
    /// Pages that are neither held nor free: kept by the prefix index.
    pub fn num_cached(&self) -> usize {
        self.num_total() - self.in_use - self.free.len()
    }
    /// The free pages, lowest first (for consistency checks).
    pub fn free_pages(&self) -> impl Iterator<Item = PageId> + '_ {
        self.free.iter().copied()
    }
}
