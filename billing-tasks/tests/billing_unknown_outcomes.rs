//! Attempts and refunds whose outcome the worker did not learn: they are settled only from an
//! answer of the gateway, never guessed, and never sent twice while the first may still be running.

mod billing_support;

use billing_support::*;
use billing_tasks::cloudpayments::fake::{FakeConfig, Fault, TerminalConfig};
use billing_tasks::domain::Policy;
use billing_tasks::ledger::topic;
use billing_tasks::tasks::{EnqueueRenewals, ReconcilePayments, RetryDueInvoices};
use chrono::Duration;
use uuid::Uuid;

/// Moves the clock to just before the period ends and runs the renewal job.
async fn renew(env: &Env, user: Uuid) -> Uuid {
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() - Duration::hours(12));
    let out = env.run::<EnqueueRenewals>(()).await;
    assert_eq!(out["invoices"], 1, "{out}");
    *env.invoice_ids(user, "renewal")
        .await
        .last()
        .expect("a renewal invoice")
}

async fn payment_statuses(env: &Env, invoice: Uuid) -> Vec<String> {
    sqlx::query_scalar::<_, String>(
        "SELECT status FROM payment WHERE invoice_id = $1 ORDER BY attempt",
    )
    .bind(invoice)
    .fetch_all(&env.db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_the_gateway_cannot_tell_about_stays_processing_and_is_not_charged_again() {
    // Without notifications: only a lookup can settle the attempt.
    let env = Env::start_with(Options {
        webhooks: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    // The renewal is charged at the gateway but the answer is lost; from then on every replay
    // answers 5xx and every lookup answers something that is not the gateway's JSON.
    env.fake
        .push_fault_for("/payments/tokens/charge", Fault::TimeoutAfterProcessing);
    env.fake.set_fault_probability(
        Some("/payments/tokens/charge"),
        Fault::ServerErrorBeforeProcessing(503),
        1.0,
    );
    env.fake.set_fault_probability(
        Some("/payments/find"),
        Fault::UnparsableBeforeProcessing,
        1.0,
    );
    let invoice = renew(&env, user).await;
    eventually(
        "the gateway to charge",
        std::time::Duration::from_secs(20),
        || async { (env.fake.charges_for_invoice(&invoice.to_string()) == 1).then_some(()) },
    )
    .await;

    // Long past the replay window and any give-up time, with no answer from the gateway.
    env.clock.advance(Duration::minutes(90));
    env.run::<ReconcilePayments>(()).await;
    eventually(
        "accounting to be told about the unresolved attempt",
        std::time::Duration::from_secs(20),
        || async { (!env.outbox(topic::ACCOUNTING_ATTENTION).await.is_empty()).then_some(()) },
    )
    .await;
    assert_eq!(payment_statuses(&env, invoice).await, vec!["processing"]);

    // The dunning ladder makes no new attempt while this one is unresolved.
    env.clock.advance(Duration::hours(2));
    assert_eq!(env.run::<RetryDueInvoices>(()).await["enqueued"], 0);
    env.run::<ReconcilePayments>(()).await;
    assert_eq!(payment_statuses(&env, invoice).await, vec!["processing"]);

    // Once the gateway answers, the lookup finds the charge: paid once, settled by the worker.
    env.fake.clear_faults();
    env.run::<ReconcilePayments>(()).await;
    eventually(
        "the renewal to be paid",
        std::time::Duration::from_secs(30),
        || async { (env.invoice_status(invoice).await == "paid").then_some(()) },
    )
    .await;
    assert_eq!(payment_statuses(&env, invoice).await, vec!["succeeded"]);
    let settled_by = sqlx::query_scalar::<_, String>(
        "SELECT h.actor FROM status_history h JOIN payment p ON p.id = h.entity_id
         WHERE p.invoice_id = $1 AND h.to_status = 'succeeded'",
    )
    .bind(invoice)
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(
        settled_by, "worker",
        "the lookup settled it, not a notification"
    );
    assert_eq!(env.fake.charges_for_invoice(&invoice.to_string()), 1);
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_waits_until_the_gateway_is_done_with_the_first_call() {
    // A gateway that processes a duplicate of a request still in flight again (whether the real
    // one blocks it is not documented), and a first call that takes far longer than the client
    // waits.
    let env = Env::start_with(Options {
        fake: FakeConfig::default()
            .with_terminals(vec![TerminalConfig::production(PUBLIC_ID, API_SECRET)])
            .with_hang(std::time::Duration::from_secs(3))
            .with_in_flight_duplicates_let_through(),
        policy: Policy {
            processing_lease: Duration::seconds(2),
            gateway_max_processing: Duration::seconds(10),
            ..Policy::default()
        },
        webhooks: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    env.fake.push_fault_for(
        "/payments/tokens/charge",
        Fault::SlowProcessing(std::time::Duration::from_secs(6)),
    );
    let invoice = renew(&env, user).await;
    eventually(
        "the renewal to be paid",
        std::time::Duration::from_secs(40),
        || async { (env.invoice_status(invoice).await == "paid").then_some(()) },
    )
    .await;
    eventually(
        "the gateway to finish every call",
        std::time::Duration::from_secs(20),
        || async { (env.fake.in_flight(PUBLIC_ID) == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        env.fake.charges_for_invoice(&invoice.to_string()),
        1,
        "the replay overlapped the first call"
    );
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_post_3ds_task_is_picked_up_by_the_reconciler() {
    use billing_tasks::charging::{self, Step};
    use billing_tasks::domain::PaymentStatus;
    use billing_tasks::secret::Secret;

    // No worker: the task Complete3DS enqueues is never run, as if it were lost.
    let env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_3DS_OK))
        .await
        .unwrap();
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
            Secret::new(billing_tasks::cloudpayments::fake::PA_RES_OK.to_owned()),
        )
        .await
        .unwrap();

    // Past the challenge's lifetime: the customer answered, so it is not expired but charged.
    env.clock.advance(Duration::minutes(61));
    let (report, requeue) = billing_tasks::reconcile::reconcile_payments(&env.billing)
        .await
        .unwrap();
    assert_eq!(
        report.expired_3ds, 0,
        "an answered challenge is not expired"
    );
    assert_eq!(
        requeue,
        vec![p.id],
        "the lost post-3DS charge is enqueued again"
    );
    assert_eq!(
        charging::charge_payment(&env.billing, p.id).await.unwrap(),
        Step::Settled(PaymentStatus::Succeeded)
    );
    env.stop().await;
}

/// Subscribes without notifications, then asks for a refund whose first call meets `first` and
/// whose replays all answer 503; returns the refund once the first call has been made.
async fn refund_with_lost_answer(env: &Env, user: Uuid, first: Fault) -> Uuid {
    use billing_tasks::refunds::{RefundRequest, Requester};
    let p = env.subscribe(user, CARD_OK).await;
    env.fake.push_fault_for("/payments/refund", first);
    env.fake.set_fault_probability(
        Some("/payments/refund"),
        Fault::ServerErrorBeforeProcessing(503),
        1.0,
    );
    let r = env
        .service
        .request_refund(RefundRequest {
            payment_id: p.id,
            reason: "changed my mind".into(),
            requested_by: Requester::User(user),
            idempotency_key: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap();
    eventually(
        "the refund call to be made",
        std::time::Duration::from_secs(20),
        || async { (env.fake.requests("/payments/refund") >= 1).then_some(()) },
    )
    .await;
    eventually(
        "the refund to be processing",
        std::time::Duration::from_secs(20),
        || async {
            let s = sqlx::query_scalar::<_, String>("SELECT status FROM refund WHERE id = $1")
                .bind(r.id)
                .fetch_one(&env.db)
                .await
                .unwrap();
            (s == "processing").then_some(())
        },
    )
    .await;
    r.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_whose_answer_was_lost_is_found_at_the_gateway_after_the_replay_window() {
    use billing_tasks::domain::RefundStatus;
    use billing_tasks::refunds::{self, RefundRun};
    let env = Env::start_with(Options {
        webhooks: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let refund = refund_with_lost_answer(&env, user, Fault::TimeoutAfterProcessing).await;
    env.clock.advance(Duration::minutes(56));
    assert_eq!(
        refunds::execute(&env.billing, refund).await.unwrap(),
        RefundRun::Settled(RefundStatus::Succeeded)
    );
    let txn =
        sqlx::query_scalar::<_, i64>("SELECT gateway_transaction_id FROM refund WHERE id = $1")
            .bind(refund)
            .fetch_one(&env.db)
            .await
            .unwrap();
    let at_gateway = env
        .fake
        .transaction(txn)
        .expect("the refund at the gateway");
    assert_eq!(at_gateway.amount.minor, 29_900);
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        billing_tasks::domain::SubscriptionStatus::Expired
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_the_gateway_never_made_fails_after_the_replay_window() {
    use billing_tasks::domain::RefundStatus;
    use billing_tasks::refunds::{self, RefundRun};
    let env = Env::start_with(Options {
        webhooks: false,
        ..Options::default()
    })
    .await;
    let user = Uuid::new_v4();
    let refund = refund_with_lost_answer(&env, user, Fault::TimeoutBeforeProcessing).await;
    env.clock.advance(Duration::minutes(56));
    assert_eq!(
        refunds::execute(&env.billing, refund).await.unwrap(),
        RefundRun::Settled(RefundStatus::Failed)
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM refund WHERE status = 'failed'")
            .await,
        1,
        "it no longer counts against the payment; a new request may be made"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconcile_tasks_enqueue_charges_and_refunds_whose_tasks_were_lost() {
    use billing_tasks::charging::{self, Step};
    use billing_tasks::domain::PaymentStatus;
    use billing_tasks::refunds::{RefundRequest, Requester};
    use billing_tasks::tasks::ReconcileRefunds;
    use task_core::Broker;

    let mut env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    // A paid subscription whose refund task is lost, and a payment whose charge task is lost.
    let paid_user = Uuid::new_v4();
    let paid = env
        .service
        .start_subscription(env.start_request(paid_user, CARD_OK))
        .await
        .unwrap();
    assert_eq!(
        charging::charge_payment(&env.billing, paid.id)
            .await
            .unwrap(),
        Step::Settled(PaymentStatus::Succeeded)
    );
    let refund = env
        .service
        .request_refund(RefundRequest {
            payment_id: paid.id,
            reason: "lost task".into(),
            requested_by: Requester::User(paid_user),
            idempotency_key: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap();
    let user = Uuid::new_v4();
    let lost = env
        .service
        .start_subscription(env.start_request(user, CARD_OK))
        .await
        .unwrap();
    env.tasks.broker().delete_queue(&env.queue).await.unwrap();
    env.start_worker(
        task_core::AmqpBroker::connect(&amqp_url()).await.unwrap(),
        task_core::RedisBackend::connect(&redis_url())
            .await
            .unwrap(),
    );

    env.clock.advance(Duration::minutes(2));
    let report = env.run::<ReconcilePayments>(()).await;
    assert_eq!(report.requeued, 1, "{report:?}");
    let p = env.settled(user, lost.id).await;
    assert_eq!(p.status, PaymentStatus::Succeeded);
    let out = env.run::<ReconcileRefunds>(()).await;
    assert_eq!(out["enqueued"], 1, "{out}");
    eventually("the refund", std::time::Duration::from_secs(20), || async {
        let s = sqlx::query_scalar::<_, String>("SELECT status FROM refund WHERE id = $1")
            .bind(refund.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
        (s == "succeeded").then_some(())
    })
    .await;
    env.stop().await;
}
