//! A real client no one here wrote: Python's grpcio, with stubs generated from our `.proto` files
//! by grpcio-tools, runs the whole flow against the gRPC API, the fake gateway and a worker
//! (`tests/python/grpc_flow.py`): payments without and with 3-D Secure (WatchPayment streaming to
//! the final state), a decline, an abandoned challenge, a new card after a declined renewal,
//! cancel and resume, a refund; plus grpc.health.v1 and reflection.

mod billing_support;
mod grpc_support;

use std::process::Stdio;
use std::time::Duration;

use billing_support::*;
use billing_tasks::cloudpayments::fake;
use billing_tasks::tasks::{EnqueueRenewals, ExpireSubscriptions};
use grpc_support::{GrpcFront, SigningKey};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

/// A file of this checkout: found from the working directory (nextest runs a test in its
/// package's directory) so a binary built from another checkout sharing the target directory
/// still finds this one's files; else from where this file was compiled.
fn checkout_path(relative: &str) -> std::path::PathBuf {
    let cwd = std::env::current_dir().unwrap();
    cwd.ancestors()
        .map(|d| d.join(relative))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(relative)
        })
}

fn python() -> std::path::PathBuf {
    let py = checkout_path(".venv/bin/python");
    assert!(
        py.exists(),
        "run scripts/python-venv first (it installs grpcio and grpcio-tools into .venv)"
    );
    py
}

/// The renewal of `user`'s subscription is declined and its period runs out: past due.
async fn renewal_declined(env: &Env, user: Uuid) {
    let (_, _, end) = env.subscription_of(user).await;
    env.clock.set(end.unwrap() - chrono::Duration::hours(12));
    // Other users' subscriptions from earlier steps renew too (and succeed).
    let out = env.run::<EnqueueRenewals>(()).await;
    assert!(out["invoices"].as_u64() >= Some(1), "{out}");
    eventually(
        "the renewal to be declined",
        Duration::from_secs(30),
        || async {
            let n = sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM payment p JOIN invoice i ON i.id = p.invoice_id
                 WHERE i.payer_id = $1 AND i.kind = 'renewal' AND p.status = 'declined'",
            )
            .bind(user)
            .fetch_one(&env.db)
            .await
            .unwrap();
            (n == 1).then_some(())
        },
    )
    .await;
    env.clock.advance(chrono::Duration::hours(13));
    // Another user's renewal still being charged may count as past due too; D's must.
    let report = env.run::<ExpireSubscriptions>(()).await;
    assert!(report.past_due >= 1, "{report:?}");
    assert_eq!(env.subscription_of(user).await.0, "past_due");
}

/// Runs the Python flow against `target` with tokens signed by `key`; returns its RESULT.
async fn run_python(
    env: &Env,
    target: std::net::SocketAddr,
    key: &SigningKey,
) -> serde_json::Value {
    let users: Vec<(&str, Uuid)> = ["A", "B", "C", "D"]
        .into_iter()
        .map(|n| (n, Uuid::new_v4()))
        .collect();
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(checkout_path("billing-tasks/tests/python/grpc_flow.py"))
        .env("PROTO_DIR", checkout_path("billing-tasks/proto"))
        .env("BILLING_GRPC_TARGET", target.to_string())
        .env("CRYPTO_OK", fake::test_cryptogram(CARD_OK, EXP))
        .env("CRYPTO_3DS", fake::test_cryptogram(CARD_3DS_OK, EXP))
        .env("CRYPTO_NSF", fake::test_cryptogram(CARD_NSF, EXP))
        .env(
            "CRYPTO_TOKEN_NSF",
            fake::test_cryptogram(CARD_TOKEN_NSF, EXP),
        )
        .env("PA_RES_OK", fake::PA_RES_OK)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    for (name, user) in &users {
        cmd.env(format!("TOKEN_{name}"), key.token_for(*user, 3600));
    }
    let mut child = cmd.spawn().expect("python runs");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut result = None;
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            println!("python: {line}");
            if let Some(rest) = line.strip_prefix("NEED ") {
                let (step, who) = rest.split_once(' ').unwrap();
                let user = users.iter().find(|(n, _)| *n == who).unwrap().1;
                match step {
                    "renewal_declined" => renewal_declined(env, user).await,
                    other => panic!("unknown step {other}"),
                }
                stdin.write_all(b"OK\n").await.unwrap();
                stdin.flush().await.unwrap();
            } else if let Some(json) = line.strip_prefix("RESULT ") {
                result = Some(serde_json::from_str::<serde_json::Value>(json).unwrap());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the Python flow finishes in 4 minutes");
    let status = child.wait().await.unwrap();
    assert!(status.success(), "the Python client failed: {status}");
    let result = result.expect("the Python client printed its RESULT");
    println!("{result:#}");
    assert_eq!(result["health"], "SERVING");
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_runs_the_whole_flow() {
    let env = Env::start().await;
    let front = GrpcFront::start(&env).await;
    run_python(&env, front.addr, &front.key).await;

    // The calls were counted by method and code.
    let metrics = front.metrics_text();
    assert!(
        metrics.contains(
            r#"billing_grpc_requests_total{method="billing.v1.Billing/StartSubscription",code="Ok"}"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"code="InvalidArgument""#), "{metrics}");
    assert!(metrics.contains("billing_grpc_request_duration_seconds_bucket"));
    settle_everything(&env).await;
    env.assert_ledger_matches_gateway().await;
    // The card check of a healthy subscription's new card holds no money once it is done.
    eventually("the card check's hold to be released", Duration::from_secs(30), || async {
        let held = sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*) FILTER (WHERE status = 'held'), count(*) FILTER (WHERE status = 'released') FROM card_hold",
        )
        .fetch_one(&env.db)
        .await
        .unwrap();
        (held == (0, 1)).then_some(())
    })
    .await;
    front.stop().await;
    env.stop().await;
}

/// Waits until no attempt is in flight (other users' renewals may still be charging), and
/// prints every invoice charged at the gateway that is not paid, with its attempts.
async fn settle_everything(env: &Env) {
    // The flow leaves work behind it (a renewal retry, a charge enqueued by UpdatePaymentMethod)
    // that can reach the gateway after the last call returned: wait until nothing is in flight
    // and every invoice charged at the gateway is settled in the ledger, then compare them.
    eventually(
        "in-flight attempts to settle and the ledger to catch up with the gateway",
        Duration::from_secs(60),
        || async {
            let in_flight = sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM payment WHERE status IN ('created', 'processing')",
            )
            .fetch_one(&env.db)
            .await
            .unwrap();
            if in_flight > 0 {
                return None;
            }
            let unpaid = sqlx::query_scalar::<_, Uuid>(
                "SELECT i.id FROM invoice i WHERE i.status <> 'paid' AND NOT EXISTS (
                   SELECT 1 FROM refund r JOIN payment p ON p.id = r.payment_id
                   WHERE p.invoice_id = i.id AND r.requested_by = 'system')",
            )
            .fetch_all(&env.db)
            .await
            .unwrap();
            let charged_unpaid = unpaid
                .iter()
                .filter(|id| env.fake.charges_for_invoice(&id.to_string()) > 0)
                .count();
            (charged_unpaid == 0).then_some(())
        },
    )
    .await;
}

/// Picks a free loopback port.
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The same flow against the `billing-api` binary itself, configured only through its
/// environment, with the test's worker and fake gateway; its `/metrics` counts the calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_runs_the_whole_flow_against_the_billing_api_binary() {
    use billing_tasks::grpc::proto::billing::v1 as pb;
    let env = Env::start().await;
    let key = SigningKey::generate();
    let key_file = std::env::temp_dir().join(format!("billing-jwt-{}.pem", Uuid::new_v4()));
    std::fs::write(&key_file, &key.public_pem).unwrap();
    let (grpc, http) = (free_addr(), free_addr());
    let mut api = tokio::process::Command::new(env!("CARGO_BIN_EXE_billing-api"))
        .env("DATABASE_URL", &env.db_url)
        .env("CLOUDPAYMENTS_URL", env.fake.url())
        .env("CLOUDPAYMENTS_PUBLIC_ID", PUBLIC_ID)
        .env("CLOUDPAYMENTS_API_SECRET", API_SECRET)
        .env("BILLING_QUEUE", &env.queue)
        .env("BILLING_GRPC_BIND", grpc.to_string())
        .env("BILLING_HTTP_BIND", http.to_string())
        .env("BILLING_JWT_PUBLIC_KEYS", &key_file)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("billing-api starts");
    let probe = key.token_for(Uuid::new_v4(), 600);
    eventually("billing-api to answer", Duration::from_secs(30), || async {
        let mut c = pb::billing_client::BillingClient::connect(format!("http://{grpc}"))
            .await
            .ok()?;
        let mut r = tonic::Request::new(pb::ListTariffsRequest {});
        r.metadata_mut()
            .insert("authorization", format!("Bearer {probe}").parse().unwrap());
        c.list_tariffs(r).await.ok()
    })
    .await;
    run_python(&env, grpc, &key).await;
    let metrics = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(
            r#"billing_grpc_requests_total{method="billing.v1.Billing/WatchPayment",code="Ok"}"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"method="grpc.health.v1.Health/Check""#),
        "{metrics}"
    );
    settle_everything(&env).await;
    env.assert_ledger_matches_gateway().await;
    api.kill().await.unwrap();
    let _ = std::fs::remove_file(key_file);
    env.stop().await;
}
