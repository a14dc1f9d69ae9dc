//! The fake serves many token charges in flight at once, each charged exactly once. How fast it
//! is at the benchmark's size is measured by `examples/renewal_bench` (a program, not a test).
//! At 50 ms per request, 100,000 charges in 120 s need at least 42 in flight at once, so the
//! terminal's cap must be raised above the production 30 (`--concurrency-limit` on the binary).

mod cloudpayments_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use billing_tasks::cloudpayments::ChargeOutcome;
use billing_tasks::cloudpayments::fake::{FakeConfig, TerminalConfig};
use cloudpayments_support::*;

/// Runs `total` token charges with `in_flight` concurrent callers and checks each was charged once.
async fn run(total: usize, in_flight: usize) {
    let terminal = TerminalConfig::production("pk_bench", "bench-secret")
        .with_concurrency_limit(in_flight + 16);
    let config = FakeConfig::default()
        .with_terminals(vec![terminal])
        .with_latency(Duration::from_millis(50));
    let (fake, client) = start_with(config).await;
    let account = "acc-bench";
    let token = paid(&client, CARD_OK, account).await.token.unwrap();

    let next = Arc::new(AtomicUsize::new(0));
    let approved = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (client, token, next, approved) = (
                client.clone(),
                token.clone(),
                next.clone(),
                approved.clone(),
            );
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let invoice = id("inv");
                    let outcome = client
                        .charge_token(&token_charge(&token, account, &invoice), &invoice)
                        .await
                        .expect("no errors under the cap");
                    if matches!(outcome, ChargeOutcome::Approved(_)) {
                        approved.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();
    assert_eq!(approved.load(Ordering::Relaxed), total);
    // One card payment plus the token charges, nothing twice.
    assert_eq!(fake.transaction_count(), total + 1);
    eprintln!(
        "{total} token charges, {in_flight} in flight, 50 ms latency: {elapsed:?} ({:.0}/s)",
        total as f64 / elapsed.as_secs_f64()
    );
    fake.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_token_charges_in_parallel() {
    run(3_000, 150).await;
}
