//! A search's anchors: for a node that may be expanded, a sequence holding its path minus the
//! last token. Siblings may share one: a token-level beam's top-k children all continue the
//! same sequence, and forking it for each of them at once would cost width² forks per round,
//! most of them pruned before they run. A shared anchor is forked only when a holder expands
//! while others still hold it; the last holder takes the sequence itself (no fork, and no
//! copy-on-write of its partial last page).
//!
//! A top-k offer (see [`crate::Action::ExpandTopK`]) holds the sequence that computed the
//! offered tokens, i.e. the whole path of the offering node: the anchor of any child made from
//! it. `Extend` hands it to the picked children, and it is freed if no open child takes it.

use crate::strategy::TopToken;
use crate::tree::NodeId;
use arbor_kernels::kv::SeqId;
use arbor_runtime::Engine;
use std::collections::HashMap;

#[derive(Debug, Default)]
pub(crate) struct Anchors {
    of: HashMap<NodeId, SeqId>,
    /// Nodes (and offers) holding each anchor sequence.
    holders: HashMap<SeqId, usize>,
    /// Top-k offers not yet taken up, by offering node.
    offers: HashMap<NodeId, (SeqId, Vec<TopToken>)>,
}

impl Anchors {
    pub fn get(&self, node: NodeId) -> Option<SeqId> {
        self.of.get(&node).copied()
    }

    pub fn contains(&self, node: NodeId) -> bool {
        self.of.contains_key(&node)
    }

    /// The distinct anchor sequences.
    pub fn seqs(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.holders.keys().copied()
    }

    /// Makes `seq` (also) the anchor of `node`, releasing the one it had.
    pub fn set(&mut self, engine: &mut Engine, node: NodeId, seq: SeqId) {
        if let Some(old) = self.of.insert(node, seq) {
            self.unhold(engine, old);
        }
        *self.holders.entry(seq).or_insert(0) += 1;
    }

    /// `node` no longer needs its anchor (nor its offer); a sequence is freed with its last
    /// holder.
    pub fn release(&mut self, engine: &mut Engine, node: NodeId) {
        if let Some(seq) = self.of.remove(&node) {
            self.unhold(engine, seq);
        }
        if let Some((seq, _)) = self.offers.remove(&node) {
            self.unhold(engine, seq);
        }
    }

    /// Records `node`'s top-k offer, held by `seq` (which has computed `node`'s whole path).
    pub fn offer(&mut self, engine: &mut Engine, node: NodeId, seq: SeqId, options: Vec<TopToken>) {
        if let Some((old, _)) = self.offers.insert(node, (seq, options)) {
            self.unhold(engine, old);
        }
        *self.holders.entry(seq).or_insert(0) += 1;
    }

    /// Takes up `node`'s offer: `make(option)` makes a child of each picked option and says
    /// whether it stays open, in which case the offer's sequence becomes its anchor. The
    /// sequence is freed if no child takes it. Errors (taking nothing) when `node` has no offer
    /// or a pick is out of its range.
    pub fn take_offer(
        &mut self,
        engine: &mut Engine,
        node: NodeId,
        picks: &[usize],
        mut make: impl FnMut(TopToken) -> (NodeId, bool),
    ) -> Result<Vec<NodeId>, String> {
        let (seq, options) = self
            .offers
            .remove(&node)
            .ok_or_else(|| format!("node {node} has no top-k offer to extend"))?;
        if let Some(&p) = picks.iter().find(|&&p| p >= options.len()) {
            let e = format!(
                "pick {p} of node {node}'s offer of {} tokens",
                options.len()
            );
            self.offers.insert(node, (seq, options)); // untouched: freed with the others
            return Err(e);
        }
        let mut children = Vec::with_capacity(picks.len());
        for &p in picks {
            let (child, open) = make(options[p]);
            if open {
                self.set(engine, child, seq);
            }
            children.push(child);
        }
        self.unhold(engine, seq);
        Ok(children)
    }

    /// A sequence of the caller's own holding `node`'s anchor, which `node` gives up: the
    /// anchor itself when `node` was its last holder, else a fork of it.
    pub fn claim(&mut self, engine: &mut Engine, node: NodeId) -> Result<SeqId, String> {
        let seq = self
            .get(node)
            .ok_or_else(|| format!("node {node} has no anchor"))?;
        if self.holders.get(&seq) == Some(&1) {
            self.of.remove(&node);
            self.holders.remove(&seq);
            return Ok(seq);
        }
        let fork = engine.fork_seq(seq).map_err(|e| e.to_string())?;
        self.release(engine, node);
        Ok(fork)
    }

    /// A fork of `node`'s anchor (which `node` keeps).
    pub fn fork(&self, engine: &mut Engine, node: NodeId) -> Result<SeqId, String> {
        let seq = self
            .get(node)
            .ok_or_else(|| format!("node {node} has no anchor"))?;
        engine.fork_seq(seq).map_err(|e| e.to_string())
    }

    /// Frees every anchor.
    pub fn free_all(&mut self, engine: &mut Engine) {
        for (seq, _) in self.holders.drain() {
            engine.free_seq(seq);
        }
        self.of.clear();
        self.offers.clear();
    }

    fn unhold(&mut self, engine: &mut Engine, seq: SeqId) {
        if let Some(n) = self.holders.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.holders.remove(&seq);
                engine.free_seq(seq);
            }
        }
    }
}
