//! Celery's task message protocol (version 2), as Python's `celery` 5.x sends and reads it.
//!
//! A message travels as AMQP properties, a header table and a body. The header `task` names the task
//! and marks protocol v2; the body is `[args, kwargs, embed]` encoded as JSON or msgpack. Version 1
//! messages (everything in the body) are still accepted on the way in, as Celery's own worker does.
//!
//! Brokers move [`RawMessage`]s and never look inside them; [`TaskMessage::decode`] turns one into
//! typed headers and a body, and [`TaskMessage::encode`] goes the other way. Decoding is total: any
//! input either decodes or yields a [`ProtocolError`] that says why, which the worker records as the
//! dead-letter reason.

mod codec;
pub mod compat;
mod headers;

pub use codec::{Bytes, ContentType, decode_value, encode_value};
pub use headers::{TaskHeaders, format_datetime, parse_datetime, parse_datetime_in};

use serde_json::{Map, Value};

/// Why a message could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The content type is not one the worker accepts (JSON and msgpack).
    #[error("unsupported content type `{0}` (accepted: application/json, application/x-msgpack)")]
    UnsupportedContentType(String),
    /// The body announces a compression scheme this worker does not implement.
    #[error("unsupported body compression `{0}`")]
    UnsupportedCompression(String),
    /// The body does not parse in its declared content type.
    #[error("malformed {content_type} body: {reason}")]
    MalformedBody {
        /// The content type the body claimed.
        content_type: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// The body parsed but does not have the `[args, kwargs, embed]` shape.
    #[error("body is not a Celery task body: {0}")]
    BadBody(String),
    /// A required header is missing.
    #[error("missing header `{0}`")]
    MissingHeader(&'static str),
    /// A header has a value of the wrong type.
    #[error("header `{name}` is invalid: {reason}")]
    BadHeader {
        /// Header name.
        name: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// A value cannot be represented in the target encoding.
    #[error("cannot encode value: {0}")]
    Encode(String),
}

/// AMQP basic properties that matter to the task protocol.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties {
    /// MIME type of the body (`application/json`, `application/x-msgpack`).
    pub content_type: Option<String>,
    /// `utf-8` for JSON, `binary` for msgpack.
    pub content_encoding: Option<String>,
    /// The task id.
    pub correlation_id: Option<String>,
    /// The sender's reply address (only used by Celery's RPC backend).
    pub reply_to: Option<String>,
    /// Message priority, effective only on queues declared with `x-max-priority`.
    pub priority: Option<u8>,
    /// 2 = persistent, 1 = transient.
    pub delivery_mode: Option<u8>,
    /// Per-message TTL in milliseconds, as a decimal string.
    pub expiration: Option<String>,
}

/// A message as the broker carries it: header table, properties and undecoded body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawMessage {
    /// The AMQP header table, converted to JSON values.
    pub headers: Map<String, Value>,
    /// AMQP basic properties.
    pub properties: Properties,
    /// The encoded body.
    pub body: Vec<u8>,
}

impl RawMessage {
    /// The task id, if the message carries one where Celery puts it (header `id`, then
    /// `correlation_id`). Used to record a FAILURE for a message that cannot be decoded.
    pub fn task_id(&self) -> Option<&str> {
        self.headers
            .get("id")
            .and_then(Value::as_str)
            .or(self.properties.correlation_id.as_deref())
            .filter(|id| !id.is_empty())
    }

    /// The task name from the `task` header, if any.
    pub fn task_name(&self) -> Option<&str> {
        self.headers.get("task").and_then(Value::as_str)
    }
}

/// A decoded task message.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    /// Typed Celery headers.
    pub headers: TaskHeaders,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// `{callbacks, errbacks, chain, chord}` as sent (signature objects are kept verbatim).
    pub embed: Value,
    /// How the body was (or will be) encoded.
    pub content_type: ContentType,
    /// Priority property (0–255).
    pub priority: Option<u8>,
    /// Reply address property.
    pub reply_to: Option<String>,
}

impl TaskMessage {
    /// A new message for `task` with a fresh id and empty arguments.
    pub fn new(task: impl Into<String>, id: impl Into<String>) -> Self {
        let id = id.into();
        TaskMessage {
            headers: TaskHeaders::new(task.into(), id),
            args: Vec::new(),
            kwargs: Map::new(),
            embed: empty_embed(),
            content_type: ContentType::Json,
            priority: None,
            reply_to: None,
        }
    }

    /// Decodes a broker message. Accepts protocol v2 (header `task`) and v1 (all in the body).
    /// A naive `eta` or `expires` is read as UTC.
    pub fn decode(raw: &RawMessage) -> Result<Self, ProtocolError> {
        Self::decode_in(raw, chrono_tz::UTC)
    }

    /// [`TaskMessage::decode`], reading a naive `eta` or `expires` as local time in `timezone`
    /// (what a Celery worker does with its `timezone` setting).
    pub fn decode_in(raw: &RawMessage, timezone: chrono_tz::Tz) -> Result<Self, ProtocolError> {
        let content_type = ContentType::from_mime(raw.properties.content_type.as_deref())?;
        let body = match raw.headers.get("compression").and_then(Value::as_str) {
            Some(scheme) => {
                codec::decode_value(content_type, &compat::decompress(scheme, &raw.body)?)?
            }
            None => codec::decode_value(content_type, &raw.body)?,
        };
        if raw.headers.contains_key("task") {
            let headers = TaskHeaders::from_map_in(&raw.headers, timezone)?;
            let (args, kwargs, embed) = split_v2_body(body)?;
            Ok(TaskMessage {
                headers,
                args,
                kwargs,
                embed,
                content_type,
                priority: raw.properties.priority,
                reply_to: raw.properties.reply_to.clone(),
            })
        } else {
            Self::from_v1(body, content_type, &raw.properties, timezone)
        }
    }

    /// Protocol v1: `{task, id, args, kwargs, retries, eta, expires, timelimit, ...}` in the body.
    fn from_v1(
        body: Value,
        content_type: ContentType,
        properties: &Properties,
        timezone: chrono_tz::Tz,
    ) -> Result<Self, ProtocolError> {
        let Value::Object(mut map) = body else {
            return Err(ProtocolError::MissingHeader("task"));
        };
        if !map.contains_key("task") {
            return Err(ProtocolError::MissingHeader("task"));
        }
        let args = match map.remove("args") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(ProtocolError::BadBody("v1 `args` is not a list".into())),
        };
        let kwargs = match map.remove("kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(k)) => k,
            Some(_) => {
                return Err(ProtocolError::BadBody(
                    "v1 `kwargs` is not a mapping".into(),
                ));
            }
        };
        let mut embed = Map::new();
        for key in ["callbacks", "errbacks", "chord"] {
            embed.insert(key.into(), map.remove(key).unwrap_or(Value::Null));
        }
        embed.insert("chain".into(), Value::Null);
        if let Some(group) = map.remove("taskset") {
            map.insert("group".into(), group);
        }
        let headers = TaskHeaders::from_map_in(&map, timezone)?;
        Ok(TaskMessage {
            headers,
            args,
            kwargs,
            embed: Value::Object(embed),
            content_type,
            priority: properties.priority,
            reply_to: properties.reply_to.clone(),
        })
    }

    /// Encodes the message as protocol v2, ready for a broker.
    pub fn encode(&self) -> Result<RawMessage, ProtocolError> {
        let body = match self.content_type {
            // The same bytes as the `[args, kwargs, embed]` value, without copying the arguments
            // into one first.
            ContentType::Json => serde_json::to_vec(&(&self.args, &self.kwargs, &self.embed))
                .map_err(|e| ProtocolError::Encode(e.to_string()))?,
            ContentType::Msgpack => codec::encode_value(
                self.content_type,
                &Value::Array(vec![
                    Value::Array(self.args.clone()),
                    Value::Object(self.kwargs.clone()),
                    self.embed.clone(),
                ]),
            )?,
        };
        let expiration = self.headers.expires.map(|expires| {
            let ms = (expires - chrono::Utc::now()).num_milliseconds().max(0);
            ms.to_string()
        });
        Ok(RawMessage {
            headers: self.headers.to_map(),
            properties: Properties {
                content_type: Some(self.content_type.mime().to_owned()),
                content_encoding: Some(self.content_type.encoding().to_owned()),
                correlation_id: Some(self.headers.id.clone()),
                reply_to: self.reply_to.clone(),
                priority: Some(self.priority.unwrap_or(0)),
                delivery_mode: Some(2),
                expiration,
            },
            body,
        })
    }
}

/// `{"callbacks": null, "errbacks": null, "chain": null, "chord": null}`.
pub fn empty_embed() -> Value {
    let mut m = Map::new();
    for key in ["callbacks", "errbacks", "chain", "chord"] {
        m.insert(key.into(), Value::Null);
    }
    Value::Object(m)
}

/// `(args, kwargs, embed)`.
type BodyParts = (Vec<Value>, Map<String, Value>, Value);

fn split_v2_body(body: Value) -> Result<BodyParts, ProtocolError> {
    let Value::Array(parts) = body else {
        return Err(ProtocolError::BadBody(format!(
            "expected a list [args, kwargs, embed], got {}",
            kind_of(&body)
        )));
    };
    if !(2..=3).contains(&parts.len()) {
        return Err(ProtocolError::BadBody(format!(
            "expected [args, kwargs, embed], got a list of {} items",
            parts.len()
        )));
    }
    let mut parts = parts.into_iter();
    let args = match parts.next() {
        Some(Value::Array(a)) => a,
        Some(Value::Null) => Vec::new(),
        Some(other) => {
            return Err(ProtocolError::BadBody(format!(
                "args must be a list, got {}",
                kind_of(&other)
            )));
        }
        None => Vec::new(),
    };
    let kwargs = match parts.next() {
        Some(Value::Object(k)) => k,
        Some(Value::Null) | None => Map::new(),
        Some(other) => {
            return Err(ProtocolError::BadBody(format!(
                "kwargs must be a mapping, got {}",
                kind_of(&other)
            )));
        }
    };
    let embed = match parts.next() {
        Some(e @ Value::Object(_)) => e,
        Some(Value::Null) | None => empty_embed(),
        Some(other) => {
            return Err(ProtocolError::BadBody(format!(
                "embed must be a mapping, got {}",
                kind_of(&other)
            )));
        }
    };
    Ok((args, kwargs, embed))
}

/// A short name for a JSON value's type, for error messages.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests;
