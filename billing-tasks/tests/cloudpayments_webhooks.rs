//! Notifications from the fake to a real HTTP receiver: signatures checked with our `verify`,
//! bodies parsed with our notification types, re-delivery until `{"code":0}`, and Check answers
//! turning into declines.

mod cloudpayments_support;

use std::time::Duration;

use billing_tasks::cloudpayments::fake::{DeliveryResult, FakeConfig, WebhookConfig};
use billing_tasks::cloudpayments::webhook::{
    self, CancelNotification, CheckNotification, ConfirmNotification, FailNotification,
    Notification, NotificationKind, PayNotification, RecurrentNotification, RefundNotification,
};
use billing_tasks::cloudpayments::{ChargeOutcome, ReasonCode, TransactionStatus};
use billing_tasks::secret::Secret;
use cloudpayments_support::*;

const WAIT: Duration = Duration::from_secs(10);

fn secret() -> Secret<String> {
    FakeConfig::default().terminals[0].api_secret.clone()
}

async fn first(receiver: &Receiver, kind: &str) -> Received {
    eventually(&format!("a {kind} notification"), WAIT, || async {
        receiver.received(kind).into_iter().next()
    })
    .await
}

#[test]
fn documented_signature_vector() {
    // §6.4: the gem's vector with secret `pass`.
    let body = "TransactionId=666&Amount=123.00&Currency=RUB&PaymentAmount=123.00&PaymentCurrency=RUB&InvoiceId=1234567&AccountId=user%40example.com&SubscriptionId=&Name=VLADIMIR+KOCHNEV&Email=user%40example.com&DateTime=2015-11-17+14%3a51%3a20&IpAddress=127.0.0.1&IpCountry=RU&IpCity=%d0%a1%d0%b0%d0%bd%d0%ba%d1%82-%d0%9f%d0%b5%d1%82%d0%b5%d1%80%d0%b1%d1%83%d1%80%d0%b3&IpRegion=%d0%a1%d0%b0%d0%bd%d0%ba%d1%82-%d0%9f%d0%b5%d1%82%d0%b5%d1%80%d0%b1%d1%83%d1%80%d0%b3&IpDistrict=%d0%a1%d0%b5%d0%b2%d0%b5%d1%80%d0%be-%d0%97%d0%b0%d0%bf%d0%b0%d0%b4%d0%bd%d1%8b%d0%b9+%d1%84%d0%b5%d0%b4%d0%b5%d1%80%d0%b0%d0%bb%d1%8c%d0%bd%d1%8b%d0%b9+%d0%be%d0%ba%d1%80%d1%83%d0%b3&IpLatitude=59.939000&IpLongitude=30.315800&CardFirstSix=411111&CardLastFour=1111&CardType=Visa&CardExpDate=01%2f19&Issuer=&IssuerBankCountry=&Description=%d0%9e%d0%bf%d0%bb%d0%b0%d1%82%d0%b0+%d0%b2+example.com&AuthCode=DEADBEEF&Token=1234567890&TestMode=1&Status=Completed";
    let pass = Secret::new("pass".to_owned());
    assert_eq!(
        webhook::sign(&pass, body.as_bytes()),
        "tJW02TMAce4Em8eJTNqjhOax+BYRM5K2D8mX9xsmUUc="
    );
    assert!(webhook::verify(
        &pass,
        body.as_bytes(),
        "tJW02TMAce4Em8eJTNqjhOax+BYRM5K2D8mX9xsmUUc="
    ));
    assert!(!webhook::verify(
        &Secret::new("wrong".to_owned()),
        body.as_bytes(),
        "tJW02TMAce4Em8eJTNqjhOax+BYRM5K2D8mX9xsmUUc="
    ));
    let pay =
        PayNotification::parse(Some("application/x-www-form-urlencoded"), body.as_bytes()).unwrap();
    assert_eq!(pay.payment.transaction_id, 666);
    assert_eq!(pay.payment.amount, rub(12_300));
}

#[tokio::test]
async fn check_then_pay_signed_and_parsed() {
    let receiver = Receiver::start().await;
    let (fake, client) = start_with(FakeConfig::default().with_webhooks(receiver.webhooks())).await;
    let invoice = id("inv");
    let account = id("acc");
    let outcome = client
        .charge_cryptogram(&card_charge(CARD_OK, &invoice, &account), &id("req"))
        .await
        .unwrap();
    let ChargeOutcome::Approved(t) = outcome else {
        panic!("{outcome:?}")
    };

    // Check arrived before the answer (it is synchronous), Pay after.
    let check = receiver.received("check");
    assert_eq!(check.len(), 1);
    let check_n =
        CheckNotification::parse(check[0].content_type.as_deref(), &check[0].body).unwrap();
    assert_eq!(check_n.payment.transaction_id, t.transaction_id);
    assert_eq!(check_n.payment.status, Some(TransactionStatus::Completed));

    let pay = first(&receiver, "pay").await;
    assert_eq!(
        pay.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    let content_hmac = pay.content_hmac.as_deref().expect("Content-HMAC");
    let x_content_hmac = pay.x_content_hmac.as_deref().expect("X-Content-HMAC");
    assert!(webhook::verify(&secret(), &pay.body, content_hmac));
    assert!(webhook::verify_decoded(
        &secret(),
        &pay.body,
        x_content_hmac
    ));
    assert!(!webhook::verify(
        &Secret::new("other".into()),
        &pay.body,
        content_hmac
    ));

    // .NET-style form: `+` for space, lower-case escapes, empty `Key=`.
    let text = std::str::from_utf8(&pay.body).unwrap();
    assert!(text.contains("&SubscriptionId=&"), "{text}");
    assert!(text.contains("%3a") && !text.contains("%3A"), "{text}");
    assert!(text.contains("Name=CARD+HOLDER"), "{text}");

    let n = Notification::parse(
        NotificationKind::Pay,
        pay.content_type.as_deref(),
        &pay.body,
    )
    .unwrap();
    let Notification::Pay(n) = n else { panic!() };
    assert_eq!(n.payment.transaction_id, t.transaction_id);
    assert_eq!(n.payment.amount, t.amount);
    assert_eq!(n.payment.invoice_id.as_deref(), Some(invoice.as_str()));
    assert_eq!(n.payment.account_id.as_deref(), Some(account.as_str()));
    assert_eq!(n.payment.description.as_deref(), Some("Подписка на месяц"));
    assert!(n.payment.test_mode);
    assert_eq!(n.payment.status, Some(TransactionStatus::Completed));
    assert_eq!(n.token, t.token);
    assert_eq!(n.gateway_name.as_deref(), Some("Test"));

    eventually("the Pay delivery to be logged", WAIT, || async {
        fake.webhook_deliveries()
            .iter()
            .any(|d| d.kind == NotificationKind::Pay && d.result == DeliveryResult::Accepted)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn redelivered_until_code_zero() {
    let receiver = Receiver::start().await;
    receiver.script(
        "pay",
        &[Reply::Code(13), Reply::Status(500), Reply::Garbage],
    );
    let (fake, client) = start_with(FakeConfig::default().with_webhooks(receiver.webhooks())).await;
    paid(&client, CARD_OK, "acc").await;

    let deliveries = eventually("four Pay attempts", WAIT, || async {
        let pay: Vec<_> = fake
            .webhook_deliveries()
            .into_iter()
            .filter(|d| d.kind == NotificationKind::Pay)
            .collect();
        (pay.len() == 4).then_some(pay)
    })
    .await;
    assert_eq!(
        deliveries.iter().map(|d| d.attempt).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(
        deliveries[0].result,
        DeliveryResult::Answered {
            status: 200,
            code: Some(13)
        }
    );
    assert_eq!(
        deliveries[1].result,
        DeliveryResult::Answered {
            status: 500,
            code: None
        }
    );
    assert_eq!(deliveries[3].result, DeliveryResult::Accepted);
    // Every attempt carries the same body and signature.
    assert!(deliveries.iter().all(|d| d.body == deliveries[0].body));
    let received = receiver.received("pay");
    assert_eq!(received.len(), 4);
    assert!(
        received
            .iter()
            .all(|r| r.content_hmac == received[0].content_hmac)
    );
}

#[tokio::test]
async fn check_answers_become_declines() {
    for (reply, reason) in [
        (Reply::Code(10), 3001),
        (Reply::Code(11), 3002),
        (Reply::Code(12), 3003),
        (Reply::Code(20), 3004),
        (Reply::Code(13), 3008),
        (Reply::Code(7), 3005),
        (Reply::Garbage, 3005),
        (Reply::Status(500), 3007),
    ] {
        let receiver = Receiver::start().await;
        receiver.script("check", &[reply]);
        let (fake, client) =
            start_with(FakeConfig::default().with_webhooks(receiver.webhooks())).await;
        let invoice = id("inv");
        let outcome = client
            .charge_cryptogram(&card_charge(CARD_OK, &invoice, "acc"), &id("req"))
            .await
            .unwrap();
        let ChargeOutcome::Declined(t) = outcome else {
            panic!("{reply:?}: expected a decline, got {outcome:?}")
        };
        assert_eq!(t.reason_code, ReasonCode(reason), "{reply:?}");
        assert_eq!(fake.charges_for_invoice(&invoice), 0);
        let fail = first(&receiver, "fail").await;
        let fail = FailNotification::parse(None, &fail.body).unwrap();
        assert_eq!(fail.reason_code, ReasonCode(reason));
        assert!(receiver.received("pay").is_empty());
    }
}

#[tokio::test]
async fn unreachable_check_declines_with_3006() {
    // A port that was free a moment ago: nothing listens there.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let webhooks = WebhookConfig::compressed()
        .with_url(NotificationKind::Check, format!("http://{closed}/check"));
    let (fake, client) = start_with(FakeConfig::default().with_webhooks(webhooks)).await;
    let account = id("acc");
    let outcome = client
        .charge_cryptogram(&card_charge(CARD_OK, &id("inv"), &account), &id("req"))
        .await
        .unwrap();
    let ChargeOutcome::Declined(t) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(t.reason_code, ReasonCode(3006));
    assert_eq!(fake.webhook_counts(), (1, 0));
}

#[tokio::test]
async fn token_refund_void_confirm_and_recurrent_notifications() {
    let receiver = Receiver::start().await;
    let (fake, client) = start_with(FakeConfig::default().with_webhooks(receiver.webhooks())).await;
    let account = id("acc");
    let payment = paid(&client, CARD_OK, &account).await;

    // A declined token renewal: Check, then Fail with the reason.
    let nsf = paid(&client, CARD_TOKEN_NSF, &account).await;
    let invoice = id("inv");
    client
        .charge_token(
            &token_charge(nsf.token.as_ref().unwrap(), &account, &invoice),
            &id("req"),
        )
        .await
        .unwrap();
    let fail = first(&receiver, "fail").await;
    let fail = FailNotification::parse(None, &fail.body).unwrap();
    assert_eq!(fail.reason_code, ReasonCode::INSUFFICIENT_FUNDS);
    assert_eq!(fail.payment.invoice_id.as_deref(), Some(invoice.as_str()));

    let refund_id = client
        .refund(payment.transaction_id, rub(5_000), &id("req"))
        .await
        .unwrap();
    let refund = first(&receiver, "refund").await;
    assert!(webhook::verify(
        &secret(),
        &refund.body,
        refund.content_hmac.as_deref().unwrap()
    ));
    let refund = RefundNotification::parse(None, &refund.body).unwrap();
    assert_eq!(refund.transaction_id, refund_id);
    assert_eq!(refund.payment_transaction_id, payment.transaction_id);
    assert_eq!(refund.amount, rub(5_000));

    let auth = client
        .auth_cryptogram(&card_charge(CARD_OK, &id("inv"), &account), &id("req"))
        .await
        .unwrap();
    client
        .void(auth.transaction_id(), &id("req"))
        .await
        .unwrap();
    let cancel = first(&receiver, "cancel").await;
    let cancel = CancelNotification::parse(None, &cancel.body).unwrap();
    assert_eq!(cancel.transaction_id, auth.transaction_id());

    let auth = client
        .auth_cryptogram(&card_charge(CARD_OK, &id("inv"), &account), &id("req"))
        .await
        .unwrap();
    client
        .confirm(auth.transaction_id(), rub(29_900), &id("req"))
        .await
        .unwrap();
    let confirm = first(&receiver, "confirm").await;
    let confirm = ConfirmNotification::parse(None, &confirm.body).unwrap();
    assert_eq!(confirm.payment.transaction_id, auth.transaction_id());
    assert_eq!(confirm.payment.status, Some(TransactionStatus::Completed));

    // The fake has no subscriptions; a Recurrent notification is sent on request.
    let fields = [
        ("Id", "sc_0123456789abcdef0123456789a"),
        ("AccountId", account.as_str()),
        ("Amount", "299.00"),
        ("Currency", "RUB"),
        ("RequireConfirmation", "0"),
        ("Status", "PastDue"),
        ("FailedTransactionsNumber", "1"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    assert!(fake.send_notification(client.public_id(), NotificationKind::Recurrent, fields));
    let recurrent = first(&receiver, "recurrent").await;
    let recurrent = RecurrentNotification::parse(None, &recurrent.body).unwrap();
    assert_eq!(recurrent.status.as_deref(), Some("PastDue"));
    assert_eq!(recurrent.amount, rub(29_900));
}

#[tokio::test]
async fn notifications_can_arrive_late_out_of_order_and_twice() {
    let receiver = Receiver::start().await;
    let (fake, client) = start_with(
        FakeConfig::default().with_fault_seed(3).with_webhooks(
            receiver
                .webhooks()
                .with_mischief(Duration::from_millis(300), 1.0),
        ),
    )
    .await;
    let mut sent = Vec::new();
    for _ in 0..6 {
        sent.push(paid(&client, CARD_OK, &id("acc")).await.transaction_id);
    }
    let pays = eventually("every Pay twice", Duration::from_secs(10), || async {
        let r = receiver.received("pay");
        (r.len() == 12).then_some(r)
    })
    .await;
    let ids: Vec<i64> = pays
        .iter()
        .map(|r| {
            let body = String::from_utf8_lossy(&r.body).into_owned();
            body.split('&')
                .find_map(|kv| kv.strip_prefix("TransactionId="))
                .and_then(|v| v.parse().ok())
                .expect("a TransactionId")
        })
        .collect();
    for t in &sent {
        assert_eq!(ids.iter().filter(|i| *i == t).count(), 2, "{t} twice");
    }
    let mut first_seen: Vec<i64> = Vec::new();
    for i in &ids {
        if !first_seen.contains(i) {
            first_seen.push(*i);
        }
    }
    assert_ne!(first_seen, sent, "delays reorder them (seed 3)");
    fake.shutdown().await;
}
