//! The metadata store: extent-map nodes in 4 KiB pages of `meta.grove`, read through a bounded
//! LRU cache, allocated and freed by generation (see FORMAT.md, "generations").
//!
//! A node whose birth is the current generation was created since the last sync point and is
//! referenced by nothing durable or committed: it is changed in place. Any older node is copied
//! on write. Dirty nodes are written when evicted or at the next sync.

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lru::LruCache;
use zerocopy::{FromBytes, IntoBytes};

use crate::allocator::{Fit, SpaceAllocator};
use crate::error::{Error, Result};
use crate::format::*;
use crate::io::{self, FileKind, IoBackend};
use crate::space::{set_aside, META_RESERVE_PAGES};

/// Where an extent's blocks are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Physical blocks of the data file, from this one on.
    Data(u64),
    /// No data: the range reads as zeros.
    Zero,
}

/// A run of logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub lblock: u64,
    pub len: u64,
    pub target: Target,
    pub birth: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.lblock + self.len
    }

    /// The part of the extent inside `[from, to)`.
    pub fn clip(&self, from: u64, to: u64) -> Extent {
        let start = self.lblock.max(from);
        let end = self.end().min(to);
        debug_assert!(start < end);
        let target = match self.target {
            Target::Data(p) => Target::Data(p + (start - self.lblock)),
            Target::Zero => Target::Zero,
        };
        Extent {
            lblock: start,
            len: end - start,
            target,
            birth: self.birth,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Child {
    pub key: u64,
    pub page: u64,
    pub max_birth: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Leaf(Vec<Extent>),
    Internal(Vec<Child>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub birth: u64,
    pub level: u8,
    pub body: Body,
}

/// Bound on tree height: a deeper tree on disk is corrupt (it guards descent against cycles).
pub const TREE_HEIGHT_MAX: u8 = 16;

impl Node {
    /// The newest birth of this node, its entries and (through the children's bounds) its
    /// whole subtree.
    pub fn max_birth(&self) -> u64 {
        let entries = match &self.body {
            Body::Leaf(extents) => extents.iter().map(|e| e.birth).max(),
            Body::Internal(children) => children.iter().map(|c| c.max_birth).max(),
        };
        entries.unwrap_or(0).max(self.birth)
    }

    pub fn encode(&self, page_no: u64) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE];
        let (kind, count) = match &self.body {
            Body::Leaf(e) => (NODE_LEAF, e.len()),
            Body::Internal(c) => (NODE_INTERNAL, c.len()),
        };
        let header = PageHeader {
            magic: NODE_MAGIC.into(),
            kind,
            level: self.level,
            count: (count as u16).into(),
            crc: 0.into(),
            reserved: 0.into(),
            page_no: page_no.into(),
            birth: self.birth.into(),
        };
        page[..32].copy_from_slice(header.as_bytes());
        match &self.body {
            Body::Leaf(extents) => {
                for (i, e) in extents.iter().enumerate() {
                    let (pblock, flags) = match e.target {
                        Target::Data(p) => (p, 0),
                        Target::Zero => (0, EXTENT_ZERO),
                    };
                    let entry = LeafEntry {
                        lblock: e.lblock.into(),
                        pblock: pblock.into(),
                        len: (e.len as u32).into(),
                        flags: flags.into(),
                        birth: e.birth.into(),
                    };
                    page[32 + i * 32..64 + i * 32].copy_from_slice(entry.as_bytes());
                }
            }
            Body::Internal(children) => {
                for (i, c) in children.iter().enumerate() {
                    let entry = InternalEntry {
                        key: c.key.into(),
                        child: c.page.into(),
                        max_birth: c.max_birth.into(),
                    };
                    page[32 + i * 24..56 + i * 24].copy_from_slice(entry.as_bytes());
                }
            }
        }
        seal_page(&mut page);
        page
    }

    /// Decodes and validates a node page: checksum, self-reference, counts and key order.
    pub fn decode(page: &[u8], page_no: u64) -> Result<Node> {
        let header = check_page(page, page_no)?;
        let at = || format!("meta page {page_no}");
        let count = header.count.get() as usize;
        let mut last_key = None;
        let mut ordered = |key: u64| {
            let ok = last_key.is_none_or(|k| key > k);
            last_key = Some(key);
            ok
        };
        let body = match header.kind {
            NODE_LEAF if count <= LEAF_CAPACITY && header.level == 0 => {
                let mut extents = Vec::with_capacity(count);
                for i in 0..count {
                    let (e, _) = LeafEntry::read_from_prefix(&page[32 + i * 32..])
                        .map_err(|_| Error::corrupt("extent-map leaf entry", at()))?;
                    let flags = e.flags.get();
                    let target = if flags & EXTENT_ZERO != 0 {
                        Target::Zero
                    } else {
                        Target::Data(e.pblock.get())
                    };
                    let (lblock, len) = (e.lblock.get(), e.len.get() as u64);
                    let ends = lblock.checked_add(len).is_some()
                        && match target {
                            Target::Data(p) => p > 0 && p.checked_add(len).is_some(),
                            Target::Zero => true,
                        };
                    // Extents are sorted and never overlap: each ends where the next may start.
                    let overlaps = extents
                        .last()
                        .is_some_and(|prev: &Extent| prev.end() > lblock);
                    if len == 0
                        || !ordered(lblock)
                        || flags & !EXTENT_ZERO != 0
                        || !ends
                        || overlaps
                    {
                        return Err(Error::corrupt(
                            "extent-map leaf (bad entry, order or overlap)",
                            at(),
                        ));
                    }
                    extents.push(Extent {
                        lblock: e.lblock.get(),
                        len: e.len.get() as u64,
                        target,
                        birth: e.birth.get(),
                    });
                }
                Body::Leaf(extents)
            }
            NODE_INTERNAL
                if count <= INTERNAL_CAPACITY
                    && count > 0
                    && header.level > 0
                    && header.level < TREE_HEIGHT_MAX =>
            {
                let mut children = Vec::with_capacity(count);
                for i in 0..count {
                    let (c, _) = InternalEntry::read_from_prefix(&page[32 + i * 24..])
                        .map_err(|_| Error::corrupt("extent-map internal entry", at()))?;
                    if c.child.get() == 0 || !ordered(c.key.get()) {
                        return Err(Error::corrupt(
                            "extent-map internal node (bad child or order)",
                            at(),
                        ));
                    }
                    children.push(Child {
                        key: c.key.get(),
                        page: c.child.get(),
                        max_birth: c.max_birth.get(),
                    });
                }
                Body::Internal(children)
            }
            _ => {
                return Err(Error::corrupt(
                    "extent-map node (bad kind, level or count)",
                    at(),
                ))
            }
        };
        Ok(Node {
            birth: header.birth.get(),
            level: header.level,
            body,
        })
    }
}

struct Cached {
    node: Arc<Node>,
    dirty: bool,
}

/// A deferred free: reusable once the sync point of generation `gen` is durable.
#[derive(Clone, Copy, Debug)]
pub struct PendingFree {
    pub gen: u64,
    pub start: u64,
    pub len: u64,
}

pub struct MetaStore {
    backend: Arc<dyn IoBackend>,
    cache: LruCache<u64, Cached>,
    /// Pages changed since the last sync and not yet written.
    dirty: BTreeSet<u64>,
    /// Dirty nodes whose write at eviction failed: kept in memory (beyond the cache bound)
    /// rather than lost, while the pool fails and refuses further changes.
    pinned: HashMap<u64, Arc<Node>>,
    /// The pool's failure flag: set when a node cannot be written.
    failed: Arc<AtomicBool>,
    pub pages: SpaceAllocator,
    pub pending_pages: Vec<PendingFree>,
    /// The current generation: nodes born in it are mutable.
    pub gen: u64,
    /// `meta.grove` is set aside on the file system below this page (`space.rs`): pages
    /// below it can be written without running out of space. `None` where not supported.
    pub reserved_end_pages: Option<u64>,
}

impl MetaStore {
    pub fn new(
        backend: Arc<dyn IoBackend>,
        cache_pages: usize,
        pages: SpaceAllocator,
        gen: u64,
        failed: Arc<AtomicBool>,
    ) -> Self {
        let cap = NonZeroUsize::new(cache_pages.max(64)).unwrap_or(NonZeroUsize::MIN);
        MetaStore {
            backend,
            cache: LruCache::new(cap),
            dirty: BTreeSet::new(),
            pinned: HashMap::new(),
            failed,
            pages,
            pending_pages: Vec::new(),
            gen,
            reserved_end_pages: None,
        }
    }

    /// Makes sure `nodes` node pages and one blob of `blob_pages` contiguous pages can be
    /// allocated and written without the file system running out, topping up the reserve
    /// when they would not fit. `NoSpace` before anything is allocated when it cannot.
    pub fn reserve_pages(&mut self, nodes: u64, blob_pages: u64) -> Result<()> {
        // Nodes take free pages inside the file first; a blob may need the end.
        let need_end =
            self.pages.end() + blob_pages + nodes.saturating_sub(self.pages.free_inside());
        self.cover(need_end)
    }

    /// Makes sure every page below `need_end` is set aside.
    fn cover(&mut self, need_end: u64) -> Result<()> {
        let Some(reserved) = self.reserved_end_pages else {
            return Ok(());
        };
        if need_end <= reserved {
            return Ok(());
        }
        let want_end = need_end.max(self.pages.end() + META_RESERVE_PAGES);
        self.set_aside(reserved, need_end, want_end)
    }

    /// Tops the reserve up to full when less than half of it is left beyond the last page in
    /// use; `NoSpace` when the file system cannot give back at least half (`space.rs`).
    pub fn top_up_reserve(&mut self) -> Result<()> {
        let Some(reserved) = self.reserved_end_pages else {
            return Ok(());
        };
        let half_end = self.pages.end() + META_RESERVE_PAGES / 2;
        if reserved >= half_end {
            return Ok(());
        }
        self.set_aside(reserved, half_end, self.pages.end() + META_RESERVE_PAGES)
    }

    fn set_aside(&mut self, reserved: u64, need_end: u64, want_end: u64) -> Result<()> {
        let page = PAGE_SIZE as u64;
        let end = set_aside(
            &*self.backend,
            FileKind::Meta,
            reserved * page,
            (need_end - reserved) * page,
            (want_end - reserved) * page,
            true,
        )?;
        if let Some(end) = end {
            self.reserved_end_pages = Some(end / page);
        }
        Ok(())
    }

    /// Reads a node without caching it (for whole-pool walks that would flush the cache).
    pub fn peek(&mut self, page: u64) -> Result<Arc<Node>> {
        if let Some(cached) = self.cache.peek(&page) {
            return Ok(cached.node.clone());
        }
        if let Some(node) = self.pinned.get(&page) {
            return Ok(node.clone());
        }
        Ok(Arc::new(self.read(page)?))
    }

    fn read(&self, page: u64) -> Result<Node> {
        if page == 0 || page >= self.pages.end() {
            return Err(Error::corrupt(
                format!("extent-map pointer to page {page} outside the metadata file"),
                "meta.grove",
            ));
        }
        let bytes = io::read_blocking(
            &*self.backend,
            FileKind::Meta,
            page * PAGE_SIZE as u64,
            PAGE_SIZE,
        )?;
        Node::decode(&bytes, page)
    }

    pub fn get(&mut self, page: u64) -> Result<Arc<Node>> {
        if let Some(cached) = self.cache.get(&page) {
            return Ok(cached.node.clone());
        }
        if let Some(node) = self.pinned.get(&page) {
            return Ok(node.clone());
        }
        let node = Arc::new(self.read(page)?);
        self.insert(
            page,
            Cached {
                node: node.clone(),
                dirty: false,
            },
        )?;
        Ok(node)
    }

    /// Stores a node born in the current generation; written at eviction or the next sync.
    pub fn put(&mut self, page: u64, node: Node) -> Result<()> {
        debug_assert_eq!(node.birth, self.gen);
        self.dirty.insert(page);
        self.insert(
            page,
            Cached {
                node: Arc::new(node),
                dirty: true,
            },
        )
    }

    /// Changes a node born in the current generation where it is and marks it dirty. It is
    /// copied only when something else still holds it (`Arc::make_mut`).
    pub fn modify<R>(&mut self, page: u64, f: impl FnOnce(&mut Node) -> R) -> Result<R> {
        if let Some(cached) = self.cache.get_mut(&page) {
            debug_assert_eq!(cached.node.birth, self.gen);
            let out = f(Arc::make_mut(&mut cached.node));
            if !cached.dirty {
                cached.dirty = true;
                self.dirty.insert(page);
            }
            return Ok(out);
        }
        // Evicted, or pinned after a failed write: changed in a copy put back in the cache.
        let mut node = (*self.get(page)?).clone();
        let out = f(&mut node);
        self.put(page, node)?;
        Ok(out)
    }

    fn insert(&mut self, page: u64, cached: Cached) -> Result<()> {
        self.pinned.remove(&page);
        if let Some((evicted, old)) = self.cache.push(page, cached) {
            if evicted != page && old.dirty {
                let bytes = old.node.encode(evicted);
                let offset = evicted * PAGE_SIZE as u64;
                if let Err(err) = io::write_blocking(&*self.backend, FileKind::Meta, offset, bytes)
                {
                    // The node stays in memory, so nothing reads stale data; the pool fails,
                    // so nothing more is changed or made durable. The caller's own operation
                    // goes on.
                    if !self.failed.swap(true, Ordering::AcqRel) {
                        tracing::error!(error = %err, page = evicted,
                            "writing a metadata page failed: the pool refuses further writes until it is reopened");
                    }
                    self.pinned.insert(evicted, old.node);
                }
                self.dirty.remove(&evicted);
            }
        }
        Ok(())
    }

    /// A fresh page for a node of the current generation.
    pub fn alloc_page(&mut self) -> u64 {
        self.pages.alloc(1, Fit::First).0
    }

    /// Releases a node's page. A node of the current generation is referenced by nothing
    /// durable and is freed at once; an older one that only this tree owned is freed after the
    /// next sync; a shared one is left alone.
    pub fn release(&mut self, page: u64, birth: u64, exclusive_since: u64) {
        if birth == self.gen {
            self.cache.pop(&page);
            self.pinned.remove(&page);
            self.dirty.remove(&page);
            self.pages.free(page, 1);
        } else if birth >= exclusive_since {
            self.pending_pages.push(PendingFree {
                gen: self.gen,
                start: page,
                len: 1,
            });
        }
    }

    /// Writes every dirty node (part of a sync): on this thread where the backend can, else all
    /// submitted at once. A node is marked clean only once its write succeeded.
    pub fn write_dirty(&mut self) -> Result<usize> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut written = Vec::new();
        let mut submitted = 0;
        for &page in &self.dirty {
            let node = match self.cache.peek(&page) {
                Some(cached) => cached.node.clone(),
                None => match self.pinned.get(&page) {
                    Some(node) => node.clone(),
                    None => continue,
                },
            };
            let op = io::IoOp::Write {
                file: FileKind::Meta,
                offset: page * PAGE_SIZE as u64,
                buf: node.encode(page),
            };
            // Written here where the backend can: the state lock is held, and a page-cache
            // write is quicker than the hand-off (`IoBackend::run_here`).
            match self.backend.run_here(op) {
                Ok(done) => written.push((page, done.result)),
                Err(op) => {
                    let tx = tx.clone();
                    self.backend.submit(
                        op,
                        Box::new(move |done| {
                            let _ = tx.send((page, done.result));
                        }),
                    );
                    submitted += 1;
                }
            }
        }
        drop(tx);
        let count = written.len() + submitted;
        let mut first_error = None;
        for (page, result) in written.into_iter().chain(rx.iter().take(submitted)) {
            match result {
                Ok(()) => {
                    self.dirty.remove(&page);
                    self.pinned.remove(&page);
                    if let Some(cached) = self.cache.peek_mut(&page) {
                        cached.dirty = false;
                    }
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(Error::from_io(err)),
            None => Ok(count),
        }
    }

    pub fn dirty_pages(&self) -> usize {
        self.dirty.len()
    }

    /// Writes a blob (a commit bitmap) to fresh contiguous pages; returns its first page.
    pub fn write_blob(&mut self, bytes: &[u8]) -> Result<u64> {
        let pages = (bytes.len() as u64).div_ceil(PAGE_SIZE as u64).max(1);
        let start = self.pages.alloc_contiguous(pages);
        if let Err(err) = self.cover(start + pages) {
            self.pages.free(start, pages);
            return Err(err);
        }
        let mut buf = bytes.to_vec();
        buf.resize((pages as usize) * PAGE_SIZE, 0);
        if let Err(err) = io::write_blocking(
            &*self.backend,
            FileKind::Meta,
            start * PAGE_SIZE as u64,
            buf,
        ) {
            self.pages.free(start, pages);
            return Err(Error::from_io(err));
        }
        Ok(start)
    }

    pub fn read_blob(&self, start: u64, len_bytes: u64, crc: u32) -> Result<Vec<u8>> {
        let pages = len_bytes.div_ceil(PAGE_SIZE as u64).max(1);
        if start == 0
            || start
                .checked_add(pages)
                .is_none_or(|end| end > self.pages.end())
        {
            return Err(Error::corrupt(
                "commit bitmap pointer outside the metadata file",
                format!("meta page {start}"),
            ));
        }
        let mut bytes = io::read_blocking(
            &*self.backend,
            FileKind::Meta,
            start * PAGE_SIZE as u64,
            len_bytes as usize,
        )?;
        bytes.truncate(len_bytes as usize);
        if crc32c::crc32c(&bytes) != crc {
            return Err(Error::corrupt(
                "commit bitmap (checksum mismatch)",
                format!("meta page {start}"),
            ));
        }
        Ok(bytes)
    }

    /// Frees pages whose deferral ended with the durable sync point `synced_gen`.
    pub fn release_pending(&mut self, synced_gen: u64) {
        let (ready, keep): (Vec<_>, Vec<_>) = self
            .pending_pages
            .drain(..)
            .partition(|p| p.gen <= synced_gen);
        self.pending_pages = keep;
        for p in ready {
            self.cache.pop(&p.start);
            self.pages.free(p.start, p.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_round_trip_and_corruption() {
        let leaf = Node {
            birth: 7,
            level: 0,
            body: Body::Leaf(vec![
                Extent {
                    lblock: 1,
                    len: 3,
                    target: Target::Data(100),
                    birth: 5,
                },
                Extent {
                    lblock: 10,
                    len: 2,
                    target: Target::Zero,
                    birth: 7,
                },
            ]),
        };
        let page = leaf.encode(42);
        assert_eq!(Node::decode(&page, 42).unwrap(), leaf);
        assert!(Node::decode(&page, 43).is_err());
        let mut bad = page.clone();
        bad[40] ^= 1;
        assert!(matches!(Node::decode(&bad, 42), Err(Error::Corrupt { .. })));
        let internal = Node {
            birth: 1,
            level: 1,
            body: Body::Internal(vec![Child {
                key: 0,
                page: 3,
                max_birth: 1,
            }]),
        };
        assert_eq!(Node::decode(&internal.encode(9), 9).unwrap(), internal);
    }
}
