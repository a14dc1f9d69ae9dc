//! Server-rendered pages (askama templates in `templates/`): dashboard, task list, task detail,
//! workers, queues. Plain HTML with no JavaScript; pages that change by themselves reload every
//! few seconds (`?refresh=0` turns it off).
//!
//! Everything shown is escaped by the templates; args, kwargs and results are the reprs the
//! workers sent, which are already redacted for sensitive tasks.

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use task_core::ResultBackend;

use crate::AppState;
use crate::broker::QueueStats;
use crate::event::TaskRecord;
use crate::store::TaskQuery;

const DEFAULT_REFRESH: u32 = 5;
const STATES: [&str; 8] = [
    "PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE", "RETRY", "REVOKED", "REJECTED",
];

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a page did not render");
            (StatusCode::INTERNAL_SERVER_ERROR, "the page did not render").into_response()
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "a page could not read its data");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the monitor cannot read its data now: {e}"),
    )
        .into_response()
}

fn refresh(params: &HashMap<String, String>) -> u32 {
    params
        .get("refresh")
        .and_then(|r| r.parse().ok())
        .unwrap_or(DEFAULT_REFRESH)
}

/// `2026-12-01 09:30:12.345` (UTC), or empty.
fn time(ts: Option<f64>) -> String {
    ts.and_then(|t| DateTime::<Utc>::from_timestamp_micros((t * 1e6) as i64))
        .map(|d| d.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

fn seconds(s: Option<f64>) -> String {
    match s {
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1000.0),
        Some(s) => format!("{s:.3} s"),
        None => String::new(),
    }
}

fn text(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char);
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Workers online now, to flag RECEIVED/STARTED tasks whose worker is gone as "lost?".
async fn online_workers(state: &AppState) -> std::collections::HashSet<String> {
    let now = task_core::events::unix_now();
    match state.store().workers().await {
        Ok(w) => w
            .into_iter()
            .filter(|w| w.online(now))
            .map(|w| w.hostname)
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read workers to flag lost tasks");
            Default::default()
        }
    }
}

/// Whether a task still looks in flight on a worker that stopped sending heartbeats.
fn lost(t: &TaskRecord, online: &std::collections::HashSet<String>) -> bool {
    matches!(t.state.as_str(), "RECEIVED" | "STARTED")
        && t.worker.as_ref().is_some_and(|w| !online.contains(w))
}

#[derive(Debug)]
struct QueueRow {
    name: String,
    messages: u64,
    consumers: u64,
    /// "–" where the broker does not tell (no management API).
    unacked: String,
    /// Held by at-least-once dead-lettering (quorum queues, with the management API); empty
    /// when nothing is.
    dead_lettering: String,
    oldest: String,
    link: String,
    paused: bool,
}

impl From<(String, QueueStats)> for QueueRow {
    fn from((name, s): (String, QueueStats)) -> Self {
        QueueRow {
            link: url_encode(&name),
            paused: false,
            name,
            messages: s.messages,
            consumers: s.consumers,
            unacked: s.unacked.map_or_else(|| "–".to_owned(), |n| n.to_string()),
            dead_lettering: match s.dead_lettering {
                Some(n) if n > 0 => format!("+{n} dead-lettering"),
                _ => String::new(),
            },
            oldest: s.oldest_age.map_or_else(|| "–".to_owned(), duration),
        }
    }
}

/// Seconds as a short duration: `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`.
fn duration(secs: f64) -> String {
    match secs {
        s if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        s if s < 60.0 => format!("{s:.1} s"),
        s if s < 3600.0 => format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64),
        s => format!(
            "{} h {:02} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
    }
}

#[derive(Debug)]
struct FailureRow {
    task: String,
    class: String,
    count: i64,
    latest: String,
    example: String,
    list: String,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Dashboard {
    nav: &'static str,
    refresh: u32,
    workers_online: usize,
    workers_seen: usize,
    states: Vec<(String, i64)>,
    failure_rate: String,
    chart: String,
    queues: Vec<QueueRow>,
    failures: Vec<FailureRow>,
}

/// A bar chart of succeeded (up) and failed (down) tasks per minute, as inline SVG.
fn chart(buckets: &[(f64, i64, i64)], from: f64, minutes: usize) -> String {
    let (w, h, bar) = (minutes * 12, 120usize, 10usize);
    let mut ok = vec![0i64; minutes];
    let mut bad = vec![0i64; minutes];
    for (t, s, f) in buckets {
        let i = ((t - from) / 60.0).floor();
        if i >= 0.0 && (i as usize) < minutes {
            ok[i as usize] += s;
            bad[i as usize] += f;
        }
    }
    let max = ok
        .iter()
        .chain(bad.iter())
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mid = h / 2;
    let mut svg = format!(
        r#"<svg role="img" aria-label="tasks per minute" width="{w}" height="{h}" viewBox="0 0 {w} {h}" style="background:#fff;border:1px solid #e3e6eb">"#
    );
    svg.push_str(&format!(
        r##"<line x1="0" y1="{mid}" x2="{w}" y2="{mid}" stroke="#e3e6eb"/>"##
    ));
    for i in 0..minutes {
        let x = i * 12 + 1;
        let up = ((ok[i] as f64 / max) * (mid as f64 - 2.0)).round() as usize;
        let down = ((bad[i] as f64 / max) * (mid as f64 - 2.0)).round() as usize;
        svg.push_str(&format!(
            r##"<rect x="{x}" y="{}" width="{bar}" height="{up}" fill="#17803d"><title>{} succeeded</title></rect>"##,
            mid - up,
            ok[i]
        ));
        svg.push_str(&format!(
            r##"<rect x="{x}" y="{mid}" width="{bar}" height="{down}" fill="#c0262d"><title>{} failed</title></rect>"##,
            bad[i]
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// `GET /`.
pub(crate) async fn dashboard(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let now = task_core::events::unix_now();
    let store = state.store();
    let (workers, states, buckets, failures) = tokio::join!(
        store.workers(),
        store.state_counts(now - 3600.0),
        store.throughput(now - 1800.0, 60.0),
        store.failure_groups(now - 86_400.0, 20),
    );
    let (workers, states, buckets, failures) = match (workers, states, buckets, failures) {
        (Ok(w), Ok(s), Ok(b), Ok(f)) => (w, s, b, f),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (_, _, _, Err(e)) => {
            return unavailable(e);
        }
    };
    let queues = match state.queue_stats().await {
        Ok(q) => q,
        Err(e) => {
            tracing::warn!(error = %e, "the dashboard shows no queues");
            Vec::new()
        }
    };
    let count = |s: &str| states.iter().find(|(x, _)| x == s).map_or(0, |(_, n)| *n);
    let (ok, bad) = (count("SUCCESS"), count("FAILURE"));
    let failure_rate = if ok + bad == 0 {
        "–".to_owned()
    } else {
        format!("{:.1} %", 100.0 * bad as f64 / (ok + bad) as f64)
    };
    let from = ((now - 1800.0) / 60.0).floor() * 60.0;
    render(&Dashboard {
        nav: "dashboard",
        refresh: refresh(&params),
        workers_online: workers.iter().filter(|w| w.online(now)).count(),
        workers_seen: workers.len(),
        states,
        failure_rate,
        chart: chart(&buckets, from, 31),
        queues: queues.into_iter().map(QueueRow::from).collect(),
        failures: failures
            .into_iter()
            .map(|(task, class, count, latest, example)| FailureRow {
                list: format!(
                    "/tasks?state=FAILURE&taskname={}&search={}",
                    url_encode(&task),
                    url_encode(&class)
                ),
                task,
                class,
                count,
                latest: time(Some(latest)),
                example,
            })
            .collect(),
    })
}

#[derive(Debug)]
struct TaskRow {
    uuid: String,
    name: String,
    state: String,
    args: String,
    kwargs: String,
    result: String,
    received: String,
    runtime: String,
    worker: String,
    lost: bool,
}

#[derive(Template)]
#[template(path = "tasks.html")]
struct TaskList {
    nav: &'static str,
    refresh: u32,
    search: String,
    taskname: String,
    workername: String,
    limit: u64,
    state_options: Vec<(&'static str, bool)>,
    error: Option<String>,
    tasks: Vec<TaskRow>,
    next: Option<String>,
    first: String,
    /// The filter as a query string, for the bulk actions' links.
    filter_query: String,
}

/// `GET /tasks`: newest first, keyset pages (`before=<received>:<uuid>`), Flower's filters and
/// search syntax plus negation; the URL is the saved view.
pub(crate) async fn tasks(
    State(state): State<AppState>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| p.get(k).cloned().unwrap_or_default();
    let (search, st, taskname, workername) = (
        get("search"),
        get("state"),
        get("taskname"),
        get("workername"),
    );
    let limit = p
        .get("limit")
        .and_then(|l| l.parse::<u64>().ok())
        .unwrap_or(50)
        .clamp(15, 500);
    let before = p.get("before").and_then(|c| {
        let (t, id) = c.split_once(':')?;
        Some((t.parse::<f64>().ok()?, id.to_owned()))
    });
    let (terms, mut error) = match crate::search::parse(&search) {
        Ok(t) => (t, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let nonempty = |s: &String| (!s.is_empty()).then(|| s.clone());
    let query = TaskQuery {
        name: nonempty(&taskname),
        state: nonempty(&st),
        worker: nonempty(&workername),
        search: terms,
        limit: Some(limit),
        before,
        ..TaskQuery::default()
    };
    let rows = if error.is_some() {
        Vec::new()
    } else {
        match state.store().tasks(&query).await {
            Ok(rows) => rows,
            Err(e) => {
                error = Some(e.to_string());
                Vec::new()
            }
        }
    };
    let online = online_workers(&state).await;
    let base = format!(
        "/tasks?search={}&state={}&taskname={}&workername={}&limit={limit}",
        url_encode(&search),
        url_encode(&st),
        url_encode(&taskname),
        url_encode(&workername)
    );
    let next = (rows.len() as u64 == limit)
        .then(|| rows.last())
        .flatten()
        .and_then(|t| {
            Some(format!(
                "{base}&before={}:{}",
                t.received?,
                url_encode(&t.uuid)
            ))
        });
    let filter_query = filter_query(&crate::jobs::Filter {
        search: search.clone(),
        state: st.clone(),
        taskname: taskname.clone(),
        workername: workername.clone(),
        dlq: String::new(),
    });
    render(&TaskList {
        nav: "tasks",
        refresh: 0,
        filter_query,
        search,
        state_options: STATES.iter().map(|s| (*s, *s == st)).collect(),
        taskname,
        workername,
        limit,
        error,
        tasks: rows
            .into_iter()
            .map(|t| TaskRow {
                received: time(t.received),
                runtime: seconds(t.runtime),
                name: text(&t.name),
                args: text(&t.args),
                kwargs: text(&t.kwargs),
                result: text(&t.result).chars().take(120).collect(),
                worker: text(&t.worker),
                lost: lost(&t, &online),
                state: t.state,
                uuid: t.uuid,
            })
            .collect(),
        next,
        first: base,
    })
}

#[derive(Debug)]
struct Stage {
    stage: &'static str,
    at: String,
    delta: String,
}

#[derive(Debug)]
struct TaskView {
    uuid: String,
    name: String,
    state: String,
    worker: String,
    retries: String,
    args: String,
    kwargs: String,
    eta: String,
    expires: String,
    result: String,
    exception: String,
    traceback: String,
    parent_id: String,
    root_id: String,
}

#[derive(Debug)]
struct TreeNode {
    uuid: String,
    name: String,
    state: String,
    parent: String,
}

#[derive(Template)]
#[template(path = "task.html")]
struct TaskDetail {
    nav: &'static str,
    refresh: u32,
    t: TaskView,
    timeline: Vec<Stage>,
    queue_wait: String,
    runtime: String,
    children: Vec<String>,
    tree: Vec<TreeNode>,
    lost: bool,
    /// FAILURE or REVOKED: the retry form is shown.
    retryable: bool,
    /// The retry form's request id (the same form posted twice retries once).
    request_id: String,
    /// Set on the page of a retry: the task it retried.
    retry_of: String,
}

fn timeline(t: &TaskRecord) -> Vec<Stage> {
    let mut stages: Vec<(&'static str, f64)> = [
        ("sent", t.sent),
        ("received", t.received),
        ("started", t.started),
        ("retried", t.retried),
        ("succeeded", t.succeeded),
        ("failed", t.failed),
        ("revoked", t.revoked),
        ("rejected", t.rejected),
    ]
    .into_iter()
    .filter_map(|(s, at)| Some((s, at?)))
    .collect();
    stages.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut previous: Option<f64> = None;
    stages
        .into_iter()
        .map(|(stage, at)| {
            let delta = previous.map(|p| seconds(Some(at - p))).unwrap_or_default();
            previous = Some(at);
            Stage {
                stage,
                at: time(Some(at)),
                delta,
            }
        })
        .collect()
}

/// `GET /task/<id>`: timeline with queue wait and runtime, arguments, result or exception with
/// traceback, parent, children and the workflow from `root_id`.
pub(crate) async fn task(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let store = state.store();
    // A task no event has mentioned yet: from its stored result, or, just after a retry sent it,
    // as PENDING; the page then reloads until its events arrive.
    let (t, from_events) = match store.task(&id).await {
        Ok(Some(t)) => (t, true),
        Ok(None) => match state.client().backend().get(&id).await {
            Ok(Some(meta)) => (crate::api::tasks::from_result(&meta), false),
            Ok(None) if params.contains_key("retry_of") => {
                let mut t = TaskRecord::new(id.clone());
                t.state = "PENDING".into();
                (t, false)
            }
            Ok(None) => {
                return (StatusCode::NOT_FOUND, format!("Unknown task '{id}'")).into_response();
            }
            Err(e) => return unavailable(e),
        },
        Err(e) => return unavailable(e),
    };
    let waiting = !from_events
        || !matches!(
            t.state.as_str(),
            "SUCCESS" | "FAILURE" | "REVOKED" | "REJECTED"
        );
    let children = match store.children(std::slice::from_ref(&id)).await {
        Ok(mut c) => c.remove(&id).unwrap_or_default(),
        Err(e) => return unavailable(e),
    };
    let tree = match &t.root_id {
        Some(root) => match store.workflow(root, 200).await {
            Ok(rows) => rows,
            Err(e) => return unavailable(e),
        },
        None => Vec::new(),
    };
    let is_lost = lost(&t, &online_workers(&state).await);
    let queue_wait = match (t.started, t.received.or(t.sent)) {
        (Some(s), Some(r)) => seconds(Some(s - r)),
        _ => "–".into(),
    };
    render(&TaskDetail {
        nav: "tasks",
        refresh: if waiting { 2 } else { 0 },
        timeline: timeline(&t),
        lost: is_lost,
        retryable: matches!(t.state.as_str(), "FAILURE" | "REVOKED"),
        request_id: uuid::Uuid::new_v4().to_string(),
        retry_of: params.get("retry_of").cloned().unwrap_or_default(),
        queue_wait,
        runtime: t
            .runtime
            .map(|r| seconds(Some(r)))
            .unwrap_or_else(|| "–".into()),
        children,
        tree: tree
            .into_iter()
            .map(|n| TreeNode {
                name: text(&n.name),
                state: n.state,
                parent: text(&n.parent_id),
                uuid: n.uuid,
            })
            .collect(),
        t: TaskView {
            name: t.name.clone().unwrap_or_else(|| "(name unknown)".into()),
            worker: text(&t.worker),
            retries: t.retries.map(|r| r.to_string()).unwrap_or_default(),
            args: text(&t.args),
            kwargs: text(&t.kwargs),
            eta: text(&t.eta),
            expires: text(&t.expires),
            result: text(&t.result),
            exception: text(&t.exception),
            traceback: text(&t.traceback),
            parent_id: text(&t.parent_id),
            root_id: text(&t.root_id),
            state: t.state,
            uuid: t.uuid,
        },
    })
}

#[derive(Debug)]
struct WorkerRow {
    hostname: String,
    status: &'static str,
    active: String,
    processed: String,
    loadavg: String,
    last_heartbeat: String,
    software: String,
}

#[derive(Template)]
#[template(path = "workers.html")]
struct Workers {
    nav: &'static str,
    refresh: u32,
    workers: Vec<WorkerRow>,
}

/// `GET /workers`: online first, by heartbeat expiry.
pub(crate) async fn workers(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let now = task_core::events::unix_now();
    let mut rows = match state.store().workers().await {
        Ok(w) => w,
        Err(e) => return unavailable(e),
    };
    rows.sort_by_key(|w| !w.online(now));
    render(&Workers {
        nav: "workers",
        refresh: refresh(&params),
        workers: rows
            .into_iter()
            .map(|w| WorkerRow {
                status: if w.online(now) { "online" } else { "offline" },
                active: w.active.map(|a| a.to_string()).unwrap_or_default(),
                processed: w.processed.map(|a| a.to_string()).unwrap_or_default(),
                loadavg: w
                    .loadavg
                    .as_ref()
                    .map(|l| {
                        l.iter()
                            .map(|x| format!("{x:.2}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default(),
                last_heartbeat: format!(
                    "{} ({} ago)",
                    time(Some(w.last_heartbeat)),
                    seconds(Some((now - w.last_heartbeat).max(0.0)))
                ),
                software: [&w.sw_ident, &w.sw_ver, &w.sw_sys]
                    .iter()
                    .filter_map(|s| s.as_deref())
                    .collect::<Vec<_>>()
                    .join(" "),
                hostname: w.hostname,
            })
            .collect(),
    })
}

#[derive(Template)]
#[template(path = "queues.html")]
struct Queues {
    nav: &'static str,
    refresh: u32,
    error: Option<String>,
    all_queues: bool,
    queues: Vec<QueueRow>,
    /// The name filter (a substring), the queues it matches, and the page of 200 shown.
    filter: String,
    total: usize,
    page: usize,
    pages: usize,
    prev: Option<String>,
    next: Option<String>,
}

/// `GET /queues`: ready messages and consumers of every queue the workers consume.
pub(crate) async fn queues(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    const PAGE: usize = 200;
    let (mut queues, error) = match state.queue_stats().await {
        Ok(q) => (q, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let filter = params.get("name").cloned().unwrap_or_default();
    if !filter.is_empty() {
        queues.retain(|(name, _)| name.contains(filter.as_str()));
    }
    queues.sort_by(|a, b| a.0.cmp(&b.0));
    let total = queues.len();
    let pages = total.div_ceil(PAGE).max(1);
    let page = params
        .get("page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1)
        .clamp(1, pages);
    let link = |p: usize| format!("/queues?name={}&page={p}", url_encode(&filter));
    let paused = crate::queue_actions::paused_names(&state).await;
    render(&Queues {
        nav: "queues",
        refresh: refresh(&params),
        error,
        all_queues: state.lists_all_queues(),
        total,
        page,
        pages,
        prev: (page > 1).then(|| link(page - 1)),
        next: (page < pages).then(|| link(page + 1)),
        queues: queues
            .into_iter()
            .skip((page - 1) * PAGE)
            .take(PAGE)
            .map(|q| {
                let mut row = QueueRow::from(q);
                row.paused = paused.contains(&row.name);
                row
            })
            .collect(),
        filter,
    })
}

#[derive(Template)]
#[template(path = "queue.html")]
struct QueuePage {
    nav: &'static str,
    refresh: u32,
    queue: String,
    link: String,
    done: String,
    ready: u64,
    consumers: u64,
    paused: Option<crate::queue_actions::Paused>,
    request_id: String,
}

/// `GET /queues/<queue>`: its counts, whether the monitor paused it, and the pause, resume and
/// purge forms.
pub(crate) async fn queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let stats = match state.queue_probe().stats(&queue).await {
        Ok(Some(s)) => s,
        Ok(None) => return (StatusCode::NOT_FOUND, format!("no queue `{queue}`")).into_response(),
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let paused = crate::queue_actions::paused(&state)
        .await
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.queue == queue);
    let done = params.get("done").cloned().unwrap_or_default();
    render(&QueuePage {
        nav: "queues",
        refresh: 0,
        link: url_encode(&queue),
        queue,
        done,
        ready: stats.messages,
        consumers: stats.consumers,
        paused,
        request_id: uuid::Uuid::new_v4().to_string(),
    })
}

/// The queue forms' fields.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct QueueForm {
    request_id: String,
    reason: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    shown: u64,
}

/// `POST /queues/<queue>/<pause|resume|purge>` (the queue page's forms).
pub(crate) async fn queue_action(
    State(state): State<AppState>,
    Path((queue, verb)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<QueueForm>,
) -> Response {
    let Some(asked) = form_asked(&headers, &form.reason, &form.note, &form.request_id) else {
        return (StatusCode::BAD_REQUEST, "A reason is required").into_response();
    };
    let result = match verb.as_str() {
        "pause" => crate::queue_actions::pause(&state, &queue, &asked).await,
        "resume" => crate::queue_actions::resume(&state, &queue, &asked).await,
        "purge" => crate::queue_actions::purge(&state, &queue, form.shown, &asked).await,
        _ => return (StatusCode::NOT_FOUND, "no such action").into_response(),
    };
    match result {
        Ok(d) => {
            let said = match (verb.as_str(), d.purged) {
                (_, Some(n)) => format!("{n} message(s) purged."),
                ("pause", _) => format!("Paused on {}.", d.workers.join(", ")),
                _ => format!("Resumed on {}.", d.workers.join(", ")),
            };
            let said = if d.refused.is_empty() {
                said
            } else {
                format!("{said} Not confirmed by {}.", d.refused.join(", "))
            };
            axum::response::Redirect::to(&format!(
                "/queues/{}?done={}",
                url_encode(&queue),
                url_encode(&said)
            ))
            .into_response()
        }
        Err(e) => job_error(e, "Nothing was done"),
    }
}

/// `GET /live`: Server-Sent Events, one `batch` event (`{"events", "tasks", "workers"}`) per
/// committed batch, a keep-alive comment every 15 s. The pages reload on it (at most every 2 s)
/// and fall back to polling when the stream is unavailable.
pub(crate) async fn live(
    State(state): State<AppState>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let rx = state.updates().subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(update) => {
                    let event = Event::default()
                        .event("batch")
                        .json_data(update)
                        .unwrap_or_else(|_| Event::default().event("batch"));
                    return Some((Ok(event), rx));
                }
                // A slow reader missed some: the next one still says "changed".
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
}

/// A row of the dead-letter queues page.
struct DeadLetterQueueRow {
    name: String,
    link: String,
    messages: u64,
    consumers: u64,
}

#[derive(Template)]
#[template(path = "dead_letters.html")]
struct DeadLettersPage {
    nav: &'static str,
    refresh: u32,
    error: Option<String>,
    all_queues: bool,
    queues: Vec<DeadLetterQueueRow>,
}

/// `GET /dead-letters`: every dead-letter queue and how many messages it holds.
pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let (queues, error) = match crate::dead_letters::list(&state).await {
        Ok(q) => (q, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    render(&DeadLettersPage {
        nav: "dead-letters",
        refresh: refresh(&params),
        error,
        all_queues: state.lists_all_queues(),
        queues: queues
            .into_iter()
            .map(|(name, s)| DeadLetterQueueRow {
                link: url_encode(&name),
                name,
                messages: s.messages,
                consumers: s.consumers,
            })
            .collect(),
    })
}

/// A dead-lettered message on its queue's page.
struct LetterRow {
    task: String,
    task_id: String,
    reason: String,
    original_queue: String,
    at: String,
    args: String,
    request_id: String,
}

#[derive(Template)]
#[template(path = "dead_letter_queue.html")]
struct DeadLetterQueuePage {
    nav: &'static str,
    refresh: u32,
    queue: String,
    link: String,
    error: Option<String>,
    done: String,
    total: u64,
    letters: Vec<LetterRow>,
    request_id: String,
}

/// `GET /dead-letters/<queue>?limit=`: its first messages (100 by default), left in place.
pub(crate) async fn dead_letter_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let limit = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100usize);
    let total = match state.queue_probe().stats(&queue).await {
        Ok(Some(s)) => s.messages,
        Ok(None) => {
            return (StatusCode::NOT_FOUND, format!("no queue `{queue}`")).into_response();
        }
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let (letters, error) = match crate::dead_letters::peek(&state, &queue, limit).await {
        Ok(l) => (l, None),
        Err(crate::Error::BadRequest(m)) => return (StatusCode::BAD_REQUEST, m).into_response(),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let done = match (params.get("replayed"), params.get("kept")) {
        (Some(n), kept) => {
            let kept = kept.map(String::as_str).unwrap_or("");
            if kept.is_empty() {
                format!("{n} message(s) sent back to their queues.")
            } else {
                format!(
                    "{n} message(s) sent back to their queues; left here because they have succeeded since: {kept}."
                )
            }
        }
        _ => String::new(),
    };
    render(&DeadLetterQueuePage {
        nav: "dead-letters",
        refresh: 0,
        link: url_encode(&queue),
        queue,
        error,
        done,
        total,
        letters: letters
            .into_iter()
            .map(|l| LetterRow {
                task: l.task.unwrap_or_default(),
                task_id: l.task_id.unwrap_or_default(),
                reason: l.reason.unwrap_or_default(),
                original_queue: l.original_queue.unwrap_or_default(),
                at: l.dead_lettered_at.unwrap_or_default(),
                args: match (l.args, l.kwargs) {
                    (Some(a), Some(k)) if k != "{}" => format!("{a} {k}"),
                    (Some(a), _) => a,
                    (None, Some(k)) => k,
                    (None, None) => String::new(),
                },
                request_id: uuid::Uuid::new_v4().to_string(),
            })
            .collect(),
        request_id: uuid::Uuid::new_v4().to_string(),
    })
}

/// The replay forms' fields: one task's message, or the oldest N.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ReplayForm {
    request_id: String,
    reason: String,
    #[serde(default)]
    note: String,
    task_id: Option<String>,
    oldest: Option<usize>,
}

/// `POST /dead-letters/<queue>/replay` (the page's forms): a reason is required. One task's
/// message: back to the page, saying what was done; the oldest N: a replay job, to its page.
pub(crate) async fn replay_dead_letters(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<ReplayForm>,
) -> Response {
    let Some(asked) = form_asked(&headers, &form.reason, &form.note, &form.request_id) else {
        return (
            StatusCode::BAD_REQUEST,
            "A reason is required to replay dead letters",
        )
            .into_response();
    };
    let which = match (form.task_id.filter(|t| !t.is_empty()), form.oldest) {
        (Some(id), _) => crate::dead_letters::Which::Task(id),
        // The oldest N: a tracked job, its page shows the progress.
        (None, Some(n)) => {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            return match crate::jobs::start_replay(&state, &queue, n, &asked).await {
                Ok(id) => axum::response::Redirect::to(&format!("/jobs/{id}")).into_response(),
                Err(e) => {
                    let status = match e {
                        crate::Error::NotFound(_) => StatusCode::NOT_FOUND,
                        crate::Error::BadRequest(_) => StatusCode::BAD_REQUEST,
                        _ => StatusCode::SERVICE_UNAVAILABLE,
                    };
                    (status, format!("Nothing was replayed: {e}")).into_response()
                }
            };
        }
        (None, None) => {
            return (
                StatusCode::BAD_REQUEST,
                "say which messages: task_id or oldest",
            )
                .into_response();
        }
    };
    match crate::dead_letters::replay(&state, &queue, &which, &asked).await {
        Ok(r) => axum::response::Redirect::to(&format!(
            "/dead-letters/{}?replayed={}&kept={}",
            url_encode(&queue),
            r.replayed,
            url_encode(&r.succeeded_since.join(", "))
        ))
        .into_response(),
        Err(e) => {
            let status = match e {
                crate::Error::NotFound(_) => StatusCode::NOT_FOUND,
                crate::Error::BadRequest(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, format!("Nothing was replayed: {e}")).into_response()
        }
    }
}

/// An entry on the beat page.
struct BeatRow {
    name: String,
    link: String,
    source: &'static str,
    paused: bool,
    task: String,
    args: String,
    schedule: String,
    queue: String,
    last_run: String,
    last_task_id: String,
    next_run: String,
    missed: u64,
    overlap: u64,
    in_doubt: u64,
    /// (path verb, button label) of the changes that apply.
    actions: Vec<(&'static str, &'static str)>,
    request_id: String,
}

#[derive(Template)]
#[template(path = "beat.html")]
struct BeatPage {
    nav: &'static str,
    refresh: u32,
    error: Option<String>,
    done: String,
    leader: String,
    prefix: String,
    entries: Vec<BeatRow>,
    request_id: String,
}

fn utc(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// `GET /beat`: the leader and every schedule entry with its last and next run and skipped
/// ticks, and the forms that change them.
pub(crate) async fn beat(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let (overview, error) = match crate::beat::overview(&state).await {
        Ok(o) => (Some(o), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let leader = overview
        .as_ref()
        .and_then(|o| o.leader.as_ref())
        .map(|l| format!("{} (fencing token {})", l.node_id, l.token))
        .unwrap_or_default();
    let entries = overview
        .map(|o| o.entries)
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let spec = &e.spec;
            let schedule = match (&spec.cron, &spec.every) {
                (Some(c), _) => format!(
                    "cron {c}{}",
                    spec.timezone
                        .as_deref()
                        .map(|z| format!(" ({z})"))
                        .unwrap_or_default()
                ),
                (None, Some(every)) => format!("every {every}"),
                (None, None) => String::new(),
            };
            let mut actions = vec![if e.paused {
                ("resume", "Resume")
            } else {
                ("pause", "Pause")
            }];
            actions.push(("run", "Run now"));
            actions.push(("remove", "Remove"));
            BeatRow {
                link: url_encode(&spec.name),
                name: spec.name.clone(),
                source: match e.source {
                    scheduler::Source::File => "from the schedule file",
                    scheduler::Source::Api => "added at run time",
                },
                paused: e.paused,
                task: spec.task.clone(),
                args: if spec.args.is_empty() && spec.kwargs.is_empty() {
                    String::new()
                } else {
                    format!(
                        "{} {}",
                        serde_json::Value::from(spec.args.clone()),
                        serde_json::Value::Object(spec.kwargs.clone())
                    )
                },
                schedule,
                queue: spec.queue.clone().unwrap_or_else(|| "celery".into()),
                last_run: utc(e.last_run),
                last_task_id: e.last_task_id.clone().unwrap_or_default(),
                next_run: if e.paused {
                    "paused".into()
                } else {
                    utc(e.next_run)
                },
                missed: e.skipped.missed,
                overlap: e.skipped.overlap,
                in_doubt: e.skipped.in_doubt,
                actions,
                request_id: uuid::Uuid::new_v4().to_string(),
            }
        })
        .collect();
    let done = match (params.get("done"), params.get("entry")) {
        (Some(what), Some(entry)) => match params.get("task_id") {
            Some(id) if !id.is_empty() => format!("{entry}: {what}; sent as task {id}."),
            _ => format!("{entry}: {what}."),
        },
        _ => String::new(),
    };
    render(&BeatPage {
        nav: "beat",
        refresh: 0,
        error,
        done,
        leader,
        prefix: state.beat().keys().prefix().to_owned(),
        entries,
        request_id: uuid::Uuid::new_v4().to_string(),
    })
}

/// A beat form's fields besides the entry.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct BeatForm {
    request_id: String,
    reason: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    task: String,
    #[serde(default)]
    cron: String,
    #[serde(default)]
    every: String,
    #[serde(default)]
    timezone: String,
    #[serde(default)]
    args: String,
    #[serde(default)]
    queue: String,
}

fn beat_answer(result: crate::Result<crate::beat::Changed>, what: &str) -> Response {
    match result {
        Ok(c) => axum::response::Redirect::to(&format!(
            "/beat?done={}&entry={}&task_id={}",
            url_encode(what),
            url_encode(&c.entry),
            url_encode(c.task_id.as_deref().unwrap_or(""))
        ))
        .into_response(),
        Err(e) => {
            let status = match e {
                crate::Error::NotFound(_) => StatusCode::NOT_FOUND,
                crate::Error::BadRequest(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, format!("The schedule was not changed: {e}")).into_response()
        }
    }
}

/// `POST /beat/<entry>/<pause|resume|run|remove>` (the beat page's forms).
pub(crate) async fn beat_change(
    State(state): State<AppState>,
    Path((name, verb)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<BeatForm>,
) -> Response {
    let (change, what) = match verb.as_str() {
        "pause" => (crate::beat::Change::Pause, "paused"),
        "resume" => (crate::beat::Change::Resume, "resumed"),
        "run" => (crate::beat::Change::RunNow, "run now"),
        "remove" => (crate::beat::Change::Remove, "removed"),
        _ => return (StatusCode::NOT_FOUND, "no such change").into_response(),
    };
    let Some(asked) = form_asked(&headers, &form.reason, &form.note, &form.request_id) else {
        return (
            StatusCode::BAD_REQUEST,
            "A reason is required to change the schedule",
        )
            .into_response();
    };
    beat_answer(
        crate::beat::change(&state, &name, &change, &asked).await,
        what,
    )
}

/// `POST /beat` (the add form): a cron expression or an interval, optional JSON arguments.
pub(crate) async fn beat_add(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<BeatForm>,
) -> Response {
    let Some(asked) = form_asked(&headers, &form.reason, &form.note, &form.request_id) else {
        return (
            StatusCode::BAD_REQUEST,
            "A reason is required to change the schedule",
        )
            .into_response();
    };
    let text = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    let args = match text(&form.args) {
        None => Vec::new(),
        Some(a) => match serde_json::from_str::<Vec<serde_json::Value>>(&a) {
            Ok(v) => v,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("args must be a JSON list, e.g. [1, \"a\"]: {e}"),
                )
                    .into_response();
            }
        },
    };
    let spec = scheduler::EntrySpec {
        name: form.name.trim().to_owned(),
        task: form.task.trim().to_owned(),
        cron: text(&form.cron),
        timezone: text(&form.timezone),
        every: text(&form.every),
        args,
        queue: text(&form.queue),
        ..scheduler::EntrySpec::default()
    };
    let name = spec.name.clone();
    beat_answer(
        crate::beat::change(
            &state,
            &name,
            &crate::beat::Change::Add(Box::new(spec)),
            &asked,
        )
        .await,
        "saved",
    )
}

/// A task-list filter as a query string.
fn filter_query(f: &crate::jobs::Filter) -> String {
    format!(
        "search={}&state={}&taskname={}&workername={}",
        url_encode(&f.search),
        url_encode(&f.state),
        url_encode(&f.taskname),
        url_encode(&f.workername)
    )
}

fn bulk_filter(p: &HashMap<String, String>) -> crate::jobs::Filter {
    let get = |k: &str| p.get(k).cloned().unwrap_or_default();
    crate::jobs::Filter {
        search: get("search"),
        state: get("state"),
        taskname: get("taskname"),
        workername: get("workername"),
        dlq: String::new(),
    }
}

#[derive(Template)]
#[template(path = "job_new.html")]
struct JobNewPage {
    nav: &'static str,
    refresh: u32,
    action: &'static str,
    states: String,
    described: String,
    filter: crate::jobs::Filter,
    filter_query: String,
    error: Option<String>,
    count: i64,
    sample: Vec<TaskRow>,
    request_id: String,
}

/// `GET /jobs/new?action=retry|revoke&search=&state=&taskname=&workername=`: how many tasks a
/// bulk action over the task list's filter would take, a sample, and the form that starts it.
pub(crate) async fn job_new(
    State(state): State<AppState>,
    Query(p): Query<HashMap<String, String>>,
) -> Response {
    let Some(kind) = p.get("action").and_then(|a| crate::jobs::Kind::parse(a)) else {
        return (StatusCode::BAD_REQUEST, "action must be retry or revoke").into_response();
    };
    let filter = bulk_filter(&p);
    let described = [
        ("", &filter.search),
        ("state=", &filter.state),
        ("task=", &filter.taskname),
        ("worker=", &filter.workername),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k}{v}"))
    .collect::<Vec<_>>()
    .join(" ");
    let (count, sample, error) = match crate::jobs::preview(&state, kind, &filter).await {
        Ok(n) => {
            let sample = crate::jobs::sample(&state, kind, &filter, 10)
                .await
                .unwrap_or_default();
            (n, sample, None)
        }
        Err(e) => (0, Vec::new(), Some(e.to_string())),
    };
    render(&JobNewPage {
        nav: "tasks",
        refresh: 0,
        action: kind.name(),
        states: kind.states().join(", "),
        described: if described.is_empty() {
            "(everything)".into()
        } else {
            described
        },
        filter_query: filter_query(&filter),
        filter,
        error,
        count,
        sample: sample
            .into_iter()
            .map(|t| TaskRow {
                received: time(t.received),
                runtime: seconds(t.runtime),
                name: text(&t.name),
                args: text(&t.args),
                kwargs: text(&t.kwargs),
                result: String::new(),
                worker: text(&t.worker),
                lost: false,
                state: t.state,
                uuid: t.uuid,
            })
            .collect(),
        request_id: uuid::Uuid::new_v4().to_string(),
    })
}

/// The start form's fields.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct JobForm {
    request_id: String,
    reason: String,
    #[serde(default)]
    note: String,
    action: String,
    expected: i64,
    #[serde(flatten)]
    filter: crate::jobs::Filter,
}

fn job_error(e: crate::Error, what: &str) -> Response {
    let status = match e {
        crate::Error::NotFound(_) => StatusCode::NOT_FOUND,
        crate::Error::BadRequest(_) => StatusCode::BAD_REQUEST,
        crate::Error::Conflict(_) => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, format!("{what}: {e}")).into_response()
}

/// `POST /jobs` (the preview's form): starts the job, then its page.
pub(crate) async fn job_start(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<JobForm>,
) -> Response {
    let Some(kind) = crate::jobs::Kind::parse(&form.action) else {
        return (StatusCode::BAD_REQUEST, "action must be retry or revoke").into_response();
    };
    let Some(asked) = form_asked(&headers, &form.reason, &form.note, &form.request_id) else {
        return (
            StatusCode::BAD_REQUEST,
            "A reason is required for a bulk action",
        )
            .into_response();
    };
    match crate::jobs::start(&state, kind, &form.filter, form.expected, &asked).await {
        Ok(id) => axum::response::Redirect::to(&format!("/jobs/{id}")).into_response(),
        Err(e) => job_error(e, "The job was not started"),
    }
}

struct JobRow {
    id: i64,
    kind: String,
    filter: String,
    actor: String,
    reason: String,
    state: String,
    abort_requested: bool,
    total: i32,
    done: i64,
    skipped: i64,
    failed: i64,
    pending: i64,
    processed: i64,
    created: String,
    finished: String,
}

impl From<crate::jobs::Job> for JobRow {
    fn from(j: crate::jobs::Job) -> Self {
        let f: crate::jobs::Filter = serde_json::from_value(j.filter.clone()).unwrap_or_default();
        JobRow {
            id: j.id,
            kind: j.kind,
            filter: [&f.search, &f.state, &f.taskname, &f.workername]
                .iter()
                .filter(|v| !v.is_empty())
                .map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            actor: j.actor,
            reason: j.reason,
            state: j.state,
            abort_requested: j.abort_requested,
            total: j.total,
            done: j.done,
            skipped: j.skipped,
            failed: j.failed,
            pending: j.pending,
            processed: j.done + j.skipped + j.failed,
            created: j.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            finished: j
                .finished_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
        }
    }
}

#[derive(Template)]
#[template(path = "jobs.html")]
struct JobsPage {
    nav: &'static str,
    refresh: u32,
    error: Option<String>,
    jobs: Vec<JobRow>,
}

/// `GET /jobs`: the latest 100 bulk jobs.
pub(crate) async fn jobs(State(state): State<AppState>) -> Response {
    let (jobs, error) = match crate::jobs::list(&state, 100).await {
        Ok(j) => (j.into_iter().map(JobRow::from).collect(), None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    render(&JobsPage {
        nav: "tasks",
        refresh: 0,
        error,
        jobs,
    })
}

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    nav: &'static str,
    refresh: u32,
    j: JobRow,
    problems: Vec<crate::jobs::Item>,
    request_id: String,
}

/// `GET /jobs/<id>`: progress (reloading every 2 s while it runs), the skipped and failed
/// items, and the abort form.
pub(crate) async fn job(State(state): State<AppState>, Path(id): Path<i64>) -> Response {
    let job = match crate::jobs::get(&state, id).await {
        Ok(Some(j)) => j,
        Ok(None) => return (StatusCode::NOT_FOUND, format!("no job {id}")).into_response(),
        Err(e) => return job_error(e, "The job cannot be read"),
    };
    let problems = crate::jobs::problems(&state, id, 200)
        .await
        .unwrap_or_default();
    let running = job.state == "running";
    render(&JobPage {
        nav: "tasks",
        refresh: if running { 2 } else { 0 },
        j: job.into(),
        problems,
        request_id: uuid::Uuid::new_v4().to_string(),
    })
}

/// `POST /jobs/<id>/abort`: stops the job after the task it is on.
pub(crate) async fn job_abort(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<RetryForm>,
) -> Response {
    let Some(asked) = form_asked(&headers, &form.reason, &form.note, &form.request_id) else {
        return (
            StatusCode::BAD_REQUEST,
            "A reason is required to abort a job",
        )
            .into_response();
    };
    match crate::jobs::abort(&state, id, &asked).await {
        Ok(()) => axum::response::Redirect::to(&format!("/jobs/{id}")).into_response(),
        Err(e) => job_error(e, "The job was not aborted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_a_bar_pair_per_minute() {
        let svg = chart(&[(60.0, 3, 1), (120.0, 0, 2)], 60.0, 3);
        assert_eq!(svg.matches("<rect").count(), 6);
        assert!(svg.contains("<title>3 succeeded</title>"));
        assert!(svg.contains("<title>2 failed</title>"));
    }

    #[test]
    fn timelines_are_in_time_order_with_the_step_durations() {
        let mut t = TaskRecord::new("t");
        t.received = Some(10.0);
        t.started = Some(10.5);
        t.succeeded = Some(12.0);
        let stages = timeline(&t);
        let names: Vec<_> = stages.iter().map(|s| s.stage).collect();
        assert_eq!(names, ["received", "started", "succeeded"]);
        assert_eq!(stages[1].delta, "500.0 ms");
        assert_eq!(stages[2].delta, "1.500 s");
    }
}

/// The retry form's fields.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct RetryForm {
    request_id: String,
    reason: String,
    #[serde(default)]
    note: String,
}

/// Who asks and why, from an action form: its reason (required: `None` without one) and
/// optional note, and its request id.
fn form_asked(
    headers: &axum::http::HeaderMap,
    reason: &str,
    note: &str,
    request_id: &str,
) -> Option<crate::actions::Asked> {
    let reason = match (reason.trim(), note.trim()) {
        ("", _) => return None,
        (r, "") => r.to_owned(),
        (r, note) => format!("{r}: {note}"),
    };
    Some(crate::actions::Asked {
        actor: crate::audit::actor(headers),
        reason: crate::audit::reason(Some(&reason)),
        request_id: Some(request_id.chars().take(100).collect()),
    })
}

/// `POST /task/<id>/retry` (the task page's form): a reason is required; on success the new
/// task's page, which links back.
pub(crate) async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    axum::Form(form): axum::Form<RetryForm>,
) -> Response {
    let asked = match form_asked(&headers, &form.reason, &form.note, &form.request_id) {
        Some(a) => a,
        None => {
            return (
                StatusCode::BAD_REQUEST,
                "A reason is required to retry a task",
            )
                .into_response();
        }
    };
    match crate::actions::retry(&state, &id, &asked).await {
        Ok(r) => axum::response::Redirect::to(&format!(
            "/task/{}?retry_of={}",
            url_encode(&r.task_id),
            url_encode(&id)
        ))
        .into_response(),
        Err(e) => {
            let status = match e {
                crate::Error::NotFound(_) => StatusCode::NOT_FOUND,
                crate::Error::Conflict(_) => StatusCode::CONFLICT,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, format!("The task was not retried: {e}")).into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    nav: &'static str,
    refresh: u32,
    entries: Vec<AuditRow>,
    next: Option<i64>,
}

#[derive(Debug)]
struct AuditRow {
    id: i64,
    at: String,
    actor: String,
    action: String,
    target: String,
    task_link: bool,
    count: i32,
    reason: String,
    detail: String,
}

const AUDIT_PAGE: i64 = 100;

fn audit_before(params: &HashMap<String, String>) -> Option<i64> {
    params.get("before").and_then(|b| b.parse().ok())
}

/// `GET /audit?before=<id>`: the audit log, newest first, 100 a page.
pub(crate) async fn audit(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let entries = match state.store().audit(audit_before(&params), AUDIT_PAGE).await {
        Ok(e) => e,
        Err(e) => return unavailable(e),
    };
    let next = (entries.len() as i64 == AUDIT_PAGE)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    render(&AuditPage {
        nav: "audit",
        refresh: 0,
        next,
        entries: entries
            .into_iter()
            .map(|e| AuditRow {
                id: e.id,
                at: e.at.format("%Y-%m-%d %H:%M:%S").to_string(),
                task_link: e.action.starts_with("task."),
                actor: e.actor,
                action: e.action,
                target: e.target,
                count: e.count,
                reason: e.reason.unwrap_or_default(),
                detail: e.detail.to_string(),
            })
            .collect(),
    })
}

/// `GET /audit.csv`: the whole audit log, newest first (UTC times).
pub(crate) async fn audit_csv(State(state): State<AppState>) -> Response {
    let out = match staff_auth::audit::csv(state.store().pool(), None).await {
        Ok(out) => out,
        Err(e) => return unavailable(crate::error::Error::from(e)),
    };
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                axum::http::header::CONTENT_DISPOSITION,
                "attachment; filename=\"audit.csv\"",
            ),
        ],
        out,
    )
        .into_response()
}
