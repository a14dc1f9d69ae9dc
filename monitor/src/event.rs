//! Celery events as the monitor reads them, and how they fold into one record per task and per
//! worker (reference `celery-protocol.md` §3 and §4).
//!
//! Invariants, as Celery's `celery.events.state` keeps them (so our store shows what Flower would
//! have shown had it seen every event):
//! - **State precedence, not arrival order.** A state that logically happens before the current one
//!   (a late `task-received` after `task-succeeded`) never moves the task back; it only fills in
//!   what it alone carries. RETRY always moves, in both directions, because a retried task is
//!   received and started again.
//! - **`task-received` owns name, args, kwargs, root_id, parent_id, retries, eta and expires**:
//!   an out-of-order one still sets them.
//! - **Every event records its stage's time** (`received`, `started`, `succeeded`, …) whatever its
//!   order.
//! - `task-sent` comes from a client: its hostname is the task's `client`, never its `worker`.

use serde::Serialize;
use serde_json::{Map, Value};

/// A decoded event: its type and all its fields.
pub type Event = Map<String, Value>;

/// Why an event message could not be read.
#[derive(Debug, thiserror::Error)]
#[error("an event message is not a JSON object or list of objects: {0}")]
pub struct DecodeError(String);

/// The events in one message body: a dict, or a list of them (Celery's `task.multi`).
pub fn decode(body: &[u8]) -> Result<Vec<Event>, DecodeError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(event)) => Ok(vec![event]),
        Ok(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::Object(event) => Ok(event),
                other => Err(DecodeError(format!("a list item is {other}"))),
            })
            .collect(),
        Ok(other) => Err(DecodeError(format!("the body is {other}"))),
        Err(e) => Err(DecodeError(e.to_string())),
    }
}

/// Celery's precedence of task states, strongest first; unknown states sit where Celery puts
/// `None` (between FAILURE and REVOKED).
const PRECEDENCE: [&str; 9] = [
    "SUCCESS", "FAILURE", "", "REVOKED", "STARTED", "RECEIVED", "REJECTED", "RETRY", "PENDING",
];

/// The rank of `state` in Celery's precedence (SUCCESS, FAILURE, unknown, REVOKED, STARTED,
/// RECEIVED, REJECTED, RETRY, PENDING): lower is stronger.
pub fn precedence(state: &str) -> usize {
    PRECEDENCE.iter().position(|s| *s == state).unwrap_or(2)
}

/// The state a task event moves to: `task-succeeded` → SUCCESS, and so on; an unknown kind
/// `task-foo` → `FOO` (Celery's custom states).
pub fn task_state(kind: &str) -> Option<String> {
    let stage = kind.strip_prefix("task-")?;
    Some(
        match stage {
            "sent" => "PENDING",
            "received" => "RECEIVED",
            "started" => "STARTED",
            "succeeded" => "SUCCESS",
            "failed" => "FAILURE",
            "retried" => "RETRY",
            "revoked" => "REVOKED",
            "rejected" => "REJECTED",
            other => return Some(other.to_uppercase()),
        }
        .to_owned(),
    )
}

/// The fields a happens-before `task-received` may still set (Celery's `merge_rules`).
const RECEIVED_FIELDS: [&str; 8] = [
    "name",
    "args",
    "kwargs",
    "parent_id",
    "root_id",
    "retries",
    "eta",
    "expires",
];

/// One task as stored: the columns of `monitor.tasks`, in Flower's field names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, sqlx::FromRow)]
pub struct TaskRecord {
    pub uuid: String,
    pub name: Option<String>,
    pub state: String,
    pub args: Option<String>,
    pub kwargs: Option<String>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub retries: Option<i32>,
    pub eta: Option<String>,
    pub expires: Option<String>,
    pub sent: Option<f64>,
    pub received: Option<f64>,
    pub started: Option<f64>,
    pub succeeded: Option<f64>,
    pub failed: Option<f64>,
    pub retried: Option<f64>,
    pub revoked: Option<f64>,
    pub rejected: Option<f64>,
    pub timestamp: Option<f64>,
    pub runtime: Option<f64>,
    pub result: Option<String>,
    pub exception: Option<String>,
    pub traceback: Option<String>,
    pub worker: Option<String>,
    pub client: Option<String>,
    pub exchange: Option<String>,
    pub routing_key: Option<String>,
    pub queue: Option<String>,
    pub clock: Option<i64>,
}

fn text(event: &Event, key: &str) -> Option<String> {
    match event.get(key)? {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

fn float(event: &Event, key: &str) -> Option<f64> {
    event.get(key).and_then(Value::as_f64)
}

impl TaskRecord {
    /// A task known only by its id (Celery's PENDING).
    pub fn new(uuid: impl Into<String>) -> Self {
        TaskRecord {
            uuid: uuid.into(),
            state: "PENDING".into(),
            ..TaskRecord::default()
        }
    }

    /// Folds one `task-*` event in, as Celery's `Task.event` does.
    pub fn apply(&mut self, event: &Event) {
        let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
        let Some(state) = task_state(kind) else {
            return;
        };
        let timestamp = float(event, "timestamp");
        match kind {
            "task-sent" => self.sent = timestamp,
            "task-received" => self.received = timestamp,
            "task-started" => self.started = timestamp,
            "task-succeeded" => self.succeeded = timestamp,
            "task-failed" => self.failed = timestamp,
            "task-retried" => self.retried = timestamp,
            "task-revoked" => self.revoked = timestamp,
            "task-rejected" => self.rejected = timestamp,
            _ => {}
        }
        let hostname = text(event, "hostname");
        if kind == "task-sent" {
            self.client = hostname.or(self.client.take());
        } else if hostname.is_some() {
            self.worker = hostname;
        }
        let happened_before = state != "RETRY"
            && self.state != "RETRY"
            && precedence(&state) > precedence(&self.state);
        if happened_before && state == "RECEIVED" {
            for key in RECEIVED_FIELDS {
                if event.contains_key(key) {
                    self.set(key, event);
                }
            }
            return;
        }
        for key in event.keys() {
            self.set(key, event);
        }
        if !happened_before {
            self.state = state;
            self.timestamp = timestamp;
        }
    }

    fn set(&mut self, key: &str, event: &Event) {
        let t = || text(event, key);
        match key {
            "name" => self.name = t(),
            "args" => self.args = t(),
            "kwargs" => self.kwargs = t(),
            "root_id" => self.root_id = t(),
            "parent_id" => self.parent_id = t(),
            "retries" => {
                self.retries = event
                    .get(key)
                    .and_then(Value::as_i64)
                    .and_then(|r| i32::try_from(r).ok());
            }
            "eta" => self.eta = t(),
            "expires" => self.expires = t(),
            "runtime" => self.runtime = float(event, key),
            "result" => self.result = t(),
            "exception" => self.exception = t(),
            "traceback" => self.traceback = t(),
            "exchange" => self.exchange = t(),
            "routing_key" => self.routing_key = t(),
            "queue" => self.queue = t(),
            "clock" => self.clock = event.get(key).and_then(Value::as_i64),
            _ => {}
        }
    }
}

/// One worker as stored: the columns of `monitor.workers`.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct WorkerRecord {
    pub hostname: String,
    pub last_heartbeat: f64,
    pub freq: f64,
    pub offline_at: Option<f64>,
    pub first_seen: f64,
    pub pid: Option<i64>,
    pub clock: Option<i64>,
    pub active: Option<i64>,
    pub processed: Option<i64>,
    pub loadavg: Option<Vec<f64>>,
    pub sw_ident: Option<String>,
    pub sw_ver: Option<String>,
    pub sw_sys: Option<String>,
}

/// Celery's default heartbeat interval, for a worker event that does not say.
pub const DEFAULT_FREQ: f64 = 2.0;

impl WorkerRecord {
    /// The record a `worker-*` event describes, or `None` for another kind of event.
    pub fn from_event(event: &Event) -> Option<Self> {
        let kind = event.get("type").and_then(Value::as_str)?;
        if !matches!(
            kind,
            "worker-online" | "worker-heartbeat" | "worker-offline"
        ) {
            return None;
        }
        let hostname = text(event, "hostname")?;
        let timestamp = float(event, "timestamp")?;
        Some(WorkerRecord {
            hostname,
            last_heartbeat: timestamp,
            freq: float(event, "freq")
                .filter(|f| *f > 0.0)
                .unwrap_or(DEFAULT_FREQ),
            offline_at: (kind == "worker-offline").then_some(timestamp),
            first_seen: timestamp,
            pid: event.get("pid").and_then(Value::as_i64),
            clock: event.get("clock").and_then(Value::as_i64),
            active: event.get("active").and_then(Value::as_i64),
            processed: event.get("processed").and_then(Value::as_i64),
            loadavg: event
                .get("loadavg")
                .and_then(Value::as_array)
                .map(|l| l.iter().filter_map(Value::as_f64).collect()),
            sw_ident: text(event, "sw_ident"),
            sw_ver: text(event, "sw_ver"),
            sw_sys: text(event, "sw_sys"),
        })
    }

    /// Folds a newer-or-older record of the same worker in: the newest event's fields win.
    pub fn merge(&mut self, other: WorkerRecord) {
        let first_seen = self.first_seen.min(other.first_seen);
        let offline_at = match (self.offline_at, other.offline_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if other.last_heartbeat >= self.last_heartbeat {
            *self = other;
        }
        self.first_seen = first_seen;
        self.offline_at = offline_at;
    }

    /// Whether the worker counts as online at `now` (Unix seconds): its newest event is less than
    /// two heartbeat intervals old and no `worker-offline` came at or after it.
    pub fn online(&self, now: f64) -> bool {
        self.offline_at.is_none_or(|off| off < self.last_heartbeat)
            && now < self.last_heartbeat + 2.0 * self.freq
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(v: Value) -> Event {
        v.as_object().cloned().unwrap()
    }

    fn received(ts: f64) -> Event {
        event(json!({
            "type": "task-received", "uuid": "t1", "hostname": "w1@h", "timestamp": ts,
            "name": "diag.add", "args": "(2, 3)", "kwargs": "{}", "root_id": "t1",
            "parent_id": null, "retries": 0, "eta": null, "expires": null, "clock": 3,
        }))
    }

    #[test]
    fn a_dict_or_a_list_decodes() {
        assert_eq!(decode(br#"{"type": "worker-heartbeat"}"#).unwrap().len(), 1);
        assert_eq!(
            decode(br#"[{"type": "task-started"}, {"type": "task-succeeded"}]"#)
                .unwrap()
                .len(),
            2
        );
        assert!(decode(b"[1]").is_err());
        assert!(decode(b"\"x\"").is_err());
        assert!(decode(b"\x80").is_err());
    }

    #[test]
    fn in_order_events_walk_the_lifecycle() {
        let mut t = TaskRecord::new("t1");
        t.apply(&received(10.0));
        assert_eq!(t.state, "RECEIVED");
        t.apply(&event(
            json!({"type": "task-started", "uuid": "t1", "hostname": "w1@h", "timestamp": 11.0}),
        ));
        assert_eq!(t.state, "STARTED");
        t.apply(&event(
            json!({"type": "task-succeeded", "uuid": "t1", "hostname": "w1@h",
            "timestamp": 12.0, "result": "5", "runtime": 0.5}),
        ));
        assert_eq!(t.state, "SUCCESS");
        assert_eq!(t.name.as_deref(), Some("diag.add"));
        assert_eq!(t.args.as_deref(), Some("(2, 3)"));
        assert_eq!(t.result.as_deref(), Some("5"));
        assert_eq!(t.runtime, Some(0.5));
        assert_eq!(
            (t.received, t.started, t.succeeded, t.timestamp),
            (Some(10.0), Some(11.0), Some(12.0), Some(12.0))
        );
        assert_eq!(t.worker.as_deref(), Some("w1@h"));
        assert_eq!(t.root_id.as_deref(), Some("t1"));
    }

    #[test]
    fn a_late_received_does_not_move_a_success_back_but_fills_in_the_name() {
        let mut t = TaskRecord::new("t1");
        t.apply(&event(
            json!({"type": "task-succeeded", "uuid": "t1", "hostname": "w1@h",
            "timestamp": 12.0, "result": "5", "runtime": 0.5}),
        ));
        t.apply(&event(
            json!({"type": "task-started", "uuid": "t1", "hostname": "w1@h", "timestamp": 11.0}),
        ));
        t.apply(&received(10.0));
        assert_eq!(t.state, "SUCCESS");
        assert_eq!(t.timestamp, Some(12.0));
        assert_eq!(t.name.as_deref(), Some("diag.add"));
        assert_eq!(t.kwargs.as_deref(), Some("{}"));
        assert_eq!(t.received, Some(10.0));
        assert_eq!(t.started, Some(11.0));
        assert_eq!(t.result.as_deref(), Some("5"));
    }

    #[test]
    fn failure_beats_revoked_and_retry_always_moves() {
        let mut t = TaskRecord::new("t1");
        t.apply(&event(
            json!({"type": "task-failed", "uuid": "t1", "hostname": "w",
            "timestamp": 5.0, "exception": "ValueError('x')", "traceback": "tb"}),
        ));
        t.apply(&event(
            json!({"type": "task-revoked", "uuid": "t1", "hostname": "w", "timestamp": 6.0}),
        ));
        assert_eq!(t.state, "FAILURE");
        assert_eq!(t.exception.as_deref(), Some("ValueError('x')"));

        let mut r = TaskRecord::new("t2");
        r.apply(&event(
            json!({"type": "task-started", "uuid": "t2", "hostname": "w", "timestamp": 1.0}),
        ));
        r.apply(&event(
            json!({"type": "task-retried", "uuid": "t2", "hostname": "w",
            "timestamp": 2.0, "exception": "Retry", "traceback": ""}),
        ));
        assert_eq!(r.state, "RETRY");
        r.apply(&event(
            json!({"type": "task-received", "uuid": "t2", "hostname": "w", "timestamp": 3.0, "retries": 1}),
        ));
        assert_eq!(r.state, "RECEIVED");
        assert_eq!(r.retries, Some(1));
    }

    #[test]
    fn task_sent_names_the_client_not_the_worker() {
        let mut t = TaskRecord::new("t1");
        t.apply(&event(
            json!({"type": "task-sent", "uuid": "t1", "hostname": "gen1@h",
            "timestamp": 1.0, "name": "diag.add", "queue": "celery"}),
        ));
        assert_eq!(t.state, "PENDING");
        assert_eq!(t.client.as_deref(), Some("gen1@h"));
        assert_eq!(t.worker, None);
        assert_eq!(t.queue.as_deref(), Some("celery"));
        t.apply(&received(2.0));
        assert_eq!(t.worker.as_deref(), Some("w1@h"));
        assert_eq!(t.client.as_deref(), Some("gen1@h"));
    }

    #[test]
    fn workers_are_online_until_two_heartbeats_are_missed_or_they_say_goodbye() {
        let hb = |kind: &str, ts: f64| {
            WorkerRecord::from_event(&event(json!({"type": kind, "hostname": "w1@h",
                "timestamp": ts, "freq": 2.0, "active": 1, "processed": 7,
                "loadavg": [0.1, 0.2, 0.3], "sw_ident": "rs-task-core"})))
            .unwrap()
        };
        let mut w = hb("worker-online", 100.0);
        w.merge(hb("worker-heartbeat", 102.0));
        assert!(w.online(105.9) && !w.online(106.0));
        assert_eq!(w.first_seen, 100.0);
        assert_eq!(w.loadavg, Some(vec![0.1, 0.2, 0.3]));
        w.merge(hb("worker-heartbeat", 101.0));
        assert_eq!(
            w.last_heartbeat, 102.0,
            "an older heartbeat changes nothing"
        );
        w.merge(hb("worker-offline", 103.0));
        assert!(!w.online(103.5));
        w.merge(hb("worker-online", 110.0));
        assert!(
            w.online(110.5),
            "a restart under the same name is online again"
        );
        assert!(WorkerRecord::from_event(&event(json!({"type": "task-sent"}))).is_none());
    }
}
