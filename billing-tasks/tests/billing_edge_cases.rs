//! Races and late news that must leave the ledger consistent and nothing stuck.

mod billing_support;

use billing_support::*;
use billing_tasks::charging::{self, Outcome};
use billing_tasks::cloudpayments::fake::Fault;
use billing_tasks::cloudpayments::{CardInfo, ReasonCode, Transaction, TransactionStatus};
use billing_tasks::domain::{PaymentStatus, SubscriptionStatus};
use billing_tasks::ledger::{Actor, topic};
use billing_tasks::money::{Currency, Money};
use billing_tasks::tasks::EnqueueRenewals;
use chrono::Duration;
use uuid::Uuid;

/// A gateway transaction of 299.00 for `payer`, as the gateway reports one.
fn txn(id: i64, status: TransactionStatus, code: i32, payer: Uuid) -> Transaction {
    Transaction {
        transaction_id: id,
        amount: Money::new(29_900, Currency::RUB).unwrap(),
        invoice_id: None,
        account_id: Some(payer.to_string()),
        email: None,
        description: None,
        status,
        reason_code: ReasonCode(code),
        reason: None,
        card_holder_message: None,
        card: CardInfo {
            first_six: None,
            last_four: None,
            card_type: None,
            exp_date: None,
        },
        token: None,
        auth_code: None,
        test_mode: true,
        refunded: false,
        original_transaction_id: None,
        created_at: None,
    }
}

/// An extra attempt on `invoice`, as a worker that gave up on it would have left it.
async fn given_up_attempt(env: &Env, invoice: Uuid, status: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO payment (id, invoice_id, attempt, method, status, amount_minor, currency, idempotency_key, sent_at, created_at, updated_at)
         VALUES ($1, $2, 99, 'token', $3, 29900, 'RUB', $4, now(), now(), now())",
    )
    .bind(id)
    .bind(invoice)
    .bind(status)
    .bind(id.to_string())
    .execute(&env.db)
    .await
    .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_second_success_for_a_paid_invoice_is_recorded_and_refunded() {
    let env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    // A paid initial invoice, without running the worker: settle the first attempt by hand.
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_OK))
        .await
        .unwrap();
    env.mark_processing(p.id, Duration::zero()).await;
    charging::settle(
        &env.billing,
        p.id,
        Outcome::Approved(txn(7_000_000_001, TransactionStatus::Completed, 0, user)),
        Actor::Worker,
    )
    .await
    .unwrap();
    let invoice = env.invoice_ids(user, "initial").await[0];
    let late = given_up_attempt(&env, invoice, "failed").await;

    let status = charging::settle(
        &env.billing,
        late,
        Outcome::Approved(txn(7_000_000_002, TransactionStatus::Completed, 0, user)),
        Actor::Webhook,
    )
    .await
    .unwrap();
    assert_eq!(status, PaymentStatus::Succeeded);
    let duplicate: bool = sqlx::query_scalar("SELECT duplicate FROM payment WHERE id = $1")
        .bind(late)
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert!(duplicate, "the second success is marked as a duplicate");
    let refunds: Vec<(String, i64)> =
        sqlx::query_as("SELECT requested_by, amount_minor FROM refund WHERE payment_id = $1")
            .bind(late)
            .fetch_all(&env.db)
            .await
            .unwrap();
    assert_eq!(refunds, vec![("system".to_owned(), 29_900)]);
    assert_eq!(env.outbox(topic::ACCOUNTING_ATTENTION).await.len(), 1);
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Active
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decline_arriving_after_the_invoice_was_voided_settles_only_the_attempt() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() - Duration::hours(1));
    let invoices = billing_tasks::renewals::create_renewal_invoices(&env.billing)
        .await
        .unwrap();
    let attempt = given_up_attempt(&env, invoices[0], "processing").await;
    sqlx::query(
        "WITH i AS (UPDATE invoice SET status = 'void' WHERE id = $1 RETURNING id)
         INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, at)
         SELECT 'invoice', id, 'open', 'void', 'worker', now() FROM i",
    )
    .bind(invoices[0])
    .execute(&env.db)
    .await
    .unwrap();

    let status = charging::settle(
        &env.billing,
        attempt,
        Outcome::Declined(txn(7_000_000_003, TransactionStatus::Declined, 5051, user)),
        Actor::Webhook,
    )
    .await
    .expect("settling does not fail on a voided invoice");
    assert_eq!(status, PaymentStatus::Declined);
    assert_eq!(env.invoice_status(invoices[0]).await, "void");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_after_a_cancel_brings_back_the_voided_renewal() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let (_, _, end) = env.subscription_of(user).await;
    env.fake
        .push_fault_for("/payments/tokens/charge", Fault::Decline(ReasonCode(5051)));
    env.clock.set(end.unwrap() - Duration::hours(12));
    env.run::<EnqueueRenewals>(()).await;
    let invoice = env.invoice_ids(user, "renewal").await[0];
    eventually(
        "the declined renewal attempt",
        std::time::Duration::from_secs(20),
        || async {
            (env.scalar_i64("SELECT count(*) FROM payment WHERE status = 'declined'")
                .await
                == 1)
                .then_some(())
        },
    )
    .await;

    env.service.cancel(user, None).await.unwrap();
    assert_eq!(env.invoice_status(invoice).await, "void");
    let s = env.service.resume(user).await.unwrap();
    assert!(s.auto_renew);
    eventually(
        "the reopened renewal to be paid",
        std::time::Duration::from_secs(20),
        || async { (env.invoice_status(invoice).await == "paid").then_some(()) },
    )
    .await;
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Active
    );
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

/// Starts a renewal charge while `change` (a cancel or an expiry, as its own transaction would
/// write it) holds the subscription's row lock, lets the change commit, and returns how often the
/// gateway charged the renewal.
async fn charge_during(env: &Env, user: Uuid, change: &'static str) -> u32 {
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() - Duration::hours(12));
    let invoice = billing_tasks::renewals::create_renewal_invoices(&env.billing)
        .await
        .unwrap()[0];
    let mut tx = env.db.begin().await.unwrap();
    sqlx::query("SELECT id FROM subscription WHERE payer_id = $1 FOR UPDATE")
        .bind(user)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(change))
        .bind(user)
        .execute(&mut *tx)
        .await
        .unwrap();
    let billing = env.billing.clone();
    let run =
        tokio::spawn(
            async move { billing_tasks::renewals::charge_invoice(&billing, invoice).await },
        );
    // The charge either reached the gateway already or waits for the change to commit.
    eventually(
        "the charge to reach the gateway or wait for the lock",
        std::time::Duration::from_secs(20),
        || async {
            let waiting = env
                .scalar_i64(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .await;
            (waiting > 0 || env.fake.requests("/payments/tokens/charge") > 0).then_some(())
        },
    )
    .await;
    tx.commit().await.unwrap();
    run.await
        .unwrap()
        .expect("the charge run ends without an error");
    env.fake.charges_for_invoice(&invoice.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_is_not_charged_once_the_user_cancelled() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let charges = charge_during(
        &env,
        user,
        "UPDATE subscription SET auto_renew = false, canceled_at = now() WHERE payer_id = $1",
    )
    .await;
    assert_eq!(charges, 0, "the card was charged after the user cancelled");
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM payment WHERE status = 'processing'")
            .await,
        0
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_is_not_charged_once_the_subscription_expired() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let charges = charge_during(
        &env,
        user,
        "WITH s AS (UPDATE subscription SET status = 'expired' WHERE payer_id = $1 RETURNING id)
         INSERT INTO status_history (entity, entity_id, from_status, to_status, actor, at)
         SELECT 'subscription', id, 'active', 'expired', 'worker', now() FROM s",
    )
    .await;
    assert_eq!(charges, 0, "the card was charged after expiry");
    env.stop().await;
}
