//! Refs on the command line: `VOL` means `VOL@main`; `VOL@BRANCH`, `VOL@TAG` and `VOL@COMMIT`
//! (full id or unique prefix) name the rest.

use grove_engine::{validate_ref_name, RefSpec, MAIN_BRANCH};
use grove_mgmt_api::error::ApiError;
use grove_mgmt_api::validate;

/// A ref as the API takes it: a volume and a name within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRef {
    pub volume: String,
    pub name: String,
}

/// Parses `VOL` or `VOL@NAME`.
pub fn parse(text: &str) -> anyhow::Result<VolumeRef> {
    let spec = RefSpec::parse(text).map_err(ApiError::from)?;
    Ok(VolumeRef {
        volume: spec.volume,
        name: spec.name.unwrap_or_else(|| MAIN_BRANCH.to_string()),
    })
}

/// Parses the branch a commit goes to: `VOL` (main) or `VOL@BRANCH`.
pub fn parse_branch(text: &str) -> anyhow::Result<VolumeRef> {
    let parsed = parse(text)?;
    validate::branch_name(&parsed.name)?;
    Ok(parsed)
}

/// A ref given next to a volume argument (`--from REF`, `tag create VOL TAG REF`): `VOL@NAME`
/// of that volume, `VOL` alone for its main branch, or a bare `NAME` within it. Returns the
/// name within the volume.
pub fn name_in_volume(volume: &str, text: &str) -> anyhow::Result<String> {
    validate::volume_name(volume)?;
    if text.contains('@') {
        let parsed = parse(text)?;
        if parsed.volume != volume {
            anyhow::bail!(
                "ref {text:?} is in volume {:?}, not in {volume:?}",
                parsed.volume
            );
        }
        return Ok(parsed.name);
    }
    if text == volume {
        return Ok(MAIN_BRANCH.to_string());
    }
    validate_ref_name("ref", text).map_err(ApiError::from)?;
    Ok(text.to_string())
}

/// A full ref, `VOL@NAME`, from `VOL` or `VOL@NAME`.
pub fn full(text: &str) -> anyhow::Result<String> {
    let parsed = parse(text)?;
    Ok(format!("{}@{}", parsed.volume, parsed.name))
}

/// A ref given next to a volume argument to an operation that may reach a volume sharing its
/// history (`merge --from`, `reset`): a full `VOL@NAME` of any volume, `VOL` alone for its main
/// branch, or a bare `NAME` within `volume`. Returns what the API takes.
pub fn ref_in_context(volume: &str, text: &str) -> anyhow::Result<String> {
    validate::volume_name(volume)?;
    if text.contains('@') {
        return full(text);
    }
    if text == volume {
        return Ok(MAIN_BRANCH.to_string());
    }
    validate_ref_name("ref", text).map_err(ApiError::from)?;
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume_ref(volume: &str, name: &str) -> VolumeRef {
        VolumeRef {
            volume: volume.into(),
            name: name.into(),
        }
    }

    #[test]
    fn commit_targets() {
        assert_eq!(parse_branch("vm").unwrap(), volume_ref("vm", "main"));
        assert_eq!(parse_branch("vm@dev").unwrap(), volume_ref("vm", "dev"));
        assert_eq!(
            parse_branch("vm-1@feature/x.2").unwrap(),
            volume_ref("vm-1", "feature/x.2")
        );
        for bad in ["", "@dev", "vm@", "VM@dev", "vm@a@b", "vm@a b", "vm_1"] {
            assert!(parse_branch(bad).is_err(), "{bad:?}");
        }
        let message = parse_branch("Vm").unwrap_err().to_string();
        assert!(message.contains("invalid volume name"), "{message}");
    }

    #[test]
    fn log_refs() {
        assert_eq!(parse("vm").unwrap(), volume_ref("vm", "main"));
        assert_eq!(parse("vm@v1.0").unwrap(), volume_ref("vm", "v1.0"));
        assert_eq!(parse("vm@3f2a9c").unwrap(), volume_ref("vm", "3f2a9c"));
    }

    #[test]
    fn refs_next_to_a_volume() {
        assert_eq!(name_in_volume("vm", "vm").unwrap(), "main");
        assert_eq!(name_in_volume("vm", "vm@v1").unwrap(), "v1");
        assert_eq!(name_in_volume("vm", "v1").unwrap(), "v1");
        assert_eq!(name_in_volume("vm", "3f2a").unwrap(), "3f2a");
        assert!(name_in_volume("vm", "other@v1")
            .unwrap_err()
            .to_string()
            .contains("not in \"vm\""));
        assert!(name_in_volume("vm", "a b").is_err());
        assert!(name_in_volume("vm", "vm@").is_err());
        assert!(name_in_volume("VM", "main").is_err());
    }

    #[test]
    fn refs_in_context() {
        assert_eq!(full("vm").unwrap(), "vm@main");
        assert_eq!(full("vm@dev/1").unwrap(), "vm@dev/1");
        assert!(full("vm@").is_err());
        assert_eq!(ref_in_context("vm", "vm").unwrap(), "main");
        assert_eq!(ref_in_context("vm", "dev").unwrap(), "dev");
        assert_eq!(ref_in_context("vm", "clone@v1").unwrap(), "clone@v1");
        assert_eq!(ref_in_context("vm", "clone").unwrap(), "clone");
        assert!(ref_in_context("vm", "a b").is_err());
        assert!(ref_in_context("vm", "x@").is_err());
    }
}
