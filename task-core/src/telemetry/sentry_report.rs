//! The Sentry side of [`super::init_sentry`] and [`super::report_task_failure`].
//!
//! Events go through sentry's reqwest transport on the workspace's reqwest and rustls, from a
//! thread of its own: reporting never blocks a task. Of the integrations only the panic one is
//! on (its backtrace symbolizer is most of the feature's build cost); contexts, debug images and
//! stack traces of handled errors would add dependencies and little to a task failure, which
//! comes with its own traceback.

use std::borrow::Cow;
use std::sync::Arc;

use futures_util::future::Either;
use sentry::protocol::{Event, Exception, Level, Mechanism, Value};
use sentry::types::Dsn;
use sentry::{Hub, SentryFuture, SentryFutureExt};

use super::SentryGuard;

pub(super) fn init(dsn: &str) -> SentryGuard {
    let dsn: Dsn = match dsn.parse() {
        Ok(dsn) => dsn,
        Err(e) => {
            // The DSN holds a key: name the problem, not the value.
            tracing::warn!(error = %e, "SENTRY_DSN is not a valid DSN; errors are not reported");
            return SentryGuard::default();
        }
    };
    let release = std::env::var("SENTRY_RELEASE")
        .map(Cow::Owned)
        .unwrap_or(Cow::Borrowed(concat!(
            "task-core@",
            env!("CARGO_PKG_VERSION")
        )));
    let mut options = sentry::ClientOptions::new()
        .release(release)
        .server_name(crate::hostname());
    options.dsn = Some(dsn);
    let client = sentry::init(options);
    tracing::info!("reporting task failures and panics to Sentry");
    SentryGuard {
        _client: Some(client),
    }
}

pub(super) fn in_task_scope<F: Future>(
    task_name: &str,
    task_id: &str,
    future: F,
) -> Either<SentryFuture<F>, F> {
    let current = Hub::current();
    if current.client().is_none() {
        return Either::Right(future);
    }
    // A hub of its own: tasks interleave on the runtime's threads, so tags set on a thread's
    // hub would leak into whichever task that thread polls next.
    let hub = Arc::new(Hub::new_from_top(&current));
    hub.configure_scope(|scope| {
        scope.set_tag("task", task_name);
        scope.set_tag("task_id", task_id);
        scope.set_transaction(Some(task_name));
    });
    Either::Left(future.bind_hub(hub))
}

pub(super) fn task_failure(
    task_name: &str,
    task_id: &str,
    args_repr: &str,
    exception_type: &str,
    exception_message: &str,
    traceback: Option<&str>,
) {
    if Hub::current().client().is_none() {
        return;
    }
    let (module, ty) = match exception_type.rsplit_once('.') {
        Some((module, ty)) => (Some(module.to_owned()), ty),
        None => (None, exception_type),
    };
    let mut event = Event {
        level: Level::Error,
        // Group by task as well as by exception: one `KeyError` in two tasks is two issues.
        transaction: Some(task_name.to_owned()),
        exception: vec![Exception {
            ty: ty.to_owned(),
            value: Some(exception_message.to_owned()),
            module,
            mechanism: Some(Mechanism {
                ty: "task".to_owned(),
                handled: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        }]
        .into(),
        ..Default::default()
    };
    event.tags.insert("task".to_owned(), task_name.to_owned());
    event.tags.insert("task_id".to_owned(), task_id.to_owned());
    event
        .extra
        .insert("args".to_owned(), Value::from(args_repr.to_owned()));
    if let Some(traceback) = traceback {
        event
            .extra
            .insert("traceback".to_owned(), Value::from(traceback.to_owned()));
    }
    sentry::capture_event(event);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::routing::post;
    use serde_json::Value;
    use tokio::sync::mpsc;

    use std::panic::AssertUnwindSafe;

    use futures_util::FutureExt;

    use crate::telemetry::{in_task_scope, init_sentry, report_task_failure};

    /// The event item of a Sentry envelope (newline-separated JSON: envelope header, then an
    /// item header and its payload per item).
    fn event_of(envelope: &[u8]) -> Option<Value> {
        let text = std::str::from_utf8(envelope).ok()?;
        let mut lines = text.lines().skip(1);
        while let Some(header) = lines.next() {
            let header: Value = serde_json::from_str(header).ok()?;
            let payload = lines.next()?;
            if header["type"] == "event" {
                return serde_json::from_str(payload).ok();
            }
        }
        None
    }

    async fn next_event(envelopes: &mut mpsc::UnboundedReceiver<Bytes>) -> Value {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let body = envelopes.recv().await.expect("the fake Sentry is running");
                if let Some(event) = event_of(&body) {
                    break event;
                }
            }
        })
        .await
        .expect("an event reaches the fake Sentry within 30 s")
    }

    #[tokio::test]
    async fn task_failures_and_panics_reach_sentry_tagged_with_the_task() {
        let (tx, mut envelopes) = mpsc::unbounded_channel::<Bytes>();
        let fake_sentry = Router::new()
            .route(
                "/api/1/envelope/",
                post(
                    |State(tx): State<mpsc::UnboundedSender<Bytes>>, body: Bytes| async move {
                        let _ = tx.send(body);
                        "{}"
                    },
                ),
            )
            .with_state(tx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(crate::health::serve(
            listener,
            fake_sentry,
            std::future::pending(),
        ));

        let guard = init_sentry(Some(&format!("http://public@127.0.0.1:{port}/1")));
        assert!(guard.is_enabled());
        let args = "('u-42',) {'card_token': '***', 'amount': 29900}";
        report_task_failure(
            "billing.charge",
            "6f1c2d1e-0000-4000-8000-000000000001",
            args,
            "billing.errors.GatewayTimeout",
            "no answer from the gateway in 30s",
            Some("Traceback (most recent call last):\n  ..."),
        );

        let event = next_event(&mut envelopes).await;

        assert_eq!(event["tags"]["task"], "billing.charge");
        assert_eq!(
            event["tags"]["task_id"],
            "6f1c2d1e-0000-4000-8000-000000000001"
        );
        assert_eq!(event["extra"]["args"], args, "{event:#}");
        assert!(
            event.to_string().contains("'card_token': '***'"),
            "{event:#}"
        );
        assert_eq!(event["transaction"], "billing.charge");
        let exception = &event["exception"]["values"][0];
        assert_eq!(exception["type"], "GatewayTimeout");
        assert_eq!(exception["module"], "billing.errors");
        assert_eq!(exception["value"], "no answer from the gateway in 30s");
        assert_eq!(
            event["extra"]["traceback"],
            "Traceback (most recent call last):\n  ..."
        );

        // A panic inside the task's scope is reported by the panic integration, tagged too.
        let crashed = AssertUnwindSafe(in_task_scope("diag.crash", "id-of-crash", async {
            if true {
                panic!("kaboom");
            }
        }))
        .catch_unwind()
        .await;
        assert!(crashed.is_err());
        let event = next_event(&mut envelopes).await;
        assert_eq!(event["tags"]["task"], "diag.crash", "{event:#}");
        assert_eq!(event["tags"]["task_id"], "id-of-crash");
        let exception = &event["exception"]["values"][0];
        assert_eq!(exception["value"], "kaboom", "{event:#}");
        assert_eq!(exception["mechanism"]["type"], "panic");

        // Flushing blocks; keep it off the runtime that serves the fake.
        tokio::task::spawn_blocking(move || drop(guard))
            .await
            .unwrap();
    }
}
