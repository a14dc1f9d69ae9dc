//! The webhook receiver: signatures, answers to Check, deduplicated notifications.

mod billing_support;

use billing_support::*;
use billing_tasks::cloudpayments::webhook;
use billing_tasks::secret::Secret;
use uuid::Uuid;

async fn post(env: &Env, kind: &str, body: &str, hmac: Option<String>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(format!(
            "http://{}/webhooks/cloudpayments/{kind}",
            env.webhook_addr
        ))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(body.to_owned());
    if let Some(h) = hmac {
        req = req.header("Content-HMAC", h);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn signed(body: &str) -> Option<String> {
    Some(webhook::sign(
        &Secret::new(API_SECRET.to_owned()),
        body.as_bytes(),
    ))
}

async fn ledger_fingerprint(env: &Env) -> Vec<i64> {
    let mut v = Vec::new();
    for sql in [
        "SELECT count(*) FROM status_history",
        "SELECT count(*) FROM gateway_event",
        "SELECT count(*) FROM outbox",
        "SELECT count(*) FROM payment WHERE status = 'succeeded'",
        "SELECT count(*) FROM refund",
    ] {
        v.push(env.scalar_i64(sql).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_missing_signature_is_refused_and_changes_nothing() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_3DS_OK))
        .await
        .unwrap();
    let p = env.settled(user, p.id).await;
    let invoice = env.invoice_ids(user, "initial").await[0];
    let before = ledger_fingerprint(&env).await;
    let body = format!(
        "TransactionId={}&Amount=299.00&Currency=RUB&InvoiceId={invoice}&AccountId={user}&DateTime=2026-11-27+10%3a00%3a00&Status=Completed&TestMode=1",
        p.challenge.unwrap().transaction_id
    );
    let (status, _) = post(&env, "pay", &body, None).await;
    assert_eq!(status, 401);
    let (status, _) = post(
        &env,
        "pay",
        &body,
        Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
    )
    .await;
    assert_eq!(status, 401);
    // Signed with another secret.
    let (status, _) = post(
        &env,
        "pay",
        &body,
        Some(webhook::sign(&Secret::new("other".into()), body.as_bytes())),
    )
    .await;
    assert_eq!(status, 401);
    // A valid signature over a different body.
    let (status, _) = post(&env, "pay", &body.replace("299.00", "1.00"), signed(&body)).await;
    assert_eq!(status, 401);
    assert_eq!(
        ledger_fingerprint(&env).await,
        before,
        "nothing was written"
    );
    assert_eq!(
        env.service.get_payment(user, p.id).await.unwrap().status,
        billing_tasks::domain::PaymentStatus::AwaitingThreeDs
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_answers_by_invoice_account_and_amount() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_3DS_OK))
        .await
        .unwrap();
    env.settled(user, p.id).await;
    let invoice = env.invoice_ids(user, "initial").await[0];
    let check = |invoice: String, account: String, amount: &str| {
        format!(
            "TransactionId=1&Amount={amount}&Currency=RUB&InvoiceId={invoice}&AccountId={account}&DateTime=2026-11-27+10%3a00%3a00&TestMode=1&Status=Completed"
        )
    };
    let cases = [
        (
            check(invoice.to_string(), user.to_string(), "299.00"),
            r#"{"code":0}"#,
        ),
        (
            check(Uuid::new_v4().to_string(), user.to_string(), "299.00"),
            r#"{"code":10}"#,
        ),
        (
            check("not-ours".into(), user.to_string(), "299.00"),
            r#"{"code":10}"#,
        ),
        (
            check(invoice.to_string(), Uuid::new_v4().to_string(), "299.00"),
            r#"{"code":11}"#,
        ),
        (
            check(invoice.to_string(), user.to_string(), "1.00"),
            r#"{"code":12}"#,
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = post(&env, "check", &body, signed(&body)).await;
        assert_eq!((status, answer.as_str()), (200, expected), "{body}");
    }
    // Amounts that are not money at all are refused as unreadable.
    for amount in ["-5.00", "1e400", "abc", "0.001"] {
        let body = check(invoice.to_string(), user.to_string(), amount);
        let (status, _) = post(&env, "check", &body, signed(&body)).await;
        assert!(status == 400 || status == 200, "{amount}: {status}");
        if status == 200 {
            let (_, answer) = post(&env, "check", &body, signed(&body)).await;
            assert_ne!(answer, r#"{"code":0}"#, "{amount} must not be accepted");
        }
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_notification_is_acknowledged_and_not_applied_twice() {
    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let pay = eventually(
        "the gateway's Pay notification",
        std::time::Duration::from_secs(10),
        || async {
            env.fake.webhook_deliveries().into_iter().find(|d| {
                d.url.ends_with("/pay")
                    && d.result == billing_tasks::cloudpayments::fake::DeliveryResult::Accepted
            })
        },
    )
    .await;
    let before = ledger_fingerprint(&env).await;
    let body = pay.body.clone();
    for _ in 0..3 {
        let (status, answer) = post(&env, "pay", &body, signed(&body)).await;
        assert_eq!((status, answer.as_str()), (200, r#"{"code":0}"#));
    }
    assert_eq!(
        ledger_fingerprint(&env).await,
        before,
        "a replay changes nothing"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pay_notification_for_a_renewal_with_an_earlier_failed_attempt_settles_it() {
    use billing_tasks::cloudpayments::fake::Fault;
    use billing_tasks::ledger::topic;
    use billing_tasks::tasks::{ChargeInvoice, InvoiceArgs};

    let env = Env::start().await;
    let user = Uuid::new_v4();
    env.subscribe(user, CARD_OK).await;
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() - chrono::Duration::hours(12));
    let invoice = billing_tasks::renewals::create_renewal_invoices(&env.billing)
        .await
        .unwrap()[0];
    // An earlier attempt that never reached the gateway (no transaction id), due again now.
    let earlier = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO payment (id, invoice_id, attempt, method, status, amount_minor, currency, idempotency_key, sent_at, completed_at, created_at, updated_at)
         VALUES ($1, $2, 1, 'token', 'failed', 29900, 'RUB', $3, $4, $4, $4, $4)",
    )
    .bind(earlier)
    .bind(invoice)
    .bind(format!("renewal:{invoice}:1"))
    .bind(env.clock.now())
    .execute(&env.db)
    .await
    .unwrap();
    sqlx::query("UPDATE invoice SET next_attempt_at = $2 WHERE id = $1")
        .bind(invoice)
        .bind(env.clock.now())
        .execute(&env.db)
        .await
        .unwrap();
    // The second attempt's answer is lost; the gateway's Pay notification tells first.
    env.fake
        .push_fault_for("/payments/tokens/charge", Fault::TimeoutAfterProcessing);
    env.tasks
        .task::<ChargeInvoice>(InvoiceArgs {
            invoice_id: invoice,
        })
        .queue(&env.queue)
        .send()
        .await
        .unwrap();
    let outcome = eventually(
        "the Pay notification to be processed",
        std::time::Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT outcome FROM gateway_event WHERE kind = 'pay' AND invoice_id = $1 AND processed_at IS NOT NULL",
            )
            .bind(invoice.to_string())
            .fetch_optional(&env.db)
            .await
            .unwrap()
            .flatten()
        },
    )
    .await;
    assert!(outcome.contains("succeeded"), "{outcome}");
    assert!(
        env.outbox(topic::ACCOUNTING_ATTENTION).await.is_empty(),
        "no false unmatched-payment alert"
    );
    assert_eq!(env.invoice_status(invoice).await, "paid");
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_of_another_amount_or_account_activates_nothing() {
    use billing_tasks::domain::{PaymentStatus, SubscriptionStatus};
    use billing_tasks::ledger::topic;

    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_3DS_OK))
        .await
        .unwrap();
    let p = env.settled(user, p.id).await;
    let txn = p.challenge.unwrap().transaction_id;
    let invoice = env.invoice_ids(user, "initial").await[0];
    let stranger = Uuid::new_v4();
    // 1 ₽ for our InvoiceId (the public widget lets anyone pay any amount), then the right amount
    // from someone else's account, then the right amount in another currency.
    for (amount, currency, account) in [
        ("1.00", "RUB", user),
        ("299.00", "RUB", stranger),
        ("299.00", "USD", user),
    ] {
        let body = format!(
            "TransactionId={txn}&Amount={amount}&Currency={currency}&InvoiceId={invoice}&AccountId={account}&DateTime=2026-11-27+10%3a00%3a00&Status=Completed&TestMode=1"
        );
        let (status, answer) = post(&env, "pay", &body, signed(&body)).await;
        assert_eq!((status, answer.as_str()), (200, r#"{"code":0}"#));
        // The same transaction id is one notification: replaying it changes nothing, so each
        // case gets its own below.
        sqlx::query("DELETE FROM gateway_event WHERE kind = 'pay'")
            .execute(&env.db)
            .await
            .unwrap();
        assert_eq!(
            env.service.get_payment(user, p.id).await.unwrap().status,
            PaymentStatus::AwaitingThreeDs,
            "{amount} {currency} from {account}"
        );
    }
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Pending
    );
    assert!(env.outbox(topic::AUTH_GRANT).await.is_empty());
    assert!(
        !env.outbox(topic::ACCOUNTING_ATTENTION).await.is_empty(),
        "accounting is told about the mismatched approval"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_notification_declines_the_attempt_it_names() {
    use billing_tasks::domain::{PaymentStatus, SubscriptionStatus};
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env
        .service
        .start_subscription(env.start_request(user, CARD_3DS_OK))
        .await
        .unwrap();
    let p = env.settled(user, p.id).await;
    let txn = p.challenge.unwrap().transaction_id;
    let invoice = env.invoice_ids(user, "initial").await[0];
    let body = format!(
        "TransactionId={txn}&Amount=299.00&Currency=RUB&InvoiceId={invoice}&AccountId={user}&DateTime=2026-11-27+10%3a00%3a00&Status=Declined&ReasonCode=5051&Reason=InsufficientFunds&TestMode=1"
    );
    let (status, answer) = post(&env, "fail", &body, signed(&body)).await;
    assert_eq!((status, answer.as_str()), (200, r#"{"code":0}"#));
    let p = env.service.get_payment(user, p.id).await.unwrap();
    assert_eq!(p.status, PaymentStatus::Declined);
    assert_eq!(p.reason_code, Some(5051));
    assert_eq!(
        env.service.get_subscription(user).await.unwrap().status,
        SubscriptionStatus::Pending
    );
    let actor = sqlx::query_scalar::<_, String>(
        "SELECT actor FROM status_history WHERE entity = 'payment' AND entity_id = $1 AND to_status = 'declined'",
    )
    .bind(p.id)
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(actor, "webhook");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_notification_of_a_known_refund_changes_nothing_and_a_foreign_one_is_reported() {
    use billing_tasks::ledger::topic;
    use billing_tasks::refunds::{RefundRequest, Requester};
    let env = Env::start().await;
    let user = Uuid::new_v4();
    let p = env.subscribe(user, CARD_OK).await;
    let payment_txn =
        sqlx::query_scalar::<_, i64>("SELECT gateway_transaction_id FROM payment WHERE id = $1")
            .bind(p.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
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
    eventually("the refund", std::time::Duration::from_secs(20), || async {
        let s = sqlx::query_scalar::<_, String>("SELECT status FROM refund WHERE id = $1")
            .bind(r.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
        (s == "succeeded").then_some(())
    })
    .await;
    let refund_txn =
        sqlx::query_scalar::<_, i64>("SELECT gateway_transaction_id FROM refund WHERE id = $1")
            .bind(r.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
    // The gateway's own Refund notification for it changes nothing more.
    let body = format!(
        "TransactionId={refund_txn}&PaymentTransactionId={payment_txn}&Amount={}.{:02}&DateTime=2026-11-27+10%3a00%3a00&OperationType=Refund",
        r.amount.minor / 100,
        r.amount.minor % 100
    );
    let (status, _) = post(&env, "refund", &body, signed(&body)).await;
    assert_eq!(status, 200);
    // A refund made in the gateway's dashboard, unknown to billing, goes to accounting.
    let body = format!(
        "TransactionId=8800000001&PaymentTransactionId={payment_txn}&Amount=1.00&DateTime=2026-11-27+10%3a00%3a00&OperationType=Refund"
    );
    let (status, answer) = post(&env, "refund", &body, signed(&body)).await;
    assert_eq!((status, answer.as_str()), (200, r#"{"code":0}"#));
    let outcome = sqlx::query_scalar::<_, Option<String>>(
        "SELECT outcome FROM gateway_event WHERE kind = 'refund' AND gateway_transaction_id = 8800000001",
    )
    .fetch_one(&env.db)
    .await
    .unwrap();
    assert_eq!(outcome.as_deref(), Some("unmatched refund"));
    assert!(
        env.outbox(topic::ACCOUNTING_ATTENTION)
            .await
            .iter()
            .any(|m| m["refund_transaction_id"] == 8_800_000_001_i64),
        "accounting is told"
    );
    assert_eq!(
        env.scalar_i64("SELECT count(*) FROM refund").await,
        1,
        "nothing was invented in the ledger"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recurrent_notification_is_recorded_and_acknowledged() {
    let env = Env::start().await;
    let before = ledger_fingerprint(&env).await;
    let body = "Id=sc_8cf8a9338fb8ebf7202b08d09c938&AccountId=user%40example.com&Description=Subscription&Email=user%40example.com&Amount=1.02&Currency=RUB&RequireConfirmation=0&StartDate=2026-11-27+10%3a00%3a00&Interval=Month&Period=1&Status=Active&SuccessfulTransactionsNumber=0&FailedTransactionsNumber=0";
    let (status, answer) = post(&env, "recurrent", body, signed(body)).await;
    assert_eq!((status, answer.as_str()), (200, r#"{"code":0}"#));
    assert_eq!(
        env.scalar_i64(
            "SELECT count(*) FROM gateway_event WHERE kind = 'recurrent' AND processed_at IS NOT NULL AND outcome = 'recorded'"
        )
        .await,
        1
    );
    let mut after = ledger_fingerprint(&env).await;
    after[1] -= 1; // the recorded notification itself
    assert_eq!(before, after, "nothing else changed");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_reordered_and_duplicated_notifications_are_applied_once() {
    use billing_tasks::ledger::topic;
    let env = Env::start_with(Options {
        webhook_mischief: Some((std::time::Duration::from_millis(300), 1.0)),
        ..Options::default()
    })
    .await;
    for _ in 0..4 {
        env.subscribe(Uuid::new_v4(), CARD_OK).await;
    }
    eventually(
        "every Pay notification, twice",
        std::time::Duration::from_secs(20),
        || async {
            let (sent, _) = env.fake.webhook_counts();
            (sent >= 4 * 3).then_some(())
        },
    )
    .await;
    eventually(
        "the Pay notifications to be processed",
        std::time::Duration::from_secs(20),
        || async {
            (env.scalar_i64(
                "SELECT count(*) FROM gateway_event WHERE kind = 'pay' AND processed_at IS NOT NULL",
            )
            .await
                == 4)
                .then_some(())
        },
    )
    .await;
    assert!(env.outbox(topic::ACCOUNTING_ATTENTION).await.is_empty());
    assert_eq!(env.outbox(topic::AUTH_GRANT).await.len(), 4);
    env.assert_ledger_matches_gateway().await;
    env.stop().await;
}
