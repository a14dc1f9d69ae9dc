//! The library's error type: one enum, each variant naming what failed and what to do.

use crate::config::ConfigError;
use crate::entry::EntryError;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the scheduler library can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The schedule file is unreadable or malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// An entry definition was refused.
    #[error("invalid schedule entry: {0}")]
    InvalidEntry(#[from] EntryError),

    /// The runtime API named an entry that does not exist.
    #[error("no schedule entry named `{0}`")]
    NotFound(String),

    /// The state store (Redis) failed or could not be reached.
    #[error("scheduler store: {0}")]
    Store(String),

    /// Data in the store does not read back (written by something else, or a newer version).
    #[error("unreadable scheduler state: {0}")]
    Corrupt(String),

    /// Publishing a task or reading a result failed.
    #[error(transparent)]
    Task(#[from] task_core::Error),
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Store(e.to_string())
    }
}
