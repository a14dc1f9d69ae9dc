//! The monitor's error type.

/// What went wrong in the monitor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or malformed; the message names it.
    #[error("{0}")]
    Config(String),
    /// A service the monitor needs cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A request the API cannot answer as asked (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// What the request names does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The action does not apply to the object as it is (HTTP 409); the message says why.
    #[error("{0}")]
    Conflict(String),
    /// PostgreSQL.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The store's migrations.
    #[error("database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// RabbitMQ, through lapin.
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    /// The task queue (client, broker, result backend).
    #[error(transparent)]
    TaskQueue(#[from] task_core::Error),
    /// Binding or serving HTTP.
    #[error("http: {0}")]
    Io(#[from] std::io::Error),
}

/// The monitor's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
