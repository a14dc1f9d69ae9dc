//! The fake's books: transactions, card tokens, and the counters tests read.
//!
//! Plain data behind one mutex that is held only for map updates (microseconds), never across an
//! await. A payment counts as a charge when it is approved (`Completed` or `Authorized`), once,
//! against its InvoiceId and against the (InvoiceId, `X-Request-ID`) of the request that created
//! it — so a test can prove an invoice was charged exactly once however many times it was sent.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use super::cards::{CardBehaviour, CardResult};
use crate::cloudpayments::model::{TransactionId, TransactionStatus};
use crate::cloudpayments::reason::ReasonCode;
use crate::money::{Currency, Money};
use crate::secret::Secret;

/// What a transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransactionKind {
    /// A payment (`Type: 0`).
    Payment,
    /// A refund of a payment (`Type: 1` on the fake; the real code is undocumented).
    Refund,
}

/// The card a transaction was made with, as far as the gateway may show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CardSnapshot {
    pub first_six: String,
    pub last_four: String,
    pub exp: String,
    pub brand: &'static str,
}

/// A payment waiting for 3-D Secure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending3ds {
    /// What the card does once authenticated.
    pub result: CardResult,
    pub behaviour: CardBehaviour,
    pub save_card: bool,
}

/// One transaction on the fake.
#[derive(Debug, Clone)]
pub(crate) struct Txn {
    pub id: TransactionId,
    pub public_id: String,
    pub kind: TransactionKind,
    pub status: TransactionStatus,
    pub amount: Money,
    pub invoice_id: Option<String>,
    pub account_id: Option<String>,
    pub email: Option<String>,
    pub description: Option<String>,
    pub name: Option<String>,
    pub ip_address: Option<String>,
    pub json_data: Option<String>,
    pub card: Option<CardSnapshot>,
    pub reason_code: ReasonCode,
    pub created: DateTime<Utc>,
    pub auth_date: Option<DateTime<Utc>>,
    pub confirm_date: Option<DateTime<Utc>>,
    pub token: Option<String>,
    pub test_mode: bool,
    pub refunded_minor: i64,
    pub original_id: Option<TransactionId>,
    pub request_id: Option<String>,
    pub two_stage: bool,
    pub tr_initiator: Option<u8>,
    pub pending: Option<Pending3ds>,
}

/// A card token: usable only on its terminal, for its payer.
#[derive(Debug, Clone)]
pub(crate) struct TokenRecord {
    pub public_id: String,
    pub account_id: String,
    pub card: CardSnapshot,
    pub behaviour: CardBehaviour,
}

/// A snapshot of a transaction for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeTransaction {
    /// Gateway id.
    pub id: TransactionId,
    /// The terminal it was made on.
    pub public_id: String,
    /// Payment or refund.
    pub kind: TransactionKind,
    /// State.
    pub status: TransactionStatus,
    /// Amount (for a confirmed two-stage payment, the captured amount).
    pub amount: Money,
    /// Amount refunded so far (payments only).
    pub refunded: Money,
    /// InvoiceId.
    pub invoice_id: Option<String>,
    /// AccountId.
    pub account_id: Option<String>,
    /// Reason code (0 approved).
    pub reason_code: ReasonCode,
    /// The `X-Request-ID` of the request that created it.
    pub request_id: Option<String>,
    /// The payment a refund belongs to.
    pub original_id: Option<TransactionId>,
    /// Card token issued with it.
    pub token: Option<Secret<String>>,
    /// Last four digits of the card.
    pub card_last_four: Option<String>,
    /// When it was created.
    pub created: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy)]
struct Approvals {
    count: u32,
    total_minor: i64,
    currency: Currency,
}

/// All the fake's state.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    txns: HashMap<TransactionId, Txn>,
    /// Latest payment per (PublicId, InvoiceId), for `/payments/find`.
    latest_payment: HashMap<(String, String), TransactionId>,
    /// Latest operation of any kind, for `/v2/payments/find`.
    latest_any: HashMap<(String, String), TransactionId>,
    tokens: HashMap<String, TokenRecord>,
    approvals: HashMap<String, Approvals>,
    approvals_by_request: HashMap<(String, String), u32>,
}

impl Ledger {
    /// Records a new transaction (its id must be fresh) and counts it if approved.
    pub(crate) fn insert(&mut self, txn: Txn) {
        if let Some(invoice) = &txn.invoice_id {
            let key = (txn.public_id.clone(), invoice.clone());
            if txn.kind == TransactionKind::Payment {
                self.latest_payment.insert(key.clone(), txn.id);
            }
            self.latest_any.insert(key, txn.id);
        }
        let approved = is_approved(&txn.status);
        let id = txn.id;
        self.txns.insert(id, txn);
        if approved {
            self.count_approval(id);
        }
    }

    pub(crate) fn get(&self, id: TransactionId) -> Option<&Txn> {
        self.txns.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: TransactionId) -> Option<&mut Txn> {
        self.txns.get_mut(&id)
    }

    /// Counts a payment that just became approved (insert, or 3-D Secure passed).
    pub(crate) fn count_approval(&mut self, id: TransactionId) {
        let Some(txn) = self.txns.get(&id) else {
            return;
        };
        if txn.kind != TransactionKind::Payment {
            return;
        }
        let Some(invoice) = txn.invoice_id.clone() else {
            return;
        };
        let a = self.approvals.entry(invoice.clone()).or_insert(Approvals {
            count: 0,
            total_minor: 0,
            currency: txn.amount.currency,
        });
        a.count += 1;
        a.total_minor += txn.amount.minor;
        if let Some(request_id) = txn.request_id.clone() {
            *self
                .approvals_by_request
                .entry((invoice, request_id))
                .or_default() += 1;
        }
    }

    pub(crate) fn find(&self, public_id: &str, invoice_id: &str, any_kind: bool) -> Option<&Txn> {
        let key = (public_id.to_owned(), invoice_id.to_owned());
        let index = if any_kind {
            &self.latest_any
        } else {
            &self.latest_payment
        };
        index.get(&key).and_then(|id| self.txns.get(id))
    }

    pub(crate) fn add_token(&mut self, token: String, record: TokenRecord) {
        self.tokens.insert(token, record);
    }

    pub(crate) fn token(&self, token: &str) -> Option<&TokenRecord> {
        self.tokens.get(token)
    }

    pub(crate) fn charges_for_invoice(&self, invoice: &str) -> u32 {
        self.approvals.get(invoice).map_or(0, |a| a.count)
    }

    pub(crate) fn charges_for_request(&self, invoice: &str, request_id: &str) -> u32 {
        self.approvals_by_request
            .get(&(invoice.to_owned(), request_id.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    pub(crate) fn total_charged(&self, invoice: &str) -> Option<Money> {
        self.approvals.get(invoice).map(|a| Money {
            minor: a.total_minor,
            currency: a.currency,
        })
    }

    pub(crate) fn snapshot(&self, txn: &Txn) -> FakeTransaction {
        FakeTransaction {
            id: txn.id,
            public_id: txn.public_id.clone(),
            kind: txn.kind,
            status: txn.status.clone(),
            amount: txn.amount,
            refunded: Money {
                minor: txn.refunded_minor,
                currency: txn.amount.currency,
            },
            invoice_id: txn.invoice_id.clone(),
            account_id: txn.account_id.clone(),
            reason_code: txn.reason_code,
            request_id: txn.request_id.clone(),
            original_id: txn.original_id,
            token: txn.token.clone().map(Secret::new),
            card_last_four: txn.card.as_ref().map(|c| c.last_four.clone()),
            created: txn.created,
        }
    }

    /// Every transaction, oldest first.
    /// A terminal's transactions created on `date` (UTC), oldest first.
    pub(crate) fn created_on(&self, public_id: &str, date: chrono::NaiveDate) -> Vec<&Txn> {
        let mut txns: Vec<&Txn> = self
            .txns
            .values()
            .filter(|t| t.public_id == public_id && t.created.date_naive() == date)
            .collect();
        txns.sort_by_key(|t| t.id);
        txns
    }

    pub(crate) fn all(&self) -> Vec<FakeTransaction> {
        let mut all: Vec<_> = self.txns.values().map(|t| self.snapshot(t)).collect();
        all.sort_by_key(|t| t.id);
        all
    }

    pub(crate) fn len(&self) -> usize {
        self.txns.len()
    }
}

pub(crate) fn is_approved(status: &TransactionStatus) -> bool {
    matches!(
        status,
        TransactionStatus::Completed | TransactionStatus::Authorized
    )
}
