//! The gRPC server: `billing.v1.Billing`, `grpc.health.v1.Health` (SERVING only while the ledger
//! and the broker answer, checked every [`HEALTH_INTERVAL`]) and server reflection, behind the
//! metrics and tracing layer, over plain HTTP/2 or TLS.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use super::api::BillingApi;
use super::metrics::{GrpcMetrics, MetricsLayer};
use super::proto::billing::v1::billing_server::BillingServer;
use crate::context::Billing;
use crate::error::{BillingError, Result};

/// How often the health status is re-checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// The largest request message accepted; larger ones answer RESOURCE_EXHAUSTED.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The health service name of the billing API (the empty name covers the whole server).
pub const SERVICE_NAME: &str = "billing.v1.Billing";

/// A certificate chain and its key, PEM.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The certificate chain.
    pub cert_pem: Vec<u8>,
    /// The private key (never logged).
    pub key_pem: crate::secret::Secret<Vec<u8>>,
}

/// Whether the ledger and the broker answer now.
pub async fn dependencies_ready(billing: &Billing) -> std::result::Result<(), String> {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(billing.db()),
    )
    .await;
    match db {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("ledger: {e}")),
        Err(_) => return Err("ledger: no answer in 2 s".into()),
    }
    match tokio::time::timeout(Duration::from_secs(2), billing.tasks().broker().ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("broker: {e}")),
        Err(_) => Err("broker: no answer in 2 s".into()),
    }
}

/// Serves until `shutdown` resolves, then drains in-flight calls.
pub async fn serve(
    listener: TcpListener,
    api: BillingApi,
    billing: Billing,
    metrics: Arc<GrpcMetrics>,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(async move {
        let mut last = None;
        loop {
            let ready = dependencies_ready(&billing).await;
            let status = if ready.is_ok() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            if last != Some(status) {
                match &ready {
                    Ok(()) => tracing::info!("gRPC health: SERVING"),
                    Err(why) => tracing::warn!(%why, "gRPC health: NOT_SERVING"),
                }
                reporter.set_service_status("", status).await;
                reporter.set_service_status(SERVICE_NAME, status).await;
                last = Some(status);
            }
            tokio::time::sleep(HEALTH_INTERVAL).await;
        }
    });
    // Both reflection versions: grpcurl asks v1, older clients (Python's grpcio-reflection) v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(super::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| BillingError::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| BillingError::Internal(format!("reflection: {e}")))?;
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(
                ServerTlsConfig::new()
                    .identity(Identity::from_pem(tls.cert_pem, tls.key_pem.into_inner())),
            )
            .map_err(|e| BillingError::invalid(format!("BILLING_GRPC_TLS_CERT/KEY: {e}")))?;
    }
    let billing_service = BillingServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES);
    let result = builder
        .layer(MetricsLayer(metrics))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(billing_service)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| BillingError::Internal(format!("gRPC server: {e}")));
    health_task.abort();
    result
}
