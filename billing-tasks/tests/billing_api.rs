//! The `billing-api` binary: a bad setting stops it at start-up with one line naming the
//! variable; a good configuration serves `/healthz`, the webhook receiver and `/metrics`.

mod billing_support;

use std::process::Stdio;
use std::time::Duration;

use billing_support::*;
use tokio::io::AsyncReadExt;

fn api(db_url: &str, gateway: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_billing-api"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("CLOUDPAYMENTS_URL", gateway)
        .env("CLOUDPAYMENTS_PUBLIC_ID", PUBLIC_ID)
        .env("CLOUDPAYMENTS_API_SECRET", API_SECRET)
        .env("BILLING_HTTP_BIND", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs it to its exit (bounded) and returns the exit code and what it printed.
async fn refused(mut cmd: tokio::process::Command) -> (Option<i32>, String) {
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("billing-api exits on a bad setting")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_stops_billing_api_with_a_line_naming_it() {
    let env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    let gateway = env.fake.url();
    for (what, cmd, mention) in [
        (
            "no public id",
            {
                let mut c = api(&env.db_url, &gateway);
                c.env_remove("CLOUDPAYMENTS_PUBLIC_ID");
                c
            },
            "CLOUDPAYMENTS_PUBLIC_ID",
        ),
        (
            "a lease shorter than the gateway timeout",
            {
                let mut c = api(&env.db_url, &gateway);
                c.env("BILLING_PROCESSING_LEASE", "30")
                    .env("CLOUDPAYMENTS_TIMEOUT", "60");
                c
            },
            "BILLING_PROCESSING_LEASE",
        ),
        (
            "giving up on an unknown outcome while the gateway may still process it",
            {
                let mut c = api(&env.db_url, &gateway);
                c.env("BILLING_UNKNOWN_GIVE_UP", "60")
                    .env("BILLING_GATEWAY_MAX_PROCESSING", "360");
                c
            },
            "BILLING_UNKNOWN_GIVE_UP",
        ),
        (
            "a vault key that is not one",
            {
                let mut c = api(&env.db_url, &gateway);
                c.env("BILLING_VAULT_KEYS", "k1:not-base64!");
                c
            },
            "BILLING_VAULT_KEYS",
        ),
        (
            "a broker URL that is not one",
            {
                let mut c = api(&env.db_url, &gateway);
                c.env("BROKER_URL", "http://nope");
                c
            },
            "BROKER_URL",
        ),
    ] {
        let (code, text) = refused(cmd).await;
        assert_ne!(code, Some(0), "{what}: {text}");
        assert!(
            text.contains(mention),
            "{what}: should name {mention}: {text}"
        );
        assert!(
            !text.contains(API_SECRET),
            "{what}: the API secret was printed: {text}"
        );
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_api_answers_healthz_and_receives_webhooks() {
    let env = Env::start_with(Options {
        run_worker: false,
        ..Options::default()
    })
    .await;
    // A fixed free port: the binary logs where it listens, but not in a form worth parsing.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = api(&env.db_url, &env.fake.url());
    cmd.env("BILLING_HTTP_BIND", format!("127.0.0.1:{port}"));
    let mut child = cmd.spawn().unwrap();
    let http = reqwest::Client::new();
    let health = eventually("/healthz", Duration::from_secs(30), || async {
        http.get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success())
    })
    .await;
    assert_eq!(health.text().await.unwrap(), "ok");
    // An unsigned notification is refused: the receiver is mounted and checks signatures.
    let r = http
        .post(format!(
            "http://127.0.0.1:{port}/webhooks/cloudpayments/pay"
        ))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("TransactionId=1&Amount=1.00")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // /metrics serves the ledger gauges, read from the database, and every billing metric an
    // alert rule or dashboard names.
    let metrics = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("billing_ledger_metrics_up 1"), "{metrics}");
    assert!(
        metrics.contains("billing_payments_in_flight{status=\"processing\"} 0"),
        "{metrics}"
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let check = std::process::Command::new(root.join("deploy/check-metrics"))
        .args([
            "--scrape",
            &format!("billing-api=http://127.0.0.1:{port}/metrics"),
        ])
        .output()
        .expect("run deploy/check-metrics");
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "deploy/check-metrics --scrape:\n{report}"
    );
    child.kill().await.unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err).await;
    }
    assert!(!err.contains(API_SECRET), "the API secret was logged");
    env.stop().await;
}
