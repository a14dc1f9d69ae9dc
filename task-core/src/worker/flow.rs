//! Admission: the rate limit of a task type and its per-key limits, waited for *before* the
//! message takes a concurrency slot.
//!
//! Limits live in the coordinator, so with Redis they hold across every worker. A message that
//! must wait a little waits here without a slot; one that would wait long, or that arrives while
//! many others already wait, goes back to the broker's delay queues ([`Admission::Defer`]) so it
//! neither holds prefetch room that other task types need nor is lost. Concurrency permits are
//! leases, renewed while the task runs and released when it ends; a worker that dies frees its
//! permits when their lease runs out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};

use super::State;
use crate::backoff::RateLimit;
use crate::coord::{Admit, Coordinator};
use crate::protocol::TaskMessage;
use crate::task::{KeyLimit, LimitKey, TaskOptions};

/// Longest wait spent holding a message; longer ones are deferred to the broker.
const HOLD: Duration = Duration::from_secs(2);
/// Lease of a concurrency permit, renewed every third of it while the task runs.
const LEASE: Duration = Duration::from_secs(30);

pub(super) enum Admission {
    /// Run now; the permits are released when dropped.
    Go(Permits),
    /// Give the message back to the broker for this long.
    Defer(Duration),
    /// Shutdown began while waiting.
    Stopped,
}

/// Concurrency permits held by a running task.
#[derive(Debug, Default)]
pub(super) struct Permits {
    held: Vec<String>,
    holder: String,
    releases: Option<tokio::sync::mpsc::UnboundedSender<(String, String)>>,
    renewal: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Permits {
    fn drop(&mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        if let Some(releases) = self.releases.take()
            && !self.held.is_empty()
        {
            let holder = std::mem::take(&mut self.holder);
            for key in std::mem::take(&mut self.held) {
                // The worker's release loop gives them back in batches (one round trip each);
                // if it is gone, the permit expires with its lease.
                let _ = releases.send((key, holder.clone()));
            }
        }
    }
}

/// Counts a message as waiting for a limit while it lives.
struct Waiting<'a> {
    state: &'a State,
    /// Whether this delivery was counted in `tq_rate_limit_waits_total` (once, however often it
    /// polls).
    delayed: AtomicBool,
}

impl<'a> Waiting<'a> {
    fn enter(state: &'a State) -> Self {
        state.limit_waiters.fetch_add(1, Ordering::Relaxed);
        Waiting {
            state,
            delayed: AtomicBool::new(false),
        }
    }

    fn delayed(&self, task: &str) {
        if !self.delayed.swap(true, Ordering::Relaxed) {
            self.state.metrics.rate_limit_wait(task);
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.state.limit_waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits for the task type's rate limit and its key limits.
/// Whether `name` has a rate or per-key limit, so [`admit`] may wait.
pub(super) fn limited(state: &State, name: &str, options: &TaskOptions) -> bool {
    state
        .overrides(name)
        .rate_limit
        .unwrap_or(options.rate_limit)
        .is_some()
        || !options.key_limits.is_empty()
}

pub(super) async fn admit(
    state: &Arc<State>,
    message: &TaskMessage,
    options: &TaskOptions,
    fields: Option<&'static [&'static str]>,
) -> Admission {
    let name = &message.headers.task;
    if !limited(state, name, options) {
        return Admission::Go(Permits::default());
    }
    let rate = state
        .overrides(name)
        .rate_limit
        .unwrap_or(options.rate_limit);
    let coord = state.coordinator();
    let waiting = Waiting::enter(state);
    if let Some(rate) = rate
        && let Some(a) = wait_rate(&waiting, &coord, &format!("task:{name}"), rate, name).await
    {
        return a;
    }
    let mut permits = Permits {
        holder: format!(
            "{}/{}/{}",
            state.hostname,
            message.headers.id,
            uuid::Uuid::new_v4().simple()
        ),
        releases: Some(state.releases.clone()),
        held: Vec::new(),
        renewal: None,
    };
    for limit in &options.key_limits {
        let Some(key) = limit_key(name, limit, &message.args, &message.kwargs, fields) else {
            continue;
        };
        let key = format!("key:{key}");
        match (limit.concurrency, limit.rate) {
            // Both in one round trip: the permit and the rate slot are taken together.
            (Some(n), rate) => {
                match wait_permit(&waiting, &coord, &key, n, rate, &permits.holder, name).await {
                    None => permits.held.push(key),
                    Some(a) => return a,
                }
            }
            (None, Some(rate)) => {
                if let Some(a) = wait_rate(&waiting, &coord, &key, rate, name).await {
                    return a;
                }
            }
            (None, None) => {}
        }
    }
    if !permits.held.is_empty() {
        let (coord, held, holder) = (coord.clone(), permits.held.clone(), permits.holder.clone());
        permits.renewal = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                for key in &held {
                    if let Err(e) = coord.renew(key, &holder, LEASE).await {
                        tracing::warn!(key, error = %e, "could not renew a concurrency permit");
                    }
                }
            }
        }));
    }
    Admission::Go(permits)
}

/// The key a limit counts against, or `None` when the message does not carry the argument.
fn limit_key(
    task: &str,
    limit: &KeyLimit,
    args: &[Value],
    kwargs: &Map<String, Value>,
    fields: Option<&[&str]>,
) -> Option<String> {
    match &limit.key {
        LimitKey::Fixed(k) => Some(k.clone()),
        LimitKey::Arg(arg) => {
            let value = kwargs.get(arg).or_else(|| {
                let pos = fields?.iter().position(|f| f == arg)?;
                args.get(pos)
            })?;
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some(format!("{task}:{arg}={text}"))
        }
    }
}

/// Waits for a rate slot: `None` once taken, or what to do instead.
async fn wait_rate(
    waiting: &Waiting<'_>,
    coord: &Coordinator,
    key: &str,
    rate: RateLimit,
    task: &str,
) -> Option<Admission> {
    let state = waiting.state;
    let mut waited = Duration::ZERO;
    loop {
        let wait = match coord.try_rate(key, rate).await {
            Ok(None) => return None,
            Ok(Some(wait)) => wait,
            Err(e) => {
                tracing::warn!(key, error = %e, "rate limiter unavailable; waiting before retrying");
                Duration::from_millis(200)
            }
        };
        waiting.delayed(task);
        if too_long(state, waited + wait) {
            return Some(Admission::Defer(wait.max(Duration::from_secs(1))));
        }
        if super::execute::wait_or_stop(state, tokio::time::sleep(wait))
            .await
            .is_none()
        {
            return Some(Admission::Stopped);
        }
        waited += wait;
    }
}

/// Waits for a concurrency permit: `None` once held, or what to do instead.
async fn wait_permit(
    waiting: &Waiting<'_>,
    coord: &Coordinator,
    key: &str,
    limit: u32,
    rate: Option<RateLimit>,
    holder: &str,
    task: &str,
) -> Option<Admission> {
    let state = waiting.state;
    let mut poll = Duration::from_millis(5);
    let mut waited = Duration::ZERO;
    loop {
        let wait = match coord.try_admit(key, limit, rate, holder, LEASE).await {
            Ok(Admit::Granted) => return None,
            // A permit is free; the key's next start slot is this far.
            Ok(Admit::Wait(wait)) => wait,
            Ok(Admit::Busy) => {
                let p = poll;
                poll = (poll * 2).min(Duration::from_millis(100));
                p
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "concurrency limiter unavailable");
                Duration::from_millis(200)
            }
        };
        waiting.delayed(task);
        if too_long(state, waited + wait) {
            return Some(Admission::Defer(wait.max(Duration::from_secs(1))));
        }
        if super::execute::wait_or_stop(state, tokio::time::sleep(wait))
            .await
            .is_none()
        {
            return Some(Admission::Stopped);
        }
        waited += wait;
    }
}

/// Whether a wait is better spent in the broker: too long, or too many messages already wait
/// (they hold prefetch room other task types need).
fn too_long(state: &State, wait: Duration) -> bool {
    let waiters = state.limit_waiters.load(Ordering::Relaxed);
    wait > HOLD || waiters > state.concurrency.load(Ordering::Relaxed).max(1)
}

/// Gives released permits back in batches until stopped, then once more for what is left.
pub(super) async fn release_loop(
    coordinator: Coordinator,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            first = rx.recv() => match first {
                Some(p) => batch.push(p),
                None => break,
            },
            _ = stop.wait_for(|s| *s) => break,
        }
        while batch.len() < 512
            && let Ok(p) = rx.try_recv()
        {
            batch.push(p);
        }
        release(&coordinator, &mut batch).await;
    }
    while let Ok(p) = rx.try_recv() {
        batch.push(p);
    }
    release(&coordinator, &mut batch).await;
}

async fn release(coordinator: &Coordinator, batch: &mut Vec<(String, String)>) {
    if let Err(e) = coordinator.release_many(batch).await {
        tracing::warn!(permits = batch.len(), error = %e, "could not release concurrency permits; they expire with their leases");
    }
    batch.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_come_from_arguments_by_name_or_position() {
        let limit = KeyLimit::by_arg("payer").concurrency(1);
        let kwargs = json!({"payer": "p-1"});
        assert_eq!(
            limit_key("t", &limit, &[], kwargs.as_object().unwrap(), None).as_deref(),
            Some("t:payer=p-1")
        );
        assert_eq!(
            limit_key(
                "t",
                &limit,
                &[json!(7), json!(42)],
                &Map::new(),
                Some(&["n", "payer"])
            )
            .as_deref(),
            Some("t:payer=42")
        );
        assert_eq!(limit_key("t", &limit, &[], &Map::new(), None), None);
        let fixed = KeyLimit::fixed("terminal:pk_1");
        assert_eq!(
            limit_key("t", &fixed, &[], &Map::new(), None).as_deref(),
            Some("terminal:pk_1")
        );
    }
}
