//! The worker's remote-control commands, answering as Celery's `celery/worker/control.py` does so
//! `celery inspect`, `celery control` and Flower read the replies unchanged.
//!
//! Inspect (read-only): `ping`, `stats`, `active`, `reserved`, `scheduled`, `revoked`,
//! `registered`, `conf`, `active_queues`, `query_task`, `clock`, `report`, `hello`.
//! Control: `heartbeat`, `enable_events`, `disable_events`, `revoke`, `terminate`, `rate_limit`,
//! `time_limit`, `pool_grow`, `pool_shrink`, `add_consumer`, `cancel_consumer`, `shutdown`.
//! Anything else answers `{"error": …}`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};

use super::requests::Phase;
use super::{Command, State};
use crate::backoff::RateLimit;
use crate::broker::AnyBroker;
use crate::control::{Handler, Request};

/// The handler given to [`crate::control::serve`].
pub(super) struct Commands(pub(super) Arc<State>);

impl Handler for Commands {
    fn handle(&self, request: Request) -> BoxFuture<'_, Value> {
        Box::pin(async move { dispatch(&self.0, request).await })
    }
}

fn ok(text: impl Into<String>) -> Value {
    json!({"ok": text.into()})
}

fn error(text: impl Into<String>) -> Value {
    json!({"error": text.into()})
}

async fn dispatch(state: &Arc<State>, request: Request) -> Value {
    let args = &request.arguments;
    match request.method.as_str() {
        "ping" => ok("pong"),
        "stats" => stats(state),
        "active" => requests(state, |p| matches!(p, Phase::Active(_))),
        "reserved" => requests(state, |p| matches!(p, Phase::Reserved)),
        "scheduled" => scheduled(state),
        "revoked" => json!(state.revoked.ids()),
        "registered" => registered(state, args),
        "conf" => conf(state),
        "active_queues" => active_queues(state),
        "query_task" => query_task(state, args),
        "clock" => json!({"clock": state.events.clock().value()}),
        "hello" => json!({"revoked": state.revoked.ids(), "clock": state.events.clock().value()}),
        "report" => {
            json!({"ok": format!("{} ({} {})", state.hostname, crate::events::SW_IDENT, env!("CARGO_PKG_VERSION"))})
        }
        "heartbeat" => {
            super::send_heartbeat(state);
            Value::Null
        }
        "enable_events" => {
            state.events.set_task_events(true);
            ok("task events enabled")
        }
        "disable_events" => {
            state.events.set_task_events(false);
            ok("task events disabled")
        }
        "revoke" => revoke(state, args, args_bool(args, "terminate")).await,
        "terminate" => revoke(state, args, true).await,
        "rate_limit" => rate_limit(state, args).await,
        "time_limit" => time_limit(state, args),
        "pool_grow" => pool(state, args, true).await,
        "pool_shrink" => pool(state, args, false).await,
        "add_consumer" => match args.get("queue").and_then(Value::as_str) {
            Some(q) if !q.is_empty() => {
                if state
                    .queues
                    .lock()
                    .expect("queues lock")
                    .iter()
                    .any(|x| x == q)
                {
                    return ok(format!("already consuming from {q:?}"));
                }
                let _ = state.commands.send(Command::AddQueue(q.to_owned())).await;
                ok(format!("add consumer {q}"))
            }
            _ => error("add_consumer needs a queue"),
        },
        "cancel_consumer" => match args.get("queue").and_then(Value::as_str) {
            Some(q) => {
                let _ = state
                    .commands
                    .send(Command::CancelQueue(q.to_owned()))
                    .await;
                ok(format!("no longer consuming from {q:?}"))
            }
            None => error("cancel_consumer needs a queue"),
        },
        "shutdown" => {
            let _ = state.commands.send(Command::Shutdown).await;
            ok("shutting down")
        }
        other => error(format!("unknown command `{other}`")),
    }
}

fn args_bool(args: &Map<String, Value>, key: &str) -> bool {
    args.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// `task_id` (or `task_ids`) as one id or a list.
fn ids(args: &Map<String, Value>) -> Vec<String> {
    let v = args
        .get("task_id")
        .or_else(|| args.get("task_ids"))
        .or_else(|| args.get("ids"))
        .or_else(|| args.get("id"));
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

fn requests(state: &State, wanted: fn(&Phase) -> bool) -> Value {
    Value::Array(
        state
            .requests
            .list(wanted)
            .iter()
            .map(|(info, phase)| info.to_json(&state.hostname, phase))
            .collect(),
    )
}

fn scheduled(state: &State) -> Value {
    Value::Array(
        state
            .requests
            .list(|p| matches!(p, Phase::Scheduled(_)))
            .iter()
            .map(|(info, phase)| {
                let eta = match phase {
                    Phase::Scheduled(eta) => json!(crate::protocol::format_datetime(*eta)),
                    _ => Value::Null,
                };
                json!({
                    "eta": eta,
                    "priority": info.priority.unwrap_or(0),
                    "request": info.to_json(&state.hostname, phase),
                })
            })
            .collect(),
    )
}

fn registered(state: &State, args: &Map<String, Value>) -> Value {
    let items: Vec<String> = match args.get("taskinfoitems") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    let names = state.registry.names().map(|name| {
        if items.is_empty() {
            return name.to_owned();
        }
        let options = state.registry.options(name);
        let mut parts = vec![name.to_owned()];
        for item in &items {
            let value = match (item.as_str(), options) {
                ("rate_limit", Some(o)) => o.rate_limit.map(|r| format!("{}/s", r.per_second)),
                ("time_limit", Some(o)) => o.time_limit.map(|d| d.as_secs_f64().to_string()),
                ("soft_time_limit", Some(o)) => {
                    o.soft_time_limit.map(|d| d.as_secs_f64().to_string())
                }
                ("max_retries", Some(o)) => o.max_retries.map(|n| n.to_string()),
                ("ignore_result", Some(o)) => {
                    Some(if o.ignore_result { "True" } else { "False" }.into())
                }
                ("queue", Some(o)) => o.queue.clone(),
                _ => None,
            };
            parts.push(format!(
                "[{item}={}]",
                value.unwrap_or_else(|| "None".into())
            ));
        }
        parts.join(" ")
    });
    Value::Array(names.map(Value::String).collect())
}

/// What `stats.broker` says about the connection (kombu's `Connection.info()`).
fn broker_info(broker: &AnyBroker) -> Value {
    match broker {
        AnyBroker::Amqp(b) => {
            let url = b.display_url();
            let rest = url.split_once("://").map_or(url, |(_, r)| r);
            let (auth, host) = rest.rsplit_once('@').unwrap_or(("guest", rest));
            let userid = auth.split(':').next().unwrap_or("guest");
            let (hostport, vhost) = host.split_once('/').unwrap_or((host, ""));
            let (hostname, port) = hostport.rsplit_once(':').unwrap_or((hostport, "5672"));
            let vhost = match vhost {
                "" | "%2f" | "%2F" => "/".to_owned(),
                v => v.replace("%2f", "/").replace("%2F", "/"),
            };
            json!({
                "hostname": hostname,
                "userid": userid,
                "virtual_host": vhost,
                "port": port.parse::<u16>().unwrap_or(5672),
                "insist": false,
                "ssl": url.starts_with("amqps://"),
                "transport": "amqp",
                "connect_timeout": 10,
                "transport_options": {},
                "login_method": "PLAIN",
                "uri_prefix": null,
                "heartbeat": 60.0,
                "failover_strategy": "round-robin",
                "alternates": [],
            })
        }
        AnyBroker::Memory(_) => json!({"transport": "memory", "hostname": "localhost"}),
    }
}

/// Process times and peak memory from /proc (Celery's `rusage`).
fn rusage() -> Value {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |t| t / 100.0)
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    json!({
        "utime": ticks(11),
        "stime": ticks(12),
        "maxrss": kb("VmHWM:"),
        "ixrss": 0, "idrss": 0, "isrss": 0, "minflt": 0, "majflt": 0, "nswap": 0,
        "inblock": 0, "oublock": 0, "msgsnd": 0, "msgrcv": 0, "nsignals": 0,
        "nvcsw": 0, "nivcsw": 0,
    })
}

fn stats(state: &State) -> Value {
    let totals = state.totals.lock().expect("totals lock").clone();
    let concurrency = state.concurrency.load(Ordering::Relaxed);
    let pid = std::process::id();
    json!({
        "total": totals,
        "pid": pid,
        "clock": state.events.clock().value().to_string(),
        "uptime": state.started.elapsed().as_secs(),
        "pool": {
            "implementation": "task_core::worker (tokio)",
            "max-concurrency": concurrency,
            "processes": [pid],
            "max-tasks-per-child": "N/A",
            "put-guarded-by-semaphore": false,
            "timeouts": [0, 0],
            "writes": {"total": 0, "avg": "0.00%", "all": "", "raw": "", "strategy": "", "inqueues": {"total": 0, "active": 0}},
        },
        "broker": broker_info(state.broker()),
        "prefetch_count": state.prefetch.load(Ordering::Relaxed),
        "rusage": rusage(),
        "sw_ident": crate::events::SW_IDENT,
        "sw_ver": env!("CARGO_PKG_VERSION"),
    })
}

fn conf(state: &State) -> Value {
    let c = &state.config;
    let broker_url = match state.broker() {
        AnyBroker::Amqp(b) => b.display_url().to_owned(),
        AnyBroker::Memory(_) => "memory://".to_owned(),
    };
    let queues = state.queues.lock().expect("queues lock").clone();
    json!({
        "broker_url": broker_url,
        "result_backend": "********",
        "worker_concurrency": state.concurrency.load(Ordering::Relaxed),
        "worker_prefetch_count": state.prefetch.load(Ordering::Relaxed),
        "worker_send_task_events": state.events.task_events(),
        "result_extended": c.result_extended,
        "task_queues": queues,
        "worker_shutdown_timeout": c.shutdown_timeout.as_secs_f64(),
        "revoke_ttl": c.revoke_ttl.as_secs(),
        "include": state.registry.names().collect::<Vec<_>>(),
    })
}

fn active_queues(state: &State) -> Value {
    let queues = state.queues.lock().expect("queues lock").clone();
    Value::Array(
        queues
            .iter()
            .map(|q| {
                json!({
                    "name": q,
                    "exchange": {
                        "name": q, "type": "direct", "arguments": null, "durable": true,
                        "passive": false, "auto_delete": false, "delivery_mode": null,
                        "no_declare": false,
                    },
                    "routing_key": q,
                    "queue_arguments": null,
                    "binding_arguments": null,
                    "consumer_arguments": null,
                    "durable": true,
                    "exclusive": false,
                    "auto_delete": false,
                    "no_ack": false,
                    "alias": null,
                    "bindings": [],
                    "no_declare": null,
                    "expires": null,
                    "message_ttl": null,
                    "max_length": null,
                    "max_length_bytes": null,
                    "max_priority": null,
                })
            })
            .collect(),
    )
}

fn query_task(state: &State, args: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for (info, phase) in state.requests.find(&ids(args)) {
        let kind = match phase {
            Phase::Active(_) => "active",
            Phase::Reserved => "reserved",
            Phase::Scheduled(_) => "scheduled",
        };
        out.insert(
            info.id.clone(),
            json!([kind, info.to_json(&state.hostname, &phase)]),
        );
    }
    Value::Object(out)
}

async fn revoke(state: &State, args: &Map<String, Value>, terminate: bool) -> Value {
    let ids = ids(args);
    if ids.is_empty() {
        return error("revoke needs a task_id");
    }
    state.revoked.add(&ids, state.config.revoke_ttl);
    if let Err(e) = state
        .coordinator
        .revoke(&ids, state.config.revoke_ttl)
        .await
    {
        tracing::warn!(error = %e, "could not store the revoke in the coordinator; it holds in memory on this worker");
    }
    let joined = ids.join(", ");
    if terminate {
        let running = state.requests.terminate(&ids);
        tracing::info!(ids = %joined, running, "revoked and terminating");
        ok(format!("terminate: tasks {joined} flagged as revoked"))
    } else {
        tracing::info!(ids = %joined, "revoked");
        ok(format!("tasks {joined} flagged as revoked"))
    }
}

/// `rate_limit(task_name, rate_limit)`: `"10/s"`, `"100/m"`, a number, or 0/None to lift it.
async fn rate_limit(state: &State, args: &Map<String, Value>) -> Value {
    let Some(task) = args.get("task_name").and_then(Value::as_str) else {
        return error("rate_limit needs a task_name");
    };
    if !state.registry.contains(task) {
        return error("unknown task");
    }
    let rate = match args.get("rate_limit") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_f64() == Some(0.0) => None,
        Some(Value::String(s)) if s.trim().is_empty() || s.trim() == "0" => None,
        Some(Value::String(s)) => match s.parse::<RateLimit>() {
            Ok(r) => Some(r),
            Err(e) => return error(format!("invalid rate limit string: {e}")),
        },
        Some(Value::Number(n)) => match n
            .as_f64()
            .map(|v| v.to_string())
            .unwrap_or_default()
            .parse()
        {
            Ok(r) => Some(r),
            Err(e) => return error(format!("invalid rate limit: {e}")),
        },
        Some(other) => return error(format!("invalid rate limit {other}")),
    };
    state
        .overrides
        .lock()
        .expect("overrides lock")
        .entry(task.to_owned())
        .or_default()
        .rate_limit = Some(rate);
    match state.coordinator.set_rate_limit(task, rate).await {
        Ok(()) => {
            let mut shared = state.shared_rates.lock().expect("rates lock");
            match rate {
                Some(r) => shared.insert(task.to_owned(), r),
                None => shared.remove(task),
            };
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not share the new rate limit; it holds on this worker");
        }
    }
    match rate {
        Some(_) => ok("new rate limit set successfully"),
        None => ok("rate limit disabled successfully"),
    }
}

fn seconds(v: Option<&Value>) -> Option<Duration> {
    let s = match v? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    (s.is_finite() && s > 0.0).then(|| Duration::from_secs_f64(s))
}

fn time_limit(state: &State, args: &Map<String, Value>) -> Value {
    let Some(task) = args.get("task_name").and_then(Value::as_str) else {
        return error("time_limit needs a task_name");
    };
    if !state.registry.contains(task) {
        return error("unknown task");
    }
    let mut overrides = state.overrides.lock().expect("overrides lock");
    let entry = overrides.entry(task.to_owned()).or_default();
    entry.soft_time_limit = Some(seconds(args.get("soft")));
    entry.time_limit = Some(seconds(args.get("hard")));
    ok("time limits set successfully")
}

async fn pool(state: &Arc<State>, args: &Map<String, Value>, grow: bool) -> Value {
    let n = args
        .get("n")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .unwrap_or(1) as usize;
    let current = state.concurrency.load(Ordering::Relaxed);
    let target = if grow {
        current.saturating_add(n)
    } else {
        current.saturating_sub(n).max(1)
    };
    if target == current {
        return error("the pool cannot shrink below one slot");
    }
    state.concurrency.store(target, Ordering::Relaxed);
    if target > current {
        state.slots.add_permits(target - current);
    } else {
        // Slots in use are taken back as their tasks finish.
        let slots = state.slots.clone();
        let n = u32::try_from(current - target).unwrap_or(u32::MAX);
        tokio::spawn(async move {
            if let Ok(p) = slots.acquire_many_owned(n).await {
                p.forget();
            }
        });
    }
    state.metrics.set_concurrency(target);
    // Keep the prefetch multiplier: the channel's QoS follows the pool.
    let prefetch = state.prefetch.load(Ordering::Relaxed);
    let per_slot = (prefetch / current.max(1)).max(1);
    let new_prefetch = u16::try_from(per_slot * target).unwrap_or(u16::MAX).max(1);
    state
        .prefetch
        .store(usize::from(new_prefetch), Ordering::Relaxed);
    let _ = state
        .commands
        .send(Command::SetPrefetch(new_prefetch))
        .await;
    tracing::info!(
        from = current,
        to = target,
        prefetch = new_prefetch,
        "pool resized"
    );
    ok(if grow {
        "pool will grow"
    } else {
        "pool will shrink"
    })
}
