//! Benchmark (ignored by default; run it in release):
//! `cargo nextest run --release -p billing-tasks --test grpc_bench --run-ignored only --no-capture`.
//! `StartSubscription` → the payment's final state through the gRPC API (WatchPayment), with the
//! fake gateway answering in 50 ms and one worker (16 tasks at once): latency at 100 calls/s
//! (open loop), and the sustained rate of 64 clients calling back to back.

mod billing_support;
mod grpc_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use billing_support::*;
use billing_tasks::cloudpayments::fake::{self, FakeConfig, TerminalConfig};
use billing_tasks::grpc::proto::billing::v1 as pb;
use grpc_support::GrpcFront;
use pb::billing_client::BillingClient;
use tonic::transport::Channel;
use uuid::Uuid;

fn secs(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One subscription, start to final state; returns the time it took.
async fn one(mut api: BillingClient<Channel>, token: String) -> Duration {
    let t0 = Instant::now();
    let auth: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut r = tonic::Request::new(pb::StartSubscriptionRequest {
        tariff: "monthly".into(),
        cryptogram: fake::test_cryptogram(CARD_OK, EXP),
        cardholder_name: String::new(),
        ip_address: "203.0.113.7".into(),
        email: String::new(),
        idempotency_key: Uuid::new_v4().to_string(),
    });
    r.metadata_mut().insert("authorization", auth.clone());
    let p = api.start_subscription(r).await.unwrap().into_inner();
    let mut r = tonic::Request::new(pb::GetPaymentRequest { payment_id: p.id });
    r.metadata_mut().insert("authorization", auth);
    let mut stream = api.watch_payment(r).await.unwrap().into_inner();
    let mut last = None;
    while let Some(m) = stream.message().await.unwrap() {
        last = Some(m.status);
    }
    assert_eq!(last, Some(pb::PaymentStatus::Succeeded as i32));
    t0.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run it alone, in release"]
async fn start_subscription_to_final_state() {
    let env = Env::start_with(Options {
        fake: FakeConfig::default()
            .with_terminals(vec![TerminalConfig::production(PUBLIC_ID, API_SECRET)])
            .with_latency(Duration::from_millis(50)),
        ..Options::default()
    })
    .await;
    let front = GrpcFront::start(&env).await;
    let api = BillingClient::connect(format!("http://{}", front.addr))
        .await
        .unwrap();

    // Open loop: 100 calls/s, each a new user.
    let (rate, seconds) = (secs("BENCH_RATE", 100), secs("BENCH_SECONDS", 30));
    let n = (rate * seconds) as usize;
    let tokens: Vec<String> = (0..n)
        .map(|_| front.key.token_for(Uuid::new_v4(), 3600))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut calls = Vec::with_capacity(n);
    for token in tokens {
        tick.tick().await;
        calls.push(tokio::spawn(one(api.clone(), token)));
    }
    let mut lat = Vec::with_capacity(n);
    for c in calls {
        lat.push(c.await.unwrap());
    }
    let wall = started.elapsed();
    lat.sort();
    println!(
        "open loop at {rate} calls/s for {seconds} s: {n} subscriptions in {:.1} s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        wall.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3
    );

    // Closed loop: 64 clients back to back; the completion rate is the sustained maximum.
    let clients = secs("BENCH_CLIENTS", 64) as usize;
    let duration = Duration::from_secs(secs("BENCH_MAX_SECONDS", 20));
    let done = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (api, done, key) = (
            api.clone(),
            done.clone(),
            front.key.token_for(Uuid::nil(), 0),
        );
        drop(key);
        let tokens: Vec<String> = (0..4000 / clients)
            .map(|_| front.key.token_for(Uuid::new_v4(), 3600))
            .collect();
        workers.push(tokio::spawn(async move {
            for token in tokens {
                if started.elapsed() >= duration {
                    break;
                }
                let d = one(api.clone(), token).await;
                done.lock().unwrap().push(d);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let wall = started.elapsed();
    let mut lat = done.lock().unwrap().clone();
    lat.sort();
    println!(
        "closed loop, {clients} clients: {} subscriptions in {:.1} s = {:.0}/s sustained, p50 {:.1} ms, p99 {:.1} ms",
        lat.len(),
        wall.as_secs_f64(),
        lat.len() as f64 / wall.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
    front.stop().await;
    env.stop().await;
}
