//! Flower's metric names (`MONITOR_FLOWER_METRICS=true`), in a registry of their own so they
//! carry no `tq_` prefix: `flower_events_total{worker,type,task}`,
//! `flower_task_runtime_seconds{worker,task}`, `flower_task_prefetch_time_seconds{worker,task}`
//! (the last received → started wait), `flower_worker_prefetched_tasks{worker,task}` (received,
//! not yet started), `flower_worker_online{worker}`,
//! `flower_worker_number_of_currently_executing_tasks{worker}` (the heartbeat's `active`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowerEvent {
    worker: String,
    r#type: String,
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerTask {
    worker: String,
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowerWorker {
    worker: String,
}

/// Flower's metrics.
#[derive(Debug)]
pub(crate) struct Flower {
    registry: Registry,
    events: Family<FlowerEvent, Counter>,
    runtime: Family<WorkerTask, Histogram, fn() -> Histogram>,
    prefetch_time: Family<WorkerTask, Gauge<f64, AtomicU64>>,
    prefetched: Family<WorkerTask, Gauge>,
    online: Family<FlowerWorker, Gauge>,
    executing: Family<FlowerWorker, Gauge>,
}

impl Flower {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("flower");
        let events = Family::<FlowerEvent, Counter>::default();
        registry.register("events", "Number of events", events.clone());
        let runtime = Family::<WorkerTask, Histogram, fn() -> Histogram>::new_with_constructor(
            crate::metrics::duration_histogram,
        );
        registry.register_with_unit(
            "task_runtime",
            "Task runtime",
            Unit::Seconds,
            runtime.clone(),
        );
        let prefetch_time = Family::<WorkerTask, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "task_prefetch_time",
            "The time the task spent waiting at the worker to be executed",
            Unit::Seconds,
            prefetch_time.clone(),
        );
        let prefetched = Family::<WorkerTask, Gauge>::default();
        registry.register(
            "worker_prefetched_tasks",
            "Number of tasks of given type prefetched at a worker",
            prefetched.clone(),
        );
        let online = Family::<FlowerWorker, Gauge>::default();
        registry.register("worker_online", "Worker online status", online.clone());
        let executing = Family::<FlowerWorker, Gauge>::default();
        registry.register(
            "worker_number_of_currently_executing_tasks",
            "Number of tasks currently executing at a worker",
            executing.clone(),
        );
        Flower {
            registry,
            events,
            runtime,
            prefetch_time,
            prefetched,
            online,
            executing,
        }
    }

    /// A runtime (`runtime`) or a received → started wait of `task` on `worker`.
    pub(crate) fn timing(&self, worker: &str, task: &str, runtime: bool, seconds: f64) {
        let wt = WorkerTask {
            worker: worker.to_owned(),
            task: task.to_owned(),
        };
        if runtime {
            self.runtime.get_or_create(&wt).observe(seconds);
        } else {
            self.prefetch_time.get_or_create(&wt).set(seconds);
        }
    }

    /// A task event of `kind`.
    pub(crate) fn event(&self, worker: &str, kind: &str, task: &str) {
        self.events
            .get_or_create(&FlowerEvent {
                worker: worker.to_owned(),
                r#type: kind.to_owned(),
                task: task.to_owned(),
            })
            .inc();
        let wt = WorkerTask {
            worker: worker.to_owned(),
            task: task.to_owned(),
        };
        match kind {
            "task-received" => {
                self.prefetched.get_or_create(&wt).inc();
            }
            "task-started" => {
                let g = self.prefetched.get_or_create(&wt);
                if g.get() > 0 {
                    g.dec();
                }
            }
            _ => {}
        }
    }

    pub(crate) fn clear_workers(&self) {
        self.online.clear();
        self.executing.clear();
    }

    /// A worker's state at a scrape: up, and the tasks its last heartbeat said were running.
    pub(crate) fn worker(&self, worker: &str, up: bool, active: Option<i64>) {
        let label = FlowerWorker {
            worker: worker.to_owned(),
        };
        self.online.get_or_create(&label).set(i64::from(up));
        self.executing
            .get_or_create(&label)
            .set(if up { active.unwrap_or(0) } else { 0 });
    }

    /// Appends this registry's exposition (ending in `# EOF`).
    pub(crate) fn encode(&self, out: &mut String) {
        prometheus_client::encoding::text::encode(out, &self.registry)
            .expect("writing to a String cannot fail");
    }
}
