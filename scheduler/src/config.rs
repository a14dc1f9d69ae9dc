//! The schedule file: TOML with one `[[entry]]` table per entry, giving the initial set.
//!
//! ```toml
//! [[entry]]
//! name = "renewals"
//! task = "billing.enqueue_renewals"
//! cron = "0 * * * *"          # or: every = "30s"
//! timezone = "UTC"
//! queue = "billing"
//! catch_up = "once"           # skip | once | all (with catch_up_window)
//! overlap = "skip"            # allow | skip
//! ```
//!
//! The whole file is checked before anything starts, and the first problem is reported on one
//! line naming the file, the entry (by name, or `#N` when it has none) and the reason: a
//! scheduler that starts with half its schedule is worse than one that refuses to start.
//! Field meanings are those of [`EntrySpec`].

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::entry::{Entry, EntryError, EntrySpec};

/// Where the binary looks for the schedule when `--schedule`/`SCHEDULE_FILE` is not given:
/// the billing schedule shipped in this crate, relative to the workspace root (the working
/// directory of `scripts/` and of the container image).
pub const DEFAULT_SCHEDULE_FILE: &str = "scheduler/schedules/billing.toml";

/// A schedule file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read schedule file {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or not laid out as `[[entry]]` tables.
    #[error("schedule file {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong, with the line when known.
        reason: String,
    },
    /// An entry was refused.
    #[error("schedule file {path}: {error}")]
    Entry {
        /// The file.
        path: String,
        /// The entry and the reason.
        error: EntryError,
    },
}

/// Reads and validates a schedule file.
pub fn load(path: &Path) -> Result<Vec<Entry>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text, &shown)
}

/// Validates schedule text; `path` only labels errors.
pub fn parse(text: &str, path: &str) -> Result<Vec<Entry>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|s| {
                format!(
                    "line {}: ",
                    text[..s.start.min(text.len())].lines().count().max(1)
                )
            })
            .unwrap_or_default();
        invalid(format!("not valid TOML: {line}{}", one_line(e.message())))
    })?;
    if let Some(key) = table.keys().find(|k| k.as_str() != "entry") {
        return Err(invalid(format!(
            "unknown top-level key `{key}` (entries are `[[entry]]` tables)"
        )));
    }
    let items = match table.get("entry") {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(items)) => items,
        Some(_) => {
            return Err(invalid(
                "`entry` must be an array of tables, written `[[entry]]`".into(),
            ));
        }
    };

    let mut entries = Vec::with_capacity(items.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let position = format!("#{}", i + 1);
        let label = item
            .get("name")
            .and_then(toml::Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .unwrap_or_else(|| position.clone());
        let refuse = |reason: String| ConfigError::Entry {
            path: path.to_owned(),
            error: EntryError {
                entry: label.clone(),
                reason,
            },
        };
        if !item.is_table() {
            return Err(refuse("must be a table".into()));
        }
        let spec = EntrySpec::deserialize(item.clone())
            .map_err(|e: toml::de::Error| refuse(one_line(e.message())))?;
        let entry = Entry::new(spec).map_err(|e| refuse(e.reason))?;
        if let Some(first) = seen.insert(entry.name().to_owned(), i + 1) {
            return Err(refuse(format!(
                "duplicate name (entry #{first} has it too)"
            )));
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{CatchUp, Overlap};

    fn refused(text: &str) -> String {
        let msg = parse(text, "s.toml")
            .expect_err("must be refused")
            .to_string();
        assert!(!msg.contains('\n'), "one line: {msg:?}");
        msg
    }

    const GOOD: &str = r#"
        name = "ok"
        task = "diag.echo"
        cron = "* * * * *"
    "#;

    #[test]
    fn a_good_file_parses() {
        let text = r#"
            [[entry]]
            name = "renewals"
            task = "billing.enqueue_renewals"
            cron = "0 * * * *"
            timezone = "Europe/London"
            queue = "billing"
            args = [1, "two"]
            kwargs = { dry_run = true }
            expires = "55m"
            priority = 5
            catch_up = "all"
            catch_up_window = "6h"
            overlap = "skip"
            jitter = "10s"

            [[entry]]
            name = "outbox"
            task = "billing.deliver_outbox"
            every = "30s"
        "#;
        let entries = parse(text, "s.toml").unwrap();
        assert_eq!(entries.len(), 2);
        let e = &entries[0];
        assert_eq!(e.queue(), "billing");
        assert_eq!(e.args(), [serde_json::json!(1), serde_json::json!("two")]);
        assert_eq!(e.kwargs()["dry_run"], serde_json::json!(true));
        assert_eq!(
            e.catch_up(),
            CatchUp::All {
                window: std::time::Duration::from_secs(6 * 3600)
            }
        );
        assert_eq!(e.overlap(), Overlap::Skip);
        assert_eq!(entries[1].schedule().fingerprint(), "every:30s@0");
    }

    #[test]
    fn an_empty_file_is_an_empty_schedule() {
        assert!(parse("", "s.toml").unwrap().is_empty());
    }

    #[test]
    fn every_kind_of_malformed_entry_is_refused_with_its_name_and_reason() {
        let cases = [
            ("cronn = \"* * * * *\"", "unknown field `cronn`"),
            ("cron = \"99 * * * *\"", "cron `99 * * * *` is invalid"),
            (
                "timezone = \"Atlantis/Capital\"",
                "`Atlantis/Capital` is not an IANA time zone",
            ),
            ("every = \"1m\"", "both `cron` and `every`"),
            ("catch_up = \"sometimes\"", "unknown variant `sometimes`"),
            ("catch_up = \"all\"", "needs `catch_up_window`"),
            ("overlap = \"never\"", "unknown variant `never`"),
            ("args = \"x\"", "invalid type"),
            ("priority = 300", "300"),
            ("jitter = \"a bit\"", "jitter: `a bit` is not a duration"),
        ];
        for (extra, reason) in cases {
            let text = "[[entry]]\nname = \"bad\"\ntask = \"t\"\ncron = \"* * * * *\"\n".to_owned();
            let text = if extra.starts_with("cron =") {
                text.replace("cron = \"* * * * *\"\n", &format!("{extra}\n"))
            } else {
                format!("{text}{extra}\n")
            };
            let msg = refused(&text);
            assert!(
                msg.starts_with("schedule file s.toml: entry `bad`: "),
                "{msg:?} must name the file and the entry"
            );
            assert!(msg.contains(reason), "{msg:?} must contain {reason:?}");
        }
    }

    #[test]
    fn entries_without_a_schedule_or_task_or_name_are_refused() {
        let msg = refused("[[entry]]\nname = \"n\"\ntask = \"t\"\n");
        assert!(msg.contains("entry `n`: no schedule"), "{msg}");
        let msg = refused("[[entry]]\nname = \"n\"\ncron = \"* * * * *\"\n");
        assert!(msg.contains("entry `n`: missing field `task`"), "{msg}");
        let msg = refused(&format!(
            "[[entry]]{GOOD}\n[[entry]]\ntask = \"t\"\nevery = \"1s\"\n"
        ));
        assert!(msg.contains("entry `#2`: missing field `name`"), "{msg}");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let msg = refused(&format!("[[entry]]{GOOD}\n[[entry]]{GOOD}"));
        assert!(
            msg.contains("entry `ok`: duplicate name (entry #1 has it too)"),
            "{msg}"
        );
    }

    #[test]
    fn file_level_problems_are_refused() {
        let msg = refused("[[entry]]\nname = \"x\"\ntask = = 1\n");
        assert!(msg.contains("not valid TOML: line 3"), "{msg}");
        let msg = refused("[schedule]\nx = 1\n");
        assert!(msg.contains("unknown top-level key `schedule`"), "{msg}");
        let msg = refused("entry = 5\n");
        assert!(msg.contains("`entry` must be an array of tables"), "{msg}");
        let err = load(Path::new("/nonexistent/schedule.toml")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read schedule file /nonexistent/schedule.toml")
        );
    }

    #[test]
    fn the_shipped_billing_schedule_is_valid() {
        let text = include_str!("../schedules/billing.toml");
        let entries = parse(text, "billing.toml").unwrap();
        let mut tasks: Vec<_> = entries.iter().map(|e| e.task().to_owned()).collect();
        tasks.sort();
        assert_eq!(
            tasks,
            [
                "billing.deliver_outbox",
                "billing.enqueue_renewals",
                "billing.expire_subscriptions",
                "billing.purge_cryptograms",
                "billing.reconcile_day",
                "billing.reconcile_payments",
                "billing.reconcile_refunds",
                "billing.retry_due_invoices",
            ]
        );
        assert!(entries.iter().all(|e| e.queue() == "billing"));
        assert!(
            entries
                .iter()
                .all(|e| e.args().is_empty() && e.kwargs().is_empty())
        );
    }
}
