//! Target names: every ref of every volume is an iSCSI target with a name derived from the
//! ref by a reversible rule.
//!
//! - `VOL` (the main branch) is `iqn.2026-11.io.grove:VOL`.
//! - `VOL@REF` (a branch, tag, commit id or unique commit prefix) is
//!   `iqn.2026-11.io.grove:VOL.ENCODED-REF`.
//!
//! Volume names never contain '.', so the first '.' after the prefix ends the volume. iSCSI
//! names are lowercase letters, digits, '-', '.' and ':' (RFC 3722; initiators fold case), so
//! the ref keeps those characters (but ':') as they are, and every other byte is written as
//! ':' and two lowercase hex digits: branch `feature/Big_1` is `feature:2f:42ig:5f1`. Decoding
//! is the exact inverse. Names are compared after folding ASCII case (RFC 3722 maps
//! uppercase to lowercase), so `IQN.2026-11.IO.GROVE:VOL` reaches the same target.

/// The naming authority of every grove target.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.grove:";

/// The target name of an export name (`VOL` or `VOL@REF`).
pub fn target_name(export: &str) -> String {
    let Some((volume, reference)) = export.split_once('@') else {
        return format!("{IQN_PREFIX}{export}");
    };
    let mut name = format!("{IQN_PREFIX}{volume}.");
    for byte in reference.bytes() {
        match byte {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' => name.push(byte as char),
            _ => name.push_str(&format!(":{byte:02x}")),
        }
    }
    name
}

/// The export name (`VOL` or `VOL@REF`) a target name stands for, or `None` if it is not
/// one of ours or is malformed.
pub fn export_name(target: &str) -> Option<String> {
    let target = target.to_ascii_lowercase();
    let rest = target.strip_prefix(IQN_PREFIX)?;
    let Some((volume, encoded)) = rest.split_once('.') else {
        return valid_volume(rest).then(|| rest.to_string());
    };
    if !valid_volume(volume) || encoded.is_empty() {
        return None;
    }
    let mut reference = Vec::with_capacity(encoded.len());
    let bytes = encoded.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b':' {
            let hex = encoded.get(at + 1..at + 3)?;
            reference.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            reference.push(bytes[at]);
            at += 1;
        }
    }
    let reference = String::from_utf8(reference).ok()?;
    Some(format!("{volume}@{reference}"))
}

fn valid_volume(volume: &str) -> bool {
    !volume.is_empty()
        && volume
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_branch_and_refs_have_the_documented_names() {
        assert_eq!(target_name("data"), "iqn.2026-11.io.grove:data");
        assert_eq!(target_name("data@dev"), "iqn.2026-11.io.grove:data.dev");
        assert_eq!(
            target_name("data@feature/Big_1"),
            "iqn.2026-11.io.grove:data.feature:2f:42ig:5f1"
        );
        assert_eq!(target_name("data@v1.0"), "iqn.2026-11.io.grove:data.v1.0");
    }

    #[test]
    fn names_decode_to_the_refs_they_came_from() {
        for export in [
            "data",
            "data@main",
            "data@dev",
            "vm-7@feature/Big_1",
            "a@v1.0.2",
            "a@UPPER.case/x-y_z",
            "a@0123abcd",
        ] {
            let name = target_name(export);
            assert!(name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:".contains(&b)));
            assert_eq!(export_name(&name).as_deref(), Some(export), "{name}");
            assert_eq!(
                export_name(&name.to_ascii_uppercase()).as_deref(),
                Some(export)
            );
        }
    }

    #[test]
    fn foreign_or_malformed_names_are_refused() {
        for name in [
            "iqn.2026-11.io.other:data",
            "iqn.2026-11.io.grove:",
            "iqn.2026-11.io.grove:data.",
            "iqn.2026-11.io.grove:da_ta",
            "iqn.2026-11.io.grove:data.x:2",
            "iqn.2026-11.io.grove:data.x:zz",
            "iqn.2026-11.io.grove:data.x:ff",
            "",
        ] {
            assert_eq!(export_name(name), None, "{name}");
        }
    }
}
