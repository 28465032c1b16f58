//! The engine's one error type. Variants are what a caller can act on; each frontend maps them
//! to its wire codes (errno, HTTP status) in exactly one place.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A volume, branch, tag, commit or ref does not exist.
    #[error("{what} not found")]
    NotFound { what: String },
    /// Something with that name already exists.
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    /// A name, size, ref or range the caller gave is not acceptable.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A commit prefix matched more than one commit.
    #[error("ambiguous commit prefix {prefix:?} matches {count} commits")]
    Ambiguous { prefix: String, count: usize },
    /// The operation conflicts with the current state (deleting the main branch, ...).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A write to a read-only ref (a commit or a tag).
    #[error("{0} is read-only")]
    ReadOnly(String),
    /// An I/O range runs past the end of the volume.
    #[error("range {offset_bytes}+{len_bytes} is beyond the volume size {size_bytes}")]
    OutOfRange {
        offset_bytes: u64,
        len_bytes: u64,
        size_bytes: u64,
    },
    /// The pool has no space left.
    #[error("no space left in the pool")]
    NoSpace,
    /// On-disk metadata failed a check: a bad checksum, magic or structure.
    #[error("corrupt {what} at {at}")]
    Corrupt { what: String, at: String },
    /// A previous write or sync failed; the pool refuses writes until it is reopened.
    #[error("the pool is failed after an earlier I/O error and must be reopened")]
    Poisoned,
    /// The pool is shutting down.
    #[error("the pool is closed")]
    Closed,
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }

    pub(crate) fn exists(what: impl Into<String>) -> Self {
        Error::AlreadyExists { what: what.into() }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    pub(crate) fn corrupt(what: impl Into<String>, at: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            at: at.into(),
        }
    }

    /// Maps I/O errors that mean "the disk is full" to `NoSpace`.
    pub(crate) fn from_io(err: io::Error) -> Self {
        if err.raw_os_error() == Some(libc::ENOSPC) || err.kind() == io::ErrorKind::StorageFull {
            Error::NoSpace
        } else {
            Error::Io(err)
        }
    }
}
