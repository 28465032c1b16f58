//! The pool: the data directory with its data file, metadata pages and journal, and the
//! catalog of volumes, branches, commits and tags in it. This module owns the sync protocol
//! (FORMAT.md, "sync points"); `session.rs` holds the data path.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use roaring::RoaringTreemap;
use tokio::sync::{broadcast, OwnedRwLockWriteGuard};

use crate::allocator::SpaceAllocator;
use crate::catalog::*;
use crate::error::{Error, Result};
use crate::event_log::EventIndex;
use crate::events::{Event, EventBus, LoggedEvent};
use crate::extent_map::MapReader;
use crate::format::*;
use crate::grace::Grace;
use crate::history::read_bitmap;
use crate::io::{self, BackendChoice, FileKind, IoBackend};
use crate::merge::refuse_merge_branch;
use crate::meta::{MetaStore, PendingFree, Target};
use crate::rewrite::free_blob;
use crate::session::{AtomicCounters, Session, SessionClient, SessionInfo, SessionTarget};
use crate::space::JOURNAL_RECORD_ROOM_BYTES;
use crate::sums::{block_sum, region_of, Intent, SumStore, INTENT_IDLE, INTENT_REGION_BLOCKS};
use crate::types::*;

/// Which disk I/O backend to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoChoice {
    /// io_uring where the kernel allows it, else the thread pool.
    #[default]
    Auto,
    IoUring,
    Threads,
}

#[derive(Clone, Debug)]
pub struct PoolOptions {
    pub data_dir: PathBuf,
    pub io: IoChoice,
    /// Bound on the metadata page cache, in bytes (at least 64 pages).
    pub cache_bytes: u64,
}

impl PoolOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PoolOptions {
            data_dir: data_dir.into(),
            io: IoChoice::Auto,
            cache_bytes: 256 << 20,
        }
    }
}

/// Everything behind the state lock.
pub(crate) struct State {
    pub meta: MetaStore,
    /// Block checksums (`sums.rs`).
    pub sums: SumStore,
    pub data: SpaceAllocator,
    /// Data blocks freed, reusable after the sync point of their generation.
    pub pending_data: Vec<PendingFree>,
    pub catalog: Catalog,
    /// Heads whose durable state changed since the last sync point.
    pub dirty_heads: BTreeSet<u64>,
    /// Where the next journal record goes.
    pub journal_end: u64,
    /// A space scan is reading metadata pages: freed pages are not reused until it ends.
    pub scan_active: bool,
    /// The sequence number of the next event logged.
    pub next_event_seq: u64,
    /// Events of changes that need no sync point of their own (sessions opening and closing),
    /// with their actors: logged by the next one.
    pub pending_events: Vec<(Event, Option<Arc<str>>)>,
    /// Commits being checked before they are made: id -> (volume, head).
    pub candidates: HashMap<CommitId, Pending>,
    /// What each job's sessions read (lineage), with when it last read (`job_clock`).
    pub jobs: HashMap<String, (crate::lineage::JobReads, u64)>,
    pub job_clock: u64,
    /// Sessions of earlier runs were numbered below this (ids stay unique in lineage).
    pub first_session_id: u64,
    /// The torn journal tail found at open (cut, unless a check left it in place).
    pub torn_journal_bytes: u64,
    /// How far the data file and the journal are set aside on the file system (`space.rs`);
    /// `None` where that is not supported, or in a check that must write nothing.
    pub reserved: Option<crate::space::Reserved>,
    /// Regions found in the intent at open (their checksums were computed again).
    pub intent_at_open: Vec<u64>,
}

/// A commit being checked (`Pool::prepare_commit`).
pub(crate) struct Pending {
    pub volume: String,
    pub head_id: u64,
    /// Set when the candidate is dropped without being committed: sessions opened on it stop
    /// reading (the head it showed moves on).
    pub withdrawn: Arc<AtomicBool>,
}

impl State {
    /// Refuses to drop or rewrite a head while a commit of it is being checked.
    pub(crate) fn refuse_pending(&self, head_id: u64, what: &str) -> Result<()> {
        if self.candidates.values().any(|p| p.head_id == head_id) {
            return Err(Error::Conflict(format!(
                "a pre-commit check of this branch is in progress; {what} after it"
            )));
        }
        Ok(())
    }

    /// Resolves a ref string or export name (a `?job=ID` suffix is ignored), candidates of
    /// commits being checked included.
    pub fn resolve(&self, spec: &str) -> Result<ResolvedRef> {
        let (spec, _) = split_job(spec)?;
        match self.catalog.resolve(spec) {
            Err(err @ Error::NotFound { .. }) => {
                let candidate = spec.split_once('@').and_then(|(volume, name)| {
                    let id = CommitId::try_from(name.to_string()).ok()?;
                    let pending = self.candidates.get(&id)?;
                    (pending.volume == volume).then(|| ResolvedRef::Commit {
                        volume: pending.volume.clone(),
                        commit: id,
                    })
                });
                candidate.ok_or(err)
            }
            other => other,
        }
    }

    /// Numbers the pending events and then `events` (made by `actor`) for the log.
    fn number_events(&mut self, events: Vec<Event>, actor: Option<Arc<str>>) -> Vec<LoggedEvent> {
        let time_unix_ms = now_unix_ms();
        let pending = std::mem::take(&mut self.pending_events);
        let all = pending
            .into_iter()
            .chain(events.into_iter().map(|event| (event, actor.clone())));
        all.map(|(event, actor)| {
            let seq = self.next_event_seq;
            self.next_event_seq += 1;
            LoggedEvent {
                seq,
                time_unix_ms,
                actor: actor.map(|a| a.to_string()),
                event,
            }
        })
        .collect()
    }

    fn head_records(&mut self) -> Vec<HeadRecord> {
        let ids = std::mem::take(&mut self.dirty_heads);
        ids.into_iter()
            .filter_map(|id| self.catalog.heads.get(&id).map(|h| h.record.clone()))
            .collect()
    }

    /// Frees the data blocks of removed extents that only the head owned (born since its
    /// `exclusive_since`), and takes them off the volume's count.
    pub fn release_extents(
        &mut self,
        volume: &str,
        removed: &[crate::meta::Extent],
        exclusive_since: u64,
    ) {
        let gen = self.meta.gen;
        let mut freed = 0;
        for e in removed {
            if let Target::Data(p) = e.target {
                if e.birth >= exclusive_since {
                    self.pending_data.push(PendingFree {
                        gen,
                        start: p,
                        len: e.len,
                    });
                    freed += e.len;
                }
            }
        }
        if let Some(vol) = self.catalog.volumes.get_mut(volume) {
            vol.blocks = vol.blocks.saturating_sub(freed);
        }
    }
}

pub(crate) struct PoolInner {
    pub(crate) events: EventBus,
    pub(crate) backend: Arc<dyn IoBackend>,
    pub(crate) state: Mutex<State>,
    /// Serialises sync points; taken before `state`, only on blocking threads.
    sync_lock: Mutex<()>,
    pub(crate) grace: Grace,
    /// Set after an I/O failure; shared with the metadata store, which can fail on eviction.
    poisoned: Arc<AtomicBool>,
    next_session: AtomicU64,
    pub(crate) sessions: Mutex<HashMap<u64, (SessionInfo, Arc<AtomicCounters>)>>,
    data_dir: Option<PathBuf>,
    /// The exclusive lock on the pool directory, held while the pool is open.
    dir_lock: Mutex<Option<std::fs::File>>,
    /// One space scan at a time.
    pub(crate) reclaim_lock: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the background reclaimer.
    pub(crate) reclaim_wanted: Arc<tokio::sync::Notify>,
    /// How many changes have asked for a scan, and how many of them the latest scan's
    /// snapshot saw: the background reclaimer skips a scan that one through the API made.
    pub(crate) reclaim_asked: AtomicU64,
    pub(crate) reclaim_covered: AtomicU64,
    /// Scans completed since the pool opened.
    pub(crate) space_scans: AtomicU64,
    /// The latest scan's figures.
    pub(crate) space: Mutex<Option<crate::reclaim::SpaceReport>>,
    /// Which journal records hold which events.
    pub(crate) event_index: Mutex<EventIndex>,
    /// Wakes the event logger.
    pub(crate) log_wanted: Arc<tokio::sync::Notify>,
    /// I/O and sync-point measurements.
    pub(crate) metrics: crate::metrics::IoMetrics,
    /// Buffers of large reads, reused.
    pub(crate) read_buffers: Arc<crate::read_buffers::ReadBuffers>,
    /// Regions of data blocks being written in place (`sums.rs`).
    pub(crate) intent: Intent,
    /// The pool is being closed: every idle region leaves the intent at the next sync point.
    closing: AtomicBool,
    /// Data blocks found with a bad checksum since the pool was opened (reported once each).
    pub(crate) bad_blocks: Mutex<BTreeSet<u64>>,
    /// Reads and scrubs that met a bad checksum.
    pub(crate) checksum_errors: AtomicU64,
    /// The running or last scrub.
    pub(crate) scrub: Mutex<Option<crate::scrub::ScrubReport>>,
    /// Asks the running scrub to stop.
    pub(crate) scrub_stop: AtomicBool,
}

/// A handle on an open pool; clones share it.
#[derive(Clone)]
pub struct Pool {
    pub(crate) inner: Arc<PoolInner>,
    /// Who the changes made through this handle are logged as.
    pub(crate) actor: Option<Arc<str>>,
}

impl Pool {
    /// Opens the pool in `options.data_dir`, creating it if the directory holds none.
    pub fn open(options: PoolOptions) -> Result<Pool> {
        std::fs::create_dir_all(&options.data_dir)?;
        // One process per pool: a second one would corrupt it.
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(options.data_dir.join("grove.lock"))?;
        if lock.try_lock().is_err() {
            return Err(Error::Conflict(format!(
                "the pool in {} is already open in another process",
                options.data_dir.display()
            )));
        }
        let choice = match options.io {
            IoChoice::Auto => BackendChoice::Auto,
            IoChoice::IoUring => BackendChoice::IoUring,
            IoChoice::Threads => BackendChoice::Threads,
        };
        let backend = io::open_backend(&options.data_dir, choice)?;
        tracing::info!(backend = backend.name(), dir = %options.data_dir.display(), "disk I/O backend selected");
        let pool = Self::open_with_backend(backend, options.cache_bytes, Some(options.data_dir))?;
        *pool.inner.dir_lock.lock() = Some(lock);
        Ok(pool)
    }

    /// Opens a pool on any backend (the simulation in crash tests).
    pub fn open_with_backend(
        backend: Arc<dyn IoBackend>,
        cache_bytes: u64,
        data_dir: Option<PathBuf>,
    ) -> Result<Pool> {
        Self::open_with(backend, cache_bytes, data_dir, true)
    }

    /// Opens a pool; without `cut_torn_tail` a torn journal tail is left as it is (a check).
    pub(crate) fn open_with(
        backend: Arc<dyn IoBackend>,
        cache_bytes: u64,
        data_dir: Option<PathBuf>,
        cut_torn_tail: bool,
    ) -> Result<Pool> {
        let poisoned = Arc::new(AtomicBool::new(false));
        let (mut state, event_index) = recover_with(
            &backend,
            (cache_bytes / PAGE_SIZE as u64) as usize,
            &poisoned,
            cut_torn_tail,
        )?;
        if cut_torn_tail {
            state.reserve_at_open(&*backend)?;
        }
        let first_session_id = state.first_session_id;
        let intent = Intent::recovered(std::mem::take(&mut state.intent_at_open));
        let inner = PoolInner {
            events: EventBus::default(),
            backend,
            state: Mutex::new(state),
            sync_lock: Mutex::new(()),
            grace: Grace::default(),
            poisoned,
            next_session: AtomicU64::new(first_session_id),
            sessions: Mutex::new(HashMap::new()),
            data_dir,
            dir_lock: Mutex::new(None),
            reclaim_lock: Default::default(),
            reclaim_wanted: Default::default(),
            reclaim_asked: AtomicU64::new(0),
            reclaim_covered: AtomicU64::new(0),
            space_scans: AtomicU64::new(0),
            space: Mutex::new(None),
            event_index: Mutex::new(event_index),
            log_wanted: Default::default(),
            metrics: Default::default(),
            read_buffers: Default::default(),
            intent,
            closing: AtomicBool::new(false),
            bad_blocks: Default::default(),
            checksum_errors: AtomicU64::new(0),
            scrub: Mutex::new(None),
            scrub_stop: AtomicBool::new(false),
        };
        Ok(Pool {
            inner: Arc::new(inner),
            actor: None,
        })
    }

    /// A handle on the same pool whose changes are logged as made by `actor`.
    pub fn with_actor(&self, actor: impl Into<String>) -> Pool {
        Pool {
            inner: self.inner.clone(),
            actor: Some(Arc::from(actor.into())),
        }
    }

    /// How long the event log serves events (`None`: for ever).
    pub fn set_event_retention(&self, retention: Option<std::time::Duration>) {
        self.inner.event_index.lock().set_retention(retention);
    }

    /// Logged events as their changes become durable, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LoggedEvent>> {
        self.inner.events.subscribe()
    }

    /// True after an I/O failure: the pool refuses writes until it is reopened.
    pub fn is_failed(&self) -> bool {
        self.inner.check_writable().is_err()
    }

    pub fn io_backend(&self) -> &'static str {
        self.inner.backend.name()
    }

    pub fn stats(&self) -> Result<PoolStats> {
        let st = self.inner.state.lock();
        let used_bytes = st.data.used() * BLOCK_SIZE;
        let fs_free = self
            .inner
            .data_dir
            .as_deref()
            .and_then(|d| io::fs_available_bytes(d).ok())
            .unwrap_or(0);
        let free_bytes =
            st.data.free_inside() * BLOCK_SIZE + st.data_reserved_free_bytes() + fs_free;
        Ok(PoolStats {
            capacity_bytes: used_bytes + free_bytes,
            used_bytes,
            free_bytes,
            metadata_bytes: st.meta.pages.used() * PAGE_SIZE as u64,
            io_backend: self.inner.backend.name().to_string(),
        })
    }

    pub async fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        self.create_volume_with(name, size_bytes, VolumeOptions::default())
            .await
    }

    pub async fn create_volume_with(
        &self,
        name: &str,
        size_bytes: u64,
        options: VolumeOptions,
    ) -> Result<VolumeInfo> {
        validate_volume_name(name)?;
        if size_bytes == 0
            || !size_bytes.is_multiple_of(BLOCK_SIZE)
            || size_bytes > VOLUME_SIZE_MAX_BYTES
        {
            return Err(Error::invalid(format!(
                "invalid volume size {size_bytes}: it must be a non-zero multiple of 4096 bytes, at most 1 PiB"
            )));
        }
        let name = name.to_string();
        let created = name.clone();
        self.inner
            .change(self.actor.clone(), move |st| {
                if st.catalog.volumes.contains_key(&name) {
                    return Err(Error::exists(format!("volume {name:?}")));
                }
                let id = st.catalog.new_id();
                let op = CatalogOp::CreateVolume {
                    id,
                    name: name.clone(),
                    size_bytes,
                    created_unix: now_unix(),
                    origin: None,
                    checksums: options.checksums,
                };
                st.catalog.apply(&op)?;
                let head = HeadRecord {
                    id: st.catalog.new_id(),
                    volume: name.clone(),
                    branch: MAIN_BRANCH.to_string(),
                    root: 0,
                    exclusive_since: st.meta.gen,
                    base: None,
                    base_gen: 0,
                    created_unix: now_unix(),
                    merge: None,
                    lineage: Default::default(),
                    protected: false,
                };
                st.catalog.apply_head(&head)?;
                st.dirty_heads.insert(head.id);
                Ok((
                    vec![op],
                    vec![Event::VolumeCreated {
                        volume: name.clone(),
                        size_bytes,
                        origin: None,
                    }],
                ))
            })
            .await?;
        self.volume(&created)
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let st = self.inner.state.lock();
        st.catalog.volumes.values().map(volume_info).collect()
    }

    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        let st = self.inner.state.lock();
        Ok(volume_info(st.catalog.volume(name)?))
    }

    /// Deletes a volume with all its branches, commits and tags; refused while sessions are
    /// open on it. Its space is returned to the pool.
    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.inner
            .change_then_scan(None, self.actor.clone(), move |st| {
                let vol = st.catalog.volume(&name)?;
                if vol.sessions > 0 {
                    return Err(Error::Conflict(format!(
                        "volume {name:?} has {} open sessions",
                        vol.sessions
                    )));
                }
                for id in vol.branches.values() {
                    st.refuse_pending(*id, "delete the volume")?;
                    refuse_protected(st.catalog.head(*id)?, "delete its volume")?;
                }
                // Clones share its blocks; clones, merges and resets across volumes link
                // other volumes' history to its commits.
                let ours = |id: &CommitId| vol.commits.contains_key(id);
                let dependents: Vec<&str> = st
                    .catalog
                    .volumes
                    .values()
                    .filter(|v| v.name != name)
                    .filter(|v| {
                        v.origin.as_ref().is_some_and(|o| o.volume == name)
                            || v.commits.values().any(|c| c.info.parents.iter().any(ours))
                            || v.branches.values().any(|id| {
                                st.catalog
                                    .heads
                                    .get(id)
                                    .is_some_and(|h| h.record.needs().any(|c| ours(&c)))
                            })
                    })
                    .map(|v| v.name.as_str())
                    .collect();
                if !dependents.is_empty() {
                    return Err(Error::Conflict(format!(
                        "volume {name:?} has clones or volumes whose history continues from it ({}): delete them first",
                        dependents.join(", ")
                    )));
                }
                // A volume that is no clone shares nothing with any other: all its space goes
                // now. A clone shares with its source, so the reclaimer sorts it out.
                if vol.origin.is_none() {
                    free_volume_space(st, &name)?;
                }
                let op = CatalogOp::DeleteVolume { name: name.clone() };
                st.catalog.apply(&op)?;
                Ok((
                    vec![op],
                    vec![Event::VolumeDeleted {
                        volume: name.clone(),
                    }],
                ))
            })
            .await?;
        Ok(())
    }

    /// Creates `branch` on `volume` from `from` (a ref string; default `VOL@main`). Forking a
    /// branch head includes its uncommitted writes.
    pub async fn create_branch(
        &self,
        volume: &str,
        branch: &str,
        from: Option<&str>,
    ) -> Result<BranchInfo> {
        validate_ref_name("branch", branch)?;
        let from = from.unwrap_or(volume);
        let source = self.resolve_in(volume, from)?;
        if source.volume() != volume {
            return Err(Error::invalid(format!(
                "{from:?} is not a ref of volume {volume:?}"
            )));
        }
        // Forking a head makes its blocks shared: no in-place write may be in flight meanwhile.
        let (gated, gate) = match &source {
            ResolvedRef::Branch { volume, branch } => {
                let (id, guard) = self.gate_head(volume, branch).await?;
                (Some(id), Some(guard))
            }
            _ => (None, None),
        };
        let (volume, branch) = (volume.to_string(), branch.to_string());
        let (v, b) = (volume.clone(), branch.clone());
        self.inner
            .change_gated(gate, self.actor.clone(), move |st| {
                check_name_free(&st.catalog, &volume, &branch)?;
                let gen = st.meta.gen;
                let Fork {
                    root,
                    base,
                    base_gen,
                    changed,
                    lineage,
                } = fork(st, &source, gated, "branch from it")?;
                let record = HeadRecord {
                    id: st.catalog.new_id(),
                    volume: volume.clone(),
                    branch: branch.clone(),
                    root,
                    exclusive_since: gen + 1,
                    base,
                    base_gen,
                    created_unix: now_unix(),
                    merge: None,
                    lineage,
                    protected: false,
                };
                st.catalog.apply_head(&record)?;
                st.catalog.head_mut(record.id)?.changed = changed;
                st.dirty_heads.insert(record.id);
                Ok((
                    vec![],
                    vec![Event::BranchCreated {
                        volume: volume.clone(),
                        branch: branch.clone(),
                        from: base,
                    }],
                ))
            })
            .await?;
        self.branch(&v, &b)
    }

    /// Protects a branch (only merges change it; its exports are read-only) or lifts that.
    /// Refused while sessions are attached to it.
    pub async fn set_protected(
        &self,
        volume: &str,
        branch: &str,
        protected: bool,
    ) -> Result<BranchInfo> {
        let (volume, branch) = (volume.to_string(), branch.to_string());
        let (v, b) = (volume.clone(), branch.clone());
        let inner = self.inner.clone();
        self.inner
            .change(self.actor.clone(), move |st| {
                inner.refuse_branch_sessions(&volume, &branch, "changing its protection")?;
                let id = st.catalog.head_id(&volume, &branch)?;
                let head = st.catalog.head_mut(id)?;
                if head.record.protected == protected {
                    return Ok((Vec::new(), Vec::new()));
                }
                if protected && !head.changed.is_empty() {
                    return Err(Error::Conflict(format!(
                        "branch {branch:?} of volume {volume:?} has {} uncommitted blocks: commit them (or reset) before protecting it",
                        head.changed.len()
                    )));
                }
                head.record.protected = protected;
                st.dirty_heads.insert(id);
                let event = Event::BranchProtected {
                    volume: volume.clone(),
                    branch: branch.clone(),
                    protected,
                };
                Ok((Vec::new(), vec![event]))
            })
            .await?;
        self.branch(&v, &b)
    }

    /// Refuses `name` for a new branch of `volume` if a branch or tag has it.
    pub fn check_ref_name_free(&self, volume: &str, name: &str) -> Result<()> {
        check_name_free(&self.inner.state.lock().catalog, volume, name)
    }

    pub fn branches(&self, volume: &str) -> Result<Vec<BranchInfo>> {
        let st = self.inner.state.lock();
        let vol = st.catalog.volume(volume)?;
        vol.branches
            .values()
            .map(|&id| Ok(branch_info(st.catalog.head(id)?)))
            .collect()
    }

    pub fn branch(&self, volume: &str, branch: &str) -> Result<BranchInfo> {
        let st = self.inner.state.lock();
        Ok(branch_info(
            st.catalog.head(st.catalog.head_id(volume, branch)?)?,
        ))
    }

    /// Deletes a branch (not `main`); refused while sessions are attached to it. Deleting a
    /// merge branch aborts its merge.
    pub async fn delete_branch(&self, volume: &str, branch: &str) -> Result<()> {
        self.drop_branch(volume, branch, false).await
    }

    /// Deletes a branch; with `merge_only`, only a merge branch (aborting its merge).
    pub(crate) async fn drop_branch(
        &self,
        volume: &str,
        branch: &str,
        merge_only: bool,
    ) -> Result<()> {
        if branch == MAIN_BRANCH {
            return Err(Error::Conflict(format!(
                "the {MAIN_BRANCH} branch cannot be deleted; delete the volume instead"
            )));
        }
        self.inner
            .refuse_branch_sessions(volume, branch, "deleting it")?;
        let (volume, branch) = (volume.to_string(), branch.to_string());
        let inner = self.inner.clone();
        // What the branch shared with nothing durable (writes it forked with) goes by a scan.
        self.inner
            .change_then_scan(None, self.actor.clone(), move |st| {
                inner.refuse_branch_sessions(&volume, &branch, "deleting it")?;
                let id = st.catalog.head_id(&volume, &branch)?;
                let waiting: Vec<&str> = st
                    .catalog
                    .volume(&volume)?
                    .branches
                    .values()
                    .filter_map(|id| st.catalog.heads.get(id))
                    .filter(|h| h.record.merge.as_ref().is_some_and(|m| m.into == branch))
                    .map(|h| h.record.branch.as_str())
                    .collect();
                if !waiting.is_empty() {
                    return Err(Error::Conflict(format!(
                        "merges into branch {branch:?} are in progress on {}: conclude or abort them first",
                        waiting.join(", ")
                    )));
                }
                refuse_protected(st.catalog.head(id)?, "delete it")?;
                st.refuse_pending(id, "delete the branch")?;
                let merge = st.catalog.head(id)?.record.merge.clone();
                if merge.is_none() && merge_only {
                    return Err(Error::not_found(format!(
                        "a merge in progress on branch {branch:?} of volume {volume:?}"
                    )));
                }
                free_head_space(st, id)?;
                let mut events = vec![Event::BranchDeleted {
                    volume: volume.clone(),
                    branch: branch.clone(),
                }];
                if let Some(merge) = merge {
                    free_blob(st, &merge.taken);
                    free_blob(st, &merge.conflicts);
                    events.push(Event::MergeAborted {
                        volume: volume.clone(),
                        branch: merge.into.clone(),
                        merge_branch: branch.clone(),
                        from: merge.theirs,
                    });
                }
                let op = CatalogOp::DeleteBranch {
                    volume: volume.clone(),
                    branch: branch.clone(),
                };
                st.catalog.apply(&op)?;
                Ok((vec![op], events))
            })
            .await?;
        Ok(())
    }

    /// Commits the head of `volume@branch`: every write acknowledged before the call is in it.
    pub async fn commit(
        &self,
        volume: &str,
        branch: &str,
        request: CommitRequest,
    ) -> Result<CommitInfo> {
        if request.message.trim().is_empty() {
            return Err(Error::invalid("a commit needs a non-empty message"));
        }
        self.prepare_commit(volume, branch)
            .await?
            .commit(request)
            .await
    }

    /// The commit `volume@branch` would make now, held still for inspection (a pre-commit
    /// check): writes to the branch wait until the candidate is committed or dropped, and
    /// meanwhile it reads as the read-only export `VOL@ID` under the id it will have.
    pub async fn prepare_commit(&self, volume: &str, branch: &str) -> Result<Candidate> {
        {
            // A check in progress holds the gate for as long as its hooks take: a second
            // commit (a hook calling back) is refused rather than left waiting on it.
            let st = self.inner.state.lock();
            st.refuse_pending(st.catalog.head_id(volume, branch)?, "commit")?;
        }
        // Waits for in-flight writes on the head; new ones wait for the commit.
        let (head_id, gate) = self.gate_head(volume, branch).await?;
        let id = CommitId::random();
        let mut st = self.inner.state.lock();
        st.refuse_pending(head_id, "commit")?;
        let head = st.catalog.head(head_id)?;
        refuse_merge_branch(head, "commit on it")?;
        refuse_protected(head, "commit on it")?;
        let (parent, changed) = (head.record.base, head.changed.clone());
        let withdrawn = Arc::new(AtomicBool::new(false));
        st.candidates.insert(
            id,
            Pending {
                volume: volume.to_string(),
                head_id,
                withdrawn: withdrawn.clone(),
            },
        );
        Ok(Candidate {
            withdrawn,
            committed: false,
            pool: self.clone(),
            volume: volume.to_string(),
            branch: branch.to_string(),
            commit: id,
            parent,
            changed,
            head_id,
            gate: Some(gate),
        })
    }

    /// Holds a head's gate exclusively: waits for the writes in flight on it, and holds new
    /// ones back until the guard is dropped.
    pub(crate) async fn gate_head(
        &self,
        volume: &str,
        branch: &str,
    ) -> Result<(u64, OwnedRwLockWriteGuard<()>)> {
        let (id, gate) = {
            let st = self.inner.state.lock();
            let id = st.catalog.head_id(volume, branch)?;
            (id, st.catalog.head(id)?.gate.clone())
        };
        Ok((id, gate.write_owned().await))
    }

    /// Looks up a commit by full id or unique prefix.
    pub fn commit_info(&self, volume: &str, id_or_prefix: &str) -> Result<CommitInfo> {
        let st = self.inner.state.lock();
        Ok(st.catalog.find_commit(volume, id_or_prefix)?.info.clone())
    }

    /// The blocks a commit changed relative to its first parent (its stored roaring bitmap).
    pub fn commit_changes(&self, volume: &str, id_or_prefix: &str) -> Result<RoaringTreemap> {
        let st = self.inner.state.lock();
        read_bitmap(
            &st.meta,
            &st.catalog.find_commit(volume, id_or_prefix)?.bitmap,
        )
    }

    /// History from a ref backwards along first parents, newest first.
    pub fn log(&self, refspec: &str, limit: Option<usize>) -> Result<Vec<CommitInfo>> {
        let st = self.inner.state.lock();
        let resolved = st.catalog.resolve(refspec)?;
        let mut next = match &resolved {
            ResolvedRef::Branch { volume, branch } => {
                st.catalog
                    .head(st.catalog.head_id(volume, branch)?)?
                    .record
                    .base
            }
            ResolvedRef::Tag { commit, .. } | ResolvedRef::Commit { commit, .. } => Some(*commit),
        };
        let mut out = Vec::new();
        // A clone's history continues into its source volume's.
        let bound = st.catalog.commit_volumes.len();
        while let Some(id) = next {
            if limit.is_some_and(|l| out.len() >= l) || out.len() > bound {
                break;
            }
            let Some(commit) = st.catalog.commit(&id) else {
                break;
            };
            out.push(commit.info.clone());
            next = commit.info.parents.first().copied();
        }
        Ok(out)
    }

    pub async fn create_tag(&self, volume: &str, tag: &str, target: &str) -> Result<TagInfo> {
        validate_ref_name("tag", tag)?;
        let commit = match self.resolve_in(volume, target)? {
            ResolvedRef::Tag {
                commit, volume: v, ..
            }
            | ResolvedRef::Commit { commit, volume: v }
                if v == volume =>
            {
                commit
            }
            ResolvedRef::Branch { volume: v, branch } if v == volume => {
                let st = self.inner.state.lock();
                let head = st.catalog.head(st.catalog.head_id(&v, &branch)?)?;
                head.record.base.ok_or_else(|| {
                    Error::invalid(format!("branch {branch:?} has no commits to tag"))
                })?
            }
            _ => {
                return Err(Error::invalid(format!(
                    "{target:?} is not a ref of volume {volume:?}"
                )))
            }
        };
        let (volume, tag) = (volume.to_string(), tag.to_string());
        let (v, t) = (volume.clone(), tag.clone());
        self.inner
            .change(self.actor.clone(), move |st| {
                let owner = st.catalog.commit_volumes.get(&commit);
                if owner != Some(&volume) {
                    return Err(Error::invalid(format!(
                        "commit {commit} belongs to volume {:?}, not {volume:?}: tag it there",
                        owner.map(String::as_str).unwrap_or("?")
                    )));
                }
                let vol = st.catalog.volume(&volume)?;
                if vol.tags.contains_key(&tag) {
                    return Err(Error::exists(format!("tag {tag:?} of volume {volume:?}")));
                }
                if vol.branches.contains_key(&tag) {
                    return Err(Error::exists(format!(
                        "a branch named {tag:?} in volume {volume:?}"
                    )));
                }
                let op = CatalogOp::CreateTag {
                    volume: volume.clone(),
                    tag: tag.clone(),
                    commit,
                    created_unix: now_unix(),
                };
                st.catalog.apply(&op)?;
                Ok((
                    vec![op],
                    vec![Event::TagCreated {
                        volume: volume.clone(),
                        tag: tag.clone(),
                        commit,
                    }],
                ))
            })
            .await?;
        let st = self.inner.state.lock();
        st.catalog
            .volume(&v)?
            .tags
            .get(&t)
            .cloned()
            .ok_or_else(|| Error::not_found("tag"))
    }

    pub fn tags(&self, volume: &str) -> Result<Vec<TagInfo>> {
        let st = self.inner.state.lock();
        Ok(st.catalog.volume(volume)?.tags.values().cloned().collect())
    }

    pub async fn delete_tag(&self, volume: &str, tag: &str) -> Result<()> {
        let (volume, tag) = (volume.to_string(), tag.to_string());
        self.inner
            .change(self.actor.clone(), move |st| {
                if !st.catalog.volume(&volume)?.tags.contains_key(&tag) {
                    return Err(Error::not_found(format!(
                        "tag {tag:?} of volume {volume:?}"
                    )));
                }
                let op = CatalogOp::DeleteTag {
                    volume: volume.clone(),
                    tag: tag.clone(),
                };
                st.catalog.apply(&op)?;
                Ok((
                    vec![op],
                    vec![Event::TagDeleted {
                        volume: volume.clone(),
                        tag: tag.clone(),
                    }],
                ))
            })
            .await
    }

    /// Resolves `VOL`, `VOL@BRANCH`, `VOL@TAG`, `VOL@COMMIT` (full or unique prefix), and
    /// the candidate of a commit being checked (`VOL@ID`, full id).
    pub fn resolve(&self, refspec: &str) -> Result<ResolvedRef> {
        self.inner.state.lock().resolve(refspec)
    }

    /// What an export name serves: its canonical name, whether it is read-only, its size.
    pub fn export_info(&self, name: &str) -> Result<ExportInfo> {
        let st = self.inner.state.lock();
        let target = st.resolve(name)?;
        let mut read_only = target.read_only();
        let (size_bytes, description) = match &target {
            ResolvedRef::Branch { volume, branch } => {
                let head = st.catalog.head(st.catalog.head_id(volume, branch)?)?;
                read_only |= head.record.protected;
                (
                    st.catalog.volume(volume)?.size_bytes,
                    format!("branch {branch} of volume {volume}"),
                )
            }
            ResolvedRef::Tag { volume, commit, .. } | ResolvedRef::Commit { volume, commit } => {
                match st.catalog.commit_required(commit) {
                    Ok(c) => (
                        c.info.size_bytes,
                        format!("commit {commit} of volume {volume}: {}", c.info.message),
                    ),
                    Err(_) => (
                        st.catalog.volume(volume)?.size_bytes,
                        format!("candidate commit {commit} of volume {volume}, being checked"),
                    ),
                }
            }
        };
        Ok(ExportInfo {
            name: target.canonical_name(),
            read_only,
            size_bytes,
            description,
        })
    }

    /// Resolves a ref given in the context of `volume`: a full ref (`VOL@NAME`), or a bare
    /// branch, tag or commit name of `volume`, or a bare volume name (its main branch).
    pub fn resolve_in(&self, volume: &str, refspec: &str) -> Result<ResolvedRef> {
        let st = self.inner.state.lock();
        if !refspec.contains('@') {
            match st.catalog.resolve(&format!("{volume}@{refspec}")) {
                // Not a name in the volume: perhaps a volume name (its main branch); if not,
                // the answer is about the name in the volume.
                Err(err @ (Error::NotFound { .. } | Error::InvalidArgument(_))) => {
                    return st.catalog.resolve(refspec).map_err(|_| err);
                }
                found => return found,
            }
        }
        st.catalog.resolve(refspec)
    }

    /// Every ref of every volume, as exports.
    pub fn exports(&self) -> Vec<ExportInfo> {
        let st = self.inner.state.lock();
        let mut out = Vec::new();
        for vol in st.catalog.volumes.values() {
            let size_bytes = vol.size_bytes;
            for (branch, id) in &vol.branches {
                let protected = st.catalog.heads.get(id).is_some_and(|h| h.record.protected);
                let name = if branch == MAIN_BRANCH {
                    vol.name.clone()
                } else {
                    format!("{}@{branch}", vol.name)
                };
                out.push(ExportInfo {
                    name,
                    read_only: protected,
                    size_bytes,
                    description: format!("branch {branch} of volume {}", vol.name),
                });
            }
            for tag in vol.tags.values() {
                out.push(ExportInfo {
                    name: format!("{}@{}", vol.name, tag.name),
                    read_only: true,
                    size_bytes,
                    description: format!(
                        "tag {} (commit {}) of volume {}",
                        tag.name, tag.commit, vol.name
                    ),
                });
            }
            for commit in vol.commits.values() {
                out.push(ExportInfo {
                    name: format!("{}@{}", vol.name, commit.info.id),
                    read_only: true,
                    size_bytes,
                    description: format!(
                        "commit {} of volume {}: {}",
                        commit.info.id, vol.name, commit.info.message
                    ),
                });
            }
        }
        out
    }

    /// Opens an I/O session on a ref (an export name).
    pub fn open_session(&self, export: &str, client: SessionClient) -> Result<Arc<Session>> {
        let (_, job) = split_job(export)?;
        let job = job.map(str::to_string);
        let mut st = self.inner.state.lock();
        let target = st.resolve(export)?;
        let vol = st.catalog.volume(target.volume())?;
        let (size_bytes, checksums) = (vol.size_bytes, vol.checksums);
        let mut read_only = target.read_only();
        let mut withdrawn = None;
        let session_target = match &target {
            ResolvedRef::Branch { volume, branch } => {
                let id = st.catalog.head_id(volume, branch)?;
                let head = st.catalog.head(id)?;
                read_only |= head.record.protected;
                SessionTarget::Head {
                    id,
                    gate: head.gate.clone(),
                    ranges: head.ranges.clone(),
                }
            }
            ResolvedRef::Tag { commit, .. } | ResolvedRef::Commit { commit, .. } => {
                match st.candidates.get(commit) {
                    // Held still by its gate while it is checked.
                    Some(pending) => {
                        withdrawn = Some(pending.withdrawn.clone());
                        SessionTarget::Commit {
                            root: st.catalog.head(pending.head_id)?.record.root,
                        }
                    }
                    None => SessionTarget::Commit {
                        root: st.catalog.commit_required(commit)?.root,
                    },
                }
            }
        };
        st.catalog.volume_mut(target.volume())?.sessions += 1;
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let info = SessionInfo {
            id,
            export: export.to_string(),
            target,
            client,
            job,
            opened_unix: now_unix(),
            counters: Default::default(),
        };
        let counters = Arc::new(AtomicCounters::default());
        // Registered under the state lock: a change that checks for sessions under it sees
        // every session that could see the change.
        self.inner
            .sessions
            .lock()
            .insert(id, (info.clone(), counters.clone()));
        // Logged by a sync point of its own soon, or by the next one.
        let event = Event::SessionOpened {
            session: id,
            export: export.to_string(),
            protocol: info.client.protocol.clone(),
            client: info.client.address.clone(),
        };
        st.pending_events.push((event, Some(info.client.actor())));
        drop(st);
        self.inner.log_soon();
        let io = self
            .inner
            .metrics
            .export(&info.client.protocol, &info.target.canonical_name());
        Ok(Arc::new(Session {
            pool: self.inner.clone(),
            io,
            info,
            read_only,
            withdrawn,
            counters,
            size_bytes,
            checksums,
            target: session_target,
        }))
    }

    /// Live sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let sessions = self.inner.sessions.lock();
        let mut out: Vec<SessionInfo> = sessions
            .values()
            .map(|(info, counters)| SessionInfo {
                counters: counters.snapshot(),
                ..info.clone()
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Makes everything acknowledged so far durable.
    pub async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    /// Reads (and scrubs) that found a data block not matching its checksum.
    pub fn checksum_errors(&self) -> u64 {
        self.inner.checksum_errors.load(Ordering::Relaxed)
    }

    /// The last flush before the pool is closed: also takes every region out of the intent,
    /// so that the next open has no checksums to compute again.
    pub async fn close(&self) -> Result<()> {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.flush().await
    }
}

impl PoolInner {
    /// How many sessions are open on refs matching `on`. Sessions register under the state
    /// lock: called under it, this sees every session that could observe a change made there.
    pub(crate) fn attached(&self, on: impl Fn(&ResolvedRef) -> bool) -> usize {
        let sessions = self.sessions.lock();
        sessions
            .values()
            .filter(|(info, _)| on(&info.target))
            .count()
    }

    /// Refuses to change a branch's content (or drop it) while sessions are attached to it.
    pub(crate) fn refuse_branch_sessions(
        &self,
        volume: &str,
        branch: &str,
        action: &str,
    ) -> Result<()> {
        let attached = self.attached(|target| {
            matches!(target, ResolvedRef::Branch { volume: v, branch: b } if v == volume && b == branch)
        });
        if attached > 0 {
            return Err(Error::Conflict(format!(
                "branch {branch:?} of volume {volume:?} has {attached} open sessions; disconnect them before {action}"
            )));
        }
        Ok(())
    }
}

impl PoolInner {
    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    /// A failed metadata operation may have left a change half-applied in memory (nodes copied,
    /// old pages queued for freeing, the head not yet updated): the pool fails and stops.
    pub(crate) fn fail_meta(&self, err: Error) -> Error {
        self.poison(&err);
        err
    }

    /// Marks the pool failed after an I/O error that may have lost durability.
    pub(crate) fn poison(&self, err: &Error) {
        if !self.poisoned.swap(true, Ordering::AcqRel) {
            tracing::error!(error = %err, "I/O failure: the pool refuses further writes until it is reopened");
        }
    }

    /// Makes every acknowledged write durable.
    pub(crate) async fn flush(self: &Arc<Self>) -> Result<()> {
        let inner = self.clone();
        run_blocking(move || inner.sync_writes(|_| Ok((Vec::new(), Vec::new())))).await
    }

    /// Applies a catalog change and makes it durable with a sync point that logs its events
    /// as made by `actor`; they are published once it is.
    pub(crate) async fn change<F>(self: &Arc<Self>, actor: Option<Arc<str>>, f: F) -> Result<()>
    where
        F: FnOnce(&mut State) -> Result<(Vec<CatalogOp>, Vec<Event>)> + Send + 'static,
    {
        self.change_gated(None, actor, f).await
    }

    /// Like `change`, holding a head's gate exclusively until the change is durable. The work,
    /// the gate and the events go to a blocking thread together: if the caller is cancelled
    /// (an HTTP client gone), the change still completes and publishes its events, and only
    /// then lets writes through.
    pub(crate) async fn change_gated<F>(
        self: &Arc<Self>,
        gate: Option<OwnedRwLockWriteGuard<()>>,
        actor: Option<Arc<str>>,
        f: F,
    ) -> Result<()>
    where
        F: FnOnce(&mut State) -> Result<(Vec<CatalogOp>, Vec<Event>)> + Send + 'static,
    {
        self.change_then(gate, actor, f, Afterwards::Nothing).await
    }

    /// Like `change_gated`, for a change that can leave blocks nothing references (a delete,
    /// a reset, a clone): once it is durable, the background reclaimer is asked for a scan,
    /// from the blocking thread, so that a caller that gave up still gets the space back.
    pub(crate) async fn change_then_scan<F>(
        self: &Arc<Self>,
        gate: Option<OwnedRwLockWriteGuard<()>>,
        actor: Option<Arc<str>>,
        f: F,
    ) -> Result<()>
    where
        F: FnOnce(&mut State) -> Result<(Vec<CatalogOp>, Vec<Event>)> + Send + 'static,
    {
        self.change_then(gate, actor, f, Afterwards::Scan).await
    }

    async fn change_then<F>(
        self: &Arc<Self>,
        gate: Option<OwnedRwLockWriteGuard<()>>,
        actor: Option<Arc<str>>,
        f: F,
        afterwards: Afterwards,
    ) -> Result<()>
    where
        F: FnOnce(&mut State) -> Result<(Vec<CatalogOp>, Vec<Event>)> + Send + 'static,
    {
        let inner = self.clone();
        run_blocking(move || {
            let result = inner.sync(actor, f);
            drop(gate);
            if result.is_ok() && afterwards == Afterwards::Scan {
                inner.reclaim_soon();
            }
            result
        })
        .await
    }

    /// Asks the event logger (`Pool::spawn_event_logger`) to log pending events (sessions
    /// opened or closed) with a sync point of their own; without one, the next sync point
    /// logs them.
    pub(crate) fn log_soon(&self) {
        self.log_wanted.notify_one();
    }

    /// One sync point (FORMAT.md, "sync points"): the catalog change `f` applied, dirty nodes
    /// written and the generation advanced, all under the state lock; then data, metadata and
    /// checksums made durable together, and a journal record after them. The record logs the
    /// change's events (and any pending ones), which are published once it is durable, in
    /// order. Runs on a blocking thread.
    pub(crate) fn sync<F>(&self, actor: Option<Arc<str>>, f: F) -> Result<()>
    where
        F: FnOnce(&mut State) -> Result<(Vec<CatalogOp>, Vec<Event>)>,
    {
        self.sync_point(actor, f, true)
    }

    /// A sync point whose `f` changes nothing (a flush, a scan's snapshot): it makes the
    /// acknowledged writes durable, and still can when the journal has no room left, as long as
    /// there is nothing to record.
    pub(crate) fn sync_writes<F>(&self, f: F) -> Result<()>
    where
        F: FnOnce(&mut State) -> Result<(Vec<CatalogOp>, Vec<Event>)>,
    {
        self.sync_point(None, f, false)
    }

    fn sync_point<F>(&self, actor: Option<Arc<str>>, f: F, changes: bool) -> Result<()>
    where
        F: FnOnce(&mut State) -> Result<(Vec<CatalogOp>, Vec<Event>)>,
    {
        self.check_writable()?;
        let _sync = self.sync_lock.lock();
        let snapshot = {
            let mut st = self.state.lock();
            // Room for the record is made sure of before anything changes: without it the
            // change is refused and the pool stays as it was (`space.rs`).
            let mut room = true;
            if let Err(err) = st.reserve_journal(&*self.backend, JOURNAL_RECORD_ROOM_BYTES) {
                let nothing_to_record = !changes
                    && st.dirty_heads.is_empty()
                    && st.meta.dirty_pages() == 0
                    && st.pending_events.is_empty();
                if !nothing_to_record {
                    return Err(err);
                }
                room = false;
            }
            let (ops, events) = f(&mut st)?;
            let events = st.number_events(events, actor);
            // Regions whose in-place writes this sync point covers leave the intent with its
            // record (their checksums are written with it).
            let idle = if self.closing.load(Ordering::Acquire) {
                std::time::Duration::ZERO
            } else {
                INTENT_IDLE
            };
            let intent_cleared = if room {
                self.intent.take_idle(idle)
            } else {
                Vec::new()
            };
            if ops.is_empty()
                && events.is_empty()
                && intent_cleared.is_empty()
                && st.dirty_heads.is_empty()
                && st.meta.dirty_pages() == 0
            {
                None
            } else {
                // Every page about to be written was set aside when it was allocated; this only
                // matters after a change that went past its bound (a large merge), and if the
                // file system has no room for it, the write below fails the pool.
                let _ = st.meta.reserve_pages(0, 0);
                st.meta.write_dirty().map_err(|e| self.fail_err(e))?;
                st.sums.write_dirty().map_err(|e| self.fail_err(e))?;
                let sync_sums = st.sums.take_unsynced();
                let gen = st.meta.gen;
                st.meta.gen += 1;
                let heads = st.head_records();
                let record = Record::Sync {
                    gen,
                    ops,
                    heads,
                    events,
                    intent_cleared,
                };
                let payload =
                    serde_json::to_vec(&record).map_err(|e| self.fail_err(Error::Io(e.into())))?;
                if payload.len() > RECORD_MAX_BYTES as usize {
                    let err = Error::invalid("a journal record exceeds its size bound");
                    return Err(self.fail_err(err));
                }
                let Record::Sync { events, .. } = record else {
                    unreachable!("a sync point encodes a sync record");
                };
                let framed = encode_record(&payload);
                if framed.len() as u64 > JOURNAL_RECORD_ROOM_BYTES {
                    // A large record asks for its room now; without it the append below fails,
                    // and with it the pool.
                    let _ = st.reserve_journal(&*self.backend, framed.len() as u64);
                }
                let at = st.journal_end;
                st.journal_end += framed.len() as u64;
                Some((framed, gen, at, events, sync_sums))
            }
        };
        // Every mapping in the snapshot was installed after its data write completed, and every
        // write acknowledged before this sync completed its data write: one data sync now covers
        // both. It must come after the snapshot, or a block mapped in between would be recorded
        // without its data. Metadata and checksums do not depend on the data or on each other,
        // only the record on all three: synced together, they cost one wait, not three.
        let syncing = std::time::Instant::now();
        let files: &[FileKind] = match &snapshot {
            None => &[FileKind::Data],
            Some((.., true)) => &[FileKind::Data, FileKind::Meta, FileKind::Sums],
            Some((.., false)) => &[FileKind::Data, FileKind::Meta],
        };
        io::sync_all_blocking(&*self.backend, files).map_err(|e| self.fail(e))?;
        let Some((record, gen, journal_at, events, _)) = snapshot else {
            self.metrics.sync_latency.observe(syncing.elapsed());
            // Nothing new to record: the durable state is the last record's.
            let durable = self.state.lock().meta.gen - 1;
            self.release_freed(durable);
            return Ok(());
        };
        let payload_len = (record.len() - RECORD_HEADER_BYTES) as u64;
        let durable = io::write_blocking(&*self.backend, FileKind::Journal, journal_at, record)
            .and_then(|()| io::sync_blocking(&*self.backend, FileKind::Journal));
        durable.map_err(|e| self.fail(e))?;
        self.metrics.sync_latency.observe(syncing.elapsed());
        self.release_freed(gen);
        if !events.is_empty() {
            // Still under the sync lock: the index and subscribers see events in order.
            let payload_at = journal_at + RECORD_HEADER_BYTES as u64;
            self.event_index
                .lock()
                .append(&events, payload_at, payload_len);
            for event in events {
                self.events.publish(event);
            }
        }
        Ok(())
    }

    /// Space freed up to the durable sync point `gen` is unreferenced on disk; once no I/O
    /// that started before the frees is left, it is reused. Metadata pages wait while a space
    /// scan reads them.
    fn release_freed(&self, gen: u64) {
        let ready = |p: &crate::meta::PendingFree| p.gen <= gen;
        {
            let st = self.state.lock();
            if !st.pending_data.iter().any(ready)
                && (st.scan_active || !st.meta.pending_pages.iter().any(ready))
            {
                return;
            }
        }
        self.grace.synchronize();
        let mut st = self.state.lock();
        if !st.scan_active {
            st.meta.release_pending(gen);
        }
        let (ready, keep): (Vec<_>, Vec<_>) = st.pending_data.drain(..).partition(ready);
        st.pending_data = keep;
        for p in ready {
            st.data.free(p.start, p.len);
        }
    }

    /// Records `regions` in the journal, durably, as about to be written in place; none of
    /// those writes may be issued before (`sums.rs`). Runs on a blocking thread.
    pub(crate) fn record_intent(&self, regions: &[u64]) -> Result<()> {
        self.check_writable()?;
        let _sync = self.sync_lock.lock();
        if self.intent.unrecorded(regions).is_empty() {
            // Recorded meanwhile, with another writer's.
            return Ok(());
        }
        // Every region a write is waiting for goes in the same record: concurrent writers
        // into new regions share one journal sync.
        let regions = self.intent.awaited();
        let (framed, at) = {
            let mut st = self.state.lock();
            st.reserve_journal(&*self.backend, JOURNAL_RECORD_ROOM_BYTES)?;
            let record = Record::Intent {
                regions: regions.clone(),
            };
            let payload = serde_json::to_vec(&record).map_err(|e| Error::Io(e.into()))?;
            let framed = encode_record(&payload);
            let at = st.journal_end;
            st.journal_end += framed.len() as u64;
            (framed, at)
        };
        io::write_blocking(&*self.backend, FileKind::Journal, at, framed)
            .and_then(|()| io::sync_blocking(&*self.backend, FileKind::Journal))
            .map_err(|e| self.fail(e))?;
        self.intent.set_recorded(&regions);
        Ok(())
    }

    fn fail(&self, err: std::io::Error) -> Error {
        self.fail_err(Error::from_io(err))
    }

    fn fail_err(&self, err: Error) -> Error {
        self.poison(&err);
        err
    }
}

/// Refuses a change when the branch was deleted and created anew while its gate was awaited:
/// the gate held would then be the old head's.
pub(crate) fn check_gated(gated: Option<u64>, head_id: u64, branch: &str) -> Result<()> {
    match gated {
        Some(id) if id != head_id => Err(Error::Conflict(format!(
            "branch {branch:?} was replaced while the operation waited; try again"
        ))),
        _ => Ok(()),
    }
}

pub(crate) async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?
}

fn volume_info(v: &Volume) -> VolumeInfo {
    VolumeInfo {
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        created_unix: v.created_unix,
        branches: v.branches.len(),
        commits: v.commits.len(),
        tags: v.tags.len(),
        written_bytes: v.blocks * BLOCK_SIZE,
        origin: v.origin.clone(),
        checksums: v.checksums,
    }
}

/// What a new head (a branch, a clone's main) starts from.
pub(crate) struct Fork {
    pub root: u64,
    pub base: Option<CommitId>,
    pub base_gen: u64,
    /// A branch head's uncommitted writes, and who wrote them, come along.
    pub changed: RoaringTreemap,
    pub lineage: HeadLineage,
}

/// Forks `source` for a new head. A branch head (gated by the caller: `gated` is its id) is
/// shared from the next generation on: neither head owns what they share.
pub(crate) fn fork(
    st: &mut State,
    source: &ResolvedRef,
    gated: Option<u64>,
    action: &str,
) -> Result<Fork> {
    match source {
        ResolvedRef::Branch { volume, branch } => {
            let id = st.catalog.head_id(volume, branch)?;
            check_gated(gated, id, branch)?;
            refuse_merge_branch(st.catalog.head(id)?, action)?;
            let gen = st.meta.gen;
            let head = st.catalog.head_mut(id)?;
            head.record.exclusive_since = gen + 1;
            let r = &head.record;
            let fork = Fork {
                root: r.root,
                base: r.base,
                base_gen: r.base_gen,
                changed: head.changed.clone(),
                lineage: r.lineage.clone(),
            };
            st.dirty_heads.insert(id);
            Ok(fork)
        }
        ResolvedRef::Tag { commit, .. } | ResolvedRef::Commit { commit, .. } => {
            let c = st.catalog.commit_required(commit)?;
            Ok(Fork {
                root: c.root,
                base: Some(c.info.id),
                base_gen: c.gen,
                changed: RoaringTreemap::new(),
                lineage: HeadLineage::default(),
            })
        }
    }
}

/// Refuses a new branch name that a branch or tag of the volume already has.
pub(crate) fn check_name_free(catalog: &Catalog, volume: &str, name: &str) -> Result<()> {
    let vol = catalog.volume(volume)?;
    if vol.branches.contains_key(name) {
        return Err(Error::exists(format!(
            "branch {name:?} of volume {volume:?}"
        )));
    }
    if vol.tags.contains_key(name) {
        return Err(Error::exists(format!(
            "a tag named {name:?} in volume {volume:?}"
        )));
    }
    Ok(())
}

fn branch_info(head: &Head) -> BranchInfo {
    BranchInfo {
        volume: head.record.volume.clone(),
        name: head.record.branch.clone(),
        head_commit: head.record.base,
        uncommitted_blocks: head.changed.len(),
        created_unix: head.record.created_unix,
        protected: head.record.protected,
    }
}

/// Frees the nodes and data blocks only a head owns (born since its `exclusive_since`).
pub(crate) fn free_head_space(st: &mut State, head_id: u64) -> Result<()> {
    let head = st.catalog.head(head_id)?;
    let (root, since, volume) = (
        head.record.root,
        head.record.exclusive_since,
        head.record.volume.clone(),
    );
    let mut pages = Vec::new();
    let mut extents = Vec::new();
    MapReader {
        store: &mut st.meta,
    }
    .owned_since(root, since, &mut pages, &mut extents)?;
    let gen = st.meta.gen;
    st.meta
        .pending_pages
        .extend(pages.into_iter().map(|p| PendingFree {
            gen,
            start: p,
            len: 1,
        }));
    st.release_extents(&volume, &extents, since);
    Ok(())
}

/// Frees everything a volume references: nothing is shared across volumes.
fn free_volume_space(st: &mut State, name: &str) -> Result<()> {
    let vol = st.catalog.volume(name)?;
    let mut roots: Vec<u64> = vol
        .branches
        .values()
        .filter_map(|id| st.catalog.heads.get(id))
        .map(|h| h.record.root)
        .collect();
    roots.extend(vol.commits.values().map(|c| c.root));
    let mut blobs: Vec<BlobRef> = vol.commits.values().map(|c| c.bitmap).collect();
    for id in vol.branches.values() {
        blobs.extend(st.catalog.head(*id)?.record.blobs());
    }
    let mut pages = RoaringTreemap::new();
    let mut blocks = RoaringTreemap::new();
    for root in roots {
        let mut reader = MapReader {
            store: &mut st.meta,
        };
        reader.walk(root, u64::MAX, &mut |p| pages.insert(p), &mut |e| {
            if let Target::Data(p) = e.target {
                blocks.insert_range(p..p + e.len);
            }
        })?;
    }
    for blob in blobs {
        pages.insert_range(blob.pages());
    }
    let gen = st.meta.gen;
    st.meta
        .pending_pages
        .extend(pages.iter().map(|p| PendingFree {
            gen,
            start: p,
            len: 1,
        }));
    st.pending_data
        .extend(runs(&blocks).map(|(start, len)| PendingFree { gen, start, len }));
    Ok(())
}

/// Consecutive runs of a bitmap, as (start, len).
pub(crate) fn runs(bitmap: &RoaringTreemap) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut iter = bitmap.iter().peekable();
    std::iter::from_fn(move || {
        let start = iter.next()?;
        let mut end = start + 1;
        while iter.peek() == Some(&end) {
            iter.next();
            end += 1;
        }
        Some((start, end - start))
    })
}

/// Opens or creates the pool on `backend`: checks the file headers, replays the journal
/// (cutting a torn tail, unless `cut_torn_tail` is off for a check that must write nothing: its
/// length is then kept in `State::torn_journal_bytes`), and rebuilds the allocators from what
/// the catalog references.
pub(crate) fn recover_with(
    backend: &Arc<dyn IoBackend>,
    cache_pages: usize,
    failed: &Arc<AtomicBool>,
    cut_torn_tail: bool,
) -> Result<(State, EventIndex)> {
    let journal_len = backend.file_len(FileKind::Journal)?;
    if journal_len < PAGE_SIZE as u64 {
        // A pool exists once its journal header is durable; before that only the two other
        // headers can have been written. Anything more means the journal was lost.
        for kind in [FileKind::Data, FileKind::Meta] {
            if backend.file_len(kind)? > PAGE_SIZE as u64 {
                return Err(Error::corrupt(
                    format!("journal.grove is missing or empty while {} holds data; refusing to create a new pool over it", kind.file_name()),
                    "journal.grove",
                ));
            }
        }
        return Ok((create(backend, cache_pages, failed)?, EventIndex::new(None)));
    }
    let header = io::read_blocking(&**backend, FileKind::Journal, 0, PAGE_SIZE)?;
    let pool_id = FileHeader::decode(&header, JOURNAL_MAGIC, "journal.grove")?.pool_id;
    for (kind, magic) in [(FileKind::Data, DATA_MAGIC), (FileKind::Meta, META_MAGIC)] {
        let page = io::read_blocking(&**backend, kind, 0, PAGE_SIZE)?;
        let header = FileHeader::decode(&page, magic, kind.file_name())?;
        if header.pool_id != pool_id {
            return Err(Error::corrupt(
                format!("{} belongs to another pool", kind.file_name()),
                "offset 0",
            ));
        }
    }
    open_sums_file(backend, pool_id, cut_torn_tail)?;
    let body = io::read_blocking(
        &**backend,
        FileKind::Journal,
        PAGE_SIZE as u64,
        (journal_len - PAGE_SIZE as u64) as usize,
    )?;
    let (payloads, valid) = decode_records(&body);
    if let Some(at) = intact_record_after(&body, valid) {
        return Err(Error::corrupt(
            format!(
                "journal record damaged, with intact records after it (from offset {})",
                PAGE_SIZE + at
            ),
            format!("journal.grove offset {}", PAGE_SIZE + valid),
        ));
    }
    let journal_end = PAGE_SIZE as u64 + valid as u64;
    let torn_journal_bytes = journal_len - journal_end;
    if journal_end < journal_len && cut_torn_tail {
        tracing::warn!(
            cut_bytes = torn_journal_bytes,
            "journal ends in an incomplete record (an interrupted sync); cutting it"
        );
        backend.set_len(FileKind::Journal, journal_end)?;
    }
    let mut catalog = Catalog::default();
    let mut gen = 1;
    let mut event_index = EventIndex::new(None);
    let mut next_event_seq = 1;
    let mut first_session_id = 1;
    let mut payload_at = PAGE_SIZE as u64;
    // Regions possibly written in place since the last sync point that covered them.
    let mut intent = BTreeSet::new();
    for (i, payload) in payloads.iter().enumerate() {
        payload_at += RECORD_HEADER_BYTES as u64;
        let at = || format!("journal record {i}");
        let record: Record = serde_json::from_slice(payload)
            .map_err(|e| Error::corrupt(format!("journal record ({e})"), at()))?;
        let record_at = payload_at;
        payload_at += payload.len() as u64;
        match record {
            Record::Sync {
                gen: g,
                ops,
                heads,
                events,
                intent_cleared,
            } => {
                for region in &intent_cleared {
                    intent.remove(region);
                }
                for event in &events {
                    if let Event::SessionOpened { session, .. } = event.event {
                        first_session_id = first_session_id.max(session + 1);
                    }
                }
                if let Some(last) = events.last() {
                    if events.first().is_some_and(|e| e.seq != next_event_seq) {
                        return Err(Error::corrupt("journal events out of sequence", at()));
                    }
                    next_event_seq = last.seq + 1;
                    event_index.append(&events, record_at, payload.len() as u64);
                }
                for op in &ops {
                    catalog
                        .apply(op)
                        .map_err(|e| Error::corrupt(format!("journal record ({e})"), at()))?;
                }
                for head in &heads {
                    catalog
                        .apply_head(head)
                        .map_err(|e| Error::corrupt(format!("journal record ({e})"), at()))?;
                }
                gen = g + 1;
            }
            Record::Intent { regions } => intent.extend(regions),
        }
    }
    // Rebuild the allocators from every reachable node, bitmap and data block.
    let mut meta = MetaStore::new(
        backend.clone(),
        meta_cache_pages(cache_pages),
        SpaceAllocator::new(1),
        gen,
        failed.clone(),
    );
    let meta_len_pages = backend.file_len(FileKind::Meta)?.div_ceil(PAGE_SIZE as u64);
    meta.pages = SpaceAllocator::from_used(1, &RoaringTreemap::from_iter([meta_len_pages.max(1)]));
    let mut used_pages = RoaringTreemap::new();
    let mut used_blocks = RoaringTreemap::new();
    let mut volume_blocks = Vec::new();
    // Blocks a head owns (so may have written in place) in the intent's regions:
    // (first block, blocks, checksums on).
    let mut recheck: Vec<(u64, u64, bool)> = Vec::new();
    for vol in catalog.volumes.values() {
        // Heads first, with the generation from which they own what they map.
        let mut roots: Vec<(u64, Option<u64>)> = vol
            .branches
            .values()
            .filter_map(|id| catalog.heads.get(id))
            .map(|h| (h.record.root, Some(h.record.exclusive_since)))
            .collect();
        roots.extend(vol.commits.values().map(|c| (c.root, None)));
        let mut blocks = RoaringTreemap::new();
        for (root, owned_since) in roots {
            let mut reader = MapReader { store: &mut meta };
            reader.walk(root, gen, &mut |p| used_pages.insert(p), &mut |e| {
                if let Target::Data(p) = e.target {
                    blocks.insert_range(p..p + e.len);
                    let owned = owned_since.is_some_and(|since| e.birth >= since);
                    if owned && !intent.is_empty() {
                        recheck.extend(
                            in_regions(&intent, p, e.len).map(|(p, n)| (p, n, vol.checksums)),
                        );
                    }
                }
            })?;
        }
        volume_blocks.push((vol.name.clone(), blocks.len()));
        used_blocks |= blocks;
    }
    for (name, blocks) in volume_blocks {
        if let Some(vol) = catalog.volumes.get_mut(&name) {
            vol.blocks = blocks;
        }
    }
    let blobs = catalog
        .volumes
        .values()
        .flat_map(|v| v.commits.values().map(|c| c.bitmap))
        .chain(catalog.heads.values().flat_map(|h| h.record.blobs()));
    for blob in blobs {
        let pages = blob.pages();
        if pages.start == 0 || pages.end > meta_len_pages.max(1) {
            return Err(Error::corrupt(
                "bitmap pointer outside the metadata file",
                format!("meta page {}", blob.page),
            ));
        }
        used_pages.insert_range(pages);
    }
    if used_blocks.contains(0) {
        return Err(Error::corrupt(
            "an extent maps data block 0 (the file header)",
            "data.grove",
        ));
    }
    meta.pages = SpaceAllocator::from_used(1, &used_pages);
    let data = SpaceAllocator::from_used(1, &used_blocks);
    let mut sums = SumStore::new(backend.clone(), sums_cache_pages(cache_pages));
    recompute_sums(backend, &mut sums, &recheck)?;
    if !intent.is_empty() {
        tracing::warn!(
            regions = intent.len(),
            blocks = recheck.iter().map(|r| r.1).sum::<u64>(),
            "the pool was not closed cleanly: checksums of blocks that may have been written in place were computed again"
        );
    }
    // Each head's uncommitted changes: extents born after its base commit.
    for head in catalog.heads.values_mut() {
        let mut reader = MapReader { store: &mut meta };
        reader.changed_since(head.record.root, head.record.base_gen, &mut head.changed)?;
        if let Some(merge) = &head.record.merge {
            head.changed |= read_bitmap(&meta, &merge.taken)?;
        }
    }
    tracing::info!(
        volumes = catalog.volumes.len(),
        generation = gen,
        data_blocks = data.used(),
        meta_pages = meta.pages.used(),
        "pool recovered"
    );
    Ok((
        State {
            meta,
            sums,
            data,
            pending_data: Vec::new(),
            catalog,
            dirty_heads: BTreeSet::new(),
            journal_end,
            scan_active: false,
            next_event_seq,
            pending_events: Vec::new(),
            candidates: HashMap::new(),
            jobs: HashMap::new(),
            job_clock: 0,
            first_session_id,
            torn_journal_bytes,
            reserved: None,
            intent_at_open: intent.into_iter().collect(),
        },
        event_index,
    ))
}

/// The metadata cache's pages are shared: an eighth for block checksums (one page covers
/// 4 MiB of data), the rest for extent-map nodes and bitmaps.
fn sums_cache_pages(cache_pages: usize) -> usize {
    (cache_pages / 8).max(16)
}

fn meta_cache_pages(cache_pages: usize) -> usize {
    cache_pages - sums_cache_pages(cache_pages).min(cache_pages / 2)
}

/// The parts of `len` blocks from `pblock` that lie in intent regions.
fn in_regions(
    intent: &BTreeSet<u64>,
    pblock: u64,
    len: u64,
) -> impl Iterator<Item = (u64, u64)> + '_ {
    let (first, last) = (region_of(pblock), region_of(pblock + len - 1));
    intent.range(first..=last).map(move |&region| {
        let from = (region * INTENT_REGION_BLOCKS).max(pblock);
        let to = ((region + 1) * INTENT_REGION_BLOCKS).min(pblock + len);
        (from, to - from)
    })
}

/// Computes the checksums of `blocks` again from what the data file holds (after a crash, for
/// blocks that may have been written in place).
fn recompute_sums(
    backend: &Arc<dyn IoBackend>,
    sums: &mut SumStore,
    blocks: &[(u64, u64, bool)],
) -> Result<()> {
    const CHUNK_BLOCKS: u64 = 256;
    for &(pblock, len, checksums) in blocks {
        if !checksums {
            sums.clear_run(pblock, len)?;
            continue;
        }
        let mut p = pblock;
        while p < pblock + len {
            let n = CHUNK_BLOCKS.min(pblock + len - p);
            let data = io::read_blocking(
                &**backend,
                FileKind::Data,
                p * BLOCK_SIZE,
                (n * BLOCK_SIZE) as usize,
            )?;
            let computed: Vec<u32> = data
                .chunks_exact(BLOCK_SIZE as usize)
                .map(block_sum)
                .collect();
            sums.set_run(p, &computed)?;
            p += n;
        }
    }
    Ok(())
}

/// Checks the checksum file's header, or writes it where the file is new: a pool made before
/// checksums existed (its blocks have none), or a new pool.
fn open_sums_file(backend: &Arc<dyn IoBackend>, pool_id: [u8; 16], may_write: bool) -> Result<()> {
    let name = FileKind::Sums.file_name();
    if backend.file_len(FileKind::Sums)? < PAGE_SIZE as u64 {
        if may_write {
            if backend.file_len(FileKind::Data)? > PAGE_SIZE as u64 {
                tracing::warn!("{name} is new: blocks written before have no checksums");
            }
            io::write_blocking(
                &**backend,
                FileKind::Sums,
                0,
                FileHeader::encode(SUMS_MAGIC, pool_id),
            )?;
            io::sync_blocking(&**backend, FileKind::Sums)?;
        }
        return Ok(());
    }
    let page = io::read_blocking(&**backend, FileKind::Sums, 0, PAGE_SIZE)?;
    let header = FileHeader::decode(&page, SUMS_MAGIC, name)?;
    if header.pool_id != pool_id {
        return Err(Error::corrupt(
            format!("{name} belongs to another pool"),
            "offset 0",
        ));
    }
    Ok(())
}

fn create(
    backend: &Arc<dyn IoBackend>,
    cache_pages: usize,
    failed: &Arc<AtomicBool>,
) -> Result<State> {
    let pool_id: [u8; 16] = rand::random();
    io::write_blocking(
        &**backend,
        FileKind::Data,
        0,
        FileHeader::encode(DATA_MAGIC, pool_id),
    )?;
    io::write_blocking(
        &**backend,
        FileKind::Meta,
        0,
        FileHeader::encode(META_MAGIC, pool_id),
    )?;
    io::write_blocking(
        &**backend,
        FileKind::Sums,
        0,
        FileHeader::encode(SUMS_MAGIC, pool_id),
    )?;
    io::sync_blocking(&**backend, FileKind::Data)?;
    io::sync_blocking(&**backend, FileKind::Meta)?;
    io::sync_blocking(&**backend, FileKind::Sums)?;
    // The journal header goes last: a pool exists once it is durable.
    io::write_blocking(
        &**backend,
        FileKind::Journal,
        0,
        FileHeader::encode(JOURNAL_MAGIC, pool_id),
    )?;
    io::sync_blocking(&**backend, FileKind::Journal)?;
    tracing::info!(pool_id = %hex::encode(pool_id), "created a new pool");
    Ok(State {
        meta: MetaStore::new(
            backend.clone(),
            meta_cache_pages(cache_pages),
            SpaceAllocator::new(1),
            1,
            failed.clone(),
        ),
        sums: SumStore::new(backend.clone(), sums_cache_pages(cache_pages)),
        data: SpaceAllocator::new(1),
        pending_data: Vec::new(),
        catalog: Catalog::default(),
        dirty_heads: BTreeSet::new(),
        journal_end: PAGE_SIZE as u64,
        scan_active: false,
        next_event_seq: 1,
        pending_events: Vec::new(),
        candidates: HashMap::new(),
        jobs: HashMap::new(),
        job_clock: 0,
        first_session_id: 1,
        torn_journal_bytes: 0,
        reserved: None,
        intent_at_open: Vec::new(),
    })
}

/// What a change does once it is durable (`PoolInner::change_then`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Afterwards {
    Nothing,
    /// Asks the background reclaimer for a scan.
    Scan,
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // The background tasks hold the pool weakly and wait to be woken: woken now, they
        // find it gone and end.
        self.reclaim_wanted.notify_one();
        self.log_wanted.notify_one();
        tracing::debug!("pool closed");
    }
}

/// A commit about to be made, held still while it is checked (`Pool::prepare_commit`).
/// Writes to its branch wait until it is committed or dropped; dropping it makes nothing.
pub struct Candidate {
    pool: Pool,
    pub volume: String,
    pub branch: String,
    /// The id the commit will have; while the candidate lives, `VOL@ID` reads it.
    pub commit: CommitId,
    /// The branch's latest commit, the candidate's parent.
    pub parent: Option<CommitId>,
    /// The blocks it changes.
    pub changed: RoaringTreemap,
    head_id: u64,
    gate: Option<OwnedRwLockWriteGuard<()>>,
    withdrawn: Arc<AtomicBool>,
    committed: bool,
}

impl Candidate {
    /// The read-only export that reads the candidate.
    pub fn export(&self) -> String {
        format!("{}@{}", self.volume, self.commit)
    }

    /// Makes the commit.
    pub async fn commit(mut self, request: CommitRequest) -> Result<CommitInfo> {
        if request.message.trim().is_empty() {
            return Err(Error::invalid("a commit needs a non-empty message"));
        }
        let gate = self.gate.take();
        let (volume, branch, id, gated) = (
            self.volume.clone(),
            self.branch.clone(),
            self.commit,
            self.head_id,
        );
        let pool = self.pool.clone();
        let named = self.pool.named_sources(&self.volume, &request.sources)?;
        pool.inner
            .change_gated(gate, pool.actor.clone(), move |st| {
                st.candidates.remove(&id);
                let head_id = st.catalog.head_id(&volume, &branch)?;
                check_gated(Some(gated), head_id, &branch)?;
                let size_bytes = st.catalog.volume(&volume)?.size_bytes;
                let gen = st.meta.gen;
                let head = st.catalog.head(head_id)?;
                refuse_merge_branch(head, "commit on it")?;
                refuse_protected(head, "commit on it")?;
                let mut bitmap = Vec::new();
                head.changed
                    .serialize_into(&mut bitmap)
                    .map_err(Error::Io)?;
                // First, before anything changes: with no space for it the commit is refused
                // cleanly (`NoSpace`), and a blob left unreferenced by a later failure is
                // merely free space the next scan finds.
                let page = st.meta.write_blob(&bitmap)?;
                let lineage = st.take_lineage(head_id, named)?;
                let head = st.catalog.head(head_id)?;
                let info = CommitInfo {
                    id,
                    volume: volume.clone(),
                    branch: branch.clone(),
                    parents: head.record.base.into_iter().collect(),
                    message: request.message,
                    author: request.author,
                    meta: request.meta,
                    created_unix: now_unix(),
                    changed_blocks: head.changed.len(),
                    size_bytes,
                    lineage,
                };
                let root = head.record.root;
                let blob = BlobRef {
                    page,
                    len_bytes: bitmap.len() as u64,
                    crc: crc32c::crc32c(&bitmap),
                };
                let commit = CommitRecord {
                    info: info.clone(),
                    root,
                    gen,
                    bitmap: blob,
                };
                let head = st.catalog.head_mut(head_id)?;
                head.record.base = Some(id);
                head.record.base_gen = gen;
                head.record.exclusive_since = gen + 1;
                let changed = std::mem::take(&mut head.changed);
                st.dirty_heads.insert(head_id);
                let op = CatalogOp::Commit { commit };
                st.catalog.apply(&op)?;
                let event = Event::commit_created(&info, &changed);
                Ok((vec![op], vec![event]))
            })
            .await?;
        self.committed = true;
        pool.commit_info(&self.volume, &id.to_hex())
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        if !self.committed {
            self.withdrawn.store(true, Ordering::Release);
        }
        self.pool.inner.state.lock().candidates.remove(&self.commit);
    }
}

/// Refuses what would change a protected branch other than a merge.
pub(crate) fn refuse_protected(head: &Head, action: &str) -> Result<()> {
    if head.record.protected {
        return Err(Error::Conflict(format!(
            "branch {:?} of volume {:?} is protected: only merges change it; unprotect it to {action}",
            head.record.branch, head.record.volume
        )));
    }
    Ok(())
}
