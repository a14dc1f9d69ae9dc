//! The CloudPayments webhook receiver (axum): `POST /webhooks/cloudpayments/{check,pay,fail,
//! confirm,refund,recurrent,cancel}`.
//!
//! The `Content-HMAC` header is verified against the raw body before anything is parsed; a missing
//! or wrong signature gets 401 and changes nothing. Each notification is recorded once per
//! (type, transaction) in `gateway_event`; a repeat (the gateway re-delivers until it hears
//! `{"code":0}`) is answered `{"code":0}` without being applied again. Applying a Pay, Fail or
//! Refund goes through the same idempotent settling code as the worker, so the two can race
//! harmlessly.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::charging::{self, Outcome};
use crate::cloudpayments::webhook::{
    self, Notification, NotificationKind, PaymentDetails, WebhookAnswer,
};
use crate::cloudpayments::{ReasonCode, Transaction, TransactionStatus};
use crate::context::Billing;
use crate::error::Result;
use crate::ledger::{self, Actor, topic};
use crate::money::Money;
use crate::refunds;
use crate::secret::Secret;

/// What the receiver needs.
#[derive(Clone, Debug)]
pub struct WebhookState {
    billing: Billing,
    api_secret: Secret<String>,
}

impl WebhookState {
    /// The receiver's state: the billing context and the API secret notifications are signed with.
    pub fn new(billing: Billing, api_secret: Secret<String>) -> Self {
        WebhookState {
            billing,
            api_secret,
        }
    }
}

/// The receiver's routes.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/webhooks/cloudpayments/{kind}", post(receive))
        .with_state(state)
}

/// Serves the receiver on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: WebhookState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

fn answer(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn receive(
    State(state): State<WebhookState>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received_at = state.billing.now();
    let delivery = deliver(&state, &kind, &headers, &body).await;
    // The notification log (the back-office's): every delivery, signed or not, with our answer.
    if let Err(e) = sqlx::query(
        "INSERT INTO webhook_receipt (received_at, kind, hmac_ok, http_status, answer, gateway_transaction_id, event_id, body_bytes)
         VALUES ($1, $2, $3, $4, $5, $6,
                 (SELECT id FROM gateway_event WHERE $3 AND kind = $2 AND gateway_transaction_id = $6 ORDER BY id DESC LIMIT 1), $7)",
    )
    .bind(received_at)
    .bind(kind.chars().take(40).collect::<String>().to_lowercase())
    .bind(delivery.hmac_ok)
    .bind(i32::from(delivery.status.as_u16()))
    .bind(delivery.body.to_string())
    .bind(delivery.transaction_id)
    .bind(i32::try_from(body.len()).unwrap_or(i32::MAX))
    .execute(state.billing.db())
    .await
    {
        tracing::warn!(error = %e, "could not log a webhook delivery");
    }
    answer(delivery.status, delivery.body)
}

struct Delivery {
    status: StatusCode,
    body: Value,
    hmac_ok: bool,
    transaction_id: Option<i64>,
}

async fn deliver(state: &WebhookState, kind: &str, headers: &HeaderMap, body: &[u8]) -> Delivery {
    let refuse = |status, body, hmac_ok| Delivery {
        status,
        body,
        hmac_ok,
        transaction_id: None,
    };
    let Ok(kind) = kind.parse::<NotificationKind>() else {
        return refuse(
            StatusCode::NOT_FOUND,
            json!({"error": "unknown notification type"}),
            false,
        );
    };
    let signature = headers
        .get(webhook::CONTENT_HMAC)
        .and_then(|v| v.to_str().ok());
    if !signature.is_some_and(|s| webhook::verify(&state.api_secret, body, s)) {
        tracing::warn!(%kind, "notification with a missing or wrong Content-HMAC refused");
        return refuse(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or invalid Content-HMAC"}),
            false,
        );
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let notification = match Notification::parse(kind, content_type, body) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(%kind, error = %e, "unreadable notification");
            return refuse(
                StatusCode::BAD_REQUEST,
                json!({"error": e.to_string()}),
                true,
            );
        }
    };
    let transaction_id = notification.transaction_id();
    let (status, body) = match handle(
        &state.billing,
        notification,
        stored_payload(content_type, body),
    )
    .await
    {
        Ok(a) => (StatusCode::OK, json!({"code": a.code()})),
        Err(e) => {
            // A non-zero answer or an error makes the gateway deliver again later.
            tracing::error!(%kind, error = %e, "notification not applied; the gateway will retry");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": "temporarily unable to process"}),
            )
        }
    };
    Delivery {
        status,
        body,
        hmac_ok: true,
        transaction_id,
    }
}

/// The notification as stored for accounting: every field except the card token.
fn stored_payload(content_type: Option<&str>, body: &[u8]) -> Value {
    let mut map: Map<String, Value> =
        if content_type.is_some_and(|c| c.contains("json")) || body.first() == Some(&b'{') {
            serde_json::from_slice(body).unwrap_or_default()
        } else {
            serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect()
        };
    map.retain(|k, _| !k.eq_ignore_ascii_case("token"));
    Value::Object(map)
}

/// Records a notification once per (type, transaction). Returns the event to apply: a new one, or
/// one recorded before but never applied (its first apply failed); `None` for one already applied.
async fn record(
    billing: &Billing,
    kind: &str,
    transaction_id: Option<i64>,
    invoice_id: Option<&str>,
    payload: &Value,
) -> Result<Option<i64>> {
    let inserted = sqlx::query_scalar!(
        "INSERT INTO gateway_event (kind, gateway_transaction_id, invoice_id, payload, received_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (kind, gateway_transaction_id) WHERE gateway_transaction_id IS NOT NULL AND kind <> 'check' DO NOTHING
         RETURNING id",
        kind,
        transaction_id,
        invoice_id,
        payload,
        billing.now()
    )
    .fetch_optional(billing.db())
    .await?;
    if inserted.is_some() {
        return Ok(inserted);
    }
    // Applying is idempotent, so an event whose apply failed is simply applied again.
    Ok(sqlx::query_scalar!(
        "SELECT id FROM gateway_event WHERE kind = $1 AND gateway_transaction_id = $2 AND processed_at IS NULL",
        kind,
        transaction_id
    )
    .fetch_optional(billing.db())
    .await?)
}

async fn processed(billing: &Billing, event_id: i64, outcome: &str) -> Result<()> {
    sqlx::query!(
        "UPDATE gateway_event SET processed_at = $2, outcome = $3 WHERE id = $1",
        event_id,
        billing.now(),
        outcome
    )
    .execute(billing.db())
    .await?;
    Ok(())
}

/// Applies a verified notification and returns the answer for the gateway.
pub async fn handle(
    billing: &Billing,
    notification: Notification,
    payload: Value,
) -> Result<WebhookAnswer> {
    let kind = notification_kind(&notification);
    let txn = notification.transaction_id();
    let invoice = match &notification {
        Notification::Check(c) => c.payment.invoice_id.clone(),
        Notification::Pay(p) => p.payment.invoice_id.clone(),
        Notification::Fail(f) => f.payment.invoice_id.clone(),
        Notification::Refund(r) => r.invoice_id.clone(),
        _ => None,
    };
    let Some(event_id) = record(billing, kind, txn, invoice.as_deref(), &payload).await? else {
        tracing::info!(kind, transaction_id = ?txn, "repeated notification; already applied");
        return Ok(WebhookAnswer::Ok);
    };
    let (answer, outcome) = match notification {
        Notification::Check(c) => {
            let a = check(billing, &c.payment).await?;
            (a, format!("answered {}", a.code()))
        }
        Notification::Pay(p) => {
            let t = transaction(
                &p.payment,
                TransactionStatus::Completed,
                ReasonCode(0),
                None,
                p.token.clone(),
            );
            let fallback = payload
                .get("FallBackScenarioDeclinedTransactionId")
                .and_then(text_i64);
            (
                WebhookAnswer::Ok,
                apply_payment(billing, &p.payment, fallback, Outcome::Approved(t)).await?,
            )
        }
        Notification::Fail(f) => {
            let t = transaction(
                &f.payment,
                TransactionStatus::Declined,
                f.reason_code,
                f.reason.clone(),
                None,
            );
            (
                WebhookAnswer::Ok,
                apply_payment(billing, &f.payment, None, Outcome::Declined(t)).await?,
            )
        }
        Notification::Refund(r) => (
            WebhookAnswer::Ok,
            apply_refund(
                billing,
                r.transaction_id,
                r.payment_transaction_id,
                r.amount,
            )
            .await?,
        ),
        _ => (WebhookAnswer::Ok, "recorded".to_owned()),
    };
    processed(billing, event_id, &outcome).await?;
    Ok(answer)
}

fn notification_kind(n: &Notification) -> &'static str {
    match n {
        Notification::Check(_) => "check",
        Notification::Pay(_) => "pay",
        Notification::Fail(_) => "fail",
        Notification::Confirm(_) => "confirm",
        Notification::Refund(_) => "refund",
        Notification::Recurrent(_) => "recurrent",
        Notification::Cancel(_) => "cancel",
    }
}

fn transaction(
    p: &PaymentDetails,
    status: TransactionStatus,
    code: ReasonCode,
    reason: Option<String>,
    token: Option<Secret<String>>,
) -> Transaction {
    Transaction {
        transaction_id: p.transaction_id,
        amount: p.amount,
        invoice_id: p.invoice_id.clone(),
        account_id: p.account_id.clone(),
        email: p.email.clone(),
        description: p.description.clone(),
        status,
        reason_code: code,
        reason,
        card_holder_message: None,
        card: p.card.clone(),
        token,
        auth_code: None,
        test_mode: p.test_mode,
        refunded: false,
        original_transaction_id: None,
        created_at: p.date_time,
    }
}

/// Check: may this payment proceed? Only for an open invoice of ours, its payer and its amount.
async fn check(billing: &Billing, p: &PaymentDetails) -> Result<WebhookAnswer> {
    let Some(invoice_id) = p
        .invoice_id
        .as_deref()
        .and_then(|i| Uuid::parse_str(i).ok())
    else {
        return Ok(WebhookAnswer::InvalidInvoiceId);
    };
    let Some(inv) = sqlx::query!(
        "SELECT status, amount_minor, currency, payer_id FROM invoice WHERE id = $1",
        invoice_id
    )
    .fetch_optional(billing.db())
    .await?
    else {
        return check_card_check(billing, invoice_id, p).await;
    };
    if p.account_id.as_deref() != Some(inv.payer_id.to_string().as_str()) {
        return Ok(WebhookAnswer::InvalidAccountId);
    }
    if p.amount.minor != inv.amount_minor || p.amount.currency.code() != inv.currency {
        return Ok(WebhookAnswer::InvalidAmount);
    }
    if !matches!(inv.status.as_str(), "open" | "paying") {
        return Ok(WebhookAnswer::Rejected);
    }
    Ok(WebhookAnswer::Ok)
}

/// Check for a card check's authorisation (its InvoiceId is the check's id): its payer, its
/// amount, and only while it is being sent.
async fn check_card_check(
    billing: &Billing,
    id: Uuid,
    p: &PaymentDetails,
) -> Result<WebhookAnswer> {
    let Some((status, payer, amount_minor, currency)) =
        sqlx::query_as::<_, (String, Uuid, i64, String)>(
            "SELECT status, payer_id, amount_minor, currency FROM card_check WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(billing.db())
        .await?
    else {
        return Ok(WebhookAnswer::InvalidInvoiceId);
    };
    if p.account_id.as_deref() != Some(payer.to_string().as_str()) {
        return Ok(WebhookAnswer::InvalidAccountId);
    }
    if p.amount.minor != amount_minor || p.amount.currency.code() != currency {
        return Ok(WebhookAnswer::InvalidAmount);
    }
    if !matches!(status.as_str(), "processing" | "awaiting_3ds") {
        return Ok(WebhookAnswer::Rejected);
    }
    Ok(WebhookAnswer::Ok)
}

/// Whether an InvoiceId is a card check's (card_check.rs): those are settled there.
async fn card_check_of(billing: &Billing, invoice_id: Option<Uuid>) -> Result<Option<Uuid>> {
    let Some(id) = invoice_id else {
        return Ok(None);
    };
    Ok(
        sqlx::query_scalar::<_, Uuid>("SELECT id FROM card_check WHERE id = $1")
            .bind(id)
            .fetch_optional(billing.db())
            .await?,
    )
}

fn text_i64(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

/// Pay or Fail: the attempt this notification is about, settled with it.
///
/// The attempt is the one carrying the transaction id (or, for a backup acquirer's approval, the
/// declined transaction it replaces); failing that, the invoice's attempt in flight; failing that,
/// its only attempt that has no transaction id. Anything ambiguous goes to accounting rather than
/// to a guess.
///
/// The candidates are read in one statement that locks them, so a worker settling the attempt at
/// the same moment is waited for and its result seen (it then carries the transaction id);
/// separate unlocked reads could miss the attempt between them.
async fn apply_payment(
    billing: &Billing,
    p: &PaymentDetails,
    fallback_of: Option<i64>,
    outcome: Outcome,
) -> Result<String> {
    let invoice_id = p
        .invoice_id
        .as_deref()
        .and_then(|i| Uuid::parse_str(i).ok());
    if let Some(check) = card_check_of(billing, invoice_id).await? {
        // The same idempotent settling as the worker's; an approval's hold is then voided.
        let status = crate::card_check::settle(billing, check, outcome, Actor::Webhook).await?;
        if let Err(e) = crate::tasks::enqueue_check_card(billing, check).await {
            tracing::warn!(card_check_id = %check, error = %e, "could not enqueue the card check; the reconciler will");
        }
        return Ok(format!("card check {check} {status}"));
    }
    let candidates = sqlx::query!(
        "SELECT id, status, sent_at, gateway_transaction_id FROM payment
         WHERE gateway_transaction_id = $1 OR gateway_transaction_id = $2
            OR (invoice_id = $3 AND gateway_transaction_id IS NULL AND status IN ('processing', 'failed', 'expired'))
         ORDER BY attempt
         FOR UPDATE",
        p.transaction_id,
        fallback_of,
        invoice_id
    )
    .fetch_all(billing.db())
    .await?;
    let exact = candidates.iter().find(|c| {
        c.gateway_transaction_id.is_some()
            && (c.gateway_transaction_id == Some(p.transaction_id)
                || c.gateway_transaction_id == fallback_of)
    });
    let unattributed: Vec<_> = candidates
        .iter()
        .filter(|c| c.gateway_transaction_id.is_none())
        .collect();
    let in_flight = unattributed.iter().find(|c| c.status == "processing");
    let payment = match (exact, in_flight, unattributed.as_slice()) {
        (Some(c), _, _) => Some(c.id),
        (None, Some(c), _) => {
            // The worker waiting for this very call has the authoritative answer (a Fail may be
            // followed by a backup acquirer's approval); leave it to the worker.
            let waiting = c
                .sent_at
                .is_some_and(|t| t + billing.policy().processing_lease > billing.now());
            if waiting && matches!(outcome, Outcome::Declined(_)) {
                return Ok(format!("left to the worker calling for payment {}", c.id));
            }
            Some(c.id)
        }
        (None, None, [only]) => Some(only.id),
        _ => None,
    };
    let Some(payment_id) = payment else {
        tracing::error!(transaction_id = p.transaction_id, invoice = ?p.invoice_id, "notification for a payment billing cannot attribute");
        let mut conn = billing.db().acquire().await?;
        ledger::enqueue_outbox(
            &mut conn,
            topic::ACCOUNTING_ATTENTION,
            &format!("accounting:unmatched:{}", p.transaction_id),
            json!({"transaction_id": p.transaction_id, "invoice_id": p.invoice_id, "amount_minor": p.amount.minor,
                   "currency": p.amount.currency, "issue": "gateway payment that matches no single attempt in the ledger"}),
            billing.now(),
        )
        .await?;
        return Ok("unmatched".into());
    };
    let status = charging::settle(billing, payment_id, outcome, Actor::Webhook).await?;
    Ok(format!("payment {payment_id} {status}"))
}

/// Refund: the refund it confirms, settled.
async fn apply_refund(
    billing: &Billing,
    refund_txn: i64,
    payment_txn: i64,
    amount: Money,
) -> Result<String> {
    let refund = sqlx::query_scalar!(
        "SELECT r.id FROM refund r JOIN payment p ON p.id = r.payment_id
         WHERE r.gateway_transaction_id = $1
            OR (p.gateway_transaction_id = $2 AND r.status IN ('requested', 'processing', 'failed') AND r.amount_minor = $3)
         ORDER BY (r.gateway_transaction_id = $1) DESC NULLS LAST, r.created_at LIMIT 1",
        refund_txn,
        payment_txn,
        amount.minor
    )
    .fetch_optional(billing.db())
    .await?;
    match refund {
        Some(id) => {
            let status = refunds::settle(billing, id, refund_txn, Actor::Webhook).await?;
            Ok(format!("refund {id} {status}"))
        }
        None => {
            let mut conn = billing.db().acquire().await?;
            ledger::enqueue_outbox(
                &mut conn,
                topic::ACCOUNTING_ATTENTION,
                &format!("accounting:refund-unmatched:{refund_txn}"),
                json!({"refund_transaction_id": refund_txn, "payment_transaction_id": payment_txn, "amount_minor": amount.minor,
                       "issue": "a refund made outside billing (e.g. in the gateway's dashboard)"}),
                billing.now(),
            )
            .await?;
            Ok("unmatched refund".into())
        }
    }
}
