//! grpc.health.v1 answers SERVING only while the ledger and the broker answer: the same server
//! over a ledger that cannot be reached answers NOT_SERVING.

mod billing_support;

use std::sync::Arc;
use std::time::Duration;

use billing_support::*;
use billing_tasks::grpc::api::BillingApi;
use billing_tasks::grpc::caller::Authenticator;
use billing_tasks::grpc::metrics::GrpcMetrics;
use billing_tasks::{Billing, BillingService, cloudpayments};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn health_of(billing: Billing) -> ServingStatus {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = BillingApi::new(
        BillingService::new(billing.clone()),
        Arc::new(Authenticator::new("auth", "billing")),
    );
    let mut registry = prometheus_client::registry::Registry::default();
    let server = tokio::spawn(billing_tasks::grpc::server::serve(
        listener,
        api,
        billing,
        GrpcMetrics::register(&mut registry),
        None,
        futures_util::future::pending(),
    ));
    let status = eventually("a health answer", Duration::from_secs(20), || async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .ok()?;
        let mut c = HealthClient::new(channel);
        let s = c
            .check(HealthCheckRequest {
                service: "billing.v1.Billing".into(),
            })
            .await
            .ok()?
            .into_inner()
            .status;
        // Unknown until the first check has run.
        (s != ServingStatus::ServiceUnknown as i32).then_some(s)
    })
    .await;
    server.abort();
    ServingStatus::try_from(status).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_only_while_the_ledger_and_broker_answer() {
    let env = Env::start().await;
    assert_eq!(health_of(env.billing.clone()).await, ServingStatus::Serving);

    // The same, over a ledger nobody listens for.
    let dead_db = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://postgres@127.0.0.1:1/billing")
        .unwrap();
    let gateway = cloudpayments::Client::new(env.fake.client_config()).unwrap();
    let broken = Billing::new(
        dead_db,
        gateway,
        env.billing.policy().clone(),
        env.clock.clock(),
        env.tasks.clone(),
    );
    assert_eq!(health_of(broken).await, ServingStatus::NotServing);
    env.stop().await;
}

/// With a certificate and key the API speaks TLS only; a client trusting the certificate is
/// answered, a plaintext one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_served_when_configured() {
    use billing_tasks::grpc::server::Tls;
    use billing_tasks::secret::Secret;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    let dir = std::env::temp_dir().join(format!("billing-tls-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let ok = std::process::Command::new("openssl")
        .current_dir(&dir)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .output()
        .expect("openssl runs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let cert = std::fs::read(dir.join("cert.pem")).unwrap();
    let key = std::fs::read(dir.join("key.pem")).unwrap();

    let env = Env::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = BillingApi::new(
        env.service.clone(),
        Arc::new(Authenticator::new("auth", "billing")),
    );
    let mut registry = prometheus_client::registry::Registry::default();
    let server = tokio::spawn(billing_tasks::grpc::server::serve(
        listener,
        api,
        env.billing.clone(),
        GrpcMetrics::register(&mut registry),
        Some(Tls {
            cert_pem: cert.clone(),
            key_pem: Secret::new(key),
        }),
        futures_util::future::pending(),
    ));
    let status = eventually(
        "a health answer over TLS",
        Duration::from_secs(20),
        || async {
            let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
                .unwrap()
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(&cert))
                        .domain_name("localhost"),
                )
                .unwrap()
                .connect()
                .await
                .ok()?;
            let s = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .status;
            (s == ServingStatus::Serving as i32).then_some(s)
        },
    )
    .await;
    assert_eq!(status, ServingStatus::Serving as i32);
    let plain = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain {
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await;
        assert!(r.is_err(), "a plaintext call is not answered: {r:?}");
    }
    server.abort();
    let _ = std::fs::remove_dir_all(dir);
    env.stop().await;
}
