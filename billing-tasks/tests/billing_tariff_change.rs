//! ChangeTariff: the switch happens at the next renewal, whose invoice takes the new tariff's price
//! and period (migration 0007), and the period after it renews on the new tariff.

mod billing_support;

use std::time::Duration;

use billing_support::*;
use billing_tasks::tasks::EnqueueRenewals;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tariff_change_applies_from_the_next_period() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let s = env.service.change_tariff(user, "yearly").await.unwrap();
    assert_eq!(s.tariff, "monthly", "the paid period keeps its tariff");
    assert_eq!(
        env.service.next_tariff(s.id).await.unwrap().as_deref(),
        Some("yearly")
    );
    let err = env
        .service
        .change_tariff(user, "no-such")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");

    let (_, _, end) = env.subscription_of(user).await;
    let end = end.unwrap();
    env.clock.set(end - chrono::Duration::hours(12));
    let out = env.run::<EnqueueRenewals>(()).await;
    assert_eq!(out["invoices"], 1, "{out}");
    let invoice = *env.invoice_ids(user, "renewal").await.last().unwrap();
    let (amount, start, stop): (
        i64,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as("SELECT amount_minor, period_start, period_end FROM invoice WHERE id = $1")
        .bind(invoice)
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(amount, 299000, "the yearly price");
    assert_eq!(start, end);
    assert!(
        stop - start >= chrono::Duration::days(365),
        "a year: {start} .. {stop}"
    );
    eventually(
        "the renewal to be paid",
        Duration::from_secs(30),
        || async { (env.invoice_status(invoice).await == "paid").then_some(()) },
    )
    .await;
    let s = env.service.get_subscription(user).await.unwrap();
    assert_eq!(s.tariff, "yearly");
    assert_eq!(s.current_period_end, Some(stop));
    assert_eq!(env.service.next_tariff(s.id).await.unwrap(), None);
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}
