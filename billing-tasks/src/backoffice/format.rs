//! How the back-office writes and reads amounts and times: roubles with kopecks (`1 234,56 ₽`),
//! Moscow time (UTC+3 all year) with the UTC instant on hover.

use chrono::{DateTime, FixedOffset, NaiveDate, TimeZone, Utc};

use super::text::Lang;

/// Moscow time: UTC+3, no daylight saving since 2014.
pub fn moscow() -> FixedOffset {
    FixedOffset::east_opt(3 * 3600).expect("a valid offset")
}

/// Kopecks as roubles: `1 234,56` (Russian) or `1,234.56` (English), without the currency.
pub fn amount(minor: i64, lang: Lang) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    let (whole, frac) = (abs / 100, abs % 100);
    let digits = whole.to_string();
    let (group, point) = match lang {
        Lang::Ru => ('\u{a0}', ','),
        Lang::En => (',', '.'),
    };
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(group);
        }
        grouped.push(c);
    }
    format!("{sign}{grouped}{point}{frac:02}")
}

/// An amount with its currency: `1 234,56 ₽`, or the code for other currencies.
pub fn money(minor: i64, currency: &str, lang: Lang) -> String {
    let symbol = if currency == "RUB" { "₽" } else { currency };
    format!("{}\u{a0}{symbol}", amount(minor, lang))
}

/// Kopecks as a plain decimal for CSV (`1234.56`).
pub fn decimal(minor: i64) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// Moscow time as the pages show it.
pub fn msk(t: DateTime<Utc>) -> String {
    t.with_timezone(&moscow())
        .format("%d.%m.%Y %H:%M")
        .to_string()
}

/// Moscow time for CSV.
pub fn msk_full(t: DateTime<Utc>) -> String {
    t.with_timezone(&moscow())
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// UTC as the hover text and CSV show it.
pub fn utc(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The start of a Moscow day, in UTC.
pub fn day_start(day: NaiveDate) -> DateTime<Utc> {
    moscow()
        .from_local_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight"))
        .single()
        .expect("a fixed offset is unambiguous")
        .with_timezone(&Utc)
}

/// Why an amount typed into a form is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmountError {
    Empty,
    NotANumber,
    TooManyDecimals,
    NotPositive,
    TooLarge,
}

/// Largest amount the ledger holds (10 million roubles), in kopecks.
pub const MAX_MINOR: i64 = 1_000_000_000;

/// Roubles typed by a person into kopecks: `499`, `499.5`, `499,50`, `1 234,56`. Negative,
/// zero, more than two decimals, non-numbers and more than the ledger holds are refused.
pub fn parse_roubles(input: &str) -> Result<i64, AmountError> {
    let s: String = input
        .trim()
        .chars()
        .filter(|c| !matches!(c, ' ' | '\u{a0}' | '\u{202f}' | '_'))
        .collect();
    let s = s.trim_end_matches('₽').replace(',', ".");
    if s.is_empty() {
        return Err(AmountError::Empty);
    }
    if s.starts_with('-') {
        return Err(AmountError::NotPositive);
    }
    let (whole, frac) = s.split_once('.').unwrap_or((&s, ""));
    if whole.is_empty() && frac.is_empty()
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return Err(AmountError::NotANumber);
    }
    if frac.len() > 2 {
        return Err(AmountError::TooManyDecimals);
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole
            .trim_start_matches('0')
            .parse::<i64>()
            .or_else(|e| {
                if whole.chars().all(|c| c == '0') {
                    Ok(0)
                } else {
                    Err(e)
                }
            })
            .map_err(|_| AmountError::TooLarge)?
    };
    let frac: i64 = format!("{frac:0<2}").parse().unwrap_or(0);
    let minor = whole
        .checked_mul(100)
        .and_then(|w| w.checked_add(frac))
        .ok_or(AmountError::TooLarge)?;
    if minor == 0 {
        return Err(AmountError::NotPositive);
    }
    if minor > MAX_MINOR {
        return Err(AmountError::TooLarge);
    }
    Ok(minor)
}

/// [`parse_roubles`] for a command-line setting.
pub fn parse_roubles_arg(s: &str) -> Result<i64, String> {
    parse_roubles(s).map_err(|e| format!("`{s}` is not an amount in roubles ({e:?})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_read_and_written_like_people_do() {
        assert_eq!(amount(123_456, Lang::Ru), "1\u{a0}234,56");
        assert_eq!(amount(123_456, Lang::En), "1,234.56");
        assert_eq!(amount(5, Lang::En), "0.05");
        assert_eq!(amount(100_000_000, Lang::En), "1,000,000.00");
        assert_eq!(decimal(49_900), "499.00");
        assert_eq!(parse_roubles("499"), Ok(49_900));
        assert_eq!(parse_roubles("499,5"), Ok(49_950));
        assert_eq!(parse_roubles("1 234,56 ₽"), Ok(123_456));
        assert_eq!(parse_roubles("0.01"), Ok(1));
        assert_eq!(parse_roubles(".5"), Ok(50));
        assert_eq!(parse_roubles(""), Err(AmountError::Empty));
        assert_eq!(parse_roubles("-5"), Err(AmountError::NotPositive));
        assert_eq!(parse_roubles("0"), Err(AmountError::NotPositive));
        assert_eq!(parse_roubles("0,00"), Err(AmountError::NotPositive));
        assert_eq!(parse_roubles("1.234"), Err(AmountError::TooManyDecimals));
        assert_eq!(parse_roubles("12a"), Err(AmountError::NotANumber));
        assert_eq!(parse_roubles("1e5"), Err(AmountError::NotANumber));
        assert_eq!(parse_roubles("10000000.01"), Err(AmountError::TooLarge));
        assert_eq!(
            parse_roubles("99999999999999999999"),
            Err(AmountError::TooLarge)
        );
    }

    #[test]
    fn moscow_is_three_hours_ahead() {
        let t = Utc.with_ymd_and_hms(2026, 12, 1, 21, 30, 0).unwrap();
        assert_eq!(msk(t), "02.12.2026 00:30");
        assert_eq!(utc(t), "2026-12-01 21:30:00 UTC");
        let d = NaiveDate::from_ymd_opt(2026, 12, 2).unwrap();
        assert_eq!(
            day_start(d),
            Utc.with_ymd_and_hms(2026, 12, 1, 21, 0, 0).unwrap()
        );
    }
}
