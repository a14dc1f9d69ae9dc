//! The fake's notification sender (§6).
//!
//! Bodies are .NET-style forms in the gateway's field order, signed with the terminal's API secret
//! in `Content-HMAC` (raw body) and `X-Content-HMAC` (decoded body). Check is synchronous: its
//! answer decides the payment (codes 10/11/12/13/20 → decline 3001/3002/3003/3008/3004, an
//! unexpected answer → 3005, unreachable → 3006, an HTTP error → 3007). Pay, Fail, Confirm,
//! Refund, Cancel and Recurrent are sent after the operation in their own task and re-sent on the
//! configured schedule until the receiver answers HTTP 2xx with `{"code":0}`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use super::config::WebhookConfig;
use super::ledger::{TransactionKind, Txn};
use crate::cloudpayments::form;
use crate::cloudpayments::model::TransactionId;
use crate::cloudpayments::reason::ReasonCode;
use crate::cloudpayments::webhook::{self, NotificationKind, WebhookAnswer};
use crate::cloudpayments::wire::{self, WireAmount};
use crate::secret::Secret;

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    /// HTTP 2xx with `{"code":0}`.
    Accepted,
    /// The receiver answered, but not with `{"code":0}` (Check: a refusal code; others: re-sent).
    Answered {
        /// HTTP status.
        status: u16,
        /// The `code` in the body, if it had one.
        code: Option<i64>,
    },
    /// No answer: connection refused, timeout, broken connection.
    Failed(String),
}

/// One delivery attempt, as the receiver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// Notification type.
    pub kind: NotificationKind,
    /// Where it went.
    pub url: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The transaction it is about (none for Recurrent).
    pub transaction_id: Option<TransactionId>,
    /// The exact body sent.
    pub body: String,
    /// The `Content-HMAC` header sent.
    pub content_hmac: String,
    /// The `X-Content-HMAC` header sent.
    pub x_content_hmac: String,
    /// The result.
    pub result: DeliveryResult,
}

/// Sends notifications and remembers the latest attempts.
pub(crate) struct Notifier {
    http: reqwest::Client,
    config: WebhookConfig,
    log: Mutex<VecDeque<WebhookDelivery>>,
    attempts: AtomicU64,
    accepted: AtomicU64,
    shutdown: watch::Receiver<bool>,
    /// Draws for delays and duplicates (seeded with the fake's fault seed).
    rng: Mutex<fastrand::Rng>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("urls", &self.config.urls)
            .finish_non_exhaustive()
    }
}

/// Form fields in order.
pub(crate) type FormFields = Vec<(&'static str, String)>;

impl Notifier {
    pub(crate) fn new(
        config: WebhookConfig,
        shutdown: watch::Receiver<bool>,
        seed: u64,
    ) -> Result<Notifier, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()?;
        Ok(Notifier {
            http,
            config,
            log: Mutex::new(VecDeque::new()),
            attempts: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            shutdown,
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
        })
    }

    pub(crate) fn has_url(&self, kind: NotificationKind) -> bool {
        self.config.urls.contains_key(&kind)
    }

    /// Sends a Check and returns the decline reason, or `None` if the payment may proceed (also
    /// when no Check URL is configured).
    pub(crate) async fn check<K: AsRef<str>>(
        &self,
        secret: &Secret<String>,
        fields: &[(K, String)],
        transaction_id: TransactionId,
    ) -> Option<ReasonCode> {
        let url = self.config.urls.get(&NotificationKind::Check)?;
        let result = self
            .attempt(
                NotificationKind::Check,
                url,
                1,
                Some(transaction_id),
                secret,
                fields,
            )
            .await;
        match result {
            DeliveryResult::Accepted => None,
            DeliveryResult::Failed(_) => Some(ReasonCode(3006)),
            DeliveryResult::Answered { status, .. } if !(200..300).contains(&status) => {
                Some(ReasonCode(3007))
            }
            DeliveryResult::Answered { code, .. } => Some(ReasonCode(
                code.and_then(WebhookAnswer::from_code)
                    .and_then(WebhookAnswer::decline_reason)
                    .unwrap_or(3005),
            )),
        }
    }

    /// Sends a notification in the background, re-sending until it is accepted.
    pub(crate) fn send<K: AsRef<str> + Send + Sync + 'static>(
        self: &Arc<Self>,
        kind: NotificationKind,
        secret: Secret<String>,
        fields: Vec<(K, String)>,
        transaction_id: Option<TransactionId>,
    ) {
        let Some(url) = self.config.urls.get(&kind).cloned() else {
            return;
        };
        let (delay, duplicate) = {
            let mut rng = self.rng.lock().unwrap_or_else(PoisonError::into_inner);
            let delay = self.config.delay_up_to.mul_f64(rng.f64());
            (delay, rng.f64() < self.config.duplicate_probability)
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut shutdown = this.shutdown.clone();
            if !delay.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            for attempt in 1..=this.config.max_attempts.max(1) {
                let delivery = this.attempt(kind, &url, attempt, transaction_id, &secret, &fields);
                let result = tokio::select! {
                    r = delivery => r,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                };
                if result == DeliveryResult::Accepted {
                    if duplicate {
                        // As if the gateway had missed the answer: the same notification again.
                        let again =
                            this.attempt(kind, &url, attempt + 1, transaction_id, &secret, &fields);
                        tokio::select! {
                            _ = again => {}
                            _ = shutdown.wait_for(|stop| *stop) => {}
                        }
                    }
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(this.config.gap_after(attempt)) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            tracing::warn!(%kind, ?transaction_id, "fake gateway gave up delivering a notification");
        });
    }

    async fn attempt<K: AsRef<str>>(
        &self,
        kind: NotificationKind,
        url: &str,
        attempt: u32,
        transaction_id: Option<TransactionId>,
        secret: &Secret<String>,
        fields: &[(K, String)],
    ) -> DeliveryResult {
        let body = form::encode(fields);
        let content_hmac = webhook::sign(secret, body.as_bytes());
        // The body is our own encoding of UTF-8 text, so decoding cannot fail.
        let x_content_hmac = webhook::sign_decoded(secret, body.as_bytes()).unwrap_or_default();
        let sent = self
            .http
            .post(url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header(webhook::CONTENT_HMAC, &content_hmac)
            .header(webhook::X_CONTENT_HMAC, &x_content_hmac)
            .body(body.clone())
            .send()
            .await;
        let result = match sent {
            Err(e) => DeliveryResult::Failed(e.to_string()),
            Ok(response) => {
                let status = response.status().as_u16();
                let code = response
                    .bytes()
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v.get("code").and_then(serde_json::Value::as_i64));
                if (200..300).contains(&status) && code == Some(0) {
                    DeliveryResult::Accepted
                } else {
                    DeliveryResult::Answered { status, code }
                }
            }
        };
        self.attempts.fetch_add(1, Ordering::Relaxed);
        if result == DeliveryResult::Accepted {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        }
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() >= self.config.log_limit.max(1) {
            log.pop_front();
        }
        log.push_back(WebhookDelivery {
            kind,
            url: url.to_owned(),
            attempt,
            transaction_id,
            body,
            content_hmac,
            x_content_hmac,
            result: result.clone(),
        });
        result
    }

    pub(crate) fn deliveries(&self) -> Vec<WebhookDelivery> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.attempts.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
        )
    }
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

/// Fields of Check, Pay, Fail and Confirm, in the gateway's order (§6.3).
pub(crate) fn payment_fields(kind: NotificationKind, t: &Txn) -> FormFields {
    let amount = WireAmount::of(t.amount).text();
    let card = t.card.as_ref();
    let card_field =
        |f: fn(&super::ledger::CardSnapshot) -> String| card.map(f).unwrap_or_default();
    let mut fields: FormFields = vec![
        ("TransactionId", t.id.to_string()),
        ("Amount", amount.clone()),
        ("Currency", t.amount.currency.code().to_owned()),
        ("PaymentAmount", amount),
        ("PaymentCurrency", t.amount.currency.code().to_owned()),
        ("OperationType", "Payment".to_owned()),
        ("InvoiceId", opt(&t.invoice_id)),
        ("AccountId", opt(&t.account_id)),
        ("SubscriptionId", String::new()),
        ("Name", opt(&t.name)),
        ("Email", opt(&t.email)),
        ("DateTime", wire::format_notification_date(t.created)),
        ("IpAddress", opt(&t.ip_address)),
        ("IpCountry", "RU".to_owned()),
        ("IpCity", String::new()),
        ("IpRegion", String::new()),
        ("IpDistrict", String::new()),
        ("IpLatitude", String::new()),
        ("IpLongitude", String::new()),
        ("CardFirstSix", card_field(|c| c.first_six.clone())),
        ("CardLastFour", card_field(|c| c.last_four.clone())),
        ("CardType", card_field(|c| c.brand.to_owned())),
        ("CardExpDate", card_field(|c| c.exp.clone())),
        ("Issuer", "CloudPayments".to_owned()),
        ("IssuerBankCountry", "RU".to_owned()),
        ("Description", opt(&t.description)),
    ];
    match kind {
        NotificationKind::Pay | NotificationKind::Confirm => {
            fields.push(("AuthCode", "A1B2C3".to_owned()));
            fields.push(("Token", opt(&t.token)));
        }
        NotificationKind::Fail => {
            fields.push((
                "Reason",
                t.reason_code.name().unwrap_or("Unknown").to_owned(),
            ));
            fields.push(("ReasonCode", t.reason_code.0.to_string()));
            fields.push(("Token", opt(&t.token)));
        }
        _ => {}
    }
    fields.push(("TestMode", if t.test_mode { "1" } else { "0" }.to_owned()));
    let status = match kind {
        // Check carries the would-be status.
        NotificationKind::Check if t.two_stage => "Authorized",
        NotificationKind::Check => "Completed",
        _ => t.status.as_str(),
    };
    fields.push(("Status", status.to_owned()));
    if kind == NotificationKind::Pay {
        fields.push((
            "GatewayName",
            if t.test_mode { "Test" } else { "Fake" }.to_owned(),
        ));
    }
    fields.push(("Data", opt(&t.json_data)));
    if kind == NotificationKind::Pay {
        fields.push(("TotalFee", "0.00".to_owned()));
    }
    fields
}

/// Fields of a Refund notification: the refund `t` of `payment`.
pub(crate) fn refund_fields(t: &Txn, payment: &Txn) -> FormFields {
    debug_assert_eq!(t.kind, TransactionKind::Refund);
    vec![
        ("TransactionId", t.id.to_string()),
        ("PaymentTransactionId", payment.id.to_string()),
        ("Amount", WireAmount::of(t.amount).text()),
        ("DateTime", wire::format_notification_date(t.created)),
        ("OperationType", "Refund".to_owned()),
        ("InvoiceId", opt(&t.invoice_id)),
        ("AccountId", opt(&t.account_id)),
        ("Email", opt(&t.email)),
        ("Data", opt(&t.json_data)),
        ("Rrn", String::new()),
    ]
}

/// Fields of a Cancel notification.
pub(crate) fn cancel_fields(t: &Txn) -> FormFields {
    vec![
        ("TransactionId", t.id.to_string()),
        ("Amount", WireAmount::of(t.amount).text()),
        (
            "DateTime",
            wire::format_notification_date(chrono::Utc::now()),
        ),
        ("InvoiceId", opt(&t.invoice_id)),
        ("AccountId", opt(&t.account_id)),
        ("Email", opt(&t.email)),
        ("Data", opt(&t.json_data)),
        ("Rrn", String::new()),
    ]
}
