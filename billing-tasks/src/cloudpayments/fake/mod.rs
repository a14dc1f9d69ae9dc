//! A fake CloudPayments gateway that follows the documented API: for tests (in-process, on
//! `127.0.0.1:0`) and for the demo (the `fake-cloudpayments` binary).
//!
//! What it does, per the reference's checklist (§10):
//! - POST-only routes of §3 (`/test`, card and token charge/auth, post3ds, confirm, void, refund,
//!   get, find, v2 find), JSON or form bodies, keys in any case, the exact envelope, HTTP Basic
//!   auth (401 otherwise), request errors as HTTP 200 `{"Success":false,"Message":"…"}`.
//! - The test cards of §7 through our cryptogram convention ([`test_cryptogram`]): success,
//!   insufficient funds (5051), 3-D Secure cards answering with a challenge finished by
//!   `post3ds` ([`PA_RES_OK`] → approved, [`PA_RES_FAIL`] → 5206, [`PA_RES_UNAVAILABLE`] → 5207),
//!   and the token-payment column. An expired card declines with 5054, a Luhn-valid card that is
//!   not in the table with 5005.
//! - Tokens bound to Public ID and AccountId (6025 on another terminal), refunds (cumulative ≤
//!   amount, a new refund id each, the payment's `Refunded` flag), void of `Authorized` only,
//!   confirm (≤ authorized), find by InvoiceId (latest payment; v2: latest operation).
//! - `X-Request-ID` replay: the identical stored response for the TTL (one hour), keyed by (Public
//!   ID, id); concurrent duplicates are processed once.
//! - Fault injection ([`Fault`]), fixed latency, a per-terminal in-flight cap (429 above it).
//! - Notifications (Check synchronously before authorizing; the others after, re-sent until
//!   `{"code":0}`), signed like the real ones.
//!
//! Counters for tests: [`FakeGateway::charges_for_invoice`],
//! [`FakeGateway::charges_for_request`], [`FakeGateway::total_charged`],
//! [`FakeGateway::transactions`].

mod cards;
mod config;
mod faults;
mod gateway;
mod idempotency;
mod ledger;
mod notifier;
mod responses;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use cards::{
    BAD_CRYPTOGRAM_MESSAGE, PA_RES_FAIL, PA_RES_OK, PA_RES_UNAVAILABLE, test_cryptogram,
    test_cryptogram_declined,
};
pub use config::{
    DEFAULT_API_SECRET, DEFAULT_PUBLIC_ID, FakeConfig, PRODUCTION_CONCURRENCY_LIMIT,
    TEST_CONCURRENCY_LIMIT, TerminalConfig, WebhookConfig,
};
pub use faults::Fault;
pub use gateway::NOT_FOUND;
pub use ledger::{FakeTransaction, TransactionKind};
pub use notifier::{DeliveryResult, WebhookDelivery};

use self::faults::Target;
use self::gateway::Gateway;
use self::notifier::Notifier;
use super::config::{Config, ConfigError, check_public_id, check_secret};
use super::model::TransactionId;
use super::webhook::NotificationKind;
use crate::money::Money;

/// Why the fake could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FakeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is unusable.
    #[error("fake gateway configuration: {0}")]
    Config(String),
}

/// A running fake gateway. Dropping it stops the server; [`FakeGateway::shutdown`] also waits.
#[derive(Debug)]
pub struct FakeGateway {
    gw: Arc<Gateway>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

fn validate(config: &FakeConfig) -> Result<(), FakeError> {
    let bad = |e: ConfigError| FakeError::Config(e.to_string());
    if config.terminals.is_empty() {
        return Err(FakeError::Config("at least one terminal is needed".into()));
    }
    for (i, t) in config.terminals.iter().enumerate() {
        check_public_id(&t.public_id, "public id").map_err(bad)?;
        check_secret(&t.api_secret, "api secret").map_err(bad)?;
        if t.concurrency_limit == 0 {
            return Err(FakeError::Config(format!(
                "terminal {} has a concurrency limit of 0",
                t.public_id
            )));
        }
        if config.terminals[..i]
            .iter()
            .any(|o| o.public_id == t.public_id)
        {
            return Err(FakeError::Config(format!(
                "terminal {} is configured twice",
                t.public_id
            )));
        }
    }
    for url in config.webhooks.urls.values() {
        super::config::parse_base_url(url, "webhook URL").map_err(bad)?;
    }
    if let Some(url) = &config.acs_url {
        super::config::parse_base_url(url, "ACS URL").map_err(bad)?;
    }
    Ok(())
}

impl FakeGateway {
    /// Binds `config.bind` (port 0 for a free one) and serves until shut down.
    pub async fn start(mut config: FakeConfig) -> Result<FakeGateway, FakeError> {
        validate(&config)?;
        // One seed for every random draw of the fake, reported by `fault_seed`.
        let seed = *config.fault_seed.get_or_insert_with(|| fastrand::u64(..));
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|source| FakeError::Bind {
                addr: config.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| FakeError::Bind {
            addr: config.bind,
            source,
        })?;
        let (stop, stopped) = watch::channel(false);
        let notifier = Notifier::new(config.webhooks.clone(), stopped.clone(), seed ^ 0x5eed)
            .map_err(|e| FakeError::Config(format!("webhook HTTP client: {e}")))?;
        let acs_url = config
            .acs_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}/acs"));
        let gw = Arc::new(Gateway::new(config, notifier, acs_url));
        let app = server::router(Arc::clone(&gw), stopped.clone());
        let mut until = stopped;
        let server = tokio::spawn(async move {
            let shutdown = async move {
                // An error means the handle is gone, which also means stop.
                let _ = until.wait_for(|stop| *stop).await;
            };
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(%error, "fake gateway server failed");
            }
        });
        tracing::info!(%addr, "fake CloudPayments gateway listening");
        Ok(FakeGateway {
            gw,
            addr,
            stop,
            server: Some(server),
        })
    }

    /// The base URL, e.g. `http://127.0.0.1:41234` (for `CLOUDPAYMENTS_URL`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client configuration for the first terminal.
    pub fn client_config(&self) -> Config {
        let t = &self.gw.config.terminals[0];
        self.config_for(t)
    }

    /// A client configuration for the terminal with this Public ID.
    pub fn client_config_for(&self, public_id: &str) -> Option<Config> {
        self.gw
            .config
            .terminals
            .iter()
            .find(|t| t.public_id == public_id)
            .map(|t| self.config_for(t))
    }

    fn config_for(&self, t: &TerminalConfig) -> Config {
        let base_url = match reqwest::Url::parse(&self.url()) {
            Ok(url) => url,
            // The URL is built from a socket address, so it always parses.
            Err(e) => unreachable!("fake URL {} does not parse: {e}", self.url()),
        };
        Config {
            base_url,
            public_id: t.public_id.clone(),
            api_secret: t.api_secret.clone(),
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        }
    }

    /// Stops accepting requests, ends hanging faults and webhook re-sends, and waits (at most
    /// five seconds) for the server to finish.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(server) = self.server.take()
            && tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .is_err()
        {
            tracing::warn!("fake gateway did not stop within 5 s");
        }
    }

    /// Approved payments (charges and auths) with this InvoiceId, across terminals.
    pub fn charges_for_invoice(&self, invoice_id: &str) -> u32 {
        self.gw.ledger().charges_for_invoice(invoice_id)
    }

    /// Approved payments with this InvoiceId created by requests with this `X-Request-ID` (a
    /// payment approved by post3ds counts under the request that started it).
    pub fn charges_for_request(&self, invoice_id: &str, request_id: &str) -> u32 {
        self.gw.ledger().charges_for_request(invoice_id, request_id)
    }

    /// The sum of approved payments with this InvoiceId (before refunds); `None` if none.
    pub fn total_charged(&self, invoice_id: &str) -> Option<Money> {
        self.gw.ledger().total_charged(invoice_id)
    }

    /// Every transaction (payments and refunds, any status), oldest first.
    pub fn transactions(&self) -> Vec<FakeTransaction> {
        self.gw.ledger().all()
    }

    /// One transaction.
    pub fn transaction(&self, id: TransactionId) -> Option<FakeTransaction> {
        let ledger = self.gw.ledger();
        ledger.get(id).map(|t| ledger.snapshot(t))
    }

    /// How many transactions exist.
    pub fn transaction_count(&self) -> usize {
        self.gw.ledger().len()
    }

    /// Requests received on an API path (authenticated or not), e.g. `/payments/tokens/charge`.
    pub fn requests(&self, path: &str) -> u64 {
        self.gw.requests(path)
    }

    /// Requests in flight on a terminal right now.
    pub fn in_flight(&self, public_id: &str) -> usize {
        self.gw
            .terminals
            .get(public_id)
            .map_or(0, |t| t.inflight.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Reports card details of new card payments as some acquirers do, which the documented
    /// formats do not cover: the first six digits with a space, the expiry with a four-digit year.
    pub fn set_odd_card_display(&self, on: bool) {
        self.gw
            .odd_card_display
            .store(on, std::sync::atomic::Ordering::Release);
    }

    /// Whether a duplicate of a request still in flight waits for it (true) or is processed again.
    pub fn set_block_in_flight_duplicates(&self, block: bool) {
        self.gw.idempotency.set_block_in_flight(block);
    }

    /// Responses held for `X-Request-ID` replay (and claims in flight).
    pub fn idempotency_entries(&self) -> usize {
        self.gw.idempotency.len()
    }

    /// Issues a card token for a test card, as an approved card payment with `SaveCard` would,
    /// bound to `public_id` and `account_id`: seeds subscribers for benchmarks and demos without
    /// a card payment each. `None` for an unknown terminal or an expiry that is not `MM/YY`.
    pub fn issue_token(
        &self,
        public_id: &str,
        account_id: &str,
        pan: &str,
        exp: &str,
    ) -> Option<String> {
        if !self.gw.terminals.contains_key(public_id) || exp.len() != 5 || pan.len() < 10 {
            return None;
        }
        let behaviour = cards::CardBehaviour::of(pan);
        let token = format!("tk_{}", gateway::random_hex(29));
        self.gw.ledger().add_token(
            token.clone(),
            ledger::TokenRecord {
                public_id: public_id.to_owned(),
                account_id: account_id.to_owned(),
                card: ledger::CardSnapshot {
                    first_six: pan[..6].to_owned(),
                    last_four: pan[pan.len() - 4..].to_owned(),
                    exp: exp.to_owned(),
                    brand: behaviour.brand,
                },
                behaviour,
            },
        );
        Some(token)
    }

    /// Queues a fault for the next request (a [`Fault::Decline`]: the next payment call).
    pub fn push_fault(&self, fault: Fault) {
        self.gw.faults().push(Target::new(None), fault);
    }

    /// Queues a fault for the next request to `path` (e.g. `/payments/tokens/charge`).
    pub fn push_fault_for(&self, path: &str, fault: Fault) {
        self.gw.faults().push(Target::new(Some(path)), fault);
    }

    /// Applies `fault` to each request (to `path`, or to any) with `probability`; 0 removes it.
    pub fn set_fault_probability(&self, path: Option<&str>, fault: Fault, probability: f64) {
        self.gw
            .faults()
            .set_random(Target::new(path), fault, probability);
    }

    /// The seed the random faults follow: print it with a failing run, and pass it back with
    /// [`FakeConfig::with_fault_seed`] to replay the same faults.
    pub fn fault_seed(&self) -> u64 {
        self.gw.faults().seed()
    }

    /// Removes every queued and random fault.
    pub fn clear_faults(&self) {
        self.gw.faults().clear();
    }

    /// Queued faults not yet used.
    pub fn pending_faults(&self) -> usize {
        self.gw.faults().pending()
    }

    /// How many requests have been answered with a fault (queued or random) so far.
    pub fn faults_injected(&self) -> u64 {
        self.gw.faults().injected()
    }

    /// The latest notification delivery attempts (bounded by the webhook `log_limit`).
    pub fn webhook_deliveries(&self) -> Vec<WebhookDelivery> {
        self.gw.notifier.deliveries()
    }

    /// Notification attempts so far, and how many were accepted with `{"code":0}`.
    pub fn webhook_counts(&self) -> (u64, u64) {
        self.gw.notifier.counts()
    }

    /// Sends a notification of any type with these fields, signed with the terminal's secret and
    /// re-sent like the others (for Recurrent, which the fake has no subscriptions to trigger).
    /// False when the terminal is unknown or the type has no URL.
    pub fn send_notification(
        &self,
        public_id: &str,
        kind: NotificationKind,
        fields: Vec<(String, String)>,
    ) -> bool {
        self.gw.send_notification(public_id, kind, fields)
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}
