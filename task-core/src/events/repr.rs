//! Python's `repr()` of JSON values, for the printable fields of events and inspect replies
//! (`args`, `kwargs`, `result`, `exception`). Flower and Celery's `events.state` show these strings
//! as they are, so they read the way a Python worker would have printed them.

use serde_json::{Map, Value};

/// Longest repr kept; longer ones end in `...`, like Celery's `saferepr` limits.
pub const MAX_REPR: usize = 1024;

/// `repr(value)`.
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    truncate(out)
}

/// `repr(tuple(args))`: `()`, `(1,)`, `(1, 'a')`.
pub fn args_repr(args: &[Value]) -> String {
    let mut out = String::from("(");
    for (i, v) in args.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_value(&mut out, v);
    }
    if args.len() == 1 {
        out.push(',');
    }
    out.push(')');
    truncate(out)
}

/// `repr(dict(kwargs))`.
pub fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    let mut out = String::new();
    write_map(&mut out, kwargs);
    truncate(out)
}

/// `repr(ExceptionType(message))`, as Celery's `task-failed` event carries it.
pub fn exception_repr(kind: &str, message: &str) -> String {
    let mut out = String::from(kind);
    out.push('(');
    write_str(&mut out, message);
    out.push(')');
    truncate(out)
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_REPR {
        let mut end = MAX_REPR;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                write_float(out, f);
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, v);
            }
            out.push(']');
        }
        Value::Object(map) => write_map(out, map),
    }
}

fn write_map(out: &mut String, map: &Map<String, Value>) {
    out.push('{');
    for (i, (k, v)) in map.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_str(out, k);
        out.push_str(": ");
        write_value(out, v);
    }
    out.push('}');
}

fn write_float(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("nan");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { "inf" } else { "-inf" });
    } else if f.fract() == 0.0 && f.abs() < 1e16 {
        out.push_str(&format!("{f:.1}"));
    } else {
        out.push_str(&f.to_string());
    }
}

/// Python's string repr: single quotes unless the text has a `'` and no `"`.
fn write_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_like_python() {
        assert_eq!(repr(&json!(null)), "None");
        assert_eq!(repr(&json!(true)), "True");
        assert_eq!(repr(&json!(5)), "5");
        assert_eq!(repr(&json!(2.0)), "2.0");
        assert_eq!(repr(&json!(0.5)), "0.5");
        assert_eq!(repr(&json!("it's")), "\"it's\"");
        assert_eq!(repr(&json!("a'b\"c")), "'a\\'b\"c'");
        assert_eq!(repr(&json!("line\n")), "'line\\n'");
        assert_eq!(repr(&json!({"a": [1, "x"]})), "{'a': [1, 'x']}");
        assert_eq!(args_repr(&[]), "()");
        assert_eq!(args_repr(&[json!(1)]), "(1,)");
        assert_eq!(args_repr(&[json!(2), json!(3)]), "(2, 3)");
        assert_eq!(
            exception_repr("ValueError", "bad value"),
            "ValueError('bad value')"
        );
    }

    #[test]
    fn long_values_are_cut() {
        let long = repr(&json!("x".repeat(5000)));
        assert!(long.len() <= MAX_REPR + 3 && long.ends_with("..."));
    }
}
