//! arbor-search: the engine's one scheduler, the search strategies and the verifiers.
//!
//! - [`tree`]: the search tree every strategy works on (what was expanded, scored, pruned
//!   and why), exportable as JSON for inspection and plotting;
//! - [`strategy`]: the event-driven interface strategies implement.
//!
//! The scheduler (packing every search's sequences into one `ForwardBatch`), the strategies
//! and the verifiers arrive with the [search] issue; the runtime's `Engine::step` is their
//! only way to run a model.

pub mod strategy;
pub mod tree;

pub use strategy::{Action, Event, Strategy};
pub use tree::{Node, NodeId, NodeStatus, SearchTree};
