//! The library's error type.
//!
//! One enum for every failure the framework itself can report. Task failures are not errors of the
//! framework: they travel as [`crate::TaskError`] and end up as task states in the result backend.

use std::time::Duration;

/// Result alias used throughout `task-core`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong inside the framework.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A connection URL or setting is malformed; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The broker (RabbitMQ or the in-memory broker) failed or refused an operation.
    #[error("broker error: {0}")]
    Broker(String),

    /// A publish was not confirmed by the broker (nack, or returned as unroutable).
    #[error("publish to queue `{queue}` was not confirmed: {reason}")]
    NotConfirmed {
        /// Queue the message was meant for.
        queue: String,
        /// What the broker said.
        reason: String,
    },

    /// RabbitMQ, reachable and healthy, refused an operation with a channel error (403 access
    /// refused, 404 not found, 406 precondition failed: an oversize message, a bad property, a
    /// missing exchange). It is not retried: the same request would be refused again.
    #[error("RabbitMQ refused {what}: {code} {text}")]
    Refused {
        /// What was refused, naming its target (`the publish to queue `q``).
        what: String,
        /// The AMQP reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
    },

    /// The result backend (Redis or the in-memory backend) failed.
    #[error("result backend error: {0}")]
    Backend(String),

    /// A message could not be decoded or encoded.
    #[error("protocol error: {0}")]
    Protocol(#[from] crate::protocol::ProtocolError),

    /// A task's arguments or result did not (de)serialize.
    #[error("serialization error: {0}")]
    Serialization(String),

    /// The task finished without a value (FAILURE or REVOKED).
    #[error("task {task_id} ended in {state}: {exception}")]
    TaskFailed {
        /// The task id.
        task_id: String,
        /// FAILURE or REVOKED.
        state: crate::backend::TaskState,
        /// The stored exception.
        exception: crate::backend::ExceptionInfo,
    },

    /// Waiting for a task result took longer than allowed.
    #[error("timed out after {0:?} waiting for the task result")]
    Timeout(Duration),

    /// The component was shut down while the operation was in progress.
    #[error("shut down")]
    Shutdown,
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Broker(e.to_string())
    }
}

impl From<redis::RedisError> for Error {
    fn from(e: redis::RedisError) -> Self {
        Error::Backend(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::Serialization(e.to_string())
    }
}
