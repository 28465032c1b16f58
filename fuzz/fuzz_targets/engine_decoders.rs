//! Every decoder of the engine's on-disk structures (`engine/src/format/`, FORMAT.md) on
//! arbitrary bytes: file headers, extent-map node pages, journal record framing, journal
//! record payloads (parsed and replayed on an empty catalog), the event log's view of a
//! record, and commit bitmaps.
//!
//! The first input byte picks the decoder, so that each keeps its own corpus entries; the
//! rest is the structure's bytes. Node pages are tried twice: as given, and with a valid
//! checksum and page number stamped in, so that the checks behind the checksum are reached.

#![no_main]

use grove_engine::format::{
    check_page, decode_records, intact_record_after, seal_page, FileHeader, DATA_MAGIC,
    JOURNAL_MAGIC, META_MAGIC, PAGE_SIZE,
};
use grove_engine::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    match selector % 6 {
        0 => {
            for magic in [DATA_MAGIC, META_MAGIC, JOURNAL_MAGIC] {
                let _ = FileHeader::decode(bytes, magic, "fuzz");
            }
        }
        1 => {
            let page_no = bytes
                .get(16..24)
                .map_or(1, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            let _ = check_page(bytes, page_no);
            let _ = fuzzing::decode_node(bytes, page_no);
            // The same page made whole and checksummed, as the engine writes pages.
            let mut page = bytes.to_vec();
            page.resize(PAGE_SIZE, 0);
            seal_page(&mut page);
            let _ = fuzzing::decode_node(&page, page_no);
        }
        2 => {
            let (records, valid) = decode_records(bytes);
            assert!(valid <= bytes.len());
            assert!(records.iter().all(|r| r.len() <= valid));
            if let Some(at) = intact_record_after(bytes, valid) {
                assert!(at > valid && !decode_records(&bytes[at..]).0.is_empty());
            }
        }
        3 => {
            let _ = fuzzing::replay_record(bytes);
        }
        4 => {
            let _ = fuzzing::decode_record_events(bytes);
        }
        _ => {
            let _ = fuzzing::decode_bitmap(bytes);
        }
    }
});
