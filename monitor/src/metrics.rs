//! The monitor's Prometheus metrics (monitor-anchors §6.1 with the `tq_` prefix), encoded as
//! OpenMetrics text for `GET /metrics`.
//!
//! - From the event intake: `tq_monitor_events_received_total{type}`,
//!   `tq_monitor_event_lag_seconds` (now minus the newest event's timestamp, at its write),
//!   `tq_monitor_last_event_timestamp_seconds`, `tq_monitor_tasks_completed_total{task,outcome}`.
//! - Collected at scrape time: `tq_worker_up{worker}` from the stored heartbeats (a worker drops
//!   out of the series an hour after its last event, so pod churn does not pile up series),
//!   `tq_queue_messages{queue,state="ready"|"unacked"|"dead_lettering"}` (the last: what a quorum
//!   queue holds until its at-least-once dead-lettering is confirmed), `tq_queue_consumers{queue}`,
//!   `tq_queue_oldest_message_age_seconds{queue}` and `tq_dead_letter_messages{queue}` (the
//!   messages in `<queue>.dlq`) for every queue of the virtual host when the management API is
//!   configured (`MONITOR_BROKER_API`; the age only where the head message carries a timestamp,
//!   which task-core's client sets), otherwise ready and consumers for every queue the
//!   workers report consuming, from the broker.
//!
//! - From the events too: `tq_task_runtime_seconds{task,queue}` (task-succeeded's `runtime`) and
//!   `tq_task_queue_wait_seconds{task,queue}` (received → started), histograms.
//! - With `MONITOR_FLOWER_METRICS=true`, Flower's names as well, so its Grafana dashboard and
//!   alert rules keep working: `flower_events_total{worker,type,task}`,
//!   `flower_task_runtime_seconds{worker,task}`, `flower_task_prefetch_time_seconds{worker,task}`
//!   (the last received → started wait), `flower_worker_prefetched_tasks{worker,task}` (received,
//!   not yet started), `flower_worker_online{worker}`,
//!   `flower_worker_number_of_currently_executing_tasks{worker}` (the heartbeat's `active`).
//!
//! Cardinality: `type` is bounded by Celery's event kinds (others count as `other`), `task` by
//! the task names producers use, `worker` and `queue` by the fleet.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::broker::QueueStats;

/// The content type of [`Metrics::encode`].
pub const OPENMETRICS_CONTENT_TYPE: &str = task_core::health::OPENMETRICS_CONTENT_TYPE;

const EVENT_TYPES: [&str; 12] = [
    "worker-online",
    "worker-heartbeat",
    "worker-offline",
    "task-sent",
    "task-received",
    "task-started",
    "task-succeeded",
    "task-failed",
    "task-retried",
    "task-revoked",
    "task-rejected",
    "task-cancelled",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabel {
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Completed {
    task: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueState {
    queue: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskQueue {
    task: String,
    queue: String,
}

/// Buckets of the runtime and wait histograms, in seconds: 5 ms to 10 min.
pub(crate) fn duration_histogram() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        600.0,
    ])
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    events: Family<TypeLabel, Counter>,
    completed: Family<Completed, Counter>,
    lag: FloatGauge,
    last_event: FloatGauge,
    worker_up: Family<WorkerLabel, Gauge>,
    queue_messages: Family<QueueState, Gauge>,
    queue_consumers: Family<QueueLabel, Gauge>,
    queue_oldest_age: Family<QueueLabel, FloatGauge>,
    dead_letters: Family<QueueLabel, Gauge>,
    runtime: Family<TaskQueue, Histogram, fn() -> Histogram>,
    queue_wait: Family<TaskQueue, Histogram, fn() -> Histogram>,
    pruned: Counter,
    flower: Option<crate::flower_metrics::Flower>,
}

/// The monitor's metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        Self::with_flower_aliases(false)
    }

    /// [`Metrics::new`], with Flower's metric names too when `flower` (see the module docs).
    pub fn with_flower_aliases(flower: bool) -> Self {
        let mut registry = Registry::with_prefix("tq");
        let events = Family::<TypeLabel, Counter>::default();
        registry.register(
            "monitor_events_received",
            "Celery events written to the store, by type",
            events.clone(),
        );
        let completed = Family::<Completed, Counter>::default();
        registry.register(
            "monitor_tasks_completed",
            "Tasks that finished an attempt, by task and outcome, from their events (the workers' own count is tq_tasks_completed_total)",
            completed.clone(),
        );
        let lag = FloatGauge::default();
        registry.register_with_unit(
            "monitor_event_lag",
            "Now minus the timestamp of the newest event of the last batch written",
            Unit::Seconds,
            lag.clone(),
        );
        let last_event = FloatGauge::default();
        registry.register(
            "monitor_last_event_timestamp_seconds",
            "Timestamp of the newest event written (Unix seconds)",
            last_event.clone(),
        );
        let worker_up = Family::<WorkerLabel, Gauge>::default();
        registry.register(
            "worker_up",
            "1 while a worker's heartbeats arrive, 0 once two are missed or it went offline",
            worker_up.clone(),
        );
        let queue_messages = Family::<QueueState, Gauge>::default();
        registry.register(
            "queue_messages",
            "Messages in a queue, by state (ready; unacked with the management API)",
            queue_messages.clone(),
        );
        let queue_consumers = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "queue_consumers",
            "Consumers of a queue",
            queue_consumers.clone(),
        );
        let queue_oldest_age = Family::<QueueLabel, FloatGauge>::default();
        registry.register_with_unit(
            "queue_oldest_message_age",
            "How long the message at the head of a queue has waited (0 when empty; absent when unknown)",
            Unit::Seconds,
            queue_oldest_age.clone(),
        );
        let dead_letters = Family::<QueueLabel, Gauge>::default();
        registry.register(
            "dead_letter_messages",
            "Messages in a queue's dead-letter queue (<queue>.dlq), by the original queue",
            dead_letters.clone(),
        );
        let runtime = Family::<TaskQueue, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        registry.register_with_unit(
            "task_runtime",
            "How long tasks ran (task-succeeded's runtime), by task and queue",
            Unit::Seconds,
            runtime.clone(),
        );
        let queue_wait = Family::<TaskQueue, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram,
        );
        registry.register_with_unit(
            "task_queue_wait",
            "How long tasks waited at a worker between being received and started, by task and queue",
            Unit::Seconds,
            queue_wait.clone(),
        );
        let pruned = Counter::default();
        registry.register(
            "monitor_tasks_pruned",
            "Task rows deleted by retention (MONITOR_RETENTION)",
            pruned.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                pruned,
                runtime,
                queue_wait,
                flower: flower.then(crate::flower_metrics::Flower::new),
                registry,
                events,
                completed,
                lag,
                last_event,
                worker_up,
                queue_messages,
                queue_consumers,
                queue_oldest_age,
                dead_letters,
            }),
        }
    }

    /// Counts one written event of `kind`.
    pub fn event(&self, kind: &str) {
        let kind = if EVENT_TYPES.contains(&kind) {
            kind
        } else {
            "other"
        };
        self.inner
            .events
            .get_or_create(&TypeLabel {
                r#type: kind.to_owned(),
            })
            .inc();
    }

    /// Counts a finished attempt of `task`.
    pub fn completed(&self, task: &str, outcome: &str) {
        self.inner
            .completed
            .get_or_create(&Completed {
                task: task.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Records the newest event timestamp of a written batch, at `now` (both Unix seconds).
    pub fn written(&self, newest_event: f64, now: f64) {
        if newest_event > self.inner.last_event.get() {
            self.inner.last_event.set(newest_event);
        }
        self.inner.lag.set((now - newest_event).max(0.0));
    }

    /// Replaces the worker gauges with `workers` (name, up, tasks executing as its last
    /// heartbeat said).
    pub fn set_workers(&self, workers: impl IntoIterator<Item = (String, bool, Option<i64>)>) {
        self.inner.worker_up.clear();
        if let Some(f) = &self.inner.flower {
            f.clear_workers();
        }
        for (worker, up, active) in workers {
            let label = WorkerLabel { worker };
            self.inner
                .worker_up
                .get_or_create(&label)
                .set(i64::from(up));
            if let Some(f) = &self.inner.flower {
                f.worker(&label.worker, up, active);
            }
        }
    }

    /// Counts task rows deleted by retention.
    pub fn pruned(&self, n: u64) {
        self.inner.pruned.inc_by(n);
    }

    /// Observes what a committed batch's events told: runtimes, queue waits and, with Flower's
    /// names on, its per-event counts and prefetch gauges.
    pub fn observe(&self, summary: &crate::store::BatchSummary) {
        for t in &summary.timings {
            let label = TaskQueue {
                task: t.task.clone(),
                queue: t.queue.clone(),
            };
            let family = if t.runtime {
                &self.inner.runtime
            } else {
                &self.inner.queue_wait
            };
            family.get_or_create(&label).observe(t.seconds);
            if let Some(f) = &self.inner.flower {
                f.timing(&t.worker, &t.task, t.runtime, t.seconds);
            }
        }
        if let Some(f) = &self.inner.flower {
            for (worker, kind, task) in &summary.task_events {
                f.event(worker, kind, task);
            }
        }
    }

    /// Replaces the queue gauges with `queues`.
    pub fn set_queues(&self, queues: impl IntoIterator<Item = (String, QueueStats)>) {
        let inner = &self.inner;
        inner.queue_messages.clear();
        inner.queue_consumers.clear();
        inner.queue_oldest_age.clear();
        inner.dead_letters.clear();
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (queue, s) in queues {
            // task_core::broker::dead_letter_queue names them `<queue>.dlq`.
            if let Some(original) = queue.strip_suffix(".dlq") {
                inner
                    .dead_letters
                    .get_or_create(&QueueLabel {
                        queue: original.to_owned(),
                    })
                    .set(gauge(s.messages + s.unacked.unwrap_or(0)));
                continue;
            }
            let state = |state: &str| QueueState {
                queue: queue.clone(),
                state: state.into(),
            };
            inner
                .queue_messages
                .get_or_create(&state("ready"))
                .set(gauge(s.messages));
            if let Some(unacked) = s.unacked {
                inner
                    .queue_messages
                    .get_or_create(&state("unacked"))
                    .set(gauge(unacked));
            }
            if let Some(held) = s.dead_lettering {
                inner
                    .queue_messages
                    .get_or_create(&state("dead_lettering"))
                    .set(gauge(held));
            }
            if let Some(age) = s.oldest_age {
                inner
                    .queue_oldest_age
                    .get_or_create(&QueueLabel {
                        queue: queue.clone(),
                    })
                    .set(age);
            }
            inner
                .queue_consumers
                .get_or_create(&QueueLabel { queue })
                .set(gauge(s.consumers));
        }
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .expect("writing to a String cannot fail");
        if let Some(f) = &self.inner.flower {
            // One exposition: the first registry's `# EOF` goes, the second's ends it.
            if let Some(body) = out.strip_suffix("# EOF\n") {
                out.truncate(body.len());
            }
            f.encode(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_names_are_the_anchor_names() {
        let m = Metrics::new();
        m.event("task-succeeded");
        m.event("made-up");
        m.completed("diag.add", "success");
        m.written(100.0, 100.5);
        m.set_workers([("w1@h".to_owned(), true, Some(2))]);
        m.set_queues([
            (
                "celery".to_owned(),
                QueueStats {
                    messages: 3,
                    consumers: 1,
                    unacked: Some(2),
                    oldest_age: Some(7.5),
                    dead_lettering: None,
                },
            ),
            (
                "tq.delay.1".to_owned(),
                QueueStats {
                    dead_lettering: Some(18),
                    ..QueueStats::default()
                },
            ),
            (
                "celery.dlq".to_owned(),
                QueueStats {
                    messages: 4,
                    ..QueueStats::default()
                },
            ),
        ]);
        let text = m.encode();
        for line in [
            r#"tq_monitor_events_received_total{type="task-succeeded"} 1"#,
            r#"tq_monitor_events_received_total{type="other"} 1"#,
            r#"tq_monitor_tasks_completed_total{task="diag.add",outcome="success"} 1"#,
            "tq_monitor_event_lag_seconds 0.5",
            "tq_monitor_last_event_timestamp_seconds 100.0",
            r#"tq_worker_up{worker="w1@h"} 1"#,
            r#"tq_queue_messages{queue="celery",state="ready"} 3"#,
            r#"tq_queue_consumers{queue="celery"} 1"#,
            r#"tq_queue_messages{queue="celery",state="unacked"} 2"#,
            r#"tq_queue_oldest_message_age_seconds{queue="celery"} 7.5"#,
            r#"tq_dead_letter_messages{queue="celery"} 4"#,
            r#"tq_queue_messages{queue="tq.delay.1",state="dead_lettering"} 18"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
