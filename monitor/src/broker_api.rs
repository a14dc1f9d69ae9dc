//! Every declared queue, from RabbitMQ's management HTTP API (`MONITOR_BROKER_API`, the same
//! setting as Flower's `--broker-api`: `http://guest:guest@127.0.0.1:15672/api/`).
//!
//! AMQP alone can only ask about a queue by name (a passive declare), so without this API the
//! monitor sees just the queues the workers report consuming, and no queue's oldest message.
//! The API lists every queue of the broker URL's virtual host, paged (500 a request), with ready
//! and unacknowledged counts, consumers and `head_message_timestamp`: the AMQP `timestamp`
//! property of the message at the head of the queue, which task-core's client sets on every
//! publish (kombu does not, so a queue fed only by Python shows no age). The broker refreshes
//! these statistics every few seconds (`collect_statistics_interval`, 5 s by default), so the
//! listing is cached for [`CACHE_FOR`]: a page, the API and a Prometheus scrape share one read.
//!
//! Queues that are `exclusive` or `auto_delete` (reply queues, remote-control and event
//! receivers' queues) come and go with their consumers; they are left out, so pod churn does not
//! pile up metric series.

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::{Error, Result};

/// How long one listing is reused.
pub const CACHE_FOR: Duration = Duration::from_secs(5);
const PAGE_SIZE: usize = 500;
const TIMEOUT: Duration = Duration::from_secs(10);
const COLUMNS: &str = "name,messages,messages_ready,messages_unacknowledged,consumers,\
head_message_timestamp,durable,auto_delete,exclusive,type";

/// One queue as the management API reports it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ApiQueue {
    pub name: String,
    /// Ready plus unacknowledged; absent until the broker has emitted statistics for the queue.
    #[serde(default)]
    pub messages: Option<u64>,
    #[serde(default)]
    pub messages_ready: Option<u64>,
    #[serde(default)]
    pub messages_unacknowledged: Option<u64>,
    #[serde(default)]
    pub consumers: Option<u64>,
    /// Unix seconds: the `timestamp` property of the head message, when it has one.
    #[serde(default)]
    pub head_message_timestamp: Option<f64>,
    #[serde(default)]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub exclusive: bool,
    /// `classic`, `quorum` or `stream`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

impl ApiQueue {
    /// The age of the head message at `now` (Unix seconds), when the queue holds a ready message
    /// with a timestamp.
    pub fn oldest_age(&self, now: f64) -> Option<f64> {
        match self.messages_ready {
            Some(0) => Some(0.0),
            _ => self.head_message_timestamp.map(|t| (now - t).max(0.0)),
        }
    }

    /// Messages a quorum queue has dead-lettered at least once (`x-dead-letter-strategy:
    /// at-least-once`, as task-core's delay levels are) and still holds until every target queue
    /// confirms them: the API's total minus ready minus unacknowledged. Normally they pass in
    /// milliseconds; a count that stays up means dead-lettering is stuck (see deploy/README.md,
    /// TaskQueueDeadLetteringStuck).
    pub fn dead_lettering(&self) -> Option<u64> {
        if self.kind.as_deref() != Some("quorum") {
            return None;
        }
        // The three counts are read together but may disagree by a message in passing.
        let settled = self.messages_ready? + self.messages_unacknowledged?;
        Some(self.messages?.saturating_sub(settled))
    }

    fn lasting(&self) -> bool {
        !self.exclusive && !self.auto_delete
    }
}

#[derive(Deserialize)]
struct Page {
    items: Vec<ApiQueue>,
    page_count: usize,
}

/// A client of the management API for one virtual host, with a short cache.
#[derive(Debug)]
pub struct BrokerApi {
    http: reqwest::Client,
    queues_url: reqwest::Url,
    user: String,
    password: Option<String>,
    shown: String,
    cache: tokio::sync::Mutex<Option<(Instant, Vec<ApiQueue>)>>,
}

impl BrokerApi {
    /// A client of `api` (the management API's base, ending in `/api/`) for `vhost`. The user and
    /// password come from the URL.
    pub fn new(api: &str, vhost: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Config(format!(
                "MONITOR_BROKER_API {}: {why}",
                task_core::redact_url(api)
            ))
        };
        let mut base = reqwest::Url::parse(api).map_err(|e| bad(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad("needs an http:// or https:// URL"));
        }
        let user = match base.username() {
            "" => "guest".to_owned(),
            u => percent_decode(u),
        };
        let password = base.password().map(percent_decode);
        let _ = base.set_username("");
        let _ = base.set_password(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut queues_url = base.join("queues/").map_err(|e| bad(&e.to_string()))?;
        // The vhost is one path segment: `/` travels as %2F.
        queues_url
            .path_segments_mut()
            .map_err(|()| bad("cannot be a base URL"))?
            .pop_if_empty()
            .push(vhost);
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(BrokerApi {
            http,
            shown: task_core::redact_url(api),
            queues_url,
            user,
            password,
            cache: tokio::sync::Mutex::new(None),
        })
    }

    /// Every lasting queue (neither exclusive nor auto-delete), sorted by name; at most
    /// [`CACHE_FOR`] old.
    pub async fn queues(&self) -> Result<Vec<ApiQueue>> {
        let mut cache = self.cache.lock().await;
        if let Some((at, queues)) = cache.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return Ok(queues.clone());
        }
        let mut all = Vec::new();
        let mut page = 1;
        loop {
            let got = self.page(page).await?;
            all.extend(got.items.into_iter().filter(ApiQueue::lasting));
            if page >= got.page_count {
                break;
            }
            page += 1;
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        *cache = Some((Instant::now(), all.clone()));
        Ok(all)
    }

    /// Forgets the cached listing (after a purge, say).
    pub async fn invalidate(&self) {
        *self.cache.lock().await = None;
    }

    async fn page(&self, page: usize) -> Result<Page> {
        let unavailable = |why: String| {
            Error::Unavailable(format!("RabbitMQ management API {}: {why}", self.shown))
        };
        let mut url = self.queues_url.clone();
        url.query_pairs_mut()
            .append_pair("page", &page.to_string())
            .append_pair("page_size", &PAGE_SIZE.to_string())
            .append_pair("columns", COLUMNS);
        let response = self
            .http
            .get(url)
            .basic_auth(&self.user, self.password.as_deref())
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(unavailable(format!(
                "{status}: {}",
                body.chars().take(200).collect::<String>()
            )));
        }
        response
            .json::<Page>()
            .await
            .map_err(|e| unavailable(format!("unexpected answer: {e}")))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The virtual host an AMQP URL names (`amqp://h/%2f` and `amqp://h` are `/`).
pub fn vhost_of(amqp_url: &str) -> String {
    let rest = amqp_url.split_once("://").map_or(amqp_url, |(_, r)| r);
    match rest.split_once('/') {
        Some((_, path)) => {
            let path = path.split(['?', '#']).next().unwrap_or_default();
            if path.is_empty() {
                "/".to_owned()
            } else {
                percent_decode(path)
            }
        }
        None => "/".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vhost_comes_from_the_broker_url() {
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(vhost_of("amqp://127.0.0.1:5672"), "/");
        assert_eq!(vhost_of("amqp://127.0.0.1:5672/"), "/");
        assert_eq!(vhost_of("amqps://h/billing?heartbeat=10"), "billing");
        assert_eq!(vhost_of("amqp://h/a%2Fb"), "a/b");
    }

    #[test]
    fn the_queues_url_carries_the_vhost_as_one_segment_and_no_credentials() {
        let api = BrokerApi::new("http://ops:s%40cret@127.0.0.1:15672/api", "/").unwrap();
        assert_eq!(
            api.queues_url.as_str(),
            "http://127.0.0.1:15672/api/queues/%2F"
        );
        assert_eq!(
            (api.user.as_str(), api.password.as_deref()),
            ("ops", Some("s@cret"))
        );
        assert!(!api.shown.contains("s%40cret"), "{}", api.shown);
        assert!(BrokerApi::new("amqp://h/", "/").is_err());
    }

    #[test]
    fn the_oldest_age_is_zero_for_an_empty_queue_and_unknown_without_a_timestamp() {
        let q = |ready, ts| ApiQueue {
            name: "q".into(),
            messages: ready,
            messages_ready: ready,
            messages_unacknowledged: Some(0),
            consumers: Some(1),
            head_message_timestamp: ts,
            durable: true,
            auto_delete: false,
            exclusive: false,
            kind: Some("classic".into()),
        };
        assert_eq!(q(Some(0), None).oldest_age(100.0), Some(0.0));
        assert_eq!(q(Some(3), Some(40.0)).oldest_age(100.0), Some(60.0));
        assert_eq!(q(Some(3), None).oldest_age(100.0), None);
        assert_eq!(q(None, Some(120.0)).oldest_age(100.0), Some(0.0));
    }

    #[test]
    fn a_quorum_queue_counts_what_it_holds_for_dead_lettering() {
        let q = |kind: &str, all, ready, unacked| ApiQueue {
            name: "tq.delay.1".into(),
            messages: all,
            messages_ready: ready,
            messages_unacknowledged: unacked,
            consumers: Some(0),
            head_message_timestamp: None,
            durable: true,
            auto_delete: false,
            exclusive: false,
            kind: Some(kind.into()),
        };
        assert_eq!(
            q("quorum", Some(18), Some(0), Some(0)).dead_lettering(),
            Some(18)
        );
        assert_eq!(
            q("quorum", Some(5), Some(3), Some(2)).dead_lettering(),
            Some(0)
        );
        assert_eq!(
            q("quorum", Some(4), Some(3), Some(2)).dead_lettering(),
            Some(0)
        );
        assert_eq!(q("quorum", None, Some(3), Some(2)).dead_lettering(), None);
        assert_eq!(
            q("classic", Some(9), Some(3), Some(2)).dead_lettering(),
            None
        );
    }
}
