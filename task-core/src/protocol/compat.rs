//! What Python's side puts on the wire that strict parsers refuse: kombu's body compression,
//! and JSON as Python's `json.dumps` writes it (`NaN`, `Infinity`, integers of any size).

use super::ProtocolError;

/// Largest body a compressed message may inflate to (a bound against compression bombs).
pub const MAX_INFLATED: usize = 64 * 1024 * 1024;

/// Inflates a body compressed as kombu's `compression` header says. kombu registers zlib under
/// `application/x-gzip` (aliases `gzip`, `zlib`); real gzip framing is accepted too.
pub fn decompress(scheme: &str, body: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    use miniz_oxide::inflate::{decompress_to_vec_with_limit, decompress_to_vec_zlib_with_limit};
    let failed = |e: miniz_oxide::inflate::DecompressError| ProtocolError::MalformedBody {
        content_type: "compressed",
        reason: format!("{scheme} body does not inflate: {e}"),
    };
    match scheme {
        "application/x-gzip" | "gzip" | "zlib" | "application/zlib" => {
            if body.starts_with(&[0x1f, 0x8b]) {
                let deflated = gzip_payload(body).ok_or_else(|| ProtocolError::MalformedBody {
                    content_type: "compressed",
                    reason: "truncated gzip header".into(),
                })?;
                decompress_to_vec_with_limit(deflated, MAX_INFLATED).map_err(failed)
            } else {
                decompress_to_vec_zlib_with_limit(body, MAX_INFLATED).map_err(failed)
            }
        }
        other => Err(ProtocolError::UnsupportedCompression(format!(
            "{other} (supported: application/x-gzip, i.e. zlib)"
        ))),
    }
}

/// The deflate stream inside gzip framing (RFC 1952), without the trailer.
fn gzip_payload(b: &[u8]) -> Option<&[u8]> {
    let flags = *b.get(3)?;
    let mut i = 10;
    if flags & 0x04 != 0 {
        let xlen = usize::from(*b.get(i)?) | (usize::from(*b.get(i + 1)?) << 8);
        i += 2 + xlen;
    }
    for bit in [0x08, 0x10] {
        if flags & bit != 0 {
            i += b.get(i..)?.iter().position(|c| *c == 0)? + 1;
        }
    }
    if flags & 0x02 != 0 {
        i += 2;
    }
    let end = b.len().checked_sub(8)?;
    b.get(i..end)
}

/// Rewrites Python's JSON extensions so a strict parser reads it: `NaN`, `Infinity` and
/// `-Infinity` become `null` (JSON has no such numbers, and a task asking for a float sees a
/// missing value rather than a wrong one). Integers beyond 64 bits are refused with a reason:
/// parsing them as floats would silently change the number. `None` when nothing needs changing.
pub fn python_json(text: &[u8]) -> Result<Option<Vec<u8>>, ProtocolError> {
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    let mut in_string = false;
    while i < text.len() {
        let c = text[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else if c == b'"' {
            in_string = true;
        } else if let Some(len) = [&b"-Infinity"[..], b"Infinity", b"NaN"]
            .iter()
            .find(|w| text[i..].starts_with(w))
            .map(|w| w.len())
        {
            let o = out.get_or_insert_with(|| text[..i].to_vec());
            o.extend_from_slice(b"null");
            i += len;
            continue;
        } else if c == b'-' || c.is_ascii_digit() {
            let start = i;
            let mut j = i + usize::from(c == b'-');
            while j < text.len() && text[j].is_ascii_digit() {
                j += 1;
            }
            let digits = &text[start..j];
            let is_integer = !matches!(text.get(j), Some(b'.' | b'e' | b'E'));
            // The rest of a float token: fraction, exponent.
            while j < text.len()
                && matches!(text[j], b'.' | b'e' | b'E' | b'+' | b'-' | b'0'..=b'9')
            {
                j += 1;
            }
            if is_integer && digits.len() > 18 {
                let s = std::str::from_utf8(digits).unwrap_or("");
                if s.parse::<i64>().is_err() && s.parse::<u64>().is_err() {
                    return Err(ProtocolError::MalformedBody {
                        content_type: "JSON",
                        reason: format!(
                            "integer {s} does not fit in 64 bits (send it as a string)"
                        ),
                    });
                }
            }
            if let Some(o) = out.as_mut() {
                o.extend_from_slice(&text[start..j]);
            }
            i = j;
            continue;
        }
        if let Some(o) = out.as_mut() {
            o.push(c);
        }
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_floats_and_big_integers() {
        let fixed = python_json(br#"[NaN, -Infinity, "NaN in text", Infinity, 1.5e3]"#)
            .unwrap()
            .unwrap();
        assert_eq!(fixed, br#"[null, null, "NaN in text", null, 1.5e3]"#);
        assert_eq!(
            python_json(br#"[1, "x", 18446744073709551615]"#).unwrap(),
            None
        );
        let err = python_json(b"[123456789012345678901234567890]").unwrap_err();
        assert!(err.to_string().contains("does not fit in 64 bits"), "{err}");
        assert!(
            python_json(b"[1.2345678901234567890123]")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn zlib_and_gzip_bodies_inflate() {
        let text = br#"[[2, 3], {}, {}]"#;
        let zlib = miniz_oxide::deflate::compress_to_vec_zlib(text, 6);
        assert_eq!(decompress("application/x-gzip", &zlib).unwrap(), text);
        let raw = miniz_oxide::deflate::compress_to_vec(text, 6);
        let mut gzip = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
        gzip.extend_from_slice(&raw);
        gzip.extend_from_slice(&[0; 8]);
        assert_eq!(decompress("gzip", &gzip).unwrap(), text);
        assert!(matches!(
            decompress("application/x-bz2", text),
            Err(ProtocolError::UnsupportedCompression(_))
        ));
        assert!(decompress("zlib", b"not deflate").is_err());
    }
}
