//! Secrets never print: cryptograms, card tokens and the API secret stay out of `Debug`,
//! `Display`, errors and logs, across real calls to the fake.

mod cloudpayments_support;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use billing_tasks::cloudpayments::fake::{self, FakeConfig, Fault, TerminalConfig};
use billing_tasks::cloudpayments::webhook::PayNotification;
use billing_tasks::cloudpayments::{ChargeOutcome, Client, Config, GatewayError};
use billing_tasks::secret::Secret;
use cloudpayments_support::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

const API_SECRET: &str = "API-SECRET-never-print-me";
const PUBLIC_ID: &str = "test_api_redaction";

/// Records every span field and event field as text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<String>>);

struct Writer<'a>(&'a mut String);

impl Visit for Writer<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        span.record(&mut Writer(&mut self.0.lock().unwrap()));
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        values.record(&mut Writer(&mut self.0.lock().unwrap()));
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut out = self.0.lock().unwrap();
        let _ = write!(out, "\n{} ", event.metadata().target());
        event.record(&mut Writer(&mut out));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} leaks a secret ({secret}):\n{text}"
        );
    }
}

#[tokio::test]
async fn secrets_stay_out_of_debug_errors_and_logs() {
    let capture = Capture::default();
    // The test runs on one thread, so the fake and the client both log into `capture`.
    let _guard = tracing::subscriber::set_default(capture.clone());

    let config = FakeConfig::default()
        .with_terminals(vec![TerminalConfig::test(PUBLIC_ID, API_SECRET)])
        .with_hang(Duration::from_secs(30));
    let (fake, client) = start_with(config).await;
    let basic = STANDARD.encode(format!("{PUBLIC_ID}:{API_SECRET}"));
    let mut secrets: Vec<String> = vec![API_SECRET.into(), basic];
    let mut seen = String::new();

    // Requests.
    let charge = card_charge(CARD_OK, &id("inv"), "acc");
    let cryptogram = charge.cryptogram.expose().clone();
    secrets.push(cryptogram.clone());
    writeln!(
        seen,
        "{charge:?} {:?} {client:?} {:?}",
        fake.client_config(),
        fake
    )
    .unwrap();

    // Responses with a token.
    let outcome = client.charge_cryptogram(&charge, &id("req")).await.unwrap();
    let ChargeOutcome::Approved(t) = &outcome else {
        panic!("{outcome:?}")
    };
    let token = t.token.clone().unwrap();
    secrets.push(token.expose().clone());
    writeln!(seen, "{outcome:?} {t:?} {:?}", fake.transactions()).unwrap();
    let renewal = token_charge(&token, "acc", &id("inv"));
    writeln!(seen, "{renewal:?}").unwrap();
    let renewed = client.charge_token(&renewal, &id("req")).await.unwrap();
    writeln!(
        seen,
        "{renewed:?} {:?}",
        client.get(renewed.transaction_id()).await
    )
    .unwrap();

    // Errors of every kind the calls above can meet.
    let mut errors: Vec<GatewayError> = Vec::new();
    let mut bad = card_charge(CARD_OK, &id("inv"), "acc");
    bad.cryptogram = Secret::new(format!("{cryptogram}-garbled"));
    errors.push(
        client
            .charge_cryptogram(&bad, &id("req"))
            .await
            .unwrap_err(),
    );
    let mut wrong = fake.client_config();
    wrong.api_secret = Secret::new(format!("{API_SECRET}-wrong"));
    errors.push(Client::new(wrong).unwrap().test().await.unwrap_err());
    fake.push_fault(Fault::TimeoutAfterProcessing);
    let impatient = client_with_timeout(&fake, Duration::from_millis(200));
    errors.push(
        impatient
            .charge_token(&renewal, &id("req"))
            .await
            .unwrap_err(),
    );
    fake.push_fault(Fault::SERVER_ERROR_BEFORE);
    errors.push(
        client
            .charge_cryptogram(&charge, &id("req"))
            .await
            .unwrap_err(),
    );
    for e in &errors {
        writeln!(seen, "{e} {e:?}").unwrap();
    }
    let config_error = Config::new(
        &format!("https://{PUBLIC_ID}:{API_SECRET}@api.example"),
        PUBLIC_ID,
        Secret::new(API_SECRET.into()),
    )
    .unwrap_err();
    writeln!(seen, "{config_error} {config_error:?}").unwrap();

    // Notifications carrying a token.
    let body = format!("TransactionId=1&Amount=1.00&Token={}", token.expose());
    let pay = PayNotification::parse(None, body.as_bytes()).unwrap();
    writeln!(seen, "{pay:?}").unwrap();

    fake.shutdown().await;
    let logs = capture.0.lock().unwrap().clone();
    assert!(
        logs.contains("cloudpayments call answered"),
        "the capture saw the client's logs:\n{logs}"
    );
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    assert_clean("Debug/Display output", &seen, &secrets);
    assert_clean("logs", &logs, &secrets);
    // The test is only as good as its inputs: the secrets really were in play.
    assert!(seen.contains("***"));
    assert!(fake::test_cryptogram(CARD_OK, EXP).len() > 20);
}
