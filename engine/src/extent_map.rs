//! The persistent copy-on-write extent map: a B+tree from logical block to extent, one root per
//! branch head and per commit, sharing every unchanged node.
//!
//! Keys are extent starts; extents never overlap. Internal entries carry the newest birth in
//! their subtree so "what changed since generation G" visits only changed paths. Nodes are
//! never merged when they shrink (an empty node is removed), which keeps deletes simple at the
//! cost of some slack after large trims.

use std::sync::Arc;

use roaring::RoaringTreemap;

use crate::error::{Error, Result};
use crate::format::{INTERNAL_CAPACITY, LEAF_CAPACITY};
use crate::meta::{Body, Child, Extent, MetaStore, Node, Target, TREE_HEIGHT_MAX};

/// An extent entry holds at most this many blocks (its length is 32 bits on disk).
pub const EXTENT_BLOCKS_MAX: u64 = u32::MAX as u64;

/// Data blocks lie below this: past it a block's byte offset in the data file would not fit
/// a file offset (`off_t`). A map pointing further is corrupt.
pub const DATA_BLOCKS_MAX: u64 = i64::MAX as u64 / crate::types::BLOCK_SIZE;

/// `prev` extended by `next` where `next` continues it exactly: same generation, adjacent
/// blocks, adjacent targets, and the sum still fits an entry.
fn merged(prev: &Extent, next: &Extent) -> Option<Extent> {
    let continues = match (prev.target, next.target) {
        (Target::Data(p), Target::Data(q)) => p + prev.len == q,
        (Target::Zero, Target::Zero) => true,
        _ => false,
    };
    (prev.end() == next.lblock
        && prev.birth == next.birth
        && continues
        && prev.len + next.len <= EXTENT_BLOCKS_MAX)
        .then_some(Extent {
            len: prev.len + next.len,
            ..*prev
        })
}

/// A node found to be another kind than on the descent a moment before.
fn changed_under_us(page: u64) -> Error {
    Error::corrupt(
        "extent-map node changed under a write",
        format!("meta page {page}"),
    )
}

/// Index of the child whose key range holds `key`.
fn route(children: &[Child], key: u64) -> usize {
    children.partition_point(|c| c.key <= key).saturating_sub(1)
}

fn check_level(node: &Node, expected: Option<u8>, page: u64) -> Result<()> {
    if expected.is_some_and(|l| l != node.level) {
        return Err(Error::corrupt(
            format!(
                "extent-map node at level {} where {:?} was expected",
                node.level, expected
            ),
            format!("meta page {page}"),
        ));
    }
    Ok(())
}

/// Lookups on one map in ascending key order. The last leaf visited is kept with the key range
/// its ancestors route to it, so a query inside that range costs a short search onward in the
/// leaf, and one that runs past it moves to the next leaf with one descent. Only valid while the map
/// does not change: a head's nodes born in the current generation are changed in place.
pub struct LeafCursor {
    root: u64,
    leaf: Option<RoutedLeaf>,
    /// Every extent of the leaf before index `pos` starts below `pos_key`: where the next
    /// search in it begins.
    pos: usize,
    pos_key: u64,
}

/// The index of the first extent from `start` on that starts at or after `key`, all before
/// `start` starting below it. Galloping: ascending queries usually land just past `start`, so
/// this reads the leaf front to back instead of jumping around it.
fn first_from(extents: &[Extent], start: usize, key: u64) -> usize {
    let (mut lo, mut step) = (start, 1);
    while lo + step <= extents.len() && extents[lo + step - 1].lblock < key {
        lo += step;
        step *= 2;
    }
    let hi = (lo + step).min(extents.len());
    lo + extents[lo..hi].partition_point(|e| e.lblock < key)
}

/// A leaf and the key range `[lo, hi)` its extents' starts fall in.
struct RoutedLeaf {
    page: u64,
    node: Arc<Node>,
    lo: u64,
    hi: u64,
}

impl RoutedLeaf {
    fn extents(&self) -> &[Extent] {
        match &self.node.body {
            Body::Leaf(extents) => extents,
            Body::Internal(_) => &[],
        }
    }

    fn holds(&self, key: u64) -> bool {
        self.lo <= key && key < self.hi
    }
}

impl LeafCursor {
    pub fn new(root: u64) -> Self {
        LeafCursor {
            root,
            leaf: None,
            pos: 0,
            pos_key: 0,
        }
    }

    /// The leaf whose key range holds `key`, from the one kept if it is that leaf, and the
    /// index of its first extent starting at or after `key`.
    fn seek(&mut self, reader: &mut MapReader, key: u64) -> Result<(&RoutedLeaf, usize)> {
        if !self.leaf.as_ref().is_some_and(|l| l.holds(key)) {
            self.leaf = Some(reader.routed_leaf(self.root, key)?);
            (self.pos, self.pos_key) = (0, 0);
        }
        let leaf = self.leaf.as_ref().expect("just set");
        let start = if key >= self.pos_key { self.pos } else { 0 };
        Ok((leaf, first_from(leaf.extents(), start, key)))
    }

    /// Extents overlapping `[from, to)`, clipped to it, in order: one descent per leaf.
    pub fn lookup(&mut self, reader: &mut MapReader, from: u64, to: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        if self.root == 0 || from >= to {
            return Ok(out);
        }
        let root = self.root;
        let mut at = from;
        loop {
            let (leaf, first) = self.seek(reader, at)?;
            let (extents, lo, hi) = (leaf.extents(), leaf.lo, leaf.hi);
            if at == from {
                let floor = match first.checked_sub(1) {
                    Some(i) => Some(extents[i]),
                    // Nothing here starts before `from`: an earlier leaf may hold an extent
                    // reaching into the range. Rare enough for a descent.
                    None if lo > 0 => reader.floor(root, from - 1)?,
                    None => None,
                };
                out.extend(floor.filter(|e| e.end() > from).map(|e| e.clip(from, to)));
            }
            let taken = extents[first..]
                .iter()
                .take_while(|e| e.lblock < to)
                .map(|e| e.clip(from, to));
            let before = out.len();
            out.extend(taken);
            (self.pos, self.pos_key) = (first + out.len() - before, to);
            if hi >= to {
                return Ok(out);
            }
            at = hi;
        }
    }
}

/// Read-only queries.
pub struct MapReader<'a> {
    pub store: &'a mut MetaStore,
}

impl MapReader<'_> {
    /// Levels of the map at `root` (1 for an empty map or a single leaf).
    pub fn height(&mut self, root: u64) -> Result<u64> {
        if root == 0 {
            return Ok(1);
        }
        Ok(self.store.get(root)?.level as u64 + 1)
    }

    /// Extents overlapping `[from, to)`, clipped to it, in order.
    pub fn lookup(&mut self, root: u64, from: u64, to: u64) -> Result<Vec<Extent>> {
        // Usually one descent to the leaf holding the range.
        LeafCursor::new(root).lookup(self, from, to)
    }

    /// `lookup` by a descent for the extent before `from` and one for those after it: the
    /// plain answer the cursor's is checked against.
    #[cfg(test)]
    fn lookup_by_descents(&mut self, root: u64, from: u64, to: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        if root == 0 || from >= to {
            return Ok(out);
        }
        if let Some(e) = self.floor(root, from)? {
            if e.lblock < from && e.end() > from {
                out.push(e.clip(from, to));
            }
        }
        let mut inner = Vec::new();
        self.range(root, from, to, None, &mut inner)?;
        out.extend(inner.into_iter().map(|e| e.clip(from, to)));
        Ok(out)
    }

    /// The leaf `key` routes to, with the key range its ancestors give it.
    fn routed_leaf(&mut self, root: u64, key: u64) -> Result<RoutedLeaf> {
        self.routed_leaf_via(root, key, |_, _| {})
    }

    /// `routed_leaf`, telling `visit` each internal node passed on the way (its page and the
    /// index of the child taken), from the root down.
    fn routed_leaf_via(
        &mut self,
        root: u64,
        key: u64,
        mut visit: impl FnMut(u64, usize),
    ) -> Result<RoutedLeaf> {
        let (mut page, mut lo, mut hi, mut level) = (root, 0, u64::MAX, None);
        loop {
            let node = self.store.get(page)?;
            check_level(&node, level, page)?;
            let Body::Internal(children) = &node.body else {
                return Ok(RoutedLeaf { page, node, lo, hi });
            };
            if children.is_empty() {
                return Err(Error::corrupt(
                    "extent-map internal node without children",
                    format!("meta page {page}"),
                ));
            }
            let idx = route(children, key);
            if idx > 0 {
                lo = children[idx].key;
            }
            if let Some(next) = children.get(idx + 1) {
                hi = next.key;
            }
            visit(page, idx);
            page = children[idx].page;
            level = Some(node.level - 1);
        }
    }

    /// The extent with the greatest start <= `key`.
    pub fn floor(&mut self, page: u64, key: u64) -> Result<Option<Extent>> {
        self.floor_at(page, key, None)
    }

    fn floor_at(&mut self, page: u64, key: u64, level: Option<u8>) -> Result<Option<Extent>> {
        let node = self.store.get(page)?;
        check_level(&node, level, page)?;
        match &node.body {
            Body::Leaf(extents) => {
                let i = extents.partition_point(|e| e.lblock <= key);
                Ok(i.checked_sub(1).map(|i| extents[i]))
            }
            Body::Internal(children) => {
                let child_level = Some(node.level - 1);
                let idx = route(children, key);
                if let Some(found) = self.floor_at(children[idx].page, key, child_level)? {
                    return Ok(Some(found));
                }
                for c in children[..idx].iter().rev() {
                    if let Some(found) = self.last(c.page, child_level)? {
                        return Ok(Some(found));
                    }
                }
                Ok(None)
            }
        }
    }

    fn last(&mut self, page: u64, level: Option<u8>) -> Result<Option<Extent>> {
        let node = self.store.get(page)?;
        check_level(&node, level, page)?;
        match &node.body {
            Body::Leaf(extents) => Ok(extents.last().copied()),
            Body::Internal(children) => match children.last() {
                Some(c) => self.last(c.page, Some(node.level - 1)),
                None => Ok(None),
            },
        }
    }

    /// Extents whose start is in `[from, to)`.
    fn range(
        &mut self,
        page: u64,
        from: u64,
        to: u64,
        level: Option<u8>,
        out: &mut Vec<Extent>,
    ) -> Result<()> {
        let node = self.store.get(page)?;
        check_level(&node, level, page)?;
        match &node.body {
            Body::Leaf(extents) => {
                let start = extents.partition_point(|e| e.lblock < from);
                out.extend(extents[start..].iter().take_while(|e| e.lblock < to));
            }
            Body::Internal(children) => {
                let first = route(children, from);
                for (i, c) in children.iter().enumerate().skip(first) {
                    if i > first && c.key >= to {
                        break;
                    }
                    self.range(c.page, from, to, Some(node.level - 1), out)?;
                }
            }
        }
        Ok(())
    }

    /// Adds to `out` every block of an extent born after generation `after`.
    pub fn changed_since(&mut self, root: u64, after: u64, out: &mut RoaringTreemap) -> Result<()> {
        self.changed_since_at(root, after, None, out)
    }

    fn changed_since_at(
        &mut self,
        page: u64,
        after: u64,
        level: Option<u8>,
        out: &mut RoaringTreemap,
    ) -> Result<()> {
        if page == 0 {
            return Ok(());
        }
        let node = self.store.peek(page)?;
        check_level(&node, level, page)?;
        match &node.body {
            Body::Leaf(extents) => {
                for e in extents.iter().filter(|e| e.birth > after) {
                    out.insert_range(e.lblock..e.end());
                }
            }
            Body::Internal(children) => {
                for c in children.iter().filter(|c| c.max_birth > after) {
                    self.changed_since_at(c.page, after, Some(node.level - 1), out)?;
                }
            }
        }
        Ok(())
    }

    /// Collects the nodes and extents of a tree born at or after `since`: what a head owns.
    pub fn owned_since(
        &mut self,
        root: u64,
        since: u64,
        pages: &mut Vec<u64>,
        extents: &mut Vec<Extent>,
    ) -> Result<()> {
        self.owned_since_at(root, since, None, pages, extents)
    }

    fn owned_since_at(
        &mut self,
        page: u64,
        since: u64,
        level: Option<u8>,
        pages: &mut Vec<u64>,
        extents: &mut Vec<Extent>,
    ) -> Result<()> {
        if page == 0 {
            return Ok(());
        }
        let node = self.store.peek(page)?;
        check_level(&node, level, page)?;
        if node.birth >= since {
            pages.push(page);
        }
        match &node.body {
            Body::Leaf(list) => extents.extend(list.iter().filter(|e| e.birth >= since)),
            Body::Internal(children) => {
                // An owned node may point at shared children, which hold nothing owned unless
                // their own births say so.
                for c in children.iter().filter(|c| c.max_birth >= since) {
                    self.owned_since_at(c.page, since, Some(node.level - 1), pages, extents)?;
                }
            }
        }
        Ok(())
    }

    /// Visits every node page and extent of a tree; `enter(page)` returns false to skip a
    /// subtree already seen through another root.
    ///
    /// Every node and extent must be born before `birth_limit` (the first generation no
    /// durable state can contain); a later birth is corruption that would make committed data
    /// look owned and writable.
    pub fn walk(
        &mut self,
        root: u64,
        birth_limit: u64,
        enter: &mut dyn FnMut(u64) -> bool,
        extent: &mut dyn FnMut(&Extent),
    ) -> Result<()> {
        let mut checked = |e: &Extent| -> Result<()> {
            if e.birth >= birth_limit {
                return Err(Error::corrupt(
                    format!(
                        "extent born in generation {} after the last sync point",
                        e.birth
                    ),
                    format!("logical block {}", e.lblock),
                ));
            }
            if let Target::Data(p) = e.target {
                if p.checked_add(e.len).is_none_or(|end| end > DATA_BLOCKS_MAX) {
                    return Err(Error::corrupt(
                        format!(
                            "extent pointing to data block {p} (+{}), past any data file",
                            e.len
                        ),
                        format!("logical block {}", e.lblock),
                    ));
                }
            }
            extent(e);
            Ok(())
        };
        self.walk_at(root, None, 0, birth_limit, enter, &mut checked)
    }

    fn walk_at(
        &mut self,
        page: u64,
        level: Option<u8>,
        depth: u8,
        birth_limit: u64,
        enter: &mut dyn FnMut(u64) -> bool,
        extent: &mut dyn FnMut(&Extent) -> Result<()>,
    ) -> Result<()> {
        if page == 0 || !enter(page) {
            return Ok(());
        }
        if depth > TREE_HEIGHT_MAX {
            return Err(Error::corrupt(
                "extent map deeper than any valid tree",
                format!("meta page {page}"),
            ));
        }
        let node = self.store.peek(page)?;
        check_level(&node, level, page)?;
        if node.birth >= birth_limit {
            return Err(Error::corrupt(
                format!(
                    "extent-map node born in generation {} after the last sync point",
                    node.birth
                ),
                format!("meta page {page}"),
            ));
        }
        match &node.body {
            Body::Leaf(extents) => extents.iter().try_for_each(&mut *extent)?,
            Body::Internal(children) => {
                for c in children {
                    self.walk_at(
                        c.page,
                        Some(node.level - 1),
                        depth + 1,
                        birth_limit,
                        enter,
                        extent,
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// Changes to one tree. `exclusive_since` is the owning head's: nodes born at or after it are
/// referenced by no commit or other branch, so the copies they are replaced by free them.
pub struct MapWriter<'a> {
    pub store: &'a mut MetaStore,
    pub exclusive_since: u64,
}

/// A node split off to the right: (first key, page, max birth).
type Split = Option<(u64, u64, u64)>;

impl MapWriter<'_> {
    fn reader(&mut self) -> MapReader<'_> {
        MapReader { store: self.store }
    }

    /// Makes `[from, to)` map to `target` (or to nothing with `None`), born in the current
    /// generation. Returns the new root and the replaced extents, clipped to the range.
    pub fn replace(
        &mut self,
        root: u64,
        from: u64,
        to: u64,
        target: Option<Target>,
    ) -> Result<(u64, Vec<Extent>)> {
        match self.replace_in_leaf(root, from, to, target)? {
            Some(done) => Ok(done),
            None => self.replace_across_leaves(root, from, to, target),
        }
    }

    /// `replace` anywhere: each extent the range cuts is trimmed or deleted, then the new
    /// one inserted, each a descent of its own.
    fn replace_across_leaves(
        &mut self,
        root: u64,
        from: u64,
        to: u64,
        target: Option<Target>,
    ) -> Result<(u64, Vec<Extent>)> {
        let mut root = root;
        let overlapping = self.reader().lookup_raw(root, from, to)?;
        let mut removed = Vec::with_capacity(overlapping.len());
        for e in overlapping {
            removed.push(e.clip(from, to));
            if e.lblock < from {
                root = self.insert(
                    root,
                    Extent {
                        len: from - e.lblock,
                        ..e
                    },
                )?;
            } else {
                root = self.delete(root, e.lblock)?;
            }
            if e.end() > to {
                root = self.insert(root, e.clip(to, e.end()))?;
            }
        }
        if let Some(target) = target {
            let gen = self.store.gen;
            let mut at = from;
            while at < to {
                let len = (to - at).min(EXTENT_BLOCKS_MAX);
                let target_at = match target {
                    Target::Data(p) => Target::Data(p + (at - from)),
                    Target::Zero => Target::Zero,
                };
                root = self.insert_merging(
                    root,
                    Extent {
                        lblock: at,
                        len,
                        target: target_at,
                        birth: gen,
                    },
                )?;
                at += len;
            }
        }
        Ok((root, removed))
    }

    /// `replace` where all it reads and changes lies in the leaf `from` routes to, which is
    /// nearly always: one descent, then that leaf changes, and of the nodes above it only
    /// those whose entry for it changes (a new page, a newer birth, a split). Nodes born in
    /// this generation change where they are. `None`, with nothing changed, elsewhere.
    fn replace_in_leaf(
        &mut self,
        root: u64,
        from: u64,
        to: u64,
        target: Option<Target>,
    ) -> Result<Option<(u64, Vec<Extent>)>> {
        if root == 0 || from >= to || to - from > EXTENT_BLOCKS_MAX {
            return Ok(None);
        }
        let mut path: Vec<(u64, usize)> = Vec::with_capacity(TREE_HEIGHT_MAX as usize);
        let leaf = self
            .reader()
            .routed_leaf_via(root, from, |page, idx| path.push((page, idx)))?;
        let extents = leaf.extents();
        let start = extents.partition_point(|e| e.lblock < from);
        let end = start + extents[start..].partition_point(|e| e.lblock < to);
        // The extent before `from` may reach into the range or be continued by it: it must
        // be here, unless there is none at all.
        if start == 0 && leaf.lo > 0 {
            return Ok(None);
        }
        let lead = match start.checked_sub(1) {
            Some(i) if extents[i].end() > from => i,
            _ => start,
        };
        let overlapping = &extents[lead..end];
        // What is left past `to` of an extent reaching beyond it starts at `to`, which must
        // route here too.
        let tail = overlapping
            .last()
            .filter(|e| e.end() > to)
            .map(|e| e.clip(to, e.end()));
        if to > leaf.hi || (tail.is_some() && to == leaf.hi) {
            return Ok(None);
        }
        let removed: Vec<Extent> = overlapping.iter().map(|e| e.clip(from, to)).collect();
        // `extents[first..end]` become `replacement`.
        let mut first = lead;
        let mut replacement = Vec::with_capacity(3);
        replacement.extend(
            overlapping
                .first()
                .filter(|e| e.lblock < from)
                .map(|e| Extent {
                    len: from - e.lblock,
                    ..*e
                }),
        );
        if let Some(target) = target {
            let new = Extent {
                lblock: from,
                len: to - from,
                target,
                birth: self.store.gen,
            };
            // The extent ending at `from`, if any: the head of one the range cuts, or the one
            // before the range.
            let prev = match replacement.last() {
                Some(head) => Some(*head),
                None => start.checked_sub(1).map(|i| extents[i]),
            };
            match prev.and_then(|prev| merged(&prev, &new)) {
                Some(longer) => {
                    if replacement.pop().is_none() {
                        first -= 1;
                    }
                    replacement.push(longer);
                }
                None => replacement.push(new),
            }
        }
        replacement.extend(tail);
        if extents.len() - (end - first) + replacement.len() == 0 {
            // An emptied leaf leaves its parent: the general path does that.
            return Ok(None);
        }
        let leaf_page = leaf.page;
        // The cache's reference is then the only one: the leaf changes without a copy.
        drop(leaf);
        let (mut page, changed) = self.change(leaf_page, |node| {
            let Body::Leaf(extents) = &mut node.body else {
                return None;
            };
            extents.splice(first..end, replacement);
            let right =
                (extents.len() > LEAF_CAPACITY).then(|| extents.split_off(extents.len() / 2));
            Some((node.max_birth(), right))
        })?;
        let (mut max_birth, right) = changed.ok_or_else(|| changed_under_us(leaf_page))?;
        let mut split = match right {
            Some(right) => self.store_split(0, right[0].lblock, Body::Leaf(right))?,
            None => None,
        };
        for (parent, idx) in path.into_iter().rev() {
            let node = self.store.get(parent)?;
            let Some(&entry) = (match &node.body {
                Body::Internal(children) => children.get(idx),
                Body::Leaf(_) => None,
            }) else {
                return Err(changed_under_us(parent));
            };
            if split.is_none() && entry.page == page && entry.max_birth == max_birth {
                // Nothing above changes.
                return Ok(Some((root, removed)));
            }
            let level = node.level;
            drop(node);
            let changed;
            (page, changed) = self.change(parent, |node| {
                let Body::Internal(children) = &mut node.body else {
                    return None;
                };
                children[idx].page = page;
                children[idx].max_birth = max_birth;
                if let Some((key, right, right_max)) = split {
                    children.insert(
                        idx + 1,
                        Child {
                            key,
                            page: right,
                            max_birth: right_max,
                        },
                    );
                }
                let right = (children.len() > INTERNAL_CAPACITY)
                    .then(|| children.split_off(children.len() / 2));
                Some((node.max_birth(), right))
            })?;
            let right;
            (max_birth, right) = changed.ok_or_else(|| changed_under_us(parent))?;
            split = match right {
                Some(right) => self.store_split(level, right[0].key, Body::Internal(right))?,
                None => None,
            };
        }
        Ok(Some((self.grow(page, max_birth, split)?, removed)))
    }

    /// Changes the node at `page` for the current generation: where it is when born in it,
    /// else in a copy on a new page, the old one released. Returns the node's page and what
    /// `f` returned.
    fn change<R>(&mut self, page: u64, f: impl FnOnce(&mut Node) -> R) -> Result<(u64, R)> {
        if self.store.get(page)?.birth == self.store.gen {
            return Ok((page, self.store.modify(page, f)?));
        }
        let (page, mut copy) = self.cow(page)?;
        let out = f(&mut copy);
        self.store.put(page, copy)?;
        Ok((page, out))
    }

    /// Stores a node split off to the right of one at `level`, its first key `key`.
    fn store_split(&mut self, level: u8, key: u64, body: Body) -> Result<Split> {
        let right = Node {
            birth: self.store.gen,
            level,
            body,
        };
        let page = self.store.alloc_page();
        let max_birth = right.max_birth();
        self.store.put(page, right)?;
        Ok(Some((key, page, max_birth)))
    }

    /// The root over the node at `page` once a change is done: that node, or a new one over
    /// it and the node split off it.
    fn grow(&mut self, page: u64, max_birth: u64, split: Split) -> Result<u64> {
        let Some((key, right, right_max)) = split else {
            return Ok(page);
        };
        let level = self.store.get(page)?.level + 1;
        if level >= TREE_HEIGHT_MAX {
            return Err(Error::corrupt(
                "extent map grew beyond its height bound",
                format!("meta page {page}"),
            ));
        }
        let new_root = self.store.alloc_page();
        let children = vec![
            Child {
                key: 0,
                page,
                max_birth,
            },
            Child {
                key,
                page: right,
                max_birth: right_max,
            },
        ];
        self.store.put(
            new_root,
            Node {
                birth: self.store.gen,
                level,
                body: Body::Internal(children),
            },
        )?;
        Ok(new_root)
    }

    /// Inserts `e`, extending its left neighbour instead when it continues it exactly.
    fn insert_merging(&mut self, root: u64, e: Extent) -> Result<u64> {
        if root != 0 && e.lblock > 0 {
            if let Some(prev) = self.reader().floor(root, e.lblock - 1)? {
                if let Some(merged) = merged(&prev, &e) {
                    return self.insert(root, merged);
                }
            }
        }
        self.insert(root, e)
    }

    /// Copy-on-write access to a node: its (possibly new) page and a mutable copy.
    fn cow(&mut self, page: u64) -> Result<(u64, Node)> {
        let node = self.store.get(page)?;
        if node.birth == self.store.gen {
            return Ok((page, (*node).clone()));
        }
        let new_page = self.store.alloc_page();
        self.store.release(page, node.birth, self.exclusive_since);
        let mut copy = (*node).clone();
        copy.birth = self.store.gen;
        Ok((new_page, copy))
    }

    /// Inserts or replaces the entry with key `e.lblock`.
    pub fn insert(&mut self, root: u64, e: Extent) -> Result<u64> {
        if root == 0 {
            let page = self.store.alloc_page();
            let node = Node {
                birth: self.store.gen,
                level: 0,
                body: Body::Leaf(vec![e]),
            };
            self.store.put(page, node)?;
            return Ok(page);
        }
        let (page, max_birth, split) = self.insert_at(root, e)?;
        self.grow(page, max_birth, split)
    }

    fn insert_at(&mut self, page: u64, e: Extent) -> Result<(u64, u64, Split)> {
        let (page, mut node) = self.cow(page)?;
        let split = match &mut node.body {
            Body::Leaf(extents) => {
                match extents.binary_search_by_key(&e.lblock, |x| x.lblock) {
                    Ok(i) => extents[i] = e,
                    Err(i) => extents.insert(i, e),
                }
                if extents.len() > LEAF_CAPACITY {
                    let right: Vec<Extent> = extents.split_off(extents.len() / 2);
                    Some((right[0].lblock, Body::Leaf(right)))
                } else {
                    None
                }
            }
            Body::Internal(children) => {
                let idx = route(children, e.lblock);
                let (child_page, child_max, child_split) = self.insert_at(children[idx].page, e)?;
                children[idx].page = child_page;
                children[idx].max_birth = child_max;
                if let Some((key, right, right_max)) = child_split {
                    children.insert(
                        idx + 1,
                        Child {
                            key,
                            page: right,
                            max_birth: right_max,
                        },
                    );
                }
                if children.len() > INTERNAL_CAPACITY {
                    let right: Vec<Child> = children.split_off(children.len() / 2);
                    Some((right[0].key, Body::Internal(right)))
                } else {
                    None
                }
            }
        };
        let split = match split {
            Some((key, body)) => self.store_split(node.level, key, body)?,
            None => None,
        };
        let max_birth = node.max_birth();
        self.store.put(page, node)?;
        Ok((page, max_birth, split))
    }

    /// Removes the entry with exactly key `key`.
    pub fn delete(&mut self, root: u64, key: u64) -> Result<u64> {
        let (page, _) = self.delete_at(root, key)?;
        let Some(mut page) = page else { return Ok(0) };
        // Collapse a root left with one child.
        loop {
            let node = self.store.get(page)?;
            match &node.body {
                Body::Internal(children) if children.len() == 1 => {
                    let child = children[0].page;
                    self.store.release(page, node.birth, self.exclusive_since);
                    page = child;
                }
                _ => return Ok(page),
            }
        }
    }

    /// Returns the node's new page (None when it became empty and was released).
    fn delete_at(&mut self, page: u64, key: u64) -> Result<(Option<u64>, u64)> {
        let (page, mut node) = self.cow(page)?;
        let empty = match &mut node.body {
            Body::Leaf(extents) => {
                if let Ok(i) = extents.binary_search_by_key(&key, |x| x.lblock) {
                    extents.remove(i);
                }
                extents.is_empty()
            }
            Body::Internal(children) => {
                let idx = route(children, key);
                match self.delete_at(children[idx].page, key)? {
                    (Some(child_page), child_max) => {
                        children[idx].page = child_page;
                        children[idx].max_birth = children[idx].max_birth.max(child_max);
                    }
                    (None, _) => {
                        children.remove(idx);
                        if idx == 0 {
                            if let Some(first) = children.first_mut() {
                                first.key = 0;
                            }
                        }
                    }
                }
                children.is_empty()
            }
        };
        if empty {
            self.store.release(page, node.birth, self.exclusive_since);
            return Ok((None, 0));
        }
        let max_birth = node.max_birth();
        self.store.put(page, node)?;
        Ok((Some(page), max_birth))
    }
}

impl MapReader<'_> {
    /// Unclipped extents overlapping `[from, to)`.
    fn lookup_raw(&mut self, root: u64, from: u64, to: u64) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        if root == 0 || from >= to {
            return Ok(out);
        }
        if let Some(e) = self.floor(root, from)? {
            if e.lblock < from && e.end() > from {
                out.push(e);
            }
        }
        self.range(root, from, to, None, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::SpaceAllocator;
    use crate::io::sim::SimDisk;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn store(cache_pages: usize) -> MetaStore {
        MetaStore::new(
            SimDisk::new().backend(),
            cache_pages,
            SpaceAllocator::new(1),
            1,
            Default::default(),
        )
    }

    /// Model: block -> Some(physical) or None for zero; absent = hole.
    fn model_apply(
        model: &mut BTreeMap<u64, Option<u64>>,
        from: u64,
        to: u64,
        target: Option<Target>,
    ) {
        for b in from..to {
            match target {
                None => {
                    model.remove(&b);
                }
                Some(Target::Zero) => {
                    model.insert(b, None);
                }
                Some(Target::Data(p)) => {
                    model.insert(b, Some(p + (b - from)));
                }
            }
        }
    }

    fn tree_as_model(store: &mut MetaStore, root: u64, span: u64) -> BTreeMap<u64, Option<u64>> {
        let mut out = BTreeMap::new();
        for e in (MapReader { store }).lookup(root, 0, span).unwrap() {
            for b in e.lblock..e.end() {
                let v = match e.target {
                    Target::Data(p) => Some(p + (b - e.lblock)),
                    Target::Zero => None,
                };
                assert!(out.insert(b, v).is_none(), "overlapping extents at {b}");
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn replace_matches_a_model(ops in prop::collection::vec((0u64..3000, 1u64..300, 0u8..3, 0u64..1_000_000), 1..200),
                                   cache in prop::sample::select(vec![64usize, 4096])) {
            let mut store = store(cache);
            let mut model = BTreeMap::new();
            let mut root = 0;
            let mut snapshots = Vec::new();
            for (i, (from, len, kind, phys)) in ops.into_iter().enumerate() {
                let target = match kind { 0 => None, 1 => Some(Target::Zero), _ => Some(Target::Data(phys)) };
                let mut w = MapWriter { store: &mut store, exclusive_since: 0 };
                root = w.replace(root, from, from + len, target).unwrap().0;
                model_apply(&mut model, from, from + len, target);
                if i % 37 == 0 {
                    // A commit: freeze the generation so later changes copy on write.
                    store.write_dirty().unwrap();
                    store.gen += 1;
                    snapshots.push((root, model.clone()));
                }
            }
            prop_assert_eq!(tree_as_model(&mut store, root, 4000), model);
            for (snap_root, snap_model) in snapshots {
                prop_assert_eq!(tree_as_model(&mut store, snap_root, 4000), snap_model);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn leaf_cursor_answers_like_lookup(ops in prop::collection::vec((0u64..20_000, 1u64..40, 0u8..4, 0u64..1_000_000), 1..1500),
                                           queries in prop::collection::vec((0u64..60, 1u64..120, prop::bool::weighted(0.05)), 1..300)) {
            let mut store = store(4096);
            let mut root = 0;
            for (i, (from, len, kind, phys)) in ops.into_iter().enumerate() {
                let target = match kind { 0 => None, 1 => Some(Target::Zero), _ => Some(Target::Data(phys)) };
                let mut w = MapWriter { store: &mut store, exclusive_since: 0 };
                root = w.replace(root, from, from + len, target).unwrap().0;
                if i % 97 == 0 {
                    store.write_dirty().unwrap();
                    store.gen += 1;
                }
            }
            let mut cursor = LeafCursor::new(root);
            let mut reader = MapReader { store: &mut store };
            let mut at = 0;
            for (gap, len, back) in queries {
                let (from, to) = (at + gap, at + gap + len);
                prop_assert_eq!(
                    cursor.lookup(&mut reader, from, to).unwrap(),
                    reader.lookup_by_descents(root, from, to).unwrap(),
                    "query [{}, {})", from, to
                );
                // Mostly ascending, as the cursor is used; now and then back, which it allows.
                at = if back { from / 2 } else { to };
            }
        }
    }

    /// Checks the tree's shape below `page`, whose keys the parents route to `[lo, hi)`:
    /// levels, sizes, order, and every parent's bound on its child's newest birth. Returns
    /// the subtree's newest birth.
    fn check_tree(store: &mut MetaStore, page: u64, lo: u64, hi: u64, level: Option<u8>) -> u64 {
        let node = store.get(page).unwrap();
        check_level(&node, level, page).unwrap();
        match &node.body {
            Body::Leaf(extents) => {
                assert!(!extents.is_empty() && extents.len() <= LEAF_CAPACITY);
                for pair in extents.windows(2) {
                    assert!(pair[0].end() <= pair[1].lblock, "{pair:?} overlap");
                }
                assert!(extents.iter().all(|e| lo <= e.lblock && e.lblock < hi));
            }
            Body::Internal(children) => {
                assert!(!children.is_empty() && children.len() <= INTERNAL_CAPACITY);
                for (i, child) in children.iter().enumerate() {
                    let child_lo = if i == 0 { lo } else { child.key };
                    let child_hi = children.get(i + 1).map_or(hi, |next| next.key);
                    assert!(lo <= child_lo && child_lo < child_hi && child_hi <= hi);
                    let newest =
                        check_tree(store, child.page, child_lo, child_hi, Some(node.level - 1));
                    assert!(child.max_birth >= newest, "page {page} child {i}");
                }
            }
        }
        node.max_birth()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn changes_within_a_leaf_match_the_general_path(
            ops in prop::collection::vec(
                (0u64..100_000, 1u64..64, 0u8..6, 0u64..1_000_000),
                1..3000,
            ),
            cache in prop::sample::select(vec![64usize, 4096]),
        ) {
            let (mut quick, mut general) = (store(cache), store(cache));
            let (mut quick_root, mut general_root, mut in_leaf) = (0, 0, 0);
            let mut next_phys = 0;
            for (i, (from, len, kind, phys)) in ops.iter().copied().enumerate() {
                // Mostly writes of new blocks, allocated in order as the pool does, so that
                // neighbours merge; some anywhere, some zeroes, some trims.
                let target = match kind {
                    0 => None,
                    1 => Some(Target::Zero),
                    2 => Some(Target::Data(phys)),
                    _ => {
                        next_phys += len;
                        Some(Target::Data(next_phys - len))
                    }
                };
                let (to, exclusive_since) = (from + len, (i as u64 / 500) * 2);
                let mut w = MapWriter { store: &mut quick, exclusive_since };
                let in_one = w.replace_in_leaf(quick_root, from, to, target).unwrap();
                let (root, removed) = match in_one {
                    Some(done) => {
                        in_leaf += 1;
                        done
                    }
                    None => w.replace_across_leaves(quick_root, from, to, target).unwrap(),
                };
                quick_root = root;
                let mut w = MapWriter { store: &mut general, exclusive_since };
                let (root, general_removed) =
                    w.replace_across_leaves(general_root, from, to, target).unwrap();
                general_root = root;
                prop_assert_eq!(removed, general_removed, "replace [{}, {})", from, to);
                if i % 251 == 0 {
                    // A commit: later changes copy on write.
                    for store in [&mut quick, &mut general] {
                        store.write_dirty().unwrap();
                        store.gen += 1;
                    }
                }
            }
            // Most take the quick path (a map's first change never does).
            prop_assert!(
                ops.len() < 100 || in_leaf * 4 >= ops.len() * 3,
                "{} of {} within a leaf",
                in_leaf,
                ops.len()
            );
            let span = 200_000;
            let quick_extents =
                MapReader { store: &mut quick }.lookup_raw(quick_root, 0, span).unwrap();
            let general_extents =
                MapReader { store: &mut general }.lookup_raw(general_root, 0, span).unwrap();
            prop_assert_eq!(quick_extents, general_extents);
            if quick_root != 0 {
                check_tree(&mut quick, quick_root, 0, u64::MAX, None);
            }
        }
    }

    #[test]
    fn changes_within_a_leaf_split_internal_nodes_like_the_general_path() {
        // Enough extents that cannot merge for three levels, in scattered order, with commits
        // between so that some paths are copied and some changed where they are.
        let (mut quick, mut general) = (store(4096), store(4096));
        let (mut quick_root, mut general_root) = (0, 0);
        for i in 0..40_000u64 {
            let at = (i * 7919) % 40_000 * 2;
            let target = Some(Target::Data(1_000_000 - i));
            let mut w = MapWriter {
                store: &mut quick,
                exclusive_since: 0,
            };
            quick_root = w.replace(quick_root, at, at + 1, target).unwrap().0;
            let mut w = MapWriter {
                store: &mut general,
                exclusive_since: 0,
            };
            general_root = w
                .replace_across_leaves(general_root, at, at + 1, target)
                .unwrap()
                .0;
            if i % 9_000 == 0 {
                for store in [&mut quick, &mut general] {
                    store.write_dirty().unwrap();
                    store.gen += 1;
                }
            }
        }
        assert_eq!(
            MapReader { store: &mut quick }.height(quick_root).unwrap(),
            3
        );
        let quick_extents = MapReader { store: &mut quick }
            .lookup_raw(quick_root, 0, 80_000)
            .unwrap();
        let general_extents = MapReader {
            store: &mut general,
        }
        .lookup_raw(general_root, 0, 80_000)
        .unwrap();
        assert_eq!(quick_extents.len(), 40_000);
        assert_eq!(quick_extents, general_extents);
        check_tree(&mut quick, quick_root, 0, u64::MAX, None);
    }

    #[test]
    fn a_remainder_starting_at_a_leafs_bound_goes_to_the_next_leaf() {
        let mut store = store(4096);
        let mut w = MapWriter {
            store: &mut store,
            exclusive_since: 0,
        };
        let mut root = 0;
        for i in 0..200u64 {
            let target = Some(Target::Data(10_000 - i * 10));
            root = w.replace(root, i * 2, i * 2 + 1, target).unwrap().0;
        }
        let bound = match &w.store.get(root).unwrap().body {
            Body::Internal(children) => children[1].key,
            Body::Leaf(_) => panic!("200 extents fill more than one leaf"),
        };
        // An extent of the left leaf reaching past the bound (the right leaf's first extents
        // replaced by it), then cut so that what is left of it starts at the bound.
        root = w
            .replace(root, bound - 5, bound + 7, Some(Target::Data(50_000)))
            .unwrap()
            .0;
        root = w.replace(root, bound - 2, bound, None).unwrap().0;
        check_tree(w.store, root, 0, u64::MAX, None);
        let mut reader = MapReader { store: w.store };
        assert_eq!(
            reader.lookup(root, bound, bound + 7).unwrap(),
            vec![Extent {
                lblock: bound,
                len: 7,
                target: Target::Data(50_005),
                birth: 1,
            }]
        );
    }

    #[test]
    fn changed_since_finds_only_new_extents() {
        let mut store = store(1024);
        let mut w = MapWriter {
            store: &mut store,
            exclusive_since: 0,
        };
        let mut root = 0;
        for i in 0..1000u64 {
            root = w
                .replace(root, i * 2, i * 2 + 1, Some(Target::Data(10_000 + i)))
                .unwrap()
                .0;
        }
        store.gen += 1;
        let mut w = MapWriter {
            store: &mut store,
            exclusive_since: 2,
        };
        root = w.replace(root, 501, 504, Some(Target::Data(1))).unwrap().0;
        let mut changed = RoaringTreemap::new();
        MapReader { store: &mut store }
            .changed_since(root, 1, &mut changed)
            .unwrap();
        assert_eq!(changed.iter().collect::<Vec<_>>(), vec![501, 502, 503]);
    }
}
