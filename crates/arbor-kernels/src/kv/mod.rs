//! The paged KV cache: one pool of fixed-size pages per model, a reference-counted block
//! allocator, a radix prefix index that keeps finished pages for reuse, and per-sequence block
//! tables.
//!
//! Layout of the host pool: `[layer][kv_head][page][k|v][slot][head_dim]`, one head's pages
//! side by side so that attention, which walks a sequence's pages head by head, streams them
//! (the GPU pool keeps a page's heads together instead: `[layer][page][k|v][kv_head]…`). A
//! page holds `page_size` consecutive token positions of one sequence (or of a prefix several
//! sequences share: pages are reference counted so that forks share them).

mod allocator;
mod cache;
mod pool;
mod prefix;
mod stats;
mod summary;
mod table;

pub use allocator::{BlockAllocator, PageId};
pub use cache::{KvCache, SeqId};
pub use pool::{KvDtype, KvLayout, KvPool, KvRun};
pub use stats::{KvStats, KvUsage};
pub use summary::KeySummaries;
pub use table::BlockTable;
