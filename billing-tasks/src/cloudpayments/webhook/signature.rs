//! Notification signatures (§6.4): HMAC-SHA256 keyed with the API secret, base64 (standard,
//! padded). `Content-HMAC` covers the raw body bytes exactly as sent; `X-Content-HMAC` covers the
//! same body URL-decoded (`+` as space). Verification compares in constant time.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::cloudpayments::form;
use crate::secret::Secret;

/// Header with the signature of the raw body.
pub const CONTENT_HMAC: &str = "Content-HMAC";
/// Header with the signature of the URL-decoded body.
pub const X_CONTENT_HMAC: &str = "X-Content-HMAC";

fn mac(secret: &Secret<String>, message: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(message);
    mac
}

/// The `Content-HMAC` value for `body`.
pub fn sign(secret: &Secret<String>, body: &[u8]) -> String {
    STANDARD.encode(mac(secret, body).finalize().into_bytes())
}

/// Whether `header_value` is the `Content-HMAC` of `body` (constant-time comparison). A value
/// that is not base64 is simply wrong.
pub fn verify(secret: &Secret<String>, body: &[u8], header_value: &str) -> bool {
    let Ok(expected) = STANDARD.decode(header_value.trim()) else {
        return false;
    };
    mac(secret, body).verify_slice(&expected).is_ok()
}

/// The `X-Content-HMAC` value for `body`: the signature of the body URL-decoded as a whole.
/// `None` when the decoded body is not UTF-8.
pub fn sign_decoded(secret: &Secret<String>, body: &[u8]) -> Option<String> {
    let decoded = form::decode_whole(body).ok()?;
    Some(sign(secret, decoded.as_bytes()))
}

/// Whether `header_value` is the `X-Content-HMAC` of `body` (constant-time comparison).
pub fn verify_decoded(secret: &Secret<String>, body: &[u8], header_value: &str) -> bool {
    form::decode_whole(body).is_ok_and(|decoded| verify(secret, decoded.as_bytes(), header_value))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// §6.4: the gem's test vector (secret `pass`).
    pub(crate) const VECTOR_BODY: &str = "TransactionId=666&Amount=123.00&Currency=RUB&PaymentAmount=123.00&PaymentCurrency=RUB&InvoiceId=1234567&AccountId=user%40example.com&SubscriptionId=&Name=VLADIMIR+KOCHNEV&Email=user%40example.com&DateTime=2015-11-17+14%3a51%3a20&IpAddress=127.0.0.1&IpCountry=RU&IpCity=%d0%a1%d0%b0%d0%bd%d0%ba%d1%82-%d0%9f%d0%b5%d1%82%d0%b5%d1%80%d0%b1%d1%83%d1%80%d0%b3&IpRegion=%d0%a1%d0%b0%d0%bd%d0%ba%d1%82-%d0%9f%d0%b5%d1%82%d0%b5%d1%80%d0%b1%d1%83%d1%80%d0%b3&IpDistrict=%d0%a1%d0%b5%d0%b2%d0%b5%d1%80%d0%be-%d0%97%d0%b0%d0%bf%d0%b0%d0%b4%d0%bd%d1%8b%d0%b9+%d1%84%d0%b5%d0%b4%d0%b5%d1%80%d0%b0%d0%bb%d1%8c%d0%bd%d1%8b%d0%b9+%d0%be%d0%ba%d1%80%d1%83%d0%b3&IpLatitude=59.939000&IpLongitude=30.315800&CardFirstSix=411111&CardLastFour=1111&CardType=Visa&CardExpDate=01%2f19&Issuer=&IssuerBankCountry=&Description=%d0%9e%d0%bf%d0%bb%d0%b0%d1%82%d0%b0+%d0%b2+example.com&AuthCode=DEADBEEF&Token=1234567890&TestMode=1&Status=Completed";

    #[test]
    fn documented_vector() {
        let secret = Secret::new("pass".to_owned());
        let body = VECTOR_BODY.as_bytes();
        assert_eq!(
            sign(&secret, body),
            "tJW02TMAce4Em8eJTNqjhOax+BYRM5K2D8mX9xsmUUc="
        );
        assert!(verify(
            &secret,
            body,
            "tJW02TMAce4Em8eJTNqjhOax+BYRM5K2D8mX9xsmUUc="
        ));
        assert!(verify(
            &secret,
            body,
            " tJW02TMAce4Em8eJTNqjhOax+BYRM5K2D8mX9xsmUUc=\r\n"
        ));
        assert_eq!(
            sign_decoded(&secret, body).as_deref(),
            Some("fFZ7aYvfBM6M494rVz5jg1YQ6fTDu6NGTDCIqxeLfqA=")
        );
        assert!(verify_decoded(
            &secret,
            body,
            "fFZ7aYvfBM6M494rVz5jg1YQ6fTDu6NGTDCIqxeLfqA="
        ));
    }

    #[test]
    fn anything_else_fails() {
        let secret = Secret::new("pass".to_owned());
        let good = sign(&secret, b"a=1");
        assert!(!verify(&Secret::new("other".to_owned()), b"a=1", &good));
        assert!(!verify(&secret, b"a=2", &good));
        assert!(!verify(&secret, b"a=1", "not base64!"));
        assert!(!verify(&secret, b"a=1", ""));
        assert!(!verify(&secret, b"a=1", &good[..good.len() - 4]));
    }
}
