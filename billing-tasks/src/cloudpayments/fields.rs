//! A lenient, case-insensitive view of a gateway object: a JSON object (response `Model`, JSON
//! notification, JSON request to the fake) or a form body (notification, form request).
//!
//! The gateway binds names case-insensitively (§1.1), sends numbers as strings in forms, ids as
//! numbers or strings (§2.1), booleans as `true` or `1`, and empty form fields as `Key=`. Every
//! reader of gateway data goes through this one type so that those rules live in one place.
//! Values never appear in errors or `Debug` output: a field may be a token or a cryptogram.

use std::collections::HashMap;
use std::fmt;

use rust_decimal::Decimal;
use serde_json::Value;

use super::form;
use super::wire;

/// A field was present but its value had the wrong shape. Names the field, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` has an invalid value")]
pub(crate) struct FieldError {
    pub field: String,
}

/// Fields by lower-cased name. Nulls and empty strings count as absent.
#[derive(Clone, Default)]
pub(crate) struct Fields {
    map: HashMap<String, Value>,
}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: values may be secrets.
        f.debug_set().entries(self.map.keys()).finish()
    }
}

impl Fields {
    /// From a JSON object; when a name appears in several cases the first one wins.
    pub(crate) fn from_object(object: serde_json::Map<String, Value>) -> Self {
        let mut map = HashMap::with_capacity(object.len());
        for (k, v) in object {
            map.entry(k.to_ascii_lowercase()).or_insert(v);
        }
        Fields { map }
    }

    /// From a JSON value, if it is an object.
    pub(crate) fn from_json(value: Value) -> Option<Self> {
        match value {
            Value::Object(o) => Some(Fields::from_object(o)),
            _ => None,
        }
    }

    /// From decoded form pairs; the first occurrence of a name wins.
    pub(crate) fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        let mut map = HashMap::with_capacity(pairs.len());
        for (k, v) in pairs {
            map.entry(k.to_ascii_lowercase())
                .or_insert(Value::String(v));
        }
        Fields { map }
    }

    /// From a request or notification body: JSON when the content type says so or the body looks
    /// like an object, otherwise a form. An empty body is an empty set of fields.
    pub(crate) fn from_body(content_type: Option<&str>, body: &[u8]) -> Result<Self, BodyError> {
        let trimmed = body.trim_ascii();
        if trimmed.is_empty() {
            return Ok(Fields::default());
        }
        let json = content_type.is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
            || trimmed.starts_with(b"{");
        if json {
            let value: Value = serde_json::from_slice(trimmed).map_err(|_| BodyError::Json)?;
            Fields::from_json(value).ok_or(BodyError::NotAnObject)
        } else {
            Ok(Fields::from_pairs(
                form::parse(trimmed).map_err(|_| BodyError::Form)?,
            ))
        }
    }

    fn value(&self, key: &str) -> Option<&Value> {
        match self.map.get(&key.to_ascii_lowercase())? {
            Value::Null => None,
            Value::String(s) if s.trim().is_empty() => None,
            v => Some(v),
        }
    }

    /// Whether the field is present (not null, not empty).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.value(key).is_some()
    }

    /// Text of a string, number or boolean field.
    pub(crate) fn text(&self, key: &str) -> Option<String> {
        match self.value(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// An integer, from a number or a string. A fraction is rounded, as the gateway does (§1.1).
    pub(crate) fn i64(&self, key: &str) -> Result<Option<i64>, FieldError> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let d = match v {
            Value::Number(n) => n
                .as_i64()
                .map(Decimal::from)
                .or_else(|| wire::decimal_from_number(n)),
            Value::String(s) => wire::decimal_from_str(s),
            _ => None,
        };
        d.and_then(|d| i64::try_from(d.round()).ok())
            .map(Some)
            .ok_or_else(|| self.bad(key))
    }

    /// A decimal, from a number or a string.
    pub(crate) fn decimal(&self, key: &str) -> Result<Option<Decimal>, FieldError> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        match v {
            Value::Number(n) => wire::decimal_from_number(n),
            Value::String(s) => wire::decimal_from_str(s),
            _ => None,
        }
        .map(Some)
        .ok_or_else(|| self.bad(key))
    }

    /// A boolean: `true`/`false`, `1`/`0`, in any case, as JSON or text.
    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>, FieldError> {
        let Some(v) = self.value(key) else {
            return Ok(None);
        };
        let b = match v {
            Value::Bool(b) => Some(*b),
            Value::Number(n) => match n.as_i64() {
                Some(0) => Some(false),
                Some(1) => Some(true),
                _ => None,
            },
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "1" | "true" => Some(true),
                "0" | "false" => Some(false),
                _ => None,
            },
            _ => None,
        };
        b.map(Some).ok_or_else(|| self.bad(key))
    }

    /// A nested object.
    /// The objects of an array field (non-objects skipped); `None` if it is not an array.
    pub(crate) fn objects(&self, key: &str) -> Option<Vec<Fields>> {
        match self.value(key)? {
            Value::Array(items) => Some(
                items
                    .iter()
                    .filter_map(|v| match v {
                        Value::Object(o) => Some(Fields::from_object(o.clone())),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        }
    }

    pub(crate) fn object(&self, key: &str) -> Option<Fields> {
        match self.value(key)? {
            Value::Object(o) => Some(Fields::from_object(o.clone())),
            _ => None,
        }
    }

    fn bad(&self, key: &str) -> FieldError {
        FieldError {
            field: key.to_owned(),
        }
    }
}

/// A body that is neither a JSON object nor a form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BodyError {
    /// Declared or looking like JSON, but not valid JSON.
    #[error("body is not valid JSON")]
    Json,
    /// Valid JSON, but not an object.
    #[error("body is not a JSON object")]
    NotAnObject,
    /// A form that is not UTF-8 once decoded.
    #[error("form body is not UTF-8")]
    Form,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn case_insensitive_and_lenient() {
        let f = Fields::from_json(json!({
            "transactionId": "3360000001", "AMOUNT": 10.5, "TestMode": 1, "Refunded": "False",
            "InvoiceId": 1234567, "Email": "", "Name": null, "Model": {"a": 1}
        }))
        .unwrap();
        assert_eq!(f.i64("TransactionId"), Ok(Some(3_360_000_001)));
        assert_eq!(f.decimal("Amount"), Ok(Some(Decimal::new(105, 1))));
        assert_eq!(f.bool("testmode"), Ok(Some(true)));
        assert_eq!(f.bool("Refunded"), Ok(Some(false)));
        assert_eq!(f.text("InvoiceId").as_deref(), Some("1234567"));
        assert_eq!(f.text("Email"), None);
        assert!(!f.has("Name"));
        assert!(f.object("model").is_some());
        assert_eq!(f.i64("Missing"), Ok(None));
        assert_eq!(
            Fields::from_json(json!({"Amount": "abc"}))
                .unwrap()
                .decimal("Amount"),
            Err(FieldError {
                field: "Amount".into()
            })
        );
    }

    #[test]
    fn bodies() {
        let form = Fields::from_body(None, b"Amount=10.00&TestMode=0&SubscriptionId=").unwrap();
        assert_eq!(form.decimal("amount"), Ok(Some(Decimal::new(1000, 2))));
        assert_eq!(form.bool("TestMode"), Ok(Some(false)));
        assert!(!form.has("SubscriptionId"));
        let json =
            Fields::from_body(Some("application/json; charset=utf-8"), br#"{"a":"b"}"#).unwrap();
        assert_eq!(json.text("A").as_deref(), Some("b"));
        assert_eq!(
            Fields::from_body(None, b"{oops").unwrap_err(),
            BodyError::Json
        );
        assert_eq!(
            Fields::from_body(Some("application/json"), b"[1]").unwrap_err(),
            BodyError::NotAnObject
        );
        assert!(Fields::from_body(None, b"  ").unwrap().map.is_empty());
        assert_eq!(
            format!("{:?}", Fields::from_body(None, b"Token=tk_secret").unwrap()),
            "{\"token\"}"
        );
    }
}
