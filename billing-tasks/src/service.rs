//! The billing service API, as a library: what the frontend and the back-office call (the gRPC
//! layer wraps it). Every entry point validates its input first and changes nothing on bad input;
//! gateway work is never done here but enqueued as a task, and callers poll the payment.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::card_check::{self, CardCheckView};
use crate::context::Billing;
use crate::domain::{InvoiceStatus, PaymentStatus, Period, SubscriptionStatus, Transition};
use crate::error::{BillingError, Result};
use crate::ledger::{self, Actor};
use crate::money::{Currency, Money};
use crate::refunds::{self, RefundRequest, RefundView};
use crate::secret::Secret;
use crate::tasks;
use crate::vault;

/// The billing service.
#[derive(Debug, Clone)]
pub struct BillingService {
    billing: Billing,
}

/// A tariff as the frontend shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TariffView {
    /// Id.
    pub id: Uuid,
    /// Stable code (`monthly`).
    pub code: String,
    /// Display name.
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Price per period.
    pub price: Money,
    /// `day`, `month` or `year`.
    pub period_unit: String,
    /// Number of units per period.
    pub period_count: i32,
}

/// A subscription as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionView {
    /// Id.
    pub id: Uuid,
    /// The payer (auth user id).
    pub user_id: Uuid,
    /// Tariff code.
    pub tariff: String,
    /// Status.
    pub status: SubscriptionStatus,
    /// Whether it renews at the period's end.
    pub auto_renew: bool,
    /// Start of the paid period.
    pub current_period_start: Option<DateTime<Utc>>,
    /// End of the paid period (access until then).
    pub current_period_end: Option<DateTime<Utc>>,
    /// Access is kept until then while a renewal is retried.
    pub grace_until: Option<DateTime<Utc>>,
    /// The saved card, masked (`424242******4242`).
    pub card_mask: Option<String>,
}

/// A 3-D Secure challenge for the frontend: post `PaReq` and `MD` (the transaction id) to
/// `acs_url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThreeDsView {
    /// The issuer's page.
    pub acs_url: String,
    /// The request to post there.
    pub pa_req: String,
    /// The gateway transaction (`MD`).
    pub transaction_id: i64,
}

/// A payment attempt as its owner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaymentView {
    /// Id.
    pub id: Uuid,
    /// The subscription it pays for.
    pub subscription_id: Uuid,
    /// Status.
    pub status: PaymentStatus,
    /// Amount.
    pub amount: Money,
    /// Gateway reason code when declined.
    pub reason_code: Option<i32>,
    /// Why it failed, if it did.
    pub reason: Option<String>,
    /// What the bank says to the card holder.
    pub card_holder_message: Option<String>,
    /// Set while 3-D Secure is awaited.
    pub challenge: Option<ThreeDsView>,
}

/// A request to subscribe, with the card cryptogram the frontend built.
#[derive(Debug, Clone)]
pub struct StartSubscription {
    /// The auth user id.
    pub user_id: Uuid,
    /// Tariff code or id.
    pub tariff: String,
    /// The one-time card cryptogram from the gateway's checkout script.
    pub cryptogram: Secret<String>,
    /// Name on the card, if the form asked.
    pub cardholder_name: Option<String>,
    /// The payer's IP address.
    pub ip_address: String,
    /// Receipt e-mail.
    pub email: Option<String>,
    /// The caller's key: repeating a request with it returns the first payment.
    pub idempotency_key: String,
}

fn validate_start(req: &StartSubscription) -> Result<()> {
    let c = req.cryptogram.expose();
    if c.is_empty() || c.len() > 4096 {
        return Err(BillingError::invalid(
            "cryptogram must be 1 to 4096 characters",
        ));
    }
    if !c
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
    {
        return Err(BillingError::invalid(
            "cryptogram is not a card cryptogram packet (base64 expected)",
        ));
    }
    req.ip_address.parse::<IpAddr>().map_err(|_| {
        BillingError::invalid(format!(
            "ip_address `{}` is not an IP address",
            req.ip_address.chars().take(64).collect::<String>()
        ))
    })?;
    if let Some(email) = &req.email
        && (email.len() < 3
            || email.len() > 254
            || !email.contains('@')
            || email.chars().any(char::is_whitespace))
    {
        return Err(BillingError::invalid("email is not an e-mail address"));
    }
    if let Some(name) = &req.cardholder_name
        && (name.len() > 100 || name.chars().any(char::is_control))
    {
        return Err(BillingError::invalid(
            "cardholder_name must be at most 100 printable characters",
        ));
    }
    if req.idempotency_key.is_empty() || req.idempotency_key.len() > 200 {
        return Err(BillingError::invalid(
            "idempotency_key must be 1 to 200 characters",
        ));
    }
    if req.tariff.is_empty() || req.tariff.len() > 64 {
        return Err(BillingError::invalid("tariff must be a tariff code or id"));
    }
    Ok(())
}

impl BillingService {
    /// The service over a billing context.
    pub fn new(billing: Billing) -> Self {
        BillingService { billing }
    }

    /// The context (for tasks and tests).
    pub fn billing(&self) -> &Billing {
        &self.billing
    }

    /// Tariffs on sale.
    pub async fn list_tariffs(&self) -> Result<Vec<TariffView>> {
        let rows = sqlx::query!(
            "SELECT id, code, name, description, price_minor, currency, period_unit, period_count
             FROM tariff WHERE is_active ORDER BY price_minor"
        )
        .fetch_all(self.billing.db())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(TariffView {
                    id: r.id,
                    code: r.code,
                    name: r.name,
                    description: r.description,
                    price: Money::new(r.price_minor, Currency::new(&r.currency)?)?,
                    period_unit: r.period_unit,
                    period_count: r.period_count,
                })
            })
            .collect()
    }

    /// Starts a subscription: records the payer, a pending subscription, its first invoice and a
    /// payment attempt holding the cryptogram, and enqueues the charge. Returns the attempt; poll
    /// [`BillingService::get_payment`] for its outcome (or its 3-D Secure challenge).
    pub async fn start_subscription(&self, req: StartSubscription) -> Result<PaymentView> {
        validate_start(&req)?;
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;

        if let Some(existing) = sqlx::query!(
            "SELECT p.id, i.payer_id FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE p.idempotency_key = $1",
            req.idempotency_key
        )
        .fetch_optional(&mut *tx)
        .await?
        {
            if existing.payer_id != req.user_id {
                return Err(BillingError::invalid("idempotency_key was already used by another user"));
            }
            drop(tx);
            return self.get_payment(req.user_id, existing.id).await;
        }

        let tariff_id = Uuid::parse_str(&req.tariff).ok();
        let tariff = sqlx::query!(
            "SELECT id, price_minor, currency, period_unit, period_count FROM tariff
             WHERE is_active AND (code = $1 OR id = $2)",
            req.tariff,
            tariff_id
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| BillingError::NotFound(format!("tariff `{}`", req.tariff)))?;
        let period = Period::from_parts(&tariff.period_unit, tariff.period_count)?;

        sqlx::query!(
            "INSERT INTO payer (id, email, created_at, updated_at) VALUES ($1, $2, $3, $3)
             ON CONFLICT (id) DO UPDATE SET email = coalesce(EXCLUDED.email, payer.email), updated_at = EXCLUDED.updated_at",
            req.user_id,
            req.email,
            now
        )
        .execute(&mut *tx)
        .await?;

        let live = sqlx::query!(
            r#"SELECT s.id, s.status, s.tariff_id, s.current_period_end,
                      (SELECT i.id FROM invoice i WHERE i.subscription_id = s.id AND i.kind = 'initial' AND i.status = 'open') AS open_invoice,
                      EXISTS (SELECT 1 FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE i.subscription_id = s.id
                              AND p.status IN ('created', 'processing', 'awaiting_3ds')) AS "in_flight!"
               FROM subscription s WHERE s.payer_id = $1 AND s.status IN ('pending', 'active', 'past_due') FOR UPDATE"#,
            req.user_id
        )
        .fetch_optional(&mut *tx)
        .await?;
        let mut reuse = None;
        if let Some(s) = live {
            let status = SubscriptionStatus::parse(&s.status)?;
            match status {
                SubscriptionStatus::Active | SubscriptionStatus::PastDue => {
                    return Err(BillingError::precondition(format!(
                        "already subscribed until {}",
                        s.current_period_end
                            .map(|t| t.to_rfc3339())
                            .unwrap_or_default()
                    )));
                }
                _ if s.in_flight => {
                    return Err(BillingError::precondition(
                        "a payment for this subscription is already in progress",
                    ));
                }
                _ if s.tariff_id == tariff.id && s.open_invoice.is_some() => {
                    reuse = Some((s.id, s.open_invoice.unwrap_or_default()))
                }
                _ => {
                    status.check(SubscriptionStatus::Abandoned, "subscription")?;
                    sqlx::query!("UPDATE subscription SET status = 'abandoned', updated_at = $2 WHERE id = $1", s.id, now)
                        .execute(&mut *tx)
                        .await?;
                    ledger::void_open_invoices(
                        &mut tx,
                        s.id,
                        Actor::User,
                        "replaced by a new subscription request",
                        now,
                    )
                    .await?;
                    ledger::record_transition(
                        &mut tx,
                        "subscription",
                        s.id,
                        Some("pending"),
                        "abandoned",
                        Actor::User,
                        Some("replaced by a new subscription request"),
                        now,
                    )
                    .await?;
                }
            }
        }
        let (subscription_id, invoice_id) = match reuse {
            Some(ids) => ids,
            None => {
                let (subscription_id, invoice_id) = (Uuid::now_v7(), Uuid::now_v7());
                sqlx::query!(
                    "INSERT INTO subscription (id, payer_id, tariff_id, status, auto_renew, created_at, updated_at)
                     VALUES ($1, $2, $3, 'pending', true, $4, $4)",
                    subscription_id,
                    req.user_id,
                    tariff.id,
                    now
                )
                .execute(&mut *tx)
                .await?;
                sqlx::query!(
                    "INSERT INTO invoice (id, subscription_id, payer_id, kind, period_start, period_end, amount_minor, currency, status, created_at, updated_at)
                     VALUES ($1, $2, $3, 'initial', $4, $5, $6, $7, 'open', $4, $4)",
                    invoice_id,
                    subscription_id,
                    req.user_id,
                    now,
                    period.end_from(now),
                    tariff.price_minor,
                    tariff.currency
                )
                .execute(&mut *tx)
                .await?;
                ledger::record_transition(
                    &mut tx,
                    "subscription",
                    subscription_id,
                    None,
                    "pending",
                    Actor::User,
                    None,
                    now,
                )
                .await?;
                ledger::record_transition(
                    &mut tx,
                    "invoice",
                    invoice_id,
                    None,
                    "open",
                    Actor::User,
                    None,
                    now,
                )
                .await?;
                (subscription_id, invoice_id)
            }
        };
        let payment_id = Uuid::now_v7();
        let sealed = vault::seal(
            &self.billing,
            payment_id,
            vault::Field::Cryptogram,
            req.cryptogram.expose(),
        )?;
        let attempt = sqlx::query_scalar!(
            r#"SELECT coalesce(max(attempt), 0)::int + 1 AS "n!" FROM payment WHERE invoice_id = $1"#,
            invoice_id
        )
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query!(
            "INSERT INTO payment (id, invoice_id, attempt, method, status, amount_minor, currency, idempotency_key,
                                  ip_address, cardholder_name, cryptogram, created_at, updated_at)
             VALUES ($1, $2, $3, 'cryptogram', 'created', $4, $5, $6, $7, $8, $9, $10, $10)",
            payment_id,
            invoice_id,
            attempt,
            tariff.price_minor,
            tariff.currency,
            req.idempotency_key,
            req.ip_address,
            req.cardholder_name,
            sealed,
            now
        )
        .execute(&mut *tx)
        .await?;
        ledger::record_transition(
            &mut tx,
            "payment",
            payment_id,
            None,
            "created",
            Actor::User,
            None,
            now,
        )
        .await?;
        tx.commit().await?;
        tracing::info!(%payment_id, %subscription_id, "subscription started; charge enqueued");
        self.enqueue_charge(payment_id).await;
        self.get_payment(req.user_id, payment_id).await
    }

    /// Hands the bank's 3-D Secure answer (`PaRes`) for a payment awaiting it to the gateway.
    pub async fn complete_3ds(
        &self,
        user_id: Uuid,
        payment_id: Uuid,
        transaction_id: i64,
        pa_res: Secret<String>,
    ) -> Result<PaymentView> {
        let p = pa_res.expose();
        if p.is_empty() || p.len() > 16_384 {
            return Err(BillingError::invalid(
                "pa_res must be 1 to 16384 characters",
            ));
        }
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        let row = sqlx::query!(
            "SELECT p.status, p.gateway_transaction_id, i.payer_id FROM payment p JOIN invoice i ON i.id = p.invoice_id
             WHERE p.id = $1 FOR UPDATE OF p",
            payment_id
        )
        .fetch_optional(&mut *tx)
        .await?
        .filter(|r| r.payer_id == user_id);
        let Some(row) = row else {
            drop(tx);
            return self
                .complete_card_check_3ds(user_id, payment_id, transaction_id, pa_res)
                .await;
        };
        if PaymentStatus::parse(&row.status)? != PaymentStatus::AwaitingThreeDs {
            return Err(BillingError::precondition(format!(
                "payment {payment_id} is not awaiting 3-D Secure"
            )));
        }
        if row.gateway_transaction_id != Some(transaction_id) {
            return Err(BillingError::invalid(
                "transaction_id does not match the payment's 3-D Secure challenge",
            ));
        }
        let sealed = vault::seal(&self.billing, payment_id, vault::Field::PaRes, p)?;
        sqlx::query!(
            "UPDATE payment SET pa_res = $2, updated_at = $3 WHERE id = $1",
            payment_id,
            sealed,
            now
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.enqueue_charge(payment_id).await;
        self.get_payment(user_id, payment_id).await
    }

    /// Complete3DS for a new card's check (see [`Self::update_payment_method`]).
    async fn complete_card_check_3ds(
        &self,
        user_id: Uuid,
        id: Uuid,
        transaction_id: i64,
        pa_res: Secret<String>,
    ) -> Result<PaymentView> {
        card_check::answer_3ds(&self.billing, user_id, id, transaction_id, &pa_res).await?;
        self.enqueue_check_card(id).await;
        self.get_payment(user_id, id).await
    }

    async fn enqueue_check_card(&self, id: Uuid) {
        // If this fails the check stays where it is and the reconciler enqueues it.
        if let Err(e) = tasks::enqueue_check_card(&self.billing, id).await {
            tracing::error!(card_check_id = %id, error = %e, "could not enqueue the card check; the reconciler will");
        }
    }

    async fn enqueue_charge(&self, payment_id: Uuid) {
        // If this fails the payment stays `created`/`awaiting_3ds` and the reconciler enqueues it.
        if let Err(e) = tasks::enqueue_charge_payment(&self.billing, payment_id).await {
            tracing::error!(%payment_id, error = %e, "could not enqueue the charge; the reconciler will");
        }
    }

    /// The payer's current subscription (the live one, or the latest).
    pub async fn get_subscription(&self, user_id: Uuid) -> Result<SubscriptionView> {
        let s = sqlx::query!(
            r#"SELECT s.id, s.status, s.auto_renew, s.current_period_start, s.current_period_end, s.grace_until,
                      t.code, pm.card_mask AS "card_mask?"
               FROM subscription s JOIN tariff t ON t.id = s.tariff_id
               LEFT JOIN payment_method pm ON pm.id = s.payment_method_id
               WHERE s.payer_id = $1
               ORDER BY (s.status IN ('pending', 'active', 'past_due')) DESC, s.created_at DESC LIMIT 1"#,
            user_id
        )
        .fetch_optional(self.billing.db())
        .await?
        .ok_or_else(|| BillingError::NotFound(format!("subscription of user {user_id}")))?;
        Ok(SubscriptionView {
            id: s.id,
            user_id,
            tariff: s.code,
            status: SubscriptionStatus::parse(&s.status)?,
            auto_renew: s.auto_renew,
            current_period_start: s.current_period_start,
            current_period_end: s.current_period_end,
            grace_until: s.grace_until,
            card_mask: s.card_mask,
        })
    }

    /// One of the payer's payments.
    pub async fn get_payment(&self, user_id: Uuid, payment_id: Uuid) -> Result<PaymentView> {
        let p = sqlx::query!(
            "SELECT p.id, p.status, p.amount_minor, p.currency, p.reason_code, p.reason, p.card_holder_message,
                    p.acs_url, p.pa_req, p.gateway_transaction_id, i.subscription_id, i.payer_id
             FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE p.id = $1",
            payment_id
        )
        .fetch_optional(self.billing.db())
        .await?
        .filter(|p| p.payer_id == user_id);
        let Some(p) = p else {
            // A new card's check is followed like a payment (UpdatePaymentMethod answers one).
            return card_check::view(&self.billing, user_id, payment_id)
                .await?
                .map(card_check_payment)
                .ok_or_else(|| BillingError::NotFound(format!("payment {payment_id}")));
        };
        let status = PaymentStatus::parse(&p.status)?;
        let challenge = match (status, p.acs_url, p.pa_req, p.gateway_transaction_id) {
            (PaymentStatus::AwaitingThreeDs, Some(acs_url), Some(pa_req), Some(transaction_id)) => {
                Some(ThreeDsView {
                    acs_url,
                    pa_req,
                    transaction_id,
                })
            }
            _ => None,
        };
        Ok(PaymentView {
            id: p.id,
            subscription_id: p.subscription_id,
            status,
            amount: Money::new(p.amount_minor, Currency::new(&p.currency)?)?,
            reason_code: p.reason_code,
            reason: p.reason,
            card_holder_message: p.card_holder_message,
            challenge,
        })
    }

    /// Turns auto-renewal off: access lasts to the end of the paid period. A pending subscription
    /// (first payment not made) is abandoned instead.
    pub async fn cancel(&self, user_id: Uuid, reason: Option<String>) -> Result<SubscriptionView> {
        self.cancel_by(user_id, reason, Actor::User).await
    }

    /// [`Self::cancel`], by `actor` (staff, through the back-office).
    pub async fn cancel_by(
        &self,
        user_id: Uuid,
        reason: Option<String>,
        actor: Actor<'_>,
    ) -> Result<SubscriptionView> {
        let reason = reason
            .map(|r| r.trim().chars().take(500).collect::<String>())
            .filter(|r| !r.is_empty());
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        let s = sqlx::query!(
            "SELECT id, status, auto_renew FROM subscription WHERE payer_id = $1 AND status IN ('pending', 'active', 'past_due') FOR UPDATE",
            user_id
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| BillingError::precondition("no live subscription to cancel"))?;
        let status = SubscriptionStatus::parse(&s.status)?;
        match status {
            SubscriptionStatus::Pending => {
                let busy = sqlx::query_scalar!(
                    r#"SELECT EXISTS (SELECT 1 FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE i.subscription_id = $1
                       AND p.status IN ('created', 'processing', 'awaiting_3ds')) AS "busy!""#,
                    s.id
                )
                .fetch_one(&mut *tx)
                .await?;
                if busy {
                    return Err(BillingError::precondition(
                        "the first payment is in progress; cancel after it finishes",
                    ));
                }
                status.check(SubscriptionStatus::Abandoned, "subscription")?;
                sqlx::query!("UPDATE subscription SET status = 'abandoned', canceled_at = $2, cancel_reason = $3, updated_at = $2 WHERE id = $1", s.id, now, reason)
                    .execute(&mut *tx)
                    .await?;
                ledger::void_open_invoices(
                    &mut tx,
                    s.id,
                    actor,
                    "cancelled before the first payment",
                    now,
                )
                .await?;
                ledger::record_transition(
                    &mut tx,
                    "subscription",
                    s.id,
                    Some("pending"),
                    "abandoned",
                    actor,
                    reason.as_deref(),
                    now,
                )
                .await?;
            }
            _ if !s.auto_renew => {
                return Err(BillingError::precondition("auto-renewal is already off"));
            }
            _ => {
                sqlx::query!(
                    "UPDATE subscription SET auto_renew = false, canceled_at = $2, cancel_reason = $3, updated_at = $2 WHERE id = $1",
                    s.id,
                    now,
                    reason
                )
                .execute(&mut *tx)
                .await?;
                // An unpaid renewal with no attempt in flight is no longer wanted.
                let voided = sqlx::query_scalar!(
                    "UPDATE invoice i SET status = 'void', next_attempt_at = NULL, updated_at = $2
                     WHERE i.subscription_id = $1 AND i.kind = 'renewal' AND i.status = 'open'
                       AND NOT EXISTS (SELECT 1 FROM payment p WHERE p.invoice_id = i.id AND p.status IN ('created', 'processing'))
                     RETURNING i.id",
                    s.id,
                    now
                )
                .fetch_all(&mut *tx)
                .await?;
                for id in voided {
                    InvoiceStatus::Open.check(InvoiceStatus::Void, "invoice")?;
                    ledger::record_transition(
                        &mut tx,
                        "invoice",
                        id,
                        Some("open"),
                        "void",
                        actor,
                        Some("auto-renewal cancelled"),
                        now,
                    )
                    .await?;
                }
                ledger::record_transition(
                    &mut tx,
                    "subscription",
                    s.id,
                    Some(status.as_str()),
                    status.as_str(),
                    actor,
                    Some("auto-renewal cancelled"),
                    now,
                )
                .await?;
            }
        }
        tx.commit().await?;
        self.get_subscription(user_id).await
    }

    /// Turns auto-renewal back on while the paid period lasts.
    pub async fn resume(&self, user_id: Uuid) -> Result<SubscriptionView> {
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        let s = sqlx::query!(
            "SELECT id, status, auto_renew, current_period_end FROM subscription
             WHERE payer_id = $1 AND status IN ('active', 'past_due') FOR UPDATE",
            user_id
        )
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| BillingError::precondition("no active subscription to resume"))?;
        if s.auto_renew {
            return Err(BillingError::precondition("auto-renewal is already on"));
        }
        if s.current_period_end.is_none_or(|end| end <= now) {
            return Err(BillingError::precondition(
                "the paid period is over; subscribe again",
            ));
        }
        sqlx::query!("UPDATE subscription SET auto_renew = true, canceled_at = NULL, cancel_reason = NULL, updated_at = $2 WHERE id = $1", s.id, now)
            .execute(&mut *tx)
            .await?;
        ledger::record_transition(
            &mut tx,
            "subscription",
            s.id,
            Some(&s.status),
            &s.status,
            Actor::User,
            Some("auto-renewal resumed"),
            now,
        )
        .await?;
        // A renewal voided when the user cancelled is wanted again: reopen it, due now.
        let reopened = sqlx::query_scalar!(
            "UPDATE invoice SET status = 'open', next_attempt_at = $3, updated_at = $3
             WHERE subscription_id = $1 AND kind = 'renewal' AND status = 'void' AND period_start = $2
             RETURNING id",
            s.id,
            s.current_period_end,
            now
        )
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = reopened {
            InvoiceStatus::Void.check(InvoiceStatus::Open, "invoice")?;
            ledger::record_transition(
                &mut tx,
                "invoice",
                id,
                Some("void"),
                "open",
                Actor::User,
                Some("auto-renewal resumed"),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        if let Some(invoice_id) = reopened
            && let Err(e) = tasks::enqueue::<tasks::ChargeInvoice>(
                &self.billing,
                tasks::InvoiceArgs { invoice_id },
            )
            .await
        {
            tracing::error!(%invoice_id, error = %e, "could not enqueue the renewal; the sweeper will");
        }
        self.get_subscription(user_id).await
    }

    /// Requests a refund (full within the policy's window, pro-rata after) and enqueues it.
    pub async fn request_refund(&self, req: RefundRequest) -> Result<RefundView> {
        let refund = refunds::request(&self.billing, &req).await?;
        if refund.status == crate::domain::RefundStatus::Requested
            && let Err(e) = tasks::enqueue_refund(&self.billing, refund.id).await
        {
            tracing::error!(refund_id = %refund.id, error = %e, "could not enqueue the refund; the reconciler will");
        }
        Ok(refund)
    }

    // ---- Added for the gRPC API (issue 11): operations the frontend needs beyond the above. ----

    /// All the payer's subscriptions, newest first.
    pub async fn list_subscriptions(&self, user_id: Uuid) -> Result<Vec<SubscriptionView>> {
        let rows = sqlx::query_as::<_, SubscriptionRow>(SUBSCRIPTION_SELECT_BY_PAYER)
            .bind(user_id)
            .fetch_all(self.billing.db())
            .await?;
        rows.into_iter().map(SubscriptionRow::view).collect()
    }

    /// One of the payer's subscriptions; another payer's is not found.
    pub async fn subscription_by_id(
        &self,
        user_id: Uuid,
        subscription_id: Uuid,
    ) -> Result<SubscriptionView> {
        self.list_subscriptions(user_id)
            .await?
            .into_iter()
            .find(|s| s.id == subscription_id)
            .ok_or_else(|| BillingError::NotFound(format!("subscription {subscription_id}")))
    }

    /// The tariff a subscription switches to at its next renewal, if [`Self::change_tariff`] was
    /// called.
    pub async fn next_tariff(&self, subscription_id: Uuid) -> Result<Option<String>> {
        Ok(sqlx::query_scalar::<_, String>(
            "SELECT t.code FROM subscription s JOIN tariff t ON t.id = s.next_tariff_id WHERE s.id = $1",
        )
        .bind(subscription_id)
        .fetch_optional(self.billing.db())
        .await?)
    }

    /// The payer's payments, newest first, `limit` at most, older than `before` (a payment id,
    /// for the next page) when given.
    pub async fn list_payments(
        &self,
        user_id: Uuid,
        limit: i64,
        before: Option<Uuid>,
    ) -> Result<Vec<PaymentView>> {
        let ids = sqlx::query_scalar::<_, Uuid>(
            "SELECT p.id FROM payment p JOIN invoice i ON i.id = p.invoice_id
             WHERE i.payer_id = $1 AND ($2::uuid IS NULL OR p.id < $2)
             ORDER BY p.id DESC LIMIT $3",
        )
        .bind(user_id)
        .bind(before)
        .bind(limit.clamp(1, 100))
        .fetch_all(self.billing.db())
        .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.get_payment(user_id, id).await?);
        }
        Ok(out)
    }

    /// Gives up a payment waiting for 3-D Secure whose answer has not been given, so the payer can
    /// try another card at once: the attempt expires and its invoice is open again.
    pub async fn abandon_payment(&self, user_id: Uuid, payment_id: Uuid) -> Result<PaymentView> {
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        let row = sqlx::query_as::<_, (String, bool, Uuid, Uuid, String)>(
            "SELECT p.status, p.pa_res IS NOT NULL, i.payer_id, i.id, i.status FROM payment p
             JOIN invoice i ON i.id = p.invoice_id WHERE p.id = $1 FOR UPDATE OF p, i",
        )
        .bind(payment_id)
        .fetch_optional(&mut *tx)
        .await?
        .filter(|r| r.2 == user_id)
        .ok_or_else(|| BillingError::NotFound(format!("payment {payment_id}")))?;
        let (status, answered, _, invoice_id, invoice_status) = row;
        let status = PaymentStatus::parse(&status)?;
        if status != PaymentStatus::AwaitingThreeDs {
            return Err(BillingError::precondition(format!(
                "payment {payment_id} is not awaiting 3-D Secure"
            )));
        }
        if answered {
            return Err(BillingError::precondition(
                "the 3-D Secure answer was given and is being charged",
            ));
        }
        status.check(PaymentStatus::Expired, "payment")?;
        let reason = "abandoned by the payer";
        sqlx::query(
            "UPDATE payment SET status = 'expired', pa_res = NULL, reason = $2, completed_at = $3, updated_at = $3 WHERE id = $1",
        )
        .bind(payment_id)
        .bind(reason)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        ledger::record_transition(
            &mut tx,
            "payment",
            payment_id,
            Some(status.as_str()),
            "expired",
            Actor::User,
            Some(reason),
            now,
        )
        .await?;
        if invoice_status == "paying" {
            InvoiceStatus::Paying.check(InvoiceStatus::Open, "invoice")?;
            sqlx::query("UPDATE invoice SET status = 'open', updated_at = $2 WHERE id = $1")
                .bind(invoice_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            ledger::record_transition(
                &mut tx,
                "invoice",
                invoice_id,
                Some("paying"),
                "open",
                Actor::User,
                Some(reason),
                now,
            )
            .await?;
        }
        tx.commit().await?;
        self.get_payment(user_id, payment_id).await
    }

    /// Ends the payer's subscription now: access ends and the role is revoked (a refund is asked
    /// for separately). A pending subscription is abandoned as by [`Self::cancel`].
    pub async fn cancel_now(
        &self,
        user_id: Uuid,
        reason: Option<String>,
    ) -> Result<SubscriptionView> {
        self.cancel_now_by(user_id, reason, Actor::User).await
    }

    /// [`Self::cancel_now`], by `actor` (staff, through the back-office).
    pub async fn cancel_now_by(
        &self,
        user_id: Uuid,
        reason: Option<String>,
        actor: Actor<'_>,
    ) -> Result<SubscriptionView> {
        let reason = reason
            .map(|r| r.trim().chars().take(500).collect::<String>())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "cancelled by the payer".to_owned());
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        let s = sqlx::query_as::<_, (Uuid, String, bool)>(
            "SELECT s.id, s.status, EXISTS (SELECT 1 FROM payment p JOIN invoice i ON i.id = p.invoice_id
                     WHERE i.subscription_id = s.id AND p.status IN ('created', 'processing', 'awaiting_3ds'))
             FROM subscription s WHERE s.payer_id = $1 AND s.status IN ('pending', 'active', 'past_due') FOR UPDATE OF s",
        )
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| BillingError::precondition("no live subscription to cancel"))?;
        let status = SubscriptionStatus::parse(&s.1)?;
        if status == SubscriptionStatus::Pending {
            drop(tx);
            return self.cancel_by(user_id, Some(reason), actor).await;
        }
        if s.2 {
            return Err(BillingError::precondition(
                "a payment is in progress; cancel after it finishes",
            ));
        }
        crate::charging::expire(&mut tx, s.0, status, actor, &reason, now).await?;
        tx.commit().await?;
        self.subscription_by_id(user_id, s.0).await
    }

    /// A new card for the payer's subscription. With a renewal due (the way out of `past_due`):
    /// a cryptogram attempt on the open renewal invoice, charged like a primary payment; on
    /// success the card is saved and used for the renewals after it. With nothing due: a card
    /// check ([`card_check`]), a small authorisation that is voided at once, after which the card
    /// renews the subscription. Either way the answer is followed like a payment
    /// ([`Self::get_payment`], Complete3DS when the bank asks for 3-D Secure); the old card stays
    /// until the new one is approved.
    pub async fn update_payment_method(&self, req: UpdatePaymentMethod) -> Result<PaymentView> {
        // The card fields are checked exactly as for a new subscription.
        validate_start(&StartSubscription {
            user_id: req.user_id,
            tariff: "update".to_owned(),
            cryptogram: req.cryptogram.clone(),
            cardholder_name: req.cardholder_name.clone(),
            ip_address: req.ip_address.clone(),
            email: None,
            idempotency_key: req.idempotency_key.clone(),
        })?;
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        if let Some((id, payer)) = sqlx::query_as::<_, (Uuid, Uuid)>(
            "SELECT p.id, i.payer_id FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE p.idempotency_key = $1",
        )
        .bind(&req.idempotency_key)
        .fetch_optional(&mut *tx)
        .await?
        {
            if payer != req.user_id {
                return Err(BillingError::invalid(
                    "idempotency_key was already used by another user",
                ));
            }
            drop(tx);
            return self.get_payment(req.user_id, id).await;
        }
        if let Some((id, payer)) =
            card_check::by_idempotency_key(&mut tx, &req.idempotency_key).await?
        {
            if payer != req.user_id {
                return Err(BillingError::invalid(
                    "idempotency_key was already used by another user",
                ));
            }
            drop(tx);
            return self.get_payment(req.user_id, id).await;
        }
        let (sub, sub_status, currency) = sqlx::query_as::<_, (Uuid, String, String)>(
            "SELECT s.id, s.status, t.currency FROM subscription s JOIN tariff t ON t.id = s.tariff_id
             WHERE s.payer_id = $1 AND s.status IN ('active', 'past_due') FOR UPDATE OF s",
        )
        .bind(req.user_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| BillingError::precondition("no active subscription to pay for"))?;
        let invoice = sqlx::query_as::<_, (Uuid, i64, String)>(
            "SELECT i.id, i.amount_minor, i.currency FROM invoice i
             WHERE i.subscription_id = $1 AND i.kind = 'renewal' AND i.status = 'open'
               AND NOT EXISTS (SELECT 1 FROM payment p WHERE p.invoice_id = i.id AND p.status IN ('created', 'processing', 'awaiting_3ds'))
             ORDER BY i.period_start LIMIT 1 FOR UPDATE",
        )
        .bind(sub)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(invoice) = invoice else {
            if SubscriptionStatus::parse(&sub_status)? != SubscriptionStatus::Active {
                return Err(BillingError::precondition(
                    "the overdue renewal is being charged; try the new card when it has finished",
                ));
            }
            // Nothing is due: prove the card (an authorisation, voided) for the next renewal.
            let id = card_check::create(
                &mut tx,
                &self.billing,
                card_check::NewCheck {
                    subscription_id: sub,
                    payer_id: req.user_id,
                    currency: &currency,
                    idempotency_key: &req.idempotency_key,
                    ip_address: &req.ip_address,
                    cardholder_name: req.cardholder_name.as_deref(),
                    cryptogram: &req.cryptogram,
                },
                now,
            )
            .await?;
            tx.commit().await?;
            tracing::info!(card_check_id = %id, subscription_id = %sub, "new card for the next renewal; check enqueued");
            self.enqueue_check_card(id).await;
            return self.get_payment(req.user_id, id).await;
        };
        let payment_id = Uuid::now_v7();
        let sealed = vault::seal(
            &self.billing,
            payment_id,
            vault::Field::Cryptogram,
            req.cryptogram.expose(),
        )?;
        // The dunning ladder waits while this attempt runs; a decline sets it again.
        sqlx::query("UPDATE invoice SET next_attempt_at = NULL, updated_at = $2 WHERE id = $1")
            .bind(invoice.0)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO payment (id, invoice_id, attempt, method, status, amount_minor, currency, idempotency_key,
                                  ip_address, cardholder_name, cryptogram, created_at, updated_at)
             VALUES ($1, $2, (SELECT coalesce(max(attempt), 0) + 1 FROM payment WHERE invoice_id = $2),
                     'cryptogram', 'created', $3, $4, $5, $6, $7, $8, $9, $9)",
        )
        .bind(payment_id)
        .bind(invoice.0)
        .bind(invoice.1)
        .bind(&invoice.2)
        .bind(&req.idempotency_key)
        .bind(&req.ip_address)
        .bind(&req.cardholder_name)
        .bind(sealed)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        ledger::record_transition(
            &mut tx,
            "payment",
            payment_id,
            None,
            "created",
            Actor::User,
            Some("new card for an overdue renewal"),
            now,
        )
        .await?;
        tx.commit().await?;
        self.enqueue_charge(payment_id).await;
        self.get_payment(req.user_id, payment_id).await
    }

    /// Whether a payment's 3-D Secure challenge no longer waits for the payer: the answer was
    /// given (its charge is under way) or the attempt has moved on since it was read.
    pub async fn three_ds_answered(&self, payment_id: Uuid) -> Result<bool> {
        Ok(sqlx::query_scalar::<_, bool>(
            "SELECT pa_res IS NOT NULL OR status <> 'awaiting_3ds' FROM payment WHERE id = $1
             UNION ALL
             SELECT pa_res IS NOT NULL OR status <> 'awaiting_3ds' FROM card_check WHERE id = $1",
        )
        .bind(payment_id)
        .fetch_optional(self.billing.db())
        .await?
        .unwrap_or(false))
    }

    /// Switches the payer's live subscription to `tariff` from its next renewal (the renewal
    /// invoice takes the new tariff's price and period, see migration 0007). Choosing the current
    /// tariff cancels a pending change.
    pub async fn change_tariff(&self, user_id: Uuid, tariff: &str) -> Result<SubscriptionView> {
        if tariff.is_empty() || tariff.len() > 64 {
            return Err(BillingError::invalid("tariff must be a tariff code or id"));
        }
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        let t = sqlx::query_as::<_, (Uuid, String)>(
            "SELECT id, code FROM tariff WHERE is_active AND (code = $1 OR id::text = $1)",
        )
        .bind(tariff)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| BillingError::NotFound(format!("tariff `{tariff}`")))?;
        let (sub, current) = sqlx::query_as::<_, (Uuid, Uuid)>(
            "SELECT id, tariff_id FROM subscription WHERE payer_id = $1 AND status IN ('active', 'past_due') FOR UPDATE",
        )
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| BillingError::precondition("no active subscription to change"))?;
        let next = (t.0 != current).then_some(t.0);
        sqlx::query("UPDATE subscription SET next_tariff_id = $2, updated_at = $3 WHERE id = $1")
            .bind(sub)
            .bind(next)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let note = match next {
            Some(_) => format!("tariff changes to {} from the next period", t.1),
            None => "pending tariff change cancelled".to_owned(),
        };
        ledger::record_transition(
            &mut tx,
            "subscription",
            sub,
            Some("active"),
            "active",
            Actor::User,
            Some(&note),
            now,
        )
        .await?;
        tx.commit().await?;
        self.subscription_by_id(user_id, sub).await
    }
}

/// A card check as the payment the frontend follows.
fn card_check_payment(c: CardCheckView) -> PaymentView {
    PaymentView {
        id: c.id,
        subscription_id: c.subscription_id,
        status: c.status,
        amount: c.amount,
        reason_code: c.reason_code,
        reason: c.reason,
        card_holder_message: c.card_holder_message,
        challenge: c
            .challenge
            .map(|(acs_url, pa_req, transaction_id)| ThreeDsView {
                acs_url,
                pa_req,
                transaction_id,
            }),
    }
}

/// A new card for the payer's subscription: for the overdue renewal, or for the next one.
#[derive(Debug, Clone)]
pub struct UpdatePaymentMethod {
    /// The auth user id.
    pub user_id: Uuid,
    /// The new card's one-time cryptogram.
    pub cryptogram: Secret<String>,
    /// Name on the card, if the form asked.
    pub cardholder_name: Option<String>,
    /// The payer's IP address.
    pub ip_address: String,
    /// The caller's key: repeating a request with it returns the first payment.
    pub idempotency_key: String,
}

const SUBSCRIPTION_SELECT_BY_PAYER: &str =
    "SELECT s.id, s.payer_id, s.status, s.auto_renew, s.current_period_start,
        s.current_period_end, s.grace_until, t.code, pm.card_mask
     FROM subscription s JOIN tariff t ON t.id = s.tariff_id
     LEFT JOIN payment_method pm ON pm.id = s.payment_method_id
     WHERE s.payer_id = $1 ORDER BY s.created_at DESC, s.id DESC LIMIT 1000";

#[derive(sqlx::FromRow)]
struct SubscriptionRow {
    id: Uuid,
    payer_id: Uuid,
    status: String,
    auto_renew: bool,
    current_period_start: Option<DateTime<Utc>>,
    current_period_end: Option<DateTime<Utc>>,
    grace_until: Option<DateTime<Utc>>,
    code: String,
    card_mask: Option<String>,
}

impl SubscriptionRow {
    fn view(self) -> Result<SubscriptionView> {
        Ok(SubscriptionView {
            id: self.id,
            user_id: self.payer_id,
            tariff: self.code,
            status: SubscriptionStatus::parse(&self.status)?,
            auto_renew: self.auto_renew,
            current_period_start: self.current_period_start,
            current_period_end: self.current_period_end,
            grace_until: self.grace_until,
            card_mask: self.card_mask,
        })
    }
}
