//! SCSI block commands (SBC-3) and primary commands (SPC-4) over an engine session.
//!
//! The transport (`connection.rs`) gathers a command's CDB and all of its data-out, calls
//! [`Lun::execute`], and turns the [`Response`] into iSCSI PDUs. Everything SCSI — decoding
//! CDBs, sense data, VPD and mode pages, reservations, residuals — lives here.
//!
//! Modules: `cdb` (field access and the opcode table), `sense` (sense data and the engine error
//! mapping), `block` (reads, writes, verify, write same, unmap, compare and write, ...),
//! `inquiry` (standard data and VPD pages), `mode` (mode pages), `reservations` (persistent
//! reservations and RESERVE/RELEASE).
//!
//! What the transport does around [`Lun::execute`]:
//! - one [`LuShared`] per logical unit (target), one [`Lun`] per nexus; [`Lun::nexus_lost`] on
//!   logout and on connection loss, [`Lun::reset`] on LOGICAL UNIT RESET (after letting the
//!   unit's running commands finish: engine I/O is never dropped mid-flight);
//! - every command runs to completion; task attributes may all be treated as SIMPLE (the
//!   Extended INQUIRY page claims SIMPSUP only), ACA is not supported (a CDB with NACA set is
//!   refused here);
//! - transfers above [`MAX_TRANSFER_BYTES`] are refused before any data is gathered
//!   ([`precheck`]), commands to LUNs other than 0 get [`unsupported_lun`];
//! - the response's residual is copied as is; data-in is never longer than `expected_in`.

mod block;
mod cdb;
mod inquiry;
mod mode;
mod reservations;
pub mod sense;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use grove_engine::Session;
use parking_lot::Mutex;

use self::cdb::{opcode, Access};
use self::mode::ModeState;
use self::reservations::{NexusKey, Reservations};
pub use self::sense::Sense;

/// Bytes of one logical block as initiators see it.
pub const LOGICAL_BLOCK_SIZE: u32 = 512;

/// Largest data transfer of one command, in bytes (reported in the Block Limits VPD page; the
/// transport refuses larger transfers before gathering any data).
pub const MAX_TRANSFER_BYTES: u32 = 8 << 20;

/// Unit attentions kept for one nexus; older ones are dropped beyond this (SAM-5 allows
/// reporting only the most important one).
const PENDING_ATTENTIONS_MAX: usize = 8;

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

impl Residual {
    /// The residual of a transfer the command wanted to make (`wanted_bytes`, from the CDB)
    /// against what the initiator expected (`expected_bytes`, the iSCSI EDTL).
    pub fn of(wanted_bytes: u64, expected_bytes: u32) -> Residual {
        let expected_bytes = u64::from(expected_bytes);
        let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        match wanted_bytes.cmp(&expected_bytes) {
            std::cmp::Ordering::Equal => Residual::None,
            std::cmp::Ordering::Less => Residual::Underflow(clamp(expected_bytes - wanted_bytes)),
            std::cmp::Ordering::Greater => Residual::Overflow(clamp(wanted_bytes - expected_bytes)),
        }
    }
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

impl Response {
    fn good() -> Response {
        Response {
            status: Status::Good,
            data_in: Vec::new(),
            sense: None,
            residual: Residual::None,
        }
    }

    fn check(sense: Sense) -> Response {
        Response {
            status: Status::CheckCondition,
            data_in: Vec::new(),
            sense: Some(sense.fixed()),
            residual: Residual::None,
        }
    }

    fn conflict() -> Response {
        Response {
            status: Status::ReservationConflict,
            ..Response::good()
        }
    }
}

/// Why a command did not complete with GOOD status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    Check(Sense),
    Conflict,
}

impl From<Sense> for Failure {
    fn from(sense: Sense) -> Failure {
        Failure::Check(sense)
    }
}

type Outcome<T = Response> = Result<T, Failure>;

/// What the transport answers by itself, before gathering any data-out: a transfer larger
/// than [`MAX_TRANSFER_BYTES`] is refused with INVALID FIELD IN CDB (pointing at the CDB's
/// transfer length where it has one). `None`: gather the data and call [`Lun::execute`].
pub fn precheck(cdb: &[u8], expected_out: u32) -> Option<Response> {
    if expected_out <= MAX_TRANSFER_BYTES {
        return None;
    }
    let length_byte = match cdb.first().map(|code| code >> 5) {
        Some(0) => 4,
        Some(1 | 2) => 7,
        Some(5) => 6,
        Some(4) => 10,
        _ => 0,
    };
    Some(Response::check(sense::invalid_cdb_field(length_byte, None)))
}

/// Data-in of `data` (already cut to the allocation length) to an initiator expecting
/// `expected_in` bytes: cut to that too, with the residual of the difference.
fn data_in(mut data: Vec<u8>, expected_in: u32) -> Response {
    let residual = Residual::of(data.len() as u64, expected_in);
    data.truncate(expected_in as usize);
    Response {
        data_in: data,
        residual,
        ..Response::good()
    }
}

/// Data-in of a command with an ALLOCATION LENGTH: the full `data` cut to `allocation_len`,
/// then to what the initiator expects.
fn allocated(mut data: Vec<u8>, allocation_len: usize, expected_in: u32) -> Response {
    data.truncate(allocation_len);
    data_in(data, expected_in)
}

/// State of one logical unit shared by every nexus that reaches it (reservations, unit
/// attentions). The transport keeps one per target name.
#[derive(Default)]
pub struct LuShared {
    state: Mutex<LuState>,
    /// Writes hold it shared; COMPARE AND WRITE holds it exclusively over its compare and its
    /// write, so no other write lands between the two.
    write_gate: tokio::sync::RwLock<()>,
}

#[derive(Default)]
struct LuState {
    reservations: Reservations,
    mode: ModeState,
    /// Unit attentions waiting for each nexus (reported one per command, oldest first).
    attentions: HashMap<NexusKey, VecDeque<Sense>>,
    /// Nexuses logged in now, with how many `Lun`s each has open.
    attached: HashMap<NexusKey, usize>,
}

impl LuState {
    fn queue_attention(&mut self, nexus: &NexusKey, sense: Sense) {
        let queue = self.attentions.entry(nexus.clone()).or_default();
        if queue.contains(&sense) {
            return;
        }
        if queue.len() >= PENDING_ATTENTIONS_MAX {
            queue.pop_front();
        }
        queue.push_back(sense);
    }

    /// Queues `sense` for every attached nexus except `except`.
    fn queue_attention_for_attached(&mut self, sense: Sense, except: Option<&NexusKey>) {
        let nexuses: Vec<NexusKey> = self
            .attached
            .keys()
            .filter(|key| Some(*key) != except)
            .cloned()
            .collect();
        for nexus in nexuses {
            self.queue_attention(&nexus, sense);
        }
    }
}

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
    key: NexusKey,
}

impl Lun {
    /// Attaches a nexus to the logical unit. Its first command reports POWER ON, RESET, OR
    /// BUS DEVICE RESET OCCURRED, as after any new login (initiators expect and clear it).
    pub fn new(session: Arc<Session>, shared: Arc<LuShared>, nexus: Nexus) -> Lun {
        let key = NexusKey::of(&nexus);
        {
            let mut state = shared.state.lock();
            *state.attached.entry(key.clone()).or_default() += 1;
            state.attentions.remove(&key);
            state.queue_attention(&key, sense::UA_POWER_ON);
        }
        Lun {
            session,
            shared,
            nexus,
            key,
        }
    }

    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    pub fn nexus(&self) -> &Nexus {
        &self.nexus
    }

    /// Executes one command to completion. Never panics on any CDB or data.
    ///
    /// Drive the returned future to completion: it holds engine I/O futures, which must not
    /// be dropped mid-flight.
    pub async fn execute(&self, command: &Command<'_>) -> Response {
        match self.execute_inner(command).await {
            Ok(response) => response,
            Err(Failure::Check(sense)) => Response::check(sense),
            Err(Failure::Conflict) => Response::conflict(),
        }
    }

    async fn execute_inner(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let Some(&code) = cdb.first() else {
            return Err(sense::INVALID_OPCODE.into());
        };
        let Some(info) = cdb::lookup(cdb) else {
            return Err(sense::INVALID_OPCODE.into());
        };
        if cdb.len() < info.cdb_len() {
            return Err(sense::invalid_cdb_field(0, None).into());
        }
        // NACA (SAM-5 5.9.1.3): auto contingent allegiance is not supported.
        if cdb
            .get(info.cdb_len() - 1)
            .is_some_and(|control| control & 0x04 != 0)
        {
            return Err(sense::invalid_cdb_field(info.cdb_len() as u16 - 1, Some(2)).into());
        }
        self.check_attention_and_access(code, info.access, cdb)?;
        self.dispatch(code, command).await
    }

    /// Reports a pending unit attention (SPC-4 5.14; INQUIRY, REPORT LUNS and REQUEST SENSE
    /// neither report nor clear it), then enforces reservations (SPC-4 5.13.1).
    fn check_attention_and_access(&self, code: u8, access: Access, cdb: &[u8]) -> Outcome<()> {
        let mut state = self.shared.state.lock();
        let reports_attention = !matches!(
            code,
            opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE
        );
        if reports_attention {
            if let Some(sense) = state
                .attentions
                .get_mut(&self.key)
                .and_then(|queue| queue.pop_front())
            {
                return Err(Failure::Check(sense));
            }
        }
        if state.reservations.conflicts(&self.key, code, access, cdb) {
            return Err(Failure::Conflict);
        }
        Ok(())
    }

    async fn dispatch(&self, code: u8, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        match code {
            opcode::TEST_UNIT_READY
            | opcode::START_STOP_UNIT
            | opcode::PREVENT_ALLOW_MEDIUM_REMOVAL => Ok(Response::good()),
            opcode::REQUEST_SENSE => Ok(self.request_sense(command)),
            opcode::INQUIRY => self.inquiry(command),
            opcode::REPORT_LUNS => report_luns(command),
            opcode::MODE_SENSE_6 | opcode::MODE_SENSE_10 => self.mode_sense(command),
            opcode::MODE_SELECT_6 | opcode::MODE_SELECT_10 => self.mode_select(command),
            opcode::READ_CAPACITY_10 => self.read_capacity_10(command),
            opcode::SERVICE_ACTION_IN_16 => match cdb.get(1).map(|b| b & 0x1f) {
                Some(cdb::READ_CAPACITY_16) => self.read_capacity_16(command),
                Some(cdb::GET_LBA_STATUS) => self.get_lba_status(command).await,
                _ => Err(sense::invalid_cdb_field(1, Some(4)).into()),
            },
            opcode::MAINTENANCE_IN => cdb::report_supported_opcodes(command),
            opcode::READ_6 | opcode::READ_10 | opcode::READ_12 | opcode::READ_16 => {
                self.read(command).await
            }
            opcode::WRITE_6
            | opcode::WRITE_10
            | opcode::WRITE_12
            | opcode::WRITE_16
            | opcode::WRITE_AND_VERIFY_10
            | opcode::WRITE_AND_VERIFY_12
            | opcode::WRITE_AND_VERIFY_16 => self.write(command).await,
            opcode::VERIFY_10 | opcode::VERIFY_12 | opcode::VERIFY_16 => self.verify(command).await,
            opcode::WRITE_SAME_10 | opcode::WRITE_SAME_16 => self.write_same(command).await,
            opcode::UNMAP => self.unmap(command).await,
            opcode::COMPARE_AND_WRITE => self.compare_and_write(command).await,
            opcode::ORWRITE_16 => self.or_write(command).await,
            opcode::SYNCHRONIZE_CACHE_10 | opcode::SYNCHRONIZE_CACHE_16 => {
                self.synchronize_cache(command).await
            }
            opcode::PRE_FETCH_10 | opcode::PRE_FETCH_16 => self.pre_fetch(command),
            opcode::READ_DEFECT_DATA_10 | opcode::READ_DEFECT_DATA_12 => read_defect_data(command),
            opcode::PERSISTENT_RESERVE_IN => self.persistent_reserve_in(command),
            opcode::PERSISTENT_RESERVE_OUT => self.persistent_reserve_out(command),
            opcode::RESERVE_6 | opcode::RESERVE_10 => self.reserve(command),
            opcode::RELEASE_6 | opcode::RELEASE_10 => self.release(command),
            _ => Err(sense::INVALID_OPCODE.into()),
        }
    }

    /// REQUEST SENSE (SPC-4 6.29): the pending unit attention (cleared), else NO SENSE.
    fn request_sense(&self, command: &Command<'_>) -> Response {
        let descriptor_format = cdb::u8_at(command.cdb, 1) & 0x01 != 0;
        let allocation_len = cdb::u8_at(command.cdb, 4) as usize;
        let pending = self
            .shared
            .state
            .lock()
            .attentions
            .get_mut(&self.key)
            .and_then(|queue| queue.pop_front());
        let sense = pending.unwrap_or(Sense::new(SenseKey::NoSense, 0, 0));
        let data = if descriptor_format {
            sense.descriptor()
        } else {
            sense.fixed()
        };
        allocated(data, allocation_len, command.expected_in)
    }

    /// LUN RESET from this nexus: clears reservations held through RESERVE(6/10), returns
    /// mode parameters to their defaults, and reports a unit attention to every nexus of the
    /// unit, this one included (SAM-5 6.3.3: a logical unit reset is a unit attention
    /// condition for all I_T nexuses). Persistent reservations stay.
    ///
    /// The transport aborts the unit's tasks itself: it lets their `execute` futures finish
    /// (engine I/O must complete) and drops their responses.
    pub fn reset(&self) {
        let mut state = self.shared.state.lock();
        state.reservations.reset();
        state.mode = ModeState::default();
        state.queue_attention_for_attached(sense::UA_LUN_RESET, None);
    }

    /// The nexus ended (logout or lost connection): its RESERVE(6/10) reservation ends;
    /// persistent reservations and registrations stay (SPC-4 5.13.3).
    pub fn nexus_lost(&self) {
        let mut state = self.shared.state.lock();
        state.reservations.nexus_lost(&self.key);
        match state.attached.get_mut(&self.key) {
            Some(count) if *count > 1 => *count -= 1,
            _ => {
                state.attached.remove(&self.key);
                state.attentions.remove(&self.key);
            }
        }
    }
}

/// The answer to a command addressed to a LUN other than 0, which no target has (SPC-4
/// 6.6.2, SAM-5 5.9.5): INQUIRY reports peripheral qualifier 011b, REPORT LUNS lists LUN 0,
/// REQUEST SENSE and everything else report LOGICAL UNIT NOT SUPPORTED.
pub fn unsupported_lun(command: &Command<'_>) -> Response {
    let not_supported = Sense::new(SenseKey::IllegalRequest, 0x25, 0x00);
    match command.cdb.first() {
        Some(&opcode::INQUIRY) if cdb::u8_at(command.cdb, 1) & 0x01 == 0 => {
            let mut data = vec![0u8; 36];
            data[0] = 0x7f;
            data[2] = 0x06;
            data[3] = 0x02;
            data[4] = 31;
            allocated(
                data,
                cdb::u16_at(command.cdb, 3) as usize,
                command.expected_in,
            )
        }
        Some(&opcode::REPORT_LUNS) => {
            report_luns(command).unwrap_or_else(|_| Response::check(not_supported))
        }
        Some(&opcode::REQUEST_SENSE) => allocated(
            not_supported.fixed(),
            cdb::u8_at(command.cdb, 4) as usize,
            command.expected_in,
        ),
        _ => Response::check(not_supported),
    }
}

/// REPORT LUNS (SPC-4 6.33): one logical unit, LUN 0.
fn report_luns(command: &Command<'_>) -> Outcome {
    let select_report = cdb::u8_at(command.cdb, 2);
    if select_report > 0x02 && !(0x10..=0x12).contains(&select_report) {
        return Err(sense::invalid_cdb_field(2, None).into());
    }
    let allocation_len = cdb::u32_at(command.cdb, 6) as usize;
    let mut data = vec![0u8; 16];
    data[3] = 8;
    Ok(allocated(data, allocation_len, command.expected_in))
}

/// READ DEFECT DATA (10/12) (SBC-3 5.13, 5.14): this device has no defect lists.
fn read_defect_data(command: &Command<'_>) -> Outcome {
    let cdb = command.cdb;
    let (data, allocation_len) = if cdb::u8_at(cdb, 0) == opcode::READ_DEFECT_DATA_10 {
        let format = cdb::u8_at(cdb, 2) & 0x1f;
        (vec![0, format, 0, 0], cdb::u16_at(cdb, 7) as usize)
    } else {
        let format = cdb::u8_at(cdb, 1) & 0x1f;
        (
            vec![0, format, 0, 0, 0, 0, 0, 0],
            cdb::u32_at(cdb, 6) as usize,
        )
    };
    Ok(allocated(data, allocation_len, command.expected_in))
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
    Response::check(Sense::new(key, asc, ascq))
}
