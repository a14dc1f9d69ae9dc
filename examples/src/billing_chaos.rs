//! The billing chaos run: renewals, primary payments (with and without 3-D Secure) and refunds
//! while the `worker` is killed with SIGKILL every few seconds, RabbitMQ and Redis are restarted
//! once each, and the fake gateway misbehaves; then the fake gateway's own books are compared
//! with the ledger.
//!
//! During the chaos phase the fake times out (before and after processing), answers 5xx and 429,
//! processes in-flight duplicates again, and delivers its notifications up to half a second late
//! (so out of order), one in five twice. RabbitMQ is stopped and started (`rabbitmqctl stop_app`
//! / `start_app`) a third of the way in; Redis is shut down without saving (everything it held is
//! lost, as in a crash of a Redis without persistence) and started again (`scripts/services
//! redis`) two thirds of the way in. The repairs the beat would schedule (reconcile payments and
//! refunds, retry due invoices, deliver the outbox) run every two seconds. Then the faults stop
//! and the run waits until every renewal is paid and nothing is in flight.
//!
//! The fake's books are consistent the moment a call returns, so an attempt it has no record of
//! is given up after [`ChaosSettings::unknown_give_up`] (20 s) rather than the production 10
//! minutes, and one that never reached the card is retried after 5 s.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
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
use futures_util::future::BoxFuture;
use sqlx::PgPool;
use task_core::{Broker, Client};
use uuid::Uuid;

const PUBLIC_ID: &str = "pk_billing_chaos";
const SECRET: &str = "billing-chaos-api-secret";
const CARD_OK: &str = "4000000000003055";
const CARD_3DS_OK: &str = "4242424242424242";
/// The worker's gateway timeout, lease and the gateway's maximum processing time in the run.
const TIMEOUT_S: u64 = 2;
const LEASE_S: u64 = 12;
const MAX_PROCESSING_S: u64 = 5;

/// What the run does and against what.
#[derive(Debug, Clone)]
pub struct ChaosSettings {
    /// Subscribers whose renewal falls due at the start.
    pub renewals: usize,
    /// Primary payments started during the chaos, every other one through 3-D Secure.
    pub primaries: usize,
    /// Refunds asked for, of paid primary payments.
    pub refunds: usize,
    /// How long the faults last.
    pub chaos: Duration,
    /// How often the worker is killed (SIGKILL) and started again.
    pub kill_every: Duration,
    /// The fake gateway's fault seed (printed, so a failing run can be replayed).
    pub seed: u64,
    /// Restart RabbitMQ once (needs `rabbitmqctl` and the right to run it).
    pub restart_broker: bool,
    /// Restart Redis once, losing its data (needs `scripts/services` and the right to run it).
    pub restart_redis: bool,
    /// How long after the send an attempt the gateway has no record of is taken as never made.
    pub unknown_give_up: Duration,
    /// How long the run may take to settle after the chaos before it is called a failure.
    pub settle_timeout: Duration,
    /// A PostgreSQL URL allowed to create databases (the run makes its own and drops it).
    pub database_admin: String,
    pub broker: String,
    pub backend: String,
    /// The `worker` binary to run.
    pub worker: PathBuf,
}

impl ChaosSettings {
    /// The full-size defaults, with URLs from `DATABASE_ADMIN_URL`, `BROKER_URL` and
    /// `RESULT_BACKEND` (local services when unset) and the worker next to this program.
    pub fn from_env() -> anyhow::Result<Self> {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
        Ok(ChaosSettings {
            renewals: 20_000,
            primaries: 200,
            refunds: 50,
            chaos: Duration::from_secs(60),
            kill_every: Duration::from_secs(5),
            seed: clock_seed(),
            restart_broker: true,
            restart_redis: true,
            unknown_give_up: Duration::from_secs(20),
            settle_timeout: Duration::from_secs(900),
            database_admin: env(
                "DATABASE_ADMIN_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            broker: env("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            backend: env("RESULT_BACKEND", "redis://127.0.0.1:6379/0"),
            worker: crate::worker_binary()?,
        })
    }
}

/// A seed from the clock (the fake's generator is seeded from it, so the run can be replayed).
pub fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    (nanos as u64) ^ u64::from(std::process::id())
}

/// What the run found. Every count under "must be 0" is a money error (or a lost message).
#[derive(Debug, Clone, Default)]
pub struct ChaosReport {
    pub charged_twice: usize,
    pub taken_not_paid: usize,
    pub refunds_above_paid: usize,
    pub active_unpaid: i64,
    pub out_of_order: usize,
    pub readable_cryptograms: i64,
    /// Messages the worker dead-lettered (poison or refused): none is expected.
    pub dead_lettered: u64,
    /// The worker exited on its own after the chaos (a crash).
    pub worker_crashes_after_chaos: u32,
    pub renewals: usize,
    pub paid_renewals: i64,
    pub settled: bool,
    pub primaries: usize,
    pub three_ds_answered: usize,
    pub refunds_requested: usize,
    pub kills: u32,
    /// Workers that exited on their own, started while RabbitMQ or Redis was away.
    pub worker_exits_during_chaos: u32,
    pub broker_restarts: u32,
    pub redis_restarts: u32,
    pub faults_injected: u64,
    pub webhooks_sent: u64,
    pub elapsed: Duration,
    pub seed: u64,
    pub worker_log: PathBuf,
}

impl ChaosReport {
    /// Every money count is 0, every renewal is paid and nothing is left in flight.
    pub fn ok(&self) -> bool {
        self.charged_twice == 0
            && self.taken_not_paid == 0
            && self.refunds_above_paid == 0
            && self.active_unpaid == 0
            && self.out_of_order == 0
            && self.readable_cryptograms == 0
            && self.dead_lettered == 0
            && self.worker_crashes_after_chaos == 0
            && self.settled
            && self.paid_renewals as usize == self.renewals
    }

    /// The report, one figure a line.
    pub fn lines(&self) -> Vec<String> {
        vec![
            format!(
                "invoices charged more than once at the gateway: {}",
                self.charged_twice
            ),
            format!(
                "money taken that the ledger does not show as paid: {}",
                self.taken_not_paid
            ),
            format!("refunds above the paid amount: {}", self.refunds_above_paid),
            format!(
                "subscriptions active without a successful payment: {}",
                self.active_unpaid
            ),
            format!(
                "role messages delivered out of order: {}",
                self.out_of_order
            ),
            format!(
                "cryptograms readable in the database: {}",
                self.readable_cryptograms
            ),
            format!("messages dead-lettered: {}", self.dead_lettered),
            format!(
                "worker crashes after the chaos: {}",
                self.worker_crashes_after_chaos
            ),
            format!(
                "renewals paid: {} of {}{}",
                self.paid_renewals,
                self.renewals,
                if self.settled { "" } else { " (not settled)" }
            ),
            format!(
                "chaos: {} worker kills ({} exits of its own, started while RabbitMQ or Redis was away), {} RabbitMQ restart(s), {} Redis restart(s), {} gateway faults, {} notifications sent",
                self.kills,
                self.worker_exits_during_chaos,
                self.broker_restarts,
                self.redis_restarts,
                self.faults_injected,
                self.webhooks_sent
            ),
            format!(
                "throughput: {} renewals paid in {:.1} s = {:.0}/s; {} primary payments ({} 3-D Secure answers), {} refunds requested; seed {}",
                self.paid_renewals,
                self.elapsed.as_secs_f64(),
                self.paid_renewals as f64 / self.elapsed.as_secs_f64().max(0.001),
                self.primaries,
                self.three_ds_answered,
                self.refunds_requested,
                self.seed
            ),
        ]
    }
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

/// A worker process on `queue`, logging to `log`.
fn spawn_worker(
    queue: &str,
    db_url: &str,
    fake_url: &str,
    s: &ChaosSettings,
    log: &std::path::Path,
) -> anyhow::Result<tokio::process::Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    tokio::process::Command::new(&s.worker)
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
        .env("CLOUDPAYMENTS_TIMEOUT", TIMEOUT_S.to_string())
        .env("BILLING_PROCESSING_LEASE", LEASE_S.to_string())
        .env(
            "BILLING_GATEWAY_MAX_PROCESSING",
            MAX_PROCESSING_S.to_string(),
        )
        .env(
            "BILLING_UNKNOWN_GIVE_UP",
            s.unknown_give_up.as_secs().to_string(),
        )
        .env("BILLING_NOT_PROCESSED_RETRY", "5")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", s.worker.display()))
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

fn run_checked(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {program}"))?;
    anyhow::ensure!(status.success(), "{program} {args:?}: {status}");
    Ok(())
}

/// Stops RabbitMQ's application for `down`, then starts it and waits until it serves.
fn restart_rabbitmq(down: Duration) -> anyhow::Result<()> {
    run_checked("rabbitmqctl", &["-q", "stop_app"])?;
    std::thread::sleep(down);
    run_checked("rabbitmqctl", &["-q", "start_app"])?;
    run_checked("rabbitmqctl", &["-q", "await_startup"])
}

/// Shuts Redis down without saving (its data is gone) for `down`, then starts it again the way
/// the test script does.
async fn restart_redis(url: &str, down: Duration) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    // The server closes the connection instead of answering.
    let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .query_async(&mut conn)
        .await;
    tokio::time::sleep(down).await;
    let services = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/services");
    tokio::task::spawn_blocking(move || run_checked(services, &["redis"])).await?
}

/// When each restart of RabbitMQ or Redis began and when it was seen done.
type Away = Arc<Mutex<Vec<(Instant, Option<Instant>)>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What happened to the worker processes.
#[derive(Debug, Default)]
struct Tally {
    kills: u32,
    crashes_after_chaos: u32,
    exits_during_chaos: u32,
}

/// Keeps one worker running: kills it (SIGKILL) every `kill_every` until the chaos is over and
/// starts another, and starts one again when it exits on its own. It runs beside the loop that
/// drives the payments, whose steps can wait on the broker or Redis for seconds, so the kills
/// keep their pace whatever that loop is doing. Stops (killing the worker) when `stop` fires.
async fn supervise(
    mut worker: tokio::process::Child,
    spawn: impl Fn() -> anyhow::Result<tokio::process::Child>,
    kill_every: Duration,
    calm: tokio::sync::watch::Receiver<bool>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    away: Away,
    log: PathBuf,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let mut last_kill = Instant::now();
    let mut last_spawn = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let calm = *calm.borrow();
        if !calm && last_kill.elapsed() >= kill_every {
            worker.kill().await?; // SIGKILL
            tally.kills += 1;
            worker = spawn()?;
            last_kill = Instant::now();
            last_spawn = Instant::now();
        }
        // A worker that exits on its own: expected only if it was started while the broker or
        // Redis was away (it cannot start without them); otherwise, after the chaos, a crash.
        if let Some(status) = worker.try_wait()?
            && last_spawn.elapsed() >= Duration::from_secs(1)
        {
            let started_while_away = lock(&away)
                .iter()
                .any(|(began, back)| last_spawn >= *began && back.is_none_or(|b| last_spawn <= b));
            if calm && !started_while_away {
                tally.crashes_after_chaos += 1;
                println!(
                    "  the worker exited on its own ({status}); see {}",
                    log.display()
                );
            } else {
                tally.exits_during_chaos += 1;
            }
            worker = spawn()?;
            last_spawn = Instant::now();
        }
    }
    let _ = worker.kill().await;
    Ok(tally)
}

/// Runs the chaos and compares the books. An error means the run could not be made (a service
/// missing); money errors are in the report.
pub async fn run(s: &ChaosSettings) -> anyhow::Result<ChaosReport> {
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
    gateway_config.timeout = Duration::from_secs(TIMEOUT_S);
    let policy = Policy {
        processing_lease: chrono::Duration::seconds(LEASE_S as i64),
        gateway_max_processing: chrono::Duration::seconds(MAX_PROCESSING_S as i64),
        unknown_give_up: chrono::Duration::from_std(s.unknown_give_up)?,
        not_processed_retry: chrono::Duration::seconds(5),
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
    crate::seed_renewals(&db, &fake, PUBLIC_ID, s.renewals).await?;
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
    // When each restart began and when it was seen done: a worker started in between may
    // exit on its own (it cannot start without the broker and Redis), whenever that is noticed.
    let away: Away = Arc::new(Mutex::new(Vec::new()));
    let (calm_tx, calm_rx) = tokio::sync::watch::channel(false);
    let (stop_fleet, fleet_stopped) = tokio::sync::oneshot::channel::<()>();
    let first = spawn_worker(&queue, &db_url, &fake.url(), s, &log)?;
    let fleet = {
        let (queue, db_url, fake_url, settings, worker_log) = (
            queue.clone(),
            db_url.clone(),
            fake.url(),
            s.clone(),
            log.clone(),
        );
        let spawn = move || spawn_worker(&queue, &db_url, &fake_url, &settings, &worker_log);
        tokio::spawn(supervise(
            first,
            spawn,
            s.kill_every,
            calm_rx,
            fleet_stopped,
            away.clone(),
            log.clone(),
        ))
    };
    let mut report = ChaosReport {
        renewals: s.renewals,
        seed: s.seed,
        worker_log: log.clone(),
        ..ChaosReport::default()
    };
    let start = Instant::now();
    client
        .task::<tasks::EnqueueRenewals>(())
        .queue(&queue)
        .send()
        .await?;

    let target = Recorder::default();
    let mut primaries: HashMap<Uuid, (Uuid, bool)> = HashMap::new(); // payment -> (user, 3DS)
    let mut answered_3ds = HashSet::new();
    let mut refunded = HashSet::new();
    let mut restarts: Vec<(&str, tokio::task::JoinHandle<anyhow::Result<()>>)> = Vec::new();
    let (mut broker_due, mut redis_due) = (s.restart_broker, s.restart_redis);
    let mut last_repair = Instant::now();
    let mut next_primary = 0usize;
    let mut calm = false;
    let mut last_progress = Instant::now();
    loop {
        let elapsed = start.elapsed();
        if broker_due && elapsed >= s.chaos / 3 {
            broker_due = false;
            println!("  restarting RabbitMQ");
            lock(&away).push((Instant::now(), None));
            restarts.push((
                "RabbitMQ",
                tokio::task::spawn_blocking(|| restart_rabbitmq(Duration::from_secs(3))),
            ));
        }
        if redis_due && elapsed >= s.chaos * 2 / 3 {
            redis_due = false;
            println!("  restarting Redis (its data lost)");
            let url = s.backend.clone();
            lock(&away).push((Instant::now(), None));
            restarts.push((
                "Redis",
                tokio::spawn(async move { restart_redis(&url, Duration::from_secs(3)).await }),
            ));
        }
        for ((_, restart), (_, back)) in restarts.iter().zip(lock(&away).iter_mut()) {
            if back.is_none() && restart.is_finished() {
                *back = Some(Instant::now());
            }
        }
        if !calm && elapsed >= s.chaos && !broker_due && !redis_due {
            for (i, (what, restart)) in restarts.drain(..).enumerate() {
                restart
                    .await?
                    .with_context(|| format!("restarting {what}"))?;
                lock(&away)[i].1.get_or_insert_with(Instant::now);
                match what {
                    "RabbitMQ" => report.broker_restarts += 1,
                    _ => report.redis_restarts += 1,
                }
            }
            fake.clear_faults();
            fake.set_block_in_flight_duplicates(true);
            calm = true;
            let _ = calm_tx.send(true);
            println!(
                "chaos over after {:.0} s; settling",
                start.elapsed().as_secs_f64(),
            );
        }
        if fleet.is_finished() {
            break; // the supervisor failed (a worker could not be started): its error follows
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
                report.settled = true;
                break;
            }
            if elapsed > s.chaos + s.settle_timeout {
                println!(
                    "  not settled {} s after the chaos ({open} items open)",
                    s.settle_timeout.as_secs()
                );
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.elapsed = start.elapsed();
    let _ = stop_fleet.send(());
    let tally = fleet.await??;
    report.kills = tally.kills;
    report.worker_crashes_after_chaos = tally.crashes_after_chaos;
    report.worker_exits_during_chaos = tally.exits_during_chaos;
    report.primaries = primaries.len();
    report.three_ds_answered = answered_3ds.len();
    report.refunds_requested = refunded.len();
    report.faults_injected = fake.faults_injected();
    report.webhooks_sent = fake.webhook_counts().0;

    compare_books(&db, &fake, &target, &mut report).await?;
    let dlq = task_core::broker::dead_letter_queue(&queue);
    report.dead_lettered = client.broker().queue_length(&dlq).await?;

    let _ = stop_hooks.send(());
    let _ = receiver.await;
    client.broker().delete_queue(&queue).await?;
    client.broker().delete_queue(&dlq).await?;
    db.close().await;
    fake.shutdown().await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    if report.ok() {
        let _ = std::fs::remove_file(&log);
    }
    Ok(report)
}

/// The fake gateway's own books against the ledger.
async fn compare_books(
    db: &PgPool,
    fake: &FakeGateway,
    target: &Recorder,
    report: &mut ChaosReport,
) -> anyhow::Result<()> {
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
        .fetch_all(db)
        .await?;
    let system_refunded: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT p.invoice_id FROM refund r JOIN payment p ON p.id = r.payment_id WHERE r.requested_by = 'system'",
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .collect();
    report.charged_twice = invoices
        .iter()
        .filter(|(id, _)| {
            charges.get(&id.to_string()).copied().unwrap_or(0) > 1 && !system_refunded.contains(id)
        })
        .count();
    let known: HashSet<String> = invoices.iter().map(|(id, _)| id.to_string()).collect();
    report.taken_not_paid = invoices
        .iter()
        .filter(|(id, status)| {
            charges.get(&id.to_string()).copied().unwrap_or(0) > 0
                && status != "paid"
                && !system_refunded.contains(id)
        })
        .count()
        + charges.keys().filter(|i| !known.contains(*i)).count();
    report.refunds_above_paid = refunds_of
        .iter()
        .filter(|(payment, refunded)| **refunded > paid_of.get(payment).copied().unwrap_or(0))
        .count();
    report.active_unpaid = sqlx::query_scalar(
        "SELECT count(*) FROM subscription s WHERE s.status = 'active' AND NOT EXISTS (
             SELECT 1 FROM payment p JOIN invoice i ON i.id = p.invoice_id
             WHERE i.subscription_id = s.id AND p.status = 'succeeded' AND NOT p.duplicate)",
    )
    .fetch_one(db)
    .await?;
    report.out_of_order = {
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
    report.readable_cryptograms = sqlx::query_scalar(
        "SELECT count(*) FROM payment WHERE (cryptogram IS NOT NULL AND cryptogram NOT LIKE 'v1.%')
                                         OR (pa_res IS NOT NULL AND pa_res NOT LIKE 'v1.%')",
    )
    .fetch_one(db)
    .await?;
    report.paid_renewals = sqlx::query_scalar(
        "SELECT count(*) FROM invoice WHERE kind = 'renewal' AND status = 'paid'",
    )
    .fetch_one(db)
    .await?;
    Ok(())
}
