//! Small ledger writes shared by every flow: the status history and the outbox. Both run inside
//! the caller's transaction, so a status change, its history row and the messages it causes commit
//! together or not at all.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::Result;

/// Who changed something: recorded with every status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor<'a> {
    /// The payer, through the API.
    User,
    /// A member of staff, through the back-office.
    Staff(&'a str),
    /// A billing task on a worker.
    Worker,
    /// A gateway notification.
    Webhook,
}

impl Actor<'_> {
    /// The stored form.
    pub fn label(&self) -> String {
        match self {
            Actor::User => "user".into(),
            Actor::Staff(id) => format!("staff:{id}"),
            Actor::Worker => "worker".into(),
            Actor::Webhook => "webhook".into(),
        }
    }
}

/// Records a status change.
#[allow(clippy::too_many_arguments)]
pub async fn record_transition(
    conn: &mut PgConnection,
    entity: &str,
    entity_id: Uuid,
    from: Option<&str>,
    to: &str,
    actor: Actor<'_>,
    reason: Option<&str>,
    at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, reason, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        entity,
        entity_id,
        from,
        to,
        actor.label(),
        reason,
        at
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Outbox topics: role changes for the auth service and notifications for the user.
pub mod topic {
    /// Grant the tariff's role until the end of the paid period.
    pub const AUTH_GRANT: &str = "auth.grant";
    /// Revoke the role.
    pub const AUTH_REVOKE: &str = "auth.revoke";
    /// A payment went through.
    pub const PAYMENT_SUCCEEDED: &str = "notify.payment_succeeded";
    /// A payment was declined (with what the card holder should do).
    pub const PAYMENT_FAILED: &str = "notify.payment_failed";
    /// The subscription ended.
    pub const SUBSCRIPTION_EXPIRED: &str = "notify.subscription_expired";
    /// A refund went through.
    pub const REFUND_SUCCEEDED: &str = "notify.refund_succeeded";
    /// Something accounting must look at (a double charge, a lost refund).
    pub const ACCOUNTING_ATTENTION: &str = "notify.accounting_attention";
}

/// Queues a message for delivery, once per `dedupe_key`.
pub async fn enqueue_outbox(
    conn: &mut PgConnection,
    topic: &str,
    dedupe_key: &str,
    payload: Value,
    now: DateTime<Utc>,
) -> Result<()> {
    sqlx::query!(
        "INSERT INTO outbox (id, topic, dedupe_key, payload, status, next_attempt_at, created_at)
         VALUES ($1, $2, $3, $4, 'pending', $5, $5)
         ON CONFLICT (dedupe_key) DO NOTHING",
        Uuid::now_v7(),
        topic,
        dedupe_key,
        payload,
        now
    )
    .execute(conn)
    .await?;
    Ok(())
}
