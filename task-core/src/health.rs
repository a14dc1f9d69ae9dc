//! A worker's HTTP endpoints for Prometheus and Kubernetes probes.
//!
//! - `GET /metrics`: [`WorkerMetrics`] as OpenMetrics text.
//! - `GET /livez`: 200 `ok` while the process serves HTTP at all. It checks nothing else on
//!   purpose: a liveness probe that depended on RabbitMQ or Redis would restart every replica at
//!   once during a broker blip, which only makes the blip worse.
//! - `GET /readyz`: 200 when every [`ReadinessCheck`] passes within its timeout, 503 otherwise;
//!   the JSON body names each check, e.g. `{"backend":"unreachable: timed out","broker":"ok"}`.
//!   Checks run concurrently, so the probe answers within the longest timeout.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, join_all};
use tokio::net::TcpListener;

use crate::metrics::WorkerMetrics;

/// How long a readiness check may take before it counts as failed.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The content type prometheus-client's text encoder produces.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A probe of one dependency: resolves to `Err(reason)` when it is not usable.
pub type CheckFn = dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync;

/// One named readiness check, e.g. a broker or result-backend ping.
///
/// ```
/// use task_core::health::ReadinessCheck;
///
/// let broker = ReadinessCheck::new("broker", || async { Ok(()) });
/// assert_eq!(broker.name(), "broker");
/// ```
#[derive(Clone)]
pub struct ReadinessCheck {
    name: String,
    check: Arc<CheckFn>,
    timeout: Duration,
}

impl std::fmt::Debug for ReadinessCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadinessCheck")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ReadinessCheck {
    /// A check named `name` (the key in `/readyz`'s JSON) with [`DEFAULT_CHECK_TIMEOUT`].
    pub fn new<F, Fut>(name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        ReadinessCheck {
            name: name.into(),
            check: Arc::new(move || check().boxed()),
            timeout: DEFAULT_CHECK_TIMEOUT,
        }
    }

    /// The same check with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The check's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ok`, or `unreachable: <reason>` (a timeout is a reason too).
    async fn run(&self) -> String {
        match tokio::time::timeout(self.timeout, (self.check)()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(reason)) => format!("unreachable: {reason}"),
            Err(_) => format!("unreachable: no answer within {:?}", self.timeout),
        }
    }
}

#[derive(Clone, Debug)]
struct AppState {
    metrics: WorkerMetrics,
    checks: Arc<[ReadinessCheck]>,
}

/// The router serving `/metrics`, `/livez` and `/readyz`.
pub fn app(metrics: WorkerMetrics, checks: Vec<ReadinessCheck>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(AppState {
            metrics,
            checks: checks.into(),
        })
}

/// Serves `router` on `listener` until `shutdown` resolves, then finishes the requests in
/// flight and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<BTreeMap<String, String>>) {
    let results = join_all(state.checks.iter().map(ReadinessCheck::run)).await;
    let ready = results.iter().all(|r| r == "ok");
    let body = state
        .checks
        .iter()
        .map(|c| c.name.clone())
        .zip(results)
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::body::Body;
    use axum::http::Request;
    use serde_json::{Value, json};
    use tower::ServiceExt;

    use super::*;

    async fn get(app: Router, path: &str) -> (StatusCode, String, Option<String>) {
        let response = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            String::from_utf8(body.to_vec()).unwrap(),
            content_type,
        )
    }

    fn passing(name: &str) -> ReadinessCheck {
        ReadinessCheck::new(name, || async { Ok(()) })
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics_text() {
        let metrics = WorkerMetrics::new("celery@a");
        metrics.received("diag.echo", "celery");
        let (status, body, content_type) = get(app(metrics, vec![]), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(
            body.lines()
                .any(|l| l == r#"tq_tasks_received_total{task="diag.echo",queue="celery"} 1"#),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn livez_is_ok_even_when_dependencies_fail() {
        let failing = ReadinessCheck::new("broker", || async { Err("connection refused".into()) });
        let (status, body, _) = get(app(WorkerMetrics::new("w"), vec![failing]), "/livez").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    }

    #[tokio::test]
    async fn readyz_is_200_when_every_check_passes() {
        let router = app(
            WorkerMetrics::new("w"),
            vec![passing("broker"), passing("backend")],
        );
        let (status, body, content_type) = get(router, "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some("application/json"));
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body, json!({"broker": "ok", "backend": "ok"}));
    }

    #[tokio::test]
    async fn readyz_is_503_and_names_the_failing_check() {
        let up = Arc::new(AtomicBool::new(false));
        let backend = {
            let up = up.clone();
            ReadinessCheck::new("backend", move || {
                let up = up.load(Ordering::SeqCst);
                async move {
                    if up {
                        Ok(())
                    } else {
                        Err("redis://h:6379/0: connection refused".to_owned())
                    }
                }
            })
        };
        let router = app(WorkerMetrics::new("w"), vec![passing("broker"), backend]);
        let (status, body, _) = get(router.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            body,
            json!({
                "broker": "ok",
                "backend": "unreachable: redis://h:6379/0: connection refused",
            })
        );

        // Checks run on every request: the pod becomes ready again by itself.
        up.store(true, Ordering::SeqCst);
        assert_eq!(get(router, "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_hangs_fails_after_its_timeout() {
        let hangs = ReadinessCheck::new("broker", std::future::pending)
            .with_timeout(Duration::from_millis(500));
        let started = tokio::time::Instant::now();
        let (status, body, _) = get(app(WorkerMetrics::new("w"), vec![hangs]), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["broker"], "unreachable: no answer within 500ms");
    }

    #[tokio::test]
    async fn serve_answers_until_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            app(WorkerMetrics::new("w"), vec![]),
            async {
                let _ = stopped.await;
            },
        ));

        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = "GET /livez HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut response)
            .await
            .unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("ok"), "{response}");

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}
