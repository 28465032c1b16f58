//! The crate's error type, and the one place engine errors become NBD wire codes.

use std::io;
use std::time::Duration;

use grove_engine::Error as EngineError;

use crate::proto::{
    NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_EPERM, NBD_ESHUTDOWN, NBD_REP_ERR_SHUTDOWN,
    NBD_REP_ERR_UNKNOWN,
};

/// Why a connection ended other than by a clean `NBD_OPT_ABORT` or `NBD_CMD_DISC`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading from or writing to the socket failed, or the client went away mid-message.
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The client broke a rule the spec makes mandatory (bad magic, unknown client flags,
    /// an oversized option or payload); the server initiated a hard disconnect.
    #[error("client violated the protocol: {0}")]
    Protocol(String),
    /// The client did not finish the handshake in time.
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    /// Writing replies made no progress for the configured time (the client stopped reading).
    #[error("writing replies made no progress for {0:?}")]
    ReplyTimeout(Duration),
    /// `NBD_OPT_EXPORT_NAME` named an export that could not be opened; that option has no
    /// way to report an error, so the connection is closed.
    #[error("export {name:?} could not be opened: {source}")]
    Open { name: String, source: EngineError },
}

impl Error {
    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::Protocol(message.into())
    }
}

/// Maps an engine error to the errno sent in a transmission reply. This is the only place the
/// mapping is made.
///
/// | engine error                                  | NBD error   |
/// |-----------------------------------------------|-------------|
/// | `ReadOnly`                                    | `EPERM`     |
/// | `OutOfRange`, `InvalidArgument`, `Ambiguous`  | `EINVAL`    |
/// | `NoSpace`; `Io` meaning full, quota or too big| `ENOSPC`    |
/// | `Closed` (the pool is shutting down)          | `ESHUTDOWN` |
/// | anything else (`NotFound` for a ref deleted under the session, `Corrupt`, `Poisoned`, `Io`, ...) | `EIO` |
///
/// The spec allows only a few errno values on the wire (there is no `ENOENT`), and clients
/// treat unknown ones as `EINVAL`, so anything without a closer match is `EIO`.
pub fn errno(error: &EngineError) -> u32 {
    match error {
        EngineError::ReadOnly(_) => NBD_EPERM,
        EngineError::OutOfRange { .. }
        | EngineError::InvalidArgument(_)
        | EngineError::Ambiguous { .. } => NBD_EINVAL,
        EngineError::NoSpace => NBD_ENOSPC,
        EngineError::Io(io_error)
            if matches!(
                io_error.kind(),
                io::ErrorKind::StorageFull
                    | io::ErrorKind::QuotaExceeded
                    | io::ErrorKind::FileTooLarge
            ) =>
        {
            NBD_ENOSPC
        }
        EngineError::Closed => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// Maps an engine error met while looking up or opening an export during the handshake
/// (`NBD_OPT_INFO`, `NBD_OPT_GO`, the metadata context options) to an option reply type.
/// The pool shutting down is `NBD_REP_ERR_SHUTDOWN`; everything else means the client cannot
/// have that export, `NBD_REP_ERR_UNKNOWN`, with the engine's message as the reply's text.
pub fn option_reply_error(error: &EngineError) -> u32 {
    match error {
        EngineError::Closed => NBD_REP_ERR_SHUTDOWN,
        _ => NBD_REP_ERR_UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_values_mapping() {
        assert_eq!(errno(&EngineError::ReadOnly("v@t".into())), NBD_EPERM);
        assert_eq!(
            errno(&EngineError::OutOfRange {
                offset_bytes: 1,
                len_bytes: 2,
                size_bytes: 1
            }),
            NBD_EINVAL
        );
        assert_eq!(errno(&EngineError::InvalidArgument("x".into())), NBD_EINVAL);
        assert_eq!(errno(&EngineError::NoSpace), NBD_ENOSPC);
        assert_eq!(
            errno(&EngineError::Io(io::Error::from(
                io::ErrorKind::StorageFull
            ))),
            NBD_ENOSPC
        );
        assert_eq!(
            errno(&EngineError::Io(io::Error::from(
                io::ErrorKind::QuotaExceeded
            ))),
            NBD_ENOSPC
        );
        assert_eq!(errno(&EngineError::Io(io::Error::other("disk"))), NBD_EIO);
        assert_eq!(
            errno(&EngineError::NotFound {
                what: "branch".into()
            }),
            NBD_EIO
        );
        assert_eq!(errno(&EngineError::Poisoned), NBD_EIO);
        assert_eq!(
            errno(&EngineError::Corrupt {
                what: "page".into(),
                at: "7".into()
            }),
            NBD_EIO
        );
        assert_eq!(errno(&EngineError::Closed), NBD_ESHUTDOWN);
    }

    #[test]
    fn option_reply_types_mapping() {
        assert_eq!(
            option_reply_error(&EngineError::NotFound {
                what: "volume".into()
            }),
            NBD_REP_ERR_UNKNOWN
        );
        assert_eq!(
            option_reply_error(&EngineError::Closed),
            NBD_REP_ERR_SHUTDOWN
        );
    }
}
