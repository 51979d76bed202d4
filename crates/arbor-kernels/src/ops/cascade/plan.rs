//! The cascade plan: a batch's block tables turned into groups of (pages, query rows), once per
//! forward pass (every layer shares the block tables).
//!
//! The sequences' page lists form a prefix tree over page ids. A *group* is a node of that tree
//! after path compression: a maximal run of pages held by the same set of the batch's
//! sequences, at the same positions in each of them (a shared prompt, a shared stretch of a
//! beam, or one sequence's private suffix), together with every query row of those sequences
//! that can see part of it. A run longer than [`PlanOptions::max_group_pages`] is cut into
//! several groups with the same rows (split-K), so one long prefix still gives every thread
//! work. Groups are numbered level by level (parents before children).
//!
//! Positions: group `g` covers positions `first_page[g]·page_size ..
//! (first_page[g] + pages(g))·page_size` of each of its sequences. A query row at position `p`
//! (with sliding window `w`, if any) reads the positions of that range that lie in
//! `max(0, p + 1 − w) ..= p` (empty for a group past `p`: such a row is not listed in it). The
//! last page of a sequence is only partly written; a row never reads a slot past its own
//! position, and every slot up to it holds that sequence's K/V (the step's own rows are
//! written before attention). A page written in a step is private by then (copy-on-write in
//! [`crate::kv::KvCache::reserve`]), but a shared partial page is still read correctly: shared
//! pages are never written, so every holder sees the same values in the slots it can reach.
//!
//! Everything is flat `u32` arrays in CSR form (FlashInfer-style indptr/indices), so that a
//! GPU kernel can take the plan as it is.

use crate::kv::PageId;
use crate::KernelError;
use std::collections::HashMap;
use std::ops::Range;

/// [`CascadePlan::row_budget`] of a row without a sparse budget: it reads every page it sees.
pub const DENSE: u32 = u32::MAX;

/// [`CascadePlan::group_parent`] of a root group.
pub const NO_PARENT: u32 = u32::MAX;

/// One sequence of the batch as the plan sees it.
#[derive(Clone, Debug)]
pub struct PlanSeq<'a> {
    /// Its block table's pages in position order; every query row's position must have one.
    pub pages: &'a [PageId],
    /// Its query rows in the batch (their positions are `positions[rows]`).
    pub rows: Range<usize>,
    /// Sparse attention budget (pages per query row, see [`super::select_pages`]); `None`
    /// reads every page.
    pub sparse_budget: Option<usize>,
}

/// How groups are cut.
#[derive(Clone, Copy, Debug)]
pub struct PlanOptions {
    /// Most pages in one group; a longer run becomes several groups with the same rows.
    pub max_group_pages: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        // 1024 positions at 16 per page: long enough that a row's partials stay few.
        PlanOptions {
            max_group_pages: 64,
        }
    }
}

/// Groups of (page run, query rows) of one batch; see the module docs for what each covers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CascadePlan {
    /// Token positions per page.
    pub page_size: usize,
    /// Group `g`'s pages are `page_ids[group_page_indptr[g]..group_page_indptr[g + 1]]`.
    pub group_page_indptr: Vec<u32>,
    /// Page ids of every group, group after group.
    pub page_ids: Vec<PageId>,
    /// Index of each group's first page in its sequences' block tables.
    pub group_first_page: Vec<u32>,
    /// Sequences of the batch holding each group's pages (more than 1: shared).
    pub group_num_seqs: Vec<u32>,
    /// The group whose pages come just before each group's in its sequences, or [`NO_PARENT`].
    pub group_parent: Vec<u32>,
    /// Groups are numbered level by level (a root group is level 0, its children level 1, …);
    /// level `k` is groups `level_indptr[k]..level_indptr[k + 1]`. Row `r`'s `k`-th entry is in
    /// a level-`k` group, so a level's entries are contiguous too.
    pub level_indptr: Vec<u32>,
    /// Group `g`'s query rows are `group_rows[group_row_indptr[g]..group_row_indptr[g + 1]]`;
    /// an index into `group_rows` is an *entry*: one (group, row) partial result.
    pub group_row_indptr: Vec<u32>,
    /// Batch rows of every group, ascending within a group.
    pub group_rows: Vec<u32>,
    /// Absolute position of each batch row (it sees positions `..= row_pos[r]`).
    pub row_pos: Vec<u32>,
    /// Row `r`'s entries, root to leaf, are `row_entries[row_entry_indptr[r]..][..]`.
    pub row_entry_indptr: Vec<u32>,
    /// Entries (indices into `group_rows`) of every row.
    pub row_entries: Vec<u32>,
    /// Sparse budget of each row in pages, or [`DENSE`].
    pub row_budget: Vec<u32>,
}

/// A node of the prefix tree over page ids: one page at one depth of some path.
struct Node {
    page: PageId,
    depth: u32,
    children: Vec<u32>,
    /// Sequences whose (needed) pages end at this node.
    ends: u32,
    /// Sequences passing through this node.
    seqs: u32,
}

fn invalid(msg: String) -> KernelError {
    KernelError::Invalid(format!("cascade plan: {msg}"))
}

impl CascadePlan {
    /// Builds the plan of a batch whose rows sit at `positions` (one per row, `u32` range).
    /// Fails when a row lies beyond its sequence's pages, belongs to two sequences, or is
    /// missing from `positions`.
    pub fn build(
        seqs: &[PlanSeq],
        positions: &[usize],
        page_size: usize,
        opts: &PlanOptions,
    ) -> Result<Self, KernelError> {
        if page_size == 0 || positions.len() > u32::MAX as usize {
            return Err(invalid("page size 0 or too many rows".into()));
        }
        let max_group = opts.max_group_pages.max(1);
        let n_rows = positions.len();
        let mut row_budget = vec![DENSE; n_rows];
        let mut owned = vec![false; n_rows];
        // Prefix tree over the pages each sequence needs (up to its last row's page).
        let mut nodes: Vec<Node> = Vec::new();
        let mut roots: Vec<u32> = Vec::new();
        let mut child_of: HashMap<(u32, PageId), u32, BuildPairHasher> = HashMap::default();
        let mut paths: Vec<Vec<u32>> = Vec::with_capacity(seqs.len());
        for s in seqs {
            if s.rows.end > n_rows {
                return Err(invalid(format!("rows {:?} beyond {n_rows}", s.rows)));
            }
            let mut last = 0;
            for r in s.rows.clone() {
                if std::mem::replace(&mut owned[r], true) {
                    return Err(invalid(format!("row {r} belongs to two sequences")));
                }
                let pos = positions[r];
                if pos >= s.pages.len() * page_size || pos >= u32::MAX as usize {
                    return Err(invalid(format!(
                        "position {pos} lies beyond the {} pages of its sequence",
                        s.pages.len()
                    )));
                }
                last = last.max(pos / page_size + 1);
                row_budget[r] = s
                    .sparse_budget
                    .map_or(DENSE, |b| b.min(DENSE as usize - 1) as u32);
            }
            let mut path = Vec::with_capacity(last);
            let mut parent = u32::MAX; // the root
                                       // Sequences of one search sit side by side and share a prefix: while this one
                                       // follows the previous sequence's path, its nodes are found without a lookup.
            let prev: &[u32] = paths.last().map_or(&[], Vec::as_slice);
            let mut following = true;
            for (depth, &page) in s.pages[..last].iter().enumerate() {
                if following {
                    match prev.get(depth) {
                        Some(&n) if nodes[n as usize].page == page => {
                            nodes[n as usize].seqs += 1;
                            path.push(n);
                            parent = n;
                            continue;
                        }
                        _ => following = false,
                    }
                }
                let n = *child_of.entry((parent, page)).or_insert_with(|| {
                    nodes.push(Node {
                        page,
                        depth: depth as u32,
                        children: Vec::new(),
                        ends: 0,
                        seqs: 0,
                    });
                    let n = (nodes.len() - 1) as u32;
                    match parent {
                        u32::MAX => roots.push(n),
                        p => nodes[p as usize].children.push(n),
                    }
                    n
                });
                nodes[n as usize].seqs += 1;
                path.push(n);
                parent = n;
            }
            if let Some(&n) = path.last() {
                nodes[n as usize].ends += 1;
            }
            paths.push(path);
        }

        // Path compression, pre-order: a node continues its parent's group when it is the
        // parent's only child, no sequence ends at the parent, and the group is not full.
        let mut node_group = vec![0u32; nodes.len()];
        let mut group_pages: Vec<Vec<PageId>> = Vec::new();
        let (mut first_page, mut num_seqs, mut parent, mut level) =
            (vec![], vec![], vec![], vec![]);
        // (node, group it may continue, group of its parent node)
        let mut stack: Vec<(u32, Option<u32>, u32)> =
            roots.iter().rev().map(|&n| (n, None, NO_PARENT)).collect();
        while let Some((n, cont, up)) = stack.pop() {
            let node = &nodes[n as usize];
            let g = match cont {
                Some(g) if group_pages[g as usize].len() < max_group => g,
                _ => {
                    group_pages.push(Vec::new());
                    first_page.push(node.depth);
                    num_seqs.push(node.seqs);
                    parent.push(up);
                    level.push(if up == NO_PARENT {
                        0
                    } else {
                        level[up as usize] + 1
                    });
                    (group_pages.len() - 1) as u32
                }
            };
            group_pages[g as usize].push(node.page);
            node_group[n as usize] = g;
            let single = node.children.len() == 1 && node.ends == 0;
            for &c in node.children.iter().rev() {
                stack.push((c, single.then_some(g), g));
            }
        }
        // Renumber level by level (stable, so pre-order within a level).
        let mut order: Vec<u32> = (0..group_pages.len() as u32).collect();
        order.sort_by_key(|&g| level[g as usize]);
        let mut new_id = vec![0u32; order.len()];
        for (i, &g) in order.iter().enumerate() {
            new_id[g as usize] = i as u32;
        }
        node_group.iter_mut().for_each(|g| *g = new_id[*g as usize]);
        let pick = |v: &[u32]| order.iter().map(|&g| v[g as usize]).collect::<Vec<u32>>();
        let group_first_page = pick(&first_page);
        let group_num_seqs = pick(&num_seqs);
        let group_parent: Vec<u32> = order
            .iter()
            .map(|&g| match parent[g as usize] {
                NO_PARENT => NO_PARENT,
                p => new_id[p as usize],
            })
            .collect();
        let levels = level.iter().max().map_or(0, |&l| l as usize + 1);
        let level_indptr =
            indptr((0..levels).map(|k| level.iter().filter(|&&l| l as usize == k).count()));
        let mut slots: Vec<Vec<PageId>> = vec![Vec::new(); order.len()];
        for (g, pages) in group_pages.into_iter().enumerate() {
            slots[new_id[g] as usize] = pages;
        }
        let group_pages = slots;

        // Rows of each group, and each row's entries root to leaf.
        let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); group_pages.len()];
        let mut row_groups: Vec<Vec<(u32, u32)>> = vec![Vec::new(); n_rows];
        for (s, path) in seqs.iter().zip(&paths) {
            let mut prev = u32::MAX;
            for &n in path {
                let g = node_group[n as usize];
                if g == prev {
                    continue;
                }
                prev = g;
                let start = group_first_page[g as usize] as usize * page_size;
                for r in s.rows.clone() {
                    if positions[r] >= start {
                        let list = &mut rows_of[g as usize];
                        row_groups[r].push((g, list.len() as u32));
                        list.push(r as u32);
                    }
                }
            }
        }
        let mut plan = CascadePlan {
            page_size,
            group_first_page,
            group_num_seqs,
            group_parent,
            level_indptr,
            row_pos: positions.iter().map(|&p| p as u32).collect(),
            row_budget,
            ..Default::default()
        };
        plan.group_page_indptr = indptr(group_pages.iter().map(Vec::len));
        plan.page_ids = group_pages.into_iter().flatten().collect();
        plan.group_row_indptr = indptr(rows_of.iter().map(Vec::len));
        plan.group_rows = rows_of.into_iter().flatten().collect();
        plan.row_entry_indptr = indptr(row_groups.iter().map(Vec::len));
        plan.row_entries = row_groups
            .iter()
            .flatten()
            .map(|&(g, i)| plan.group_row_indptr[g as usize] + i)
            .collect();
        Ok(plan)
    }

    /// Groups in the plan.
    pub fn num_groups(&self) -> usize {
        self.group_first_page.len()
    }
    /// Query rows of the batch.
    pub fn num_rows(&self) -> usize {
        self.row_pos.len()
    }
    /// (group, row) entries: partial results before the merge.
    pub fn num_entries(&self) -> usize {
        self.group_rows.len()
    }
    /// Pages of group `g`.
    pub fn pages(&self, g: usize) -> &[PageId] {
        &self.page_ids[self.group_page_indptr[g] as usize..self.group_page_indptr[g + 1] as usize]
    }
    /// Entries of group `g` (indices into `group_rows`).
    pub fn entries(&self, g: usize) -> Range<usize> {
        self.group_row_indptr[g] as usize..self.group_row_indptr[g + 1] as usize
    }
    /// Entries of row `r`, root to leaf.
    pub fn row_entries(&self, r: usize) -> &[u32] {
        &self.row_entries[self.row_entry_indptr[r] as usize..self.row_entry_indptr[r + 1] as usize]
    }
    /// Whether some group is read for more than one sequence (else per-sequence attention
    /// reads no more).
    pub fn has_sharing(&self) -> bool {
        self.group_num_seqs.iter().any(|&n| n > 1)
    }
    /// Whether some row has a sparse budget.
    pub fn has_sparse(&self) -> bool {
        self.row_budget.iter().any(|&b| b != DENSE)
    }
    /// Page reads per (layer, KV head) of dense cascade attention: each group's pages once.
    pub fn pages_read(&self) -> usize {
        self.page_ids.len()
    }
}

/// A multiplicative hash for the (parent node, page) keys of the prefix tree: the plan is
/// built every step, and SipHash's per-lookup cost showed in it; the keys are not
/// attacker-chosen beyond page ids the engine itself hands out.
#[derive(Clone, Copy, Default)]
struct BuildPairHasher;

#[derive(Default)]
struct PairHasher(u64);

impl std::hash::BuildHasher for BuildPairHasher {
    type Hasher = PairHasher;
    fn build_hasher(&self) -> PairHasher {
        PairHasher(0)
    }
}

impl std::hash::Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b));
        }
    }
    fn write_u32(&mut self, x: u32) {
        self.0 = (self.0.rotate_left(5) ^ u64::from(x)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// CSR offsets of lists with these lengths.
fn indptr(lens: impl Iterator<Item = usize>) -> Vec<u32> {
    let mut v = vec![0u32];
    let mut acc = 0u32;
    for l in lens {
        acc += l as u32;
        v.push(acc);
    }
    v
}
