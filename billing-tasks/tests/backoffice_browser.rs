//! The back-office in a real browser: headless Chromium (Debian's package, driven through
//! chromedriver by `tests/browser/backoffice_walk.py` with Selenium from `.venv`) signs in as
//! support, finds two payers by their card's last four digits, asks for a full refund above the
//! approval threshold, signs out, signs in as an accountant who approves it, waits for the
//! refund to succeed on the payer's page, and checks the payments list against its CSV export;
//! against the back-office serving HTTP on a real port over a real ledger, the fake gateway and
//! a worker. Then the ledger and the gateway are checked from here. The screenshots land in
//! `target/backoffice-screenshots/` for a reviewer.

mod billing_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use billing_support::backoffice as bo;
use billing_support::*;
use billing_tasks::cloudpayments::TransactionStatus;
use billing_tasks::cloudpayments::fake::TransactionKind;
use uuid::Uuid;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn screenshots() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("backoffice-screenshots")
}

/// The browser is a system package the test cannot do without: say how to get it.
fn require(var: &str, default: &str) {
    let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: this test needs Debian's chromium and chromium-driver \
         (scripts/services browser installs them; {var} overrides the path)",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_refunds_above_the_threshold_with_a_second_persons_approval() {
    require("CHROMIUM", "/usr/bin/chromium");
    require("CHROMEDRIVER", "/usr/bin/chromedriver");
    let python = workspace_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing (run scripts/python-venv)",
        python.display()
    );

    let env = Env::start().await;
    let (payer, other) = (Uuid::new_v4(), Uuid::new_v4());
    let payment = env.subscribe(payer, CARD_OK).await;
    env.subscribe(other, CARD_OK).await;
    assert_eq!(payment.amount.minor, 29_900);

    // Refunds above 100 ₽ need a second person: the 299 ₽ refund below does.
    let app = bo::app(&env, &bo::args(100));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });

    let out = screenshots();
    let _ = std::fs::remove_dir_all(&out);
    let script = workspace_root().join("billing-tasks/tests/browser/backoffice_walk.py");
    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .arg(&out)
        .arg(payer.to_string())
        .arg(payment.id.to_string())
        .env("BO_PASSWORD", bo::PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(200), run)
        .await
        .expect("the browser walk finishes")
        .unwrap_or_else(|e| panic!("{} (run scripts/python-venv): {e}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    if !output.status.success() {
        // Printed last and without a backtrace after it, so that the step that failed ends
        // the test's output (CI shows the tail).
        eprintln!("the walk failed:\n{stdout}\n{stderr}");
        std::panic::resume_unwind(Box::new("the browser walk failed (its output is above)"));
    }
    for name in [
        "01-login",
        "02-home",
        "03-search",
        "04-payer",
        "05-refund-filled",
        "06-refund-awaiting-approval",
        "07-signed-out",
        "08-anna-home",
        "09-approvals",
        "10-approved",
        "11-refund-succeeded",
        "12-payments",
        "13-payer-en",
    ] {
        let png = std::fs::read(out.join(format!("{name}.png")))
            .unwrap_or_else(|e| panic!("{name}.png: {e}"));
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{name}.png is not a page"
        );
    }
    println!("screenshots in {}", out.display());

    // The ledger: one refund of the whole payment, asked for by support, approved by an
    // accountant, and gone through at the gateway.
    let refunds = sqlx::query_as::<_, (Uuid, String, i64, String, Option<i64>)>(
        "SELECT id, status, amount_minor, requested_by, gateway_transaction_id FROM refund WHERE payment_id = $1",
    )
    .bind(payment.id)
    .fetch_all(&env.db)
    .await
    .unwrap();
    assert_eq!(refunds.len(), 1, "{refunds:?}");
    let (refund_id, status, amount, requested_by, refund_txn) = refunds[0].clone();
    assert_eq!(
        (status.as_str(), amount, requested_by.as_str()),
        ("succeeded", 29_900, "staff:sveta")
    );
    let approvals = sqlx::query_as::<_, (String, String, Option<String>, Option<Uuid>, i64)>(
        "SELECT status, requested_by, decided_by, refund_id, amount_minor FROM refund_approval WHERE payment_id = $1",
    )
    .bind(payment.id)
    .fetch_all(&env.db)
    .await
    .unwrap();
    assert_eq!(
        approvals,
        vec![(
            "approved".to_owned(),
            "sveta".to_owned(),
            Some("anna".to_owned()),
            Some(refund_id),
            29_900
        )]
    );
    let no_other: i64 = sqlx::query_scalar("SELECT count(*) FROM refund WHERE payment_id <> $1")
        .bind(payment.id)
        .fetch_one(&env.db)
        .await
        .unwrap();
    assert_eq!(no_other, 0, "the other payer's payment was not refunded");

    // The gateway: the payment is refunded in full, by one completed refund operation.
    let payment_txn: i64 =
        sqlx::query_scalar("SELECT gateway_transaction_id FROM payment WHERE id = $1")
            .bind(payment.id)
            .fetch_one(&env.db)
            .await
            .unwrap();
    let charged = env
        .fake
        .transaction(payment_txn)
        .expect("the payment at the gateway");
    assert_eq!(charged.refunded.minor, 29_900, "{charged:?}");
    let at_gateway: Vec<_> = env
        .fake
        .transactions()
        .into_iter()
        .filter(|t| t.kind == TransactionKind::Refund)
        .collect();
    assert_eq!(at_gateway.len(), 1, "{at_gateway:?}");
    let r = &at_gateway[0];
    assert_eq!(r.original_id, Some(payment_txn), "{r:?}");
    assert_eq!(r.amount.minor, 29_900, "{r:?}");
    assert_eq!(r.status, TransactionStatus::Completed, "{r:?}");
    assert_eq!(
        refund_txn,
        Some(r.id),
        "the ledger records the gateway's refund"
    );
    env.assert_ledger_matches_gateway().await;

    let _ = stop.send(());
    let _ = server.await;
    env.stop().await;
}
