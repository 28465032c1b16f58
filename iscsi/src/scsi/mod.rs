//! SCSI block commands (SBC-3) and primary commands (SPC-4) over an engine session.
//!
//! The transport (`connection.rs`) gathers a command's CDB and all of its data-out, calls
//! [`Lun::execute`], and turns the [`Response`] into iSCSI PDUs. Everything SCSI — decoding
//! CDBs, sense data, VPD and mode pages, reservations, residuals — lives here.

use std::sync::Arc;

use grove_engine::Session;

/// Bytes of one logical block as initiators see it.
pub const LOGICAL_BLOCK_SIZE: u32 = 512;

/// Largest data transfer of one command, in bytes (reported in the Block Limits VPD page; the
/// transport refuses larger transfers before gathering any data).
pub const MAX_TRANSFER_BYTES: u32 = 8 << 20;

/// SCSI status codes (SAM-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    TaskAborted = 0x40,
}

/// How much of the expected transfer the command did not move (underflow) or would have
/// moved beyond it (overflow), for the iSCSI response's residual fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residual {
    #[default]
    None,
    Underflow(u32),
    Overflow(u32),
}

/// The I_T nexus a command arrived on: one iSCSI session.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nexus {
    /// Unique among the nexuses of the process.
    pub id: u64,
    /// The initiator's iSCSI name (`InitiatorName`).
    pub initiator_name: String,
    /// The initiator session id of the login.
    pub isid: [u8; 6],
    /// The target's iSCSI name.
    pub target_name: String,
}

/// One SCSI command as the transport hands it over.
#[derive(Debug)]
pub struct Command<'a> {
    /// The CDB (16 bytes from the header, longer with an extended-CDB AHS).
    pub cdb: &'a [u8],
    /// Every data-out byte the initiator sent (the transport gathers `expected_out` bytes).
    pub data_out: &'a [u8],
    /// The initiator's expected data-in length (0 unless the command reads).
    pub expected_in: u32,
    /// The initiator's expected data-out length (0 unless the command writes).
    pub expected_out: u32,
}

/// What a command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    /// Data-in, at most `expected_in` bytes.
    pub data_in: Vec<u8>,
    /// Sense data (fixed format) with CHECK CONDITION.
    pub sense: Option<Vec<u8>>,
    pub residual: Residual,
}

/// State of one logical unit shared by every nexus that reaches it (reservations, unit
/// attentions). The transport keeps one per target name.
#[derive(Default)]
pub struct LuShared {}

impl LuShared {
    pub fn new() -> Arc<LuShared> {
        Arc::new(LuShared::default())
    }
}

/// One nexus's view of a logical unit: its engine session and the unit's shared state.
pub struct Lun {
    session: Arc<Session>,
    shared: Arc<LuShared>,
    nexus: Nexus,
}

impl Lun {
    pub fn new(session: Arc<Session>, shared: Arc<LuShared>, nexus: Nexus) -> Lun {
        Lun {
            session,
            shared,
            nexus,
        }
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    pub fn nexus(&self) -> &Nexus {
        &self.nexus
    }

    /// Executes one command to completion. Never panics on any CDB or data.
    pub async fn execute(&self, command: &Command<'_>) -> Response {
        let _ = (&self.shared, command);
        check_condition(SenseKey::IllegalRequest, 0x20, 0x00)
    }

    /// LUN RESET from this nexus: clears reservations held through RESERVE(6/10) and
    /// reports a unit attention to every other nexus.
    pub fn reset(&self) {}

    /// The nexus ended (logout or lost connection).
    pub fn nexus_lost(&self) {}
}

/// Sense keys (SPC-4 4.5.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    AbortedCommand = 0xb,
    Miscompare = 0xe,
}

/// CHECK CONDITION with fixed-format sense data.
pub fn check_condition(key: SenseKey, asc: u8, ascq: u8) -> Response {
    let mut sense = vec![0u8; 18];
    sense[0] = 0x70;
    sense[2] = key as u8;
    sense[7] = 10;
    sense[12] = asc;
    sense[13] = ascq;
    Response {
        status: Status::CheckCondition,
        data_in: Vec::new(),
        sense: Some(sense),
        residual: Residual::None,
    }
}
