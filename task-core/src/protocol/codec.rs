//! Body codecs: JSON (kombu's dialect) and msgpack (kombu's options), both to and from
//! [`serde_json::Value`], which is the one in-memory form every task argument and result takes.
//!
//! kombu's JSON wraps non-JSON types as `{"__type__": T, "__value__": V}`. Dates, times, decimals
//! and UUIDs are unwrapped to their string form on the way in (so `chrono`, `rust_decimal` and `uuid`
//! types deserialize from them directly); bytes stay wrapped and deserialize into [`Bytes`]. msgpack
//! `bin` values map to that same wrapper, so a task sees bytes the same way whatever the encoding.
//!
//! msgpack is written as kombu reads it (`use_bin_type=True`, `raw=False`): maps with string keys,
//! text as `str`, bytes as `bin`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

use super::ProtocolError;

/// The body encodings the worker accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ContentType {
    /// `application/json`, Celery's default.
    #[default]
    Json,
    /// `application/x-msgpack`.
    Msgpack,
}

impl ContentType {
    /// Parses a MIME type; a missing type means JSON, as for kombu.
    pub fn from_mime(mime: Option<&str>) -> Result<Self, ProtocolError> {
        match mime.map(|m| m.split(';').next().unwrap_or("").trim()) {
            None | Some("") | Some("application/json") => Ok(ContentType::Json),
            Some("application/x-msgpack") | Some("application/msgpack") => Ok(ContentType::Msgpack),
            Some(other) => Err(ProtocolError::UnsupportedContentType(other.to_owned())),
        }
    }

    /// The MIME type written in the `content_type` property.
    pub fn mime(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::Msgpack => "application/x-msgpack",
        }
    }

    /// The `content_encoding` property kombu writes for this type.
    pub fn encoding(self) -> &'static str {
        match self {
            ContentType::Json => "utf-8",
            ContentType::Msgpack => "binary",
        }
    }

    /// Short name (`json`, `msgpack`), as used in settings.
    pub fn name(self) -> &'static str {
        match self {
            ContentType::Json => "json",
            ContentType::Msgpack => "msgpack",
        }
    }
}

impl std::str::FromStr for ContentType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" | "application/json" => Ok(ContentType::Json),
            "msgpack" | "application/x-msgpack" => Ok(ContentType::Msgpack),
            other => Err(format!(
                "unknown serializer `{other}` (expected json or msgpack)"
            )),
        }
    }
}

/// Decodes a body in the given encoding into a JSON value (kombu wrappers resolved as described in
/// the module docs).
pub fn decode_value(content_type: ContentType, bytes: &[u8]) -> Result<Value, ProtocolError> {
    match content_type {
        ContentType::Json => {
            let strict = serde_json::from_slice::<Value>(bytes);
            let v = match strict {
                Ok(v) => v,
                // Python's `json.dumps` writes NaN and Infinity; see `compat`.
                Err(e) => match super::compat::python_json(bytes)? {
                    Some(fixed) => serde_json::from_slice(&fixed),
                    None => Err(e),
                }
                .map_err(|e| ProtocolError::MalformedBody {
                    content_type: "JSON",
                    reason: e.to_string(),
                })?,
            };
            // A strict parse reads a 65-bit integer as a float without a word: when there is a
            // float at all, check the text for such integers.
            if has_float(&v) {
                super::compat::python_json(bytes)?;
            }
            Ok(unwrap_kombu(v))
        }
        ContentType::Msgpack => {
            let mut rest = bytes;
            let v =
                rmpv::decode::read_value(&mut rest).map_err(|e| ProtocolError::MalformedBody {
                    content_type: "msgpack",
                    reason: e.to_string(),
                })?;
            if !rest.is_empty() {
                return Err(ProtocolError::MalformedBody {
                    content_type: "msgpack",
                    reason: format!("{} trailing bytes after the value", rest.len()),
                });
            }
            from_msgpack(v)
        }
    }
}

/// Encodes a JSON value in the given encoding.
pub fn encode_value(content_type: ContentType, value: &Value) -> Result<Vec<u8>, ProtocolError> {
    match content_type {
        ContentType::Json => {
            serde_json::to_vec(value).map_err(|e| ProtocolError::Encode(e.to_string()))
        }
        ContentType::Msgpack => {
            let mut out = Vec::with_capacity(64);
            rmpv::encode::write_value(&mut out, &to_msgpack(value))
                .map_err(|e| ProtocolError::Encode(e.to_string()))?;
            Ok(out)
        }
    }
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(m) => m.values().any(has_float),
        _ => false,
    }
}

const TYPE_KEY: &str = "__type__";
const VALUE_KEY: &str = "__value__";

/// Resolves kombu's `{"__type__", "__value__"}` wrappers, depth first.
fn unwrap_kombu(v: Value) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.into_iter().map(unwrap_kombu).collect()),
        Value::Object(map) => {
            if map.len() == 2
                && let (Some(Value::String(t)), Some(inner)) =
                    (map.get(TYPE_KEY), map.get(VALUE_KEY))
            {
                match t.as_str() {
                    // kombu 5.3+ writes `{"hex": "<32 hex digits>"}`; older ones the string.
                    "uuid" => {
                        if let Some(hex) = inner.get("hex").and_then(Value::as_str)
                            && let Ok(id) = uuid::Uuid::parse_str(hex)
                        {
                            return Value::String(id.to_string());
                        }
                        return inner.clone();
                    }
                    "datetime" | "date" | "time" | "decimal" => return inner.clone(),
                    _ => return Value::Object(map),
                }
            }
            Value::Object(map.into_iter().map(|(k, v)| (k, unwrap_kombu(v))).collect())
        }
        other => other,
    }
}

fn bytes_wrapper(bytes: &[u8]) -> Value {
    let mut m = Map::new();
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            m.insert(TYPE_KEY.into(), Value::String("bytes".into()));
            m.insert(VALUE_KEY.into(), Value::String(text.to_owned()));
        }
        Err(_) => {
            m.insert(TYPE_KEY.into(), Value::String("base64".into()));
            m.insert(VALUE_KEY.into(), Value::String(BASE64.encode(bytes)));
        }
    }
    Value::Object(m)
}

/// The bytes inside a kombu bytes/base64 wrapper, if `v` is one.
fn wrapped_bytes(v: &Value) -> Option<Vec<u8>> {
    let map = v.as_object()?;
    if map.len() != 2 {
        return None;
    }
    let inner = map.get(VALUE_KEY)?.as_str()?;
    match map.get(TYPE_KEY)?.as_str()? {
        "bytes" => Some(inner.as_bytes().to_vec()),
        "base64" => BASE64.decode(inner).ok(),
        _ => None,
    }
}

fn from_msgpack(v: rmpv::Value) -> Result<Value, ProtocolError> {
    use rmpv::Value as M;
    let bad = |reason: String| ProtocolError::MalformedBody {
        content_type: "msgpack",
        reason,
    };
    Ok(match v {
        M::Nil => Value::Null,
        M::Boolean(b) => Value::Bool(b),
        M::Integer(i) => {
            if let Some(n) = i.as_i64() {
                Value::from(n)
            } else if let Some(n) = i.as_u64() {
                Value::from(n)
            } else {
                return Err(bad(format!("integer out of range: {i}")));
            }
        }
        M::F32(f) => float(f64::from(f)).ok_or_else(|| bad(format!("non-finite float {f}")))?,
        M::F64(f) => float(f).ok_or_else(|| bad(format!("non-finite float {f}")))?,
        M::String(s) => match s.into_str() {
            Some(s) => Value::String(s),
            None => return Err(bad("a str value is not valid UTF-8".into())),
        },
        M::Binary(b) => bytes_wrapper(&b),
        M::Array(items) => Value::Array(
            items
                .into_iter()
                .map(from_msgpack)
                .collect::<Result<_, _>>()?,
        ),
        M::Map(entries) => {
            let mut m = Map::with_capacity(entries.len());
            for (k, v) in entries {
                let key = match k {
                    M::String(s) => s
                        .into_str()
                        .ok_or_else(|| bad("a map key is not valid UTF-8".into()))?,
                    other => from_msgpack(other)?.to_string(),
                };
                m.insert(key, from_msgpack(v)?);
            }
            Value::Object(m)
        }
        M::Ext(tag, _) => {
            return Err(bad(format!(
                "msgpack extension type {tag} is not supported"
            )));
        }
    })
}

fn float(f: f64) -> Option<Value> {
    Number::from_f64(f).map(Value::Number)
}

fn to_msgpack(v: &Value) -> rmpv::Value {
    use rmpv::Value as M;
    match v {
        Value::Null => M::Nil,
        Value::Bool(b) => M::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                M::from(i)
            } else if let Some(u) = n.as_u64() {
                M::from(u)
            } else {
                M::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => M::String(s.as_str().into()),
        Value::Array(items) => M::Array(items.iter().map(to_msgpack).collect()),
        Value::Object(map) => match wrapped_bytes(v) {
            Some(bytes) => M::Binary(bytes),
            None => M::Map(
                map.iter()
                    .map(|(k, v)| (M::String(k.as_str().into()), to_msgpack(v)))
                    .collect(),
            ),
        },
    }
}

/// A byte string argument or result. Deserializes from kombu's JSON wrappers, msgpack `bin`, a plain
/// string (its UTF-8 bytes) or a list of integers; serializes to kombu's wrapper (msgpack: `bin`), so
/// Python receives `bytes`.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        bytes_wrapper(&self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        if let Some(b) = wrapped_bytes(&v) {
            return Ok(Bytes(b));
        }
        match v {
            Value::String(s) => Ok(Bytes(s.into_bytes())),
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect::<Option<Vec<u8>>>()
                .map(Bytes)
                .ok_or_else(|| serde::de::Error::custom("a byte list holds a non-byte value")),
            other => Err(serde::de::Error::custom(format!(
                "expected bytes, got {}",
                super::kind_of(&other)
            ))),
        }
    }
}
