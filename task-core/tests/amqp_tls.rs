//! `amqps://` against a real TLS listener: socat (OpenSSL) terminating TLS in front of the local
//! RabbitMQ, with a CA, a broker certificate for `localhost` and a client certificate that the
//! test makes with the `openssl` command (`scripts/services` installs both tools).

mod common;

use std::time::Duration;

use common::tls::{Pki, TlsListener};

use task_core::broker::BrokerTls;
use task_core::protocol::{Properties, RawMessage};
use task_core::{AmqpBroker, Broker};

fn trusting(pki: &Pki, client: bool) -> BrokerTls {
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    BrokerTls::from_files(
        Some(&pki.path("ca.pem")),
        client.then_some(cert.as_str()),
        client.then_some(key.as_str()),
    )
    .unwrap()
}

/// A message published and consumed over `broker` comes back intact.
async fn round_trip(broker: &AmqpBroker) {
    let queue = common::unique_queue("tls");
    let mut headers = serde_json::Map::new();
    headers.insert("id".into(), serde_json::json!("tls-1"));
    let message = RawMessage {
        headers,
        properties: Properties {
            content_type: Some("application/json".into()),
            delivery_mode: Some(2),
            ..Default::default()
        },
        body: b"[[1, 2], {}, {}]".to_vec(),
    };
    broker.publish(&queue, &message).await.unwrap();
    let mut consumer = broker
        .consume(std::slice::from_ref(&queue), 1)
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the message comes back over TLS")
        .expect("a delivery");
    assert_eq!(delivery.message.body, message.body);
    delivery.ack().await.unwrap();
    broker.delete_queue(&queue).await.unwrap();
}

#[tokio::test]
async fn amqps_verifies_the_broker_with_the_configured_ca_and_carries_tasks() {
    let pki = Pki::make();
    let tls = TlsListener::start(&pki, 5672, false);

    let broker =
        AmqpBroker::connect_with_tls(&tls.url("amqps", "localhost"), trusting(&pki, false))
            .await
            .expect("TLS to the broker with the test CA");
    round_trip(&broker).await;

    // Not trusted: the system's store does not know the test CA.
    let err = AmqpBroker::connect_with_tls(&tls.url("amqps", "localhost"), BrokerTls::default())
        .await
        .expect_err("an unknown issuer is refused");
    let text = err.to_string();
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // The certificate names `localhost`, not 127.0.0.1.
    let err = AmqpBroker::connect_with_tls(&tls.url("amqps", "127.0.0.1"), trusting(&pki, false))
        .await
        .expect_err("a name the certificate does not carry is refused");
    let text = err.to_string();
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // Plain AMQP to a TLS port never speaks the protocol in the clear to it.
    let plain = format!("amqp://guest:guest@localhost:{}/%2f", tls.port);
    assert!(
        AmqpBroker::connect_with_tls(&plain, trusting(&pki, false))
            .await
            .is_err()
    );
    println!("amqps round trip ok; unknown CA, wrong name and plain text refused: {text}");
}

#[tokio::test]
async fn amqps_presents_a_client_certificate_where_the_broker_requires_one() {
    let pki = Pki::make();
    let tls = TlsListener::start(&pki, 5672, true);

    let broker = AmqpBroker::connect_with_tls(&tls.url("amqps", "localhost"), trusting(&pki, true))
        .await
        .expect("TLS with a client certificate");
    round_trip(&broker).await;

    assert!(
        AmqpBroker::connect_with_tls(&tls.url("amqps", "localhost"), trusting(&pki, false))
            .await
            .is_err(),
        "without a client certificate the listener hangs up"
    );
}

#[test]
fn tls_settings_that_cannot_work_stop_at_start() {
    let missing = BrokerTls::from_files(Some("/nonexistent/ca.pem"), None, None).unwrap_err();
    assert!(
        missing
            .to_string()
            .contains("BROKER_TLS_CA_FILE /nonexistent/ca.pem"),
        "{missing}"
    );
    let half = BrokerTls::from_files(None, Some("/etc/hostname"), None).unwrap_err();
    assert!(half.to_string().contains("go together"), "{half}");
    let not_pem = BrokerTls::from_files(Some("/etc/hostname"), None, None).unwrap_err();
    assert!(not_pem.to_string().contains("not a PEM file"), "{not_pem}");
}
