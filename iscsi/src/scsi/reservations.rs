//! Reservations: persistent reservations (SPC-4 5.13, 6.15 PERSISTENT RESERVE IN, 6.16
//! PERSISTENT RESERVE OUT) and the older RESERVE/RELEASE (6/10) (SPC-2 7.21-7.24).
//!
//! Registrations belong to an I_T nexus, identified by the initiator's name and ISID (one
//! target port: the logical unit is reached through its own target). State lives in memory
//! only, shared by every nexus of the logical unit; APTPL is refused and REPORT CAPABILITIES
//! says so.

use super::cdb::{self, opcode, Access};
use super::sense::{self, Sense};
use super::{allocated, Command, Failure, LuState, Lun, Nexus, Outcome, Response};

/// Registrations kept per logical unit; a REGISTER beyond it gets INSUFFICIENT REGISTRATION
/// RESOURCES.
const REGISTRATIONS_MAX: usize = 256;

/// Parameter list length of every PERSISTENT RESERVE OUT service action we support.
const PROUT_PARAMETER_LEN: u32 = 24;

/// An I_T nexus as reservations know it: the initiator port (name and ISID). The target port
/// is fixed by the logical unit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NexusKey {
    initiator_name: String,
    isid: [u8; 6],
}

impl NexusKey {
    pub fn of(nexus: &Nexus) -> NexusKey {
        NexusKey {
            initiator_name: nexus.initiator_name.clone(),
            isid: nexus.isid,
        }
    }

    /// An iSCSI TransportID in the initiator port format (SPC-4 7.6.4.6, format 01b):
    /// `NAME,i,0xISID`, NUL-terminated and padded to a multiple of 4 bytes.
    fn transport_id(&self) -> Vec<u8> {
        let name = format!("{},i,0x{}", self.initiator_name, hex::encode(self.isid));
        let mut id = vec![0x40 | 0x05, 0, 0, 0];
        id.extend(super::inquiry::nul_padded(&name));
        let additional = (id.len() - 4) as u16;
        id[2..4].copy_from_slice(&additional.to_be_bytes());
        id
    }
}

/// Persistent reservation types (SPC-4 table 175).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl PrType {
    fn decode(code: u8) -> Option<PrType> {
        Some(match code {
            1 => PrType::WriteExclusive,
            3 => PrType::ExclusiveAccess,
            5 => PrType::WriteExclusiveRegistrantsOnly,
            6 => PrType::ExclusiveAccessRegistrantsOnly,
            7 => PrType::WriteExclusiveAllRegistrants,
            8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    /// Every registrant is a holder.
    fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registrants get the holder's access.
    fn registrants_share(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Reads by others are refused too.
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

#[derive(Clone, Debug)]
struct Reservation {
    holder: NexusKey,
    kind: PrType,
}

/// The reservation state of one logical unit.
#[derive(Default)]
pub struct Reservations {
    /// PRGENERATION: bumped by every change of the registrations.
    generation: u32,
    registrations: Vec<(NexusKey, u64)>,
    reservation: Option<Reservation>,
    /// The holder of a RESERVE(6/10) reservation.
    legacy: Option<NexusKey>,
}

impl Reservations {
    fn key_of(&self, nexus: &NexusKey) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(n, _)| n == nexus)
            .map(|(_, key)| *key)
    }

    fn is_holder(&self, nexus: &NexusKey) -> bool {
        match &self.reservation {
            Some(r) if r.kind.all_registrants() => self.key_of(nexus).is_some(),
            Some(r) => &r.holder == nexus,
            None => false,
        }
    }

    /// Whether a command from `nexus` meets a reservation conflict (SPC-4 table 62; SPC-2
    /// 5.5.1 for RESERVE(6/10)).
    pub fn conflicts(&self, nexus: &NexusKey, code: u8, access: Access, cdb: &[u8]) -> bool {
        if let Some(holder) = &self.legacy {
            if holder != nexus {
                return !matches!(
                    code,
                    opcode::INQUIRY
                        | opcode::REPORT_LUNS
                        | opcode::REQUEST_SENSE
                        | opcode::RELEASE_6
                        | opcode::RELEASE_10
                        | opcode::PERSISTENT_RESERVE_IN
                        | opcode::MAINTENANCE_IN
                );
            }
        }
        let Some(reservation) = &self.reservation else {
            return false;
        };
        if self.is_holder(nexus) {
            return false;
        }
        let registered = self.key_of(nexus).is_some();
        if registered && reservation.kind.registrants_share() {
            return false;
        }
        // PREVENT ALLOW MEDIUM REMOVAL only conflicts when it would prevent removal.
        if code == opcode::PREVENT_ALLOW_MEDIUM_REMOVAL {
            return cdb::u8_at(cdb, 4) & 0x03 != 0;
        }
        match access {
            Access::Always | Access::Reservation => false,
            Access::Read => reservation.kind.exclusive_access(),
            Access::Write => true,
        }
    }

    /// A LOGICAL UNIT RESET ends a RESERVE(6/10) reservation (persistent ones stay).
    pub fn reset(&mut self) {
        self.legacy = None;
    }

    pub fn nexus_lost(&mut self, nexus: &NexusKey) {
        if self.legacy.as_ref() == Some(nexus) {
            self.legacy = None;
        }
    }

    fn remove_registration(&mut self, nexus: &NexusKey) {
        self.registrations.retain(|(n, _)| n != nexus);
        let holder_left = match &self.reservation {
            Some(r) if r.kind.all_registrants() => self.registrations.is_empty(),
            Some(r) => &r.holder == nexus,
            None => false,
        };
        if holder_left {
            self.reservation = None;
        }
    }
}

/// The 24-byte PERSISTENT RESERVE OUT parameter list (SPC-4 6.16.3).
struct ProutParameters {
    key: u64,
    service_action_key: u64,
}

impl Lun {
    /// PERSISTENT RESERVE IN (SPC-4 6.15).
    pub(super) fn persistent_reserve_in(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let allocation_len = cdb::u16_at(cdb, 7) as usize;
        let state = self.shared.state.lock();
        let pr = &state.reservations;
        let mut data = Vec::new();
        data.extend_from_slice(&pr.generation.to_be_bytes());
        match cdb::u8_at(cdb, 1) & 0x1f {
            // READ KEYS.
            0x00 => {
                let len = (pr.registrations.len() * 8) as u32;
                data.extend_from_slice(&len.to_be_bytes());
                for (_, key) in &pr.registrations {
                    data.extend_from_slice(&key.to_be_bytes());
                }
            }
            // READ RESERVATION.
            0x01 => match &pr.reservation {
                None => data.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    data.extend_from_slice(&16u32.to_be_bytes());
                    let key = if r.kind.all_registrants() {
                        0
                    } else {
                        pr.key_of(&r.holder).unwrap_or(0)
                    };
                    data.extend_from_slice(&key.to_be_bytes());
                    data.extend_from_slice(&[0, 0, 0, 0, 0, r.kind as u8, 0, 0]);
                }
            },
            // REPORT CAPABILITIES.
            0x02 => {
                data = vec![0u8; 8];
                data[1] = 8;
                // CRH: RESERVE/RELEASE follow SPC-4 5.13.3; SIP_C, ATP_C, PTPL_C are clear.
                data[2] = 0x10;
                // TMV: the type mask is valid; ALLOW COMMANDS 000b; PTPL_A clear.
                data[3] = 0x80;
                // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX; then EX_AC_AR.
                data[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
                data[5] = 0x01;
            }
            // READ FULL STATUS.
            0x03 => {
                let mut descriptors = Vec::new();
                for (nexus, key) in &pr.registrations {
                    let mut descriptor = vec![0u8; 24];
                    descriptor[0..8].copy_from_slice(&key.to_be_bytes());
                    if let Some(r) = &pr.reservation {
                        if pr.is_holder(nexus) {
                            descriptor[12] = 0x01;
                            descriptor[13] = r.kind as u8;
                        }
                    }
                    // RELATIVE TARGET PORT IDENTIFIER: the one port of the target.
                    descriptor[18..20].copy_from_slice(&1u16.to_be_bytes());
                    let transport_id = nexus.transport_id();
                    descriptor[20..24].copy_from_slice(&(transport_id.len() as u32).to_be_bytes());
                    descriptor.extend_from_slice(&transport_id);
                    descriptors.extend_from_slice(&descriptor);
                }
                data.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
                data.extend_from_slice(&descriptors);
            }
            _ => return Err(sense::invalid_cdb_field(1, Some(4)).into()),
        }
        Ok(allocated(data, allocation_len, command.expected_in))
    }

    /// PERSISTENT RESERVE OUT (SPC-4 6.16, 5.13.5 - 5.13.11).
    pub(super) fn persistent_reserve_out(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        let action = cdb::u8_at(cdb, 1) & 0x1f;
        let scope = cdb::u8_at(cdb, 2) >> 4;
        let type_code = cdb::u8_at(cdb, 2) & 0x0f;
        let parameter_len = cdb::u32_at(cdb, 5);
        if action > 0x06 {
            // REGISTER AND MOVE (0x07) and anything newer are not supported.
            return Err(sense::invalid_cdb_field(1, Some(4)).into());
        }
        if parameter_len != PROUT_PARAMETER_LEN || command.data_out.len() < 24 {
            return Err(sense::PARAMETER_LIST_LENGTH.into());
        }
        let list = command.data_out;
        let flags = cdb::u8_at(list, 20);
        if flags & 0x01 != 0 {
            // APTPL: persistence through power loss is not supported (PTPL_C is clear).
            return Err(sense::invalid_parameter_field(20).into());
        }
        if flags & 0x0c != 0 {
            // SPEC_I_PT and ALL_TG_PT are not supported (SIP_C and ATP_C are clear).
            return Err(sense::invalid_parameter_field(20).into());
        }
        let parameters = ProutParameters {
            key: cdb::u64_at(list, 0),
            service_action_key: cdb::u64_at(list, 8),
        };
        let needs_type = matches!(action, 0x01 | 0x02 | 0x04 | 0x05);
        let kind = if needs_type {
            if scope != 0 {
                return Err(sense::invalid_cdb_field(2, Some(7)).into());
            }
            match PrType::decode(type_code) {
                Some(kind) => Some(kind),
                None => return Err(sense::invalid_cdb_field(2, Some(3)).into()),
            }
        } else {
            None
        };
        let mut state = self.shared.state.lock();
        if state
            .reservations
            .legacy
            .as_ref()
            .is_some_and(|holder| holder != &self.key)
        {
            return Err(Failure::Conflict);
        }
        let me = self.key.clone();
        match (action, kind) {
            (0x00, _) => register(&mut state, &me, &parameters, false),
            (0x06, _) => register(&mut state, &me, &parameters, true),
            (0x01, Some(kind)) => reserve(&mut state, &me, &parameters, kind),
            (0x02, Some(kind)) => release(&mut state, &me, &parameters, kind),
            (0x03, _) => clear(&mut state, &me, &parameters),
            (0x04 | 0x05, Some(kind)) => preempt(&mut state, &me, &parameters, kind),
            _ => Err(sense::invalid_cdb_field(1, Some(4)).into()),
        }
    }

    /// RESERVE(6/10) (SPC-2 7.21): a whole-unit reservation for this nexus.
    pub(super) fn reserve(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        if cdb::u8_at(cdb, 0) == opcode::RESERVE_10 && cdb::u8_at(cdb, 1) & 0x13 != 0 {
            // Third-party and extent reservations are not supported.
            return Err(sense::invalid_cdb_field(1, None).into());
        }
        let mut state = self.shared.state.lock();
        let pr = &mut state.reservations;
        if pr.reservation.is_some() && !pr.is_holder(&self.key) {
            return Err(Failure::Conflict);
        }
        match &pr.legacy {
            Some(holder) if holder != &self.key => Err(Failure::Conflict),
            _ => {
                pr.legacy = Some(self.key.clone());
                Ok(Response::good())
            }
        }
    }

    /// RELEASE(6/10) (SPC-2 7.17): ends this nexus's reservation; a no-op otherwise.
    pub(super) fn release(&self, command: &Command<'_>) -> Outcome {
        let cdb = command.cdb;
        if cdb::u8_at(cdb, 0) == opcode::RELEASE_10 && cdb::u8_at(cdb, 1) & 0x13 != 0 {
            return Err(sense::invalid_cdb_field(1, None).into());
        }
        let mut state = self.shared.state.lock();
        if state.reservations.legacy.as_ref() == Some(&self.key) {
            state.reservations.legacy = None;
        }
        Ok(Response::good())
    }
}

/// INSUFFICIENT REGISTRATION RESOURCES.
const NO_REGISTRATION_RESOURCES: Sense = Sense::new(super::SenseKey::IllegalRequest, 0x55, 0x04);

/// REGISTER and REGISTER AND IGNORE EXISTING KEY (SPC-4 5.13.7).
fn register(
    state: &mut LuState,
    me: &NexusKey,
    parameters: &ProutParameters,
    ignore_existing: bool,
) -> Outcome {
    let pr = &mut state.reservations;
    let new_key = parameters.service_action_key;
    match pr.key_of(me) {
        None => {
            if !ignore_existing && parameters.key != 0 {
                return Err(Failure::Conflict);
            }
            if new_key == 0 {
                return Ok(Response::good());
            }
            if pr.registrations.len() >= REGISTRATIONS_MAX {
                return Err(NO_REGISTRATION_RESOURCES.into());
            }
            pr.registrations.push((me.clone(), new_key));
        }
        Some(key) => {
            if !ignore_existing && parameters.key != key {
                return Err(Failure::Conflict);
            }
            if new_key == 0 {
                // Unregistering: a holder that leaves releases the reservation, and for the
                // registrants-only types the others hear of it (SPC-4 5.13.11.1).
                let released = match &pr.reservation {
                    Some(r) if r.kind.all_registrants() => pr.registrations.len() == 1,
                    Some(r) => &r.holder == me,
                    None => false,
                };
                let kind = pr.reservation.as_ref().map(|r| r.kind);
                pr.remove_registration(me);
                if released && kind.is_some_and(|k| k.registrants_share()) {
                    let others: Vec<NexusKey> =
                        pr.registrations.iter().map(|(n, _)| n.clone()).collect();
                    for nexus in others {
                        state.queue_attention(&nexus, sense::UA_RESERVATIONS_RELEASED);
                    }
                }
            } else if let Some(entry) = pr.registrations.iter_mut().find(|(n, _)| n == me) {
                entry.1 = new_key;
            }
        }
    }
    let pr = &mut state.reservations;
    pr.generation = pr.generation.wrapping_add(1);
    Ok(Response::good())
}

/// RESERVE (SPC-4 5.13.9).
fn reserve(
    state: &mut LuState,
    me: &NexusKey,
    parameters: &ProutParameters,
    kind: PrType,
) -> Outcome {
    let pr = &mut state.reservations;
    if pr.key_of(me) != Some(parameters.key) {
        return Err(Failure::Conflict);
    }
    match &pr.reservation {
        Some(r) if pr.is_holder(me) && r.kind == kind => Ok(Response::good()),
        Some(_) => Err(Failure::Conflict),
        None => {
            pr.reservation = Some(Reservation {
                holder: me.clone(),
                kind,
            });
            Ok(Response::good())
        }
    }
}

/// RELEASE (SPC-4 5.13.11.2).
fn release(
    state: &mut LuState,
    me: &NexusKey,
    parameters: &ProutParameters,
    kind: PrType,
) -> Outcome {
    let pr = &mut state.reservations;
    if pr.key_of(me) != Some(parameters.key) {
        return Err(Failure::Conflict);
    }
    let Some(reservation) = pr.reservation.clone() else {
        return Ok(Response::good());
    };
    if !pr.is_holder(me) {
        return Ok(Response::good());
    }
    if reservation.kind != kind {
        return Err(sense::INVALID_RELEASE.into());
    }
    pr.reservation = None;
    if kind.registrants_share() {
        let others: Vec<NexusKey> = pr
            .registrations
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n != me)
            .collect();
        for nexus in others {
            state.queue_attention(&nexus, sense::UA_RESERVATIONS_RELEASED);
        }
    }
    Ok(Response::good())
}

/// CLEAR (SPC-4 5.13.11.2.3).
fn clear(state: &mut LuState, me: &NexusKey, parameters: &ProutParameters) -> Outcome {
    let pr = &mut state.reservations;
    if pr.key_of(me) != Some(parameters.key) {
        return Err(Failure::Conflict);
    }
    let others: Vec<NexusKey> = pr
        .registrations
        .iter()
        .map(|(n, _)| n.clone())
        .filter(|n| n != me)
        .collect();
    pr.registrations.clear();
    pr.reservation = None;
    pr.generation = pr.generation.wrapping_add(1);
    for nexus in others {
        state.queue_attention(&nexus, sense::UA_RESERVATIONS_PREEMPTED);
    }
    Ok(Response::good())
}

/// PREEMPT and PREEMPT AND ABORT (SPC-4 5.13.11.4). Tasks of preempted nexuses are not
/// aborted here: commands run to completion as they arrive.
fn preempt(
    state: &mut LuState,
    me: &NexusKey,
    parameters: &ProutParameters,
    kind: PrType,
) -> Outcome {
    let pr = &mut state.reservations;
    if pr.key_of(me) != Some(parameters.key) {
        return Err(Failure::Conflict);
    }
    let victim_key = parameters.service_action_key;
    let mut preempted_reservation = false;
    let removed: Vec<NexusKey> = match pr.reservation.clone() {
        Some(r) if r.kind.all_registrants() && victim_key == 0 => {
            // Preempting an all-registrants reservation with key 0: everyone else goes and
            // the preempting nexus holds the new reservation.
            preempted_reservation = true;
            pr.registrations
                .iter()
                .map(|(n, _)| n.clone())
                .filter(|n| n != me)
                .collect()
        }
        Some(r) if !r.kind.all_registrants() && pr.key_of(&r.holder) == Some(victim_key) => {
            preempted_reservation = true;
            pr.registrations
                .iter()
                .filter(|(n, key)| *key == victim_key && n != me)
                .map(|(n, _)| n.clone())
                .collect()
        }
        _ => {
            if victim_key == 0 {
                return Err(sense::invalid_parameter_field(8).into());
            }
            let removed: Vec<NexusKey> = pr
                .registrations
                .iter()
                .filter(|(n, key)| *key == victim_key && n != me)
                .map(|(n, _)| n.clone())
                .collect();
            let preempting_self = pr.key_of(me) == Some(victim_key);
            if removed.is_empty() && !preempting_self {
                return Err(Failure::Conflict);
            }
            removed
        }
    };
    pr.registrations.retain(|(n, _)| !removed.contains(n));
    if preempted_reservation {
        pr.reservation = Some(Reservation {
            holder: me.clone(),
            kind,
        });
    } else if pr
        .reservation
        .as_ref()
        .is_some_and(|r| r.kind.all_registrants() && pr.registrations.is_empty())
    {
        pr.reservation = None;
    }
    pr.generation = pr.generation.wrapping_add(1);
    for nexus in &removed {
        state.queue_attention(nexus, sense::UA_REGISTRATIONS_PREEMPTED);
    }
    Ok(Response::good())
}
