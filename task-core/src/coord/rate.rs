//! Cluster-wide rate limits: the GCRA that spaces starts, and the limits changed at run time.
//!
//! GCRA with a burst of one (tolerance 0) is Celery's token bucket of capacity one: the key holds
//! the theoretical arrival time (TAT) of the next start, in microseconds of Redis time. A start is
//! granted when the TAT has passed, and moves it to `now + 1/rate`; otherwise the answer is the
//! time left until the TAT, and nothing is written. The key expires at its TAT, after which a
//! missing key means the same as a past one.
//!
//! Limits set at run time (the `rate_limit` remote-control command) live in one hash,
//! `limits:rate`, task name → starts per second, which every worker reads.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use ::redis::{AsyncCommands, Script};
use tokio::time::Instant;

use super::redis::NOW;
use super::{Coordinator, MemoryCoordinator};
use crate::backoff::RateLimit;
use crate::error::{Error, Result};

/// KEYS: rate key. ARGV: interval µs. 0 if granted, else µs until a start is free.
static TRY_RATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW}{}",
        r"
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat and tat > now_us then return tat - now_us end
local interval = tonumber(ARGV[1])
redis.call('SET', KEYS[1], int(now_us + interval), 'PX', int(math.max(1, math.ceil(interval / 1000))))
return 0
"
    ))
});

/// The spacing between starts, in whole microseconds (the resolution of Redis's clock), or a
/// configuration error naming the bad rate.
pub(super) fn interval(rate: RateLimit) -> Result<Duration> {
    let per_second = rate.per_second;
    if per_second.is_nan() || per_second <= 0.0 {
        return Err(Error::Config(format!(
            "rate limit {per_second}/s must be a positive number of starts per second"
        )));
    }
    let interval = Duration::try_from_secs_f64(1.0 / per_second).map_err(|_| {
        Error::Config(format!(
            "rate limit {per_second}/s is too low (less than one start in 500 million years)"
        ))
    })?;
    let micros = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX);
    Ok(Duration::from_micros(micros))
}

impl Coordinator {
    /// Takes a start slot for `key` now (`Ok(None)`), or says how long until one is free
    /// (`Ok(Some(wait))`) without reserving it. Slots are at least `1 / rate` apart across every
    /// worker sharing this coordinator.
    ///
    /// A worker that got a wait sleeps it and asks again; another worker may take the slot first,
    /// in which case the answer is a new wait.
    pub async fn try_rate(&self, key: &str, rate: RateLimit) -> Result<Option<Duration>> {
        let interval = interval(rate)?;
        match self {
            Coordinator::Redis(r) => {
                let wait_us: u64 = TRY_RATE
                    .key(r.keyed("rate", key))
                    .arg(u64::try_from(interval.as_micros()).unwrap_or(u64::MAX))
                    .invoke_async(&mut r.conn())
                    .await?;
                Ok((wait_us > 0).then(|| Duration::from_micros(wait_us)))
            }
            Coordinator::Memory(m) => Ok(m.try_rate(key, interval)),
        }
    }

    /// Sets the rate limit of `task` for every worker (`None` removes the override, so the
    /// task's own option applies again).
    pub async fn set_rate_limit(&self, task: &str, rate: Option<RateLimit>) -> Result<()> {
        if let Some(rate) = rate {
            interval(rate)?;
        }
        match self {
            Coordinator::Redis(r) => {
                let mut conn = r.conn();
                let key = r.key("limits:rate");
                let _: i64 = match rate {
                    // f64's Display is the shortest text that parses back to the same number.
                    Some(rate) => conn.hset(key, task, rate.per_second.to_string()).await?,
                    None => conn.hdel(key, task).await?,
                };
                Ok(())
            }
            Coordinator::Memory(m) => {
                let mut s = m.state();
                match rate {
                    Some(rate) => s.limits.insert(task.to_owned(), rate),
                    None => s.limits.remove(task),
                };
                Ok(())
            }
        }
    }

    /// The rate limits set at run time, by task name.
    pub async fn rate_limits(&self) -> Result<HashMap<String, RateLimit>> {
        match self {
            Coordinator::Redis(r) => {
                let key = r.key("limits:rate");
                let stored: HashMap<String, String> = r.conn().hgetall(&key).await?;
                Ok(stored
                    .into_iter()
                    .filter_map(|(task, value)| {
                        let rate = value
                            .parse::<f64>()
                            .ok()
                            .map(|per_second| RateLimit { per_second })
                            .filter(|rate| interval(*rate).is_ok());
                        if rate.is_none() {
                            // One bad entry must not take the others away from every worker.
                            tracing::warn!(key, task, value, "ignoring an invalid rate limit");
                        }
                        Some((task, rate?))
                    })
                    .collect())
            }
            Coordinator::Memory(m) => Ok(m.state().limits.clone()),
        }
    }
}

impl MemoryCoordinator {
    pub(super) fn rate_wait(&self, key: &str, interval: Duration) -> Option<Duration> {
        self.try_rate(key, interval)
    }

    fn try_rate(&self, key: &str, interval: Duration) -> Option<Duration> {
        let now = Instant::now();
        let mut s = self.state();
        if let Some(tat) = s.rate.get(key)
            && *tat > now
        {
            return Some(*tat - now);
        }
        s.rate.insert(key.to_owned(), now + interval);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_second(per_second: f64) -> RateLimit {
        RateLimit { per_second }
    }

    #[tokio::test(start_paused = true)]
    async fn starts_are_spaced_one_interval_apart() {
        let coord = Coordinator::memory();
        let other = coord.clone();
        let rate = per_second(20.0);
        assert_eq!(coord.try_rate("t", rate).await.unwrap(), None);
        // Asking does not reserve: both see the same wait.
        assert_eq!(
            other.try_rate("t", rate).await.unwrap(),
            Some(Duration::from_millis(50))
        );
        tokio::time::advance(Duration::from_millis(20)).await;
        assert_eq!(
            coord.try_rate("t", rate).await.unwrap(),
            Some(Duration::from_millis(30))
        );
        // Keys are independent.
        assert_eq!(coord.try_rate("u", rate).await.unwrap(), None);

        // 40 grants, waiting exactly what we are told, take 39 intervals.
        let start = Instant::now();
        tokio::time::advance(Duration::from_millis(30)).await;
        let mut grants = 0;
        while grants < 40 {
            match coord.try_rate("t", rate).await.unwrap() {
                None => grants += 1,
                Some(wait) => tokio::time::advance(wait).await,
            }
        }
        assert_eq!(start.elapsed(), Duration::from_millis(30 + 39 * 50));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_key_grants_at_once_without_a_burst() {
        let coord = Coordinator::memory();
        let rate = per_second(1.0);
        assert_eq!(coord.try_rate("t", rate).await.unwrap(), None);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(coord.try_rate("t", rate).await.unwrap(), None);
        assert!(coord.try_rate("t", rate).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn bad_rates_are_configuration_errors() {
        let coord = Coordinator::memory();
        for bad in [0.0, -1.0, f64::NAN, 1e-300] {
            let err = coord.try_rate("t", per_second(bad)).await.unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad}: {err}");
            assert!(
                coord
                    .set_rate_limit("t", Some(per_second(bad)))
                    .await
                    .is_err()
            );
        }
        // No spacing at all above a million a second.
        assert_eq!(coord.try_rate("t", per_second(1e7)).await.unwrap(), None);
        assert_eq!(coord.try_rate("t", per_second(1e7)).await.unwrap(), None);
    }

    #[tokio::test]
    async fn run_time_limits_are_set_and_removed() {
        let coord = Coordinator::memory();
        coord
            .set_rate_limit("a", Some(per_second(2.0)))
            .await
            .unwrap();
        coord
            .set_rate_limit("b", Some("120/m".parse().unwrap()))
            .await
            .unwrap();
        coord.set_rate_limit("b", None).await.unwrap();
        coord.set_rate_limit("never-set", None).await.unwrap();
        let limits = coord.rate_limits().await.unwrap();
        assert_eq!(limits, HashMap::from([("a".to_owned(), per_second(2.0))]));
    }
}
