//! Checks of every value a request carries, before anything reaches the engine. Each returns a
//! 400 error whose message names the value and what is accepted.

use grove_engine::{
    self as engine, CommitRequest, MergeRequest, RefSpec, BLOCK_SIZE, MAIN_BRANCH,
    VOLUME_SIZE_MAX_BYTES,
};

use crate::error::ApiError;
use crate::model::{CreateCommit, CreateMerge};
use crate::size::{format_size, ByteSize};

/// Longest commit message accepted.
pub const COMMIT_MESSAGE_LEN_MAX_BYTES: usize = 64 << 10;
/// Longest commit author accepted.
pub const COMMIT_AUTHOR_LEN_MAX_BYTES: usize = 256;
/// Most metadata entries on one commit.
pub const COMMIT_META_ENTRIES_MAX: usize = 64;
/// Longest metadata key.
pub const COMMIT_META_KEY_LEN_MAX_BYTES: usize = 128;
/// Longest metadata value.
pub const COMMIT_META_VALUE_LEN_MAX_BYTES: usize = 4096;
/// Commits `log` returns when the request gives no limit.
pub const LOG_LIMIT_DEFAULT: usize = 1000;
/// Most commits one `log` request may ask for.
pub const LOG_LIMIT_MAX: usize = 10_000;
/// Length of a full commit id in hex digits.
pub const COMMIT_ID_LEN_HEX: usize = 32;
/// Extents a diff lists when the request gives no limit.
pub const DIFF_EXTENTS_LIMIT_DEFAULT: usize = 100_000;
/// Most extents one diff request may ask for.
pub const DIFF_EXTENTS_LIMIT_MAX: usize = 1_000_000;

pub fn volume_name(name: &str) -> Result<(), ApiError> {
    Ok(engine::validate_volume_name(name)?)
}

pub fn branch_name(name: &str) -> Result<(), ApiError> {
    Ok(engine::validate_ref_name("branch", name)?)
}

pub fn tag_name(name: &str) -> Result<(), ApiError> {
    Ok(engine::validate_ref_name("tag", name)?)
}

/// A name for a new branch or tag. The engine's naming rule refuses `.` and `..` parts: URL
/// parsers treat them (even percent-encoded) as dot segments, so most clients could never
/// address such a branch or tag, and would act on its parent resource instead.
pub fn new_ref_name(kind: &str, name: &str) -> Result<(), ApiError> {
    engine::validate_ref_name(kind, name)?;
    Ok(())
}

/// Turns a ref given relative to `volume` into the full ref string the engine takes.
///
/// `NAME` is a branch, tag or commit (prefix) of `volume`; `VOL@NAME` is accepted when `VOL` is
/// `volume`. A ref into another volume is refused.
pub fn ref_in_volume(volume: &str, reference: &str) -> Result<String, ApiError> {
    if reference.contains('@') {
        let spec = RefSpec::parse(reference)?;
        if spec.volume != volume {
            return Err(ApiError::invalid_argument(format!(
                "ref {reference:?} is in volume {:?}, not in {volume:?}",
                spec.volume
            )));
        }
        let name = spec.name.as_deref().unwrap_or(MAIN_BRANCH);
        Ok(format!("{volume}@{name}"))
    } else {
        engine::validate_ref_name("ref", reference)?;
        Ok(format!("{volume}@{reference}"))
    }
}

/// A ref given in the context of `volume` to an operation that may reach a volume sharing its
/// history (a clone or a clone's source): `NAME` (a branch, tag or commit of `volume`, or a
/// bare volume name for its main branch) or a full `VOL@NAME` of any volume. The engine
/// resolves it and refuses volumes with no shared history.
pub fn ref_in_context(volume: &str, reference: &str) -> Result<String, ApiError> {
    engine::validate_volume_name(volume)?;
    if reference.contains('@') {
        let spec = RefSpec::parse(reference)?;
        let name = spec.name.as_deref().unwrap_or(MAIN_BRANCH);
        Ok(format!("{}@{name}", spec.volume))
    } else {
        engine::validate_ref_name("ref", reference)?;
        Ok(reference.to_string())
    }
}

/// A full commit id or a prefix of one: 1-32 hex digits, returned in lowercase.
pub fn commit_id_prefix(id: &str) -> Result<String, ApiError> {
    let ok =
        (1..=COMMIT_ID_LEN_HEX).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(id.to_ascii_lowercase())
    } else {
        Err(ApiError::invalid_argument(format!(
            "invalid commit id {id:?}: use 1-{COMMIT_ID_LEN_HEX} hex digits (a full id or a unique prefix)"
        )))
    }
}

/// A volume size: a positive multiple of the block size, at most the engine's maximum.
pub fn volume_size(size: ByteSize) -> Result<u64, ApiError> {
    let bytes = size.bytes();
    if bytes == 0 {
        return Err(ApiError::invalid_argument(
            "invalid size 0: a volume needs at least one 4096-byte block",
        ));
    }
    if !bytes.is_multiple_of(BLOCK_SIZE) {
        return Err(ApiError::invalid_argument(format!(
            "invalid size {bytes}: must be a multiple of the {BLOCK_SIZE}-byte block size"
        )));
    }
    if bytes > VOLUME_SIZE_MAX_BYTES {
        return Err(ApiError::invalid_argument(format!(
            "invalid size {bytes}: the largest volume is {}",
            format_size(VOLUME_SIZE_MAX_BYTES)
        )));
    }
    Ok(bytes)
}

fn has_control_characters(text: &str) -> bool {
    text.chars().any(char::is_control)
}

pub fn commit_message(message: &str) -> Result<(), ApiError> {
    if message.trim().is_empty() {
        return Err(ApiError::invalid_argument(
            "the commit message must not be empty",
        ));
    }
    if message.len() > COMMIT_MESSAGE_LEN_MAX_BYTES {
        return Err(ApiError::invalid_argument(format!(
            "the commit message is {} bytes; the limit is {COMMIT_MESSAGE_LEN_MAX_BYTES}",
            message.len()
        )));
    }
    Ok(())
}

pub fn commit_author(author: Option<&str>) -> Result<(), ApiError> {
    if let Some(author) = author {
        let ok = (1..=COMMIT_AUTHOR_LEN_MAX_BYTES).contains(&author.len())
            && !has_control_characters(author);
        if !ok {
            return Err(ApiError::invalid_argument(format!(
                "invalid author {author:?}: use 1-{COMMIT_AUTHOR_LEN_MAX_BYTES} bytes without control characters"
            )));
        }
    }
    Ok(())
}

/// A commit request within its bounds.
pub fn commit_request(volume: &str, request: CreateCommit) -> Result<CommitRequest, ApiError> {
    let CreateCommit {
        message,
        author,
        meta,
        sources,
    } = request;
    if sources.len() > COMMIT_SOURCES_MAX {
        return Err(ApiError::invalid_argument(format!(
            "{} sources; the limit is {COMMIT_SOURCES_MAX}",
            sources.len()
        )));
    }
    let sources = sources
        .iter()
        .map(|source| ref_in_context(volume, source))
        .collect::<Result<Vec<_>, _>>()?;
    commit_message(&message)?;
    commit_author(author.as_deref())?;
    if meta.len() > COMMIT_META_ENTRIES_MAX {
        return Err(ApiError::invalid_argument(format!(
            "{} metadata entries; the limit is {COMMIT_META_ENTRIES_MAX}",
            meta.len()
        )));
    }
    for (key, value) in &meta {
        let key_ok = (1..=COMMIT_META_KEY_LEN_MAX_BYTES).contains(&key.len())
            && key.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':')
            });
        if !key_ok {
            return Err(ApiError::invalid_argument(format!(
                "invalid metadata key {key:?}: use 1-{COMMIT_META_KEY_LEN_MAX_BYTES} letters, \
                 digits, '-', '_', '.', '/' and ':'"
            )));
        }
        if value.len() > COMMIT_META_VALUE_LEN_MAX_BYTES {
            return Err(ApiError::invalid_argument(format!(
                "metadata value of {key:?} is {} bytes; the limit is {COMMIT_META_VALUE_LEN_MAX_BYTES}",
                value.len()
            )));
        }
    }
    Ok(CommitRequest {
        message,
        author,
        meta,
        sources,
    })
}

/// A merge request within its bounds, its refs checked for syntax (the engine resolves them).
pub fn merge_request(volume: &str, request: CreateMerge) -> Result<MergeRequest, ApiError> {
    let CreateMerge {
        from,
        into,
        strategy,
        dry_run,
        message,
        author,
        merge_branch,
    } = request;
    let from = ref_in_context(volume, &from)?;
    branch_name(&into)?;
    if let Some(name) = &merge_branch {
        if strategy != crate::model::MergeStrategy::Manual {
            return Err(ApiError::invalid_argument(
                "merge_branch only goes with strategy \"manual\"",
            ));
        }
        new_ref_name("merge branch", name)?;
    }
    if let Some(message) = &message {
        commit_message(message)?;
    }
    commit_author(author.as_deref())?;
    Ok(MergeRequest {
        from,
        into,
        strategy: strategy.into(),
        dry_run,
        message,
        author,
        merge_branch,
        expect: None,
    })
}

/// The number of extents a `diff` request lists.
pub fn diff_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DIFF_EXTENTS_LIMIT_DEFAULT),
        Some(limit) if (1..=DIFF_EXTENTS_LIMIT_MAX).contains(&limit) => Ok(limit),
        Some(limit) => Err(ApiError::invalid_argument(format!(
            "invalid limit {limit}: use 1-{DIFF_EXTENTS_LIMIT_MAX}"
        ))),
    }
}

/// Sources a commit request may name.
pub const COMMIT_SOURCES_MAX: usize = 256;

/// The number of commits a `log` request returns.
pub fn log_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(LOG_LIMIT_DEFAULT),
        Some(limit) if (1..=LOG_LIMIT_MAX).contains(&limit) => Ok(limit),
        Some(limit) => Err(ApiError::invalid_argument(format!(
            "invalid limit {limit}: use 1-{LOG_LIMIT_MAX}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn commit(message: &str) -> CreateCommit {
        CreateCommit {
            message: message.into(),
            author: None,
            meta: BTreeMap::new(),
            sources: Vec::new(),
        }
    }

    #[test]
    fn names() {
        assert!(volume_name("vm-1").is_ok());
        assert_eq!(volume_name("VM").unwrap_err().code, "invalid_argument");
        assert!(branch_name("feature/x.1_a-b").is_ok());
        assert!(branch_name("a b").is_err());
        assert!(branch_name("a@b").is_err());
        assert!(tag_name("").is_err());
        assert!(tag_name(&"t".repeat(129)).is_err());
        assert!(new_ref_name("branch", "...").is_ok());
        // Path-like names keep every part usable in a URL.
        assert!(new_ref_name("branch", "a/..").is_err());
        assert!(new_ref_name("branch", "a//b").is_err());
        assert!(new_ref_name("branch", "..").is_err());
        assert!(new_ref_name("tag", ".").is_err());
    }

    #[test]
    fn refs_are_made_full_within_the_volume() {
        assert_eq!(ref_in_volume("vm", "dev/1").unwrap(), "vm@dev/1");
        assert_eq!(ref_in_volume("vm", "vm@snap").unwrap(), "vm@snap");
        assert_eq!(ref_in_volume("vm", "3f2a").unwrap(), "vm@3f2a");
        let err = ref_in_volume("vm", "other@main").unwrap_err();
        assert!(err.message.contains("not in \"vm\""), "{}", err.message);
        assert!(ref_in_volume("vm", "").is_err());
        assert!(ref_in_volume("vm", "vm@").is_err());
        assert!(ref_in_volume("vm", "a b").is_err());
        assert!(ref_in_volume("vm", "vm@a@b").is_err());
    }

    #[test]
    fn refs_in_context_may_name_other_volumes() {
        assert_eq!(ref_in_context("vm", "dev/1").unwrap(), "dev/1");
        assert_eq!(ref_in_context("vm", "vm@snap").unwrap(), "vm@snap");
        assert_eq!(ref_in_context("vm", "clone-1@v1").unwrap(), "clone-1@v1");
        assert_eq!(ref_in_context("vm", "other").unwrap(), "other");
        for bad in ["", "vm@", "a b", "vm@a@b", "VM@x", "@x"] {
            assert!(ref_in_context("vm", bad).is_err(), "{bad:?}");
        }
        assert!(ref_in_context("VM", "main").is_err());
    }

    #[test]
    fn merge_requests() {
        let request = |from: &str, into: &str| CreateMerge {
            from: from.into(),
            into: into.into(),
            strategy: Default::default(),
            dry_run: false,
            message: None,
            author: None,
            merge_branch: None,
        };
        let merge = merge_request("vm", request("dev", "main")).unwrap();
        assert_eq!((merge.from.as_str(), merge.into.as_str()), ("dev", "main"));
        assert_eq!(merge.strategy, engine::MergeStrategy::Fail);
        assert!(merge_request("vm", request("dev", "a b")).is_err());
        assert!(merge_request("vm", request("a b", "main")).is_err());
        let mut bad = request("dev", "main");
        bad.message = Some(" ".into());
        assert!(merge_request("vm", bad).is_err());
        let mut bad = request("dev", "main");
        bad.author = Some("a\tb".into());
        assert!(merge_request("vm", bad).is_err());
    }

    #[test]
    fn diff_limits() {
        assert_eq!(diff_limit(None).unwrap(), DIFF_EXTENTS_LIMIT_DEFAULT);
        assert_eq!(diff_limit(Some(1)).unwrap(), 1);
        assert!(diff_limit(Some(0)).is_err());
        assert!(diff_limit(Some(DIFF_EXTENTS_LIMIT_MAX + 1)).is_err());
    }

    #[test]
    fn commit_ids() {
        assert_eq!(commit_id_prefix("3F2a").unwrap(), "3f2a");
        assert!(commit_id_prefix(&"a".repeat(32)).is_ok());
        assert!(commit_id_prefix(&"a".repeat(33)).is_err());
        assert!(commit_id_prefix("").is_err());
        assert!(commit_id_prefix("xyz").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(volume_size(ByteSize(10 << 30)).unwrap(), 10 << 30);
        assert_eq!(volume_size(ByteSize(4096)).unwrap(), 4096);
        assert!(volume_size(ByteSize(0)).is_err());
        assert!(volume_size(ByteSize(4095))
            .unwrap_err()
            .message
            .contains("multiple"));
        assert!(volume_size(ByteSize(VOLUME_SIZE_MAX_BYTES)).is_ok());
        assert!(volume_size(ByteSize(VOLUME_SIZE_MAX_BYTES + 4096)).is_err());
    }

    #[test]
    fn commit_requests() {
        assert!(commit_request("vm", commit("base")).is_ok());
        assert!(commit_request("vm", commit("")).is_err());
        assert!(commit_request("vm", commit("  \n")).is_err());
        assert!(
            commit_request("vm", commit(&"m".repeat(COMMIT_MESSAGE_LEN_MAX_BYTES + 1))).is_err()
        );

        let mut request = commit("m");
        request.author = Some("ana <ana@example.com>".into());
        assert!(commit_request("vm", request.clone()).is_ok());
        request.author = Some("ana\n".into());
        assert!(commit_request("vm", request.clone()).is_err());
        request.author = Some(String::new());
        assert!(commit_request("vm", request).is_err());

        let mut request = commit("m");
        request.meta.insert("dataset:version".into(), "3".into());
        assert!(commit_request("vm", request.clone()).is_ok());
        request.meta.insert("bad key".into(), "x".into());
        assert!(commit_request("vm", request)
            .unwrap_err()
            .message
            .contains("bad key"));

        let mut request = commit("m");
        request
            .meta
            .insert("k".into(), "v".repeat(COMMIT_META_VALUE_LEN_MAX_BYTES + 1));
        assert!(commit_request("vm", request).is_err());

        let mut request = commit("m");
        for i in 0..=COMMIT_META_ENTRIES_MAX {
            request.meta.insert(format!("k{i}"), String::new());
        }
        assert!(commit_request("vm", request).is_err());
    }

    #[test]
    fn log_limits() {
        assert_eq!(log_limit(None).unwrap(), LOG_LIMIT_DEFAULT);
        assert_eq!(log_limit(Some(5)).unwrap(), 5);
        assert!(log_limit(Some(0)).is_err());
        assert!(log_limit(Some(LOG_LIMIT_MAX + 1)).is_err());
    }
}
