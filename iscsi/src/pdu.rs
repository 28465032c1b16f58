//! iSCSI PDUs on the wire (RFC 7143 section 11): the 48-byte basic header segment (BHS), an
//! optional additional header segment (AHS), an optional header digest, the data segment
//! padded to a multiple of 4 bytes, and an optional data digest.
//!
//! Digests are CRC32C (RFC 7143 section 13.1) stored in little-endian byte order, as every
//! initiator and target in practice sends them (Linux, FreeBSD, libiscsi). The header digest
//! covers the BHS and the AHS; the data digest covers the data and its padding.
//!
//! A [`Pdu`] keeps its header as raw bytes with accessors for the fields the target reads
//! and writes: the layout differs per opcode, so a typed struct per opcode would add much
//! code and no safety (every field is just bytes at an offset).

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of the basic header segment.
pub const BHS_LEN: usize = 48;

/// The reserved task tag ("no task").
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes (RFC 7143 11.1.1).
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MANAGEMENT: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const TEXT: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT: u8 = 0x06;
    pub const SNACK: u8 = 0x10;

    // Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MANAGEMENT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reasons of a Reject PDU (RFC 7143 11.17.1).
pub mod reject {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
}

/// Flag bits of byte 1 shared by several opcodes.
pub const FLAG_FINAL: u8 = 0x80;

/// Which digests a connection uses (negotiated at login; none during login).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

/// A PDU: its header as bytes, its additional header segment, and its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    /// The additional header segments, a multiple of 4 bytes (extended CDBs only in practice).
    pub ahs: Vec<u8>,
    pub data: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("header digest mismatch")]
    HeaderDigest,
    /// The data digest did not match: the PDU's header is intact (and kept for the Reject),
    /// its data is not.
    #[error("data digest mismatch")]
    DataDigest { bhs: Box<[u8; BHS_LEN]> },
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataTooLong { len: u32, max: u32 },
}

impl Pdu {
    /// A PDU of `opcode` with every other header byte zero.
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Bytes::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// The I bit: delivered for immediate delivery, outside the command window.
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    pub fn set_immediate(&mut self) {
        self.bhs[0] |= 0x40;
    }

    /// Byte 1: the F bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    pub fn set_flags(&mut self, flags: u8) {
        self.bhs[1] = flags;
    }

    pub fn final_bit(&self) -> bool {
        self.bhs[1] & FLAG_FINAL != 0
    }

    pub fn byte(&self, at: usize) -> u8 {
        self.bhs[at]
    }

    pub fn set_byte(&mut self, at: usize, value: u8) {
        self.bhs[at] = value;
    }

    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.bhs[at], self.bhs[at + 1]])
    }

    pub fn set_u16(&mut self, at: usize, value: u16) {
        self.bhs[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    pub fn u32_at(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bhs[at..at + 4]);
        u32::from_be_bytes(b)
    }

    pub fn set_u32(&mut self, at: usize, value: u32) {
        self.bhs[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    /// The LUN field (bytes 8-15).
    pub fn lun(&self) -> [u8; 8] {
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&self.bhs[8..16]);
        lun
    }

    pub fn set_lun(&mut self, lun: [u8; 8]) {
        self.bhs[8..16].copy_from_slice(&lun);
    }

    /// Initiator task tag (bytes 16-19).
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    pub fn set_itt(&mut self, itt: u32) {
        self.set_u32(16, itt);
    }

    /// DataSegmentLength as the header states it.
    fn data_segment_length(&self) -> u32 {
        u32::from_be_bytes([0, self.bhs[5], self.bhs[6], self.bhs[7]])
    }

    /// The whole PDU as bytes, digests included, ready to send. The header's AHS and data
    /// lengths are set from `ahs` and `data`.
    pub fn encode_header(&mut self, digests: Digests) -> Vec<u8> {
        let ahs_words = (self.ahs.len() / 4) as u8;
        self.bhs[4] = ahs_words;
        let len = (self.data.len() as u32).to_be_bytes();
        self.bhs[5..8].copy_from_slice(&len[1..4]);
        let mut out = Vec::with_capacity(BHS_LEN + self.ahs.len() + 4);
        out.extend_from_slice(&self.bhs);
        out.extend_from_slice(&self.ahs);
        if digests.header {
            let crc = crc32c::crc32c(&out);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out
    }

    /// Padding and data digest that follow the data segment.
    pub fn encode_trailer(&self, digests: Digests) -> Vec<u8> {
        let pad = padding(self.data.len());
        let mut out = vec![0u8; pad];
        if digests.data && !self.data.is_empty() {
            let crc = crc32c::crc32c_append(crc32c::crc32c(&self.data), &out);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        out
    }

    /// Writes the PDU (header, data, padding, digests).
    pub async fn write_to<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        digests: Digests,
    ) -> std::io::Result<()> {
        let header = self.encode_header(digests);
        writer.write_all(&header).await?;
        if !self.data.is_empty() {
            writer.write_all(&self.data).await?;
            let trailer = self.encode_trailer(digests);
            writer.write_all(&trailer).await?;
        }
        Ok(())
    }
}

/// Bytes of zero padding after a data segment of `len` bytes.
pub fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// Reads one PDU. `Ok(None)` is a clean end of stream before a PDU started. Data segments
/// longer than `max_data` are refused before anything is allocated for them.
pub async fn read_pdu<R: AsyncRead + Unpin>(
    reader: &mut R,
    digests: Digests,
    max_data: u32,
) -> Result<Option<Pdu>, PduError> {
    let mut bhs = [0u8; BHS_LEN];
    // A clean end of stream is one that comes before the first byte of a PDU.
    let first = reader.read(&mut bhs[..1]).await?;
    if first == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut bhs[1..]).await?;
    let mut pdu = Pdu {
        bhs,
        ahs: Vec::new(),
        data: Bytes::new(),
    };
    let ahs_len = usize::from(pdu.bhs[4]) * 4;
    if ahs_len > 0 {
        pdu.ahs = vec![0u8; ahs_len];
        reader.read_exact(&mut pdu.ahs).await?;
    }
    if digests.header {
        let mut digest = [0u8; 4];
        reader.read_exact(&mut digest).await?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&pdu.bhs), &pdu.ahs);
        if crc != u32::from_le_bytes(digest) {
            return Err(PduError::HeaderDigest);
        }
    }
    let len = pdu.data_segment_length();
    if len > max_data {
        return Err(PduError::DataTooLong { len, max: max_data });
    }
    if len > 0 {
        let padded = len as usize + padding(len as usize);
        let mut data = vec![0u8; padded];
        reader.read_exact(&mut data).await?;
        if digests.data {
            let mut digest = [0u8; 4];
            reader.read_exact(&mut digest).await?;
            if crc32c::crc32c(&data) != u32::from_le_bytes(digest) {
                return Err(PduError::DataDigest {
                    bhs: Box::new(pdu.bhs),
                });
            }
        }
        data.truncate(len as usize);
        pdu.data = Bytes::from(data);
    }
    Ok(Some(pdu))
}

/// Whether an 8-byte LUN field addresses LUN 0 (peripheral or flat addressing, SAM-5 4.7).
pub fn is_lun_zero(lun: [u8; 8]) -> bool {
    let method = lun[0] >> 6;
    (method == 0 || method == 1) && lun[0] & 0x3f == 0 && lun[1] == 0 && lun[2..] == [0; 6]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn round_trip(mut pdu: Pdu, digests: Digests) -> Pdu {
        let mut wire = Vec::new();
        pdu.write_to(&mut wire, digests).await.unwrap();
        assert_eq!(wire.len() % 4, 0);
        let mut reader = &wire[..];
        let read = read_pdu(&mut reader, digests, 1 << 20)
            .await
            .unwrap()
            .unwrap();
        assert!(reader.is_empty(), "read the whole PDU");
        read
    }

    #[tokio::test]
    async fn pdus_round_trip_with_and_without_digests() {
        for digests in [
            Digests::default(),
            Digests {
                header: true,
                data: true,
            },
        ] {
            for data_len in [0usize, 1, 3, 4, 5, 8192] {
                let mut pdu = Pdu::new(op::DATA_IN);
                pdu.set_flags(FLAG_FINAL | 0x01);
                pdu.set_itt(0x1234_5678);
                pdu.ahs = vec![7u8; 20];
                pdu.data = Bytes::from(vec![0xa5; data_len]);
                let read = round_trip(pdu.clone(), digests).await;
                assert_eq!(read.data, pdu.data);
                assert_eq!(read.ahs, pdu.ahs);
                assert_eq!(read.itt(), 0x1234_5678);
                assert_eq!(read.opcode(), op::DATA_IN);
                assert!(read.final_bit());
            }
        }
    }

    #[tokio::test]
    async fn digest_matches_the_published_crc32c_example() {
        // RFC 7143 B.4: 32 bytes of zeros have CRC32C 0x8a9136aa, sent as aa 36 91 8a.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        let mut pdu = Pdu::new(op::NOP_IN);
        let header = pdu.encode_header(Digests {
            header: true,
            data: false,
        });
        let crc = crc32c::crc32c(&header[..BHS_LEN]);
        assert_eq!(header[BHS_LEN..], crc.to_le_bytes());
    }

    #[tokio::test]
    async fn corrupt_digests_and_oversized_data_are_refused() {
        let digests = Digests {
            header: true,
            data: true,
        };
        let mut pdu = Pdu::new(op::SCSI_COMMAND);
        pdu.data = Bytes::from(vec![1u8; 100]);
        let mut wire = Vec::new();
        pdu.write_to(&mut wire, digests).await.unwrap();

        let mut bad_header = wire.clone();
        bad_header[20] ^= 1;
        let err = read_pdu(&mut &bad_header[..], digests, 1 << 20).await;
        assert!(matches!(err, Err(PduError::HeaderDigest)));

        let mut bad_data = wire.clone();
        bad_data[BHS_LEN + 4 + 10] ^= 1;
        let err = read_pdu(&mut &bad_data[..], digests, 1 << 20).await;
        assert!(matches!(err, Err(PduError::DataDigest { .. })));

        let err = read_pdu(&mut &wire[..], digests, 99).await;
        assert!(matches!(
            err,
            Err(PduError::DataTooLong { len: 100, max: 99 })
        ));
    }

    #[tokio::test]
    async fn end_of_stream_is_clean_only_between_pdus() {
        assert!(read_pdu(&mut &[][..], Digests::default(), 0)
            .await
            .unwrap()
            .is_none());
        let short = [0u8; 20];
        assert!(matches!(
            read_pdu(&mut &short[..], Digests::default(), 0).await,
            Err(PduError::Io(_))
        ));
    }

    #[test]
    fn lun_zero_in_both_addressing_methods() {
        assert!(is_lun_zero([0; 8]));
        assert!(is_lun_zero([0x40, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!is_lun_zero([0, 1, 0, 0, 0, 0, 0, 0]));
        assert!(!is_lun_zero([0x40, 1, 0, 0, 0, 0, 0, 0]));
        assert!(!is_lun_zero([0, 0, 0, 0, 0, 0, 0, 1]));
    }
}
