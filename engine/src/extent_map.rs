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

    /// Extents overlapping `[from, to)`, clipped to it, in order: `MapReader::lookup`'s answer.
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
        let (mut page, mut lo, mut hi, mut level) = (root, 0, u64::MAX, None);
        loop {
            let node = self.store.get(page)?;
            check_level(&node, level, page)?;
            let Body::Internal(children) = &node.body else {
                return Ok(RoutedLeaf { node, lo, hi });
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

    /// Inserts `e`, extending its left neighbour instead when it continues it exactly.
    fn insert_merging(&mut self, root: u64, e: Extent) -> Result<u64> {
        if root != 0 && e.lblock > 0 {
            if let Some(prev) = self.reader().floor(root, e.lblock - 1)? {
                let continues = match (prev.target, e.target) {
                    (Target::Data(p), Target::Data(q)) => p + prev.len == q,
                    (Target::Zero, Target::Zero) => true,
                    _ => false,
                };
                if prev.end() == e.lblock
                    && prev.birth == e.birth
                    && continues
                    && prev.len + e.len <= EXTENT_BLOCKS_MAX
                {
                    return self.insert(
                        root,
                        Extent {
                            len: prev.len + e.len,
                            ..prev
                        },
                    );
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
            Some((key, body)) => {
                let right = Node {
                    birth: self.store.gen,
                    level: node.level,
                    body,
                };
                let right_page = self.store.alloc_page();
                let right_max = right.max_birth();
                self.store.put(right_page, right)?;
                Some((key, right_page, right_max))
            }
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
                    reader.lookup(root, from, to).unwrap(),
                    "query [{}, {})", from, to
                );
                // Mostly ascending, as the cursor is used; now and then back, which it allows.
                at = if back { from / 2 } else { to };
            }
        }
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
