//! The PostgreSQL pool and the embedded migrations, applied at start-up.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::error::{BillingError, Result};

/// The ledger's migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects to `url` and applies any pending migrations.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|e| {
            BillingError::Unavailable(format!(
                "cannot connect to DATABASE_URL {}: {e}",
                task_core::redact_url(url)
            ))
        })?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}
