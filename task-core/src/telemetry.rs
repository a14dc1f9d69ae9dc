//! Logging and error reporting shared by the binaries: `LOG_FORMAT` (`pretty` or `json`),
//! `RUST_LOG` (default `info`) and, with the `sentry` feature, `SENTRY_DSN`.
//!
//! In JSON every line logged inside a span carries that span's fields, so a log collector can
//! select one task's lines by `task_id` (the worker runs each task in a `task` span with
//! `task_id`, `task` and `retries`): `span` holds the innermost span's fields, `spans` every
//! open span from the outermost in, so the task's fields survive a task opening spans of its
//! own.
//!
//! ```json
//! {"timestamp":"…","level":"INFO","message":"charged","target":"billing_tasks::charge",
//!  "span":{"task_id":"6f1c…","task":"billing.charge","retries":0,"name":"task"},
//!  "spans":[{"task_id":"6f1c…","task":"billing.charge","retries":0,"name":"task"}]}
//! ```

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

#[cfg(feature = "sentry")]
mod sentry_report;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line (for log collectors).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pretty" => Ok(LogFormat::Pretty),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "`{other}` is not a log format (expected pretty or json)"
            )),
        }
    }
}

/// Installs the global subscriber, writing to stderr. Call once, first thing in `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer(format, std::io::stderr))
        .init();
}

/// The formatting layer [`init`] installs, writing to `writer` (tests pass a buffer).
pub fn fmt_layer<S, W>(format: LogFormat, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Pretty => layer.boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    }
}

/// Keeps the Sentry client alive; dropping it flushes the events still queued (for up to two
/// seconds). Hold it in `main` until the worker has stopped.
#[must_use = "dropping the guard shuts the Sentry client down"]
#[derive(Default)]
pub struct SentryGuard {
    #[cfg(feature = "sentry")]
    _client: Option<sentry::ClientInitGuard>,
}

impl std::fmt::Debug for SentryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentryGuard")
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

impl SentryGuard {
    /// Whether events are being sent (the `sentry` feature is on and a DSN was given).
    pub fn is_enabled(&self) -> bool {
        #[cfg(feature = "sentry")]
        {
            self._client.as_ref().is_some_and(|c| c.is_enabled())
        }
        #[cfg(not(feature = "sentry"))]
        {
            false
        }
    }
}

/// Starts reporting to Sentry at `dsn`, or `SENTRY_DSN` when `dsn` is `None`; neither (or an
/// empty one) leaves reporting off. Panics are then reported too. `SENTRY_ENVIRONMENT` and
/// `SENTRY_RELEASE` are read as the Sentry SDKs do.
///
/// Call it from the main thread after [`init`] and before the first task runs: the client is
/// bound to the process-wide hub that every other thread starts from. Without the `sentry`
/// feature this only warns when a DSN is set.
pub fn init_sentry(dsn: Option<&str>) -> SentryGuard {
    let from_env = std::env::var("SENTRY_DSN").ok();
    let Some(dsn) = dsn.or(from_env.as_deref()).filter(|d| !d.trim().is_empty()) else {
        return SentryGuard::default();
    };
    #[cfg(feature = "sentry")]
    {
        sentry_report::init(dsn.trim())
    }
    #[cfg(not(feature = "sentry"))]
    {
        let _ = dsn;
        tracing::warn!(
            "SENTRY_DSN is set but this binary was built without the `sentry` feature; \
             errors are not reported"
        );
        SentryGuard::default()
    }
}

/// Reports a failed task run to Sentry, tagged `task` and `task_id` (the log fields of the task
/// span). `exception_type` may be qualified (`billing.errors.CardDeclined`), `args_repr` must
/// already be redacted: it is sent as given. Does nothing unless [`init_sentry`] enabled
/// reporting.
pub fn report_task_failure(
    task_name: &str,
    task_id: &str,
    args_repr: &str,
    exception_type: &str,
    exception_message: &str,
    traceback: Option<&str>,
) {
    #[cfg(feature = "sentry")]
    sentry_report::task_failure(
        task_name,
        task_id,
        args_repr,
        exception_type,
        exception_message,
        traceback,
    );
    #[cfg(not(feature = "sentry"))]
    let _ = (
        task_name,
        task_id,
        args_repr,
        exception_type,
        exception_message,
        traceback,
    );
}

/// Runs a task's future with its Sentry scope: anything reported while it is polled, a panic
/// included, is tagged `task` and `task_id`. Returns `future` itself when reporting is off.
pub fn in_task_scope<F: Future>(
    task_name: &str,
    task_id: &str,
    future: F,
) -> impl Future<Output = F::Output> + use<F> {
    #[cfg(feature = "sentry")]
    {
        sentry_report::in_task_scope(task_name, task_id, future)
    }
    #[cfg(not(feature = "sentry"))]
    {
        let _ = (task_name, task_id);
        future
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A `MakeWriter` appending to a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<Value> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        }
    }

    fn logged(log: impl FnOnce()) -> Vec<Value> {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::registry().with(fmt_layer(LogFormat::Json, move || writer.clone()));
        tracing::subscriber::with_default(subscriber, log);
        buffer.lines()
    }

    #[test]
    fn json_lines_inside_a_task_span_carry_its_fields() {
        let lines = logged(|| {
            let span = tracing::info_span!(
                "task",
                task_id = %"6f1c2d1e",
                task = %"billing.charge",
                retries = 2
            );
            let _entered = span.enter();
            tracing::info!(amount = 29_900, "charged");
            tracing::info_span!("gateway", attempt = 1).in_scope(|| tracing::warn!("slow"));
        });
        assert_eq!(lines.len(), 2, "{lines:#?}");

        let charged = &lines[0];
        assert_eq!(charged["message"], "charged");
        assert_eq!(charged["amount"], 29_900);
        assert_eq!(charged["span"]["task_id"], "6f1c2d1e");
        assert_eq!(charged["span"]["task"], "billing.charge");
        assert_eq!(charged["span"]["retries"], 2);

        // Inside a span of the task's own, the task's fields are still on the line.
        let slow = &lines[1];
        assert_eq!(slow["span"]["name"], "gateway");
        let task = &slow["spans"][0];
        assert_eq!(
            (
                &task["name"],
                &task["task_id"],
                &task["task"],
                &task["retries"]
            ),
            (
                &Value::from("task"),
                &Value::from("6f1c2d1e"),
                &Value::from("billing.charge"),
                &Value::from(2)
            ),
            "{slow}"
        );
    }

    #[test]
    fn json_lines_outside_spans_have_no_span() {
        let lines = logged(|| tracing::info!("worker ready"));
        assert_eq!(lines[0]["message"], "worker ready");
        assert!(lines[0].get("span").is_none(), "{}", lines[0]);
    }

    #[test]
    fn reporting_without_a_dsn_does_nothing() {
        let guard = init_sentry(Some(""));
        assert!(!guard.is_enabled());
        report_task_failure("diag.fail", "id", "()", "ValueError", "boom", None);
    }
}
