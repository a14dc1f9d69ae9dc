//! A tower layer around the gRPC server: one tracing span per call carrying its request id
//! (`x-request-id` from the caller, or a new one, echoed in the response), and Prometheus metrics
//! by method and status code with a latency histogram.
//!
//! The code is read from the response headers, where a status that ends a call before any message
//! (every error, including decoding failures and bad credentials) travels; a call whose status
//! only comes in the trailers (a success, or a stream) counts as OK. Latency is the time to the
//! response headers: the whole call for a unary method, the start for a stream.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::codegen::http;
use tracing::Instrument;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// The gRPC request metrics.
#[derive(Debug, Clone)]
pub struct GrpcMetrics {
    requests: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
}

impl GrpcMetrics {
    /// Registers `billing_grpc_requests_total{method,code}` and
    /// `billing_grpc_request_duration_seconds{method}` in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let requests = Family::<CallLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "billing_grpc_requests",
            "gRPC calls answered, by method and status code",
            requests.clone(),
        );
        registry.register(
            "billing_grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to its response headers",
            latency.clone(),
        );
        Arc::new(GrpcMetrics { requests, latency })
    }

    fn record(&self, method: &str, code: tonic::Code, seconds: f64) {
        self.requests
            .get_or_create(&CallLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(seconds);
    }
}

/// The layer; see the module docs.
#[derive(Debug, Clone)]
pub struct MetricsLayer(pub Arc<GrpcMetrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = Metered<S>;
    fn layer(&self, inner: S) -> Metered<S> {
        Metered {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// The service [`MetricsLayer`] wraps around another.
#[derive(Debug, Clone)]
pub struct Metered<S> {
    inner: S,
    metrics: Arc<GrpcMetrics>,
}

/// `Service/Method` for the paths this server has, `unknown` for anything else (so a caller
/// cannot grow the metric's label set).
fn method_label(path: &str) -> String {
    let known = [
        "/billing.v1.Billing/",
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ];
    for prefix in known {
        if let Some(m) = path.strip_prefix(prefix)
            && !m.is_empty()
            && m.len() <= 64
            && m.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return format!("{}/{m}", prefix.trim_matches('/'));
        }
    }
    "unknown".to_owned()
}

fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

impl<S, B, RB> tower::Service<http::Request<B>> for Metered<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let request_id = request_id(req.headers());
        let span = tracing::info_span!("grpc", method = %method, request_id = %request_id);
        // The clone that was made ready is the one that serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics.clone();
        Box::pin(
            async move {
                let start = Instant::now();
                let mut response = inner.call(req).await?;
                let code = response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(tonic::Code::from_i32)
                    .unwrap_or(tonic::Code::Ok);
                let elapsed = start.elapsed().as_secs_f64();
                metrics.record(&method, code, elapsed);
                if code != tonic::Code::Ok {
                    tracing::info!(code = ?code, elapsed_ms = elapsed * 1e3, "call refused");
                }
                if let Ok(v) = http::HeaderValue::from_str(&request_id) {
                    response.headers_mut().insert("x-request-id", v);
                }
                Ok(response)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::method_label;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            method_label("/billing.v1.Billing/StartSubscription"),
            "billing.v1.Billing/StartSubscription"
        );
        assert_eq!(method_label("/billing.v1.Billing/x-y"), "unknown");
        assert_eq!(method_label("/evil/thing"), "unknown");
    }
}
