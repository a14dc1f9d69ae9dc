//! How single values look on the gateway's wire: amounts, dates.
//!
//! Amounts go out as JSON numbers with exactly two decimals (`299.00`), written as raw JSON text
//! from a `Decimal` so no float is ever involved. They come back as JSON numbers or strings.
//! `serde_json` (without `arbitrary_precision`, which we cannot switch on for the whole
//! workspace) stores a fractional JSON number as an `f64`; we never compute with it but read it
//! back through its shortest round-trip text, which is exactly the decimal that was written for
//! every amount of up to 15 significant digits, far above [`MAX_MINOR`](crate::money::MAX_MINOR).

use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use crate::money::Money;

/// An amount written as a JSON number with two decimals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WireAmount(pub Decimal);

impl WireAmount {
    /// The amount of `money` in major units.
    pub(crate) fn of(money: Money) -> Self {
        WireAmount(money.to_decimal())
    }

    /// The JSON text, e.g. `299.00`.
    pub(crate) fn text(&self) -> String {
        format!("{:.2}", self.0)
    }
}

impl Serialize for WireAmount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // A raw value is the only way to make serde_json print `10.00` rather than `10.0`
        // without switching the whole workspace to arbitrary-precision numbers.
        let raw = RawValue::from_string(self.text()).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

/// Reads a JSON number as a decimal without doing arithmetic on a float (see the module docs).
pub(crate) fn decimal_from_number(n: &serde_json::Number) -> Option<Decimal> {
    if let Some(i) = n.as_i64() {
        return Some(Decimal::from(i));
    }
    if let Some(u) = n.as_u64() {
        return Some(Decimal::from(u));
    }
    decimal_from_str(&n.to_string())
}

/// Reads decimal text: `123.00`, `123`, `1e-2`. Surrounding spaces are ignored.
pub(crate) fn decimal_from_str(s: &str) -> Option<Decimal> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    Decimal::from_str(s)
        .ok()
        .or_else(|| Decimal::from_scientific(s).ok())
}

/// Parses the date forms the gateway uses, always UTC: `/Date(1635150224630)/`,
/// `2021-10-25T08:23:44` (the `*Iso` fields, no offset), `2015-11-17 14:51:20` (notifications),
/// and RFC 3339 for good measure.
pub(crate) fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Some(ms) = s.strip_prefix("/Date(").and_then(|r| r.strip_suffix(")/")) {
        // Legacy .NET dates may carry an offset suffix (`/Date(123+0300)/`); the number is UTC.
        let digits = ms
            .char_indices()
            .find(|&(i, c)| i > 0 && (c == '+' || c == '-'))
            .map_or(ms, |(i, _)| &ms[..i]);
        return Utc.timestamp_millis_opt(digits.parse().ok()?).single();
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, format) {
            return Some(naive.and_utc());
        }
    }
    None
}

/// `/Date(ms)/`, the legacy form of `CreatedDate` and friends.
pub(crate) fn format_dotnet_date(t: DateTime<Utc>) -> String {
    format!("/Date({})/", t.timestamp_millis())
}

/// `2021-10-25T08:23:44`, the `*Iso` form (UTC, no offset).
pub(crate) fn format_iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// `2015-11-17 14:51:20`, the notification `DateTime` form (UTC).
pub(crate) fn format_notification_date(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;

    #[test]
    fn amounts_are_written_with_two_decimals() {
        #[derive(Serialize)]
        struct Body {
            #[serde(rename = "Amount")]
            amount: WireAmount,
        }
        for (minor, text) in [
            (29_900, "299.00"),
            (1, "0.01"),
            (10, "0.10"),
            (123_456, "1234.56"),
        ] {
            let body = Body {
                amount: WireAmount::of(Money::new(minor, Currency::RUB).unwrap()),
            };
            assert_eq!(
                serde_json::to_string(&body).unwrap(),
                format!("{{\"Amount\":{text}}}")
            );
        }
    }

    #[test]
    fn numbers_read_back_exactly() {
        for text in ["299.00", "0.01", "0.1", "1234.56", "9999999.99", "10000000"] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let d = decimal_from_number(v.as_number().unwrap()).unwrap();
            assert_eq!(d, Decimal::from_str(text).unwrap(), "{text}");
        }
        assert_eq!(decimal_from_str(" 1e-2 "), Some(Decimal::new(1, 2)));
        assert_eq!(decimal_from_str("abc"), None);
    }

    #[test]
    fn dates_in_every_form() {
        let want = Utc.with_ymd_and_hms(2021, 10, 25, 8, 23, 44).unwrap();
        assert_eq!(parse_datetime("2021-10-25T08:23:44"), Some(want));
        assert_eq!(parse_datetime("2021-10-25 08:23:44"), Some(want));
        assert_eq!(parse_datetime("2021-10-25T08:23:44Z"), Some(want));
        assert_eq!(parse_datetime("/Date(1635150224000)/"), Some(want));
        assert_eq!(parse_datetime("/Date(1635150224000+0300)/"), Some(want));
        assert_eq!(parse_datetime(&format_dotnet_date(want)), Some(want));
        assert_eq!(parse_datetime(&format_iso(want)), Some(want));
        assert_eq!(parse_datetime(&format_notification_date(want)), Some(want));
        assert_eq!(parse_datetime("yesterday"), None);
    }
}
