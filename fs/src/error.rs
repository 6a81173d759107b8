//! Filesystem errors and their errno values.
//!
//! Every `Volume` operation fails with an `FsError`: either a POSIX condition detected by the
//! filesystem itself (carried as its errno), a backend failure, or a record that does not decode.
//! [`backend_errno`] is the one place where backend failures become errno values.

use crate::backend::BackendError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    /// A POSIX condition, e.g. `ENOENT`, `ENOTEMPTY`.
    #[error("errno {0}")]
    Posix(i32),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A record or index chunk that does not decode: stored by a newer or broken client.
    #[error("undecodable {what}: {detail}")]
    Decode { what: &'static str, detail: String },
    /// A volume in a format this build does not read; the text says which and what to do.
    #[error("{0}")]
    Format(String),
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    /// The errno to hand to the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Posix(e) => *e,
            FsError::Backend(b) => backend_errno(b),
            FsError::Decode { .. } | FsError::Format(_) => libc::EIO,
        }
    }
}

/// Maps a backend failure to errno. This is the only such mapping in the crate.
///
/// Unreachable quorum → `EIO`; timeout → `ETIMEDOUT`; full → `ENOSPC`; a chunk that a stored
/// inode references but the cluster cannot produce, or corrupt data → `EIO`; an oversized value
/// (the filesystem never produces one on purpose) → `EFBIG`.
pub fn backend_errno(e: &BackendError) -> i32 {
    match e {
        BackendError::Unavailable(_) => libc::EIO,
        BackendError::TimedOut => libc::ETIMEDOUT,
        BackendError::NoSpace => libc::ENOSPC,
        BackendError::NotFound => libc::EIO,
        BackendError::Corrupt(_) => libc::EIO,
        BackendError::TooLarge { .. } => libc::EFBIG,
    }
}

/// Shorthand for a POSIX error result.
pub(crate) fn err<T>(errno: i32) -> FsResult<T> {
    Err(FsError::Posix(errno))
}
