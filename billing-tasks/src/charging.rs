//! Exactly-once money movement.
//!
//! Task delivery is at least once, so the effects must be exactly once. The rules:
//! - **One row per gateway attempt.** A payment row's id is the `X-Request-ID` of its gateway call;
//!   the `InvoiceId` is the invoice's id, so `payments/find` shows the invoice's latest operation.
//! - **Claim before calling.** An attempt moves `created → processing` (recording `sent_at`) in a
//!   transaction that holds its row lock, *before* the call. A second worker delivered the same task
//!   finds it `processing` and waits out the lease instead of calling; the database allows at most
//!   one attempt in flight per invoice, so two workers can never charge one invoice at once.
//! - **Unknown outcomes are looked up, never guessed.** A timeout, a reset connection or a 5xx
//!   leaves the attempt `processing`. The next run replays a token charge with the same
//!   `X-Request-ID` while the gateway still remembers it (an hour), and otherwise asks
//!   `payments/find` by invoice; only when the gateway *answers* that it has no record of the
//!   attempt after a generous delay does the attempt fail, and only then may a new attempt be made.
//!   While the gateway gives no usable answer (5xx, timeouts, unparsable bodies) the attempt stays
//!   `processing`, blocking new attempts for its invoice, and accounting is alerted.
//! - **A cryptogram is used once.** It is taken out of the ledger in the same transaction that
//!   claims the attempt, and only ever lives in memory for that one call.
//! - **Settling is idempotent.** The worker, a webhook and the reconciler may all learn the outcome;
//!   [`settle`] applies it only while the attempt is unsettled, under the row lock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::cloudpayments::{
    self, ChargeOutcome, CryptogramCharge, DeclineClass, GatewayError, TokenCharge, TokenInitiator,
    Transaction,
};
use crate::context::Billing;
use crate::domain::{
    Dunning, InvoiceStatus, PaymentStatus, Period, SubscriptionStatus, Transition,
};
use crate::error::{BillingError, Result};
use crate::gateway_pause;
use crate::ledger::{self, Actor, topic};
use crate::money::{Currency, Money};
use crate::secret::Secret;
use crate::vault;

/// How long the gateway replays an `X-Request-ID` (an hour), with a margin.
const REPLAY_WINDOW: chrono::Duration = chrono::Duration::minutes(55);
/// Tries for a call the gateway certainly did not process (429, connection refused).
const SEND_TRIES: u32 = 3;

/// What a charge run achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The attempt reached this status (final, or `awaiting_3ds`).
    Settled(PaymentStatus),
    /// Someone else is on it, or the outcome is unknown: run again after this.
    RetryAfter(Duration),
}

/// What the gateway said about one attempt.
#[derive(Debug)]
pub enum Outcome {
    /// Money moved.
    Approved(Transaction),
    /// The bank said no.
    Declined(Transaction),
    /// The bank wants 3-D Secure.
    ThreeDs(cloudpayments::ThreeDsChallenge),
    /// The request certainly did nothing and never will (refused as invalid, or no record of it).
    NotProcessed(String),
    /// The gateway turned the call away for now (rate limit, unreachable): nothing was processed,
    /// and the same request may be sent again.
    Refused(String),
    /// It may or may not have been processed.
    Unknown(String),
    /// The gateway refused the call because of our setup (credentials, URL, a request it
    /// rejects): nothing was processed, and it says nothing about the card.
    OurFault(String),
}

impl From<std::result::Result<ChargeOutcome, GatewayError>> for Outcome {
    fn from(r: std::result::Result<ChargeOutcome, GatewayError>) -> Self {
        match r {
            Ok(ChargeOutcome::Approved(t)) => Outcome::Approved(t),
            Ok(ChargeOutcome::Declined(t)) => Outcome::Declined(t),
            Ok(ChargeOutcome::ThreeDs(c)) => Outcome::ThreeDs(c),
            Err(e) if e.outcome_unknown() => Outcome::Unknown(e.to_string()),
            Err(e) if e.is_our_fault() => Outcome::OurFault(e.to_string()),
            Err(e) if e.is_retryable() => Outcome::Refused(e.to_string()),
            Err(e) => Outcome::NotProcessed(e.to_string()),
        }
    }
}

/// An attempt as the charging code needs it.
struct Attempt {
    id: Uuid,
    invoice_id: Uuid,
    payer_id: Uuid,
    status: PaymentStatus,
    method: String,
    amount: Money,
    sent_at: Option<DateTime<Utc>>,
    gateway_transaction_id: Option<i64>,
    cryptogram: Option<String>,
    pa_res: Option<String>,
    ip_address: Option<String>,
    cardholder_name: Option<String>,
    token: Option<String>,
    email: Option<String>,
}

async fn lock_attempt(conn: &mut PgConnection, payment_id: Uuid) -> Result<Attempt> {
    let r = sqlx::query!(
        r#"SELECT p.id, p.invoice_id, i.payer_id, p.status, p.method, p.amount_minor, p.currency,
                  p.sent_at, p.gateway_transaction_id, p.cryptogram, p.pa_res, p.ip_address,
                  p.cardholder_name, pm.token AS "token?", py.email
           FROM payment p
           JOIN invoice i ON i.id = p.invoice_id
           JOIN payer py ON py.id = i.payer_id
           LEFT JOIN payment_method pm ON pm.id = p.payment_method_id AND pm.revoked_at IS NULL
           WHERE p.id = $1
           FOR UPDATE OF p"#,
        payment_id
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| BillingError::NotFound(format!("payment {payment_id}")))?;
    Ok(Attempt {
        id: r.id,
        invoice_id: r.invoice_id,
        payer_id: r.payer_id,
        status: PaymentStatus::parse(&r.status)?,
        method: r.method,
        amount: Money::new(r.amount_minor, Currency::new(&r.currency)?)?,
        sent_at: r.sent_at,
        gateway_transaction_id: r.gateway_transaction_id,
        cryptogram: r.cryptogram,
        pa_res: r.pa_res,
        ip_address: r.ip_address,
        cardholder_name: r.cardholder_name,
        token: r.token,
        email: r.email,
    })
}

/// What to send, taken out of the ledger when the attempt was claimed.
pub(crate) enum Call {
    Cryptogram(CryptogramCharge),
    Token(TokenCharge),
    Post3ds {
        transaction_id: i64,
        pa_res: Secret<String>,
    },
}

fn token_call(a: &Attempt) -> Result<Call> {
    let token = a
        .token
        .clone()
        .ok_or_else(|| BillingError::precondition("the subscription has no usable card token"))?;
    Ok(renewal_call(
        a.amount,
        token,
        a.payer_id,
        a.invoice_id,
        a.email.clone(),
    ))
}

/// A merchant-initiated, scheduled charge of a saved card for an invoice.
pub(crate) fn renewal_call(
    amount: Money,
    token: String,
    payer_id: Uuid,
    invoice_id: Uuid,
    email: Option<String>,
) -> Call {
    Call::Token(TokenCharge {
        amount,
        token: Secret::new(token),
        account_id: payer_id.to_string(),
        invoice_id: invoice_id.to_string(),
        description: Some("Online cinema subscription renewal".into()),
        email,
        ip_address: None,
        initiator: TokenInitiator::ScheduledMerchant,
    })
}

async fn call_gateway(billing: &Billing, payment_id: Uuid, call: &Call) -> Outcome {
    let request_id = payment_id.to_string();
    let payer = match call {
        Call::Cryptogram(c) => Some(c.account_id.as_str()),
        Call::Token(t) => Some(t.account_id.as_str()),
        Call::Post3ds { .. } => None,
    };
    // One charge per payer in flight, and the terminal's calls per second (gateway_flow.rs).
    let _permit = billing.flow().admit(payer).await;
    let mut tries = 0;
    loop {
        tries += 1;
        let result = match call {
            Call::Cryptogram(c) => billing.gateway().charge_cryptogram(c, &request_id).await,
            Call::Token(t) => billing.gateway().charge_token(t, &request_id).await,
            Call::Post3ds {
                transaction_id,
                pa_res,
            } => {
                billing
                    .gateway()
                    .post3ds(
                        *transaction_id,
                        pa_res.expose(),
                        &format!("{request_id}-3ds"),
                    )
                    .await
            }
        };
        match &result {
            Err(e) if e.is_retryable() && !e.outcome_unknown() && tries < SEND_TRIES => {
                tracing::warn!(payment_id = %payment_id, error = %e, "gateway refused the call for now; trying again");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(tries))).await;
            }
            _ => return Outcome::from(result),
        }
    }
}

/// Runs one payment attempt: claims it, calls the gateway once, records the outcome.
pub async fn charge_payment(billing: &Billing, payment_id: Uuid) -> Result<Step> {
    let now = billing.now();
    let mut tx = billing.db().begin().await?;
    let attempt = lock_attempt(&mut tx, payment_id).await?;
    let call = match attempt.status {
        PaymentStatus::Created => {
            let call = match attempt.method.as_str() {
                "cryptogram" => {
                    let opened = match attempt.cryptogram.as_deref() {
                        Some(sealed) => {
                            vault::open(billing, payment_id, vault::Field::Cryptogram, sealed)
                        }
                        None => Err(BillingError::precondition("no cryptogram to charge")),
                    };
                    let cryptogram = match opened {
                        Ok(c) => c,
                        Err(e) => {
                            drop(tx);
                            return settle(
                                billing,
                                payment_id,
                                Outcome::NotProcessed(e.to_string()),
                                Actor::Worker,
                            )
                            .await
                            .map(Step::Settled);
                        }
                    };
                    Call::Cryptogram(CryptogramCharge {
                        amount: attempt.amount,
                        ip_address: attempt
                            .ip_address
                            .as_deref()
                            .and_then(|ip| ip.parse().ok())
                            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
                        cryptogram,
                        name: attempt.cardholder_name.clone(),
                        invoice_id: attempt.invoice_id.to_string(),
                        account_id: attempt.payer_id.to_string(),
                        description: Some("Online cinema subscription".into()),
                        email: attempt.email.clone(),
                        save_card: true,
                    })
                }
                _ => match token_call(&attempt) {
                    Ok(call) => call,
                    Err(e) => {
                        drop(tx);
                        return settle(
                            billing,
                            payment_id,
                            Outcome::NotProcessed(e.to_string()),
                            Actor::Worker,
                        )
                        .await
                        .map(Step::Settled);
                    }
                },
            };
            claim(&mut tx, &attempt, now).await?;
            call
        }
        PaymentStatus::AwaitingThreeDs => {
            match (attempt.pa_res.as_deref(), attempt.gateway_transaction_id) {
                (Some(sealed), Some(transaction_id)) => {
                    match vault::open(billing, payment_id, vault::Field::PaRes, sealed) {
                        Ok(pa_res) => {
                            claim(&mut tx, &attempt, now).await?;
                            Call::Post3ds {
                                transaction_id,
                                pa_res,
                            }
                        }
                        Err(e) => {
                            drop(tx);
                            return settle(
                                billing,
                                payment_id,
                                Outcome::NotProcessed(e.to_string()),
                                Actor::Worker,
                            )
                            .await
                            .map(Step::Settled);
                        }
                    }
                }
                _ => return Ok(Step::Settled(attempt.status)),
            }
        }
        PaymentStatus::Processing => {
            let lease_ends = attempt.sent_at.unwrap_or(now) + billing.policy().in_flight_horizon();
            tx.commit().await?;
            if lease_ends > now {
                // Another run is (or was very recently) talking to the gateway about this attempt.
                return Ok(Step::RetryAfter(
                    (lease_ends - now).to_std().unwrap_or_default() + Duration::from_secs(1),
                ));
            }
            return reconcile(billing, payment_id).await;
        }
        done => return Ok(Step::Settled(done)),
    };
    tx.commit().await?;
    call_and_settle(billing, payment_id, call).await
}

/// Calls the gateway for a claimed attempt (once, plus immediate retries of calls it certainly
/// did not process) and records the outcome.
pub(crate) async fn call_and_settle(
    billing: &Billing,
    payment_id: Uuid,
    call: Call,
) -> Result<Step> {
    let outcome = call_gateway(billing, payment_id, &call).await;
    if let Outcome::Unknown(why) = &outcome {
        tracing::warn!(payment_id = %payment_id, why, "gateway outcome unknown; the attempt will be looked up");
        // Token charges are replayed with the same X-Request-ID once the gateway is certainly
        // done with this call.
        return Ok(Step::RetryAfter(
            billing
                .policy()
                .in_flight_horizon()
                .to_std()
                .unwrap_or_default(),
        ));
    }
    let outcome = match (outcome, &call) {
        // Nothing was processed and a token can be sent again: keep the attempt and retry.
        (Outcome::Refused(_), Call::Token(_)) => {
            return Ok(Step::RetryAfter(
                billing
                    .policy()
                    .processing_lease
                    .to_std()
                    .unwrap_or_default(),
            ));
        }
        // A cryptogram or 3-D Secure answer cannot be sent again: the customer pays again.
        (Outcome::Refused(why), _) => Outcome::NotProcessed(why),
        (outcome, _) => outcome,
    };
    settle(billing, payment_id, outcome, Actor::Worker)
        .await
        .map(Step::Settled)
}

/// Moves an attempt to `processing`, taking its cryptogram or 3-D Secure answer out of the ledger.
async fn claim(conn: &mut PgConnection, attempt: &Attempt, now: DateTime<Utc>) -> Result<()> {
    attempt.status.check(PaymentStatus::Processing, "payment")?;
    sqlx::query!(
        "WITH p AS (UPDATE payment SET status = 'processing', sent_at = $2, cryptogram = NULL, pa_res = NULL, updated_at = $2
                    WHERE id = $1 RETURNING invoice_id),
              inv AS (UPDATE invoice SET status = 'paying', updated_at = $2 FROM p
                      WHERE invoice.id = p.invoice_id AND invoice.status = 'open' RETURNING invoice.id)
         INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, at)
         SELECT 'invoice', id, 'open', 'paying', 'worker', $2 FROM inv",
        attempt.id,
        now
    )
    .execute(&mut *conn)
    .await?;
    ledger::record_transition(
        conn,
        "payment",
        attempt.id,
        Some(attempt.status.as_str()),
        "processing",
        Actor::Worker,
        None,
        now,
    )
    .await
}

/// Finds out what happened to an attempt whose outcome is unknown, and settles it when possible.
pub async fn reconcile(billing: &Billing, payment_id: Uuid) -> Result<Step> {
    let now = billing.now();
    // One lookup at a time: the task's own retries and the periodic reconciler may both get here,
    // and two concurrent replays of one X-Request-ID are not something to rely on the gateway for.
    // Nor is a replay that overlaps the original call: nothing asks before the gateway is
    // certainly done with the last call sent.
    let horizon = billing.policy().in_flight_horizon();
    let attempt = {
        let mut tx = billing.db().begin().await?;
        let attempt = lock_attempt(&mut tx, payment_id).await?;
        if attempt.status != PaymentStatus::Processing {
            return Ok(Step::Settled(attempt.status));
        }
        let quiet_from = attempt.sent_at.unwrap_or(now) + horizon;
        if quiet_from > now {
            return Ok(Step::RetryAfter(
                (quiet_from - now).to_std().unwrap_or_default() + Duration::from_secs(1),
            ));
        }
        let replays =
            attempt.method == "token" && now - attempt.sent_at.unwrap_or(now) < REPLAY_WINDOW;
        // A replay is a call of its own, in flight as long as the first; a lookup only a read.
        let lease = if replays {
            horizon
        } else {
            billing.policy().processing_lease
        };
        let busy_until = sqlx::query_scalar!(
            "SELECT lookup_until FROM payment WHERE id = $1 AND lookup_until > $2",
            payment_id,
            now
        )
        .fetch_optional(&mut *tx)
        .await?
        .flatten();
        if let Some(until) = busy_until {
            return Ok(Step::RetryAfter(
                (until - now).to_std().unwrap_or_default() + Duration::from_secs(1),
            ));
        }
        sqlx::query!(
            "UPDATE payment SET lookup_until = $2 WHERE id = $1",
            payment_id,
            now + lease
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        attempt
    };
    let sent_at = attempt.sent_at.unwrap_or(now);
    let give_up = billing.policy().unknown_give_up;
    // Looked at again twice per lease (four times while a replay is possible).
    let every = (billing.policy().processing_lease / 2)
        .to_std()
        .unwrap_or_default()
        .max(Duration::from_secs(1));
    let replayable = attempt.method == "token" && now - sent_at < REPLAY_WINDOW;
    let learnt = if replayable {
        replay(billing, &attempt).await
    } else {
        look_up(billing, &attempt).await?
    };
    match learnt {
        Learnt::Answer(outcome) => {
            match settle(billing, payment_id, *outcome, Actor::Worker).await? {
                // An answer that is not this attempt's (a mismatched approval): keep looking.
                PaymentStatus::Processing => Ok(Step::RetryAfter(every)),
                settled => Ok(Step::Settled(settled)),
            }
        }
        // The gateway answered, and has nothing final for the attempt after all this time (no
        // record of it, or a 3-D Secure challenge nobody answered): no money moved, and the
        // customer or the dunning ladder tries again.
        Learnt::Pending(why) if !replayable && now - sent_at >= give_up => {
            let why = format!(
                "unresolved after {} minutes: {why}",
                (now - sent_at).num_minutes()
            );
            settle(
                billing,
                payment_id,
                Outcome::NotProcessed(why),
                Actor::Worker,
            )
            .await
            .map(Step::Settled)
        }
        Learnt::Pending(why) => {
            tracing::info!(payment_id = %payment_id, why, "attempt still unresolved");
            Ok(Step::RetryAfter(if replayable {
                (every / 2).max(Duration::from_secs(1))
            } else {
                every
            }))
        }
        // No answer: the money may have moved, so the attempt stays `processing` (which blocks
        // any new attempt for the invoice) until the gateway answers; people are told once it
        // has been unresolved for long.
        Learnt::NoAnswer(why) => {
            if now - sent_at >= give_up {
                alert_unresolved(billing, &attempt, &why, now).await?;
            }
            tracing::warn!(payment_id = %payment_id, why, "no answer from the gateway about the attempt");
            Ok(Step::RetryAfter(every))
        }
    }
}

/// What a replay or a lookup learnt about an attempt.
enum Learnt {
    /// A final answer (or a certain "never processed"): settle it.
    Answer(Box<Outcome>),
    /// The gateway answered, but with nothing final about this attempt yet.
    Pending(String),
    /// The gateway gave no usable answer (5xx, timeout, unparsable, refused for now).
    NoAnswer(String),
}

/// Replays a token charge with its own `X-Request-ID`: the gateway answers with the first
/// call's result, or, if the first never arrived, this is the one call.
async fn replay(billing: &Billing, attempt: &Attempt) -> Learnt {
    let call = match token_call(attempt) {
        Ok(call) => call,
        Err(e) => return Learnt::Answer(Box::new(Outcome::NotProcessed(e.to_string()))),
    };
    match call_gateway(billing, attempt.id, &call).await {
        // A refusal of the replay says nothing about the first call.
        Outcome::Unknown(why) | Outcome::Refused(why) | Outcome::OurFault(why) => {
            Learnt::NoAnswer(why)
        }
        outcome => Learnt::Answer(Box::new(outcome)),
    }
}

/// Asks `payments/find` for the invoice's latest operation.
async fn look_up(billing: &Billing, attempt: &Attempt) -> Result<Learnt> {
    let earlier = sqlx::query_scalar!(
        r#"SELECT gateway_transaction_id AS "id!" FROM payment
           WHERE invoice_id = $1 AND id <> $2 AND gateway_transaction_id IS NOT NULL"#,
        attempt.invoice_id,
        attempt.id
    )
    .fetch_all(billing.db())
    .await?;
    Ok(
        match billing
            .gateway()
            .find(&attempt.invoice_id.to_string())
            .await
        {
            Ok(Some(t)) if is_this_attempt(&t, attempt, &earlier) => match outcome_of(t) {
                Outcome::Unknown(why) => Learnt::Pending(why),
                outcome => Learnt::Answer(Box::new(outcome)),
            },
            Ok(_) => Learnt::Pending("the gateway has no record of the attempt".into()),
            Err(e) => Learnt::NoAnswer(format!("payments/find: {e}")),
        },
    )
}

/// Tells accounting (once per attempt) that an attempt's outcome cannot be learnt from the gateway.
async fn alert_unresolved(
    billing: &Billing,
    attempt: &Attempt,
    why: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    tracing::error!(payment_id = %attempt.id, invoice_id = %attempt.invoice_id, why,
        "the gateway has not answered about this attempt for long; it stays processing");
    let mut conn = billing.db().acquire().await?;
    ledger::enqueue_outbox(
        &mut conn,
        topic::ACCOUNTING_ATTENTION,
        &format!("accounting:payment-unresolved:{}", attempt.id),
        json!({"payment_id": attempt.id, "invoice_id": attempt.invoice_id,
               "amount_minor": attempt.amount.minor, "currency": attempt.amount.currency.code(),
               "issue": format!("outcome unknown and the gateway does not answer: {why}; no new attempt is made until it does")}),
        now,
    )
    .await
}

/// Whether the invoice's latest gateway operation is this attempt: it is, unless it is one of the
/// invoice's earlier attempts (their transaction ids are in the ledger). Attempts of one invoice
/// never overlap, so anything newer than the earlier ones is this one.
fn is_this_attempt(t: &Transaction, a: &Attempt, earlier: &[i64]) -> bool {
    a.gateway_transaction_id == Some(t.transaction_id) || !earlier.contains(&t.transaction_id)
}

/// The outcome a gateway transaction record stands for.
pub fn outcome_of(t: Transaction) -> Outcome {
    use cloudpayments::TransactionStatus as S;
    match t.status {
        S::Completed | S::Authorized => Outcome::Approved(t),
        S::Declined | S::Cancelled => Outcome::Declined(t),
        // Still being authenticated, or a challenge nobody will answer: the reconciler decides
        // by how long it has been.
        S::AwaitingAuthentication => Outcome::Unknown(format!(
            "transaction {} awaits 3-D Secure",
            t.transaction_id
        )),
        _ => Outcome::Unknown(format!(
            "transaction {} in status {:?}",
            t.transaction_id, t.status
        )),
    }
}

/// An attempt with its invoice, subscription and tariff, as settling needs them, locked.
struct Locked {
    id: Uuid,
    status: PaymentStatus,
    method: String,
    amount_minor: i64,
    currency: String,
    invoice_id: Uuid,
    kind: String,
    invoice_status: InvoiceStatus,
    subscription_id: Uuid,
    payer_id: Uuid,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    attempt_count: i32,
    sub_status: SubscriptionStatus,
    current_period_end: Option<DateTime<Utc>>,
    role: String,
    period_unit: String,
    period_count: i32,
}

/// One read, locking the attempt, its invoice and its subscription together.
async fn lock_for_settle(conn: &mut PgConnection, payment_id: Uuid) -> Result<Locked> {
    let p = sqlx::query!(
        r#"SELECT p.status, p.method, p.attempt, p.amount_minor, p.currency, p.invoice_id,
                  i.kind, i.status AS invoice_status, i.subscription_id, i.payer_id,
                  i.period_start, i.period_end, i.attempt_count,
                  s.status AS sub_status, s.current_period_end, t.role, t.period_unit, t.period_count
           FROM payment p
           JOIN invoice i ON i.id = p.invoice_id
           JOIN subscription s ON s.id = i.subscription_id
           JOIN tariff t ON t.id = s.tariff_id
           WHERE p.id = $1
           FOR UPDATE OF p, i, s"#,
        payment_id
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| BillingError::NotFound(format!("payment {payment_id}")))?;
    Ok(Locked {
        id: payment_id,
        status: PaymentStatus::parse(&p.status)?,
        method: p.method,
        amount_minor: p.amount_minor,
        currency: p.currency,
        invoice_id: p.invoice_id,
        kind: p.kind,
        invoice_status: InvoiceStatus::parse(&p.invoice_status)?,
        subscription_id: p.subscription_id,
        payer_id: p.payer_id,
        period_start: p.period_start,
        period_end: p.period_end,
        attempt_count: p.attempt_count,
        sub_status: SubscriptionStatus::parse(&p.sub_status)?,
        current_period_end: p.current_period_end,
        role: p.role,
        period_unit: p.period_unit,
        period_count: p.period_count,
    })
}

/// Applies a gateway outcome to an attempt, its invoice and subscription, with history and outbox,
/// in one transaction. Does nothing if the attempt is already settled. Each outcome has its own
/// function below; this one only locks, dispatches and commits.
pub async fn settle(
    billing: &Billing,
    payment_id: Uuid,
    outcome: Outcome,
    actor: Actor<'_>,
) -> Result<PaymentStatus> {
    let now = billing.now();
    let mut tx = billing.db().begin().await?;
    let p = lock_for_settle(&mut tx, payment_id).await?;
    let mut pending = ledger::Pending::default();
    let settled = match outcome {
        Outcome::Unknown(_) => return Ok(p.status),
        Outcome::Approved(t) => match approval_mismatch(&p, &t) {
            Some(mismatch) => record_mismatch(&mut tx, &p, &t, &mismatch, now).await?,
            None => settle_approval(&mut tx, &p, t, &mut pending, now).await?,
        },
        Outcome::ThreeDs(c) if p.method == "cryptogram" => {
            settle_challenge(&mut tx, &p, c, &mut pending, now).await?
        }
        Outcome::OurFault(why) => {
            settle_our_fault(&mut tx, billing, &p, &why, &mut pending, now).await?
        }
        outcome => match Failure::of(outcome) {
            Some(f) => settle_failure(&mut tx, billing, &p, f, &mut pending, actor, now).await?,
            None => p.status,
        },
    };
    pending.write(&mut tx, actor, now).await?;
    tx.commit().await?;
    Ok(settled)
}

/// Why an approval is not the money this attempt asked for: another amount or currency, or
/// another payer's account (a payment made for our InvoiceId through the public widget, say).
fn approval_mismatch(p: &Locked, t: &Transaction) -> Option<String> {
    let mut issues = Vec::new();
    if t.amount.minor != p.amount_minor || t.amount.currency.code() != p.currency {
        issues.push(format!(
            "{} minor units of {} instead of {} of {}",
            t.amount.minor,
            t.amount.currency.code(),
            p.amount_minor,
            p.currency
        ));
    }
    if t.account_id.as_deref() != Some(p.payer_id.to_string().as_str()) {
        issues.push(format!(
            "account {:?} instead of the payer",
            t.account_id.as_deref().unwrap_or("(none)")
        ));
    }
    (!issues.is_empty()).then(|| issues.join("; "))
}

/// An approval that is not this attempt's money: nothing is activated and the attempt is left as
/// it is; accounting is told (the money is at the gateway and must be given back or explained).
async fn record_mismatch(
    conn: &mut PgConnection,
    p: &Locked,
    t: &Transaction,
    mismatch: &str,
    now: DateTime<Utc>,
) -> Result<PaymentStatus> {
    tracing::error!(payment_id = %p.id, transaction_id = t.transaction_id, mismatch, "approval does not match the attempt; nothing activated");
    ledger::enqueue_outbox(
        conn,
        topic::ACCOUNTING_ATTENTION,
        &format!("accounting:mismatch:{}", t.transaction_id),
        json!({"payment_id": p.id, "invoice_id": p.invoice_id, "transaction_id": t.transaction_id,
               "amount_minor": t.amount.minor, "currency": t.amount.currency.code(),
               "account_id": t.account_id,
               "issue": format!("approved payment that does not match the attempt ({mismatch}); nothing was activated")}),
        now,
    )
    .await?;
    Ok(p.status)
}

/// Money moved for this attempt: the payment succeeds and, unless the invoice or subscription
/// has moved on, pays the invoice and activates the subscription.
async fn settle_approval(
    conn: &mut PgConnection,
    p: &Locked,
    t: Transaction,
    pending: &mut ledger::Pending,
    now: DateTime<Utc>,
) -> Result<PaymentStatus> {
    if !p.status.allows(PaymentStatus::Succeeded) {
        if p.status != PaymentStatus::Succeeded {
            tracing::error!(payment_id = %p.id, status = %p.status, "approval for an attempt already settled as {}", p.status);
        }
        return Ok(p.status);
    }
    let method_id = match &t.token {
        Some(token) => save_card(conn, p.payer_id, token, &t, now).await?,
        None => None,
    };
    pending.transition("payment", p.id, Some(p.status.as_str()), "succeeded", None);
    let late = matches!(p.invoice_status, InvoiceStatus::Paid | InvoiceStatus::Void)
        || matches!(
            p.sub_status,
            SubscriptionStatus::Expired | SubscriptionStatus::Abandoned
        );
    if late {
        record_late_approval(conn, p, &t, method_id, now).await?;
    } else {
        record_success(conn, p, &t, method_id, pending, now).await?;
    }
    Ok(PaymentStatus::Succeeded)
}

/// Money moved for something no longer payable: record it, give it back, tell accounting.
async fn record_late_approval(
    conn: &mut PgConnection,
    p: &Locked,
    t: &Transaction,
    method_id: Option<Uuid>,
    now: DateTime<Utc>,
) -> Result<()> {
    tracing::error!(payment_id = %p.id, "late or duplicate payment; refunding it in full");
    sqlx::query!(
        "UPDATE payment SET status = 'succeeded', duplicate = true, gateway_transaction_id = $2, reason_code = 0,
                reason = $3, card_holder_message = $4, completed_at = $5, updated_at = $5,
                acs_url = NULL, pa_req = NULL, pa_res = NULL, payment_method_id = coalesce($6, payment_method_id)
         WHERE id = $1",
        p.id,
        t.transaction_id,
        t.reason.as_deref(),
        t.card_holder_message.as_deref(),
        now,
        method_id
    )
    .execute(&mut *conn)
    .await?;
    request_system_refund(conn, p.id, p.amount_minor, &p.currency, now).await
}

/// The invoice is paid: attempt, invoice and subscription move together, the role is granted for
/// the paid period and the user told.
async fn record_success(
    conn: &mut PgConnection,
    p: &Locked,
    t: &Transaction,
    method_id: Option<Uuid>,
    pending: &mut ledger::Pending,
    now: DateTime<Utc>,
) -> Result<()> {
    let period = Period::from_parts(&p.period_unit, p.period_count)?;
    let (start, end) = if p.kind == "initial" {
        (now, period.end_from(now))
    } else {
        (p.period_start, p.period_end)
    };
    p.invoice_status.check(InvoiceStatus::Paid, "invoice")?;
    if p.sub_status != SubscriptionStatus::Active {
        p.sub_status
            .check(SubscriptionStatus::Active, "subscription")?;
        pending.transition(
            "subscription",
            p.subscription_id,
            Some(p.sub_status.as_str()),
            "active",
            None,
        );
    }
    pending.transition(
        "invoice",
        p.invoice_id,
        Some(p.invoice_status.as_str()),
        "paid",
        None,
    );
    sqlx::query!(
        "WITH pay AS (
             UPDATE payment SET status = 'succeeded', gateway_transaction_id = $2, reason_code = 0,
                    reason = $3, card_holder_message = $4, completed_at = $5, updated_at = $5,
                    acs_url = NULL, pa_req = NULL, pa_res = NULL, payment_method_id = coalesce($6, payment_method_id)
             WHERE id = $1),
         inv AS (
             UPDATE invoice SET status = 'paid', paid_at = $5, period_start = $8, period_end = $9,
                    next_attempt_at = NULL, updated_at = $5
             WHERE id = $7)
         UPDATE subscription SET status = 'active', current_period_start = $8, current_period_end = $9,
                grace_until = NULL, payment_method_id = coalesce($6, payment_method_id), updated_at = $5
         WHERE id = $10",
        p.id,
        t.transaction_id,
        t.reason.as_deref(),
        t.card_holder_message.as_deref(),
        now,
        method_id,
        p.invoice_id,
        start,
        end,
        p.subscription_id
    )
    .execute(&mut *conn)
    .await?;
    pending.message(
        topic::AUTH_GRANT,
        format!("auth.grant:{}:{}", p.subscription_id, end.timestamp()),
        json!({"user_id": p.payer_id, "role": p.role, "until": end, "subscription_id": p.subscription_id}),
    );
    pending.message(
        topic::PAYMENT_SUCCEEDED,
        format!("notify.payment_succeeded:{}", p.id),
        json!({"user_id": p.payer_id, "payment_id": p.id, "amount_minor": p.amount_minor,
               "currency": p.currency, "paid_until": end}),
    );
    Ok(())
}

/// The bank wants 3-D Secure for a card payment: the challenge waits for the customer.
async fn settle_challenge(
    conn: &mut PgConnection,
    p: &Locked,
    c: cloudpayments::ThreeDsChallenge,
    pending: &mut ledger::Pending,
    now: DateTime<Utc>,
) -> Result<PaymentStatus> {
    p.status.check(PaymentStatus::AwaitingThreeDs, "payment")?;
    sqlx::query!(
        "UPDATE payment SET status = 'awaiting_3ds', gateway_transaction_id = $2, acs_url = $3, pa_req = $4, updated_at = $5
         WHERE id = $1",
        p.id,
        c.transaction_id,
        c.acs_url,
        c.pa_req,
        now
    )
    .execute(&mut *conn)
    .await?;
    pending.transition(
        "payment",
        p.id,
        Some(p.status.as_str()),
        "awaiting_3ds",
        None,
    );
    Ok(PaymentStatus::AwaitingThreeDs)
}

/// A decline (a 3-D Secure demand on a token charge counts as one: the customer must act), or
/// an attempt the gateway never processed.
struct Failure {
    to: PaymentStatus,
    transaction_id: Option<i64>,
    code: Option<i32>,
    reason: Option<String>,
    holder_message: Option<String>,
    class: DeclineClass,
}

impl Failure {
    /// The failure an outcome stands for; `None` for an approval or an unknown outcome.
    fn of(outcome: Outcome) -> Option<Failure> {
        Some(match outcome {
            Outcome::Declined(t) => Failure {
                to: PaymentStatus::Declined,
                transaction_id: Some(t.transaction_id),
                code: Some(t.reason_code.get()),
                class: t.reason_code.class(),
                reason: t.reason,
                holder_message: t.card_holder_message,
            },
            Outcome::ThreeDs(c) => Failure {
                to: PaymentStatus::Declined,
                transaction_id: Some(c.transaction_id),
                code: None,
                reason: Some("3-D Secure required for a recurring charge".to_owned()),
                holder_message: None,
                class: DeclineClass::NeedsCustomer,
            },
            Outcome::NotProcessed(why) | Outcome::Refused(why) => Failure {
                to: PaymentStatus::Failed,
                transaction_id: None,
                code: None,
                reason: Some(why),
                holder_message: None,
                class: DeclineClass::Other,
            },
            Outcome::Approved(_) | Outcome::Unknown(_) | Outcome::OurFault(_) => return None,
        })
    }
}

/// The gateway refused the call for a reason of ours: the attempt fails without counting as a
/// decline, the terminal is paused (and accounting alerted), and the invoice waits, open, for the
/// pause to lift; the subscription is left as it is.
async fn settle_our_fault(
    conn: &mut PgConnection,
    billing: &Billing,
    p: &Locked,
    why: &str,
    pending: &mut ledger::Pending,
    now: DateTime<Utc>,
) -> Result<PaymentStatus> {
    if !p.status.allows(PaymentStatus::Failed) {
        return Ok(p.status);
    }
    let reason = format!("not sent to the card: {why}");
    sqlx::query!(
        "UPDATE payment SET status = 'failed', reason = $2, completed_at = $3, updated_at = $3,
                cryptogram = NULL, pa_res = NULL
         WHERE id = $1",
        p.id,
        reason,
        now
    )
    .execute(&mut *conn)
    .await?;
    pending.transition(
        "payment",
        p.id,
        Some(p.status.as_str()),
        "failed",
        Some(&reason),
    );
    let next_probe = gateway_pause::record(conn, billing.gateway().public_id(), why, now).await?;
    if !matches!(
        p.invoice_status,
        InvoiceStatus::Open | InvoiceStatus::Paying
    ) {
        return Ok(PaymentStatus::Failed);
    }
    if p.invoice_status != InvoiceStatus::Open {
        pending.transition(
            "invoice",
            p.invoice_id,
            Some(p.invoice_status.as_str()),
            "open",
            Some(&reason),
        );
    }
    let next_attempt_at = (p.kind == "renewal").then_some(next_probe);
    sqlx::query!(
        "UPDATE invoice SET status = 'open', next_attempt_at = coalesce($2, next_attempt_at), updated_at = $3
         WHERE id = $1",
        p.invoice_id,
        next_attempt_at,
        now
    )
    .execute(&mut *conn)
    .await?;
    if p.kind == "initial" {
        // The customer is waiting for an answer; they may try again later.
        pending.message(
            topic::PAYMENT_FAILED,
            format!("notify.payment_failed:{}", p.id),
            json!({"user_id": p.payer_id, "payment_id": p.id,
                   "reason": "payments are temporarily unavailable", "reason_code": null}),
        );
    }
    Ok(PaymentStatus::Failed)
}

/// Records a failed attempt and moves its invoice (and a renewal's subscription) along the
/// dunning ladder.
async fn settle_failure(
    conn: &mut PgConnection,
    billing: &Billing,
    p: &Locked,
    f: Failure,
    pending: &mut ledger::Pending,
    actor: Actor<'_>,
    now: DateTime<Utc>,
) -> Result<PaymentStatus> {
    if !p.status.allows(f.to) {
        return Ok(p.status);
    }
    sqlx::query!(
        "UPDATE payment SET status = $2, gateway_transaction_id = coalesce($3, gateway_transaction_id),
                reason_code = $4, reason = $5, card_holder_message = $6, completed_at = $7, updated_at = $7,
                cryptogram = NULL, pa_res = NULL
         WHERE id = $1",
        p.id,
        f.to.as_str(),
        f.transaction_id,
        f.code,
        f.reason.as_deref(),
        f.holder_message.as_deref(),
        now
    )
    .execute(&mut *conn)
    .await?;
    pending.transition(
        "payment",
        p.id,
        Some(p.status.as_str()),
        f.to.as_str(),
        f.reason.as_deref(),
    );
    if !matches!(
        p.invoice_status,
        InvoiceStatus::Open | InvoiceStatus::Paying
    ) {
        // The invoice moved on while the attempt was out (voided when the subscription ended, or
        // paid): record the attempt's outcome and nothing else.
        return Ok(f.to);
    }
    // Dunning counts declines at the card, not calls that never reached it.
    let card_attempts = if f.to == PaymentStatus::Declined {
        p.attempt_count + 1
    } else {
        p.attempt_count
    };
    // The customer retries an initial payment with a new card entry, so it stays open; a renewal
    // fails for good once the dunning ladder gives up.
    let next = if p.kind == "renewal"
        && renewal_gives_up(
            billing,
            f.class,
            f.to,
            card_attempts,
            p.current_period_end,
            now,
        ) {
        Some(InvoiceStatus::Failed)
    } else {
        Some(InvoiceStatus::Open)
    };
    if let Some(next) = next.filter(|n| *n != p.invoice_status) {
        p.invoice_status.check(next, "invoice")?;
        pending.transition(
            "invoice",
            p.invoice_id,
            Some(p.invoice_status.as_str()),
            next.as_str(),
            f.reason.as_deref(),
        );
    }
    let next_attempt_at = match (p.kind.as_str(), next) {
        ("renewal", Some(InvoiceStatus::Open)) => Some(next_attempt(
            billing,
            f.class,
            f.to,
            card_attempts,
            p.current_period_end,
            now,
        )),
        _ => None,
    };
    sqlx::query!(
        "UPDATE invoice SET status = coalesce($2, status), attempt_count = $3, next_attempt_at = $4, updated_at = $5
         WHERE id = $1",
        p.invoice_id,
        next.map(|n| n.as_str()),
        card_attempts,
        next_attempt_at,
        now
    )
    .execute(&mut *conn)
    .await?;
    if p.kind == "renewal" {
        // After the invoice moved: an expiry voids only the subscription's *other* open invoices.
        after_renewal_failure(
            conn,
            billing,
            &p.subscription_id,
            p.sub_status,
            p.current_period_end,
            f.class,
            f.to,
            card_attempts,
            actor,
            now,
        )
        .await?;
    }
    pending.message(
        topic::PAYMENT_FAILED,
        format!("notify.payment_failed:{}", p.id),
        json!({"user_id": p.payer_id, "payment_id": p.id, "reason": f.reason, "reason_code": f.code,
               "card_holder_message": f.holder_message, "next_attempt_at": next_attempt_at}),
    );
    Ok(f.to)
}

fn next_attempt(
    billing: &Billing,
    class: DeclineClass,
    to: PaymentStatus,
    card_attempts: i32,
    period_end: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    if to == PaymentStatus::Failed {
        // Nothing reached the card: try again soon.
        return now + billing.policy().not_processed_retry;
    }
    let grace_until = period_end.unwrap_or(now) + billing.policy().grace;
    match billing
        .policy()
        .dunning(class, card_attempts.max(1) as u32, now, grace_until)
    {
        Dunning::RetryAt(t) => t,
        Dunning::GiveUp => now,
    }
}

/// After a renewal attempt failed (and its invoice was updated): the subscription's past-due or
/// expiry when due.
#[allow(clippy::too_many_arguments)]
async fn after_renewal_failure(
    conn: &mut PgConnection,
    billing: &Billing,
    subscription_id: &Uuid,
    sub_status: SubscriptionStatus,
    period_end: Option<DateTime<Utc>>,
    class: DeclineClass,
    to: PaymentStatus,
    card_attempts: i32,
    actor: Actor<'_>,
    now: DateTime<Utc>,
) -> Result<()> {
    let give_up = renewal_gives_up(billing, class, to, card_attempts, period_end, now);
    let period_end = period_end.unwrap_or(now);
    let grace_until = period_end + billing.policy().grace;
    let past_end = now >= period_end;
    match (sub_status, give_up, past_end) {
        (SubscriptionStatus::Active | SubscriptionStatus::PastDue, true, true) => {
            expire(
                conn,
                *subscription_id,
                sub_status,
                actor,
                "renewal failed",
                now,
            )
            .await?;
        }
        (SubscriptionStatus::Active, false, true) => {
            sqlx::query!(
                "UPDATE subscription SET status = 'past_due', grace_until = $2, updated_at = $3 WHERE id = $1",
                subscription_id,
                grace_until,
                now
            )
            .execute(&mut *conn)
            .await?;
            ledger::record_transition(
                conn,
                "subscription",
                *subscription_id,
                Some("active"),
                "past_due",
                actor,
                Some("renewal declined"),
                now,
            )
            .await?;
        }
        _ => {}
    }
    Ok(())
}

/// Whether the dunning ladder gives up on a renewal after this failure (only declines count).
fn renewal_gives_up(
    billing: &Billing,
    class: DeclineClass,
    to: PaymentStatus,
    card_attempts: i32,
    period_end: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> bool {
    let grace_until = period_end.unwrap_or(now) + billing.policy().grace;
    to == PaymentStatus::Declined
        && billing
            .policy()
            .dunning(class, card_attempts.max(1) as u32, now, grace_until)
            == Dunning::GiveUp
}

/// Ends a subscription: status `expired`, role revoked and the user told, through the outbox.
pub async fn expire(
    conn: &mut PgConnection,
    subscription_id: Uuid,
    from: SubscriptionStatus,
    actor: Actor<'_>,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    from.check(SubscriptionStatus::Expired, "subscription")?;
    let s = sqlx::query!(
        r#"UPDATE subscription s SET status = 'expired', grace_until = NULL, updated_at = $2
           FROM tariff t WHERE s.id = $1 AND t.id = s.tariff_id
           RETURNING s.payer_id, t.role"#,
        subscription_id,
        now
    )
    .fetch_one(&mut *conn)
    .await?;
    ledger::void_open_invoices(conn, subscription_id, actor, reason, now).await?;
    ledger::record_transition(
        conn,
        "subscription",
        subscription_id,
        Some(from.as_str()),
        "expired",
        actor,
        Some(reason),
        now,
    )
    .await?;
    ledger::enqueue_outbox(
        conn,
        topic::AUTH_REVOKE,
        &format!("auth.revoke:{subscription_id}"),
        json!({"user_id": s.payer_id, "role": s.role, "subscription_id": subscription_id, "reason": reason}),
        now,
    )
    .await?;
    ledger::enqueue_outbox(
        conn,
        topic::SUBSCRIPTION_EXPIRED,
        &format!("notify.subscription_expired:{subscription_id}"),
        json!({"user_id": s.payer_id, "subscription_id": subscription_id, "reason": reason}),
        now,
    )
    .await
}

/// The card mask as the ledger keeps it (`400000******3055`), from whatever the gateway sent;
/// `None` if it cannot be made into one.
fn clean_mask(card: &cloudpayments::CardInfo) -> Option<String> {
    let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
    let first = digits(card.first_six.as_deref()?);
    let last = digits(card.last_four.as_deref()?);
    (first.len() <= 6 && last.len() <= 4 && !(first.is_empty() && last.is_empty()))
        .then(|| format!("{first}******{last}"))
}

/// The expiry as `MM/YY`, from `MM/YY` or `MM/YYYY`; `None` otherwise.
fn clean_exp(card: &cloudpayments::CardInfo) -> Option<String> {
    let (mm, yy) = card.exp_date.as_deref()?.trim().split_once('/')?;
    let yy = match yy.len() {
        2 => yy,
        4 => &yy[2..],
        _ => return None,
    };
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    (mm.len() == 2 && all_digits(mm) && all_digits(yy)).then(|| format!("{mm}/{yy}"))
}

/// Saves the card the gateway tokenised. Display fields are cleaned, and dropped if the ledger
/// still refuses them; if even the bare token cannot be stored, the card is not saved (and
/// people are told) — the payment itself is recorded either way, so this never fails a settle
/// for a reason of the ledger's schema.
async fn save_card(
    conn: &mut PgConnection,
    payer_id: Uuid,
    token: &Secret<String>,
    t: &Transaction,
    now: DateTime<Utc>,
) -> Result<Option<Uuid>> {
    use sqlx::Acquire;
    let display = (
        clean_mask(&t.card),
        t.card.card_type.clone(),
        clean_exp(&t.card),
    );
    for (mask, card_type, exp) in [display, (None, None, None)] {
        // A savepoint: a refused row must not abort the settle's transaction.
        let mut sp = conn.begin().await?;
        let inserted = sqlx::query_scalar!(
            "INSERT INTO payment_method (id, payer_id, token, card_mask, card_type, card_exp, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (token) DO UPDATE SET revoked_at = NULL
             RETURNING id",
            Uuid::now_v7(),
            payer_id,
            token.expose(),
            mask,
            card_type,
            exp,
            now
        )
        .fetch_one(&mut *sp)
        .await;
        match inserted {
            Ok(id) => {
                sp.commit().await?;
                return Ok(Some(id));
            }
            Err(sqlx::Error::Database(e)) if e.code().is_some_and(|c| c.starts_with("23")) => {
                tracing::warn!(
                    transaction_id = t.transaction_id,
                    constraint = e.constraint(),
                    "the ledger refused the card's details; trying without them"
                );
                sp.rollback().await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    tracing::error!(
        transaction_id = t.transaction_id,
        "the card token could not be stored; the card is not saved"
    );
    ledger::enqueue_outbox(
        conn,
        topic::ACCOUNTING_ATTENTION,
        &format!("accounting:card-not-saved:{}", t.transaction_id),
        json!({"transaction_id": t.transaction_id, "payer_id": payer_id,
               "issue": "an approved payment's card token could not be stored; renewals need a new card entry"}),
        now,
    )
    .await?;
    Ok(None)
}

/// Queues a full refund of a payment that should not have happened (late or duplicate), and tells
/// accounting. The refund task does the gateway call.
async fn request_system_refund(
    conn: &mut PgConnection,
    payment_id: Uuid,
    amount_minor: i64,
    currency: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    let key = format!("system-refund:{payment_id}");
    sqlx::query!(
        "INSERT INTO refund (id, payment_id, amount_minor, currency, reason, requested_by, status, idempotency_key, created_at, updated_at)
         VALUES ($1, $2, $3, $4, 'payment for something no longer payable', 'system', 'requested', $5, $6, $6)
         ON CONFLICT (idempotency_key) DO NOTHING",
        Uuid::now_v7(),
        payment_id,
        amount_minor,
        currency,
        key,
        now
    )
    .execute(&mut *conn)
    .await?;
    ledger::enqueue_outbox(
        conn,
        topic::ACCOUNTING_ATTENTION,
        &format!("accounting:late-payment:{payment_id}"),
        json!({"payment_id": payment_id, "amount_minor": amount_minor, "currency": currency,
               "issue": "payment for an invoice that was already paid or a subscription that had ended; refund queued"}),
        now,
    )
    .await
}

/// Saves a card the gateway tokenised outside a payment (a card check's authorisation,
/// [`crate::card_check`]), with the same cleaning and fallbacks as a payment's card; `None` if
/// even the bare token could not be stored (accounting is told).
pub async fn save_tokenised_card(
    conn: &mut PgConnection,
    payer_id: Uuid,
    token: &Secret<String>,
    t: &Transaction,
    now: DateTime<Utc>,
) -> Result<Option<Uuid>> {
    save_card(conn, payer_id, token, t, now).await
}
