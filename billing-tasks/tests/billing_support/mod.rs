//! A billing test environment: a fresh PostgreSQL database, the fake gateway over HTTP (with its
//! webhooks pointed at our receiver), RabbitMQ and Redis, a worker running the billing tasks on a
//! queue of its own, and a clock the test moves.

#![allow(dead_code)]

pub mod backoffice;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use billing_tasks::cloudpayments::fake::{
    self, FakeConfig, FakeGateway, TerminalConfig, WebhookConfig,
};
use billing_tasks::domain::{PaymentStatus, Policy};
use billing_tasks::secret::Secret;
use billing_tasks::service::{PaymentView, StartSubscription};
use billing_tasks::webhooks::{self, WebhookState};
use billing_tasks::{Billing, BillingService, cloudpayments};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;
use task_core::{
    AmqpBroker, Broker, Client, Clock, RedisBackend, Registry, Task, Worker, WorkerConfig,
};
use tokio::sync::oneshot;
use uuid::Uuid;

pub const CARD_OK: &str = "4000000000003055";
pub const CARD_3DS_OK: &str = "4242424242424242";
pub const CARD_NSF: &str = "4000056655665556";
pub const CARD_TOKEN_NSF: &str = "4111111111111111";
pub const EXP: &str = "12/30";
pub const PUBLIC_ID: &str = "pk_billing_tests";
pub const API_SECRET: &str = "billing-tests-api-secret";

pub fn admin_url() -> String {
    std::env::var("DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Real time shifted by an offset the test moves: time flows as usual (leases expire, retries
/// come due) and the test can jump ahead by days.
#[derive(Clone, Debug)]
pub struct TestClock(Arc<Mutex<chrono::Duration>>);

impl TestClock {
    pub fn new() -> Self {
        TestClock(Arc::new(Mutex::new(chrono::Duration::zero())))
    }
    pub fn clock(&self) -> Clock {
        let offset = self.0.clone();
        Clock::from_fn(move || Utc::now() + *offset.lock().unwrap())
    }
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + *self.0.lock().unwrap()
    }
    pub fn set(&self, t: DateTime<Utc>) {
        *self.0.lock().unwrap() = t - Utc::now();
    }
    pub fn advance(&self, d: chrono::Duration) {
        *self.0.lock().unwrap() += d;
    }
}

/// A database of its own, dropped by [`Env::stop`].
pub async fn fresh_database() -> (String, String, PgPool) {
    let name = format!("billing_test_{}", Uuid::new_v4().simple());
    let admin = PgPool::connect(&admin_url())
        .await
        .expect("PostgreSQL must be running (scripts/test starts it)");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    let url = admin_url()
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{name}"))
        .expect("a database URL");
    let pool = billing_tasks::db::connect(&url, 8)
        .await
        .expect("connect and migrate");
    (name, url, pool)
}

pub async fn drop_database(name: &str) {
    if let Ok(admin) = PgPool::connect(&admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
    }
}

pub struct Options {
    pub fake: FakeConfig,
    pub policy: Policy,
    pub run_worker: bool,
    pub client_timeout: Duration,
    /// Whether the fake sends its notifications to our receiver; without them only the worker's
    /// own calls and lookups can settle anything.
    pub webhooks: bool,
    /// Where the worker's `billing.deliver_outbox` posts (`OUTBOX_URL`); unset: nowhere.
    pub outbox_url: Option<String>,
    /// Notifications delayed by up to this, and delivered twice with this probability.
    pub webhook_mischief: Option<(Duration, f64)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fake: FakeConfig::default()
                .with_terminals(vec![TerminalConfig::production(PUBLIC_ID, API_SECRET)])
                .with_hang(Duration::from_secs(3)),
            policy: Policy {
                processing_lease: chrono::Duration::seconds(2),
                // Past the fake's processing time plus its `hang`.
                gateway_max_processing: chrono::Duration::seconds(4),
                ..Policy::default()
            },
            run_worker: true,
            client_timeout: Duration::from_secs(2),
            webhooks: true,
            outbox_url: None,
            webhook_mischief: None,
        }
    }
}

type RunningWorker = (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<task_core::Result<Arc<task_core::worker::WorkerStats>>>,
);

pub struct Env {
    pub db_name: String,
    pub db_url: String,
    pub db: PgPool,
    pub fake: FakeGateway,
    pub clock: TestClock,
    pub billing: Billing,
    pub service: BillingService,
    pub queue: String,
    pub tasks: Client,
    pub webhook_addr: SocketAddr,
    worker: Option<RunningWorker>,
    webhook_server: tokio::task::JoinHandle<()>,
    /// Messages the test means to dead-letter (bad input); any other one fails the test.
    expected_dead_letters: u64,
    outbox_target: Option<Arc<dyn billing_tasks::outbox::OutboxTarget>>,
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Env {
        let (db_name, db_url, db) = fresh_database().await;
        let clock = TestClock::new();
        let queue = format!("test.billing.{}", Uuid::new_v4().simple());
        let broker = AmqpBroker::connect(&amqp_url())
            .await
            .expect("RabbitMQ must be running");
        let backend = RedisBackend::connect(&redis_url())
            .await
            .expect("Redis must be running");
        let tasks = Client::new(broker.clone(), backend.clone());

        // The webhook receiver listens first, so the fake can be pointed at it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let webhook_addr = listener.local_addr().unwrap();
        let mut webhooks = if opts.webhooks {
            WebhookConfig::compressed()
                .all_to(&format!("http://{webhook_addr}/webhooks/cloudpayments"))
        } else {
            WebhookConfig::compressed()
        };
        if let Some((delay, duplicates)) = opts.webhook_mischief {
            webhooks = webhooks.with_mischief(delay, duplicates);
        }
        let fake = FakeGateway::start(opts.fake.with_webhooks(webhooks))
            .await
            .expect("the fake gateway starts");
        let mut config = fake.client_config();
        config.timeout = opts.client_timeout;
        let gateway = cloudpayments::Client::new(config).unwrap();
        let billing = Billing::new(
            db.clone(),
            gateway,
            opts.policy,
            clock.clock(),
            tasks.clone(),
        )
        .with_queue(&queue);
        let app = webhooks::router(WebhookState::new(
            billing.clone(),
            Secret::new(API_SECRET.to_owned()),
        ));
        let webhook_server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });

        let mut env = Env {
            db_name,
            db_url,
            db,
            fake,
            clock,
            service: BillingService::new(billing.clone()),
            billing,
            queue,
            tasks,
            webhook_addr,
            worker: None,
            webhook_server,
            expected_dead_letters: 0,
            outbox_target: opts.outbox_url.as_deref().map(|url| {
                Arc::new(billing_tasks::outbox::HttpTarget::new(url).expect("an outbox URL"))
                    as Arc<dyn billing_tasks::outbox::OutboxTarget>
            }),
        };
        if opts.run_worker {
            env.start_worker(broker, backend);
        }
        env
    }

    pub fn start_worker(&mut self, broker: AmqpBroker, backend: RedisBackend) {
        let mut registry = Registry::new();
        billing_tasks::tasks::register(
            &mut registry,
            self.billing.clone(),
            self.outbox_target.clone(),
        );
        let config = WorkerConfig {
            queues: vec![self.queue.clone()],
            concurrency: 16,
            prefetch: 64,
            ..WorkerConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let worker = Worker::new(config, registry, broker, backend);
        let handle = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        self.worker = Some((stop, handle));
    }

    /// The test dead-letters `n` messages on purpose (bad input).
    pub fn expect_dead_letters(&mut self, n: u64) {
        self.expected_dead_letters = n;
    }

    /// Stops everything and drops the database; fails the test if the in-process worker died or
    /// anything other than what the test expected was dead-lettered.
    pub async fn stop(mut self) {
        let mut failures = Vec::new();
        if let Some((stop, handle)) = self.worker.take() {
            let _ = stop.send(());
            match handle.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failures.push(format!("the billing worker failed: {e}")),
                Err(e) => failures.push(format!("the billing worker died: {e}")),
            }
        }
        self.webhook_server.abort();
        let dlq = task_core::broker::dead_letter_queue(&self.queue);
        match self.tasks.broker().queue_length(&dlq).await {
            Ok(n) if n == self.expected_dead_letters => {}
            Ok(n) => failures.push(format!(
                "{n} messages were dead-lettered (expected {})",
                self.expected_dead_letters
            )),
            Err(e) => failures.push(format!("cannot read the dead-letter queue {dlq}: {e}")),
        }
        let _ = self.tasks.broker().delete_queue(&self.queue).await;
        let _ = self.tasks.broker().delete_queue(&dlq).await;
        self.db.close().await;
        self.fake.shutdown().await;
        drop_database(&self.db_name).await;
        assert!(failures.is_empty(), "{}", failures.join("; "));
    }

    /// Runs a task through the queue and waits for its result.
    pub async fn run<T: Task>(&self, args: T::Args) -> T::Output {
        self.tasks
            .task::<T>(args)
            .queue(&self.queue)
            .send()
            .await
            .expect("enqueue")
            .get(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{} failed: {e}", T::NAME))
    }

    pub fn start_request(&self, user: Uuid, pan: &str) -> StartSubscription {
        StartSubscription {
            user_id: user,
            tariff: "monthly".into(),
            cryptogram: Secret::new(fake::test_cryptogram(pan, EXP)),
            cardholder_name: Some("IVAN IVANOV".into()),
            ip_address: "203.0.113.7".into(),
            email: Some("ivan@example.com".into()),
            idempotency_key: Uuid::new_v4().to_string(),
        }
    }

    /// Waits until the payment leaves `created`/`processing`.
    pub async fn settled(&self, user: Uuid, payment: Uuid) -> PaymentView {
        eventually("the payment to settle", Duration::from_secs(30), || async {
            let p = self.service.get_payment(user, payment).await.unwrap();
            (!matches!(p.status, PaymentStatus::Created | PaymentStatus::Processing)).then_some(p)
        })
        .await
    }

    /// Subscribes with a card that needs no 3-D Secure and waits for success.
    pub async fn subscribe(&self, user: Uuid, pan: &str) -> PaymentView {
        let p = self
            .service
            .start_subscription(self.start_request(user, pan))
            .await
            .unwrap();
        let p = self.settled(user, p.id).await;
        assert_eq!(p.status, PaymentStatus::Succeeded, "{p:?}");
        p
    }

    /// Outbox payloads of a topic, oldest first.
    pub async fn outbox(&self, topic: &str) -> Vec<Value> {
        sqlx::query_scalar::<_, Value>(
            "SELECT payload FROM outbox WHERE topic = $1 ORDER BY created_at, id",
        )
        .bind(topic)
        .fetch_all(&self.db)
        .await
        .unwrap()
    }

    /// Moves a `created` attempt to `processing` as a worker's gateway call would, its call begun
    /// `ago`, with the `status_history` row the ledger requires.
    pub async fn mark_processing(&self, payment: Uuid, ago: chrono::Duration) {
        sqlx::query(
            "WITH p AS (UPDATE payment SET status = 'processing', sent_at = now() - $2, cryptogram = NULL
                        WHERE id = $1 RETURNING id)
             INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, at)
             SELECT 'payment', id, 'created', 'processing', 'worker', now() FROM p",
        )
        .bind(payment)
        .bind(ago)
        .execute(&self.db)
        .await
        .unwrap();
    }

    pub async fn scalar_i64(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    pub async fn subscription_of(&self, user: Uuid) -> (String, bool, Option<DateTime<Utc>>) {
        sqlx::query_as::<_, (String, bool, Option<DateTime<Utc>>)>(
            "SELECT status, auto_renew, current_period_end FROM subscription WHERE payer_id = $1 ORDER BY created_at DESC LIMIT 1",
        )
        .bind(user)
        .fetch_one(&self.db)
        .await
        .unwrap()
    }

    pub async fn invoice_ids(&self, user: Uuid, kind: &str) -> Vec<Uuid> {
        sqlx::query_scalar::<_, Uuid>(
            "SELECT id FROM invoice WHERE payer_id = $1 AND kind = $2 ORDER BY period_start",
        )
        .bind(user)
        .bind(kind)
        .fetch_all(&self.db)
        .await
        .unwrap()
    }

    pub async fn invoice_status(&self, id: Uuid) -> String {
        sqlx::query_scalar::<_, String>("SELECT status FROM invoice WHERE id = $1")
            .bind(id)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// The ledger and the gateway agree: every paid invoice was charged exactly once at the
    /// gateway, and nothing unpaid was charged at all.
    pub async fn assert_ledger_matches_gateway(&self) {
        let invoices = sqlx::query_as::<_, (Uuid, String, i64)>(
            "SELECT id, status, amount_minor FROM invoice",
        )
        .fetch_all(&self.db)
        .await
        .unwrap();
        for (id, status, amount) in invoices {
            let charges = self.fake.charges_for_invoice(&id.to_string());
            let refunded_in_full = sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM refund r JOIN payment p ON p.id = r.payment_id WHERE p.invoice_id = $1 AND r.requested_by = 'system'",
            )
            .bind(id)
            .fetch_one(&self.db)
            .await
            .unwrap();
            assert!(
                charges <= 1,
                "invoice {id} was charged {charges} times at the gateway"
            );
            if status == "paid" {
                assert_eq!(
                    charges, 1,
                    "paid invoice {id} must be charged once at the gateway"
                );
                assert_eq!(
                    self.fake.total_charged(&id.to_string()).map(|m| m.minor),
                    Some(amount)
                );
            } else if refunded_in_full == 0 {
                assert_eq!(
                    charges, 0,
                    "unpaid invoice {id} ({status}) was charged at the gateway"
                );
            }
        }
    }
}

/// Polls `check` every 25 ms until it returns `Some`, failing with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
