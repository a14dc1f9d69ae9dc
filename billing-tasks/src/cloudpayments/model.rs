//! What billing sends to the gateway and what it gets back.
//!
//! Requests hold [`Money`] and [`Secret`]s; the wire bodies (PascalCase JSON, amounts as numbers
//! with two decimals) are private to this module and are built only when sending, so a card
//! cryptogram or token is exposed for exactly as long as serialization takes. Responses are read
//! leniently (§2.1: ids as numbers or strings, unknown fields ignored) into [`Transaction`], which
//! carries no full card number and keeps the token wrapped.

use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::fields::{FieldError, Fields};
use super::reason::{DeclineClass, ReasonCode};
use super::wire::{self, WireAmount};
use crate::money::{Currency, Money};
use crate::secret::Secret;

/// A gateway transaction id. Production ids already exceed `i32`.
pub type TransactionId = i64;

/// A one-stage payment with a card cryptogram from the checkout script (`/payments/cards/charge`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptogramCharge {
    /// What to charge.
    pub amount: Money,
    /// The payer's IP address.
    pub ip_address: IpAddr,
    /// `CardCryptogramPacket`, as built by the frontend script.
    pub cryptogram: Secret<String>,
    /// Cardholder name (Latin), if the form asked for it.
    pub name: Option<String>,
    /// Our invoice id (`InvoiceId`): what `find` searches and notifications echo.
    pub invoice_id: String,
    /// Our payer id (`AccountId`): needed for the gateway to issue a token.
    pub account_id: String,
    /// Free text shown to the payer.
    pub description: Option<String>,
    /// Receipt e-mail.
    pub email: Option<String>,
    /// Ask for a card token for renewals (`SaveCard`).
    pub save_card: bool,
}

/// Who starts a token payment (`TrInitiatorCode`, `PaymentScheduled`; §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TokenInitiator {
    /// Merchant-initiated on a schedule: our renewals (`TrInitiatorCode: 0, PaymentScheduled: 1`).
    #[default]
    ScheduledMerchant,
    /// Merchant-initiated, not on a schedule (`0`, `0`).
    UnscheduledMerchant,
    /// Started by the cardholder while present (`1`, `0`).
    Cardholder,
}

impl TokenInitiator {
    fn codes(self) -> (u8, u8) {
        match self {
            TokenInitiator::ScheduledMerchant => (0, 1),
            TokenInitiator::UnscheduledMerchant => (0, 0),
            TokenInitiator::Cardholder => (1, 0),
        }
    }
}

/// A one-stage payment with a saved card token (`/payments/tokens/charge`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenCharge {
    /// What to charge.
    pub amount: Money,
    /// The card token from an earlier payment.
    pub token: Secret<String>,
    /// The payer the token was issued for.
    pub account_id: String,
    /// Our invoice id.
    pub invoice_id: String,
    /// Free text.
    pub description: Option<String>,
    /// Receipt e-mail.
    pub email: Option<String>,
    /// The payer's IP address, when the payer is present.
    pub ip_address: Option<IpAddr>,
    /// Who starts it; renewals are [`TokenInitiator::ScheduledMerchant`].
    pub initiator: TokenInitiator,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct CryptogramChargeBody<'a> {
    amount: WireAmount,
    currency: &'a str,
    ip_address: String,
    card_cryptogram_packet: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    invoice_id: &'a str,
    account_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    save_card: bool,
}

impl CryptogramCharge {
    /// The wire body. It holds the exposed cryptogram, so it has no `Debug` and lives only while
    /// the request is serialized.
    pub(crate) fn body(&self) -> CryptogramChargeBody<'_> {
        CryptogramChargeBody {
            amount: WireAmount::of(self.amount),
            currency: self.amount.currency.code(),
            ip_address: self.ip_address.to_string(),
            card_cryptogram_packet: self.cryptogram.expose(),
            name: self.name.as_deref(),
            invoice_id: &self.invoice_id,
            account_id: &self.account_id,
            description: self.description.as_deref(),
            email: self.email.as_deref(),
            save_card: self.save_card,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TokenChargeBody<'a> {
    amount: WireAmount,
    currency: &'a str,
    account_id: &'a str,
    token: &'a str,
    tr_initiator_code: u8,
    payment_scheduled: u8,
    invoice_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip_address: Option<String>,
}

impl TokenCharge {
    /// The wire body (holds the exposed token; no `Debug`).
    pub(crate) fn body(&self) -> TokenChargeBody<'_> {
        let (initiator, scheduled) = self.initiator.codes();
        TokenChargeBody {
            amount: WireAmount::of(self.amount),
            currency: self.amount.currency.code(),
            account_id: &self.account_id,
            token: self.token.expose(),
            tr_initiator_code: initiator,
            payment_scheduled: scheduled,
            invoice_id: &self.invoice_id,
            description: self.description.as_deref(),
            email: self.email.as_deref(),
            ip_address: self.ip_address.map(|ip| ip.to_string()),
        }
    }
}

/// `/payments/cards/post3ds` body.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Post3dsBody<'a> {
    pub transaction_id: TransactionId,
    pub pa_res: &'a str,
}

/// `/payments/refund` body.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RefundBody {
    pub transaction_id: TransactionId,
    pub amount: WireAmount,
}

/// Body of the calls that only name a transaction (`void`, `get`).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TransactionIdBody {
    pub transaction_id: TransactionId,
}

/// `/payments/find` body.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct FindBody<'a> {
    pub invoice_id: &'a str,
}

/// A transaction's state (§4.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TransactionStatus {
    /// Waiting for the payer to pass 3-D Secure.
    AwaitingAuthentication,
    /// Authorized (two-stage), not yet captured.
    Authorized,
    /// Captured: the money is taken.
    Completed,
    /// Voided, or an authorization that expired.
    Cancelled,
    /// Declined.
    Declined,
    /// A status this code does not know, as the gateway wrote it.
    Unknown(String),
}

impl TransactionStatus {
    /// Reads `Status` (a name) or, failing that, `StatusCode` (1–5, §2.1).
    fn from_fields(f: &Fields) -> TransactionStatus {
        if let Some(name) = f.text("Status") {
            return TransactionStatus::from_name(&name);
        }
        match f.i64("StatusCode").ok().flatten() {
            Some(1) => TransactionStatus::AwaitingAuthentication,
            Some(2) => TransactionStatus::Authorized,
            Some(3) => TransactionStatus::Completed,
            Some(4) => TransactionStatus::Cancelled,
            Some(5) => TransactionStatus::Declined,
            Some(other) => TransactionStatus::Unknown(other.to_string()),
            None => TransactionStatus::Unknown(String::new()),
        }
    }

    /// Parses a status name, ignoring case.
    pub fn from_name(name: &str) -> TransactionStatus {
        match name.trim().to_ascii_lowercase().as_str() {
            "awaitingauthentication" => TransactionStatus::AwaitingAuthentication,
            "authorized" => TransactionStatus::Authorized,
            "completed" => TransactionStatus::Completed,
            "cancelled" | "canceled" => TransactionStatus::Cancelled,
            "declined" => TransactionStatus::Declined,
            _ => TransactionStatus::Unknown(name.to_owned()),
        }
    }

    /// The name the gateway uses.
    pub fn as_str(&self) -> &str {
        match self {
            TransactionStatus::AwaitingAuthentication => "AwaitingAuthentication",
            TransactionStatus::Authorized => "Authorized",
            TransactionStatus::Completed => "Completed",
            TransactionStatus::Cancelled => "Cancelled",
            TransactionStatus::Declined => "Declined",
            TransactionStatus::Unknown(s) => s,
        }
    }

    /// `StatusCode` for a known status.
    pub fn code(&self) -> Option<i32> {
        match self {
            TransactionStatus::AwaitingAuthentication => Some(1),
            TransactionStatus::Authorized => Some(2),
            TransactionStatus::Completed => Some(3),
            TransactionStatus::Cancelled => Some(4),
            TransactionStatus::Declined => Some(5),
            TransactionStatus::Unknown(_) => None,
        }
    }
}

impl fmt::Display for TransactionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The card as the gateway describes it: never the full number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CardInfo {
    /// First six digits (BIN).
    pub first_six: Option<String>,
    /// Last four digits.
    pub last_four: Option<String>,
    /// Brand: `Visa`, `MasterCard`, `MIR`, …
    pub card_type: Option<String>,
    /// Expiry as `MM/YY`.
    pub exp_date: Option<String>,
}

impl CardInfo {
    pub(crate) fn from_fields(f: &Fields) -> CardInfo {
        CardInfo {
            first_six: f.text("CardFirstSix"),
            last_four: f.text("CardLastFour"),
            card_type: f.text("CardType"),
            exp_date: f.text("CardExpDate"),
        }
    }

    /// A display mask such as `424242******4242`, when both ends are known.
    pub fn mask(&self) -> Option<String> {
        Some(format!(
            "{}******{}",
            self.first_six.as_deref()?,
            self.last_four.as_deref()?
        ))
    }
}

/// A transaction as the gateway reports it (the `Model` of charge, post3ds, get and find).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// Gateway id.
    pub transaction_id: TransactionId,
    /// Amount and currency.
    pub amount: Money,
    /// Our invoice id, echoed.
    pub invoice_id: Option<String>,
    /// Our payer id, echoed.
    pub account_id: Option<String>,
    /// Receipt e-mail.
    pub email: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// State.
    pub status: TransactionStatus,
    /// `0` when approved.
    pub reason_code: ReasonCode,
    /// `Reason`: the code's name, e.g. `InsufficientFunds`.
    pub reason: Option<String>,
    /// A localized message meant for the payer.
    pub card_holder_message: Option<String>,
    /// The card, without its number.
    pub card: CardInfo,
    /// Card token for later payments, when the gateway issued one.
    pub token: Option<Secret<String>>,
    /// Issuer's authorization code.
    pub auth_code: Option<String>,
    /// True on a test terminal.
    pub test_mode: bool,
    /// True once (part of) the payment was refunded.
    pub refunded: bool,
    /// The payment a refund belongs to.
    pub original_transaction_id: Option<TransactionId>,
    /// When the gateway created it (UTC).
    pub created_at: Option<DateTime<Utc>>,
}

impl Transaction {
    /// Reads a transaction model leniently: only `TransactionId` and a readable `Amount` are
    /// required; the currency defaults to RUB as on the gateway.
    pub(crate) fn from_fields(f: &Fields) -> Result<Transaction, FieldError> {
        let missing = |field: &str| FieldError {
            field: field.to_owned(),
        };
        let transaction_id = f
            .i64("TransactionId")?
            .ok_or_else(|| missing("TransactionId"))?;
        let currency = match f.text("Currency") {
            Some(code) => Currency::new(code.trim()).map_err(|_| missing("Currency"))?,
            None => Currency::RUB,
        };
        let amount = f.decimal("Amount")?.ok_or_else(|| missing("Amount"))?;
        let amount = Money::from_decimal(amount, currency).map_err(|_| missing("Amount"))?;
        let created_at = ["CreatedDateIso", "CreatedDate"]
            .iter()
            .find_map(|k| f.text(k).and_then(|s| wire::parse_datetime(&s)));
        let reason_code = f
            .i64("ReasonCode")?
            .map(|c| i32::try_from(c).map_err(|_| missing("ReasonCode")))
            .transpose()?
            .unwrap_or(0);
        Ok(Transaction {
            transaction_id,
            amount,
            invoice_id: f.text("InvoiceId"),
            account_id: f.text("AccountId"),
            email: f.text("Email"),
            description: f.text("Description"),
            status: TransactionStatus::from_fields(f),
            reason_code: ReasonCode(reason_code),
            reason: f.text("Reason"),
            card_holder_message: f.text("CardHolderMessage"),
            card: CardInfo::from_fields(f),
            token: f.text("Token").map(Secret::new),
            auth_code: f.text("AuthCode"),
            test_mode: f.bool("TestMode")?.unwrap_or(false),
            refunded: f.bool("Refunded")?.unwrap_or(false),
            original_transaction_id: f.i64("OriginalTransactionId")?,
            created_at,
        })
    }

    /// What billing may do after this transaction was declined; `None` when it was approved.
    pub fn decline_class(&self) -> Option<DeclineClass> {
        (!self.reason_code.is_approved() || self.status == TransactionStatus::Declined)
            .then(|| self.reason_code.class())
    }
}

/// A 3-D Secure challenge (§2.2): send the payer's browser to `acs_url` with a POST form of
/// `PaReq` = `pa_req`, `MD` = `transaction_id`, `TermUrl` = our return URL; finish with
/// [`Client::post3ds`](super::Client::post3ds) and the `PaRes` the ACS posts back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreeDsChallenge {
    /// The transaction waiting for authentication (the `MD` form field).
    pub transaction_id: TransactionId,
    /// `PaReq`, passed through unchanged.
    pub pa_req: String,
    /// The issuer's ACS page.
    pub acs_url: String,
}

impl ThreeDsChallenge {
    pub(crate) fn from_fields(f: &Fields) -> Result<ThreeDsChallenge, FieldError> {
        let missing = |field: &str| FieldError {
            field: field.to_owned(),
        };
        Ok(ThreeDsChallenge {
            transaction_id: f
                .i64("TransactionId")?
                .ok_or_else(|| missing("TransactionId"))?,
            pa_req: f.text("PaReq").ok_or_else(|| missing("PaReq"))?,
            acs_url: f.text("AcsUrl").ok_or_else(|| missing("AcsUrl"))?,
        })
    }
}

/// The answer to a payment call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Accepted: `Completed` for a charge (`Authorized` for an auth).
    Approved(Transaction),
    /// Declined; see [`Transaction::reason_code`] and [`Transaction::decline_class`].
    Declined(Transaction),
    /// The payer must pass 3-D Secure first.
    ThreeDs(ThreeDsChallenge),
}

impl ChargeOutcome {
    /// The gateway transaction id, whatever the outcome.
    pub fn transaction_id(&self) -> TransactionId {
        match self {
            ChargeOutcome::Approved(t) | ChargeOutcome::Declined(t) => t.transaction_id,
            ChargeOutcome::ThreeDs(c) => c.transaction_id,
        }
    }

    /// The transaction, unless a 3-D Secure challenge came back.
    pub fn transaction(&self) -> Option<&Transaction> {
        match self {
            ChargeOutcome::Approved(t) | ChargeOutcome::Declined(t) => Some(t),
            ChargeOutcome::ThreeDs(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn charge() -> CryptogramCharge {
        CryptogramCharge {
            amount: Money::new(29_900, Currency::RUB).unwrap(),
            ip_address: "127.0.0.1".parse().unwrap(),
            cryptogram: Secret::new("CRYPTO-SECRET".into()),
            name: Some("CARD HOLDER".into()),
            invoice_id: "inv-1".into(),
            account_id: "acc-1".into(),
            description: None,
            email: None,
            save_card: true,
        }
    }

    #[test]
    fn request_bodies_are_pascal_case_with_decimal_amounts() {
        let body = serde_json::to_string(&charge().body()).unwrap();
        assert_eq!(
            body,
            r#"{"Amount":299.00,"Currency":"RUB","IpAddress":"127.0.0.1","CardCryptogramPacket":"CRYPTO-SECRET","Name":"CARD HOLDER","InvoiceId":"inv-1","AccountId":"acc-1","SaveCard":true}"#
        );
        let token = TokenCharge {
            amount: Money::new(1, Currency::RUB).unwrap(),
            token: Secret::new("tk_x".into()),
            account_id: "a".into(),
            invoice_id: "i".into(),
            description: None,
            email: None,
            ip_address: None,
            initiator: TokenInitiator::default(),
        };
        let body = serde_json::to_string(&token.body()).unwrap();
        assert!(body.contains(r#""Amount":0.01"#), "{body}");
        assert!(
            body.contains(r#""TrInitiatorCode":0,"PaymentScheduled":1"#),
            "{body}"
        );
        assert!(!format!("{token:?}").contains("tk_x"));
    }

    #[test]
    fn transaction_is_read_leniently() {
        let f = Fields::from_json(json!({
            "TransactionId": 3360000001_i64, "Amount": 10.5, "Currency": "RUB", "InvoiceId": 1234567,
            "Status": "Declined", "StatusCode": 5, "ReasonCode": 5051, "Reason": "InsufficientFunds",
            "CardFirstSix": "400005", "CardLastFour": "5556", "TestMode": true,
            "CreatedDateIso": "2021-10-25T08:23:44", "Unknown": {"x": 1}
        }))
        .unwrap();
        let t = Transaction::from_fields(&f).unwrap();
        assert_eq!(t.transaction_id, 3_360_000_001);
        assert_eq!(t.amount.minor, 1050);
        assert_eq!(t.invoice_id.as_deref(), Some("1234567"));
        assert_eq!(t.status, TransactionStatus::Declined);
        assert_eq!(t.decline_class(), Some(DeclineClass::RetryLater));
        assert_eq!(t.card.mask().as_deref(), Some("400005******5556"));
        assert!(t.created_at.is_some());

        let by_code =
            Fields::from_json(json!({"TransactionId": "7", "Amount": "1.00", "StatusCode": 3}))
                .unwrap();
        let t = Transaction::from_fields(&by_code).unwrap();
        assert_eq!(t.status, TransactionStatus::Completed);
        assert_eq!(t.decline_class(), None);

        let fractional = Fields::from_json(json!({"TransactionId": 1, "Amount": 1.005})).unwrap();
        assert!(Transaction::from_fields(&fractional).is_err());
    }
}
