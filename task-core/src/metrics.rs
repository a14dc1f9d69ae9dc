//! A worker's Prometheus metrics, encoded as OpenMetrics text for `GET /metrics`
//! ([`crate::health`]).
//!
//! Names follow Prometheus' conventions with the `tq_` prefix: seconds as the unit, counters end
//! in `_total` (prometheus-client appends it, so counters are registered without it).
//!
//! Cardinality is bounded on purpose:
//! - `task` is a registered task name and `queue` a configured queue: the worker passes
//!   [`UNREGISTERED_TASK`] for a message naming a task it does not know, so a stray producer
//!   cannot create series at will.
//! - Only the worker gauges carry a `worker` label. Task counters and histograms do not, so that
//!   a Kubernetes roll-out (new pod names) does not multiply every series, and `sum()` over a
//!   deployment stays meaningful.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// The `task` label for a message whose task is not registered on this worker.
pub const UNREGISTERED_TASK: &str = "<unregistered>";

/// Upper bounds (seconds) of the runtime and queue-wait histograms: 1 ms to 10 min, roughly
/// 1-2.5-5 per decade so both a cache lookup and a nightly report land in a useful bucket.
pub const DURATION_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 600.0,
];

/// How a delivery ended, the `outcome` label of `tq_tasks_completed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The task returned a value.
    Success,
    /// The task raised (or panicked, or hit a time limit) and will not be retried.
    Failure,
    /// The task asked to be retried (a new message was published).
    Retry,
    /// Revoked or expired before it ran.
    Revoked,
    /// Undecodable, unknown task or invalid arguments: sent to the dead-letter queue.
    DeadLettered,
    /// The task rejected the message (`Reject`), e.g. a declined card.
    Rejected,
}

impl Outcome {
    /// The label value: `success`, `failure`, `retry`, `revoked`, `dead_lettered` or `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Retry => "retry",
            Outcome::Revoked => "revoked",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Rejected => "rejected",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskQueue {
    task: String,
    queue: String,
}

impl TaskQueue {
    fn new(task: &str, queue: &str) -> Self {
        TaskQueue {
            task: task.to_owned(),
            queue: queue.to_owned(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Completed {
    task: String,
    queue: String,
    outcome: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabel {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Version {
    version: &'static str,
}

type HistogramFamily = Family<TaskQueue, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    received: Family<TaskQueue, Counter>,
    completed: Family<Completed, Counter>,
    runtime: HistogramFamily,
    queue_wait: HistogramFamily,
    active: Gauge,
    prefetched: Gauge,
    concurrency: Gauge,
    broker_reconnects: Counter,
    /// The broker's running total at the last [`WorkerMetrics::set_broker_reconnects`].
    broker_reconnects_seen: AtomicU64,
    rate_limit_waits: Family<TaskLabel, Counter>,
    event_publish_failures: Counter,
}

/// A worker's metrics. Cheap to clone; clones share values.
///
/// ```
/// use std::time::Duration;
/// use task_core::metrics::{Outcome, WorkerMetrics};
///
/// let metrics = WorkerMetrics::new("celery@host");
/// metrics.received("billing.charge", "billing");
/// metrics.completed("billing.charge", "billing", Outcome::Success, Some(Duration::from_millis(40)));
/// assert!(metrics.encode().contains(
///     r#"tq_tasks_completed_total{task="billing.charge",queue="billing",outcome="success"} 1"#
/// ));
/// ```
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    inner: Arc<Inner>,
}

impl WorkerMetrics {
    /// Metrics of the worker named `worker` (its node name, e.g. `celery@host`), every series
    /// registered and at zero.
    pub fn new(worker: &str) -> Self {
        let mut registry = Registry::with_prefix("tq");
        let received = Family::<TaskQueue, Counter>::default();
        let completed = Family::<Completed, Counter>::default();
        let runtime: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let queue_wait: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let rate_limit_waits = Family::<TaskLabel, Counter>::default();
        let broker_reconnects = Counter::default();
        let event_publish_failures = Counter::default();
        let (active, prefetched, concurrency) =
            (Gauge::default(), Gauge::default(), Gauge::default());

        registry.register(
            "tasks_received",
            "Task messages received from the broker",
            received.clone(),
        );
        registry.register(
            "tasks_completed",
            "Deliveries settled, by outcome (success, failure, retry, revoked, dead_lettered, rejected)",
            completed.clone(),
        );
        registry.register_with_unit(
            "task_runtime",
            "Time a task spent running",
            Unit::Seconds,
            runtime.clone(),
        );
        registry.register_with_unit(
            "task_queue_wait",
            "Time from publishing (or the ETA) to the start of the run",
            Unit::Seconds,
            queue_wait.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Reconnections to the broker",
            broker_reconnects.clone(),
        );
        registry.register(
            "rate_limit_waits",
            "Deliveries delayed by a rate or concurrency limit (each counted once)",
            rate_limit_waits.clone(),
        );
        registry.register(
            "event_publish_failures",
            "Monitoring events that could not be published",
            event_publish_failures.clone(),
        );
        registry.register(
            "build",
            "The version of this worker",
            Info::new(Version {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        let per_worker =
            registry.sub_registry_with_label((Cow::Borrowed("worker"), Cow::Owned(worker.into())));
        per_worker.register("worker_active_tasks", "Tasks running now", active.clone());
        per_worker.register(
            "worker_prefetched_tasks",
            "Tasks reserved from the broker and not yet started",
            prefetched.clone(),
        );
        per_worker.register(
            "worker_concurrency",
            "Tasks this worker runs at once at most",
            concurrency.clone(),
        );

        WorkerMetrics {
            inner: Arc::new(Inner {
                registry,
                received,
                completed,
                runtime,
                queue_wait,
                active,
                prefetched,
                concurrency,
                broker_reconnects,
                broker_reconnects_seen: AtomicU64::new(0),
                rate_limit_waits,
                event_publish_failures,
            }),
        }
    }

    /// A message of `task` arrived from `queue`.
    pub fn received(&self, task: &str, queue: &str) {
        self.inner
            .received
            .get_or_create(&TaskQueue::new(task, queue))
            .inc();
    }

    /// A delivery of `task` from `queue` was settled with `outcome`; `runtime` is how long the
    /// task ran, `None` when it did not run (revoked, dead-lettered).
    pub fn completed(&self, task: &str, queue: &str, outcome: Outcome, runtime: Option<Duration>) {
        self.inner
            .completed
            .get_or_create(&Completed {
                task: task.to_owned(),
                queue: queue.to_owned(),
                outcome,
            })
            .inc();
        if let Some(runtime) = runtime {
            self.inner
                .runtime
                .get_or_create(&TaskQueue::new(task, queue))
                .observe(runtime.as_secs_f64());
        }
    }

    /// A run of `task` from `queue` started `wait` after it was published (or after its ETA).
    pub fn queue_wait(&self, task: &str, queue: &str, wait: Duration) {
        self.inner
            .queue_wait
            .get_or_create(&TaskQueue::new(task, queue))
            .observe(wait.as_secs_f64());
    }

    /// Tasks running now.
    pub fn set_active(&self, n: usize) {
        self.inner.active.set(saturating_i64(n));
    }

    /// Tasks reserved from the broker (prefetched) and not yet started.
    pub fn set_prefetched(&self, n: usize) {
        self.inner.prefetched.set(saturating_i64(n));
    }

    /// The most tasks this worker runs at once.
    pub fn set_concurrency(&self, n: usize) {
        self.inner.concurrency.set(saturating_i64(n));
    }

    /// Creates the per-task series that only failures and waits would create, at zero, so an
    /// alert on `increase(...)` sees the first one and dashboards show the task before it.
    pub fn track_task(&self, task: &str) {
        let _ = self.inner.rate_limit_waits.get_or_create(&TaskLabel {
            task: task.to_owned(),
        });
    }

    /// A delivery of `task` waited for a rate or concurrency limit (call once per delivery).
    pub fn rate_limit_wait(&self, task: &str) {
        self.inner
            .rate_limit_waits
            .get_or_create(&TaskLabel {
                task: task.to_owned(),
            })
            .inc();
    }

    /// A monitoring event could not be published.
    pub fn event_publish_failed(&self) {
        self.inner.event_publish_failures.inc();
    }

    /// The broker's running total of reconnections. The counter advances by the difference; a
    /// total lower than the last one (a new broker connection object counting from zero) is
    /// taken as a restart of that count, so the counter never goes down.
    pub fn set_broker_reconnects(&self, total: u64) {
        let previous = self
            .inner
            .broker_reconnects_seen
            .swap(total, Ordering::Relaxed);
        let delta = if total >= previous {
            total - previous
        } else {
            total
        };
        if delta > 0 {
            self.inner.broker_reconnects.inc_by(delta);
        }
    }

    /// Every metric as OpenMetrics text (ending in `# EOF`).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Samples of an OpenMetrics text: `name{labels}` (as written) to value.
    fn samples(text: &str) -> HashMap<String, f64> {
        assert_eq!(text.lines().last(), Some("# EOF"), "{text}");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("a sample line");
                (series.to_owned(), value.parse().expect("a number"))
            })
            .collect()
    }

    fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
        *samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series}; have {:#?}", samples.keys()))
    }

    #[test]
    fn task_counters_and_histograms_carry_task_and_queue_only() {
        let m = WorkerMetrics::new("celery@a");
        let clone = m.clone();
        m.received("billing.charge", "billing");
        clone.received("billing.charge", "billing");
        m.completed(
            "billing.charge",
            "billing",
            Outcome::Success,
            Some(Duration::from_millis(30)),
        );
        m.completed(
            "billing.charge",
            "billing",
            Outcome::Retry,
            Some(Duration::from_secs(2)),
        );
        m.completed("billing.charge", "billing", Outcome::DeadLettered, None);
        m.queue_wait("billing.charge", "billing", Duration::from_millis(4));

        let text = m.encode();
        let s = samples(&text);
        let tq = r#"task="billing.charge",queue="billing""#;
        assert_eq!(value(&s, &format!("tq_tasks_received_total{{{tq}}}")), 2.0);
        for (outcome, n) in [("success", 1.0), ("retry", 1.0), ("dead_lettered", 1.0)] {
            let series = format!("tq_tasks_completed_total{{{tq},outcome=\"{outcome}\"}}");
            assert_eq!(value(&s, &series), n);
        }
        // Runs without a runtime (dead-lettered) are not observed.
        assert_eq!(
            value(&s, &format!("tq_task_runtime_seconds_count{{{tq}}}")),
            2.0
        );
        assert!((value(&s, &format!("tq_task_runtime_seconds_sum{{{tq}}}")) - 2.03).abs() < 1e-9);
        assert_eq!(
            value(
                &s,
                &format!("tq_task_runtime_seconds_bucket{{le=\"0.05\",{tq}}}")
            ),
            1.0
        );
        assert_eq!(
            value(
                &s,
                &format!("tq_task_runtime_seconds_bucket{{le=\"600.0\",{tq}}}")
            ),
            2.0
        );
        assert_eq!(
            value(
                &s,
                &format!("tq_task_runtime_seconds_bucket{{le=\"+Inf\",{tq}}}")
            ),
            2.0
        );
        assert_eq!(
            value(
                &s,
                &format!("tq_task_queue_wait_seconds_bucket{{le=\"0.001\",{tq}}}")
            ),
            0.0
        );
        assert_eq!(
            value(
                &s,
                &format!("tq_task_queue_wait_seconds_bucket{{le=\"0.005\",{tq}}}")
            ),
            1.0
        );
        assert!(
            text.contains("# UNIT tq_task_runtime_seconds seconds"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tq_task_queue_wait_seconds histogram"),
            "{text}"
        );
        for line in text.lines().filter(|l| l.starts_with("tq_task")) {
            assert!(
                !line.contains("worker="),
                "task series with a worker label: {line}"
            );
        }
    }

    #[test]
    fn worker_gauges_carry_the_worker_label() {
        let m = WorkerMetrics::new("celery@a");
        m.set_concurrency(8);
        m.set_active(3);
        m.set_prefetched(5);
        m.set_active(2);
        let s = samples(&m.encode());
        assert_eq!(
            value(&s, r#"tq_worker_concurrency{worker="celery@a"}"#),
            8.0
        );
        assert_eq!(
            value(&s, r#"tq_worker_active_tasks{worker="celery@a"}"#),
            2.0
        );
        assert_eq!(
            value(&s, r#"tq_worker_prefetched_tasks{worker="celery@a"}"#),
            5.0
        );
    }

    #[test]
    fn broker_reconnects_follow_the_running_total_and_never_go_down() {
        let m = WorkerMetrics::new("w");
        let reconnects =
            |m: &WorkerMetrics| value(&samples(&m.encode()), "tq_broker_reconnects_total");
        assert_eq!(reconnects(&m), 0.0);
        m.set_broker_reconnects(2);
        m.set_broker_reconnects(2);
        assert_eq!(reconnects(&m), 2.0);
        m.set_broker_reconnects(5);
        assert_eq!(reconnects(&m), 5.0);
        // A new broker counting from zero again.
        m.set_broker_reconnects(1);
        assert_eq!(reconnects(&m), 6.0);
    }

    #[test]
    fn other_counters_and_build_info() {
        let m = WorkerMetrics::new("w");
        m.rate_limit_wait("diag.echo");
        m.rate_limit_wait("diag.echo");
        m.event_publish_failed();
        let s = samples(&m.encode());
        assert_eq!(
            value(&s, r#"tq_rate_limit_waits_total{task="diag.echo"}"#),
            2.0
        );
        assert_eq!(value(&s, "tq_event_publish_failures_total"), 1.0);
        let info = format!("tq_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
        assert_eq!(value(&s, &info), 1.0);
    }

    #[test]
    fn outcome_label_values() {
        let all = [
            Outcome::Success,
            Outcome::Failure,
            Outcome::Retry,
            Outcome::Revoked,
            Outcome::DeadLettered,
            Outcome::Rejected,
        ];
        let names: Vec<_> = all.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            names,
            [
                "success",
                "failure",
                "retry",
                "revoked",
                "dead_lettered",
                "rejected"
            ]
        );
    }
}
