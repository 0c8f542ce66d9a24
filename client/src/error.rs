//! Client errors, each with a stable code.

use concord_transport::api::ApiError;

/// What can go wrong with a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The cluster refused the request (see [`ApiError::code`]).
    #[error("{0}")]
    Api(#[from] ApiError),
    /// No node could be reached.
    #[error("cannot reach {addr}: {reason}")]
    Connect {
        /// The address tried last.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The request did not complete within the deadline; a write's outcome is unknown.
    #[error("request timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Every attempt failed; the last error is attached.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        last: Box<Error>,
    },
    /// A delete spanning ranges was applied in the ranges `done` (deleting `deleted` keys),
    /// then failed in `failed_range`; later ranges were not touched.
    #[error("delete applied in ranges {done:?} ({deleted} keys), then failed in range {failed_range}: {source}")]
    PartialDelete {
        /// Ranges where the delete was applied.
        done: Vec<u64>,
        /// Keys deleted there.
        deleted: u64,
        /// The range that failed.
        failed_range: u64,
        /// Its error.
        source: Box<Error>,
    },
    /// A recipe's key is gone: its session's lease expired or was revoked, or someone deleted
    /// the key (a lock or a leadership is lost).
    #[error("lost {key:?}: {reason}")]
    Lost {
        /// The recipe key.
        key: String,
        /// What happened.
        reason: String,
    },
    /// The configuration is unusable.
    #[error("config: {0}")]
    Config(String),
    /// The server sent something this client does not understand.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl Error {
    /// A stable code: the server's for [`Error::Api`], else one of `CONNECT`, `TIMEOUT`,
    /// `EXHAUSTED`, `PARTIAL_DELETE`, `LOST`, `CONFIG`, `PROTOCOL`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Api(e) => e.code(),
            Self::Connect { .. } => "CONNECT",
            Self::Timeout(_) => "TIMEOUT",
            Self::Exhausted { .. } => "EXHAUSTED",
            Self::PartialDelete { .. } => "PARTIAL_DELETE",
            Self::Lost { .. } => "LOST",
            Self::Config(_) => "CONFIG",
            Self::Protocol(_) => "PROTOCOL",
        }
    }
}

impl Error {
    /// Whether a write that failed with this error may nevertheless have been applied.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::Api(e) => matches!(e, ApiError::Indeterminate { .. }),
            Self::Timeout(_) | Self::Protocol(_) => true,
            Self::Exhausted { last, .. } => last.outcome_unknown(),
            _ => false,
        }
    }
}
