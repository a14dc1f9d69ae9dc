//! Periodic repair of what a crash, a lost message or an impatient customer leaves behind: attempts
//! whose gateway outcome is unknown, 3-D Secure challenges never answered, payments whose charge
//! task was lost (before the first call, or after the customer answered 3-D Secure), cryptograms
//! that were never used.

use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::charging::{self, Step};
use crate::context::Billing;
use crate::domain::{PaymentStatus, Transition};
use crate::error::Result;
use crate::ledger::{self, Actor, topic};

/// What a reconciliation run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReconcileReport {
    /// Unknown attempts whose outcome was found and recorded.
    pub resolved: u64,
    /// Unknown attempts still unresolved.
    pub unresolved: u64,
    /// 3-D Secure challenges expired.
    pub expired_3ds: u64,
    /// Payments whose charge task was enqueued again.
    pub requeued: u64,
}

/// Resolves stale `processing` attempts, expires unanswered 3-D Secure challenges and re-enqueues
/// payments whose charge task was lost. Returns payment ids to enqueue as `billing.charge_payment`.
pub async fn reconcile_payments(billing: &Billing) -> Result<(ReconcileReport, Vec<Uuid>)> {
    let now = billing.now();
    let policy = billing.policy();
    let mut report = ReconcileReport::default();

    let stale = sqlx::query_scalar!(
        "SELECT id FROM payment WHERE status = 'processing' AND sent_at <= $1 ORDER BY sent_at LIMIT 1000",
        now - policy.in_flight_horizon()
    )
    .fetch_all(billing.db())
    .await?;
    for id in stale {
        // One attempt's trouble must not stop the others.
        match charging::reconcile(billing, id).await {
            Ok(Step::Settled(_)) => report.resolved += 1,
            Ok(Step::RetryAfter(_)) => report.unresolved += 1,
            Err(e) => {
                report.unresolved += 1;
                tracing::error!(payment_id = %id, error = %e, "could not reconcile the attempt");
            }
        }
    }

    let challenges = sqlx::query_scalar!(
        "SELECT id FROM payment WHERE status = 'awaiting_3ds' AND pa_res IS NULL AND sent_at <= $1 LIMIT 1000",
        now - policy.three_ds_timeout
    )
    .fetch_all(billing.db())
    .await?;
    for id in challenges {
        match expire_attempt(
            billing,
            id,
            PaymentStatus::AwaitingThreeDs,
            "3-D Secure was not completed in time",
        )
        .await
        {
            Ok(true) => report.expired_3ds += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(payment_id = %id, error = %e, "could not expire the 3-D Secure challenge")
            }
        }
    }

    // Charges whose task was lost: primary payments never sent, and 3-D Secure answers the
    // customer gave that were never posted (an answered challenge is not expired: its charge
    // runs, and the gateway says whether the answer still holds).
    let lost = sqlx::query_scalar!(
        "SELECT id FROM payment
         WHERE (status = 'created' AND created_at <= $1 AND created_at > $2)
            OR (status = 'awaiting_3ds' AND pa_res IS NOT NULL AND updated_at <= $1)
         LIMIT 10000",
        now - chrono::Duration::minutes(1),
        now - policy.created_timeout
    )
    .fetch_all(billing.db())
    .await?;
    report.requeued = lost.len() as u64;
    Ok((report, lost))
}

/// Gives up on primary payments whose cryptogram was never used within the policy's time, wiping
/// the cryptogram. Returns how many.
pub async fn purge_cryptograms(billing: &Billing) -> Result<u64> {
    let stale = sqlx::query_scalar!(
        "SELECT id FROM payment WHERE status = 'created' AND created_at <= $1",
        billing.now() - billing.policy().created_timeout
    )
    .fetch_all(billing.db())
    .await?;
    let mut purged = 0;
    for id in stale {
        match expire_attempt(
            billing,
            id,
            PaymentStatus::Created,
            "not charged in time; the card data was discarded",
        )
        .await
        {
            Ok(true) => purged += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(payment_id = %id, error = %e, "could not expire the unused cryptogram")
            }
        }
    }
    Ok(purged)
}

/// Moves an attempt still in `from` to `expired`, wiping what it held, reopening its invoice.
async fn expire_attempt(
    billing: &Billing,
    payment_id: Uuid,
    from: PaymentStatus,
    reason: &str,
) -> Result<bool> {
    let now = billing.now();
    let mut tx = billing.db().begin().await?;
    let updated = sqlx::query!(
        r#"UPDATE payment p SET status = 'expired', cryptogram = NULL, pa_res = NULL, reason = $3, completed_at = $4, updated_at = $4
           FROM invoice i WHERE p.id = $1 AND p.status = $2 AND i.id = p.invoice_id
           RETURNING p.invoice_id, i.payer_id, i.status AS invoice_status"#,
        payment_id,
        from.as_str(),
        reason,
        now
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(u) = updated else { return Ok(false) };
    from.check(PaymentStatus::Expired, "payment")?;
    ledger::record_transition(
        &mut tx,
        "payment",
        payment_id,
        Some(from.as_str()),
        "expired",
        Actor::Worker,
        Some(reason),
        now,
    )
    .await?;
    if u.invoice_status == "paying" {
        sqlx::query!(
            "UPDATE invoice SET status = 'open', updated_at = $2 WHERE id = $1",
            u.invoice_id,
            now
        )
        .execute(&mut *tx)
        .await?;
        ledger::record_transition(
            &mut tx,
            "invoice",
            u.invoice_id,
            Some("paying"),
            "open",
            Actor::Worker,
            Some(reason),
            now,
        )
        .await?;
    }
    ledger::enqueue_outbox(
        &mut tx,
        topic::PAYMENT_FAILED,
        &format!("notify.payment_failed:{payment_id}"),
        json!({"user_id": u.payer_id, "payment_id": payment_id, "reason": reason}),
        now,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}
