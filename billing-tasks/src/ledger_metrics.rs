//! Gauges read from the ledger, for the alerts that need a person: payments stuck in flight,
//! gateway notifications that matched nothing, reconciliation findings, outbox messages that
//! died. `billing-api` serves them on `/metrics`, refreshed when scraped (at most every
//! [`REFRESH_EVERY`], each query bounded by [`QUERY_TIMEOUT`]); so they are one reading of the
//! shared database, the same from whichever replica Prometheus asks.
//!
//! Every series exists from the first scrape (zeros included), so an alert sees the first stuck
//! payment as a change, not as a series appearing.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::PgPool;

/// The shortest time between two readings of the ledger.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// How long one reading may take before the previous values are served instead.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// The payment statuses of an attempt in flight.
const IN_FLIGHT: [&str; 3] = ["created", "processing", "awaiting_3ds"];
/// What the daily reconciliation can find (`reconciliation_finding.kind`).
const FINDINGS: [&str; 6] = [
    "payment_unknown_to_ledger",
    "payment_missing_at_gateway",
    "payment_amount_differs",
    "refund_unknown_to_ledger",
    "refund_missing_at_gateway",
    "refund_amount_differs",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

type Seconds = Gauge<f64, AtomicU64>;

/// The ledger gauges (see the module documentation).
#[derive(Debug)]
pub struct LedgerMetrics {
    db: PgPool,
    in_flight: Family<StatusLabels, Gauge>,
    oldest_in_flight: Family<StatusLabels, Seconds>,
    unmatched: Gauge,
    findings: Family<KindLabels, Gauge>,
    outbox_dead: Gauge,
    outbox_oldest_pending: Seconds,
    up: Gauge,
    every: Duration,
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl LedgerMetrics {
    /// Registers the gauges in `registry`; they read `db` at most every [`REFRESH_EVERY`].
    pub fn register(registry: &mut Registry, db: PgPool) -> Arc<Self> {
        Self::register_with_interval(registry, db, REFRESH_EVERY)
    }

    /// Like [`LedgerMetrics::register`], reading at most every `every` (tests: zero).
    pub fn register_with_interval(
        registry: &mut Registry,
        db: PgPool,
        every: Duration,
    ) -> Arc<Self> {
        let in_flight = Family::<StatusLabels, Gauge>::default();
        let oldest_in_flight = Family::<StatusLabels, Seconds>::default();
        let unmatched = Gauge::<i64>::default();
        let findings = Family::<KindLabels, Gauge>::default();
        let outbox_dead = Gauge::<i64>::default();
        let outbox_oldest_pending = Seconds::default();
        let up = Gauge::<i64>::default();
        registry.register(
            "billing_payments_in_flight",
            "Payment attempts not settled yet, by status (created, processing, awaiting_3ds)",
            in_flight.clone(),
        );
        registry.register(
            "billing_payment_oldest_in_flight_age_seconds",
            "Age of the oldest unsettled attempt, by status (since its gateway call; 0: none)",
            oldest_in_flight.clone(),
        );
        registry.register(
            "billing_gateway_notifications_unmatched",
            "Gateway notifications of the last 24 hours that matched no payment or refund",
            unmatched.clone(),
        );
        registry.register(
            "billing_reconciliation_mismatches",
            "Reconciliation findings of the last 7 days, by kind",
            findings.clone(),
        );
        registry.register(
            "billing_outbox_dead_messages",
            "Outbox messages (role changes, notifications) that exhausted their deliveries",
            outbox_dead.clone(),
        );
        registry.register(
            "billing_outbox_oldest_pending_age_seconds",
            "Age of the oldest outbox message still to be delivered (0: none)",
            outbox_oldest_pending.clone(),
        );
        registry.register(
            "billing_ledger_metrics_up",
            "1 if the last reading of the ledger for these gauges succeeded",
            up.clone(),
        );
        let m = LedgerMetrics {
            db,
            in_flight,
            oldest_in_flight,
            unmatched,
            findings,
            outbox_dead,
            outbox_oldest_pending,
            up,
            every,
            last: tokio::sync::Mutex::new(None),
        };
        for status in IN_FLIGHT {
            let labels = StatusLabels {
                status: status.to_owned(),
            };
            let _ = m.in_flight.get_or_create(&labels);
            let _ = m.oldest_in_flight.get_or_create(&labels);
        }
        for kind in FINDINGS {
            let _ = m.findings.get_or_create(&KindLabels {
                kind: kind.to_owned(),
            });
        }
        Arc::new(m)
    }

    /// Reads the ledger again unless it was read within the interval. A failed or slow
    /// reading keeps the previous values and sets `billing_ledger_metrics_up` to 0.
    pub async fn refresh(&self) {
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.every) {
            return;
        }
        *last = Some(Instant::now());
        match tokio::time::timeout(QUERY_TIMEOUT, self.read()).await {
            Ok(Ok(())) => {
                self.up.set(1);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the ledger for /metrics");
                self.up.set(0);
            }
            Err(_) => {
                tracing::warn!(timeout = ?QUERY_TIMEOUT, "reading the ledger for /metrics timed out");
                self.up.set(0);
            }
        }
    }

    async fn read(&self) -> sqlx::Result<()> {
        let in_flight = sqlx::query_as::<_, (String, i64, f64)>(
            "SELECT status, count(*),
                    COALESCE(EXTRACT(EPOCH FROM now() - min(COALESCE(sent_at, created_at))), 0)::float8
             FROM payment WHERE status IN ('created', 'processing', 'awaiting_3ds')
             GROUP BY status",
        )
        .fetch_all(&self.db)
        .await?;
        let unmatched = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM gateway_event
             WHERE outcome LIKE 'unmatched%' AND received_at > now() - interval '24 hours'",
        )
        .fetch_one(&self.db)
        .await?;
        let findings = sqlx::query_as::<_, (String, i64)>(
            "SELECT kind, count(*) FROM reconciliation_finding
             WHERE day >= current_date - 7 GROUP BY kind",
        )
        .fetch_all(&self.db)
        .await?;
        let (dead, oldest_pending) = sqlx::query_as::<_, (i64, f64)>(
            "SELECT count(*) FILTER (WHERE status = 'dead'),
                    COALESCE(EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE status = 'pending')), 0)::float8
             FROM outbox WHERE status IN ('dead', 'pending')",
        )
        .fetch_one(&self.db)
        .await?;

        for status in IN_FLIGHT {
            let (n, age) = in_flight
                .iter()
                .find(|(s, _, _)| s == status)
                .map_or((0, 0.0), |(_, n, age)| (*n, age.max(0.0)));
            let labels = StatusLabels {
                status: status.to_owned(),
            };
            self.in_flight.get_or_create(&labels).set(n);
            self.oldest_in_flight.get_or_create(&labels).set(age);
        }
        self.unmatched.set(unmatched);
        for kind in FINDINGS {
            let n = findings
                .iter()
                .find(|(k, _)| k == kind)
                .map_or(0, |(_, n)| *n);
            self.findings
                .get_or_create(&KindLabels {
                    kind: kind.to_owned(),
                })
                .set(n);
        }
        self.outbox_dead.set(dead);
        self.outbox_oldest_pending.set(oldest_pending.max(0.0));
        Ok(())
    }
}
