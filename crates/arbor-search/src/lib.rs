//! arbor-search: the engine's one scheduler, the search strategies and the verifiers.
//!
//! - [`tree`]: the search tree every strategy works on (what was expanded, scored, pruned
//!   and why), exportable as JSON for inspection and plotting;
//! - [`strategy`]: the event-driven interface strategies implement, and the contract every
//!   runner keeps;
//! - [`sim`]: a deterministic runner with a scripted policy and verifiers, for strategy tests.

pub mod answer;
pub mod params;
pub mod scheduler;
pub mod sim;
pub mod spec;
pub mod strategies;
pub mod strategy;
pub mod tree;
pub mod verifier;

pub use params::Params;
pub use scheduler::{
    Candidate, GenerateRequest, GenerateResult, Outcome, RequestId, Scheduler, SchedulerOptions,
    Scoring, SearchRequest, SearchResult, VerifierModel,
};
pub use strategy::{Action, Event, Strategy, TopToken, Until};
pub use tree::{Node, NodeId, NodeStatus, SearchTree, StopReason};
