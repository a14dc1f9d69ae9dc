//! `fake-auth`: the `auth.v1` fake for the tests and the demo (see `billing_tasks::fake_auth`).

use std::net::SocketAddr;

use billing_tasks::fake_auth::FakeAuth;
use billing_tasks::secret::Secret;
use clap::Parser;

/// A fake auth service: keeps the roles billing grants and revokes, refuses stale sequence numbers.
#[derive(Debug, Parser)]
#[command(name = "fake-auth", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "FAKE_AUTH_BIND", default_value = "127.0.0.1:50061")]
    bind: SocketAddr,
    /// The service token billing must present.
    #[arg(long, env = "AUTH_GRPC_TOKEN", hide_env_values = true)]
    token: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    task_core::telemetry::init(task_core::telemetry::LogFormat::Pretty);
    let listener = tokio::net::TcpListener::bind(cli.bind).await?;
    tracing::info!(bind = %listener.local_addr()?, "fake-auth listening");
    FakeAuth::new(Secret::new(cli.token))
        .serve(listener, task_core::shutdown::signal())
        .await?;
    Ok(())
}
