//! `X-Request-ID` replay (§5): a repeat gets the identical first response and charges nothing.

mod cloudpayments_support;

use std::time::Duration;

use billing_tasks::cloudpayments::fake::{self, FakeConfig, FakeGateway, TerminalConfig};
use billing_tasks::cloudpayments::{ChargeOutcome, Client};
use cloudpayments_support::*;
use futures_util::future::join_all;

/// Sends a raw charge with `request_id`; returns the exact response bytes.
async fn raw_charge(fake: &FakeGateway, request_id: &str, invoice: &str, amount: &str) -> Vec<u8> {
    let config = fake.client_config();
    let body = format!(
        r#"{{"Amount":{amount},"IpAddress":"1.2.3.4","CardCryptogramPacket":"{}","InvoiceId":"{invoice}","AccountId":"acc"}}"#,
        fake::test_cryptogram(CARD_OK, EXP)
    );
    let response = reqwest::Client::new()
        .post(format!("{}/payments/cards/charge", fake.url()))
        .basic_auth(&config.public_id, Some(config.api_secret.expose()))
        .header("Content-Type", "application/json")
        .header("X-Request-ID", request_id)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn sequential_repeat_gets_the_identical_response() {
    let (fake, client) = start().await;
    let invoice = id("inv");
    let request = id("req");
    let first = raw_charge(&fake, &request, &invoice, "10.00").await;
    let second = raw_charge(&fake, &request, &invoice, "10.00").await;
    assert_eq!(first, second, "byte for byte");
    // The stored response wins even if the repeat differs (the documented default).
    let third = raw_charge(&fake, &request, &id("other-invoice"), "99.00").await;
    assert_eq!(first, third);
    assert_eq!(fake.charges_for_invoice(&invoice), 1);
    assert_eq!(fake.charges_for_request(&invoice, &request), 1);
    assert_eq!(fake.transaction_count(), 1);

    // Through the client.
    let invoice = id("inv");
    let request = id("req");
    let charge = card_charge(CARD_OK, &invoice, "acc");
    let a = client.charge_cryptogram(&charge, &request).await.unwrap();
    let b = client.charge_cryptogram(&charge, &request).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(fake.charges_for_invoice(&invoice), 1);
    assert_eq!(fake.requests("/payments/cards/charge"), 5);
}

#[tokio::test]
async fn declines_refunds_and_token_charges_replay_too() {
    let (fake, client) = start().await;
    let request = id("req");
    let charge = card_charge(CARD_NSF, &id("inv"), "acc");
    let a = client.charge_cryptogram(&charge, &request).await.unwrap();
    let count = fake.transaction_count();
    let b = client.charge_cryptogram(&charge, &request).await.unwrap();
    assert!(matches!(a, ChargeOutcome::Declined(_)));
    assert_eq!(a, b);
    assert_eq!(
        fake.transaction_count(),
        count,
        "no second attempt was made"
    );

    let payment = paid(&client, CARD_OK, "acc").await;
    let refund_request = id("refund");
    let r1 = client
        .refund(payment.transaction_id, rub(10_000), &refund_request)
        .await
        .unwrap();
    let r2 = client
        .refund(payment.transaction_id, rub(10_000), &refund_request)
        .await
        .unwrap();
    assert_eq!(r1, r2);
    assert_eq!(
        fake.transaction(payment.transaction_id).unwrap().refunded,
        rub(10_000)
    );

    let token = payment.token.unwrap();
    let invoice = id("inv");
    let request = id("req");
    let renewal = token_charge(&token, "acc", &invoice);
    for _ in 0..3 {
        client.charge_token(&renewal, &request).await.unwrap();
    }
    assert_eq!(fake.charges_for_invoice(&invoice), 1);
}

#[tokio::test]
async fn concurrent_duplicates_are_processed_once() {
    // The first request sleeps 200 ms in "processing"; its duplicates arrive meanwhile.
    let config = FakeConfig::default()
        .with_terminals(vec![TerminalConfig::production("pk_prod", "prod-secret")])
        .with_latency(Duration::from_millis(200));
    let (fake, client) = start_with(config).await;
    let invoice = id("inv");
    let request = id("req");
    let charge = card_charge(CARD_OK, &invoice, "acc");
    let outcomes = join_all((0..10).map(|_| client.charge_cryptogram(&charge, &request))).await;
    let first = outcomes[0].clone().unwrap();
    for outcome in &outcomes {
        assert_eq!(outcome.as_ref().unwrap(), &first);
    }
    assert_eq!(fake.requests("/payments/cards/charge"), 10);
    assert_eq!(fake.charges_for_invoice(&invoice), 1);
    assert_eq!(fake.transaction_count(), 1);
}

#[tokio::test]
async fn keys_are_per_terminal() {
    let config = FakeConfig::default().with_terminal(other_terminal());
    let (fake, client) = start_with(config).await;
    let other = Client::new(fake.client_config_for(&other_terminal().public_id).unwrap()).unwrap();
    let invoice = id("inv");
    let request = id("req");
    let charge = card_charge(CARD_OK, &invoice, "acc");
    let a = client.charge_cryptogram(&charge, &request).await.unwrap();
    let b = other.charge_cryptogram(&charge, &request).await.unwrap();
    assert_ne!(a.transaction_id(), b.transaction_id());
    assert_eq!(fake.charges_for_invoice(&invoice), 2);
}

#[tokio::test]
async fn stored_responses_expire_after_the_ttl() {
    let config = FakeConfig::default().with_idempotency_ttl(Duration::from_millis(150));
    let (fake, client) = start_with(config).await;
    let invoice = id("inv");
    let request = id("req");
    let charge = card_charge(CARD_OK, &invoice, "acc");
    let first = client.charge_cryptogram(&charge, &request).await.unwrap();
    assert_eq!(fake.idempotency_entries(), 1);
    // Repeats are replays until the window closes; then the same id is a new operation.
    let second = eventually(
        "the replay window to close",
        Duration::from_secs(5),
        || async {
            let again = client.charge_cryptogram(&charge, &request).await.unwrap();
            (again.transaction_id() != first.transaction_id()).then_some(again)
        },
    )
    .await;
    assert_ne!(second.transaction_id(), first.transaction_id());
    assert_eq!(fake.charges_for_invoice(&invoice), 2);
    assert_eq!(fake.charges_for_request(&invoice, &request), 2);
    assert_eq!(
        fake.idempotency_entries(),
        1,
        "the expired entry was pruned"
    );
}
