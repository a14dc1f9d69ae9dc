//! Typed notifications (§6.3), parsed from form bodies (.NET style) or JSON.
//!
//! Parsing is tolerant where the gateway varies: key case, unknown and new fields, empty values
//! (`SubscriptionId=`), numbers as strings, `TestMode` as `0`/`1` or a boolean. It is strict where
//! money is concerned: a missing or unreadable `TransactionId` or `Amount` is an error, and an
//! amount with fractions of a kopeck is refused. The receiver still checks that amount, InvoiceId
//! and AccountId match its own records (the docs insist).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::cloudpayments::fields::{FieldError, Fields};
use crate::cloudpayments::model::{CardInfo, TransactionId, TransactionStatus};
use crate::cloudpayments::reason::ReasonCode;
use crate::cloudpayments::wire;
use crate::money::{Currency, Money};
use crate::secret::Secret;

/// Why a notification could not be read. Never contains a value, only field names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The body is neither a form nor a JSON object.
    #[error("notification body is unreadable: {0}")]
    Body(String),
    /// A required field is absent.
    #[error("notification field `{0}` is missing")]
    Missing(String),
    /// A field has a value of the wrong shape.
    #[error("notification field `{0}` is invalid")]
    Invalid(String),
    /// The notification type is not one we know.
    #[error("unknown notification type `{0}`")]
    UnknownKind(String),
}

impl From<FieldError> for WebhookError {
    fn from(e: FieldError) -> Self {
        WebhookError::Invalid(e.field)
    }
}

/// The notification types; the receiver learns the type from the URL it configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NotificationKind {
    /// Before authorization; the answer decides whether the payment proceeds.
    Check,
    /// A payment succeeded.
    Pay,
    /// A payment was declined.
    Fail,
    /// A two-stage payment was captured.
    Confirm,
    /// A refund was made.
    Refund,
    /// A subscription changed status.
    Recurrent,
    /// An authorization was voided.
    Cancel,
}

impl NotificationKind {
    /// Every kind.
    pub const ALL: [NotificationKind; 7] = [
        NotificationKind::Check,
        NotificationKind::Pay,
        NotificationKind::Fail,
        NotificationKind::Confirm,
        NotificationKind::Refund,
        NotificationKind::Recurrent,
        NotificationKind::Cancel,
    ];

    /// The name as the gateway writes it: `Pay`.
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationKind::Check => "Check",
            NotificationKind::Pay => "Pay",
            NotificationKind::Fail => "Fail",
            NotificationKind::Confirm => "Confirm",
            NotificationKind::Refund => "Refund",
            NotificationKind::Recurrent => "Recurrent",
            NotificationKind::Cancel => "Cancel",
        }
    }
}

impl fmt::Display for NotificationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NotificationKind {
    type Err = WebhookError;
    /// Parses a name in any case (`pay`, `Pay`).
    fn from_str(s: &str) -> Result<Self, WebhookError> {
        NotificationKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| WebhookError::UnknownKind(s.chars().take(32).collect()))
    }
}

/// `OperationType`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OperationType {
    /// A payment.
    Payment,
    /// A refund.
    Refund,
    /// A payout to a card.
    CardPayout,
    /// Something newer, as written.
    Other(String),
}

impl OperationType {
    fn parse(s: &str) -> OperationType {
        match s.trim().to_ascii_lowercase().as_str() {
            "payment" => OperationType::Payment,
            "refund" => OperationType::Refund,
            "cardpayout" => OperationType::CardPayout,
            _ => OperationType::Other(s.to_owned()),
        }
    }
}

/// Fields common to Check, Pay, Fail and Confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentDetails {
    /// Gateway transaction id.
    pub transaction_id: TransactionId,
    /// Amount in the payment's currency.
    pub amount: Money,
    /// Amount in the currency the payer paid in, when given.
    pub payment_amount: Option<Money>,
    /// Our invoice id.
    pub invoice_id: Option<String>,
    /// Our payer id.
    pub account_id: Option<String>,
    /// Subscription id, for subscription payments.
    pub subscription_id: Option<String>,
    /// Cardholder name.
    pub name: Option<String>,
    /// Payer e-mail.
    pub email: Option<String>,
    /// When it happened (UTC).
    pub date_time: Option<DateTime<Utc>>,
    /// Payer IP.
    pub ip_address: Option<String>,
    /// The card, without its number.
    pub card: CardInfo,
    /// Description.
    pub description: Option<String>,
    /// `Data`: the request's `JsonData` as a JSON string.
    pub data: Option<String>,
    /// True on a test terminal.
    pub test_mode: bool,
    /// `Status` (Completed/Authorized; the would-be status on Check).
    pub status: Option<TransactionStatus>,
    /// `OperationType`.
    pub operation_type: Option<OperationType>,
}

/// Check: sent before authorization; answer [`super::WebhookAnswer`] decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckNotification {
    /// The would-be payment.
    pub payment: PaymentDetails,
}

/// Pay: a payment succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayNotification {
    /// The payment.
    pub payment: PaymentDetails,
    /// The gateway that processed it (`Test` on test terminals).
    pub gateway_name: Option<String>,
    /// Issuer's authorization code.
    pub auth_code: Option<String>,
    /// Card token for later payments.
    pub token: Option<Secret<String>>,
    /// The gateway's fee, in the payment currency.
    pub total_fee: Option<Decimal>,
    /// Retrieval reference number.
    pub rrn: Option<String>,
}

/// Fail: a payment was declined (not final: the payer may try again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailNotification {
    /// The payment.
    pub payment: PaymentDetails,
    /// Why.
    pub reason_code: ReasonCode,
    /// The reason's name.
    pub reason: Option<String>,
    /// Card token, when the card has one.
    pub token: Option<Secret<String>>,
    /// When a retry is allowed (since 2026; format undocumented, kept as text).
    pub retry_after: Option<String>,
    /// The processor's own message.
    pub provider_message: Option<String>,
    /// Retrieval reference number.
    pub rrn: Option<String>,
}

/// Confirm: a two-stage payment was captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmNotification {
    /// The payment.
    pub payment: PaymentDetails,
    /// Issuer's authorization code.
    pub auth_code: Option<String>,
    /// Card token.
    pub token: Option<Secret<String>>,
    /// Retrieval reference number.
    pub rrn: Option<String>,
}

/// Refund: money went back to the payer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundNotification {
    /// The refund's own transaction id.
    pub transaction_id: TransactionId,
    /// The payment refunded.
    pub payment_transaction_id: TransactionId,
    /// Amount refunded.
    pub amount: Money,
    /// When (UTC).
    pub date_time: Option<DateTime<Utc>>,
    /// `Refund` or `CardPayout`.
    pub operation_type: Option<OperationType>,
    /// Our invoice id.
    pub invoice_id: Option<String>,
    /// Our payer id.
    pub account_id: Option<String>,
    /// Payer e-mail.
    pub email: Option<String>,
    /// `Data` (JSON string).
    pub data: Option<String>,
    /// Retrieval reference number.
    pub rrn: Option<String>,
}

/// Cancel: an authorization was voided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelNotification {
    /// The voided transaction.
    pub transaction_id: TransactionId,
    /// Its amount.
    pub amount: Money,
    /// When (UTC).
    pub date_time: Option<DateTime<Utc>>,
    /// Our invoice id.
    pub invoice_id: Option<String>,
    /// Our payer id.
    pub account_id: Option<String>,
    /// Payer e-mail.
    pub email: Option<String>,
    /// `Data` (JSON string).
    pub data: Option<String>,
    /// Retrieval reference number.
    pub rrn: Option<String>,
}

/// Recurrent: a gateway subscription changed status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecurrentNotification {
    /// Subscription id (`sc_…`).
    pub id: String,
    /// Our payer id.
    pub account_id: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Payer e-mail.
    pub email: Option<String>,
    /// Amount per period.
    pub amount: Money,
    /// `Active`, `PastDue`, `Cancelled`, `Rejected`, `Expired` (kept as text).
    pub status: Option<String>,
    /// `Day`, `Week`, `Month`.
    pub interval: Option<String>,
    /// Intervals per period.
    pub period: Option<i64>,
    /// Two-stage charges.
    pub require_confirmation: bool,
    /// First charge date (UTC).
    pub start_date: Option<DateTime<Utc>>,
    /// Successful charges so far.
    pub successful_transactions_number: Option<i64>,
    /// Consecutive failures (reset after a success).
    pub failed_transactions_number: Option<i64>,
    /// Maximum number of charges.
    pub max_periods: Option<i64>,
    /// Last charge (UTC).
    pub last_transaction_date: Option<DateTime<Utc>>,
    /// Next charge (UTC).
    pub next_transaction_date: Option<DateTime<Utc>>,
}

/// Any notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// Check.
    Check(CheckNotification),
    /// Pay.
    Pay(PayNotification),
    /// Fail.
    Fail(FailNotification),
    /// Confirm.
    Confirm(ConfirmNotification),
    /// Refund.
    Refund(RefundNotification),
    /// Recurrent.
    Recurrent(RecurrentNotification),
    /// Cancel.
    Cancel(CancelNotification),
}

fn read(content_type: Option<&str>, body: &[u8]) -> Result<Fields, WebhookError> {
    Fields::from_body(content_type, body).map_err(|e| WebhookError::Body(e.to_string()))
}

fn required_i64(f: &Fields, key: &str) -> Result<i64, WebhookError> {
    f.i64(key)?
        .ok_or_else(|| WebhookError::Missing(key.to_owned()))
}

fn currency(f: &Fields, key: &str) -> Result<Currency, WebhookError> {
    match f.text(key) {
        Some(code) => Currency::new(code.trim()).map_err(|_| WebhookError::Invalid(key.to_owned())),
        None => Ok(Currency::RUB),
    }
}

fn money(f: &Fields, amount_key: &str, currency_key: &str) -> Result<Option<Money>, WebhookError> {
    let Some(amount) = f.decimal(amount_key)? else {
        return Ok(None);
    };
    Money::from_decimal(amount, currency(f, currency_key)?)
        .map(Some)
        .map_err(|_| WebhookError::Invalid(amount_key.to_owned()))
}

fn required_money(f: &Fields) -> Result<Money, WebhookError> {
    money(f, "Amount", "Currency")?.ok_or_else(|| WebhookError::Missing("Amount".into()))
}

fn date(f: &Fields, key: &str) -> Result<Option<DateTime<Utc>>, WebhookError> {
    match f.text(key) {
        None => Ok(None),
        Some(s) => wire::parse_datetime(&s)
            .map(Some)
            .ok_or_else(|| WebhookError::Invalid(key.to_owned())),
    }
}

impl PaymentDetails {
    fn from_fields(f: &Fields) -> Result<PaymentDetails, WebhookError> {
        Ok(PaymentDetails {
            transaction_id: required_i64(f, "TransactionId")?,
            amount: required_money(f)?,
            payment_amount: money(f, "PaymentAmount", "PaymentCurrency")?,
            invoice_id: f.text("InvoiceId"),
            account_id: f.text("AccountId"),
            subscription_id: f.text("SubscriptionId"),
            name: f.text("Name"),
            email: f.text("Email"),
            date_time: date(f, "DateTime")?,
            ip_address: f.text("IpAddress"),
            card: CardInfo::from_fields(f),
            description: f.text("Description"),
            data: f.text("Data"),
            test_mode: f.bool("TestMode")?.unwrap_or(false),
            status: f.text("Status").map(|s| TransactionStatus::from_name(&s)),
            operation_type: f.text("OperationType").map(|s| OperationType::parse(&s)),
        })
    }
}

impl CheckNotification {
    /// Parses a Check body (form or JSON).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, WebhookError> {
        let f = read(content_type, body)?;
        Ok(CheckNotification {
            payment: PaymentDetails::from_fields(&f)?,
        })
    }
}

impl PayNotification {
    /// Parses a Pay body (form or JSON).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, WebhookError> {
        let f = read(content_type, body)?;
        Ok(PayNotification {
            payment: PaymentDetails::from_fields(&f)?,
            gateway_name: f.text("GatewayName"),
            auth_code: f.text("AuthCode"),
            token: f.text("Token").map(Secret::new),
            total_fee: f.decimal("TotalFee")?,
            rrn: f.text("Rrn"),
        })
    }
}

impl FailNotification {
    /// Parses a Fail body (form or JSON).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, WebhookError> {
        let f = read(content_type, body)?;
        let code = f.i64("ReasonCode")?.unwrap_or(0);
        Ok(FailNotification {
            payment: PaymentDetails::from_fields(&f)?,
            reason_code: ReasonCode(
                i32::try_from(code).map_err(|_| WebhookError::Invalid("ReasonCode".into()))?,
            ),
            reason: f.text("Reason"),
            token: f.text("Token").map(Secret::new),
            retry_after: f.text("RetryAfter"),
            provider_message: f.text("ProviderMessage"),
            rrn: f.text("Rrn"),
        })
    }
}

impl ConfirmNotification {
    /// Parses a Confirm body (form or JSON).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, WebhookError> {
        let f = read(content_type, body)?;
        Ok(ConfirmNotification {
            payment: PaymentDetails::from_fields(&f)?,
            auth_code: f.text("AuthCode"),
            token: f.text("Token").map(Secret::new),
            rrn: f.text("Rrn"),
        })
    }
}

impl RefundNotification {
    /// Parses a Refund body (form or JSON).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, WebhookError> {
        let f = read(content_type, body)?;
        Ok(RefundNotification {
            transaction_id: required_i64(&f, "TransactionId")?,
            payment_transaction_id: required_i64(&f, "PaymentTransactionId")?,
            amount: required_money(&f)?,
            date_time: date(&f, "DateTime")?,
            operation_type: f.text("OperationType").map(|s| OperationType::parse(&s)),
            invoice_id: f.text("InvoiceId"),
            account_id: f.text("AccountId"),
            email: f.text("Email"),
            data: f.text("Data"),
            rrn: f.text("Rrn"),
        })
    }
}

impl CancelNotification {
    /// Parses a Cancel body (form or JSON).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, WebhookError> {
        let f = read(content_type, body)?;
        Ok(CancelNotification {
            transaction_id: required_i64(&f, "TransactionId")?,
            amount: required_money(&f)?,
            date_time: date(&f, "DateTime")?,
            invoice_id: f.text("InvoiceId"),
            account_id: f.text("AccountId"),
            email: f.text("Email"),
            data: f.text("Data"),
            rrn: f.text("Rrn"),
        })
    }
}

impl RecurrentNotification {
    /// Parses a Recurrent body (form or JSON).
    pub fn parse(content_type: Option<&str>, body: &[u8]) -> Result<Self, WebhookError> {
        let f = read(content_type, body)?;
        Ok(RecurrentNotification {
            id: f
                .text("Id")
                .ok_or_else(|| WebhookError::Missing("Id".into()))?,
            account_id: f.text("AccountId"),
            description: f.text("Description"),
            email: f.text("Email"),
            amount: required_money(&f)?,
            status: f.text("Status"),
            interval: f.text("Interval"),
            period: f.i64("Period")?,
            require_confirmation: f.bool("RequireConfirmation")?.unwrap_or(false),
            start_date: date(&f, "StartDate")?,
            successful_transactions_number: f.i64("SuccessfulTransactionsNumber")?,
            failed_transactions_number: f.i64("FailedTransactionsNumber")?,
            max_periods: f.i64("MaxPeriods")?,
            last_transaction_date: date(&f, "LastTransactionDate")?,
            next_transaction_date: date(&f, "NextTransactionDate")?,
        })
    }
}

impl Notification {
    /// Parses a body of the given type. `content_type` is the request's `Content-Type`; JSON is
    /// also recognised by its opening brace.
    pub fn parse(
        kind: NotificationKind,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Notification, WebhookError> {
        Ok(match kind {
            NotificationKind::Check => {
                Notification::Check(CheckNotification::parse(content_type, body)?)
            }
            NotificationKind::Pay => Notification::Pay(PayNotification::parse(content_type, body)?),
            NotificationKind::Fail => {
                Notification::Fail(FailNotification::parse(content_type, body)?)
            }
            NotificationKind::Confirm => {
                Notification::Confirm(ConfirmNotification::parse(content_type, body)?)
            }
            NotificationKind::Refund => {
                Notification::Refund(RefundNotification::parse(content_type, body)?)
            }
            NotificationKind::Recurrent => {
                Notification::Recurrent(RecurrentNotification::parse(content_type, body)?)
            }
            NotificationKind::Cancel => {
                Notification::Cancel(CancelNotification::parse(content_type, body)?)
            }
        })
    }

    /// Its type.
    pub fn kind(&self) -> NotificationKind {
        match self {
            Notification::Check(_) => NotificationKind::Check,
            Notification::Pay(_) => NotificationKind::Pay,
            Notification::Fail(_) => NotificationKind::Fail,
            Notification::Confirm(_) => NotificationKind::Confirm,
            Notification::Refund(_) => NotificationKind::Refund,
            Notification::Recurrent(_) => NotificationKind::Recurrent,
            Notification::Cancel(_) => NotificationKind::Cancel,
        }
    }

    /// The transaction id (the subscription has none: `None` for Recurrent). Handlers dedupe by
    /// (kind, transaction id).
    pub fn transaction_id(&self) -> Option<TransactionId> {
        match self {
            Notification::Check(n) => Some(n.payment.transaction_id),
            Notification::Pay(n) => Some(n.payment.transaction_id),
            Notification::Fail(n) => Some(n.payment.transaction_id),
            Notification::Confirm(n) => Some(n.payment.transaction_id),
            Notification::Refund(n) => Some(n.transaction_id),
            Notification::Cancel(n) => Some(n.transaction_id),
            Notification::Recurrent(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudpayments::form;
    use proptest::prelude::*;

    const VECTOR: &str = "TransactionId=666&Amount=123.00&Currency=RUB&PaymentAmount=123.00&PaymentCurrency=RUB&InvoiceId=1234567&AccountId=user%40example.com&SubscriptionId=&Name=VLADIMIR+KOCHNEV&Email=user%40example.com&DateTime=2015-11-17+14%3a51%3a20&IpAddress=127.0.0.1&IpCountry=RU&IpCity=%d0%a1%d0%b0%d0%bd%d0%ba%d1%82-%d0%9f%d0%b5%d1%82%d0%b5%d1%80%d0%b1%d1%83%d1%80%d0%b3&CardFirstSix=411111&CardLastFour=1111&CardType=Visa&CardExpDate=01%2f19&Issuer=&IssuerBankCountry=&Description=%d0%9e%d0%bf%d0%bb%d0%b0%d1%82%d0%b0+%d0%b2+example.com&AuthCode=DEADBEEF&Token=1234567890&TestMode=1&Status=Completed";

    #[test]
    fn pay_from_the_documented_form() {
        let n =
            PayNotification::parse(Some("application/x-www-form-urlencoded"), VECTOR.as_bytes())
                .unwrap();
        assert_eq!(n.payment.transaction_id, 666);
        assert_eq!(n.payment.amount, Money::new(12_300, Currency::RUB).unwrap());
        assert_eq!(n.payment.invoice_id.as_deref(), Some("1234567"));
        assert_eq!(n.payment.account_id.as_deref(), Some("user@example.com"));
        assert_eq!(n.payment.subscription_id, None);
        assert_eq!(n.payment.name.as_deref(), Some("VLADIMIR KOCHNEV"));
        assert_eq!(
            n.payment.description.as_deref(),
            Some("Оплата в example.com")
        );
        assert!(n.payment.test_mode);
        assert_eq!(n.payment.status, Some(TransactionStatus::Completed));
        assert_eq!(n.payment.card.exp_date.as_deref(), Some("01/19"));
        assert_eq!(
            n.token.as_ref().map(|t| t.expose().as_str()),
            Some("1234567890")
        );
        assert!(!format!("{n:?}").contains("1234567890"));
        assert_eq!(
            n.payment.date_time.unwrap().to_string(),
            "2015-11-17 14:51:20 UTC"
        );
    }

    #[test]
    fn json_any_case_and_strings() {
        let body = br#"{"transactionid":"42","amount":"99.90","currency":"RUB","testmode":false,
                        "reasoncode":"5051","Reason":"InsufficientFunds","NewField":[1,2]}"#;
        let n =
            Notification::parse(NotificationKind::Fail, Some("application/json"), body).unwrap();
        let Notification::Fail(f) = n else {
            panic!("not a fail")
        };
        assert_eq!(f.payment.transaction_id, 42);
        assert_eq!(f.payment.amount.minor, 9_990);
        assert_eq!(f.reason_code, ReasonCode(5051));
        assert!(!f.payment.test_mode);
    }

    #[test]
    fn refund_recurrent_cancel() {
        let r = RefundNotification::parse(
            None,
            b"TransactionId=568&PaymentTransactionId=567&Amount=50.00&DateTime=2024-01-02+03%3a04%3a05&OperationType=Refund&InvoiceId=inv",
        )
        .unwrap();
        assert_eq!(
            (r.transaction_id, r.payment_transaction_id, r.amount.minor),
            (568, 567, 5_000)
        );
        assert_eq!(r.operation_type, Some(OperationType::Refund));
        let s = RecurrentNotification::parse(
            None,
            b"Id=sc_1&AccountId=a&Amount=299.00&Currency=RUB&RequireConfirmation=0&Status=PastDue&Interval=Month&Period=1&FailedTransactionsNumber=1&NextTransactionDate=2024-02-01+00%3a00%3a00",
        )
        .unwrap();
        assert_eq!(s.id, "sc_1");
        assert_eq!(s.status.as_deref(), Some("PastDue"));
        assert!(!s.require_confirmation);
        assert!(s.next_transaction_date.is_some());
        let c = CancelNotification::parse(None, b"TransactionId=9&Amount=1.00").unwrap();
        assert_eq!(c.transaction_id, 9);
        assert_eq!(
            "cancel".parse::<NotificationKind>().unwrap(),
            NotificationKind::Cancel
        );
    }

    #[test]
    fn strict_about_money() {
        assert_eq!(
            PayNotification::parse(None, b"Amount=1.00").unwrap_err(),
            WebhookError::Missing("TransactionId".into())
        );
        assert_eq!(
            PayNotification::parse(None, b"TransactionId=1&Amount=1.005").unwrap_err(),
            WebhookError::Invalid("Amount".into())
        );
        assert_eq!(
            PayNotification::parse(None, b"TransactionId=1&Amount=lots").unwrap_err(),
            WebhookError::Invalid("Amount".into())
        );
        assert!(matches!(
            PayNotification::parse(Some("application/json"), b"{not json").unwrap_err(),
            WebhookError::Body(_)
        ));
    }

    proptest! {
        /// Any amount in kopecks survives the trip through a .NET form, as text with two decimals.
        #[test]
        fn form_amounts_round_trip(minor in 0i64..=crate::money::MAX_MINOR, id in 1i64..i64::MAX, extra in "\\PC{0,20}") {
            let amount = Money::new(minor, Currency::RUB).unwrap();
            let body = form::encode(&[
                ("TransactionId", id.to_string()),
                ("Amount", wire::WireAmount::of(amount).text()),
                ("Currency", "RUB".to_owned()),
                ("Unknown", extra.clone()),
                ("TestMode", "1".to_owned()),
            ]);
            let n = CheckNotification::parse(None, body.as_bytes()).unwrap();
            prop_assert_eq!(n.payment.amount, amount);
            prop_assert_eq!(n.payment.transaction_id, id);
            prop_assert!(n.payment.test_mode);
        }

        /// The same holds for JSON numbers and strings.
        #[test]
        fn json_amounts_round_trip(minor in 0i64..=crate::money::MAX_MINOR, as_string in any::<bool>()) {
            let text = wire::WireAmount::of(Money::new(minor, Currency::RUB).unwrap()).text();
            let amount = if as_string { format!("\"{text}\"") } else { text };
            let body = format!(r#"{{"TransactionId":1,"Amount":{amount}}}"#);
            let n = CheckNotification::parse(None, body.as_bytes()).unwrap();
            prop_assert_eq!(n.payment.amount.minor, minor);
        }
    }
}
