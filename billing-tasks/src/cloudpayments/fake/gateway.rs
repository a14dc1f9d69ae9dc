//! The fake's API methods: validation, the payment state machine, tokens, refunds.
//!
//! Each method takes the authenticated terminal and the request's fields and returns the
//! response body (always HTTP 200, §1.4). The HTTP concerns — auth, the concurrency cap, faults,
//! latency, `X-Request-ID` replay — are in `server.rs`. Request-error texts follow the two
//! documented forms, `"<Field> is required"` and `"Invalid <Field> value"`; the others
//! (marked "ours" below) are the fake's choice, since the real texts are undocumented.

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::body::Bytes;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::Utc;
use rust_decimal::Decimal;

use super::cards::{self, Card, CardBehaviour, CardResult, PA_RES_OK, PA_RES_UNAVAILABLE};
use super::config::{FakeConfig, TerminalConfig};
use super::faults::FaultPlan;
use super::idempotency::IdempotencyCache;
use super::ledger::{CardSnapshot, Ledger, Pending3ds, TokenRecord, TransactionKind, Txn};
use super::notifier::{self, Notifier};
use super::responses;
use crate::cloudpayments::fields::Fields;
use crate::cloudpayments::model::{TransactionId, TransactionStatus};
use crate::cloudpayments::reason::ReasonCode;
use crate::cloudpayments::webhook::NotificationKind;
use crate::money::{Currency, Money};

/// The answer for an unknown transaction or invoice (the documented `find` text).
pub const NOT_FOUND: &str = "Not found";

/// The first transaction id: above `i32::MAX`, like production ids, so a client that squeezes
/// ids into 32 bits fails at once.
const FIRST_TRANSACTION_ID: i64 = 3_360_000_001;

/// The API methods the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Op {
    Test,
    CardsCharge,
    CardsAuth,
    Post3ds,
    TokensCharge,
    TokensAuth,
    Confirm,
    Void,
    Refund,
    Get,
    Find,
    FindV2,
    List,
}

impl Op {
    pub(crate) const ALL: [Op; 13] = [
        Op::Test,
        Op::CardsCharge,
        Op::CardsAuth,
        Op::Post3ds,
        Op::TokensCharge,
        Op::TokensAuth,
        Op::Confirm,
        Op::Void,
        Op::Refund,
        Op::Get,
        Op::Find,
        Op::FindV2,
        Op::List,
    ];

    pub(crate) fn path(self) -> &'static str {
        match self {
            Op::Test => "/test",
            Op::CardsCharge => "/payments/cards/charge",
            Op::CardsAuth => "/payments/cards/auth",
            Op::Post3ds => "/payments/cards/post3ds",
            Op::TokensCharge => "/payments/tokens/charge",
            Op::TokensAuth => "/payments/tokens/auth",
            Op::Confirm => "/payments/confirm",
            Op::Void => "/payments/void",
            Op::Refund => "/payments/refund",
            Op::Get => "/payments/get",
            Op::Find => "/payments/find",
            Op::FindV2 => "/v2/payments/find",
            Op::List => "/payments/list",
        }
    }

    /// Calls that take money (a [`super::Fault::Decline`] applies to these only).
    pub(crate) fn is_payment(self) -> bool {
        matches!(
            self,
            Op::CardsCharge | Op::CardsAuth | Op::Post3ds | Op::TokensCharge | Op::TokensAuth
        )
    }

    fn index(self) -> usize {
        Op::ALL.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// A terminal and its in-flight counter.
#[derive(Debug)]
pub(crate) struct Terminal {
    pub config: TerminalConfig,
    pub inflight: AtomicUsize,
}

/// Holds one of a terminal's in-flight slots until dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Terminal>);

impl Terminal {
    /// Takes a slot, or `None` when the terminal is at its limit.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.config.concurrency_limit;
        self.inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The fake's shared state.
#[derive(Debug)]
pub(crate) struct Gateway {
    pub config: FakeConfig,
    pub terminals: std::collections::HashMap<String, Arc<Terminal>>,
    pub ledger: Mutex<Ledger>,
    pub idempotency: IdempotencyCache,
    pub faults: Mutex<FaultPlan>,
    pub notifier: Arc<Notifier>,
    pub acs_url: String,
    requests: [AtomicU64; Op::ALL.len()],
    next_id: AtomicI64,
    /// Report card details the way some acquirers do (see [`super::FakeGateway::set_odd_card_display`]).
    pub odd_card_display: std::sync::atomic::AtomicBool,
}

/// A request error: the `Message` to answer with.
type Refusal = String;

fn required(field: &str) -> Refusal {
    format!("{field} is required")
}

fn invalid(field: &str) -> Refusal {
    format!("Invalid {field} value")
}

pub(crate) fn random_hex(n: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    (0..n)
        .map(|_| char::from(HEX[fastrand::usize(..16)]))
        .collect()
}

impl Gateway {
    pub(crate) fn new(config: FakeConfig, notifier: Notifier, acs_url: String) -> Gateway {
        let terminals = config
            .terminals
            .iter()
            .map(|t| {
                (
                    t.public_id.clone(),
                    Arc::new(Terminal {
                        config: t.clone(),
                        inflight: AtomicUsize::new(0),
                    }),
                )
            })
            .collect();
        let faults = match config.fault_seed {
            Some(seed) => FaultPlan::seeded(seed),
            None => FaultPlan::default(),
        };
        let idempotency = IdempotencyCache::new(config.idempotency_ttl);
        idempotency.set_block_in_flight(config.block_in_flight_duplicates);
        Gateway {
            idempotency,
            config,
            terminals,
            ledger: Mutex::new(Ledger::default()),
            faults: Mutex::new(faults),
            notifier: Arc::new(notifier),
            acs_url,
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            next_id: AtomicI64::new(FIRST_TRANSACTION_ID),
            odd_card_display: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Every ledger update is a handful of map writes that cannot panic half-way in a way
        // that matters to a test double; keep serving after a poisoning panic.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn faults(&self) -> MutexGuard<'_, FaultPlan> {
        self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn count_request(&self, op: Op) {
        self.requests[op.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn requests(&self, path: &str) -> u64 {
        Op::ALL
            .iter()
            .find(|op| op.path().eq_ignore_ascii_case(path))
            .map_or(0, |op| self.requests[op.index()].load(Ordering::Relaxed))
    }

    fn next_id(&self) -> TransactionId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs one API method.
    pub(crate) async fn process(
        &self,
        op: Op,
        terminal: &Terminal,
        fields: &Fields,
        request_id: Option<&str>,
        forced: Option<ReasonCode>,
    ) -> Bytes {
        let result = match op {
            Op::Test => Ok(responses::ok(Some(uuid::Uuid::new_v4().to_string()))),
            Op::CardsCharge => {
                self.card_payment(terminal, fields, request_id, forced, false)
                    .await
            }
            Op::CardsAuth => {
                self.card_payment(terminal, fields, request_id, forced, true)
                    .await
            }
            Op::Post3ds => self.post3ds(terminal, fields, forced),
            Op::TokensCharge => {
                self.token_payment(terminal, fields, request_id, forced, false)
                    .await
            }
            Op::TokensAuth => {
                self.token_payment(terminal, fields, request_id, forced, true)
                    .await
            }
            Op::Confirm => self.confirm(terminal, fields),
            Op::Void => self.void(terminal, fields),
            Op::Refund => self.refund(terminal, fields, request_id),
            Op::Get => self.get(terminal, fields),
            Op::Find => self.find(terminal, fields, false),
            Op::FindV2 => self.find(terminal, fields, true),
            Op::List => self.list(terminal, fields),
        };
        result.unwrap_or_else(|message| responses::request_error(&message))
    }

    fn amount(fields: &Fields, currency: Option<Currency>) -> Result<Money, Refusal> {
        let amount = match fields.decimal("Amount") {
            Ok(Some(d)) => d,
            Ok(None) => return Err(required("Amount")),
            Err(_) => return Err(invalid("Amount")),
        };
        let currency = match currency {
            Some(c) => c,
            None => match fields.text("Currency") {
                Some(code) => Currency::new(&code.trim().to_ascii_uppercase())
                    .map_err(|_| invalid("Currency"))?,
                None => Currency::RUB,
            },
        };
        if amount <= Decimal::ZERO || amount.normalize().scale() > 2 {
            return Err(invalid("Amount"));
        }
        Money::from_decimal(amount, currency).map_err(|_| invalid("Amount"))
    }

    fn transaction_id(fields: &Fields) -> Result<TransactionId, Refusal> {
        match fields.i64("TransactionId") {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(required("TransactionId")),
            Err(_) => Err(invalid("TransactionId")),
        }
    }

    fn flag(fields: &Fields, key: &str) -> Result<Option<bool>, Refusal> {
        fields.bool(key).map_err(|_| invalid(key))
    }

    /// A payment not yet recorded, with the request's common fields.
    fn new_payment(
        &self,
        terminal: &Terminal,
        amount: Money,
        fields: &Fields,
        request_id: Option<&str>,
        two_stage: bool,
    ) -> Txn {
        Txn {
            id: self.next_id(),
            public_id: terminal.config.public_id.clone(),
            kind: TransactionKind::Payment,
            status: TransactionStatus::Declined,
            amount,
            invoice_id: fields.text("InvoiceId"),
            account_id: fields.text("AccountId"),
            email: fields.text("Email"),
            description: fields.text("Description"),
            name: fields.text("Name"),
            ip_address: fields.text("IpAddress"),
            json_data: fields.text("JsonData"),
            card: None,
            reason_code: ReasonCode::APPROVED,
            created: Utc::now(),
            auth_date: None,
            confirm_date: None,
            token: None,
            test_mode: terminal.config.test_mode,
            refunded_minor: 0,
            original_id: None,
            request_id: request_id.map(str::to_owned),
            two_stage,
            tr_initiator: None,
            pending: None,
        }
    }

    /// Sends Check when configured; the decline reason if the merchant refused.
    async fn check(&self, terminal: &Terminal, txn: &Txn) -> Option<ReasonCode> {
        if !self.notifier.has_url(NotificationKind::Check) {
            return None;
        }
        let fields = notifier::payment_fields(NotificationKind::Check, txn);
        self.notifier
            .check(&terminal.config.api_secret, &fields, txn.id)
            .await
    }

    async fn card_payment(
        &self,
        terminal: &Terminal,
        fields: &Fields,
        request_id: Option<&str>,
        forced: Option<ReasonCode>,
        two_stage: bool,
    ) -> Result<Bytes, Refusal> {
        let amount = Gateway::amount(fields, None)?;
        let ip = fields
            .text("IpAddress")
            .ok_or_else(|| required("IpAddress"))?;
        ip.trim()
            .parse::<IpAddr>()
            .map_err(|_| invalid("IpAddress"))?;
        let packet = fields
            .text("CardCryptogramPacket")
            .ok_or_else(|| required("CardCryptogramPacket"))?;
        let card = cards::read_cryptogram(&packet).ok_or(cards::BAD_CRYPTOGRAM_MESSAGE)?;
        // The dashboard decides whether tokens are saved; the fake saves unless told not to.
        let save_card = Gateway::flag(fields, "SaveCard")?.unwrap_or(true);

        let mut txn = self.new_payment(terminal, amount, fields, request_id, two_stage);
        txn.card = Some(self.displayed(snapshot(&card)));
        let declined_by = match self.check(terminal, &txn).await {
            Some(code) => Some(code),
            None => forced.or(card.forced_decline),
        };
        if let Some(code) = declined_by {
            return Ok(self.finish(terminal, txn, CardResult::Decline(code), None));
        }
        if card.expired() {
            return Ok(self.finish(
                terminal,
                txn,
                CardResult::Decline(ReasonCode::EXPIRED_CARD),
                None,
            ));
        }
        let behaviour = card.behaviour;
        if behaviour.three_ds {
            return Ok(self.challenge(txn, behaviour, save_card));
        }
        let issue = save_card.then_some(behaviour);
        Ok(self.finish(terminal, txn, behaviour.payment, issue))
    }

    /// Records a payment awaiting 3-D Secure and answers with the challenge.
    fn challenge(&self, mut txn: Txn, behaviour: CardBehaviour, save_card: bool) -> Bytes {
        txn.status = TransactionStatus::AwaitingAuthentication;
        txn.pending = Some(Pending3ds {
            result: behaviour.payment,
            behaviour,
            save_card,
        });
        let id = txn.id;
        let pa_req = STANDARD.encode(format!(r#"{{"TransactionId":{id},"Fake":true}}"#));
        self.ledger().insert(txn);
        responses::three_ds(id, &pa_req, &self.acs_url, &random_hex(32))
    }

    /// Settles a payment as approved or declined, records it, issues a token when asked, sends
    /// Pay or Fail, and answers.
    fn finish(
        &self,
        terminal: &Terminal,
        mut txn: Txn,
        result: CardResult,
        issue_token: Option<CardBehaviour>,
    ) -> Bytes {
        self.settle(&mut txn, result);
        {
            let mut ledger = self.ledger();
            txn.token = issue_token_in(&mut ledger, &txn, issue_token).or(txn.token);
            ledger.insert(txn.clone());
        }
        self.notify_settled(terminal, &txn);
        responses::transaction(&txn, TERMINAL_URL)
    }

    fn settle(&self, txn: &mut Txn, result: CardResult) {
        let now = Utc::now();
        match result {
            CardResult::Approve => {
                txn.reason_code = ReasonCode::APPROVED;
                txn.auth_date = Some(now);
                if txn.two_stage {
                    txn.status = TransactionStatus::Authorized;
                } else {
                    txn.status = TransactionStatus::Completed;
                    txn.confirm_date = Some(now);
                }
            }
            CardResult::Decline(code) => {
                txn.reason_code = code;
                txn.status = TransactionStatus::Declined;
            }
        }
    }

    fn notify_settled(&self, terminal: &Terminal, txn: &Txn) {
        let kind = if txn.reason_code.is_approved() {
            NotificationKind::Pay
        } else {
            NotificationKind::Fail
        };
        if self.notifier.has_url(kind) {
            self.notifier.send(
                kind,
                terminal.config.api_secret.clone(),
                notifier::payment_fields(kind, txn),
                Some(txn.id),
            );
        }
    }

    fn post3ds(
        &self,
        terminal: &Terminal,
        fields: &Fields,
        forced: Option<ReasonCode>,
    ) -> Result<Bytes, Refusal> {
        let id = Gateway::transaction_id(fields)?;
        let pa_res = fields.text("PaRes").ok_or_else(|| required("PaRes"))?;
        let txn = {
            let mut ledger = self.ledger();
            let txn = ledger
                .get_mut(id)
                .filter(|t| t.public_id == terminal.config.public_id)
                .ok_or(NOT_FOUND)?;
            // Ours: the real text for a transaction not waiting for 3-D Secure is undocumented.
            let pending = txn
                .pending
                .take()
                .ok_or("Transaction is not awaiting authentication")?;
            let result = match pa_res.trim() {
                PA_RES_OK => forced.map_or(pending.result, CardResult::Decline),
                PA_RES_UNAVAILABLE => CardResult::Decline(ReasonCode::AUTHENTICATION_UNAVAILABLE),
                _ => CardResult::Decline(ReasonCode::AUTHENTICATION_FAILED),
            };
            self.settle(txn, result);
            let snapshot = txn.clone();
            let token = issue_token_in(
                &mut ledger,
                &snapshot,
                pending.save_card.then_some(pending.behaviour),
            );
            if let Some(stored) = ledger.get_mut(id) {
                stored.token = token;
            }
            if snapshot.reason_code.is_approved() {
                ledger.count_approval(id);
            }
            ledger.get(id).cloned().unwrap_or(snapshot)
        };
        self.notify_settled(terminal, &txn);
        Ok(responses::transaction(&txn, TERMINAL_URL))
    }

    async fn token_payment(
        &self,
        terminal: &Terminal,
        fields: &Fields,
        request_id: Option<&str>,
        forced: Option<ReasonCode>,
        two_stage: bool,
    ) -> Result<Bytes, Refusal> {
        let amount = Gateway::amount(fields, None)?;
        let account_id = fields
            .text("AccountId")
            .ok_or_else(|| required("AccountId"))?;
        let token = fields.text("Token").ok_or_else(|| required("Token"))?;
        let initiator = match fields.i64("TrInitiatorCode") {
            Ok(Some(c @ (0 | 1))) => c,
            Ok(None) => return Err(required("TrInitiatorCode")),
            _ => return Err(invalid("TrInitiatorCode")),
        };
        if !matches!(fields.i64("PaymentScheduled"), Ok(None | Some(0 | 1))) {
            return Err(invalid("PaymentScheduled"));
        }
        // Ours: the texts for an unknown token and a payer mismatch are undocumented.
        let record = self
            .ledger()
            .token(&token)
            .cloned()
            .ok_or("Token not found")?;

        let mut txn = self.new_payment(terminal, amount, fields, request_id, two_stage);
        txn.card = Some(record.card.clone());
        txn.token = Some(token);
        txn.tr_initiator = u8::try_from(initiator).ok();
        if record.public_id != terminal.config.public_id {
            return Ok(self.finish(
                terminal,
                txn,
                CardResult::Decline(ReasonCode::CROSS_TERMINAL_TOKEN),
                None,
            ));
        }
        if record.account_id != account_id {
            return Err("AccountId does not match the token".into());
        }
        let declined_by = match self.check(terminal, &txn).await {
            Some(code) => Some(code),
            None => forced,
        };
        let result = match declined_by {
            Some(code) => CardResult::Decline(code),
            None => record.behaviour.token,
        };
        Ok(self.finish(terminal, txn, result, None))
    }

    fn confirm(&self, terminal: &Terminal, fields: &Fields) -> Result<Bytes, Refusal> {
        let id = Gateway::transaction_id(fields)?;
        let txn = {
            let mut ledger = self.ledger();
            let txn = ledger
                .get_mut(id)
                .filter(|t| t.public_id == terminal.config.public_id)
                .ok_or(NOT_FOUND)?;
            let amount = Gateway::amount(fields, Some(txn.amount.currency))?;
            if txn.status != TransactionStatus::Authorized {
                // Ours.
                return Err("Only authorized transactions can be confirmed".into());
            }
            if amount.minor > txn.amount.minor {
                // Ours.
                return Err("Amount exceeds the authorized amount".into());
            }
            txn.amount = amount;
            txn.status = TransactionStatus::Completed;
            txn.confirm_date = Some(Utc::now());
            txn.clone()
        };
        if self.notifier.has_url(NotificationKind::Confirm) {
            self.notifier.send(
                NotificationKind::Confirm,
                terminal.config.api_secret.clone(),
                notifier::payment_fields(NotificationKind::Confirm, &txn),
                Some(txn.id),
            );
        }
        Ok(responses::ok(None))
    }

    fn void(&self, terminal: &Terminal, fields: &Fields) -> Result<Bytes, Refusal> {
        let id = Gateway::transaction_id(fields)?;
        let txn = {
            let mut ledger = self.ledger();
            let txn = ledger
                .get_mut(id)
                .filter(|t| t.public_id == terminal.config.public_id)
                .ok_or(NOT_FOUND)?;
            if txn.status != TransactionStatus::Authorized {
                // Ours: only two-stage payments not yet captured can be voided (§3.6).
                return Err("Only authorized transactions can be voided".into());
            }
            txn.status = TransactionStatus::Cancelled;
            txn.clone()
        };
        if self.notifier.has_url(NotificationKind::Cancel) {
            self.notifier.send(
                NotificationKind::Cancel,
                terminal.config.api_secret.clone(),
                notifier::cancel_fields(&txn),
                Some(txn.id),
            );
        }
        Ok(responses::ok(None))
    }

    fn refund(
        &self,
        terminal: &Terminal,
        fields: &Fields,
        request_id: Option<&str>,
    ) -> Result<Bytes, Refusal> {
        let id = Gateway::transaction_id(fields)?;
        let (refund, payment) = {
            let mut ledger = self.ledger();
            let payment = ledger
                .get_mut(id)
                .filter(|t| t.public_id == terminal.config.public_id)
                .ok_or(NOT_FOUND)?;
            let amount = Gateway::amount(fields, Some(payment.amount.currency))?;
            if payment.kind != TransactionKind::Payment
                || payment.status != TransactionStatus::Completed
            {
                // Ours.
                return Err("Only completed payments can be refunded".into());
            }
            if Utc::now() - payment.created > chrono::Duration::days(365) {
                // Ours: refunds are refused after a year (§3.7).
                return Err("Refund period has expired".into());
            }
            if payment.refunded_minor + amount.minor > payment.amount.minor {
                // Ours.
                return Err("Refund amount exceeds the amount available for refund".into());
            }
            payment.refunded_minor += amount.minor;
            let payment = payment.clone();
            let refund = Txn {
                id: self.next_id(),
                kind: TransactionKind::Refund,
                status: TransactionStatus::Completed,
                amount,
                created: Utc::now(),
                auth_date: None,
                confirm_date: Some(Utc::now()),
                refunded_minor: 0,
                original_id: Some(payment.id),
                request_id: request_id.map(str::to_owned),
                tr_initiator: None,
                token: None,
                pending: None,
                reason_code: ReasonCode::APPROVED,
                ..payment.clone()
            };
            ledger.insert(refund.clone());
            (refund, payment)
        };
        if self.notifier.has_url(NotificationKind::Refund) {
            self.notifier.send(
                NotificationKind::Refund,
                terminal.config.api_secret.clone(),
                notifier::refund_fields(&refund, &payment),
                Some(refund.id),
            );
        }
        Ok(responses::refund(refund.id))
    }

    fn get(&self, terminal: &Terminal, fields: &Fields) -> Result<Bytes, Refusal> {
        let id = Gateway::transaction_id(fields)?;
        let ledger = self.ledger();
        let txn = ledger
            .get(id)
            .filter(|t| t.public_id == terminal.config.public_id)
            .ok_or(NOT_FOUND)?;
        Ok(responses::transaction(txn, TERMINAL_URL))
    }

    /// `/payments/list`: the terminal's operations created on `Date` (UTC; other time zones are
    /// not emulated), oldest first.
    fn list(&self, terminal: &Terminal, fields: &Fields) -> Result<Bytes, Refusal> {
        let date = fields.text("Date").ok_or_else(|| required("Date"))?;
        let date = chrono::NaiveDate::parse_from_str(date.trim(), "%Y-%m-%d")
            .map_err(|_| invalid("Date"))?;
        let ledger = self.ledger();
        let txns = ledger.created_on(&terminal.config.public_id, date);
        Ok(responses::transactions(&txns, TERMINAL_URL))
    }

    fn find(&self, terminal: &Terminal, fields: &Fields, any_kind: bool) -> Result<Bytes, Refusal> {
        let invoice = fields
            .text("InvoiceId")
            .ok_or_else(|| required("InvoiceId"))?;
        let ledger = self.ledger();
        let txn = ledger
            .find(&terminal.config.public_id, invoice.trim(), any_kind)
            .ok_or(NOT_FOUND)?;
        Ok(responses::transaction(txn, TERMINAL_URL))
    }

    /// Sends an arbitrary notification (e.g. Recurrent, which the fake has no subscriptions to
    /// trigger) through the normal signed, re-sending path.
    pub(crate) fn send_notification(
        &self,
        public_id: &str,
        kind: NotificationKind,
        fields: Vec<(String, String)>,
    ) -> bool {
        let Some(terminal) = self.terminals.get(public_id) else {
            return false;
        };
        if !self.notifier.has_url(kind) {
            return false;
        }
        let id = fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("TransactionId"))
            .and_then(|(_, v)| v.parse().ok());
        self.notifier
            .send(kind, terminal.config.api_secret.clone(), fields, id);
        true
    }
}

/// `TerminalUrl` in transaction models: the merchant's site.
const TERMINAL_URL: &str = "http://localhost";

/// Issues a token for an approved card payment with an AccountId, bound to its terminal and
/// payer, when `behaviour` (the card's) is given.
fn issue_token_in(
    ledger: &mut Ledger,
    txn: &Txn,
    behaviour: Option<CardBehaviour>,
) -> Option<String> {
    let behaviour = behaviour?;
    let account_id = txn.account_id.clone()?;
    let card = txn.card.clone()?;
    if !txn.reason_code.is_approved() || txn.status == TransactionStatus::Declined {
        return None;
    }
    let token = format!("tk_{}", random_hex(29));
    ledger.add_token(
        token.clone(),
        TokenRecord {
            public_id: txn.public_id.clone(),
            account_id,
            card,
            behaviour,
        },
    );
    Some(token)
}

impl Gateway {
    /// The card as a transaction reports it: as recorded, or, with odd display on, with the
    /// first six spaced (`4000 00`) and a four-digit year (`12/2030`).
    fn displayed(&self, mut card: CardSnapshot) -> CardSnapshot {
        if self
            .odd_card_display
            .load(std::sync::atomic::Ordering::Acquire)
        {
            if card.first_six.len() == 6 {
                card.first_six = format!("{} {}", &card.first_six[..4], &card.first_six[4..]);
            }
            if let Some((mm, yy)) = card.exp.split_once('/') {
                card.exp = format!("{mm}/20{yy}");
            }
        }
        card
    }
}

fn snapshot(card: &Card) -> CardSnapshot {
    CardSnapshot {
        first_six: card.first_six.clone(),
        last_four: card.last_four.clone(),
        exp: card.exp.clone(),
        brand: card.behaviour.brand,
    }
}
