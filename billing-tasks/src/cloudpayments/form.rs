//! The gateway's dialect of `application/x-www-form-urlencoded` (§6.1): the .NET encoder's.
//!
//! Spaces become `+`, hex escapes are **lower-case** (`%d0%a1`, `%3a`), empty values are sent as
//! `Key=`, and only ASCII letters, digits and `-_.!*()` stay as they are. Notification signatures
//! (§6.4) are computed over these exact bytes, so the fake must produce them byte for byte; the
//! decoder accepts either hex case and keeps a malformed escape as literal text, as lenient form
//! parsers do.

/// Why a form body could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// The decoded bytes are not UTF-8 (a terminal configured for Windows-1251, for instance).
    #[error("form body is not UTF-8 once decoded")]
    NotUtf8,
}

/// Encodes pairs in order, .NET style: `A=1&B=x+y&Empty=`.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode_component_into(k.as_ref(), &mut out);
        out.push('=');
        encode_component_into(v.as_ref(), &mut out);
    }
    out
}

/// Encodes one key or value, .NET style.
pub fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_component_into(s, &mut out);
    out
}

fn encode_component_into(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z'
            | b'a'..=b'z'
            | b'0'..=b'9'
            | b'-'
            | b'_'
            | b'.'
            | b'!'
            | b'*'
            | b'('
            | b')' => out.push(char::from(b)),
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
    }
}

/// Decodes one key or value: `+` is a space, `%xx` a byte (either case).
pub fn decode_component(s: &str) -> Result<String, FormError> {
    String::from_utf8(decode_bytes(s.as_bytes())).map_err(|_| FormError::NotUtf8)
}

/// Decodes a whole body as one string (`&` and `=` stay): what `X-Content-HMAC` is computed over.
pub fn decode_whole(body: &[u8]) -> Result<String, FormError> {
    String::from_utf8(decode_bytes(body)).map_err(|_| FormError::NotUtf8)
}

fn decode_bytes(s: &[u8]) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                s.get(i + 1).copied().and_then(hex),
                s.get(i + 2).copied().and_then(hex),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                // A stray `%` is kept as text rather than failing the whole notification.
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Parses a body into decoded pairs in order. A segment without `=` is a key with an empty value;
/// empty segments (`a=1&&b=2`) are skipped.
pub fn parse(body: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    body.split(|&b| b == b'&')
        .filter(|seg| !seg.is_empty())
        .map(|seg| {
            let (k, v) = match seg.iter().position(|&b| b == b'=') {
                Some(at) => (&seg[..at], &seg[at + 1..]),
                None => (seg, &[][..]),
            };
            let k = String::from_utf8(decode_bytes(k)).map_err(|_| FormError::NotUtf8)?;
            let v = String::from_utf8(decode_bytes(v)).map_err(|_| FormError::NotUtf8)?;
            Ok((k, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dotnet_style() {
        let body = encode(&[
            ("Name", "VLADIMIR KOCHNEV"),
            ("AccountId", "user@example.com"),
            ("DateTime", "2015-11-17 14:51:20"),
            ("CardExpDate", "01/19"),
            ("IpCity", "Санкт-Петербург"),
            ("SubscriptionId", ""),
        ]);
        assert_eq!(
            body,
            "Name=VLADIMIR+KOCHNEV&AccountId=user%40example.com&DateTime=2015-11-17+14%3a51%3a20\
             &CardExpDate=01%2f19&IpCity=%d0%a1%d0%b0%d0%bd%d0%ba%d1%82-%d0%9f%d0%b5%d1%82%d0%b5\
             %d1%80%d0%b1%d1%83%d1%80%d0%b3&SubscriptionId="
        );
        let back = parse(body.as_bytes()).unwrap();
        assert_eq!(back[0], ("Name".into(), "VLADIMIR KOCHNEV".into()));
        assert_eq!(back[4].1, "Санкт-Петербург");
        assert_eq!(back[5], ("SubscriptionId".into(), String::new()));
    }

    #[test]
    fn lenient_decoding() {
        assert_eq!(decode_component("%D0%A1%d0%b0").unwrap(), "Са");
        assert_eq!(decode_component("100%").unwrap(), "100%");
        assert_eq!(decode_component("%zz").unwrap(), "%zz");
        assert_eq!(decode_component("%ff"), Err(FormError::NotUtf8));
        assert_eq!(
            parse(b"a=1&&b&c=x=y").unwrap(),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), String::new()),
                ("c".into(), "x=y".into())
            ]
        );
    }

    proptest! {
        #[test]
        fn round_trip(pairs in proptest::collection::vec(("\\PC{0,12}", "\\PC{0,24}"), 0..8)) {
            let pairs: Vec<(String, String)> = pairs.into_iter().filter(|(k, _)| !k.is_empty()).collect();
            let body = encode(&pairs);
            prop_assert!(body.bytes().all(|b| b.is_ascii_graphic()));
            for esc in body.split('%').skip(1) {
                prop_assert!(esc.bytes().take(2).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            }
            prop_assert_eq!(parse(body.as_bytes()).unwrap(), pairs);
        }
    }
}
