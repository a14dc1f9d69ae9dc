//! The renewal benchmark: N subscriptions due, the fake gateway answering in 50 ms, the `worker`
//! binary charging the renewals. Everything (gateway, PostgreSQL, RabbitMQ, Redis, worker, this
//! program) shares the machine.
//!
//! ```sh
//! cargo build --release -p worker && cargo build --release -p examples --example renewal_bench
//! target/release/examples/renewal_bench                 # N = 100000
//! target/release/examples/renewal_bench --subscriptions 10000 --concurrency 2
//! ```
//!
//! It seeds N active subscribers with saved cards whose periods end within the renewal lead time,
//! enqueues one `billing.enqueue_renewals`, and waits until every renewal invoice is paid. The
//! renewals travel as `billing.charge_invoices` batches; `--concurrency` is the worker's task
//! concurrency, each batch charging up to `BATCH_PARALLELISM` invoices at once. Then it
//! checks that every subscription was charged exactly once at the gateway and that the ledger
//! agrees. Webhooks are off (no receiver runs), so the ledger learns outcomes from the calls only.

use examples::worker_binary;

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use billing_tasks::cloudpayments::fake::{FakeConfig, FakeGateway, TerminalConfig};
use sqlx::PgPool;
use task_core::Broker;
use uuid::Uuid;

const PUBLIC_ID: &str = "pk_renewal_bench";
const SECRET: &str = "renewal-bench-secret";

/// The renewal bench: renewals end to end through the `worker` binary, with the fake gateway.
#[derive(clap::Parser)]
#[command(name = "renewal_bench")]
struct Settings {
    /// Subscriptions falling due.
    #[arg(long, default_value_t = 100_000)]
    subscriptions: usize,
    /// The fake gateway's answer time.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// The worker's WORKER_CONCURRENCY.
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    /// The worker's database pool size.
    #[arg(long, default_value_t = 16)]
    pool: u32,
    /// A PostgreSQL URL allowed to create the bench's scratch database.
    #[arg(
        long,
        env = "DATABASE_ADMIN_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_admin: String,
    /// BROKER_URL, RESULT_BACKEND and the queue settings, as the binaries take them.
    #[command(flatten)]
    conn: task_core::cli::ConnectionArgs,
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = <Settings as clap::Parser>::parse();
    let run = Uuid::new_v4().simple().to_string();
    let db_name = format!("billing_bench_{}", &run[..12]);
    let admin = PgPool::connect(&s.database_admin)
        .await
        .context("PostgreSQL (DATABASE_ADMIN_URL)")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .execute(&admin)
        .await?;
    // Loopback: no TLS (PostgreSQL offers it by default, and it costs both sides CPU here).
    let db_url = s
        .database_admin
        .rsplit_once('/')
        .map(|(b, _)| format!("{b}/{db_name}?sslmode=disable"))
        .context("database URL")?;
    let db = billing_tasks::db::connect(&db_url, 8).await?;

    let fake = FakeGateway::start(
        FakeConfig::default()
            .with_terminals(vec![
                TerminalConfig::production(PUBLIC_ID, SECRET).with_concurrency_limit(
                    s.concurrency as usize * billing_tasks::tasks::BATCH_PARALLELISM + 64,
                ),
            ])
            .with_latency(Duration::from_millis(s.latency_ms)),
    )
    .await?;
    let t = Instant::now();
    examples::seed_renewals(&db, &fake, PUBLIC_ID, s.subscriptions).await?;
    println!(
        "seeded {} subscribers with saved cards in {:.1} s",
        s.subscriptions,
        t.elapsed().as_secs_f64()
    );

    let queue = format!("bench.billing.{run}");
    let log = std::env::temp_dir().join(format!("renewal-bench-worker-{run}.log"));
    let mut worker = tokio::process::Command::new(worker_binary()?)
        .env("BROKER_URL", &s.conn.broker_url)
        .env("METRICS_BIND", "127.0.0.1:0")
        .env("RESULT_BACKEND", &s.conn.result_backend)
        .env("WORKER_TASKS", "billing")
        .env("BILLING_QUEUE", &queue)
        .env("WORKER_CONCURRENCY", s.concurrency.to_string())
        .env("WORKER_PREFETCH", (s.concurrency * 2).to_string())
        .env("DATABASE_URL", &db_url)
        .env("DATABASE_POOL_SIZE", s.pool.to_string())
        .env("CLOUDPAYMENTS_URL", fake.url())
        .env("CLOUDPAYMENTS_PUBLIC_ID", PUBLIC_ID)
        .env("CLOUDPAYMENTS_API_SECRET", SECRET)
        .env("RUST_LOG", "warn,task_core::worker=info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log)?))
        .kill_on_drop(true)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("worker ready")
    {
        if Instant::now() > deadline {
            bail!("the worker did not start; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let client = s.conn.client().await?;
    let start = Instant::now();
    client
        .task::<billing_tasks::tasks::EnqueueRenewals>(())
        .queue(&queue)
        .send()
        .await?;
    let n = s.subscriptions as i64;
    // Progress comes from the fake's in-memory books (free); the ledger is counted once the
    // gateway has charged everything, so polling does not load PostgreSQL during the run.
    let mut last = Instant::now();
    loop {
        let charged = fake.transaction_count() as i64;
        if charged >= n {
            let paid: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM invoice WHERE kind = 'renewal' AND status = 'paid'",
            )
            .fetch_one(&db)
            .await?;
            if paid >= n {
                break;
            }
        }
        if last.elapsed() >= Duration::from_secs(10) {
            println!(
                "  {charged} of {n} renewals charged after {:.0} s",
                start.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
        if start.elapsed() > Duration::from_secs(900) {
            bail!(
                "only {charged} of {n} renewals after 15 minutes; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let peak = rss_mb(worker.id().unwrap_or(0));

    // Exactly once: every invoice paid once in the ledger and charged once at the gateway.
    let invoices: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM invoice WHERE kind = 'renewal'")
        .fetch_all(&db)
        .await?;
    let twice = invoices
        .iter()
        .filter(|i| fake.charges_for_invoice(&i.to_string()) != 1)
        .count();
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM payment")
        .fetch_one(&db)
        .await?;
    let active: i64 = sqlx::query_scalar("SELECT count(*) FROM subscription WHERE status = 'active' AND current_period_end > now() + interval '20 days'")
        .fetch_one(&db)
        .await?;
    println!(
        "renewals: {n} subscriptions renewed in {elapsed:.1} s = {:.0} renewals/s (gateway latency {} ms, worker concurrency {}, pool {})",
        n as f64 / elapsed,
        s.latency_ms,
        s.concurrency,
        s.pool
    );
    println!(
        "exactly once: {} invoices, {} charged other than once at the gateway, {attempts} attempts, {active} subscriptions extended; worker peak RSS {peak:.1} MB",
        invoices.len(),
        twice
    );
    let ok = invoices.len() as i64 == n && twice == 0 && attempts == n && active == n;
    let worker_log = std::fs::read_to_string(&log).unwrap_or_default();
    let warnings = worker_log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    if warnings > 0 {
        println!(
            "worker warnings/errors during the run: {warnings}; first: {}",
            worker_log
                .lines()
                .find(|l| l.contains("WARN") || l.contains("ERROR"))
                .unwrap_or("")
        );
    }

    let _ = worker.kill().await;
    client.broker().delete_queue(&queue).await?;
    db.close().await;
    fake.shutdown().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    let _ = std::fs::remove_file(&log);
    if !ok {
        bail!("the exactly-once check failed");
    }
    Ok(())
}
