//! Redaction of sensitive task arguments ([`crate::TaskOptions::sensitive`]).
//!
//! One function decides what a sensitive argument looks like everywhere it could leak: events,
//! inspect replies, the extended fields of stored results, logs and error reports all print the
//! copies made here, never the originals.

use serde_json::{Map, Value};

/// What a redacted value is replaced with.
pub const REDACTED: &str = "***";

/// Copies of `args` and `kwargs` with the values of `sensitive` arguments replaced by
/// [`REDACTED`]. Positional arguments are matched by the task's field names in order.
pub fn redact(
    args: &[Value],
    kwargs: &Map<String, Value>,
    sensitive: &[String],
    fields: Option<&[&str]>,
) -> (Vec<Value>, Map<String, Value>) {
    if sensitive.is_empty() {
        return (args.to_vec(), kwargs.clone());
    }
    let is_sensitive = |name: &str| sensitive.iter().any(|s| s == name);
    let args = args
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let name = fields.and_then(|f| f.get(i)).copied().unwrap_or("");
            // Without field names a position cannot be checked, so every positional argument
            // of a task with sensitive arguments is hidden.
            if fields.is_none() || is_sensitive(name) {
                Value::String(REDACTED.into())
            } else {
                v.clone()
            }
        })
        .collect();
    let kwargs = kwargs
        .iter()
        .map(|(k, v)| {
            let v = if is_sensitive(k) {
                Value::String(REDACTED.into())
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect();
    (args, kwargs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sensitive_values_are_replaced_by_name_and_position() {
        let kwargs = json!({"card": "4242", "user": 7});
        let (a, k) = redact(
            &[json!("secret"), json!(1)],
            kwargs.as_object().unwrap(),
            &["card".into(), "token".into()],
            Some(&["token", "n"]),
        );
        assert_eq!(a, vec![json!("***"), json!(1)]);
        assert_eq!(k["card"], "***");
        assert_eq!(k["user"], 7);
        let (a, _) = redact(&[json!(1)], &Map::new(), &["x".into()], None);
        assert_eq!(a, vec![json!("***")]);
    }
}
