//! What Flower's `/api/workers` shows: the replies of the workers to remote-control inspect
//! commands, cached per node (reference `celery-protocol.md` §4.5).
//!
//! As Flower 2.2 does: asking about every worker broadcasts `stats`, `active_queues`,
//! `registered` and `conf`; asking about one worker also fetches its task lists (`scheduled`,
//! `active`, `reserved`, `revoked`), which can be large. Each node's entry keeps the newest reply
//! of every method plus `timestamp`. Unlike Flower, a full refresh drops nodes that no longer
//! answer, so dead pods leave the list.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Map, Value, json};
use task_core::AmqpBroker;
use tokio::time::Instant;

use crate::error::Result;

/// What a full refresh asks every worker.
pub const SUMMARY_METHODS: [&str; 4] = ["stats", "active_queues", "registered", "conf"];
/// What asking about one worker fetches.
pub const ALL_METHODS: [&str; 8] = [
    "stats",
    "active_queues",
    "registered",
    "scheduled",
    "active",
    "reserved",
    "revoked",
    "conf",
];

/// One node's inspect replies, by method, plus `timestamp`.
pub type NodeInfo = Map<String, Value>;

#[derive(Debug, Default)]
struct Cache {
    nodes: BTreeMap<String, NodeInfo>,
    refreshed: Option<Instant>,
}

/// The inspect cache.
#[derive(Debug)]
pub struct Inspector {
    broker: AmqpBroker,
    timeout: Duration,
    ttl: Duration,
    // Held across a refresh, so concurrent requests share one round of broadcasts.
    cache: tokio::sync::Mutex<Cache>,
    /// The consumed queues as of the last full refresh, and when it was: readable while a
    /// refresh waits for replies (see [`Inspector::known_queue_names`]).
    known: std::sync::Mutex<(Vec<String>, Option<Instant>)>,
}

impl Inspector {
    /// An empty cache answering for `ttl`, each broadcast waiting `timeout` for replies.
    pub fn new(broker: AmqpBroker, timeout: Duration, ttl: Duration) -> Self {
        Inspector {
            broker,
            timeout,
            ttl,
            cache: tokio::sync::Mutex::new(Cache::default()),
            known: std::sync::Mutex::new((Vec::new(), None)),
        }
    }

    /// The queues the workers consumed at the last full refresh, at once, whether that refresh
    /// is older than the time to live (the caller refreshes in the background), and whether
    /// there was none yet. A
    /// scrape of `/metrics` must not wait for a broadcast's replies: Prometheus gives up on a
    /// slow scrape, and a request it abandons would never complete the refresh.
    pub fn known_queue_names(&self) -> (Vec<String>, bool, bool) {
        let known = self.known.lock().expect("known lock");
        let stale = known.1.is_none_or(|t| t.elapsed() >= self.ttl);
        (known.0.clone(), stale, known.1.is_none())
    }

    /// The cached nodes, refreshed first when `refresh` is set or the cache is older than its
    /// time to live. With `workername`, that node is asked for everything.
    pub async fn workers(
        &self,
        refresh: bool,
        workername: Option<&str>,
    ) -> Result<BTreeMap<String, NodeInfo>> {
        let mut cache = self.cache.lock().await;
        let stale = cache.refreshed.is_none_or(|t| t.elapsed() >= self.ttl);
        if workername.is_some() && refresh {
            self.inspect(&mut cache, workername).await?;
        } else if refresh || stale {
            self.inspect(&mut cache, None).await?;
        }
        Ok(cache.nodes.clone())
    }

    /// The names of the queues the cached workers consume.
    pub async fn queue_names(&self) -> Result<Vec<String>> {
        Ok(queue_names(&self.workers(false, None).await?))
    }

    async fn inspect(&self, cache: &mut Cache, workername: Option<&str>) -> Result<()> {
        let methods: &[&str] = if workername.is_some() {
            &ALL_METHODS
        } else {
            &SUMMARY_METHODS
        };
        let destination = workername.map(|w| vec![w.to_owned()]);
        let replies = join_all(methods.iter().map(|method| {
            let arguments = if *method == "active" {
                json!({"safe": true})
            } else {
                json!({})
            };
            task_core::control::broadcast(
                &self.broker,
                method,
                arguments,
                destination.as_deref(),
                self.timeout,
                destination.as_ref().map(|_| 1),
            )
        }))
        .await;
        let now = task_core::events::unix_now();
        let mut answered = std::collections::BTreeSet::new();
        for (method, reply) in methods.iter().zip(replies) {
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(method, error = %e, "inspect failed");
                    continue;
                }
            };
            for (node, mut response) in reply {
                if response.is_null() {
                    continue;
                }
                if *method == "stats"
                    && let Some(broker) = response.get_mut("broker").and_then(Value::as_object_mut)
                {
                    // As Flower does (its issue #1512): the list is not meant for display.
                    broker.remove("alternates");
                }
                answered.insert(node.clone());
                let info = cache.nodes.entry(node).or_default();
                info.insert((*method).to_owned(), response);
                info.insert("timestamp".into(), json!(now));
            }
        }
        if workername.is_none() {
            cache.nodes.retain(|node, _| answered.contains(node));
            cache.refreshed = Some(Instant::now());
            *self.known.lock().expect("known lock") = (queue_names(&cache.nodes), cache.refreshed);
        }
        Ok(())
    }
}

/// The names of the queues `nodes` report consuming, sorted, once each.
fn queue_names(nodes: &BTreeMap<String, NodeInfo>) -> Vec<String> {
    let mut names: Vec<String> = nodes
        .values()
        .filter_map(|info| info.get("active_queues")?.as_array().cloned())
        .flatten()
        .filter_map(|q| q.get("name")?.as_str().map(str::to_owned))
        .collect();
    names.sort();
    names.dedup();
    names
}
