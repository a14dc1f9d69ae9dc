//! `billing.*` tasks sent from the real Python `celery` to a billing worker: the argument shapes
//! Python sends (keyword, positional, `uuid.UUID` in kombu's JSON) and the exception classes
//! Python's `AsyncResult.get()` raises for billing's errors.

mod common;

use billing_tasks::cloudpayments::fake::{FakeConfig, FakeGateway, TerminalConfig};
use serde_json::{Value, json};
use sqlx::PgPool;
use task_core::Broker;
use uuid::Uuid;

const PUBLIC_ID: &str = "pk_python_billing";
const SECRET: &str = "python-billing-secret";

fn admin_url() -> String {
    std::env::var("DATABASE_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

async fn python(cfg: Value) -> Value {
    let script = common::workspace_root().join("worker/tests/python/interop.py");
    let mut cfg = cfg;
    let obj = cfg.as_object_mut().unwrap();
    obj.insert(
        "broker".into(),
        common::amqp_url().replace("/%2f", "//").into(),
    );
    obj.insert("backend".into(), common::redis_url().into());
    let out = tokio::process::Command::new(common::python())
        .arg(script)
        .arg(cfg.to_string())
        .output()
        .await
        .expect("run the Python helper");
    assert!(
        out.status.success(),
        "python helper failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad output {:?}: {e}", String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sends_billing_tasks_and_sees_their_error_classes() {
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
    let db = billing_tasks::db::connect(&db_url, 2).await.unwrap();
    let fake = FakeGateway::start(
        FakeConfig::default().with_terminals(vec![TerminalConfig::production(PUBLIC_ID, SECRET)]),
    )
    .await
    .unwrap();
    let queue = common::unique_queue("py-billing");
    let worker = common::WorkerProcess::spawn(
        &queue,
        &[
            ("WORKER_TASKS", "billing"),
            ("BILLING_QUEUE", &queue),
            ("DATABASE_URL", &db_url),
            ("CLOUDPAYMENTS_URL", &fake.url()),
            ("CLOUDPAYMENTS_PUBLIC_ID", PUBLIC_ID),
            ("CLOUDPAYMENTS_API_SECRET", SECRET),
        ],
    );
    worker.ready().await;
    let missing = Uuid::new_v4().to_string();
    let base = json!({"queue": queue, "timeout": 30});
    let send = |extra: Value| {
        let mut cfg = base.clone();
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        python(cfg)
    };
    let too_many: Vec<String> = (0..1001).map(|_| Uuid::new_v4().to_string()).collect();
    let (by_keyword_uuid, positional, wrong_shape, batch, reconcile) = tokio::join!(
        // kwargs with a `uuid.UUID`, as kombu's JSON wraps it.
        send(
            json!({"task": "billing.charge_payment", "kwargs": {"payment_id": missing}, "uuids": true})
        ),
        // The same as a positional string.
        send(json!({"task": "billing.charge_payment", "args": [missing]})),
        send(json!({"task": "billing.charge_payment", "args": [1, 2]})),
        send(json!({"task": "billing.charge_invoices", "args": [too_many], "uuids": true})),
        send(json!({"task": "billing.reconcile_refunds"})),
    );
    // billing's own errors: `billing.NotFound`. Python has no `billing` module, so it raises a
    // class of that name it makes up under celery.exceptions, as Celery does for any class it
    // cannot import.
    for r in [&by_keyword_uuid, &positional] {
        let e = &r["exception"];
        assert_eq!(r["state"], "FAILURE", "{r}");
        assert_eq!(e["class"], "NotFound", "{r}");
        assert_eq!(e["module"], "celery.exceptions", "{r}");
        assert!(e["str"].as_str().unwrap().contains(&missing), "{r}");
        assert!(
            r["traceback"].as_str().unwrap().ends_with(&format!(
                "billing.NotFound: {}\n",
                e["str"].as_str().unwrap()
            )),
            "{r}"
        );
    }
    // The wrong argument shape is a TypeError (and the message is dead-lettered).
    assert_eq!(
        wrong_shape["exception"]["class"], "TypeError",
        "{wrong_shape}"
    );
    assert_eq!(wrong_shape["exception"]["module"], "builtins");
    assert_eq!(batch["exception"]["class"], "InvalidArgument", "{batch}");
    assert_eq!(reconcile["state"], "SUCCESS", "{reconcile}");
    assert_eq!(reconcile["result"], json!({"enqueued": 0}), "{reconcile}");
    eprintln!(
        "Python saw: {} / {} / {} / {}",
        by_keyword_uuid["exception"]["str"],
        wrong_shape["exception"]["str"],
        batch["exception"]["str"],
        reconcile["result"]
    );

    drop(worker);
    let broker = task_core::AmqpBroker::connect(&common::amqp_url())
        .await
        .unwrap();
    let _ = broker.delete_queue(&queue).await;
    let _ = broker
        .delete_queue(&task_core::broker::dead_letter_queue(&queue))
        .await;
    db.close().await;
    fake.shutdown().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
}
