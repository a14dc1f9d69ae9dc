//! The ledger gauges `billing-api` serves on `/metrics`, read from a real PostgreSQL ledger: zeros
//! before anything is wrong, then a stuck payment, an unmatched notification, a reconciliation
//! finding and a dead outbox message each show; a database that stops answering keeps the last
//! values and says so.

mod billing_support;

use std::time::Duration;

use billing_support::*;
use billing_tasks::ledger_metrics::LedgerMetrics;
use prometheus_client::registry::Registry;
use uuid::Uuid;

fn exposition(registry: &Registry) -> String {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry).unwrap();
    body
}

/// The value of the sample line starting with `series ` (name and labels exactly).
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {series} in\n{body}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_payments_unmatched_notifications_findings_and_dead_messages_show_as_gauges() {
    let env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    let mut registry = Registry::default();
    let ledger =
        LedgerMetrics::register_with_interval(&mut registry, env.db.clone(), Duration::ZERO);

    ledger.refresh().await;
    let body = exposition(&registry);
    assert_eq!(value(&body, "billing_ledger_metrics_up"), 1.0);
    for status in ["created", "processing", "awaiting_3ds"] {
        let s = format!("billing_payments_in_flight{{status=\"{status}\"}}");
        assert_eq!(value(&body, &s), 0.0, "{s}");
    }
    assert_eq!(value(&body, "billing_gateway_notifications_unmatched"), 0.0);
    assert_eq!(
        value(
            &body,
            "billing_reconciliation_mismatches{kind=\"payment_amount_differs\"}"
        ),
        0.0
    );
    assert_eq!(value(&body, "billing_outbox_dead_messages"), 0.0);

    // A payment whose gateway call began two hours ago and never settled.
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_OK))
        .await
        .unwrap();
    env.mark_processing(p.id, chrono::Duration::hours(2)).await;
    sqlx::query(
        "INSERT INTO gateway_event (kind, gateway_transaction_id, payload, received_at, processed_at, outcome)
         VALUES ('pay', 987654, '{}', now(), now(), 'unmatched'),
                ('pay', 987655, '{}', now() - interval '2 days', now(), 'unmatched')",
    )
    .execute(&env.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO reconciliation_finding (day, kind, gateway_transaction_id, amount_minor, currency, detail, found_at)
         VALUES (current_date - 1, 'payment_amount_differs', 123, 29900, 'RUB', 'test', now())",
    )
    .execute(&env.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (id, topic, dedupe_key, payload, status, attempts, next_attempt_at, created_at)
         VALUES ($1, 'auth.role_granted', $2, '{}', 'dead', 12, now(), now() - interval '1 hour')",
    )
    .bind(Uuid::now_v7())
    .bind(format!("test:{}", Uuid::new_v4()))
    .execute(&env.db)
    .await
    .unwrap();

    ledger.refresh().await;
    let body = exposition(&registry);
    assert_eq!(
        value(&body, "billing_payments_in_flight{status=\"processing\"}"),
        1.0
    );
    let age = value(
        &body,
        "billing_payment_oldest_in_flight_age_seconds{status=\"processing\"}",
    );
    assert!((7_190.0..7_300.0).contains(&age), "age {age}");
    // The one of two days ago is outside the 24 hours.
    assert_eq!(value(&body, "billing_gateway_notifications_unmatched"), 1.0);
    assert_eq!(
        value(
            &body,
            "billing_reconciliation_mismatches{kind=\"payment_amount_differs\"}"
        ),
        1.0
    );
    assert_eq!(value(&body, "billing_outbox_dead_messages"), 1.0);

    // The database goes away: the last values stay, and `up` says they are stale.
    env.db.close().await;
    ledger.refresh().await;
    let body = exposition(&registry);
    assert_eq!(value(&body, "billing_ledger_metrics_up"), 0.0);
    assert_eq!(
        value(&body, "billing_payments_in_flight{status=\"processing\"}"),
        1.0
    );
    println!("stuck payment {age:.0} s old, 1 unmatched notification, 1 finding, 1 dead message");
    drop_database(&env.db_name).await;
}
