//! `amqps://` against a real TLS listener: socat (OpenSSL) terminating TLS in front of the local
//! RabbitMQ, with a CA, a broker certificate for `localhost` and a client certificate that the
//! test makes with the `openssl` command (`scripts/services` installs both tools).

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use task_core::broker::BrokerTls;
use task_core::protocol::{Properties, RawMessage};
use task_core::{AmqpBroker, Broker};

/// A private CA and the certificates it signed, in a temporary directory.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn make() -> Pki {
        let dir = std::env::temp_dir().join(format!("amqp-tls-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let ssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl (scripts/services installs it)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=task-core test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        for (name, ext) in [
            (
                "broker",
                "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
            ),
            ("client", "extendedKeyUsage=clientAuth\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            ssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            ssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ]);
            // rustls takes PKCS#8 keys; `openssl req -nodes` writes them so already.
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// socat listening with TLS on a free loopback port and forwarding each connection to RabbitMQ.
struct TlsListener {
    child: Child,
    port: u16,
}

impl TlsListener {
    fn start(pki: &Pki, require_client_certificate: bool) -> TlsListener {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let verify = if require_client_certificate {
            format!("verify=1,cafile={}", pki.path("ca.pem"))
        } else {
            "verify=0".to_owned()
        };
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},{verify}",
            pki.path("broker.pem"),
            pki.path("broker.key"),
        );
        let child = Command::new("socat")
            .args([listen.as_str(), "TCP:127.0.0.1:5672"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (scripts/services installs it)");
        let listener = TlsListener { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return listener;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("socat did not listen on {port}");
    }

    fn url(&self, host: &str) -> String {
        format!("amqps://guest:guest@{host}:{}/%2f", self.port)
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let tls = TlsListener::start(&pki, false);

    let broker = AmqpBroker::connect_with_tls(&tls.url("localhost"), trusting(&pki, false))
        .await
        .expect("TLS to the broker with the test CA");
    round_trip(&broker).await;

    // Not trusted: the system's store does not know the test CA.
    let err = AmqpBroker::connect_with_tls(&tls.url("localhost"), BrokerTls::default())
        .await
        .expect_err("an unknown issuer is refused");
    let text = err.to_string();
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // The certificate names `localhost`, not 127.0.0.1.
    let err = AmqpBroker::connect_with_tls(&tls.url("127.0.0.1"), trusting(&pki, false))
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
    let tls = TlsListener::start(&pki, true);

    let broker = AmqpBroker::connect_with_tls(&tls.url("localhost"), trusting(&pki, true))
        .await
        .expect("TLS with a client certificate");
    round_trip(&broker).await;

    assert!(
        AmqpBroker::connect_with_tls(&tls.url("localhost"), trusting(&pki, false))
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
