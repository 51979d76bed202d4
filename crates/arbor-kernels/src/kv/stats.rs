//! What the KV cache holds, in pages, bytes and token positions.

/// Counts for the whole cache. `pages_in_use + pages_cached + pages_free == pages_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KvStats {
    /// Token positions per page.
    pub page_size: usize,
    /// Bytes of one page across all layers.
    pub page_bytes: usize,
    pub pages_total: usize,
    /// Held by at least one live sequence.
    pub pages_in_use: usize,
    /// Held by nobody but kept by the prefix index for reuse (evictable).
    pub pages_cached: usize,
    pub pages_free: usize,
    /// Live sequences.
    pub seqs: usize,
    /// Sum of the live sequences' lengths (a shared position counts once per holder).
    pub tokens_held: usize,
    /// Distinct token positions held (a shared position counts once).
    pub unique_tokens: usize,
}

impl KvStats {
    /// Bytes of the pages in use.
    pub fn bytes_in_use(&self) -> usize {
        self.pages_in_use * self.page_bytes
    }
    /// Bytes of K/V one token position needs.
    pub fn bytes_per_token(&self) -> usize {
        self.page_bytes / self.page_size.max(1)
    }
    /// Bytes of pages in use ÷ (distinct positions held × bytes per position): 1.0 means no
    /// copy and no slack; forks that copied their prefix would push it towards the number of
    /// branches. `None` when nothing is held.
    pub fn bytes_per_unique_token(&self) -> Option<f64> {
        (self.unique_tokens > 0)
            .then(|| (self.pages_in_use * self.page_size) as f64 / self.unique_tokens as f64)
    }
}

/// What a set of sequences holds together (see [`super::KvCache::usage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KvUsage {
    /// Distinct pages held by the set.
    pub pages: usize,
    /// Distinct token positions held by the set.
    pub unique_tokens: usize,
    /// Pages that would be released if every sequence of the set were dropped: those nobody
    /// outside the set holds. Shared pages free nothing until their last holder goes.
    pub freeable_pages: usize,
}
