//! The daily comparison of the gateway's books with the ledger.
//!
//! Every other path learns about money one attempt at a time; this one asks the gateway for
//! everything it did on a day (`payments/list`) and checks it against the ledger both ways, so
//! what slipped through every other net still reaches accounting:
//! - money the gateway took that the ledger does not show as paid (or shows with another amount);
//! - ledger successes the gateway does not have;
//! - the same for refunds.
//!
//! A ledger success the day's list lacks is checked once more with `payments/get` (the gateway may
//! have dated it the day before, a lookup may have settled it the day after). Each mismatch is a
//! `reconciliation_finding` row and one accounting message; running a day again adds nothing.

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::cloudpayments::{Transaction, TransactionStatus};
use crate::context::Billing;
use crate::error::{BillingError, Result};
use crate::ledger::{self, topic};

/// What one day's reconciliation found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DayReport {
    /// Operations the gateway listed for the day.
    pub gateway_operations: u64,
    /// Ledger successes (payments and refunds) of the day.
    pub ledger_successes: u64,
    /// Mismatches found (new and already known).
    pub mismatches: u64,
    /// Of those, first found by this run.
    pub new_findings: u64,
}

struct Finding {
    kind: &'static str,
    gateway_transaction_id: Option<i64>,
    ledger_id: Option<Uuid>,
    amount_minor: Option<i64>,
    currency: Option<String>,
    detail: String,
}

fn is_refund(t: &Transaction) -> bool {
    t.original_transaction_id.is_some()
}

fn money_moved(t: &Transaction) -> bool {
    matches!(
        t.status,
        TransactionStatus::Completed | TransactionStatus::Authorized
    )
}

/// Compares the gateway's operations of `day` (UTC) with the ledger and records every mismatch.
pub async fn reconcile_day(billing: &Billing, day: NaiveDate) -> Result<DayReport> {
    let operations = billing
        .gateway()
        .list(day)
        .await
        .map_err(|e| BillingError::Unavailable(format!("payments/list for {day}: {e}")))?;
    let mut report = DayReport {
        gateway_operations: operations.len() as u64,
        ..DayReport::default()
    };
    let mut findings = Vec::new();
    let listed: std::collections::HashSet<i64> =
        operations.iter().map(|t| t.transaction_id).collect();

    // The gateway's side: every operation that moved money is in the ledger, as a success, with
    // its amount.
    for t in operations.iter().filter(|t| money_moved(t)) {
        let (table, what) = if is_refund(t) {
            ("refund", "refund")
        } else {
            ("payment", "payment")
        };
        let row = sqlx::query_as::<_, (Uuid, String, i64, String)>(sqlx::AssertSqlSafe(format!(
            "SELECT id, status, amount_minor, currency::text FROM {table} WHERE gateway_transaction_id = $1"
        )))
        .bind(t.transaction_id)
        .fetch_optional(billing.db())
        .await?;
        match row {
            Some((_, status, _, _)) if status != "succeeded" => findings.push(Finding {
                kind: if is_refund(t) {
                    "refund_unknown_to_ledger"
                } else {
                    "payment_unknown_to_ledger"
                },
                gateway_transaction_id: Some(t.transaction_id),
                ledger_id: None,
                amount_minor: Some(t.amount.minor),
                currency: Some(t.amount.currency.code().to_owned()),
                detail: format!("the gateway's {what} is {status} in the ledger"),
            }),
            None => findings.push(Finding {
                kind: if is_refund(t) {
                    "refund_unknown_to_ledger"
                } else {
                    "payment_unknown_to_ledger"
                },
                gateway_transaction_id: Some(t.transaction_id),
                ledger_id: None,
                amount_minor: Some(t.amount.minor),
                currency: Some(t.amount.currency.code().to_owned()),
                detail: format!(
                    "the gateway's {what} (invoice {:?}) is not in the ledger",
                    t.invoice_id
                ),
            }),
            Some((id, _, minor, currency))
                if minor != t.amount.minor || currency != t.amount.currency.code() =>
            {
                findings.push(Finding {
                    kind: if is_refund(t) {
                        "refund_amount_differs"
                    } else {
                        "payment_amount_differs"
                    },
                    gateway_transaction_id: Some(t.transaction_id),
                    ledger_id: Some(id),
                    amount_minor: Some(t.amount.minor),
                    currency: Some(t.amount.currency.code().to_owned()),
                    detail: format!(
                        "the gateway has {} {}, the ledger {minor} {currency}",
                        t.amount.minor,
                        t.amount.currency.code()
                    ),
                })
            }
            Some(_) => {}
        }
    }

    // The ledger's side: every success of the day is at the gateway.
    let from: DateTime<Utc> = day.and_time(chrono::NaiveTime::MIN).and_utc();
    let until = from + chrono::Duration::days(1);
    let successes = sqlx::query_as::<_, (String, Uuid, i64, i64, String)>(
        "SELECT 'payment', id, gateway_transaction_id, amount_minor, currency::text FROM payment
         WHERE status = 'succeeded' AND completed_at >= $1 AND completed_at < $2 AND gateway_transaction_id IS NOT NULL
         UNION ALL
         SELECT 'refund', id, gateway_transaction_id, amount_minor, currency::text FROM refund
         WHERE status = 'succeeded' AND updated_at >= $1 AND updated_at < $2 AND gateway_transaction_id IS NOT NULL",
    )
    .bind(from)
    .bind(until)
    .fetch_all(billing.db())
    .await?;
    report.ledger_successes = successes.len() as u64;
    for (what, id, txn, minor, currency) in successes {
        if listed.contains(&txn) {
            continue;
        }
        // Not in the day's list: the gateway may have dated it another day.
        let known = billing
            .gateway()
            .get(txn)
            .await
            .map_err(|e| BillingError::Unavailable(format!("payments/get {txn}: {e}")))?;
        if known.as_ref().is_some_and(money_moved) {
            continue;
        }
        let what = what.as_str();
        findings.push(Finding {
            kind: if what == "refund" {
                "refund_missing_at_gateway"
            } else {
                "payment_missing_at_gateway"
            },
            gateway_transaction_id: Some(txn),
            ledger_id: Some(id),
            amount_minor: Some(minor),
            currency: Some(currency),
            detail: match known {
                Some(t) => format!(
                    "the ledger's {what} success is {:?} at the gateway",
                    t.status
                ),
                None => format!("the ledger's {what} success is unknown at the gateway"),
            },
        });
    }

    report.mismatches = findings.len() as u64;
    let now = billing.now();
    for f in findings {
        let mut tx = billing.db().begin().await?;
        let inserted = sqlx::query_scalar::<_, i64>(
            "INSERT INTO reconciliation_finding (day, kind, gateway_transaction_id, ledger_id, amount_minor, currency, detail, found_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(day)
        .bind(f.kind)
        .bind(f.gateway_transaction_id)
        .bind(f.ledger_id)
        .bind(f.amount_minor)
        .bind(&f.currency)
        .bind(&f.detail)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(id) = inserted {
            tracing::error!(%day, kind = f.kind, transaction_id = f.gateway_transaction_id, detail = %f.detail,
                "the gateway's books and the ledger disagree");
            ledger::enqueue_outbox(
                &mut tx,
                topic::ACCOUNTING_ATTENTION,
                &format!("accounting:reconciliation:{id}"),
                json!({"day": day, "kind": f.kind, "transaction_id": f.gateway_transaction_id,
                       "ledger_id": f.ledger_id, "amount_minor": f.amount_minor, "currency": f.currency,
                       "issue": f.detail}),
                now,
            )
            .await?;
            report.new_findings += 1;
        }
        tx.commit().await?;
    }
    Ok(report)
}
