//! The daily reconciliation: the gateway's operations of a day against the ledger, both ways.

mod billing_support;

use billing_support::*;
use billing_tasks::cloudpayments::fake;
use billing_tasks::cloudpayments::{self, ChargeOutcome, CryptogramCharge};
use billing_tasks::money::{Currency, Money};
use billing_tasks::secret::Secret;
use billing_tasks::tasks::{DayArgs, ReconcileDay};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mismatch_between_the_gateway_and_the_ledger_is_recorded_once() {
    // Without notifications, so the gateway does not ask our Check about the widget payment.
    let env = Env::start_with(Options {
        webhooks: false,
        ..Options::default()
    })
    .await;
    // Matching books: a paid subscription.
    env.subscribe(Uuid::new_v4(), CARD_OK).await;
    // A ledger success whose transaction id points nowhere: the gateway does not have that one,
    // and the ledger does not know the one the gateway made.
    let ghost = env.subscribe(Uuid::new_v4(), CARD_OK).await;
    let real =
        sqlx::query_scalar::<_, i64>("SELECT gateway_transaction_id FROM payment WHERE id = $1")
            .bind(ghost.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
    sqlx::query("UPDATE payment SET gateway_transaction_id = 999999999 WHERE id = $1")
        .bind(ghost.id)
        .execute(&env.db)
        .await
        .unwrap();
    // Money taken at the gateway that the ledger knows nothing of (paid through the widget).
    let client = cloudpayments::Client::new(env.fake.client_config()).unwrap();
    let widget = client
        .charge_cryptogram(
            &CryptogramCharge {
                amount: Money::new(10_000, Currency::RUB).unwrap(),
                ip_address: "203.0.113.9".parse().unwrap(),
                cryptogram: Secret::new(fake::test_cryptogram(CARD_OK, EXP)),
                name: None,
                invoice_id: format!("widget-{}", Uuid::new_v4()),
                account_id: "someone".into(),
                description: None,
                email: None,
                save_card: false,
            },
            &Uuid::new_v4().to_string(),
        )
        .await
        .unwrap();
    let ChargeOutcome::Approved(widget) = widget else {
        panic!("the widget payment is approved: {widget:?}")
    };

    let day = chrono::Utc::now().date_naive();
    let report = env.run::<ReconcileDay>(DayArgs { day: Some(day) }).await;
    assert_eq!(report.mismatches, 3, "{report:?}");
    assert_eq!(report.new_findings, 3);
    let findings = sqlx::query_as::<_, (String, Option<i64>)>(
        "SELECT kind, gateway_transaction_id FROM reconciliation_finding ORDER BY kind, gateway_transaction_id",
    )
    .fetch_all(&env.db)
    .await
    .unwrap();
    assert_eq!(
        findings,
        vec![
            ("payment_missing_at_gateway".to_owned(), Some(999_999_999)),
            ("payment_unknown_to_ledger".to_owned(), Some(real)),
            (
                "payment_unknown_to_ledger".to_owned(),
                Some(widget.transaction_id)
            ),
        ]
    );
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM outbox WHERE dedupe_key LIKE 'accounting:reconciliation:%'"
        )
        .await,
        3
    );
    // Again: the same mismatches, nothing recorded twice.
    let again = env.run::<ReconcileDay>(DayArgs { day: Some(day) }).await;
    assert_eq!((again.mismatches, again.new_findings), (3, 0));
    env.stop().await;
}
