//! Per-worker, per-task-type rate limits: a token bucket of capacity one, as Celery's, so starts
//! are spaced at least `1 / rate` apart.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::RateLimit;

#[derive(Debug, Default)]
pub(crate) struct Limiter {
    next_start: Mutex<HashMap<String, Instant>>,
}

impl Limiter {
    /// Reserves the next start slot for `task` and returns when it is due.
    pub(crate) fn reserve(&self, task: &str, limit: RateLimit) -> Instant {
        let interval = Duration::from_secs_f64(1.0 / limit.per_second);
        let now = Instant::now();
        let mut next = self.next_start.lock().expect("rate limiter lock");
        let slot = next.get(task).copied().filter(|t| *t > now).unwrap_or(now);
        next.insert(task.to_owned(), slot + interval);
        slot
    }
}
