//! The billing chaos run (`examples::billing_chaos` has what it does): renewals, primary payments
//! with and without 3-D Secure, and refunds while the worker is killed every few seconds,
//! RabbitMQ and Redis are restarted once each, and the fake gateway times out, fails, throttles,
//! lets in-flight duplicates through and delays, duplicates and reorders its notifications. At the
//! end it compares the fake's books with the ledger, prints each count that must be 0 and the
//! throughput, and exits non-zero if one is not 0.
//!
//! ```sh
//! scripts/services        # RabbitMQ, Redis, PostgreSQL; the run restarts the first two
//! cargo build --release -p worker && cargo build --release -p examples --example billing_chaos
//! target/release/examples/billing_chaos                         # 20000 renewals
//! target/release/examples/billing_chaos --renewals 500 --primaries 60 --seed 42
//! ```
//!
//! It needs the right to run `rabbitmqctl` and `scripts/services redis` (root on the CI machine);
//! `--no-restarts` leaves both services alone. A smaller run is in the test suite
//! (`examples/tests/billing_chaos.rs`).

use std::time::Duration;

use clap::Parser;
use examples::billing_chaos::{self, ChaosSettings};

/// Renewals, payments and refunds under faults; then the gateway's books against the ledger.
#[derive(Debug, Parser)]
#[command(name = "billing_chaos")]
struct Cli {
    /// Subscribers whose renewal falls due at the start.
    #[arg(long, default_value_t = 20_000)]
    renewals: usize,
    /// Primary payments during the chaos (every other one through 3-D Secure).
    #[arg(long, default_value_t = 200)]
    primaries: usize,
    /// Refunds asked for, of paid primary payments.
    #[arg(long, default_value_t = 50)]
    refunds: usize,
    /// Seconds the faults last; then the run settles.
    #[arg(long, default_value_t = 60)]
    chaos_s: u64,
    /// Seconds between worker kills (SIGKILL).
    #[arg(long, default_value_t = 5)]
    kill_every_s: u64,
    /// The fake gateway's fault seed (default: from the clock; printed, to replay a run).
    #[arg(long)]
    seed: Option<u64>,
    /// Do not restart RabbitMQ and Redis.
    #[arg(long)]
    no_restarts: bool,
    /// Seconds the run may take to settle after the chaos.
    #[arg(long, default_value_t = 900)]
    settle_timeout_s: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = task_core::cli::parse_or_exit::<Cli>();
    let defaults = ChaosSettings::from_env()?;
    let s = ChaosSettings {
        renewals: cli.renewals,
        primaries: cli.primaries,
        refunds: cli.refunds,
        chaos: Duration::from_secs(cli.chaos_s),
        kill_every: Duration::from_secs(cli.kill_every_s.max(1)),
        seed: cli.seed.unwrap_or(defaults.seed),
        restart_broker: !cli.no_restarts,
        restart_redis: !cli.no_restarts,
        settle_timeout: Duration::from_secs(cli.settle_timeout_s),
        ..defaults
    };
    println!(
        "billing chaos: {} renewals, {} primary payments, {} refunds; fault seed {} (replay with --seed {})",
        s.renewals, s.primaries, s.refunds, s.seed, s.seed
    );
    let report = billing_chaos::run(&s).await?;
    for line in report.lines() {
        println!("{line}");
    }
    anyhow::ensure!(
        report.ok(),
        "the chaos run found money errors (seed {}; worker log {})",
        report.seed,
        report.worker_log.display()
    );
    Ok(())
}
