//! grove's storage engine: a pool of sparse 4 KiB-block volumes with git-like history.
//!
//! Every branch head and commit is a root of a persistent copy-on-write extent map; commits,
//! branches and tags are O(1); each commit records a roaring bitmap of the blocks written since
//! its parent. Disk I/O goes through one backend trait (io_uring, a thread pool, or an in-memory
//! simulation with crash injection).
//!
//! The engine knows nothing of networks, protocols or HTTP, and never depends on another crate
//! of the workspace.

pub mod error;
pub mod event_log;
pub mod events;
pub mod fsck;
pub mod history;
pub mod lineage;
pub mod merge;
pub mod metrics;
pub mod pool;
pub mod reclaim;
pub mod records;
pub mod scrub;
pub mod session;
pub mod types;

pub use error::{Error, Result};
pub use event_log::{EventPage, EventQuery};
pub use events::{Event, EventBus, LoggedEvent, EVENT_TYPES};
pub use history::{BlameRange, BlameSource, Diff};
pub use merge::{
    ByteRange, MergeInProgress, MergeOutcome, MergeReport, MergeRequest, MergeStrategy,
};
pub use pool::{Candidate, IoChoice, Pool, PoolOptions};
pub use reclaim::{SpaceReport, VolumeSpace};
pub use roaring::RoaringTreemap;
pub use scrub::{ScrubError, ScrubReport};
pub use session::{
    BlockStatus, ReadChunk, Session, SessionClient, SessionCounters, SessionInfo, ZeroMode,
};
pub use types::*;

pub(crate) mod allocator;
pub(crate) mod catalog;
pub(crate) mod extent_map;
pub mod format;
/// Wrappers around private decoders for the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod grace;
pub mod io;
pub(crate) mod meta;
pub(crate) mod range_lock;
pub(crate) mod read_buffers;
pub(crate) mod rewrite;
pub(crate) mod space;
pub mod sums;
