//! Refunds: full within the policy's window, pro-rata after it, never more than was paid.
//!
//! A refund row's id is the `X-Request-ID` of its gateway call, so a redelivered refund task
//! replays the call and the gateway answers with the first refund instead of making a second.

use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::context::Billing;
use crate::domain::{PaymentStatus, RefundStatus, SubscriptionStatus, Transition};
use crate::error::{BillingError, Result};
use crate::ledger::{self, Actor, topic};
use crate::money::{Currency, Money};

/// Who asked for a refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    /// The payer (only their own payments).
    User(Uuid),
    /// A member of staff, by id.
    Staff(String),
}

/// A refund request.
#[derive(Debug, Clone)]
pub struct RefundRequest {
    /// The payment to refund.
    pub payment_id: Uuid,
    /// Why (kept for accounting).
    pub reason: String,
    /// Who asks.
    pub requested_by: Requester,
    /// The caller's key: the same key returns the same refund.
    pub idempotency_key: String,
}

/// A refund as callers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefundView {
    /// Refund id.
    pub id: Uuid,
    /// The refunded payment.
    pub payment_id: Uuid,
    /// Amount.
    pub amount: Money,
    /// Status.
    pub status: RefundStatus,
    /// Why.
    pub reason: String,
}

fn view(
    id: Uuid,
    payment_id: Uuid,
    minor: i64,
    currency: &str,
    status: &str,
    reason: String,
) -> Result<RefundView> {
    Ok(RefundView {
        id,
        payment_id,
        amount: Money::new(minor, Currency::new(currency)?)?,
        status: RefundStatus::parse(status)?,
        reason,
    })
}

/// Records a refund request and returns it; the `billing.refund` task moves the money.
pub async fn request(billing: &Billing, req: &RefundRequest) -> Result<RefundView> {
    request_amount(billing, req, None, None).await
}

/// [`request`] for a chosen amount (staff: any amount up to what is left of the payment, less
/// what waits for approval in other requests than `approval`), or the policy's when `None`.
pub async fn request_amount(
    billing: &Billing,
    req: &RefundRequest,
    amount: Option<i64>,
    approval: Option<Uuid>,
) -> Result<RefundView> {
    let mut tx = billing.db().begin().await?;
    let view = request_in(&mut tx, billing, req, amount, approval).await?;
    tx.commit().await?;
    Ok(view)
}

/// [`request_amount`] inside the caller's transaction (the back-office writes its audit entry
/// in the same one).
pub async fn request_in(
    tx: &mut sqlx::PgConnection,
    billing: &Billing,
    req: &RefundRequest,
    amount: Option<i64>,
    approval: Option<Uuid>,
) -> Result<RefundView> {
    let reason = req.reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        return Err(BillingError::invalid("reason must be 1 to 500 characters"));
    }
    if req.idempotency_key.is_empty() || req.idempotency_key.len() > 200 {
        return Err(BillingError::invalid(
            "idempotency_key must be 1 to 200 characters",
        ));
    }
    let now = billing.now();
    let p = sqlx::query!(
        r#"SELECT p.status, p.amount_minor, p.currency, p.completed_at, i.payer_id, i.period_start, i.period_end
           FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE p.id = $1 FOR UPDATE OF p"#,
        req.payment_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| BillingError::NotFound(format!("payment {}", req.payment_id)))?;
    if let Requester::User(user) = &req.requested_by
        && *user != p.payer_id
    {
        return Err(BillingError::NotFound(format!(
            "payment {}",
            req.payment_id
        )));
    }
    if let Some(existing) = sqlx::query!(
        "SELECT id, payment_id, amount_minor, currency, status, reason FROM refund WHERE idempotency_key = $1",
        req.idempotency_key
    )
    .fetch_optional(&mut *tx)
    .await?
    {
        if existing.payment_id != req.payment_id {
            return Err(BillingError::invalid("idempotency_key was already used for another payment"));
        }
        return view(existing.id, existing.payment_id, existing.amount_minor, &existing.currency, &existing.status, existing.reason);
    }
    if PaymentStatus::parse(&p.status)? != PaymentStatus::Succeeded {
        return Err(BillingError::precondition(format!(
            "payment {} was not paid; nothing to refund",
            req.payment_id
        )));
    }
    let refunded = sqlx::query_scalar!(
        r#"SELECT coalesce(sum(amount_minor), 0)::bigint AS "sum!" FROM refund WHERE payment_id = $1 AND status <> 'failed'"#,
        req.payment_id
    )
    .fetch_one(&mut *tx)
    .await?;
    let paid_at = p.completed_at.unwrap_or(now);
    let due =
        billing
            .policy()
            .refund_amount(p.amount_minor, paid_at, p.period_start, p.period_end, now);
    // What is due is measured against the whole payment, so what was already paid back counts
    // against it: two pro-rata requests together never return more than one would.
    let amount = match amount {
        None => (due - refunded).min(p.amount_minor - refunded),
        Some(chosen) => {
            if chosen <= 0 {
                return Err(BillingError::invalid("the amount must be positive"));
            }
            let left = p.amount_minor
                - refunded
                - held_for_approval(&mut *tx, req.payment_id, approval).await?;
            if chosen > left {
                return Err(BillingError::precondition(format!(
                    "at most {} can be refunded from this payment",
                    Money::new(left.max(0), Currency::new(&p.currency)?)?
                )));
            }
            chosen
        }
    };
    if amount <= 0 {
        return Err(BillingError::precondition(
            "nothing left to refund for this payment",
        ));
    }
    let id = Uuid::now_v7();
    let requested_by = match &req.requested_by {
        Requester::User(_) => "user".to_owned(),
        Requester::Staff(s) => format!("staff:{s}"),
    };
    sqlx::query!(
        "INSERT INTO refund (id, payment_id, amount_minor, currency, reason, requested_by, status, idempotency_key, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'requested', $7, $8, $8)",
        id,
        req.payment_id,
        amount,
        p.currency,
        reason,
        requested_by,
        req.idempotency_key,
        now
    )
    .execute(&mut *tx)
    .await?;
    let actor = match &req.requested_by {
        Requester::User(_) => Actor::User,
        Requester::Staff(s) => Actor::Staff(s),
    };
    ledger::record_transition(
        &mut *tx,
        "refund",
        id,
        None,
        "requested",
        actor,
        Some(reason),
        now,
    )
    .await?;
    view(
        id,
        req.payment_id,
        amount,
        &p.currency,
        "requested",
        reason.to_owned(),
    )
}

/// What refund requests waiting for a second person's approval hold of a payment, besides
/// `except`. Read under the payment's row lock.
pub async fn held_for_approval(
    conn: &mut sqlx::PgConnection,
    payment_id: Uuid,
    except: Option<Uuid>,
) -> Result<i64> {
    Ok(sqlx::query_scalar::<_, i64>(
        "SELECT coalesce(sum(amount_minor), 0)::bigint FROM refund_approval
         WHERE payment_id = $1 AND status = 'pending' AND id IS DISTINCT FROM $2",
    )
    .bind(payment_id)
    .bind(except)
    .fetch_one(conn)
    .await?)
}

/// How long the gateway replays a request id (an hour), with a margin.
const REPLAY_WINDOW: chrono::Duration = chrono::Duration::minutes(55);

/// What a refund run achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundRun {
    /// Reached this status.
    Settled(RefundStatus),
    /// Try again after this.
    RetryAfter(Duration),
    /// Its outcome can be learnt neither by replaying nor from the gateway's records; accounting
    /// has been told.
    NeedsAttention,
}

/// Moves the money for a requested refund (or replays the call for one in progress).
pub async fn execute(billing: &Billing, refund_id: Uuid) -> Result<RefundRun> {
    let now = billing.now();
    // A refund call may still be processed at the gateway long after the client gave up; it is
    // replayed only once the gateway is certainly done with it.
    let lease = billing.policy().in_flight_horizon();
    let mut tx = billing.db().begin().await?;
    let r = sqlx::query!(
        r#"SELECT r.status, r.amount_minor, r.currency, r.updated_at, r.sent_at, p.gateway_transaction_id, r.payment_id
           FROM refund r JOIN payment p ON p.id = r.payment_id WHERE r.id = $1 FOR UPDATE OF r"#,
        refund_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| BillingError::NotFound(format!("refund {refund_id}")))?;
    let status = RefundStatus::parse(&r.status)?;
    match status {
        RefundStatus::Succeeded | RefundStatus::Failed => return Ok(RefundRun::Settled(status)),
        // Another run is calling the gateway for this refund right now (`updated_at` is its lease).
        RefundStatus::Processing if r.updated_at + lease > now => {
            return Ok(RefundRun::RetryAfter(
                (r.updated_at + lease - now).to_std().unwrap_or_default() + Duration::from_secs(1),
            ));
        }
        RefundStatus::Processing if r.sent_at.is_some_and(|t| now - t > REPLAY_WINDOW) => {
            // The gateway no longer replays our request id, so a blind retry could refund twice:
            // the refund is looked up instead, and stays `processing` (still counted against the
            // payment) until the gateway answers.
            drop(tx);
            return look_up(billing, refund_id).await;
        }
        RefundStatus::Requested | RefundStatus::Processing => {
            sqlx::query!(
                "UPDATE refund SET status = 'processing', sent_at = coalesce(sent_at, $2), updated_at = $2 WHERE id = $1",
                refund_id,
                now
            )
            .execute(&mut *tx)
            .await?;
            if status == RefundStatus::Requested {
                ledger::record_transition(
                    &mut tx,
                    "refund",
                    refund_id,
                    Some("requested"),
                    "processing",
                    Actor::Worker,
                    None,
                    now,
                )
                .await?;
            }
        }
    }
    tx.commit().await?;
    let txn = r.gateway_transaction_id.ok_or_else(|| {
        BillingError::Internal(format!(
            "refund {refund_id}: payment has no gateway transaction"
        ))
    })?;
    let amount = Money::new(r.amount_minor, Currency::new(&r.currency)?)?;
    match billing
        .gateway()
        .refund(txn, amount, &refund_id.to_string())
        .await
    {
        Ok(refund_txn) => settle(billing, refund_id, refund_txn, Actor::Worker)
            .await
            .map(RefundRun::Settled),
        Err(e) if e.outcome_unknown() || e.is_retryable() => {
            tracing::warn!(refund_id = %refund_id, error = %e, "refund outcome unknown; replaying later with the same request id");
            Ok(RefundRun::RetryAfter(Duration::from_secs(60)))
        }
        Err(e) => {
            fail(billing, refund_id, &e.to_string()).await?;
            Ok(RefundRun::Settled(RefundStatus::Failed))
        }
    }
}

/// Finds out at the gateway what became of a refund whose answer was lost, past the replay
/// window: the latest operation of the invoice (`v2/payments/find`) if it is this refund, else
/// the payment itself (`payments/get`), whose `Refunded` flag says whether any refund was made.
async fn look_up(billing: &Billing, refund_id: Uuid) -> Result<RefundRun> {
    let now = billing.now();
    let r = sqlx::query!(
        r#"SELECT r.amount_minor, r.currency, r.payment_id, p.invoice_id, p.gateway_transaction_id AS "payment_txn!"
           FROM refund r JOIN payment p ON p.id = r.payment_id WHERE r.id = $1"#,
        refund_id
    )
    .fetch_one(billing.db())
    .await?;
    let latest = match billing
        .gateway()
        .find_operation(&r.invoice_id.to_string())
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(refund_id = %refund_id, error = %e, "refund lookup failed; trying again later");
            return Ok(RefundRun::RetryAfter(Duration::from_secs(60)));
        }
    };
    if let Some(t) = latest.filter(|t| {
        t.original_transaction_id == Some(r.payment_txn)
            && t.amount.minor == r.amount_minor
            && t.amount.currency.code() == r.currency
    }) {
        let known = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM refund WHERE gateway_transaction_id = $1 AND id <> $2) AS "known!""#,
            t.transaction_id,
            refund_id
        )
        .fetch_one(billing.db())
        .await?;
        if !known {
            return settle(billing, refund_id, t.transaction_id, Actor::Worker)
                .await
                .map(RefundRun::Settled);
        }
    }
    match billing.gateway().get(r.payment_txn).await {
        Ok(Some(p)) if !p.refunded => {
            // No refund of this payment exists at the gateway: this one was never made.
            fail(
                billing,
                refund_id,
                "the gateway made no refund of this payment",
            )
            .await?;
            Ok(RefundRun::Settled(RefundStatus::Failed))
        }
        Ok(_) => {
            // Refunded, but the refund cannot be told apart from another one: a person decides.
            let mut conn = billing.db().acquire().await?;
            ledger::enqueue_outbox(
                &mut conn,
                topic::ACCOUNTING_ATTENTION,
                &format!("accounting:refund-unknown:{refund_id}"),
                json!({"refund_id": refund_id, "payment_id": r.payment_id, "amount_minor": r.amount_minor, "currency": r.currency,
                       "issue": "refund outcome unknown and the gateway's records do not tell which refund it is; check the gateway"}),
                now,
            )
            .await?;
            Ok(RefundRun::NeedsAttention)
        }
        Err(e) => {
            tracing::warn!(refund_id = %refund_id, error = %e, "refund lookup failed; trying again later");
            Ok(RefundRun::RetryAfter(Duration::from_secs(60)))
        }
    }
}

async fn fail(billing: &Billing, refund_id: Uuid, why: &str) -> Result<()> {
    let now = billing.now();
    let mut tx = billing.db().begin().await?;
    let updated = sqlx::query!(
        r#"WITH old AS (SELECT id, status FROM refund WHERE id = $1 AND status IN ('requested', 'processing') FOR UPDATE)
           UPDATE refund r SET status = 'failed', failure = $2, updated_at = $3 FROM old WHERE r.id = old.id
           RETURNING r.payment_id, r.amount_minor, r.currency, old.status AS "from_status!""#,
        refund_id,
        why,
        now
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(u) = updated {
        ledger::record_transition(
            &mut tx,
            "refund",
            refund_id,
            Some(u.from_status.as_str()),
            "failed",
            Actor::Worker,
            Some(why),
            now,
        )
        .await?;
        ledger::enqueue_outbox(
            &mut tx,
            topic::ACCOUNTING_ATTENTION,
            &format!("accounting:refund-failed:{refund_id}"),
            json!({"refund_id": refund_id, "payment_id": u.payment_id, "amount_minor": u.amount_minor, "currency": u.currency,
                   "issue": format!("refund failed: {why}")}),
            now,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Records a refund the gateway made (from the task or a Refund notification). Ends the
/// subscription the refunded payment paid for, and revokes its role.
pub async fn settle(
    billing: &Billing,
    refund_id: Uuid,
    gateway_transaction_id: i64,
    actor: Actor<'_>,
) -> Result<RefundStatus> {
    let now = billing.now();
    let mut tx = billing.db().begin().await?;
    let r = sqlx::query!(
        r#"SELECT r.status, r.amount_minor, r.currency, r.payment_id, p.duplicate, i.subscription_id, i.period_end, i.payer_id
           FROM refund r JOIN payment p ON p.id = r.payment_id JOIN invoice i ON i.id = p.invoice_id
           WHERE r.id = $1 FOR UPDATE OF r"#,
        refund_id
    )
    .fetch_one(&mut *tx)
    .await?;
    let status = RefundStatus::parse(&r.status)?;
    if !status.allows(RefundStatus::Succeeded) {
        return Ok(status);
    }
    sqlx::query!(
        "UPDATE refund SET status = 'succeeded', gateway_transaction_id = $2, updated_at = $3 WHERE id = $1",
        refund_id,
        gateway_transaction_id,
        now
    )
    .execute(&mut *tx)
    .await?;
    ledger::record_transition(
        &mut tx,
        "refund",
        refund_id,
        Some(status.as_str()),
        "succeeded",
        actor,
        None,
        now,
    )
    .await?;
    let sub = sqlx::query!(
        "SELECT status, current_period_end FROM subscription WHERE id = $1 FOR UPDATE",
        r.subscription_id
    )
    .fetch_one(&mut *tx)
    .await?;
    let sub_status = SubscriptionStatus::parse(&sub.status)?;
    // Refunding the payment for the current period ends the subscription now (not so for a
    // duplicate payment: the period stays paid by the other one).
    if !r.duplicate
        && matches!(
            sub_status,
            SubscriptionStatus::Active | SubscriptionStatus::PastDue
        )
        && sub.current_period_end == Some(r.period_end)
    {
        crate::charging::expire(
            &mut tx,
            r.subscription_id,
            sub_status,
            actor,
            "refunded",
            now,
        )
        .await?;
    }
    ledger::enqueue_outbox(
        &mut tx,
        topic::REFUND_SUCCEEDED,
        &format!("notify.refund_succeeded:{refund_id}"),
        json!({"user_id": r.payer_id, "refund_id": refund_id, "payment_id": r.payment_id,
               "amount_minor": r.amount_minor, "currency": r.currency}),
        now,
    )
    .await?;
    tx.commit().await?;
    Ok(RefundStatus::Succeeded)
}

/// Refunds that need a (new) run: requested ones whose task may have been lost, and processing ones.
pub async fn unsettled(billing: &Billing) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar!(
        "SELECT id FROM refund WHERE (status = 'requested' AND updated_at <= $1) OR (status = 'processing' AND updated_at <= $1)
         ORDER BY updated_at LIMIT 1000",
        billing.now() - chrono::Duration::minutes(1)
    )
    .fetch_all(billing.db())
    .await?)
}
