//! Bad input to every entry point gets a clear error and leaves the ledger unchanged.

mod billing_support;

use billing_support::*;
use billing_tasks::BillingError;
use billing_tasks::refunds::{RefundRequest, Requester};
use billing_tasks::secret::Secret;
use billing_tasks::tasks::{
    BatchReport, ChargeInvoice, ChargeInvoices, ChargePayment, InvoiceArgs, InvoiceBatchArgs,
    MAX_BATCH, PaymentArgs, Refund, RefundArgs,
};
use serde_json::json;
use task_core::{Error, TaskState};
use uuid::Uuid;

/// Row counts of every ledger table: equal before and after means nothing was written.
async fn snapshot(env: &Env) -> Vec<i64> {
    let mut v = Vec::new();
    for sql in [
        "SELECT count(*) FROM payer",
        "SELECT count(*) FROM tariff",
        "SELECT count(*) FROM payment_method",
        "SELECT count(*) FROM subscription",
        "SELECT count(*) FROM invoice",
        "SELECT count(*) FROM payment",
        "SELECT count(*) FROM refund",
        "SELECT count(*) FROM gateway_event",
        "SELECT count(*) FROM outbox",
        "SELECT count(*) FROM status_history",
    ] {
        v.push(env.scalar_i64(sql).await);
    }
    v
}

fn invalid(r: billing_tasks::Result<impl std::fmt::Debug>, mention: &str) {
    match r {
        Err(BillingError::InvalidArgument(m)) => {
            assert!(m.contains(mention), "{m:?} should mention {mention:?}")
        }
        other => panic!("expected InvalidArgument mentioning {mention:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_subscription_requests_change_nothing() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let before = snapshot(&env).await;
    let base = env.start_request(user, CARD_OK);

    let mut r = base.clone();
    r.tariff = "platinum-forever".into();
    assert!(
        matches!(env.service.start_subscription(r).await, Err(BillingError::NotFound(m)) if m.contains("platinum-forever"))
    );

    for (bad, mention) in [
        ("", "cryptogram"),
        ("not a cryptogram; DROP TABLE payment", "cryptogram"),
        (&"A".repeat(5000), "cryptogram"),
    ] {
        let mut r = base.clone();
        r.cryptogram = Secret::new(bad.to_owned());
        invalid(env.service.start_subscription(r).await, mention);
    }
    let mut r = base.clone();
    r.ip_address = "999.1.1.1".into();
    invalid(env.service.start_subscription(r).await, "ip_address");
    let mut r = base.clone();
    r.email = Some("not an e-mail".into());
    invalid(env.service.start_subscription(r).await, "email");
    let mut r = base.clone();
    r.cardholder_name = Some("x\u{0}y".into());
    invalid(env.service.start_subscription(r).await, "cardholder_name");
    let mut r = base.clone();
    r.idempotency_key = String::new();
    invalid(env.service.start_subscription(r).await, "idempotency_key");
    assert_eq!(
        snapshot(&env).await,
        before,
        "no bad request wrote anything"
    );
    env.stop().await;
}

/// Waits (bounded) for the gateway's Pay notification of the payment: the one write that follows
/// a payment reading as succeeded.
async fn pay_notification_processed(env: &Env) {
    eventually(
        "the Pay notification",
        std::time::Duration::from_secs(10),
        || async {
            (env.scalar_i64(
                "SELECT count(*) FROM gateway_event WHERE kind = 'pay' AND processed_at IS NOT NULL",
            )
            .await
                == 1)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_and_other_peoples_payments_are_not_found() {
    let mut env = Env::start().await;
    let (user, stranger) = (Uuid::new_v4(), Uuid::new_v4());
    let p = env.subscribe(user, CARD_OK).await;
    pay_notification_processed(&env).await;
    let before = snapshot(&env).await;

    assert!(matches!(
        env.service.get_payment(user, Uuid::new_v4()).await,
        Err(BillingError::NotFound(_))
    ));
    assert!(matches!(
        env.service.get_payment(stranger, p.id).await,
        Err(BillingError::NotFound(_))
    ));
    assert!(matches!(
        env.service.get_subscription(stranger).await,
        Err(BillingError::NotFound(_))
    ));
    assert!(matches!(
        env.service
            .complete_3ds(user, Uuid::new_v4(), 1, Secret::new("x".into()))
            .await,
        Err(BillingError::NotFound(_))
    ));
    assert!(matches!(
        env.service
            .complete_3ds(user, p.id, 1, Secret::new("x".into()))
            .await,
        Err(BillingError::FailedPrecondition(_))
    ));
    let refund = |payment_id, requested_by| RefundRequest {
        payment_id,
        reason: "because".into(),
        requested_by,
        idempotency_key: Uuid::new_v4().to_string(),
    };
    assert!(matches!(
        env.service
            .request_refund(refund(Uuid::new_v4(), Requester::User(user)))
            .await,
        Err(BillingError::NotFound(_))
    ));
    assert!(matches!(
        env.service
            .request_refund(refund(p.id, Requester::User(stranger)))
            .await,
        Err(BillingError::NotFound(_))
    ));
    let mut empty_reason = refund(p.id, Requester::User(user));
    empty_reason.reason = "  ".into();
    invalid(env.service.request_refund(empty_reason).await, "reason");
    assert!(matches!(
        env.service.cancel(stranger, None).await,
        Err(BillingError::FailedPrecondition(_))
    ));
    assert!(matches!(
        env.service.resume(user).await,
        Err(BillingError::FailedPrecondition(_))
    ));
    // Subscribing again while subscribed is refused.
    assert!(matches!(
        env.service.start_subscription(env.start_request(user, CARD_OK)).await,
        Err(BillingError::FailedPrecondition(m)) if m.contains("already subscribed")
    ));
    assert_eq!(snapshot(&env).await, before);

    // Tasks with unknown ids fail for good (no retries) and change nothing.
    for result in [
        env.tasks
            .task::<ChargePayment>(PaymentArgs {
                payment_id: Uuid::new_v4(),
            })
            .queue(&env.queue)
            .send()
            .await
            .unwrap()
            .untyped(),
        env.tasks
            .task::<ChargeInvoice>(InvoiceArgs {
                invoice_id: Uuid::new_v4(),
            })
            .queue(&env.queue)
            .send()
            .await
            .unwrap()
            .untyped(),
        env.tasks
            .task::<Refund>(RefundArgs {
                refund_id: Uuid::new_v4(),
            })
            .queue(&env.queue)
            .send()
            .await
            .unwrap()
            .untyped(),
    ] {
        match result.get(std::time::Duration::from_secs(20)).await {
            Err(Error::TaskFailed {
                state: TaskState::Failure,
                exception,
                ..
            }) => {
                assert_eq!(
                    (exception.exc_module.as_str(), exception.exc_type.as_str()),
                    ("billing", "NotFound")
                );
            }
            other => panic!("expected billing.NotFound, got {other:?}"),
        }
    }
    // A renewal batch reports unknown invoices instead of retrying them, and refuses to be huge.
    let report = env
        .run::<ChargeInvoices>(InvoiceBatchArgs {
            invoice_ids: vec![Uuid::new_v4(), Uuid::new_v4()],
        })
        .await;
    assert_eq!(
        report,
        BatchReport {
            rejected: 2,
            ..Default::default()
        }
    );
    let huge = env
        .tasks
        .task::<ChargeInvoices>(InvoiceBatchArgs {
            invoice_ids: (0..=MAX_BATCH).map(|_| Uuid::new_v4()).collect(),
        })
        .queue(&env.queue)
        .send()
        .await
        .unwrap();
    match huge.get(std::time::Duration::from_secs(20)).await {
        Err(Error::TaskFailed { exception, .. }) => {
            assert_eq!(exception.exc_type, "InvalidArgument");
            assert!(format!("{:?}", exception.exc_message).contains("at most 1000"));
        }
        other => panic!("expected billing.InvalidArgument, got {other:?}"),
    }
    // Arguments of the wrong shape are dead-lettered by the worker.
    let wrong = env
        .tasks
        .send_task(
            "billing.charge_payment",
            vec![json!("not-a-uuid")],
            Default::default(),
        )
        .queue(&env.queue)
        .send()
        .await
        .unwrap();
    match wrong.get(std::time::Duration::from_secs(20)).await {
        Err(Error::TaskFailed { exception, .. }) => assert_eq!(exception.exc_type, "TypeError"),
        other => panic!("expected TypeError, got {other:?}"),
    }
    env.expect_dead_letters(1);
    assert_eq!(snapshot(&env).await, before);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_what_the_code_must_never_write() {
    let env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    // Refused by the named constraint as an integrity violation (SQLSTATE class 23), not by any
    // error at all: a renamed column would fail differently and fail this test.
    let refused = |sql: &'static str, constraint: &'static str| {
        let db = env.db.clone();
        async move {
            let e = sqlx::query(sql).execute(&db).await.expect_err(sql);
            let d = e
                .as_database_error()
                .unwrap_or_else(|| panic!("{sql}: {e}"));
            assert!(
                d.code().is_some_and(|c| c.starts_with("23")),
                "{sql}: not an integrity violation: {d}"
            );
            assert_eq!(d.constraint(), Some(constraint), "{sql}: {d}");
        }
    };
    refused("INSERT INTO tariff (id, code, name, role, price_minor, currency, period_unit, period_count, created_at, updated_at) VALUES (gen_random_uuid(), 'neg', 'n', 'r', -100, 'RUB', 'month', 1, now(), now())", "tariff_price_minor_check").await;
    refused("INSERT INTO tariff (id, code, name, role, price_minor, currency, period_unit, period_count, created_at, updated_at) VALUES (gen_random_uuid(), 'huge', 'n', 'r', 10000000000000, 'RUB', 'month', 1, now(), now())", "tariff_price_minor_check").await;
    refused("INSERT INTO tariff (id, code, name, role, price_minor, currency, period_unit, period_count, created_at, updated_at) VALUES (gen_random_uuid(), 'cur', 'n', 'r', 100, 'rub', 'month', 1, now(), now())", "tariff_currency_check").await;
    refused(
        "UPDATE tariff SET period_unit = 'fortnight'",
        "tariff_period_unit_check",
    )
    .await;
    env.stop().await;
}
