//! What the back-office reads: the search, the payer's page, the lists with their filters and
//! keyset pages, the queues that need a person, the notification log, the reports. Each list is
//! served by an index of migration 0009 (see `backoffice_bench` for the figures at 1,000,000
//! payments).

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use super::format;
use crate::error::Result;

/// Rows a list page shows.
pub const PAGE: i64 = 50;

/// A payment as the lists show it (never card data: the mask and expiry only).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PaymentRow {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub payer_id: Uuid,
    pub invoice_id: Uuid,
    pub subscription_id: Uuid,
    pub kind: String,
    pub attempt: i32,
    pub status: String,
    pub amount_minor: i64,
    pub currency: String,
    pub gateway_transaction_id: Option<i64>,
    pub reason_code: Option<i32>,
    pub reason: Option<String>,
    pub tariff: String,
    pub card_mask: Option<String>,
    pub card_exp: Option<String>,
    pub refunded_minor: i64,
}

const PAYMENT_SELECT: &str = r#"
    SELECT p.id, p.created_at, i.payer_id, p.invoice_id, i.subscription_id, i.kind, p.attempt, p.status,
           p.amount_minor, p.currency::text AS currency, p.gateway_transaction_id, p.reason_code, p.reason,
           t.code AS tariff, pm.card_mask, pm.card_exp,
           (SELECT coalesce(sum(r.amount_minor), 0)::bigint FROM refund r
             WHERE r.payment_id = p.id AND r.status <> 'failed') AS refunded_minor
    FROM payment p
    JOIN invoice i ON i.id = p.invoice_id
    JOIN subscription s ON s.id = i.subscription_id
    JOIN tariff t ON t.id = s.tariff_id
    LEFT JOIN payment_method pm ON pm.id = p.payment_method_id"#;

/// The payments list's filter (every part optional), and where its page starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PaymentFilter {
    pub status: Option<String>,
    pub amount_min: Option<i64>,
    pub amount_max: Option<i64>,
    /// Moscow days, inclusive.
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub reason_code: Option<i32>,
    pub tariff: Option<String>,
    pub payer: Option<Uuid>,
    pub amount: Option<i64>,
    pub transaction_id: Option<i64>,
    pub last_four: Option<String>,
    pub card_exp: Option<String>,
    /// Rows older than this `(created_at, id)`.
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

/// One page of payments matching `f`, newest first; `limit + 1` are read to know whether a
/// next page exists.
pub async fn payments(db: &PgPool, f: &PaymentFilter, limit: i64) -> Result<Vec<PaymentRow>> {
    let (from, to) = day_range(f.from, f.to);
    let sql = format!(
        "{PAYMENT_SELECT}
         WHERE ($1::text IS NULL OR p.status = $1)
           AND ($2::bigint IS NULL OR p.amount_minor >= $2)
           AND ($3::bigint IS NULL OR p.amount_minor <= $3)
           AND ($4::timestamptz IS NULL OR p.created_at >= $4)
           AND ($5::timestamptz IS NULL OR p.created_at < $5)
           AND ($6::int IS NULL OR p.reason_code = $6)
           AND ($7::text IS NULL OR t.code = $7)
           AND ($8::uuid IS NULL OR i.payer_id = $8)
           AND ($9::bigint IS NULL OR p.amount_minor = $9)
           AND ($10::bigint IS NULL OR p.gateway_transaction_id = $10)
           AND ($11::text IS NULL OR right(pm.card_mask, 4) = $11)
           AND ($12::text IS NULL OR pm.card_exp = $12)
           AND ($13::timestamptz IS NULL OR (p.created_at, p.id) < ($13, $14))
         ORDER BY p.created_at DESC, p.id DESC
         LIMIT $15"
    );
    // Not a prepared statement: every call is planned for its own filter (a generic plan of the
    // `$n IS NULL OR ...` shape cannot use the indexes; see backoffice_bench).
    Ok(sqlx::query_as::<_, PaymentRow>(sqlx::AssertSqlSafe(sql))
        .persistent(false)
        .bind(&f.status)
        .bind(f.amount_min)
        .bind(f.amount_max)
        .bind(from)
        .bind(to)
        .bind(f.reason_code)
        .bind(&f.tariff)
        .bind(f.payer)
        .bind(f.amount)
        .bind(f.transaction_id)
        .bind(&f.last_four)
        .bind(&f.card_exp)
        .bind(f.after.map(|a| a.0))
        .bind(f.after.map(|a| a.1))
        .bind(limit)
        .fetch_all(db)
        .await?)
}

fn day_range(
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    (
        from.map(format::day_start),
        to.map(|d| format::day_start(d) + Duration::days(1)),
    )
}

/// An invoice in the lists.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InvoiceRow {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub payer_id: Uuid,
    pub subscription_id: Uuid,
    pub kind: String,
    pub status: String,
    pub amount_minor: i64,
    pub currency: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub attempt_count: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// The invoices list's filter.
#[derive(Debug, Clone, Default)]
pub struct InvoiceFilter {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub payer: Option<Uuid>,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

/// One page of invoices, newest first.
pub async fn invoices(db: &PgPool, f: &InvoiceFilter, limit: i64) -> Result<Vec<InvoiceRow>> {
    let (from, to) = day_range(f.from, f.to);
    Ok(sqlx::query_as::<_, InvoiceRow>(
        "SELECT id, created_at, payer_id, subscription_id, kind, status, amount_minor, currency::text AS currency,
                period_start, period_end, attempt_count, next_attempt_at
         FROM invoice
         WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR kind = $2)
           AND ($3::uuid IS NULL OR payer_id = $3)
           AND ($4::timestamptz IS NULL OR created_at >= $4) AND ($5::timestamptz IS NULL OR created_at < $5)
           AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7))
         ORDER BY created_at DESC, id DESC LIMIT $8",
    )
    .bind(&f.status)
    .bind(&f.kind)
    .bind(f.payer)
    .bind(from)
    .bind(to)
    .bind(f.after.map(|a| a.0))
    .bind(f.after.map(|a| a.1))
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// A refund in the lists.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RefundRow {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub payment_id: Uuid,
    pub payer_id: Uuid,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub reason: String,
    pub requested_by: String,
    pub gateway_transaction_id: Option<i64>,
    pub failure: Option<String>,
}

/// The refunds list's filter.
#[derive(Debug, Clone, Default)]
pub struct RefundFilter {
    pub status: Option<String>,
    pub payer: Option<Uuid>,
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

/// One page of refunds, newest first.
pub async fn refunds(db: &PgPool, f: &RefundFilter, limit: i64) -> Result<Vec<RefundRow>> {
    let (from, to) = day_range(f.from, f.to);
    Ok(sqlx::query_as::<_, RefundRow>(
        "SELECT r.id, r.created_at, r.payment_id, i.payer_id, r.amount_minor, r.currency::text AS currency, r.status,
                r.reason, r.requested_by, r.gateway_transaction_id, r.failure
         FROM refund r JOIN payment p ON p.id = r.payment_id JOIN invoice i ON i.id = p.invoice_id
         WHERE ($1::text IS NULL OR r.status = $1) AND ($2::uuid IS NULL OR i.payer_id = $2)
           AND ($3::timestamptz IS NULL OR r.created_at >= $3) AND ($4::timestamptz IS NULL OR r.created_at < $4)
           AND ($5::timestamptz IS NULL OR (r.created_at, r.id) < ($5, $6))
         ORDER BY r.created_at DESC, r.id DESC LIMIT $7",
    )
    .bind(&f.status)
    .bind(f.payer)
    .bind(from)
    .bind(to)
    .bind(f.after.map(|a| a.0))
    .bind(f.after.map(|a| a.1))
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// A subscription in the lists.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SubscriptionRow {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub payer_id: Uuid,
    pub status: String,
    pub auto_renew: bool,
    pub tariff: String,
    pub current_period_start: Option<DateTime<Utc>>,
    pub current_period_end: Option<DateTime<Utc>>,
    pub grace_until: Option<DateTime<Utc>>,
    pub cancel_reason: Option<String>,
}

/// The subscriptions list's filter.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionFilter {
    pub status: Option<String>,
    pub payer: Option<Uuid>,
    /// Renewing (period ending) between these Moscow days.
    pub renews_from: Option<NaiveDate>,
    pub renews_to: Option<NaiveDate>,
    pub past_due: bool,
    pub after: Option<(DateTime<Utc>, Uuid)>,
}

/// One page of subscriptions, newest first.
pub async fn subscriptions(
    db: &PgPool,
    f: &SubscriptionFilter,
    limit: i64,
) -> Result<Vec<SubscriptionRow>> {
    let (from, to) = day_range(f.renews_from, f.renews_to);
    Ok(sqlx::query_as::<_, SubscriptionRow>(
        "SELECT s.id, s.created_at, s.payer_id, s.status, s.auto_renew, t.code AS tariff,
                s.current_period_start, s.current_period_end, s.grace_until, s.cancel_reason
         FROM subscription s JOIN tariff t ON t.id = s.tariff_id
         WHERE ($1::text IS NULL OR s.status = $1) AND ($2::uuid IS NULL OR s.payer_id = $2)
           AND ($3::timestamptz IS NULL OR s.current_period_end >= $3)
           AND ($4::timestamptz IS NULL OR s.current_period_end < $4)
           AND (NOT $5 OR s.status = 'past_due')
           AND ($6::timestamptz IS NULL OR (s.created_at, s.id) < ($6, $7))
         ORDER BY s.created_at DESC, s.id DESC LIMIT $8",
    )
    .bind(&f.status)
    .bind(f.payer)
    .bind(from)
    .bind(to)
    .bind(f.past_due)
    .bind(f.after.map(|a| a.0))
    .bind(f.after.map(|a| a.1))
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// What a search box query asks for, term by term.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pub ids: Vec<Uuid>,
    pub payments: PaymentFilter,
    pub emails: Vec<String>,
    /// Terms that mean nothing we know.
    pub unknown: Vec<String>,
}

impl Query {
    /// Reads the terms: a UUID (payer, subscription, invoice, payment, refund), a number of 5+
    /// digits (a gateway TransactionId), 4 digits (card last four), `MM/YY` (card expiry), an
    /// amount with a decimal separator or `₽` (`499,00`, `499₽`), a date (`2026-12-01` or
    /// `01.12.2026`, a Moscow day), an email.
    pub fn parse(q: &str) -> Query {
        let mut out = Query::default();
        for term in q.split_whitespace() {
            let p = &mut out.payments;
            if let Ok(id) = Uuid::parse_str(term) {
                out.ids.push(id);
            } else if term.contains('@') {
                out.emails.push(term.to_lowercase());
            } else if term.len() == 4 && term.chars().all(|c| c.is_ascii_digit()) {
                p.last_four = Some(term.to_owned());
            } else if term.len() >= 5
                && term.len() <= 18
                && term.chars().all(|c| c.is_ascii_digit())
            {
                p.transaction_id = term.parse().ok();
            } else if is_expiry(term) {
                p.card_exp = Some(term.to_owned());
            } else if let Some(day) = parse_day(term) {
                p.from = Some(day);
                p.to = Some(day);
            } else if (term.contains([',', '.']) || term.ends_with('₽'))
                && let Ok(minor) = format::parse_roubles(term)
            {
                p.amount = Some(minor);
            } else {
                out.unknown.push(term.to_owned());
            }
        }
        out
    }

    fn has_payment_terms(&self) -> bool {
        let p = &self.payments;
        p.last_four.is_some()
            || p.transaction_id.is_some()
            || p.card_exp.is_some()
            || p.from.is_some()
            || p.amount.is_some()
    }
}

fn is_expiry(term: &str) -> bool {
    let b = term.as_bytes();
    b.len() == 5
        && b[2] == b'/'
        && b[..2].iter().chain(&b[3..]).all(u8::is_ascii_digit)
        && matches!(
            &term[..2],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        )
}

/// `2026-12-01` or `01.12.2026`.
pub fn parse_day(term: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(term, "%Y-%m-%d")
        .or_else(|_| NaiveDate::parse_from_str(term, "%d.%m.%Y"))
        .ok()
}

/// A card's payer, email, mask and expiry.
type CardOwner = (Uuid, Option<String>, Option<String>, Option<String>);

/// A `status_history` row: at, entity, id, from, to, actor, reason.
type HistoryRow = (
    DateTime<Utc>,
    String,
    Uuid,
    Option<String>,
    String,
    String,
    Option<String>,
);

/// A payer found by the search, with why.
#[derive(Debug, Clone)]
pub struct PayerHit {
    pub id: Uuid,
    pub email: Option<String>,
    pub matched: String,
}

/// What a search found.
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub payers: Vec<PayerHit>,
    pub payments: Vec<PaymentRow>,
    pub unknown: Vec<String>,
}

/// Runs a search (see [`Query::parse`]).
pub async fn search(db: &PgPool, q: &str) -> Result<Found> {
    let query = Query::parse(q);
    let mut found = Found {
        unknown: query.unknown.clone(),
        ..Found::default()
    };
    let mut hit = |id: Uuid, email: Option<String>, matched: String| {
        if !found.payers.iter().any(|p| p.id == id) {
            found.payers.push(PayerHit { id, email, matched });
        }
    };
    for id in &query.ids {
        let rows: Vec<(Uuid, Option<String>, String)> = sqlx::query_as(
            "SELECT py.id, py.email, m.what FROM (
                 SELECT id AS payer, 'payer' AS what FROM payer WHERE id = $1
                 UNION ALL SELECT payer_id, 'subscription' FROM subscription WHERE id = $1
                 UNION ALL SELECT payer_id, 'invoice' FROM invoice WHERE id = $1
                 UNION ALL SELECT i.payer_id, 'payment' FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE p.id = $1
                 UNION ALL SELECT i.payer_id, 'refund' FROM refund r JOIN payment p ON p.id = r.payment_id
                           JOIN invoice i ON i.id = p.invoice_id WHERE r.id = $1
             ) m JOIN payer py ON py.id = m.payer",
        )
        .bind(id)
        .fetch_all(db)
        .await?;
        for (payer, email, what) in rows {
            hit(payer, email, format!("{what} {id}"));
        }
    }
    for email in &query.emails {
        let rows: Vec<(Uuid, Option<String>)> =
            sqlx::query_as("SELECT id, email FROM payer WHERE lower(email) = $1 LIMIT 20")
                .bind(email)
                .fetch_all(db)
                .await?;
        for (payer, e) in rows {
            hit(payer, e, email.clone());
        }
    }
    if let Some(txn) = query.payments.transaction_id {
        // A refund's TransactionId leads to its payer too.
        let rows: Vec<(Uuid, Option<String>)> = sqlx::query_as(
            "SELECT py.id, py.email FROM refund r JOIN payment p ON p.id = r.payment_id
             JOIN invoice i ON i.id = p.invoice_id JOIN payer py ON py.id = i.payer_id
             WHERE r.gateway_transaction_id = $1",
        )
        .bind(txn)
        .fetch_all(db)
        .await?;
        for (payer, e) in rows {
            hit(payer, e, format!("refund TransactionId {txn}"));
        }
    }
    if query.has_payment_terms() {
        if query.payments.last_four.is_some() || query.payments.card_exp.is_some() {
            let rows: Vec<CardOwner> = sqlx::query_as(
                "SELECT py.id, py.email, pm.card_mask, pm.card_exp FROM payment_method pm JOIN payer py ON py.id = pm.payer_id
                 WHERE ($1::text IS NULL OR right(pm.card_mask, 4) = $1) AND ($2::text IS NULL OR pm.card_exp = $2)
                 LIMIT 50",
            )
            .bind(&query.payments.last_four)
            .bind(&query.payments.card_exp)
            .fetch_all(db)
            .await?;
            for (payer, e, mask, exp) in rows {
                hit(
                    payer,
                    e,
                    format!("{} {}", mask.unwrap_or_default(), exp.unwrap_or_default()),
                );
            }
        }
        found.payments = payments(db, &query.payments, PAGE).await?;
        for p in &found.payments {
            hit(p.payer_id, None, format!("payment {}", p.id));
        }
    }
    Ok(found)
}

/// The payer, for the page's head.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Payer {
    pub id: Uuid,
    pub email: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A saved card, as shown: mask, type, expiry.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CardRow {
    pub id: Uuid,
    pub card_mask: Option<String>,
    pub card_type: Option<String>,
    pub card_exp: Option<String>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A gateway notification.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub kind: String,
    pub gateway_transaction_id: Option<i64>,
    pub invoice_id: Option<String>,
    pub received_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
    pub amount: Option<String>,
    pub resolved_by: Option<String>,
}

/// An outbox message.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: Uuid,
    pub topic: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub user_id: Option<String>,
}

/// A line of the payer's timeline.
#[derive(Debug, Clone)]
pub struct Moment {
    pub at: DateTime<Utc>,
    pub what: String,
    pub who: String,
    pub why: String,
    pub link: Option<String>,
}

/// Everything on the payer's page.
#[derive(Debug, Clone)]
pub struct PayerPage {
    pub payer: Payer,
    pub cards: Vec<CardRow>,
    pub subscriptions: Vec<SubscriptionRow>,
    pub invoices: Vec<InvoiceRow>,
    pub payments: Vec<PaymentRow>,
    pub refunds: Vec<RefundRow>,
    pub approvals: Vec<ApprovalRow>,
    pub events: Vec<EventRow>,
    pub outbox: Vec<OutboxRow>,
    pub audit: Vec<staff_auth::audit::Entry>,
    pub timeline: Vec<Moment>,
}

/// Reads the payer's page; `None` for an unknown payer.
pub async fn payer_page(db: &PgPool, id: Uuid) -> Result<Option<PayerPage>> {
    let Some(payer) =
        sqlx::query_as::<_, Payer>("SELECT id, email, created_at FROM payer WHERE id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?
    else {
        return Ok(None);
    };
    // The sections are independent reads: asked for together.
    let cards = sqlx::query_as::<_, CardRow>(
        "SELECT id, card_mask, card_type, card_exp, revoked_at, created_at FROM payment_method
         WHERE payer_id = $1 ORDER BY created_at DESC",
    )
    .bind(id)
    .fetch_all(db);
    let by_subscription = SubscriptionFilter {
        payer: Some(id),
        ..SubscriptionFilter::default()
    };
    let by_invoice = InvoiceFilter {
        payer: Some(id),
        ..InvoiceFilter::default()
    };
    let by_payment = PaymentFilter {
        payer: Some(id),
        ..PaymentFilter::default()
    };
    let by_refund = RefundFilter {
        payer: Some(id),
        ..RefundFilter::default()
    };
    let (cards, subscriptions, invoices, payments, refunds, approvals) = tokio::try_join!(
        async { Ok::<_, crate::BillingError>(cards.await?) },
        subscriptions(db, &by_subscription, 200),
        invoices(db, &by_invoice, 500),
        payments(db, &by_payment, 500),
        refunds(db, &by_refund, 500),
        approvals(db, Some(id), false),
    )?;
    let txns: Vec<i64> = payments
        .iter()
        .filter_map(|p| p.gateway_transaction_id)
        .chain(refunds.iter().filter_map(|r| r.gateway_transaction_id))
        .collect();
    let invoice_ids: Vec<String> = invoices.iter().map(|i| i.id.to_string()).collect();
    let events = sqlx::query_as::<_, EventRow>(
        "SELECT e.id, e.kind, e.gateway_transaction_id, e.invoice_id, e.received_at, e.processed_at, e.outcome,
                e.payload ->> 'Amount' AS amount, r.resolved_by
         FROM gateway_event e LEFT JOIN resolution r ON r.kind = 'notification' AND r.item_id = e.id
         WHERE e.gateway_transaction_id = ANY($1) OR e.invoice_id = ANY($2) OR e.payload ->> 'AccountId' = $3
         ORDER BY e.received_at DESC LIMIT 500",
    )
    .bind(&txns)
    .bind(&invoice_ids)
    .bind(id.to_string())
    .fetch_all(db)
    .await?;
    let outbox = sqlx::query_as::<_, OutboxRow>(
        "SELECT id, topic, status, attempts, last_error, created_at, delivered_at, payload ->> 'user_id' AS user_id
         FROM outbox WHERE payload ->> 'user_id' = $1 ORDER BY created_at DESC LIMIT 500",
    )
    .bind(id.to_string())
    .fetch_all(db)
    .await?;
    let audit = staff_auth::audit::page(db, None, Some(&[id.to_string()]), 500).await?;

    let mut entity_ids: Vec<Uuid> = subscriptions.iter().map(|s| s.id).collect();
    entity_ids.extend(invoices.iter().map(|i| i.id));
    entity_ids.extend(payments.iter().map(|p| p.id));
    entity_ids.extend(refunds.iter().map(|r| r.id));
    let history: Vec<HistoryRow> = sqlx::query_as(
        "SELECT at, entity, entity_id, from_status, to_status, actor, reason FROM status_history
             WHERE entity_id = ANY($1) ORDER BY at DESC, id DESC LIMIT 2000",
    )
    .bind(&entity_ids)
    .fetch_all(db)
    .await?;
    let mut timeline: Vec<Moment> = history
        .into_iter()
        .map(|(at, entity, eid, from, to, actor, reason)| Moment {
            at,
            what: match from {
                Some(from) if from != to => format!("{entity} {}: {from} → {to}", short(eid)),
                Some(_) => format!("{entity} {}: {to}", short(eid)),
                None => format!("{entity} {}: {to}", short(eid)),
            },
            who: actor,
            why: reason.unwrap_or_default(),
            link: None,
        })
        .collect();
    timeline.extend(events.iter().map(|e| Moment {
        at: e.received_at,
        what: format!(
            "gateway {} {}",
            e.kind,
            e.gateway_transaction_id.map(|t| t.to_string()).unwrap_or_default()
        ),
        who: "gateway".into(),
        why: e.outcome.clone().unwrap_or_default(),
        link: None,
    }));
    timeline.extend(outbox.iter().map(|o| Moment {
        at: o.created_at,
        what: format!("outbox {} ({})", o.topic, o.status),
        who: "billing".into(),
        why: o.last_error.clone().unwrap_or_default(),
        link: None,
    }));
    timeline.extend(audit.iter().map(|a| Moment {
        at: a.at,
        what: a.action.clone(),
        who: a.actor.clone(),
        why: a.reason.clone().unwrap_or_default(),
        link: None,
    }));
    timeline.sort_by_key(|m| std::cmp::Reverse(m.at));
    Ok(Some(PayerPage {
        payer,
        cards,
        subscriptions,
        invoices,
        payments,
        refunds,
        approvals,
        events,
        outbox,
        audit,
        timeline,
    }))
}

/// The last 8 hex digits of a UUID, for dense tables (the full id is on hover; the first
/// digits of a v7 id are its time, the same for ids made together).
pub fn short(id: Uuid) -> String {
    id.simple().to_string()[24..].to_owned()
}

/// A refund waiting for (or given) a second person's approval.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ApprovalRow {
    pub id: Uuid,
    pub payment_id: Uuid,
    pub payer_id: Uuid,
    pub amount_minor: i64,
    pub currency: String,
    pub reason: String,
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    pub status: String,
    pub decided_by: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub refund_id: Option<Uuid>,
}

/// Approval requests: of one payer (all) or everyone's pending ones.
pub async fn approvals(
    db: &PgPool,
    payer: Option<Uuid>,
    pending_only: bool,
) -> Result<Vec<ApprovalRow>> {
    Ok(sqlx::query_as::<_, ApprovalRow>(
        "SELECT id, payment_id, payer_id, amount_minor, currency::text AS currency, reason, requested_by,
                requested_at, status, decided_by, decided_at, refund_id
         FROM refund_approval
         WHERE ($1::uuid IS NULL OR payer_id = $1) AND (NOT $2 OR status = 'pending')
         ORDER BY requested_at DESC LIMIT 500",
    )
    .bind(payer)
    .bind(pending_only)
    .fetch_all(db)
    .await?)
}

/// How many items wait in each queue that needs a person.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub stuck: i64,
    pub unmatched: i64,
    pub mismatches: i64,
    pub dead_outbox: i64,
    pub approvals: i64,
}

/// Payments count as stuck once they have been `processing` longer than this.
pub fn stuck_after(billing: &crate::Billing) -> Duration {
    billing.policy().gateway_max_processing + billing.policy().processing_lease
}

/// The counts on the home page.
pub async fn counts(db: &PgPool, stuck_before: DateTime<Utc>) -> Result<Counts> {
    let (stuck, unmatched, mismatches, dead_outbox, approvals): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT
               (SELECT count(*) FROM payment WHERE status = 'processing' AND sent_at < $1),
               (SELECT count(*) FROM gateway_event e WHERE e.outcome IN ('unmatched', 'unmatched refund')
                  AND NOT EXISTS (SELECT 1 FROM resolution r WHERE r.kind = 'notification' AND r.item_id = e.id)),
               (SELECT count(*) FROM reconciliation_finding f
                  WHERE NOT EXISTS (SELECT 1 FROM resolution r WHERE r.kind = 'finding' AND r.item_id = f.id)),
               (SELECT count(*) FROM outbox WHERE status = 'dead'),
               (SELECT count(*) FROM refund_approval WHERE status = 'pending')",
        )
        .bind(stuck_before)
        .fetch_one(db)
        .await?;
    Ok(Counts {
        stuck,
        unmatched,
        mismatches,
        dead_outbox,
        approvals,
    })
}

/// Payments `processing` since before `before`.
pub async fn stuck(db: &PgPool, before: DateTime<Utc>) -> Result<Vec<PaymentRow>> {
    Ok(sqlx::query_as::<_, PaymentRow>(sqlx::AssertSqlSafe(format!(
        "{PAYMENT_SELECT} WHERE p.status = 'processing' AND p.sent_at < $1 ORDER BY p.sent_at LIMIT 500"
    )))
    .bind(before)
    .fetch_all(db)
    .await?)
}

/// Unmatched notifications not yet resolved.
pub async fn unmatched(db: &PgPool) -> Result<Vec<EventRow>> {
    Ok(sqlx::query_as::<_, EventRow>(
        "SELECT e.id, e.kind, e.gateway_transaction_id, e.invoice_id, e.received_at, e.processed_at, e.outcome,
                e.payload ->> 'Amount' AS amount, NULL::text AS resolved_by
         FROM gateway_event e
         WHERE e.outcome IN ('unmatched', 'unmatched refund')
           AND NOT EXISTS (SELECT 1 FROM resolution r WHERE r.kind = 'notification' AND r.item_id = e.id)
         ORDER BY e.received_at LIMIT 500",
    )
    .fetch_all(db)
    .await?)
}

/// A reconciliation finding.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FindingRow {
    pub id: i64,
    pub day: NaiveDate,
    pub kind: String,
    pub gateway_transaction_id: Option<i64>,
    pub ledger_id: Option<Uuid>,
    pub amount_minor: Option<i64>,
    pub currency: Option<String>,
    pub detail: String,
    pub found_at: DateTime<Utc>,
    pub resolved_by: Option<String>,
    pub note: Option<String>,
}

/// Findings: the unresolved ones, or every one of a day range.
pub async fn findings(
    db: &PgPool,
    unresolved: bool,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> Result<Vec<FindingRow>> {
    Ok(sqlx::query_as::<_, FindingRow>(
        "SELECT f.id, f.day, f.kind, f.gateway_transaction_id, f.ledger_id, f.amount_minor, f.currency::text AS currency,
                f.detail, f.found_at, r.resolved_by, r.note
         FROM reconciliation_finding f LEFT JOIN resolution r ON r.kind = 'finding' AND r.item_id = f.id
         WHERE (NOT $1 OR r.item_id IS NULL) AND ($2::date IS NULL OR f.day >= $2) AND ($3::date IS NULL OR f.day <= $3)
         ORDER BY f.day DESC, f.id LIMIT 1000",
    )
    .bind(unresolved)
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await?)
}

/// Dead outbox messages.
pub async fn dead_outbox(db: &PgPool) -> Result<Vec<OutboxRow>> {
    Ok(sqlx::query_as::<_, OutboxRow>(
        "SELECT id, topic, status, attempts, last_error, created_at, delivered_at, payload ->> 'user_id' AS user_id
         FROM outbox WHERE status = 'dead' ORDER BY created_at LIMIT 500",
    )
    .fetch_all(db)
    .await?)
}

/// A webhook delivery, with the ledger change its notification made.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReceiptRow {
    pub id: i64,
    pub received_at: DateTime<Utc>,
    pub kind: String,
    pub hmac_ok: bool,
    pub http_status: i32,
    pub answer: String,
    pub gateway_transaction_id: Option<i64>,
    pub event_id: Option<i64>,
    pub outcome: Option<String>,
    pub invoice_id: Option<String>,
}

/// The notification log, newest first, older than receipt `before`.
pub async fn receipts(
    db: &PgPool,
    before: Option<i64>,
    hmac_failed: bool,
) -> Result<Vec<ReceiptRow>> {
    Ok(sqlx::query_as::<_, ReceiptRow>(
        "SELECT w.id, w.received_at, w.kind, w.hmac_ok, w.http_status, w.answer, w.gateway_transaction_id,
                w.event_id, e.outcome, e.invoice_id
         FROM webhook_receipt w LEFT JOIN gateway_event e ON e.id = w.event_id
         WHERE ($1::bigint IS NULL OR w.id < $1) AND (NOT $2 OR NOT w.hmac_ok)
         ORDER BY w.id DESC LIMIT $3",
    )
    .bind(before)
    .bind(hmac_failed)
    .bind(PAGE + 1)
    .fetch_all(db)
    .await?)
}

/// One line of a report: a Moscow day or month, a tariff (or all), the totals.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReportRow {
    pub period: NaiveDate,
    pub tariff: String,
    pub currency: String,
    pub payments: i64,
    pub charged_minor: i64,
    pub refunds: i64,
    pub refunded_minor: i64,
}

impl ReportRow {
    /// Charged less refunded.
    pub fn net_minor(&self) -> i64 {
        self.charged_minor - self.refunded_minor
    }
}

/// Totals by Moscow day (`monthly`: by month) between two days, per tariff and overall
/// (`tariff` = `*`). Money charged counts when the payment succeeded, refunded when the
/// refund did.
pub async fn report(
    db: &PgPool,
    from: NaiveDate,
    to: NaiveDate,
    monthly: bool,
) -> Result<Vec<ReportRow>> {
    let unit = if monthly { "month" } else { "day" };
    Ok(sqlx::query_as::<_, ReportRow>(
        "WITH moves AS (
             SELECT date_trunc($3, p.completed_at AT TIME ZONE 'Europe/Moscow')::date AS period, t.code AS tariff,
                    p.currency::text AS currency, 1 AS payments, p.amount_minor AS charged, 0 AS refunds, 0::bigint AS refunded
             FROM payment p JOIN invoice i ON i.id = p.invoice_id JOIN subscription s ON s.id = i.subscription_id
             JOIN tariff t ON t.id = s.tariff_id
             WHERE p.status = 'succeeded' AND p.completed_at >= $1 AND p.completed_at < $2
             UNION ALL
             SELECT date_trunc($3, r.updated_at AT TIME ZONE 'Europe/Moscow')::date, t.code, r.currency::text, 0, 0, 1, r.amount_minor
             FROM refund r JOIN payment p ON p.id = r.payment_id JOIN invoice i ON i.id = p.invoice_id
             JOIN subscription s ON s.id = i.subscription_id JOIN tariff t ON t.id = s.tariff_id
             WHERE r.status = 'succeeded' AND r.updated_at >= $1 AND r.updated_at < $2)
         SELECT period, coalesce(tariff, '*') AS tariff, currency, sum(payments)::bigint AS payments,
                sum(charged)::bigint AS charged_minor, sum(refunds)::bigint AS refunds, sum(refunded)::bigint AS refunded_minor
         FROM moves GROUP BY GROUPING SETS ((period, currency, tariff), (period, currency))
         ORDER BY period DESC, currency, tariff NULLS FIRST",
    )
    .bind(format::day_start(from))
    .bind(format::day_start(to) + Duration::days(1))
    .bind(unit)
    .fetch_all(db)
    .await?)
}

/// The staff actions of the audit log, newest first.
pub async fn audit(db: &PgPool, before: Option<i64>) -> Result<Vec<staff_auth::audit::Entry>> {
    Ok(staff_auth::audit::page(db, before, None, PAGE + 1).await?)
}

/// An outbox message's payload (for a resend).
pub async fn outbox_payload(db: &PgPool, id: Uuid) -> Result<Option<(String, Value, String)>> {
    Ok(
        sqlx::query_as("SELECT topic, payload, status FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}
