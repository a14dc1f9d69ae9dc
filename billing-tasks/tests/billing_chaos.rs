//! Exactly-once charging under duplicates, timeouts and gateway errors: in every case each invoice
//! is charged at most once (the fake gateway's counter) and the ledger agrees with the gateway.

mod billing_support;

use std::time::Duration;

use billing_support::*;
use billing_tasks::cloudpayments::fake::{FakeConfig, Fault, TerminalConfig};
use billing_tasks::domain::PaymentStatus;
use billing_tasks::renewals;
use billing_tasks::tasks::{ChargeInvoice, EnqueueRenewals, InvoiceArgs};
use uuid::Uuid;

async fn subscribers(env: &Env, n: usize) -> Vec<Uuid> {
    let mut users = Vec::new();
    for _ in 0..n {
        let user = Uuid::new_v4();
        env.subscribe(user, CARD_OK).await;
        users.push(user);
    }
    users
}

async fn all_renewals_paid(env: &Env, n: i64, within: Duration) {
    eventually("every renewal invoice paid", within, || async {
        let paid = env
            .scalar_i64("SELECT count(*) FROM invoice WHERE kind = 'renewal' AND status = 'paid'")
            .await;
        (paid == n).then_some(())
    })
    .await;
}

/// The seed of the fake's random faults: `BILLING_CHAOS_SEED` to replay a failed run, else a
/// fresh one; printed either way (the test output shows it when the test fails).
fn fault_seed() -> u64 {
    let seed = std::env::var("BILLING_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("fake gateway fault seed: {seed} (replay with BILLING_CHAOS_SEED={seed})");
    seed
}

fn with_latency(latency: Duration) -> Options {
    Options {
        fake: FakeConfig::default()
            .with_terminals(vec![
                TerminalConfig::production(PUBLIC_ID, API_SECRET).with_concurrency_limit(64),
            ])
            .with_latency(latency)
            .with_hang(Duration::from_secs(3))
            .with_fault_seed(fault_seed()),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_renewal_delivered_twice_at_once_is_charged_once() {
    let env = Env::start_with(with_latency(Duration::from_millis(200))).await;
    let users = subscribers(&env, 8).await;
    let (_, _, end) = env.subscription_of(users[0]).await;
    env.clock.set(end.unwrap() - chrono::Duration::hours(1));
    // Invoices created directly (no tasks), then every charge task sent twice at once.
    let invoices = renewals::create_renewal_invoices(&env.billing)
        .await
        .unwrap();
    assert_eq!(invoices.len(), users.len());
    let mut sends = Vec::new();
    for &invoice_id in &invoices {
        for _ in 0..2 {
            sends.push(
                env.tasks
                    .task::<ChargeInvoice>(InvoiceArgs { invoice_id })
                    .queue(&env.queue)
                    .send(),
            );
        }
    }
    for r in futures_util::future::join_all(sends).await {
        r.unwrap();
    }
    all_renewals_paid(&env, invoices.len() as i64, Duration::from_secs(60)).await;
    for invoice in &invoices {
        assert_eq!(
            env.fake.charges_for_invoice(&invoice.to_string()),
            1,
            "invoice {invoice}"
        );
    }
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM payment p JOIN invoice i ON i.id = p.invoice_id WHERE i.kind = 'renewal'").await,
        invoices.len() as i64,
        "one attempt per invoice: the duplicate found the work in progress or done"
    );
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_server_errors_during_a_renewal_run_never_charge_twice() {
    let env = Env::start_with(with_latency(Duration::from_millis(20))).await;
    let users = subscribers(&env, 20).await;
    let (_, _, end) = env.subscription_of(users[0]).await;
    env.clock.set(end.unwrap() - chrono::Duration::hours(1));

    let path = Some("/payments/tokens/charge");
    for (fault, p) in [
        (Fault::TimeoutAfterProcessing, 0.15),
        (Fault::ServerErrorAfterProcessing(502), 0.1),
        (Fault::ServerErrorBeforeProcessing(503), 0.05),
        (Fault::TimeoutBeforeProcessing, 0.05),
        (Fault::TooManyRequests { retry_after: None }, 0.05),
    ] {
        env.fake.set_fault_probability(path, fault, p);
    }
    // At least one call certainly needs sending again, whatever the random draws.
    env.fake
        .push_fault_for("/payments/tokens/charge", Fault::TimeoutBeforeProcessing);
    let out = env.run::<EnqueueRenewals>(()).await;
    assert_eq!(out["invoices"], 20);
    all_renewals_paid(&env, 20, Duration::from_secs(120)).await;
    env.fake.clear_faults();
    let renewal_calls = env.fake.requests("/payments/tokens/charge");
    assert!(
        renewal_calls > 20,
        "faults forced replays: {renewal_calls} calls for 20 invoices"
    );
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_payment_whose_answer_was_lost_is_found_at_the_gateway() {
    // Without notifications: the gateway's Pay would otherwise settle it before any lookup, and a
    // broken lookup would go unnoticed.
    let env = Env::start_with(Options {
        webhooks: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    env.fake
        .push_fault_for("/payments/cards/charge", Fault::TimeoutAfterProcessing);
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_OK))
        .await
        .unwrap();
    // The charge happened at the gateway; the worker timed out and does not know.
    let invoice = env.invoice_ids(user, "initial").await[0];
    eventually("the gateway to charge", Duration::from_secs(10), || async {
        (env.fake.charges_for_invoice(&invoice.to_string()) == 1).then_some(())
    })
    .await;
    let p = eventually(
        "the attempt to be found at the gateway",
        Duration::from_secs(60),
        || async {
            let p = env.service.get_payment(user, p.id).await.unwrap();
            (p.status == PaymentStatus::Succeeded).then_some(p)
        },
    )
    .await;
    assert_eq!(p.amount.minor, 29_900);
    assert_eq!(env.fake.charges_for_invoice(&invoice.to_string()), 1);
    let settled_by = sqlx::query_scalar::<_, String>(
        "SELECT actor FROM status_history WHERE entity = 'payment' AND entity_id = $1 AND to_status = 'succeeded'",
    )
    .bind(p.id)
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(settled_by, "worker", "the lookup settled it");
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM payment WHERE cryptogram IS NOT NULL")
            .await,
        0
    );
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}
