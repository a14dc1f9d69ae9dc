//! A schedule entry: which task to send, when, and what to do about missed or overlapping runs.
//!
//! [`EntrySpec`] is the written form, the same in the TOML schedule file, in the JSON the store
//! keeps and in the runtime API: plain strings and numbers, every field but `name` and `task`
//! optional. [`Entry::new`] validates a spec once and compiles it; everything after that (the
//! beat loop, the store) works with a valid [`Entry`] only, so a bad definition is refused where
//! it comes in, with the entry's name and the reason.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::schedule::Schedule;

/// The queue an entry's task goes to when it names none (Celery's default).
pub const DEFAULT_QUEUE: &str = task_core::client::DEFAULT_QUEUE;

/// How long a run that left no result is presumed queued or running, for `overlap = "skip"`
/// when the entry sets no `expires`: the result backend's default retention, after which a
/// missing result says nothing any more.
pub const DEFAULT_OVERLAP_HORIZON: Duration = task_core::backend::DEFAULT_RESULT_TTL;

/// An entry as written: in the schedule file (`[[entry]]`), in the store, in the runtime API.
///
/// Durations are strings such as `"30s"`, `"15m"`, `"1h30m"`, `"2d"` or `"500ms"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// Unique name: letters, digits, `.`, `_` and `-`.
    pub name: String,
    /// Task name as registered in the workers, e.g. `billing.enqueue_renewals`.
    pub task: String,
    /// Cron expression: 5 fields, or 6 with seconds first; `L`, `W`, `#` allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// IANA time zone the cron expression is read in (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Fixed interval instead of a cron expression, e.g. `"30s"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// RFC 3339 instant the interval is counted from (default the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
    /// Positional arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub kwargs: Map<String, Value>,
    /// Target queue (default `celery`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Message priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// The run is discarded if not started within this long after its tick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Soft time limit of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_time_limit: Option<String>,
    /// Hard time limit of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<String>,
    /// What to do with ticks missed while no scheduler was running (default `once`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<CatchUpPolicy>,
    /// With `catch_up = "all"` (required) or `"once"` (optional): how far back missed ticks
    /// are still run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up_window: Option<String>,
    /// Whether a tick fires while the previous run has not finished (default `allow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap: Option<Overlap>,
    /// Up to this much delay added to each run, the same for a given tick on every replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
}

/// The written catch-up policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatchUpPolicy {
    /// Missed ticks are dropped; the next tick runs as usual.
    Skip,
    /// All due ticks collapse into one run, for the latest of them.
    Once,
    /// Every missed tick within the window runs, oldest first.
    All,
}

/// What to do with ticks that are due but late (downtime, a leader change).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// Run only ticks that are on time (within the beat's grace period); drop the others.
    Skip,
    /// Run one run, for the latest due tick, unless it is older than `window`.
    Once {
        /// Maximum age of the catch-up run's tick.
        window: Option<Duration>,
    },
    /// Run every due tick not older than `window`, oldest first.
    All {
        /// Maximum age of a tick still run.
        window: Duration,
    },
}

/// Overlap policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// Fire every tick, whatever the previous run is doing.
    #[default]
    Allow,
    /// Do not fire while the previous run is queued or running.
    Skip,
}

/// A definition that was refused, with the entry's name (or position) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry `{entry}`: {reason}")]
pub struct EntryError {
    /// The entry's name, or `#N` (1-based position in the file) when it has none.
    pub entry: String,
    /// What is wrong, in words a person can act on.
    pub reason: String,
}

/// A validated entry, ready to fire.
#[derive(Debug, Clone)]
pub struct Entry {
    spec: EntrySpec,
    schedule: Schedule,
    queue: String,
    expires: Option<Duration>,
    soft_time_limit: Option<Duration>,
    time_limit: Option<Duration>,
    catch_up: CatchUp,
    overlap: Overlap,
    jitter: Option<Duration>,
}

impl Entry {
    /// Validates and compiles a spec.
    pub fn new(spec: EntrySpec) -> Result<Self, EntryError> {
        let label = if spec.name.is_empty() {
            "(unnamed)".to_owned()
        } else {
            spec.name.clone()
        };
        Self::build(spec).map_err(|reason| EntryError {
            entry: label,
            reason,
        })
    }

    fn build(spec: EntrySpec) -> Result<Self, String> {
        check_name(&spec.name)?;
        if spec.task.trim().is_empty() || spec.task.chars().any(char::is_whitespace) {
            return Err(format!(
                "task `{}` is not a task name (e.g. billing.enqueue_renewals)",
                spec.task
            ));
        }
        let schedule = match (&spec.cron, &spec.every) {
            (Some(_), Some(_)) => {
                return Err("both `cron` and `every` are set; an entry has one schedule".into());
            }
            (None, None) => {
                return Err(
                    "no schedule: set `cron` (e.g. \"0 * * * *\") or `every` (e.g. \"30s\")".into(),
                );
            }
            (Some(expr), None) => {
                if spec.anchor.is_some() {
                    return Err("`anchor` applies to `every` schedules only".into());
                }
                let tz = spec.timezone.as_deref().unwrap_or("UTC");
                Schedule::cron(expr, tz).map_err(|e| e.to_string())?
            }
            (None, Some(every)) => {
                if spec.timezone.is_some() {
                    return Err(
                        "`timezone` applies to `cron` schedules only; intervals are real time"
                            .into(),
                    );
                }
                let period = field_duration("every", every)?;
                let anchor = match &spec.anchor {
                    None => DateTime::UNIX_EPOCH,
                    Some(a) => DateTime::parse_from_rfc3339(a)
                        .map_err(|e| {
                            format!("anchor `{a}` is not an RFC 3339 time (e.g. 2026-01-01T00:00:00Z): {e}")
                        })?
                        .with_timezone(&Utc),
                };
                Schedule::interval(period, anchor).map_err(|e| format!("every: {e}"))?
            }
        };
        let queue = match &spec.queue {
            Some(q) if q.trim().is_empty() || q.len() > 200 => {
                return Err(format!("queue `{q}` is not a queue name"));
            }
            Some(q) => q.clone(),
            None => DEFAULT_QUEUE.to_owned(),
        };
        let positive = |field: &str, v: &Option<String>| -> Result<Option<Duration>, String> {
            match v {
                None => Ok(None),
                Some(s) => {
                    let d = field_duration(field, s)?;
                    if d.is_zero() {
                        return Err(format!("{field} must be more than zero"));
                    }
                    Ok(Some(d))
                }
            }
        };
        let expires = positive("expires", &spec.expires)?;
        let soft_time_limit = positive("soft_time_limit", &spec.soft_time_limit)?;
        let time_limit = positive("time_limit", &spec.time_limit)?;
        let jitter = match &spec.jitter {
            None => None,
            Some(s) => Some(field_duration("jitter", s)?).filter(|d| !d.is_zero()),
        };
        let window = positive("catch_up_window", &spec.catch_up_window)?;
        let catch_up = match (spec.catch_up.unwrap_or(CatchUpPolicy::Once), window) {
            (CatchUpPolicy::Skip, Some(_)) => {
                return Err("`catch_up_window` does not apply to catch_up = \"skip\"".into());
            }
            (CatchUpPolicy::Skip, None) => CatchUp::Skip,
            (CatchUpPolicy::Once, window) => CatchUp::Once { window },
            (CatchUpPolicy::All, Some(window)) => CatchUp::All { window },
            (CatchUpPolicy::All, None) => {
                return Err("catch_up = \"all\" needs `catch_up_window` (e.g. \"1h\") to bound how many missed ticks run".into());
            }
        };
        Ok(Entry {
            overlap: spec.overlap.unwrap_or_default(),
            spec,
            schedule,
            queue,
            expires,
            soft_time_limit,
            time_limit,
            catch_up,
            jitter,
        })
    }

    /// The entry's unique name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// The task name sent.
    pub fn task(&self) -> &str {
        &self.spec.task
    }
    /// The definition as written.
    pub fn spec(&self) -> &EntrySpec {
        &self.spec
    }
    /// When it fires.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }
    /// Positional arguments.
    pub fn args(&self) -> &[Value] {
        &self.spec.args
    }
    /// Keyword arguments.
    pub fn kwargs(&self) -> &Map<String, Value> {
        &self.spec.kwargs
    }
    /// Target queue.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// Message priority.
    pub fn priority(&self) -> Option<u8> {
        self.spec.priority
    }
    /// Expiry, counted from the tick.
    pub fn expires(&self) -> Option<Duration> {
        self.expires
    }
    /// Soft and hard time limits.
    pub fn time_limits(&self) -> (Option<Duration>, Option<Duration>) {
        (self.soft_time_limit, self.time_limit)
    }
    /// Catch-up policy.
    pub fn catch_up(&self) -> CatchUp {
        self.catch_up
    }
    /// Overlap policy.
    pub fn overlap(&self) -> Overlap {
        self.overlap
    }
    /// Maximum jitter.
    pub fn jitter(&self) -> Option<Duration> {
        self.jitter
    }

    /// The task id of the run for `tick`: the same on every replica and every retry, so a
    /// republished tick can be recognised downstream.
    pub fn task_id(&self, tick: DateTime<Utc>) -> String {
        format!("beat:{}:{}", self.spec.name, format_tick(tick))
    }

    /// The delay added to the run for `tick`: a hash of the entry and the tick, so every
    /// replica (and a republish) picks the same one.
    pub fn jitter_for(&self, tick: DateTime<Utc>) -> Duration {
        let Some(max) = self.jitter else {
            return Duration::ZERO;
        };
        // FNV-1a: tiny, stable across builds and platforms (unlike std's hasher).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.spec.name.bytes().chain(tick.timestamp().to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(h % max_ms.saturating_add(1))
    }
}

/// A tick as text: RFC 3339 in UTC, whole seconds, `Z` (sorts like time).
pub fn format_tick(tick: DateTime<Utc>) -> String {
    tick.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("`name` is empty".into());
    }
    if name.len() > 200 {
        return Err("`name` is longer than 200 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "name `{name}` contains {c:?}; use letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

fn field_duration(field: &str, s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| format!("{field}: {e}"))
}

/// Parses a duration written as number–unit pairs: `500ms`, `30s`, `15m`, `1h30m`, `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration (write e.g. 30s, 15m, 1h30m, 2d or 500ms)");
    let text = s.trim();
    if text.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
        total = total
            .checked_add(Duration::from_millis(ms))
            .ok_or_else(bad)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> EntrySpec {
        EntrySpec {
            name: name.into(),
            task: "diag.echo".into(),
            cron: Some("* * * * *".into()),
            ..EntrySpec::default()
        }
    }

    fn refused(spec: EntrySpec) -> String {
        Entry::new(spec).expect_err("must be refused").to_string()
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in [
            "",
            "30",
            "s",
            "1x",
            "1h 30m",
            "-1s",
            "1.5s",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn defaults() {
        let e = Entry::new(spec("a")).unwrap();
        assert_eq!(e.queue(), "celery");
        assert_eq!(e.catch_up(), CatchUp::Once { window: None });
        assert_eq!(e.overlap(), Overlap::Allow);
        assert_eq!(e.jitter_for(Utc::now()), Duration::ZERO);
    }

    #[test]
    fn task_ids_and_jitter_are_deterministic() {
        let mut s = spec("billing.tick");
        s.jitter = Some("10s".into());
        let e = Entry::new(s).unwrap();
        let tick = DateTime::parse_from_rfc3339("2026-03-08T07:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(e.task_id(tick), "beat:billing.tick:2026-03-08T07:00:00Z");
        assert_eq!(e.jitter_for(tick), e.jitter_for(tick));
        assert!(e.jitter_for(tick) <= Duration::from_secs(10));
        let spread: std::collections::HashSet<_> = (0..50)
            .map(|k| e.jitter_for(tick + chrono::Duration::minutes(k)))
            .collect();
        assert!(spread.len() > 10, "jitter must vary between ticks");
    }

    #[test]
    fn bad_definitions_are_refused_with_the_reason() {
        let cases: Vec<(EntrySpec, &str)> = vec![
            (spec(""), "`name` is empty"),
            (spec("a b"), "contains ' '"),
            (
                EntrySpec {
                    task: " ".into(),
                    ..spec("t")
                },
                "is not a task name",
            ),
            (
                EntrySpec {
                    cron: Some("61 * * * *".into()),
                    ..spec("c")
                },
                "cron `61 * * * *` is invalid",
            ),
            (
                EntrySpec {
                    cron: Some("* * * *".into()),
                    ..spec("c")
                },
                "is invalid",
            ),
            (
                EntrySpec {
                    cron: Some("0 0 0 * * * 2030".into()),
                    ..spec("c")
                },
                "is invalid",
            ),
            (
                EntrySpec {
                    cron: Some("0 0 31 2 *".into()),
                    ..spec("c")
                },
                "never matches",
            ),
            (
                EntrySpec {
                    timezone: Some("Mars/Olympus".into()),
                    ..spec("z")
                },
                "`Mars/Olympus` is not an IANA time zone",
            ),
            (
                EntrySpec {
                    every: Some("1m".into()),
                    ..spec("b")
                },
                "both `cron` and `every`",
            ),
            (
                EntrySpec {
                    cron: None,
                    ..spec("n")
                },
                "no schedule",
            ),
            (
                EntrySpec {
                    cron: None,
                    every: Some("500ms".into()),
                    ..spec("i")
                },
                "whole number of seconds",
            ),
            (
                EntrySpec {
                    cron: None,
                    every: Some("soon".into()),
                    ..spec("i")
                },
                "every: `soon` is not a duration",
            ),
            (
                EntrySpec {
                    cron: None,
                    every: Some("1m".into()),
                    timezone: Some("UTC".into()),
                    ..spec("i")
                },
                "`timezone` applies to `cron`",
            ),
            (
                EntrySpec {
                    anchor: Some("2026-01-01T00:00:00Z".into()),
                    ..spec("a")
                },
                "`anchor` applies to `every`",
            ),
            (
                EntrySpec {
                    cron: None,
                    every: Some("1m".into()),
                    anchor: Some("yesterday".into()),
                    ..spec("a")
                },
                "anchor `yesterday`",
            ),
            (
                EntrySpec {
                    catch_up: Some(CatchUpPolicy::All),
                    ..spec("w")
                },
                "needs `catch_up_window`",
            ),
            (
                EntrySpec {
                    catch_up: Some(CatchUpPolicy::Skip),
                    catch_up_window: Some("1h".into()),
                    ..spec("w")
                },
                "does not apply",
            ),
            (
                EntrySpec {
                    expires: Some("0s".into()),
                    ..spec("e")
                },
                "expires must be more than zero",
            ),
            (
                EntrySpec {
                    jitter: Some("lots".into()),
                    ..spec("j")
                },
                "jitter: `lots`",
            ),
            (
                EntrySpec {
                    queue: Some("".into()),
                    ..spec("q")
                },
                "is not a queue name",
            ),
        ];
        for (spec, reason) in cases {
            let name = spec.name.clone();
            let msg = refused(spec);
            assert!(msg.contains(reason), "{msg:?} must contain {reason:?}");
            if !name.is_empty() {
                assert!(
                    msg.starts_with(&format!("entry `{name}`: ")),
                    "{msg:?} must name the entry"
                );
            }
        }
    }

    #[test]
    fn cron_extensions_are_accepted() {
        for expr in [
            "0 0 L * *",
            "0 9 15W * *",
            "0 9 * * 5#L",
            "0 9 * * FRI#2",
            "*/10 * * * * *",
            "@hourly",
        ] {
            let s = EntrySpec {
                cron: Some(expr.into()),
                timezone: Some("Europe/London".into()),
                ..spec("x")
            };
            Entry::new(s).unwrap_or_else(|e| panic!("{expr}: {e}"));
        }
    }
}
