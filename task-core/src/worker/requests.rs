//! The worker's registry of requests it holds: reserved (received, waiting for a slot or a
//! limit), scheduled (waiting for their ETA) and active (running). Remote control reads it
//! (`active`, `reserved`, `scheduled`, `query_task`) and acts through it (`revoke --terminate`).
//!
//! Each delivery registers itself with [`Requests::track`] and holds the returned [`Tracked`]
//! guard for as long as the worker holds the message; dropping the guard removes the entry, so
//! the registry never lists a message that was settled, whatever path settled it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::watch;

/// Where a request is in its life on this worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Received, not started (waiting for a slot or a limit).
    Reserved,
    /// Held until its ETA.
    Scheduled(DateTime<Utc>),
    /// Running since the given Unix time.
    Active(f64),
}

/// What a request looks like to inspect commands (Celery's `Request.info()`).
#[derive(Debug, Clone)]
pub struct RequestInfo {
    /// Task id.
    pub id: String,
    /// Task name.
    pub name: String,
    /// Printable positional arguments (sensitive ones redacted).
    pub args: String,
    /// Printable keyword arguments (sensitive ones redacted).
    pub kwargs: String,
    /// Queue (routing key) it came from.
    pub queue: String,
    /// Message priority.
    pub priority: Option<u8>,
    /// Whether the broker had delivered it before.
    pub redelivered: bool,
}

#[derive(Debug)]
struct Entry {
    info: RequestInfo,
    phase: Phase,
    terminate: watch::Sender<bool>,
}

/// The registry. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Requests {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: AtomicU64,
    entries: Mutex<BTreeMap<u64, Entry>>,
}

/// A registered request; removed from the registry when dropped.
#[derive(Debug)]
pub struct Tracked {
    key: u64,
    requests: Requests,
    terminate: watch::Receiver<bool>,
}

impl Requests {
    /// Registers a request as reserved.
    pub fn track(&self, info: RequestInfo) -> Tracked {
        let key = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (terminate, rx) = watch::channel(false);
        self.lock().insert(
            key,
            Entry {
                info,
                phase: Phase::Reserved,
                terminate,
            },
        );
        Tracked {
            key,
            requests: self.clone(),
            terminate: rx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.inner.entries.lock().expect("requests lock")
    }

    /// Requests in a phase (`Reserved`, `Scheduled`, `Active`), oldest first, as
    /// `(info, phase)` pairs.
    pub fn list(&self, wanted: fn(&Phase) -> bool) -> Vec<(RequestInfo, Phase)> {
        self.lock()
            .values()
            .filter(|e| wanted(&e.phase))
            .map(|e| (e.info.clone(), e.phase.clone()))
            .collect()
    }

    /// How many requests are running.
    pub fn active_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| matches!(e.phase, Phase::Active(_)))
            .count()
    }

    /// How many requests are held but not running (reserved or scheduled).
    pub fn waiting_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| !matches!(e.phase, Phase::Active(_)))
            .count()
    }

    /// The requests with one of `ids`.
    pub fn find(&self, ids: &[String]) -> Vec<(RequestInfo, Phase)> {
        self.lock()
            .values()
            .filter(|e| ids.contains(&e.info.id))
            .map(|e| (e.info.clone(), e.phase.clone()))
            .collect()
    }

    /// Whether another request with this id is running here (or about to), other than `except`.
    pub fn running_elsewhere(&self, id: &str, except: &Tracked) -> bool {
        self.lock().iter().any(|(k, e)| {
            *k != except.key && e.info.id == id && matches!(e.phase, Phase::Active(_))
        })
    }

    /// Asks the running requests with one of `ids` to stop; returns how many were running.
    pub fn terminate(&self, ids: &[String]) -> usize {
        let entries = self.lock();
        let mut n = 0;
        for e in entries.values().filter(|e| ids.contains(&e.info.id)) {
            if matches!(e.phase, Phase::Active(_)) {
                n += 1;
            }
            // A request that has not started yet is stopped when it would start.
            let _ = e.terminate.send(true);
        }
        n
    }
}

impl Tracked {
    /// Moves the request to another phase.
    pub fn set(&self, phase: Phase) {
        if let Some(e) = self.requests.lock().get_mut(&self.key) {
            e.phase = phase;
        }
    }

    /// Resolves when the request is asked to terminate.
    pub fn terminated(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.terminate.clone();
        async move {
            let _ = rx.wait_for(|t| *t).await;
        }
    }

    /// Whether termination was asked for.
    pub fn is_terminated(&self) -> bool {
        *self.terminate.borrow()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.requests.lock().remove(&self.key);
    }
}

impl RequestInfo {
    /// Celery's request-info dict, as `inspect active`/`reserved` reply it.
    pub fn to_json(&self, hostname: &str, phase: &Phase) -> Value {
        let time_start = match phase {
            Phase::Active(t) => json!(t),
            _ => Value::Null,
        };
        json!({
            "id": self.id,
            "name": self.name,
            "args": self.args,
            "kwargs": self.kwargs,
            "type": self.name,
            "hostname": hostname,
            "time_start": time_start,
            "acknowledged": false,
            "delivery_info": {
                "exchange": "",
                "routing_key": self.queue,
                "priority": self.priority,
                "redelivered": self.redelivered,
            },
            "worker_pid": std::process::id(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> RequestInfo {
        RequestInfo {
            id: id.into(),
            name: "diag.sleep".into(),
            args: "(10,)".into(),
            kwargs: "{}".into(),
            queue: "celery".into(),
            priority: None,
            redelivered: false,
        }
    }

    #[test]
    fn entries_follow_their_guards() {
        let r = Requests::default();
        let a = r.track(info("a"));
        let b = r.track(info("b"));
        b.set(Phase::Active(1.0));
        assert_eq!(r.active_count(), 1);
        assert_eq!(r.waiting_count(), 1);
        assert_eq!(r.list(|p| matches!(p, Phase::Reserved))[0].0.id, "a");
        assert_eq!(r.terminate(&["b".into()]), 1);
        assert!(b.is_terminated() && !a.is_terminated());
        drop(b);
        assert_eq!(r.active_count(), 0);
        drop(a);
        assert!(r.find(&["a".into()]).is_empty());
    }
}
