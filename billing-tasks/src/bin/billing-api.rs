//! `billing-api`: the billing service's network front. Today it receives CloudPayments webhooks
//! (`POST /webhooks/cloudpayments/{type}`) and answers `/healthz`; the gRPC API for the frontend
//! and the auth service will be served here too.

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use billing_tasks::config::BillingArgs;
use billing_tasks::webhooks::{self, WebhookState};
use clap::Parser;
use task_core::cli::{ConnectionArgs, parse_or_exit};

/// Billing service front: CloudPayments webhooks.
#[derive(Debug, Parser)]
#[command(name = "billing-api", version)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,

    #[command(flatten)]
    billing: BillingArgs,

    /// Address the HTTP server (webhooks, health) listens on.
    #[arg(long, env = "BILLING_HTTP_BIND", default_value = "127.0.0.1:8088")]
    http_bind: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = parse_or_exit();
    task_core::telemetry::init(cli.connection.log_format);
    let tasks =
        task_core::Client::connect(&cli.connection.broker_url, &cli.connection.result_backend)
            .await?;
    let billing = cli.billing.connect(tasks).await?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .merge(webhooks::router(WebhookState::new(
            billing,
            cli.billing.api_secret()?,
        )));
    let listener = tokio::net::TcpListener::bind(cli.http_bind).await?;
    tracing::info!(bind = %cli.http_bind, "billing-api listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(task_core::shutdown::signal())
        .await?;
    Ok(())
}
