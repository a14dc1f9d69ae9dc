//! How the fake gateway is set up: terminals, latency, webhooks, time limits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::cloudpayments::webhook::NotificationKind;
use crate::secret::Secret;

/// The Public ID of the default test terminal (the docs' example id).
pub const DEFAULT_PUBLIC_ID: &str = "test_api_00000000000000000000001";
/// The API secret of the default test terminal. Only for the in-process fake.
pub const DEFAULT_API_SECRET: &str = "fake-api-secret";

/// In-flight request limit of a test terminal (§8).
pub const TEST_CONCURRENCY_LIMIT: usize = 5;
/// In-flight request limit of a production terminal (§8).
pub const PRODUCTION_CONCURRENCY_LIMIT: usize = 30;

/// One terminal (site) of the fake: its credentials and limits.
#[derive(Debug, Clone)]
pub struct TerminalConfig {
    /// Public ID (Basic-auth user).
    pub public_id: String,
    /// API secret (Basic-auth password; the key notifications are signed with).
    pub api_secret: Secret<String>,
    /// Whether transactions are `TestMode: true` (and `GatewayName: "Test"`).
    pub test_mode: bool,
    /// Requests in flight at once; one more gets HTTP 429.
    pub concurrency_limit: usize,
}

impl TerminalConfig {
    /// A test terminal: test mode, 5 requests in flight.
    pub fn test(public_id: impl Into<String>, api_secret: impl Into<String>) -> Self {
        TerminalConfig {
            public_id: public_id.into(),
            api_secret: Secret::new(api_secret.into()),
            test_mode: true,
            concurrency_limit: TEST_CONCURRENCY_LIMIT,
        }
    }

    /// A production-like terminal: 30 requests in flight.
    pub fn production(public_id: impl Into<String>, api_secret: impl Into<String>) -> Self {
        TerminalConfig {
            test_mode: false,
            concurrency_limit: PRODUCTION_CONCURRENCY_LIMIT,
            ..TerminalConfig::test(public_id, api_secret)
        }
    }

    /// The same terminal with another in-flight limit.
    pub fn with_concurrency_limit(mut self, limit: usize) -> Self {
        self.concurrency_limit = limit;
        self
    }
}

/// Where and how notifications are sent.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// URL per notification type; types without a URL are not sent (and without a Check URL
    /// payments are not checked).
    pub urls: BTreeMap<NotificationKind, String>,
    /// Gaps between delivery attempts; after the last one, its gap repeats (§6.1).
    pub retry_schedule: Vec<Duration>,
    /// Attempts per notification, the first included.
    pub max_attempts: u32,
    /// How long the fake waits for the receiver's answer (the gateway's is 30 s).
    pub timeout: Duration,
    /// How many delivery attempts [`super::FakeGateway::webhook_deliveries`] remembers (oldest
    /// dropped first), so a long benchmark does not grow memory without bound.
    pub log_limit: usize,
    /// Each notification (but Check) first waits a random time up to this, so notifications
    /// arrive late and out of order, as in the gateway's bad hours. Zero: sent at once.
    pub delay_up_to: Duration,
    /// The chance that a notification accepted by the receiver is delivered once more (the
    /// gateway re-sends when it misses the answer).
    pub duplicate_probability: f64,
}

impl Default for WebhookConfig {
    /// The gateway's schedule: 1, 2, 5, 10, 30 minutes, then every 30 minutes, 100 attempts.
    fn default() -> Self {
        WebhookConfig {
            urls: BTreeMap::new(),
            retry_schedule: [1, 2, 5, 10, 30]
                .into_iter()
                .map(|m| Duration::from_secs(60 * m))
                .collect(),
            max_attempts: 100,
            timeout: Duration::from_secs(30),
            log_limit: 10_000,
            delay_up_to: Duration::ZERO,
            duplicate_probability: 0.0,
        }
    }
}

impl WebhookConfig {
    /// The same schedule compressed for tests: milliseconds instead of minutes, a 2 s timeout.
    pub fn compressed() -> Self {
        WebhookConfig {
            retry_schedule: [10, 20, 50, 100]
                .into_iter()
                .map(Duration::from_millis)
                .collect(),
            max_attempts: 50,
            timeout: Duration::from_secs(2),
            ..WebhookConfig::default()
        }
    }

    /// Sends every type to `{base}/{type}` with the type in lower case (`…/pay`, `…/check`).
    pub fn all_to(mut self, base: &str) -> Self {
        let base = base.trim_end_matches('/');
        for kind in NotificationKind::ALL {
            self.urls.insert(
                kind,
                format!("{base}/{}", kind.as_str().to_ascii_lowercase()),
            );
        }
        self
    }

    /// Delays notifications by a random time up to `delay_up_to` (so they also arrive out of
    /// order) and delivers an accepted one again with `duplicate_probability`. The draws follow
    /// the fake's fault seed.
    pub fn with_mischief(mut self, delay_up_to: Duration, duplicate_probability: f64) -> Self {
        self.delay_up_to = delay_up_to;
        self.duplicate_probability = duplicate_probability.clamp(0.0, 1.0);
        self
    }

    /// Sends one type to `url`.
    pub fn with_url(mut self, kind: NotificationKind, url: impl Into<String>) -> Self {
        self.urls.insert(kind, url.into());
        self
    }

    /// The gap before attempt `attempt + 1` (attempts count from 1).
    pub(crate) fn gap_after(&self, attempt: u32) -> Duration {
        let i = usize::try_from(attempt.saturating_sub(1)).unwrap_or(usize::MAX);
        self.retry_schedule
            .get(i)
            .or(self.retry_schedule.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }
}

/// The whole fake.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Where to listen; port 0 picks a free one.
    pub bind: SocketAddr,
    /// Terminals; requests authenticate as one of them.
    pub terminals: Vec<TerminalConfig>,
    /// Added to every request before it is processed (the gateway's processing time).
    pub latency: Duration,
    /// How long a timeout fault holds the request before answering (the client is expected to
    /// have given up by then).
    pub hang: Duration,
    /// How long a response is kept for `X-Request-ID` replay (§5: one hour).
    pub idempotency_ttl: Duration,
    /// `Retry-After` sent with the concurrency cap's 429 (the gateway documents none).
    pub cap_retry_after: Option<Duration>,
    /// Notifications.
    pub webhooks: WebhookConfig,
    /// The URL the 3-D Secure challenge points to; default: this fake's own `/acs` page.
    pub acs_url: Option<String>,
    /// Whether a duplicate `X-Request-ID` arriving while the first request is still processed
    /// waits for its answer (true, the default) or is processed again (undocumented at the real
    /// gateway, so billing must never rely on the blocking).
    pub block_in_flight_duplicates: bool,
    /// Seed of the random faults; `None` picks one (see [`super::FakeGateway::fault_seed`]).
    pub fault_seed: Option<u64>,
}

impl Default for FakeConfig {
    /// One test terminal ([`DEFAULT_PUBLIC_ID`], [`DEFAULT_API_SECRET`]) on `127.0.0.1:0`, no
    /// latency, no webhooks.
    fn default() -> Self {
        FakeConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            terminals: vec![TerminalConfig::test(DEFAULT_PUBLIC_ID, DEFAULT_API_SECRET)],
            latency: Duration::ZERO,
            hang: Duration::from_secs(30),
            idempotency_ttl: Duration::from_secs(3600),
            cap_retry_after: None,
            webhooks: WebhookConfig::default(),
            acs_url: None,
            block_in_flight_duplicates: true,
            fault_seed: None,
        }
    }
}

impl FakeConfig {
    /// Replaces the terminals.
    pub fn with_terminals(mut self, terminals: Vec<TerminalConfig>) -> Self {
        self.terminals = terminals;
        self
    }

    /// Adds a terminal.
    pub fn with_terminal(mut self, terminal: TerminalConfig) -> Self {
        self.terminals.push(terminal);
        self
    }

    /// Sets the latency of every request.
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Sets the webhooks.
    pub fn with_webhooks(mut self, webhooks: WebhookConfig) -> Self {
        self.webhooks = webhooks;
        self
    }

    /// Sets how long timeout faults hold a request.
    pub fn with_hang(mut self, hang: Duration) -> Self {
        self.hang = hang;
        self
    }

    /// Processes a duplicate of a request still in flight again instead of making it wait.
    pub fn with_in_flight_duplicates_let_through(mut self) -> Self {
        self.block_in_flight_duplicates = false;
        self
    }

    /// Seeds the random faults, to replay a run.
    pub fn with_fault_seed(mut self, seed: u64) -> Self {
        self.fault_seed = Some(seed);
        self
    }

    /// Sets the replay window.
    pub fn with_idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = ttl;
        self
    }
}
