//! The typed event bus. The engine publishes an event after the change it describes is durable;
//! the control plane subscribes. A slow subscriber lags (and is told so) instead of slowing I/O.

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::types::CommitId;

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
}

impl Event {
    /// The dotted type name, as in the product contract (`commit.created`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::VolumeCreated { .. } => "volume.created",
            Event::VolumeDeleted { .. } => "volume.deleted",
            Event::BranchCreated { .. } => "branch.created",
            Event::BranchDeleted { .. } => "branch.deleted",
            Event::BranchReset { .. } => "branch.reset",
            Event::TagCreated { .. } => "tag.created",
            Event::TagDeleted { .. } => "tag.deleted",
            Event::CommitCreated { .. } => "commit.created",
            Event::CommitDeleted { .. } => "commit.deleted",
            Event::MergeCompleted { .. } => "merge.completed",
            Event::MergeStarted { .. } => "merge.started",
            Event::MergeAborted { .. } => "merge.aborted",
            Event::SessionOpened { .. } => "session.opened",
            Event::SessionClosed { .. } => "session.closed",
        }
    }
}

/// Fan-out of engine events to any number of subscribers.
#[derive(Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        let (sender, _) = broadcast::channel(EVENT_BUS_CAPACITY);
        EventBus { sender }
    }
}

impl EventBus {
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    pub(crate) fn publish(&self, event: Event) {
        tracing::info!(event = event.type_name(), ?event, "event");
        // No subscribers is not an error: the event simply has no audience yet.
        let _ = self.sender.send(event);
    }
}
