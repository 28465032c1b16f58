//! Sense data (SPC-4 4.5): the fixed and descriptor formats, the additional sense codes this
//! target reports, and the one mapping from engine errors to sense.

use grove_engine::Error;

use super::SenseKey;

/// One sense condition: key, additional sense code and qualifier, and the optional
/// INFORMATION and sense-key-specific fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field (a byte offset for miscompares).
    pub information: Option<u32>,
    /// Points at the offending field: in the CDB or in the parameter list.
    pub field: Option<FieldPointer>,
}

/// The sense-key-specific field pointer of ILLEGAL REQUEST (SPC-4 4.5.2.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// True for a field of the CDB, false for one of the parameter list.
    pub in_cdb: bool,
    pub byte: u16,
    /// The bit of `byte` where the field's most significant bit is, when known.
    pub bit: Option<u8>,
}

impl Sense {
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            information: None,
            field: None,
        }
    }

    pub fn with_information(mut self, information: u32) -> Sense {
        self.information = Some(information);
        self
    }

    /// Fixed-format sense data (response code 0x70), 18 bytes.
    pub fn fixed(&self) -> Vec<u8> {
        let mut sense = vec![0u8; 18];
        sense[0] = 0x70;
        sense[2] = self.key as u8;
        if let Some(information) = self.information {
            sense[0] |= 0x80;
            sense[3..7].copy_from_slice(&information.to_be_bytes());
        }
        sense[7] = 10;
        sense[12] = self.asc;
        sense[13] = self.ascq;
        if let Some(field) = self.field {
            sense[15] = 0x80 | if field.in_cdb { 0x40 } else { 0 };
            if let Some(bit) = field.bit {
                sense[15] |= 0x08 | (bit & 0x07);
            }
            sense[16..18].copy_from_slice(&field.byte.to_be_bytes());
        }
        sense
    }

    /// Descriptor-format sense data (response code 0x72), for REQUEST SENSE with DESC set.
    pub fn descriptor(&self) -> Vec<u8> {
        let mut sense = vec![0x72, self.key as u8, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(information) = self.information {
            // Information descriptor (type 0x00): VALID, then an 8-byte value.
            sense.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            sense.extend_from_slice(&u64::from(information).to_be_bytes());
        }
        if let Some(field) = self.field {
            // Sense key specific descriptor (type 0x02).
            let mut sks = [0x02, 0x06, 0, 0, 0, 0, 0, 0];
            sks[4] = 0x80 | if field.in_cdb { 0x40 } else { 0 };
            if let Some(bit) = field.bit {
                sks[4] |= 0x08 | (bit & 0x07);
            }
            sks[5..7].copy_from_slice(&field.byte.to_be_bytes());
            sense.extend_from_slice(&sks);
        }
        sense[7] = (sense.len() - 8) as u8;
        sense
    }
}

/// INVALID COMMAND OPERATION CODE.
pub const INVALID_OPCODE: Sense = Sense::new(SenseKey::IllegalRequest, 0x20, 0x00);
/// LOGICAL BLOCK ADDRESS OUT OF RANGE.
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(SenseKey::IllegalRequest, 0x21, 0x00);
/// PARAMETER LIST LENGTH ERROR.
pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(SenseKey::IllegalRequest, 0x1a, 0x00);
/// INVALID RELEASE OF PERSISTENT RESERVATION.
pub const INVALID_RELEASE: Sense = Sense::new(SenseKey::IllegalRequest, 0x26, 0x04);
/// SAVING PARAMETERS NOT SUPPORTED.
pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(SenseKey::IllegalRequest, 0x39, 0x00);
/// WRITE PROTECTED (the ref is a commit, a tag or a protected branch).
pub const WRITE_PROTECTED: Sense = Sense::new(SenseKey::DataProtect, 0x27, 0x00);
/// SOFTWARE WRITE PROTECTED (the control mode page's SWP bit).
pub const SOFTWARE_WRITE_PROTECTED: Sense = Sense::new(SenseKey::DataProtect, 0x27, 0x02);
/// MISCOMPARE DURING VERIFY OPERATION.
pub const MISCOMPARE: Sense = Sense::new(SenseKey::Miscompare, 0x1d, 0x00);
/// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
pub const UA_POWER_ON: Sense = Sense::new(SenseKey::UnitAttention, 0x29, 0x00);
/// BUS DEVICE RESET FUNCTION OCCURRED (a LOGICAL UNIT RESET).
pub const UA_LUN_RESET: Sense = Sense::new(SenseKey::UnitAttention, 0x29, 0x03);
/// MODE PARAMETERS CHANGED.
pub const UA_MODE_CHANGED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x01);
/// RESERVATIONS PREEMPTED.
pub const UA_RESERVATIONS_PREEMPTED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x03);
/// RESERVATIONS RELEASED.
pub const UA_RESERVATIONS_RELEASED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x04);
/// REGISTRATIONS PREEMPTED.
pub const UA_REGISTRATIONS_PREEMPTED: Sense = Sense::new(SenseKey::UnitAttention, 0x2a, 0x05);

/// INVALID FIELD IN CDB, pointing at `byte` (and `bit`, when given) of the CDB.
pub fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Sense {
    Sense {
        field: Some(FieldPointer {
            in_cdb: true,
            byte,
            bit,
        }),
        ..Sense::new(SenseKey::IllegalRequest, 0x24, 0x00)
    }
}

/// INVALID FIELD IN PARAMETER LIST, pointing at `byte` of the parameter data.
pub fn invalid_parameter_field(byte: u16) -> Sense {
    Sense {
        field: Some(FieldPointer {
            in_cdb: false,
            byte,
            bit: None,
        }),
        ..Sense::new(SenseKey::IllegalRequest, 0x26, 0x00)
    }
}

/// The direction of the engine call that failed, which picks between read and write errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
}

/// Maps an engine error to sense data: the one place where engine errors become SCSI.
pub fn engine_error(error: &Error, kind: IoKind) -> Sense {
    let medium = match kind {
        // UNRECOVERED READ ERROR.
        IoKind::Read => Sense::new(SenseKey::MediumError, 0x11, 0x00),
        // WRITE ERROR.
        IoKind::Write => Sense::new(SenseKey::MediumError, 0x0c, 0x00),
    };
    match error {
        Error::ReadOnly(_) => WRITE_PROTECTED,
        Error::OutOfRange { .. } => LBA_OUT_OF_RANGE,
        // SPACE ALLOCATION FAILED WRITE PROTECT: a thin device out of space (SBC-3 4.7.3.7).
        Error::NoSpace => Sense::new(SenseKey::DataProtect, 0x27, 0x07),
        Error::Io(_) | Error::Corrupt { .. } => medium,
        // LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE: the pool is shutting down.
        Error::Closed => Sense::new(SenseKey::NotReady, 0x04, 0x00),
        // LOGICAL UNIT NOT SUPPORTED: the ref is gone (deleted, or a withdrawn candidate).
        Error::NotFound { .. } | Error::Conflict(_) => {
            Sense::new(SenseKey::IllegalRequest, 0x25, 0x00)
        }
        Error::InvalidArgument(_) => invalid_cdb_field(0, None),
        // INTERNAL TARGET FAILURE: the pool refuses writes after an earlier failure.
        _ => Sense::new(SenseKey::HardwareError, 0x44, 0x00),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spc4_4_5_3_fixed_format_with_information_and_field_pointer() {
        let mut sense = MISCOMPARE.with_information(17);
        sense.field = Some(FieldPointer {
            in_cdb: true,
            byte: 2,
            bit: Some(5),
        });
        let bytes = sense.fixed();
        assert_eq!(bytes.len(), 18);
        assert_eq!(bytes[0], 0xf0);
        assert_eq!(bytes[2], 0x0e);
        assert_eq!(&bytes[3..7], &[0, 0, 0, 17]);
        assert_eq!((bytes[12], bytes[13]), (0x1d, 0x00));
        assert_eq!(bytes[15], 0x80 | 0x40 | 0x08 | 5);
        assert_eq!(&bytes[16..18], &[0, 2]);
    }

    #[test]
    fn spc4_4_5_2_descriptor_format_lengths_add_up() {
        let bytes = MISCOMPARE.with_information(3).descriptor();
        assert_eq!(bytes[0], 0x72);
        assert_eq!(bytes[7] as usize, bytes.len() - 8);
    }
}
