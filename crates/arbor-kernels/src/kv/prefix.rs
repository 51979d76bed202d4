//! Radix index over page-sized token chunks: which page holds the K/V of a given chain of full
//! pages, so that a later request or branch with the same prefix attaches those pages instead
//! of computing them.
//!
//! Node `n` stands for the token chain root → … → n, one full page per edge; its page holds
//! the K/V of the chain's last chunk. A node's K/V depends on every token before it, which is
//! why the key is the whole path and not the chunk alone. Each model has its own cache and
//! index, named by a model key, so pages of one model never serve another.
//!
//! Eviction is least recently used, leaves first: a cached node is evictable when no sequence
//! holds its page and it has no children (a child's chain runs through its parent).

use super::PageId;
use std::collections::{BTreeSet, HashMap};

/// Index of a node of the prefix tree.
pub(crate) type NodeId = u32;

#[derive(Debug)]
struct Node {
    parent: NodeId,
    /// The chunk of tokens on the edge from the parent (empty for the root).
    chunk: Box<[u32]>,
    /// Page holding the chunk's K/V (`None` for the root).
    page: Option<PageId>,
    children: HashMap<Box<[u32]>, NodeId>,
    last_used: u64,
}

/// The prefix tree, its page → node map and its LRU order of evictable nodes.
#[derive(Debug)]
pub(crate) struct PrefixIndex {
    nodes: Vec<Option<Node>>,
    spare: Vec<NodeId>,
    root: NodeId,
    page_node: Vec<Option<NodeId>>,
    /// `(last_used, node)` of every evictable node.
    evictable: BTreeSet<(u64, NodeId)>,
    tick: u64,
    model_key: u64,
}

impl PrefixIndex {
    pub fn new(num_pages: usize, model_key: u64) -> Self {
        let root = Node {
            parent: 0,
            chunk: Box::new([]),
            page: None,
            children: HashMap::new(),
            last_used: 0,
        };
        PrefixIndex {
            nodes: vec![Some(root)],
            spare: Vec::new(),
            root: 0,
            page_node: vec![None; num_pages],
            evictable: BTreeSet::new(),
            tick: 0,
            model_key,
        }
    }

    /// The indexed page `from` now lives at `to` (compaction).
    pub fn move_page(&mut self, from: PageId, to: PageId) {
        if let Some(n) = self.page_node[from as usize].take() {
            self.node_mut(n).page = Some(to);
            self.page_node[to as usize] = Some(n);
        }
    }

    /// Follows the pool to `num_pages` pages (pages cut off must not be indexed).
    pub fn resize(&mut self, num_pages: usize) {
        debug_assert!(self.page_node[num_pages.min(self.page_node.len())..]
            .iter()
            .all(Option::is_none));
        self.page_node.resize(num_pages, None);
    }

    /// The model whose K/V the indexed pages hold.
    pub fn model_key(&self) -> u64 {
        self.model_key
    }

    pub fn root(&self) -> NodeId {
        self.root
    }

    fn node(&self, n: NodeId) -> &Node {
        self.nodes[n as usize].as_ref().expect("live node")
    }
    fn node_mut(&mut self, n: NodeId) -> &mut Node {
        self.nodes[n as usize].as_mut().expect("live node")
    }

    /// The node whose page is `page`, if the page is indexed.
    pub fn node_of(&self, page: PageId) -> Option<NodeId> {
        self.page_node[page as usize]
    }

    pub fn page(&self, n: NodeId) -> Option<PageId> {
        self.node(n).page
    }

    /// Child of `parent` along `chunk`.
    pub fn child(&self, parent: NodeId, chunk: &[u32]) -> Option<NodeId> {
        self.node(parent).children.get(chunk).copied()
    }

    pub fn has_children(&self, n: NodeId) -> bool {
        !self.node(n).children.is_empty()
    }

    pub fn parent(&self, n: NodeId) -> NodeId {
        self.node(n).parent
    }

    /// Marks `n` as just used (moves it to the back of the LRU order if it is evictable).
    pub fn touch(&mut self, n: NodeId) {
        self.tick += 1;
        let tick = self.tick;
        let node = self.node_mut(n);
        let old = std::mem::replace(&mut node.last_used, tick);
        if self.evictable.remove(&(old, n)) {
            self.evictable.insert((tick, n));
        }
    }

    /// Adds `chunk → page` under `parent`; the chunk must not be there yet.
    pub fn insert(&mut self, parent: NodeId, chunk: &[u32], page: PageId) -> NodeId {
        debug_assert!(
            self.page_node[page as usize].is_none(),
            "page {page} indexed twice"
        );
        self.tick += 1;
        let node = Node {
            parent,
            chunk: chunk.into(),
            page: Some(page),
            children: HashMap::new(),
            last_used: self.tick,
        };
        let id = match self.spare.pop() {
            Some(id) => {
                self.nodes[id as usize] = Some(node);
                id
            }
            None => {
                self.nodes.push(Some(node));
                (self.nodes.len() - 1) as NodeId
            }
        };
        let p = self.node_mut(parent);
        p.children.insert(chunk.into(), id);
        let last = p.last_used;
        self.evictable.remove(&(last, parent));
        self.page_node[page as usize] = Some(id);
        id
    }

    /// Sets whether `n` may be evicted (the cache knows whether its page is held).
    pub fn set_evictable(&mut self, n: NodeId, yes: bool) {
        let key = (self.node(n).last_used, n);
        if yes {
            self.evictable.insert(key);
        } else {
            self.evictable.remove(&key);
        }
    }

    pub fn num_evictable(&self) -> usize {
        self.evictable.len()
    }

    /// Removes the least recently used evictable node and returns it with its parent (which the
    /// cache may now mark evictable) and its page (which goes to the free list).
    pub fn pop_lru(&mut self) -> Option<(NodeId, PageId)> {
        let (_, n) = self.evictable.pop_first()?;
        let node = self.nodes[n as usize].take().expect("live node");
        debug_assert!(node.children.is_empty(), "evicting an inner node");
        self.node_mut(node.parent).children.remove(&node.chunk);
        self.spare.push(n);
        let page = node.page.expect("root is never evictable");
        self.page_node[page as usize] = None;
        Some((node.parent, page))
    }

    /// Every indexed `(node, page)`, for consistency checks.
    pub fn pages(&self) -> impl Iterator<Item = (NodeId, PageId)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| Some((i as NodeId, n.as_ref()?.page?)))
    }

    pub fn is_evictable(&self, n: NodeId) -> bool {
        self.evictable.contains(&(self.node(n).last_used, n))
    }
}
