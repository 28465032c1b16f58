//! CDB field access and the table of supported operation codes (SPC-4 4.2, 6.35): every
//! command this logical unit implements, its CDB usage data for REPORT SUPPORTED OPERATION
//! CODES, and how reservations restrict it.

use super::{allocated, sense, Command, Outcome};

/// Operation codes (SPC-4, SBC-3).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_DATA_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
    pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_AND_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    pub const READ_DEFECT_DATA_12: u8 = 0xb7;
}

/// Service actions of SERVICE ACTION IN(16).
pub const READ_CAPACITY_16: u8 = 0x10;
pub const GET_LBA_STATUS: u8 = 0x12;
/// Service action of MAINTENANCE IN.
pub const REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0c;

/// How a command fares under a reservation held by another I_T nexus (SPC-4 table 62,
/// SBC-3 table 13).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed under every reservation (INQUIRY, REPORT LUNS, ...).
    Always,
    /// Allowed under Write Exclusive, refused under Exclusive Access.
    Read,
    /// Refused under both.
    Write,
    /// Decided by the persistent reservation logic itself (PERSISTENT RESERVE OUT) or by
    /// RESERVE/RELEASE.
    Reservation,
}

/// One supported command.
pub struct CommandInfo {
    pub opcode: u8,
    pub service_action: Option<u8>,
    pub access: Access,
    /// CDB USAGE DATA (SPC-4 6.35.3): the bits of the CDB this device server looks at. Its
    /// length is the CDB's.
    pub usage: &'static [u8],
}

impl CommandInfo {
    pub fn cdb_len(&self) -> usize {
        self.usage.len()
    }
}

const fn info(
    opcode: u8,
    service_action: Option<u8>,
    access: Access,
    usage: &'static [u8],
) -> CommandInfo {
    CommandInfo {
        opcode,
        service_action,
        access,
        usage,
    }
}

use opcode as op;
use Access::{Always, Read, Reservation, Write};

/// Every supported command, by operation code then service action.
#[rustfmt::skip]
pub static COMMANDS: &[CommandInfo] = &[
    info(op::TEST_UNIT_READY, None, Always, &[0x00, 0, 0, 0, 0, 0x04]),
    info(op::REQUEST_SENSE, None, Always, &[0x03, 0x01, 0, 0, 0xff, 0x04]),
    info(op::READ_6, None, Read, &[0x08, 0x1f, 0xff, 0xff, 0xff, 0x04]),
    info(op::WRITE_6, None, Write, &[0x0a, 0x1f, 0xff, 0xff, 0xff, 0x04]),
    info(op::INQUIRY, None, Always, &[0x12, 0x01, 0xff, 0xff, 0xff, 0x04]),
    info(op::MODE_SELECT_6, None, Write, &[0x15, 0x11, 0, 0, 0xff, 0x04]),
    info(op::RESERVE_6, None, Reservation, &[0x16, 0, 0, 0, 0, 0x04]),
    info(op::RELEASE_6, None, Reservation, &[0x17, 0, 0, 0, 0, 0x04]),
    info(op::MODE_SENSE_6, None, Read, &[0x1a, 0x08, 0xff, 0xff, 0xff, 0x04]),
    info(op::START_STOP_UNIT, None, Always, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0x04]),
    info(op::PREVENT_ALLOW_MEDIUM_REMOVAL, None, Always, &[0x1e, 0, 0, 0, 0x03, 0x04]),
    info(op::READ_CAPACITY_10, None, Always, &[0x25, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x04]),
    info(op::READ_10, None, Read, &[0x28, 0xfa, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
    info(op::WRITE_10, None, Write, &[0x2a, 0xfa, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
    info(op::WRITE_AND_VERIFY_10, None, Write, &[0x2e, 0xf2, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
    info(op::VERIFY_10, None, Read, &[0x2f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
    info(op::PRE_FETCH_10, None, Read, &[0x34, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
    info(op::SYNCHRONIZE_CACHE_10, None, Write, &[0x35, 0x02, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
    info(op::READ_DEFECT_DATA_10, None, Read, &[0x37, 0, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    info(op::WRITE_SAME_10, None, Write, &[0x41, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x1f, 0xff, 0xff, 0x04]),
    info(op::UNMAP, None, Write, &[0x42, 0x01, 0, 0, 0, 0, 0x1f, 0xff, 0xff, 0x04]),
    info(op::MODE_SELECT_10, None, Write, &[0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    info(op::RESERVE_10, None, Reservation, &[0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0x04]),
    info(op::RELEASE_10, None, Reservation, &[0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0x04]),
    info(op::MODE_SENSE_10, None, Read, &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_IN, Some(0x00), Always, &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_IN, Some(0x01), Always, &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_IN, Some(0x02), Always, &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_IN, Some(0x03), Always, &[0x5e, 0x1f, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(0x00), Reservation, &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(0x01), Reservation, &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(0x02), Reservation, &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(0x03), Reservation, &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(0x04), Reservation, &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(0x05), Reservation, &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04]),
    info(op::PERSISTENT_RESERVE_OUT, Some(0x06), Reservation, &[0x5f, 0x1f, 0xff, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x04]),
    info(op::READ_16, None, Read, &[0x88, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::COMPARE_AND_WRITE, None, Write, &[0x89, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0x1f, 0x04]),
    info(op::WRITE_16, None, Write, &[0x8a, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::ORWRITE_16, None, Write, &[0x8b, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::WRITE_AND_VERIFY_16, None, Write, &[0x8e, 0xf2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::VERIFY_16, None, Read, &[0x8f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::PRE_FETCH_16, None, Read, &[0x90, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::SYNCHRONIZE_CACHE_16, None, Write, &[0x91, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::WRITE_SAME_16, None, Write, &[0x93, 0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::SERVICE_ACTION_IN_16, Some(READ_CAPACITY_16), Always, &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04]),
    info(op::SERVICE_ACTION_IN_16, Some(GET_LBA_STATUS), Read, &[0x9e, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04]),
    info(op::REPORT_LUNS, None, Always, &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04]),
    info(op::MAINTENANCE_IN, Some(REPORT_SUPPORTED_OPERATION_CODES), Always, &[0xa3, 0x0c, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04]),
    info(op::READ_12, None, Read, &[0xa8, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::WRITE_12, None, Write, &[0xaa, 0xfa, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::WRITE_AND_VERIFY_12, None, Write, &[0xae, 0xf2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::VERIFY_12, None, Read, &[0xaf, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x1f, 0x04]),
    info(op::READ_DEFECT_DATA_12, None, Read, &[0xb7, 0x1f, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04]),
];

/// Whether `opcode` is one whose commands are told apart by a service action.
fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.service_action.is_some())
}

/// The service action field of a CDB with one (byte 1, bits 4-0).
fn service_action(cdb: &[u8]) -> u8 {
    u8_at(cdb, 1) & 0x1f
}

/// The supported command a CDB names, if any.
pub fn lookup(cdb: &[u8]) -> Option<&'static CommandInfo> {
    let code = *cdb.first()?;
    if has_service_actions(code) {
        let action = service_action(cdb);
        COMMANDS
            .iter()
            .find(|c| c.opcode == code && c.service_action == Some(action))
            // An unknown service action of a known opcode is an invalid CDB field, decided
            // by the command itself; its CDB length is the opcode's.
            .or_else(|| COMMANDS.iter().find(|c| c.opcode == code))
    } else {
        COMMANDS.iter().find(|c| c.opcode == code)
    }
}

/// Byte `at` of a CDB or parameter list, 0 past its end.
pub fn u8_at(bytes: &[u8], at: usize) -> u8 {
    bytes.get(at).copied().unwrap_or(0)
}

/// A big-endian field of `N` bytes at `at`, zeros past the end.
fn be<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8_at(bytes, at + i);
    }
    out
}

pub fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(be(bytes, at))
}

pub fn u24_at(bytes: &[u8], at: usize) -> u32 {
    let [a, b, c] = be::<3>(bytes, at);
    u32::from_be_bytes([0, a, b, c])
}

pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(be(bytes, at))
}

pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(be(bytes, at))
}

/// REPORT SUPPORTED OPERATION CODES (SPC-4 6.35).
pub fn report_supported_opcodes(command: &Command<'_>) -> Outcome {
    let cdb = command.cdb;
    if service_action(cdb) != REPORT_SUPPORTED_OPERATION_CODES {
        return Err(sense::invalid_cdb_field(1, Some(4)).into());
    }
    let timeouts = u8_at(cdb, 2) & 0x80 != 0;
    let options = u8_at(cdb, 2) & 0x07;
    let requested_opcode = u8_at(cdb, 3);
    let requested_action = u16_at(cdb, 4);
    let allocation_len = u32_at(cdb, 6) as usize;
    // Command timeouts descriptor (SPC-4 6.35.4): no timeouts are reported.
    let timeouts_descriptor = [0u8, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let data = match options {
        0 => {
            let mut data = vec![0u8; 4];
            for c in COMMANDS {
                let mut descriptor = [0u8; 8];
                descriptor[0] = c.opcode;
                if let Some(action) = c.service_action {
                    descriptor[3] = action;
                    descriptor[5] = 0x01;
                }
                if timeouts {
                    descriptor[5] |= 0x02;
                }
                descriptor[6..8].copy_from_slice(&(c.cdb_len() as u16).to_be_bytes());
                data.extend_from_slice(&descriptor);
                if timeouts {
                    data.extend_from_slice(&timeouts_descriptor);
                }
            }
            let len = (data.len() - 4) as u32;
            data[0..4].copy_from_slice(&len.to_be_bytes());
            data
        }
        1..=3 => {
            let with_actions = has_service_actions(requested_opcode);
            let found = match (options, with_actions) {
                (1, true) | (2, false) => {
                    return Err(sense::invalid_cdb_field(2, Some(2)).into());
                }
                (1, false) | (3, false) => COMMANDS.iter().find(|c| c.opcode == requested_opcode),
                _ => COMMANDS.iter().find(|c| {
                    c.opcode == requested_opcode
                        && c.service_action.map(u16::from) == Some(requested_action)
                }),
            };
            let mut data = vec![0u8; 4];
            match found {
                Some(c) => {
                    // SUPPORT 011b: supported as the standard describes.
                    data[1] = 0x03 | if timeouts { 0x80 } else { 0 };
                    data[2..4].copy_from_slice(&(c.cdb_len() as u16).to_be_bytes());
                    let mut usage = c.usage.to_vec();
                    if let (Some(action), Some(byte)) = (c.service_action, usage.get_mut(1)) {
                        // The service action field carries the action's own value.
                        *byte = (*byte & 0xe0) | action;
                    }
                    data.extend_from_slice(&usage);
                    if timeouts {
                        data.extend_from_slice(&timeouts_descriptor);
                    }
                }
                // SUPPORT 001b: not supported.
                None => data[1] = 0x01,
            }
            data
        }
        _ => return Err(sense::invalid_cdb_field(2, Some(2)).into()),
    };
    Ok(allocated(data, allocation_len, command.expected_in))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spc4_6_35_usage_data_starts_with_its_opcode_and_fits_its_group() {
        for c in COMMANDS {
            assert_eq!(c.usage[0], c.opcode);
            let group_len = match c.opcode >> 5 {
                0 => 6,
                1 | 2 => 10,
                4 => 16,
                5 => 12,
                _ => 0,
            };
            assert_eq!(c.cdb_len(), group_len, "opcode {:#x}", c.opcode);
        }
    }

    #[test]
    fn short_fields_read_as_zero() {
        assert_eq!(u32_at(&[1, 2], 0), 0x0102_0000);
        assert_eq!(u64_at(&[], 5), 0);
    }
}
