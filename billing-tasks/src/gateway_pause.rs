//! Pausing charges while the gateway refuses us for our own reasons.
//!
//! A 401 (a rotated API secret), a 404 (a wrong URL) or a request the gateway rejects says
//! nothing about the customer's card; counted as declines, a weekend with a wrong secret would walk
//! every renewal down the dunning ladder and expire paying subscribers. Instead the terminal is
//! paused: the attempt fails without counting, accounting is alerted once per pause, no renewal is
//! charged and no grace period runs out while the pause stands. Every [`PROBE_EVERY`] one run
//! calls the gateway's `/test` (which checks the credentials); when it gets through the pause is
//! lifted, past-due subscribers get a full grace period again, and the held renewals are charged.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;

use crate::context::Billing;
use crate::error::Result;
use crate::ledger::{self, topic};

/// How often a paused terminal is probed.
pub const PROBE_EVERY: chrono::Duration = chrono::Duration::minutes(10);

/// Records (or keeps) the pause of `public_id` and alerts once per pause. Returns when the next
/// probe is due.
pub(crate) async fn record(
    conn: &mut PgConnection,
    public_id: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>> {
    let p = sqlx::query!(
        "INSERT INTO gateway_pause (public_id, reason, since, next_probe_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (public_id) DO UPDATE SET reason = EXCLUDED.reason
         RETURNING since, next_probe_at",
        public_id,
        reason.chars().take(1000).collect::<String>(),
        now,
        now + PROBE_EVERY
    )
    .fetch_one(&mut *conn)
    .await?;
    tracing::error!(
        public_id,
        reason,
        "the gateway refuses our calls; charging is paused until it accepts them"
    );
    ledger::enqueue_outbox(
        conn,
        topic::ACCOUNTING_ATTENTION,
        &format!("ops:gateway-paused:{public_id}:{}", p.since.timestamp()),
        json!({"public_id": public_id, "since": p.since, "reason": reason,
               "issue": "the gateway refuses our calls (credentials or URL); charging is paused and no subscriber is expired until a probe gets through"}),
        now,
    )
    .await?;
    Ok(p.next_probe_at)
}

/// Whether the terminal is paused right now.
pub async fn is_paused(billing: &Billing) -> Result<bool> {
    Ok(sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM gateway_pause WHERE public_id = $1) AS "paused!""#,
        billing.gateway().public_id()
    )
    .fetch_one(billing.db())
    .await?)
}

/// Before a charge: `None` to go ahead, or when to try again. While paused, the one run that
/// finds the probe due calls `/test`; if it gets through, the pause is lifted and it goes ahead.
pub async fn hold(billing: &Billing) -> Result<Option<DateTime<Utc>>> {
    let public_id = billing.gateway().public_id();
    let now = billing.now();
    let probe = sqlx::query!(
        "UPDATE gateway_pause SET next_probe_at = $2 WHERE public_id = $1 AND next_probe_at <= $3
         RETURNING since",
        public_id,
        now + PROBE_EVERY,
        now
    )
    .fetch_optional(billing.db())
    .await?;
    let Some(probe) = probe else {
        return Ok(sqlx::query_scalar!(
            "SELECT next_probe_at FROM gateway_pause WHERE public_id = $1",
            public_id
        )
        .fetch_optional(billing.db())
        .await?);
    };
    match billing.gateway().test().await {
        Ok(_) => {
            lift(billing, public_id, probe.since, now).await?;
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(public_id, error = %e, "the gateway still refuses our calls; charging stays paused");
            Ok(Some(now + PROBE_EVERY))
        }
    }
}

async fn lift(
    billing: &Billing,
    public_id: &str,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<()> {
    let mut tx = billing.db().begin().await?;
    sqlx::query!("DELETE FROM gateway_pause WHERE public_id = $1", public_id)
        .execute(&mut *tx)
        .await?;
    // The pause was ours: nobody loses access because their grace ran out while we could not
    // charge them.
    sqlx::query!(
        "UPDATE subscription SET grace_until = $1, updated_at = $2
         WHERE status = 'past_due' AND grace_until < $1",
        now + billing.policy().grace,
        now
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(public_id, %since, "the gateway accepts our calls again; charging resumes");
    Ok(())
}
