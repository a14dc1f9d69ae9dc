//! The outbox: role grants and notifications are recorded with the payment and delivered, with
//! retries and back-off, to the configured target.

mod billing_support;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use billing_support::*;
use billing_tasks::outbox::{self, HttpTarget, MAX_ATTEMPTS};
use serde_json::Value;
use uuid::Uuid;

/// A target that fails the first `fail_first` deliveries, then accepts; it records what it got.
async fn flaky_target(fail_first: usize) -> (String, Arc<Mutex<Vec<(String, Value)>>>) {
    let got: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
    let calls = Arc::new(Mutex::new(0usize));
    let app = {
        let got = got.clone();
        Router::new().route(
            "/outbox",
            post(move |headers: HeaderMap, body: axum::Json<Value>| {
                let (got, calls) = (got.clone(), calls.clone());
                async move {
                    let n = {
                        let mut c = calls.lock().unwrap();
                        *c += 1;
                        *c
                    };
                    if n <= fail_first {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let key = headers
                        .get("Idempotency-Key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    got.lock().unwrap().push((key, body.0));
                    StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/outbox"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_retried_with_back_off_until_delivered() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let pending = env
        .scalar_i64("SELECT count(*) FROM outbox WHERE status = 'pending'")
        .await;
    assert_eq!(pending, 2, "a role grant and a payment notification");

    let (url, got) = flaky_target(2).await;
    let target = HttpTarget::new(&url).unwrap();
    // First run: both fail and are rescheduled, 30 s later.
    let r = outbox::deliver_due(&env.billing, &target, 100)
        .await
        .unwrap();
    assert_eq!((r.delivered, r.retrying), (0, 2));
    let r = outbox::deliver_due(&env.billing, &target, 100)
        .await
        .unwrap();
    assert_eq!(
        r.delivered + r.retrying,
        0,
        "nothing is due before the back-off"
    );
    env.clock.advance(chrono::Duration::seconds(31));
    let r = outbox::deliver_due(&env.billing, &target, 100)
        .await
        .unwrap();
    assert_eq!(r.delivered, 2);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM outbox WHERE status = 'delivered' AND attempts = 2")
            .await,
        2
    );

    let got = got.lock().unwrap().clone();
    let ids: Vec<String> = sqlx::query_scalar::<_, Uuid>("SELECT id FROM outbox ORDER BY id")
        .fetch_all(&env.db)
        .await
        .unwrap()
        .iter()
        .map(Uuid::to_string)
        .collect();
    let mut keys: Vec<String> = got.iter().map(|(k, _)| k.clone()).collect();
    keys.sort();
    assert_eq!(keys, ids, "each message carries its id as Idempotency-Key");
    let grant = got
        .iter()
        .find(|(_, m)| m["topic"] == "auth.grant")
        .expect("the grant was delivered");
    assert_eq!(grant.1["payload"]["user_id"], user.to_string());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_never_gets_through_ends_up_dead() {
    let env = Env::start().await;
    env.subscribe(Uuid::new_v4(), CARD_OK).await;
    let (url, _) = flaky_target(usize::MAX).await;
    let target = HttpTarget::new(&url).unwrap();
    for _ in 0..MAX_ATTEMPTS {
        outbox::deliver_due(&env.billing, &target, 100)
            .await
            .unwrap();
        env.clock.advance(chrono::Duration::hours(7));
    }
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM outbox WHERE status = 'dead'")
            .await,
        2
    );
    let last_error = sqlx::query_scalar::<_, String>("SELECT last_error FROM outbox LIMIT 1")
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert!(last_error.contains("503"), "{last_error}");
    env.stop().await;
}

/// A target that fails the first delivery of each `auth.revoke`, and records every message it
/// accepted in order of arrival.
async fn revoke_failing_target() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let failed = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
    let app = {
        let got = got.clone();
        Router::new().route(
            "/outbox",
            post(move |body: axum::Json<Value>| {
                let (got, failed) = (got.clone(), failed.clone());
                async move {
                    let id = body.0["id"].as_str().unwrap_or_default().to_owned();
                    if body.0["topic"] == "auth.revoke" && failed.lock().unwrap().insert(id) {
                        return StatusCode::SERVICE_UNAVAILABLE;
                    }
                    got.lock().unwrap().push(body.0);
                    StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/outbox"), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_revoke_never_lands_after_the_next_grant() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    // The first subscription ends (cancelled, period over) and the user subscribes again: a grant,
    // a revoke and a new grant, in that order.
    env.service.cancel(user, None).await.unwrap();
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() + chrono::Duration::minutes(1));
    env.run::<billing_tasks::tasks::ExpireSubscriptions>(())
        .await;
    env.subscribe(user, CARD_OK).await;

    let (url, got) = revoke_failing_target().await;
    let target = HttpTarget::new(&url).unwrap();
    for _ in 0..10 {
        outbox::deliver_due(&env.billing, &target, 100)
            .await
            .unwrap();
        if env
            .scalar_i64("SELECT count(*) FROM outbox WHERE status <> 'delivered'")
            .await
            == 0
        {
            break;
        }
        env.clock.advance(chrono::Duration::minutes(1));
    }
    let roles: Vec<(String, i64)> = got
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m["topic"].as_str().unwrap().starts_with("auth."))
        .map(|m| {
            (
                m["topic"].as_str().unwrap().to_owned(),
                m["user_seq"]
                    .as_i64()
                    .expect("a role message carries user_seq"),
            )
        })
        .collect();
    let topics: Vec<&str> = roles.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        ["auth.grant", "auth.revoke", "auth.grant"],
        "role messages arrive in the order they were written"
    );
    assert!(
        roles.windows(2).all(|w| w[0].1 < w[1].1),
        "user_seq increases: {roles:?}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_outbox_url_the_task_keeps_messages_pending() {
    let env = Env::start().await;
    env.subscribe(Uuid::new_v4(), CARD_OK).await;
    let report = env.run::<billing_tasks::tasks::DeliverOutbox>(()).await;
    assert_eq!(report, outbox::DeliveryReport::default());
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM outbox WHERE status = 'pending' AND attempts = 0")
            .await,
        2,
        "kept, untouched, for when OUTBOX_URL is set"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deliver_outbox_task_posts_to_the_outbox_url() {
    let (url, got) = flaky_target(0).await;
    let env = Env::start_with(Options {
        outbox_url: Some(url),
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let report = env.run::<billing_tasks::tasks::DeliverOutbox>(()).await;
    assert_eq!((report.delivered, report.retrying, report.dead), (2, 0, 0));
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM outbox WHERE status = 'delivered'")
            .await,
        2
    );
    let got = got.lock().unwrap().clone();
    assert!(
        got.iter().any(|(_, m)| m["topic"] == "auth.grant"
            && m["payload"]["user_id"] == user.to_string()
            && m["user_seq"].as_i64().is_some()),
        "{got:?}"
    );
    env.stop().await;
}
