//! `billing-api`: the billing service's network front. The gRPC API (`billing.v1`, with health
//! and reflection) on `BILLING_GRPC_BIND`; CloudPayments webhooks
//! (`POST /webhooks/cloudpayments/{type}`), `/healthz`, `/metrics` and the back-office (`/admin`,
//! when `BACKOFFICE_USERS` or `BACKOFFICE_OIDC_*` is set) on `BILLING_HTTP_BIND`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use billing_tasks::BillingService;
use billing_tasks::backoffice::{self, Backoffice, BackofficeArgs};
use billing_tasks::config::BillingArgs;
use billing_tasks::grpc::api::BillingApi;
use billing_tasks::grpc::config::GrpcArgs;
use billing_tasks::grpc::metrics::GrpcMetrics;
use billing_tasks::ledger_metrics::LedgerMetrics;
use billing_tasks::webhooks::{self, WebhookState};
use clap::Parser;
use prometheus_client::registry::Registry;
use task_core::cli::{ConnectionArgs, parse_or_exit};

/// Billing service front: the gRPC API and CloudPayments webhooks.
#[derive(Debug, Parser)]
#[command(name = "billing-api", version)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,

    #[command(flatten)]
    billing: BillingArgs,

    #[command(flatten)]
    grpc: GrpcArgs,

    #[command(flatten)]
    backoffice: BackofficeArgs,

    /// Read a password from standard input, print its Argon2id hash for a BACKOFFICE_USERS
    /// entry (`name role hash`), and exit.
    #[arg(long)]
    hash_password: bool,

    /// Address the HTTP server (webhooks, health, metrics, the back-office) listens on.
    #[arg(long, env = "BILLING_HTTP_BIND", default_value = "127.0.0.1:8088")]
    http_bind: SocketAddr,
}

fn main() -> std::process::ExitCode {
    let cli: Cli = parse_or_exit();
    if cli.hash_password {
        return staff_auth::print_hash_from_stdin("billing-api");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("billing-api: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("billing-api: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    task_core::telemetry::init(cli.connection.log_format);
    let auth = cli.grpc.authenticator()?;
    let tls = cli.grpc.tls()?;
    let tasks = cli.connection.client().await?;
    let billing = cli.billing.connect(tasks).await?;

    let mut registry = Registry::default();
    let metrics = GrpcMetrics::register(&mut registry);
    let ledger = LedgerMetrics::register(&mut registry, billing.db().clone());
    let registry = Arc::new(registry);
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                let ledger = ledger.clone();
                async move {
                    ledger.refresh().await;
                    let mut body = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            task_core::health::OPENMETRICS_CONTENT_TYPE,
                        )],
                        body,
                    )
                }
            }),
        )
        .merge(webhooks::router(WebhookState::new(
            billing.clone(),
            cli.billing.api_secret()?,
        )));
    let app = match cli.backoffice.guard(cli.http_bind.ip().is_loopback())? {
        Some(guard) => {
            tracing::info!(url = %format!("http://{}{}", cli.http_bind, backoffice::BASE), "back-office on");
            let bo = Backoffice::new(billing.clone(), &cli.backoffice, guard);
            let managed = bo.load_staff().await?;
            tracing::info!(managed, "back-office staff read");
            app.merge(bo.router())
        }
        None => {
            tracing::info!(
                "back-office off: set BACKOFFICE_USERS (or BACKOFFICE_OIDC_*) to serve it under /admin"
            );
            app
        }
    };
    let http = tokio::net::TcpListener::bind(cli.http_bind).await?;
    let grpc = tokio::net::TcpListener::bind(cli.grpc.grpc_bind).await?;
    tracing::info!(http = %cli.http_bind, grpc = %cli.grpc.grpc_bind, tls = tls.is_some(), "billing-api listening");
    let api = BillingApi::new(BillingService::new(billing.clone()), auth);
    let grpc_server = tokio::spawn(billing_tasks::grpc::server::serve(
        grpc,
        api,
        billing,
        metrics,
        tls,
        task_core::shutdown::signal(),
    ));
    axum::serve(http, app)
        .with_graceful_shutdown(task_core::shutdown::signal())
        .await?;
    grpc_server.await??;
    Ok(())
}
