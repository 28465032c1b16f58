//! The login phase (RFC 7143 section 6): security negotiation (None, CHAP) and operational
//! negotiation of the session's parameters. Pure logic: the transport reads Login Request
//! PDUs, hands their fields and text to [`Login::step`], and sends back what it returns.

use std::sync::Arc;

/// Login stages (CSG/NSG).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Security = 0,
    Operational = 1,
    FullFeature = 3,
}

/// CHAP credentials the target requires of initiators, and optionally proves itself with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChapConfig {
    pub user: String,
    pub secret: String,
    /// Mutual CHAP: the name and secret the target answers the initiator's challenge with.
    pub mutual: Option<(String, String)>,
}

/// What the target offers and requires in login.
#[derive(Clone, Debug)]
pub struct LoginConfig {
    /// Required of every session (discovery and normal) when set.
    pub chap: Option<ChapConfig>,
    /// Our MaxRecvDataSegmentLength (declared to the initiator).
    pub max_recv_data_segment_length: u32,
    /// Upper bounds we accept for MaxBurstLength and FirstBurstLength.
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u16,
}

/// Looks target names up during login.
pub trait TargetDirectory: Send + Sync {
    /// Whether `target_name` names a target this portal serves.
    fn exists(&self, target_name: &str) -> bool;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// The session's operational parameters after negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment we may send (the initiator's declaration; default 8192).
    pub initiator_max_recv_data_segment_length: u32,
    /// Largest data segment we accept (our declaration).
    pub target_max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
    pub max_connections: u16,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
}

/// What a successful login established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// Set for normal sessions.
    pub target_name: Option<String>,
    pub params: SessionParams,
}

/// The fields of one Login Request that negotiation uses.
#[derive(Clone, Debug)]
pub struct LoginRequest<'a> {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    /// The data segment: `key=value` pairs, each ending with a NUL.
    pub text: &'a [u8],
}

/// The fields of the Login Response to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginReply {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    /// Status class and detail (RFC 7143 11.13.5); class 0 is success.
    pub status_class: u8,
    pub status_detail: u8,
    /// The TSIH to put in the response (the new session's in the final response).
    pub tsih: u16,
    pub text: Vec<u8>,
}

/// One connection's login, from the first Login Request to full feature phase or failure.
pub struct Login {
    config: Arc<LoginConfig>,
    tsih: u16,
    done: Option<Negotiated>,
}

impl Login {
    /// `tsih` is the identifier the new session gets if the login succeeds (non-zero).
    pub fn new(config: Arc<LoginConfig>, tsih: u16) -> Login {
        Login {
            config,
            tsih,
            done: None,
        }
    }

    /// Handles one Login Request. After a reply with class != 0 the transport closes the
    /// connection.
    pub fn step(
        &mut self,
        request: &LoginRequest<'_>,
        targets: &dyn TargetDirectory,
    ) -> LoginReply {
        let _ = (&self.config, request, targets);
        LoginReply {
            transit: false,
            cont: false,
            csg: request.csg,
            nsg: request.nsg,
            status_class: 3,
            status_detail: 0,
            tsih: self.tsih,
            text: Vec::new(),
        }
    }

    /// Set once the last reply moved the connection to full feature phase.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.done.as_ref()
    }
}
