//! The billing library's error: what went wrong, in terms a caller (the gRPC layer, a task, the
//! back-office) can act on. `InvalidArgument`, `NotFound` and `FailedPrecondition` are the caller's
//! to fix and leave the ledger unchanged; `Unavailable` is worth retrying.

/// Result alias for the billing library.
pub type Result<T, E = BillingError> = std::result::Result<T, E>;

/// A billing failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BillingError {
    /// Bad input: the message says which field and why.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The thing asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is valid but not in the current state (already subscribed, nothing to refund).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A dependency (database, gateway, broker) is unavailable; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an unexpected state; logged with details.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BillingError {
    /// A precondition failure.
    pub fn precondition(msg: impl Into<String>) -> Self {
        BillingError::FailedPrecondition(msg.into())
    }

    /// An invalid argument.
    pub fn invalid(msg: impl Into<String>) -> Self {
        BillingError::InvalidArgument(msg.into())
    }
}

impl From<sqlx::Error> for BillingError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                BillingError::Unavailable(format!("database: {e}"))
            }
            sqlx::Error::Database(db)
                if db.is_check_violation()
                    || db.is_unique_violation()
                    || db.is_foreign_key_violation() =>
            {
                // The database refused a write the code should not have attempted.
                BillingError::Internal(format!("ledger constraint refused a write: {db}"))
            }
            _ => BillingError::Internal(format!("database: {e}")),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for BillingError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        BillingError::Internal(format!("migrations: {e}"))
    }
}

impl From<crate::money::MoneyError> for BillingError {
    fn from(e: crate::money::MoneyError) -> Self {
        BillingError::InvalidArgument(e.to_string())
    }
}
