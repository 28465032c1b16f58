//! Every on-disk layout of a pool, as little-endian zerocopy structs with magic, version and
//! checksum. `engine/FORMAT.md` holds the prose: invariants, the sync protocol and what is
//! assumed of the disk.
//!
//! Files of a pool directory:
//! - `data.grove`: 4 KiB data blocks; block 0 is a [`FileHeader`].
//! - `meta.grove`: 4 KiB metadata pages; page 0 is a [`FileHeader`], the others are extent-map
//!   nodes ([`PageHeader`] + entries) or commit-bitmap blobs.
//! - `journal.grove`: a [`FileHeader`] page, then framed records ([`RecordHeader`] + JSON).

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{Error, Result};

/// Size of a metadata page and of a data block.
pub const PAGE_SIZE: usize = 4096;
/// Format version written by this build and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

pub const DATA_MAGIC: [u8; 8] = *b"GROVEDAT";
pub const META_MAGIC: [u8; 8] = *b"GROVEMET";
pub const JOURNAL_MAGIC: [u8; 8] = *b"GROVEJNL";
pub const SUMS_MAGIC: [u8; 8] = *b"GROVESUM";

/// The first 4 KiB of each pool file.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FileHeader {
    pub magic: [u8; 8],
    pub version: U32,
    /// crc32c of the header with this field zero.
    pub crc: U32,
    /// Ties the three files of one pool together.
    pub pool_id: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<FileHeader>() == 32);

impl FileHeader {
    pub fn encode(magic: [u8; 8], pool_id: [u8; 16]) -> Vec<u8> {
        let mut header = FileHeader {
            magic,
            version: FORMAT_VERSION.into(),
            crc: 0.into(),
            pool_id,
        };
        header.crc = crc32c::crc32c(header.as_bytes()).into();
        let mut page = vec![0u8; PAGE_SIZE];
        page[..32].copy_from_slice(header.as_bytes());
        page
    }

    /// Checks magic, checksum and version; `what` names the file in errors.
    pub fn decode(page: &[u8], magic: [u8; 8], what: &str) -> Result<FileHeader> {
        let corrupt = |why: &str| Error::corrupt(format!("{what} header ({why})"), "offset 0");
        let (header, _) = FileHeader::read_from_prefix(page).map_err(|_| corrupt("short"))?;
        if header.magic != magic {
            return Err(corrupt("bad magic: not a grove pool file"));
        }
        let mut check = header;
        check.crc = 0.into();
        if crc32c::crc32c(check.as_bytes()) != header.crc.get() {
            return Err(corrupt("checksum mismatch"));
        }
        if header.version.get() != FORMAT_VERSION {
            return Err(Error::corrupt(
                format!("{what} header (format version {} is not supported; this build reads {FORMAT_VERSION})", header.version),
                "offset 0",
            ));
        }
        Ok(header)
    }
}

/// Kinds of extent-map node.
pub const NODE_LEAF: u8 = 1;
pub const NODE_INTERNAL: u8 = 2;
pub const NODE_MAGIC: u32 = u32::from_le_bytes(*b"GRVN");

/// Header of an extent-map node page.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PageHeader {
    pub magic: U32,
    pub kind: u8,
    /// 0 for leaves.
    pub level: u8,
    pub count: U16,
    /// crc32c of the whole page with this field zero.
    pub crc: U32,
    pub reserved: U32,
    /// The page's own number: catches misdirected writes and reads.
    pub page_no: U64,
    /// Generation the node was written in (see FORMAT.md, "generations").
    pub birth: U64,
}
const _: () = assert!(std::mem::size_of::<PageHeader>() == 32);

/// Leaf entry flag: the extent reads as zeros and has no data block.
pub const EXTENT_ZERO: u32 = 1;

/// One extent: `len` logical blocks from `lblock` map to physical blocks from `pblock`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct LeafEntry {
    pub lblock: U64,
    pub pblock: U64,
    pub len: U32,
    pub flags: U32,
    /// Generation the data was written in.
    pub birth: U64,
}
const _: () = assert!(std::mem::size_of::<LeafEntry>() == 32);

/// A child pointer: the subtree holds keys from `key` up to the next entry's key.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct InternalEntry {
    pub key: U64,
    pub child: U64,
    /// The newest birth of any node or entry in the subtree (an upper bound): lets "what changed
    /// since generation G" and "what does this head own" skip whole subtrees.
    pub max_birth: U64,
}
const _: () = assert!(std::mem::size_of::<InternalEntry>() == 24);

pub const LEAF_CAPACITY: usize = (PAGE_SIZE - 32) / 32;
pub const INTERNAL_CAPACITY: usize = (PAGE_SIZE - 32) / 24;

/// Stamps the checksum into an encoded node page.
pub fn seal_page(page: &mut [u8]) {
    page[8..12].fill(0);
    let crc = crc32c::crc32c(page);
    page[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a node page's magic, checksum and self-reference.
pub fn check_page(page: &[u8], page_no: u64) -> Result<PageHeader> {
    let at = || format!("meta page {page_no}");
    let (header, _) = PageHeader::read_from_prefix(page)
        .map_err(|_| Error::corrupt("extent-map node (short page)", at()))?;
    if header.magic.get() != NODE_MAGIC {
        return Err(Error::corrupt("extent-map node (bad magic)", at()));
    }
    let mut copy = page.to_vec();
    copy[8..12].fill(0);
    if crc32c::crc32c(&copy) != header.crc.get() {
        return Err(Error::corrupt("extent-map node (checksum mismatch)", at()));
    }
    if header.page_no.get() != page_no {
        return Err(Error::corrupt(
            format!("extent-map node (claims to be page {})", header.page_no),
            at(),
        ));
    }
    Ok(header)
}

/// Frame of one journal record; the payload (JSON) follows.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RecordHeader {
    pub magic: U32,
    pub len: U32,
    /// crc32c of the payload.
    pub crc: U32,
    pub reserved: U32,
}
pub const RECORD_HEADER_BYTES: usize = 16;
const _: () = assert!(std::mem::size_of::<RecordHeader>() == RECORD_HEADER_BYTES);
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"GRVR");
/// Largest journal record accepted; anything bigger is a torn or corrupt tail.
pub const RECORD_MAX_BYTES: u32 = 256 << 20;

pub fn encode_record(payload: &[u8]) -> Vec<u8> {
    let header = RecordHeader {
        magic: RECORD_MAGIC.into(),
        len: (payload.len() as u32).into(),
        crc: crc32c::crc32c(payload).into(),
        reserved: 0.into(),
    };
    let mut out = Vec::with_capacity(16 + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Splits journal bytes (after the file header) into record payloads. Stops at the first
/// incomplete or damaged record and returns the byte length of the valid prefix: a torn tail
/// is the expected result of a crash during an append.
pub fn decode_records(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while let Ok((header, rest)) = RecordHeader::read_from_prefix(&bytes[at..]) {
        let len = header.len.get();
        if header.magic.get() != RECORD_MAGIC || len > RECORD_MAX_BYTES || rest.len() < len as usize
        {
            break;
        }
        let payload = &rest[..len as usize];
        if crc32c::crc32c(payload) != header.crc.get() {
            break;
        }
        records.push(payload);
        at += 16 + len as usize;
    }
    (records, at)
}

/// The offset of the first intact record frame after `from`, if any. Only the last record can
/// be torn by a crash (each is made durable before the next is written), so an intact record
/// after a damaged one means the damage is corruption, not an interrupted append.
pub fn intact_record_after(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = RECORD_MAGIC.to_le_bytes();
    (from + 1..bytes.len().saturating_sub(16))
        .find(|&at| bytes[at..at + 4] == magic && !decode_records(&bytes[at..]).0.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_header_round_trip_and_damage() {
        let page = FileHeader::encode(META_MAGIC, [3; 16]);
        assert_eq!(
            FileHeader::decode(&page, META_MAGIC, "meta")
                .unwrap()
                .pool_id,
            [3; 16]
        );
        assert!(FileHeader::decode(&page, DATA_MAGIC, "data").is_err());
        let mut bad = page.clone();
        bad[20] ^= 1;
        assert!(matches!(
            FileHeader::decode(&bad, META_MAGIC, "meta"),
            Err(Error::Corrupt { .. })
        ));
    }

    #[test]
    fn records_stop_at_a_torn_tail() {
        let mut bytes = encode_record(b"one");
        bytes.extend(encode_record(b"two"));
        let full = bytes.len();
        bytes.extend(&encode_record(b"three")[..10]);
        let (records, valid) = decode_records(&bytes);
        assert_eq!(records, vec![&b"one"[..], &b"two"[..]]);
        assert_eq!(valid, full);
        let mut flipped = encode_record(b"one");
        flipped[17] ^= 0x40;
        assert_eq!(decode_records(&flipped).0.len(), 0);
        // Damage followed by an intact record is found; a torn tail is not.
        assert_eq!(intact_record_after(&flipped, 0), None);
        let second_at = flipped.len();
        flipped.extend(encode_record(b"two"));
        assert_eq!(intact_record_after(&flipped, 0), Some(second_at));
    }
}
