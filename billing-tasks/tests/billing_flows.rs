//! Billing flows end to end against real PostgreSQL, RabbitMQ, Redis and the fake gateway over
//! HTTP: primary payments with and without 3-D Secure, declines, renewals with dunning, expiry,
//! cancel and resume, refunds.

mod billing_support;

use billing_support::*;
use billing_tasks::cloudpayments::ReasonCode;
use billing_tasks::cloudpayments::fake::{self, Fault};
use billing_tasks::domain::{PaymentStatus, RefundStatus, SubscriptionStatus};
use billing_tasks::ledger::topic;
use billing_tasks::refunds::{RefundRequest, Requester};
use billing_tasks::secret::Secret;
use billing_tasks::tasks::{EnqueueRenewals, ExpireSubscriptions, RetryDueInvoices};
use chrono::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_payment_without_3ds_activates_and_grants_the_role() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env.subscribe(user, CARD_OK).await;
    assert_eq!(p.amount.minor, 29_900);

    let s = env.service.get_subscription(user).await.unwrap();
    assert_eq!(s.status, SubscriptionStatus::Active);
    assert_eq!(s.card_mask.as_deref(), Some("400000******3055"));
    let (start, end) = (
        s.current_period_start.unwrap(),
        s.current_period_end.unwrap(),
    );
    assert!(
        end - start >= Duration::days(28),
        "a month: {start} .. {end}"
    );

    let grants = env.outbox(topic::AUTH_GRANT).await;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0]["role"], "subscriber");
    assert_eq!(grants[0]["user_id"], user.to_string());
    assert_eq!(env.outbox(topic::PAYMENT_SUCCEEDED).await.len(), 1);
    // The cryptogram was used once and is gone; the gateway's Check and Pay notifications arrived.
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM payment WHERE cryptogram IS NOT NULL")
            .await,
        0
    );
    eventually("the Pay notification", std::time::Duration::from_secs(10), || async {
        (env.scalar_i64("SELECT count(*) FROM gateway_event WHERE kind = 'pay' AND processed_at IS NOT NULL").await == 1).then_some(())
    })
    .await;
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM gateway_event WHERE kind = 'check'")
            .await,
        1
    );
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_payment_with_3ds_waits_for_the_customer() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_3DS_OK))
        .await
        .unwrap();
    let p = env.settled(user, p.id).await;
    assert_eq!(p.status, PaymentStatus::AwaitingThreeDs);
    let challenge = p
        .challenge
        .expect("a 3-D Secure challenge for the frontend");
    assert!(challenge.acs_url.ends_with("/acs"), "{}", challenge.acs_url);
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Pending
    );

    // A wrong transaction id is refused and changes nothing.
    let err = env
        .service
        .complete_3ds(
            user,
            p.id,
            challenge.transaction_id + 1,
            Secret::new(fake::PA_RES_OK.into()),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("transaction_id"), "{err}");

    env.service
        .complete_3ds(
            user,
            p.id,
            challenge.transaction_id,
            Secret::new(fake::PA_RES_OK.into()),
        )
        .await
        .unwrap();
    let done = eventually(
        "3-D Secure to complete",
        std::time::Duration::from_secs(20),
        || async {
            let p = env.service.get_payment(user, p.id).await.unwrap();
            (p.status == PaymentStatus::Succeeded).then_some(p)
        },
    )
    .await;
    assert!(done.challenge.is_none());
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Active
    );
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM payment WHERE pa_res IS NOT NULL OR cryptogram IS NOT NULL"
        )
        .await,
        0
    );
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_3ds_is_a_decline() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_3DS_OK))
        .await
        .unwrap();
    let p = env.settled(user, p.id).await;
    let tx = p.challenge.unwrap().transaction_id;
    env.service
        .complete_3ds(user, p.id, tx, Secret::new(fake::PA_RES_FAIL.into()))
        .await
        .unwrap();
    let p = eventually(
        "the decline",
        std::time::Duration::from_secs(20),
        || async {
            let p = env.service.get_payment(user, p.id).await.unwrap();
            (p.status == PaymentStatus::Declined).then_some(p)
        },
    )
    .await;
    assert_eq!(p.reason_code, Some(5206));
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Pending
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_card_leaves_the_subscription_pending_and_another_card_succeeds() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_NSF))
        .await
        .unwrap();
    let p = env.settled(user, p.id).await;
    assert_eq!(p.status, PaymentStatus::Declined);
    assert_eq!(p.reason_code, Some(5051));
    assert!(p.card_holder_message.is_some());
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Pending
    );
    assert_eq!(env.outbox(topic::AUTH_GRANT).await.len(), 0);
    assert_eq!(env.outbox(topic::PAYMENT_FAILED).await.len(), 1);

    // The customer tries again with another card: same subscription and invoice, attempt 2.
    let again = env.subscribe(user, CARD_OK).await;
    assert_eq!(again.subscription_id, p.subscription_id);
    assert_eq!(env.scalar_i64("SELECT count(*) FROM invoice").await, 1);
    assert_eq!(
        env.scalar_i64("SELECT max(attempt)::bigint FROM payment")
            .await,
        2
    );
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

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

async fn wait_invoice(env: &Env, id: Uuid, status: &str) {
    eventually(
        &format!("invoice {id} to be {status}"),
        std::time::Duration::from_secs(30),
        || async { (env.invoice_status(id).await == status).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_charges_the_saved_card_and_extends_the_period() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let (_, _, old_end) = env.subscription_of(user).await;
    let invoice = renew(&env, user).await;
    wait_invoice(&env, invoice, "paid").await;

    let s = env.service.get_subscription(user).await.unwrap();
    assert_eq!(s.status, SubscriptionStatus::Active);
    assert_eq!(
        s.current_period_start, old_end,
        "the new period starts where the old one ended"
    );
    assert!(s.current_period_end.unwrap() > old_end.unwrap() + Duration::days(27));
    assert_eq!(
        env.outbox(topic::AUTH_GRANT).await.len(),
        2,
        "the role is extended to the new period end"
    );
    // Running the job again creates nothing twice.
    let again = env.run::<EnqueueRenewals>(()).await;
    assert_eq!(again["invoices"], 0);
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_renewal_recovers_on_a_later_dunning_step() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    env.fake
        .push_fault_for("/payments/tokens/charge", Fault::Decline(ReasonCode(5051)));
    let invoice = renew(&env, user).await;
    eventually(
        "the first renewal attempt to be declined",
        std::time::Duration::from_secs(30),
        || async {
            (env.scalar_i64("SELECT count(*) FROM payment WHERE status = 'declined'")
                .await
                == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        env.invoice_status(invoice).await,
        "open",
        "insufficient funds is worth another try"
    );
    let failed = env.outbox(topic::PAYMENT_FAILED).await;
    assert_eq!(failed.len(), 1);
    assert!(!failed[0]["next_attempt_at"].is_null());

    // Past the period end: past due, access kept while the ladder runs.
    env.clock.advance(Duration::hours(13));
    let report = env.run::<ExpireSubscriptions>(()).await;
    assert_eq!(report.past_due, 1);
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::PastDue
    );
    // Nothing is due before the next dunning step.
    assert_eq!(env.run::<RetryDueInvoices>(()).await["enqueued"], 0);
    env.clock.advance(Duration::days(1));
    assert_eq!(env.run::<RetryDueInvoices>(()).await["enqueued"], 1);
    wait_invoice(&env, invoice, "paid").await;
    let s = env.service.get_subscription(user).await.unwrap();
    assert_eq!(s.status, SubscriptionStatus::Active);
    assert!(s.grace_until.is_none());
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_renewal_expires_the_subscription_and_revokes_the_role() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    // This card pays once, but its token charges fail with insufficient funds.
    env.subscribe(user, CARD_TOKEN_NSF).await;
    let invoice = renew(&env, user).await;
    for step in 1..=3 {
        eventually(
            &format!("decline {step}"),
            std::time::Duration::from_secs(30),
            || async {
                (env.scalar_i64("SELECT count(*) FROM payment WHERE status = 'declined'")
                    .await
                    == step)
                    .then_some(())
            },
        )
        .await;
        if step < 3 {
            // The ladder: the next attempt a day, then two days, later.
            let next = sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
                "SELECT next_attempt_at FROM invoice WHERE id = $1",
            )
            .bind(invoice)
            .fetch_one(&env.db)
            .await
            .unwrap();
            let wait = next - env.clock.now();
            assert!(
                (wait - Duration::days(step)).num_seconds().abs() < 30,
                "dunning step {step}: {wait}"
            );
            env.clock.set(next);
            env.run::<ExpireSubscriptions>(()).await;
            assert_eq!(env.run::<RetryDueInvoices>(()).await["enqueued"], 1);
        }
    }
    wait_invoice(&env, invoice, "failed").await;
    eventually(
        "the subscription to expire",
        std::time::Duration::from_secs(10),
        || async {
            (env.service.get_subscription(user).await.unwrap().status
                == SubscriptionStatus::Expired)
                .then_some(())
        },
    )
    .await;
    let revokes = env.outbox(topic::AUTH_REVOKE).await;
    assert_eq!(revokes.len(), 1);
    assert_eq!(revokes[0]["user_id"], user.to_string());
    assert_eq!(revokes[0]["role"], "subscriber");
    assert_eq!(env.outbox(topic::SUBSCRIPTION_EXPIRED).await.len(), 1);
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_keeps_access_to_the_period_end_and_resume_turns_renewal_back_on() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let s = env
        .service
        .cancel(user, Some("too expensive".into()))
        .await
        .unwrap();
    assert_eq!(
        (s.status, s.auto_renew),
        (SubscriptionStatus::Active, false)
    );
    assert!(
        env.service.cancel(user, None).await.is_err(),
        "cancelling twice is refused"
    );

    let s = env.service.resume(user).await.unwrap();
    assert!(s.auto_renew);
    assert!(
        env.service.resume(user).await.is_err(),
        "resuming twice is refused"
    );

    // Cancelled again, the period runs out: no renewal is charged, the role is revoked.
    env.service.cancel(user, None).await.unwrap();
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() - Duration::hours(12));
    assert_eq!(env.run::<EnqueueRenewals>(()).await["invoices"], 0);
    env.clock.set(end.unwrap() + Duration::minutes(1));
    assert_eq!(env.run::<ExpireSubscriptions>(()).await.expired, 1);
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Expired
    );
    assert_eq!(env.outbox(topic::AUTH_REVOKE).await.len(), 1);
    assert!(env.service.resume(user).await.is_err());
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

async fn refund(env: &Env, user: Uuid, payment: Uuid) -> billing_tasks::refunds::RefundView {
    let r = env
        .service
        .request_refund(RefundRequest {
            payment_id: payment,
            reason: "did not like it".into(),
            requested_by: Requester::User(user),
            idempotency_key: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap();
    eventually("the refund", std::time::Duration::from_secs(20), || async {
        let status = sqlx::query_scalar::<_, String>("SELECT status FROM refund WHERE id = $1")
            .bind(r.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
        (status == "succeeded").then_some(())
    })
    .await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_within_the_window_is_full_and_ends_the_subscription() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env.subscribe(user, CARD_OK).await;
    env.clock.advance(Duration::days(1));
    let r = refund(&env, user, p.id).await;
    assert_eq!(r.amount.minor, 29_900);
    assert_eq!(r.status, RefundStatus::Requested);
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Expired
    );
    assert_eq!(env.outbox(topic::AUTH_REVOKE).await.len(), 1);
    assert_eq!(env.outbox(topic::REFUND_SUCCEEDED).await.len(), 1);
    let err = env
        .service
        .request_refund(RefundRequest {
            payment_id: p.id,
            reason: "again".into(),
            requested_by: Requester::User(user),
            idempotency_key: "another".into(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing left to refund"), "{err}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_after_the_window_is_pro_rata() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env.subscribe(user, CARD_OK).await;
    let s = env.service.get_subscription(user).await.unwrap();
    let (start, end) = (
        s.current_period_start.unwrap(),
        s.current_period_end.unwrap(),
    );
    // Half the period used.
    env.clock.set(start + (end - start) / 2);
    let r = refund(&env, user, p.id).await;
    assert!(
        (14_900..=15_000).contains(&r.amount.minor),
        "about half of 299.00: {}",
        r.amount
    );
    let txn =
        sqlx::query_scalar::<_, i64>("SELECT gateway_transaction_id FROM refund WHERE id = $1")
            .bind(r.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
    let refund_at_gateway = env
        .fake
        .transaction(txn)
        .expect("the refund transaction at the gateway");
    assert_eq!(refund_at_gateway.amount.minor, r.amount.minor);
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Expired
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pro_rata_refunds_never_exceed_what_is_due() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env.subscribe(user, CARD_OK).await;
    let s = env.service.get_subscription(user).await.unwrap();
    let (start, end) = (
        s.current_period_start.unwrap(),
        s.current_period_end.unwrap(),
    );
    env.clock.set(start + (end - start) / 2);
    let first = refund(&env, user, p.id).await;
    assert!(first.amount.minor < 29_900, "pro rata: {}", first.amount);

    // The subscription ended with the first refund; a second request with a new key, a little
    // later, finds nothing left (what is due now is less than what was already paid back).
    env.clock.advance(Duration::hours(1));
    let err = env
        .service
        .request_refund(RefundRequest {
            payment_id: p.id,
            reason: "and again".into(),
            requested_by: Requester::User(user),
            idempotency_key: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing left to refund"), "{err}");
    assert_eq!(
        env.scalar_i64("SELECT coalesce(sum(amount_minor), 0)::bigint FROM refund")
            .await,
        first.amount.minor
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_api_secret_pauses_charging_and_expires_nobody() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    // From now on the gateway refuses our credentials (the secret was rotated on Friday).
    env.fake
        .set_fault_probability(None, Fault::Unauthorized, 1.0);
    let invoice = renew(&env, user).await;
    eventually(
        "the renewal attempt to fail",
        std::time::Duration::from_secs(20),
        || async {
            (env.scalar_i64("SELECT count(*) FROM payment WHERE status = 'failed'")
                .await
                == 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(env.invoice_status(invoice).await, "open");
    assert_eq!(
        env.scalar_i64("SELECT attempt_count::bigint FROM invoice WHERE kind = 'renewal'")
            .await,
        0,
        "our fault is not a decline"
    );
    assert!(
        !env.outbox(topic::ACCOUNTING_ATTENTION).await.is_empty(),
        "people are told"
    );

    // A whole weekend passes, well past the period end and the grace period.
    for _ in 0..8 {
        env.clock.advance(Duration::hours(12));
        env.run::<ExpireSubscriptions>(()).await;
        env.run::<RetryDueInvoices>(()).await;
    }
    let s = env.service.get_subscription(user).await.unwrap();
    assert_ne!(s.status, SubscriptionStatus::Expired, "{s:?}");
    assert!(env.outbox(topic::AUTH_REVOKE).await.is_empty());
    assert_eq!(
        env.fake.requests("/payments/tokens/charge"),
        1,
        "nothing is charged while paused"
    );

    // Monday: the secret is fixed. The next probe gets through and the renewal is charged.
    env.fake.clear_faults();
    env.clock.advance(Duration::minutes(11));
    env.run::<RetryDueInvoices>(()).await;
    wait_invoice(&env, invoice, "paid").await;
    let s = env.service.get_subscription(user).await.unwrap();
    assert_eq!(s.status, SubscriptionStatus::Active);
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM payment WHERE status = 'declined'")
            .await,
        0
    );
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_with_odd_card_details_is_still_recorded() {
    let env = Env::start().await;
    env.fake.set_odd_card_display(true);
    let user = Uuid::new_v4();
    // The money facts are recorded whatever the display fields look like.
    let p = env.subscribe(user, CARD_OK).await;
    assert_eq!(p.amount.minor, 29_900);
    let s = env.service.get_subscription(user).await.unwrap();
    assert_eq!(s.status, SubscriptionStatus::Active);
    assert_eq!(s.card_mask.as_deref(), Some("400000******3055"), "cleaned");
    let exp = sqlx::query_scalar::<_, Option<String>>("SELECT card_exp FROM payment_method")
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(exp.as_deref(), Some("12/30"), "cleaned");
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}
