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

/// Voids a subscription's open invoices, recording each change; returns how many.
pub async fn void_open_invoices(
    conn: &mut PgConnection,
    subscription_id: Uuid,
    actor: Actor<'_>,
    reason: &str,
    at: DateTime<Utc>,
) -> Result<u64> {
    let r = sqlx::query!(
        "WITH v AS (
             UPDATE invoice SET status = 'void', next_attempt_at = NULL, updated_at = $2
             WHERE subscription_id = $1 AND status = 'open' RETURNING id)
         INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, reason, at)
         SELECT 'invoice', id, 'open', 'void', $3, $4, $2 FROM v",
        subscription_id,
        at,
        actor.label(),
        reason
    )
    .execute(conn)
    .await?;
    Ok(r.rows_affected())
}

/// Writes that belong to one ledger transaction, collected and then inserted with one statement
/// per table: a status change and the messages it causes commit together, in few round trips.
#[derive(Debug, Default)]
pub struct Pending {
    entities: Vec<&'static str>,
    ids: Vec<Uuid>,
    from: Vec<Option<String>>,
    to: Vec<String>,
    reasons: Vec<Option<String>>,
    topics: Vec<&'static str>,
    keys: Vec<String>,
    payloads: Vec<Value>,
}

impl Pending {
    /// Notes a status change.
    pub fn transition(
        &mut self,
        entity: &'static str,
        id: Uuid,
        from: Option<&str>,
        to: &str,
        reason: Option<&str>,
    ) {
        self.entities.push(entity);
        self.ids.push(id);
        self.from.push(from.map(str::to_owned));
        self.to.push(to.to_owned());
        self.reasons.push(reason.map(str::to_owned));
    }

    /// Notes an outbox message (once per `dedupe_key`).
    pub fn message(&mut self, topic: &'static str, dedupe_key: String, payload: Value) {
        self.topics.push(topic);
        self.keys.push(dedupe_key);
        self.payloads.push(payload);
    }

    /// Inserts everything noted, inside the caller's transaction, in one statement.
    pub async fn write(
        self,
        conn: &mut PgConnection,
        actor: Actor<'_>,
        at: DateTime<Utc>,
    ) -> Result<()> {
        if self.ids.is_empty() && self.keys.is_empty() {
            return Ok(());
        }
        let entities: Vec<String> = self.entities.iter().map(|e| (*e).to_owned()).collect();
        let outbox_ids: Vec<Uuid> = self.keys.iter().map(|_| Uuid::now_v7()).collect();
        let topics: Vec<String> = self.topics.iter().map(|t| (*t).to_owned()).collect();
        sqlx::query!(
            "WITH history AS (
                 INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, reason, at)
                 SELECT entity, id, from_status, to_status, $6, reason, $7
                 FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[]) AS u(entity, id, from_status, to_status, reason))
             INSERT INTO outbox (id, topic, dedupe_key, payload, status, next_attempt_at, created_at)
             SELECT id, topic, key, payload, 'pending', $7, $7
             FROM UNNEST($8::uuid[], $9::text[], $10::text[], $11::jsonb[]) AS u(id, topic, key, payload)
             ON CONFLICT (dedupe_key) DO NOTHING",
            &entities,
            &self.ids,
            &self.from as &[Option<String>],
            &self.to,
            &self.reasons as &[Option<String>],
            actor.label(),
            at,
            &outbox_ids,
            &topics,
            &self.keys,
            &self.payloads
        )
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
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
