//! Sending a signature the way Python's `apply_async` does: a plain task becomes one message; a
//! chain sends its first task with the rest, reversed, in `embed.chain`; a group sends every
//! member with the group id and its index; a chord writes the header size to the backend and
//! sends every header task with the body in `embed.chord`.
//!
//! Each send returns Celery's result tuple (`[[id, parent], children]`), which the worker keeps
//! as `children` in the sender's result meta and the client turns into results.

use std::future::Future;
use std::pin::Pin;

use chrono::Utc;
use serde_json::{Map, Value, json};

use super::signature::{Signature, signatures_in};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::protocol::{ContentType, TaskMessage, parse_datetime};

type Sent<'a> = Pin<Box<dyn Future<Output = Result<Value>> + Send + 'a>>;

/// Options a frozen signature keeps against what the caller passes (Celery's
/// `_IMMUTABLE_OPTIONS`): moving a task to another group would stall that group's chord.
const KEPT_OPTIONS: &[&str] = &["group_id", "stamped_headers"];

/// Options the message carries and this crate reads (the rest are logged once per send).
const KNOWN_OPTIONS: &[&str] = &[
    "task_id",
    "group_id",
    "group_index",
    "chord",
    "chain",
    "link",
    "link_error",
    "parent_id",
    "root_id",
    "queue",
    "routing_key",
    "priority",
    "countdown",
    "eta",
    "expires",
    "time_limit",
    "soft_time_limit",
    "ignore_result",
    "shadow",
    "retries",
    "serializer",
    "reply_to",
    "stamped_headers",
    "stamps",
    "replaced_task_nesting",
];

/// Options that only matter to a Python producer (publish retries, connection choice).
const PRODUCER_OPTIONS: &[&str] = &[
    "exchange",
    "exchange_type",
    "retry",
    "retry_policy",
    "add_to_parent",
    "producer",
    "connection",
    "publisher",
    "compression",
    "headers",
    "delivery_mode",
    "mandatory",
    "immediate",
];

/// Sends `sig` with `partial` put in front of its arguments (unless immutable) and `extra`
/// merged into its options, as Python's `sig.apply_async(partial, **extra)`.
pub(crate) fn apply<'a>(
    client: &'a Client,
    sig: &'a Signature,
    partial: Vec<Value>,
    extra: Map<String, Value>,
) -> Sent<'a> {
    Box::pin(async move {
        match sig.subtask_type.as_deref() {
            None => send_one(client, sig, partial, extra).await,
            Some("chain") => apply_chain(client, sig, partial, extra).await,
            Some("group") => apply_group(client, sig, partial, extra).await.map(|g| g.0),
            Some("chord") => apply_chord(client, sig, partial, extra).await,
            Some(other) => Err(Error::Config(format!(
                "signature `{}` of type `{other}` is not supported here (only tasks, chain, \
                 group and chord); route it to a Python worker",
                sig.task
            ))),
        }
    })
}

/// `(args, options)` after Celery's `_merge`.
fn merge(
    sig: &Signature,
    partial: Vec<Value>,
    extra: Map<String, Value>,
) -> (Vec<Value>, Map<String, Value>) {
    let mut options = sig.options.clone();
    for (k, v) in extra {
        if v.is_null() || (KEPT_OPTIONS.contains(&k.as_str()) && options.contains_key(&k)) {
            continue;
        }
        options.insert(k, v);
    }
    let args = if sig.immutable || partial.is_empty() {
        sig.args.clone()
    } else {
        partial
            .into_iter()
            .chain(sig.args.iter().cloned())
            .collect()
    };
    (args, options)
}

fn tuple(id: &str, parent: Value, children: Value) -> Value {
    json!([[id, parent], children])
}

async fn send_one(
    client: &Client,
    sig: &Signature,
    partial: Vec<Value>,
    extra: Map<String, Value>,
) -> Result<Value> {
    let (args, options) = merge(sig, partial, extra);
    let (queue, message) = message(client, &sig.task, args, sig.kwargs.clone(), &options)?;
    client.publish(&queue, &message).await?;
    Ok(tuple(&message.headers.id, Value::Null, Value::Null))
}

/// The message `app.send_task(name, args, kwargs, **options)` publishes, and its queue.
pub(crate) fn message(
    client: &Client,
    name: &str,
    args: Vec<Value>,
    kwargs: Map<String, Value>,
    options: &Map<String, Value>,
) -> Result<(String, TaskMessage)> {
    let str_opt = |k: &str| options.get(k).and_then(Value::as_str).map(str::to_owned);
    let num_opt = |k: &str| options.get(k).and_then(Value::as_f64);
    let unknown: Vec<&str> = options
        .keys()
        .map(String::as_str)
        .filter(|k| !KNOWN_OPTIONS.contains(k) && !PRODUCER_OPTIONS.contains(k))
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(task = name, options = ?unknown, "signature options not supported; sending without them");
    }
    if let Some(exchange) = str_opt("exchange").filter(|e| !e.is_empty()) {
        tracing::warn!(task = name, %exchange, "signature names an exchange; publishing to its queue through the default exchange instead");
    }
    let id = str_opt("task_id").unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut m = TaskMessage::new(name, id);
    let h = &mut m.headers;
    h.argsrepr = Some(crate::events::repr::args_repr(&args));
    h.kwargsrepr = Some(crate::events::repr::kwargs_repr(&kwargs));
    h.origin = Some(client.origin().to_owned());
    h.group = str_opt("group_id");
    h.group_index = options.get("group_index").and_then(Value::as_i64);
    h.parent_id = str_opt("parent_id");
    if let Some(root) = str_opt("root_id") {
        h.root_id = Some(root);
    }
    h.shadow = str_opt("shadow");
    h.retries = options
        .get("retries")
        .and_then(Value::as_u64)
        .map_or(0, |r| u32::try_from(r).unwrap_or(u32::MAX));
    h.eta = match (num_opt("countdown"), str_opt("eta")) {
        (Some(secs), _) if secs > 0.0 => {
            Some(Utc::now() + chrono::Duration::milliseconds((secs * 1000.0) as i64))
        }
        (_, Some(eta)) => parse_datetime(&eta),
        _ => None,
    };
    h.expires = match options.get("expires") {
        Some(Value::Number(n)) => n
            .as_f64()
            .map(|s| Utc::now() + chrono::Duration::milliseconds((s * 1000.0) as i64)),
        Some(Value::String(s)) => parse_datetime(s),
        _ => None,
    };
    h.time_limit = num_opt("time_limit");
    h.soft_time_limit = num_opt("soft_time_limit");
    h.ignore_result = options
        .get("ignore_result")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    h.replaced_task_nesting = options
        .get("replaced_task_nesting")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    for key in ["stamped_headers", "stamps"] {
        if let Some(v) = options.get(key) {
            h.extra.insert(key.into(), v.clone());
        }
    }
    let list = |key: &str| {
        let sigs: Vec<Value> = signatures_in(options.get(key))
            .into_iter()
            .filter_map(|s| match s {
                Ok(s) => Some(s.to_value()),
                Err(e) => {
                    tracing::warn!(task = name, option = key, error = %e, "dropping an option that is not a signature");
                    None
                }
            })
            .collect();
        if sigs.is_empty() {
            Value::Null
        } else {
            Value::Array(sigs)
        }
    };
    let mut embed = Map::new();
    embed.insert("callbacks".into(), list("link"));
    embed.insert("errbacks".into(), list("link_error"));
    embed.insert(
        "chain".into(),
        options.get("chain").cloned().unwrap_or(Value::Null),
    );
    embed.insert(
        "chord".into(),
        options.get("chord").cloned().unwrap_or(Value::Null),
    );
    m.embed = Value::Object(embed);
    m.args = args;
    m.kwargs = kwargs;
    m.priority = options
        .get("priority")
        .and_then(Value::as_u64)
        .map(|p| p.min(255) as u8);
    m.reply_to = str_opt("reply_to");
    m.content_type = match str_opt("serializer").as_deref() {
        Some("msgpack") => ContentType::Msgpack,
        Some("json") | None => client.serializer(),
        Some(other) => {
            tracing::warn!(
                task = name,
                serializer = other,
                "serializer not supported; sending JSON"
            );
            ContentType::Json
        }
    };
    let queue = match options.get("queue") {
        Some(Value::String(q)) => q.clone(),
        // kombu serializes a `Queue` object as its fields.
        Some(Value::Object(q)) if q.get("name").is_some_and(Value::is_string) => {
            q["name"].as_str().unwrap_or_default().to_owned()
        }
        _ => str_opt("routing_key").unwrap_or_else(|| client.default_queue().to_owned()),
    };
    Ok((queue, m))
}

/// Freezes `sig` as Celery's `Signature.freeze`: a task id unless set, and the given ids.
fn freeze(
    sig: &mut Signature,
    group_id: Option<&str>,
    group_index: Option<usize>,
    root_id: Option<&str>,
) -> String {
    let id = sig.freeze();
    if let Some(root) = root_id {
        sig.options.insert("root_id".into(), root.into());
    }
    if let Some(gid) = group_id {
        sig.options.entry("group_id").or_insert_with(|| gid.into());
    }
    if let Some(i) = group_index {
        sig.options.insert("group_index".into(), i.into());
    }
    id
}

/// The chain's tasks in order, nested chains flattened and `group, task` turned into a chord
/// (as Celery's `prepare_steps`).
fn chain_steps(sig: &Signature) -> Result<Vec<Signature>> {
    let mut flat = Vec::new();
    let mut stack: Vec<Signature> = sig.members().map_err(Error::Config)?;
    stack.reverse();
    while let Some(s) = stack.pop() {
        if s.subtask_type.as_deref() == Some("chain") {
            let mut inner = s.members().map_err(Error::Config)?;
            inner.reverse();
            stack.extend(inner);
        } else {
            flat.push(s);
        }
    }
    let mut steps: Vec<Signature> = Vec::new();
    let mut iter = flat.into_iter().peekable();
    while let Some(s) = iter.next() {
        if s.subtask_type.as_deref() == Some("group")
            && let Some(body) = iter.next_if(|_| true)
        {
            let header = s.members().map_err(Error::Config)?;
            let mut c = super::signature::chord(header, body);
            c.options = s.options.clone();
            steps.push(c);
        } else {
            steps.push(s);
        }
    }
    Ok(steps)
}

async fn apply_chain(
    client: &Client,
    sig: &Signature,
    partial: Vec<Value>,
    extra: Map<String, Value>,
) -> Result<Value> {
    let (args, mut options) = merge(sig, partial, extra);
    let mut steps = chain_steps(sig)?;
    if steps.is_empty() {
        return Err(Error::Config("an empty chain has nothing to send".into()));
    }
    let root_id = options
        .get("root_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    // What the chain itself is part of (a chord header, a group) belongs to its last task.
    let last = steps.len() - 1;
    for key in ["group_id", "group_index", "chord", "task_id"] {
        if let Some(v) = options.remove(key) {
            steps[last].options.insert(key.into(), v);
        }
    }
    if let Some(link) = options.remove("link") {
        for cb in signatures_in(Some(&link)).into_iter().flatten() {
            steps[last] = steps[last].clone().link(cb);
        }
    }
    if let Some(link_error) = options.remove("link_error") {
        for eb in signatures_in(Some(&link_error)).into_iter().flatten() {
            for step in &mut steps {
                *step = step.clone().link_error(eb.clone());
            }
        }
    }
    let mut ids = Vec::with_capacity(steps.len());
    for step in &mut steps {
        ids.push(freeze_step(step, root_id.as_deref()));
    }
    let mut parent = Value::Null;
    for id in &ids {
        parent = tuple(id, parent, Value::Null);
    }
    let first = steps.remove(0);
    steps.reverse();
    options.insert(
        "chain".into(),
        Value::Array(steps.iter().map(Signature::to_value).collect()),
    );
    // The chain's arguments (a parent's result) go to its first task, merged as that task's kind
    // merges them (not at all when it is immutable).
    apply(client, &first, args, options).await?;
    Ok(parent)
}

/// Assigns a chain step its id: a chord step's id is its body's.
fn freeze_step(step: &mut Signature, root_id: Option<&str>) -> String {
    if step.subtask_type.as_deref() == Some("chord")
        && let Some(body) = step.kwargs.get_mut("body")
        && let Ok(mut b) = Signature::from_value(body)
    {
        let id = freeze(&mut b, None, None, root_id);
        *body = b.to_value();
        return id;
    }
    freeze(step, None, None, root_id)
}

/// A sent group: its result tuple and its member tuples.
pub(crate) struct SentGroup(pub(crate) Value);

async fn apply_group(
    client: &Client,
    sig: &Signature,
    partial: Vec<Value>,
    extra: Map<String, Value>,
) -> Result<SentGroup> {
    let (_, mut options) = merge(sig, Vec::new(), extra);
    let group_id = match options.remove("task_id") {
        Some(Value::String(id)) => id,
        _ => uuid::Uuid::new_v4().to_string(),
    };
    options.insert("group_id".into(), group_id.clone().into());
    let root_id = options
        .get("root_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let members = flatten_group(sig)?;
    let chord = options.remove("chord");
    let mut children = Vec::with_capacity(members.len());
    let size = members.iter().map(chord_size).sum::<u64>();
    let count = members.len();
    for (index, mut member) in members.into_iter().enumerate() {
        freeze(
            &mut member,
            Some(&group_id),
            Some(index),
            root_id.as_deref(),
        );
        let mut opts = options.clone();
        let chord = chord
            .clone()
            .or_else(|| member.options.get("chord").cloned());
        if let Some(body) = chord {
            if index + 1 == count {
                client.backend().set_chord_size(&group_id, size).await?;
            }
            opts.insert("chord".into(), body);
        }
        opts.insert("group_index".into(), index.into());
        children.push(apply(client, &member, partial.clone(), opts).await?);
    }
    Ok(SentGroup(tuple(
        &group_id,
        Value::Null,
        Value::Array(children),
    )))
}

fn flatten_group(sig: &Signature) -> Result<Vec<Signature>> {
    let mut out = Vec::new();
    for m in sig.members().map_err(Error::Config)? {
        if m.subtask_type.as_deref() == Some("group") {
            out.extend(flatten_group(&m)?);
        } else {
            out.push(m);
        }
    }
    Ok(out)
}

/// How many results a member adds to a chord (Celery's `_chord._descend`).
fn chord_size(sig: &Signature) -> u64 {
    match sig.subtask_type.as_deref() {
        Some("group") => sig
            .members()
            .map(|m| m.iter().map(chord_size).sum())
            .unwrap_or(0),
        Some("chain") => sig
            .members()
            .ok()
            .and_then(|m| m.iter().rev().map(chord_size).find(|n| *n > 0))
            .unwrap_or(0),
        Some("chord") => sig
            .kwargs
            .get("body")
            .and_then(|b| Signature::from_value(b).ok())
            .map_or(0, |b| chord_size(&b)),
        _ => 1,
    }
}

/// The header and body of a chord signature (the header as a list or a group dict).
fn chord_parts(sig: &Signature) -> Result<(Vec<Signature>, Signature)> {
    let header = match sig.kwargs.get("header") {
        Some(Value::Array(tasks)) => tasks
            .iter()
            .map(Signature::from_value)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::Config)?,
        Some(g @ Value::Object(_)) => {
            flatten_group(&Signature::from_value(g).map_err(Error::Config)?)?
        }
        other => {
            return Err(Error::Config(format!(
                "chord has no header (kwargs.header is {other:?})"
            )));
        }
    };
    let body = sig
        .kwargs
        .get("body")
        .ok_or_else(|| Error::Config("chord has no body".into()))
        .and_then(|b| Signature::from_value(b).map_err(Error::Config))?;
    Ok((header, body))
}

async fn apply_chord(
    client: &Client,
    sig: &Signature,
    partial: Vec<Value>,
    extra: Map<String, Value>,
) -> Result<Value> {
    let (header, mut body) = chord_parts(sig)?;
    let (args, mut options) = merge(sig, partial, extra);
    let group_id = uuid::Uuid::new_v4().to_string();
    let root_id = body
        .options
        .get("root_id")
        .or(options.get("root_id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    if let Some(Value::String(id)) = options.remove("task_id") {
        body.options.entry("task_id").or_insert(id.into());
    }
    // What the chord was given (a chain's rest, callbacks) goes on its body; the header task
    // that completes the chord is the body's parent, so `parent_id` does not.
    for (k, v) in std::mem::take(&mut options) {
        match k.as_str() {
            "parent_id" => {
                options.insert(k, v);
            }
            "link" => {
                for cb in signatures_in(Some(&v)).into_iter().flatten() {
                    body = body.clone().link(cb);
                }
            }
            "link_error" => {
                for eb in signatures_in(Some(&v)).into_iter().flatten() {
                    body = body.clone().link_error(eb);
                }
            }
            _ => {
                body.options.insert(k, v);
            }
        }
    }
    let body_id = freeze(&mut body, Some(&group_id), None, root_id.as_deref());
    if header.is_empty() {
        apply(client, &body, vec![Value::Array(Vec::new())], Map::new()).await?;
        return Ok(tuple(
            &body_id,
            tuple(&group_id, Value::Null, json!([])),
            Value::Null,
        ));
    }
    let mut group_options = options;
    group_options.insert("task_id".into(), group_id.clone().into());
    group_options.insert("chord".into(), body.to_value());
    let header_group = super::signature::group(header);
    let sent = apply_group(client, &header_group, args, group_options).await?;
    Ok(tuple(&body_id, sent.0, Value::Null))
}
