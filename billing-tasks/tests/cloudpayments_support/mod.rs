//! Shared helpers for the `cloudpayments_*` tests: a fake gateway with a client, requests built
//! from test cards, a scripted webhook receiver, and a bounded poll.

#![allow(dead_code)] // Each test file uses a different part.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use billing_tasks::cloudpayments::fake::{
    self, FakeConfig, FakeGateway, TerminalConfig, WebhookConfig,
};
use billing_tasks::cloudpayments::{
    Client, CryptogramCharge, TokenCharge, TokenInitiator, Transaction,
};
use billing_tasks::money::{Currency, Money};
use billing_tasks::secret::Secret;

/// Success, no 3-D Secure (§7).
pub const CARD_OK: &str = "4000000000003055";
/// Success with 3-D Secure.
pub const CARD_3DS_OK: &str = "4242424242424242";
/// Insufficient funds after 3-D Secure.
pub const CARD_3DS_NSF: &str = "4012888888881881";
/// Insufficient funds, no 3-D Secure.
pub const CARD_NSF: &str = "4000056655665556";
/// Success, but its token payments fail with insufficient funds.
pub const CARD_TOKEN_NSF: &str = "4111111111111111";
/// A valid expiry.
pub const EXP: &str = "12/30";

/// Roubles in kopecks.
pub fn rub(minor: i64) -> Money {
    Money::new(minor, Currency::RUB).expect("a valid amount")
}

/// A fresh id (invoice, request id, account).
pub fn id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4())
}

/// A fake with the default test terminal and a client for it.
pub async fn start() -> (FakeGateway, Client) {
    start_with(FakeConfig::default()).await
}

/// A fake with `config` and a client for its first terminal.
pub async fn start_with(config: FakeConfig) -> (FakeGateway, Client) {
    let fake = FakeGateway::start(config).await.expect("the fake starts");
    let client = Client::new(fake.client_config()).expect("the client builds");
    (fake, client)
}

/// A client with a short whole-request timeout, for fault tests.
pub fn client_with_timeout(fake: &FakeGateway, timeout: Duration) -> Client {
    let config = fake
        .client_config()
        .with_timeouts(Duration::from_secs(2), timeout);
    Client::new(config).expect("the client builds")
}

/// A cryptogram payment of 299.00 with `pan`.
pub fn card_charge(pan: &str, invoice: &str, account: &str) -> CryptogramCharge {
    CryptogramCharge {
        amount: rub(29_900),
        ip_address: "203.0.113.7".parse().expect("an IP"),
        cryptogram: Secret::new(fake::test_cryptogram(pan, EXP)),
        name: Some("CARD HOLDER".into()),
        invoice_id: invoice.to_owned(),
        account_id: account.to_owned(),
        description: Some("Подписка на месяц".into()),
        email: Some("payer@example.com".into()),
        save_card: true,
    }
}

/// A scheduled token renewal of 299.00.
pub fn token_charge(token: &Secret<String>, account: &str, invoice: &str) -> TokenCharge {
    TokenCharge {
        amount: rub(29_900),
        token: token.clone(),
        account_id: account.to_owned(),
        invoice_id: invoice.to_owned(),
        description: Some("Продление подписки".into()),
        email: None,
        ip_address: None,
        initiator: TokenInitiator::ScheduledMerchant,
    }
}

/// Pays with a non-3-D Secure card and returns the approved transaction (with its token).
pub async fn paid(client: &Client, pan: &str, account: &str) -> Transaction {
    let invoice = id("inv");
    match client
        .charge_cryptogram(&card_charge(pan, &invoice, account), &id("req"))
        .await
        .expect("the charge call succeeds")
    {
        billing_tasks::cloudpayments::ChargeOutcome::Approved(t) => t,
        other => panic!("expected an approval, got {other:?}"),
    }
}

/// Polls `check` every 10 ms until it returns `Some`, failing with `what` after `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A second test terminal.
pub fn other_terminal() -> TerminalConfig {
    TerminalConfig::test("test_api_00000000000000000000002", "other-secret")
}

/// One notification as the receiver got it.
#[derive(Debug, Clone)]
pub struct Received {
    pub kind: String,
    pub content_type: Option<String>,
    pub content_hmac: Option<String>,
    pub x_content_hmac: Option<String>,
    pub body: Bytes,
}

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    /// HTTP 200 `{"code":N}`.
    Code(i64),
    /// This HTTP status with an empty body.
    Status(u16),
    /// HTTP 200 with a body that is not JSON.
    Garbage,
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    script: HashMap<String, VecDeque<Reply>>,
}

/// A webhook receiver on `127.0.0.1:0` answering `{"code":0}` unless scripted otherwise.
#[derive(Clone)]
pub struct Receiver {
    state: Arc<Mutex<ReceiverState>>,
    pub addr: SocketAddr,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let app = Router::new()
            .route("/hooks/{kind}", post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver serves");
        });
        Receiver { state, addr }
    }

    /// Webhooks for every type to this receiver, on the compressed schedule.
    pub fn webhooks(&self) -> WebhookConfig {
        WebhookConfig::compressed().all_to(&format!("http://{}/hooks", self.addr))
    }

    /// Answers the next requests of `kind` (lower-case) with `replies`, then `{"code":0}`.
    pub fn script(&self, kind: &str, replies: &[Reply]) {
        self.state
            .lock()
            .unwrap()
            .script
            .entry(kind.to_owned())
            .or_default()
            .extend(replies.iter().copied());
    }

    /// Everything received of `kind`.
    pub fn received(&self, kind: &str) -> Vec<Received> {
        self.state
            .lock()
            .unwrap()
            .received
            .iter()
            .filter(|r| r.kind == kind)
            .cloned()
            .collect()
    }
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let reply = {
        let mut state = state.lock().unwrap();
        state.received.push(Received {
            kind: kind.clone(),
            content_type: header("content-type"),
            content_hmac: header("content-hmac"),
            x_content_hmac: header("x-content-hmac"),
            body,
        });
        state
            .script
            .get_mut(&kind)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Reply::Code(0))
    };
    match reply {
        Reply::Code(code) => (StatusCode::OK, format!("{{\"code\":{code}}}")).into_response(),
        Reply::Status(s) => StatusCode::from_u16(s).unwrap().into_response(),
        Reply::Garbage => (StatusCode::OK, "OK").into_response(),
    }
}
