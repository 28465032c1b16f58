//! MODE SENSE and MODE SELECT (6/10) (SPC-4 6.11-6.14) with the caching (SBC-3 6.4.5) and
//! control (SPC-4 7.5.8) mode pages. Parameters live in memory, shared by every nexus of the
//! logical unit; saving them is not supported.

use super::cdb::{self, opcode};
use super::sense;
use super::{allocated, Command, Lun, Outcome, Response, LOGICAL_BLOCK_SIZE};

const CACHING_PAGE: u8 = 0x08;
const CONTROL_PAGE: u8 = 0x0a;
const ALL_PAGES: u8 = 0x3f;

/// Changeable mode parameters of one logical unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeState {
    /// WCE: writes may complete before they are durable. Cleared, every write is FUA.
    pub write_cache: bool,
    /// SWP: the control page's software write protect.
    pub software_write_protect: bool,
}

impl Default for ModeState {
    fn default() -> ModeState {
        ModeState {
            write_cache: true,
            software_write_protect: false,
        }
    }
}

/// Which values MODE SENSE reports (PAGE CONTROL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
}

fn caching_page(state: ModeState, control: PageControl) -> Vec<u8> {
    let mut page = vec![0u8; 20];
    page[0] = CACHING_PAGE;
    page[1] = 0x12;
    let wce = match control {
        PageControl::Current => state.write_cache,
        PageControl::Changeable => true,
        PageControl::Default => ModeState::default().write_cache,
    };
    if wce {
        page[2] |= 0x04;
    }
    page
}

fn control_page(state: ModeState, control: PageControl) -> Vec<u8> {
    let mut page = vec![0u8; 12];
    page[0] = CONTROL_PAGE;
    page[1] = 0x0a;
    if control == PageControl::Changeable {
        page[4] = 0x08;
        return page;
    }
    // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering; QERR 0.
    page[3] = 0x10;
    let swp = match control {
        PageControl::Current => state.software_write_protect,
        _ => ModeState::default().software_write_protect,
    };
    if swp {
        page[4] |= 0x08;
    }
    // BUSY TIMEOUT PERIOD: unlimited.
    page[8..10].copy_from_slice(&0xffffu16.to_be_bytes());
    page
}

impl Lun {
    /// MODE SENSE (6) and (10).
    pub(super) fn mode_sense(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let ten = cdb::u8_at(cdb, 0) == opcode::MODE_SENSE_10;
        let disable_block_descriptors = cdb::u8_at(cdb, 1) & 0x08 != 0;
        let long_lba = ten && cdb::u8_at(cdb, 1) & 0x10 != 0;
        let control = match cdb::u8_at(cdb, 2) >> 6 {
            0 => PageControl::Current,
            1 => PageControl::Changeable,
            2 => PageControl::Default,
            _ => return Err(sense::SAVING_NOT_SUPPORTED.into()),
        };
        let page_code = cdb::u8_at(cdb, 2) & 0x3f;
        let subpage = cdb::u8_at(cdb, 3);
        let allocation_len = if ten {
            cdb::u16_at(cdb, 7) as usize
        } else {
            cdb::u8_at(cdb, 4) as usize
        };
        let state = self.shared.state.lock().mode;
        let pages = match (page_code, subpage) {
            (CACHING_PAGE, 0) => caching_page(state, control),
            (CONTROL_PAGE, 0) => control_page(state, control),
            // All pages; with subpage 0xff also all subpages, of which there are none.
            (ALL_PAGES, 0 | 0xff) => {
                let mut pages = caching_page(state, control);
                pages.extend(control_page(state, control));
                pages
            }
            (CACHING_PAGE | CONTROL_PAGE, _) => {
                return Err(sense::invalid_cdb_field(3, None).into());
            }
            _ => return Err(sense::invalid_cdb_field(2, Some(5)).into()),
        };
        let blocks = self.session.size_bytes() / u64::from(LOGICAL_BLOCK_SIZE);
        let block_descriptor = if disable_block_descriptors {
            Vec::new()
        } else if long_lba {
            let mut descriptor = vec![0u8; 16];
            descriptor[0..8].copy_from_slice(&blocks.to_be_bytes());
            descriptor[12..16].copy_from_slice(&LOGICAL_BLOCK_SIZE.to_be_bytes());
            descriptor
        } else {
            let mut descriptor = vec![0u8; 8];
            let short_blocks = u32::try_from(blocks).unwrap_or(u32::MAX);
            descriptor[0..4].copy_from_slice(&short_blocks.to_be_bytes());
            descriptor[4..8].copy_from_slice(&LOGICAL_BLOCK_SIZE.to_be_bytes());
            descriptor[4] = 0;
            descriptor
        };
        // DEVICE-SPECIFIC PARAMETER (SBC-3 6.4.1): WP, DPOFUA.
        let write_protected = self.session.read_only() || state.software_write_protect;
        let device_specific = if write_protected { 0x80 } else { 0 } | 0x10;
        let mut data = if ten {
            let mut header = vec![0u8; 8];
            header[3] = device_specific;
            if long_lba {
                header[4] = 0x01;
            }
            header[6..8].copy_from_slice(&(block_descriptor.len() as u16).to_be_bytes());
            header
        } else {
            vec![0, 0, device_specific, block_descriptor.len() as u8]
        };
        data.extend(block_descriptor);
        data.extend(pages);
        // MODE DATA LENGTH counts the bytes after itself.
        if ten {
            let len = (data.len() - 2) as u16;
            data[0..2].copy_from_slice(&len.to_be_bytes());
        } else {
            data[0] = (data.len() - 1).min(255) as u8;
        }
        Ok(allocated(data, allocation_len, command.expected_in))
    }

    /// MODE SELECT (6) and (10): WCE of the caching page and SWP of the control page may
    /// change; every other field must be sent as MODE SENSE reports it.
    pub(super) fn mode_select(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let ten = cdb::u8_at(cdb, 0) == opcode::MODE_SELECT_10;
        if cdb::u8_at(cdb, 1) & 0x01 != 0 {
            return Err(sense::invalid_cdb_field(1, Some(0)).into());
        }
        let parameter_len = if ten {
            cdb::u16_at(cdb, 7) as usize
        } else {
            cdb::u8_at(cdb, 4) as usize
        };
        if parameter_len > command.data_out.len() {
            return Err(sense::PARAMETER_LIST_LENGTH.into());
        }
        let list = &command.data_out[..parameter_len];
        let header_len = if ten { 8 } else { 4 };
        if list.is_empty() {
            return Ok(Response::good());
        }
        if list.len() < header_len {
            return Err(sense::PARAMETER_LIST_LENGTH.into());
        }
        let descriptors_len = if ten {
            cdb::u16_at(list, 6) as usize
        } else {
            cdb::u8_at(list, 3) as usize
        };
        let mut at = header_len + descriptors_len;
        if at > list.len() {
            return Err(sense::PARAMETER_LIST_LENGTH.into());
        }
        if descriptors_len >= 8 {
            let block_len = cdb::u24_at(list, at - 3);
            if block_len != 0 && block_len != LOGICAL_BLOCK_SIZE {
                return Err(sense::invalid_parameter_field((at - 3) as u16).into());
            }
        }
        let mut state = self.shared.state.lock();
        let mut mode = state.mode;
        while at < list.len() {
            let code = cdb::u8_at(list, at) & 0x3f;
            if cdb::u8_at(list, at) & 0x40 != 0 {
                return Err(sense::invalid_parameter_field(at as u16).into());
            }
            let page_len = cdb::u8_at(list, at + 1) as usize;
            let end = at + 2 + page_len;
            let Some(sent) = list.get(at..end) else {
                return Err(sense::PARAMETER_LIST_LENGTH.into());
            };
            let (current, changeable) = match code {
                CACHING_PAGE => (
                    caching_page(mode, PageControl::Current),
                    caching_page(mode, PageControl::Changeable),
                ),
                CONTROL_PAGE => (
                    control_page(mode, PageControl::Current),
                    control_page(mode, PageControl::Changeable),
                ),
                _ => return Err(sense::invalid_parameter_field(at as u16).into()),
            };
            if sent.len() != current.len() {
                return Err(sense::invalid_parameter_field((at + 1) as u16).into());
            }
            // Byte 0 carries PS, which MODE SELECT ignores.
            for i in 1..current.len() {
                if (sent[i] ^ current[i]) & !changeable[i] != 0 {
                    return Err(sense::invalid_parameter_field((at + i) as u16).into());
                }
            }
            match code {
                CACHING_PAGE => mode.write_cache = sent[2] & 0x04 != 0,
                _ => mode.software_write_protect = sent[4] & 0x08 != 0,
            }
            at = end;
        }
        if mode != state.mode {
            state.mode = mode;
            // Other nexuses learn of the change (SPC-4 7.5.1).
            let me = self.key.clone();
            state.queue_attention_for_attached(sense::UA_MODE_CHANGED, Some(&me));
        }
        Ok(Response::good())
    }
}
