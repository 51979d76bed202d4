//! A model's KV cache: the pool, its allocator, the prefix index and every live sequence.
//!
//! Life of a step for one sequence: [`KvCache::reuse_prefix`] attaches cached pages that
//! already hold some of the new tokens, [`KvCache::reserve`] makes room for the rest (evicting
//! cached pages least recently used when the free list is empty, and copying a shared partial
//! last page before it is written), the model [`KvCache::write`]s each position's K/V, and
//! [`KvCache::commit`] appends the tokens and indexes every page that became full. A failed
//! step is undone by [`KvCache::truncate`] to the old length.
//!
//! A page's refcount is the number of block tables holding it. Full pages are indexed by their
//! token chain as soon as they are committed (a page whose chain is already indexed is swapped
//! for the indexed one, so duplicates do not outlive their step); indexed pages are never
//! written again. When the last holder lets go, an indexed page stays cached for reuse and an
//! unindexed one goes to the free list.

use super::prefix::{NodeId, PrefixIndex};
use super::{BlockAllocator, BlockTable, KvDtype, KvLayout, KvPool, KvStats, KvUsage, PageId};
use crate::KernelError;
use std::collections::HashMap;

/// Identifies a sequence in one engine's KV cache.
pub type SeqId = u64;

#[derive(Clone, Debug, Default)]
struct SeqKv {
    /// Pages in position order; `table.len` positions are committed. During a step the table
    /// may hold reserved pages past the committed length.
    table: BlockTable,
    /// The committed tokens (`table.len` of them).
    tokens: Vec<u32>,
    /// Index node of each full page, in order (`len / page_size` of them).
    nodes: Vec<NodeId>,
}

/// Pool + allocator + prefix index + sequences.
#[derive(Debug)]
pub struct KvCache {
    pub pool: KvPool,
    alloc: BlockAllocator,
    index: PrefixIndex,
    seqs: HashMap<SeqId, SeqKv>,
    /// Full pages are entered into (and deduplicated against) the prefix index.
    indexing: bool,
}

impl KvCache {
    /// A cache of `num_pages` pages with model key 0.
    pub fn new(layout: KvLayout, num_pages: usize) -> Self {
        Self::for_model(layout, num_pages, 0)
    }

    /// A cache for the model named by `model_key` (a fingerprint of its weights): only that
    /// model's sequences use it, and the prefix index reports the key.
    pub fn for_model(layout: KvLayout, num_pages: usize, model_key: u64) -> Self {
        Self::with_dtype(layout, num_pages, model_key, KvDtype::F32)
    }

    /// [`KvCache::for_model`] storing K and V as `dtype`.
    pub fn with_dtype(layout: KvLayout, num_pages: usize, model_key: u64, dtype: KvDtype) -> Self {
        KvCache {
            pool: KvPool::with_dtype(layout, num_pages, dtype),
            alloc: BlockAllocator::new(num_pages),
            index: PrefixIndex::new(num_pages, model_key),
            seqs: HashMap::new(),
            indexing: true,
        }
    }

    /// [`KvCache::for_model`] over a [`KvPool::detached`] pool: the bookkeeping of pages whose
    /// K/V live in device memory.
    pub fn detached(layout: KvLayout, num_pages: usize, model_key: u64) -> Self {
        KvCache {
            pool: KvPool::detached(layout, num_pages),
            alloc: BlockAllocator::new(num_pages),
            index: PrefixIndex::new(num_pages, model_key),
            seqs: HashMap::new(),
            indexing: true,
        }
    }

    /// Grows the cache to `target` pages, or shrinks it towards `target`: pages in use or
    /// kept by the prefix index above `target` first move into free pages below it
    /// ([`KvCache::compact`]), so the cache shrinks to `max(target, pages in use + cached)`.
    /// Returns the pages it now has.
    pub fn resize(&mut self, target: usize) -> usize {
        let held = self.alloc.num_in_use() + self.alloc.num_cached();
        let target = target.max(held);
        if target < self.alloc.num_total() {
            self.compact(target);
        }
        let n = self.alloc.resize(target);
        if n != self.pool.num_pages {
            self.index.resize(n);
            self.pool.resize(n);
        }
        n
    }

    /// Moves every page in use or cached at or above `target` into the lowest free page below
    /// it, while there is one: its K/V (the slots it holds), its refcount, every block table
    /// and prefix-index entry that names it. A detached pool records the copies for the device.
    /// Call between steps (no reservation in flight).
    pub fn compact(&mut self, target: usize) {
        let ps = self.page_size();
        let total = self.alloc.num_total();
        // Slots each page holds: the most any table's length covers; a page of the prefix
        // index is full whatever the tables say (a sequence truncated inside a page it shares
        // with the index covers only part of it).
        let mut slots = vec![ps; total];
        let mut seen = vec![false; total];
        for s in self.seqs.values() {
            for (i, &p) in s.table.pages.iter().enumerate() {
                if self.index.node_of(p).is_some() {
                    continue;
                }
                let held = s.table.len.saturating_sub(i * ps).min(ps);
                let e = &mut slots[p as usize];
                *e = if seen[p as usize] {
                    (*e).max(held)
                } else {
                    held
                };
                seen[p as usize] = true;
            }
        }
        let mut moved: HashMap<PageId, PageId> = HashMap::new();
        for from in (target..total).rev().map(|p| p as PageId) {
            if self.alloc.is_free(from) {
                continue;
            }
            let Some(to) = self.alloc.lowest_free().filter(|&t| (t as usize) < target) else {
                break;
            };
            self.pool.copy_page(from, to, slots[from as usize]);
            self.alloc.move_page(from, to);
            self.index.move_page(from, to);
            moved.insert(from, to);
        }
        if moved.is_empty() {
            return;
        }
        for s in self.seqs.values_mut() {
            for p in &mut s.table.pages {
                if let Some(&to) = moved.get(p) {
                    *p = to;
                }
            }
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.pool.layout
    }
    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }
    /// The model key given at creation.
    pub fn model_key(&self) -> u64 {
        self.index.model_key()
    }
    fn page_size(&self) -> usize {
        self.pool.layout.page_size
    }

    /// The block table of `seq`, if it is live.
    pub fn table(&self, seq: SeqId) -> Option<&BlockTable> {
        self.seqs.get(&seq).map(|s| &s.table)
    }

    /// The committed tokens of `seq`, if it is live.
    pub fn tokens(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.tokens.as_slice())
    }

    /// Committed positions of `seq` (0 if it is not live).
    pub fn len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.table.len)
    }

    /// Registers an empty sequence (no-op if it exists).
    pub fn add_seq(&mut self, seq: SeqId) {
        self.seqs.entry(seq).or_default();
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Number of live sequences.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Pages that can be had for new positions: free ones plus cached ones (every cached page
    /// can be evicted, leaves first, since a held page's whole chain is held).
    pub fn available_pages(&self) -> usize {
        self.alloc.num_free() + self.alloc.num_cached()
    }

    /// Whether writing position `len` of `s` needs its partial last page copied first.
    fn must_copy_last(&self, s: &SeqKv) -> bool {
        let ps = self.page_size();
        if s.table.len.is_multiple_of(ps) {
            return false;
        }
        let p = s.table.pages[s.table.len / ps];
        self.alloc.refcount(p) > 1 || self.index.node_of(p).is_some()
    }

    /// Pages that must be allocated for `seq` to take `n_new` more positions (counting a
    /// copy-on-write of a shared or indexed partial last page).
    pub fn pages_needed(&self, seq: SeqId, n_new: usize) -> usize {
        let Some(s) = self.seqs.get(&seq) else {
            return BlockTable::pages_for(n_new, self.page_size());
        };
        if n_new == 0 {
            return 0;
        }
        let grow = BlockTable::pages_for(s.table.len + n_new, self.page_size())
            .saturating_sub(s.table.pages.len());
        grow + usize::from(self.must_copy_last(s))
    }

    /// Pages a step growing each `(seq, n_new)` of `steps` needs together. Like the sum of
    /// [`KvCache::pages_needed`], except that when every holder of a shared partial last page
    /// writes in this step, the last of them writes in place instead of copying.
    pub fn pages_needed_batch(&self, steps: &[(SeqId, usize)]) -> usize {
        let ps = self.page_size();
        let mut total = 0;
        let mut writers: HashMap<PageId, u32> = HashMap::new();
        for &(seq, n) in steps {
            total += self.pages_needed(seq, n);
            let Some(s) = self.seqs.get(&seq) else {
                continue;
            };
            if n > 0 && self.must_copy_last(s) {
                let p = s.table.pages[s.table.len / ps];
                if self.index.node_of(p).is_none() {
                    *writers.entry(p).or_default() += 1;
                }
            }
        }
        let in_place = writers
            .iter()
            .filter(|(&p, &w)| w == self.alloc.refcount(p))
            .count();
        total - in_place
    }

    /// Attaches to `seq` the longest run of cached full pages that continues it with a prefix
    /// of `tokens[..max]`, and commits those tokens. Returns how many tokens were attached (a
    /// multiple of the page size; 0 unless `seq` ends on a page boundary).
    pub fn reuse_prefix(&mut self, seq: SeqId, tokens: &[u32], max: usize) -> usize {
        let ps = self.page_size();
        let Some(mut s) = self.seqs.remove(&seq) else {
            return 0;
        };
        let mut used = 0;
        if s.table.len.is_multiple_of(ps) {
            self.drop_reserved(&mut s);
            let mut at = s.nodes.last().copied().unwrap_or(self.index.root());
            for chunk in tokens[..max.min(tokens.len())].chunks_exact(ps) {
                let Some(n) = self.index.child(at, chunk) else {
                    break;
                };
                let page = self.index.page(n).expect("non-root node has a page");
                self.retain_indexed(n, page);
                self.index.touch(n);
                s.table.pages.push(page);
                s.table.len += ps;
                s.tokens.extend_from_slice(chunk);
                s.nodes.push(n);
                used += ps;
                at = n;
            }
        }
        self.seqs.insert(seq, s);
        used
    }

    /// Makes positions `len..len + n_new` of `seq` writable: allocates pages (evicting cached
    /// ones when none is free) and copies a shared or indexed partial last page before it is
    /// written. Fails with `KvFull`, changing nothing, when too few pages can be had.
    pub fn reserve(&mut self, seq: SeqId, n_new: usize) -> Result<(), KernelError> {
        let needed = self.pages_needed(seq, n_new);
        if needed > self.available_pages() {
            return Err(KernelError::KvFull {
                needed,
                free: self.available_pages(),
                total: self.alloc.num_total(),
            });
        }
        let ps = self.page_size();
        let mut s = self.seqs.remove(&seq).unwrap_or_default();
        if n_new > 0 && self.must_copy_last(&s) {
            let i = s.table.len / ps;
            let old = s.table.pages[i];
            let new = self.alloc_page()?;
            self.pool.copy_page(old, new, s.table.len % ps);
            self.release(old);
            s.table.pages[i] = new;
        }
        while s.table.pages.len() < BlockTable::pages_for(s.table.len + n_new, ps) {
            match self.alloc_page() {
                Ok(p) => s.table.pages.push(p),
                Err(e) => {
                    self.seqs.insert(seq, s);
                    return Err(e);
                }
            }
        }
        self.seqs.insert(seq, s);
        Ok(())
    }

    /// Writes K and V of one token of `seq` at `pos` (which `reserve` made writable).
    pub fn write(&mut self, layer: usize, seq: SeqId, pos: usize, k: &[f32], v: &[f32]) {
        let (page, slot) = self.seqs[&seq].table.locate(pos, self.page_size());
        self.pool.write(layer, page, slot, k, v);
    }

    /// With `false`, committed pages are not entered into the prefix index: they are never
    /// swapped for an identical indexed page nor kept after they are freed (a baseline
    /// without prefix sharing). Sequences committed meanwhile stay unindexed until their next
    /// commit with indexing on. Default `true`.
    pub fn set_indexing(&mut self, on: bool) {
        self.indexing = on;
    }

    /// Records that `tokens` were written after the committed positions of `seq`, and indexes
    /// every page they filled (or swaps it for the page already indexed under the same chain).
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32]) {
        let ps = self.page_size();
        let Some(mut s) = self.seqs.remove(&seq) else {
            return;
        };
        assert!(
            s.table.pages.len() >= BlockTable::pages_for(s.table.len + tokens.len(), ps),
            "commit of {} tokens to sequence {seq} beyond its reserved pages",
            tokens.len()
        );
        s.tokens.extend_from_slice(tokens);
        s.table.len += tokens.len();
        while self.indexing && s.nodes.len() < s.table.len / ps {
            let i = s.nodes.len();
            let parent = s.nodes.last().copied().unwrap_or(self.index.root());
            let chunk = &s.tokens[i * ps..(i + 1) * ps];
            let own = s.table.pages[i];
            let node = match self.index.child(parent, chunk) {
                Some(n) => {
                    let page = self.index.page(n).expect("non-root node has a page");
                    if page != own {
                        self.retain_indexed(n, page);
                        self.release(own);
                        s.table.pages[i] = page;
                    }
                    self.index.touch(n);
                    n
                }
                None => {
                    debug_assert!(self.index.node_of(own).is_none());
                    self.index.insert(parent, chunk, own)
                }
            };
            s.nodes.push(node);
        }
        self.seqs.insert(seq, s);
    }

    /// `child` shares every committed page of `parent` (refcount +1 each); a shared partial
    /// last page is copied only when one of them writes into it.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<(), KernelError> {
        let mut s =
            self.seqs.get(&parent).cloned().ok_or_else(|| {
                KernelError::Invalid(format!("fork of unknown sequence {parent}"))
            })?;
        if self.seqs.contains_key(&child) {
            return Err(KernelError::Invalid(format!(
                "fork into existing sequence {child}"
            )));
        }
        s.table
            .pages
            .truncate(BlockTable::pages_for(s.table.len, self.page_size()));
        for &p in &s.table.pages {
            self.alloc.retain(p);
        }
        self.seqs.insert(child, s);
        Ok(())
    }

    /// Drops positions `new_len..` of `seq` and any reserved pages past them (used to roll
    /// back a failed step or a rejected branch).
    pub fn truncate(&mut self, seq: SeqId, new_len: usize) {
        let ps = self.page_size();
        if let Some(mut s) = self.seqs.remove(&seq) {
            let len = new_len.min(s.table.len);
            s.table.len = len;
            s.tokens.truncate(len);
            s.nodes.truncate(len / ps);
            self.drop_reserved(&mut s);
            self.seqs.insert(seq, s);
        }
    }

    /// Releases pages past the committed length.
    fn drop_reserved(&mut self, s: &mut SeqKv) {
        let keep = BlockTable::pages_for(s.table.len, self.page_size());
        while s.table.pages.len() > keep {
            let p = s.table.pages.pop().expect("non-empty");
            self.release(p);
        }
    }

    /// Releases every page of `seq` and forgets it. Its full pages stay cached for reuse.
    pub fn free_seq(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            for &p in s.table.pages.iter().rev() {
                self.release(p);
            }
        }
    }

    /// Evicts up to `pages` cached pages, least recently used first; returns how many.
    pub fn evict(&mut self, pages: usize) -> usize {
        let mut n = 0;
        while n < pages {
            let Some((parent, page)) = self.index.pop_lru() else {
                break;
            };
            self.alloc.put_free(page);
            self.mark_if_evictable(parent);
            n += 1;
        }
        n
    }

    /// A page for new K/V: from the free list, or by evicting the least recently used cached
    /// page.
    fn alloc_page(&mut self) -> Result<PageId, KernelError> {
        if self.alloc.num_free() == 0 {
            self.evict(1);
        }
        self.alloc.allocate()
    }

    fn retain_indexed(&mut self, n: NodeId, page: PageId) {
        if self.alloc.refcount(page) == 0 {
            self.index.set_evictable(n, false);
        }
        self.alloc.retain(page);
    }

    /// One holder fewer; an unheld page is cached if indexed (its recency counted from now, so
    /// a prefix held until just now outlives one released long ago), freed otherwise.
    fn release(&mut self, page: PageId) {
        if self.alloc.release(page) {
            match self.index.node_of(page) {
                Some(n) => {
                    self.index.touch(n);
                    self.mark_if_evictable(n);
                }
                None => self.alloc.put_free(page),
            }
        }
    }

    fn mark_if_evictable(&mut self, n: NodeId) {
        if let Some(page) = self.index.page(n) {
            if self.alloc.refcount(page) == 0 && !self.index.has_children(n) {
                self.index.set_evictable(n, true);
            }
        }
    }

    /// Page counts and token counts of the whole cache.
    pub fn stats(&self) -> KvStats {
        let all: Vec<SeqId> = self.seqs.keys().copied().collect();
        let usage = self.usage(&all);
        KvStats {
            page_size: self.page_size(),
            page_bytes: self.pool.page_bytes(),
            pages_total: self.alloc.num_total(),
            pages_in_use: self.alloc.num_in_use(),
            pages_cached: self.alloc.num_cached(),
            pages_free: self.alloc.num_free(),
            seqs: self.seqs.len(),
            tokens_held: self.seqs.values().map(|s| s.table.len).sum(),
            unique_tokens: usage.unique_tokens,
        }
    }

    /// What the sequences `seqs` hold together (a sequence, a branch's subtree, a search):
    /// distinct pages, distinct token positions, and how many pages dropping all of them would
    /// release (pages nobody outside the set holds). Unknown ids are ignored.
    pub fn usage(&self, seqs: &[SeqId]) -> KvUsage {
        let ps = self.page_size();
        // Per page: holders within the set and the most slots any of them fills.
        let mut pages: HashMap<PageId, (u32, usize)> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for id in seqs {
            let Some(s) = self.seqs.get(id).filter(|_| seen.insert(*id)) else {
                continue;
            };
            for (i, &p) in s.table.pages.iter().enumerate() {
                let filled = s.table.len.saturating_sub(i * ps).min(ps);
                let e = pages.entry(p).or_insert((0, 0));
                e.0 += 1;
                e.1 = e.1.max(filled);
            }
        }
        KvUsage {
            pages: pages.len(),
            unique_tokens: pages.values().map(|&(_, f)| f).sum(),
            freeable_pages: pages
                .iter()
                .filter(|(&p, &(holders, _))| holders == self.alloc.refcount(p))
                .count(),
        }
    }

    /// Checks every bookkeeping invariant; returns the first violation. For tests and debug
    /// builds: it walks every page and sequence.
    pub fn check(&self) -> Result<(), String> {
        let ps = self.page_size();
        let a = &self.alloc;
        if a.num_in_use() + a.num_cached() + a.num_free() != a.num_total() {
            return Err("in use + cached + free != total".into());
        }
        let mut holders = vec![0u32; a.num_total()];
        for (id, s) in &self.seqs {
            let nodes_ok = match self.indexing {
                true => s.nodes.len() == s.table.len / ps,
                false => s.nodes.len() <= s.table.len / ps,
            };
            if s.tokens.len() != s.table.len || !nodes_ok {
                return Err(format!("sequence {id}: tokens, length and nodes disagree"));
            }
            if s.table.pages.len() < BlockTable::pages_for(s.table.len, ps) {
                return Err(format!("sequence {id}: too few pages for its length"));
            }
            for (i, &n) in s.nodes.iter().enumerate() {
                if self.index.page(n) != Some(s.table.pages[i]) {
                    return Err(format!("sequence {id}: page {i} is not its index node's"));
                }
            }
            for &p in &s.table.pages {
                holders[p as usize] += 1;
            }
        }
        let mut cached = 0;
        let mut indexed = vec![false; a.num_total()];
        for (n, p) in self.index.pages() {
            indexed[p as usize] = true;
            let unheld = a.refcount(p) == 0;
            cached += usize::from(unheld);
            let leaf = !self.index.has_children(n);
            if self.index.is_evictable(n) != (unheld && leaf) {
                return Err(format!("page {p}: evictable flag is wrong"));
            }
            let parent = self.index.parent(n);
            if let Some(pp) = self.index.page(parent) {
                if unheld && a.refcount(pp) > 0 {
                    // Fine: a cached child under a held parent.
                } else if !unheld && a.refcount(pp) == 0 {
                    return Err(format!("page {p} is held but its parent {pp} is not"));
                }
            }
        }
        if cached != a.num_cached() || self.index.num_evictable() > cached {
            return Err(format!(
                "{cached} indexed unheld pages, allocator says {} cached",
                a.num_cached()
            ));
        }
        let mut free = vec![false; a.num_total()];
        for p in a.free_pages() {
            if std::mem::replace(&mut free[p as usize], true) {
                return Err(format!("page {p} is on the free list twice"));
            }
        }
        for (p, &h) in holders.iter().enumerate() {
            let p = p as PageId;
            if h != a.refcount(p) {
                return Err(format!(
                    "page {p}: refcount {} but {h} holders",
                    a.refcount(p)
                ));
            }
            if free[p as usize] && (h > 0 || indexed[p as usize]) {
                return Err(format!("page {p} is free but held or indexed"));
            }
        }
        Ok(())
    }
}
