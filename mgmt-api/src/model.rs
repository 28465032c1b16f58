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
    /// For a clone this starts as its source's figure and is corrected by the next space scan.
    pub written_bytes: u64,
    /// For a clone: the ref it was cloned from. Null for a volume created empty.
    pub origin: Option<VolumeOrigin>,
    /// Writes store a crc32c of every 4 KiB block and reads check it: a block that no longer
    /// matches fails its reads (NBD EIO, iSCSI MEDIUM ERROR) and logs a `data.corrupted`
    /// event. Chosen at creation; a clone has its source's setting.
    pub checksums: bool,
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
            origin: info.origin.map(VolumeOrigin::from),
            checksums: info.checksums,
        }
    }
}

/// Where a cloned volume came from.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VolumeOrigin {
    /// The source volume.
    pub volume: String,
    /// The source ref in canonical form: `VOL`, `VOL@BRANCH`, `VOL@TAG` or `VOL@COMMIT`.
    #[schema(example = "vm-1@v1.0")]
    pub source: String,
    /// The commit the clone's history continues from; null for a source with no commits.
    pub commit: Option<String>,
}

impl From<engine::VolumeOrigin> for VolumeOrigin {
    fn from(origin: engine::VolumeOrigin) -> Self {
        VolumeOrigin {
            volume: origin.volume,
            source: origin.source,
            commit: origin.commit.map(|id| id.to_hex()),
        }
    }
}

/// A volume with the space figures of the latest space scan.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VolumeDetail {
    #[serde(flatten)]
    pub volume: Volume,
    /// What the volume's refs hold, as of the latest space scan; null until a scan has seen
    /// the volume (scans run when grove starts, after deletes, resets and clones, and on
    /// `POST /v1/pool/reclaim`).
    pub space: Option<VolumeSpaceScan>,
}

/// Space figures of one volume, as of one space scan.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VolumeSpaceScan {
    /// The sync point (generation) the scan measured.
    pub generation: u64,
    /// When the scan ran, in seconds since the Unix epoch.
    pub computed_unix: u64,
    /// Data bytes the volume's refs map, blocks shared between refs counted once.
    pub referenced_bytes: u64,
    /// Data and metadata bytes no other volume references: what deleting the volume frees.
    pub exclusive_bytes: u64,
    /// Per branch: data and metadata bytes only that branch head references (what deleting
    /// the branch frees).
    pub branches: BTreeMap<String, u64>,
    /// Per commit id: data and metadata bytes only that commit references (what deleting the
    /// commit frees).
    pub commits: BTreeMap<String, u64>,
}

impl VolumeSpaceScan {
    pub fn new(report: &engine::SpaceReport, space: &engine::VolumeSpace) -> Self {
        VolumeSpaceScan {
            generation: report.generation,
            computed_unix: report.computed_unix,
            referenced_bytes: space.referenced_bytes,
            exclusive_bytes: space.exclusive_bytes,
            branches: space.branches.clone(),
            commits: commit_figures(&space.commits),
        }
    }
}

fn commit_figures(commits: &BTreeMap<engine::CommitId, u64>) -> BTreeMap<String, u64> {
    commits
        .iter()
        .map(|(id, bytes)| (id.to_hex(), *bytes))
        .collect()
}

/// What a volume's refs hold, as of a space scan.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VolumeSpace {
    /// Data bytes the volume's refs map, blocks shared between refs counted once.
    pub referenced_bytes: u64,
    /// Data and metadata bytes no other volume references: what deleting the volume frees.
    pub exclusive_bytes: u64,
    /// Per branch: data and metadata bytes only that branch head references.
    pub branches: BTreeMap<String, u64>,
    /// Per commit id: data and metadata bytes only that commit references.
    pub commits: BTreeMap<String, u64>,
}

impl From<&engine::VolumeSpace> for VolumeSpace {
    fn from(space: &engine::VolumeSpace) -> Self {
        VolumeSpace {
            referenced_bytes: space.referenced_bytes,
            exclusive_bytes: space.exclusive_bytes,
            branches: space.branches.clone(),
            commits: commit_figures(&space.commits),
        }
    }
}

/// The result of a space scan: what it returned to the pool and what each volume holds.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SpaceReport {
    /// The sync point (generation) the scan measured.
    pub generation: u64,
    /// When the scan ran, in seconds since the Unix epoch.
    pub computed_unix: u64,
    /// Bytes the scan found unreferenced and returned to the pool.
    pub reclaimed_bytes: u64,
    /// Per volume name.
    pub volumes: BTreeMap<String, VolumeSpace>,
}

impl From<engine::SpaceReport> for SpaceReport {
    fn from(report: engine::SpaceReport) -> Self {
        SpaceReport {
            generation: report.generation,
            computed_unix: report.computed_unix,
            reclaimed_bytes: report.reclaimed_bytes,
            volumes: report
                .volumes
                .iter()
                .map(|(name, space)| (name.clone(), VolumeSpace::from(space)))
                .collect(),
        }
    }
}

/// Per-volume totals of a space scan, as `GET /v1/pool` shows them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct VolumeSpaceTotals {
    /// Data bytes the volume's refs map, blocks shared between refs counted once.
    pub referenced_bytes: u64,
    /// Data and metadata bytes no other volume references: what deleting the volume frees.
    pub exclusive_bytes: u64,
}

/// The latest space scan of the pool, in totals per volume.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct PoolSpace {
    /// The sync point (generation) the scan measured.
    pub generation: u64,
    /// When the scan ran, in seconds since the Unix epoch.
    pub computed_unix: u64,
    /// Bytes that scan found unreferenced and returned to the pool.
    pub reclaimed_bytes: u64,
    /// Per volume name.
    pub volumes: BTreeMap<String, VolumeSpaceTotals>,
}

impl From<&engine::SpaceReport> for PoolSpace {
    fn from(report: &engine::SpaceReport) -> Self {
        PoolSpace {
            generation: report.generation,
            computed_unix: report.computed_unix,
            reclaimed_bytes: report.reclaimed_bytes,
            volumes: report
                .volumes
                .iter()
                .map(|(name, space)| {
                    let totals = VolumeSpaceTotals {
                        referenced_bytes: space.referenced_bytes,
                        exclusive_bytes: space.exclusive_bytes,
                    };
                    (name.clone(), totals)
                })
                .collect(),
        }
    }
}

/// Body of `POST /v1/volumes/{vol}/clones`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateClone {
    /// Name of the new volume: 1-63 lowercase letters, digits and '-'.
    #[schema(example = "vm-2")]
    pub name: String,
    /// What to clone: a branch (its head, uncommitted writes included), tag, or commit id (or
    /// unique prefix) of the source volume, or a full ref `VOL@NAME` naming it. Defaults to
    /// `main`.
    #[serde(default, rename = "ref")]
    #[schema(rename = "ref", example = "v1.0")]
    pub source: Option<String>,
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
    /// Store a crc32c of every block written and check it on every read. Default true; false
    /// serves whatever the disk holds (for data checked above grove, or to save the checksum
    /// work).
    #[serde(default = "checksums_default")]
    #[schema(default = true)]
    pub checksums: bool,
}

fn checksums_default() -> bool {
    engine::VolumeOptions::default().checksums
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
    /// Only merges change a protected branch: its NBD exports are read-only, and resets and
    /// deletes are refused.
    pub protected: bool,
}

/// Body of `PUT /v1/volumes/{vol}/branches/{branch}/protection`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetProtection {
    pub protected: bool,
}

impl From<engine::BranchInfo> for Branch {
    fn from(info: engine::BranchInfo) -> Self {
        Branch {
            volume: info.volume,
            name: info.name,
            head_commit: info.head_commit.map(|id| id.to_hex()),
            uncommitted_blocks: info.uncommitted_blocks,
            created_unix: info.created_unix,
            protected: info.protected,
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
    /// Commits the data was derived from (lineage): commits, tags or branches (their latest
    /// commits) of this volume, or full refs `VOL@NAME` of any volume; at most 256.
    #[serde(default)]
    #[schema(example = json!(["datasets@v3"]))]
    pub sources: Vec<String>,
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
    /// The sessions that wrote its data and the commits it was derived from.
    pub lineage: Lineage,
}

/// Where a commit's data came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Lineage {
    /// The sessions that wrote what the commit records.
    pub sessions: Vec<LineageSession>,
    /// The commits it was derived from: named in the commit request, or read by a job that
    /// wrote it.
    pub sources: Vec<LineageSource>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct LineageSession {
    pub session: u64,
    pub protocol: String,
    pub client: String,
    pub job: Option<String>,
    pub opened_unix: u64,
    pub bytes_written: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct LineageSource {
    pub commit: String,
    pub volume: String,
    /// `named` (in the commit request) or `job` (read by a job that wrote the commit).
    pub kind: String,
    pub job: Option<String>,
    /// For job sources: bytes the job read from it.
    pub bytes_read: u64,
}

impl From<engine::Lineage> for Lineage {
    fn from(lineage: engine::Lineage) -> Self {
        Lineage {
            sessions: lineage
                .sessions
                .into_iter()
                .map(|w| LineageSession {
                    session: w.session,
                    protocol: w.protocol,
                    client: w.client,
                    job: w.job,
                    opened_unix: w.opened_unix,
                    bytes_written: w.bytes_written,
                })
                .collect(),
            sources: lineage
                .sources
                .into_iter()
                .map(LineageSource::from)
                .collect(),
        }
    }
}

impl From<engine::Source> for LineageSource {
    fn from(source: engine::Source) -> Self {
        LineageSource {
            commit: source.commit.to_hex(),
            volume: source.volume,
            kind: match source.kind {
                engine::SourceKind::Named => "named",
                engine::SourceKind::Job => "job",
            }
            .to_string(),
            job: source.job,
            bytes_read: source.bytes_read,
        }
    }
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
            lineage: info.lineage.into(),
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
    /// The latest space scan; null before the first one has finished.
    pub space: Option<PoolSpace>,
    /// The server's version.
    pub version: String,
    /// Set once an I/O failure stopped the pool taking writes (until restart).
    pub failed: bool,
    /// The newest event logged.
    pub event_log_last_seq: u64,
}

impl PoolStatus {
    pub fn new(
        stats: engine::PoolStats,
        space: Option<&engine::SpaceReport>,
        failed: bool,
        event_log_last_seq: u64,
    ) -> Self {
        PoolStatus {
            version: env!("CARGO_PKG_VERSION").to_string(),
            failed,
            event_log_last_seq,
            capacity_bytes: stats.capacity_bytes,
            used_bytes: stats.used_bytes,
            free_bytes: stats.free_bytes,
            metadata_bytes: stats.metadata_bytes,
            io_backend: stats.io_backend,
            space: space.map(PoolSpace::from),
        }
    }
}

/// Body of `POST /v1/pool/scrub`; the body may be left out.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StartScrub {
    /// Bandwidth budget in bytes per second: a number, or a size string such as "64MiB".
    /// Default 64 MiB/s; must be above 0.
    #[serde(default)]
    #[schema(example = "64MiB")]
    pub rate: Option<ByteSize>,
}

/// Where a scrub is.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScrubState {
    /// Still reading blocks; the figures grow as it goes.
    Running,
    /// Every live block was read (bad ones included: see `bad_blocks`).
    Completed,
    /// Stopped on request (`DELETE /v1/pool/scrub`) before the end.
    Stopped,
    /// Stopped early on an I/O error; `failure` says why.
    Failed,
}

/// A data block found not matching its checksum.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ScrubError {
    /// The ref it was found through (other refs may map the same block).
    #[schema(example = "vm-1@main")]
    pub export: String,
    /// Where it is in that ref.
    pub offset_bytes: u64,
    /// Where it is in the pool's `data.grove`, in 4 KiB blocks.
    pub data_block: u64,
}

impl From<engine::ScrubError> for ScrubError {
    fn from(error: engine::ScrubError) -> Self {
        ScrubError {
            export: error.export,
            offset_bytes: error.offset_bytes,
            data_block: error.data_block,
        }
    }
}

/// A scrub's progress, then its result: every live data block of the pool read once and
/// checked against its checksum.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ScrubReport {
    pub state: ScrubState,
    /// Seconds since the Unix epoch.
    pub started_unix: u64,
    /// Null while running.
    pub finished_unix: Option<u64>,
    /// The bandwidth budget.
    pub rate_bytes_per_second: u64,
    /// Distinct data blocks read and checked (a block several refs share counts once).
    pub checked_blocks: u64,
    /// Blocks read that have no checksum (their volume has checksums off).
    pub unchecked_blocks: u64,
    /// Blocks that do not match their checksum.
    pub bad_blocks: u64,
    /// The first 1000 bad blocks.
    pub errors: Vec<ScrubError>,
    /// Why a failed scrub stopped; null otherwise.
    pub failure: Option<String>,
}

impl From<engine::ScrubReport> for ScrubReport {
    fn from(report: engine::ScrubReport) -> Self {
        ScrubReport {
            state: match report.state.as_str() {
                "running" => ScrubState::Running,
                "completed" => ScrubState::Completed,
                "stopped" => ScrubState::Stopped,
                // The engine has no other state; anything new is not a success.
                _ => ScrubState::Failed,
            },
            started_unix: report.started_unix,
            finished_unix: report.finished_unix,
            rate_bytes_per_second: report.rate_bytes_per_second,
            checked_blocks: report.checked_blocks,
            unchecked_blocks: report.unchecked_blocks,
            bad_blocks: report.bad_blocks,
            errors: report.errors.into_iter().map(ScrubError::from).collect(),
            failure: report.failure,
        }
    }
}

/// A range of bytes.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ByteRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
}

impl From<engine::ByteRange> for ByteRange {
    fn from(range: engine::ByteRange) -> Self {
        ByteRange {
            offset_bytes: range.offset_bytes,
            len_bytes: range.len_bytes,
        }
    }
}

/// What kind of thing a ref names.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RefKind {
    Branch,
    Tag,
    Commit,
}

/// A ref as the server resolved it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ResolvedRef {
    /// Canonical name: `VOL` for the main branch, else `VOL@BRANCH`, `VOL@TAG` or
    /// `VOL@COMMIT` (full id).
    #[schema(example = "vm-1@dev")]
    pub name: String,
    pub kind: RefKind,
    pub volume: String,
    /// For a branch: its name.
    pub branch: Option<String>,
    /// For a tag: its name.
    pub tag: Option<String>,
    /// For a tag or a commit: the commit id. Null for a branch, whose head may hold
    /// uncommitted writes.
    pub commit: Option<String>,
}

impl From<engine::ResolvedRef> for ResolvedRef {
    fn from(resolved: engine::ResolvedRef) -> Self {
        let name = resolved.canonical_name();
        match resolved {
            engine::ResolvedRef::Branch { volume, branch } => ResolvedRef {
                name,
                kind: RefKind::Branch,
                volume,
                branch: Some(branch),
                tag: None,
                commit: None,
            },
            engine::ResolvedRef::Tag {
                volume,
                tag,
                commit,
            } => ResolvedRef {
                name,
                kind: RefKind::Tag,
                volume,
                branch: None,
                tag: Some(tag),
                commit: Some(commit.to_hex()),
            },
            engine::ResolvedRef::Commit { volume, commit } => ResolvedRef {
                name,
                kind: RefKind::Commit,
                volume,
                branch: None,
                tag: None,
                commit: Some(commit.to_hex()),
            },
        }
    }
}

/// Query of `GET /v1/volumes/{vol}/diff`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DiffQuery {
    /// The old side: a branch, tag, or commit id (or unique prefix) of the volume, or a full
    /// ref `VOL@NAME` of the volume or of a volume sharing its history (a clone or a source).
    #[param(example = "v1.0")]
    pub from: String,
    /// The new side, given like `from`. A branch includes its uncommitted writes.
    #[param(example = "main")]
    pub to: String,
    /// Most extents to list: 1 to 1000000, default 100000. The counts always cover the whole
    /// diff; `extents_truncated` says whether the list was cut.
    #[param(minimum = 1, maximum = 1000000)]
    pub limit: Option<usize>,
}

/// The blocks that differ between two refs, as coalesced byte ranges.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct DiffReport {
    pub from: ResolvedRef,
    pub to: ResolvedRef,
    /// The unit of change: 4096 bytes.
    pub block_size_bytes: u64,
    /// Changed ranges in order, adjacent blocks coalesced.
    pub extents: Vec<ByteRange>,
    /// Changed ranges in all (the length of `extents` unless it was cut by `limit`).
    pub extent_count: u64,
    /// Whether `extents` lists fewer ranges than `extent_count`.
    pub extents_truncated: bool,
    pub changed_bytes: u64,
    pub changed_blocks: u64,
    /// Blocks the history marked as possibly changed, which the diff checked: what it cost.
    pub candidate_blocks: u64,
    /// How to read the figures.
    pub note: String,
}

/// What `DiffReport.note` says.
pub const DIFF_NOTE: &str = "a block differs when the two refs map it to different data; a block \
    rewritten with identical content may be reported as changed";

/// Query of `GET /v1/volumes/{vol}/blame`.
#[derive(Clone, Debug, Serialize, Deserialize, IntoParams, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BlameQuery {
    /// The ref whose content is explained: a branch, tag, or commit id (or unique prefix) of
    /// the volume, or a full ref `VOL@NAME` naming it. Defaults to `main`.
    #[serde(default, rename = "ref")]
    #[param(rename = "ref", example = "main")]
    pub reference: Option<String>,
    /// Where the range starts: bytes, or a size such as "1MiB".
    #[param(value_type = String, example = "0")]
    pub offset: ByteSize,
    /// Length of the range: bytes, or a size such as "64KiB". Offset plus length must not pass
    /// the end of the volume.
    #[param(value_type = String, example = "1MiB")]
    pub length: ByteSize,
}

/// Whose content a blamed range holds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BlameState {
    /// Written by the commit given in `commit`.
    Committed,
    /// Written on the branch head since its latest commit.
    Uncommitted,
    /// Never written since the volume was created: reads as zeros.
    NeverWritten,
}

/// A part of the blamed range and who last wrote it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct BlameRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
    pub state: BlameState,
    /// The commit that wrote the range (state `committed`); null otherwise.
    pub commit: Option<Commit>,
}

impl From<engine::BlameRange> for BlameRange {
    fn from(range: engine::BlameRange) -> Self {
        let (state, commit) = match range.source {
            engine::BlameSource::Committed { commit } => {
                (BlameState::Committed, Some(Commit::from(*commit)))
            }
            engine::BlameSource::Uncommitted => (BlameState::Uncommitted, None),
            engine::BlameSource::NeverWritten => (BlameState::NeverWritten, None),
        };
        BlameRange {
            offset_bytes: range.offset_bytes,
            len_bytes: range.len_bytes,
            state,
            commit,
        }
    }
}

/// Answer of `GET /v1/volumes/{vol}/blame`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct BlameReport {
    /// The ref whose content is explained.
    #[serde(rename = "ref")]
    #[schema(rename = "ref")]
    pub target: ResolvedRef,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// The range cut into parts by who last wrote them, in order, covering it exactly.
    pub ranges: Vec<BlameRange>,
}

/// What a merge does with blocks both sides changed to different content.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MergeStrategy {
    /// Change nothing and report the conflicting ranges (409, or 200 on a dry run).
    #[default]
    Fail,
    /// Keep the branch's content.
    Ours,
    /// Take the merged side's content.
    Theirs,
    /// Leave the merge in progress on a writable merge branch (exported over NBD as
    /// `VOL@MERGE_BRANCH`): the blocks only the merged side changed are taken, the conflicting
    /// ones hold the branch's content until written there. Conclude it with
    /// `POST /v1/volumes/{vol}/merges/{merge_branch}/conclude`, or abort it. Without
    /// conflicts it merges like the other strategies.
    Manual,
}

impl From<MergeStrategy> for engine::MergeStrategy {
    fn from(strategy: MergeStrategy) -> Self {
        match strategy {
            MergeStrategy::Fail => engine::MergeStrategy::Fail,
            MergeStrategy::Ours => engine::MergeStrategy::Ours,
            MergeStrategy::Theirs => engine::MergeStrategy::Theirs,
            MergeStrategy::Manual => engine::MergeStrategy::Manual,
        }
    }
}

/// Body of `POST /v1/volumes/{vol}/merges`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateMerge {
    /// What to merge: a commit, a tag, or a branch (its latest commit; uncommitted writes on
    /// it are not merged) of the volume, or a full ref `VOL@NAME` of the volume or of a volume
    /// sharing its history.
    #[schema(example = "feature/resize")]
    pub from: String,
    /// The branch of this volume to merge into. It must have no uncommitted writes and no
    /// open sessions.
    #[schema(example = "main")]
    pub into: String,
    #[serde(default)]
    pub strategy: MergeStrategy,
    /// Report what the merge would do and change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Message of the merge commit, 1 to 65536 bytes; default "Merge FROM into INTO".
    #[serde(default)]
    pub message: Option<String>,
    /// Author of the merge commit; 1 to 256 bytes without control characters.
    #[serde(default)]
    pub author: Option<String>,
    /// Strategy `manual`: the name of the merge branch; default `merge-INTO`.
    #[serde(default)]
    #[schema(example = "merge-main")]
    pub merge_branch: Option<String>,
}

/// What a merge did, or would do on a dry run.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MergeOutcome {
    /// The merged commit is already in the branch's history: nothing to do.
    UpToDate,
    /// The branch's latest commit is an ancestor of the merged one: the head moves to it.
    FastForward,
    /// A merge commit with two parents.
    Merged,
    /// Strategy `fail` met conflicts: nothing changed (only seen on a dry run; a real merge
    /// answers 409 `merge_conflict`).
    Conflicts,
    /// Strategy `manual` met conflicts: the merge waits on its merge branch.
    InProgress,
}

/// The report of a merge.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct MergeReport {
    pub outcome: MergeOutcome,
    pub dry_run: bool,
    pub volume: String,
    /// The branch merged into.
    pub into: String,
    /// The commit merged in.
    pub from_commit: String,
    /// The branch's latest commit before the merge; null for a branch with no commits.
    pub ours_commit: Option<String>,
    /// Their nearest common ancestor; null when only the empty volume is.
    pub base: Option<String>,
    /// The merge commit made, or the commit fast-forwarded to; null on a dry run, when up to
    /// date, or on conflicts.
    pub commit: Option<Commit>,
    /// Ranges taken from the merged side.
    pub taken: Vec<ByteRange>,
    pub taken_bytes: u64,
    /// Ranges both sides changed to different content (settled by the strategy unless it is
    /// `fail`).
    pub conflicts: Vec<ByteRange>,
    pub conflict_bytes: u64,
    /// Outcome `in_progress`: the merge branch to resolve the conflicts on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_branch: Option<String>,
}

impl From<engine::MergeReport> for MergeReport {
    fn from(report: engine::MergeReport) -> Self {
        MergeReport {
            outcome: match report.outcome {
                engine::MergeOutcome::UpToDate => MergeOutcome::UpToDate,
                engine::MergeOutcome::FastForward => MergeOutcome::FastForward,
                engine::MergeOutcome::Merged => MergeOutcome::Merged,
                engine::MergeOutcome::Conflicts => MergeOutcome::Conflicts,
                engine::MergeOutcome::InProgress => MergeOutcome::InProgress,
            },
            dry_run: report.dry_run,
            volume: report.volume,
            into: report.into,
            from_commit: report.from_commit.to_hex(),
            ours_commit: report.ours_commit.map(|id| id.to_hex()),
            base: report.base.map(|id| id.to_hex()),
            commit: report.commit.map(Commit::from),
            taken: report.taken.into_iter().map(ByteRange::from).collect(),
            taken_bytes: report.taken_bytes,
            conflicts: report.conflicts.into_iter().map(ByteRange::from).collect(),
            conflict_bytes: report.conflict_bytes,
            merge_branch: report.merge_branch,
        }
    }
}

/// A merge waiting on its merge branch for its conflicts to be resolved by hand.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct MergeInProgress {
    pub volume: String,
    /// The writable merge branch, exported over NBD as `VOL@MERGE_BRANCH`.
    pub merge_branch: String,
    /// The branch the merge concludes into.
    pub into: String,
    /// The ref merged, as given.
    pub from: String,
    /// The commit merged in.
    pub from_commit: String,
    /// The target branch's latest commit when the merge began; concluding requires it still
    /// to be, with no writes on the branch since.
    pub ours_commit: Option<String>,
    /// Their nearest common ancestor.
    pub base: Option<String>,
    /// Ranges taken from the merged side.
    pub taken: Vec<ByteRange>,
    pub taken_bytes: u64,
    /// Ranges both sides changed differently: they hold the target branch's content until
    /// written on the merge branch.
    pub conflicts: Vec<ByteRange>,
    pub conflict_bytes: u64,
    /// Bytes written on the merge branch since the merge began.
    pub edited_bytes: u64,
    pub started_unix: u64,
}

impl From<engine::MergeInProgress> for MergeInProgress {
    fn from(merge: engine::MergeInProgress) -> Self {
        MergeInProgress {
            volume: merge.volume,
            merge_branch: merge.merge_branch,
            into: merge.into,
            from: merge.from,
            from_commit: merge.from_commit.to_hex(),
            ours_commit: merge.ours_commit.map(|id| id.to_hex()),
            base: merge.base.map(|id| id.to_hex()),
            taken: merge.taken.into_iter().map(ByteRange::from).collect(),
            taken_bytes: merge.taken_bytes,
            conflicts: merge.conflicts.into_iter().map(ByteRange::from).collect(),
            conflict_bytes: merge.conflict_bytes,
            edited_bytes: merge.edited_bytes,
            started_unix: merge.started_unix,
        }
    }
}

/// Body of `POST /v1/volumes/{vol}/merges/{merge_branch}/conclude`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConcludeMerge {
    /// Message of the merge commit, 1 to 65536 bytes; default the merge request's, or
    /// "Merge FROM into INTO".
    #[serde(default)]
    pub message: Option<String>,
    /// Author of the merge commit; default the merge request's.
    #[serde(default)]
    pub author: Option<String>,
}

/// Body of `POST /v1/volumes/{vol}/branches/{branch}/reset`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResetBranch {
    /// The commit the branch head moves to: a commit, a tag, or a branch (its latest commit)
    /// of the volume, or a full ref `VOL@NAME` of the volume or of a volume sharing its
    /// history.
    #[schema(example = "v1.0")]
    pub to: String,
    /// Throw away writes made on the head since its latest commit. Without it, a head with
    /// uncommitted writes is refused (409).
    #[serde(default)]
    pub discard_uncommitted: bool,
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
    /// The job the session joined (`?job=ID` after the export name), for lineage.
    pub job: Option<String>,
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
            job: info.job,
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

/// Query of `GET /v1/events` and `GET /v1/events/stream`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this sequence number (default: from the oldest; for the stream: from now,
    /// or after `Last-Event-ID`).
    pub since: Option<u64>,
    /// Only these event types, comma-separated (`commit.created,merge.completed`).
    #[serde(rename = "type")]
    #[param(rename = "type", example = "commit.created")]
    pub types: Option<String>,
    /// Only events about this volume.
    pub volume: Option<String>,
    /// Most events to return: 1 to 10000, default 1000 (not for the stream).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
}

/// A logged event: its sequence number, time, actor and type, then the fields of its type
/// (`volume`, `branch`, `commit`, `parents`, `changed_extents`, ...).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Event {
    /// 1, 2, 3... in the order the changes became durable; never reused.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// Who made the change: the API caller (`X-Grove-Actor`, else `api@ADDRESS`), or the
    /// NBD client of a session (`nbd:ADDRESS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// `volume.created`, `commit.created`, `merge.completed`, `session.closed`, ...
    #[serde(rename = "type")]
    #[schema(rename = "type", example = "commit.created")]
    pub event_type: String,
    /// The fields of the event's type.
    #[serde(flatten)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl From<&engine::LoggedEvent> for Event {
    fn from(event: &engine::LoggedEvent) -> Self {
        let mut fields = match serde_json::to_value(&event.event) {
            Ok(serde_json::Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        };
        fields.remove("type");
        Event {
            seq: event.seq,
            time_unix_ms: event.time_unix_ms,
            actor: event.actor.clone(),
            event_type: event.event.type_name().to_string(),
            fields,
        }
    }
}

/// Answer of `GET /v1/events`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct EventPage {
    /// Oldest first.
    pub events: Vec<Event>,
    /// Ask again with `since` set to this for the next page (with filters it may be past the
    /// last event returned).
    pub next_since: u64,
    /// The oldest event the log still holds (0: none); older ones fell out of retention.
    pub first_seq: u64,
    /// The newest event logged (0: none yet).
    pub last_seq: u64,
}

/// Query of `GET /v1/volumes/{vol}/commits/{id}/lineage`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, IntoParams, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LineageQuery {
    /// `upstream` (default: parents and sources, back to the original data) or `downstream`
    /// (children and commits derived from it, across volumes).
    pub direction: Option<String>,
    /// Steps to walk, 1 to 1000; default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub depth: Option<usize>,
}

/// One derivation: `commit` derives from `from`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct LineageEdge {
    pub commit: String,
    pub from: String,
    /// `parent` or `source`.
    pub kind: String,
    /// For a source: how it is known.
    pub source: Option<LineageSource>,
}

/// Answer of `GET /v1/volumes/{vol}/commits/{id}/lineage`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct LineageGraph {
    pub commit: String,
    pub direction: String,
    /// The commits reached, the starting one first, nearest first.
    pub commits: Vec<Commit>,
    pub edges: Vec<LineageEdge>,
    /// The walk stopped at `depth` (or 10000 commits) with more beyond.
    pub truncated: bool,
}

impl From<engine::lineage::LineageGraph> for LineageGraph {
    fn from(graph: engine::lineage::LineageGraph) -> Self {
        LineageGraph {
            commit: graph.commit.to_hex(),
            direction: match graph.direction {
                engine::lineage::Direction::Upstream => "upstream",
                engine::lineage::Direction::Downstream => "downstream",
            }
            .to_string(),
            commits: graph.commits.into_iter().map(Commit::from).collect(),
            edges: graph
                .edges
                .into_iter()
                .map(|edge| LineageEdge {
                    commit: edge.commit.to_hex(),
                    from: edge.from.to_hex(),
                    kind: match edge.kind {
                        engine::lineage::EdgeKind::Parent => "parent",
                        engine::lineage::EdgeKind::Source => "source",
                    }
                    .to_string(),
                    source: edge.source.map(LineageSource::from),
                })
                .collect(),
            truncated: graph.truncated,
        }
    }
}
