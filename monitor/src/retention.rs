//! Retention: task rows are deleted once their last event is older than their state's limit
//! (`MONITOR_RETENTION`, e.g. `SUCCESS=7d,FAILURE=90d,*=30d`; `*` is every other state, `off`
//! keeps everything). A sweep runs every `MONITOR_RETENTION_EVERY` and deletes in batches, so a
//! large first sweep never holds a long lock. Workers, the audit log and bulk jobs are kept.

use std::time::Duration;

use tokio::sync::watch;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::Store;

/// Rows one delete statement takes at most.
const BATCH: i64 = 5_000;

/// How long task rows are kept, by state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// (state, limit) for the states named.
    pub states: Vec<(String, Duration)>,
    /// Every other state (`*`); `None` keeps them.
    pub default: Option<Duration>,
}

impl Retention {
    /// Whether anything is ever deleted.
    pub fn is_off(&self) -> bool {
        self.states.is_empty() && self.default.is_none()
    }
}

/// `STATE=duration` pairs, comma-separated, `*` for every other state; or `off`.
pub fn parse(text: &str) -> std::result::Result<Retention, String> {
    let text = text.trim();
    let mut r = Retention::default();
    if text.eq_ignore_ascii_case("off") || text.is_empty() {
        return Ok(r);
    }
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (state, limit) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected STATE=duration, e.g. SUCCESS=7d"))?;
        let limit = crate::config::parse_duration(limit).map_err(|e| format!("`{part}`: {e}"))?;
        if limit.is_zero() {
            return Err(format!(
                "`{part}`: a limit of zero would delete rows as they arrive"
            ));
        }
        let state = state.trim().to_ascii_uppercase();
        if state == "*" {
            r.default = Some(limit);
        } else if r.states.iter().any(|(s, _)| *s == state) {
            return Err(format!("`{state}` is given twice"));
        } else {
            r.states.push((state, limit));
        }
    }
    Ok(r)
}

/// Deletes what `retention` says is old at `now` (Unix seconds): how many rows.
pub async fn sweep(store: &Store, retention: &Retention, now: f64) -> Result<u64> {
    let mut deleted = 0;
    let named: Vec<String> = retention.states.iter().map(|(s, _)| s.clone()).collect();
    for (state, limit) in &retention.states {
        let before = now - limit.as_secs_f64();
        loop {
            let n = sqlx::query(
                "DELETE FROM tasks WHERE uuid IN (SELECT uuid FROM tasks \
                 WHERE state = $1 AND \"timestamp\" < $2 LIMIT $3)",
            )
            .bind(state)
            .bind(before)
            .bind(BATCH)
            .execute(store.pool())
            .await?
            .rows_affected();
            deleted += n;
            if n < BATCH as u64 {
                break;
            }
        }
    }
    if let Some(limit) = retention.default {
        let before = now - limit.as_secs_f64();
        loop {
            let n = sqlx::query(
                "DELETE FROM tasks WHERE uuid IN (SELECT uuid FROM tasks \
                 WHERE NOT (state = ANY($1)) AND \"timestamp\" < $2 LIMIT $3)",
            )
            .bind(&named)
            .bind(before)
            .bind(BATCH)
            .execute(store.pool())
            .await?
            .rows_affected();
            deleted += n;
            if n < BATCH as u64 {
                break;
            }
        }
    }
    Ok(deleted)
}

/// Sweeps every `every` until `stop` says so.
pub async fn run(
    store: Store,
    retention: Retention,
    every: Duration,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    if retention.is_off() {
        return;
    }
    loop {
        match sweep(&store, &retention, task_core::events::unix_now()).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.pruned(n);
                tracing::info!(deleted = n, "retention: old task rows deleted");
            }
            Err(e) => tracing::warn!(error = %e, "retention sweep failed; trying again later"),
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_read_by_state() {
        let r = parse("SUCCESS=7d, failure=90d,*=30d").unwrap();
        assert_eq!(
            r.states,
            [
                ("SUCCESS".to_owned(), Duration::from_secs(7 * 86400)),
                ("FAILURE".to_owned(), Duration::from_secs(90 * 86400))
            ]
        );
        assert_eq!(r.default, Some(Duration::from_secs(30 * 86400)));
        assert!(parse("off").unwrap().is_off());
        assert!(parse("SUCCESS").unwrap_err().contains("STATE=duration"));
        assert!(parse("SUCCESS=0s").unwrap_err().contains("zero"));
        assert!(
            parse("SUCCESS=1d,success=2d")
                .unwrap_err()
                .contains("twice")
        );
        assert!(parse("SUCCESS=soon").is_err());
    }
}
