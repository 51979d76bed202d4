//! A model's KV cache: the pool, its allocator and the block table of every live sequence.

use super::{BlockAllocator, BlockTable, KvLayout, KvPool, PageId};
use crate::KernelError;
use std::collections::HashMap;

/// Identifies a sequence in one engine's KV cache.
pub type SeqId = u64;

/// Pool + allocator + block tables.
#[derive(Debug)]
pub struct KvCache {
    pub pool: KvPool,
    alloc: BlockAllocator,
    tables: HashMap<SeqId, BlockTable>,
}

impl KvCache {
    pub fn new(layout: KvLayout, num_pages: usize) -> Self {
        KvCache {
            pool: KvPool::new(layout, num_pages),
            alloc: BlockAllocator::new(num_pages),
            tables: HashMap::new(),
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.pool.layout
    }
    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    /// The block table of `seq`, if it is live.
    pub fn table(&self, seq: SeqId) -> Option<&BlockTable> {
        self.tables.get(&seq)
    }

    /// Registers an empty sequence (no-op if it exists).
    pub fn add_seq(&mut self, seq: SeqId) {
        self.tables.entry(seq).or_default();
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.tables.contains_key(&seq)
    }

    /// Pages that must be allocated for `seq` to grow to `new_len` positions (counting a
    /// copy-on-write of a shared partial last page).
    pub fn pages_needed(&self, seq: SeqId, new_len: usize) -> usize {
        let ps = self.pool.layout.page_size;
        let t = self.tables.get(&seq).cloned().unwrap_or_default();
        let grow = BlockTable::pages_for(new_len, ps).saturating_sub(t.pages.len());
        let cow = usize::from(new_len > t.len && !t.len.is_multiple_of(ps) && self.shared_last(&t));
        grow + cow
    }

    fn shared_last(&self, t: &BlockTable) -> bool {
        t.pages.last().is_some_and(|&p| self.alloc.refcount(p) > 1)
    }

    /// Makes positions `..new_len` of `seq` writable: allocates new pages and copies a shared
    /// partial last page before it is written. Fails with `KvFull` (changing nothing) when
    /// too few pages are free.
    pub fn reserve(&mut self, seq: SeqId, new_len: usize) -> Result<(), KernelError> {
        let needed = self.pages_needed(seq, new_len);
        if needed > self.alloc.num_free() {
            return Err(KernelError::KvFull {
                needed,
                free: self.alloc.num_free(),
                total: self.alloc.num_total(),
            });
        }
        let ps = self.pool.layout.page_size;
        let mut t = self.tables.remove(&seq).unwrap_or_default();
        if new_len > t.len && !t.len.is_multiple_of(ps) && self.shared_last(&t) {
            let old = *t.pages.last().expect("partial page exists");
            let new = self.alloc.allocate()?;
            self.pool.copy_page(old, new, t.len % ps);
            self.alloc.release(old);
            *t.pages.last_mut().expect("partial page exists") = new;
        }
        while t.pages.len() < BlockTable::pages_for(new_len, ps) {
            t.pages.push(self.alloc.allocate()?);
        }
        t.len = t.len.max(new_len);
        self.tables.insert(seq, t);
        Ok(())
    }

    /// Writes K and V of one token of `seq` at `pos` (which `reserve` made writable).
    pub fn write(&mut self, layer: usize, seq: SeqId, pos: usize, k: &[f32], v: &[f32]) {
        let (page, slot) = self.tables[&seq].locate(pos, self.pool.layout.page_size);
        self.pool.write(layer, page, slot, k, v);
    }

    /// `child` shares every page of `parent` (refcount +1 each); a shared partial last page is
    /// copied only when one of them writes into it.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), KernelError> {
        let t =
            self.tables.get(&parent).cloned().ok_or_else(|| {
                KernelError::Invalid(format!("fork of unknown sequence {parent}"))
            })?;
        if self.tables.contains_key(&child) {
            return Err(KernelError::Invalid(format!(
                "fork into existing sequence {child}"
            )));
        }
        for &p in &t.pages {
            self.alloc.retain(p);
        }
        self.tables.insert(child, t);
        Ok(())
    }

    /// Drops positions `new_len..` of `seq` (used to roll back), releasing whole pages past it.
    pub fn truncate(&mut self, seq: SeqId, new_len: usize) {
        let ps = self.pool.layout.page_size;
        if let Some(mut t) = self.tables.remove(&seq) {
            while t.pages.len() > BlockTable::pages_for(new_len, ps) {
                let p: PageId = t.pages.pop().expect("non-empty");
                self.alloc.release(p);
            }
            t.len = t.len.min(new_len);
            self.tables.insert(seq, t);
        }
    }

    /// Releases every page of `seq` and forgets it.
    pub fn free_seq(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            for p in t.pages {
                self.alloc.release(p);
            }
        }
    }

    /// Number of live sequences.
    pub fn num_seqs(&self) -> usize {
        self.tables.len()
    }
}
