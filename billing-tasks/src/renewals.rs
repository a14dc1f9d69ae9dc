//! Recurring payments: renewal invoices, their charges with the dunning ladder, and the end of
//! subscriptions that were not renewed.
//!
//! A renewal invoice is created once per subscription and period (the database refuses a second),
//! so running [`create_renewal_invoices`] twice, or on two workers, creates nothing twice. Each
//! invoice is then charged by `billing.charge_invoice`, which makes at most one attempt at a time
//! (see [`crate::charging`]).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::charging::{self, Step};
use crate::context::Billing;
use crate::domain::{InvoiceStatus, Period, SubscriptionStatus, Transition};
use crate::error::{BillingError, Result};
use crate::gateway_pause;
use crate::ledger::{self, Actor};
use crate::money::{Currency, Money};

/// How long a freshly created renewal invoice waits for its charge task before the sweeper
/// (`billing.retry_due_invoices`) enqueues it again.
const SWEEP_AFTER: chrono::Duration = chrono::Duration::hours(1);

/// Creates the renewal invoices of active, auto-renewing subscriptions whose period ends within the
/// renewal lead time, and returns their ids (none for invoices that already existed).
pub async fn create_renewal_invoices(billing: &Billing) -> Result<Vec<Uuid>> {
    let now = billing.now();
    let due = sqlx::query!(
        r#"SELECT s.id, s.payer_id, s.current_period_end AS "period_end!", t.price_minor, t.currency,
                  t.period_unit, t.period_count
           FROM subscription s JOIN tariff t ON t.id = s.tariff_id
           WHERE s.status = 'active' AND s.auto_renew AND s.current_period_end <= $1
             AND NOT EXISTS (SELECT 1 FROM invoice i WHERE i.subscription_id = s.id AND i.period_start = s.current_period_end)"#,
        now + billing.policy().renewal_lead
    )
    .fetch_all(billing.db())
    .await?;
    let mut created = Vec::with_capacity(due.len());
    for chunk in due.chunks(5_000) {
        let mut ids = Vec::with_capacity(chunk.len());
        let (mut subs, mut payers, mut starts, mut ends, mut amounts, mut currencies) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for s in chunk {
            let period = Period::from_parts(&s.period_unit, s.period_count)?;
            ids.push(Uuid::now_v7());
            subs.push(s.id);
            payers.push(s.payer_id);
            starts.push(s.period_end);
            ends.push(period.end_from(s.period_end));
            amounts.push(s.price_minor);
            currencies.push(s.currency.clone());
        }
        let inserted = sqlx::query_scalar!(
            r#"INSERT INTO invoice (id, subscription_id, payer_id, kind, period_start, period_end, amount_minor,
                                   currency, status, next_attempt_at, created_at, updated_at)
               SELECT id, sub, payer, 'renewal', start, "end", amount, currency, 'open', $7, $8, $8
               FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[], $5::timestamptz[], $6::bigint[], $9::text[])
                    AS u(id, sub, payer, start, "end", amount, currency)
               ON CONFLICT (subscription_id, period_start) DO NOTHING
               RETURNING id"#,
            &ids,
            &subs,
            &payers,
            &starts,
            &ends,
            &amounts,
            now + SWEEP_AFTER,
            now,
            &currencies,
        )
        .fetch_all(billing.db())
        .await?;
        created.extend(inserted);
    }
    Ok(created)
}

/// Renewal invoices whose next attempt is due, for the sweeper to enqueue.
pub async fn due_invoices(billing: &Billing, limit: i64) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar!(
        "SELECT i.id FROM invoice i
         WHERE i.kind = 'renewal' AND i.status = 'open' AND i.next_attempt_at <= $1
           AND NOT EXISTS (SELECT 1 FROM payment p WHERE p.invoice_id = i.id AND p.status IN ('created', 'processing', 'awaiting_3ds'))
         ORDER BY i.next_attempt_at LIMIT $2",
        billing.now(),
        limit
    )
    .fetch_all(billing.db())
    .await?)
}

/// What a charge run did to an invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvoiceRun {
    /// Nothing to charge: the invoice is in this state.
    Finished(InvoiceStatus),
    /// The next attempt is not due yet.
    NotDue(DateTime<Utc>),
    /// An attempt ran (or is waited for).
    Attempt(Step),
}

/// Charges a renewal invoice: continues its attempt in flight, or starts the next one when due.
///
/// The new attempt is inserted only while the invoice is still `open`, and the database allows
/// one attempt in flight per invoice and one row per attempt number, so two runs of this task
/// cannot both start an attempt; the loser finds the winner's attempt and waits. The insert locks
/// the subscription row, so it is serialised with a cancel or an expiry (which lock it too): one
/// that commits first is seen, and one that comes later sees the attempt in flight.
pub async fn charge_invoice(billing: &Billing, invoice_id: Uuid) -> Result<InvoiceRun> {
    let now = billing.now();
    let inv = sqlx::query!(
        r#"SELECT i.status, i.kind, i.next_attempt_at, i.amount_minor, i.currency, i.subscription_id, i.payer_id,
                  s.status AS sub_status, s.auto_renew, s.payment_method_id, py.email,
                  (SELECT pm.token FROM payment_method pm WHERE pm.id = s.payment_method_id AND pm.revoked_at IS NULL) AS token,
                  (SELECT count(*) FROM payment p WHERE p.invoice_id = i.id) AS "attempts!",
                  (SELECT p.id FROM payment p WHERE p.invoice_id = i.id
                     AND p.status IN ('created', 'processing', 'awaiting_3ds')) AS in_flight
           FROM invoice i JOIN subscription s ON s.id = i.subscription_id JOIN payer py ON py.id = i.payer_id
           WHERE i.id = $1"#,
        invoice_id
    )
    .fetch_optional(billing.db())
    .await?
    .ok_or_else(|| BillingError::NotFound(format!("invoice {invoice_id}")))?;
    let status = InvoiceStatus::parse(&inv.status)?;
    if let Some(payment_id) = inv.in_flight {
        return charging::charge_payment(billing, payment_id)
            .await
            .map(InvoiceRun::Attempt);
    }
    if inv.kind != "renewal" || !matches!(status, InvoiceStatus::Open) {
        return Ok(InvoiceRun::Finished(status));
    }
    let sub_status = SubscriptionStatus::parse(&inv.sub_status)?;
    if !inv.auto_renew
        || !matches!(
            sub_status,
            SubscriptionStatus::Active | SubscriptionStatus::PastDue
        )
    {
        return close_invoice(
            billing,
            invoice_id,
            InvoiceStatus::Void,
            "subscription no longer renews",
        )
        .await;
    }
    if inv.attempts > 0
        && let Some(at) = inv.next_attempt_at.filter(|at| *at > now)
    {
        return Ok(InvoiceRun::NotDue(at));
    }
    let (Some(method_id), Some(token)) = (inv.payment_method_id, inv.token) else {
        return close_invoice(billing, invoice_id, InvoiceStatus::Failed, "no saved card").await;
    };
    if let Some(retry_at) = gateway_pause::hold(billing).await? {
        // The gateway refuses us for our own reasons: nobody is charged until it accepts us.
        return Ok(InvoiceRun::NotDue(retry_at));
    }
    // The attempt is created already claimed (`processing`, with `sent_at`), with its history row,
    // in one statement: nothing else can pick it up before this run calls the gateway. The invoice
    // stays `open` while its attempt is in flight (the attempt is the lock).
    let attempt = i32::try_from(inv.attempts).unwrap_or(i32::MAX - 1) + 1;
    let payment_id = Uuid::now_v7();
    let amount = Money::new(inv.amount_minor, Currency::new(&inv.currency)?)?;
    let inserted = sqlx::query!(
        "WITH live AS (
             SELECT s.id FROM subscription s JOIN invoice i ON i.subscription_id = s.id
             WHERE i.id = $2 AND i.status = 'open' AND s.auto_renew AND s.status IN ('active', 'past_due')
             FOR UPDATE OF s),
         p AS (
             INSERT INTO payment (id, invoice_id, attempt, method, status, amount_minor, currency, idempotency_key,
                                  payment_method_id, sent_at, created_at, updated_at)
             SELECT $1, $2, $3, 'token', 'processing', $4, $5, $6, $7, $8, $8, $8 FROM live
             RETURNING id)
         INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, at)
         SELECT 'payment', id, NULL, 'processing', 'worker', $8 FROM p",
        payment_id,
        invoice_id,
        attempt,
        inv.amount_minor,
        inv.currency,
        format!("renewal:{invoice_id}:{attempt}"),
        method_id,
        now
    )
    .execute(billing.db())
    .await;
    match inserted {
        Ok(r) if r.rows_affected() == 1 => {}
        // The invoice stopped being open since it was read.
        Ok(_) => return Ok(InvoiceRun::Finished(status)),
        // Another run started an attempt first; it is in flight.
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Ok(InvoiceRun::Attempt(Step::RetryAfter(
                std::time::Duration::from_secs(1),
            )));
        }
        Err(e) => return Err(e.into()),
    }
    let call = charging::renewal_call(amount, token, inv.payer_id, invoice_id, inv.email);
    charging::call_and_settle(billing, payment_id, call)
        .await
        .map(InvoiceRun::Attempt)
}

/// Ends an open renewal invoice without charging it (`void` or `failed`).
async fn close_invoice(
    billing: &Billing,
    invoice_id: Uuid,
    to: InvoiceStatus,
    reason: &str,
) -> Result<InvoiceRun> {
    InvoiceStatus::Open.check(to, "invoice")?;
    let now = billing.now();
    let mut tx = billing.db().begin().await?;
    let changed = sqlx::query!(
        "UPDATE invoice SET status = $2, next_attempt_at = NULL, updated_at = $3 WHERE id = $1 AND status = 'open'",
        invoice_id,
        to.as_str(),
        now
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if changed == 1 {
        ledger::record_transition(
            &mut tx,
            "invoice",
            invoice_id,
            Some("open"),
            to.as_str(),
            Actor::Worker,
            Some(reason),
            now,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(InvoiceRun::Finished(to))
}

/// What [`expire_subscriptions`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExpiryReport {
    /// Subscriptions that ended.
    pub expired: u64,
    /// Subscriptions that entered their grace period.
    pub past_due: u64,
    /// Pending subscriptions given up on.
    pub abandoned: u64,
}

/// Ends what is due to end: cancelled subscriptions at their period's end, renewals that failed,
/// grace periods that ran out; moves unpaid renewals into their grace period; gives up on
/// subscriptions whose first payment never completed.
pub async fn expire_subscriptions(billing: &Billing) -> Result<ExpiryReport> {
    let now = billing.now();
    let candidates = sqlx::query_scalar!(
        "SELECT id FROM subscription
         WHERE (status = 'active' AND current_period_end <= $1)
            OR (status = 'past_due' AND grace_until <= $1)
            OR (status = 'past_due' AND EXISTS (SELECT 1 FROM invoice i WHERE i.subscription_id = subscription.id
                                                 AND i.kind = 'renewal' AND i.status = 'failed'
                                                 AND i.period_start = subscription.current_period_end))
            OR (status = 'pending' AND created_at <= $2)",
        now,
        now - chrono::Duration::days(1)
    )
    .fetch_all(billing.db())
    .await?;
    let mut report = ExpiryReport::default();
    for id in candidates {
        // One subscription's trouble must not stop the others.
        if let Err(e) = expire_one(billing, id, now, &mut report).await {
            tracing::error!(subscription_id = %id, error = %e, "could not expire or move to past due");
        }
    }
    Ok(report)
}

/// Applies the expiry rules to one subscription, under its row lock.
async fn expire_one(
    billing: &Billing,
    id: Uuid,
    now: DateTime<Utc>,
    report: &mut ExpiryReport,
) -> Result<()> {
    let mut tx = billing.db().begin().await?;
    // The lock first, the rest in a later statement: a renewal attempt inserted (under this same
    // lock) just before it was granted is then seen as in flight, not missed by an older snapshot.
    sqlx::query!("SELECT id FROM subscription WHERE id = $1 FOR UPDATE", id)
        .fetch_one(&mut *tx)
        .await?;
    let s = sqlx::query!(
            r#"SELECT s.status, s.auto_renew, s.current_period_end, s.grace_until, s.created_at,
                      (SELECT i.status FROM invoice i WHERE i.subscription_id = s.id AND i.kind = 'renewal'
                         AND i.period_start = s.current_period_end) AS renewal_status,
                      EXISTS (SELECT 1 FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE i.subscription_id = s.id
                              AND p.status IN ('created', 'processing', 'awaiting_3ds')) AS "in_flight!"
               FROM subscription s WHERE s.id = $1"#,
            id
        )
        .fetch_one(&mut *tx)
        .await?;
    let status = SubscriptionStatus::parse(&s.status)?;
    if s.in_flight {
        // An attempt is out at the gateway: its outcome decides (the next run sees it).
        return Ok(());
    }
    let ended = s.current_period_end.is_some_and(|e| e <= now);
    let renewal = s.renewal_status.as_deref();
    if status == SubscriptionStatus::PastDue
        && renewal == Some("open")
        && gateway_pause::is_paused(billing).await?
    {
        // We cannot charge anyone right now (our fault, not the card's): no grace runs out.
        return Ok(());
    }
    match status {
        SubscriptionStatus::Active if ended && !s.auto_renew => {
            charging::expire(
                &mut tx,
                id,
                status,
                Actor::Worker,
                "cancelled; the paid period ended",
                now,
            )
            .await?;
            report.expired += 1;
        }
        SubscriptionStatus::Active
            if ended && matches!(renewal, None | Some("failed") | Some("void")) =>
        {
            charging::expire(&mut tx, id, status, Actor::Worker, "not renewed", now).await?;
            report.expired += 1;
        }
        SubscriptionStatus::Active if ended => {
            let grace_until = s.current_period_end.unwrap_or(now) + billing.policy().grace;
            sqlx::query!(
                    "UPDATE subscription SET status = 'past_due', grace_until = $2, updated_at = $3 WHERE id = $1",
                    id,
                    grace_until,
                    now
                )
                .execute(&mut *tx)
                .await?;
            ledger::record_transition(
                &mut tx,
                "subscription",
                id,
                Some("active"),
                "past_due",
                Actor::Worker,
                Some("renewal not paid at period end"),
                now,
            )
            .await?;
            report.past_due += 1;
        }
        SubscriptionStatus::PastDue
            if s.grace_until.is_some_and(|g| g <= now) || renewal == Some("failed") =>
        {
            charging::expire(
                &mut tx,
                id,
                status,
                Actor::Worker,
                "renewal failed; grace period over",
                now,
            )
            .await?;
            report.expired += 1;
        }
        SubscriptionStatus::Pending if s.created_at <= now - chrono::Duration::days(1) => {
            status.check(SubscriptionStatus::Abandoned, "subscription")?;
            sqlx::query!(
                "UPDATE subscription SET status = 'abandoned', updated_at = $2 WHERE id = $1",
                id,
                now
            )
            .execute(&mut *tx)
            .await?;
            ledger::void_open_invoices(
                &mut tx,
                id,
                Actor::Worker,
                "first payment never completed",
                now,
            )
            .await?;
            ledger::record_transition(
                &mut tx,
                "subscription",
                id,
                Some("pending"),
                "abandoned",
                Actor::Worker,
                Some("first payment never completed"),
                now,
            )
            .await?;
            report.abandoned += 1;
        }
        _ => {}
    }
    tx.commit().await?;
    Ok(())
}
