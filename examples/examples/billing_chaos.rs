//! The billing chaos run: renewals, primary payments (with and without 3-D Secure) and refunds
//! while the `worker` is killed with SIGKILL every few seconds and the fake gateway misbehaves;
//! then the fake gateway's own books are compared with the ledger.
//!
//! ```sh
//! cargo build --release -p worker && cargo build --release -p examples --example billing_chaos
//! target/release/examples/billing_chaos                         # 20000 renewals
//! target/release/examples/billing_chaos --renewals 500 --primaries 60 --seed 42
//! ```
//!
//! Flags: `--renewals N` (20000), `--primaries N` (200, every other one with 3-D Secure),
//! `--refunds N` (50, of paid primaries), `--chaos-s S` (60: how long the faults last; then the
//! run settles), `--kill-every-s S` (5), `--seed N` (the fake's fault seed; printed, so a failed
//! run can be replayed). RabbitMQ, Redis and PostgreSQL must be running (`scripts/services`).
//!
//! During the chaos phase the worker is killed and restarted, and the fake times out (before and
//! after processing), answers 5xx and 429, processes in-flight duplicates again, and delivers its
//! notifications up to half a second late (so out of order), one in five twice. The repairs
//! the beat would schedule (reconcile payments and refunds, retry due invoices, deliver the
//! outbox) run here every two seconds. At the end it prints each count that must be 0, and the
//! throughput; it exits non-zero if one is not.
//!
//! Settling can take ten minutes: a card payment the gateway never received is given up only
//! after the gateway has answered "no record" for that long (charging.rs). Not done yet:
//! restarting RabbitMQ and Redis during the run.

#[path = "common/mod.rs"]
mod common;
use common::worker_binary;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use billing_tasks::cloudpayments::fake::{
    self, FakeConfig, FakeGateway, Fault, TerminalConfig, TransactionKind, WebhookConfig,
};
use billing_tasks::cloudpayments::{self, TransactionStatus};
use billing_tasks::domain::{PaymentStatus, Policy};
use billing_tasks::outbox::{self, OutboxMessage, OutboxTarget};
use billing_tasks::refunds::{RefundRequest, Requester};
use billing_tasks::secret::Secret;
use billing_tasks::service::StartSubscription;
use billing_tasks::{Billing, BillingService, reconcile, refunds, renewals, tasks, webhooks};
use chrono::Utc;
use futures_util::future::BoxFuture;
use sqlx::PgPool;
use task_core::{Broker, Client};
use uuid::Uuid;

const PUBLIC_ID: &str = "pk_billing_chaos";
const SECRET: &str = "billing-chaos-api-secret";
const MONTHLY: &str = "0b4b6f0e-2d3c-4c55-9b51-6c1c7c000001";
const CARD_OK: &str = "4000000000003055";
const CARD_3DS_OK: &str = "4242424242424242";

struct Settings {
    renewals: usize,
    primaries: usize,
    refunds: usize,
    chaos: Duration,
    kill_every: Duration,
    seed: u64,
    database_admin: String,
    broker: String,
    backend: String,
}

fn settings() -> anyhow::Result<Settings> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let mut s = Settings {
        renewals: 20_000,
        primaries: 200,
        refunds: 50,
        chaos: Duration::from_secs(60),
        kill_every: Duration::from_secs(5),
        seed: fastrand_seed(),
        database_admin: env(
            "DATABASE_ADMIN_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        ),
        broker: env("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        backend: env("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--renewals" => s.renewals = value.parse()?,
            "--primaries" => s.primaries = value.parse()?,
            "--refunds" => s.refunds = value.parse()?,
            "--chaos-s" => s.chaos = Duration::from_secs(value.parse()?),
            "--kill-every-s" => s.kill_every = Duration::from_secs(value.parse()?),
            "--seed" => s.seed = value.parse()?,
            other => bail!(
                "unknown flag {other} (--renewals, --primaries, --refunds, --chaos-s, --kill-every-s, --seed)"
            ),
        }
    }
    Ok(s)
}

/// A seed from the clock (the fake's own generator is seeded from it, so the run can be replayed).
fn fastrand_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    (nanos as u64) ^ u64::from(std::process::id())
}

/// Records every delivered outbox message in order, to check role messages per user.
#[derive(Default)]
struct Recorder(Mutex<Vec<OutboxMessage>>);

impl OutboxTarget for Recorder {
    fn deliver<'a>(
        &'a self,
        message: &'a OutboxMessage,
    ) -> BoxFuture<'a, std::result::Result<(), String>> {
        self.0.lock().unwrap().push(message.clone());
        Box::pin(async { Ok(()) })
    }
}

/// N payers with saved cards whose monthly periods end within the renewal lead time.
async fn seed(db: &PgPool, fake: &FakeGateway, n: usize) -> anyhow::Result<()> {
    let now = Utc::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        let (mut payers, mut methods, mut tokens, mut subs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in chunk {
            let payer = Uuid::new_v4();
            tokens.push(
                fake.issue_token(PUBLIC_ID, &payer.to_string(), CARD_OK, "12/30")
                    .context("seed token")?,
            );
            payers.push(payer);
            methods.push(Uuid::now_v7());
            subs.push(Uuid::now_v7());
        }
        let mut tx = db.begin().await?;
        sqlx::query("INSERT INTO payer (id, created_at, updated_at) SELECT id, $2, $2 FROM UNNEST($1::uuid[]) AS u(id)")
            .bind(&payers)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO payment_method (id, payer_id, token, card_mask, card_type, card_exp, created_at)
             SELECT id, payer, token, '400000******3055', 'Visa', '12/30', $4 FROM UNNEST($1::uuid[], $2::uuid[], $3::text[]) AS u(id, payer, token)",
        )
        .bind(&methods)
        .bind(&payers)
        .bind(&tokens)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO subscription (id, payer_id, tariff_id, status, auto_renew, current_period_start, current_period_end,
                                       payment_method_id, created_at, updated_at)
             SELECT id, payer, $4, 'active', true, $5, $6, method, $5, $5 FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[]) AS u(id, payer, method)",
        )
        .bind(&subs)
        .bind(&payers)
        .bind(&methods)
        .bind(Uuid::parse_str(MONTHLY)?)
        .bind(now - chrono::Duration::days(30))
        .bind(now + chrono::Duration::hours(1))
        .execute(&mut *tx)
        .await?;
        // The seeded periods stand for payments made before the run.
        sqlx::query(
            "INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, at)
             SELECT 'subscription', id, NULL, 'active', 'staff:chaos-seed', $2 FROM UNNEST($1::uuid[]) AS u(id)",
        )
        .bind(&subs)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// A worker process on `queue`, logging to `log`.
fn spawn_worker(
    queue: &str,
    db_url: &str,
    fake_url: &str,
    s: &Settings,
    log: &std::path::Path,
) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(tokio::process::Command::new(worker_binary()?)
        .env("BROKER_URL", &s.broker)
        .env("RESULT_BACKEND", &s.backend)
        .env("METRICS_BIND", "127.0.0.1:0")
        .env("WORKER_TASKS", "billing")
        .env("BILLING_QUEUE", queue)
        .env("WORKER_CONCURRENCY", "8")
        .env("DATABASE_URL", db_url)
        .env("CLOUDPAYMENTS_URL", fake_url)
        .env("CLOUDPAYMENTS_PUBLIC_ID", PUBLIC_ID)
        .env("CLOUDPAYMENTS_API_SECRET", SECRET)
        .env("CLOUDPAYMENTS_TIMEOUT", "2")
        .env("BILLING_PROCESSING_LEASE", "12")
        .env("BILLING_GATEWAY_MAX_PROCESSING", "5")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()?)
}

/// The repairs the beat schedules, run once: lost charges, unknown outcomes, due dunning steps,
/// refunds to resume, the outbox.
async fn repair(billing: &Billing, target: &Recorder) -> anyhow::Result<()> {
    let (_, lost) = reconcile::reconcile_payments(billing).await?;
    for id in lost {
        tasks::enqueue_charge_payment(billing, id).await?;
    }
    for id in renewals::due_invoices(billing, 1000).await? {
        tasks::enqueue::<tasks::ChargeInvoice>(billing, tasks::InvoiceArgs { invoice_id: id })
            .await?;
    }
    for id in refunds::unsettled(billing).await? {
        tasks::enqueue_refund(billing, id).await?;
    }
    outbox::deliver_due(billing, target, 5000).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let s = settings()?;
    println!(
        "billing chaos: {} renewals, {} primary payments, {} refunds; fault seed {} (replay with --seed {})",
        s.renewals, s.primaries, s.refunds, s.seed, s.seed
    );
    let run = Uuid::new_v4().simple().to_string();
    let db_name = format!("billing_chaos_{}", &run[..12]);
    let admin = PgPool::connect(&s.database_admin)
        .await
        .context("PostgreSQL (DATABASE_ADMIN_URL)")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .execute(&admin)
        .await?;
    let db_url = s
        .database_admin
        .rsplit_once('/')
        .map(|(b, _)| format!("{b}/{db_name}?sslmode=disable"))
        .context("database URL")?;
    let db = billing_tasks::db::connect(&db_url, 16).await?;

    // The webhook receiver listens first, so the fake can be pointed at it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hooks = format!("http://{}/webhooks/cloudpayments", listener.local_addr()?);
    let fake = FakeGateway::start(
        FakeConfig::default()
            .with_terminals(vec![
                TerminalConfig::production(PUBLIC_ID, SECRET).with_concurrency_limit(64),
            ])
            .with_latency(Duration::from_millis(20))
            .with_hang(Duration::from_secs(3))
            .with_fault_seed(s.seed)
            .with_in_flight_duplicates_let_through()
            .with_webhooks(
                WebhookConfig::compressed()
                    .all_to(&hooks)
                    .with_mischief(Duration::from_millis(500), 0.2),
            ),
    )
    .await?;

    let queue = format!("chaos.billing.{run}");
    let client = Client::connect(&s.broker, &s.backend).await?;
    let mut gateway_config = fake.client_config();
    gateway_config.timeout = Duration::from_secs(2);
    let policy = Policy {
        processing_lease: chrono::Duration::seconds(12),
        gateway_max_processing: chrono::Duration::seconds(5),
        ..Policy::default()
    };
    let billing = Billing::new(
        db.clone(),
        cloudpayments::Client::new(gateway_config)?,
        policy,
        task_core::Clock::system(),
        client.clone(),
    )
    .with_queue(&queue);
    let service = BillingService::new(billing.clone());
    let (stop_hooks, hooks_stopped) = tokio::sync::oneshot::channel::<()>();
    let receiver = tokio::spawn(webhooks::serve(
        listener,
        webhooks::WebhookState::new(billing.clone(), Secret::new(SECRET.to_owned())),
        async {
            let _ = hooks_stopped.await;
        },
    ));

    let t = Instant::now();
    seed(&db, &fake, s.renewals).await?;
    println!(
        "seeded {} subscribers in {:.1} s",
        s.renewals,
        t.elapsed().as_secs_f64()
    );

    // Chaos: faults on every gateway call, the worker killed every few seconds.
    for (fault, p) in [
        (Fault::TimeoutAfterProcessing, 0.03),
        (Fault::TimeoutBeforeProcessing, 0.02),
        (Fault::ServerErrorAfterProcessing(502), 0.02),
        (Fault::ServerErrorBeforeProcessing(503), 0.02),
        (Fault::TooManyRequests { retry_after: None }, 0.03),
    ] {
        fake.set_fault_probability(None, fault, p);
    }
    let log = std::env::temp_dir().join(format!("billing-chaos-worker-{run}.log"));
    let mut worker = spawn_worker(&queue, &db_url, &fake.url(), &s, &log)?;
    let start = Instant::now();
    client
        .task::<tasks::EnqueueRenewals>(())
        .queue(&queue)
        .send()
        .await?;

    let target = Recorder::default();
    let mut primaries: HashMap<Uuid, (Uuid, bool)> = HashMap::new(); // payment -> (user, 3DS)
    let mut answered_3ds = std::collections::HashSet::new();
    let mut refunded = std::collections::HashSet::new();
    let mut kills = 0u32;
    let mut last_kill = Instant::now();
    let mut last_repair = Instant::now();
    let mut next_primary = 0usize;
    let mut calm = false;
    let mut last_progress = Instant::now();
    loop {
        let elapsed = start.elapsed();
        if !calm && elapsed >= s.chaos {
            fake.clear_faults();
            fake.set_block_in_flight_duplicates(true);
            calm = true;
            println!(
                "chaos over after {:.0} s ({kills} worker kills); settling",
                elapsed.as_secs_f64()
            );
        }
        if !calm && last_kill.elapsed() >= s.kill_every {
            worker.kill().await?; // SIGKILL
            kills += 1;
            worker = spawn_worker(&queue, &db_url, &fake.url(), &s, &log)?;
            last_kill = Instant::now();
        }
        // A stream of primary payments, spread over the chaos phase.
        let due = ((elapsed.as_secs_f64() / s.chaos.as_secs_f64()) * s.primaries as f64) as usize;
        while next_primary < s.primaries.min(due + 1) {
            let user = Uuid::new_v4();
            let three_ds = next_primary % 2 == 1;
            let pan = if three_ds { CARD_3DS_OK } else { CARD_OK };
            match service
                .start_subscription(StartSubscription {
                    user_id: user,
                    tariff: "monthly".into(),
                    cryptogram: Secret::new(fake::test_cryptogram(pan, "12/30")),
                    cardholder_name: None,
                    ip_address: "203.0.113.7".into(),
                    email: None,
                    idempotency_key: Uuid::new_v4().to_string(),
                })
                .await
            {
                Ok(p) => {
                    primaries.insert(p.id, (user, three_ds));
                }
                Err(e) => println!("  start_subscription failed: {e}"),
            }
            next_primary += 1;
        }
        // The customers answer their challenges, and some ask for their money back.
        for (&payment, &(user, _)) in &primaries {
            let Ok(p) = service.get_payment(user, payment).await else {
                continue;
            };
            match p.status {
                PaymentStatus::AwaitingThreeDs if !answered_3ds.contains(&payment) => {
                    if let Some(c) = p.challenge
                        && service
                            .complete_3ds(
                                user,
                                payment,
                                c.transaction_id,
                                Secret::new(fake::PA_RES_OK.to_owned()),
                            )
                            .await
                            .is_ok()
                    {
                        answered_3ds.insert(payment);
                    }
                }
                PaymentStatus::Succeeded
                    if refunded.len() < s.refunds
                        && !refunded.contains(&payment)
                        && service
                            .request_refund(RefundRequest {
                                payment_id: payment,
                                reason: "chaos".into(),
                                requested_by: Requester::User(user),
                                idempotency_key: format!("chaos-{payment}"),
                            })
                            .await
                            .is_ok() =>
                {
                    refunded.insert(payment);
                }
                _ => {}
            }
        }
        if last_repair.elapsed() >= Duration::from_secs(2) {
            if let Err(e) = repair(&billing, &target).await {
                println!("  repair run failed: {e}");
            }
            last_repair = Instant::now();
        }
        if calm {
            let (unpaid, in_flight, refunding, pending): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM invoice WHERE kind = 'renewal' AND status <> 'paid'),
                        (SELECT count(*) FROM payment WHERE status IN ('created', 'processing')),
                        (SELECT count(*) FROM refund WHERE status IN ('requested', 'processing')),
                        (SELECT count(*) FROM outbox WHERE status = 'pending')",
            )
            .fetch_one(&db)
            .await?;
            let open = unpaid + in_flight + refunding + pending;
            if last_progress.elapsed() >= Duration::from_secs(10) {
                println!(
                    "  settling: {unpaid} renewals unpaid, {in_flight} attempts in flight, {refunding} refunds open, {pending} outbox messages pending"
                );
                last_progress = Instant::now();
            }
            let renewal_invoices: i64 =
                sqlx::query_scalar("SELECT count(*) FROM invoice WHERE kind = 'renewal'")
                    .fetch_one(&db)
                    .await?;
            if open == 0 && renewal_invoices as usize == s.renewals {
                break;
            }
            if elapsed > s.chaos + Duration::from_secs(900) {
                println!("  not settled 15 minutes after the chaos ({open} items open)");
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = worker.kill().await;

    // The fake gateway's own books against the ledger.
    let books = fake.transactions();
    let mut charges: HashMap<String, u32> = HashMap::new();
    let mut refunds_of: HashMap<i64, i64> = HashMap::new();
    let mut paid_of: HashMap<i64, i64> = HashMap::new();
    for t in &books {
        match t.kind {
            TransactionKind::Payment
                if matches!(
                    t.status,
                    TransactionStatus::Completed | TransactionStatus::Authorized
                ) =>
            {
                *charges
                    .entry(t.invoice_id.clone().unwrap_or_default())
                    .or_default() += 1;
                paid_of.insert(t.id, t.amount.minor);
            }
            TransactionKind::Refund if t.status == TransactionStatus::Completed => {
                *refunds_of
                    .entry(t.original_id.unwrap_or_default())
                    .or_default() += t.amount.minor;
            }
            _ => {}
        }
    }
    let invoices: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, status FROM invoice")
        .fetch_all(&db)
        .await?;
    let system_refunded: std::collections::HashSet<Uuid> = sqlx::query_scalar(
        "SELECT p.invoice_id FROM refund r JOIN payment p ON p.id = r.payment_id WHERE r.requested_by = 'system'",
    )
    .fetch_all(&db)
    .await?
    .into_iter()
    .collect();
    let charged_twice = invoices
        .iter()
        .filter(|(id, _)| {
            charges.get(&id.to_string()).copied().unwrap_or(0) > 1 && !system_refunded.contains(id)
        })
        .count();
    let known: std::collections::HashSet<String> =
        invoices.iter().map(|(id, _)| id.to_string()).collect();
    let taken_not_paid = invoices
        .iter()
        .filter(|(id, status)| {
            charges.get(&id.to_string()).copied().unwrap_or(0) > 0
                && status != "paid"
                && !system_refunded.contains(id)
        })
        .count()
        + charges.keys().filter(|i| !known.contains(*i)).count();
    let refunds_above_paid = refunds_of
        .iter()
        .filter(|(payment, refunded)| **refunded > paid_of.get(payment).copied().unwrap_or(0))
        .count();
    let active_unpaid: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM subscription s WHERE s.status = 'active' AND NOT EXISTS (
             SELECT 1 FROM payment p JOIN invoice i ON i.id = p.invoice_id
             WHERE i.subscription_id = s.id AND p.status = 'succeeded' AND NOT p.duplicate)",
    )
    .fetch_one(&db)
    .await?;
    let out_of_order = {
        let delivered = target.0.lock().unwrap();
        let mut last: HashMap<String, i64> = HashMap::new();
        let mut bad = 0;
        for m in delivered.iter().filter(|m| m.topic.starts_with("auth.")) {
            let (Some(user), Some(seq)) = (m.payload["user_id"].as_str(), m.user_seq) else {
                bad += 1;
                continue;
            };
            if last.get(user).is_some_and(|prev| *prev >= seq) {
                bad += 1;
            }
            last.insert(user.to_owned(), seq);
        }
        bad
    };
    let readable_cryptograms: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM payment WHERE (cryptogram IS NOT NULL AND cryptogram NOT LIKE 'v1.%')
                                         OR (pa_res IS NOT NULL AND pa_res NOT LIKE 'v1.%')",
    )
    .fetch_one(&db)
    .await?;
    let paid_renewals: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM invoice WHERE kind = 'renewal' AND status = 'paid'",
    )
    .fetch_one(&db)
    .await?;

    println!("invoices charged more than once at the gateway: {charged_twice}");
    println!("money taken that the ledger does not show as paid: {taken_not_paid}");
    println!("refunds above the paid amount: {refunds_above_paid}");
    println!("subscriptions active without a successful payment: {active_unpaid}");
    println!("role messages delivered out of order: {out_of_order}");
    println!("cryptograms readable in the database: {readable_cryptograms}");
    println!(
        "throughput: {paid_renewals} renewals paid in {elapsed:.1} s = {:.0}/s; {} primary payments, {} refunds requested; {kills} worker kills; seed {}",
        paid_renewals as f64 / elapsed,
        primaries.len(),
        refunded.len(),
        s.seed
    );
    let ok = charged_twice == 0
        && taken_not_paid == 0
        && refunds_above_paid == 0
        && active_unpaid == 0
        && out_of_order == 0
        && readable_cryptograms == 0
        && paid_renewals as usize == s.renewals;

    let _ = stop_hooks.send(());
    let _ = receiver.await;
    client.broker().delete_queue(&queue).await?;
    client
        .broker()
        .delete_queue(&task_core::broker::dead_letter_queue(&queue))
        .await?;
    db.close().await;
    fake.shutdown().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    if !ok {
        bail!(
            "the chaos run found money errors (seed {}; worker log {})",
            s.seed,
            log.display()
        );
    }
    let _ = std::fs::remove_file(&log);
    Ok(())
}
