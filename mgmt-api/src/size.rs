//! Byte sizes as people write them: `4096`, `"512MiB"`, `"10GiB"`, `"1.5TiB"`, `"100GB"`.
//!
//! Binary units (`K`, `KiB`, `M`, `MiB`, `G`, `GiB`, `T`, `TiB`, `P`, `PiB`) are powers of 1024;
//! decimal units (`kB`, `MB`, `GB`, `TB`, `PB`) are powers of 1000. Units are matched without
//! regard to case, a space may separate the number from the unit, and a fraction is accepted
//! when the result is a whole number of bytes. The same rules apply to the API's `size` field,
//! the CLI's `--size` and `--cache-size`, and the config file's `cache-size`.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// Longest size string accepted; anything longer is not a size.
const SIZE_TEXT_LEN_MAX: usize = 64;

/// Digits accepted after the decimal point; enough for any exact byte count.
const FRACTION_DIGITS_MAX: usize = 18;

/// A count of bytes, parsed from a number or a string with a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl std::str::FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        parse_size(text).map(ByteSize)
    }
}

/// Why a size string was refused. The message names the input and what is accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeError {
    message: String,
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SizeError {}

fn size_error(text: &str, why: &str) -> SizeError {
    SizeError {
        message: format!(
            "invalid size {text:?}: {why} (use a byte count or a number with a unit, \
             such as 4096, 512MiB, 10GiB or 1TiB)"
        ),
    }
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    const KIB: u64 = 1 << 10;
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => KIB,
        "m" | "mib" => KIB.pow(2),
        "g" | "gib" => KIB.pow(3),
        "t" | "tib" => KIB.pow(4),
        "p" | "pib" => KIB.pow(5),
        "kb" => 1000,
        "mb" => 1000u64.pow(2),
        "gb" => 1000u64.pow(3),
        "tb" => 1000u64.pow(4),
        "pb" => 1000u64.pow(5),
        _ => return None,
    };
    Some(multiplier)
}

/// Parses a size such as `"10GiB"` into bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    if text.len() > SIZE_TEXT_LEN_MAX {
        let shown: String = text.chars().take(SIZE_TEXT_LEN_MAX).collect();
        return Err(size_error(&shown, "too long"));
    }
    let trimmed = text.trim();
    let number_len = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(number_len);
    let unit = unit.trim_start();
    if number.is_empty() {
        return Err(size_error(text, "no number"));
    }
    let multiplier =
        unit_multiplier(unit).ok_or_else(|| size_error(text, &format!("unknown unit {unit:?}")))?;
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    if whole.is_empty() || fraction.contains('.') || (number.contains('.') && fraction.is_empty()) {
        return Err(size_error(text, "malformed number"));
    }
    let too_large = || size_error(text, "too large");
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let mut bytes = whole.checked_mul(multiplier).ok_or_else(too_large)?;
    if !fraction.is_empty() {
        if fraction.len() > FRACTION_DIGITS_MAX {
            return Err(size_error(text, "too many digits after the decimal point"));
        }
        // fraction / 10^digits * multiplier must be a whole number of bytes; u128 holds the
        // product of an 18-digit fraction and a multiplier of at most 2^50 without overflow.
        let digits: u128 = fraction
            .parse()
            .map_err(|_| size_error(text, "malformed number"))?;
        let scale = 10u128.pow(fraction.len() as u32);
        let scaled = digits * u128::from(multiplier);
        if !scaled.is_multiple_of(scale) {
            return Err(size_error(text, "not a whole number of bytes"));
        }
        let extra = u64::try_from(scaled / scale).map_err(|_| too_large())?;
        bytes = bytes.checked_add(extra).ok_or_else(too_large)?;
    }
    Ok(bytes)
}

/// Formats bytes for people: `"10 GiB"`, `"1.5 MiB"`, `"512 B"`. Values are rounded to at most
/// two decimals, so this is for display, not for round-tripping.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {unit}")
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte count or a size string such as \"10GiB\"")
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(value))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<ByteSize, E> {
                u64::try_from(value)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {value}: must not be negative")))
            }

            fn visit_f64<E: de::Error>(self, value: f64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "invalid size {value}: a byte count must be a whole number"
                )))
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
                parse_size(text).map(ByteSize).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

impl PartialSchema for ByteSize {
    fn schema() -> RefOr<Schema> {
        let bytes = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )))
            .minimum(Some(0))
            .description(Some("A byte count."));
        let text = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(
                r"^\s*[0-9]+(\.[0-9]+)?\s*([KkMmGgTtPp]([Ii]?[Bb])?|[Bb])?\s*$",
            ))
            .description(Some(
                "A number with a unit: K/KiB, M/MiB, G/GiB, T/TiB, P/PiB are powers of 1024; \
                 kB, MB, GB, TB, PB are powers of 1000.",
            ))
            .examples(["10GiB", "512MiB"]);
        OneOfBuilder::new()
            .item(bytes)
            .item(text)
            .description(Some(
                "A size in bytes, as a number or a string such as \"10GiB\".",
            ))
            .into()
    }
}

impl ToSchema for ByteSize {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ByteSize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 4096 "), Ok(4096));
        assert_eq!(parse_size("4096B"), Ok(4096));
    }

    #[test]
    fn binary_units() {
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10 GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("10gib"), Ok(10 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("16T"), Ok(16 << 40));
        assert_eq!(parse_size("1PiB"), Ok(1 << 50));
    }

    #[test]
    fn decimal_units() {
        assert_eq!(parse_size("1kB"), Ok(1000));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1TB"), Ok(1_000_000_000_000));
    }

    #[test]
    fn fractions_must_give_whole_bytes() {
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.5K"), Ok(512));
        assert!(parse_size("1.1B").is_err());
        assert!(parse_size("0.0001K").is_err());
        assert!(parse_size("1.").is_err());
        assert!(parse_size(".5G").is_err());
        assert!(parse_size("1.2.3G").is_err());
    }

    #[test]
    fn refuses_garbage_with_a_clear_message() {
        for text in ["", "GiB", "10XB", "-1", "ten", "10 GiB extra", "1e9"] {
            let err = parse_size(text).expect_err(text);
            assert!(err.to_string().contains("invalid size"), "{err}");
        }
        assert!(parse_size("10XB")
            .unwrap_err()
            .to_string()
            .contains("unknown unit \"XB\""));
    }

    #[test]
    fn refuses_overflow() {
        assert!(parse_size("18446744073709551616").is_err());
        assert!(parse_size("16384PiB").is_err());
        assert!(parse_size(&"9".repeat(100)).is_err());
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }

    #[test]
    fn deserializes_numbers_and_strings() {
        let size: ByteSize = serde_json::from_str("4096").unwrap();
        assert_eq!(size, ByteSize(4096));
        let size: ByteSize = serde_json::from_str("\"10GiB\"").unwrap();
        assert_eq!(size, ByteSize(10 << 30));
        assert!(serde_json::from_str::<ByteSize>("-1").is_err());
        assert!(serde_json::from_str::<ByteSize>("1.5").is_err());
        assert!(serde_json::from_str::<ByteSize>("true").is_err());
        let err = serde_json::from_str::<ByteSize>("\"lots\"").unwrap_err();
        assert!(err.to_string().contains("invalid size \"lots\""), "{err}");
    }
}
