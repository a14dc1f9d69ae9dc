//! Prometheus metrics and the `/metrics` and `/healthz` endpoints (served on `METRICS_BIND`).
//!
//! Counters are named without `_total`: prometheus-client appends it (and panics in debug
//! builds if the name already has it). Labels are typed structs whose only free-form value is
//! the entry name, which an operator chose, so cardinality stays bounded by the schedule.
//!
//! `/healthz` answers 200 while the state store answers (a replica that cannot reach Redis can
//! neither lead nor take over, and should be restarted or routed around), 503 otherwise; its
//! JSON says whether this replica leads.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::watch;

use crate::lease::Role;
use crate::store::Store;

/// Labels of per-entry counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EntryLabels {
    /// Entry name.
    pub entry: String,
}

/// Why a tick is skipped: `missed` (the catch-up policy drops it), `overlap` (the previous run
/// has not finished), `in_doubt` (claimed by a leader that stopped before confirming).
pub(crate) const SKIP_REASONS: &[&str] = &["missed", "overlap", "in_doubt"];

/// Labels of skipped ticks.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    /// Entry name.
    pub entry: String,
    /// `missed` (dropped by the catch-up policy) or `overlap` (the previous run was not done).
    pub reason: String,
}

/// The scheduler's metrics. Cheap to clone; clones share values.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    ticks_fired: Family<EntryLabels, Counter>,
    ticks_late: Family<EntryLabels, Counter>,
    ticks_skipped: Family<SkipLabels, Counter>,
    publish_errors: Family<EntryLabels, Counter>,
    leader: Gauge,
    lease_acquired: Counter,
    lease_renewals: Counter,
    lease_lost: Counter,
}

impl Metrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "beat_ticks_fired",
            "Ticks published to the broker",
            self.ticks_fired.clone(),
        );
        registry.register(
            "beat_ticks_late",
            "Ticks published more than the grace period after their time",
            self.ticks_late.clone(),
        );
        registry.register(
            "beat_ticks_skipped",
            "Ticks not published, by reason (missed: catch-up policy; overlap: previous run not done)",
            self.ticks_skipped.clone(),
        );
        registry.register(
            "beat_publish_errors",
            "Failed publish attempts (the tick is retried)",
            self.publish_errors.clone(),
        );
        registry.register(
            "beat_leader",
            "1 while this replica holds the leader lease",
            self.leader.clone(),
        );
        registry.register(
            "beat_lease_acquired",
            "Times this replica became leader",
            self.lease_acquired.clone(),
        );
        registry.register(
            "beat_lease_renewals",
            "Successful renewals of the leader lease",
            self.lease_renewals.clone(),
        );
        registry.register(
            "beat_lease_lost",
            "Times this replica lost the lease while leading",
            self.lease_lost.clone(),
        );
    }

    fn entry(entry: &str) -> EntryLabels {
        EntryLabels {
            entry: entry.to_owned(),
        }
    }

    /// Creates an entry's series at zero, so dashboards see them before the first tick and an
    /// alert on `increase(...)` sees the first error or skip.
    pub(crate) fn track(&self, entry: &str) {
        let labels = Self::entry(entry);
        let _ = self.ticks_fired.get_or_create(&labels);
        let _ = self.ticks_late.get_or_create(&labels);
        let _ = self.publish_errors.get_or_create(&labels);
        for reason in SKIP_REASONS {
            let _ = self.ticks_skipped.get_or_create(&SkipLabels {
                entry: entry.to_owned(),
                reason: (*reason).to_owned(),
            });
        }
    }

    pub(crate) fn fired(&self, entry: &str, late: bool) {
        self.ticks_fired.get_or_create(&Self::entry(entry)).inc();
        if late {
            self.ticks_late.get_or_create(&Self::entry(entry)).inc();
        }
    }

    pub(crate) fn skipped(&self, entry: &str, reason: &str, n: u64) {
        self.ticks_skipped
            .get_or_create(&SkipLabels {
                entry: entry.to_owned(),
                reason: reason.to_owned(),
            })
            .inc_by(n);
    }

    pub(crate) fn publish_error(&self, entry: &str) {
        self.publish_errors.get_or_create(&Self::entry(entry)).inc();
    }

    pub(crate) fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub(crate) fn acquired(&self) {
        self.lease_acquired.inc();
    }

    pub(crate) fn renewed(&self) {
        self.lease_renewals.inc();
    }

    pub(crate) fn lost(&self) {
        self.lease_lost.inc();
    }

    /// Ticks of `entry` published by this replica.
    pub fn ticks_fired(&self, entry: &str) -> u64 {
        self.ticks_fired.get_or_create(&Self::entry(entry)).get()
    }

    /// Ticks of `entry` published late by this replica.
    pub fn ticks_late(&self, entry: &str) -> u64 {
        self.ticks_late.get_or_create(&Self::entry(entry)).get()
    }

    /// Ticks of `entry` skipped for `reason` (`missed` or `overlap`) by this replica.
    pub fn ticks_skipped(&self, entry: &str, reason: &str) -> u64 {
        self.ticks_skipped
            .get_or_create(&SkipLabels {
                entry: entry.to_owned(),
                reason: reason.to_owned(),
            })
            .get()
    }

    /// Whether this replica leads, as the gauge says.
    pub fn is_leader(&self) -> bool {
        self.leader.get() == 1
    }

    /// Successful lease renewals.
    pub fn lease_renewals(&self) -> u64 {
        self.lease_renewals.get()
    }

    /// Times the lease was lost.
    pub fn lease_lost(&self) -> u64 {
        self.lease_lost.get()
    }
}

/// What the endpoints need.
#[derive(Clone, Debug)]
pub struct AppState {
    registry: Arc<Registry>,
    store: Store,
    role: watch::Receiver<Role>,
    node_id: String,
}

impl AppState {
    /// State for [`app`]: the registry to encode, the store to check, this replica's role.
    pub fn new(
        registry: Registry,
        store: Store,
        role: watch::Receiver<Role>,
        node_id: impl Into<String>,
    ) -> Self {
        AppState {
            registry: Arc::new(registry),
            store,
            role,
            node_id: node_id.into(),
        }
    }
}

/// The router serving `/metrics` (OpenMetrics text) and `/healthz` (JSON).
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// How long `/healthz` waits for the store before calling it unavailable.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let role = match *state.role.borrow() {
        Role::Leader { .. } => "leader",
        Role::Follower => "follower",
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, state.store.count()).await {
        Ok(Ok(entries)) => (
            StatusCode::OK,
            Json(json!({
                "status": "ok",
                "role": role,
                "node_id": state.node_id,
                "entries": entries,
            })),
        ),
        Ok(Err(e)) => unavailable(role, &state.node_id, e.to_string()),
        Err(_) => unavailable(
            role,
            &state.node_id,
            format!("the store did not answer within {HEALTH_TIMEOUT:?}"),
        ),
    }
}

fn unavailable(role: &str, node_id: &str, error: String) -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "unavailable",
            "role": role,
            "node_id": node_id,
            "error": error,
        })),
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
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

    fn state(store: Store, role: Role) -> (AppState, Metrics, watch::Sender<Role>) {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let (tx, rx) = watch::channel(role);
        (AppState::new(registry, store, rx, "beat@test"), metrics, tx)
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics_text() {
        let (state, metrics, _role) = state(Store::memory("m:"), Role::Follower);
        metrics.fired("billing.deliver_outbox", false);
        metrics.fired("billing.deliver_outbox", true);
        metrics.skipped("billing.deliver_outbox", "missed", 3);
        metrics.set_leader(true);
        metrics.renewed();
        metrics.lost();
        let (status, body, content_type) = get(app(state), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            content_type
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        for line in [
            "beat_ticks_fired_total{entry=\"billing.deliver_outbox\"} 2",
            "beat_ticks_late_total{entry=\"billing.deliver_outbox\"} 1",
            "beat_ticks_skipped_total{entry=\"billing.deliver_outbox\",reason=\"missed\"} 3",
            "beat_leader 1",
            "beat_lease_renewals_total 1",
            "beat_lease_lost_total 1",
            "# EOF",
        ] {
            assert!(
                body.lines().any(|l| l == line),
                "missing {line:?} in:\n{body}"
            );
        }
    }

    #[tokio::test]
    async fn healthz_reports_the_role_and_the_store() {
        let store = Store::memory("m:");
        store
            .add(crate::EntrySpec {
                name: "x".into(),
                task: "diag.echo".into(),
                every: Some("1m".into()),
                ..crate::EntrySpec::default()
            })
            .await
            .unwrap();
        let (state, _, role) = state(store, Role::Follower);
        let router = app(state);
        let (status, body, _) = get(router.clone(), "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["role"], "follower");
        assert_eq!(json["entries"], 1);
        assert_eq!(json["node_id"], "beat@test");
        role.send_replace(Role::Leader { token: 7 });
        let (_, body, _) = get(router, "/healthz").await;
        assert!(body.contains("\"role\":\"leader\""), "{body}");
    }

    #[tokio::test]
    async fn healthz_is_503_when_the_store_is_unreachable() {
        let store = Store::connect_lazy("redis://127.0.0.1:1/0", "p:").unwrap();
        let (state, _, _) = state(store, Role::Follower);
        let (status, body, _) = get(app(state), "/healthz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["status"], "unavailable");
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    #[tokio::test]
    async fn unknown_paths_are_404() {
        let (state, _, _) = state(Store::memory("m:"), Role::Follower);
        assert_eq!(get(app(state), "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
