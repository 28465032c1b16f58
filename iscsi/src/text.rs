//! Text key=value pairs of login and text requests (RFC 7143 section 6.1): parsing of the
//! NUL-terminated pairs with bounds on every count and length, their encoding, and the value
//! forms of section 6.1.1 (booleans, numbers, ranges, lists, binary values in hex or base64).
//!
//! Login uses this module now; full feature phase reuses [`parse_pairs`] and [`encode_pairs`]
//! for Text requests (SendTargets).

use thiserror::Error;

/// Longest key name (RFC 7143 section 6.1: "key-name ... no more than 63 bytes").
pub const KEY_LENGTH_MAX_BYTES: usize = 63;

/// Longest value [`parse_pairs`] accepts. Most keys allow only [`VALUE_LENGTH_MAX_BYTES`];
/// binary values such as CHAP challenges may be longer, so the parser admits the largest and
/// each key checks its own bound.
pub const LONG_VALUE_LENGTH_MAX_BYTES: usize = 8192;

/// Longest value of most keys (RFC 7143 section 6.1: "maximum length of an individual value
/// ... 255 bytes").
pub const VALUE_LENGTH_MAX_BYTES: usize = 255;

/// The answer to a key the responder does not know (RFC 7143 section 6.2).
pub const NOT_UNDERSTOOD: &str = "NotUnderstood";
/// The answer to a key that does not matter given other negotiated values.
pub const IRRELEVANT: &str = "Irrelevant";
/// The answer to an offer with no acceptable value (or a value out of range).
pub const REJECT: &str = "Reject";

/// Why a text data segment could not be parsed. Each comes from the peer's bytes; login turns
/// them into an "initiator error" status, text requests into a reject.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TextError {
    #[error("the last key=value pair is not terminated by a NUL")]
    MissingTerminator,
    #[error("a pair has no '='")]
    MissingEquals,
    #[error("a pair has an empty key")]
    EmptyKey,
    #[error("key of {length_bytes} bytes is longer than {KEY_LENGTH_MAX_BYTES}")]
    KeyTooLong { length_bytes: usize },
    #[error("key contains a character outside a-z A-Z 0-9 . - + @ _")]
    InvalidKey,
    #[error("value of key {key:?} has {length_bytes} bytes, more than {limit_bytes}")]
    ValueTooLong {
        key: String,
        length_bytes: usize,
        limit_bytes: usize,
    },
    #[error("text is not UTF-8")]
    NotUtf8,
    #[error("more than {pairs_max} key=value pairs")]
    TooManyPairs { pairs_max: usize },
}

/// Splits a text data segment into `(key, value)` pairs in the order sent, accepting at most
/// `pairs_max` pairs. Every pair must end with a NUL (RFC 7143 section 6.1: "including the
/// last or only pair"). Empty strings between NULs carry no pair and are skipped, since some
/// senders pad with NULs.
pub fn parse_pairs(data: &[u8], pairs_max: usize) -> Result<Vec<(&str, &str)>, TextError> {
    if data.last().is_some_and(|&byte| byte != 0) {
        return Err(TextError::MissingTerminator);
    }
    let mut pairs = Vec::new();
    // The last split piece is the empty tail after the final NUL.
    for raw in data.split(|&byte| byte == 0) {
        if raw.is_empty() {
            continue;
        }
        if pairs.len() == pairs_max {
            return Err(TextError::TooManyPairs { pairs_max });
        }
        let text = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (key, value) = text.split_once('=').ok_or(TextError::MissingEquals)?;
        check_key(key)?;
        if value.len() > LONG_VALUE_LENGTH_MAX_BYTES {
            return Err(TextError::ValueTooLong {
                key: key.to_owned(),
                length_bytes: value.len(),
                limit_bytes: LONG_VALUE_LENGTH_MAX_BYTES,
            });
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

fn check_key(key: &str) -> Result<(), TextError> {
    if key.is_empty() {
        return Err(TextError::EmptyKey);
    }
    if key.len() > KEY_LENGTH_MAX_BYTES {
        return Err(TextError::KeyTooLong {
            length_bytes: key.len(),
        });
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '@' | '_');
    if !key.chars().all(allowed) {
        return Err(TextError::InvalidKey);
    }
    Ok(())
}

/// Checks a value against the usual 255-byte bound, for keys that have no longer one.
pub fn check_value_length<'a>(key: &str, value: &'a str) -> Result<&'a str, TextError> {
    if value.len() > VALUE_LENGTH_MAX_BYTES {
        return Err(TextError::ValueTooLong {
            key: key.to_owned(),
            length_bytes: value.len(),
            limit_bytes: VALUE_LENGTH_MAX_BYTES,
        });
    }
    Ok(value)
}

/// Appends one `key=value\0` pair.
pub fn encode_pair(out: &mut Vec<u8>, key: &str, value: &str) {
    out.reserve(key.len() + value.len() + 2);
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value.as_bytes());
    out.push(0);
}

/// Encodes pairs as a text data segment.
pub fn encode_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in pairs {
        encode_pair(&mut out, key.as_ref(), value.as_ref());
    }
    out
}

/// A boolean value: exactly "Yes" or "No" (RFC 7143 section 6.1.1).
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

pub fn bool_value(value: bool) -> &'static str {
    if value {
        "Yes"
    } else {
        "No"
    }
}

/// A numerical value: decimal, or hex with a `0x`/`0X` prefix (RFC 7143 section 6.1.1
/// "decimal-constant" and "hex-constant"). `None` when malformed or above `u64`.
pub fn parse_number(value: &str) -> Option<u64> {
    if let Some(digits) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(digits, 16).ok();
    }
    if value.is_empty() || !value.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// A numerical range `low~high` with `low <= high` (RFC 7143 section 6.1.1).
pub fn parse_range(value: &str) -> Option<(u64, u64)> {
    let (low, high) = value.split_once('~')?;
    let (low, high) = (parse_number(low)?, parse_number(high)?);
    (low <= high).then_some((low, high))
}

/// The items of a list value ("CRC32C,None"), in the sender's order of preference.
pub fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',')
}

/// A binary value: `0x`/`0X` then hex digits (an odd count gets an implied leading zero), or
/// `0b`/`0B` then base64 (RFC 7143 section 6.1.1 "hex-constant" and "base64-constant").
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    if let Some(digits) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        if digits.is_empty() {
            return None;
        }
        if !digits.len().is_multiple_of(2) {
            return hex::decode(format!("0{digits}")).ok();
        }
        return hex::decode(digits).ok();
    }
    if let Some(encoded) = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))
    {
        return decode_base64(encoded);
    }
    None
}

/// Encodes bytes as a hex binary value, `0x` and lowercase digits (some initiators, libiscsi
/// among them, decode only lowercase).
pub fn encode_hex(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

/// Standard base64 (RFC 4648) with `=` padding, which RFC 7143 requires for base64 values.
fn decode_base64(encoded: &str) -> Option<Vec<u8>> {
    let bytes = encoded.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    let sextet = |byte: u8| -> Option<u32> {
        match byte {
            b'A'..=b'Z' => Some(u32::from(byte - b'A')),
            b'a'..=b'z' => Some(u32::from(byte - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(byte - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    };
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (index, quad) in bytes.chunks_exact(4).enumerate() {
        let padding = quad.iter().rev().take_while(|&&byte| byte == b'=').count();
        // Padding only at the very end, and at most two characters of it.
        if padding > 2 || (padding > 0 && index + 1 != quads) {
            return None;
        }
        let mut word = 0u32;
        for &byte in &quad[..4 - padding] {
            word = (word << 6) | sextet(byte)?;
        }
        word <<= 6 * padding as u32;
        let decoded = [(word >> 16) as u8, (word >> 8) as u8, word as u8];
        out.extend_from_slice(&decoded[..3 - padding]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc7143_6_1_parses_pairs_in_order() {
        let pairs = parse_pairs(b"InitiatorName=iqn.x\0HeaderDigest=CRC32C,None\0", 8);
        assert_eq!(
            pairs,
            Ok(vec![
                ("InitiatorName", "iqn.x"),
                ("HeaderDigest", "CRC32C,None")
            ])
        );
        assert_eq!(parse_pairs(b"", 8), Ok(vec![]));
        // Values may contain '='; only the first one splits.
        assert_eq!(parse_pairs(b"X-a=b=c\0", 8), Ok(vec![("X-a", "b=c")]));
        assert_eq!(parse_pairs(b"A=\0\0\0", 8), Ok(vec![("A", "")]));
    }

    #[test]
    fn rfc7143_6_1_rejects_malformed_text() {
        assert_eq!(parse_pairs(b"A=b", 8), Err(TextError::MissingTerminator));
        assert_eq!(parse_pairs(b"Ab\0", 8), Err(TextError::MissingEquals));
        assert_eq!(parse_pairs(b"=b\0", 8), Err(TextError::EmptyKey));
        assert_eq!(parse_pairs(b"A b=c\0", 8), Err(TextError::InvalidKey));
        assert_eq!(parse_pairs(b"A=\xff\0", 8), Err(TextError::NotUtf8));
        let long_key = format!("{}=1\0", "K".repeat(64));
        assert_eq!(
            parse_pairs(long_key.as_bytes(), 8),
            Err(TextError::KeyTooLong { length_bytes: 64 })
        );
        let ok_key = format!("{}=1\0", "K".repeat(63));
        assert!(parse_pairs(ok_key.as_bytes(), 8).is_ok());
        let long_value = format!("A={}\0", "v".repeat(8193));
        assert!(matches!(
            parse_pairs(long_value.as_bytes(), 8),
            Err(TextError::ValueTooLong { .. })
        ));
        assert_eq!(
            parse_pairs(b"A=1\0B=2\0C=3\0", 2),
            Err(TextError::TooManyPairs { pairs_max: 2 })
        );
    }

    #[test]
    fn encodes_pairs_with_terminators() {
        assert_eq!(
            encode_pairs(&[("A", "1"), ("B", "Yes")]),
            b"A=1\0B=Yes\0".to_vec()
        );
        let text = encode_pairs(&[("MaxBurstLength", "262144")]);
        assert_eq!(
            parse_pairs(&text, 1),
            Ok(vec![("MaxBurstLength", "262144")])
        );
    }

    #[test]
    fn rfc7143_6_1_1_value_forms() {
        assert_eq!(parse_bool("Yes"), Some(true));
        assert_eq!(parse_bool("No"), Some(false));
        assert_eq!(parse_bool("yes"), None);
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x2000"), Some(8192));
        assert_eq!(parse_number("0X2000"), Some(8192));
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number("+1"), None);
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
        assert_eq!(parse_range("512~8192"), Some((512, 8192)));
        assert_eq!(parse_range("8192~512"), None);
        assert_eq!(
            list_items("CRC32C,None").collect::<Vec<_>>(),
            vec!["CRC32C", "None"]
        );
    }

    #[test]
    fn rfc7143_6_1_1_binary_values() {
        assert_eq!(decode_binary("0x0aff"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0XAFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("aff"), None);
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0BAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQ=="), Some(vec![1]));
        assert_eq!(decode_binary("0bAQ"), None);
        assert_eq!(decode_binary("0bA==="), None);
        assert_eq!(decode_binary("0bAQ==AQID"), None);
        assert_eq!(decode_binary("0b"), None);
        assert_eq!(decode_binary("0b+/+/"), Some(vec![0xfb, 0xff, 0xbf]));
        assert_eq!(encode_hex(&[0xab, 0x01]), "0xab01");
    }
}
