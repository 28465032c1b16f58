//! INQUIRY (SPC-4 6.6): standard data and the vital product data pages (SPC-4 7.8, SBC-3
//! 6.5): supported pages, unit serial number, device identification, block limits, block
//! device characteristics and logical block provisioning.
//!
//! Identifiers derive from the export's canonical name alone, so one ref keeps them across
//! restarts and sessions, and different refs differ.

use super::cdb;
use super::sense;
use super::{allocated, Command, Lun, Outcome, LOGICAL_BLOCK_SIZE, MAX_TRANSFER_BYTES};

pub const VENDOR: &str = "GROVE";
pub const PRODUCT: &str = "grove volume";

/// Logical blocks per 4 KiB engine block, as a power of two (LOGICAL BLOCKS PER PHYSICAL
/// BLOCK EXPONENT).
pub const BLOCKS_PER_PHYSICAL_EXPONENT: u8 = 3;

/// MAXIMUM COMPARE AND WRITE LENGTH, in logical blocks.
pub const COMPARE_AND_WRITE_MAX_BLOCKS: u8 = 255;
/// MAXIMUM UNMAP LBA COUNT: blocks one UNMAP may deallocate (512 MiB).
pub const UNMAP_MAX_BLOCKS: u32 = 1 << 20;
/// MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
pub const UNMAP_MAX_DESCRIPTORS: u32 = 256;
/// MAXIMUM WRITE SAME LENGTH, in logical blocks (32 MiB less a block). Below 65536 on
/// purpose: libiscsi then skips a WRITE(16) of 65536 blocks, more than MAX_TRANSFER_BYTES.
pub const WRITE_SAME_MAX_BLOCKS: u64 = 0xffff;

/// Supported VPD pages, in ascending order.
const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2];

/// FNV-1a, 64 bits: a stable hash of the canonical name (std's hasher may change between
/// releases, and identifiers must not).
fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325 ^ seed;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Identifiers of one logical unit.
pub struct Identity {
    /// 16 hex digits: the unit serial number (VPD 0x80) and the T10 vendor id's tail.
    pub serial: String,
    /// NAA locally assigned designator (NAA 3h, SPC-4 7.8.6.6.3): 60 bits of hash.
    pub naa: [u8; 8],
}

impl Identity {
    pub fn of(canonical_name: &str) -> Identity {
        let hash = fnv1a(canonical_name.as_bytes(), 0);
        let naa_hash = fnv1a(canonical_name.as_bytes(), 0x9e37_79b9_7f4a_7c15);
        let naa = (0x3u64 << 60) | (naa_hash & 0x0fff_ffff_ffff_ffff);
        Identity {
            serial: format!("{hash:016x}"),
            naa: naa.to_be_bytes(),
        }
    }
}

/// `text` left-aligned in `len` bytes, padded with spaces (SPC-4 4.4.1).
fn padded(text: &str, len: usize) -> Vec<u8> {
    let mut field: Vec<u8> = text.bytes().take(len).collect();
    field.resize(len, b' ');
    field
}

/// `text` NUL-terminated and padded with NULs to a multiple of 4 bytes, at most 252 (an
/// iSCSI name is at most 223 bytes, SCSI name strings and TransportIDs need the padding).
pub(super) fn nul_padded(text: &str) -> Vec<u8> {
    let mut bytes: Vec<u8> = text.bytes().take(251).collect();
    bytes.push(0);
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes
}

/// A VPD page: header, then `payload`.
fn vpd_page(code: u8, payload: &[u8]) -> Vec<u8> {
    let mut page = vec![0x00, code, 0, 0];
    page[2..4].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    page.extend_from_slice(payload);
    page
}

/// One designation descriptor (SPC-4 7.8.6.1).
fn designator(code_set: u8, association: u8, kind: u8, value: &[u8], iscsi: bool) -> Vec<u8> {
    let protocol = if iscsi { 0x50 } else { 0 };
    let piv = if iscsi { 0x80 } else { 0 };
    let mut descriptor = vec![protocol | code_set, piv | (association << 4) | kind, 0, 0];
    descriptor[3] = value.len() as u8;
    descriptor.extend_from_slice(value);
    descriptor
}

impl Lun {
    fn identity(&self) -> Identity {
        Identity::of(&self.session.target().canonical_name())
    }

    /// INQUIRY (SPC-4 6.6).
    pub(super) fn inquiry(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let evpd = cdb::u8_at(cdb, 1) & 0x01 != 0;
        if cdb::u8_at(cdb, 1) & 0x02 != 0 {
            // CMDDT is obsolete.
            return Err(sense::invalid_cdb_field(1, Some(1)).into());
        }
        let page_code = cdb::u8_at(cdb, 2);
        let allocation_len = cdb::u16_at(cdb, 3) as usize;
        let data = if evpd {
            self.vpd(page_code)?
        } else if page_code != 0 {
            return Err(sense::invalid_cdb_field(2, None).into());
        } else {
            self.standard_inquiry()
        };
        Ok(allocated(data, allocation_len, command.expected_in))
    }

    fn standard_inquiry(&self) -> Vec<u8> {
        let mut data = vec![0u8; 8];
        // Direct access block device, connected.
        data[0] = 0x00;
        // VERSION: SPC-4.
        data[2] = 0x06;
        // HISUP, RESPONSE DATA FORMAT 2.
        data[3] = 0x10 | 0x02;
        // CMDQUE: tasks may be queued.
        data[7] = 0x02;
        data.extend_from_slice(&padded(VENDOR, 8));
        data.extend_from_slice(&padded(PRODUCT, 16));
        data.extend_from_slice(&padded(env!("CARGO_PKG_VERSION"), 4));
        // Vendor specific (20 bytes), then bytes 56-57 reserved.
        data.resize(58, 0);
        // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
        for version in [0x00a0u16, 0x0960, 0x0460, 0x04c0] {
            data.extend_from_slice(&version.to_be_bytes());
        }
        data.resize(96, 0);
        data[4] = (data.len() - 5) as u8;
        data
    }

    fn vpd(&self, page_code: u8) -> Outcome<Vec<u8>> {
        let identity = self.identity();
        let page = match page_code {
            0x00 => vpd_page(0x00, &VPD_PAGES),
            0x80 => vpd_page(0x80, identity.serial.as_bytes()),
            0x83 => {
                let mut payload = Vec::new();
                // T10 vendor identification: vendor, then the serial (ASCII, LU).
                let mut t10 = padded(VENDOR, 8);
                t10.extend_from_slice(identity.serial.as_bytes());
                payload.extend(designator(0x2, 0, 0x1, &t10, false));
                // NAA (binary, LU).
                payload.extend(designator(0x1, 0, 0x3, &identity.naa, false));
                // Relative target port identifier 1 (binary, target port).
                payload.extend(designator(0x1, 1, 0x4, &[0, 0, 0, 1], true));
                // SCSI name string of the target port (UTF-8, target port), NUL-padded to a
                // multiple of 4 bytes.
                let port = nul_padded(&format!("{},t,0x0001", self.nexus.target_name));
                payload.extend(designator(0x3, 1, 0x8, &port, true));
                // SCSI name string of the target device (association 2).
                let device = nul_padded(&self.nexus.target_name);
                payload.extend(designator(0x3, 2, 0x8, &device, true));
                vpd_page(0x83, &payload)
            }
            // Extended INQUIRY data (SPC-4 7.8.7): no protection, simple tasks only.
            0x86 => {
                let mut payload = vec![0u8; 60];
                // SIMPSUP: the simple task attribute.
                payload[2] = 0x01;
                // V_SUP: a volatile cache, flushed by SYNCHRONIZE CACHE.
                payload[3] = 0x01;
                vpd_page(0x86, &payload)
            }
            0xb0 => {
                let mut payload = vec![0u8; 60];
                // WSNZ clear: WRITE SAME of 0 blocks runs to the end of the medium.
                payload[1] = COMPARE_AND_WRITE_MAX_BLOCKS;
                // OPTIMAL TRANSFER LENGTH GRANULARITY: one engine block.
                payload[2..4]
                    .copy_from_slice(&(1u16 << BLOCKS_PER_PHYSICAL_EXPONENT).to_be_bytes());
                let max_transfer_blocks = MAX_TRANSFER_BYTES / LOGICAL_BLOCK_SIZE;
                payload[4..8].copy_from_slice(&max_transfer_blocks.to_be_bytes());
                payload[8..12].copy_from_slice(&max_transfer_blocks.to_be_bytes());
                payload[12..16].copy_from_slice(&max_transfer_blocks.to_be_bytes());
                payload[16..20].copy_from_slice(&UNMAP_MAX_BLOCKS.to_be_bytes());
                payload[20..24].copy_from_slice(&UNMAP_MAX_DESCRIPTORS.to_be_bytes());
                let granularity = 1u32 << BLOCKS_PER_PHYSICAL_EXPONENT;
                payload[24..28].copy_from_slice(&granularity.to_be_bytes());
                // UGAVALID with alignment 0.
                payload[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes());
                payload[32..40].copy_from_slice(&WRITE_SAME_MAX_BLOCKS.to_be_bytes());
                vpd_page(0xb0, &payload)
            }
            0xb1 => {
                let mut payload = vec![0u8; 60];
                // MEDIUM ROTATION RATE 1: not rotating.
                payload[0..2].copy_from_slice(&1u16.to_be_bytes());
                vpd_page(0xb1, &payload)
            }
            0xb2 => {
                // Threshold exponent 0; LBPU, LBPWS, LBPWS10, LBPRZ; ANC_SUP and DP clear;
                // provisioning type 2: thin.
                vpd_page(0xb2, &[0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])
            }
            _ => return Err(sense::invalid_cdb_field(2, None).into()),
        };
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_stable_and_differ_between_refs() {
        let a = Identity::of("vol");
        assert_eq!(a.serial, Identity::of("vol").serial);
        assert_eq!(a.naa, Identity::of("vol").naa);
        let b = Identity::of("vol@branch");
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.naa, b.naa);
        assert_eq!(a.naa[0] >> 4, 0x3);
        // Pinned: identifiers must never change for a given name.
        assert_eq!(Identity::of("").serial, "cbf29ce484222325");
    }
}
