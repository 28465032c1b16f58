//! Wire types of the REST API: request bodies, query strings and responses.
//!
//! They mirror the engine's `*Info` views field for field but are the API's own, so that the
//! engine's internal types can change without changing the contract, and so that each carries
//! an OpenAPI schema. Request types refuse unknown fields.

use std::collections::BTreeMap;

use grove_engine as engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::size::ByteSize;

/// A volume.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Volume {
    /// 1-63 lowercase letters, digits and '-'.
    #[schema(example = "vm-1")]
    pub name: String,
    pub size_bytes: u64,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub branches: u64,
    pub commits: u64,
    pub tags: u64,
    /// Bytes of pool space the volume's live refs map (blocks shared between refs count once).
    pub written_bytes: u64,
}

impl From<engine::VolumeInfo> for Volume {
    fn from(info: engine::VolumeInfo) -> Self {
        Volume {
            name: info.name,
            size_bytes: info.size_bytes,
            created_unix: info.created_unix,
            branches: info.branches as u64,
            commits: info.commits as u64,
            tags: info.tags as u64,
            written_bytes: info.written_bytes,
        }
    }
}

/// Body of `POST /v1/volumes`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    /// 1-63 lowercase letters, digits and '-'.
    #[schema(example = "vm-1")]
    pub name: String,
    /// Size of the volume: bytes as a number, or a string such as "10GiB". A positive multiple
    /// of the 4096-byte block size.
    pub size: ByteSize,
}

/// A branch: a writable head.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Branch {
    pub volume: String,
    /// 1-128 letters, digits, '-', '_', '.' and '/'.
    #[schema(example = "main")]
    pub name: String,
    /// The last commit on this branch; null for a volume with no commits yet.
    pub head_commit: Option<String>,
    /// Blocks written on the head since `head_commit` (what the next commit will record).
    pub uncommitted_blocks: u64,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

impl From<engine::BranchInfo> for Branch {
    fn from(info: engine::BranchInfo) -> Self {
        Branch {
            volume: info.volume,
            name: info.name,
            head_commit: info.head_commit.map(|id| id.to_hex()),
            uncommitted_blocks: info.uncommitted_blocks,
            created_unix: info.created_unix,
        }
    }
}

/// Body of `POST /v1/volumes/{vol}/branches`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateBranch {
    /// 1-128 letters, digits, '-', '_', '.' and '/'.
    #[schema(example = "feature/resize")]
    pub name: String,
    /// Where the branch starts: a branch, tag, or commit id (or unique prefix) of this volume,
    /// or a full ref `VOL@NAME` naming this volume. Defaults to `main`. Forking a branch head
    /// includes its uncommitted writes.
    #[serde(default)]
    #[schema(example = "main")]
    pub from: Option<String>,
}

/// Body of `POST /v1/volumes/{vol}/branches/{branch}/commits`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateCommit {
    /// 1 to 65536 bytes.
    #[schema(example = "install base system")]
    pub message: String,
    /// Who made the commit; 1 to 256 bytes without control characters.
    #[serde(default)]
    pub author: Option<String>,
    /// Free-form key/value metadata: at most 64 entries; keys are 1-128 letters, digits, '-',
    /// '_', '.', '/' and ':'; values at most 4096 bytes.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// A commit: an immutable snapshot of a branch head.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Commit {
    /// 32 lowercase hex digits.
    #[schema(example = "3f2a9c0d1e2b3c4d5e6f708192a3b4c5")]
    pub id: String,
    pub volume: String,
    /// The branch the commit was made on.
    pub branch: String,
    pub parents: Vec<String>,
    pub message: String,
    pub author: Option<String>,
    pub meta: BTreeMap<String, String>,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// Blocks written since the first parent.
    pub changed_blocks: u64,
    pub size_bytes: u64,
}

impl From<engine::CommitInfo> for Commit {
    fn from(info: engine::CommitInfo) -> Self {
        Commit {
            id: info.id.to_hex(),
            volume: info.volume,
            branch: info.branch,
            parents: info.parents.iter().map(|id| id.to_hex()).collect(),
            message: info.message,
            author: info.author,
            meta: info.meta,
            created_unix: info.created_unix,
            changed_blocks: info.changed_blocks,
            size_bytes: info.size_bytes,
        }
    }
}

/// Query of `GET /v1/volumes/{vol}/log`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Where the history starts: a branch, tag, or commit id (or unique prefix) of the volume.
    /// Defaults to `main`.
    #[serde(rename = "ref")]
    #[param(rename = "ref", example = "main")]
    pub reference: Option<String>,
    /// Most commits to return: 1 to 10000, default 1000.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
}

/// A tag: a name for a commit.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Tag {
    pub volume: String,
    pub name: String,
    /// The commit the tag names.
    pub commit: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
}

impl From<engine::TagInfo> for Tag {
    fn from(info: engine::TagInfo) -> Self {
        Tag {
            volume: info.volume,
            name: info.name,
            commit: info.commit.to_hex(),
            created_unix: info.created_unix,
        }
    }
}

/// Body of `POST /v1/volumes/{vol}/tags`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateTag {
    /// 1-128 letters, digits, '-', '_', '.' and '/'.
    #[schema(example = "v1.0")]
    pub name: String,
    /// What to tag: a branch (its head commit), tag, or commit id (or unique prefix) of this
    /// volume, or a full ref `VOL@NAME` naming this volume.
    #[serde(rename = "ref")]
    #[schema(rename = "ref", example = "main")]
    pub target: String,
}

/// Capacity and use of the pool.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct PoolStatus {
    /// Used plus free bytes.
    pub capacity_bytes: u64,
    /// Bytes of data blocks in use.
    pub used_bytes: u64,
    /// Free blocks inside the data file plus free space on the file system holding it.
    pub free_bytes: u64,
    /// Bytes of metadata pages in use.
    pub metadata_bytes: u64,
    /// The disk I/O backend in use: "io_uring", "threads" or "sim".
    pub io_backend: String,
}

impl From<engine::PoolStats> for PoolStatus {
    fn from(stats: engine::PoolStats) -> Self {
        PoolStatus {
            capacity_bytes: stats.capacity_bytes,
            used_bytes: stats.used_bytes,
            free_bytes: stats.free_bytes,
            metadata_bytes: stats.metadata_bytes,
            io_backend: stats.io_backend,
        }
    }
}

/// What a session's export name resolved to.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionTarget {
    /// A writable branch head.
    Branch { volume: String, branch: String },
    /// A tag (read-only), with the commit it names.
    Tag {
        volume: String,
        tag: String,
        commit: String,
    },
    /// A commit (read-only).
    Commit { volume: String, commit: String },
}

impl From<engine::ResolvedRef> for SessionTarget {
    fn from(target: engine::ResolvedRef) -> Self {
        match target {
            engine::ResolvedRef::Branch { volume, branch } => {
                SessionTarget::Branch { volume, branch }
            }
            engine::ResolvedRef::Tag {
                volume,
                tag,
                commit,
            } => SessionTarget::Tag {
                volume,
                tag,
                commit: commit.to_hex(),
            },
            engine::ResolvedRef::Commit { volume, commit } => SessionTarget::Commit {
                volume,
                commit: commit.to_hex(),
            },
        }
    }
}

/// Who opened a session.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SessionClient {
    /// "nbd", "iscsi", ...
    pub protocol: String,
    /// The peer address ("127.0.0.1:50312", "unix").
    pub address: String,
}

/// I/O counters of a session since it opened.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SessionCounters {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub zero_ops: u64,
    pub zero_bytes: u64,
    pub trim_ops: u64,
    pub trim_bytes: u64,
    pub flush_ops: u64,
}

impl From<engine::SessionCounters> for SessionCounters {
    fn from(counters: engine::SessionCounters) -> Self {
        SessionCounters {
            read_ops: counters.read_ops,
            read_bytes: counters.read_bytes,
            write_ops: counters.write_ops,
            write_bytes: counters.write_bytes,
            zero_ops: counters.zero_ops,
            zero_bytes: counters.zero_bytes,
            trim_ops: counters.trim_ops,
            trim_bytes: counters.trim_bytes,
            flush_ops: counters.flush_ops,
        }
    }
}

/// A live I/O session (an NBD or iSCSI connection on an export).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Session {
    pub id: u64,
    /// The export name the client asked for.
    pub export: String,
    pub target: SessionTarget,
    pub client: SessionClient,
    /// Seconds since the Unix epoch.
    pub opened_unix: u64,
    pub counters: SessionCounters,
}

impl From<engine::SessionInfo> for Session {
    fn from(info: engine::SessionInfo) -> Self {
        Session {
            id: info.id,
            export: info.export,
            target: info.target.into(),
            client: SessionClient {
                protocol: info.client.protocol,
                address: info.client.address,
            },
            opened_unix: info.opened_unix,
            counters: info.counters.into(),
        }
    }
}

/// Answer of `/healthz` and `/readyz`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Health {
    /// "ok" from `/healthz`, "ready" from `/readyz`.
    pub status: String,
}
