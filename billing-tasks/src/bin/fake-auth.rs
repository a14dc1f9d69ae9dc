//! `fake-auth`: the `auth.v1` fake for the tests and the demo (see `billing_tasks::fake_auth`).
//! `fake-auth issue-token` prints a user access token, standing in for the auth service's login.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use billing_tasks::fake_auth::{FakeAuth, issue_access_token};
use billing_tasks::secret::Secret;
use clap::{Parser, Subcommand};
use uuid::Uuid;

/// A fake auth service: keeps the roles billing grants and revokes, refuses stale sequence numbers.
#[derive(Debug, Parser)]
#[command(name = "fake-auth", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "FAKE_AUTH_BIND", default_value = "127.0.0.1:50061")]
    bind: SocketAddr,
    /// The service token billing must present (required to serve).
    #[arg(long, env = "AUTH_GRPC_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints an access token for a user (ES256), as the auth service's login would issue.
    IssueToken {
        /// P-256 private key, PKCS#8 PEM (its public half goes in BILLING_JWT_PUBLIC_KEYS).
        #[arg(long, env = "FAKE_AUTH_SIGNING_KEY")]
        signing_key: PathBuf,
        /// The user (auth user id, UUID).
        #[arg(long)]
        user: Uuid,
        /// `iss` (billing's BILLING_JWT_ISSUER).
        #[arg(long, default_value = "auth")]
        issuer: String,
        /// `aud` (billing's BILLING_JWT_AUDIENCE).
        #[arg(long, default_value = "billing")]
        audience: String,
        /// Seconds the token is valid.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::IssueToken {
        signing_key,
        user,
        issuer,
        audience,
        ttl,
    }) = cli.command
    {
        let pem = std::fs::read(&signing_key)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", signing_key.display()))?;
        let token = issue_access_token(&pem, user, &issuer, &audience, Duration::from_secs(ttl))?;
        println!("{token}");
        return Ok(());
    }
    let token = cli
        .token
        .ok_or_else(|| anyhow::anyhow!("AUTH_GRPC_TOKEN (or --token) is required to serve"))?;
    task_core::telemetry::init(task_core::telemetry::LogFormat::Pretty);
    let listener = tokio::net::TcpListener::bind(cli.bind).await?;
    tracing::info!(bind = %listener.local_addr()?, "fake-auth listening");
    FakeAuth::new(Secret::new(token))
        .serve(listener, task_core::shutdown::signal())
        .await?;
    Ok(())
}
