//! Delivering the outbox: role grants and revocations for the auth service, notifications for the
//! user, messages for accounting.
//!
//! Rows are claimed with `FOR UPDATE SKIP LOCKED` and a short lease (so several workers share the
//! work and a crashed one's rows come back), delivered outside any transaction, then marked
//! delivered or rescheduled with exponential back-off; after [`MAX_ATTEMPTS`] a row is `dead` and
//! waits for a person. A message carries its id, which the target uses to ignore a redelivery.
//!
//! Role messages (`auth.*`) are ordered per user: each carries `user_seq`, the next number of its
//! user's stream (assigned by the ledger in commit order, see migration 0003), and a user's message
//! is never sent while an earlier one of theirs is undelivered (a dead one stops the stream until a
//! person resolves it). A retried revoke of an old subscription therefore cannot land after the
//! grant of a new one; the target should still ignore a `user_seq` not above the last it applied
//! for that user.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::context::Billing;
use crate::error::{BillingError, Result};

/// Attempts before a message is given up as dead.
pub const MAX_ATTEMPTS: i32 = 25;
/// Longer than the worst batch (500 messages, 16 at a time, 10 s each), so a claimed message is
/// not claimed again while its first delivery is still under way.
const CLAIM_LEASE: chrono::Duration = chrono::Duration::minutes(15);

/// One outbox message.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxMessage {
    /// Id; the target deduplicates on it.
    pub id: Uuid,
    /// `auth.grant`, `auth.revoke`, `notify.*`.
    pub topic: String,
    /// Topic-specific content.
    pub payload: Value,
    /// When it was written.
    pub created_at: DateTime<Utc>,
    /// Earlier delivery attempts.
    pub attempts: i32,
    /// The message's place in its user's stream of role messages (`auth.*` only): increasing,
    /// possibly with gaps.
    pub user_seq: Option<i64>,
}

/// Where outbox messages go.
pub trait OutboxTarget: Send + Sync + 'static {
    /// Delivers one message; an error is retried later.
    fn deliver<'a>(
        &'a self,
        message: &'a OutboxMessage,
    ) -> BoxFuture<'a, std::result::Result<(), String>>;
}

/// Delivers by POSTing the message as JSON, with the message id as `Idempotency-Key`; any 2xx is
/// success.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    client: reqwest::Client,
    url: String,
}

impl HttpTarget {
    /// A target posting to `url`.
    pub fn new(url: &str) -> Result<Self> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(BillingError::invalid(format!(
                "OUTBOX_URL `{url}` must be an http(s) URL"
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| BillingError::Internal(format!("HTTP client: {e}")))?;
        Ok(HttpTarget {
            client,
            url: url.to_owned(),
        })
    }
}

impl OutboxTarget for HttpTarget {
    fn deliver<'a>(
        &'a self,
        message: &'a OutboxMessage,
    ) -> BoxFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move {
            let response = self
                .client
                .post(&self.url)
                .header("Idempotency-Key", message.id.to_string())
                .json(message)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(format!("{} answered {}", self.url, response.status()))
            }
        })
    }
}

/// What one delivery run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeliveryReport {
    /// Delivered now.
    pub delivered: u64,
    /// Failed and rescheduled.
    pub retrying: u64,
    /// Failed for the last time.
    pub dead: u64,
}

/// Back-off after failed attempt number `attempts` (from 1): 30 s, doubling, at most 6 hours.
fn backoff(attempts: i32) -> chrono::Duration {
    let secs = 30i64
        .saturating_mul(1i64 << (attempts - 1).clamp(0, 20))
        .min(6 * 3600);
    chrono::Duration::seconds(secs)
}

async fn deliver_one<'a>(
    target: &'a dyn OutboxTarget,
    m: &'a OutboxMessage,
) -> (&'a OutboxMessage, std::result::Result<(), String>) {
    (m, target.deliver(m).await)
}

/// Delivers up to `limit` due messages through `target`.
pub async fn deliver_due(
    billing: &Billing,
    target: &dyn OutboxTarget,
    limit: i64,
) -> Result<DeliveryReport> {
    let now = billing.now();
    let claimed = sqlx::query!(
        "UPDATE outbox SET next_attempt_at = $1
         WHERE id IN (SELECT o.id FROM outbox o WHERE o.status = 'pending' AND o.next_attempt_at <= $2
                        AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.user_id = o.user_id
                                        AND e.user_seq < o.user_seq AND e.status <> 'delivered')
                      ORDER BY o.created_at LIMIT $3 FOR UPDATE SKIP LOCKED)
         RETURNING id, topic, payload, created_at, attempts, user_seq",
        now + CLAIM_LEASE,
        now,
        limit
    )
    .fetch_all(billing.db())
    .await?;
    let messages: Vec<OutboxMessage> = claimed
        .into_iter()
        .map(|r| OutboxMessage {
            id: r.id,
            topic: r.topic,
            payload: r.payload,
            created_at: r.created_at,
            attempts: r.attempts,
            user_seq: r.user_seq,
        })
        .collect();
    let mut results = Vec::with_capacity(messages.len());
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    for m in &messages {
        in_flight.push(deliver_one(target, m));
        if in_flight.len() >= 16
            && let Some(done) = in_flight.next().await
        {
            results.push(done);
        }
    }
    while let Some(done) = in_flight.next().await {
        results.push(done);
    }
    let mut report = DeliveryReport::default();
    let now = billing.now();
    for (m, result) in results {
        match result {
            Ok(()) => {
                sqlx::query!(
                    "UPDATE outbox SET status = 'delivered', delivered_at = $2, attempts = attempts + 1, last_error = NULL WHERE id = $1",
                    m.id,
                    now
                )
                .execute(billing.db())
                .await?;
                report.delivered += 1;
            }
            Err(error) => {
                let attempts = m.attempts + 1;
                let dead = attempts >= MAX_ATTEMPTS;
                tracing::warn!(id = %m.id, topic = %m.topic, attempts, %error, dead, "outbox delivery failed");
                sqlx::query!(
                    "UPDATE outbox SET status = $2, attempts = $3, next_attempt_at = $4, last_error = $5 WHERE id = $1",
                    m.id,
                    if dead { "dead" } else { "pending" },
                    attempts,
                    now + backoff(attempts),
                    error
                )
                .execute(billing.db())
                .await?;
                if dead {
                    report.dead += 1
                } else {
                    report.retrying += 1
                }
            }
        }
    }
    Ok(report)
}
