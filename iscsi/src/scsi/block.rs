//! Block commands (SBC-3 5): capacity, reads, writes, verify, write same, unmap, compare and
//! write, cache synchronization, prefetch and LBA status, over the engine session.
//!
//! Residuals follow SAM-5 and RFC 7143 11.4.5: the transfer the CDB asks for is compared with
//! the initiator's expected length; a write moves no more than both allow.

use grove_engine::ZeroMode;

use super::cdb::{self, opcode};
use super::inquiry::{
    BLOCKS_PER_PHYSICAL_EXPONENT, COMPARE_AND_WRITE_MAX_BLOCKS, UNMAP_MAX_BLOCKS,
    UNMAP_MAX_DESCRIPTORS, WRITE_SAME_MAX_BLOCKS,
};
use super::sense::{self, engine_error, IoKind};
use super::{
    allocated, Command, Failure, Lun, Outcome, Residual, Response, LOGICAL_BLOCK_SIZE,
    MAX_TRANSFER_BYTES,
};

const BLOCK_BYTES: u64 = LOGICAL_BLOCK_SIZE as u64;

/// Largest buffer WRITE SAME fills with its pattern at once.
const WRITE_SAME_CHUNK_BYTES: u64 = 1 << 20;

/// Descriptors GET LBA STATUS reports at most, and the range it looks at per command.
const LBA_STATUS_DESCRIPTORS_MAX: usize = 64;
const LBA_STATUS_WINDOW_BYTES: u64 = 1 << 30;

/// Where a block command's LBA and transfer length are, by CDB size.
struct Addressing {
    lba: u64,
    blocks: u64,
    /// Byte of the CDB holding the transfer length (for field pointers).
    length_byte: u16,
}

fn addressing(cdb: &[u8]) -> Addressing {
    match cdb::u8_at(cdb, 0) >> 5 {
        // 6-byte CDBs: a 21-bit LBA, and 0 blocks meaning 256.
        0 => {
            let blocks = match cdb::u8_at(cdb, 4) {
                0 => 256,
                n => u64::from(n),
            };
            Addressing {
                lba: u64::from(cdb::u24_at(cdb, 1) & 0x1f_ffff),
                blocks,
                length_byte: 4,
            }
        }
        1 | 2 => Addressing {
            lba: u64::from(cdb::u32_at(cdb, 2)),
            blocks: u64::from(cdb::u16_at(cdb, 7)),
            length_byte: 7,
        },
        5 => Addressing {
            lba: u64::from(cdb::u32_at(cdb, 2)),
            blocks: u64::from(cdb::u32_at(cdb, 6)),
            length_byte: 6,
        },
        _ => Addressing {
            lba: cdb::u64_at(cdb, 2),
            blocks: u64::from(cdb::u32_at(cdb, 10)),
            length_byte: 10,
        },
    }
}

/// RDPROTECT / WRPROTECT / VRPROTECT (byte 1, bits 7-5) must be 0: no protection information.
fn check_no_protection(cdb: &[u8]) -> Result<(), Failure> {
    if cdb::u8_at(cdb, 0) >> 5 != 0 && cdb::u8_at(cdb, 1) & 0xe0 != 0 {
        return Err(sense::invalid_cdb_field(1, Some(7)).into());
    }
    Ok(())
}

/// FUA (byte 1, bit 3) of 10-, 12- and 16-byte CDBs.
fn fua_bit(cdb: &[u8]) -> bool {
    cdb::u8_at(cdb, 0) >> 5 != 0 && cdb::u8_at(cdb, 1) & 0x08 != 0
}

fn read_error(error: grove_engine::Error) -> Failure {
    Failure::Check(engine_error(&error, IoKind::Read))
}

fn write_error(error: grove_engine::Error) -> Failure {
    Failure::Check(engine_error(&error, IoKind::Write))
}

fn with_residual(residual: Residual) -> Response {
    Response {
        residual,
        ..Response::good()
    }
}

impl Lun {
    fn capacity_blocks(&self) -> u64 {
        self.session.size_bytes() / BLOCK_BYTES
    }

    /// LOGICAL BLOCK ADDRESS OUT OF RANGE unless `[lba, lba + blocks)` is on the medium.
    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Failure> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.capacity_blocks() => Ok(()),
            _ => Err(sense::LBA_OUT_OF_RANGE.into()),
        }
    }

    /// Transfers beyond MAXIMUM TRANSFER LENGTH are refused.
    fn check_transfer(blocks: u64, length_byte: u16) -> Result<u64, Failure> {
        let bytes = blocks * BLOCK_BYTES;
        if bytes > u64::from(MAX_TRANSFER_BYTES) {
            return Err(sense::invalid_cdb_field(length_byte, None).into());
        }
        Ok(bytes)
    }

    /// DATA PROTECT for read-only refs and under the control page's SWP.
    fn check_writable(&self) -> Result<(), Failure> {
        if self.session.read_only() {
            return Err(sense::WRITE_PROTECTED.into());
        }
        if self.shared.state.lock().mode.software_write_protect {
            return Err(sense::SOFTWARE_WRITE_PROTECTED.into());
        }
        Ok(())
    }

    /// Whether a write must be durable before it completes: FUA, or the write cache is off.
    fn write_through(&self, fua: bool) -> bool {
        fua || !self.shared.state.lock().mode.write_cache
    }

    /// READ CAPACITY (10) (SBC-3 5.15).
    pub(super) fn read_capacity_10(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let partial_medium = cdb::u8_at(cdb, 8) & 0x01 != 0;
        if !partial_medium && cdb::u32_at(cdb, 2) != 0 {
            return Err(sense::invalid_cdb_field(2, None).into());
        }
        let last_lba = self.capacity_blocks().saturating_sub(1);
        let mut data = Vec::with_capacity(8);
        data.extend_from_slice(&u32::try_from(last_lba).unwrap_or(u32::MAX).to_be_bytes());
        data.extend_from_slice(&LOGICAL_BLOCK_SIZE.to_be_bytes());
        Ok(super::data_in(data, command.expected_in))
    }

    /// READ CAPACITY (16) (SBC-3 5.16): thin provisioned (LBPME) and reading zeros where
    /// unmapped (LBPRZ), 8 logical blocks per engine block.
    pub(super) fn read_capacity_16(&self, command: &Command<'_>) -> Outcome {
        let allocation_len = cdb::u32_at(command.cdb, 10) as usize;
        let mut data = vec![0u8; 32];
        let last_lba = self.capacity_blocks().saturating_sub(1);
        data[0..8].copy_from_slice(&last_lba.to_be_bytes());
        data[8..12].copy_from_slice(&LOGICAL_BLOCK_SIZE.to_be_bytes());
        data[13] = BLOCKS_PER_PHYSICAL_EXPONENT;
        data[14] = 0x80 | 0x40;
        Ok(allocated(data, allocation_len, command.expected_in))
    }

    /// READ (6/10/12/16) (SBC-3 5.8-5.11).
    pub(super) async fn read(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        check_no_protection(cdb)?;
        let Addressing {
            lba,
            blocks,
            length_byte,
        } = addressing(cdb);
        self.check_range(lba, blocks)?;
        let wanted_bytes = Self::check_transfer(blocks, length_byte)?;
        let len_bytes = wanted_bytes.min(u64::from(command.expected_in));
        let data = if len_bytes == 0 {
            Vec::new()
        } else {
            self.session
                .read(lba * BLOCK_BYTES, len_bytes)
                .await
                .map_err(read_error)?
        };
        Ok(Response {
            data_in: data,
            residual: Residual::of(wanted_bytes, command.expected_in),
            ..Response::good()
        })
    }

    /// WRITE (6/10/12/16) and WRITE AND VERIFY (10/12/16) (SBC-3 5.31-5.39). The engine's
    /// write is what the medium holds, so the verify step has nothing to add.
    pub(super) async fn write(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        check_no_protection(cdb)?;
        let Addressing {
            lba,
            blocks,
            length_byte,
        } = addressing(cdb);
        self.check_range(lba, blocks)?;
        let wanted_bytes = Self::check_transfer(blocks, length_byte)?;
        self.check_writable()?;
        let verify = matches!(
            cdb::u8_at(cdb, 0),
            opcode::WRITE_AND_VERIFY_10 | opcode::WRITE_AND_VERIFY_12 | opcode::WRITE_AND_VERIFY_16
        );
        // WRITE AND VERIFY has no FUA bit; its data is verified on the medium, so durable.
        let fua = self.write_through(fua_bit(cdb) && !verify);
        // Only what both the CDB and the initiator's transfer cover is written.
        let len_bytes = wanted_bytes.min(command.data_out.len() as u64) as usize;
        if len_bytes > 0 {
            let _gate = self.shared.write_gate.read().await;
            self.session
                .write(lba * BLOCK_BYTES, &command.data_out[..len_bytes], fua)
                .await
                .map_err(write_error)?;
        }
        Ok(with_residual(Residual::of(
            wanted_bytes,
            command.expected_out,
        )))
    }

    /// VERIFY (10/12/16) (SBC-3 5.27-5.29): with BYTCHK 01b the data-out is compared with the
    /// medium, with 11b one block of it is compared with every block.
    pub(super) async fn verify(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        check_no_protection(cdb)?;
        let Addressing {
            lba,
            blocks,
            length_byte,
        } = addressing(cdb);
        let byte_check = (cdb::u8_at(cdb, 1) >> 1) & 0x03;
        if byte_check == 0b10 {
            return Err(sense::invalid_cdb_field(1, Some(2)).into());
        }
        self.check_range(lba, blocks)?;
        if byte_check == 0 {
            return Ok(with_residual(Residual::of(0, command.expected_out)));
        }
        let medium_bytes = Self::check_transfer(blocks, length_byte)?;
        let wanted_bytes = if byte_check == 0b01 {
            medium_bytes
        } else {
            BLOCK_BYTES.min(medium_bytes)
        };
        let residual = Residual::of(wanted_bytes, command.expected_out);
        if medium_bytes == 0 {
            return Ok(with_residual(residual));
        }
        let medium = self
            .session
            .read(lba * BLOCK_BYTES, medium_bytes)
            .await
            .map_err(read_error)?;
        let sent = command.data_out;
        let mismatch = medium.iter().enumerate().position(|(i, byte)| {
            let expected = if byte_check == 0b01 {
                sent.get(i)
            } else {
                sent.get(i % BLOCK_BYTES as usize)
            };
            expected != Some(byte)
        });
        if let Some(offset) = mismatch {
            let offset = u32::try_from(offset).unwrap_or(u32::MAX);
            return Err(sense::MISCOMPARE.with_information(offset).into());
        }
        Ok(with_residual(residual))
    }

    /// WRITE SAME (10/16) (SBC-3 5.40, 5.41): one block repeated; zeros with UNMAP set
    /// deallocate (unmapped blocks read as zeros: LBPRZ). ANCHOR is not supported.
    pub(super) async fn write_same(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        check_no_protection(cdb)?;
        let flags = cdb::u8_at(cdb, 1);
        if flags & 0x10 != 0 {
            return Err(sense::invalid_cdb_field(1, Some(4)).into());
        }
        let unmap = flags & 0x08 != 0;
        let no_data_out = cdb::u8_at(cdb, 0) == opcode::WRITE_SAME_16 && flags & 0x01 != 0;
        let Addressing {
            lba,
            mut blocks,
            length_byte,
        } = addressing(cdb);
        if blocks == 0 {
            // WSNZ is clear: 0 blocks means up to the end of the medium.
            blocks = self.capacity_blocks().saturating_sub(lba);
        }
        self.check_range(lba, blocks)?;
        if blocks > WRITE_SAME_MAX_BLOCKS {
            return Err(sense::invalid_cdb_field(length_byte, None).into());
        }
        self.check_writable()?;
        let wanted_bytes = if no_data_out { 0 } else { BLOCK_BYTES };
        if !no_data_out && command.data_out.len() as u64 != BLOCK_BYTES {
            return Err(sense::invalid_cdb_field(length_byte, None).into());
        }
        let pattern = if no_data_out {
            &[][..]
        } else {
            command.data_out
        };
        let fua = self.write_through(fua_bit(cdb));
        let (offset_bytes, len_bytes) = (lba * BLOCK_BYTES, blocks * BLOCK_BYTES);
        if len_bytes > 0 {
            let _gate = self.shared.write_gate.read().await;
            if unmap || pattern.iter().all(|byte| *byte == 0) {
                // With UNMAP set the blocks are unmapped whatever the data (SBC-3 5.41: unmap
                // if possible), and read back as zeros (LBPRZ), as libiscsi and other
                // targets expect.
                let mode = if unmap {
                    ZeroMode::MayTrim
                } else {
                    ZeroMode::Allocate
                };
                self.session
                    .write_zeroes(offset_bytes, len_bytes, mode, fua)
                    .await
                    .map_err(write_error)?;
            } else {
                let chunk_blocks = (WRITE_SAME_CHUNK_BYTES / BLOCK_BYTES).min(blocks);
                let chunk: Vec<u8> = pattern
                    .iter()
                    .copied()
                    .cycle()
                    .take((chunk_blocks * BLOCK_BYTES) as usize)
                    .collect();
                let mut at = offset_bytes;
                let end = offset_bytes + len_bytes;
                while at < end {
                    let len = (end - at).min(chunk.len() as u64) as usize;
                    self.session
                        .write(at, &chunk[..len], false)
                        .await
                        .map_err(write_error)?;
                    at += len as u64;
                }
                if fua {
                    self.session.flush().await.map_err(write_error)?;
                }
            }
        }
        Ok(with_residual(Residual::of(
            wanted_bytes,
            command.expected_out,
        )))
    }

    /// UNMAP (SBC-3 5.25): every descriptor is checked before any range is deallocated.
    pub(super) async fn unmap(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        if cdb::u8_at(cdb, 1) & 0x01 != 0 {
            // ANCHOR is not supported (ANC_SUP is clear).
            return Err(sense::invalid_cdb_field(1, Some(0)).into());
        }
        let parameter_len = cdb::u16_at(cdb, 7) as usize;
        let residual = Residual::of(parameter_len as u64, command.expected_out);
        self.check_writable()?;
        if parameter_len == 0 {
            return Ok(with_residual(residual));
        }
        let Some(list) = command.data_out.get(..parameter_len) else {
            return Err(sense::PARAMETER_LIST_LENGTH.into());
        };
        if list.len() < 8 {
            return Err(sense::PARAMETER_LIST_LENGTH.into());
        }
        let descriptors_len = (cdb::u16_at(list, 2) as usize).min(list.len() - 8);
        let count = descriptors_len / 16;
        if count as u64 > u64::from(UNMAP_MAX_DESCRIPTORS) {
            return Err(sense::invalid_parameter_field(2).into());
        }
        let mut ranges = Vec::with_capacity(count);
        let mut total_blocks = 0u64;
        for i in 0..count {
            let at = 8 + i * 16;
            let lba = cdb::u64_at(list, at);
            let blocks = u64::from(cdb::u32_at(list, at + 8));
            self.check_range(lba, blocks)?;
            total_blocks += blocks;
            if total_blocks > u64::from(UNMAP_MAX_BLOCKS) {
                return Err(sense::invalid_parameter_field((at + 8) as u16).into());
            }
            if blocks > 0 {
                ranges.push((lba, blocks));
            }
        }
        let _gate = self.shared.write_gate.read().await;
        for (lba, blocks) in ranges {
            // Zeroing with MayTrim deallocates whole engine blocks and zeroes partial ones,
            // so unmapped blocks read as zeros (LBPRZ).
            self.session
                .write_zeroes(
                    lba * BLOCK_BYTES,
                    blocks * BLOCK_BYTES,
                    ZeroMode::MayTrim,
                    false,
                )
                .await
                .map_err(write_error)?;
        }
        Ok(with_residual(residual))
    }

    /// COMPARE AND WRITE (SBC-3 5.2): no other write of this logical unit runs between the
    /// compare and the write.
    pub(super) async fn compare_and_write(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        check_no_protection(cdb)?;
        let lba = cdb::u64_at(cdb, 2);
        let blocks = u64::from(cdb::u8_at(cdb, 13));
        if blocks > u64::from(COMPARE_AND_WRITE_MAX_BLOCKS) {
            return Err(sense::invalid_cdb_field(13, None).into());
        }
        // The data-out must be exactly the compare and the write halves; a mismatch means
        // the CDB and the transfer disagree (e.g. 256 blocks wrapped to 0 in the CDB).
        let len_bytes = blocks * BLOCK_BYTES;
        if command.data_out.len() as u64 != 2 * len_bytes {
            return Err(sense::invalid_cdb_field(13, None).into());
        }
        if blocks == 0 {
            return Ok(Response::good());
        }
        self.check_range(lba, blocks)?;
        self.check_writable()?;
        let (compare, replacement) = command.data_out.split_at(len_bytes as usize);
        let fua = self.write_through(fua_bit(cdb));
        let _gate = self.shared.write_gate.write().await;
        let medium = self
            .session
            .read(lba * BLOCK_BYTES, len_bytes)
            .await
            .map_err(read_error)?;
        if let Some(offset) = medium.iter().zip(compare).position(|(a, b)| a != b) {
            let offset = u32::try_from(offset).unwrap_or(u32::MAX);
            return Err(sense::MISCOMPARE.with_information(offset).into());
        }
        self.session
            .write(lba * BLOCK_BYTES, replacement, fua)
            .await
            .map_err(write_error)?;
        Ok(with_residual(Residual::of(
            2 * len_bytes,
            command.expected_out,
        )))
    }

    /// ORWRITE (16) (SBC-3 5.4): the medium becomes its OR with the data-out, with no other
    /// write of this logical unit in between.
    pub(super) async fn or_write(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        check_no_protection(cdb)?;
        let Addressing {
            lba,
            blocks,
            length_byte,
        } = addressing(cdb);
        self.check_range(lba, blocks)?;
        let wanted_bytes = Self::check_transfer(blocks, length_byte)?;
        self.check_writable()?;
        let fua = self.write_through(fua_bit(cdb));
        let len_bytes = wanted_bytes.min(command.data_out.len() as u64);
        if len_bytes > 0 {
            let _gate = self.shared.write_gate.write().await;
            let offset_bytes = lba * BLOCK_BYTES;
            let mut medium = self
                .session
                .read(offset_bytes, len_bytes)
                .await
                .map_err(read_error)?;
            for (byte, mask) in medium.iter_mut().zip(command.data_out) {
                *byte |= mask;
            }
            self.session
                .write(offset_bytes, &medium, fua)
                .await
                .map_err(write_error)?;
        }
        Ok(with_residual(Residual::of(
            wanted_bytes,
            command.expected_out,
        )))
    }

    /// SYNCHRONIZE CACHE (10/16) (SBC-3 5.22, 5.23): every acknowledged write becomes durable
    /// (the engine flushes the whole pool; IMMED is served synchronously).
    pub(super) async fn synchronize_cache(&self, command: &Command<'_>) -> Outcome {
        let Addressing { lba, blocks, .. } = addressing(command.cdb);
        self.check_range(lba, blocks)?;
        self.session.flush().await.map_err(write_error)?;
        Ok(Response::good())
    }

    /// PRE-FETCH (10/16) (SBC-3 5.6, 5.7): nothing to load; the range is checked.
    pub(super) fn pre_fetch(&self, command: &Command<'_>) -> Outcome {
        let Addressing { lba, blocks, .. } = addressing(command.cdb);
        self.check_range(lba, blocks)?;
        Ok(Response::good())
    }

    /// GET LBA STATUS (SBC-3 5.5): mapped and deallocated runs from the starting LBA.
    pub(super) async fn get_lba_status(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let lba = cdb::u64_at(cdb, 2);
        let allocation_len = cdb::u32_at(cdb, 10) as usize;
        let capacity = self.capacity_blocks();
        if lba >= capacity {
            return Err(sense::LBA_OUT_OF_RANGE.into());
        }
        let offset_bytes = lba * BLOCK_BYTES;
        let len_bytes = ((capacity - lba) * BLOCK_BYTES).min(LBA_STATUS_WINDOW_BYTES);
        let runs = self
            .session
            .block_status(offset_bytes, len_bytes)
            .map_err(read_error)?;
        let descriptors_max =
            (allocation_len.saturating_sub(8) / 16).clamp(1, LBA_STATUS_DESCRIPTORS_MAX);
        // (first LBA, blocks, deallocated)
        let mut descriptors: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = lba;
        for run in runs {
            let run_blocks = run.len_bytes / BLOCK_BYTES;
            if run_blocks == 0 {
                continue;
            }
            match descriptors.last_mut() {
                Some((_, blocks, hole)) if *hole == run.hole => *blocks += run_blocks,
                _ => {
                    if descriptors.len() == descriptors_max {
                        break;
                    }
                    descriptors.push((at, run_blocks, run.hole));
                }
            }
            at += run_blocks;
        }
        let mut data = vec![0u8; 8];
        for (first, blocks, hole) in descriptors {
            let mut descriptor = [0u8; 16];
            descriptor[0..8].copy_from_slice(&first.to_be_bytes());
            let blocks = u32::try_from(blocks).unwrap_or(u32::MAX);
            descriptor[8..12].copy_from_slice(&blocks.to_be_bytes());
            // PROVISIONING STATUS: 0 mapped, 1 deallocated.
            descriptor[12] = u8::from(hole);
            data.extend_from_slice(&descriptor);
        }
        let len = (data.len() - 4) as u32;
        data[0..4].copy_from_slice(&len.to_be_bytes());
        Ok(allocated(data, allocation_len, command.expected_in))
    }
}
