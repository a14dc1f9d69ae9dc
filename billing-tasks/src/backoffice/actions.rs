//! What staff do. Each action:
//! - checks its input first (a refused action changes nothing, not even the audit log);
//! - is idempotent: the form's one-time key is the audit entry's `request_id`, so a second
//!   submit finds the first entry and does nothing ([`Done::Repeated`]);
//! - writes its audit entry in the same transaction as its ledger change. The two that go
//!   through the billing service's own transactions (cancelling) check the key first and write
//!   the entry right after; their ledger rows carry the member of staff as the actor either way.

use chrono::Duration;
use serde_json::json;
use sqlx::PgConnection;
use staff_auth::audit::{self, Action};
use uuid::Uuid;

use super::format::{self, AmountError};
use super::text::Lang;
use super::{Backoffice, StaffRole};
use crate::domain::{InvoiceStatus, SubscriptionStatus, Transition};
use crate::error::BillingError;
use crate::ledger::{self, Actor, topic};
use crate::refunds::{self, RefundRequest, Requester};
use crate::tasks;

/// The reasons staff choose from (the note says the rest).
pub const REASONS: &[&str] = &[
    "request",
    "duplicate",
    "service",
    "goodwill",
    "fraud",
    "error",
    "gateway",
    "other",
];

/// Who acts.
#[derive(Debug, Clone)]
pub struct Staff {
    pub user: String,
    pub role: StaffRole,
}

/// Why, and the form's one-time key.
#[derive(Debug, Clone, Default)]
pub struct Why {
    pub code: String,
    pub note: String,
    pub key: String,
}

/// What an action achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Done; the message says what.
    Done(String),
    /// The form had been sent before: the earlier action stands, nothing more was done.
    Repeated,
    /// A refund above the threshold now waits for a second person.
    AwaitingApproval(Uuid),
}

/// Why an action was refused: a message for the person, nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl From<BillingError> for Refused {
    fn from(e: BillingError) -> Self {
        Refused(match e {
            BillingError::InvalidArgument(m)
            | BillingError::NotFound(m)
            | BillingError::FailedPrecondition(m) => m,
            BillingError::Unavailable(m) => format!("temporarily unavailable, try again: {m}"),
            BillingError::Internal(m) => {
                tracing::error!(error = %m, "back-office action failed");
                "internal error (logged)".to_owned()
            }
        })
    }
}

impl From<sqlx::Error> for Refused {
    fn from(e: sqlx::Error) -> Self {
        BillingError::from(e).into()
    }
}

type Outcome = Result<Done, Refused>;

fn refuse(lang: Lang, ru: &str, en: &str) -> Refused {
    Refused(match lang {
        Lang::Ru => ru.to_owned(),
        Lang::En => en.to_owned(),
    })
}

impl Why {
    /// Checks the reason code, the note's length and the key.
    pub(crate) fn check(&self, lang: Lang) -> Result<String, Refused> {
        if !REASONS.contains(&self.code.as_str()) {
            return Err(refuse(
                lang,
                "Выберите причину из списка.",
                "Choose a reason from the list.",
            ));
        }
        if self.note.chars().count() > 500 {
            return Err(refuse(
                lang,
                "Комментарий длиннее 500 символов.",
                "The note is longer than 500 characters.",
            ));
        }
        if Uuid::parse_str(self.key.trim()).is_err() {
            return Err(refuse(
                lang,
                "Форма устарела: откройте страницу заново.",
                "The form is stale: open the page again.",
            ));
        }
        let note = self.note.trim();
        Ok(if note.is_empty() {
            self.code.clone()
        } else {
            format!("{}: {note}", self.code)
        })
    }
}

fn amount_refusal(lang: Lang, e: AmountError) -> Refused {
    match e {
        AmountError::Empty => refuse(lang, "Укажите сумму.", "Enter an amount."),
        AmountError::NotANumber => refuse(
            lang,
            "Сумма — это число, например 499,00.",
            "The amount is a number such as 499.00.",
        ),
        AmountError::TooManyDecimals => refuse(
            lang,
            "Не больше двух знаков после запятой (копейки).",
            "At most two decimals (kopecks).",
        ),
        AmountError::NotPositive => refuse(
            lang,
            "Сумма должна быть больше нуля.",
            "The amount must be more than zero.",
        ),
        AmountError::TooLarge => refuse(lang, "Сумма слишком велика.", "The amount is too large."),
    }
}

/// Writes the audit entry in `conn`'s transaction; `false` when the key was used before.
pub(crate) async fn note(
    conn: &mut PgConnection,
    staff: &Staff,
    action: &'static str,
    target: String,
    reason: &str,
    detail: serde_json::Value,
    key: &str,
) -> Result<bool, Refused> {
    Ok(audit::record_in(
        conn,
        &Action {
            actor: staff.user.clone(),
            action,
            target,
            count: 1,
            reason: audit::reason(Some(reason)),
            detail,
            request_id: Some(key.trim().to_owned()),
        },
    )
    .await?
    .is_ok())
}

async fn seen(bo: &Backoffice, key: &str) -> Result<bool, Refused> {
    Ok(sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM audit_log WHERE request_id = $1)",
    )
    .bind(key.trim())
    .fetch_one(bo.billing.db())
    .await?)
}

impl Backoffice {
    /// A full or partial refund of a payment: up to what is left of it; above the approval
    /// threshold it waits for a second person.
    pub async fn refund(
        &self,
        staff: &Staff,
        lang: Lang,
        payment_id: Uuid,
        amount: &str,
        currency: &str,
        why: &Why,
    ) -> Outcome {
        let reason = why.check(lang)?;
        let minor = format::parse_roubles(amount).map_err(|e| amount_refusal(lang, e))?;
        let mut tx = self.billing.db().begin().await?;
        let Some((paid, paid_currency, status, payer)): Option<(i64, String, String, Uuid)> = sqlx::query_as(
            "SELECT p.amount_minor, p.currency::text, p.status, i.payer_id FROM payment p JOIN invoice i ON i.id = p.invoice_id
             WHERE p.id = $1 FOR UPDATE OF p",
        )
        .bind(payment_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Err(refuse(lang, "Нет такого платежа.", "No such payment."));
        };
        if currency.trim() != paid_currency {
            return Err(Refused(match lang {
                Lang::Ru => {
                    format!("Платёж был в {paid_currency}; возврат только в той же валюте.")
                }
                Lang::En => {
                    format!("The payment was in {paid_currency}; a refund is in the same currency.")
                }
            }));
        }
        if status != "succeeded" {
            return Err(refuse(
                lang,
                "Платёж не прошёл — возвращать нечего.",
                "The payment did not succeed; nothing to refund.",
            ));
        }
        let refunded: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(amount_minor), 0)::bigint FROM refund WHERE payment_id = $1 AND status <> 'failed'",
        )
        .bind(payment_id)
        .fetch_one(&mut *tx)
        .await?;
        let left = paid - refunded - refunds::held_for_approval(&mut tx, payment_id, None).await?;
        if minor > left {
            return Err(too_much(lang, left, &paid_currency));
        }
        if minor > self.approval_above {
            let id = Uuid::now_v7();
            let detail = json!({"payment_id": payment_id, "amount_minor": minor, "currency": paid_currency, "approval_id": id});
            if !note(
                &mut tx,
                staff,
                "refund.request_approval",
                payer.to_string(),
                &reason,
                detail,
                &why.key,
            )
            .await?
            {
                return Ok(Done::Repeated);
            }
            sqlx::query(
                "INSERT INTO refund_approval (id, payment_id, payer_id, amount_minor, currency, reason, requested_by,
                                              requested_at, status, request_key)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'pending', $9)",
            )
            .bind(id)
            .bind(payment_id)
            .bind(payer)
            .bind(minor)
            .bind(&paid_currency)
            .bind(&reason)
            .bind(&staff.user)
            .bind(self.billing.now())
            .bind(why.key.trim())
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Done::AwaitingApproval(id));
        }
        let detail =
            json!({"payment_id": payment_id, "amount_minor": minor, "currency": paid_currency});
        if !note(
            &mut tx,
            staff,
            "refund.request",
            payer.to_string(),
            &reason,
            detail,
            &why.key,
        )
        .await?
        {
            return Ok(Done::Repeated);
        }
        let req = RefundRequest {
            payment_id,
            reason,
            requested_by: Requester::Staff(staff.user.clone()),
            idempotency_key: format!("backoffice:{}", why.key.trim()),
        };
        let refund = refunds::request_in(&mut tx, &self.billing, &req, Some(minor), None).await?;
        tx.commit().await?;
        self.enqueue_refund(refund.id).await;
        Ok(Done::Done(format!(
            "refund {} {}",
            refund.id, refund.amount
        )))
    }

    async fn enqueue_refund(&self, refund_id: Uuid) {
        if let Err(e) = tasks::enqueue_refund(&self.billing, refund_id).await {
            tracing::error!(%refund_id, error = %e, "could not enqueue the refund; the reconciler will");
        }
    }

    /// A second person approves (or rejects) a waiting refund.
    pub async fn decide(
        &self,
        staff: &Staff,
        lang: Lang,
        approval_id: Uuid,
        approve: bool,
        why: &Why,
    ) -> Outcome {
        let reason = why.check(lang)?;
        let mut tx = self.billing.db().begin().await?;
        let Some((payment_id, payer, amount, currency, asked_reason, requested_by, status)): Option<(
            Uuid,
            Uuid,
            i64,
            String,
            String,
            String,
            String,
        )> = sqlx::query_as(
            "SELECT payment_id, payer_id, amount_minor, currency::text, reason, requested_by, status
             FROM refund_approval WHERE id = $1 FOR UPDATE",
        )
        .bind(approval_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Err(refuse(lang, "Нет такого запроса.", "No such request."));
        };
        if seen(self, &why.key).await? {
            return Ok(Done::Repeated);
        }
        if status != "pending" {
            return Err(Refused(match lang {
                Lang::Ru => format!("Запрос уже рассмотрен ({status})."),
                Lang::En => format!("The request was already decided ({status})."),
            }));
        }
        if requested_by == staff.user {
            return Err(refuse(
                lang,
                "Одобряет другой сотрудник, не тот, кто запросил возврат.",
                "Another person must approve: not the one who asked for the refund.",
            ));
        }
        let action = if approve {
            "refund.approve"
        } else {
            "refund.reject"
        };
        let detail = json!({"approval_id": approval_id, "payment_id": payment_id, "amount_minor": amount, "currency": currency, "requested_by": requested_by});
        if !note(
            &mut tx,
            staff,
            action,
            payer.to_string(),
            &reason,
            detail,
            &why.key,
        )
        .await?
        {
            return Ok(Done::Repeated);
        }
        let now = self.billing.now();
        if !approve {
            sqlx::query(
                "UPDATE refund_approval SET status = 'rejected', decided_by = $2, decided_at = $3, decision_note = $4 WHERE id = $1",
            )
            .bind(approval_id)
            .bind(&staff.user)
            .bind(now)
            .bind(&reason)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(Done::Done(format!("rejected {approval_id}")));
        }
        let req = RefundRequest {
            payment_id,
            reason: asked_reason,
            requested_by: Requester::Staff(requested_by),
            idempotency_key: format!("approval:{approval_id}"),
        };
        let refund = refunds::request_in(
            &mut tx,
            &self.billing,
            &req,
            Some(amount),
            Some(approval_id),
        )
        .await?;
        sqlx::query(
            "UPDATE refund_approval SET status = 'approved', decided_by = $2, decided_at = $3, decision_note = $4, refund_id = $5
             WHERE id = $1",
        )
        .bind(approval_id)
        .bind(&staff.user)
        .bind(now)
        .bind(&reason)
        .bind(refund.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.enqueue_refund(refund.id).await;
        Ok(Done::Done(format!(
            "refund {} {}",
            refund.id, refund.amount
        )))
    }

    async fn subscription_payer(&self, lang: Lang, id: Uuid) -> Result<(Uuid, String), Refused> {
        sqlx::query_as("SELECT payer_id, status FROM subscription WHERE id = $1")
            .bind(id)
            .fetch_optional(self.billing.db())
            .await?
            .ok_or_else(|| refuse(lang, "Нет такой подписки.", "No such subscription."))
    }

    /// Cancels a subscription now (access ends, the role is revoked) or at the period's end
    /// (auto-renewal off).
    pub async fn cancel(
        &self,
        staff: &Staff,
        lang: Lang,
        subscription_id: Uuid,
        now: bool,
        why: &Why,
    ) -> Outcome {
        let reason = why.check(lang)?;
        let (payer, status) = self.subscription_payer(lang, subscription_id).await?;
        if !matches!(status.as_str(), "pending" | "active" | "past_due") {
            return Err(Refused(match lang {
                Lang::Ru => format!("Подписка уже закончилась ({status})."),
                Lang::En => format!("The subscription has already ended ({status})."),
            }));
        }
        if seen(self, &why.key).await? {
            return Ok(Done::Repeated);
        }
        let actor = Actor::Staff(&staff.user);
        let view = if now {
            self.service
                .cancel_now_by(payer, Some(reason.clone()), actor)
                .await?
        } else {
            self.service
                .cancel_by(payer, Some(reason.clone()), actor)
                .await?
        };
        let action = if now {
            "subscription.cancel_now"
        } else {
            "subscription.cancel_period_end"
        };
        let mut conn = self.billing.db().acquire().await?;
        note(
            &mut conn,
            staff,
            action,
            payer.to_string(),
            &reason,
            json!({"subscription_id": subscription_id}),
            &why.key,
        )
        .await?;
        Ok(Done::Done(format!(
            "subscription {} {:?}",
            view.id, view.status
        )))
    }

    /// Goodwill: moves the end of the paid period `days` later (and the renewal with it). A
    /// past-due subscription whose new end is in the future is active again.
    pub async fn extend(
        &self,
        staff: &Staff,
        lang: Lang,
        subscription_id: Uuid,
        days: &str,
        why: &Why,
    ) -> Outcome {
        let reason = why.check(lang)?;
        let days: i64 = match days.trim().parse::<i64>() {
            Ok(d) if (1..=365).contains(&d) => d,
            Ok(_) => {
                return Err(refuse(
                    lang,
                    "Продлить можно на 1–365 дней.",
                    "Extend by 1 to 365 days.",
                ));
            }
            Err(_) => {
                return Err(refuse(
                    lang,
                    "Число дней — целое число.",
                    "The days are a whole number.",
                ));
            }
        };
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        let Some((payer, status, end)): Option<(Uuid, String, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
            "SELECT payer_id, status, current_period_end FROM subscription WHERE id = $1 FOR UPDATE",
        )
        .bind(subscription_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Err(refuse(lang, "Нет такой подписки.", "No such subscription."));
        };
        let (status, Some(end)) = (SubscriptionStatus::parse(&status)?, end) else {
            return Err(refuse(
                lang,
                "У подписки нет оплаченного периода.",
                "The subscription has no paid period.",
            ));
        };
        if !matches!(
            status,
            SubscriptionStatus::Active | SubscriptionStatus::PastDue
        ) {
            return Err(refuse(
                lang,
                "Продлить можно только действующую подписку.",
                "Only a live subscription can be extended.",
            ));
        }
        let busy: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM invoice i JOIN payment p ON p.invoice_id = i.id
                 WHERE i.subscription_id = $1 AND p.status IN ('created', 'processing', 'awaiting_3ds'))",
        )
        .bind(subscription_id)
        .fetch_one(&mut *tx)
        .await?;
        if busy {
            return Err(refuse(
                lang,
                "Идёт списание — попробуйте после него.",
                "A payment is in progress; try after it finishes.",
            ));
        }
        let detail =
            json!({"subscription_id": subscription_id, "days": days, "period_end_before": end});
        if !note(
            &mut tx,
            staff,
            "subscription.extend",
            payer.to_string(),
            &reason,
            detail,
            &why.key,
        )
        .await?
        {
            return Ok(Done::Repeated);
        }
        let shift = Duration::days(days);
        let new_end = end + shift;
        let past_due_ends = status == SubscriptionStatus::PastDue && new_end > now;
        sqlx::query(
            "UPDATE subscription SET current_period_end = $2, updated_at = $3,
                    status = CASE WHEN $4 THEN 'active' ELSE status END,
                    grace_until = CASE WHEN $4 THEN NULL ELSE grace_until END
             WHERE id = $1",
        )
        .bind(subscription_id)
        .bind(new_end)
        .bind(now)
        .bind(past_due_ends)
        .execute(&mut *tx)
        .await?;
        // The renewal of the old end moves with it; it is charged a lead time before the new end.
        sqlx::query(
            "UPDATE invoice SET period_start = period_start + $2, period_end = period_end + $2,
                    next_attempt_at = greatest($3, period_start + $2 - $4), updated_at = $3
             WHERE subscription_id = $1 AND kind = 'renewal' AND status = 'open' AND period_start = $5",
        )
        .bind(subscription_id)
        .bind(shift)
        .bind(now)
        .bind(self.billing.policy().renewal_lead)
        .bind(end)
        .execute(&mut *tx)
        .await?;
        let to = if past_due_ends {
            SubscriptionStatus::Active
        } else {
            status
        };
        if past_due_ends {
            status.check(SubscriptionStatus::Active, "subscription")?;
        }
        ledger::record_transition(
            &mut tx,
            "subscription",
            subscription_id,
            Some(status.as_str()),
            to.as_str(),
            Actor::Staff(&staff.user),
            Some(&format!("extended by {days} days: {reason}")),
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Done::Done(format!("period end {}", format::utc(new_end))))
    }

    /// Charges an open renewal invoice now instead of at its next attempt.
    pub async fn retry_renewal(
        &self,
        staff: &Staff,
        lang: Lang,
        invoice_id: Uuid,
        why: &Why,
    ) -> Outcome {
        let reason = why.check(lang)?;
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        let Some((payer, status, kind)): Option<(Uuid, String, String)> =
            sqlx::query_as("SELECT payer_id, status, kind FROM invoice WHERE id = $1 FOR UPDATE")
                .bind(invoice_id)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Err(refuse(lang, "Нет такого счёта.", "No such invoice."));
        };
        if kind != "renewal" || InvoiceStatus::parse(&status)? != InvoiceStatus::Open {
            return Err(Refused(match lang {
                Lang::Ru => format!(
                    "Повторить можно только открытый счёт продления (этот: {kind}, {status})."
                ),
                Lang::En => format!(
                    "Only an open renewal invoice can be retried (this one: {kind}, {status})."
                ),
            }));
        }
        let detail = json!({"invoice_id": invoice_id});
        if !note(
            &mut tx,
            staff,
            "invoice.retry_now",
            payer.to_string(),
            &reason,
            detail,
            &why.key,
        )
        .await?
        {
            return Ok(Done::Repeated);
        }
        sqlx::query("UPDATE invoice SET next_attempt_at = $2, updated_at = $2 WHERE id = $1")
            .bind(invoice_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if let Err(e) =
            tasks::enqueue::<tasks::ChargeInvoice>(&self.billing, tasks::InvoiceArgs { invoice_id })
                .await
        {
            tracing::error!(%invoice_id, error = %e, "could not enqueue the renewal; the sweeper will");
        }
        Ok(Done::Done(format!("invoice {invoice_id} due now")))
    }

    /// Sends the auth service the subscription's current role state again (grant while it is
    /// live, revoke once it has ended), through the outbox.
    pub async fn resend_role(
        &self,
        staff: &Staff,
        lang: Lang,
        subscription_id: Uuid,
        why: &Why,
    ) -> Outcome {
        let reason = why.check(lang)?;
        let now = self.billing.now();
        let mut tx = self.billing.db().begin().await?;
        let Some((payer, status, role, until)): Option<(
            Uuid,
            String,
            String,
            Option<chrono::DateTime<chrono::Utc>>,
        )> = sqlx::query_as(
            "SELECT s.payer_id, s.status, t.role, coalesce(s.grace_until, s.current_period_end)
             FROM subscription s JOIN tariff t ON t.id = s.tariff_id WHERE s.id = $1",
        )
        .bind(subscription_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Err(refuse(lang, "Нет такой подписки.", "No such subscription."));
        };
        let grant = match status.as_str() {
            "active" | "past_due" => true,
            "expired" => false,
            _ => {
                return Err(refuse(
                    lang,
                    "Подписка не оплачивалась: роли не было.",
                    "The subscription was never paid: there is no role.",
                ));
            }
        };
        let topic = if grant {
            topic::AUTH_GRANT
        } else {
            topic::AUTH_REVOKE
        };
        let detail = json!({"subscription_id": subscription_id, "topic": topic, "role": role});
        if !note(
            &mut tx,
            staff,
            "role.resend",
            payer.to_string(),
            &reason,
            detail,
            &why.key,
        )
        .await?
        {
            return Ok(Done::Repeated);
        }
        ledger::enqueue_outbox(
            &mut tx,
            topic,
            &format!("{topic}:{subscription_id}:resend:{}", why.key.trim()),
            if grant {
                json!({"user_id": payer, "role": role, "until": until, "subscription_id": subscription_id})
            } else {
                json!({"user_id": payer, "role": role, "subscription_id": subscription_id, "reason": "resent by staff"})
            },
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Done::Done(format!("{topic} {role}")))
    }

    /// Marks a reconciliation finding or an unmatched notification resolved.
    pub async fn resolve(
        &self,
        staff: &Staff,
        lang: Lang,
        kind: &str,
        id: i64,
        why: &Why,
    ) -> Outcome {
        let reason = why.check(lang)?;
        let exists: bool = match kind {
            "finding" => sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM reconciliation_finding WHERE id = $1)"),
            "notification" => sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM gateway_event WHERE id = $1 AND outcome IN ('unmatched', 'unmatched refund'))",
            ),
            _ => return Err(refuse(lang, "Неизвестный вид записи.", "Unknown kind of item.")),
        }
        .bind(id)
        .fetch_one(self.billing.db())
        .await?;
        if !exists {
            return Err(refuse(lang, "Нет такой записи.", "No such item."));
        }
        let mut tx = self.billing.db().begin().await?;
        let detail = json!({"kind": kind, "id": id});
        if !note(
            &mut tx,
            staff,
            "mismatch.resolve",
            format!("{kind}:{id}"),
            &reason,
            detail,
            &why.key,
        )
        .await?
        {
            return Ok(Done::Repeated);
        }
        let inserted = sqlx::query(
            "INSERT INTO resolution (kind, item_id, resolved_by, resolved_at, note) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING",
        )
        .bind(kind)
        .bind(id)
        .bind(&staff.user)
        .bind(self.billing.now())
        .bind(&reason)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(refuse(lang, "Уже отмечено решённым.", "Already resolved."));
        }
        tx.commit().await?;
        Ok(Done::Done(format!("{kind} {id} resolved")))
    }

    /// Puts a dead outbox message back in the queue, its attempts reset.
    pub async fn redeliver(&self, staff: &Staff, lang: Lang, id: Uuid, why: &Why) -> Outcome {
        let reason = why.check(lang)?;
        let mut tx = self.billing.db().begin().await?;
        let Some((status, user)): Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT status, payload ->> 'user_id' FROM outbox WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Err(refuse(lang, "Нет такого сообщения.", "No such message."));
        };
        if status != "dead" {
            return Err(Refused(match lang {
                Lang::Ru => format!("Сообщение не в недоставленных ({status})."),
                Lang::En => format!("The message is not dead ({status})."),
            }));
        }
        let detail = json!({"outbox_id": id});
        let target = user.unwrap_or_else(|| format!("outbox:{id}"));
        if !note(
            &mut tx,
            staff,
            "outbox.redeliver",
            target,
            &reason,
            detail,
            &why.key,
        )
        .await?
        {
            return Ok(Done::Repeated);
        }
        sqlx::query(
            "UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2, last_error = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(self.billing.now())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Done::Done(format!("outbox {id} pending")))
    }
}

fn too_much(lang: Lang, left: i64, currency: &str) -> Refused {
    let left = format::money(left.max(0), currency, lang);
    Refused(match lang {
        Lang::Ru => format!("Можно вернуть не больше {left}."),
        Lang::En => format!("At most {left} can be refunded."),
    })
}
