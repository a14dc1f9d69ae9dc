//! AMQP field tables to and from JSON values.
//!
//! py-amqp writes str as long strings, int as 32- or 64-bit integers, float as doubles, None as void,
//! lists as arrays and dicts as tables; other clients use the remaining types. Every type decodes, so
//! a header written by any client can be read.

use base64::Engine as _;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

use crate::error::{Error, Result};

/// Converts an AMQP header table to a JSON object.
pub fn table_to_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), value_to_json(v)))
        .collect()
}

fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(i) => Value::from(*i),
        AMQPValue::ShortShortUInt(i) => Value::from(*i),
        AMQPValue::ShortInt(i) => Value::from(*i),
        AMQPValue::ShortUInt(i) => Value::from(*i),
        AMQPValue::LongInt(i) => Value::from(*i),
        AMQPValue::LongUInt(i) => Value::from(*i),
        AMQPValue::LongLongInt(i) => Value::from(*i),
        AMQPValue::Float(f) => Number::from_f64(f64::from(*f))
            .map(Value::Number)
            .unwrap_or(Value::Null),
        AMQPValue::Double(f) => Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        AMQPValue::DecimalValue(d) => {
            let f = f64::from(d.value) / 10f64.powi(i32::from(d.scale));
            Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or(Value::Null)
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::FieldTable(t) => Value::Object(table_to_json(t)),
        AMQPValue::ByteArray(b) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::Void => Value::Null,
    }
}

/// Converts a JSON object to an AMQP header table the way py-amqp would write it.
pub fn json_to_table(map: &Map<String, Value>) -> Result<FieldTable> {
    let mut table = FieldTable::default();
    for (k, v) in map {
        table.insert(short(k)?, json_to_value(v)?);
    }
    Ok(table)
}

fn json_to_value(v: &Value) -> Result<AMQPValue> {
    Ok(match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(json_to_value)
                .collect::<Result<Vec<_>>>()?,
        )),
        Value::Object(m) => AMQPValue::FieldTable(json_to_table(m)?),
    })
}

/// An AMQP short string (at most 255 bytes), or a clear error naming the value.
pub(crate) fn short(s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|_| {
        Error::Broker(format!(
            "`{}…` is longer than the 255 bytes AMQP allows here",
            &s[..s.len().min(40)]
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::DecimalValue;
    use serde_json::json;

    #[test]
    fn every_amqp_type_decodes() {
        let mut t = FieldTable::default();
        t.insert("void".into(), AMQPValue::Void);
        t.insert("i8".into(), AMQPValue::ShortShortInt(-3));
        t.insert("u16".into(), AMQPValue::ShortUInt(7));
        t.insert("i32".into(), AMQPValue::LongInt(30));
        t.insert("i64".into(), AMQPValue::LongLongInt(1 << 40));
        t.insert("f64".into(), AMQPValue::Double(1.5));
        t.insert(
            "dec".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 150,
            }),
        );
        t.insert("s".into(), AMQPValue::LongString("héllo".into()));
        t.insert(
            "arr".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongInt(30), AMQPValue::Double(20.5)].into()),
        );
        let j = Value::Object(table_to_json(&t));
        assert_eq!(
            j,
            json!({"void": null, "i8": -3, "u16": 7, "i32": 30, "i64": 1u64 << 40, "f64": 1.5,
                   "dec": 1.5, "s": "héllo", "arr": [30, 20.5]})
        );
    }

    #[test]
    fn json_round_trips_through_a_table() {
        let j = json!({"a": null, "b": [1, 2.5, "x"], "c": {"d": true}, "e": -5});
        let back = table_to_json(&json_to_table(j.as_object().unwrap()).unwrap());
        assert_eq!(Value::Object(back), j);
    }
}
