//! UpdatePaymentMethod on a healthy subscription (nothing due), against real PostgreSQL, RabbitMQ,
//! Redis and the fake gateway over HTTP: the new card is proved by an authorisation that is voided
//! (the fake's books show nothing taken), becomes the card the next renewal charges, and a
//! declined card leaves the old one in place. Lost answers are looked up, never guessed.

mod billing_support;

use std::time::Duration;

use billing_support::*;
use billing_tasks::cloudpayments::TransactionStatus;
use billing_tasks::cloudpayments::fake::{self, FakeTransaction, Fault, TransactionKind};
use billing_tasks::domain::{PaymentStatus, SubscriptionStatus};
use billing_tasks::secret::Secret;
use billing_tasks::service::{PaymentView, UpdatePaymentMethod};
use billing_tasks::tasks::EnqueueRenewals;
use uuid::Uuid;

/// A card that needs no 3-D Secure and whose token renews (unlike CARD_TOKEN_NSF's).
const NEW_CARD: &str = "5205000000003055";

fn update(user: Uuid, pan: &str) -> UpdatePaymentMethod {
    UpdatePaymentMethod {
        user_id: user,
        cryptogram: Secret::new(fake::test_cryptogram(pan, EXP)),
        cardholder_name: Some("IVAN IVANOV".into()),
        ip_address: "203.0.113.7".into(),
        idempotency_key: Uuid::new_v4().to_string(),
    }
}

/// The fake's operations with this InvoiceId.
fn gateway_ops(env: &Env, invoice_id: Uuid) -> Vec<FakeTransaction> {
    env.fake
        .transactions()
        .into_iter()
        .filter(|t| t.invoice_id.as_deref() == Some(invoice_id.to_string().as_str()))
        .collect()
}

async fn hold_status(env: &Env, id: Uuid) -> Option<String> {
    sqlx::query_scalar::<_, String>("SELECT status FROM card_hold WHERE id = $1")
        .bind(id)
        .fetch_optional(&env.db)
        .await
        .unwrap()
}

async fn wait_released(env: &Env, id: Uuid) {
    eventually(
        "the card check's hold to be released",
        Duration::from_secs(30),
        || async { (hold_status(env, id).await.as_deref() == Some("released")).then_some(()) },
    )
    .await;
}

async fn history(env: &Env, entity: &str, id: Uuid) -> Vec<String> {
    sqlx::query_as::<_, (Option<String>, String)>(
        "SELECT from_status, to_status FROM status_history WHERE entity = $1 AND entity_id = $2 ORDER BY id",
    )
    .bind(entity)
    .bind(id)
    .fetch_all(&env.db)
    .await
    .unwrap()
    .into_iter()
    .map(|(from, to)| format!("{}->{to}", from.unwrap_or_default()))
    .collect()
}

/// The gateway holds no money for this check: its one operation is a cancelled authorisation.
fn assert_nothing_taken(env: &Env, check: &PaymentView) {
    let ops = gateway_ops(env, check.id);
    assert_eq!(ops.len(), 1, "one authorisation for the check: {ops:?}");
    assert_eq!(ops[0].kind, TransactionKind::Payment);
    assert_eq!(
        ops[0].status,
        TransactionStatus::Cancelled,
        "the authorisation is voided: {ops:?}"
    );
    assert_eq!(ops[0].amount.minor, 100, "1.00 authorised, never captured");
    assert_eq!(ops[0].refunded.minor, 0);
}

/// Moves the clock to just before the period ends, runs the renewal job, waits for the invoice.
async fn renew_and_wait(env: &Env, user: Uuid, status: &str) -> Uuid {
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() - chrono::Duration::hours(12));
    let out = env.run::<EnqueueRenewals>(()).await;
    assert_eq!(out["invoices"], 1, "{out}");
    let invoice = *env.invoice_ids(user, "renewal").await.last().unwrap();
    eventually(
        &format!("renewal invoice {invoice} to be {status}"),
        Duration::from_secs(30),
        || async { (env.invoice_status(invoice).await == status).then_some(()) },
    )
    .await;
    invoice
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_card_on_a_healthy_subscription_is_checked_voided_and_renews_it() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    // The old card approves once and then declines every renewal: only the new card can renew.
    env.subscribe(user, CARD_TOKEN_NSF).await;
    let old_mask = env.service.get_subscription(user).await.unwrap().card_mask;

    let req = update(user, NEW_CARD);
    let check = env
        .service
        .update_payment_method(req.clone())
        .await
        .unwrap();
    assert_eq!(check.amount.minor, 100);
    let check = env.settled(user, check.id).await;
    assert_eq!(check.status, PaymentStatus::Succeeded, "{check:?}");
    let s = env.service.get_subscription(user).await.unwrap();
    assert_eq!(s.status, SubscriptionStatus::Active);
    assert_eq!(s.card_mask.as_deref(), Some("520500******3055"));
    assert_ne!(s.card_mask, old_mask);

    wait_released(&env, check.id).await;
    assert_nothing_taken(&env, &check);
    println!(
        "card check {}: {:?}; hold {:?}",
        check.id,
        history(&env, "card_check", check.id).await,
        history(&env, "card_hold", check.id).await
    );
    assert_eq!(
        history(&env, "card_check", check.id).await,
        ["->created", "created->processing", "processing->succeeded"]
    );
    assert_eq!(
        history(&env, "card_hold", check.id).await,
        ["->held", "held->released"]
    );
    // Not a receipt: the payer's payments are still just the first one.
    assert_eq!(
        env.service
            .list_payments(user, 20, None)
            .await
            .unwrap()
            .len(),
        1
    );

    // The same key answers the same check, and nothing more reaches the gateway.
    let before = env.fake.transaction_count();
    let again = env.service.update_payment_method(req).await.unwrap();
    assert_eq!(again.id, check.id);
    assert_eq!(again.status, PaymentStatus::Succeeded);
    assert_eq!(env.fake.transaction_count(), before);

    // The next renewal charges the new card's token (the old one would be declined).
    let invoice = renew_and_wait(&env, user, "paid").await;
    let charged = gateway_ops(&env, invoice);
    assert_eq!(charged.len(), 1, "{charged:?}");
    assert_eq!(charged[0].status, TransactionStatus::Completed);
    assert_eq!(charged[0].card_last_four.as_deref(), Some("3055"));
    let new_method: Uuid =
        sqlx::query_scalar("SELECT payment_method_id FROM card_check WHERE id = $1")
            .bind(check.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
    let used: Option<Uuid> = sqlx::query_scalar(
        "SELECT payment_method_id FROM payment WHERE invoice_id = $1 AND status = 'succeeded'",
    )
    .bind(invoice)
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(used, Some(new_method), "the renewal used the new card");
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_new_card_leaves_the_old_card_in_place() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let method_before: Option<Uuid> =
        sqlx::query_scalar("SELECT payment_method_id FROM subscription WHERE payer_id = $1")
            .bind(user)
            .fetch_one(&env.db)
            .await
            .unwrap();

    let check = env
        .service
        .update_payment_method(update(user, CARD_NSF))
        .await
        .unwrap();
    let check = env.settled(user, check.id).await;
    println!(
        "declined check: {:?} reason {:?} {:?}",
        check.status, check.reason_code, check.card_holder_message
    );
    assert_eq!(check.status, PaymentStatus::Declined, "{check:?}");
    assert!(check.reason_code.is_some_and(|c| c != 0));
    let s = env.service.get_subscription(user).await.unwrap();
    assert_eq!(s.card_mask.as_deref(), Some("400000******3055"));
    let method_after: Option<Uuid> =
        sqlx::query_scalar("SELECT payment_method_id FROM subscription WHERE payer_id = $1")
            .bind(user)
            .fetch_one(&env.db)
            .await
            .unwrap();
    assert_eq!(method_after, method_before);
    assert_eq!(
        hold_status(&env, check.id).await,
        None,
        "a decline holds nothing"
    );
    assert_eq!(
        history(&env, "card_check", check.id).await,
        ["->created", "created->processing", "processing->declined"]
    );
    // The renewal still charges the old card.
    let invoice = renew_and_wait(&env, user, "paid").await;
    let charged = gateway_ops(&env, invoice);
    assert_eq!(charged[0].card_last_four.as_deref(), Some("3055"));
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_card_through_3ds_is_adopted_after_the_answer() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let check = env
        .service
        .update_payment_method(update(user, "5555555555554444"))
        .await
        .unwrap();
    let check = env.settled(user, check.id).await;
    assert_eq!(check.status, PaymentStatus::AwaitingThreeDs);
    let challenge = check.challenge.expect("a 3-D Secure challenge");
    // Until the payer answers, the old card stays.
    assert_eq!(
        env.service
            .get_subscription(user)
            .await
            .unwrap()
            .card_mask
            .as_deref(),
        Some("400000******3055")
    );
    env.service
        .complete_3ds(
            user,
            check.id,
            challenge.transaction_id,
            Secret::new(fake::PA_RES_OK.into()),
        )
        .await
        .unwrap();
    let done = eventually(
        "the 3-D Secure check to finish",
        Duration::from_secs(30),
        || async {
            let p = env.service.get_payment(user, check.id).await.unwrap();
            p.status.is_final().then_some(p)
        },
    )
    .await;
    assert_eq!(done.status, PaymentStatus::Succeeded, "{done:?}");
    assert_eq!(
        env.service
            .get_subscription(user)
            .await
            .unwrap()
            .card_mask
            .as_deref(),
        Some("555555******4444")
    );
    wait_released(&env, check.id).await;
    assert_nothing_taken(&env, &done);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_authorisation_answer_is_looked_up_and_a_lost_void_is_recovered() {
    // No notifications: only the worker's own lookup (`payments/find`) can learn the outcome.
    let env = Env::start_with(Options {
        webhooks: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    // The authorisation happens but its answer is lost; then the void's answer is lost too.
    env.fake
        .push_fault_for("/payments/cards/auth", Fault::TimeoutAfterProcessing);
    env.fake
        .push_fault_for("/payments/void", Fault::SERVER_ERROR_AFTER);
    let check = env
        .service
        .update_payment_method(update(user, NEW_CARD))
        .await
        .unwrap();
    let done = eventually(
        "the lost check to be looked up",
        Duration::from_secs(60),
        || async {
            let p = env.service.get_payment(user, check.id).await.unwrap();
            p.status.is_final().then_some(p)
        },
    )
    .await;
    assert_eq!(done.status, PaymentStatus::Succeeded, "{done:?}");
    assert!(
        env.fake.requests("/payments/find") >= 1,
        "the outcome was looked up"
    );
    wait_released(&env, check.id).await;
    assert_nothing_taken(&env, &done);
    assert_eq!(
        env.service
            .get_subscription(user)
            .await
            .unwrap()
            .card_mask
            .as_deref(),
        Some("520500******3055")
    );

    // A void that never reached the gateway: the hold stays held until a void gets through.
    let user2 = Uuid::new_v4();
    env.subscribe(user2, CARD_OK).await;
    for _ in 0..3 {
        env.fake
            .push_fault_for("/payments/void", Fault::SERVER_ERROR_BEFORE);
    }
    let check2 = env
        .service
        .update_payment_method(update(user2, NEW_CARD))
        .await
        .unwrap();
    let check2 = env.settled(user2, check2.id).await;
    assert_eq!(check2.status, PaymentStatus::Succeeded);
    // Each refused void leaves the hold held (the gateway still shows it authorised); the next
    // release (the task's retry, a crashed worker's successor, the reconciler) voids it.
    while env.fake.pending_faults() > 0 {
        let wait = billing_tasks::card_check::release_hold(&env.billing, check2.id)
            .await
            .unwrap();
        if env.fake.pending_faults() > 0 {
            assert!(wait.is_some(), "a refused void is tried again");
            assert_eq!(hold_status(&env, check2.id).await.as_deref(), Some("held"));
        }
    }
    assert_eq!(
        billing_tasks::card_check::release_hold(&env.billing, check2.id)
            .await
            .unwrap(),
        None
    );
    wait_released(&env, check2.id).await;
    assert_eq!(
        billing_tasks::card_check::release_hold(&env.billing, check2.id)
            .await
            .unwrap(),
        None
    );
    assert_nothing_taken(&env, &check2);
    assert_eq!(
        history(&env, "card_hold", check2.id).await,
        ["->held", "held->released"]
    );
    env.stop().await;
}
