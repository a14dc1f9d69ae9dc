//! Cluster-wide flow control with two worker processes sharing one Redis: the per-key limits of
//! `diag.limited` (one running per key, 20 starts a second per key) hold across both, and other
//! task types on the same queue keep flowing while limited ones wait.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::{Map, Value, json};
use task_core::diag::{self, LIMITED_RATE};
use task_core::{AsyncResult, Broker, Client, Task};

/// Limited tasks per key: 439 intervals of 50 ms, about 22 s of work per key.
const PER_KEY: usize = 440;
const ADDS: usize = 200;
/// Longest an add may take from publish to result (seconds): it must not queue behind limited
/// tasks, which take 22 s to drain.
const ADD_LATENCY: f64 = 5.0;

/// One message of the test, in the order they are published.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// A `diag.limited` of `keys[_]`.
    Limited(usize),
    /// `diag.add(n, 1)`.
    Add(i64),
}

/// When one `diag.limited` ran, in Unix seconds.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: f64,
    end: f64,
}

fn limited_kwargs(key: &str) -> Map<String, Value> {
    let Value::Object(kwargs) = json!({"key": key, "ms": 10}) else {
        unreachable!()
    };
    kwargs
}

/// The value of `series` (`name{labels}` as the worker writes it) in a /metrics text, 0 if absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().expect("a number"))
}

/// The most runs of one key that overlapped at any instant (a run ending when another starts
/// does not overlap it).
fn max_concurrency(runs: &[Run]) -> i32 {
    let mut edges: Vec<(f64, i32)> = runs
        .iter()
        .flat_map(|r| [(r.start, 1), (r.end, -1)])
        .collect();
    // Ends sort before starts at the same instant.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut max) = (0, 0);
    for (_, delta) in edges {
        now += delta;
        max = max.max(now);
    }
    max
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_limits_hold_across_two_workers_and_other_tasks_keep_flowing() {
    let queue = common::unique_queue("flow");
    let prefix = format!("test-{}:", uuid::Uuid::new_v4().simple());
    let env = [("COORDINATION_PREFIX", prefix.as_str())];
    let workers = [
        common::WorkerProcess::spawn(&queue, &env),
        common::WorkerProcess::spawn(&queue, &env),
    ];
    for w in &workers {
        w.ready().await;
    }
    let client = Client::connect(&common::amqp_url(), &common::redis_url())
        .await
        .unwrap()
        .with_default_queue(&queue);

    // Both keys' tasks alternate in the queue, with an add after every fourth limited task
    // until the adds run out, so the adds sit behind limited tasks that cannot all run yet.
    let keys = ["key-a", "key-b"];
    let mut order = Vec::new();
    for i in 0..PER_KEY {
        order.extend([Job::Limited(0), Job::Limited(1)]);
        if i % 2 == 1 && i / 2 < ADDS {
            order.push(Job::Add(i as i64 / 2));
        }
    }
    // Published concurrently (a sequential publish waits for each confirm), in about this order.
    let sending = std::time::Instant::now();
    let sent: Vec<(Job, AsyncResult<Value>, f64)> = futures_util::stream::iter(order)
        .map(|job| {
            let client = &client;
            async move {
                let call = match job {
                    Job::Limited(k) => {
                        client.send_task(diag::Limited::NAME, vec![], limited_kwargs(keys[k]))
                    }
                    Job::Add(n) => {
                        client.send_task(diag::Add::NAME, vec![json!(n), json!(1)], Map::new())
                    }
                };
                let result = call.send().await.unwrap();
                (job, result, task_core::events::unix_now())
            }
        })
        .buffered(64)
        .collect()
        .await;
    println!(
        "sent {} tasks in {:.2} s",
        sent.len(),
        sending.elapsed().as_secs_f64()
    );
    let mut limited: [Vec<&AsyncResult<Value>>; 2] = [Vec::new(), Vec::new()];
    let mut adds = Vec::new();
    for (job, result, at) in &sent {
        match job {
            Job::Limited(k) => limited[*k].push(result),
            Job::Add(n) => adds.push((*n, result, *at)),
        }
    }
    assert_eq!(adds.len(), ADDS);

    let timeout = Duration::from_secs(180);
    let add_done = join_all(adds.iter().map(|(n, r, sent)| async move {
        assert_eq!(r.get(timeout).await.unwrap(), json!(n + 1));
        let meta = r.meta().await.unwrap().expect("a stored result");
        let done = meta.date_done.expect("date_done");
        let done = done.timestamp_micros() as f64 / 1e6;
        (done, done - sent)
    }))
    .await;
    let max_latency = add_done.iter().map(|a| a.1).fold(f64::MIN, f64::max);
    println!("slowest add: done {max_latency:.2} s after it was sent");
    assert!(
        max_latency < ADD_LATENCY,
        "an add took {max_latency:.2} s from publish to result behind limited tasks"
    );
    let add_done: Vec<f64> = add_done.iter().map(|a| a.0).collect();
    let last_add = add_done.iter().copied().fold(f64::MIN, f64::max);

    for (k, key) in keys.iter().enumerate() {
        let mut runs: Vec<Run> = join_all(limited[k].iter().map(|r| async move {
            let v = r.get(timeout).await.unwrap();
            Run {
                start: v["start"].as_f64().expect("start"),
                end: v["end"].as_f64().expect("end"),
            }
        }))
        .await;
        runs.sort_by(|a, b| a.start.total_cmp(&b.start));

        for pair in runs.windows(2) {
            assert!(
                pair[1].start >= pair[0].end,
                "{key}: a run started at {} while the one started at {} ran until {}",
                pair[1].start,
                pair[0].start,
                pair[0].end
            );
        }
        let concurrency = max_concurrency(&runs);
        assert_eq!(concurrency, 1, "{key}: runs overlapped");

        let span = runs[PER_KEY - 1].start - runs[0].start;
        let rate = (PER_KEY - 1) as f64 / span;
        let gaps = runs.windows(2).map(|p| p[1].start - p[0].start);
        let (min_gap, max_gap) =
            gaps.fold((f64::MAX, 0.0f64), |(lo, hi), g| (lo.min(g), hi.max(g)));
        let gaps = format!(
            "gaps between starts {:.1} ms to {:.1} ms",
            min_gap * 1e3,
            max_gap * 1e3
        );
        println!(
            "{key}: {PER_KEY} runs over {span:.2} s: {rate:.2} starts/s, {gaps}, max concurrency \
             {concurrency}"
        );
        assert!(span >= 20.0, "{key}: only {span:.2} s of work");
        // The limit is a ceiling: never more than 10% above it. Below it the rate depends on
        // how busy the machine is (the whole suite shares two cores), so the floor only says the
        // limiter does not starve the key.
        assert!(
            rate <= LIMITED_RATE * 1.1,
            "{key}: {rate:.2} starts/s, more than 10% above {LIMITED_RATE}/s ({gaps})"
        );
        assert!(
            rate >= LIMITED_RATE * 0.75,
            "{key}: {rate:.2} starts/s, under 75% of {LIMITED_RATE}/s ({gaps})"
        );

        let hundredth = runs[99].start;
        println!(
            "{key}: every add done {:.2} s after the first run of the key, {:.2} s before its 100th",
            last_add - runs[0].start,
            hundredth - last_add
        );
        assert!(
            last_add < hundredth,
            "{key}: the last add finished at {last_add}, after the 100th limited run started at \
             {hundredth}: limited tasks held up the queue"
        );
    }

    // Both workers ran limited tasks, so the limits held across processes, not within one; and
    // a delivery that waited counts once in tq_rate_limit_waits_total, however often it polled.
    let mut ran = Vec::new();
    for w in &workers {
        let (status, text) = common::http_get(w.metrics_addr().await, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        let tq = format!(r#"task="diag.limited",queue="{queue}""#);
        let runs = sample(
            &text,
            &format!(r#"tq_tasks_completed_total{{{tq},outcome="success"}}"#),
        );
        let received = sample(&text, &format!("tq_tasks_received_total{{{tq}}}"));
        let waits = sample(&text, r#"tq_rate_limit_waits_total{task="diag.limited"}"#);
        println!(
            "worker: {runs} diag.limited runs, {received} deliveries (the rest deferred), {waits} \
             delayed by a limit"
        );
        assert!(
            waits <= received,
            "{waits} waits counted for {received} deliveries"
        );
        ran.push(runs);
    }
    assert!(
        ran.iter().all(|n| *n > 0.0),
        "one worker ran every limited task: {ran:?}"
    );
    assert_eq!(ran.iter().sum::<f64>(), (2 * PER_KEY) as f64);

    drop(workers);
    client.broker().delete_queue(&queue).await.unwrap();
}
