//! The billing chaos run, small: 300 renewals, 30 primary payments and 10 refunds while the worker
//! is SIGKILLed every 3 s, RabbitMQ and Redis are restarted once each, and the fake gateway
//! misbehaves for 30 s. The full-size run is `examples/examples/billing_chaos.rs`.
//!
//! It restarts RabbitMQ and Redis for everything on the machine, so `scripts/test` runs it on its
//! own after the rest of the suite (its name starts with `chaos_broker`). It runs the `worker`
//! binary of this build (`target/debug/worker`; building the workspace builds it). A failing run
//! prints its fault seed; `CHAOS_SEED=<seed>` replays it.

use std::time::Duration;

use examples::billing_chaos::{self, ChaosSettings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_broker_billing_chaos_keeps_the_books() {
    let defaults = ChaosSettings::from_env().expect("settings");
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .map(|s| s.parse().expect("CHAOS_SEED is a number"))
        .unwrap_or(defaults.seed);
    let s = ChaosSettings {
        renewals: 300,
        primaries: 30,
        refunds: 10,
        chaos: Duration::from_secs(30),
        kill_every: Duration::from_secs(3),
        seed,
        settle_timeout: Duration::from_secs(300),
        ..defaults
    };
    println!("billing chaos, fault seed {seed} (replay with CHAOS_SEED={seed})");
    let report = billing_chaos::run(&s).await.expect("the run could be made");
    for line in report.lines() {
        println!("{line}");
    }
    assert!(
        report.ok(),
        "money errors or an unsettled run (seed {seed}; worker log {}): {report:#?}",
        report.worker_log.display()
    );
    // The chaos really happened.
    assert!(report.kills >= 4, "{} kills", report.kills);
    assert_eq!((report.broker_restarts, report.redis_restarts), (1, 1));
    assert!(report.faults_injected > 0, "no gateway faults were drawn");
    assert!(report.three_ds_answered > 0 && report.refunds_requested > 0);
}
