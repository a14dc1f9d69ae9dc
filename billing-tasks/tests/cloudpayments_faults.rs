//! Fault injection and the concurrency cap, seen through the client: which failures leave the
//! outcome unknown, and how `find` and a same-id retry settle them without a double charge.

mod cloudpayments_support;

use std::time::Duration;

use billing_tasks::cloudpayments::fake::{FakeConfig, Fault, TerminalConfig};
use billing_tasks::cloudpayments::{
    ChargeOutcome, Client, GatewayError, ReasonCode, TransactionStatus,
};
use cloudpayments_support::*;
use futures_util::future::join_all;

const CHARGE: &str = "/payments/cards/charge";
const TOKEN_CHARGE: &str = "/payments/tokens/charge";

/// A fake whose timeout faults hold requests far longer than the 300 ms client timeout.
async fn hanging_fake() -> (billing_tasks::cloudpayments::fake::FakeGateway, Client) {
    let (fake, _) = start_with(FakeConfig::default().with_hang(Duration::from_secs(30))).await;
    let client = client_with_timeout(&fake, Duration::from_millis(300));
    (fake, client)
}

#[tokio::test]
async fn timeout_after_processing_charged_and_find_shows_it() {
    let (fake, client) = hanging_fake().await;
    let invoice = id("inv");
    let request = id("req");
    let charge = card_charge(CARD_OK, &invoice, "acc");
    fake.push_fault_for(CHARGE, Fault::TimeoutAfterProcessing);

    let err = client
        .charge_cryptogram(&charge, &request)
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::Timeout { .. }), "{err:?}");
    assert!(err.outcome_unknown());
    assert!(err.is_retryable());

    // The charge happened: find shows it.
    let found = client
        .find(&invoice)
        .await
        .unwrap()
        .expect("the charge exists");
    assert_eq!(found.status, TransactionStatus::Completed);
    assert_eq!(fake.charges_for_invoice(&invoice), 1);

    // Retrying with the same id replays the stored answer at once and charges nothing more.
    let retried = client.charge_cryptogram(&charge, &request).await.unwrap();
    assert_eq!(retried.transaction_id(), found.transaction_id);
    assert!(matches!(retried, ChargeOutcome::Approved(_)));
    assert_eq!(fake.charges_for_invoice(&invoice), 1);

    // Shutting down ends the hanging request instead of waiting 30 s for it.
    tokio::time::timeout(Duration::from_secs(5), fake.shutdown())
        .await
        .expect("shutdown does not wait for hanging faults");
}

#[tokio::test]
async fn timeout_before_processing_charged_nothing() {
    let (fake, client) = hanging_fake().await;
    let invoice = id("inv");
    let request = id("req");
    let charge = card_charge(CARD_OK, &invoice, "acc");
    fake.push_fault_for(CHARGE, Fault::TimeoutBeforeProcessing);

    let err = client
        .charge_cryptogram(&charge, &request)
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::Timeout { .. }), "{err:?}");
    assert!(
        err.outcome_unknown(),
        "the client cannot know it was not processed"
    );
    assert_eq!(client.find(&invoice).await.unwrap(), None);

    let retried = client.charge_cryptogram(&charge, &request).await.unwrap();
    assert!(matches!(retried, ChargeOutcome::Approved(_)));
    assert_eq!(fake.charges_for_invoice(&invoice), 1);
}

#[tokio::test]
async fn server_errors_before_and_after_processing() {
    let (fake, client) = start().await;
    let account = id("acc");
    let token = paid(&client, CARD_OK, &account).await.token.unwrap();

    let invoice = id("inv");
    let request = id("req");
    let renewal = token_charge(&token, &account, &invoice);
    fake.push_fault_for(TOKEN_CHARGE, Fault::ServerErrorBeforeProcessing(503));
    let err = client.charge_token(&renewal, &request).await.unwrap_err();
    assert_eq!(err, GatewayError::ServerError { status: 503 });
    assert!(err.outcome_unknown());
    assert_eq!(client.find(&invoice).await.unwrap(), None);

    fake.push_fault_for(TOKEN_CHARGE, Fault::SERVER_ERROR_AFTER);
    let err = client.charge_token(&renewal, &request).await.unwrap_err();
    assert_eq!(err, GatewayError::ServerError { status: 500 });
    let found = client
        .find(&invoice)
        .await
        .unwrap()
        .expect("charged before the 500");
    let retried = client.charge_token(&renewal, &request).await.unwrap();
    assert_eq!(retried.transaction_id(), found.transaction_id);
    assert_eq!(fake.charges_for_invoice(&invoice), 1);
    assert_eq!(fake.charges_for_request(&invoice, &request), 1);
}

#[tokio::test]
async fn injected_429_and_declines() {
    let (fake, client) = start().await;
    let invoice = id("inv");
    fake.push_fault(Fault::TooManyRequests {
        retry_after: Some(Duration::from_secs(2)),
    });
    let err = client
        .charge_cryptogram(&card_charge(CARD_OK, &invoice, "acc"), &id("req"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        GatewayError::TooManyRequests {
            retry_after: Some(Duration::from_secs(2))
        }
    );
    assert!(!err.outcome_unknown());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    assert_eq!(fake.charges_for_invoice(&invoice), 0);

    // A queued decline skips non-payment calls and hits the next payment.
    let account = id("acc");
    let token = paid(&client, CARD_OK, &account).await.token.unwrap();
    fake.push_fault(Fault::Decline(ReasonCode(5091)));
    client.test().await.unwrap();
    assert_eq!(fake.pending_faults(), 1);
    let outcome = client
        .charge_token(&token_charge(&token, &account, &id("inv")), &id("req"))
        .await
        .unwrap();
    let ChargeOutcome::Declined(t) = outcome else {
        panic!("expected the injected decline, got {outcome:?}")
    };
    assert_eq!(t.reason_code, ReasonCode(5091));
    assert_eq!(fake.pending_faults(), 0);
}

#[tokio::test]
async fn faults_by_probability() {
    let (fake, client) = start().await;
    fake.set_fault_probability(Some(CHARGE), Fault::SERVER_ERROR_BEFORE, 1.0);
    for _ in 0..3 {
        let err = client
            .charge_cryptogram(&card_charge(CARD_OK, &id("inv"), "acc"), &id("req"))
            .await
            .unwrap_err();
        assert_eq!(err, GatewayError::ServerError { status: 500 });
    }
    client.test().await.expect("other paths are unaffected");
    fake.set_fault_probability(Some(CHARGE), Fault::SERVER_ERROR_BEFORE, 0.0);
    paid(&client, CARD_OK, "acc").await;

    fake.set_fault_probability(None, Fault::SERVER_ERROR_BEFORE, 1.0);
    assert!(client.test().await.is_err());
    fake.clear_faults();
    client.test().await.unwrap();
    assert_eq!(fake.transaction_count(), 1);
}

#[tokio::test]
async fn concurrency_cap_answers_429() {
    let terminal =
        TerminalConfig::test("test_api_capped", "capped-secret").with_concurrency_limit(2);
    let mut config = FakeConfig::default()
        .with_terminals(vec![terminal])
        .with_latency(Duration::from_secs(1));
    config.cap_retry_after = Some(Duration::from_secs(1));
    let (fake, client) = start_with(config).await;

    let invoices: Vec<String> = (0..6).map(|_| id("inv")).collect();
    let charges: Vec<_> = invoices
        .iter()
        .map(|i| card_charge(CARD_OK, i, "acc"))
        .collect();
    let ids: Vec<String> = (0..6).map(|_| id("req")).collect();
    let results = join_all(
        charges
            .iter()
            .zip(&ids)
            .map(|(c, r)| client.charge_cryptogram(c, r)),
    )
    .await;

    let mut approved = 0;
    for (result, invoice) in results.iter().zip(&invoices) {
        match result {
            Ok(ChargeOutcome::Approved(_)) => approved += 1,
            Err(e) => {
                assert_eq!(
                    e,
                    &GatewayError::TooManyRequests {
                        retry_after: Some(Duration::from_secs(1))
                    }
                );
                assert!(!e.outcome_unknown());
                assert_eq!(fake.charges_for_invoice(invoice), 0);
            }
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(approved, 2, "exactly the cap got through: {results:?}");
    eventually(
        "the in-flight count to drop",
        Duration::from_secs(5),
        || async { (fake.in_flight("test_api_capped") == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn connection_refused_is_certainly_nothing() {
    let (fake, client) = start().await;
    fake.shutdown().await;
    let err = client
        .charge_cryptogram(&card_charge(CARD_OK, &id("inv"), "acc"), &id("req"))
        .await
        .unwrap_err();
    assert!(matches!(err, GatewayError::Connect { .. }), "{err:?}");
    assert!(!err.outcome_unknown());
    assert!(err.is_retryable());
}
