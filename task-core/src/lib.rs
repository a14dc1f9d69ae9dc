//! A Celery-compatible distributed task queue.
//!
//! - [`protocol`]: Celery's message protocol v2 (JSON and msgpack), as Python's `celery` sends it.
//! - [`broker`]: RabbitMQ ([`AmqpBroker`]) and in-memory ([`MemoryBroker`]) brokers.
//! - [`backend`]: Redis ([`RedisBackend`]) and in-memory ([`MemoryBackend`]) result backends in
//!   Celery's format.
//! - [`Task`], [`Registry`], [`Client`] and [`Worker`]: typed tasks, sending them, running them.
//! - [`canvas`]: chains, groups, chords and callbacks in Celery's wire form.
//! - [`diag`]: the diagnostic tasks every worker registers.
//!
//! Delivery is at least once (acknowledged after the result is stored); exactly-once effects are
//! the task's job, helped by a stable task id and the `redelivered` flag in [`TaskContext`].

pub mod backend;
pub mod backoff;
pub mod blocking;
pub mod broker;
pub mod canvas;
#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod clock;
pub mod control;
pub mod coord;
pub mod diag;
mod error;
pub mod events;
pub mod health;
pub mod metrics;
pub mod protocol;
pub mod redact;
pub mod redis_conn;
pub mod redis_url;
mod registry;
pub mod shutdown;
pub mod signals;
pub mod task;
pub mod telemetry;
pub mod worker;

pub use backend::{
    AnyBackend, MemoryBackend, RedisBackend, ResultBackend, RpcBackend, TaskMeta, TaskState,
};
pub use backoff::{Backoff, RateLimit};
pub use broker::{AmqpBroker, AnyBroker, Broker, MemoryBroker};
pub use client::{AsyncResult, Client};
pub use clock::Clock;
pub use error::{Error, Result};
pub use protocol::ContentType;
pub use registry::Registry;
pub use task::{Task, TaskContext, TaskError, TaskOptions};
pub use worker::{Worker, WorkerConfig};

/// This machine's host name (`HOSTNAME`, then the kernel's, then `localhost`).
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A URL with its password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    if url.contains(';') {
        // Celery's list forms (`sentinel://…;sentinel://…`): each address on its own.
        return url.split(';').map(redact_url).collect::<Vec<_>>().join(";");
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact_url("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(
            super::redact_url("redis://:pw@h:6379/0"),
            "redis://:***@h:6379/0"
        );
        assert_eq!(super::redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(super::redact_url("memory://"), "memory://");
    }
}
