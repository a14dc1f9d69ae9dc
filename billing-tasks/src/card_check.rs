//! A new card for a healthy subscription (`UpdatePaymentMethod` when no renewal is due).
//!
//! A cryptogram becomes a card token only through a gateway operation, and taking the
//! subscription's price now would charge for a period not yet due. So the card is proved the way
//! CloudPayments merchants bind cards: a two-stage authorisation of a small amount
//! (`payments/cards/auth`, [`CHECK_AMOUNT_MINOR`]) that returns the token, released at once with
//! `payments/void`. Migration 0008 holds the two state machines: the check (one gateway attempt,
//! named like a payment's statuses) and the hold its approval leaves (`held → released`).
//!
//! The rules are charging.rs's:
//! - **Claim before calling.** The check moves `created → processing` (recording `sent_at`, wiping
//!   the cryptogram) in the transaction holding its row lock, before the call; a second run finds
//!   it `processing` and waits out the lease.
//! - **Unknown outcomes are looked up, never guessed.** A check's id is its `InvoiceId`; after a
//!   timeout it stays `processing` and, once the gateway is certainly done with the call,
//!   `payments/find` says what happened. Only an answered "no record" after
//!   [`Policy::unknown_give_up`](crate::domain::Policy) fails it.
//! - **The card is adopted only on approval**, in the transaction that records it: the token is
//!   saved and becomes the subscription's payment method, and the hold is recorded `held`.
//! - **No money stays held.** A `held` hold is voided with its own `X-Request-ID`; whatever the
//!   void's answer (lost, refused, repeated), the hold is `released` only once `payments/get`
//!   or the void itself says the authorisation is cancelled. Voiding twice is harmless, so every
//!   run of the check's task, and the periodic reconciler, simply tries again until it is.
//! - **Settling is idempotent**: the worker and a webhook may both learn the outcome; it is
//!   applied only while the check is unsettled, under the row lock.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::charging::{self, Outcome, Step};
use crate::cloudpayments::{CryptogramCharge, Transaction, TransactionStatus};
use crate::context::Billing;
use crate::domain::{PaymentStatus, Transition};
use crate::error::{BillingError, Result};
use crate::ledger::{self, Actor, topic};
use crate::money::{Currency, Money};
use crate::secret::Secret;
use crate::vault;

/// The amount authorised to prove a card (1.00 in the subscription's currency), never captured.
pub const CHECK_AMOUNT_MINOR: i64 = 100;
/// Tries for a call the gateway certainly did not process (429, connection refused).
const SEND_TRIES: u32 = 3;
/// Pause before voiding again while the gateway still shows the authorisation.
const VOID_AGAIN: Duration = Duration::from_secs(30);

const ENTITY: &str = "card_check";
const HOLD: &str = "card_hold";

/// A check as the frontend follows it (mapped onto a payment view by the service).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardCheckView {
    /// Id.
    pub id: Uuid,
    /// The subscription the card is for.
    pub subscription_id: Uuid,
    /// Status (the payment statuses; `succeeded`: the card is the subscription's now).
    pub status: PaymentStatus,
    /// The amount authorised and released.
    pub amount: Money,
    /// Gateway reason code when declined.
    pub reason_code: Option<i32>,
    /// Why it failed, if it did.
    pub reason: Option<String>,
    /// What the bank says to the card holder.
    pub card_holder_message: Option<String>,
    /// `(acs_url, pa_req, transaction_id)` while 3-D Secure is awaited.
    pub challenge: Option<(String, String, i64)>,
    /// Whether the 3-D Secure answer was given and is being sent.
    pub answered: bool,
}

/// One of the payer's checks; `None` if there is none with this id (or it is another payer's).
pub async fn view(billing: &Billing, user_id: Uuid, id: Uuid) -> Result<Option<CardCheckView>> {
    let row = sqlx::query_as::<_, ViewRow>(
        "SELECT id, subscription_id, payer_id, status, amount_minor, currency, reason_code, reason,
                card_holder_message, acs_url, pa_req, gateway_transaction_id, pa_res IS NOT NULL AS answered
         FROM card_check WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(billing.db())
    .await?;
    row.filter(|r| r.payer_id == user_id)
        .map(ViewRow::view)
        .transpose()
}

/// The check made with this idempotency key, and its payer.
pub async fn by_idempotency_key(
    conn: &mut PgConnection,
    key: &str,
) -> Result<Option<(Uuid, Uuid)>> {
    Ok(sqlx::query_as::<_, (Uuid, Uuid)>(
        "SELECT id, payer_id FROM card_check WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_optional(conn)
    .await?)
}

#[derive(sqlx::FromRow)]
struct ViewRow {
    id: Uuid,
    subscription_id: Uuid,
    payer_id: Uuid,
    status: String,
    amount_minor: i64,
    currency: String,
    reason_code: Option<i32>,
    reason: Option<String>,
    card_holder_message: Option<String>,
    acs_url: Option<String>,
    pa_req: Option<String>,
    gateway_transaction_id: Option<i64>,
    answered: bool,
}

impl ViewRow {
    fn view(self) -> Result<CardCheckView> {
        let status = PaymentStatus::parse(&self.status)?;
        let challenge = match (
            status,
            self.acs_url,
            self.pa_req,
            self.gateway_transaction_id,
        ) {
            (PaymentStatus::AwaitingThreeDs, Some(a), Some(p), Some(t)) => Some((a, p, t)),
            _ => None,
        };
        Ok(CardCheckView {
            id: self.id,
            subscription_id: self.subscription_id,
            status,
            amount: Money::new(self.amount_minor, Currency::new(&self.currency)?)?,
            reason_code: self.reason_code,
            reason: self.reason,
            card_holder_message: self.card_holder_message,
            challenge,
            answered: self.answered,
        })
    }
}

/// What the service records for a new check.
#[derive(Debug)]
pub struct NewCheck<'a> {
    /// The subscription (locked by the caller).
    pub subscription_id: Uuid,
    /// The payer.
    pub payer_id: Uuid,
    /// The subscription's currency.
    pub currency: &'a str,
    /// The caller's key.
    pub idempotency_key: &'a str,
    /// The payer's IP address.
    pub ip_address: &'a str,
    /// Name on the card.
    pub cardholder_name: Option<&'a str>,
    /// The one-time cryptogram.
    pub cryptogram: &'a Secret<String>,
}

/// Records a check `created`, in the caller's transaction; the caller enqueues
/// [`crate::tasks::CheckCard`] after commit.
pub async fn create(
    conn: &mut PgConnection,
    billing: &Billing,
    new: NewCheck<'_>,
    now: DateTime<Utc>,
) -> Result<Uuid> {
    let id = Uuid::now_v7();
    let sealed = vault::seal(
        billing,
        id,
        vault::Field::Cryptogram,
        new.cryptogram.expose(),
    )?;
    // A challenge the payer never answered gives way to the new card.
    let abandoned = sqlx::query_scalar::<_, Uuid>(
        "UPDATE card_check SET status = 'expired', reason = 'replaced by a new card', completed_at = $2, updated_at = $2
         WHERE subscription_id = $1 AND status = 'awaiting_3ds' AND pa_res IS NULL RETURNING id",
    )
    .bind(new.subscription_id)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    for old in abandoned {
        ledger::record_transition(
            conn,
            ENTITY,
            old,
            Some("awaiting_3ds"),
            "expired",
            Actor::User,
            Some("replaced by a new card"),
            now,
        )
        .await?;
    }
    let busy = sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM card_check WHERE subscription_id = $1 AND status IN ('created', 'processing', 'awaiting_3ds'))",
    )
    .bind(new.subscription_id)
    .fetch_one(&mut *conn)
    .await?;
    if busy {
        return Err(BillingError::precondition(
            "a new card is already being checked; wait for it to finish",
        ));
    }
    sqlx::query(
        "INSERT INTO card_check (id, subscription_id, payer_id, status, amount_minor, currency, idempotency_key,
                                 ip_address, cardholder_name, cryptogram, created_at, updated_at)
         VALUES ($1, $2, $3, 'created', $4, $5, $6, $7, $8, $9, $10, $10)",
    )
    .bind(id)
    .bind(new.subscription_id)
    .bind(new.payer_id)
    .bind(CHECK_AMOUNT_MINOR)
    .bind(new.currency)
    .bind(new.idempotency_key)
    .bind(new.ip_address)
    .bind(new.cardholder_name)
    .bind(sealed)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    ledger::record_transition(
        conn,
        ENTITY,
        id,
        None,
        "created",
        Actor::User,
        Some("new card for the next renewal"),
        now,
    )
    .await?;
    Ok(id)
}

/// Stores the payer's 3-D Secure answer for a check awaiting it; the caller enqueues the task.
pub async fn answer_3ds(
    billing: &Billing,
    user_id: Uuid,
    id: Uuid,
    transaction_id: i64,
    pa_res: &Secret<String>,
) -> Result<()> {
    let now = billing.now();
    let mut tx = billing.db().begin().await?;
    let row = sqlx::query_as::<_, (String, Option<i64>, Uuid)>(
        "SELECT status, gateway_transaction_id, payer_id FROM card_check WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .filter(|r| r.2 == user_id)
    .ok_or_else(|| BillingError::NotFound(format!("payment {id}")))?;
    if PaymentStatus::parse(&row.0)? != PaymentStatus::AwaitingThreeDs {
        return Err(BillingError::precondition(format!(
            "payment {id} is not awaiting 3-D Secure"
        )));
    }
    if row.1 != Some(transaction_id) {
        return Err(BillingError::invalid(
            "transaction_id does not match the payment's 3-D Secure challenge",
        ));
    }
    let sealed = vault::seal(billing, id, vault::Field::PaRes, pa_res.expose())?;
    sqlx::query("UPDATE card_check SET pa_res = $2, updated_at = $3 WHERE id = $1")
        .bind(id)
        .bind(sealed)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

struct Locked {
    id: Uuid,
    status: PaymentStatus,
    subscription_id: Uuid,
    payer_id: Uuid,
    amount: Money,
    sent_at: Option<DateTime<Utc>>,
    gateway_transaction_id: Option<i64>,
    cryptogram: Option<String>,
    pa_res: Option<String>,
    ip_address: Option<String>,
    cardholder_name: Option<String>,
    email: Option<String>,
}

async fn lock(conn: &mut PgConnection, id: Uuid) -> Result<Locked> {
    let r = sqlx::query_as::<
        _,
        (
            String,
            Uuid,
            Uuid,
            i64,
            String,
            Option<DateTime<Utc>>,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        ),
    >(
        "SELECT c.status, c.subscription_id, c.payer_id, c.amount_minor, c.currency, c.sent_at,
                c.gateway_transaction_id, c.cryptogram, c.pa_res, c.ip_address, c.cardholder_name, py.email
         FROM card_check c JOIN payer py ON py.id = c.payer_id WHERE c.id = $1 FOR UPDATE OF c",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| BillingError::NotFound(format!("card check {id}")))?;
    Ok(Locked {
        id,
        status: PaymentStatus::parse(&r.0)?,
        subscription_id: r.1,
        payer_id: r.2,
        amount: Money::new(r.3, Currency::new(&r.4)?)?,
        sent_at: r.5,
        gateway_transaction_id: r.6,
        cryptogram: r.7,
        pa_res: r.8,
        ip_address: r.9,
        cardholder_name: r.10,
        email: r.11,
    })
}

enum Call {
    Auth(CryptogramCharge),
    Post3ds {
        transaction_id: i64,
        pa_res: Secret<String>,
    },
}

/// Runs a check to its next resting point: claims and calls the gateway once, or looks up an
/// unknown outcome, then releases any hold it left. `billing.check_card` runs this.
pub async fn run(billing: &Billing, id: Uuid) -> Result<Step> {
    let step = advance(billing, id).await?;
    // Whatever the check's state, a hold it left is released before the run is done.
    match release_hold(billing, id).await? {
        Some(wait) => Ok(Step::RetryAfter(wait)),
        None => Ok(step),
    }
}

async fn advance(billing: &Billing, id: Uuid) -> Result<Step> {
    let now = billing.now();
    let mut tx = billing.db().begin().await?;
    let c = lock(&mut tx, id).await?;
    let call = match c.status {
        PaymentStatus::Created => {
            let opened = match c.cryptogram.as_deref() {
                Some(sealed) => vault::open(billing, id, vault::Field::Cryptogram, sealed),
                None => Err(BillingError::precondition("no cryptogram to check")),
            };
            let cryptogram = match opened {
                Ok(c) => c,
                Err(e) => {
                    drop(tx);
                    return settle(
                        billing,
                        id,
                        Outcome::NotProcessed(e.to_string()),
                        Actor::Worker,
                    )
                    .await
                    .map(Step::Settled);
                }
            };
            claim(&mut tx, &c, now).await?;
            Call::Auth(CryptogramCharge {
                amount: c.amount,
                ip_address: c
                    .ip_address
                    .as_deref()
                    .and_then(|ip| ip.parse().ok())
                    .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
                cryptogram,
                name: c.cardholder_name.clone(),
                invoice_id: id.to_string(),
                account_id: c.payer_id.to_string(),
                description: Some(
                    "Online cinema: card check for the next renewal (released at once)".into(),
                ),
                email: c.email.clone(),
                save_card: true,
            })
        }
        PaymentStatus::AwaitingThreeDs => match (c.pa_res.as_deref(), c.gateway_transaction_id) {
            (Some(sealed), Some(transaction_id)) => {
                match vault::open(billing, id, vault::Field::PaRes, sealed) {
                    Ok(pa_res) => {
                        claim(&mut tx, &c, now).await?;
                        Call::Post3ds {
                            transaction_id,
                            pa_res,
                        }
                    }
                    Err(e) => {
                        drop(tx);
                        return settle(
                            billing,
                            id,
                            Outcome::NotProcessed(e.to_string()),
                            Actor::Worker,
                        )
                        .await
                        .map(Step::Settled);
                    }
                }
            }
            _ => return Ok(Step::Settled(c.status)),
        },
        PaymentStatus::Processing => {
            tx.commit().await?;
            return look_up(billing, &c).await;
        }
        done => return Ok(Step::Settled(done)),
    };
    tx.commit().await?;
    let outcome = call_gateway(billing, &c, &call).await;
    let outcome = match outcome {
        Outcome::Unknown(why) => {
            tracing::warn!(card_check_id = %id, why, "card check outcome unknown; it will be looked up");
            return Ok(Step::RetryAfter(horizon(billing)));
        }
        // A cryptogram or 3-D Secure answer cannot be sent again: the payer enters the card again.
        Outcome::Refused(why) => Outcome::NotProcessed(why),
        other => other,
    };
    settle(billing, id, outcome, Actor::Worker)
        .await
        .map(Step::Settled)
}

fn horizon(billing: &Billing) -> Duration {
    billing
        .policy()
        .in_flight_horizon()
        .to_std()
        .unwrap_or_default()
}

async fn claim(conn: &mut PgConnection, c: &Locked, now: DateTime<Utc>) -> Result<()> {
    c.status.check(PaymentStatus::Processing, "card check")?;
    sqlx::query(
        "UPDATE card_check SET status = 'processing', sent_at = $2, cryptogram = NULL, pa_res = NULL, updated_at = $2 WHERE id = $1",
    )
    .bind(c.id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    ledger::record_transition(
        conn,
        ENTITY,
        c.id,
        Some(c.status.as_str()),
        "processing",
        Actor::Worker,
        None,
        now,
    )
    .await
}

async fn call_gateway(billing: &Billing, c: &Locked, call: &Call) -> Outcome {
    let request_id = c.id.to_string();
    let payer = c.payer_id.to_string();
    // One gateway call per payer in flight, and the terminal's calls per second.
    let _permit = billing.flow().admit(Some(&payer)).await;
    let mut tries = 0;
    loop {
        tries += 1;
        let result = match call {
            Call::Auth(charge) => billing.gateway().auth_cryptogram(charge, &request_id).await,
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
                tracing::warn!(card_check_id = %c.id, error = %e, "gateway refused the call for now; trying again");
                tokio::time::sleep(Duration::from_millis(500 * u64::from(tries))).await;
            }
            _ => return Outcome::from(result),
        }
    }
}

/// Finds out what an unanswered check did: `payments/find` by its InvoiceId once the gateway is
/// certainly done with the call.
async fn look_up(billing: &Billing, c: &Locked) -> Result<Step> {
    let now = billing.now();
    let sent = c.sent_at.unwrap_or(now);
    let quiet_from = sent + billing.policy().in_flight_horizon();
    if quiet_from > now {
        return Ok(Step::RetryAfter(
            (quiet_from - now).to_std().unwrap_or_default() + Duration::from_secs(1),
        ));
    }
    let retry = Step::RetryAfter(
        billing
            .policy()
            .processing_lease
            .to_std()
            .unwrap_or_default(),
    );
    match billing.gateway().find(&c.id.to_string()).await {
        Ok(Some(t)) => match charging::outcome_of(t) {
            Outcome::Unknown(why) => {
                tracing::info!(card_check_id = %c.id, why, "card check still pending at the gateway");
                Ok(retry)
            }
            outcome => settle(billing, c.id, outcome, Actor::Worker)
                .await
                .map(Step::Settled),
        },
        Ok(None) if now >= sent + billing.policy().unknown_give_up => settle(
            billing,
            c.id,
            Outcome::NotProcessed("the gateway has no record of the card check".into()),
            Actor::Worker,
        )
        .await
        .map(Step::Settled),
        Ok(None) => Ok(retry),
        Err(e) => {
            tracing::warn!(card_check_id = %c.id, error = %e, "payments/find did not answer about a card check");
            Ok(retry)
        }
    }
}

/// Applies a gateway outcome to a check, once: only while it is `processing` (or awaiting 3-D
/// Secure, for a webhook), under its row lock. An approval saves the card, makes it the
/// subscription's payment method and records the hold, in one transaction.
pub async fn settle(
    billing: &Billing,
    id: Uuid,
    outcome: Outcome,
    actor: Actor<'_>,
) -> Result<PaymentStatus> {
    let now = billing.now();
    let mut tx = billing.db().begin().await?;
    let c = lock(&mut tx, id).await?;
    if !matches!(
        c.status,
        PaymentStatus::Created | PaymentStatus::Processing | PaymentStatus::AwaitingThreeDs
    ) {
        return Ok(c.status);
    }
    let (to, note) = match outcome {
        Outcome::Unknown(_) => return Ok(c.status),
        Outcome::Approved(t) if c.status != PaymentStatus::Created => {
            approve(&mut tx, &c, t, actor, now).await?
        }
        Outcome::ThreeDs(ch) if c.status == PaymentStatus::Processing => {
            sqlx::query(
                "UPDATE card_check SET status = 'awaiting_3ds', gateway_transaction_id = $2, acs_url = $3, pa_req = $4, updated_at = $5 WHERE id = $1",
            )
            .bind(id)
            .bind(ch.transaction_id)
            .bind(&ch.acs_url)
            .bind(&ch.pa_req)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            (PaymentStatus::AwaitingThreeDs, None)
        }
        Outcome::Declined(t) if c.status != PaymentStatus::Created => {
            // A declined (or cancelled) authorisation holds nothing.
            sqlx::query(
                "UPDATE card_check SET status = 'declined', gateway_transaction_id = $2, reason_code = $3, reason = $4,
                        card_holder_message = $5, acs_url = NULL, pa_req = NULL, pa_res = NULL, completed_at = $6, updated_at = $6
                 WHERE id = $1",
            )
            .bind(id)
            .bind(t.transaction_id)
            .bind(t.reason_code.0)
            .bind(t.reason.as_deref())
            .bind(t.card_holder_message.as_deref())
            .bind(now)
            .execute(&mut *tx)
            .await?;
            (PaymentStatus::Declined, t.reason.clone())
        }
        Outcome::NotProcessed(why) | Outcome::OurFault(why) | Outcome::Refused(why) => {
            let to = if c.status == PaymentStatus::AwaitingThreeDs {
                PaymentStatus::Expired
            } else {
                PaymentStatus::Failed
            };
            sqlx::query(
                "UPDATE card_check SET status = $2, reason = $3, cryptogram = NULL, pa_res = NULL, completed_at = $4, updated_at = $4 WHERE id = $1",
            )
            .bind(id)
            .bind(to.as_str())
            .bind(&why)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            (to, Some(why))
        }
        // Nothing this state can take (an approval of a check never sent, say): leave it.
        _ => return Ok(c.status),
    };
    c.status.check(to, "card check")?;
    ledger::record_transition(
        &mut tx,
        ENTITY,
        id,
        Some(c.status.as_str()),
        to.as_str(),
        actor,
        note.as_deref(),
        now,
    )
    .await?;
    tx.commit().await?;
    tracing::info!(card_check_id = %id, status = %to, "card check settled");
    Ok(to)
}

/// The authorisation was approved: record the hold (to be voided), and adopt the card if it is
/// the money and payer asked for and the gateway tokenised it.
async fn approve(
    conn: &mut PgConnection,
    c: &Locked,
    t: Transaction,
    actor: Actor<'_>,
    now: DateTime<Utc>,
) -> Result<(PaymentStatus, Option<String>)> {
    sqlx::query(
        "INSERT INTO card_hold (id, gateway_transaction_id, amount_minor, currency, status, created_at, updated_at)
         VALUES ($1, $2, $3, $4, 'held', $5, $5) ON CONFLICT (id) DO NOTHING",
    )
    .bind(c.id)
    .bind(t.transaction_id)
    .bind(t.amount.minor)
    .bind(t.amount.currency.code())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    ledger::record_transition(
        conn,
        HOLD,
        c.id,
        None,
        "held",
        actor,
        Some("card check authorised; to be voided"),
        now,
    )
    .await?;
    let mismatch =
        t.amount != c.amount || t.account_id.as_deref() != Some(c.payer_id.to_string().as_str());
    let method = match (&t.token, mismatch) {
        (Some(token), false) => {
            charging::save_tokenised_card(conn, c.payer_id, token, &t, now).await?
        }
        _ => None,
    };
    let Some(method) = method else {
        let why = if mismatch {
            "the gateway approved another amount or payer than the card check asked for"
        } else {
            "the gateway issued no card token for the card"
        };
        ledger::enqueue_outbox(
            conn,
            topic::ACCOUNTING_ATTENTION,
            &format!("accounting:card-check-not-adopted:{}", c.id),
            json!({"card_check_id": c.id, "transaction_id": t.transaction_id, "payer_id": c.payer_id,
                   "issue": why}),
            now,
        )
        .await?;
        sqlx::query(
            "UPDATE card_check SET status = 'failed', gateway_transaction_id = $2, reason = $3, acs_url = NULL, pa_req = NULL,
                    pa_res = NULL, completed_at = $4, updated_at = $4 WHERE id = $1",
        )
        .bind(c.id)
        .bind(t.transaction_id)
        .bind(why)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        return Ok((PaymentStatus::Failed, Some(why.to_owned())));
    };
    sqlx::query(
        "UPDATE card_check SET status = 'succeeded', gateway_transaction_id = $2, payment_method_id = $3, reason_code = 0,
                acs_url = NULL, pa_req = NULL, pa_res = NULL, completed_at = $4, updated_at = $4 WHERE id = $1",
    )
    .bind(c.id)
    .bind(t.transaction_id)
    .bind(method)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    // The new card renews the subscription from now on, if it is still live.
    let sub = sqlx::query_scalar::<_, String>(
        "UPDATE subscription SET payment_method_id = $2, updated_at = $3
         WHERE id = $1 AND status IN ('active', 'past_due') RETURNING status",
    )
    .bind(c.subscription_id)
    .bind(method)
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(status) = sub {
        ledger::record_transition(
            conn,
            "subscription",
            c.subscription_id,
            Some(&status),
            &status,
            actor,
            Some(&format!("payment method replaced by card check {}", c.id)),
            now,
        )
        .await?;
    }
    Ok((PaymentStatus::Succeeded, None))
}

/// Voids a check's hold if it is still `held`. `None` when nothing is held (any more); otherwise
/// how long to wait before trying again.
pub async fn release_hold(billing: &Billing, id: Uuid) -> Result<Option<Duration>> {
    let now = billing.now();
    let hold = {
        let mut tx = billing.db().begin().await?;
        let hold = sqlx::query_as::<_, (i64, String)>(
            "SELECT gateway_transaction_id, status FROM card_hold WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((transaction_id, status)) = hold else {
            return Ok(None);
        };
        if status != "held" {
            return Ok(None);
        }
        sqlx::query(
            "UPDATE card_hold SET void_attempts = void_attempts + 1, last_void_at = $2, updated_at = $2 WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        transaction_id
    };
    // The void's own X-Request-ID: a repeat within the hour answers the first void's result.
    let voided = billing.gateway().void(hold, &format!("{id}-void")).await;
    let cancelled = match voided {
        Ok(()) => true,
        Err(e) => {
            // Lost, refused or "not authorised any more": the transaction's state decides.
            tracing::warn!(card_check_id = %id, error = %e, "void of a card check's hold did not succeed; asking the gateway");
            match billing.gateway().get(hold).await {
                Ok(Some(t)) if t.status == TransactionStatus::Cancelled => true,
                Ok(Some(t)) if t.status == TransactionStatus::Authorized => false,
                Ok(Some(t)) => {
                    alert_hold(
                        billing,
                        id,
                        hold,
                        &format!("the authorisation is {:?}", t.status),
                    )
                    .await?;
                    return Ok(Some(horizon(billing)));
                }
                Ok(None) | Err(_) => false,
            }
        }
    };
    if !cancelled {
        return Ok(Some(VOID_AGAIN));
    }
    let mut tx = billing.db().begin().await?;
    let released = sqlx::query(
        "UPDATE card_hold SET status = 'released', released_at = $2, updated_at = $2 WHERE id = $1 AND status = 'held'",
    )
    .bind(id)
    .bind(billing.now())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if released == 1 {
        ledger::record_transition(
            &mut tx,
            HOLD,
            id,
            Some("held"),
            "released",
            Actor::Worker,
            Some("authorisation voided"),
            billing.now(),
        )
        .await?;
    }
    tx.commit().await?;
    tracing::info!(card_check_id = %id, transaction_id = hold, "card check hold released");
    Ok(None)
}

async fn alert_hold(billing: &Billing, id: Uuid, transaction_id: i64, why: &str) -> Result<()> {
    tracing::error!(card_check_id = %id, transaction_id, why, "a card check's hold cannot be voided");
    let mut conn = billing.db().acquire().await?;
    ledger::enqueue_outbox(
        &mut conn,
        topic::ACCOUNTING_ATTENTION,
        &format!("accounting:card-hold:{id}"),
        json!({"card_check_id": id, "transaction_id": transaction_id,
               "issue": format!("a card check's authorisation cannot be voided: {why}")}),
        billing.now(),
    )
    .await
}

/// Expires checks the payer left: a 3-D Secure challenge not answered within the policy's time,
/// or a cryptogram never sent in time (wiped). Returns how many.
pub async fn expire_stale(billing: &Billing) -> Result<u64> {
    let now = billing.now();
    let policy = billing.policy();
    let mut tx = billing.db().begin().await?;
    let expired = sqlx::query_as::<_, (Uuid, String)>(
        "WITH old AS (SELECT id, status FROM card_check
                      WHERE (status = 'awaiting_3ds' AND pa_res IS NULL AND sent_at <= $2)
                         OR (status = 'created' AND created_at <= $3)
                      LIMIT 1000 FOR UPDATE)
         UPDATE card_check c SET status = 'expired', cryptogram = NULL, reason = 'not completed in time',
                completed_at = $1, updated_at = $1
         FROM old WHERE c.id = old.id RETURNING c.id, old.status",
    )
    .bind(now)
    .bind(now - policy.three_ds_timeout)
    .bind(now - policy.created_timeout)
    .fetch_all(&mut *tx)
    .await?;
    for (id, from) in &expired {
        ledger::record_transition(
            &mut tx,
            ENTITY,
            *id,
            Some(from),
            "expired",
            Actor::Worker,
            Some("not completed in time"),
            now,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(expired.len() as u64)
}

/// Checks the reconciler must run again: unsettled past their lease, or with a hold still held.
pub async fn unfinished(billing: &Billing) -> Result<Vec<Uuid>> {
    let now = billing.now();
    Ok(sqlx::query_scalar::<_, Uuid>(
        "SELECT id FROM card_check
         WHERE (status = 'created' AND created_at < $1)
            OR (status = 'processing' AND coalesce(sent_at, updated_at) < $2)
            OR (status = 'awaiting_3ds' AND pa_res IS NOT NULL AND updated_at < $1)
         UNION
         SELECT id FROM card_hold WHERE status = 'held' AND coalesce(last_void_at, created_at) < $1
         LIMIT 1000",
    )
    .bind(now - chrono::Duration::minutes(1))
    .bind(now - billing.policy().in_flight_horizon())
    .fetch_all(billing.db())
    .await?)
}
