//! Domain types shared by the engine and its frontends: names, refs, ids and the read-only
//! views (`*Info`) the control plane shows.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Logical and physical block size in bytes. Every map entry and every allocation is in blocks.
pub const BLOCK_SIZE: u64 = 4096;
/// Largest volume the engine accepts: 1 PiB (2^38 blocks).
pub const VOLUME_SIZE_MAX_BYTES: u64 = 1 << 50;
/// The branch every volume starts with and the one `VOL` alone refers to.
pub const MAIN_BRANCH: &str = "main";

/// A commit id: 16 random bytes, shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct CommitId(pub [u8; 16]);

impl CommitId {
    pub fn random() -> Self {
        CommitId(rand::random())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitId({})", self.to_hex())
    }
}

impl From<CommitId> for String {
    fn from(id: CommitId) -> String {
        id.to_hex()
    }
}

impl TryFrom<String> for CommitId {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(&s, &mut bytes).map_err(|e| format!("bad commit id {s:?}: {e}"))?;
        Ok(CommitId(bytes))
    }
}

/// Volume names: 1-63 of lowercase letters, digits and '-'.
pub fn validate_volume_name(name: &str) -> Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid volume name {name:?}: use 1-63 lowercase letters, digits and '-'"
        )))
    }
}

/// Branch and tag names: 1-128 of letters, digits, '-', '_', '.' and '/'.
pub fn validate_ref_name(kind: &str, name: &str) -> Result<()> {
    let ok = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        // Path-like names must stay usable in URLs: no empty, "." or ".." components.
        && name.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "invalid {kind} name {name:?}: use 1-128 letters, digits, '-', '_', '.' and '/', \
             with no empty, '.' or '..' parts between slashes"
        )))
    }
}

/// A parsed ref string: `VOL` (meaning `VOL@main`) or `VOL@NAME`, where NAME is a branch, a
/// tag, or a commit id or unique prefix, looked up in that order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefSpec {
    pub volume: String,
    /// `None` means the main branch.
    pub name: Option<String>,
}

impl RefSpec {
    pub fn parse(spec: &str) -> Result<RefSpec> {
        let (volume, name) = match spec.split_once('@') {
            Some((volume, name)) => (volume, Some(name.to_string())),
            None => (spec, None),
        };
        validate_volume_name(volume)?;
        if let Some(name) = &name {
            validate_ref_name("ref", name)?;
        }
        Ok(RefSpec {
            volume: volume.to_string(),
            name,
        })
    }
}

impl fmt::Display for RefSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{}@{}", self.volume, name),
            None => f.write_str(&self.volume),
        }
    }
}

/// What a ref resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ResolvedRef {
    /// A writable branch head.
    Branch { volume: String, branch: String },
    /// A tag, which names a commit.
    Tag {
        volume: String,
        tag: String,
        commit: CommitId,
    },
    /// A commit.
    Commit { volume: String, commit: CommitId },
}

impl ResolvedRef {
    pub fn volume(&self) -> &str {
        match self {
            ResolvedRef::Branch { volume, .. }
            | ResolvedRef::Tag { volume, .. }
            | ResolvedRef::Commit { volume, .. } => volume,
        }
    }

    pub fn read_only(&self) -> bool {
        !matches!(self, ResolvedRef::Branch { .. })
    }

    /// The canonical name, as exports are listed: `VOL` for the main branch, else
    /// `VOL@BRANCH`, `VOL@TAG` or `VOL@COMMITID`.
    pub fn canonical_name(&self) -> String {
        match self {
            ResolvedRef::Branch { volume, branch } if branch == MAIN_BRANCH => volume.clone(),
            ResolvedRef::Branch { volume, branch } => format!("{volume}@{branch}"),
            ResolvedRef::Tag { volume, tag, .. } => format!("{volume}@{tag}"),
            ResolvedRef::Commit { volume, commit } => format!("{volume}@{commit}"),
        }
    }
}

/// Where a cloned volume came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeOrigin {
    /// The source volume.
    pub volume: String,
    /// The source ref as given, in canonical form (`VOL`, `VOL@BRANCH`, `VOL@TAG`, `VOL@ID`).
    pub source: String,
    /// The commit the clone's history continues from (`None`: a source with no commits).
    pub commit: Option<CommitId>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub branches: usize,
    pub commits: usize,
    pub tags: usize,
    /// Bytes of pool space the volume's live refs map (blocks shared between refs count once).
    pub written_bytes: u64,
    /// For a clone: the ref it was cloned from.
    pub origin: Option<VolumeOrigin>,
    /// Whether writes store a checksum for every block and reads check it.
    pub checksums: bool,
}

/// Options of a new volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Store a crc32c for every block written and check it on every read (on by default).
    pub checksums: bool,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions { checksums: true }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BranchInfo {
    pub volume: String,
    pub name: String,
    /// The last commit on this branch, `None` for a branch of a volume with no commits yet.
    pub head_commit: Option<CommitId>,
    /// Blocks written on the head since `head_commit` (what the next commit will record).
    pub uncommitted_blocks: u64,
    pub created_unix: u64,
    /// Only merges change it.
    #[serde(default)]
    pub protected: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagInfo {
    pub volume: String,
    pub name: String,
    pub commit: CommitId,
    pub created_unix: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitRequest {
    pub message: String,
    pub author: Option<String>,
    pub meta: BTreeMap<String, String>,
    /// Refs of commits the data was derived from, as the client names them (`VOL@TAG`, ...).
    #[serde(default)]
    pub sources: Vec<String>,
}

/// Where a commit's data came from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lineage {
    /// The sessions that wrote what the commit records (since its first parent).
    #[serde(default)]
    pub sessions: Vec<SessionWriter>,
    /// The commits its data was derived from.
    #[serde(default)]
    pub sources: Vec<Source>,
}

impl Lineage {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.sources.is_empty()
    }

    /// Takes in the lineage of a commit squashed into this one: its writers come first (they
    /// wrote earlier), its sources join these (each once).
    pub fn absorb(&mut self, earlier: &Lineage) {
        let mut sessions = earlier.sessions.clone();
        sessions.append(&mut self.sessions);
        self.sessions = sessions;
        for source in &earlier.sources {
            if !self.sources.contains(source) {
                self.sources.push(source.clone());
            }
        }
    }
}

/// A session that wrote to a branch head.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionWriter {
    pub session: u64,
    pub protocol: String,
    pub client: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    pub opened_unix: u64,
    /// Bytes it wrote, zeroed or trimmed on the head.
    pub bytes_written: u64,
}

/// How a source commit came to be known.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Named by the client in the commit request.
    Named,
    /// Read by a session of the same job as a session that wrote the commit's data.
    Job,
}

/// A commit another commit's data was derived from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Source {
    pub commit: CommitId,
    pub volume: String,
    pub kind: SourceKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// For job sources: the bytes the job read from it.
    #[serde(default)]
    pub bytes_read: u64,
}

/// Splits an export name into its ref and its job: `datasets@v3?job=train-42`.
pub fn split_job(export: &str) -> Result<(&str, Option<&str>)> {
    let Some((name, query)) = export.split_once('?') else {
        return Ok((export, None));
    };
    let job = query.strip_prefix("job=").ok_or_else(|| {
        Error::InvalidArgument(format!(
            "invalid export name {export:?}: the only option after '?' is job=ID"
        ))
    })?;
    validate_job(job)?;
    Ok((name, Some(job)))
}

/// Job ids: 1-128 letters, digits, '-', '_', '.'.
pub fn validate_job(job: &str) -> Result<()> {
    let ok = (1..=128).contains(&job.len())
        && job
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid job id {job:?}: use 1-128 letters, digits, '-', '_' and '.'"
        )))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitInfo {
    pub id: CommitId,
    pub volume: String,
    /// The branch the commit was made on.
    pub branch: String,
    pub parents: Vec<CommitId>,
    pub message: String,
    pub author: Option<String>,
    pub meta: BTreeMap<String, String>,
    pub created_unix: u64,
    /// Blocks written since the first parent (the commit's roaring bitmap cardinality).
    pub changed_blocks: u64,
    pub size_bytes: u64,
    /// Which sessions wrote its data, and what it was derived from.
    #[serde(default, skip_serializing_if = "Lineage::is_empty")]
    pub lineage: Lineage,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolStats {
    /// Used plus free bytes.
    pub capacity_bytes: u64,
    /// Bytes of data blocks in use.
    pub used_bytes: u64,
    /// Free blocks inside the data file plus free space on the file system holding it.
    pub free_bytes: u64,
    /// Bytes of metadata pages in use.
    pub metadata_bytes: u64,
    /// Which disk I/O backend is in use: "io_uring", "threads" or "sim".
    pub io_backend: String,
}

/// An export as a frontend lists it: every branch, tag and commit of every volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportInfo {
    /// `VOL` for main, else `VOL@BRANCH`, `VOL@TAG`, `VOL@COMMITID`.
    pub name: String,
    pub read_only: bool,
    pub size_bytes: u64,
    /// A human description ("branch main of vol", "commit abc... 'msg'").
    pub description: String,
}

pub(crate) fn now_unix() -> u64 {
    now_unix_ms() / 1000
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        assert!(validate_volume_name("vm-1").is_ok());
        assert!(validate_volume_name("").is_err());
        assert!(validate_volume_name("Vm").is_err());
        assert!(validate_volume_name("a_b").is_err());
        assert!(validate_volume_name(&"a".repeat(63)).is_ok());
        assert!(validate_volume_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn ref_names() {
        assert!(validate_ref_name("branch", "feature/x-1.2_b").is_ok());
        assert!(validate_ref_name("branch", "a b").is_err());
        assert!(validate_ref_name("branch", "a@b").is_err());
        assert!(validate_ref_name("branch", &"a".repeat(129)).is_err());
        for bad in [".", "..", "a/../b", "/a", "a/", "a//b"] {
            assert!(validate_ref_name("branch", bad).is_err(), "{bad}");
        }
        assert!(validate_ref_name("tag", "v1.0/rc.1").is_ok());
    }

    #[test]
    fn refspec_parse() {
        assert_eq!(
            RefSpec::parse("vol").unwrap(),
            RefSpec {
                volume: "vol".into(),
                name: None
            }
        );
        let spec = RefSpec::parse("vol@dev/1").unwrap();
        assert_eq!(spec.name.as_deref(), Some("dev/1"));
        assert!(RefSpec::parse("vol@").is_err());
        assert!(RefSpec::parse("VOL@x").is_err());
        assert!(RefSpec::parse("v@a@b").is_err());
    }
}
