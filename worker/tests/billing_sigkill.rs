//! A worker SIGKILLed right after the gateway processed a renewal charge, before it could record
//! the outcome: the next worker finds the attempt in flight, looks it up by replaying the same
//! `X-Request-ID`, and records the one charge. Nothing is charged twice.

mod common;

use std::time::Duration;

use billing_tasks::cloudpayments::fake::{self, FakeConfig, FakeGateway, Fault, TerminalConfig};
use billing_tasks::domain::{PaymentStatus, Policy};
use billing_tasks::secret::Secret;
use billing_tasks::service::StartSubscription;
use billing_tasks::tasks::EnqueueRenewals;
use billing_tasks::{Billing, BillingService, cloudpayments};
use sqlx::PgPool;
use task_core::{Broker, Client};
use uuid::Uuid;

const PUBLIC_ID: &str = "pk_sigkill_test";
const SECRET: &str = "sigkill-test-secret";

fn admin_url() -> String {
    std::env::var("DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn billing_worker(queue: &str, db_url: &str, fake: &FakeGateway) -> common::WorkerProcess {
    common::WorkerProcess::spawn(
        queue,
        &[
            ("WORKER_TASKS", "billing"),
            ("BILLING_QUEUE", queue),
            ("DATABASE_URL", db_url),
            ("CLOUDPAYMENTS_URL", &fake.url()),
            ("CLOUDPAYMENTS_PUBLIC_ID", PUBLIC_ID),
            ("CLOUDPAYMENTS_API_SECRET", SECRET),
            ("CLOUDPAYMENTS_TIMEOUT", "2"),
            ("BILLING_PROCESSING_LEASE", "12"),
            // The fake is done with a call once its hang has passed.
            ("BILLING_GATEWAY_MAX_PROCESSING", "12"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_after_the_gateway_call_does_not_cause_a_second_charge() {
    let db_name = format!("billing_test_{}", Uuid::new_v4().simple());
    let admin = PgPool::connect(&admin_url())
        .await
        .expect("PostgreSQL must be running");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
        .execute(&admin)
        .await
        .unwrap();
    let db_url = admin_url()
        .rsplit_once('/')
        .map(|(b, _)| format!("{b}/{db_name}"))
        .unwrap();
    let db = billing_tasks::db::connect(&db_url, 4).await.unwrap();
    let fake = FakeGateway::start(
        FakeConfig::default()
            .with_terminals(vec![TerminalConfig::production(PUBLIC_ID, SECRET)])
            .with_hang(Duration::from_secs(6)),
    )
    .await
    .unwrap();
    let queue = common::unique_queue("billing-sigkill");
    let tasks = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap();
    let billing = Billing::new(
        db.clone(),
        cloudpayments::Client::new(fake.client_config()).unwrap(),
        Policy::default(),
        task_core::Clock::system(),
        tasks.clone(),
    )
    .with_queue(&queue);
    let service = BillingService::new(billing.clone());

    // A subscriber whose period ends within the renewal lead time.
    let first = billing_worker(&queue, &db_url, &fake);
    first.ready().await;
    let user = Uuid::new_v4();
    let p = service
        .start_subscription(StartSubscription {
            user_id: user,
            tariff: "monthly".into(),
            cryptogram: Secret::new(fake::test_cryptogram("4000000000003055", "12/30")),
            cardholder_name: None,
            ip_address: "198.51.100.1".into(),
            email: None,
            idempotency_key: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap();
    common::eventually("the first payment", Duration::from_secs(30), || async {
        (service.get_payment(user, p.id).await.unwrap().status == PaymentStatus::Succeeded)
            .then_some(())
    })
    .await;
    sqlx::query("UPDATE subscription SET current_period_end = now() + interval '1 hour' WHERE payer_id = $1")
        .bind(user)
        .execute(&db)
        .await
        .unwrap();

    // The renewal charge is processed by the gateway, whose answer then hangs; the worker dies
    // waiting for it.
    fake.push_fault_for("/payments/tokens/charge", Fault::TimeoutAfterProcessing);
    tasks
        .task::<EnqueueRenewals>(())
        .queue(&queue)
        .send()
        .await
        .unwrap();
    let invoice: Uuid =
        common::eventually("the renewal invoice", Duration::from_secs(30), || async {
            sqlx::query_scalar("SELECT id FROM invoice WHERE kind = 'renewal'")
                .fetch_optional(&db)
                .await
                .unwrap()
        })
        .await;
    common::eventually(
        "the gateway to charge the renewal",
        Duration::from_secs(30),
        || async { (fake.charges_for_invoice(&invoice.to_string()) == 1).then_some(()) },
    )
    .await;
    first.signal("KILL");
    drop(first);
    let status: String = sqlx::query_scalar("SELECT status FROM payment WHERE invoice_id = $1")
        .bind(invoice)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        status, "processing",
        "the dead worker never learned the outcome"
    );

    let second = billing_worker(&queue, &db_url, &fake);
    common::eventually(
        "the renewal to be recorded as paid",
        Duration::from_secs(60),
        || async {
            let s: String = sqlx::query_scalar("SELECT status FROM invoice WHERE id = $1")
                .bind(invoice)
                .fetch_one(&db)
                .await
                .unwrap();
            (s == "paid").then_some(())
        },
    )
    .await;
    assert_eq!(
        fake.charges_for_invoice(&invoice.to_string()),
        1,
        "charged exactly once"
    );
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM payment WHERE invoice_id = $1")
        .bind(invoice)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(attempts, 1);
    drop(second);
    let _ = tasks.broker().delete_queue(&queue).await;
    db.close().await;
    fake.shutdown().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
}
