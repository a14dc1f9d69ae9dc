//! No cryptogram survives its first use, and no secret (cryptogram, card token, 3-D Secure answer,
//! API secret) appears in logs, task results, the outbox or stored gateway events.

mod billing_support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use billing_support::*;
use billing_tasks::cloudpayments::fake;
use billing_tasks::domain::PaymentStatus;
use billing_tasks::refunds::{RefundRequest, Requester};
use billing_tasks::secret::Secret;
use billing_tasks::tasks::EnqueueRenewals;
use uuid::Uuid;

/// Every log line of this test process, at every level.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || Capture(writer.clone()))
            .try_init();
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_leave_their_wrappers() {
    let logs = captured();
    let env = Env::start().await;

    // A 3-D Secure subscription, a renewal with the saved token, and a refund.
    let user = Uuid::new_v4();
    let request = env.start_request(user, CARD_3DS_OK);
    let cryptogram = request.cryptogram.expose().clone();
    let p = env.service.start_subscription(request).await.unwrap();
    let p = env.settled(user, p.id).await;
    let pa_res = fake::PA_RES_OK.to_owned();
    env.service
        .complete_3ds(
            user,
            p.id,
            p.challenge.unwrap().transaction_id,
            Secret::new(pa_res.clone()),
        )
        .await
        .unwrap();
    eventually(
        "3-D Secure to complete",
        std::time::Duration::from_secs(20),
        || async {
            (env.service.get_payment(user, p.id).await.unwrap().status == PaymentStatus::Succeeded)
                .then_some(())
        },
    )
    .await;
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() - chrono::Duration::hours(2));
    env.run::<EnqueueRenewals>(()).await;
    let invoice = env.invoice_ids(user, "renewal").await[0];
    eventually(
        "the renewal",
        std::time::Duration::from_secs(20),
        || async { (env.invoice_status(invoice).await == "paid").then_some(()) },
    )
    .await;
    let r = env
        .service
        .request_refund(RefundRequest {
            payment_id: p.id,
            reason: "duplicate account".into(),
            requested_by: Requester::Staff("support-7".into()),
            idempotency_key: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap();
    eventually("the refund", std::time::Duration::from_secs(20), || async {
        let s = sqlx::query_scalar::<_, String>("SELECT status FROM refund WHERE id = $1")
            .bind(r.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
        (s == "succeeded").then_some(())
    })
    .await;

    let token = sqlx::query_scalar::<_, String>("SELECT token FROM payment_method")
        .fetch_one(&env.db)
        .await
        .unwrap();
    let basic = base64_basic(PUBLIC_ID, API_SECRET);
    let secrets = [
        ("cryptogram", cryptogram.as_str()),
        ("card token", token.as_str()),
        ("API secret", API_SECRET),
        ("Basic auth", basic.as_str()),
    ];

    // The ledger keeps the token (to charge it) and nothing else secret.
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM payment WHERE cryptogram IS NOT NULL OR pa_res IS NOT NULL"
        )
        .await,
        0
    );
    let mut stored = String::new();
    for sql in [
        "SELECT coalesce(string_agg(payload::text, ' '), '') FROM outbox",
        "SELECT coalesce(string_agg(payload::text, ' '), '') FROM gateway_event",
        "SELECT coalesce(string_agg(coalesce(reason, '') || ' ' || actor, ' '), '') FROM status_history",
        "SELECT coalesce(string_agg(coalesce(reason, '') || coalesce(card_holder_message, ''), ' '), '') FROM payment",
    ] {
        stored.push_str(
            &sqlx::query_scalar::<_, String>(sql)
                .fetch_one(&env.db)
                .await
                .unwrap(),
        );
    }
    assert!(stored.contains("subscriber"), "the outbox was read");

    // Task results in Redis, for every task this worker ran.
    let redis = redis::Client::open(
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into()),
    )
    .unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = {
        let mut iter: redis::AsyncIter<'_, String> =
            redis::AsyncCommands::scan_match(&mut conn, "celery-task-meta-*")
                .await
                .unwrap();
        let mut keys = Vec::new();
        while let Some(k) = iter.next_item().await {
            keys.push(k.unwrap());
        }
        keys
    };
    let mut results = String::new();
    for k in keys {
        // Other tests running at the same time store msgpack results, which are not UTF-8.
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        let v = v.map(|v| String::from_utf8_lossy(&v).into_owned());
        if let Some(v) = v.filter(|v| v.contains(&env.queue)) {
            results.push_str(&v);
        }
    }
    assert!(
        results.contains("billing.charge_payment"),
        "the results were read"
    );

    let log = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(log.contains("billing_tasks"), "the logs were captured");
    for (what, secret) in secrets {
        assert!(!log.contains(secret), "the {what} appears in the logs");
        assert!(
            !results.contains(secret),
            "the {what} appears in a task result"
        );
        assert!(
            !stored.contains(secret),
            "the {what} appears in the outbox, events or history"
        );
    }
    assert!(
        !log.contains(&pa_res) && !stored.contains(&pa_res),
        "the 3-D Secure answer leaked"
    );
    env.stop().await;
}

fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_cryptogram_is_wiped_when_the_payment_is_given_up() {
    let env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_OK))
        .await
        .unwrap();
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM payment WHERE cryptogram IS NOT NULL")
            .await,
        1,
        "kept until its one use"
    );
    // Nothing ran it (the charge task was lost): after the policy's 15 minutes it is discarded.
    env.clock.advance(chrono::Duration::minutes(16));
    assert_eq!(
        billing_tasks::reconcile::purge_cryptograms(&env.billing)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM payment WHERE cryptogram IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        env.service.get_payment(user, p.id).await.unwrap().status,
        PaymentStatus::Expired
    );
    env.stop().await;
}

/// How many pages of `table` hold `needle` anywhere, in live or dead row versions.
async fn pages_holding(env: &Env, table: &str, needle: &str) -> i64 {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pageinspect")
        .execute(&env.db)
        .await
        .expect("pageinspect (PostgreSQL contrib) reads raw table pages");
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM generate_series(0, (pg_relation_size($1::regclass) / current_setting('block_size')::int) - 1) AS n
         WHERE position(convert_to($2, 'UTF8') IN get_raw_page($1, n::int)) > 0",
    )
    .bind(table)
    .bind(needle)
    .fetch_one(&env.db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_never_holds_a_cryptogram_or_3ds_answer_in_clear() {
    use billing_tasks::charging::{self, Step};
    let env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let request = env.start_request(user, CARD_3DS_OK);
    let cryptogram = request.cryptogram.expose().clone();
    let p = env.service.start_subscription(request).await.unwrap();
    let stored = sqlx::query_scalar::<_, String>("SELECT cryptogram FROM payment WHERE id = $1")
        .bind(p.id)
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert!(
        stored.starts_with("v1.") && !stored.contains(&cryptogram),
        "the cryptogram is stored sealed: {stored}"
    );

    // It still charges (the worker opens it), and the bank's answer is sealed the same way.
    assert_eq!(
        charging::charge_payment(&env.billing, p.id).await.unwrap(),
        Step::Settled(PaymentStatus::AwaitingThreeDs)
    );
    let challenge = env.service.get_payment(user, p.id).await.unwrap().challenge;
    env.service
        .complete_3ds(
            user,
            p.id,
            challenge.unwrap().transaction_id,
            Secret::new(fake::PA_RES_OK.to_owned()),
        )
        .await
        .unwrap();
    let stored = sqlx::query_scalar::<_, String>("SELECT pa_res FROM payment WHERE id = $1")
        .bind(p.id)
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert!(
        stored.starts_with("v1.") && !stored.contains(fake::PA_RES_OK),
        "the 3-D Secure answer is stored sealed"
    );
    assert_eq!(
        charging::charge_payment(&env.billing, p.id).await.unwrap(),
        Step::Settled(PaymentStatus::Succeeded)
    );

    // Both were wiped on use, and no row version left in the table's pages (what a dump of the
    // files, a replica or a backup holds) has them in clear.
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM payment WHERE cryptogram IS NOT NULL OR pa_res IS NOT NULL"
        )
        .await,
        0
    );
    assert_eq!(pages_holding(&env, "payment", &cryptogram).await, 0);
    assert_eq!(pages_holding(&env, "payment", fake::PA_RES_OK).await, 0);
    env.stop().await;
}
