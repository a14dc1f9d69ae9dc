//! Typed view of Celery's v2 header table.
//!
//! Parsing is lenient in exactly the ways Python's Celery needs: any integer width or a float where a
//! number is expected, `null` (AMQP void) wherever a value is optional, time limits as floats, and
//! timestamps with or without a UTC offset. Headers this crate does not model are kept in `extra` so a
//! republished message (a retry, a delayed hop) carries them unchanged.

use chrono::{DateTime, NaiveDateTime, Offset, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{Map, Value};

use super::ProtocolError;

/// The headers of a protocol v2 task message.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskHeaders {
    /// Sender language (`py` for Celery, `rs` for this crate).
    pub lang: String,
    /// Registered task name: the dispatch key.
    pub task: String,
    /// Task id.
    pub id: String,
    /// First task of the workflow (equals `id` when there is no parent).
    pub root_id: Option<String>,
    /// Id of the task that sent this one.
    pub parent_id: Option<String>,
    /// Group id.
    pub group: Option<String>,
    /// Position within the group.
    pub group_index: Option<i64>,
    /// Alternative name used in logs.
    pub shadow: Option<String>,
    /// Do not run before this time.
    pub eta: Option<DateTime<Utc>>,
    /// Discard (as REVOKED) after this time.
    pub expires: Option<DateTime<Utc>>,
    /// How many times the task has been retried.
    pub retries: u32,
    /// Hard time limit in seconds.
    pub time_limit: Option<f64>,
    /// Soft time limit in seconds.
    pub soft_time_limit: Option<f64>,
    /// Printable positional arguments.
    pub argsrepr: Option<String>,
    /// Printable keyword arguments.
    pub kwargsrepr: Option<String>,
    /// Sender node name.
    pub origin: Option<String>,
    /// Whether the worker must not store a result.
    pub ignore_result: bool,
    /// `Task.replace` depth.
    pub replaced_task_nesting: i64,
    /// Every other header, kept verbatim.
    pub extra: Map<String, Value>,
}

const KNOWN: &[&str] = &[
    "lang",
    "task",
    "id",
    "root_id",
    "parent_id",
    "group",
    "group_index",
    "shadow",
    "eta",
    "expires",
    "retries",
    "timelimit",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
];

impl TaskHeaders {
    /// Headers for a new message: `root_id` = `id`, no parent, zero retries.
    pub fn new(task: String, id: String) -> Self {
        TaskHeaders {
            lang: "rs".into(),
            task,
            root_id: Some(id.clone()),
            id,
            parent_id: None,
            group: None,
            group_index: None,
            shadow: None,
            eta: None,
            expires: None,
            retries: 0,
            time_limit: None,
            soft_time_limit: None,
            argsrepr: None,
            kwargsrepr: None,
            origin: None,
            ignore_result: false,
            replaced_task_nesting: 0,
            extra: Map::new(),
        }
    }

    /// Parses a header table. `task` and `id` are required; everything else is optional. A naive
    /// `eta` or `expires` is read as UTC.
    pub fn from_map(map: &Map<String, Value>) -> Result<Self, ProtocolError> {
        Self::from_map_in(map, chrono_tz::UTC)
    }

    /// [`TaskHeaders::from_map`], reading a naive `eta` or `expires` as local time in `timezone`.
    pub fn from_map_in(map: &Map<String, Value>, timezone: Tz) -> Result<Self, ProtocolError> {
        let task = required_str(map, "task")?;
        let id = required_str(map, "id")?;
        let (time_limit, soft_time_limit) = parse_timelimit(map.get("timelimit"))?;
        let extra = map
            .iter()
            .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(TaskHeaders {
            lang: opt_str(map, "lang")?.unwrap_or_else(|| "py".into()),
            task,
            id,
            root_id: opt_str(map, "root_id")?,
            parent_id: opt_str(map, "parent_id")?,
            group: opt_str(map, "group")?,
            group_index: opt_int(map, "group_index")?,
            shadow: opt_str(map, "shadow")?,
            eta: opt_time(map, "eta", timezone)?,
            expires: opt_time(map, "expires", timezone)?,
            retries: opt_int(map, "retries")?
                .map(|r| u32::try_from(r.max(0)).unwrap_or(u32::MAX))
                .unwrap_or(0),
            time_limit,
            soft_time_limit,
            argsrepr: opt_str(map, "argsrepr")?,
            kwargsrepr: opt_str(map, "kwargsrepr")?,
            origin: opt_str(map, "origin")?,
            ignore_result: match map.get("ignore_result") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(Value::Number(n)) => n.as_f64() != Some(0.0),
                Some(other) => {
                    return Err(bad(
                        "ignore_result",
                        format!("expected a boolean, got {other}"),
                    ));
                }
            },
            replaced_task_nesting: opt_int(map, "replaced_task_nesting")?.unwrap_or(0),
            extra,
        })
    }

    /// The header table, with every key Celery's own client writes (nulls included), so a Python
    /// worker reads it exactly as it reads a message from Python.
    pub fn to_map(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let s = |v: &Option<String>| v.clone().map(Value::String).unwrap_or(Value::Null);
        let f = |v: Option<f64>| v.map(Value::from).unwrap_or(Value::Null);
        m.insert("lang".into(), Value::String(self.lang.clone()));
        m.insert("task".into(), Value::String(self.task.clone()));
        m.insert("id".into(), Value::String(self.id.clone()));
        m.insert("shadow".into(), s(&self.shadow));
        m.insert(
            "eta".into(),
            self.eta
                .map(|t| Value::String(format_datetime(t)))
                .unwrap_or(Value::Null),
        );
        m.insert(
            "expires".into(),
            self.expires
                .map(|t| Value::String(format_datetime(t)))
                .unwrap_or(Value::Null),
        );
        m.insert("group".into(), s(&self.group));
        m.insert(
            "group_index".into(),
            self.group_index.map(Value::from).unwrap_or(Value::Null),
        );
        m.insert("retries".into(), Value::from(self.retries));
        m.insert(
            "timelimit".into(),
            Value::Array(vec![f(self.time_limit), f(self.soft_time_limit)]),
        );
        m.insert(
            "root_id".into(),
            Value::String(self.root_id.clone().unwrap_or_else(|| self.id.clone())),
        );
        m.insert("parent_id".into(), s(&self.parent_id));
        m.insert("argsrepr".into(), s(&self.argsrepr));
        m.insert("kwargsrepr".into(), s(&self.kwargsrepr));
        m.insert("origin".into(), s(&self.origin));
        m.insert("ignore_result".into(), Value::Bool(self.ignore_result));
        m.insert(
            "replaced_task_nesting".into(),
            Value::from(self.replaced_task_nesting),
        );
        m.entry("stamped_headers").or_insert(Value::Null);
        m.entry("stamps").or_insert(Value::Object(Map::new()));
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        m
    }
}

fn bad(name: &'static str, reason: String) -> ProtocolError {
    ProtocolError::BadHeader { name, reason }
}

fn required_str(map: &Map<String, Value>, name: &'static str) -> Result<String, ProtocolError> {
    match map.get(name) {
        None | Some(Value::Null) => Err(ProtocolError::MissingHeader(name)),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(bad(name, "empty string".into())),
        Some(other) => Err(bad(name, format!("expected a string, got {other}"))),
    }
}

fn opt_str(map: &Map<String, Value>, name: &'static str) -> Result<Option<String>, ProtocolError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(bad(name, format!("expected a string, got {other}"))),
    }
}

fn opt_int(map: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, ProtocolError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| bad(name, format!("integer out of range: {n}"))),
        Some(other) => Err(bad(name, format!("expected an integer, got {other}"))),
    }
}

fn opt_seconds(v: &Value, name: &'static str) -> Result<Option<f64>, ProtocolError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() && f > 0.0 => Ok(Some(f)),
            Some(f) if f.is_finite() && f <= 0.0 => Ok(None),
            _ => Err(bad(name, format!("not a finite number: {n}"))),
        },
        other => Err(bad(
            name,
            format!("expected seconds as a number, got {other}"),
        )),
    }
}

/// `timelimit` is `[hard, soft]` (the order Celery's code uses; its docs say otherwise).
fn parse_timelimit(v: Option<&Value>) -> Result<(Option<f64>, Option<f64>), ProtocolError> {
    match v {
        None | Some(Value::Null) => Ok((None, None)),
        Some(Value::Array(items)) if items.len() == 2 => Ok((
            opt_seconds(&items[0], "timelimit")?,
            opt_seconds(&items[1], "timelimit")?,
        )),
        Some(other) => Err(bad(
            "timelimit",
            format!("expected [hard, soft], got {other}"),
        )),
    }
}

fn opt_time(
    map: &Map<String, Value>,
    name: &'static str,
    timezone: Tz,
) -> Result<Option<DateTime<Utc>>, ProtocolError> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_datetime_in(s, timezone)
            .map(Some)
            .ok_or_else(|| bad(name, format!("not an ISO-8601 time: {s:?}"))),
        Some(Value::Number(n)) => n
            .as_f64()
            .and_then(|secs| Utc.timestamp_micros((secs * 1e6) as i64).single())
            .map(Some)
            .ok_or_else(|| bad(name, format!("not a timestamp: {n}"))),
        Some(other) => Err(bad(name, format!("expected a time, got {other}"))),
    }
}

/// Parses the ISO-8601 forms Celery writes: with an offset (`+00:00`, `Z`) or naive (taken as UTC,
/// which is what Celery means with its default `enable_utc`).
pub fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    parse_datetime_in(s, chrono_tz::UTC)
}

/// [`parse_datetime`], reading a naive time as local time in `timezone`, as Celery's
/// `maybe_make_aware(dt, app.timezone)` does. A local time that occurs twice (the hour after
/// clocks go back) is the first of the two; one that does not occur (clocks went forward) is read
/// with the offset before the change, as Python's `zoneinfo` does with `fold=0`.
pub fn parse_datetime_in(s: &str, timezone: Tz) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f%z",
    ]
    .iter()
    .find_map(|fmt| {
        NaiveDateTime::parse_from_str(s, fmt)
            .ok()
            .and_then(|n| localize(n, timezone))
            .or_else(|| {
                DateTime::parse_from_str(s, fmt)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            })
    })
}

fn localize(naive: NaiveDateTime, timezone: Tz) -> Option<DateTime<Utc>> {
    use chrono::offset::LocalResult;
    match timezone.from_local_datetime(&naive) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => Some(t.with_timezone(&Utc)),
        LocalResult::None => {
            // In a gap: take the offset in force just before it.
            let before = naive - chrono::Duration::hours(3);
            let offset = timezone
                .from_local_datetime(&before)
                .earliest()?
                .offset()
                .fix()
                .local_minus_utc();
            Some((naive - chrono::Duration::seconds(offset.into())).and_utc())
        }
    }
}

/// Formats a time the way Python's `datetime.isoformat()` does for an aware UTC time:
/// `2026-11-27T11:05:23.479318+00:00`.
pub fn format_datetime(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, false)
}
