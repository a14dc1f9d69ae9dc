//! Money: integer minor units (kopecks) with the currency they are in. Never a float.
//!
//! The gateway speaks decimal amounts (`"Amount": 299.00`); [`Money::to_decimal`] and
//! [`Money::from_decimal`] convert at that boundary and refuse anything that is not a whole number
//! of minor units.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// An ISO 4217 currency code (three upper-case letters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency([u8; 3]);

impl Currency {
    /// Russian rouble.
    pub const RUB: Currency = Currency(*b"RUB");

    /// Parses a code like `RUB`.
    pub fn new(code: &str) -> Result<Self, MoneyError> {
        let b = code.as_bytes();
        if b.len() == 3 && b.iter().all(u8::is_ascii_uppercase) {
            Ok(Currency([b[0], b[1], b[2]]))
        } else {
            Err(MoneyError::BadCurrency(code.chars().take(16).collect()))
        }
    }

    /// The code.
    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Digits after the decimal point. Every currency CloudPayments accepts uses two.
    pub fn exponent(&self) -> u32 {
        2
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    fn try_from(s: String) -> Result<Self, MoneyError> {
        Currency::new(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.code().to_owned()
    }
}

/// Why an amount or currency was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    /// Not a three-letter upper-case code.
    #[error("`{0}` is not an ISO 4217 currency code")]
    BadCurrency(String),
    /// Negative, zero where a payment is meant, or too large.
    #[error("amount {0} is out of range")]
    OutOfRange(String),
    /// More fraction digits than the currency has.
    #[error("amount {0} is not a whole number of minor units")]
    FractionalMinorUnits(String),
}

/// The largest amount the system handles: 10 million roubles in kopecks. Anything above is a bug or
/// an attack, not a cinema subscription.
pub const MAX_MINOR: i64 = 1_000_000_000;

/// An amount of money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    /// Minor units (kopecks for RUB).
    pub minor: i64,
    /// Currency.
    pub currency: Currency,
}

impl Money {
    /// An amount in minor units; must be within `0..=MAX_MINOR`.
    pub fn new(minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        if !(0..=MAX_MINOR).contains(&minor) {
            return Err(MoneyError::OutOfRange(minor.to_string()));
        }
        Ok(Money { minor, currency })
    }

    /// A positive amount (what a charge or refund needs).
    pub fn positive(minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        if minor <= 0 {
            return Err(MoneyError::OutOfRange(minor.to_string()));
        }
        Money::new(minor, currency)
    }

    /// The amount as a decimal in major units (`29900` kopecks → `299.00`).
    pub fn to_decimal(&self) -> Decimal {
        Decimal::new(self.minor, self.currency.exponent())
    }

    /// Parses a decimal amount in major units, refusing fractions of a minor unit.
    pub fn from_decimal(amount: Decimal, currency: Currency) -> Result<Self, MoneyError> {
        let scaled = amount * Decimal::from(10i64.pow(currency.exponent()));
        if scaled.fract() != Decimal::ZERO {
            return Err(MoneyError::FractionalMinorUnits(amount.to_string()));
        }
        let minor = i64::try_from(scaled.trunc())
            .map_err(|_| MoneyError::OutOfRange(amount.to_string()))?;
        Money::new(minor, currency)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.to_decimal(), self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn decimal_round_trip() {
        let m = Money::new(29_900, Currency::RUB).unwrap();
        assert_eq!(m.to_decimal().to_string(), "299.00");
        assert_eq!(
            Money::from_decimal(Decimal::from_str("299.00").unwrap(), Currency::RUB).unwrap(),
            m
        );
        assert_eq!(
            Money::from_decimal(Decimal::from_str("0.01").unwrap(), Currency::RUB)
                .unwrap()
                .minor,
            1
        );
    }

    #[test]
    fn refuses_what_is_not_money() {
        assert!(Money::from_decimal(Decimal::from_str("1.005").unwrap(), Currency::RUB).is_err());
        assert!(Money::new(-1, Currency::RUB).is_err());
        assert!(Money::new(MAX_MINOR + 1, Currency::RUB).is_err());
        assert!(Money::positive(0, Currency::RUB).is_err());
        assert!(Currency::new("rub").is_err());
        assert!(Currency::new("RUBL").is_err());
    }
}
