//! Entry points for the fuzz targets in `fuzz/` (`fuzz/fuzz_targets/engine_decoders.rs`): thin
//! wrappers around the decoders of on-disk structures that are private to the engine. Not an
//! API: hidden from the documentation, and free to change with the decoders.
//!
//! Each wrapper decodes `bytes` the way a pool open or a read does and returns whether the
//! input was accepted; what matters to the fuzzers is that no input panics, hangs or allocates
//! without bound.

use crate::error::Result;

/// Decodes an extent-map node page (`meta.rs`, `Node::decode`) as page `page_no`.
pub fn decode_node(page: &[u8], page_no: u64) -> Result<()> {
    crate::meta::Node::decode(page, page_no).map(|_| ())
}

/// Parses a journal record payload (`catalog::Record`) and replays its catalog changes and
/// head records on an empty catalog, as a pool open does.
pub fn replay_record(payload: &[u8]) -> Result<()> {
    let record: crate::catalog::Record = serde_json::from_slice(payload)
        .map_err(|e| crate::Error::corrupt(format!("journal record ({e})"), "fuzz input"))?;
    let mut catalog = crate::catalog::Catalog::default();
    let crate::catalog::Record::Sync { ops, heads, .. } = record else {
        return Ok(());
    };
    for op in &ops {
        catalog.apply(op)?;
    }
    for head in &heads {
        catalog.apply_head(head)?;
    }
    Ok(())
}

/// Parses the events of a journal record as the event log reads them.
pub fn decode_record_events(payload: &[u8]) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct RecordEvents {
        #[serde(default)]
        #[allow(dead_code)]
        events: Vec<crate::events::LoggedEvent>,
    }
    serde_json::from_slice::<RecordEvents>(payload)
        .map(|_| ())
        .map_err(|e| crate::Error::corrupt(format!("journal record ({e})"), "fuzz input"))
}

/// Decodes a commit bitmap blob (the portable roaring format), as `history::read_bitmap` does
/// once the blob's checksum matched.
pub fn decode_bitmap(bytes: &[u8]) -> Result<u64> {
    roaring::RoaringTreemap::deserialize_from(bytes)
        .map(|bitmap| bitmap.len())
        .map_err(crate::Error::Io)
}
