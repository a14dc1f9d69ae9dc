//! Test cards (§7) and the fake's cryptogram and PaRes conventions.
//!
//! A real `CardCryptogramPacket` is RSA-encrypted by the checkout script, so the fake cannot read
//! one. Our convention: the packet is standard base64 of a JSON object
//! `{"Pan":"4242424242424242","Exp":"12/30"}` with an optional `"Cvv"` and, for tests of decline
//! handling, an optional `"Decline": 5091` that makes the payment decline with that reason code.
//! Anything else — not base64, not that JSON, a PAN failing the Luhn check, an expiry that is not
//! `MM/YY` — is answered `{"Success":false,"Message":"Invalid CardCryptogramPacket value"}` (a
//! request error, as the real gateway gives for a packet it cannot decrypt; the exact real text is
//! undocumented).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{Datelike, Utc};
use serde::{Deserialize, Serialize};

use crate::cloudpayments::reason::ReasonCode;

/// The request-error text for a packet the fake cannot read.
pub const BAD_CRYPTOGRAM_MESSAGE: &str = "Invalid CardCryptogramPacket value";

/// `PaRes` that passes 3-D Secure.
pub const PA_RES_OK: &str = "fake-pares-ok";
/// `PaRes` that fails 3-D Secure: the payment is declined with 5206 (so is any other unknown
/// value, like a tampered ACS answer).
pub const PA_RES_FAIL: &str = "fake-pares-fail";
/// `PaRes` saying 3-D Secure was unavailable: declined with 5207.
pub const PA_RES_UNAVAILABLE: &str = "fake-pares-unavailable";

/// The outcome a card gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CardResult {
    Approve,
    Decline(ReasonCode),
}

/// A card's behaviour on the fake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CardBehaviour {
    pub brand: &'static str,
    pub three_ds: bool,
    /// A payment with the card itself.
    pub payment: CardResult,
    /// A payment with a token of the card (only cards whose payment succeeds ever get one).
    pub token: CardResult,
}

const OK: CardResult = CardResult::Approve;
const NSF: CardResult = CardResult::Decline(ReasonCode::INSUFFICIENT_FUNDS);

/// §7, by PAN.
const TEST_CARDS: &[(&str, bool, CardResult, CardResult)] = &[
    ("4242424242424242", true, OK, OK),
    ("5555555555554444", true, OK, OK),
    ("2200000000000004", true, OK, OK),
    ("4012888888881881", true, NSF, NSF),
    ("5105105105105100", true, NSF, NSF),
    ("2202202202202200", true, NSF, NSF),
    ("4000000000003055", false, OK, OK),
    ("5205000000003055", false, OK, OK),
    ("2202000000003055", false, OK, OK),
    ("4111111111111111", false, OK, NSF),
    ("5200828282828210", false, OK, NSF),
    ("2200000022222222", false, OK, NSF),
    ("4000056655665556", false, NSF, NSF),
    ("5404000000000043", false, NSF, NSF),
    ("2203000000000043", false, NSF, NSF),
];

/// The brand from the first digit, as the fake knows only Visa, Mastercard and MIR ranges.
fn brand(pan: &str) -> &'static str {
    match pan.as_bytes().first() {
        Some(b'4') => "Visa",
        Some(b'5') => "MasterCard",
        Some(b'2') => "MIR",
        _ => "Unknown",
    }
}

impl CardBehaviour {
    /// The behaviour of a PAN. A Luhn-valid card that is not in the table is declined by its
    /// "issuer" with 5005 Do Not Honor, without 3-D Secure.
    pub(crate) fn of(pan: &str) -> CardBehaviour {
        match TEST_CARDS.iter().find(|(p, ..)| *p == pan) {
            Some(&(_, three_ds, payment, token)) => CardBehaviour {
                brand: brand(pan),
                three_ds,
                payment,
                token,
            },
            None => CardBehaviour {
                brand: brand(pan),
                three_ds: false,
                payment: CardResult::Decline(ReasonCode::DO_NOT_HONOR),
                token: CardResult::Decline(ReasonCode::DO_NOT_HONOR),
            },
        }
    }
}

/// A card the fake read from a cryptogram: everything it may keep (never the full PAN after the
/// payment is recorded; the PAN is only used to look up the behaviour).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Card {
    pub first_six: String,
    pub last_four: String,
    pub exp: String,
    pub behaviour: CardBehaviour,
    /// The cryptogram's forced decline, if any.
    pub forced_decline: Option<ReasonCode>,
}

impl Card {
    /// Whether the expiry month is over.
    pub(crate) fn expired(&self) -> bool {
        let Some((mm, yy)) = self.exp.split_once('/') else {
            return true;
        };
        let (Ok(month), Ok(year)) = (mm.parse::<i32>(), yy.parse::<i32>()) else {
            return true;
        };
        let now = Utc::now();
        (2000 + year, month) < (now.year(), i32::try_from(now.month()).unwrap_or(12))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Packet {
    pan: String,
    exp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cvv: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    decline: Option<i32>,
}

/// Builds a test cryptogram for `pan` (spaces allowed) expiring `exp` (`MM/YY`).
pub fn test_cryptogram(pan: &str, exp: &str) -> String {
    encode(pan, exp, None)
}

/// Builds a test cryptogram whose payment is declined with `reason` (our convention, for tests of
/// decline handling).
pub fn test_cryptogram_declined(pan: &str, exp: &str, reason: ReasonCode) -> String {
    encode(pan, exp, Some(reason.0))
}

fn encode(pan: &str, exp: &str, decline: Option<i32>) -> String {
    let packet = Packet {
        pan: pan.chars().filter(|c| !c.is_whitespace()).collect(),
        exp: exp.to_owned(),
        cvv: Some("123".to_owned()),
        decline,
    };
    // Serializing a struct of strings cannot fail.
    STANDARD.encode(serde_json::to_vec(&packet).unwrap_or_default())
}

/// Reads a cryptogram by our convention; `None` means "Invalid CardCryptogramPacket value".
pub(crate) fn read_cryptogram(packet: &str) -> Option<Card> {
    let bytes = STANDARD.decode(packet.trim()).ok()?;
    let p: Packet = serde_json::from_slice(&bytes).ok()?;
    let pan: String = p.pan.chars().filter(|c| !c.is_whitespace()).collect();
    if !(13..=19).contains(&pan.len()) || !luhn(&pan) {
        return None;
    }
    let (mm, yy) = p.exp.trim().split_once('/')?;
    let month: u32 = mm.parse().ok()?;
    if mm.len() != 2 || yy.len() != 2 || !(1..=12).contains(&month) || yy.parse::<u32>().is_err() {
        return None;
    }
    Some(Card {
        first_six: pan[..6].to_owned(),
        last_four: pan[pan.len() - 4..].to_owned(),
        exp: p.exp.trim().to_owned(),
        behaviour: CardBehaviour::of(&pan),
        forced_decline: p.decline.map(ReasonCode),
    })
}

fn luhn(pan: &str) -> bool {
    let mut sum = 0;
    for (i, c) in pan.chars().rev().enumerate() {
        let Some(mut d) = c.to_digit(10) else {
            return false;
        };
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_test_card_is_luhn_valid() {
        for (pan, ..) in TEST_CARDS {
            assert!(luhn(pan), "{pan}");
        }
    }

    #[test]
    fn cryptogram_convention() {
        let c = read_cryptogram(&test_cryptogram("4242 4242 4242 4242", "12/30")).unwrap();
        assert_eq!(
            (c.first_six.as_str(), c.last_four.as_str()),
            ("424242", "4242")
        );
        assert!(c.behaviour.three_ds);
        assert!(!c.expired());
        assert_eq!(c.behaviour.brand, "Visa");
        let c = read_cryptogram(&test_cryptogram("4111111111111111", "01/20")).unwrap();
        assert!(c.expired());
        assert_eq!(c.behaviour.token, NSF);
        let c = read_cryptogram(&test_cryptogram_declined(
            "4000000000003055",
            "12/30",
            ReasonCode(5091),
        ))
        .unwrap();
        assert_eq!(c.forced_decline, Some(ReasonCode(5091)));

        for bad in [
            "",
            "not base64!",
            &STANDARD.encode("{}"),
            &STANDARD.encode(r#"{"Pan":"4242424242424241","Exp":"12/30"}"#),
            &STANDARD.encode(r#"{"Pan":"4242424242424242","Exp":"13/30"}"#),
            &STANDARD.encode(r#"{"Pan":"4242424242424242","Exp":"1230"}"#),
        ] {
            assert!(read_cryptogram(bad).is_none(), "{bad}");
        }
    }
}
