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
