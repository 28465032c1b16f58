//! Typed events and their bus. Every event is written in the journal record of the sync point
//! that makes its change durable (FORMAT.md, "events"), numbered in order, and published only
//! then: an event exists exactly when its change does. The control plane subscribes; a slow
//! subscriber lags (and is told so) instead of slowing I/O, and reads what it missed from the
//! log.

use std::sync::Arc;

use roaring::RoaringTreemap;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::merge::ByteRange;
use crate::pool::runs;
use crate::types::{CommitId, BLOCK_SIZE};

/// Events a lagging subscriber may fall behind by before it starts losing them.
pub const EVENT_BUS_CAPACITY: usize = 4096;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type")]
pub enum Event {
    #[serde(rename = "volume.created")]
    VolumeCreated {
        volume: String,
        size_bytes: u64,
        /// For a clone: the ref it was cloned from.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
    #[serde(rename = "volume.deleted")]
    VolumeDeleted { volume: String },
    #[serde(rename = "branch.created")]
    BranchCreated {
        volume: String,
        branch: String,
        from: Option<CommitId>,
    },
    #[serde(rename = "branch.deleted")]
    BranchDeleted { volume: String, branch: String },
    #[serde(rename = "branch.reset")]
    BranchReset {
        volume: String,
        branch: String,
        /// The commit the branch continued from before.
        from: Option<CommitId>,
        to: CommitId,
        /// Uncommitted blocks thrown away.
        discarded_blocks: u64,
    },
    /// A branch was protected (only merges change it) or unprotected.
    #[serde(rename = "branch.protected")]
    BranchProtected {
        volume: String,
        branch: String,
        protected: bool,
    },
    #[serde(rename = "tag.created")]
    TagCreated {
        volume: String,
        tag: String,
        commit: CommitId,
    },
    #[serde(rename = "tag.deleted")]
    TagDeleted { volume: String, tag: String },
    #[serde(rename = "commit.created")]
    CommitCreated {
        volume: String,
        branch: String,
        commit: CommitId,
        parents: Vec<CommitId>,
        changed_blocks: u64,
        /// What changed since the first parent, as byte ranges: the first
        /// `COMMIT_EVENT_EXTENTS` of them; `changed_extents_complete` says whether that is all
        /// (the diff API lists the rest).
        #[serde(default)]
        changed_extents: Vec<ByteRange>,
        #[serde(default)]
        changed_extents_complete: bool,
    },
    #[serde(rename = "commit.deleted")]
    CommitDeleted {
        volume: String,
        commit: CommitId,
        /// Commits its changes were folded into.
        children: Vec<CommitId>,
    },
    #[serde(rename = "merge.completed")]
    MergeCompleted {
        volume: String,
        branch: String,
        /// The commit merged in.
        from: CommitId,
        /// The merge commit, or the commit fast-forwarded to.
        commit: CommitId,
        fast_forward: bool,
        /// Blocks taken from the merged side.
        taken_blocks: u64,
        /// Blocks changed on both sides differently, settled by the strategy.
        conflict_blocks: u64,
    },
    /// A manual merge waits on its merge branch for conflicts to be resolved.
    #[serde(rename = "merge.started")]
    MergeStarted {
        volume: String,
        branch: String,
        merge_branch: String,
        from: CommitId,
        taken_blocks: u64,
        conflict_blocks: u64,
    },
    /// A manual merge was dropped with its merge branch; the target branch never changed.
    #[serde(rename = "merge.aborted")]
    MergeAborted {
        volume: String,
        branch: String,
        merge_branch: String,
        from: CommitId,
    },
    #[serde(rename = "hook.created")]
    HookCreated { hook: String },
    #[serde(rename = "hook.deleted")]
    HookDeleted { hook: String },
    /// A hook kept failing to take an event; it is retried on.
    #[serde(rename = "hook.failed")]
    HookFailed {
        hook: String,
        /// The event it could not deliver.
        event_seq: u64,
        attempts: u32,
        error: String,
    },
    #[serde(rename = "session.opened")]
    SessionOpened {
        session: u64,
        export: String,
        protocol: String,
        client: String,
    },
    #[serde(rename = "session.closed")]
    SessionClosed {
        session: u64,
        export: String,
        counters: crate::session::SessionCounters,
    },
    /// A data block read back with content that does not match its checksum: the read failed
    /// (EIO) rather than return it.
    #[serde(rename = "data.corrupted")]
    DataCorrupted {
        volume: String,
        /// The ref it was read through.
        export: String,
        offset_bytes: u64,
        /// Where it is in `data.grove`, in 4 KiB blocks.
        data_block: u64,
        /// "read" or "scrub".
        found_by: String,
    },
    /// A scrub (`Pool::scrub`) read every live block.
    #[serde(rename = "scrub.completed")]
    ScrubCompleted {
        checked_blocks: u64,
        bad_blocks: u64,
        /// Blocks written before checksums existed or with them off.
        unchecked_blocks: u64,
    },
}

/// Every event type name, as `Event::type_name` gives them.
pub const EVENT_TYPES: &[&str] = &[
    "volume.created",
    "volume.deleted",
    "branch.created",
    "branch.deleted",
    "branch.reset",
    "branch.protected",
    "tag.created",
    "tag.deleted",
    "commit.created",
    "commit.deleted",
    "merge.completed",
    "merge.started",
    "merge.aborted",
    "hook.created",
    "hook.deleted",
    "hook.failed",
    "session.opened",
    "session.closed",
    "data.corrupted",
    "scrub.completed",
];

/// Changed extents listed in a `commit.created` event at most.
pub const COMMIT_EVENT_EXTENTS: usize = 256;

/// Blocks as byte ranges, the first `max` of them, and whether that is all (a commit event's
/// changed extents, a pre-commit hook's).
pub fn extent_summary(changed: &RoaringTreemap, max: usize) -> (Vec<ByteRange>, bool) {
    let mut ranges: Vec<ByteRange> = runs(changed)
        .take(max + 1)
        .map(|(start, len)| ByteRange {
            offset_bytes: start * BLOCK_SIZE,
            len_bytes: len * BLOCK_SIZE,
        })
        .collect();
    let complete = ranges.len() <= max;
    ranges.truncate(max);
    (ranges, complete)
}

/// An event as logged: its place in the log, when and by whom.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoggedEvent {
    /// 1, 2, 3... in the order the changes became durable; never reused.
    pub seq: u64,
    pub time_unix_ms: u64,
    /// Who made the change: the API caller, or the NBD client of a session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(flatten)]
    pub event: Event,
}

impl Event {
    /// The event of a new commit, `changed` its blocks changed since its first parent.
    pub(crate) fn commit_created(
        info: &crate::types::CommitInfo,
        changed: &RoaringTreemap,
    ) -> Event {
        let (changed_extents, changed_extents_complete) =
            extent_summary(changed, COMMIT_EVENT_EXTENTS);
        Event::CommitCreated {
            volume: info.volume.clone(),
            branch: info.branch.clone(),
            commit: info.id,
            parents: info.parents.clone(),
            changed_blocks: info.changed_blocks,
            changed_extents,
            changed_extents_complete,
        }
    }

    /// The volume the event is about (`None` for none).
    pub fn volume(&self) -> Option<&str> {
        match self {
            Event::VolumeCreated { volume, .. }
            | Event::VolumeDeleted { volume }
            | Event::BranchCreated { volume, .. }
            | Event::BranchDeleted { volume, .. }
            | Event::BranchReset { volume, .. }
            | Event::BranchProtected { volume, .. }
            | Event::TagCreated { volume, .. }
            | Event::TagDeleted { volume, .. }
            | Event::CommitCreated { volume, .. }
            | Event::CommitDeleted { volume, .. }
            | Event::MergeCompleted { volume, .. }
            | Event::MergeStarted { volume, .. }
            | Event::MergeAborted { volume, .. }
            | Event::DataCorrupted { volume, .. } => Some(volume),
            Event::SessionOpened { export, .. } | Event::SessionClosed { export, .. } => {
                export.split(['@', '?']).next()
            }
            Event::HookCreated { .. }
            | Event::HookDeleted { .. }
            | Event::HookFailed { .. }
            | Event::ScrubCompleted { .. } => None,
        }
    }

    /// The branch (or tag) the event is about, if any.
    pub fn ref_name(&self) -> Option<&str> {
        match self {
            Event::BranchCreated { branch, .. }
            | Event::BranchDeleted { branch, .. }
            | Event::BranchReset { branch, .. }
            | Event::BranchProtected { branch, .. }
            | Event::CommitCreated { branch, .. }
            | Event::MergeCompleted { branch, .. }
            | Event::MergeStarted { branch, .. }
            | Event::MergeAborted { branch, .. } => Some(branch),
            Event::TagCreated { tag, .. } | Event::TagDeleted { tag, .. } => Some(tag),
            Event::SessionOpened { export, .. } | Event::SessionClosed { export, .. } => export
                .split('?')
                .next()
                .and_then(|name| name.split_once('@'))
                .map(|(_, r)| r),
            _ => None,
        }
    }

    /// The dotted type name, as in the product contract (`commit.created`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::VolumeCreated { .. } => "volume.created",
            Event::VolumeDeleted { .. } => "volume.deleted",
            Event::BranchCreated { .. } => "branch.created",
            Event::BranchDeleted { .. } => "branch.deleted",
            Event::BranchReset { .. } => "branch.reset",
            Event::BranchProtected { .. } => "branch.protected",
            Event::TagCreated { .. } => "tag.created",
            Event::TagDeleted { .. } => "tag.deleted",
            Event::CommitCreated { .. } => "commit.created",
            Event::CommitDeleted { .. } => "commit.deleted",
            Event::MergeCompleted { .. } => "merge.completed",
            Event::MergeStarted { .. } => "merge.started",
            Event::MergeAborted { .. } => "merge.aborted",
            Event::HookCreated { .. } => "hook.created",
            Event::HookDeleted { .. } => "hook.deleted",
            Event::HookFailed { .. } => "hook.failed",
            Event::SessionOpened { .. } => "session.opened",
            Event::SessionClosed { .. } => "session.closed",
            Event::DataCorrupted { .. } => "data.corrupted",
            Event::ScrubCompleted { .. } => "scrub.completed",
        }
    }
}

/// Fan-out of logged events to any number of subscribers.
#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Arc<LoggedEvent>>,
}

impl Default for EventBus {
    fn default() -> Self {
        let (sender, _) = broadcast::channel(EVENT_BUS_CAPACITY);
        EventBus { sender }
    }
}

impl EventBus {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LoggedEvent>> {
        self.sender.subscribe()
    }

    pub(crate) fn publish(&self, event: LoggedEvent) {
        tracing::info!(seq = event.seq, event = event.event.type_name(), ?event.event, "event");
        // No subscribers is not an error: the event simply has no audience yet.
        let _ = self.sender.send(Arc::new(event));
    }
}
