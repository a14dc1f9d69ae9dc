//! `fake-cloudpayments`: the fake CloudPayments gateway as a server, for the demo and benchmarks.
//!
//! Point billing at it with `CLOUDPAYMENTS_URL=http://<bind>` and the same Public ID and API
//! secret. Cards reach it as test cryptograms (`billing_tasks::cloudpayments::fake::
//! test_cryptogram`); notifications go to `<webhook-base-url>/<type>` (`…/check`, `…/pay`, …).
//! SIGTERM or SIGINT stops it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use billing_tasks::cloudpayments::fake::{
    DEFAULT_PUBLIC_ID, FakeConfig, FakeGateway, TerminalConfig, WebhookConfig,
};
use billing_tasks::cloudpayments::webhook::NotificationKind;
use billing_tasks::secret::Secret;
use clap::Parser;
use task_core::cli::parse_or_exit;
use task_core::telemetry::LogFormat;

/// A fake CloudPayments gateway that follows the documented API (test cards, 3-D Secure, tokens,
/// refunds, X-Request-ID replay, notifications, a concurrency cap).
#[derive(Debug, Parser)]
#[command(name = "fake-cloudpayments", version)]
struct Cli {
    /// Address to listen on.
    #[arg(
        long,
        env = "FAKE_CLOUDPAYMENTS_BIND",
        default_value = "127.0.0.1:8070"
    )]
    bind: SocketAddr,

    /// The terminal's Public ID (Basic-auth user; billing's CLOUDPAYMENTS_PUBLIC_ID).
    #[arg(long, env = "FAKE_CLOUDPAYMENTS_PUBLIC_ID", default_value = DEFAULT_PUBLIC_ID)]
    public_id: String,

    /// The terminal's API secret (Basic-auth password and notification HMAC key; billing's
    /// CLOUDPAYMENTS_API_SECRET). Required; there is no default.
    #[arg(long, env = "FAKE_CLOUDPAYMENTS_API_SECRET", hide_env_values = true, value_parser = secret)]
    api_secret: Option<Secret<String>>,

    /// Act as a production terminal: TestMode false and 30 requests in flight by default.
    #[arg(long, env = "FAKE_CLOUDPAYMENTS_PRODUCTION")]
    production: bool,

    /// Processing time added to every request, in milliseconds.
    #[arg(long, env = "FAKE_CLOUDPAYMENTS_LATENCY_MS", default_value_t = 0)]
    latency_ms: u64,

    /// Requests in flight at once before HTTP 429 (default 5, or 30 with --production).
    #[arg(long, env = "FAKE_CLOUDPAYMENTS_CONCURRENCY_LIMIT", value_parser = clap::value_parser!(u32).range(1..))]
    concurrency_limit: Option<u32>,

    /// Base URL for notifications; each type goes to {URL}/{type}, e.g. http://127.0.0.1:8080/webhooks/cloudpayments/pay.
    #[arg(long, env = "FAKE_CLOUDPAYMENTS_WEBHOOK_BASE_URL")]
    webhook_base_url: Option<String>,

    /// Notification types to send, comma-separated (check,pay,fail,confirm,refund,recurrent,cancel).
    #[arg(
        long,
        env = "FAKE_CLOUDPAYMENTS_WEBHOOK_TYPES",
        value_delimiter = ',',
        default_value = "check,pay,fail,confirm,refund,recurrent,cancel",
        value_parser = kind
    )]
    webhook_types: Vec<NotificationKind>,

    /// Gaps between notification attempts in milliseconds, comma-separated; the last repeats
    /// (default: the gateway's 1, 2, 5, 10, 30 minutes).
    #[arg(
        long,
        env = "FAKE_CLOUDPAYMENTS_WEBHOOK_RETRY_MS",
        value_delimiter = ',',
        default_value = "60000,120000,300000,600000,1800000"
    )]
    webhook_retry_ms: Vec<u64>,

    /// Notification attempts before giving up.
    #[arg(long, env = "FAKE_CLOUDPAYMENTS_WEBHOOK_ATTEMPTS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    webhook_attempts: u32,

    /// How long to wait for a notification answer, in milliseconds.
    #[arg(long, env = "FAKE_CLOUDPAYMENTS_WEBHOOK_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    webhook_timeout_ms: u64,

    /// How long responses are kept for X-Request-ID replay, in seconds.
    #[arg(
        long,
        env = "FAKE_CLOUDPAYMENTS_IDEMPOTENCY_TTL_SECS",
        default_value_t = 3600
    )]
    idempotency_ttl_secs: u64,

    /// The fake's URL as browsers see it, for the 3-D Secure page (AcsUrl = {URL}/acs); default
    /// http://{bind}.
    #[arg(long, env = "FAKE_CLOUDPAYMENTS_PUBLIC_URL")]
    public_url: Option<String>,

    /// Log format: pretty or json (filter with RUST_LOG, default info).
    #[arg(long, env = "LOG_FORMAT", default_value = "pretty")]
    log_format: LogFormat,
}

fn secret(s: &str) -> Result<Secret<String>, String> {
    if s.trim().is_empty() {
        return Err("the API secret must not be empty".into());
    }
    Ok(Secret::new(s.to_owned()))
}

fn kind(s: &str) -> Result<NotificationKind, String> {
    s.parse()
        .map_err(|e: billing_tasks::cloudpayments::webhook::WebhookError| e.to_string())
}

impl Cli {
    fn config(&self, api_secret: &Secret<String>) -> FakeConfig {
        let mut terminal = if self.production {
            TerminalConfig::production(&self.public_id, api_secret.expose().clone())
        } else {
            TerminalConfig::test(&self.public_id, api_secret.expose().clone())
        };
        if let Some(limit) = self.concurrency_limit {
            terminal.concurrency_limit = usize::try_from(limit).unwrap_or(usize::MAX);
        }
        let mut webhooks = WebhookConfig {
            retry_schedule: self
                .webhook_retry_ms
                .iter()
                .map(|ms| Duration::from_millis(*ms))
                .collect(),
            max_attempts: self.webhook_attempts,
            timeout: Duration::from_millis(self.webhook_timeout_ms),
            ..WebhookConfig::default()
        };
        if let Some(base) = &self.webhook_base_url {
            let base = base.trim_end_matches('/');
            for kind in &self.webhook_types {
                webhooks = webhooks.with_url(
                    *kind,
                    format!("{base}/{}", kind.as_str().to_ascii_lowercase()),
                );
            }
        }
        FakeConfig {
            bind: self.bind,
            terminals: vec![terminal],
            latency: Duration::from_millis(self.latency_ms),
            idempotency_ttl: Duration::from_secs(self.idempotency_ttl_secs),
            webhooks,
            acs_url: self
                .public_url
                .as_ref()
                .map(|url| format!("{}/acs", url.trim_end_matches('/'))),
            ..FakeConfig::default()
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    let Some(api_secret) = &cli.api_secret else {
        // Checked here rather than by clap so the message fits on one line.
        eprintln!(
            "fake-cloudpayments: --api-secret (environment variable FAKE_CLOUDPAYMENTS_API_SECRET) is required"
        );
        return ExitCode::from(2);
    };
    task_core::telemetry::init(cli.log_format);
    let fake = match FakeGateway::start(cli.config(api_secret)).await {
        Ok(fake) => fake,
        Err(e) => {
            // One line naming the problem, as for a bad flag.
            eprintln!("fake-cloudpayments: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        url = %fake.url(),
        public_id = %cli.public_id,
        test_mode = !cli.production,
        latency_ms = cli.latency_ms,
        "fake-cloudpayments ready"
    );
    task_core::shutdown::signal().await;
    fake.shutdown().await;
    ExitCode::SUCCESS
}
