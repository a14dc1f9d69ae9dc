//! The fake's answers on the wire: the envelope (§1.3), the transaction model (§2.1), the 3-D
//! Secure model (§2.2). Keys are PascalCase, absent values are `null`, amounts are numbers with
//! two decimals.

use axum::body::Bytes;
use serde::Serialize;

use super::ledger::{TransactionKind, Txn};
use crate::cloudpayments::model::TransactionStatus;
use crate::cloudpayments::wire::{self, WireAmount};

#[derive(Serialize)]
struct Envelope<M> {
    #[serde(rename = "Model", skip_serializing_if = "Option::is_none")]
    model: Option<M>,
    #[serde(rename = "Success")]
    success: bool,
    #[serde(rename = "Message")]
    message: Option<String>,
}

fn to_bytes<M: Serialize>(model: Option<M>, success: bool, message: Option<String>) -> Bytes {
    // Serializing these plain structs cannot fail; an empty body would show up as malformed.
    Bytes::from(
        serde_json::to_vec(&Envelope {
            model,
            success,
            message,
        })
        .unwrap_or_default(),
    )
}

/// `{"Success":false,"Message":"…"}`: a request error.
pub(crate) fn request_error(message: &str) -> Bytes {
    to_bytes::<()>(None, false, Some(message.to_owned()))
}

/// `{"Success":true,"Message":…}` without a model.
pub(crate) fn ok(message: Option<String>) -> Bytes {
    to_bytes::<()>(None, true, message)
}

/// A transaction answer; `Success` is true only for approved payments and completed refunds.
pub(crate) fn transaction(txn: &Txn, terminal_url: &str) -> Bytes {
    let success = matches!(
        txn.status,
        TransactionStatus::Completed | TransactionStatus::Authorized
    );
    to_bytes(Some(TransactionModel::of(txn, terminal_url)), success, None)
}

/// A list answer: `{"Model":[…],"Success":true,"Message":null}`.
pub(crate) fn transactions(txns: &[&Txn], terminal_url: &str) -> Bytes {
    let models: Vec<TransactionModel<'_>> = txns
        .iter()
        .map(|t| TransactionModel::of(t, terminal_url))
        .collect();
    to_bytes(Some(models), true, None)
}

/// The refund answer: `{"Model":{"TransactionId":N},"Success":true,"Message":null}`.
pub(crate) fn refund(id: i64) -> Bytes {
    #[derive(Serialize)]
    struct RefundModel {
        #[serde(rename = "TransactionId")]
        transaction_id: i64,
    }
    to_bytes(Some(RefundModel { transaction_id: id }), true, None)
}

/// The 3-D Secure challenge.
pub(crate) fn three_ds(id: i64, pa_req: &str, acs_url: &str, callback_id: &str) -> Bytes {
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    struct ThreeDsModel<'a> {
        transaction_id: i64,
        pa_req: &'a str,
        go_req: Option<&'a str>,
        acs_url: &'a str,
        three_ds_session_data: Option<&'a str>,
        #[serde(rename = "IFrameIsAllowed")]
        iframe_is_allowed: bool,
        frame_width: Option<u32>,
        frame_height: Option<u32>,
        three_ds_callback_id: &'a str,
        escrow_accumulation_id: Option<&'a str>,
    }
    to_bytes(
        Some(ThreeDsModel {
            transaction_id: id,
            pa_req,
            go_req: None,
            acs_url,
            three_ds_session_data: None,
            iframe_is_allowed: true,
            frame_width: None,
            frame_height: None,
            three_ds_callback_id: callback_id,
            escrow_accumulation_id: None,
        }),
        false,
        None,
    )
}

/// `CardHolderMessage`: the approved and insufficient-funds texts are the documented ones; other
/// declines get a generic "operation declined".
pub(crate) fn card_holder_message(reason_code: i32) -> &'static str {
    match reason_code {
        0 => "Оплата успешно проведена",
        5051 => "Недостаточно средств на карте",
        5054 => "Истек срок действия карты",
        5206 | 5207 => "Не удалось пройти 3-D Secure",
        _ => "Операция отклонена",
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct TransactionModel<'a> {
    reason_code: i32,
    public_id: &'a str,
    terminal_url: &'a str,
    transaction_id: i64,
    amount: WireAmount,
    currency: &'a str,
    currency_code: Option<i32>,
    payment_amount: WireAmount,
    payment_currency: &'a str,
    payment_currency_code: Option<i32>,
    invoice_id: Option<&'a str>,
    account_id: Option<&'a str>,
    email: Option<&'a str>,
    description: Option<&'a str>,
    json_data: Option<&'a str>,
    created_date: String,
    created_date_iso: String,
    auth_date: Option<String>,
    auth_date_iso: Option<String>,
    confirm_date: Option<String>,
    confirm_date_iso: Option<String>,
    auth_code: Option<&'a str>,
    test_mode: bool,
    rrn: Option<&'a str>,
    original_transaction_id: Option<i64>,
    ip_address: Option<&'a str>,
    ip_country: &'a str,
    card_first_six: Option<&'a str>,
    card_last_four: Option<&'a str>,
    card_exp_date: Option<&'a str>,
    card_type: Option<&'a str>,
    issuer: &'a str,
    issuer_bank_country: &'a str,
    status: &'a str,
    status_code: Option<i32>,
    culture_name: &'a str,
    reason: &'a str,
    card_holder_message: &'a str,
    #[serde(rename = "Type")]
    kind: i32,
    refunded: bool,
    name: Option<&'a str>,
    token: Option<&'a str>,
    subscription_id: Option<&'a str>,
    gateway_name: &'a str,
    total_fee: WireAmount,
    #[serde(skip_serializing_if = "Option::is_none")]
    tr_initiator_code: Option<u8>,
}

impl<'a> TransactionModel<'a> {
    fn of(t: &'a Txn, terminal_url: &'a str) -> Self {
        let approved = matches!(
            t.status,
            TransactionStatus::Completed | TransactionStatus::Authorized
        );
        let card = t.card.as_ref();
        TransactionModel {
            reason_code: t.reason_code.0,
            public_id: &t.public_id,
            terminal_url,
            transaction_id: t.id,
            amount: WireAmount::of(t.amount),
            currency: t.amount.currency.code(),
            // Only RUB's code (0) is documented.
            currency_code: (t.amount.currency.code() == "RUB").then_some(0),
            payment_amount: WireAmount::of(t.amount),
            payment_currency: t.amount.currency.code(),
            payment_currency_code: (t.amount.currency.code() == "RUB").then_some(0),
            invoice_id: t.invoice_id.as_deref(),
            account_id: t.account_id.as_deref(),
            email: t.email.as_deref(),
            description: t.description.as_deref(),
            json_data: t.json_data.as_deref(),
            created_date: wire::format_dotnet_date(t.created),
            created_date_iso: wire::format_iso(t.created),
            auth_date: t.auth_date.map(wire::format_dotnet_date),
            auth_date_iso: t.auth_date.map(wire::format_iso),
            confirm_date: t.confirm_date.map(wire::format_dotnet_date),
            confirm_date_iso: t.confirm_date.map(wire::format_iso),
            auth_code: approved.then_some("A1B2C3"),
            test_mode: t.test_mode,
            rrn: None,
            original_transaction_id: t.original_id,
            ip_address: t.ip_address.as_deref(),
            ip_country: "RU",
            card_first_six: card.map(|c| c.first_six.as_str()),
            card_last_four: card.map(|c| c.last_four.as_str()),
            card_exp_date: card.map(|c| c.exp.as_str()),
            card_type: card.map(|c| c.brand),
            issuer: "CloudPayments",
            issuer_bank_country: "RU",
            status: t.status.as_str(),
            status_code: t.status.code(),
            culture_name: "ru-RU",
            reason: t.reason_code.name().unwrap_or("Unknown"),
            card_holder_message: card_holder_message(t.reason_code.0),
            kind: match t.kind {
                TransactionKind::Payment => 0,
                TransactionKind::Refund => 1,
            },
            refunded: t.refunded_minor > 0,
            name: t.name.as_deref(),
            token: t.token.as_deref(),
            subscription_id: None,
            gateway_name: if t.test_mode { "Test" } else { "Fake" },
            total_fee: WireAmount(rust_decimal::Decimal::new(0, 2)),
            tr_initiator_code: t.tr_initiator,
        }
    }
}
